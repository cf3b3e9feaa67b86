"""`tandem serve` end to end, once with local processes and once with Ray actors: 1 prefill and
2 decode workers behind the router on the tiny model, CPU, KV over tcp. The caller is the official
`openai` client.

In order, against one deployment per launcher (tests share it; the last one stops it):
completions and chat, streamed and not -> 64 concurrent requests -> malformed and oversized
requests (4xx with OpenAI's error JSON) -> the prefill worker SIGKILLed mid-load -> a decode worker
SIGKILLed mid-load (a request that had received nothing yet must succeed; one already streaming
may end with a clean error; the supervisor restarts the worker) -> every component's /metrics
covers what the dashboards query -> SIGTERM/SIGINT to `tandem serve` leaves no process behind.
"""

from __future__ import annotations

import asyncio
import json
import os
import signal
import time

import urllib.error
import urllib.request

import openai
import psutil
import pytest

from serve_harness import ServeRun, nixl_missing, ray_missing, router_missing

pytestmark = [pytest.mark.slow, pytest.mark.skipif(router_missing() is not None,
                                                   reason=router_missing() or "")]

LAUNCHERS = ["local", pytest.param("ray", marks=pytest.mark.skipif(
    ray_missing() is not None, reason=ray_missing() or ""))]
# Long enough to go to the prefill worker (threshold below) and to be mid-flight when killed.
LONG_PROMPT = " ".join(f"word{i}" for i in range(120))


@pytest.fixture(scope="module", params=LAUNCHERS)
def serve(request, tiny_model, tmp_path_factory):
    run = ServeRun(tiny_model, str(tmp_path_factory.mktemp(f"serve-{request.param}")),
                   launcher=request.param, prefill=1, decode=2, kv="tcp",
                   # every prompt of 8+ uncached tokens is prefilled remotely
                   extra=("--remote-prefill-threshold", "8"))
    try:
        yield run.wait_ready()
    finally:
        run.force_cleanup()


def client(serve: ServeRun) -> openai.OpenAI:
    return openai.OpenAI(base_url=serve.base_url, api_key="unused", max_retries=0, timeout=60)


def aclient(serve: ServeRun) -> openai.AsyncOpenAI:
    return openai.AsyncOpenAI(base_url=serve.base_url, api_key="unused", max_retries=0, timeout=90)


def test_banner_and_roles(serve):
    out = serve.output()
    assert f"OpenAI base URL: {serve.base_url}" in out and "curl " in out
    st = serve.status()
    assert sorted(p["name"] for p in st["processes"]) == ["decode-0", "decode-1", "prefill-0", "router"]
    for p in st["processes"]:
        # each process runs the role's own command, so `ps` shows it
        cmd = psutil.Process(p["pid"]).cmdline()
        assert cmd[1:4] == ["-m", "tandem", p["role"]], cmd
        assert p["state"] == "ready"


def test_completions_and_chat(serve):
    c = client(serve)
    assert [m.id for m in c.models.list().data] == ["tiny"]
    r = c.completions.create(model="tiny", prompt=LONG_PROMPT, max_tokens=8, temperature=0)
    assert r.choices[0].finish_reason == "length" and r.usage.completion_tokens == 8
    assert r.choices[0].text
    chunks = list(c.completions.create(model="tiny", prompt=LONG_PROMPT, max_tokens=8, temperature=0,
                                       stream=True))
    assert "".join(ch.choices[0].text for ch in chunks if ch.choices) == r.choices[0].text
    msgs = [{"role": "system", "content": "You are terse."}, {"role": "user", "content": "Hello!"}]
    cr = c.chat.completions.create(model="tiny", messages=msgs, max_tokens=6, temperature=0)
    assert cr.choices[0].message.role == "assistant" and cr.usage.completion_tokens == 6
    streamed = [ch for ch in c.chat.completions.create(model="tiny", messages=msgs, max_tokens=6,
                                                       temperature=0, stream=True)]
    text = "".join(ch.choices[0].delta.content or "" for ch in streamed if ch.choices)
    assert text == cr.choices[0].message.content
    assert streamed[-1].choices[0].finish_reason == "length"


