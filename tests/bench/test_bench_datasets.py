"""Datasets: token-exact lengths, shared prefixes that are really shared, ShareGPT filtering."""

from __future__ import annotations

import json
import os

import pytest

from tandem.bench.datasets import (DatasetConfig, count_tokens, load_tokenizer, sample_requests,
                                   TokenSampler)


@pytest.fixture(scope="module")
def tok(tokenizer_dir):
    return load_tokenizer(tokenizer_dir)


def _common_prefix(a: str, b: str) -> str:
    n = 0
    for x, y in zip(a, b):
        if x != y:
            break
        n += 1
    return a[:n]


def test_token_sampler_hits_exact_lengths(tok):
    import numpy as np

    s = TokenSampler(tok, np.random.default_rng(1))
    assert not {0, 1} & set(s.ids.tolist())  # special tokens never sampled
    for n in (1, 7, 64, 300, 1500):
        for _ in range(3):
            assert abs(count_tokens(tok, s.text(n)) - n) <= 1


def test_random_dataset_lengths(tok):
    cfg = DatasetConfig(name="random", num_prompts=40, random_input_len=200,
                        random_output_len=30)
    reqs = sample_requests(cfg, tok, seed=3)
    assert len(reqs) == 40
    for r in reqs:
        assert r.prompt_len == count_tokens(tok, r.prompt)  # reported length is the real one
        assert abs(r.prompt_len - 200) <= 2
        assert r.expected_output_len == 30
    assert len({r.prompt for r in reqs}) == 40

    cfg = DatasetConfig(name="random", num_prompts=60, random_input_len=100,
                        random_output_len=50, random_range_ratio=0.5)
    reqs = sample_requests(cfg, tok, seed=3)
    assert all(48 <= r.prompt_len <= 152 for r in reqs)
    assert all(25 <= r.expected_output_len <= 75 for r in reqs)
    assert len({r.expected_output_len for r in reqs}) > 10  # lengths really vary

    # the headline workload: input 2048-4096 but output 128-512 needs its own output ratio
    cfg = DatasetConfig(name="random", num_prompts=60, random_input_len=100, random_range_ratio=0.5,
                        random_output_len=50, random_output_range_ratio=0.9)
    outs = [r.expected_output_len for r in sample_requests(cfg, tok, seed=3)]
    assert all(4 <= n <= 96 for n in outs) and min(outs) < 25 and max(outs) > 75


def test_random_dataset_seeded(tok):
    cfg = DatasetConfig(name="random", num_prompts=5, random_input_len=50)
    a, b = sample_requests(cfg, tok, seed=1), sample_requests(cfg, tok, seed=1)
    c = sample_requests(cfg, tok, seed=2)
    assert [r.prompt for r in a] == [r.prompt for r in b]
    assert [r.prompt for r in a] != [r.prompt for r in c]


def test_random_prefix_is_shared(tok):
    cfg = DatasetConfig(name="random", num_prompts=10, random_input_len=40, random_prefix_len=120)
    reqs = sample_requests(cfg, tok, seed=0)
    common = reqs[0].prompt
    for r in reqs[1:]:
        common = _common_prefix(common, r.prompt)
        assert abs(r.prompt_len - 160) <= 2
    assert count_tokens(tok, common) >= 119


def _groups(reqs):
    groups: dict[int, list] = {}
    for r in reqs:
        groups.setdefault(r.group, []).append(r)
    return groups


def test_prefix_repetition_shares_prefixes(tok):
    cfg = DatasetConfig(name="prefix-repetition", num_prompts=24,
                        prefix_repetition_prefix_len=100, prefix_repetition_suffix_len=30,
                        prefix_repetition_num_prefixes=4, prefix_repetition_output_len=17)
    reqs = sample_requests(cfg, tok, seed=0)
    groups = _groups(reqs)
    assert len(reqs) == 24 and sorted(groups) == [0, 1, 2, 3]
    assert all(len(g) == 6 for g in groups.values())
    assert [r.group for r in reqs] != sorted(r.group for r in reqs)  # interleaved
    firsts = []
    for g in groups.values():
        common = g[0].prompt
        for r in g[1:]:
            common = _common_prefix(common, r.prompt)
        assert count_tokens(tok, common) >= 99  # the whole 100-token prefix is shared
        assert all(abs(r.prompt_len - 130) <= 2 and r.expected_output_len == 17 for r in g)
        firsts.append(g[0].prompt)
    # Different groups share (almost) nothing.
    assert max(len(_common_prefix(a, b)) for a in firsts for b in firsts if a is not b) < 10


