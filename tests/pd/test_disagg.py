"""One prefill and one decode worker as separate processes on the tiny model, over nixl (DRAM)
and tcp: outputs equal the monolithic engine's token for token, a repeated prefix moves fewer
bytes, and every failure (prefill dies mid-transfer, decode dies, a transfer stalls) ends with a
clear error and both sides' free-block counts back where they started."""

from __future__ import annotations

import os
import random
import sys
import time

import grpc
import pytest

sys.path.insert(0, os.path.dirname(__file__))
from harness import Proc, generate, metric_value  # noqa: E402

from tandem.engine import LLM, SamplingParams  # noqa: E402
from tandem.kvtransfer import nixl_available  # noqa: E402
from tandem.proto import worker_pb2 as pb  # noqa: E402
from tandem.proto import worker_pb2_grpc as pb_grpc  # noqa: E402
from tandem.proto.convert import params_to_proto  # noqa: E402

BACKENDS = ["tcp", pytest.param("nixl", marks=pytest.mark.skipif(
    nixl_available() is not None, reason=f"nixl unavailable: {nixl_available()}"))]
GREEDY = SamplingParams(max_tokens=10, temperature=0.0, ignore_eos=True, logprobs=2)
rng = random.Random(7)
PROMPTS = [[rng.randrange(1000) for _ in range(n)] for n in (3, 17, 40, 95, 130)]


@pytest.fixture(scope="module")
def reference(tiny_llama):
    llm = LLM(tiny_llama, dtype="float32")
    return [o for o in llm.generate(PROMPTS, GREEDY)]


@pytest.fixture(scope="module", params=BACKENDS)
def workers(request, tiny_llama, tmp_path_factory):
    backend = request.param
    logs = str(tmp_path_factory.mktemp(f"logs-{backend}"))
    common = ("--kv-transfer", backend)
    # prefill chunks prompts at 32 tokens: transfers span several engine steps
    pre = Proc("prefill", tiny_llama, *common, "--max-batch-tokens", "32", log_dir=logs)
    slow = Proc("prefill", tiny_llama, *common, "--debug-layer-delay-ms", "400", log_dir=logs)
    dec = Proc("decode", tiny_llama, *common, "--remote-prefill-threshold", "1",
               "--failed-transfer-quarantine", "0.3", log_dir=logs)
    procs = [pre, slow, dec]
    try:
        for p in procs:
            p.wait_ready()
        yield backend, pre, slow, dec, logs
    finally:
        for p in procs:
            p.stop()


def settle_free(proc: Proc, timeout: float = 10.0) -> pb.WorkerInfo:
    """Waits until every block of the worker is free again (cached blocks count as free)."""
    deadline = time.monotonic() + timeout
    info = proc.info()
    while info.free_blocks != info.total_blocks and time.monotonic() < deadline:
        time.sleep(0.1)
        info = proc.info()
    return info


def test_outputs_equal_monolithic(workers, reference):
    backend, pre, _, dec, _ = workers
    for prompt, ref in zip(PROMPTS, reference):
        toks, last, first = generate(dec.endpoint, prompt, GREEDY, pre.endpoint)
        assert first.prefill_mode == "remote"
        assert toks == ref.token_ids, f"prompt of {len(prompt)} tokens over {backend}"
        assert last.finish_reason == "length" and last.completion_tokens == 10
    for p in (pre, dec):
        info = settle_free(p)
        assert info.free_blocks == info.total_blocks


def test_repeated_prefix_moves_fewer_bytes(workers):
    _, pre, _, dec, _ = workers
    prompt = [rng.randrange(1000) for _ in range(100)]

    def recv_bytes():
        return metric_value(dec.metrics(), "tandem_kv_transfer_bytes_total", direction="recv")

    b0 = recv_bytes()
    first, *_ = generate(dec.endpoint, prompt, GREEDY, pre.endpoint)
    b1 = recv_bytes()
    again, last, _ = generate(dec.endpoint, prompt + [5, 6, 7], GREEDY, pre.endpoint)
    b2 = recv_bytes()
    assert b1 - b0 > 0
    assert 0 < b2 - b1 < (b1 - b0) / 3          # only the blocks decode did not cache yet
    assert last.cached_tokens >= 96


def test_conditional_disaggregation(workers, reference, tiny_llama):
    _, pre, _, dec, _ = workers
    # no prefill endpoint: the decode worker prefills itself
    toks, _, first = generate(dec.endpoint, PROMPTS[2], GREEDY)
    assert first.prefill_mode == "local" and toks == reference[2].token_ids


