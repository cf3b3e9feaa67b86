"""The engine loop and the offline API.

`LLMEngine` turns requests into tokens with four verbs per `step()`: receive (requests added with
`add_request` wait in the scheduler), schedule (`Scheduler.schedule`), run (`ModelRunner.execute`)
and postprocess (advance computed tokens, publish full blocks to the prefix cache, append sampled
tokens, check stop conditions, free finished sequences). `LLM` wraps it for batch generation.
"""

from __future__ import annotations

import logging
import sys
import time
from dataclasses import dataclass, field

from tandem import metrics as M
from tandem.engine.block_pool import BlockPool
from tandem.engine.config import EngineConfig, ModelConfig
from tandem.engine.errors import InvalidRequestError
from tandem.engine.kv_events import KVEventPublisher
from tandem.engine.model_runner import ModelRunner
from tandem.engine.sampling import SamplingParams
from tandem.engine.scheduler import Scheduler, SchedulerOutput
from tandem.engine.sequence import Sequence, SeqStatus
from tandem.engine.tokenizer import IncrementalDetokenizer, Tokenizer

log = logging.getLogger("tandem.engine")


@dataclass(slots=True)
class RequestOutput:
    """What one step produced for one request (deltas), plus totals once finished."""

    request_id: str
    new_token_ids: list[int]
    new_text: str = ""
    new_logprobs: list = field(default_factory=list)
    finished: bool = False
    finish_reason: str | None = None
    stop_reason: str | int | None = None
    num_prompt_tokens: int = 0
    num_output_tokens: int = 0
    num_cached_tokens: int = 0


@dataclass
class GenerationOutput:
    request_id: str
    prompt: str | None
    prompt_token_ids: list[int]
    text: str
    token_ids: list[int]
    finish_reason: str | None
    stop_reason: str | int | None = None
    num_cached_tokens: int = 0
    logprobs: list | None = None


class _Stream:
    """Detokenization state of one request (only for requests that want text or stop strings)."""

    def __init__(self, tok: Tokenizer, seq: Sequence):
        self.det = IncrementalDetokenizer(tok, seq.prompt_token_ids, seq.params.skip_special_tokens)
        self.sent = 0          # characters of det.text already emitted
        self.hold = max((len(s) for s in seq.params.stop), default=1) - 1


