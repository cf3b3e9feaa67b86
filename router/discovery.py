"""Replica discovery: where the prefill and decode workers are, kept current without a restart.

A `Discovery` holds the current endpoint set (``host:port`` of each worker's gRPC server) per pool
and calls its subscribers with ``(pool, endpoints)`` whenever a set changes; `ReplicaPlacement`
subscribes and starts/stops replica monitors accordingly. Health is not discovery's business:
an endpoint that is listed but failing its Info polls stays listed and is marked unhealthy by
placement.

Sources:
  * `StaticDiscovery`: fixed lists (``--prefill h:p,h:p --decode h:p``); `set()` changes them.
  * `DnsDiscovery`: ``--prefill-dns name:port`` (a headless Service: one A record per ready pod),
    re-resolved every ``interval`` seconds. A failed lookup keeps the last set (a DNS blip must
    not empty the pool; dead replicas fail their health checks anyway). The resolver is
    injectable for tests.
  * `KubernetesDiscovery`: list + watch of EndpointSlices by label selector in one namespace (the
    operator labels each pool's headless Service, and slices inherit the labels). One thread per
    pool runs the (synchronous) kubernetes client; updates are handed to the asyncio loop. Only
    endpoints whose ``conditions.ready`` is not false count. A watch that ends or fails relists.
"""

from __future__ import annotations

import asyncio
import contextlib
import inspect
import json
import logging
import socket
import threading
from typing import Awaitable, Callable, Iterable

log = logging.getLogger("tandem.router.discovery")

POOLS = ("prefill", "decode")
Callback = Callable[[str, "set[str]"], None]


def parse_endpoints(spec: str | Iterable[str] | None) -> set[str]:
    """``"a:1,b:2"`` or a list of such strings -> {"a:1", "b:2"}."""
    if not spec:
        return set()
    items = spec.split(",") if isinstance(spec, str) else [x for s in spec for x in s.split(",")]
    out = set()
    for item in (i.strip() for i in items):
        if not item:
            continue
        host, sep, port = item.rpartition(":")
        if not sep or not host or not port.isdigit():
            raise ValueError(f"endpoint {item!r} is not host:port")
        out.add(item)
    return out


def _join(host: str, port: int) -> str:
    return f"[{host}]:{port}" if ":" in host else f"{host}:{port}"


class Discovery:
    """Current endpoints per pool plus change callbacks. Subclasses call `_publish`."""

    def __init__(self) -> None:
        self._current: dict[str, set[str]] = {p: set() for p in POOLS}
        self._callbacks: list[Callback] = []

    def current(self, pool: str) -> set[str]:
        return set(self._current[pool])

    def subscribe(self, callback: Callback) -> None:
        self._callbacks.append(callback)

    def _publish(self, pool: str, endpoints: set[str]) -> None:
        if endpoints == self._current[pool]:
            return
        added, gone = endpoints - self._current[pool], self._current[pool] - endpoints
        log.info("%s pool: %d replicas (+%s -%s)", pool, len(endpoints), sorted(added), sorted(gone))
        self._current[pool] = set(endpoints)
        for cb in list(self._callbacks):
            cb(pool, set(endpoints))

    async def start(self) -> None:
        pass

    async def stop(self) -> None:
        pass


class StaticDiscovery(Discovery):
    def __init__(self, prefill: str | Iterable[str] | None = None, decode: str | Iterable[str] | None = None):
        super().__init__()
        self._current = {"prefill": parse_endpoints(prefill), "decode": parse_endpoints(decode)}

    def set(self, pool: str, endpoints: str | Iterable[str]) -> None:
        self._publish(pool, parse_endpoints(endpoints))


Resolver = Callable[[str], "list[str] | Awaitable[list[str]]"]


class DnsDiscovery(Discovery):
    def __init__(self, prefill: str | None = None, decode: str | None = None, interval: float = 5.0,
                 resolver: Resolver | None = None):
        super().__init__()
        self.names: dict[str, tuple[str, int]] = {}
        for pool, spec in (("prefill", prefill), ("decode", decode)):
            if spec:
                host, sep, port = spec.rpartition(":")
                if not sep or not port.isdigit():
                    raise ValueError(f"--{pool}-dns {spec!r} is not name:port")
                self.names[pool] = (host, int(port))
        self.interval = interval
        self.resolver = resolver or self._getaddrinfo
        self._task: asyncio.Task | None = None

    @staticmethod
    async def _getaddrinfo(host: str) -> list[str]:
        infos = await asyncio.get_running_loop().getaddrinfo(host, None, type=socket.SOCK_STREAM)
        return sorted({i[4][0] for i in infos})

    async def resolve_once(self) -> None:
        for pool, (host, port) in self.names.items():
            try:
                addrs = self.resolver(host)
                if inspect.isawaitable(addrs):
                    addrs = await addrs
            except Exception as e:      # keep the last set: see module docstring
                log.warning("resolving %s for the %s pool failed (%s); keeping %d replicas",
                            host, pool, e, len(self._current[pool]))
                continue
            self._publish(pool, {_join(a, port) for a in addrs})

    async def start(self) -> None:
        await self.resolve_once()
        self._task = asyncio.create_task(self._loop(), name="dns-discovery")

    async def _loop(self) -> None:
        while True:
            await asyncio.sleep(self.interval)
            await self.resolve_once()

    async def stop(self) -> None:
        if self._task is not None:
            self._task.cancel()
            with contextlib.suppress(asyncio.CancelledError):
                await self._task
            self._task = None


