"""A fake Kubernetes API server for tests: kmock's stateful emulator, served over HTTP.

Used two ways: by the operator tests (kopf, in this process, talks to it through a kubeconfig)
and by ``tests/charts/helm_check.py`` (helm-sdkpy installs the chart into it), so it imports
only kmock and the standard library.

Data flow: :class:`Cluster` starts the emulator on a loopback port in a background thread with
its own event loop and writes a kubeconfig pointing at it; tests read and write objects through
its small JSON helpers (plain HTTP, no client library needed).

kmock stores objects as sent; a real API server fills metadata in. :class:`Emulator` adds the
parts our code relies on (uid, namespace, resourceVersion, generation, creationTimestamp) and
answers a create with 201 like a real server. It has no controllers and no garbage collector:
Deployments never get a status unless a test patches one in, and deleting an owner leaves its
children in place.
"""

from __future__ import annotations

import asyncio
import datetime
import itertools
import json
import os
import tempfile
import threading
import time
import urllib.error
import urllib.request
import uuid
from typing import Any, Callable

import kmock

VERBS = {"get", "list", "watch", "create", "patch", "update", "delete"}

# group/version/plural -> (Kind, namespaced, subresources)
RESOURCES: dict[str, tuple[str, bool, set[str]]] = {
    "v1/namespaces": ("Namespace", False, set()),
    "v1/events": ("Event", True, set()),
    "v1/configmaps": ("ConfigMap", True, set()),
    "v1/secrets": ("Secret", True, set()),
    "v1/services": ("Service", True, {"status"}),
    "v1/serviceaccounts": ("ServiceAccount", True, set()),
    "apps/v1/deployments": ("Deployment", True, {"status", "scale"}),
    "rbac.authorization.k8s.io/v1/roles": ("Role", True, set()),
    "rbac.authorization.k8s.io/v1/rolebindings": ("RoleBinding", True, set()),
    "rbac.authorization.k8s.io/v1/clusterroles": ("ClusterRole", False, set()),
    "rbac.authorization.k8s.io/v1/clusterrolebindings": ("ClusterRoleBinding", False, set()),
    "policy/v1/poddisruptionbudgets": ("PodDisruptionBudget", True, {"status"}),
    "autoscaling/v2/horizontalpodautoscalers": ("HorizontalPodAutoscaler", True, {"status"}),
    "apiextensions.k8s.io/v1/customresourcedefinitions": ("CustomResourceDefinition", False, {"status"}),
    "tandem.dev/v1alpha1/inferenceservices": ("InferenceService", True, {"status"}),
    "kopf.dev/v1/kopfpeerings": ("KopfPeering", True, set()),
    "kopf.dev/v1/clusterkopfpeerings": ("ClusterKopfPeering", False, set()),
}
MONITORING = {
    "monitoring.coreos.com/v1/podmonitors": ("PodMonitor", True, set()),
    "monitoring.coreos.com/v1/servicemonitors": ("ServiceMonitor", True, set()),
}


def _now() -> str:
    return datetime.datetime.now(datetime.timezone.utc).strftime("%Y-%m-%dT%H:%M:%SZ")


class Emulator(kmock.KubernetesEmulator):
    """kmock's emulator plus the metadata a real API server fills in (see module docstring)."""

    _versions = itertools.count(1)

    async def _handle(self, request: kmock.Request):  # type: ignore[override]
        data = request.data if isinstance(request.data, dict) else None
        if request.resource is not None and data is not None:
            meta = data.setdefault("metadata", {})
            if request.action == kmock.action.CREATE:
                meta.setdefault("uid", str(uuid.uuid4()))
                if request.namespace and not meta.get("namespace"):
                    meta["namespace"] = request.namespace
                meta.setdefault("creationTimestamp", _now())
                meta["generation"] = 1
                meta["resourceVersion"] = str(next(self._versions))
            elif request.action == kmock.action.UPDATE and request.name:
                meta["resourceVersion"] = str(next(self._versions))
                key = (request.resource, request.namespace, request.name)
                if "spec" in data and request.subresource is None and key in self.objects:
                    current = self.objects[key]
                    if not current.deleted:
                        gen = (current.raw.get("metadata") or {}).get("generation") or 1
                        meta["generation"] = gen + 1
        response = await super()._handle(request)
        if request.action == kmock.action.CREATE and response.status == 200 and not response.prepared:
            response.set_status(201)
        return response


    async def _serve_version(self, request: kmock.Request):  # type: ignore[override]
        # kmock writes the core group's groupVersion as "/v1"; client-go (Helm) rejects that.
        payload = await super()._serve_version(request)
        if isinstance(payload, dict) and payload.get("groupVersion", "").startswith("/"):
            payload["groupVersion"] = payload["groupVersion"][1:]
        return payload


