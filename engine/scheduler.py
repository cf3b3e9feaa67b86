"""Continuous batching with chunked prefill under a token budget, preemption by recompute.

Every step the scheduler decides, for each sequence, how many of its not-yet-computed tokens run
now (`num_new`): a decoding sequence needs 1, a prefilling one as much of its prompt as the
budget allows. Running sequences go first, in arrival order; when the KV pool runs dry, the most
recently admitted running sequence is preempted (its blocks freed, its tokens recomputed later,
mostly from the prefix cache). Waiting sequences are admitted only in steps that preempted
nothing, after the prefix cache has told how much of their prompt is already computed.
"""

from __future__ import annotations

from collections import deque
from dataclasses import dataclass, field

from tandem.engine.block_pool import BlockPool
from tandem.engine.sequence import Sequence, SeqStatus


@dataclass
class ScheduledSeq:
    seq: Sequence
    num_new: int          # tokens computed this step, starting at seq.num_computed_tokens
    sample: bool          # this step ends at the sequence's last token: it yields a new token


@dataclass
class SchedulerOutput:
    scheduled: list[ScheduledSeq] = field(default_factory=list)
    preempted: list[Sequence] = field(default_factory=list)

    @property
    def num_tokens(self) -> int:
        return sum(s.num_new for s in self.scheduled)

    decode_only: bool = True   # every scheduled sequence computes exactly one generated token


class Scheduler:
    def __init__(self, pool: BlockPool, max_num_batched_tokens: int, max_num_seqs: int,
                 enable_chunked_prefill: bool = True):
        self.pool = pool
        self.block_size = pool.block_size
        self.max_tokens = max_num_batched_tokens
        self.max_seqs = max_num_seqs
        self.chunked = enable_chunked_prefill
        self.waiting: deque[Sequence] = deque()
        self.running: list[Sequence] = []

    def add(self, seq: Sequence) -> None:
        self.waiting.append(seq)

    def has_work(self) -> bool:
        return bool(self.waiting or self.running)

    @property
    def queued_prompt_tokens(self) -> int:
        return (sum(s.num_tokens for s in self.waiting)
                + sum(s.prompt_len - s.num_computed_tokens for s in self.running if s.in_prefill))

    def schedule(self) -> SchedulerOutput:
        out = SchedulerOutput()
        budget = self.max_tokens
        i = 0
        while i < len(self.running) and budget > 0:
            seq = self.running[i]
            num_new = min(seq.num_tokens - seq.num_computed_tokens, budget)
            if num_new <= 0:        # KV arriving from elsewhere, nothing to compute yet
                i += 1
                continue
            need = seq.blocks_needed(seq.num_computed_tokens + num_new) - len(seq.block_ids)
            while need > self.pool.num_free:
                victim = self.running.pop()
                self._preempt(victim)
                out.preempted.append(victim)
                if victim is seq:
                    break
            if seq.status is not SeqStatus.RUNNING:
                break
            if need > 0:
                seq.block_ids.extend(self.pool.allocate(need))
            out.scheduled.append(ScheduledSeq(
                seq, num_new, seq.num_computed_tokens + num_new == seq.num_tokens))
            if num_new != 1 or seq.num_computed_tokens < seq.prompt_len:
                out.decode_only = False
            budget -= num_new
            i += 1
        if out.preempted:
            return out
        while self.waiting and budget > 0 and len(self.running) < self.max_seqs:
            seq = self.waiting[0]
            hit = self._prefix_hit(seq)
            num_cached = len(hit) * self.block_size
            remaining = seq.num_tokens - num_cached
            if not self.chunked and remaining > budget:
                break
            num_new = min(remaining, budget)
            need = seq.blocks_needed(num_cached + num_new) - len(hit)
            reclaimable = sum(1 for b in hit if self.pool.blocks[b].ref_count == 0)
            if need > self.pool.num_free - reclaimable:
                break
            self.pool.touch(hit)
            seq.block_ids = hit + self.pool.allocate(need)
            seq.num_computed_tokens = num_cached
            if seq.num_preemptions == 0:
                seq.num_cached_tokens = num_cached
            self.waiting.popleft()
            seq.status = SeqStatus.RUNNING
            self.running.append(seq)
            out.scheduled.append(ScheduledSeq(seq, num_new, num_cached + num_new == seq.num_tokens))
            if num_new != 1 or num_cached < seq.prompt_len:
                out.decode_only = False
            budget -= num_new
        return out

    def _prefix_hit(self, seq: Sequence) -> list[int]:
        hashes = seq.update_hashes()
        hit = self.pool.match_prefix(seq.all_token_ids, hashes)
        # At least one token must be computed to get logits for the next one.
        if hit and len(hit) * self.block_size >= seq.num_tokens:
            hit = hit[:-1]
        return hit

    def _preempt(self, seq: Sequence) -> None:
        self.pool.free(seq.block_ids)
        seq.block_ids = []
        seq.num_computed_tokens = 0
        seq.num_published_blocks = 0
        seq.num_preemptions += 1
        seq.status = SeqStatus.WAITING
        self.waiting.appendleft(seq)

    def finish(self, seq: Sequence, reason: str, free_blocks: bool = True) -> None:
        """Ends a sequence wherever it is and frees its blocks (unless told to keep them)."""
        if seq.status is SeqStatus.RUNNING:
            self.running.remove(seq)
        elif seq.status is SeqStatus.WAITING:
            try:
                self.waiting.remove(seq)
            except ValueError:
                pass
        if seq.block_ids and free_blocks:
            self.pool.free(seq.block_ids)
            seq.block_ids = []
        seq.status = SeqStatus.FINISHED
        seq.finish_reason = seq.finish_reason or reason
