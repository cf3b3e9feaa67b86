"""Prompt sets for ``tandem bench serve``: synthetic token-exact prompts and ShareGPT files.

Data flow: :func:`load_tokenizer` reads a Hugging Face ``tokenizer.json`` with the ``tokenizers``
library; :func:`sample_requests` picks a builder by :class:`DatasetConfig.name` and returns a list
of :class:`SampleRequest` (prompt text, its token count under that tokenizer, the number of tokens
to ask the server for). The runner sends ``prompt`` and reports ``prompt_len`` as input tokens.

Synthetic prompts follow vLLM's recipe: draw random token ids from the vocabulary (special tokens
excluded), decode them to text, re-encode, and trim or pad the ids until the text re-encodes to the
requested length. Decoding random ids is not a round trip (byte pieces merge, some ids normalise
away), which is why the loop exists; ``prompt_len`` is always the length actually measured.

Shared-prefix sets (``random`` with ``--random-prefix-len``, ``prefix-repetition``,
``generated-shared-prefix``) build each prompt as ``prefix_text + suffix_text``, so every prompt of
a group starts with the *same string*: a server's prefix cache sees identical leading tokens
whatever its own tokenizer does at the boundary.
"""

from __future__ import annotations

import json
import math
import os
from dataclasses import dataclass
from typing import Any

import numpy as np
from tokenizers import Tokenizer

DATASETS = ("random", "prefix-repetition", "generated-shared-prefix", "sharegpt")


@dataclass
class SampleRequest:
    """One prompt to send. ``prompt_len`` counts tokens under the benchmark's tokenizer."""

    prompt: str
    prompt_len: int
    expected_output_len: int
    group: int = 0  # shared-prefix group (0 where prompts share nothing); for tests and analysis


@dataclass
class DatasetConfig:
    """Which prompts to build and how many. Defaults match ``vllm bench serve`` / SGLang."""

    name: str = "random"
    num_prompts: int = 1000
    dataset_path: str | None = None  # ShareGPT JSON
    sharegpt_output_len: int | None = None  # override the gpt turn's length
    random_input_len: int = 1024
    random_output_len: int = 128
    random_range_ratio: float = 0.0
    random_output_range_ratio: float | None = None  # None: random_range_ratio (vLLM has one ratio)
    random_prefix_len: int = 0
    prefix_repetition_prefix_len: int = 256
    prefix_repetition_suffix_len: int = 256
    prefix_repetition_num_prefixes: int = 10
    prefix_repetition_output_len: int = 128
    gsp_num_groups: int = 64
    gsp_prompts_per_group: int = 16
    gsp_system_prompt_len: int = 2048
    gsp_question_len: int = 128
    gsp_output_len: int = 256


def load_tokenizer(path: str) -> Tokenizer:
    """A ``tokenizers.Tokenizer`` from a model directory holding tokenizer.json, or the file itself."""
    file = os.path.join(path, "tokenizer.json") if os.path.isdir(path) else path
    if not os.path.isfile(file):
        raise FileNotFoundError(f"no tokenizer.json at {path!r} (pass a Hugging Face model dir)")
    return Tokenizer.from_file(file)


def count_tokens(tokenizer: Tokenizer, text: str) -> int:
    # add_special_tokens=False: a BOS the server adds is not part of the prompt we built.
    return len(tokenizer.encode(text, add_special_tokens=False).ids)


