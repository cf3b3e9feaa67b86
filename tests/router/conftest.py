"""A real serving setup for the router tests: 2 prefill + 1 decode worker processes (tcp KV
transfer, decode always prefills remotely) and the router as a process of its own, all on the
tiny generated model, started once per session. Tests that kill a worker build their own."""

from __future__ import annotations

import json
import os
import sys
import urllib.error
import urllib.request
from dataclasses import dataclass

import pytest

sys.path.insert(0, os.path.join(os.path.dirname(os.path.abspath(__file__)), "..", ".."))
from tests.pd.harness import Managed, Proc, free_port

MODEL_NAME = "tiny"


class RouterProc(Managed):
    role = "router"

    def __init__(self, model: str, prefill: list[str], decode: list[str], *extra: str,
                 log_dir=None, policy: str = "round-robin"):
        self.http_port, self.grpc_port = free_port(), free_port()
        self.url = f"http://127.0.0.1:{self.http_port}"
        self.grpc_endpoint = f"127.0.0.1:{self.grpc_port}"
        self._launch([sys.executable, "-m", "tandem", "router", "--model", model,
                      "--served-model-name", MODEL_NAME, "--host", "127.0.0.1",
                      "--http-port", str(self.http_port), "--grpc-port", str(self.grpc_port),
                      "--policy", policy, "--discovery", "static",
                      "--prefill", ",".join(prefill), "--decode", ",".join(decode), *extra], log_dir)


@dataclass
class Cluster:
    model: str
    prefills: list[Proc]
    decode: Proc
    router: RouterProc

    @property
    def url(self) -> str:
        return self.router.url

    def procs(self):
        return [*self.prefills, self.decode]

    def logs(self) -> str:
        return "\n".join(f"--- {p.role} {p.endpoint}\n{p.tail()}" for p in self.procs()) + \
            f"\n--- router\n{self.router.tail()}"


def start_cluster(model: str, log_dir, n_prefill: int = 2, router_args=(),
                  policy: str = "round-robin", worker_args=()) -> Cluster:
    common = ("--served-model-name", MODEL_NAME, "--kv-transfer", "tcp", *worker_args)
    prefills = [Proc("prefill", model, *common, log_dir=log_dir) for _ in range(n_prefill)]
    decode = Proc("decode", model, *common, "--remote-prefill-threshold", "1", log_dir=log_dir)
    procs = [*prefills, decode]
    try:
        for p in procs:
            p.wait_ready()
        router = RouterProc(model, [p.endpoint for p in prefills], [decode.endpoint], *router_args,
                            log_dir=log_dir, policy=policy).wait_ready()
    except Exception:
        for p in procs:
            p.stop()
        raise
    return Cluster(model, prefills, decode, router)


def stop_cluster(c: Cluster) -> None:
    c.router.stop()
    for p in c.procs():
        p.stop()


@pytest.fixture(scope="session")
def cluster(model_factory, tmp_path_factory):
    c = start_cluster(model_factory("llama"), tmp_path_factory.mktemp("router-logs"))
    yield c
    stop_cluster(c)


@pytest.fixture(scope="session")
def offline(model_factory):
    """The engine's offline output for the same model (float32, CPU): what the router must match."""
    from tandem.engine import LLM
    return LLM(model_factory("llama"), dtype="float32", device="cpu", num_kv_blocks=256)


def post(url: str, body, timeout: float = 120, raw: bytes | None = None):
    """(status, headers, parsed JSON or text)."""
    data = raw if raw is not None else json.dumps(body).encode()
    req = urllib.request.Request(url, data=data, headers={"Content-Type": "application/json"})
    try:
        with urllib.request.urlopen(req, timeout=timeout) as r:
            return r.status, dict(r.headers), _parse(r.read(), r.headers)
    except urllib.error.HTTPError as e:
        return e.code, dict(e.headers), _parse(e.read(), e.headers)


def get(url: str, timeout: float = 30):
    try:
        with urllib.request.urlopen(url, timeout=timeout) as r:
            return r.status, dict(r.headers), _parse(r.read(), r.headers)
    except urllib.error.HTTPError as e:
        return e.code, dict(e.headers), _parse(e.read(), e.headers)


def _parse(raw: bytes, headers):
    ctype = headers.get("Content-Type", "")
    if "json" in ctype:
        return json.loads(raw)
    return raw.decode()


def sse_events(text: str) -> list:
    """The data payloads of an SSE body: parsed JSON objects, and the string "[DONE]"."""
    out = []
    for line in text.splitlines():
        if line.startswith("data:"):
            payload = line[5:].strip()
            out.append(payload if payload == "[DONE]" else json.loads(payload))
    return out
