"""Sampling parameters and stop conditions, end to end through the engine."""

from __future__ import annotations

import pytest

from tandem.engine import LLM, SamplingParams

PROMPT = [11, 22, 33, 44, 55, 66]


@pytest.fixture(scope="module")
def llm(tiny_llama):
    return LLM(tiny_llama, dtype="float32")


def greedy(llm, n=8, **kw):
    return llm.generate([PROMPT], SamplingParams(max_tokens=n, temperature=0.0, ignore_eos=True, **kw))[0]


def test_seeded_sampling_is_reproducible_and_batch_independent(llm):
    sp = SamplingParams(max_tokens=10, temperature=1.0, seed=1234, ignore_eos=True)
    alone = llm.generate([PROMPT], sp)[0].token_ids
    others = SamplingParams(max_tokens=10, temperature=1.0, ignore_eos=True)
    in_batch = llm.generate([[1, 2, 3], PROMPT, [4, 5]], [others, sp, others])[1].token_ids
    assert alone == in_batch
    different = llm.generate([PROMPT], SamplingParams(max_tokens=10, temperature=1.0, seed=99,
                                                      ignore_eos=True))[0].token_ids
    assert different != alone


@pytest.mark.parametrize("kw", [{"top_k": 1, "temperature": 1.0}, {"top_p": 1e-6, "temperature": 1.0},
                                {"min_p": 1.0, "temperature": 1.0}])
def test_truncation_to_one_token_equals_greedy(llm, kw):
    out = llm.generate([PROMPT], SamplingParams(max_tokens=8, ignore_eos=True, seed=5, **kw))[0]
    assert out.token_ids == greedy(llm).token_ids


def test_top_k_restricts_choices(llm):
    # With top_k=2 every sampled token must be one of the two most likely at its step.
    sp = SamplingParams(max_tokens=12, temperature=5.0, top_k=2, seed=3, ignore_eos=True, logprobs=2)
    out = llm.generate([PROMPT], sp)[0]
    for tok, (lp, top) in zip(out.token_ids, out.logprobs):
        assert tok in [t for t, _ in top]


def test_logprobs(llm):
    out = greedy(llm, logprobs=5)
    assert len(out.logprobs) == len(out.token_ids)
    for tok, (lp, top) in zip(out.token_ids, out.logprobs):
        assert len(top) == 5
        assert top[0][0] == tok and top[0][1] == pytest.approx(lp)
        assert [v for _, v in top] == sorted((v for _, v in top), reverse=True)
        assert lp <= 0


def test_max_tokens_finish_length(llm):
    out = greedy(llm, n=5)
    assert len(out.token_ids) == 5 and out.finish_reason == "length"


def test_stop_token_ids(llm):
    ref = greedy(llm).token_ids
    out = greedy(llm, stop_token_ids=[ref[3]])
    stop_at = ref.index(ref[3])
    assert out.token_ids == ref[:stop_at + 1]
    assert out.finish_reason == "stop" and out.stop_reason == ref[3]


def test_min_tokens_bars_stop_tokens(llm):
    ref = greedy(llm).token_ids
    out = greedy(llm, stop_token_ids=[ref[0]], min_tokens=3)
    assert out.token_ids[0] != ref[0]            # masked at step 0
    assert len(out.token_ids) >= 3


def test_stop_strings(llm):
    full = greedy(llm, n=16)
    text = full.text
    assert len(text) > 6
    needle = text[3:6]
    out = greedy(llm, n=16, stop=[needle])
    assert out.finish_reason == "stop" and out.stop_reason == needle
    assert out.text == text[:text.index(needle)]
    kept = greedy(llm, n=16, stop=[needle], include_stop_str_in_output=True)
    assert kept.text == text[:text.index(needle) + len(needle)]


def test_streamed_text_with_stop_strings_matches_final_text(llm):
    """Through the step API: concatenated deltas equal the final text, the stop string never
    leaks out even though it may arrive split over several tokens."""
    eng = llm.engine
    full = greedy(llm, n=16).text
    needle = full[4:7]
    eng.add_request("stream-1", PROMPT, SamplingParams(max_tokens=16, temperature=0.0,
                                                       ignore_eos=True, stop=[needle]))
    pieces, last = [], None
    while eng.has_unfinished():
        for o in eng.step():
            pieces.append(o.new_text)
            last = o
    assert last.finished and last.finish_reason == "stop"
    assert "".join(pieces) == full[:full.index(needle)]


def test_eos_stops_unless_ignored(llm):
    eng = llm.engine
    ref = greedy(llm).token_ids
    eos = ref[2]
    eng.eos_ids.add(eos)
    try:
        stopped = llm.generate([PROMPT], SamplingParams(max_tokens=8, temperature=0.0))[0]
        assert stopped.token_ids == ref[:ref.index(eos) + 1] and stopped.finish_reason == "stop"
        assert len(greedy(llm).token_ids) == 8                 # ignore_eos
    finally:
        eng.eos_ids.discard(eos)


def test_abort_frees_blocks(llm):
    eng = llm.engine
    free = eng.pool.num_free
    eng.add_request("to-abort", list(range(1, 60)), SamplingParams(max_tokens=50, ignore_eos=True))
    eng.step()
    assert eng.pool.num_free < free
    assert eng.abort_request("to-abort")
    assert eng.pool.num_free == free and not eng.has_unfinished()
    eng.pool.check_invariants(live_refs={})


def test_chat_template_and_detokenizer(llm):
    out = llm.chat([{"role": "user", "content": "Hello there"}],
                   SamplingParams(max_tokens=4, temperature=0.0, ignore_eos=True))
    assert len(out.token_ids) == 4
