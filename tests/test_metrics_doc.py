"""docs/metrics.md is generated from tandem.metrics.catalog(): the committed table is current."""

from __future__ import annotations

from tandem import metrics_doc
from tandem.metrics import catalog


def test_committed_metrics_table_is_current() -> None:
    assert metrics_doc.DOC.read_text() == metrics_doc.render(), \
        "docs/metrics.md is out of date: run `python -m tandem.metrics_doc` and commit it"


def test_every_metric_is_in_the_table() -> None:
    text = metrics_doc.render()
    for name, mtype, _ in catalog():
        assert f"| `{name}` | {mtype} |" in text
    assert metrics_doc.main(["--check"]) == 0
