"""The supervisor: starts every process of the plan through a launcher, waits until all answer
/ready (printing progress), prints where to send requests, keeps them running, and stops them.

Data flow: `ServeConfig` -> worker `ProcSpec`s -> launcher.start() each (a launcher may move a
spec to the host it actually landed on) -> the router's spec from the workers' endpoints ->
launcher.start(router) -> a polling loop: launcher.poll() says whether each process runs, exited,
or is being restarted; /ready over HTTP says whether it serves. Local processes that exit are
restarted here with exponential backoff; Ray restarts its actors itself (max_restarts) and the
loop only notices the new incarnation. A process restarted more than --max-restarts times is
reported and left down; the router or the last decode worker failing ends the whole deployment.

Stopping (Ctrl-C, SIGTERM, or a fatal failure): the router first (it stops taking requests and
lets in-flight ones finish), then all workers at once (they drain), then SIGKILL for any process
group still there, then a last sweep over every descendant pid ever seen (see procs.py).
"""

from __future__ import annotations

import json
import os
import signal
import threading
import time
from dataclasses import asdict, dataclass, field
from typing import Protocol

from tandem.serve.config import ProcSpec, ServeConfig, router_spec, worker_specs
from tandem.serve.procs import (ProcId, descendants, http_ok, kill_leftovers, signal_group, spawn,
                                tail)

STABLE_S = 60.0            # up this long after becoming ready: earlier crashes are forgiven
BACKOFF_BASE_S = 1.0
BACKOFF_MAX_S = 30.0
TICK_S = 0.25


def backoff(failures: int) -> float:
    """Delay before restart number `failures` (1-based) of a process that keeps exiting."""
    return min(BACKOFF_MAX_S, BACKOFF_BASE_S * 2 ** max(0, failures - 1))


@dataclass
class Member:
    spec: ProcSpec
    log_path: str
    state: str = "starting"        # starting | ready | backoff | restarting | failed | stopped
    pid: int | None = None
    restarts: int = 0
    failures: int = 0              # exits since it was last stable
    ever_ready: bool = False
    ready_since: float = 0.0
    restart_at: float = 0.0
    last_exit: str = ""
    started: float = field(default_factory=time.monotonic)

    @property
    def name(self) -> str:
        return self.spec.name


@dataclass
class Poll:
    kind: str                      # running | exited | restarting | dead
    pid: int | None = None
    detail: str = ""


class Launcher(Protocol):
    restarts_itself: bool          # True: the launcher restarts exited processes (Ray)

    def start(self, m: Member) -> None: ...
    def poll(self, m: Member) -> Poll: ...
    def terminate(self, m: Member) -> None: ...
    def kill(self, m: Member) -> None: ...
    def close(self) -> None: ...


class LocalLauncher:
    """Each process a child of this one, leader of its own process group."""
    restarts_itself = False

    def __init__(self) -> None:
        self.procs: dict[str, object] = {}

    def start(self, m: Member) -> None:
        p = spawn(m.spec.command(), m.spec.env, m.log_path)
        self.procs[m.name] = p
        m.pid = p.pid

    def poll(self, m: Member) -> Poll:
        p = self.procs.get(m.name)
        if p is None:
            return Poll("exited", None, "never started")
        rc = p.poll()
        if rc is None:
            return Poll("running", p.pid)
        return Poll("exited", p.pid, f"signal {-rc}" if rc < 0 else f"exit code {rc}")

    def terminate(self, m: Member) -> None:
        if m.pid and self.poll(m).kind == "running":
            signal_group(m.pid, signal.SIGTERM)

    def kill(self, m: Member) -> None:
        if m.pid:
            signal_group(m.pid, signal.SIGKILL)

    def close(self) -> None:
        for p in self.procs.values():
            if p.poll() is None:
                try:
                    p.wait(timeout=5)
                except Exception:  # noqa: BLE001
                    pass