def test_64_concurrent_requests(serve):
    async def main():
        c = aclient(serve)

        async def one(i: int):
            prompt = f"request {i}: " + LONG_PROMPT[: 40 + 7 * i]
            if i % 2:
                s = await c.completions.create(model="tiny", prompt=prompt, max_tokens=6, stream=True)
                return [ch async for ch in s][-1].choices[0].finish_reason
            r = await c.completions.create(model="tiny", prompt=prompt, max_tokens=6)
            return r.choices[0].finish_reason

        try:
            return await asyncio.gather(*(one(i) for i in range(64)))
        finally:
            await c.close()

    t0 = time.monotonic()
    reasons = asyncio.run(main())
    # random weights may sample the end-of-text token: "stop" is a finish as good as "length"
    assert len(reasons) == 64 and set(reasons) <= {"length", "stop"}, reasons
    assert time.monotonic() - t0 < 60


def test_malformed_and_oversized_requests(serve):
    c = client(serve)
    cases = [
        lambda: c.completions.create(model="no-such-model", prompt="hi", max_tokens=2),
        lambda: c.completions.create(model="tiny", prompt="hi", max_tokens=-1),
        lambda: c.completions.create(model="tiny", prompt="hi", max_tokens=2, temperature="hot"),
        lambda: c.chat.completions.create(model="tiny", messages=[], max_tokens=2),
        # oversized: more tokens than the model's 4096-token context
        lambda: c.completions.create(model="tiny", prompt="hello " * 5000, max_tokens=2),
        lambda: c.completions.create(model="tiny", prompt="hi", max_tokens=100_000),
    ]
    for i, call in enumerate(cases):
        with pytest.raises(openai.APIStatusError) as ei:
            call()
        e = ei.value
        assert 400 <= e.status_code < 500, (i, e.status_code, e.body)
        assert isinstance(e.body, dict) and e.body.get("message"), (i, e.body)   # {"error": {...}}
        assert e.response.json()["error"]["type"], (i, e.response.text)
    for body in (b"{not json", b"[]", b'{"model": "tiny"}'):
        req = urllib.request.Request(serve.base_url + "/completions", data=body,
                                     headers={"Content-Type": "application/json"})
        with pytest.raises(urllib.error.HTTPError) as ei:
            urllib.request.urlopen(req, timeout=30)
        err = json.loads(ei.value.read())
        assert 400 <= ei.value.code < 500 and err["error"]["message"], (body, err)
    # the deployment still serves
    assert c.completions.create(model="tiny", prompt="still there?", max_tokens=2).usage.completion_tokens == 2


def _load_with_kill(serve: ServeRun, victim: str, n: int = 24, max_tokens: int = 48) -> list[dict]:
    """n requests (half streamed) at once; SIGKILL `victim` once some have started streaming.
    Returns, per request: streamed?, chunks received, the error (or None)."""

    async def main():
        c = aclient(serve)
        started = asyncio.Event()
        results: list[dict] = []

        async def one(i: int):
            res = {"stream": i % 2 == 1, "chunks": 0, "error": None}
            results.append(res)
            prompt = f"{i} " + LONG_PROMPT
            try:
                if res["stream"]:
                    s = await c.completions.create(model="tiny", prompt=prompt, max_tokens=max_tokens,
                                                   stream=True, temperature=0.7, seed=i)
                    async for ch in s:
                        res["chunks"] += 1
                        if res["chunks"] == 2:
                            started.set()
                    res["finish"] = ch.choices[0].finish_reason if ch.choices else None
                else:
                    r = await c.completions.create(model="tiny", prompt=prompt, max_tokens=max_tokens,
                                                   temperature=0.7, seed=i)
                    res["finish"] = r.choices[0].finish_reason
            except Exception as e:  # noqa: BLE001 - classified by the caller
                res["error"] = e

        tasks = [asyncio.create_task(one(i)) for i in range(n)]
        await asyncio.wait_for(started.wait(), 60)
        serve.kill_worker(victim)
        await asyncio.gather(*tasks)
        await c.close()
        return results

    return asyncio.run(main())


