"""A small generic REST layer over the official ``kubernetes`` client.

Data flow: ``reconcile.py`` hands plain manifest dicts here; :class:`Kube` maps each
(apiVersion, kind) to its REST path and sends get / create / merge-patch / delete through the
client's configured ``ApiClient`` (so kubeconfig, in-cluster tokens and TLS are handled by the
client library). One code path for every kind keeps the reconciler generic, instead of a typed
``*Api`` call per kind. JSON merge patch is used deliberately: it has the same semantics on every
kind, including custom resources, unlike strategic merge patch.
"""

from __future__ import annotations

import json
from typing import Any

import kubernetes

PLURALS: dict[tuple[str, str], str] = {
    ("v1", "ConfigMap"): "configmaps",
    ("v1", "Service"): "services",
    ("v1", "ServiceAccount"): "serviceaccounts",
    ("v1", "Secret"): "secrets",
    ("apps/v1", "Deployment"): "deployments",
    ("rbac.authorization.k8s.io/v1", "Role"): "roles",
    ("rbac.authorization.k8s.io/v1", "RoleBinding"): "rolebindings",
    ("policy/v1", "PodDisruptionBudget"): "poddisruptionbudgets",
    ("autoscaling/v2", "HorizontalPodAutoscaler"): "horizontalpodautoscalers",
    ("monitoring.coreos.com/v1", "PodMonitor"): "podmonitors",
    ("tandem.dev/v1alpha1", "InferenceService"): "inferenceservices",
}


class KubeError(Exception):
    def __init__(self, status: int, method: str, path: str, body: str):
        super().__init__(f"{method} {path}: HTTP {status}: {body[:500]}")
        self.status = status
        self.body = body


def resource_path(api_version: str, kind: str, namespace: str, name: str | None = None) -> str:
    plural = PLURALS[(api_version, kind)]
    prefix = "/api/v1" if api_version == "v1" else f"/apis/{api_version}"
    path = f"{prefix}/namespaces/{namespace}/{plural}"
    return f"{path}/{name}" if name else path


def object_path(obj: dict) -> str:
    meta = obj["metadata"]
    return resource_path(obj["apiVersion"], obj["kind"], meta["namespace"], meta["name"])


class Kube:
    """Synchronous; the async handlers call it through ``asyncio.to_thread``."""

    def __init__(self, api_client: kubernetes.client.ApiClient | None = None,
                 field_manager: str = "tandem-operator", timeout: float = 30.0):
        self.api = api_client or kubernetes.client.ApiClient()
        self.field_manager = field_manager
        self.timeout = timeout

    def request(self, method: str, path: str, body: Any = None,
                content_type: str = "application/json", query: list | None = None) -> dict | None:
        headers = {"Accept": "application/json"}
        if body is not None:
            headers["Content-Type"] = content_type
        _, url, headers, body, _ = self.api.param_serialize(
            method=method, resource_path=path, query_params=query or [], header_params=headers,
            body=body, auth_settings=["BearerToken"])
        resp = self.api.call_api(method, url, header_params=headers, body=body,
                                 _request_timeout=self.timeout)
        data = resp.read()
        text = data.decode() if isinstance(data, bytes) else (data or "")
        if resp.status >= 400:
            raise KubeError(resp.status, method, path, text)
        return json.loads(text) if text else None

    def get(self, api_version: str, kind: str, namespace: str, name: str) -> dict | None:
        try:
            return self.request("GET", resource_path(api_version, kind, namespace, name))
        except KubeError as e:
            if e.status == 404:
                return None
            raise

    def create(self, obj: dict) -> dict | None:
        meta = obj["metadata"]
        return self.request("POST", resource_path(obj["apiVersion"], obj["kind"], meta["namespace"]),
                            body=obj, query=[("fieldManager", self.field_manager)])

    def patch(self, obj_or_path: dict | str, patch: dict) -> dict | None:
        path = obj_or_path if isinstance(obj_or_path, str) else object_path(obj_or_path)
        return self.request("PATCH", path, body=patch, content_type="application/merge-patch+json",
                            query=[("fieldManager", self.field_manager)])

    def delete(self, api_version: str, kind: str, namespace: str, name: str) -> bool:
        """Delete (background propagation); False if it was already gone."""
        try:
            self.request("DELETE", resource_path(api_version, kind, namespace, name),
                         body={"kind": "DeleteOptions", "apiVersion": "v1",
                               "propagationPolicy": "Background"})
            return True
        except KubeError as e:
            if e.status == 404:
                return False
            raise
