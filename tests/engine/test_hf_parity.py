"""Greedy outputs of the engine equal Hugging Face transformers' token for token (float32) on
generated llama / qwen2 / qwen3 models: mixed prompt lengths with shared prefixes (prefix-cache
hits), chunked prefill forced on, and preemption under a tiny KV pool."""

from __future__ import annotations

import random

import pytest
import torch

from tandem.engine import LLM, SamplingParams

transformers = pytest.importorskip("transformers")

MAX_NEW = 12


def hf_greedy(model_dir: str, prompts: list[list[int]], n: int):
    """(token ids, logprob of each chosen token) per prompt."""
    model = transformers.AutoModelForCausalLM.from_pretrained(model_dir, dtype=torch.float32)
    model.eval()
    outs, lps = [], []
    with torch.no_grad():
        for ids in prompts:
            # No KV cache on the reference side: a full forward per token is slow but leaves
            # nothing shared with the code under test (and no cache API to track across versions).
            seq, lp = list(ids), []
            for _ in range(n):
                logp = model(torch.tensor([seq])).logits[0, -1].log_softmax(-1)
                seq.append(int(logp.argmax()))
                lp.append(float(logp.max()))
            outs.append(seq[len(ids):])
            lps.append(lp)
    return outs, lps


def make_prompts(vocab: int, seed: int = 0) -> list[list[int]]:
    rng = random.Random(seed)
    shared = [rng.randrange(vocab) for _ in range(40)]     # 2.5 blocks of 16
    prompts = [shared + [rng.randrange(vocab) for _ in range(k)] for k in (3, 17, 29, 64)]
    prompts += [[rng.randrange(vocab) for _ in range(k)] for k in (1, 5, 16, 33, 90)]
    prompts.append(list(prompts[2]))                         # an exact repeat: full-block hits
    return prompts


@pytest.fixture(scope="module", params=["llama", "qwen2", "qwen3"])
def arch_case(request, model_factory):
    model_dir = model_factory(request.param)
    prompts = make_prompts(1000)
    return (model_dir, prompts, *hf_greedy(model_dir, prompts, MAX_NEW))


GREEDY = SamplingParams(max_tokens=MAX_NEW, temperature=0.0, ignore_eos=True)


def check_no_leaks(llm: LLM) -> None:
    eng = llm.engine
    assert not eng.has_unfinished()
    eng.pool.check_invariants(live_refs={})
    assert eng.pool.num_free == eng.pool.usable_blocks


def test_batch_with_prefix_hits(arch_case):
    model_dir, prompts, expected, expected_lp = arch_case
    llm = LLM(model_dir, dtype="float32")
    # Warm the prefix cache with the shared-prefix prompts, then run everything as one batch.
    llm.generate(prompts[:2], GREEDY)
    params = SamplingParams(max_tokens=MAX_NEW, temperature=0.0, ignore_eos=True, logprobs=0)
    outs = llm.generate(prompts, params)
    assert [o.token_ids for o in outs] == expected
    got_lp = [lp for o in outs for lp, _ in o.logprobs]
    assert got_lp == pytest.approx([x for row in expected_lp for x in row], abs=1e-4)
    assert sum(o.num_cached_tokens for o in outs) >= 32 * 4   # the shared prefix was reused
    check_no_leaks(llm)


def test_chunked_prefill(arch_case):
    model_dir, prompts, expected, _ = arch_case
    llm = LLM(model_dir, dtype="float32", max_num_batched_tokens=24, enable_prefix_caching=False)
    outs = llm.generate(prompts, GREEDY)
    assert [o.token_ids for o in outs] == expected
    check_no_leaks(llm)


def test_preemption_tiny_pool(arch_case):
    model_dir, prompts, expected, _ = arch_case
    llm = LLM(model_dir, dtype="float32", num_kv_blocks=12, max_num_batched_tokens=64)
    outs = llm.generate(prompts, GREEDY)
    assert [o.token_ids for o in outs] == expected
    # 10 prompts of up to 102 tokens in 11 usable blocks of 16: preemption must have happened
    assert sum(s.value for s in _preemption_samples()) > 0
    check_no_leaks(llm)


def _preemption_samples():
    from tandem import metrics
    for fam in metrics.ENGINE_PREEMPTIONS.collect():
        yield from (s for s in fam.samples if s.name.endswith("_total"))


def test_llama3_rope_scaling_matches_hf(tmp_path):
    from tandem.engine.make_model import make_test_model
    rope = {"rope_type": "llama3", "rope_theta": 500000.0, "factor": 8.0, "low_freq_factor": 1.0,
            "high_freq_factor": 4.0, "original_max_position_embeddings": 1024}
    model_dir = str(make_test_model(tmp_path / "l3", "llama", rope=rope))
    prompts = make_prompts(1000, seed=3)[:4]
    expected, _ = hf_greedy(model_dir, prompts, MAX_NEW)
    outs = LLM(model_dir, dtype="float32").generate(prompts, GREEDY)
    assert [o.token_ids for o in outs] == expected


def test_mistral_matches_hf(tmp_path, tiny_llama):
    """MistralForCausalLM (no sliding window) through the same loader, against transformers'
    own Mistral implementation."""
    import json
    import shutil
    d = tmp_path / "mistral"
    shutil.copytree(tiny_llama, d)
    cfg = json.loads((d / "config.json").read_text())
    cfg.update(architectures=["MistralForCausalLM"], model_type="mistral", sliding_window=None)
    (d / "config.json").write_text(json.dumps(cfg))
    prompts = make_prompts(1000, seed=5)[:4]
    expected, _ = hf_greedy(str(d), prompts, MAX_NEW)
    outs = LLM(str(d), dtype="float32").generate(prompts, GREEDY)
    assert [o.token_ids for o in outs] == expected
