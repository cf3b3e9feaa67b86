"""Generates the Grafana dashboards in this folder: ``python charts/tandem/dashboards/generate.py``.

The JSON files are committed (the chart ships them as ConfigMaps); edit this file and re-run
rather than editing the JSON. Every metric queried is one declared in ``tandem/metrics.py``;
``tests/charts/test_dashboards.py`` checks that.
"""

from __future__ import annotations

import json
import os

DS = {"type": "prometheus", "uid": "${datasource}"}
SEL = 'model=~"$model", namespace=~"$namespace"'
R = "$__rate_interval"


def templating() -> dict:
    return {"list": [
        {"name": "datasource", "type": "datasource", "query": "prometheus", "label": "Data source"},
        {"name": "namespace", "type": "query", "datasource": DS, "includeAll": True, "multi": True,
         "query": {"query": "label_values(tandem_router_requests_total, namespace)", "refId": "ns"},
         "refresh": 2, "allValue": ".*"},
        {"name": "model", "type": "query", "datasource": DS, "includeAll": True, "multi": True,
         "query": {"query": 'label_values(tandem_router_requests_total{namespace=~"$namespace"}, model)',
                   "refId": "model"}, "refresh": 2, "allValue": ".*"},
    ]}


def panel(pid: int, title: str, targets: list[tuple[str, str]], x: int, y: int, w: int = 12,
          h: int = 8, unit: str = "short", kind: str = "timeseries") -> dict:
    return {
        "id": pid, "type": kind, "title": title, "datasource": DS,
        "gridPos": {"x": x, "y": y, "w": w, "h": h},
        "fieldConfig": {"defaults": {"unit": unit}, "overrides": []},
        "options": {"legend": {"displayMode": "table", "placement": "bottom"}} if kind == "timeseries" else {},
        "targets": [{"refId": chr(65 + i), "expr": expr, "legendFormat": legend, "datasource": DS}
                    for i, (expr, legend) in enumerate(targets)],
    }


def quantiles(metric: str, by: str = "model") -> list[tuple[str, str]]:
    return [(f"histogram_quantile({q}, sum by (le, {by}) (rate({metric}_bucket{{{SEL}}}[{R}])))",
             f"p{int(q * 100)} {{{{{by}}}}}") for q in (0.5, 0.9, 0.99)]


def dashboard(uid: str, title: str, panels: list[dict]) -> dict:
    return {"uid": uid, "title": title, "tags": ["tandem"], "schemaVersion": 39, "version": 1,
            "editable": True, "time": {"from": "now-1h", "to": "now"}, "refresh": "30s",
            "templating": templating(), "panels": panels}


def overview() -> dict:
    p = [
        panel(1, "Requests / s by status", [(f"sum by (status) (rate(tandem_router_requests_total{{{SEL}}}[{R}]))", "{{status}}")], 0, 0, unit="reqps"),
        panel(2, "Error ratio", [(f'sum(rate(tandem_router_requests_total{{{SEL}, status!~"ok|2.."}}[{R}])) / clamp_min(sum(rate(tandem_router_requests_total{{{SEL}}}[{R}])), 1e-9)', "errors")], 12, 0, unit="percentunit"),
        panel(3, "Time to first token", quantiles("tandem_router_time_to_first_token_seconds"), 0, 8, w=8, unit="s"),
        panel(4, "Time per output token", quantiles("tandem_router_time_per_output_token_seconds"), 8, 8, w=8, unit="s"),
        panel(5, "Inter-token latency", quantiles("tandem_router_inter_token_latency_seconds"), 16, 8, w=8, unit="s"),
        panel(6, "Tokens / s", [(f"sum(rate(tandem_router_prompt_tokens_total{{{SEL}}}[{R}]))", "prompt"),
                                (f"sum(rate(tandem_router_generation_tokens_total{{{SEL}}}[{R}]))", "generated")], 0, 16, unit="short"),
        panel(7, "End-to-end latency", quantiles("tandem_router_e2e_latency_seconds"), 12, 16, unit="s"),
        panel(8, "In flight / queued", [(f"sum(tandem_router_requests_in_flight{{{SEL}}})", "in flight"),
                                        (f"sum(tandem_router_queue_depth{{{SEL}}})", "queued")], 0, 24, unit="short"),
    ]
    return dashboard("tandem-overview", "Tandem / Overview", p)


