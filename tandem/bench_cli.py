"""`tandem bench engine|serve|headline`: dispatches to the offline engine benchmark or the HTTP serving
benchmark."""

from __future__ import annotations

import argparse
import importlib
import logging

TOOLS = {
    "engine": "tandem.engine.bench",   # add_arguments/run
    "serve": "tandem.bench.cli",       # main(argv)
    "headline": "tandem.bench.headline",  # main(argv): pd | routing comparisons of RESULTS.md
}


def main(argv: list[str]) -> int:
    if not argv or argv[0] not in TOOLS:
        p = argparse.ArgumentParser(prog="tandem bench", description=__doc__)
        p.add_argument("tool", choices=sorted(TOOLS), help="engine: offline engine; serve: HTTP load; headline: the RESULTS.md comparisons")
        p.parse_args(argv[:1])
        return 2
    mod = importlib.import_module(TOOLS[argv[0]])
    if hasattr(mod, "main"):
        return int(mod.main(argv[1:]) or 0)
    p = argparse.ArgumentParser(prog=f"tandem bench {argv[0]}", description=mod.__doc__,
                                formatter_class=argparse.RawDescriptionHelpFormatter)
    mod.add_arguments(p)
    args = p.parse_args(argv[1:])
    logging.getLogger().setLevel(logging.INFO)
    return int(mod.run(args) or 0)
