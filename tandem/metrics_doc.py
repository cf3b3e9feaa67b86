"""`python -m tandem.metrics_doc`: writes docs/metrics.md, the table of every metric Tandem
exports, from `tandem.metrics.catalog()` (names, types, help) plus each metric's label names.

`--check` exits 1 when the committed file differs from what the catalog gives (the test suite
runs the same comparison), so the table cannot drift from the code.
"""

from __future__ import annotations

import argparse
import sys
from pathlib import Path

from prometheus_client import Counter, Gauge, Histogram

from tandem import metrics

DOC = Path(__file__).resolve().parent.parent / "docs" / "metrics.md"
COMPONENTS = [("tandem_engine_", "Engine (every prefill and decode worker)"),
              ("tandem_kv_", "KV transfer (prefill sends, decode receives)"),
              ("tandem_router_", "Router")]
SERIES = {"counter": "`{n}`", "gauge": "`{n}`",
          "histogram": "`{b}_bucket`, `{b}_sum`, `{b}_count`"}


def labels_by_name() -> dict[str, tuple[str, ...]]:
    out = {}
    for obj in vars(metrics).values():
        if isinstance(obj, (Counter, Gauge, Histogram)):
            name = obj._name + ("_total" if isinstance(obj, Counter) else "")
            out[name] = tuple(obj._labelnames)
    return out


def render() -> str:
    labels = labels_by_name()
    rows = metrics.catalog()
    lines = ["# Metrics", "",
             "Every Prometheus metric Tandem exports. Generated from `tandem.metrics.catalog()` by",
             "`python -m tandem.metrics_doc`; do not edit by hand (a test checks it is current).",
             "Each component serves its own `/metrics` (router: its HTTP port; workers: `--http-port`);",
             "per-replica breakdowns come from the scrape's `pod`/`instance` labels.", ""]
    for prefix, title in COMPONENTS:
        group = [r for r in rows if r[0].startswith(prefix)]
        if not group:
            continue
        lines += [f"## {title}", "", "| Metric | Type | Labels | Series | Description |",
                  "| --- | --- | --- | --- | --- |"]
        for name, mtype, help_ in group:
            base = name[:-len("_total")] if mtype == "counter" else name
            series = SERIES.get(mtype, "`{n}`").format(n=name, b=base)
            lab = ", ".join(f"`{x}`" for x in labels.get(name, ())) or "-"
            lines.append(f"| `{name}` | {mtype} | {lab} | {series} | {help_.replace('|', '/')} |")
        lines.append("")
    other = [r for r in rows if not any(r[0].startswith(p) for p, _ in COMPONENTS)]
    if other:
        lines += ["## Other", "", "| Metric | Type | Description |", "| --- | --- | --- |"]
        lines += [f"| `{n}` | {t} | {h} |" for n, t, h in other]
        lines.append("")
    return "\n".join(lines)


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(prog="python -m tandem.metrics_doc", description=__doc__.splitlines()[0])
    p.add_argument("--out", default=str(DOC), help="file to write (default: docs/metrics.md)")
    p.add_argument("--check", action="store_true", help="only compare; exit 1 if out of date")
    args = p.parse_args(argv)
    text, out = render(), Path(args.out)
    if args.check:
        current = out.read_text() if out.exists() else ""
        if current != text:
            print(f"{out} is out of date: run python -m tandem.metrics_doc", file=sys.stderr)
            return 1
        return 0
    out.parent.mkdir(parents=True, exist_ok=True)
    out.write_text(text)
    print(f"wrote {len(metrics.catalog())} metrics to {out}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
