"""Every Prometheus metric Tandem exports, declared in one place.

Components import the objects they update from here, so the names the dashboards query
(``charts/tandem/dashboards``), the table in ``docs/metrics.md`` and what ``/metrics`` serves come
from one list. All names carry the ``tandem_`` prefix. Every metric has a ``model`` label (the
served model name); per-replica breakdowns come from the scrape's own ``pod``/``instance`` labels,
since each replica serves its own ``/metrics``.

``CATALOG`` lists (name, type, help) for docs and tests; Prometheus appends ``_total`` to counters
and ``_bucket``/``_sum``/``_count`` to histograms in the exposition.
"""

from __future__ import annotations

from prometheus_client import Counter, Gauge, Histogram

LATENCY_BUCKETS = (0.005, 0.01, 0.025, 0.05, 0.075, 0.1, 0.15, 0.2, 0.3, 0.5, 0.75, 1.0,
                   1.5, 2.0, 3.0, 5.0, 7.5, 10.0, 20.0, 40.0, 80.0)
ITL_BUCKETS = (0.001, 0.0025, 0.005, 0.0075, 0.01, 0.015, 0.02, 0.03, 0.04, 0.05, 0.075, 0.1,
               0.15, 0.2, 0.3, 0.5, 1.0, 2.5)
STEP_BUCKETS = (0.001, 0.0025, 0.005, 0.01, 0.02, 0.03, 0.05, 0.075, 0.1, 0.2, 0.5, 1.0, 2.5)
BATCH_BUCKETS = (1, 2, 4, 8, 16, 32, 64, 128, 256, 512, 1024)
TRANSFER_BUCKETS = (0.0005, 0.001, 0.0025, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5, 5.0)

# ---- engine (every prefill, decode or colocated worker) -------------------------------------
M, R = ("model",), ("model", "role")
ENGINE_RUNNING = Gauge("tandem_engine_requests_running", "Requests in the running batch", R)
ENGINE_WAITING = Gauge("tandem_engine_requests_waiting", "Requests queued, not yet scheduled", R)
ENGINE_QUEUED_PROMPT_TOKENS = Gauge(
    "tandem_engine_queued_prompt_tokens", "Prompt tokens still to be computed (waiting + partial)", R)
ENGINE_KV_BLOCKS_TOTAL = Gauge("tandem_engine_kv_blocks_total", "KV cache blocks in the pool", R)
ENGINE_KV_BLOCKS_FREE = Gauge(
    "tandem_engine_kv_blocks_free", "KV blocks not referenced by a request (cached ones included)", R)
ENGINE_KV_USAGE = Gauge("tandem_engine_kv_usage_ratio", "Fraction of KV blocks referenced", R)
ENGINE_BATCH_SIZE = Histogram(
    "tandem_engine_batch_size", "Sequences per engine step", R, buckets=BATCH_BUCKETS)
ENGINE_BATCH_TOKENS = Histogram(
    "tandem_engine_batch_tokens", "Tokens per engine step", R, buckets=BATCH_BUCKETS + (2048, 4096, 8192, 16384))
ENGINE_STEP_SECONDS = Histogram(
    "tandem_engine_step_duration_seconds", "Wall time of one engine step", ("model", "role", "kind"),
    buckets=STEP_BUCKETS)
ENGINE_PROMPT_TOKENS = Counter("tandem_engine_prompt_tokens", "Prompt tokens received", R)
ENGINE_COMPUTED_PROMPT_TOKENS = Counter(
    "tandem_engine_computed_prompt_tokens", "Prompt tokens actually computed (not from cache)", R)
ENGINE_GENERATION_TOKENS = Counter("tandem_engine_generation_tokens", "Tokens generated", R)
ENGINE_PREFIX_HIT_TOKENS = Counter(
    "tandem_engine_prefix_cache_hit_tokens", "Prompt tokens served from the prefix cache", R)
ENGINE_PREFIX_QUERY_TOKENS = Counter(
    "tandem_engine_prefix_cache_query_tokens", "Prompt tokens looked up in the prefix cache", R)
