"""Progress display for a benchmark run: tqdm when installed, else a plain stderr line.

The runner calls :func:`make_progress` once and ``update()`` after every finished request; the
fallback rewrites one ``\\r`` line at most ten times a second so it stays cheap at high rates.
"""

from __future__ import annotations

import sys
import time
from typing import Protocol


class Progress(Protocol):
    def update(self, n: int = 1) -> None: ...
    def close(self) -> None: ...


class _Silent:
    def update(self, n: int = 1) -> None:
        pass

    def close(self) -> None:
        pass


class _Line:
    def __init__(self, total: int, desc: str):
        self.total, self.desc, self.n = total, desc, 0
        self.t0 = self._last = time.monotonic()

    def update(self, n: int = 1) -> None:
        self.n += n
        now = time.monotonic()
        if now - self._last >= 0.1 or self.n >= self.total:
            self._last = now
            rate = self.n / max(now - self.t0, 1e-9)
            sys.stderr.write(f"\r{self.desc}: {self.n}/{self.total} [{now - self.t0:.1f}s, "
                             f"{rate:.2f} req/s]")
            sys.stderr.flush()

    def close(self) -> None:
        sys.stderr.write("\n")
        sys.stderr.flush()


def make_progress(total: int, disable: bool = False, desc: str = "requests") -> Progress:
    if disable:
        return _Silent()
    try:
        from tqdm import tqdm
    except ImportError:
        return _Line(total, desc)
    return tqdm(total=total, desc=desc)