class Cluster:
    """Start/stop the emulator in a thread; JSON helpers for tests."""

    def __init__(self, monitoring: bool = True, extra: dict[str, tuple[str, bool, set[str]]] | None = None):
        self.resources = dict(RESOURCES, **(MONITORING if monitoring else {}), **(extra or {}))
        self.url = ""
        self.kubeconfig = ""
        self.emulator: Emulator | None = None
        self._loop: asyncio.AbstractEventLoop | None = None
        self._stop: asyncio.Event | None = None
        self._ready = threading.Event()
        self._thread = threading.Thread(target=self._run, name="kmock", daemon=True)
        self._error: BaseException | None = None

    def __enter__(self) -> "Cluster":
        self._thread.start()
        if not self._ready.wait(30) or self._error:
            raise RuntimeError(f"the kmock emulator did not start: {self._error!r}")
        fd, self.kubeconfig = tempfile.mkstemp(prefix="kmock-", suffix=".kubeconfig")
        with os.fdopen(fd, "w") as f:
            f.write(self.kubeconfig_text())
        return self

    def __exit__(self, *exc: Any) -> None:
        if self._loop and self._stop:
            self._loop.call_soon_threadsafe(self._stop.set)
        self._thread.join(10)
        if self.kubeconfig:
            os.unlink(self.kubeconfig)

    def kubeconfig_text(self) -> str:
        return json.dumps({
            "apiVersion": "v1", "kind": "Config", "current-context": "kmock",
            "clusters": [{"name": "kmock", "cluster": {"server": self.url}}],
            "users": [{"name": "kmock", "user": {"token": "kmock"}}],
            "contexts": [{"name": "kmock", "context": {"cluster": "kmock", "user": "kmock",
                                                       "namespace": "default"}}],
        })

    def _run(self) -> None:
        async def main() -> None:
            self._loop = asyncio.get_running_loop()
            self._stop = asyncio.Event()
            emulator = Emulator()
            for key, (kind, namespaced, subresources) in self.resources.items():
                emulator.resources[key] = kmock.ResourceInfo(
                    kind=kind, singular=kind.lower(), namespaced=namespaced, verbs=VERBS,
                    subresources=subresources)
            async with emulator, kmock.Server(emulator) as server:
                self.emulator = emulator
                self.url = f"http://127.0.0.1:{server.port}"
                self._ready.set()
                await self._stop.wait()
        try:
            asyncio.run(main())
        except BaseException as e:  # surfaced by __enter__
            self._error = e
            self._ready.set()

    # ---- plain-HTTP helpers ------------------------------------------------------------------
    def request(self, method: str, path: str, body: Any = None,
                content_type: str = "application/json") -> tuple[int, Any]:
        data = json.dumps(body).encode() if body is not None else None
        req = urllib.request.Request(self.url + path, data=data, method=method,
                                     headers={"Content-Type": content_type})
        try:
            with urllib.request.urlopen(req, timeout=10) as resp:
                raw = resp.read()
                return resp.status, json.loads(raw) if raw else None
        except urllib.error.HTTPError as e:
            raw = e.read()
            try:
                return e.code, json.loads(raw)
            except ValueError:
                return e.code, raw.decode(errors="replace")

    def get(self, path: str) -> dict | None:
        code, body = self.request("GET", path)
        return body if code == 200 else None

    def create(self, path: str, obj: dict) -> dict:
        code, body = self.request("POST", path, obj)
        assert code in (200, 201), (code, body)
        return body

    def patch(self, path: str, patch: dict) -> dict:
        code, body = self.request("PATCH", path, patch, "application/merge-patch+json")
        assert code == 200, (code, body)
        return body

    def delete(self, path: str) -> int:
        return self.request("DELETE", path)[0]

    def items(self, path: str) -> list[dict]:
        body = self.get(path) or {}
        return body.get("items") or []


def wait_for(predicate: Callable[[], Any], timeout: float = 20.0, interval: float = 0.1,
             what: str = "condition") -> Any:
    """Poll until ``predicate()`` is truthy; return its value or fail with ``what``."""
    deadline = time.monotonic() + timeout
    last: Any = None
    while time.monotonic() < deadline:
        try:
            last = predicate()
        except (AssertionError, KeyError, TypeError):
            last = None
        if last:
            return last
        time.sleep(interval)
    raise AssertionError(f"timed out after {timeout}s waiting for {what}")
