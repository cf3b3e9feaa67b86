"""A whole local deployment under a benchmark: `tandem serve` in a subprocess, plus helpers to
read its workers' Prometheus counters.

Data flow: `Deployment.start()` runs `python -m tandem serve ...` (its own process group, its
logs in ``log_dir``) with a status file, and waits until every process in that file is "ready"
and the router answers /ready. `snapshot()` reads every worker's /metrics into
{worker: {sample name: value summed over label sets}}, so a benchmark takes one before and after
a run and subtracts (`since`), summing per role where it wants pool totals (`by_role`). `add_router()` starts one more `tandem router` in front
of the same workers (another placement policy over the same caches). `stop()` ends everything.
"""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import time
import urllib.request
from dataclasses import dataclass, field

from prometheus_client.parser import text_string_to_metric_families

from tandem.serve.config import free_port
from tandem.serve.procs import http_ok


@dataclass
class Worker:
    name: str
    role: str
    host: str
    grpc_port: int
    http_port: int
    gpu: str | None

    @property
    def endpoint(self) -> str:
        return f"{self.host}:{self.grpc_port}"


def scrape(url: str, match: dict[str, str] | None = None) -> dict[str, float]:
    """{sample name: sum over label sets} of one /metrics page; ``match`` keeps only samples
    whose labels include these values (e.g. direction=send)."""
    with urllib.request.urlopen(url, timeout=5) as r:
        text = r.read().decode()
    out: dict[str, float] = {}
    for fam in text_string_to_metric_families(text):
        for s in fam.samples:
            if match and any(s.labels.get(k) != v for k, v in match.items()):
                continue
            out[s.name] = out.get(s.name, 0.0) + s.value
    return out


def since(before: dict[str, dict[str, float]], after: dict[str, dict[str, float]],
          keep: tuple[str, ...]) -> dict[str, dict[str, float]]:
    """Per-worker increase of the samples named in ``keep`` between two `Deployment.snapshot`s."""
    return {w: {k: v - before[w].get(k, 0.0) for k, v in c.items() if k in keep}
            for w, c in after.items()}


