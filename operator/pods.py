"""Pure builders for the three Deployments (prefill, decode, router) of an InferenceService.

Data flow: a validated :class:`~tandem.operator.spec.InferenceServiceSpec` goes in, plain dicts
(Kubernetes manifests) come out; nothing here talks to a cluster, so every function is unit-tested
and schema-checked without one. ``objects.build_all`` collects these together with the Services,
RBAC, PDBs and HPAs, and ``reconcile.py`` applies the list.

The pods run the one Tandem image with ``tandem prefill|decode|router`` and the flags of the
command-line contract with the data plane. Model weights reach every pod (the router too: it
needs the tokenizer) the same way, chosen by the URI scheme:

* ``hf://org/name[@rev]``: an init container downloads the snapshot into an ``emptyDir`` with
  ``huggingface_hub.snapshot_download`` (HF_TOKEN from the Secret named in the spec);
* ``pvc://claim/path``: the claim is mounted read-only;
* ``file:///path``: the path is already in the image (or a volume the user adds), nothing mounted.
"""

from __future__ import annotations

import hashlib
import json
import shlex
from typing import Any

from .spec import WORKER_GRPC_PORT, WORKER_HTTP_PORT, InferenceServiceSpec, PoolSpec

MODEL_MOUNT = "/models"
ROLES = ("prefill", "decode", "router")


def labels(isvc: InferenceServiceSpec, role: str | None = None) -> dict[str, str]:
    out = {
        "app.kubernetes.io/name": "tandem",
        "app.kubernetes.io/instance": isvc.name,
        "app.kubernetes.io/managed-by": "tandem-operator",
        "tandem.dev/inferenceservice": isvc.name,
    }
    if role:
        out["app.kubernetes.io/component"] = role
        out["tandem.dev/role"] = role
    return out


def selector(isvc: InferenceServiceSpec, role: str) -> dict[str, str]:
    """The immutable Deployment selector: only labels that never change for a pool."""
    return {"tandem.dev/inferenceservice": isvc.name, "tandem.dev/role": role}


def selector_string(isvc: InferenceServiceSpec, role: str) -> str:
    return ",".join(f"{k}={v}" for k, v in selector(isvc, role).items())


def child_name(isvc: InferenceServiceSpec, role: str) -> str:
    return f"{isvc.name}-{role}"


def router_service_name(isvc: InferenceServiceSpec) -> str:
    return isvc.name


def config_map_name(isvc: InferenceServiceSpec) -> str:
    return f"{isvc.name}-config"


def model_dir(isvc: InferenceServiceSpec) -> str:
    """Where the model directory is inside every container."""
    src = isvc.model.source
    if src.scheme == "hf":
        return f"{MODEL_MOUNT}/model"
    if src.scheme == "pvc":
        return f"{MODEL_MOUNT}/{src.path}" if src.path else MODEL_MOUNT
    return src.path


DOWNLOAD_SCRIPT = """\
# Run by the model-download init container: fetch an hf:// snapshot into the shared volume.
import os, sys
from huggingface_hub import snapshot_download

repo, revision, target = sys.argv[1], sys.argv[2] or None, sys.argv[3]
marker = os.path.join(target, ".tandem-complete")
if os.path.exists(marker):  # the volume outlived a container restart: keep it
    sys.exit(0)
snapshot_download(repo_id=repo, revision=revision, local_dir=target,
                  token=os.environ.get("HF_TOKEN") or None)
open(marker, "w").close()
print(f"downloaded {repo}@{revision or 'main'} to {target}")
"""


def config_data(isvc: InferenceServiceSpec) -> dict[str, str]:
    """ConfigMap contents; their hash goes on the pod templates so a change rolls the pods.
    Deliberately excludes replica counts: scaling must not restart pods."""
    model = {
        "uri": isvc.model.uri, "servedName": isvc.model.served_name, "dtype": isvc.model.dtype,
        "maxModelLen": isvc.model.max_model_len, "modelDir": model_dir(isvc),
    }
    return {"model.json": json.dumps(model, indent=2, sort_keys=True) + "\n",
            "download.py": DOWNLOAD_SCRIPT}


def config_hash(isvc: InferenceServiceSpec) -> str:
    blob = json.dumps(config_data(isvc), sort_keys=True).encode()
    return hashlib.sha256(blob).hexdigest()[:16]