def pools() -> dict:
    by = "role, pod"
    p = [
        panel(1, "KV cache usage per replica", [(f"max by ({by}) (tandem_engine_kv_usage_ratio{{{SEL}}})", "{{role}} {{pod}}")], 0, 0, unit="percentunit"),
        panel(2, "KV blocks free per replica", [(f"max by ({by}) (tandem_engine_kv_blocks_free{{{SEL}}})", "{{role}} {{pod}}"),
                                                (f"max by ({by}) (tandem_engine_kv_blocks_total{{{SEL}}})", "total {{role}} {{pod}}")], 12, 0),
        panel(3, "Queued prompt tokens (prefill HPA metric)", [(f'sum by (pod) (tandem_engine_queued_prompt_tokens{{{SEL}, role="prefill"}})', "{{pod}}")], 0, 8),
        panel(4, "Running requests (decode HPA metric)", [(f'sum by (pod) (tandem_engine_requests_running{{{SEL}, role="decode"}})', "{{pod}}")], 12, 8),
        panel(5, "Waiting requests", [(f"sum by ({by}) (tandem_engine_requests_waiting{{{SEL}}})", "{{role}} {{pod}}")], 0, 16),
        panel(6, "Mean batch size per replica", [(f"sum by ({by}) (rate(tandem_engine_batch_size_sum{{{SEL}}}[{R}])) / clamp_min(sum by ({by}) (rate(tandem_engine_batch_size_count{{{SEL}}}[{R}])), 1e-9)", "{{role}} {{pod}}")], 12, 16),
        panel(7, "Tokens per step p90", [(f"histogram_quantile(0.9, sum by (le, role) (rate(tandem_engine_batch_tokens_bucket{{{SEL}}}[{R}])))", "{{role}}")], 0, 24),
        panel(8, "Step duration p90", [(f"histogram_quantile(0.9, sum by (le, role, kind) (rate(tandem_engine_step_duration_seconds_bucket{{{SEL}}}[{R}])))", "{{role}} {{kind}}")], 12, 24, unit="s"),
        panel(9, "Prefix cache hit rate", [(f"sum by (role) (rate(tandem_engine_prefix_cache_hit_tokens_total{{{SEL}}}[{R}])) / clamp_min(sum by (role) (rate(tandem_engine_prefix_cache_query_tokens_total{{{SEL}}}[{R}])), 1e-9)", "{{role}}")], 0, 32, unit="percentunit"),
        panel(10, "Preemptions / s and finished by reason", [(f"sum by (role) (rate(tandem_engine_preemptions_total{{{SEL}}}[{R}]))", "preempted {{role}}"),
                                                             (f"sum by (role, reason) (rate(tandem_engine_requests_finished_total{{{SEL}}}[{R}]))", "{{role}} {{reason}}")], 12, 32),
        panel(11, "Tokens / s per pool", [(f"sum by (role) (rate(tandem_engine_computed_prompt_tokens_total{{{SEL}}}[{R}]))", "computed prompt {{role}}"),
                                          (f"sum by (role) (rate(tandem_engine_prompt_tokens_total{{{SEL}}}[{R}]))", "prompt {{role}}"),
                                          (f"sum by (role) (rate(tandem_engine_generation_tokens_total{{{SEL}}}[{R}]))", "generated {{role}}")], 0, 40, w=24),
    ]
    return dashboard("tandem-pools", "Tandem / Pools", p)


def router() -> dict:
    p = [
        panel(1, "Prefix reuse (matched / routed prompt tokens)", [(f"sum(rate(tandem_router_prefix_matched_tokens_total{{{SEL}}}[{R}])) / clamp_min(sum(rate(tandem_router_prompt_tokens_total{{{SEL}}}[{R}])), 1e-9)", "reuse")], 0, 0, unit="percentunit"),
        panel(2, "Routing decisions / s", [(f"sum by (pool, policy, reason) (rate(tandem_router_routing_decisions_total{{{SEL}}}[{R}]))", "{{pool}} {{policy}} {{reason}}")], 12, 0),
        panel(3, "Healthy replicas per pool", [(f"sum by (pool) (tandem_router_replica_healthy{{{SEL}}})", "{{pool}}")], 0, 8),
        panel(4, "Replica health", [(f"max by (pool, replica) (tandem_router_replica_healthy{{{SEL}}})", "{{pool}} {{replica}}")], 12, 8),
        panel(5, "Exact prefix index (KV events) per replica", [(f"max by (replica) (tandem_router_prefix_index_exact{{{SEL}}})", "{{replica}}")], 0, 16),
        panel(6, "Decision time", quantiles("tandem_router_decision_duration_seconds"), 12, 16, unit="s"),
    ]
    return dashboard("tandem-router", "Tandem / Router", p)


def kv_transfer() -> dict:
    by = "backend, direction"
    p = [
        panel(1, "KV transfer GB/s", [(f"sum by ({by}) (rate(tandem_kv_transfer_bytes_total{{{SEL}}}[{R}])) / 1e9", "{{backend}} {{direction}}")], 0, 0),
        panel(2, "Last transfer throughput (GB/s) per pod", [(f"max by (pod, {by}) (tandem_kv_transfer_throughput_gbps{{{SEL}}})", "{{pod}} {{direction}}")], 12, 0),
        panel(3, "Transfer latency", quantiles("tandem_kv_transfer_duration_seconds", by="direction"), 0, 8, unit="s"),
        panel(4, "Failures / s by reason", [(f"sum by (backend, reason) (rate(tandem_kv_transfer_failures_total{{{SEL}}}[{R}]))", "{{backend}} {{reason}}")], 12, 8),
        panel(5, "Transfers in flight", [(f"sum by ({by}) (tandem_kv_transfers_in_flight{{{SEL}}})", "{{backend}} {{direction}}")], 0, 16, w=24),
    ]
    return dashboard("tandem-kv-transfer", "Tandem / KV transfer", p)


if __name__ == "__main__":
    here = os.path.dirname(os.path.abspath(__file__))
    for name, fn in (("overview", overview), ("pools", pools), ("router", router),
                     ("kv-transfer", kv_transfer)):
        with open(os.path.join(here, f"{name}.json"), "w") as f:
            json.dump(fn(), f, indent=2)
            f.write("\n")