ENGINE_PREEMPTIONS = Counter("tandem_engine_preemptions", "Requests preempted (recomputed later)", R)
ENGINE_REQUESTS_FINISHED = Counter(
    "tandem_engine_requests_finished", "Finished requests by finish reason", ("model", "role", "reason"))

# ---- KV transfer (prefill sends, decode receives) --------------------------------------------
T = ("model", "backend", "direction")
KV_TRANSFER_BYTES = Counter("tandem_kv_transfer_bytes", "KV bytes moved between workers", T)
KV_TRANSFER_SECONDS = Histogram(
    "tandem_kv_transfer_duration_seconds", "Duration of one request's KV transfer", T,
    buckets=TRANSFER_BUCKETS)
KV_TRANSFER_GBPS = Gauge(
    "tandem_kv_transfer_throughput_gbps", "Throughput of the last completed transfer (GB/s)", T)
KV_TRANSFER_FAILURES = Counter(
    "tandem_kv_transfer_failures", "Failed or aborted KV transfers by reason", T + ("reason",))
KV_TRANSFER_IN_FLIGHT = Gauge("tandem_kv_transfers_in_flight", "KV transfers under way", T)

# ---- router ------------------------------------------------------------------------------------
ROUTER_REQUESTS = Counter(
    "tandem_router_requests", "Requests by final status", ("model", "api", "status"))
ROUTER_TTFT = Histogram(
    "tandem_router_time_to_first_token_seconds", "Time to first token", M, buckets=LATENCY_BUCKETS)
ROUTER_ITL = Histogram(
    "tandem_router_inter_token_latency_seconds", "Gap between streamed tokens", M, buckets=ITL_BUCKETS)
ROUTER_TPOT = Histogram(
    "tandem_router_time_per_output_token_seconds", "(E2E - TTFT) / (output tokens - 1)", M,
    buckets=ITL_BUCKETS)
ROUTER_E2E = Histogram(
    "tandem_router_e2e_latency_seconds", "Request latency, arrival to last token", M,
    buckets=LATENCY_BUCKETS)
ROUTER_PROMPT_TOKENS = Counter("tandem_router_prompt_tokens", "Prompt tokens routed", M)
ROUTER_GENERATION_TOKENS = Counter("tandem_router_generation_tokens", "Tokens returned to clients", M)
ROUTER_PREFIX_MATCHED_TOKENS = Counter(
    "tandem_router_prefix_matched_tokens", "Prompt tokens the chosen prefill replica already caches", M)
ROUTER_DECISIONS = Counter(
    "tandem_router_routing_decisions", "Placement decisions by pool, policy and reason",
    ("model", "pool", "policy", "reason"))
ROUTER_RETRIES = Counter(
    "tandem_router_retries", "Requests sent again to another replica after a failure before the "
    "first token", M)
ROUTER_IN_FLIGHT = Gauge("tandem_router_requests_in_flight", "Requests being served", M)
ROUTER_QUEUE = Gauge("tandem_router_queue_depth", "Requests waiting for admission", M)
ROUTER_REPLICA_HEALTHY = Gauge(
    "tandem_router_replica_healthy", "1 when a replica passes health checks", ("model", "pool", "replica"))
ROUTER_INDEX_MODE = Gauge(
    "tandem_router_prefix_index_exact", "1 when the replica's prefix index is fed by its KV events, "
    "0 when it falls back to routing history", ("model", "replica"))
ROUTER_DECISION_SECONDS = Histogram(
    "tandem_router_decision_duration_seconds", "Time to choose replicas for one request", M,
    buckets=(1e-5, 2.5e-5, 5e-5, 1e-4, 2.5e-4, 5e-4, 1e-3, 2.5e-3, 5e-3, 1e-2))


def catalog() -> list[tuple[str, str, str]]:
    """(exposed base name, type, help) of every metric above, in declaration order."""
    out = []
    for obj in globals().values():
        if isinstance(obj, (Counter, Gauge, Histogram)):
            name = obj._name + ("_total" if isinstance(obj, Counter) else "")
            out.append((name, obj._type, obj._documentation))
    return out