def model_volumes(isvc: InferenceServiceSpec) -> tuple[list[dict], list[dict]]:
    """(volumes, volumeMounts for the serving container) carrying the model."""
    src = isvc.model.source
    if src.scheme == "hf":
        empty: dict[str, Any] = {}
        if isvc.model.cache_size:
            empty["sizeLimit"] = isvc.model.cache_size
        return ([{"name": "model", "emptyDir": empty}],
                [{"name": "model", "mountPath": MODEL_MOUNT, "readOnly": True}])
    if src.scheme == "pvc":
        return ([{"name": "model", "persistentVolumeClaim": {"claimName": src.claim, "readOnly": True}}],
                [{"name": "model", "mountPath": MODEL_MOUNT, "readOnly": True}])
    return [], []


def init_containers(isvc: InferenceServiceSpec) -> list[dict]:
    src = isvc.model.source
    if src.scheme != "hf":
        return []
    env = [{"name": "HF_HOME", "value": f"{MODEL_MOUNT}/.hf-home"},
           {"name": "HF_HUB_DISABLE_TELEMETRY", "value": "1"}]
    if isvc.model.hf_token_secret:
        env.append({"name": "HF_TOKEN", "valueFrom": {"secretKeyRef": {
            "name": isvc.model.hf_token_secret, "key": isvc.model.hf_token_secret_key}}})
    return [{
        "name": "model-download",
        "image": isvc.image,
        "imagePullPolicy": isvc.image_pull_policy,
        "command": ["python", "/etc/tandem/download.py", src.repo, src.revision, model_dir(isvc)],
        "env": env,
        "volumeMounts": [{"name": "model", "mountPath": MODEL_MOUNT},
                         {"name": "config", "mountPath": "/etc/tandem", "readOnly": True}],
    }]


def _downward_env() -> list[dict]:
    return [
        {"name": "POD_IP", "valueFrom": {"fieldRef": {"fieldPath": "status.podIP"}}},
        {"name": "POD_NAME", "valueFrom": {"fieldRef": {"fieldPath": "metadata.name"}}},
        {"name": "POD_NAMESPACE", "valueFrom": {"fieldRef": {"fieldPath": "metadata.namespace"}}},
        {"name": "HF_HUB_OFFLINE", "value": "1"},  # weights are local; never reach out at run time
    ]


def _probes(port: str) -> dict[str, dict]:
    # The startup probe gives a big model up to 30 minutes to load before liveness counts.
    return {
        "startupProbe": {"httpGet": {"path": "/health", "port": port},
                         "periodSeconds": 10, "failureThreshold": 180},
        "livenessProbe": {"httpGet": {"path": "/health", "port": port},
                          "periodSeconds": 10, "timeoutSeconds": 5, "failureThreshold": 3},
        "readinessProbe": {"httpGet": {"path": "/ready", "port": port},
                           "periodSeconds": 5, "timeoutSeconds": 3, "failureThreshold": 3},
    }


def worker_args(isvc: InferenceServiceSpec, pool: PoolSpec) -> list[str]:
    args = [
        pool.role,
        "--model", model_dir(isvc),
        "--served-model-name", isvc.model.served_name,
        "--host", "0.0.0.0",
        "--grpc-port", str(WORKER_GRPC_PORT),
        "--http-port", str(WORKER_HTTP_PORT),
        "--advertise-host", "$(POD_IP)",
        "--device", isvc.device,
        "--dtype", isvc.model.dtype,
    ]
    if isvc.model.max_model_len:
        args += ["--max-model-len", str(isvc.model.max_model_len)]
    args += [
        "--block-size", str(isvc.kv.block_size),
        "--gpu-memory-utilization", str(isvc.kv.gpu_memory_utilization),
        "--kv-transfer", isvc.kv.backend,
        "--tensor-parallel-size", str(pool.tensor_parallel),
    ]
    if pool.role == "prefill":
        args += ["--max-batch-tokens", str(pool.max_tokens)]
    else:
        args += ["--max-running-requests", str(pool.max_tokens)]
    return args


def router_args(isvc: InferenceServiceSpec) -> list[str]:
    r = isvc.router
    return [
        "router",
        "--model", model_dir(isvc),
        "--served-model-name", isvc.model.served_name,
        "--host", "0.0.0.0",
        "--http-port", str(r.http_port),
        "--grpc-port", str(r.grpc_port),
        "--policy", r.policy,
        "--discovery", "kubernetes",
        "--namespace", isvc.namespace,
        "--prefill-selector", selector_string(isvc, "prefill"),
        "--decode-selector", selector_string(isvc, "decode"),
        "--worker-grpc-port", str(WORKER_GRPC_PORT),
    ]