class TokenSampler:
    """Builds texts that re-encode to an exact number of tokens (within a token where the
    tokenizer makes that impossible, e.g. a byte piece that always merges with its neighbour)."""

    MAX_ROUNDS = 10

    def __init__(self, tokenizer: Tokenizer, rng: np.random.Generator):
        self.tok = tokenizer
        self.rng = rng
        # Special/added tokens are excluded: they decode to markers like <|eot_id|> that a chat
        # template or the server would treat as control tokens, not as prompt text. So are ids
        # that decode to nothing or to a lone byte of a multi-byte character ("\ufffd"): the
        # replacement character re-encodes to several tokens and the length never settles.
        added = set(tokenizer.get_added_tokens_decoder().keys())
        vocab = [i for i in range(tokenizer.get_vocab_size(with_added_tokens=True))
                 if i not in added]
        texts = tokenizer.decode_batch([[i] for i in vocab], skip_special_tokens=True)
        keep = [(i, t) for i, t in zip(vocab, texts) if t and "\ufffd" not in t]
        # ...and ids that encoding never produces (a text that re-encodes to other tokens, such
        # as a generated test model's vocabulary fillers): they would make lengths drift.
        enc = tokenizer.encode_batch([t for _, t in keep], add_special_tokens=False)
        self.ids = np.array([i for (i, _), e in zip(keep, enc) if e.ids == [i]], dtype=np.int64)
        if len(self.ids) == 0:
            raise ValueError("tokenizer has no ordinary tokens to sample from")

    def random_ids(self, n: int) -> list[int]:
        return self.rng.choice(self.ids, size=max(n, 0)).tolist()

    def text(self, n: int, start: str = "") -> str:
        """Random text of ``n`` tokens: decode, re-encode, trim or top up, repeat.

        ``start``: keep the leading tokens of this text and re-fit only the end (how a suffix is
        resized without changing the way it joins its prefix).
        """
        if n <= 0:
            return ""
        ids = self.tok.encode(start, add_special_tokens=False).ids[:n] if start else []
        ids = ids + self.random_ids(n - len(ids))
        text = self.tok.decode(ids, skip_special_tokens=True)
        for _ in range(self.MAX_ROUNDS):
            ids = self.tok.encode(text, add_special_tokens=False).ids
            if len(ids) == n:
                break
            ids = ids[:n] if len(ids) > n else ids + self.random_ids(n - len(ids))
            text = self.tok.decode(ids, skip_special_tokens=True)
        return text

    def joined(self, prefix: str, sizes: list[tuple[int, int]]) -> list[tuple[str, int]]:
        """For each ``(n_suffix, total)``: ``prefix`` + random text re-encoding to ``total``
        tokens, returned with its measured length.

        Tokens can merge across the boundary, so every joined string is measured (one batch
        call, which the tokenizers library runs on all cores); the few that miss get their
        suffix's *end* trimmed or extended, which leaves the boundary as it was. The prefix
        string itself is never altered.
        """
        suffixes = [self.text(n) for n, _ in sizes]
        prompts = [prefix + s for s in suffixes]
        counts = [len(e.ids) for e in self.tok.encode_batch(prompts, add_special_tokens=False)]
        for i, (n_suffix, total) in enumerate(sizes):
            for _ in range(self.MAX_ROUNDS):
                if counts[i] == total or n_suffix <= 0:
                    break
                n_suffix = max(n_suffix + total - counts[i], 0)
                suffixes[i] = self.text(n_suffix, start=suffixes[i])
                prompts[i] = prefix + suffixes[i]
                counts[i] = count_tokens(self.tok, prompts[i])
        return list(zip(prompts, counts))


def _lens(rng: np.random.Generator, mean: int, ratio: float, n: int) -> np.ndarray:
    # vLLM's --random-range-ratio: uniform integers in [mean*(1-r), mean*(1+r)].
    if not 0.0 <= ratio < 1.0:
        raise ValueError("--random-range-ratio must be in [0, 1)")
    low, high = math.floor(mean * (1 - ratio)), math.ceil(mean * (1 + ratio))
    return rng.integers(low, high + 1, size=n)


def random_dataset(cfg: DatasetConfig, tok: Tokenizer, seed: int = 0) -> list[SampleRequest]:
    rng = np.random.default_rng(seed)
    sampler = TokenSampler(tok, rng)
    in_lens = _lens(rng, cfg.random_input_len, cfg.random_range_ratio, cfg.num_prompts)
    out_ratio = cfg.random_range_ratio if cfg.random_output_range_ratio is None else cfg.random_output_range_ratio
    out_lens = _lens(rng, cfg.random_output_len, out_ratio, cfg.num_prompts)
    # One prefix shared by every request, as vLLM's --random-prefix-len.
    prefix = sampler.text(cfg.random_prefix_len)
    sizes = [(n, cfg.random_prefix_len + n) for n in in_lens.tolist()]
    return [SampleRequest(prompt, plen, max(int(n_out), 1))
            for (prompt, plen), n_out in zip(sampler.joined(prefix, sizes), out_lens.tolist())]


