"""What every worker process (prefill, decode) shares: command-line flags, model + KV-transfer
start-up, the gRPC server with health and reflection, the HTTP side (/health, /ready, /metrics)
and graceful shutdown.

Start-up order: HTTP first (so /health answers while the model loads), then the engine (on a
thread: loading can take minutes), the KV-transfer engine over its KV tensor, the engine thread,
and last the gRPC server, whose health turns SERVING with /ready. On SIGTERM the worker drains:
/ready and gRPC health go NOT_SERVING, new requests get UNAVAILABLE, in-flight ones finish (up to
--drain-timeout), then the process exits.
"""

from __future__ import annotations

import argparse
import asyncio
import logging
import queue
import signal
import socket
import uuid

import grpc
from aiohttp import web
from grpc_health.v1 import health, health_pb2, health_pb2_grpc
from grpc_reflection.v1alpha import reflection
from prometheus_client import CONTENT_TYPE_LATEST, generate_latest

from tandem.engine.args import add_engine_arguments, engine_config_from_args
from tandem.engine.async_engine import EngineThread
from tandem.engine.engine import LLMEngine
from tandem.engine.hashing import HASH_VERSION
from tandem.proto import worker_pb2 as pb

log = logging.getLogger("tandem.worker")


def add_worker_arguments(p: argparse.ArgumentParser, role: str) -> None:
    add_engine_arguments(p)
    g = p.add_argument_group("server")
    g.add_argument("--host", default="0.0.0.0", help="address to listen on")
    g.add_argument("--grpc-port", type=int, default=50061, help="gRPC port (worker service)")
    g.add_argument("--http-port", type=int, default=8081, help="HTTP port: /health, /ready, /metrics")
    g.add_argument("--advertise-host", default=None,
                   help="address peers reach this worker at (default: hostname's address; "
                        "in Kubernetes the pod IP)")
    g.add_argument("--worker-id", default=None, help="unique id (default: role-host-port-random)")
    g.add_argument("--drain-timeout", type=float, default=30.0,
                   help="seconds to let in-flight requests finish after SIGTERM")
    g.add_argument("--tensor-parallel-size", type=int, default=1, help="only 1 is supported")
    k = p.add_argument_group("KV transfer")
    k.add_argument("--kv-transfer", choices=["nixl", "tcp"], default="nixl",
                   help="nixl: one-sided writes over UCX (RDMA/NVLink/shared memory); "
                        "tcp: streaming fallback without nixl")
    k.add_argument("--kv-transfer-port", type=int, default=0,
                   help="tcp backend listener port (0: any free port)")
    k.add_argument("--transfer-timeout", type=float, default=30.0,
                   help="seconds a started KV transfer may take before it fails")
    k.add_argument("--bootstrap-timeout", type=float, default=60.0,
                   help="seconds a reserved transfer may wait for its first data")


def default_advertise_host() -> str:
    try:
        return socket.gethostbyname(socket.gethostname())
    except OSError:
        return "127.0.0.1"


