"""flashinfer attention (prefill, decode, CUDA-graph decode wrappers) against the torch backend on
random paged caches: mixed query lengths, contexts that start mid-block, shuffled block tables.
Skipped without CUDA + flashinfer."""

from __future__ import annotations

import random
from types import SimpleNamespace

import pytest
import torch

from tandem.engine.attention import StepMetadata, TorchAttention

pytestmark = pytest.mark.gpu
if not torch.cuda.is_available():
    pytest.skip("needs a CUDA GPU", allow_module_level=True)
pytest.importorskip("flashinfer")
from tandem.engine.attention.flashinfer_backend import FlashInferAttention  # noqa: E402

BS = 16


def make_case(qo_lens, kv_lens, heads, kv_heads, num_blocks=512, seed=0):
    rng = random.Random(seed)
    free = list(range(1, num_blocks))
    rng.shuffle(free)
    tables, slots = [], []
    for n, kv in zip(qo_lens, kv_lens):
        nb = -(-kv // BS)
        t = [free.pop() for _ in range(nb)]
        tables.append(t)
        for p in range(kv - n, kv):
            slots.append(t[p // BS] * 2 * BS + p % BS)
    cfg = SimpleNamespace(num_heads=heads, num_kv_heads=kv_heads, head_dim=128, dtype=torch.bfloat16)
    kv_layer = torch.randn(num_blocks, 2, BS, kv_heads, 128, device="cuda", dtype=torch.bfloat16)
    T = sum(qo_lens)
    q = torch.randn(T, heads, 128, device="cuda", dtype=torch.bfloat16)
    k = torch.randn(T, kv_heads, 128, device="cuda", dtype=torch.bfloat16)
    v = torch.randn_like(k)
    meta = StepMetadata(list(qo_lens), list(kv_lens), tables,
                        torch.tensor(slots, device="cuda"), all(n == 1 for n in qo_lens))
    return cfg, kv_layer, q, k, v, meta


@pytest.mark.parametrize("heads,kv_heads", [(32, 8), (4, 2), (8, 8)])
@pytest.mark.parametrize("qo_lens,kv_lens", [
    ([1, 1, 1, 1], [1, 17, 300, 1024]),               # decode
    ([5, 33, 128], [5, 40, 300]),                      # prefill, some with cached context
    ([1, 70, 1, 16], [90, 70, 16, 48]),                # mixed decode + prefill chunks
])
def test_flashinfer_matches_torch(heads, kv_heads, qo_lens, kv_lens):
    cfg, kv_layer, q, k, v, meta = make_case(qo_lens, kv_lens, heads, kv_heads)
    ref_cache, fi_cache = kv_layer.clone(), kv_layer.clone()
    ref = TorchAttention(cfg, BS)
    ref.plan(meta)
    expected = ref.forward(0, q, k, v, ref_cache)
    fi = FlashInferAttention(cfg, BS, torch.device("cuda"))
    fi.plan(meta)
    got = fi.forward(0, q, k, v, fi_cache)
    assert torch.equal(ref_cache, fi_cache)                       # same K/V writes
    err = (got.float() - expected.float()).norm() / expected.float().norm()
    assert err < 2e-2, f"relative error {err:.4f}"


def test_graph_wrapper_with_padding():
    qo, kv = [1, 1, 1], [3, 100, 513]
    cfg, kv_layer, q, k, v, meta = make_case(qo, kv, 32, 8)
    ref = TorchAttention(cfg, BS)
    ref.plan(meta)
    expected = ref.forward(0, q, k, v, kv_layer.clone())
    fi = FlashInferAttention(cfg, BS, torch.device("cuda"))
    fi.graph_wrapper(8, 4096)
    fi.plan(meta, graph_batch=8)
    pad = lambda t: torch.cat([t, t.new_zeros(8 - t.shape[0], *t.shape[1:])])  # noqa: E731
    meta.slot_k = pad(meta.slot_k)
    got = fi.forward(0, pad(q), pad(k), pad(v), kv_layer.clone())[:3]
    err = (got.float() - expected.float()).norm() / expected.float().norm()
    assert err < 2e-2, f"relative error {err:.4f}"