@dataclass
class Deployment:
    """`tandem serve --prefill N --decode M` with these extra flags, on whatever GPUs are visible."""
    label: str
    model: str
    prefill: int
    decode: int
    policy: str = "cache-aware"
    serve_args: list[str] = field(default_factory=list)
    log_dir: str = "/tmp/tandem-bench-logs"
    ready_timeout: float = 600.0
    port: int = 0
    workers: list[Worker] = field(default_factory=list)
    _procs: list[subprocess.Popen] = field(default_factory=list)

    @property
    def url(self) -> str:
        return f"http://127.0.0.1:{self.port}"

    def start(self, out=print) -> "Deployment":
        os.makedirs(self.log_dir, exist_ok=True)
        self.port = free_port()
        status = os.path.join(self.log_dir, f"{self.label}-status.json")
        if os.path.exists(status):
            os.unlink(status)
        cmd = [sys.executable, "-m", "tandem", "serve", "--model", self.model,
               "--prefill", str(self.prefill), "--decode", str(self.decode), "--policy", self.policy,
               "--port", str(self.port), "--grpc-port", str(free_port()), "--drain-timeout", "2",
               "--log-dir", os.path.join(self.log_dir, self.label), "--status-file", status,
               "--max-restarts", "0", *self.serve_args]
        out(f"[deploy] {self.label}: {' '.join(cmd[2:])}")
        log = open(os.path.join(self.log_dir, f"{self.label}-serve.log"), "w")
        t0 = time.monotonic()
        proc = subprocess.Popen(cmd, stdout=log, stderr=subprocess.STDOUT, start_new_session=True,
                                env=dict(os.environ, PYTHONUNBUFFERED="1"))
        self._procs.append(proc)
        while True:
            if proc.poll() is not None:
                raise RuntimeError(f"{self.label}: tandem serve exited with {proc.returncode} "
                                   f"(see {log.name})")
            if time.monotonic() - t0 > self.ready_timeout:
                self.stop()
                raise TimeoutError(f"{self.label}: not ready after {self.ready_timeout:.0f}s")
            rows = _read_status(status)
            if rows and all(r["state"] == "ready" for r in rows) and http_ok(self.url + "/ready"):
                break
            time.sleep(1.0)
        self.workers = [Worker(r["name"], r["role"], r["host"], r["grpc_port"], r["http_port"], r["gpu"])
                        for r in rows if r["role"] != "router"]
        self.wait_routed(self.url, t0 + self.ready_timeout)
        out(f"[deploy] {self.label} ready in {time.monotonic() - t0:.0f}s: " + ", ".join(
            f"{w.name}@gpu{w.gpu}" for w in self.workers))
        return self

    def add_router(self, policy: str) -> str:
        """Another router over the same workers; returns its base URL once it is ready."""
        port = free_port()
        pre = [w.endpoint for w in self.workers if w.role == "prefill"]
        dec = [w.endpoint for w in self.workers if w.role == "decode"]
        cmd = [sys.executable, "-m", "tandem", "router", "--model", self.model, "--policy", policy,
               "--http-port", str(port), "--grpc-port", str(free_port()), "--discovery", "static",
               "--decode", ",".join(dec)] + (["--prefill", ",".join(pre)] if pre else [])
        log = open(os.path.join(self.log_dir, f"{self.label}-router-{policy}.log"), "w")
        proc = subprocess.Popen(cmd, stdout=log, stderr=subprocess.STDOUT, start_new_session=True,
                                env=dict(os.environ, CUDA_VISIBLE_DEVICES="", PYTHONUNBUFFERED="1"))
        self._procs.append(proc)
        url = f"http://127.0.0.1:{port}"
        deadline = time.monotonic() + 120
        while not http_ok(url + "/ready"):
            if proc.poll() is not None or time.monotonic() > deadline:
                raise RuntimeError(f"router {policy} did not start (see {log.name})")
            time.sleep(0.5)
        self.wait_routed(url, deadline)
        return url

    def wait_routed(self, url: str, deadline: float) -> None:
        """Until the router at ``url`` counts every worker healthy: its /ready needs only one
        decode replica, and a run that starts before it sees the prefill pool would measure
        decode workers prefilling for themselves."""
        while True:
            try:
                healthy = scrape(url + "/metrics").get("tandem_router_replica_healthy", 0.0)
            except OSError:
                healthy = 0.0
            if healthy >= len(self.workers):
                return
            if time.monotonic() > deadline:
                raise TimeoutError(f"router {url} sees {healthy:.0f} of {len(self.workers)} workers healthy")
            time.sleep(0.2)

    def snapshot(self) -> dict[str, dict[str, float]]:
        """Every worker's counters now, one scrape each: {worker name: {sample: value}}."""
        return {w.name: scrape(f"http://{w.host}:{w.http_port}/metrics") for w in self.workers}

    def by_role(self, per_worker: dict[str, dict[str, float]]) -> dict[str, dict[str, float]]:
        """Per-worker values summed per role (both roles present, empty where none run)."""
        out: dict[str, dict[str, float]] = {"prefill": {}, "decode": {}}
        for w in self.workers:
            tot = out[w.role]
            for k, v in per_worker.get(w.name, {}).items():
                tot[k] = tot.get(k, 0.0) + v
        return out

    def stop(self) -> None:
        for p in reversed(self._procs):
            if p.poll() is None:
                os.killpg(p.pid, signal.SIGTERM)
        deadline = time.monotonic() + 30
        for p in self._procs:
            try:
                p.wait(max(deadline - time.monotonic(), 0.1))
            except subprocess.TimeoutExpired:
                os.killpg(p.pid, signal.SIGKILL)
                p.wait()
        self._procs.clear()

    def __enter__(self) -> "Deployment":
        return self

    def __exit__(self, *exc) -> None:
        self.stop()


def _read_status(path: str) -> list[dict]:
    try:
        with open(path) as f:
            return json.load(f).get("processes", [])
    except (OSError, ValueError):
        return []