class Worker:
    """Base of the prefill and decode servers: subclasses add their gRPC servicer."""

    role = "worker"

    def __init__(self, args: argparse.Namespace):
        if args.tensor_parallel_size != 1:
            raise SystemExit("--tensor-parallel-size > 1 is not supported yet; run one GPU per worker")
        self.args = args
        self.advertise = args.advertise_host or default_advertise_host()
        self.worker_id = args.worker_id or f"{self.role}-{socket.gethostname()}-{args.grpc_port}-{uuid.uuid4().hex[:6]}"
        self.engine: LLMEngine | None = None
        self.thread: EngineThread | None = None
        self.kv = None
        self.ready = False
        self.draining = False
        self.in_flight = 0
        self.health = health.aio.HealthServicer() if hasattr(health, "aio") else health.HealthServicer()
        self._stop = asyncio.Event()

    # ---- subclass interface ------------------------------------------------------------------------
    def add_servicer(self, server) -> list[str]:
        raise NotImplementedError

    def setup(self) -> None:
        """Called on the engine thread's owner after the engine and KV engine exist."""

    # ---- lifecycle ---------------------------------------------------------------------------------
    async def run(self) -> int:
        loop = asyncio.get_running_loop()
        for sig in (signal.SIGTERM, signal.SIGINT):
            loop.add_signal_handler(sig, self._stop.set)
        http = await self._start_http()
        cfg = engine_config_from_args(self.args, role=self.role)
        log.info("%s %s: loading %s", self.role, self.worker_id, cfg.model)
        self.engine = await loop.run_in_executor(None, LLMEngine, cfg)
        from tandem.kvtransfer import TransferConfig, create_engine
        tcfg = TransferConfig(model=cfg.model_name, transfer_timeout_s=self.args.transfer_timeout,
                              bootstrap_timeout_s=self.args.bootstrap_timeout)
        kw = ({"host": self.args.host, "port": self.args.kv_transfer_port, "advertise_host": self.advertise}
              if self.args.kv_transfer == "tcp" else {})
        self.kv = create_engine(self.args.kv_transfer, self.engine.runner.kv_cache, name=self.worker_id,
                                config=tcfg, **kw)
        self.thread = EngineThread(self.engine, loop)
        self.setup()
        self.thread.start()
        server = grpc.aio.server(options=[("grpc.max_receive_message_length", 64 << 20),
                                          ("grpc.max_send_message_length", 64 << 20)])
        names = self.add_servicer(server)
        health_pb2_grpc.add_HealthServicer_to_server(self.health, server)
        reflection.enable_server_reflection(names + [health.SERVICE_NAME, reflection.SERVICE_NAME], server)
        port = server.add_insecure_port(f"{self.args.host}:{self.args.grpc_port}")
        await server.start()
        self.ready = True
        await self._set_health(health_pb2.HealthCheckResponse.SERVING)
        log.info("%s %s ready: gRPC %s:%d, HTTP :%d, KV transfer %s", self.role, self.worker_id,
                 self.advertise, port, self.args.http_port, self.args.kv_transfer)
        print(f"[tandem] {self.role} ready on gRPC port {port}", flush=True)
        await self._stop.wait()
        await self._drain()
        await server.stop(grace=1.0)
        self.thread.stop()
        self.kv.close()
        await http.cleanup()
        log.info("%s %s stopped", self.role, self.worker_id)
        return 0

    async def _drain(self) -> None:
        self.draining, self.ready = True, False
        await self._set_health(health_pb2.HealthCheckResponse.NOT_SERVING)
        deadline = asyncio.get_running_loop().time() + self.args.drain_timeout
        while self.in_flight and asyncio.get_running_loop().time() < deadline:
            await asyncio.sleep(0.05)
        if self.in_flight:
            log.warning("drain timeout: %d requests still in flight are aborted", self.in_flight)

    async def _set_health(self, status) -> None:
        for name in ("", *self.service_names()):
            res = self.health.set(name, status)
            if asyncio.iscoroutine(res):
                await res

    def service_names(self) -> list[str]:
        return []

    async def _start_http(self) -> web.AppRunner:
        app = web.Application()

        async def healthz(_):
            ok = self.thread is None or self.thread.alive
            return web.json_response({"status": "ok" if ok else "engine-dead"}, status=200 if ok else 500)

        async def readyz(_):
            ok = self.ready and not self.draining and self.thread is not None and self.thread.alive
            return web.json_response({"ready": ok, "role": self.role, "worker_id": self.worker_id},
                                     status=200 if ok else 503)

        async def metrics(_):
            return web.Response(body=generate_latest(), headers={"Content-Type": CONTENT_TYPE_LATEST})

        app.router.add_get("/health", healthz)
        app.router.add_get("/ready", readyz)
        app.router.add_get("/metrics", metrics)
        runner = web.AppRunner(app, access_log=None)
        await runner.setup()
        await web.TCPSite(runner, self.args.host, self.args.http_port).start()
        return runner

    # ---- shared RPC pieces ---------------------------------------------------------------------------
    def info(self) -> pb.WorkerInfo:
        e = self.engine
        layout = pb.KVLayout()
        if e is not None:
            mc = e.model_config
            layout = pb.KVLayout(num_layers=mc.num_layers, num_blocks=e.pool.num_blocks,
                                 block_size=e.pool.block_size, num_kv_heads=mc.num_kv_heads,
                                 head_dim=mc.head_dim, dtype=str(mc.dtype).replace("torch.", ""))
        sch = e.scheduler if e else None
        return pb.WorkerInfo(
            version=pb.PROTOCOL_VERSION_1, worker_id=self.worker_id, role=self.role,
            model=e.config.model_name if e else "", layout=layout, kv_backend=self.args.kv_transfer,
            max_model_len=e.max_model_len if e else 0, hash_version=HASH_VERSION,
            free_blocks=e.pool.num_free if e else 0, total_blocks=e.pool.usable_blocks if e else 0,
            running=len(sch.running) if sch else 0, waiting=len(sch.waiting) if sch else 0,
            queued_prompt_tokens=sch.queued_prompt_tokens if sch else 0,
            ready=self.ready and not self.draining)

    async def kv_events(self, request, context):
        from tandem.proto.convert import check_version, events_to_proto
        await check_version(request.version, context)
        q = self.engine.events.subscribe()
        loop = asyncio.get_running_loop()
        def get():
            try:
                return q.get(timeout=1.0)
            except queue.Empty:
                return ...       # no news; lets a cancelled stream notice within a second

        try:
            while True:
                batch = await loop.run_in_executor(None, get)
                if batch is ...:
                    continue
                if batch is None:     # fell behind: the client resubscribes and gets a snapshot
                    return
                yield events_to_proto(batch, self.worker_id)
        finally:
            self.engine.events.unsubscribe(q)


def run_worker(cls, args: argparse.Namespace) -> int:
    try:
        import uvloop
        uvloop.install()
    except ImportError:
        pass
    return asyncio.run(cls(args).run())