def _check_outcomes(results: list[dict], victim: str) -> None:
    for r in results:
        e = r["error"]
        if e is None:
            assert r["finish"] in ("length", "stop"), r
            continue
        # a clean error: an OpenAI error object (status or stream error event), never a hang,
        # a reset connection or a truncated stream without a reason
        assert isinstance(e, openai.APIError) and not isinstance(e, openai.APIConnectionError), repr(e)
        if r["stream"]:
            assert r["chunks"] > 0, f"a request that had not started streaming was lost ({victim}): {e!r}"
        else:
            assert isinstance(e, openai.APIStatusError) and e.status_code >= 500, repr(e)


def test_prefill_killed_mid_load(serve):
    old = serve.proc("prefill-0")["pid"]
    results = _load_with_kill(serve, "prefill-0")
    _check_outcomes(results, "prefill-0")
    # the prefill worker only works before the first token: nothing may fail, the router retries
    # (on a decode worker prefilling itself) whatever had not got its first token
    assert [r for r in results if r["error"]] == []
    p = serve.wait_restarted("prefill-0", 1)
    assert p["pid"] != old
    assert "restarting prefill-0" in serve.output() or "prefill-0 was restarted" in serve.output()
    serve.wait_router_healthy("prefill-0")
    # and prefill traffic flows through the restarted worker again
    c = client(serve)
    before = _metric_sum(serve.scrape("prefill-0"), "tandem_engine_prompt_tokens_total")
    for i in range(3):
        c.completions.create(model="tiny", prompt=f"again {i} " + LONG_PROMPT, max_tokens=2)
    assert _metric_sum(serve.scrape("prefill-0"), "tandem_engine_prompt_tokens_total") > before


def test_decode_killed_mid_load(serve):
    results = _load_with_kill(serve, "decode-0")
    _check_outcomes(results, "decode-0")
    ok = [r for r in results if r["error"] is None]
    assert len(ok) >= len(results) // 3, "the surviving decode worker should serve most requests"
    serve.wait_restarted("decode-0", 1)
    serve.wait_router_healthy("decode-0")
    c = client(serve)
    for i in range(4):       # both decode workers answer again (round-robin or load-balanced)
        assert c.completions.create(model="tiny", prompt=f"{i} hi", max_tokens=2).usage.completion_tokens == 2


def _metric_sum(text: str, name: str) -> float:
    total = 0.0
    for line in text.splitlines():
        if line.startswith(name) and line[len(name)] in " {":
            total += float(line.rsplit(" ", 1)[1])
    return total


def _dashboard_check():
    """tests/charts' dashboard metric extraction (PromQL parsed, not pattern-matched)."""
    import importlib.util
    path = os.path.join(os.path.dirname(__file__), "..", "tests", "charts", "test_chart_dashboards.py")
    spec = importlib.util.spec_from_file_location("chart_dashboards", path)
    mod = importlib.util.module_from_spec(spec)
    try:
        spec.loader.exec_module(mod)
    except ImportError as e:
        pytest.skip(f"dashboard check needs {e.name} (installed by make test)")
    return mod


def exported_names(text: str) -> dict[str, str]:
    """Metric names a /metrics page really serves: declared (# TYPE) and with a sample, as base
    names (counters with _total). A metric declared but never updated has no sample and does not
    count: a dashboard panel over it would stay empty."""
    types: dict[str, str] = {}
    sampled: set[str] = set()
    for line in text.splitlines():
        parts = line.split()
        if line.startswith("# TYPE") and len(parts) == 4:
            types[parts[2]] = parts[3]
        elif line and not line.startswith("#"):
            sampled.add(line.split("{")[0].split(" ")[0])
    out = {}
    for name, mtype in types.items():
        if mtype == "counter" and not name.endswith("_total"):
            name += "_total"       # the text format's TYPE line may name the counter either way
        series = name + "_bucket" if mtype == "histogram" else name
        if series in sampled:
            out[name] = mtype
    return out