def test_generated_shared_prefix_layout(tok):
    cfg = DatasetConfig(name="generated-shared-prefix", gsp_num_groups=5,
                        gsp_prompts_per_group=4, gsp_system_prompt_len=300,
                        gsp_question_len=20, gsp_output_len=9)
    reqs = sample_requests(cfg, tok, seed=0)
    groups = _groups(reqs)
    assert len(reqs) == 20 and len(groups) == 5
    for g in groups.values():
        assert len(g) == 4
        common = g[0].prompt
        for r in g[1:]:
            common = _common_prefix(common, r.prompt)
        assert "\n\n" in common  # system prompt, blank line, then the question
        assert count_tokens(tok, common) >= 300
        for r in g:
            assert 320 <= r.prompt_len <= 324 and r.expected_output_len == 9
    assert DatasetConfig().gsp_num_groups == 64 and DatasetConfig().gsp_prompts_per_group == 16
    assert (DatasetConfig().gsp_system_prompt_len, DatasetConfig().gsp_question_len,
            DatasetConfig().gsp_output_len) == (2048, 128, 256)


def test_sharegpt_loading_and_filters(tok, tmp_path):
    long_text = " ".join(["token"] * 1100)
    good_q = "How do I reverse a list in Python without copying it?"
    good_a = "Call the list's reverse method: it reverses the list in place."
    data = [
        {"id": "ok", "conversations": [{"from": "human", "value": good_q},
                                       {"from": "gpt", "value": good_a}]},
        {"id": "one-turn", "conversations": [{"from": "human", "value": good_q}]},
        {"id": "short-prompt", "conversations": [{"from": "human", "value": "hi"},
                                                 {"from": "gpt", "value": good_a}]},
        {"id": "short-reply", "conversations": [{"from": "human", "value": good_q},
                                                {"from": "gpt", "value": "ok"}]},
        {"id": "long-prompt", "conversations": [{"from": "human", "value": long_text},
                                                {"from": "gpt", "value": good_a}]},
        {"id": "long-pair", "conversations": [{"from": "human", "value": good_q},
                                              {"from": "gpt", "value": long_text * 2}]},
        {"id": "ok2", "conversations": [{"from": "human", "value": good_a},
                                        {"from": "gpt", "value": good_q},
                                        {"from": "human", "value": "more"}]},
    ]
    assert count_tokens(tok, "hi") < 4 and count_tokens(tok, long_text) > 1024
    path = os.path.join(tmp_path, "sg.json")
    with open(path, "w") as f:
        json.dump(data, f)
    cfg = DatasetConfig(name="sharegpt", num_prompts=10, dataset_path=path)
    reqs = sample_requests(cfg, tok, seed=0)
    assert sorted(r.prompt for r in reqs) == sorted([good_q, good_a])
    for r in reqs:
        reply = good_a if r.prompt == good_q else good_q
        assert r.prompt_len == count_tokens(tok, r.prompt)
        assert r.expected_output_len == count_tokens(tok, reply)

    one = sample_requests(DatasetConfig(name="sharegpt", num_prompts=1, dataset_path=path), tok)
    assert len(one) == 1
    fixed = sample_requests(DatasetConfig(name="sharegpt", num_prompts=10, dataset_path=path,
                                          sharegpt_output_len=3), tok)
    # A fixed output length replaces the reply's: short-reply and long-pair now pass too.
    assert len(fixed) == 4 and {r.expected_output_len for r in fixed} == {3}
    with pytest.raises(ValueError):
        sample_requests(DatasetConfig(name="sharegpt"), tok)
