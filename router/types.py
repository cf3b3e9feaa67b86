"""The contract between the router's front end (HTTP/gRPC request path) and its placement
(replica discovery, prefix index, policies).

The front end tokenizes a request, asks ``Placement.choose(token_ids)`` for a `Decision`, calls
the chosen decode replica's ``Generate`` with ``prefill_endpoint`` set to the chosen prefill
replica (empty: the decode replica prefills itself), and reports the outcome with
``on_request_start`` / ``on_first_token`` / ``on_request_end`` so placement can account load and,
where a replica's KV-event stream is down, remember what it routed where (approximate index).
On a failure before the first token it calls ``choose`` again with the failed endpoints excluded.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Protocol


@dataclass
class Replica:
    endpoint: str                   # host:port of the worker's gRPC server
    pool: str                       # "prefill" | "decode"
    healthy: bool = False
    worker_id: str = ""
    # load, refreshed from the worker's Info RPC and the router's own accounting
    in_flight: int = 0              # requests this router has sent there and not finished
    queued_prompt_tokens: int = 0
    running: int = 0
    waiting: int = 0
    free_blocks: int = 0
    total_blocks: int = 0
    exact_index: bool = False       # its KV-event stream is live (else: approximate history)


@dataclass
class Decision:
    prefill: str | None             # endpoint, or None: the decode replica prefills itself
    decode: str
    policy: str                     # cache-aware | least-load | round-robin
    reason: str                     # e.g. prefix-match, load-balance, no-prefill-replica, tie
    matched_tokens: int = 0         # prompt tokens the chosen prefill replica already caches
    decode_matched_tokens: int = 0
    scores: dict = field(default_factory=dict)


class NoReplicaError(RuntimeError):
    """No healthy decode replica (the front end answers 503 with Retry-After)."""


class Placement(Protocol):
    policy: str
    block_size: int

    async def start(self) -> None: ...
    async def stop(self) -> None: ...
    def replicas(self, pool: str) -> list[Replica]: ...
    def choose(self, token_ids: list[int], exclude: set[str] = frozenset()) -> Decision: ...
    def on_request_start(self, decision: Decision, token_ids: list[int]) -> None: ...
    def on_first_token(self, decision: Decision) -> None: ...
    def on_request_end(self, decision: Decision, ok: bool) -> None: ...
