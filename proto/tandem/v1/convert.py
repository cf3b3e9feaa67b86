"""Conversions between engine objects and ``tandem.v1`` messages, and the version check every
service applies first."""

from __future__ import annotations

import grpc

from tandem.engine.kv_events import AllBlocksCleared, BlockRemoved, BlockStored, EventBatch
from tandem.engine.sampling import SamplingParams
from tandem.proto import worker_pb2 as pb

VERSION = pb.PROTOCOL_VERSION_1


async def check_version(version: int, context) -> None:
    if version != VERSION:
        await context.abort(
            grpc.StatusCode.FAILED_PRECONDITION,
            f"protocol version {pb.ProtocolVersion.Name(version) if version in pb.ProtocolVersion.values() else version} "
            f"is not supported; this worker speaks {pb.ProtocolVersion.Name(VERSION)} (mixed rollout?)")


def params_to_proto(p: SamplingParams) -> pb.SamplingParams:
    m = pb.SamplingParams(max_tokens=p.max_tokens, temperature=p.temperature, top_p=p.top_p,
                          top_k=p.top_k, min_p=p.min_p, stop=list(p.stop),
                          stop_token_ids=list(p.stop_token_ids), ignore_eos=p.ignore_eos,
                          min_tokens=p.min_tokens, include_stop_str_in_output=p.include_stop_str_in_output,
                          skip_special_tokens=p.skip_special_tokens)
    if p.seed is not None:
        m.seed = p.seed
    if p.logprobs is not None:
        m.logprobs = p.logprobs
    return m


def params_from_proto(m: pb.SamplingParams) -> SamplingParams:
    return SamplingParams(
        max_tokens=m.max_tokens, temperature=m.temperature, top_p=m.top_p, top_k=m.top_k,
        min_p=m.min_p, seed=m.seed if m.HasField("seed") else None, stop=list(m.stop),
        stop_token_ids=list(m.stop_token_ids), ignore_eos=m.ignore_eos, min_tokens=m.min_tokens,
        logprobs=m.logprobs if m.HasField("logprobs") else None,
        include_stop_str_in_output=m.include_stop_str_in_output,
        skip_special_tokens=m.skip_special_tokens if m.HasField("skip_special_tokens") else True)


def logprob_to_proto(lp) -> pb.TokenLogprob:
    chosen, top = lp
    return pb.TokenLogprob(logprob=chosen, top=[pb.TopLogprob(token_id=t, logprob=v) for t, v in top])


def logprob_from_proto(m: pb.TokenLogprob):
    return (m.logprob, [(t.token_id, t.logprob) for t in m.top])


def events_to_proto(batch: EventBatch, worker_id: str) -> pb.KVEventBatch:
    out = pb.KVEventBatch(seq=batch.seq, ts=batch.ts, worker_id=worker_id)
    for e in batch.events:
        if isinstance(e, BlockStored):
            s = pb.BlockStored(block_hashes=e.block_hashes, token_ids=e.token_ids, block_size=e.block_size)
            if e.parent_hash is not None:
                s.parent_hash = e.parent_hash
            out.events.append(pb.KVEvent(stored=s))
        elif isinstance(e, BlockRemoved):
            out.events.append(pb.KVEvent(removed=pb.BlockRemoved(block_hashes=e.block_hashes)))
        elif isinstance(e, AllBlocksCleared):
            out.events.append(pb.KVEvent(cleared=pb.AllBlocksCleared()))
    return out
