"""``python -m tandem.operator [flags]``: the same as ``tandem operator [flags]``."""

import sys

from tandem.operator.cli import main

if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