class LLMEngine:
    def __init__(self, config: EngineConfig):
        self.config = config
        self.model_config = ModelConfig.from_dir(config.model, config.dtype)
        self.tokenizer = Tokenizer(config.model)
        mc = self.model_config
        limit = mc.max_position_embeddings
        if mc.sliding_window:
            # Attention over at most `sliding_window` tokens equals full attention, so capping
            # the context there keeps full-attention kernels exact.
            limit = min(limit, mc.sliding_window)
        self.max_model_len = min(config.max_model_len or limit, limit)
        self.runner = ModelRunner(config, mc, self.max_model_len)
        self.events = KVEventPublisher()
        self.pool = BlockPool(self.runner.num_blocks, config.block_size,
                              config.enable_prefix_caching, self.events)
        # A sequence must fit the pool on its own, or preemption could never make room.
        self.max_model_len = min(self.max_model_len, self.pool.usable_blocks * config.block_size)
        self.scheduler = Scheduler(self.pool, config.max_num_batched_tokens, config.max_num_seqs,
                                   config.enable_chunked_prefill)
        self.eos_ids = set(mc.eos_token_ids)
        if self.tokenizer.eos_token_id is not None:
            self.eos_ids.add(self.tokenizer.eos_token_id)
        self.seqs: dict[str, Sequence] = {}
        self._streams: dict[str, _Stream] = {}
        self.held: dict[str, list[int]] = {}     # finished, blocks kept for a KV transfer
        # Called with the SchedulerOutput after scheduling, before the model runs (the prefill
        # worker starts KV senders here).
        self.step_hooks: list = []
        self._labels = (config.model_name, config.role)
        M.ENGINE_KV_BLOCKS_TOTAL.labels(*self._labels).set(self.pool.usable_blocks)
        # Counters are served (at 0) from the start, not from their first event: a dashboard's
        # rate() then shows 0 for a worker that has not preempted anything yet instead of no data.
        for counter in (M.ENGINE_PREEMPTIONS, M.ENGINE_PROMPT_TOKENS, M.ENGINE_COMPUTED_PROMPT_TOKENS,
                        M.ENGINE_GENERATION_TOKENS, M.ENGINE_PREFIX_HIT_TOKENS,
                        M.ENGINE_PREFIX_QUERY_TOKENS):
            counter.labels(*self._labels)
        log.info("engine ready: %s on %s, %d KV blocks of %d tokens, max_model_len %d, attention %s",
                 mc.architecture, self.runner.device, self.pool.usable_blocks, config.block_size,
                 self.max_model_len, self.runner.attn.name)

    # ---- receive --------------------------------------------------------------------------------
    def validate(self, prompt_token_ids: list[int], params: SamplingParams) -> None:
        params.validate(self.model_config.vocab_size)
        n = len(prompt_token_ids)
        if n == 0:
            raise InvalidRequestError("the prompt is empty", param="prompt")
        vocab = self.model_config.vocab_size
        bad = next((t for t in prompt_token_ids if not isinstance(t, int) or not 0 <= t < vocab), None)
        if bad is not None:
            raise InvalidRequestError(f"prompt token id {bad!r} is outside the vocabulary [0, {vocab})",
                                      param="prompt")
        if n >= self.max_model_len:
            raise InvalidRequestError(
                f"the prompt has {n} tokens, but this model's context is {self.max_model_len} tokens "
                f"(max_model_len), which leaves no room to generate", param="prompt",
                code="context_length_exceeded")

    def add_request(self, request_id: str, prompt: str | list[int], params: SamplingParams | None = None,
                    detokenize: bool = True) -> Sequence:
        """Queues a request; raises `InvalidRequestError` (and queues nothing) if it is invalid."""
        params = params or SamplingParams()
        if request_id in self.seqs:
            raise InvalidRequestError(f"request id {request_id!r} is already in use", param="request_id")
        ids = self.tokenizer.encode(prompt) if isinstance(prompt, str) else list(prompt)
        self.validate(ids, params)
        seq = Sequence(request_id, ids, params, self.config.block_size)
        self.seqs[request_id] = seq
        if detokenize or params.stop:
            self._streams[request_id] = _Stream(self.tokenizer, seq)
        self.scheduler.add(seq)
        M.ENGINE_PROMPT_TOKENS.labels(*self._labels).inc(len(ids))
        return seq

    def abort_request(self, request_id: str) -> bool:
        if request_id in self.held:
            self.release_held(request_id)
            return True
        seq = self.seqs.pop(request_id, None)
        if seq is None:
            return False
        self._streams.pop(request_id, None)
        seq.finish_reason = "abort"
        self.scheduler.finish(seq, "abort")
        self.runner.sampler.release(seq.key)
        return True

    def has_unfinished(self) -> bool:
        return self.scheduler.has_work()

    # ---- one iteration --------------------------------------------------------------------------
    def step(self) -> list[RequestOutput]:
        t0 = time.perf_counter()
        sched = self.scheduler.schedule()
        if sched.preempted:
            M.ENGINE_PREEMPTIONS.labels(*self._labels).inc(len(sched.preempted))
        if not sched.scheduled:
            self._update_gauges()
            return []
        self._set_min_token_masks(sched)
        for hook in self.step_hooks:
            hook(sched)
        sample = self.runner.execute(sched)
        outputs = self._postprocess(sched, sample)
        self.events.flush()
        kind = "decode" if sched.decode_only else "prefill"
        M.ENGINE_STEP_SECONDS.labels(*self._labels, kind).observe(time.perf_counter() - t0)
        M.ENGINE_BATCH_SIZE.labels(*self._labels).observe(len(sched.scheduled))
        M.ENGINE_BATCH_TOKENS.labels(*self._labels).observe(sched.num_tokens)
        self._update_gauges()
        return outputs

    def _set_min_token_masks(self, sched: SchedulerOutput) -> None:
        for s in sched.scheduled:
            seq, p = s.seq, s.seq.params
            if s.sample and p.min_tokens and len(seq.output_token_ids) < p.min_tokens:
                seq.min_tokens_mask = sorted((set() if p.ignore_eos else self.eos_ids)
                                             | set(p.stop_token_ids)) or None
            else:
                seq.min_tokens_mask = None

    def _postprocess(self, sched: SchedulerOutput, sample) -> list[RequestOutput]:
        outputs = []
        k = 0
        computed_prompt = 0
        for s in sched.scheduled:
            seq = s.seq
            before = seq.num_computed_tokens
            seq.num_computed_tokens += s.num_new
            computed_prompt += max(0, min(seq.num_computed_tokens, seq.prompt_len) - before)
            self._publish_computed_blocks(seq)
            if not s.sample:
                continue
            token = sample.token_ids[k]
            lp = sample.logprobs[k]
            k += 1
            if seq.num_preemptions == 0 and not seq.output_token_ids:
                # First token: account prefix-cache use once per request.
                M.ENGINE_PREFIX_HIT_TOKENS.labels(*self._labels).inc(seq.num_cached_tokens)
                M.ENGINE_PREFIX_QUERY_TOKENS.labels(*self._labels).inc(seq.prompt_len)
                seq.first_token_time = time.monotonic()
            seq.output_token_ids.append(token)
            if lp is not None:
                seq.logprobs.append(lp)
            outputs.append(self._emit(seq, token, lp))
        M.ENGINE_COMPUTED_PROMPT_TOKENS.labels(*self._labels).inc(computed_prompt)
        M.ENGINE_GENERATION_TOKENS.labels(*self._labels).inc(len(outputs))
        return outputs

    def _publish_computed_blocks(self, seq: Sequence) -> None:
        """Offers the sequence's blocks whose KV is now complete to the prefix cache."""
        bs = self.pool.block_size
        full = seq.num_computed_tokens // bs
        if full > seq.num_published_blocks and self.pool.enable_caching:
            start = seq.num_published_blocks
            self.pool.cache_full_blocks(seq.block_ids, seq.token_slice(start * bs, full * bs),
                                        seq.update_hashes(), start, full)
            seq.num_published_blocks = full

    def _emit(self, seq: Sequence, token: int, lp) -> RequestOutput:
        p = seq.params
        n_out = len(seq.output_token_ids)
        reason = stop = None
        if n_out >= p.min_tokens:
            if token in self.eos_ids and not p.ignore_eos:
                reason = "stop"
            elif token in p.stop_token_ids:
                reason, stop = "stop", token
        text = ""
        st = self._streams.get(seq.request_id)
        if st is not None:
            st.det.add([token])
            full = st.det.text
            if reason is None and p.stop and n_out >= p.min_tokens:
                # Only text after what was already sent (minus a stop string) can hold a new match.
                lo = max(0, st.sent - max(len(x) for x in p.stop))
                hits = [(i, x) for x in p.stop if (i := full.find(x, lo)) >= 0]
                if hits:
                    i, x = min(hits)
                    reason, stop = "stop", x
                    full = full[:i + len(x)] if p.include_stop_str_in_output else full[:i]
        if reason is None and (n_out >= p.max_tokens or seq.num_tokens >= self.max_model_len):
            reason = "length"
        if st is not None:
            if reason is None:
                # Hold back what could still turn out to be the start of a stop string.
                text = full[st.sent:max(st.sent, len(full) - st.hold)]
            elif isinstance(stop, str):
                text = full[st.sent:]
            else:
                text = (full + st.det.flush())[st.sent:]
            st.sent += len(text)
        out = RequestOutput(seq.request_id, [token], text, [lp] if lp is not None else [],
                            num_prompt_tokens=seq.prompt_len, num_output_tokens=n_out,
                            num_cached_tokens=seq.num_cached_tokens)
        if reason is not None:
            seq.stop_reason = stop
            self._finish(seq, reason)
            out.finished, out.finish_reason, out.stop_reason = True, reason, stop
        return out

    def _finish(self, seq: Sequence, reason: str) -> None:
        self.scheduler.finish(seq, reason, free_blocks=not seq.hold_blocks)
        if seq.hold_blocks and seq.block_ids:
            self.held[seq.request_id] = seq.block_ids
        self.seqs.pop(seq.request_id, None)
        self._streams.pop(seq.request_id, None)
        self.runner.sampler.release(seq.key)
        M.ENGINE_REQUESTS_FINISHED.labels(*self._labels, reason).inc()

    # ---- disaggregation ----------------------------------------------------------------------
    def release_held(self, request_id: str) -> None:
        """Frees the blocks a finished prefill kept for its KV transfer."""
        blocks = self.held.pop(request_id, None)
        if blocks:
            self.pool.free(blocks)
        self._update_gauges()

    def reserve_remote(self, request_id: str, prompt_ids: list[int], params: SamplingParams,
                       min_remote_tokens: int = 1, detokenize: bool = True) -> Sequence | None:
        """Decode side: reserves KV blocks for a prompt whose KV a prefill worker will write.

        Reuses whatever prefix this engine caches; the returned sequence's ``block_ids`` from
        ``num_computed_tokens // block_size`` on are the destination blocks. Returns None (and
        reserves nothing) when fewer than ``min_remote_tokens`` tokens would come from remote
        or the pool has no room now: the caller then prefills here (conditional disaggregation).
        """
        self.validate(prompt_ids, params)
        if request_id in self.seqs:
            raise InvalidRequestError(f"request id {request_id!r} is already in use", param="request_id")
        seq = Sequence(request_id, list(prompt_ids), params, self.config.block_size)
        hit = self.scheduler._prefix_hit(seq)
        cached = len(hit) * self.pool.block_size
        if seq.prompt_len - cached < max(min_remote_tokens, 1):
            return None
        need = seq.blocks_needed(seq.prompt_len) - len(hit)
        reclaimable = sum(1 for b in hit if self.pool.blocks[b].ref_count == 0)
        if need > self.pool.num_free - reclaimable:
            return None
        self.pool.touch(hit)
        seq.block_ids = hit + self.pool.allocate(need)
        seq.num_computed_tokens = seq.num_cached_tokens = cached
        seq.external_kv = True
        self.seqs[request_id] = seq
        if detokenize or params.stop:
            self._streams[request_id] = _Stream(self.tokenizer, seq)
        M.ENGINE_PROMPT_TOKENS.labels(*self._labels).inc(seq.prompt_len)
        self._update_gauges()
        return seq

    def commit_remote(self, request_id: str, first_token: int, logprob=None,
                      remote_cached_tokens: int = 0) -> RequestOutput:
        """Decode side: the prompt's KV has landed; the sequence joins the running batch with the
        first token the prefill worker sampled."""
        seq = self.seqs[request_id]
        seq.num_computed_tokens = seq.prompt_len
        seq.num_cached_tokens += remote_cached_tokens
        self._publish_computed_blocks(seq)
        seq.status = SeqStatus.RUNNING
        self.scheduler.running.append(seq)
        seq.first_token_time = time.monotonic()
        seq.output_token_ids.append(first_token)
        if logprob is not None:
            seq.logprobs.append(logprob)
        out = self._emit(seq, first_token, logprob)
        self.events.flush()
        self._update_gauges()
        return out

    def release_remote(self, request_id: str) -> None:
        """Decode side: the remote prefill failed; frees the reserved blocks."""
        seq = self.seqs.pop(request_id, None)
        self._streams.pop(request_id, None)
        if seq is not None and seq.block_ids:
            self.pool.free(seq.block_ids)
            seq.block_ids = []
            seq.status = SeqStatus.FINISHED
        self._update_gauges()

    def _update_gauges(self) -> None:
        sch = self.scheduler
        M.ENGINE_RUNNING.labels(*self._labels).set(len(sch.running))
        M.ENGINE_WAITING.labels(*self._labels).set(len(sch.waiting))
        M.ENGINE_QUEUED_PROMPT_TOKENS.labels(*self._labels).set(sch.queued_prompt_tokens)
        M.ENGINE_KV_BLOCKS_FREE.labels(*self._labels).set(self.pool.num_free)
        M.ENGINE_KV_USAGE.labels(*self._labels).set(self.pool.usage())