def _with_rdma(resources: dict[str, Any], rdma: str) -> dict[str, Any]:
    """Add one RDMA device; extended resources need requests == limits."""
    out = {k: dict(v) for k, v in resources.items()}
    if rdma:
        out.setdefault("limits", {})[rdma] = 1
        out.setdefault("requests", {})[rdma] = 1
    return out


def worker_container(isvc: InferenceServiceSpec, pool: PoolSpec) -> dict:
    _, model_mounts = model_volumes(isvc)
    c: dict[str, Any] = {
        "name": pool.role,
        "image": isvc.image,
        "imagePullPolicy": isvc.image_pull_policy,
        "command": ["tandem"],
        "args": worker_args(isvc, pool),
        "env": _downward_env() + list(pool.env),
        "ports": [{"name": "grpc", "containerPort": WORKER_GRPC_PORT, "protocol": "TCP"},
                  {"name": "http", "containerPort": WORKER_HTTP_PORT, "protocol": "TCP"}],
        "resources": _with_rdma(pool.resources, isvc.kv.rdma_resource),
        "volumeMounts": model_mounts + [{"name": "dshm", "mountPath": "/dev/shm"}],
        **_probes("http"),
    }
    if isvc.kv.rdma_resource:
        # Registering memory with an RDMA NIC pins pages, which needs IPC_LOCK.
        c["securityContext"] = {"capabilities": {"add": ["IPC_LOCK"]}}
    return c


def router_container(isvc: InferenceServiceSpec) -> dict:
    _, model_mounts = model_volumes(isvc)
    r = isvc.router
    return {
        "name": "router",
        "image": isvc.image,
        "imagePullPolicy": isvc.image_pull_policy,
        "command": ["tandem"],
        "args": router_args(isvc),
        "env": _downward_env() + list(r.env),
        "ports": [{"name": "http", "containerPort": r.http_port, "protocol": "TCP"},
                  {"name": "grpc", "containerPort": r.grpc_port, "protocol": "TCP"}],
        "resources": r.resources,
        "volumeMounts": model_mounts,
        **_probes("http"),
    }


def pod_template(isvc: InferenceServiceSpec, role: str) -> dict:
    volumes, _ = model_volumes(isvc)
    volumes = volumes + [{"name": "config", "configMap": {"name": config_map_name(isvc)}}]
    if role == "router":
        container, placement = router_container(isvc), isvc.router
        extra: dict[str, Any] = {"serviceAccountName": child_name(isvc, "router")}
    else:
        pool = isvc.pool(role)
        container, placement = worker_container(isvc, pool), pool
        shm: dict[str, Any] = {"medium": "Memory"}
        if pool.shm_size:
            shm["sizeLimit"] = pool.shm_size
        volumes.append({"name": "dshm", "emptyDir": shm})
        # Workers never call the API server: no token in the pod.
        extra = {"automountServiceAccountToken": False}
    spec: dict[str, Any] = {
        **extra,
        "initContainers": init_containers(isvc),
        "containers": [container],
        "volumes": volumes,
        "enableServiceLinks": False,
    }
    for key, value in (("nodeSelector", placement.node_selector),
                       ("tolerations", placement.tolerations),
                       ("affinity", placement.affinity)):
        if value:
            spec[key] = value
    if not spec["initContainers"]:
        del spec["initContainers"]
    return {
        "metadata": {"labels": labels(isvc, role),
                     "annotations": {"tandem.dev/config-hash": config_hash(isvc)}},
        "spec": spec,
    }


def deployment_replicas(isvc: InferenceServiceSpec, role: str) -> int:
    if role == "router":
        return isvc.router.replicas
    auto = isvc.autoscale(role)
    if auto is not None:
        return min(max(isvc.pool(role).replicas, auto.min_replicas), auto.max_replicas)
    return isvc.pool(role).replicas


def build_deployment(isvc: InferenceServiceSpec, role: str) -> dict:
    """One Deployment per role. Workers roll one extra pod at a time (maxSurge 1, maxUnavailable 0)
    so serving capacity never drops during a rollout."""
    return {
        "apiVersion": "apps/v1",
        "kind": "Deployment",
        "metadata": {"name": child_name(isvc, role), "namespace": isvc.namespace,
                     "labels": labels(isvc, role)},
        "spec": {
            "replicas": deployment_replicas(isvc, role),
            "selector": {"matchLabels": selector(isvc, role)},
            "strategy": {"type": "RollingUpdate",
                         "rollingUpdate": {"maxSurge": 1, "maxUnavailable": 0}},
            "template": pod_template(isvc, role),
        },
    }


def command_line(container: dict) -> str:
    """The container's command as a shell line (for docs and debugging)."""
    return shlex.join(container.get("command", []) + container.get("args", []))
