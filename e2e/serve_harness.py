"""End-to-end harness: real `tandem serve` processes (router + prefill + decode workers, local
subprocesses or Ray actors) on a tiny generated model, on the CPU, called through the official
`openai` client exactly as a user would.

Data flow: `ServeRun` starts `python -m tandem serve ... --status-file F` as a child of the test
process, waits for its "ready" banner, and reads F (the supervisor's JSON list of processes with
pids, ports, states, restart counts) to find, kill and scrape individual workers.
"""

from __future__ import annotations

import importlib.util
import json
import os
import signal
import subprocess
import sys
import time
import urllib.request

from tandem.serve.config import free_port as _free_port



def router_missing() -> str | None:
    if importlib.util.find_spec("tandem.router.cli") is None:
        return ("the router (issue 4: `tandem router`, tandem.router.cli) is not merged into this "
                "branch yet; tandem serve starts it as one of its processes")
    return None


def ray_missing() -> str | None:
    return None if importlib.util.find_spec("ray") else "ray is not installed (pip install 'tandem[ray]')"


def nixl_missing() -> str | None:
    from tandem.kvtransfer import nixl_available
    return nixl_available()


def free_port() -> int:
    return _free_port("127.0.0.1")


class ServeRun:
    """One `tandem serve` process and what it reports about its children."""

    def __init__(self, model: str, workdir: str, launcher: str = "local", prefill: int = 1,
                 decode: int = 2, kv: str = "tcp", extra: tuple[str, ...] = ()):
        self.launcher = launcher
        self.port, self.grpc_port = free_port(), free_port()
        self.status_path = os.path.join(workdir, "status.json")
        self.out_path = os.path.join(workdir, "serve.out")
        cmd = [sys.executable, "-m", "tandem", "serve", "--model", model,
               "--served-model-name", "tiny", "--launcher", launcher,
               "--prefill", str(prefill), "--decode", str(decode), "--kv-transfer", kv,
               "--port", str(self.port), "--grpc-port", str(self.grpc_port),
               "--status-file", self.status_path, "--log-dir", os.path.join(workdir, "logs"),
               "--drain-timeout", "5", *extra]
        self.out = open(self.out_path, "w")
        # its own session, like a shell job: the test signals it the way Ctrl-C / kill would
        self.p = subprocess.Popen(cmd, stdout=self.out, stderr=subprocess.STDOUT,
                                  env=dict(os.environ, PYTHONUNBUFFERED="1"), start_new_session=True)
        self.base_url = f"http://127.0.0.1:{self.port}/v1"

    def output(self) -> str:
        if not self.out.closed:
            self.out.flush()
        with open(self.out_path) as f:
            return f.read()

    def wait_ready(self, timeout: float = 180) -> "ServeRun":
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            if "[serve] ready:" in self.output():
                return self
            if self.p.poll() is not None:
                raise RuntimeError(f"tandem serve exited ({self.p.returncode}):\n{self.output()[-6000:]}")
            time.sleep(0.3)
        raise TimeoutError(f"tandem serve not ready after {timeout}s:\n{self.output()[-6000:]}")

    def status(self) -> dict:
        with open(self.status_path) as f:
            return json.load(f)

    def proc(self, name: str) -> dict:
        return next(p for p in self.status()["processes"] if p["name"] == name)

    def wait_restarted(self, name: str, restarts: int, timeout: float = 90) -> dict:
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            p = self.proc(name)
            if p["restarts"] >= restarts and p["state"] == "ready":
                return p
            time.sleep(0.3)
        raise TimeoutError(f"{name} not restarted and ready after {timeout}s: {self.proc(name)}\n"
                           f"{self.output()[-4000:]}")

    def wait_router_healthy(self, name: str, timeout: float = 60) -> None:
        """Until the router's health checks have taken the (restarted) worker back in."""
        p = self.proc(name)
        replica = f'replica="{p["host"]}:{p["grpc_port"]}"'
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            for line in self.scrape("router").splitlines():
                if line.startswith("tandem_router_replica_healthy{") and replica in line \
                        and line.rsplit(" ", 1)[1] == "1.0":
                    return
            time.sleep(0.3)
        raise TimeoutError(f"the router did not mark {name} ({replica}) healthy within {timeout}s")

    def kill_worker(self, name: str) -> int:
        """SIGKILL the worker's process group, as an OOM kill or a crash would."""
        pid = self.proc(name)["pid"]
        os.killpg(pid, signal.SIGKILL)
        return pid

    def metrics_urls(self) -> dict[str, str]:
        return {p["name"]: f"http://{p['host']}:{p['http_port']}/metrics"
                for p in self.status()["processes"]}

    def scrape(self, name: str) -> str:
        with urllib.request.urlopen(self.metrics_urls()[name], timeout=10) as r:
            return r.read().decode()

    def stop(self, sig: int = signal.SIGTERM, timeout: float = 60) -> int:
        if self.p.poll() is None:
            self.p.send_signal(sig)
            try:
                self.p.wait(timeout=timeout)
            except subprocess.TimeoutExpired:
                os.killpg(self.p.pid, signal.SIGKILL)
                self.p.wait()
                raise
        self.out.close()
        return self.p.returncode

    def force_cleanup(self) -> None:
        """Teardown after a failed test: make sure nothing outlives it."""
        import psutil
        try:
            kids = psutil.Process(self.p.pid).children(recursive=True)
        except psutil.NoSuchProcess:
            kids = []
        if self.p.poll() is None:
            try:
                self.stop(signal.SIGTERM, timeout=40)
            except Exception:  # noqa: BLE001
                pass
        for k in kids:
            try:
                k.kill()
            except psutil.NoSuchProcess:
                pass
        if not self.out.closed:
            self.out.close()
