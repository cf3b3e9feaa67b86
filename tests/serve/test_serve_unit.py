"""`tandem serve` without models: the plan (commands, ports, GPU placement, CPU defaults), the
demo model cache, process-tree plumbing, and the supervisor's restart / backoff / give-up / stop
logic driven with stand-in processes (tiny HTTP servers answering /ready)."""

from __future__ import annotations

import argparse
import os
import signal
import subprocess
import sys
import threading
import time
from dataclasses import dataclass

import pytest

from tandem.serve import config, procs, supervisor
from tandem.serve.config import ProcSpec, ServeConfig, router_spec, worker_specs
from tandem.serve.supervisor import LocalLauncher, Member, Supervisor


def cfg(**kw) -> ServeConfig:
    base = dict(model="/m", served_model_name="m", demo=False, prefill=2, decode=2, host="127.0.0.1",
                port=8000, grpc_port=50051, device="cpu", gpus=[], kv_transfer="tcp",
                policy="cache-aware", dtype="auto", num_kv_blocks=512, remote_prefill_threshold=None,
                drain_timeout=5.0, worker_port_base=0, extra={"router": [], "prefill": [], "decode": []})
    base.update(kw)
    return ServeConfig(**base)


def flag(argv: list[str], name: str) -> str | None:
    return argv[argv.index(name) + 1] if name in argv else None


def test_cpu_plan() -> None:
    specs = worker_specs(cfg(extra={"prefill": ["--max-batch-tokens", "64"], "decode": [], "router": []}))
    assert [s.name for s in specs] == ["prefill-0", "prefill-1", "decode-0", "decode-1"]
    ports = [p for s in specs for p in (s.grpc_port, s.http_port)]
    assert len(set(ports)) == len(ports)
    for s in specs:
        assert s.command()[1:4] == ["-m", "tandem", s.role]        # what `ps` shows
        assert flag(s.argv, "--device") == "cpu" and flag(s.argv, "--num-kv-blocks") == "512"
        assert flag(s.argv, "--kv-transfer") == "tcp" and s.gpu is None
        assert int(s.env["OMP_NUM_THREADS"]) >= 1
    assert flag(specs[0].argv, "--max-batch-tokens") == "64"
    assert "--max-batch-tokens" not in specs[2].argv
    r = router_spec(cfg(), ["a:1", "b:2"], ["c:3"])
    assert r.argv[0] == "router" and flag(r.argv, "--prefill") == "a:1,b:2"
    assert flag(r.argv, "--decode") == "c:3" and flag(r.argv, "--discovery") == "static"
    assert flag(r.argv, "--http-port") == "8000" and flag(r.argv, "--grpc-port") == "50051"
    assert "--prefill" not in router_spec(cfg(prefill=0), [], ["c:3"]).argv


def test_fixed_port_base() -> None:
    specs = worker_specs(cfg(worker_port_base=40000))
    assert [(s.grpc_port, s.http_port) for s in specs] == [(40000, 40001), (40002, 40003),
                                                           (40004, 40005), (40006, 40007)]


def test_gpu_placement_one_per_gpu_and_shared() -> None:
    specs = worker_specs(cfg(device="cuda", gpus=["0", "1", "2", "3"], num_kv_blocks=None))
    assert [s.env["CUDA_VISIBLE_DEVICES"] for s in specs] == ["0", "1", "2", "3"]
    assert all("--gpu-memory-utilization" not in s.argv and "--num-kv-blocks" not in s.argv
               for s in specs)
    shared = worker_specs(cfg(device="cuda", gpus=["4", "7"], num_kv_blocks=None))
    assert [s.gpu for s in shared] == ["4", "7", "4", "7"]
    assert all(float(flag(s.argv, "--gpu-memory-utilization")) < 0.5 for s in shared)
    assert router_spec(cfg(gpus=["0"]), [], ["c:3"]).env["CUDA_VISIBLE_DEVICES"] == ""


def test_detect_gpus_honours_cuda_visible_devices(monkeypatch) -> None:
    monkeypatch.setenv("CUDA_VISIBLE_DEVICES", "2,5")
    assert config.detect_gpus("auto") == ["2", "5"]
    assert config.detect_gpus("cpu") == []
    monkeypatch.setenv("CUDA_VISIBLE_DEVICES", "")
    assert config.detect_gpus("auto") == []
    with pytest.raises(SystemExit):
        config.detect_gpus("cuda")