class Supervisor:
    def __init__(self, cfg: ServeConfig, launcher: Launcher, log_dir: str,
                 status_file: str | None = None, ready_timeout: float = 900.0, out=print):
        self.cfg, self.launcher, self.log_dir = cfg, launcher, log_dir
        self.status_file, self.ready_timeout, self.out = status_file, ready_timeout, out
        self.members: list[Member] = []
        self.stopping = threading.Event()
        self._signals = 0
        self._seen: set[ProcId] = set()
        self._last_sweep = 0.0

    # ---- signals -----------------------------------------------------------------------------------
    def install_signal_handlers(self) -> None:
        def handler(signum, _frame):
            self._signals += 1
            if self._signals == 1:
                self.out(f"\n[serve] {signal.Signals(signum).name}: stopping (again to kill at once)")
                self.stopping.set()
            else:
                self.out("[serve] killing everything now")
                for m in self.members:
                    self.launcher.kill(m)
        signal.signal(signal.SIGINT, handler)
        signal.signal(signal.SIGTERM, handler)

    # ---- the whole run -----------------------------------------------------------------------------
    def run(self) -> int:
        try:
            self.start_all()
            if not self.wait_ready():
                return 0 if self._signals else 1     # Ctrl-C during start-up is no failure
            self.banner()
            return self.supervise()
        finally:
            self.shutdown()

    def start_all(self) -> None:
        cfg = self.cfg
        where = f"{len(cfg.gpus)} GPU(s)" if cfg.gpus else "cpu"
        self.out(f"[serve] starting router + {cfg.prefill} prefill + {cfg.decode} decode "
                 f"({cfg.launcher} launcher, {where}, KV transfer {cfg.kv_transfer}); "
                 f"logs in {self.log_dir}")
        for note in cfg.notes:
            self.out(f"[serve] note: {note}")
        for spec in worker_specs(cfg):
            self._start(Member(spec, os.path.join(self.log_dir, f"{spec.name}.log")))
        # workers' endpoints as the launcher placed them (a Ray actor may be on another node)
        pre = [m.spec.endpoint for m in self.members if m.spec.role == "prefill"]
        dec = [m.spec.endpoint for m in self.members if m.spec.role == "decode"]
        spec = router_spec(cfg, pre, dec)
        self._start(Member(spec, os.path.join(self.log_dir, "router.log")))
        self.write_status()

    def _start(self, m: Member) -> None:
        if m not in self.members:
            self.members.append(m)
        m.state, m.started = "starting", time.monotonic()
        self.launcher.start(m)
        s = m.spec
        gpu = f" GPU {s.gpu}" if s.gpu is not None else ""
        self.out(f"[serve]   {m.name:<10} pid {m.pid}  gRPC {s.endpoint}  HTTP :{s.http_port}{gpu}")

    def wait_ready(self) -> bool:
        """Until every process answers /ready. A process that exits before it was ever ready ends
        the start-up: its configuration (model, ports, device) is wrong and restarting won't help."""
        t0 = time.monotonic()
        last_note = t0
        while not self.stopping.is_set():
            for m in self.members:
                p = self.launcher.poll(m)
                if p.kind in ("exited", "dead", "restarting") or (p.pid and m.pid and p.pid != m.pid):
                    self.out(f"[serve] {m.name} exited during start-up ({p.detail or p.kind}); "
                             f"last lines of {m.log_path}:\n{tail(m.log_path)}")
                    m.state = "failed"
                    self.write_status()
                    return False
                if m.state != "ready" and http_ok(m.spec.ready_url(), timeout=0.5):
                    self._became_ready(m, f"ready ({time.monotonic() - t0:.1f}s)")
            if all(m.state == "ready" for m in self.members):
                return True
            now = time.monotonic()
            if now - t0 > self.ready_timeout:
                waiting = [m.name for m in self.members if m.state != "ready"]
                self.out(f"[serve] not ready after {self.ready_timeout:.0f}s: {', '.join(waiting)} "
                         f"(see their logs in {self.log_dir})")
                return False
            if now - last_note >= 10:
                waiting = [m.name for m in self.members if m.state != "ready"]
                self.out(f"[serve] waiting for {', '.join(waiting)} ({now - t0:.0f}s) ...")
                last_note = now
            self._sweep()
            self.stopping.wait(TICK_S)
        return False

    def _became_ready(self, m: Member, what: str) -> None:
        m.state, m.ever_ready, m.ready_since = "ready", True, time.monotonic()
        self.out(f"[serve] {m.name} {what}")
        self.write_status()

    def banner(self) -> None:
        cfg = self.cfg
        url = f"http://{self.router.spec.host}:{cfg.port}/v1"
        body = json.dumps({"model": cfg.served_model_name, "prompt": "Hello, my name is",
                           "max_tokens": 16})
        demo = " (demo model: random weights, the text is gibberish)" if cfg.demo else ""
        self.out(f"\n[serve] ready: model {cfg.served_model_name!r}{demo}\n"
                 f"  OpenAI base URL: {url}\n"
                 f"  try: curl {url}/completions -H 'Content-Type: application/json' -d '{body}'\n"
                 f"  metrics: http://{self.router.spec.host}:{cfg.port}/metrics "
                 f"(workers: each one's HTTP port)\n"
                 f"  Ctrl-C stops everything.\n", )

    @property
    def router(self) -> Member:
        return next(m for m in self.members if m.spec.role == "router")

    # ---- keeping it running ------------------------------------------------------------------------
    def supervise(self) -> int:
        while not self.stopping.wait(TICK_S):
            now = time.monotonic()
            for m in self.members:
                if m.state in ("failed", "stopped"):
                    continue
                if m.state == "backoff":
                    if now >= m.restart_at:
                        m.restarts += 1
                        self.out(f"[serve] restarting {m.name} (restart {m.restarts})")
                        self._start(m)
                        self.write_status()
                    continue
                self._check(m, now)
            fatal = self._fatal()
            if fatal:
                self.out(f"[serve] {fatal}: shutting down")
                return 1
            self._sweep()
        return 0

    def _check(self, m: Member, now: float) -> None:
        p = self.launcher.poll(m)
        if p.kind == "running":
            if m.pid is not None and p.pid is not None and p.pid != m.pid:
                # the launcher restarted it (a Ray actor's new incarnation)
                m.restarts += 1
                self.out(f"[serve] {m.name} was restarted by the launcher (pid {m.pid} -> {p.pid}, "
                         f"restart {m.restarts})")
                m.pid, m.state, m.started = p.pid, "starting", now
                self.write_status()
            elif m.pid is None:
                m.pid = p.pid
            if m.state != "ready" and http_ok(m.spec.ready_url(), timeout=0.5):
                back = m.restarts > 0
                self._became_ready(m, f"is back (restart {m.restarts})" if back else "ready")
            elif m.state == "ready" and m.failures and now - m.ready_since > STABLE_S:
                m.failures = 0
            return
        if p.kind == "restarting":
            if m.state != "restarting":
                m.state = "restarting"
                self.out(f"[serve] {m.name} died; the launcher is restarting it")
                self.write_status()
            return
        if p.kind == "dead":
            self._give_up(m, p.detail or "the launcher gave up restarting it")
            return
        # exited: restart here, with backoff
        m.last_exit = p.detail
        if m.state == "ready" and now - m.ready_since > STABLE_S:
            m.failures = 0
        m.failures += 1
        if m.failures > self.cfg.max_restarts:
            self._give_up(m, f"exited {m.failures} times in a row ({p.detail})")
            return
        delay = backoff(m.failures)
        m.state, m.restart_at = "backoff", now + delay
        self.out(f"[serve] {m.name} (pid {m.pid}) exited: {p.detail}; restarting in {delay:.0f}s "
                 f"(log: {m.log_path})")
        self.write_status()

    def _give_up(self, m: Member, why: str) -> None:
        m.state, m.last_exit = "failed", why
        self.out(f"[serve] ERROR: {m.name} keeps dying and is left down: {why}.\n"
                 f"  last lines of {m.log_path}:\n{tail(m.log_path)}")
        self.write_status()

    def _fatal(self) -> str | None:
        if self.router.state == "failed":
            return "the router is down for good"
        dec = [m for m in self.members if m.spec.role == "decode"]
        if dec and all(m.state == "failed" for m in dec):
            return "every decode worker is down for good"
        return None

    def _sweep(self, force: bool = False) -> None:
        """Remember every descendant seen (every few seconds), for the last-resort kill."""
        now = time.monotonic()
        if force or now - self._last_sweep > 3.0:
            self._last_sweep = now
            self._seen = {p for p in self._seen if p.alive()} | set(descendants(os.getpid()))

    # ---- stopping ----------------------------------------------------------------------------------
    def shutdown(self) -> None:
        self._sweep(force=True)
        grace = self.cfg.drain_timeout + 5.0
        routers = [m for m in self.members if m.spec.role == "router"]
        workers = [m for m in self.members if m.spec.role != "router"]
        for group in (routers, workers):
            live = [m for m in group if m.state != "stopped"]
            if not live:
                continue
            self.out(f"[serve] stopping {', '.join(m.name for m in live)} ...")
            for m in live:
                self.launcher.terminate(m)
            deadline = time.monotonic() + grace
            while time.monotonic() < deadline and any(self.launcher.poll(m).kind == "running"
                                                      for m in live):
                time.sleep(0.1)
            for m in live:
                if self.launcher.poll(m).kind == "running":
                    self.out(f"[serve] {m.name} did not stop within {grace:.0f}s: killing it")
                    self.launcher.kill(m)
                m.state = "stopped"
        self.launcher.close()
        leftovers = kill_leftovers(list(self._seen | set(descendants(os.getpid()))))
        if leftovers:
            self.out(f"[serve] killed {len(leftovers)} leftover process(es): "
                     f"{', '.join(str(p.pid) for p in leftovers)}")
        self.write_status()
        self.out("[serve] stopped")

    def write_status(self) -> None:
        if not self.status_file:
            return
        rows = [{"name": m.name, "role": m.spec.role, "pid": m.pid, "state": m.state,
                 "restarts": m.restarts, "host": m.spec.host, "grpc_port": m.spec.grpc_port,
                 "http_port": m.spec.http_port, "gpu": m.spec.gpu, "log": m.log_path,
                 "last_exit": m.last_exit} for m in self.members]
        tmp = self.status_file + ".tmp"
        with open(tmp, "w") as f:
            json.dump({"supervisor_pid": os.getpid(), "launcher": self.cfg.launcher,
                       "model": self.cfg.served_model_name, "processes": rows,
                       "config": {k: v for k, v in asdict(self.cfg).items() if k != "notes"}},
                      f, indent=2)
        os.replace(tmp, self.status_file)
