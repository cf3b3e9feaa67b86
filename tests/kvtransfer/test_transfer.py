"""Two processes, each with its own kv tensor, move blocks over each backend (nixl DRAM, tcp).

One decode and one prefill process per backend serve most tests (start-up is the slow part);
the tests that kill a process start an extra one for the victim. Destination tensors are poisoned
first, so a write outside the requested blocks shows up as a changed poison value.
"""

from __future__ import annotations

import itertools
import time
from dataclasses import dataclass

import numpy as np
import pytest

from tandem.kvtransfer import (KVLayout, LayoutMismatch, TransferError, create_engine,
                               nixl_available)
from tandem.kvtransfer.testing import PeerProcess, RemoteError

LAYOUT = KVLayout(num_layers=4, num_blocks=64, block_size=16, num_kv_heads=2, head_dim=128,
                  dtype="float32")
TIMEOUT = 2.0  # transfer_timeout_s in the peers: failure tests wait about this long
CFG = {"transfer_timeout_s": TIMEOUT, "bootstrap_timeout_s": 3.0}
SLACK = 1.5  # polling, process scheduling on a 2-core CI machine
POISON = -7.0
NIXL_MISSING = nixl_available()
_ids = itertools.count()


def _backends():
    return [pytest.param("nixl", marks=pytest.mark.skipif(
        NIXL_MISSING is not None, reason=f"nixl does not import: {NIXL_MISSING}")), "tcp"]


def _link(prefill: PeerProcess, decode: PeerProcess) -> None:
    """Both directions: the prefill writes to the decode, the decode acks/rejects back."""
    prefill.call("connect", decode.info)
    decode.call("connect", prefill.info)


@dataclass
class Pair:
    backend: str
    prefill: PeerProcess
    decode: PeerProcess

    def reset(self, seed: int) -> None:
        self.prefill.call("fill", seed=seed)
        self.decode.call("fill", value=POISON)

    def transfer(self, src, dst, layerwise=True, payload=b"", rid=None):
        """A whole transfer with the receiver polling meanwhile; (sender, receiver) results."""
        rid = rid or f"req-{next(_ids)}"
        self.decode.call("receiver", rid, dst, self.prefill.name)
        self.decode.start("wait", "rx", rid, 10)
        tx = self.prefill.call("transfer", self.decode.name, rid, src, dst, layerwise=layerwise,
                               payload=payload)
        return tx, self.decode.result()

    def assert_copied(self, src, dst, untouched_extra=()):
        assert np.array_equal(self.prefill.call("read", src), self.decode.call("read", dst))
        others = sorted(set(range(LAYOUT.num_blocks)) - set(dst)) + list(untouched_extra)
        rest = self.decode.call("read", others).view(np.float32)
        assert (rest == POISON).all(), "a block outside dst_blocks was written"


@pytest.fixture(scope="module", params=_backends())
def pair(request):
    decode = PeerProcess(request.param, LAYOUT, config=CFG, name=f"decode-{request.param}")
    prefill = PeerProcess(request.param, LAYOUT, config=CFG, name=f"prefill-{request.param}")
    _link(prefill, decode)
    yield Pair(request.param, prefill, decode)
    prefill.close()
    decode.close()


def _bytes_metric(peer: PeerProcess, backend: str, direction: str) -> float:
    return peer.call("metric", "tandem_kv_transfer_bytes_total",
                     {"model": "", "backend": backend, "direction": direction}) or 0.0


def test_noncontiguous_blocks_arrive_exactly(pair):
    pair.reset(seed=1)
    src, dst = [5, 9, 2, 30, 31], [40, 3, 17, 8, 9]  # 30,31 -> 8,9 is the only merged run
    before = _bytes_metric(pair.prefill, pair.backend, "send")
    tx, rx = pair.transfer(src, dst, layerwise=False, payload=b"first-token:42")
    assert tx["state"] == "DONE" and rx["state"] == "DONE", (tx, rx)
    assert rx["payload"] == b"first-token:42"
    assert tx["descriptors"] == 4 * LAYOUT.num_layers  # 4 runs x 4 layers, none across layers
    nbytes = len(src) * LAYOUT.num_layers * LAYOUT.block_bytes
    assert tx["nbytes"] == rx["nbytes"] == nbytes
    assert _bytes_metric(pair.prefill, pair.backend, "send") - before == nbytes
    pair.assert_copied(src, dst)
    assert pair.prefill.call("live") == 0 and pair.decode.call("live") == 0