def parse(*argv: str) -> argparse.Namespace:
    p = argparse.ArgumentParser()
    config.add_arguments(p)
    return p.parse_args(list(argv))


def test_resolve_demo_model_and_cpu_defaults(tmp_path, monkeypatch) -> None:
    monkeypatch.setenv("XDG_CACHE_HOME", str(tmp_path))
    monkeypatch.setenv("CUDA_VISIBLE_DEVICES", "")
    said: list[str] = []
    c = config.resolve(parse("--decode", "2", "--prefill-arg=--max-batch-tokens 32"), log=said.append)
    assert c.demo and c.served_model_name == "demo"
    assert c.model == str(tmp_path / "tandem" / "demo-model")
    assert os.path.exists(os.path.join(c.model, "config.json")) and said       # generated, with news
    assert c.device == "cpu" and c.num_kv_blocks == config.CPU_KV_BLOCKS
    assert c.kv_transfer in ("nixl", "tcp") and c.extra["prefill"] == ["--max-batch-tokens", "32"]
    said.clear()
    assert config.resolve(parse(), log=said.append).model == c.model and not said   # cached
    with pytest.raises(SystemExit):
        config.resolve(parse("--decode", "0"))
    with pytest.raises(SystemExit):
        config.resolve(parse("--model", str(tmp_path / "nowhere")))


def test_cli_help_is_registered() -> None:
    out = subprocess.run([sys.executable, "-m", "tandem", "serve", "--help"], capture_output=True,
                         text=True, timeout=60)
    assert out.returncode == 0
    text = " ".join(out.stdout.split())
    for word in ("--prefill", "--decode", "--launcher", "--kv-transfer", "--device", "demo model",
                 "--launcher ray --ray-address"):
        assert word in text


def test_backoff_grows_and_caps() -> None:
    assert [supervisor.backoff(n) for n in (1, 2, 3, 4)] == [1.0, 2.0, 4.0, 8.0]
    assert supervisor.backoff(50) == supervisor.BACKOFF_MAX_S


# ---- process plumbing ------------------------------------------------------------------------------

def test_descendants_and_leftover_kill(tmp_path) -> None:
    p = procs.spawn(["/bin/sh", "-c", "sleep 60 & sleep 60 & wait"], {}, str(tmp_path / "log"))
    deadline = time.monotonic() + 10
    while time.monotonic() < deadline:
        # the shell and its two sleeps (other tests may have left processes of their own)
        tree = [d for d in procs.descendants(os.getpid())
                if d.pid == p.pid or (procs._stat(d.pid) or (0,))[0] == p.pid]
        if len(tree) == 3:
            break
        time.sleep(0.05)
    assert len(tree) == 3 and all(d.alive() for d in tree)
    os.kill(p.pid, signal.SIGKILL)       # the shell dies; its sleeps are re-parented, not killed
    p.wait()
    sleeps = [d for d in tree if d.pid != p.pid]
    assert all(d.alive() for d in sleeps)
    assert {d.pid for d in procs.kill_leftovers(tree, grace=2)} == {d.pid for d in sleeps}
    assert not any(d.alive() for d in tree)


def test_child_dies_with_its_parent(tmp_path) -> None:
    """A supervisor killed with SIGKILL cannot clean up: the kernel kills its children."""
    pidfile = tmp_path / "pid"
    code = ("import sys, time; sys.path[:0] = %r; from tandem.serve import procs; "
            "p = procs.spawn(['/bin/sleep', '60'], {}, %r); open(%r, 'w').write(str(p.pid)); time.sleep(60)"
            % (sys.path, str(tmp_path / "log"), str(pidfile)))
    parent = subprocess.Popen([sys.executable, "-c", code])
    deadline = time.monotonic() + 20
    while not (pidfile.exists() and pidfile.read_text()) and time.monotonic() < deadline:
        time.sleep(0.05)
    child = procs.proc_id(int(pidfile.read_text()))
    time.sleep(0.3)                       # past the wrapper's exec
    assert child is not None and child.alive()
    parent.kill()
    parent.wait()
    deadline = time.monotonic() + 5
    while child.alive() and time.monotonic() < deadline:
        time.sleep(0.05)
    assert not child.alive()


