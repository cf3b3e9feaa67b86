"""Sampling parameters (validated at admission) and the batched sampler.

The sampler takes the logits of every sequence that produces a token this step and returns one
token id per row (plus logprobs when asked). Rows are processed together: greedy rows by argmax,
random rows by temperature, then top-k / top-p / min-p masks, then an exponential race
(argmax of p / E with E ~ Exp(1), equivalent to drawing from p). A request with a `seed` draws its
noise from its own generator, so its output does not depend on what else is in the batch.
"""

from __future__ import annotations

from dataclasses import dataclass, field

import torch

from tandem.engine.errors import InvalidRequestError

MAX_LOGPROBS = 20


@dataclass
class SamplingParams:
    max_tokens: int = 16
    temperature: float = 1.0
    top_p: float = 1.0
    top_k: int = 0                # 0 or -1: off
    min_p: float = 0.0
    seed: int | None = None
    stop: list[str] = field(default_factory=list)
    stop_token_ids: list[int] = field(default_factory=list)
    ignore_eos: bool = False
    min_tokens: int = 0
    logprobs: int | None = None   # None: off; k >= 0: chosen token's logprob plus top k
    include_stop_str_in_output: bool = False
    skip_special_tokens: bool = True

    def __post_init__(self):
        if isinstance(self.stop, str):
            self.stop = [self.stop]
        self.stop = list(self.stop or [])
        self.stop_token_ids = list(self.stop_token_ids or [])

    @property
    def greedy(self) -> bool:
        return self.temperature == 0.0 or self.top_k == 1

    def validate(self, vocab_size: int | None = None) -> None:
        def bad(param, msg):
            raise InvalidRequestError(f"{param} {msg}", param=param)

        if not isinstance(self.max_tokens, int) or self.max_tokens < 1:
            bad("max_tokens", f"must be an integer >= 1, got {self.max_tokens!r}")
        if not _num(self.temperature) or self.temperature < 0:
            bad("temperature", f"must be >= 0, got {self.temperature!r}")
        if not _num(self.top_p) or not 0.0 < self.top_p <= 1.0:
            bad("top_p", f"must be in (0, 1], got {self.top_p!r}")
        if not isinstance(self.top_k, int) or self.top_k < -1:
            bad("top_k", f"must be -1, 0 (off) or a positive integer, got {self.top_k!r}")
        if not _num(self.min_p) or not 0.0 <= self.min_p <= 1.0:
            bad("min_p", f"must be in [0, 1], got {self.min_p!r}")
        if self.seed is not None and not isinstance(self.seed, int):
            bad("seed", f"must be an integer, got {self.seed!r}")
        if not isinstance(self.min_tokens, int) or not 0 <= self.min_tokens <= self.max_tokens:
            bad("min_tokens", f"must be in [0, max_tokens], got {self.min_tokens!r}")
        if self.logprobs is not None and (not isinstance(self.logprobs, int)
                                          or not 0 <= self.logprobs <= MAX_LOGPROBS):
            bad("logprobs", f"must be an integer in [0, {MAX_LOGPROBS}], got {self.logprobs!r}")
        if any(not isinstance(s, str) or not s for s in self.stop):
            bad("stop", "must be non-empty strings")
        if len(self.stop) > 16:
            bad("stop", "allows at most 16 strings")
        for t in self.stop_token_ids:
            if not isinstance(t, int) or t < 0 or (vocab_size is not None and t >= vocab_size):
                bad("stop_token_ids", f"has an invalid token id {t!r}")


def _num(x) -> bool:
    return isinstance(x, (int, float)) and not isinstance(x, bool) and x == x


@dataclass
class SampleOutput:
    token_ids: list[int]
    # per row: (logprob of the chosen token, [(token id, logprob), ...] top-k) or None
    logprobs: list[tuple[float, list[tuple[int, float]]] | None]


