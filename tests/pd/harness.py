"""Starts real worker processes (`python -m tandem prefill|decode ...`) on free ports and talks
to them over gRPC/HTTP: shared by the disaggregation tests and, later, the router tests."""

from __future__ import annotations

import os
import signal
import subprocess
import sys
import time
import urllib.request

import grpc

from tandem.serve.config import free_port as _free_port

from tandem.proto import worker_pb2 as pb
from tandem.proto import worker_pb2_grpc as pb_grpc
from tandem.proto.convert import VERSION, params_to_proto


def free_port() -> int:
    return _free_port("127.0.0.1")


class Managed:
    """A server process in its own process group, logging to a file, ready when its HTTP
    ``/ready`` answers 200. Subclasses build the command."""

    role = "process"

    def _launch(self, cmd: list[str], log_dir) -> None:
        self.log_path = os.path.join(log_dir or "/tmp", f"{self.role}-{self.http_port}.log")
        self.log = open(self.log_path, "w")
        env = dict(os.environ, PYTHONUNBUFFERED="1")
        self.p = subprocess.Popen(cmd, stdout=self.log, stderr=subprocess.STDOUT, env=env,
                                  start_new_session=True)

    def wait_ready(self, timeout: float = 120):
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            if self.p.poll() is not None:
                raise RuntimeError(f"{self.role} exited ({self.p.returncode}):\n{self.tail()}")
            try:
                with urllib.request.urlopen(f"http://127.0.0.1:{self.http_port}/ready", timeout=1) as r:
                    if r.status == 200:
                        return self
            except OSError:
                pass
            time.sleep(0.2)
        raise TimeoutError(f"{self.role} not ready after {timeout}s:\n{self.tail()}")

    def tail(self, n: int = 40) -> str:
        if not self.log.closed:
            self.log.flush()
        with open(self.log_path) as f:
            return "".join(f.readlines()[-n:])

    def kill(self, sig=signal.SIGKILL) -> None:
        if self.p.poll() is None:
            os.killpg(self.p.pid, sig)
            self.p.wait(timeout=30)

    def stop(self) -> None:
        """SIGTERM (graceful drain), SIGKILL after 30 s."""
        if self.p.poll() is None:
            os.killpg(self.p.pid, signal.SIGTERM)
            try:
                self.p.wait(timeout=30)
            except subprocess.TimeoutExpired:
                self.kill()
        self.log.close()


class Proc(Managed):
    """A `tandem prefill|decode` worker on free ports (CPU, float32, 256 KV blocks by default)."""

    def __init__(self, role: str, model: str, *extra: str, log_dir=None):
        self.role = role
        self.grpc_port, self.http_port = free_port(), free_port()
        self.endpoint = f"127.0.0.1:{self.grpc_port}"
        self._launch([sys.executable, "-m", "tandem", role, "--model", model, "--device", "cpu",
                      "--dtype", "float32", "--host", "127.0.0.1", "--advertise-host", "127.0.0.1",
                      "--grpc-port", str(self.grpc_port), "--http-port", str(self.http_port),
                      "--num-kv-blocks", "256", *extra], log_dir)

    def metrics(self) -> str:
        with urllib.request.urlopen(f"http://127.0.0.1:{self.http_port}/metrics", timeout=5) as r:
            return r.read().decode()

    def info(self) -> pb.WorkerInfo:
        with grpc.insecure_channel(self.endpoint) as ch:
            stub = (pb_grpc.PrefillWorkerStub if self.role == "prefill" else pb_grpc.DecodeWorkerStub)(ch)
            return stub.Info(pb.InfoRequest(version=VERSION), timeout=10)



def metric_value(text: str, name: str, **labels) -> float:
    total = 0.0
    for line in text.splitlines():
        if not line.startswith(name) or line.startswith("#"):
            continue
        head, _, value = line.rpartition(" ")
        if head.split("{")[0] != name:
            continue
        if all(f'{k}="{v}"' in head for k, v in labels.items()):
            total += float(value)
    return total


def generate(decode_endpoint: str, token_ids, params, prefill_endpoint: str = "",
             request_id: str | None = None, timeout: float = 120):
    """Returns (token ids, last GenerateResponse, first response)."""
    with grpc.insecure_channel(decode_endpoint) as ch:
        stub = pb_grpc.DecodeWorkerStub(ch)
        req = pb.GenerateRequest(version=VERSION, request_id=request_id or f"t-{time.monotonic_ns()}",
                                 token_ids=list(token_ids), params=params_to_proto(params),
                                 prefill_endpoint=prefill_endpoint)
        toks, first, last = [], None, None
        for resp in stub.Generate(req, timeout=timeout):
            first = first or resp
            toks.extend(resp.token_ids)
            last = resp
        return toks, last, first