def test_bad_requests_are_invalid_argument(workers):
    _, pre, _, dec, _ = workers
    with pytest.raises(grpc.RpcError) as e:
        generate(dec.endpoint, [1, 2, 3], SamplingParams(temperature=-1.0), pre.endpoint)
    assert e.value.code() == grpc.StatusCode.INVALID_ARGUMENT and "temperature" in e.value.details()
    with pytest.raises(grpc.RpcError) as e:
        generate(dec.endpoint, [1] * 5000, GREEDY, pre.endpoint)
    assert e.value.code() == grpc.StatusCode.INVALID_ARGUMENT and "context" in e.value.details()
    with grpc.insecure_channel(dec.endpoint) as ch:
        with pytest.raises(grpc.RpcError) as e:
            list(pb_grpc.DecodeWorkerStub(ch).Generate(pb.GenerateRequest(
                version=0, request_id="v0", token_ids=[1, 2], params=params_to_proto(GREEDY))))
    assert e.value.code() == grpc.StatusCode.FAILED_PRECONDITION and "PROTOCOL_VERSION_1" in e.value.details()


def test_layout_mismatch_is_a_clear_error(workers, tiny_llama):
    backend, pre, _, _, logs = workers
    odd = Proc("decode", tiny_llama, "--kv-transfer", backend, "--block-size", "32",
               "--remote-prefill-threshold", "1", log_dir=logs).wait_ready()
    try:
        with pytest.raises(grpc.RpcError) as e:
            generate(odd.endpoint, PROMPTS[3], GREEDY, pre.endpoint)
        assert e.value.code() == grpc.StatusCode.UNAVAILABLE
        assert "block_size" in e.value.details()
    finally:
        odd.stop()


def test_stalled_transfer_times_out(workers, tiny_llama):
    backend, _, slow, _, logs = workers
    # The slow prefill needs ~0.8 s per prompt; this decode gives a transfer 0.3 s.
    impatient = Proc("decode", tiny_llama, "--kv-transfer", backend, "--remote-prefill-threshold", "1",
                     "--bootstrap-timeout", "0.3", "--transfer-timeout", "0.3",
                     "--failed-transfer-quarantine", "0.3", log_dir=logs).wait_ready()
    try:
        t0 = time.monotonic()
        with pytest.raises(grpc.RpcError) as e:
            generate(impatient.endpoint, PROMPTS[3], GREEDY, slow.endpoint)
        assert e.value.code() == grpc.StatusCode.UNAVAILABLE
        assert time.monotonic() - t0 < 10
        for p in (impatient, slow):
            info = settle_free(p)
            assert info.free_blocks == info.total_blocks, p.role
    finally:
        impatient.stop()


def test_decode_dies_mid_transfer(workers, tiny_llama):
    backend, _, slow, _, logs = workers
    doomed = Proc("decode", tiny_llama, "--kv-transfer", backend, "--remote-prefill-threshold", "1",
                  log_dir=logs).wait_ready()
    import threading
    err = []
    t = threading.Thread(target=lambda: _capture(err, generate, doomed.endpoint, PROMPTS[4], GREEDY,
                                                 slow.endpoint))
    t.start()
    time.sleep(0.5)                     # the slow prefill is between layers now
    doomed.kill()
    t.join(30)
    assert err, "the client should see the decode worker vanish"
    info = settle_free(slow, timeout=15)
    assert info.free_blocks == info.total_blocks, slow.tail()
    # the prefill worker keeps serving other decode workers
    assert slow.info().ready


def test_prefill_dies_mid_transfer(workers, tiny_llama):
    backend, _, slow, dec, _ = workers
    import threading
    err = []
    before = dec.info()
    t = threading.Thread(target=lambda: _capture(err, generate, dec.endpoint, PROMPTS[4], GREEDY,
                                                 slow.endpoint))
    t.start()
    time.sleep(0.5)
    slow.kill()
    t.join(60)
    assert err and isinstance(err[0], grpc.RpcError)
    assert err[0].code() == grpc.StatusCode.UNAVAILABLE and "retried" in err[0].details()
    info = settle_free(dec)
    assert info.free_blocks == info.total_blocks == before.total_blocks
    # and the decode worker still serves
    toks, _, _ = generate(dec.endpoint, PROMPTS[0], GREEDY)
    assert len(toks) == 10


def _capture(err, fn, *args):
    try:
        fn(*args)
    except Exception as e:   # the test inspects it
        err.append(e)


def test_health_reflection_and_graceful_shutdown(tiny_llama, tmp_path):
    from grpc_health.v1 import health_pb2, health_pb2_grpc
    from grpc_reflection.v1alpha import reflection_pb2, reflection_pb2_grpc
    p = Proc("decode", tiny_llama, "--kv-transfer", "tcp", log_dir=str(tmp_path)).wait_ready()
    try:
        with grpc.insecure_channel(p.endpoint) as ch:
            st = health_pb2_grpc.HealthStub(ch).Check(health_pb2.HealthCheckRequest(service=""), timeout=5)
            assert st.status == health_pb2.HealthCheckResponse.SERVING
            resp = next(reflection_pb2_grpc.ServerReflectionStub(ch).ServerReflectionInfo(
                iter([reflection_pb2.ServerReflectionRequest(list_services="")]), timeout=5))
            names = {s.name for s in resp.list_services_response.service}
            assert {"tandem.v1.DecodeWorker", "grpc.health.v1.Health"} <= names
        p.p.send_signal(15)
        assert p.p.wait(timeout=30) == 0
    finally:
        p.stop()