def selector_matches(selector: str, labels: dict[str, str]) -> bool:
    """Equality-based label selector (``k=v``, ``k==v``, ``k!=v``, ``k``, ``!k``), checked here as
    well as by the API server (some test servers ignore it)."""
    for term in (t.strip() for t in (selector or "").split(",")):
        if not term:
            continue
        if "!=" in term:
            k, v = term.split("!=", 1)
            if labels.get(k.strip()) == v.strip():
                return False
        elif "=" in term:
            k, v = term.replace("==", "=").split("=", 1)
            if labels.get(k.strip()) != v.strip():
                return False
        elif term.startswith("!"):
            if term[1:].strip() in labels:
                return False
        elif term not in labels:
            return False
    return True


def slice_endpoints(obj: dict, default_port: int) -> set[str]:
    """Ready endpoints of one EndpointSlice (a dict as the API sends it): its port named "grpc",
    else its only port, else ``default_port`` (--worker-grpc-port)."""
    ports = obj.get("ports") or []
    port = next((p.get("port") for p in ports if p.get("name") == "grpc" and p.get("port")), None)
    if port is None and len(ports) == 1 and ports[0].get("port"):
        port = ports[0]["port"]
    port = port or default_port
    out = set()
    for ep in obj.get("endpoints") or []:
        if (ep.get("conditions") or {}).get("ready") is False:   # unset means ready
            continue
        for addr in ep.get("addresses") or []:
            out.add(_join(addr, port))
    return out


class KubernetesDiscovery(Discovery):
    def __init__(self, namespace: str, selectors: dict[str, str], port: int = 50061,
                 kubeconfig: str | None = None, watch_timeout: float = 60.0):
        super().__init__()
        self.namespace = namespace
        self.selectors = {p: s for p, s in selectors.items() if s}
        self.port = port
        self.kubeconfig = kubeconfig
        self.watch_timeout = watch_timeout
        self._stop = threading.Event()
        self._threads: list[threading.Thread] = []
        self._loop: asyncio.AbstractEventLoop | None = None
        self._api = None
        self._ready: dict[str, asyncio.Event] = {}
        self._watches: dict[str, object] = {}

    def _client(self):
        from kubernetes import client, config
        cfg = client.Configuration()
        try:
            config.load_incluster_config(client_configuration=cfg)
        except config.ConfigException:
            config.load_kube_config(config_file=self.kubeconfig, client_configuration=cfg)
        return client.ApiClient(cfg)

    async def start(self) -> None:
        self._loop = asyncio.get_running_loop()
        self._api = await asyncio.to_thread(self._client)
        for pool, sel in self.selectors.items():
            self._ready[pool] = asyncio.Event()
            t = threading.Thread(target=self._run, args=(pool, sel), name=f"k8s-discovery-{pool}", daemon=True)
            self._threads.append(t)
            t.start()
        # the first listing of every pool, so the router starts with its replicas known
        with contextlib.suppress(asyncio.TimeoutError):
            await asyncio.wait_for(asyncio.gather(*(e.wait() for e in self._ready.values())), 10)

    async def stop(self) -> None:
        self._stop.set()
        for w in list(self._watches.values()):
            # unblock a watch waiting for its next event: close its connection under it
            w.stop()
            resp = getattr(w, "_resp", None)
            if resp is not None:
                with contextlib.suppress(Exception):
                    resp.shutdown() if hasattr(resp, "shutdown") else resp.close()
        for t in self._threads:
            await asyncio.to_thread(t.join, 2.0)
        self._threads = []
        if self._api is not None:
            with contextlib.suppress(Exception):
                self._api.close()

    def _hand_over(self, pool: str, slices: dict[str, set[str]]) -> None:
        eps = set().union(*slices.values()) if slices else set()

        def apply():
            self._publish(pool, eps)
            self._ready[pool].set()
        if self._loop is not None and not self._loop.is_closed():
            self._loop.call_soon_threadsafe(apply)

    def _run(self, pool: str, selector: str) -> None:
        from kubernetes import client, watch
        api = client.DiscoveryV1Api(self._api)
        backoff = 0.5
        while not self._stop.is_set():
            try:
                # list, then watch from its resourceVersion; any end or error: relist
                resp = api.list_namespaced_endpoint_slice(self.namespace, label_selector=selector,
                                                          _preload_content=False, _request_timeout=10)
                body = json.loads(resp.data)
                slices = {}
                for o in body.get("items") or []:
                    if selector_matches(selector, (o.get("metadata") or {}).get("labels") or {}):
                        slices[o["metadata"]["name"]] = slice_endpoints(o, self.port)
                self._hand_over(pool, slices)
                rv = (body.get("metadata") or {}).get("resourceVersion")
                w = self._watches[pool] = watch.Watch()
                stream = w.stream(api.list_namespaced_endpoint_slice, self.namespace,
                                  label_selector=selector, resource_version=rv,
                                  timeout_seconds=int(self.watch_timeout),
                                  _request_timeout=self.watch_timeout + 5, deserialize=False)
                for ev in stream:
                    if self._stop.is_set():
                        w.stop()
                        break
                    # (ERROR events, e.g. 410 Gone for a stale resourceVersion, raise: relist)
                    obj, kind = (ev or {}).get("object") or {}, (ev or {}).get("type")
                    name = (obj.get("metadata") or {}).get("name")
                    if not name:
                        continue
                    labels = (obj.get("metadata") or {}).get("labels") or {}
                    if kind == "DELETED" or not selector_matches(selector, labels):
                        slices.pop(name, None)
                    else:
                        slices[name] = slice_endpoints(obj, self.port)
                    self._hand_over(pool, dict(slices))
                backoff = 0.5
            except Exception as e:
                if self._stop.is_set():
                    return
                log.warning("EndpointSlice watch for the %s pool (%s in %s): %s; retrying in %.1fs",
                            pool, selector, self.namespace, e, backoff)
                self._stop.wait(backoff)
                backoff = min(backoff * 2, 10.0)