class LLM:
    """Offline batch generation: ``LLM(model_dir).generate(prompts, SamplingParams(...))``."""

    def __init__(self, model: str | None = None, config: EngineConfig | None = None, **kwargs):
        if model is None and config is None:
            return   # from_engine
        self._attach(LLMEngine(config or EngineConfig(model=model, **kwargs)))

    @classmethod
    def from_engine(cls, engine: LLMEngine) -> "LLM":
        llm = cls()
        llm._attach(engine)
        return llm

    def _attach(self, engine: LLMEngine) -> None:
        self.engine = engine
        self.tokenizer = engine.tokenizer
        self._next = 0

    def generate(self, prompts, params: SamplingParams | list[SamplingParams] | None = None,
                 progress: bool = False) -> list[GenerationOutput]:
        """``prompts``: a string, a list of strings, or a list of token-id lists. Results come back
        in prompt order. An invalid request raises before anything runs."""
        if isinstance(prompts, str) or (prompts and isinstance(prompts[0], int)):
            prompts = [prompts]
        plist = params if isinstance(params, list) else [params or SamplingParams()] * len(prompts)
        if len(plist) != len(prompts):
            raise ValueError(f"{len(prompts)} prompts but {len(plist)} sampling params")
        eng = self.engine
        encoded = [eng.tokenizer.encode(p) if isinstance(p, str) else list(p) for p in prompts]
        for ids, sp in zip(encoded, plist):
            eng.validate(ids, sp)
        rids = []
        for ids, sp in zip(encoded, plist):
            rid = f"gen-{self._next}"
            self._next += 1
            eng.add_request(rid, ids, sp, detokenize=False)
            rids.append(rid)
        done: dict[str, RequestOutput] = {}
        seqs = {rid: eng.seqs[rid] for rid in rids}
        t0, n_out, shown = time.monotonic(), 0, 0.0
        while eng.has_unfinished():
            for out in eng.step():
                n_out += 1
                if out.finished:
                    done[out.request_id] = out
            if progress and (time.monotonic() - shown > 0.5 or not eng.has_unfinished()):
                shown = time.monotonic()
                dt = shown - t0
                sys.stderr.write(f"\r[tandem] {len(done)}/{len(rids)} done, {n_out} tokens, "
                                 f"{n_out / max(dt, 1e-9):.0f} tok/s ")
        if progress:
            sys.stderr.write("\n")
        results = []
        for rid, prompt, ids in zip(rids, prompts, encoded):
            seq = seqs[rid]
            sp = seq.params
            text = eng.tokenizer.decode(seq.output_token_ids, sp.skip_special_tokens)
            if isinstance(seq.stop_reason, str):
                i = text.find(seq.stop_reason)
                if i >= 0:
                    text = text[:i + len(seq.stop_reason)] if sp.include_stop_str_in_output else text[:i]
            results.append(GenerationOutput(
                rid, prompt if isinstance(prompt, str) else None, ids, text,
                list(seq.output_token_ids), seq.finish_reason, seq.stop_reason,
                seq.num_cached_tokens, seq.logprobs if sp.logprobs is not None else None))
        return results

    def chat(self, messages: list[dict], params: SamplingParams | None = None) -> GenerationOutput:
        ids = self.tokenizer.encode_chat(messages)
        return self.generate([ids], params)[0]
