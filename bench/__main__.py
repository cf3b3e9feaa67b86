"""``python -m tandem.bench serve ...``: the same as ``tandem bench serve ...``."""

import sys

from tandem.bench.cli import main

if __name__ == "__main__":
    argv = sys.argv[1:]
    if argv[:1] != ["serve"] and argv[:1] not in (["-h"], ["--help"]):
        sys.exit("usage: python -m tandem.bench serve [flags]  (serve --help lists them)")
    sys.exit(main(argv))
