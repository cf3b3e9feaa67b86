"""Every metric a Grafana dashboard queries must be one the components export.

Data flow: each ``expr`` in ``charts/tandem/dashboards/*.json`` -> Grafana variables replaced by
literals -> parsed by a real PromQL parser (``promql-parser``) -> the metric names of its vector
selectors -> exposition names mapped back to base names (``_bucket``/``_sum``/``_count`` of
histograms, ``_total`` of counters) -> checked against a set of known names.

The known set is :func:`catalog_names` (``tandem.metrics.catalog()``) today. To check against what
live components really serve, pass the names scraped from their ``/metrics`` to
:func:`unknown_metrics` (see ``test_scraped_names_plug_in`` for the shape).
"""

from __future__ import annotations

import glob
import json
import os
import re
from typing import Iterable, Iterator

import promql_parser
import pytest

from tandem.metrics import catalog

ROOT = os.path.join(os.path.dirname(__file__), "..", "..")
DASHBOARDS = sorted(glob.glob(os.path.join(ROOT, "charts", "tandem", "dashboards", "*.json")))
GRAFANA_RANGES = re.compile(r"\$(__rate_interval|__interval|__range)|\$\{(__rate_interval|__interval|__range)\}")
GRAFANA_VARS = re.compile(r"\$\{?\w+\}?")


def exprs(dashboard: dict) -> Iterator[tuple[str, str]]:
    """(panel title, expr) for every target, including panels nested in rows."""
    stack = list(dashboard.get("panels", []))
    while stack:
        p = stack.pop()
        stack += p.get("panels", [])
        for t in p.get("targets", []):
            if t.get("expr"):
                yield p.get("title", "?"), t["expr"]
    for var in dashboard.get("templating", {}).get("list", []):
        q = var.get("query")
        q = q.get("query") if isinstance(q, dict) else q
        if var.get("type") == "query" and isinstance(q, str):
            m = re.match(r"label_values\((.*),\s*\w+\)$", q)
            if m:
                yield f"variable {var['name']}", m.group(1)


def to_promql(expr: str) -> str:
    expr = GRAFANA_RANGES.sub("5m", expr)
    return GRAFANA_VARS.sub("x", expr)


def metric_names(expr: str) -> set[str]:
    """Names of every series selector in a PromQL expression (parsed, not pattern-matched)."""
    names: set[str] = set()

    def walk(node: object) -> None:
        if isinstance(node, promql_parser.VectorSelector):
            if node.name:
                names.add(node.name)
            for m in node.matchers.matchers if node.matchers else []:
                if m.name == "__name__":
                    names.add(m.value)
            return
        for attr in ("lhs", "rhs", "expr", "param", "vector_selector"):
            child = getattr(node, attr, None)
            if child is not None and not isinstance(child, (str, int, float)):
                walk(child)
        for arg in getattr(node, "args", None) or []:
            walk(arg)

    walk(promql_parser.parse(to_promql(expr)))
    return names


def catalog_names() -> dict[str, str]:
    """Exposed base name -> type, from the metric catalog."""
    return {name: mtype for name, mtype, _ in catalog()}


def base_names(exposed: str, known: dict[str, str]) -> str | None:
    """Map a queried series name to the declared metric it belongs to, or None."""
    if exposed in known:
        return exposed
    for suffix in ("_bucket", "_sum", "_count"):
        if exposed.endswith(suffix) and known.get(exposed[: -len(suffix)]) == "histogram":
            return exposed[: -len(suffix)]
    return None


def unknown_metrics(names: Iterable[str], known: dict[str, str]) -> set[str]:
    return {n for n in names if base_names(n, known) is None}


def scraped_to_known(scraped: Iterable[str]) -> dict[str, str]:
    """Turn names read off a live /metrics (``# TYPE name type`` lines) into the ``known`` shape."""
    out: dict[str, str] = {}
    for line in scraped:
        parts = line.split()
        if len(parts) == 4 and parts[:2] == ["#", "TYPE"]:
            name, mtype = parts[2], parts[3]
            out[name + "_total" if mtype == "counter" and not name.endswith("_total") else name] = mtype
    return out


def test_dashboards_exist() -> None:
    names = {os.path.basename(p) for p in DASHBOARDS}
    assert {"overview.json", "pools.json", "router.json", "kv-transfer.json"} <= names


@pytest.mark.parametrize("path", DASHBOARDS, ids=os.path.basename)
def test_dashboard_metrics_are_exported(path: str) -> None:
    with open(path) as f:
        dashboard = json.load(f)
    known = catalog_names()
    seen = 0
    for title, expr in exprs(dashboard):
        names = metric_names(expr)
        assert names, f"{title}: no metric in {expr!r}"
        missing = unknown_metrics(names, known)
        assert not missing, f"{os.path.basename(path)} / {title}: not exported: {sorted(missing)}"
        seen += 1
    assert seen >= 3


def test_parser_catches_typos() -> None:
    known = catalog_names()
    names = metric_names('sum(rate(tandem_router_requests_totl{model=~"$model"}[$__rate_interval]))')
    assert unknown_metrics(names, known) == {"tandem_router_requests_totl"}
    names = metric_names("histogram_quantile(0.5, sum by (le) (rate(tandem_router_e2e_latency_seconds_bucket[5m])))")
    assert unknown_metrics(names, known) == set()
    # a gauge has no _bucket series
    assert unknown_metrics({"tandem_engine_kv_usage_ratio_bucket"}, known) == {"tandem_engine_kv_usage_ratio_bucket"}
    with pytest.raises(Exception):
        metric_names("sum(rate(x[5m])")


def test_scraped_names_plug_in() -> None:
    """The same check against names scraped from a live /metrics endpoint."""
    scraped = ["# TYPE tandem_router_requests counter",
               "# TYPE tandem_router_time_to_first_token_seconds histogram",
               "# TYPE tandem_engine_kv_usage_ratio gauge"]
    known = scraped_to_known(scraped)
    assert unknown_metrics({"tandem_router_requests_total",
                            "tandem_router_time_to_first_token_seconds_bucket",
                            "tandem_engine_kv_usage_ratio"}, known) == set()
    assert unknown_metrics({"tandem_engine_requests_running"}, known) == {"tandem_engine_requests_running"}


def test_every_hpa_metric_is_exported() -> None:
    from tandem.operator.objects import HPA_METRIC

    known = catalog_names()
    assert set(HPA_METRIC.values()) <= set(known)