def test_metrics_cover_the_dashboards(serve):
    """Every metric a dashboard panel queries is served, with samples, by some running component
    (router or worker) after the traffic of the tests above (kills included)."""
    mod = _dashboard_check()
    c = client(serve)
    for i in range(3):     # a repeated prefix: prefix-cache hits and matched tokens
        c.completions.create(model="tiny", prompt=LONG_PROMPT + f" {i}", max_tokens=3)
    known: dict[str, str] = {}
    per_component = {}
    for name in serve.metrics_urls():
        names = exported_names(serve.scrape(name))
        per_component[name] = names
        known.update(names)
    assert any(n.startswith("tandem_router_") for n in per_component["router"])
    assert any(n.startswith("tandem_engine_") for n in per_component["decode-0"])
    missing = {}
    for path in mod.DASHBOARDS:
        with open(path) as f:
            board = json.load(f)
        for title, expr in mod.exprs(board):
            for n in mod.unknown_metrics(mod.metric_names(expr), known):
                missing.setdefault(n, []).append(f"{os.path.basename(path)} / {title}")
    assert not missing, "queried by dashboards but not served with samples: " + repr(missing)


def test_shutdown_leaves_no_process(serve):
    sig = signal.SIGINT if serve.launcher == "ray" else signal.SIGTERM   # Ctrl-C, or `kill`
    root = psutil.Process(serve.p.pid)
    tree = root.children(recursive=True)
    assert len(tree) >= 4
    t0 = time.monotonic()
    rc = serve.stop(sig, timeout=90)
    assert rc == 0, serve.output()[-3000:]
    assert time.monotonic() - t0 < 60
    time.sleep(0.5)
    alive = []
    for p in tree:
        try:
            if p.is_running() and p.status() != psutil.STATUS_ZOMBIE:
                alive.append(f"{p.pid} {' '.join(p.cmdline())[:120]}")
        except psutil.NoSuchProcess:
            pass
    assert not alive, "left behind:\n" + "\n".join(alive)
    assert "[serve] stopped" in serve.output()


@pytest.mark.skipif(nixl_missing() is not None, reason=f"nixl unavailable: {nixl_missing()}")
def test_nixl_deployment(tiny_model, tmp_path):
    """The same deployment with KV moved by nixl (DRAM over UCX): requests go through the prefill
    worker, bytes are counted on the nixl backend, and shutdown is clean."""
    run = ServeRun(tiny_model, str(tmp_path), launcher="local", prefill=1, decode=1, kv="nixl",
                   extra=("--remote-prefill-threshold", "8"))
    try:
        run.wait_ready()
        # the router serves as soon as a decode replica is healthy; wait for the prefill one too,
        # or the first request is (correctly) prefilled on the decode worker
        run.wait_router_healthy("prefill-0")
        c = client(run)
        r = c.completions.create(model="tiny", prompt=LONG_PROMPT, max_tokens=6)
        assert r.usage.completion_tokens == 6
        s = list(c.chat.completions.create(model="tiny", messages=[{"role": "user", "content": LONG_PROMPT}],
                                           max_tokens=4, stream=True))
        assert s[-1].choices[0].finish_reason == "length"
        sent = [line for line in run.scrape("prefill-0").splitlines()
                if line.startswith("tandem_kv_transfer_bytes_total") and 'backend="nixl"' in line]
        assert sent and float(sent[0].rsplit(" ", 1)[1]) > 0
        tree = psutil.Process(run.p.pid).children(recursive=True)
        assert run.stop(signal.SIGTERM) == 0
        assert not [p for p in tree if p.is_running() and p.status() != psutil.STATUS_ZOMBIE]
    finally:
        run.force_cleanup()