def test_contiguous_runs_become_one_descriptor_per_layer(pair):
    pair.reset(seed=2)
    src, dst = list(range(10, 30)), list(range(33, 53))
    tx, rx = pair.transfer(src, dst, layerwise=True)
    assert tx["state"] == rx["state"] == "DONE", (tx, rx)
    assert tx["descriptors"] == LAYOUT.num_layers
    pair.assert_copied(src, dst)


def test_tail_only_transfer_leaves_the_cached_prefix(pair):
    # The decode side already caches the first 3 blocks of the prompt; only the tail moves.
    pair.reset(seed=3)
    prefix_dst, tail_src, tail_dst = [20, 21, 22], [7, 8], [23, 24]
    tx, rx = pair.transfer(tail_src, tail_dst, payload=b"t")
    assert tx["state"] == rx["state"] == "DONE", (tx, rx)
    assert tx["descriptors"] == LAYOUT.num_layers
    pair.assert_copied(tail_src, tail_dst)  # prefix_dst is among the blocks checked untouched
    assert (pair.decode.call("read", prefix_dst).view(np.float32) == POISON).all()


def test_layer_by_layer_with_ready_signal(pair):
    pair.reset(seed=4)
    rid, src, dst = f"req-{next(_ids)}", [1, 2, 3], [4, 5, 6]
    p, d = pair.prefill, pair.decode
    d.call("receiver", rid, dst, p.name)
    p.call("sender", d.name, rid, src, dst)
    # Layer 0 is "still being computed" for a moment: nothing may be posted before it is ready.
    assert p.call("send_layer", rid, 0, ready_after_s=0.5) == "BOOTSTRAPPING"
    assert d.call("poll", "rx", rid)["state"] == "BOOTSTRAPPING"
    deadline = time.monotonic() + 5
    while d.call("poll", "rx", rid)["state"] != "TRANSFERRING":
        p.call("poll", "tx", rid)
        assert time.monotonic() < deadline, "layer 0 never arrived"
    for layer in range(1, LAYOUT.num_layers):
        p.call("send_layer", rid, layer)
    p.call("finish", rid, b"tok")
    d.start("wait", "rx", rid, 10)
    tx = p.call("wait", "tx", rid, 10)
    rx = d.result()
    assert tx["state"] == rx["state"] == "DONE" and rx["payload"] == b"tok", (tx, rx)
    pair.assert_copied(src, dst)


def test_unknown_request_is_rejected(pair):
    pair.decode.start("progress_for", 1.0)  # the decode worker's loop keeps draining events
    tx = pair.prefill.call("transfer", pair.decode.name, f"nobody-{next(_ids)}", [1], [2])
    pair.decode.result()
    assert tx["state"] == "FAILED" and tx["failure"] == "rejected", tx


def test_stalled_transfer_times_out_on_both_sides(pair):
    rid, p, d = f"req-{next(_ids)}", pair.prefill, pair.decode
    d.call("receiver", rid, [10, 11], p.name)
    p.call("sender", d.name, rid, [1, 2], [10, 11])
    p.call("send_layer", rid, 0)  # ...and the prefill never sends layer 1 or finishes
    d.start("wait", "rx", rid, 10)
    tx = p.call("wait", "tx", rid, 10)
    rx = d.result()
    # Whichever side times out first tells the other, which then fails as peer_aborted.
    assert tx["state"] == rx["state"] == "FAILED", (tx, rx)
    assert {tx["failure"], rx["failure"]} <= {"transfer_timeout", "peer_aborted"}, (tx, rx)
    assert "transfer_timeout" in (tx["failure"], rx["failure"], rx["detail"], tx["detail"])
    assert rx["waited"] < TIMEOUT + SLACK


def test_receiver_without_sender_hits_bootstrap_timeout(pair):
    rid = f"req-{next(_ids)}"
    pair.decode.call("receiver", rid, [12], pair.prefill.name)
    rx = pair.decode.call("wait", "rx", rid, 10)
    assert rx["state"] == "FAILED" and rx["failure"] == "bootstrap_timeout", rx