def _grouped(sampler: TokenSampler, rng: np.random.Generator, num_groups: int, per_group: int,
             prefix_len: int, suffix_len: int, output_len: int, sep: str = "") -> list[SampleRequest]:
    out = []
    for g in range(num_groups):
        prefix = sampler.text(prefix_len) + sep
        plen = count_tokens(sampler.tok, prefix)
        for prompt, n in sampler.joined(prefix, [(suffix_len, plen + suffix_len)] * per_group):
            out.append(SampleRequest(prompt, n, output_len, group=g))
    # Interleave groups so arrivals do not hit one prefix at a time (both peers shuffle).
    order = rng.permutation(len(out))
    return [out[i] for i in order]


def prefix_repetition_dataset(cfg: DatasetConfig, tok: Tokenizer, seed: int = 0) -> list[SampleRequest]:
    """vLLM's prefix_repetition: num_prefixes prefixes, num_prompts/num_prefixes suffixes each."""
    rng = np.random.default_rng(seed)
    k = cfg.prefix_repetition_num_prefixes
    if k <= 0 or cfg.num_prompts < k:
        raise ValueError("--num-prompts must be >= --prefix-repetition-num-prefixes > 0")
    reqs = _grouped(TokenSampler(tok, rng), rng, k, cfg.num_prompts // k,
                    cfg.prefix_repetition_prefix_len, cfg.prefix_repetition_suffix_len,
                    cfg.prefix_repetition_output_len)
    return reqs


def generated_shared_prefix_dataset(cfg: DatasetConfig, tok: Tokenizer, seed: int = 0) -> list[SampleRequest]:
    """SGLang's generated-shared-prefix: groups of questions behind one long system prompt.

    The size is num_groups x prompts_per_group (--num-prompts is ignored, as in SGLang). The
    system prompt and question are joined by a blank line, as SGLang does.
    """
    rng = np.random.default_rng(seed)
    return _grouped(TokenSampler(tok, rng), rng, cfg.gsp_num_groups, cfg.gsp_prompts_per_group,
                    cfg.gsp_system_prompt_len, cfg.gsp_question_len, cfg.gsp_output_len,
                    sep="\n\n")


def sharegpt_dataset(cfg: DatasetConfig, tok: Tokenizer, seed: int = 0) -> list[SampleRequest]:
    """ShareGPT JSON: the first human turn is the prompt, the gpt reply's length the output length.

    Filtered like vLLM: skip conversations under two turns, prompts or replies under 4 tokens,
    prompts over 1024 tokens and prompt + reply over 2048 tokens.
    """
    if not cfg.dataset_path:
        raise ValueError("--dataset-name sharegpt needs --dataset-path")
    with open(cfg.dataset_path, encoding="utf-8") as f:
        data: list[dict[str, Any]] = json.load(f)
    convs = [d["conversations"] for d in data if len(d.get("conversations") or []) >= 2]
    rng = np.random.default_rng(seed)
    out: list[SampleRequest] = []
    for i in rng.permutation(len(convs)).tolist():
        if len(out) == cfg.num_prompts:
            break
        first, second = convs[i][0], convs[i][1]
        prompt, reply = str(first.get("value", "")), str(second.get("value", ""))
        prompt_len = count_tokens(tok, prompt)
        out_len = cfg.sharegpt_output_len or count_tokens(tok, reply)
        if prompt_len < 4 or (cfg.sharegpt_output_len is None and out_len < 4):
            continue
        if prompt_len > 1024 or prompt_len + out_len > 2048:
            continue
        out.append(SampleRequest(prompt, prompt_len, out_len))
    if len(out) < cfg.num_prompts:
        print(f"[bench] sharegpt: only {len(out)} of {cfg.num_prompts} requested conversations "
              "pass the length filters; using those")
    return out


def sample_requests(cfg: DatasetConfig, tok: Tokenizer, seed: int = 0) -> list[SampleRequest]:
    """The prompts ``cfg`` describes; the same seed and tokenizer give the same prompts."""
    builders = {
        "random": random_dataset,
        "prefix-repetition": prefix_repetition_dataset,
        "generated-shared-prefix": generated_shared_prefix_dataset,
        "sharegpt": sharegpt_dataset,
    }
    if cfg.name not in builders:
        raise ValueError(f"unknown dataset {cfg.name!r}; one of {', '.join(DATASETS)}")
    return builders[cfg.name](cfg, tok, seed)