# ---- the supervisor with stand-in processes ------------------------------------------------------------

# Answers GET /ready with 200; exits with code 3 after `life` seconds when life > 0.
STANDIN = """
import http.server, sys, threading, os
port, life = int(sys.argv[1]), float(sys.argv[2])
class H(http.server.BaseHTTPRequestHandler):
    def do_GET(self):
        self.send_response(200); self.end_headers(); self.wfile.write(b"ok")
    def log_message(self, *a): pass
if life > 0:
    threading.Timer(life, lambda: os._exit(3)).start()
http.server.HTTPServer(("127.0.0.1", port), H).serve_forever()
"""


@dataclass
class StandIn(ProcSpec):
    life: float = 0.0

    def command(self) -> list[str]:
        return [sys.executable, "-c", STANDIN, str(self.http_port), str(self.life)]


def make_sup(tmp_path, lives: dict[str, float], max_restarts: int = 2):
    out: list[str] = []
    sup = Supervisor(cfg(prefill=1, decode=1, max_restarts=max_restarts), LocalLauncher(),
                     str(tmp_path), status_file=str(tmp_path / "status.json"), out=out.append)
    for name, role in (("prefill-0", "prefill"), ("decode-0", "decode"), ("router", "router")):
        spec = StandIn(name=name, role=role, argv=[role], http_port=config.free_port(),
                       life=lives.get(name, 0.0))
        sup._start(Member(spec, str(tmp_path / f"{name}.log")))
    return sup, out


def test_supervisor_restarts_with_backoff_then_gives_up(tmp_path, monkeypatch) -> None:
    monkeypatch.setattr(supervisor, "BACKOFF_BASE_S", 0.1)
    # decode-0 dies 1.5 s after every start: restarted twice, then reported and left down, and
    # with no decode worker left the whole deployment ends (exit 1)
    sup, out = make_sup(tmp_path, {"decode-0": 1.5}, max_restarts=2)
    try:
        assert sup.wait_ready()
        rc = sup.supervise()
    finally:
        sup.shutdown()
    text = "\n".join(out)
    assert rc == 1
    dec = next(m for m in sup.members if m.name == "decode-0")
    assert dec.restarts == 2 and "exit code 3" in dec.last_exit
    assert "restarting in" in text and "keeps dying" in text and "every decode worker" in text
    assert all(m.state == "stopped" for m in sup.members if m.name != "decode-0")
    assert not [d for d in procs.descendants(os.getpid()) if d.alive()
                and "http.server" in open(f"/proc/{d.pid}/cmdline").read()]


def test_supervisor_restarts_a_killed_worker_and_stops_cleanly(tmp_path, monkeypatch) -> None:
    monkeypatch.setattr(supervisor, "BACKOFF_BASE_S", 0.1)
    sup, out = make_sup(tmp_path, {})
    assert sup.wait_ready()
    t = threading.Thread(target=sup.supervise)
    t.start()
    try:
        pre = next(m for m in sup.members if m.name == "prefill-0")
        old = pre.pid
        os.killpg(old, signal.SIGKILL)
        deadline = time.monotonic() + 15
        while not (pre.restarts == 1 and pre.state == "ready") and time.monotonic() < deadline:
            time.sleep(0.05)
        assert pre.restarts == 1 and pre.state == "ready" and pre.pid != old
        assert "prefill-0 is back (restart 1)" in "\n".join(out)
    finally:
        sup.stopping.set()
        t.join(10)
        sup.shutdown()
    assert "stopping router" in "\n".join(out)
    import json
    st = json.loads((tmp_path / "status.json").read_text())
    assert {p["name"]: p["state"] for p in st["processes"]} == {
        "prefill-0": "stopped", "decode-0": "stopped", "router": "stopped"}


def test_port_in_use_is_refused_before_anything_starts(tmp_path, monkeypatch) -> None:
    import socket
    monkeypatch.setenv("CUDA_VISIBLE_DEVICES", "")
    model = tmp_path / "m"
    model.mkdir()
    (model / "config.json").write_text("{}")
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        s.listen()
        busy = s.getsockname()[1]
        with pytest.raises(SystemExit, match="in use"):
            config.resolve(parse("--model", str(model), "--port", str(busy), "--kv-transfer", "tcp"))
