"""Process plumbing shared by the launchers: spawning a role in its own process group, tied to its
parent's life, and finding and killing what is left of a process tree.

Why process groups: Ctrl-C in a terminal signals the whole foreground group; workers in groups of
their own do not see it, so the supervisor decides the order (router first, then workers, each
given time to drain). Why PR_SET_PDEATHSIG: if the supervisor itself is SIGKILLed it cannot clean
up, and the kernel then kills its children instead of leaving them orphaned. Why a descendant
snapshot: a child's own children (Ray's raylet and its workers, say) may re-parent to init when
their parent exits; the pids collected while the tree was intact are the last-resort kill list.
"""

from __future__ import annotations

import os
import signal
import subprocess
import sys
import time
import urllib.request
from dataclasses import dataclass

PR_SET_PDEATHSIG = 1


# Runs before the role's command, in the child: ask the kernel for SIGKILL when the parent dies,
# then exec the real command (same pid, so `ps` shows `python -m tandem ROLE ...`). Done by exec
# rather than subprocess's preexec_fn because preexec_fn is unsafe in a threaded parent (a Ray
# actor is one).
_PDEATHSIG_EXEC = (
    "import ctypes, os, sys\n"
    "try:\n"
    f"    ctypes.CDLL(None).prctl({PR_SET_PDEATHSIG}, {int(signal.SIGKILL)}, 0, 0, 0)\n"
    "except Exception:\n"
    "    pass\n"
    "if os.getppid() != int(sys.argv[1]):\n"
    "    sys.exit(1)\n"                     # the parent is already gone: do not start at all
    "os.execv(sys.argv[2], sys.argv[2:])\n")


def spawn(cmd: list[str], env_extra: dict[str, str], log_path: str) -> subprocess.Popen:
    """Starts `cmd` as the leader of a new session/process group, output appended to log_path,
    killed by the kernel if this process dies first."""
    env = dict(os.environ, PYTHONUNBUFFERED="1", **env_extra)
    log = open(log_path, "ab")
    wrapped = [sys.executable, "-S", "-c", _PDEATHSIG_EXEC, str(os.getpid()), *cmd]
    try:
        return subprocess.Popen(wrapped, stdout=log, stderr=subprocess.STDOUT,
                                stdin=subprocess.DEVNULL, env=env, start_new_session=True)
    finally:
        log.close()          # the child holds its own descriptor


@dataclass(frozen=True)
class ProcId:
    """A pid plus its start time, so a recycled pid is never mistaken for the original."""
    pid: int
    start: int

    def alive(self) -> bool:
        st = _stat(self.pid)
        return st is not None and st[1] == self.start and st[2] != "Z"


def _stat(pid: int) -> tuple[int, int, str] | None:
    """(ppid, start time in clock ticks, state) from /proc/PID/stat."""
    try:
        with open(f"/proc/{pid}/stat") as f:
            raw = f.read()
    except OSError:
        return None
    # the command name (field 2) may hold spaces and parentheses: split after its last ')'
    rest = raw[raw.rindex(")") + 2:].split()
    return int(rest[1]), int(rest[19]), rest[0]


def proc_id(pid: int) -> ProcId | None:
    st = _stat(pid)
    return ProcId(pid, st[1]) if st else None


def descendants(root: int) -> list[ProcId]:
    """Every live process below `root` (children, grandchildren, ...), from /proc."""
    children: dict[int, list[int]] = {}
    starts: dict[int, int] = {}
    for entry in os.listdir("/proc"):
        if not entry.isdigit():
            continue
        st = _stat(int(entry))
        if st is None:
            continue
        children.setdefault(st[0], []).append(int(entry))
        starts[int(entry)] = st[1]
    out, stack = [], list(children.get(root, []))
    while stack:
        pid = stack.pop()
        out.append(ProcId(pid, starts[pid]))
        stack += children.get(pid, [])
    return out


def signal_group(pid: int, sig: int) -> None:
    try:
        os.killpg(pid, sig)
    except (ProcessLookupError, PermissionError):
        pass


def kill_leftovers(procs: list[ProcId], grace: float = 2.0) -> list[ProcId]:
    """SIGTERM, then after `grace` seconds SIGKILL, whatever of `procs` is still alive (and is
    still the same process). Returns the ones that had to be signalled."""
    left = [p for p in procs if p.alive()]
    for p in left:
        try:
            os.kill(p.pid, signal.SIGTERM)
        except ProcessLookupError:
            pass
    deadline = time.monotonic() + grace
    while time.monotonic() < deadline and any(p.alive() for p in left):
        time.sleep(0.05)
    for p in left:
        if p.alive():
            try:
                os.kill(p.pid, signal.SIGKILL)
            except ProcessLookupError:
                pass
    return left


def http_ok(url: str, timeout: float = 1.0) -> bool:
    try:
        with urllib.request.urlopen(url, timeout=timeout) as r:
            return r.status == 200
    except Exception:  # noqa: BLE001 - refused, 503, timeout: not ready
        return False


def tail(path: str, n: int = 25) -> str:
    try:
        with open(path, "rb") as f:
            f.seek(0, os.SEEK_END)
            f.seek(max(0, f.tell() - 16384))
            lines = f.read().decode(errors="replace").splitlines()
    except OSError:
        return ""
    return "\n".join(lines[-n:])
