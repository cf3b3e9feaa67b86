"""Pure builders for everything an InferenceService owns besides its Deployments.

Data flow: :func:`build_all` takes a validated spec and returns the complete desired state, a list
of manifests in apply order (ConfigMap and RBAC before the pods that use them). ``reconcile.py``
adopts each (owner reference to the InferenceService), creates or patches it, and deletes the
optional objects (HPAs, PodMonitor) that :func:`optional_keys` names but the spec no longer asks
for. No function here talks to a cluster.
"""

from __future__ import annotations

from .pods import (ROLES, build_deployment, child_name, config_data, config_map_name, labels,
                   router_service_name, selector)
from .spec import WORKER_GRPC_PORT, WORKER_HTTP_PORT, InferenceServiceSpec

# HPA metrics: per-pod gauges the workers export (tandem/metrics.py), served to the HPA through a
# custom-metrics adapter (e.g. prometheus-adapter).
HPA_METRIC = {"prefill": "tandem_engine_queued_prompt_tokens",
              "decode": "tandem_engine_requests_running"}


def _meta(isvc: InferenceServiceSpec, name: str, role: str | None = None) -> dict:
    return {"name": name, "namespace": isvc.namespace, "labels": labels(isvc, role)}


def build_worker_service(isvc: InferenceServiceSpec, role: str) -> dict:
    """Headless Service per pool, for discovery: its EndpointSlices inherit these labels, so the
    router's --prefill-selector/--decode-selector match both the pods and the slices. Only ready
    pods are published, so the router never sees a worker that is still loading."""
    return {
        "apiVersion": "v1",
        "kind": "Service",
        "metadata": _meta(isvc, child_name(isvc, role), role),
        "spec": {
            "clusterIP": "None",
            "publishNotReadyAddresses": False,
            "selector": selector(isvc, role),
            "ports": [
                {"name": "grpc", "port": WORKER_GRPC_PORT, "targetPort": "grpc", "protocol": "TCP"},
                {"name": "http", "port": WORKER_HTTP_PORT, "targetPort": "http", "protocol": "TCP"},
            ],
        },
    }


def build_router_service(isvc: InferenceServiceSpec) -> dict:
    r = isvc.router
    return {
        "apiVersion": "v1",
        "kind": "Service",
        "metadata": _meta(isvc, router_service_name(isvc), "router"),
        "spec": {
            "type": r.service_type,
            "selector": selector(isvc, "router"),
            "ports": [
                {"name": "http", "port": r.http_port, "targetPort": "http", "protocol": "TCP"},
                {"name": "grpc", "port": r.grpc_port, "targetPort": "grpc", "protocol": "TCP"},
            ],
        },
    }


def build_config_map(isvc: InferenceServiceSpec) -> dict:
    return {"apiVersion": "v1", "kind": "ConfigMap",
            "metadata": _meta(isvc, config_map_name(isvc)), "data": config_data(isvc)}


def build_router_rbac(isvc: InferenceServiceSpec) -> list[dict]:
    """ServiceAccount + Role + RoleBinding: the router may only read EndpointSlices, in its own
    namespace (discovery of ready workers)."""
    name = child_name(isvc, "router")
    return [
        {"apiVersion": "v1", "kind": "ServiceAccount", "metadata": _meta(isvc, name, "router")},
        {"apiVersion": "rbac.authorization.k8s.io/v1", "kind": "Role",
         "metadata": _meta(isvc, name, "router"),
         "rules": [{"apiGroups": ["discovery.k8s.io"], "resources": ["endpointslices"],
                    "verbs": ["get", "list", "watch"]}]},
        {"apiVersion": "rbac.authorization.k8s.io/v1", "kind": "RoleBinding",
         "metadata": _meta(isvc, name, "router"),
         "roleRef": {"apiGroup": "rbac.authorization.k8s.io", "kind": "Role", "name": name},
         "subjects": [{"kind": "ServiceAccount", "name": name, "namespace": isvc.namespace}]},
    ]


def build_pdb(isvc: InferenceServiceSpec, role: str) -> dict:
    """At most one pod of a pool voluntarily evicted at a time (node drains, upgrades)."""
    return {
        "apiVersion": "policy/v1",
        "kind": "PodDisruptionBudget",
        "metadata": _meta(isvc, child_name(isvc, role), role),
        "spec": {"maxUnavailable": 1, "selector": {"matchLabels": selector(isvc, role)}},
    }


def build_hpa(isvc: InferenceServiceSpec, role: str) -> dict | None:
    auto = isvc.autoscale(role) if role != "router" else None
    if auto is None:
        return None
    return {
        "apiVersion": "autoscaling/v2",
        "kind": "HorizontalPodAutoscaler",
        "metadata": _meta(isvc, child_name(isvc, role), role),
        "spec": {
            "scaleTargetRef": {"apiVersion": "apps/v1", "kind": "Deployment",
                               "name": child_name(isvc, role)},
            "minReplicas": auto.min_replicas,
            "maxReplicas": auto.max_replicas,
            "metrics": [{"type": "Pods", "pods": {
                "metric": {"name": HPA_METRIC[role]},
                "target": {"type": "AverageValue", "averageValue": str(auto.target)}}}],
            # Model servers are slow to start: scale up at once, scale down only after 5 minutes.
            "behavior": {"scaleDown": {"stabilizationWindowSeconds": 300,
                                       "policies": [{"type": "Pods", "value": 1, "periodSeconds": 60}]},
                         "scaleUp": {"stabilizationWindowSeconds": 0}},
        },
    }


def build_pod_monitor(isvc: InferenceServiceSpec) -> dict | None:
    if not isvc.pod_monitor:
        return None
    return {
        "apiVersion": "monitoring.coreos.com/v1",
        "kind": "PodMonitor",
        "metadata": _meta(isvc, isvc.name),
        "spec": {
            "selector": {"matchLabels": {"tandem.dev/inferenceservice": isvc.name}},
            # Every role names its HTTP port "http" (/metrics lives there).
            "podMetricsEndpoints": [{"port": "http", "path": "/metrics", "interval": "15s"}],
        },
    }


def build_all(isvc: InferenceServiceSpec) -> list[dict]:
    """The full desired state, in apply order."""
    out = [build_config_map(isvc), *build_router_rbac(isvc)]
    out += [build_worker_service(isvc, role) for role in ("prefill", "decode")]
    out.append(build_router_service(isvc))
    out += [build_deployment(isvc, role) for role in ROLES]
    out += [build_pdb(isvc, role) for role in ROLES]
    out += [h for h in (build_hpa(isvc, "prefill"), build_hpa(isvc, "decode")) if h]
    monitor = build_pod_monitor(isvc)
    if monitor:
        out.append(monitor)
    return out


def optional_keys(name: str) -> list[tuple[str, str, str]]:
    """(apiVersion, kind, name) of children that exist only when the spec asks for them."""
    return [("autoscaling/v2", "HorizontalPodAutoscaler", f"{name}-prefill"),
            ("autoscaling/v2", "HorizontalPodAutoscaler", f"{name}-decode"),
            ("monitoring.coreos.com/v1", "PodMonitor", name)]