class Sampler:
    def __init__(self, device: torch.device):
        self.device = device
        self._generators: dict[int, torch.Generator] = {}

    def generator_for(self, seq_key: int, seed: int) -> torch.Generator:
        g = self._generators.get(seq_key)
        if g is None:
            g = torch.Generator(device=self.device)
            g.manual_seed(seed)
            self._generators[seq_key] = g
        return g

    def release(self, seq_key: int) -> None:
        self._generators.pop(seq_key, None)

    def __call__(self, logits: torch.Tensor, params: list[SamplingParams],
                 seq_keys: list[int], masked_eos: list[list[int] | None] | None = None) -> SampleOutput:
        logits = logits.float()
        if masked_eos and any(masked_eos):
            # min_tokens: EOS / stop tokens cannot be chosen yet.
            for i, ids in enumerate(masked_eos):
                if ids:
                    logits[i, ids] = float("-inf")
        n = logits.shape[0]
        want_lp = [p.logprobs is not None for p in params]
        raw_logprobs = torch.log_softmax(logits, dim=-1) if any(want_lp) else None
        greedy = [p.greedy for p in params]
        if all(greedy):
            tokens = logits.argmax(dim=-1)
        else:
            tokens = self._sample_random(logits, params, seq_keys, greedy)
        token_list = tokens.tolist()
        lps: list = [None] * n
        if raw_logprobs is not None:
            k = max(p.logprobs or 0 for p in params)
            chosen = raw_logprobs.gather(1, tokens.view(-1, 1)).squeeze(1).tolist()
            top_v, top_i = (raw_logprobs.topk(k, dim=-1) if k > 0 else (None, None))
            top_v = top_v.tolist() if k > 0 else None
            top_i = top_i.tolist() if k > 0 else None
            for r in range(n):
                if want_lp[r]:
                    kk = params[r].logprobs or 0
                    top = list(zip(top_i[r][:kk], top_v[r][:kk])) if kk else []
                    lps[r] = (chosen[r], top)
        return SampleOutput(token_list, lps)

    def _sample_random(self, logits, params, seq_keys, greedy) -> torch.Tensor:
        dev = logits.device
        temps = torch.tensor([p.temperature if not g else 1.0 for p, g in zip(params, greedy)],
                             device=dev, dtype=torch.float32)
        scaled = logits / temps.unsqueeze(1)
        top_ks = [p.top_k if p.top_k > 0 else 0 for p in params]
        if any(k > 0 for k in top_ks):
            vocab = scaled.shape[1]
            kt = torch.tensor([k if k > 0 else vocab for k in top_ks], device=dev)
            kmax = int(kt.max().item())
            topv = scaled.topk(min(kmax, vocab), dim=-1).values
            thresh = topv.gather(1, (kt.clamp(max=topv.shape[1]) - 1).view(-1, 1))
            scaled = scaled.masked_fill(scaled < thresh, float("-inf"))
        probs = scaled.softmax(dim=-1)
        if any(p.top_p < 1.0 for p in params):
            top_p = torch.tensor([p.top_p for p in params], device=dev).unsqueeze(1)
            sorted_p, idx = probs.sort(dim=-1, descending=True)
            # drop a token when the mass strictly before it already reaches top_p
            drop = (sorted_p.cumsum(dim=-1) - sorted_p) >= top_p
            sorted_p = sorted_p.masked_fill(drop, 0.0)
            probs = torch.zeros_like(probs).scatter_(1, idx, sorted_p)
        if any(p.min_p > 0 for p in params):
            min_p = torch.tensor([p.min_p for p in params], device=dev).unsqueeze(1)
            probs = probs.masked_fill(probs < min_p * probs.max(dim=-1, keepdim=True).values, 0.0)
        noise = torch.empty_like(probs).exponential_()
        for r, p in enumerate(params):
            if p.seed is not None and not greedy[r]:
                noise[r].exponential_(generator=self.generator_for(seq_keys[r], p.seed))
        sampled = (probs / noise).argmax(dim=-1)
        if any(greedy):
            g = torch.tensor(greedy, device=dev)
            sampled = torch.where(g, logits.argmax(dim=-1), sampled)
        return sampled
