"""`tandem router`: one process serving the OpenAI-compatible HTTP API (plus /health, /ready,
/metrics, /openapi.json) and the gRPC ``tandem.v1.Router`` service, in front of the prefill and
decode pools.

Placement (replica discovery, prefix index, policies; the flags --policy, --discovery, --prefill,
--decode, ...) comes from router/placement.py's ``add_placement_arguments`` / ``build_placement``
where that module is installed, else from router/simple_placement.py (static endpoints,
round-robin / least-load). Start-up: tokenizer, placement (first health probe), HTTP, gRPC. On
SIGTERM: /ready and gRPC health go NOT_SERVING, in-flight requests get up to --drain-timeout to
finish, then the process exits.
"""

from __future__ import annotations

import argparse
import asyncio
import importlib
import inspect
import logging
import signal
from pathlib import Path

log = logging.getLogger("tandem.router")


def placement_module():
    """router/placement.py where it exists (the real placement), else the fallback."""
    try:
        return importlib.import_module("tandem.router.placement")
    except ModuleNotFoundError as e:
        if e.name != "tandem.router.placement":
            raise
        return importlib.import_module("tandem.router.simple_placement")


def add_arguments(p: argparse.ArgumentParser) -> None:
    g = p.add_argument_group("model")
    g.add_argument("--model", required=True, help="model directory (tokenizer, chat template, config)")
    g.add_argument("--served-model-name", default=None, help="model id clients use (default: dir name)")
    g = p.add_argument_group("server")
    g.add_argument("--host", default="0.0.0.0", help="address to listen on")
    g.add_argument("--http-port", type=int, default=8000, help="OpenAI API, /health, /ready, /metrics")
    g.add_argument("--grpc-port", type=int, default=50051, help="tandem.v1.Router, health, reflection")
    g.add_argument("--drain-timeout", type=float, default=30.0,
                   help="seconds in-flight requests may take to finish after SIGTERM")
    g = p.add_argument_group("admission and retries")
    g.add_argument("--max-in-flight", type=int, default=256,
                   help="requests sent to workers at once; more wait in the queue")
    g.add_argument("--max-queue", type=int, default=1024,
                   help="requests waiting for admission; beyond it: 429 with Retry-After")
    g.add_argument("--queue-timeout", type=float, default=30.0,
                   help="seconds a request may wait for admission; then: 503 with Retry-After")
    g.add_argument("--retries", type=int, default=3,
                   help="extra attempts on other replicas when a request fails before its first token")
    g.add_argument("--retry-backoff", type=float, default=0.05,
                   help="seconds before the first retry, doubled per retry (at most 1 s)")
    g.add_argument("--request-timeout", type=float, default=600.0,
                   help="seconds one attempt may take from dispatch to its last token")
    g.add_argument("--ignore-unknown-fields", action="store_true",
                   help="ignore unknown request fields (vLLM's behaviour) instead of answering 400 "
                        "(OpenAI's)")
    placement_module().add_placement_arguments(p)


async def _serve(args: argparse.Namespace) -> int:
    from aiohttp import web

    from tandem.engine.tokenizer import Tokenizer
    from tandem.router.frontend import Frontend, FrontendConfig
    from tandem.router.grpc_server import GRPCFront
    from tandem.router.http_server import HTTPFront

    args.served_model_name = args.served_model_name or Path(args.model).resolve().name
    model = args.served_model_name
    tok = Tokenizer(args.model)
    placement = placement_module().build_placement(args)
    if inspect.isawaitable(placement):
        placement = await placement
    fe = Frontend(FrontendConfig(
        model=model, model_dir=args.model, max_in_flight=args.max_in_flight, max_queue=args.max_queue,
        queue_timeout=args.queue_timeout, retries=args.retries, retry_backoff=args.retry_backoff,
        request_timeout=args.request_timeout), placement)
    stop = asyncio.Event()
    loop = asyncio.get_running_loop()
    for sig in (signal.SIGTERM, signal.SIGINT):
        loop.add_signal_handler(sig, stop.set)

    http = HTTPFront(fe, tok, model, args.model, args.ignore_unknown_fields)
    runner = web.AppRunner(http.app(), access_log=None, handler_cancellation=True)
    await runner.setup()
    await web.TCPSite(runner, args.host, args.http_port).start()
    await fe.start()
    grpc_front = GRPCFront(fe, tok, model, args.host, args.grpc_port)
    await grpc_front.start()
    log.info("router for %r ready: HTTP :%d, gRPC :%d, policy %s, context %d tokens", model,
             args.http_port, grpc_front.port, placement.policy, fe.max_model_len)
    print(f"[tandem] router ready on HTTP port {args.http_port}, gRPC port {grpc_front.port}", flush=True)
    await stop.wait()

    log.info("draining: %d requests in flight", fe.admission.active)
    fe.draining = True
    await grpc_front.set_serving(False)
    deadline = loop.time() + args.drain_timeout
    while fe.admission.active and loop.time() < deadline:
        await asyncio.sleep(0.05)
    await grpc_front.stop(grace=1.0)
    await runner.cleanup()
    await fe.stop()
    return 0


def run(args: argparse.Namespace) -> int:
    try:
        import uvloop
        uvloop.install()
    except ImportError:
        pass
    return asyncio.run(_serve(args))