def test_sender_abort_reaches_the_receiver(pair):
    rid, p, d = f"req-{next(_ids)}", pair.prefill, pair.decode
    d.call("receiver", rid, [13, 14], p.name)
    p.call("sender", d.name, rid, [1, 2], [13, 14])
    p.call("send_layer", rid, 0)
    assert p.call("abort", "tx", rid, "client went away") == "FAILED"
    rx = d.call("wait", "rx", rid, 10)
    assert rx["state"] == "FAILED" and rx["failure"] == "peer_aborted", rx
    assert rx["waited"] < TIMEOUT  # told, not timed out
    assert p.call("poll", "tx", rid)["failure"] == "aborted"


def test_receiver_abort_stops_the_sender(pair):
    pair.reset(seed=5)
    rid, p, d = f"req-{next(_ids)}", pair.prefill, pair.decode
    dst = [15, 16]
    d.call("receiver", rid, dst, p.name)
    p.call("sender", d.name, rid, [1, 2], dst)
    p.call("send_layer", rid, 0)
    assert d.call("wait", "rx", rid, 0.5)["state"] != "FAILED"
    assert d.call("abort", "rx", rid, "preempted") == "FAILED"
    for layer in range(1, LAYOUT.num_layers):
        p.call("send_layer", rid, layer)
    p.call("finish", rid, b"x")
    tx = p.call("wait", "tx", rid, 10)
    assert tx["state"] == "FAILED" and tx["failure"] in ("peer_aborted", "rejected"), tx
    assert tx["waited"] < TIMEOUT
    if pair.backend == "tcp":  # tcp guarantees nothing lands after abort() returned
        later = d.call("read", dst)[1:].view(np.float32)
        assert (later == POISON).all()


def test_sender_killed_mid_transfer(pair):
    victim = PeerProcess(pair.backend, LAYOUT, config=CFG)
    try:
        _link(victim, pair.decode)
        rid, d = f"req-{next(_ids)}", pair.decode
        d.call("receiver", rid, [20, 21], victim.name)
        victim.call("sender", d.name, rid, [1, 2], [20, 21])
        victim.call("send_layer", rid, 0)
        victim.call("send_layer", rid, 1)
        victim.start("wait", "tx", rid, 30)  # the prefill loop polls its sender...
        assert d.call("wait", "rx", rid, 0.5)["state"] == "TRANSFERRING"
        victim.kill()  # ...until the process dies
        rx = d.call("wait", "rx", rid, 10)
        assert rx["state"] == "FAILED", rx
        assert rx["failure"] == ("peer_lost" if pair.backend == "tcp" else "transfer_timeout")
        assert rx["waited"] < TIMEOUT + SLACK
    finally:
        victim.close()


def test_receiver_killed_mid_transfer(pair):
    victim = PeerProcess(pair.backend, LAYOUT, config=CFG)
    try:
        _link(pair.prefill, victim)
        rid, p = f"req-{next(_ids)}", pair.prefill
        victim.call("receiver", rid, [20, 21], p.name)
        p.call("sender", victim.name, rid, [1, 2], [20, 21])
        p.call("send_layer", rid, 0)
        victim.call("wait", "rx", rid, 0.5)
        victim.kill()
        for layer in range(1, LAYOUT.num_layers):
            p.call("send_layer", rid, layer)
        p.call("finish", rid, b"x")
        tx = p.call("wait", "tx", rid, 10)
        assert tx["state"] == "FAILED", tx
        assert tx["failure"] in ("peer_lost", "transfer_timeout"), tx
        print(f"receiver killed, {pair.backend} sender: {tx['failure']} {tx['detail']!r} "
              f"after {tx['waited']:.2f}s")
        assert tx["waited"] < TIMEOUT + SLACK
        # The prefill engine still works for other peers afterwards.
        pair.reset(seed=6)
        tx2, rx2 = pair.transfer([3], [4])
        assert tx2["state"] == rx2["state"] == "DONE"
    finally:
        victim.close()


def test_bad_blocks_are_refused_before_any_transfer(pair):
    with pytest.raises(RemoteError, match="dst_blocks"):
        pair.prefill.call("sender", pair.decode.name, "bad-1", [1, 2], [3, 64])
    with pytest.raises(RemoteError, match="repeated"):
        pair.prefill.call("sender", pair.decode.name, "bad-2", [1, 2], [3, 3])
    with pytest.raises(RemoteError, match="source blocks"):
        pair.prefill.call("sender", pair.decode.name, "bad-3", [1, 2], [3])


