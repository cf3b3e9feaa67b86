"""A request's state inside the engine: its tokens, how much of them has KV in the cache, which
blocks hold it, and why it finished."""

from __future__ import annotations

import enum
import itertools
import time
from dataclasses import dataclass, field

from tandem.engine.hashing import chain_hashes
from tandem.engine.sampling import SamplingParams


class SeqStatus(enum.Enum):
    WAITING = "waiting"
    RUNNING = "running"
    FINISHED = "finished"


_counter = itertools.count()


@dataclass(eq=False)
class Sequence:
    request_id: str
    prompt_token_ids: list[int]
    params: SamplingParams
    block_size: int
    arrival_time: float = field(default_factory=time.monotonic)
    key: int = field(default_factory=lambda: next(_counter))   # unique int id for the sampler
    status: SeqStatus = SeqStatus.WAITING
    output_token_ids: list[int] = field(default_factory=list)
    num_computed_tokens: int = 0          # tokens whose KV is in the cache
    num_cached_tokens: int = 0            # prompt tokens served from the prefix cache (first time)
    block_ids: list[int] = field(default_factory=list)
    num_published_blocks: int = 0         # full blocks already offered to the prefix cache
    block_hashes: list[int] = field(default_factory=list)
    finish_reason: str | None = None
    stop_reason: str | int | None = None
    logprobs: list = field(default_factory=list)
    num_preemptions: int = 0
    first_token_time: float | None = None
    min_tokens_mask: list[int] | None = None   # token ids barred until min_tokens are out
    # Disaggregation: the decode side fills this sequence's prompt KV from a prefill worker
    # (`external_kv`); the prefill side keeps its blocks after it finishes until the KV has been
    # sent (`hold_blocks`).
    external_kv: bool = False
    hold_blocks: bool = False

    @property
    def all_token_ids(self) -> list[int]:
        return self.prompt_token_ids + self.output_token_ids

    @property
    def num_tokens(self) -> int:
        return len(self.prompt_token_ids) + len(self.output_token_ids)

    @property
    def prompt_len(self) -> int:
        return len(self.prompt_token_ids)

    @property
    def is_finished(self) -> bool:
        return self.status is SeqStatus.FINISHED

    @property
    def in_prefill(self) -> bool:
        return self.num_computed_tokens < self.prompt_len

    def token_slice(self, start: int, end: int) -> list[int]:
        """Tokens ``start..end-1`` of prompt + output, without concatenating the two lists."""
        plen = len(self.prompt_token_ids)
        if end <= plen:
            return self.prompt_token_ids[start:end]
        if start >= plen:
            return self.output_token_ids[start - plen:end - plen]
        return self.prompt_token_ids[start:] + self.output_token_ids[:end - plen]

    def blocks_needed(self, num_tokens: int) -> int:
        return -(-num_tokens // self.block_size)

    def update_hashes(self) -> list[int]:
        """Chained hashes of every full block of the sequence so far (extended incrementally)."""
        bs = self.block_size
        full = self.num_tokens // bs
        done = len(self.block_hashes)
        if done < full:
            parent = self.block_hashes[-1] if self.block_hashes else 0
            self.block_hashes.extend(chain_hashes(self.token_slice(done * bs, full * bs), bs, parent))
        return self.block_hashes