@pytest.mark.parametrize("backend", _backends())
def test_layout_mismatch_names_the_field(backend):
    a = create_engine(backend, LAYOUT.allocate())
    other = KVLayout(**{**LAYOUT.to_dict(), "head_dim": 64, "num_blocks": 10})
    b = create_engine(backend, other.allocate())
    try:
        with pytest.raises(LayoutMismatch, match="head_dim differs") as err:
            a.connect(b.handshake_info())
        assert (err.value.local, err.value.peer) == (128, 64)
        more = create_engine(backend, KVLayout(**{**LAYOUT.to_dict(), "num_blocks": 10}).allocate())
        assert a.connect(more.handshake_info()).layout.num_blocks == 10  # may differ
        more.close()
    finally:
        a.close()
        b.close()


@pytest.mark.parametrize("backend", _backends())
def test_close_fails_live_transfers(backend):
    a = create_engine(backend, LAYOUT.allocate())
    rx = a.create_receiver("r", [1, 2])
    a.close()
    assert rx.poll().name == "FAILED" and rx.failure == "closed"
    a.close()  # idempotent


def test_misuse_is_refused_in_process():
    a = create_engine("tcp", LAYOUT.allocate())
    b = create_engine("tcp", LAYOUT.allocate())
    try:
        peer = a.connect(b.handshake_info())
        b.create_receiver("dup", [1], a.name)
        with pytest.raises(ValueError, match="already has a live transfer"):
            b.create_receiver("dup", [2], a.name)
        assert b.live_transfers() == 1
        tx = a.create_sender(peer, "dup", [3], [1])
        tx.send_layer(0)
        with pytest.raises(TransferError, match=r"before layers \[1, 2, 3\]"):
            tx.finish(b"")
        with pytest.raises(TransferError, match="sent twice"):
            tx.send_layer(0)
        with pytest.raises(ValueError, match="unknown kv transfer backend"):
            create_engine("carrier-pigeon", LAYOUT.allocate())
    finally:
        a.close()
        b.close()


def _cuda_devices() -> int:
    import torch
    return torch.cuda.device_count() if torch.cuda.is_available() else 0


@pytest.mark.gpu
@pytest.mark.skipif(_cuda_devices() == 0, reason="needs a CUDA GPU")
@pytest.mark.parametrize("backend", _backends())
def test_vram_transfer_waits_for_each_layer_event(backend):
    """GPU 0 -> the last GPU (or GPU 0 again), bf16, each layer gated on its CUDA event."""
    layout = KVLayout(4, 64, 16, 8, 128, "bfloat16")
    dst_gpu = _cuda_devices() - 1
    decode = PeerProcess(backend, layout, device=f"cuda:{dst_gpu}", config=CFG)
    prefill = PeerProcess(backend, layout, device="cuda:0", config=CFG)
    try:
        _link(prefill, decode)
        prefill.call("fill", value=1.0)  # the stale pages a premature copy would send
        decode.call("fill", value=POISON)
        src, dst, rid = [2, 3, 4, 9], [50, 51, 52, 7], "gpu-1"
        decode.call("receiver", rid, dst, prefill.name)
        prefill.call("sender", decode.name, rid, src, dst)
        for layer in range(layout.num_layers):
            prefill.call("compute_and_send_layer", rid, layer, src, seed=layer)
        prefill.call("finish", rid, b"gpu")
        decode.start("wait", "rx", rid, 20)
        tx = prefill.call("wait", "tx", rid, 20)
        rx = decode.result()
        assert tx["state"] == rx["state"] == "DONE" and rx["payload"] == b"gpu", (tx, rx)
        # runs 2,3,4 -> 50,51,52 and 9 -> 7: two descriptors per layer
        assert tx["descriptors"] == 2 * layout.num_layers
        assert np.array_equal(prefill.call("read", src), decode.call("read", dst))
        others = sorted(set(range(64)) - set(dst))
        rest = decode.call("read", others)
        poison = np.full(1, POISON, dtype=np.float32)  # bf16 = the high half of a float32
        assert (rest.view(np.uint16) == poison.view(np.uint16)[1]).all()
    finally:
        prefill.close()
        decode.close()
