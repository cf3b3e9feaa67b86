"""The InferenceService spec as typed dataclasses: parsing, defaults and validation.

Data flow: kopf hands a handler the raw ``spec`` dict of an ``InferenceService``;
:func:`parse_spec` turns it into an :class:`InferenceServiceSpec` (applying the same defaults
as the CRD's OpenAPI schema, since a spec can reach us without API-server defaulting, e.g. in
tests or from an older CRD) and checks the rules a schema cannot express. Every problem found is
collected into one :class:`SpecError`, whose message becomes the ``ModelValid=False`` condition;
the builders (``pods.py``, ``objects.py``) only ever see a valid spec.
"""

from __future__ import annotations

import re
from dataclasses import dataclass, field
from typing import Any, Literal

GROUP = "tandem.dev"
VERSION = "v1alpha1"
PLURAL = "inferenceservices"
KIND = "InferenceService"

# Fixed worker ports (the command-line contract with the data plane).
WORKER_GRPC_PORT = 50061
WORKER_HTTP_PORT = 8081

# A Service name is a DNS-1035 label (<= 63 characters) and we append "-prefill" (8) to it.
MAX_NAME_LEN = 50

DTYPES = ("auto", "bfloat16", "float16", "float32")
DEVICES = ("auto", "cpu", "cuda")
KV_BACKENDS = ("nixl", "tcp")
POLICIES = ("cache-aware", "least-load", "round-robin")
SERVICE_TYPES = ("ClusterIP", "NodePort", "LoadBalancer")

_DNS1123 = re.compile(r"^[a-z0-9]([-a-z0-9]*[a-z0-9])?$")
_HF_REPO = re.compile(r"^[A-Za-z0-9][\w.-]*/[\w.-]+$")


class SpecError(ValueError):
    """An invalid spec; ``problems`` lists every rule broken, in spec order."""

    def __init__(self, problems: list[str]):
        super().__init__("; ".join(problems))
        self.problems = problems


@dataclass(frozen=True)
class ModelSource:
    """Where the weights come from, parsed from ``spec.model.uri``."""

    scheme: Literal["hf", "pvc", "file"]
    repo: str = ""        # hf: "org/name"
    revision: str = ""    # hf: after "@", optional
    claim: str = ""       # pvc: the PersistentVolumeClaim
    path: str = ""        # pvc: path inside the claim ("" = its root); file: absolute path


@dataclass(frozen=True)
class ModelSpec:
    uri: str
    source: ModelSource
    served_name: str
    dtype: str = "auto"
    max_model_len: int | None = None
    hf_token_secret: str = ""
    hf_token_secret_key: str = "HF_TOKEN"
    cache_size: str = ""  # sizeLimit of the download emptyDir ("" = none)


@dataclass(frozen=True)
class PoolSpec:
    """A prefill or decode pool; ``max_tokens`` is maxBatchTokens (prefill) or
    maxRunningRequests (decode)."""

    role: Literal["prefill", "decode"]
    replicas: int = 1
    tensor_parallel: int = 1
    max_tokens: int = 0
    resources: dict[str, Any] = field(default_factory=dict)
    node_selector: dict[str, str] = field(default_factory=dict)
    tolerations: list[dict[str, Any]] = field(default_factory=list)
    affinity: dict[str, Any] = field(default_factory=dict)
    env: list[dict[str, Any]] = field(default_factory=list)
    shm_size: str = ""


@dataclass(frozen=True)
class RouterSpec:
    replicas: int = 1
    policy: str = "cache-aware"
    service_type: str = "ClusterIP"
    http_port: int = 8000
    grpc_port: int = 50051
    resources: dict[str, Any] = field(default_factory=dict)
    node_selector: dict[str, str] = field(default_factory=dict)
    tolerations: list[dict[str, Any]] = field(default_factory=list)
    affinity: dict[str, Any] = field(default_factory=dict)
    env: list[dict[str, Any]] = field(default_factory=list)


@dataclass(frozen=True)
class KVSpec:
    block_size: int = 16
    gpu_memory_utilization: float = 0.9
    backend: str = "nixl"
    rdma_resource: str = ""  # e.g. "rdma/ib": one device requested per worker


@dataclass(frozen=True)
class AutoscalePool:
    min_replicas: int
    max_replicas: int
    target: int  # targetQueuedTokens (prefill) / targetRunningRequests (decode)


@dataclass(frozen=True)
class InferenceServiceSpec:
    name: str
    namespace: str
    model: ModelSpec
    image: str
    device: str
    prefill: PoolSpec
    decode: PoolSpec
    router: RouterSpec
    kv: KVSpec
    autoscale_prefill: AutoscalePool | None = None
    autoscale_decode: AutoscalePool | None = None
    pod_monitor: bool = False
    image_pull_policy: str = "IfNotPresent"

    def pool(self, role: str) -> PoolSpec:
        return self.prefill if role == "prefill" else self.decode

    def autoscale(self, role: str) -> AutoscalePool | None:
        return self.autoscale_prefill if role == "prefill" else self.autoscale_decode


def parse_model_uri(uri: str) -> ModelSource:
    """``hf://org/name[@rev]``, ``pvc://claim[/path]`` or ``file:///abs/path``."""
    if uri.startswith("hf://"):
        rest = uri[len("hf://"):]
        repo, _, rev = rest.partition("@")
        if not _HF_REPO.match(repo):
            raise ValueError(f"model.uri {uri!r}: expected hf://ORG/NAME[@REVISION]")
        return ModelSource("hf", repo=repo, revision=rev)
    if uri.startswith("pvc://"):
        claim, _, path = uri[len("pvc://"):].partition("/")
        if not _DNS1123.match(claim) or len(claim) > 253:
            raise ValueError(f"model.uri {uri!r}: expected pvc://CLAIM[/PATH] with a valid claim name")
        if ".." in path.split("/"):
            raise ValueError(f"model.uri {uri!r}: the path may not contain '..'")
        return ModelSource("pvc", claim=claim, path=path.strip("/"))
    if uri.startswith("file:///"):
        path = uri[len("file://"):]
        return ModelSource("file", path=path.rstrip("/") or "/")
    raise ValueError(f"model.uri {uri!r}: the scheme must be hf://, pvc:// or file:///")


class _Reader:
    """Reads typed fields out of a dict, recording problems instead of raising at the first."""

    def __init__(self, problems: list[str]):
        self.problems = problems

    def int(self, d: dict, key: str, where: str, default: int | None, minimum: int = 0,
            maximum: int | None = None) -> int | None:
        value = d.get(key, default)
        if value is None:
            return None
        if isinstance(value, bool) or not isinstance(value, int):
            self.problems.append(f"{where}.{key} must be an integer, got {value!r}")
            return default
        if value < minimum or (maximum is not None and value > maximum):
            bound = f">= {minimum}" if maximum is None else f"in [{minimum}, {maximum}]"
            self.problems.append(f"{where}.{key} must be {bound}, got {value}")
        return value

    def enum(self, d: dict, key: str, where: str, default: str, allowed: tuple[str, ...]) -> str:
        value = d.get(key, default)
        if value not in allowed:
            self.problems.append(f"{where}.{key} must be one of {', '.join(allowed)}; got {value!r}")
            return default
        return value

    def dict(self, d: dict, key: str, where: str) -> dict:
        value = d.get(key) or {}
        if not isinstance(value, dict):
            self.problems.append(f"{where}.{key} must be an object")
            return {}
        return value

    def list(self, d: dict, key: str, where: str) -> list:
        value = d.get(key) or []
        if not isinstance(value, list):
            self.problems.append(f"{where}.{key} must be a list")
            return []
        return value


def _gpu_count(resources: dict[str, Any]) -> int | None:
    for section in ("limits", "requests"):
        value = (resources.get(section) or {}).get("nvidia.com/gpu")
        if value is not None:
            try:
                return int(str(value))
            except ValueError:
                return None
    return None


def _parse_pool(r: _Reader, raw: dict, role: Literal["prefill", "decode"]) -> PoolSpec:
    where = f"spec.{role}"
    token_key, token_default = (("maxBatchTokens", 8192) if role == "prefill"
                                else ("maxRunningRequests", 256))
    pool = PoolSpec(
        role=role,
        replicas=r.int(raw, "replicas", where, 1),
        tensor_parallel=r.int(raw, "tensorParallel", where, 1, minimum=1),
        max_tokens=r.int(raw, token_key, where, token_default, minimum=1),
        resources=r.dict(raw, "resources", where),
        node_selector=r.dict(raw, "nodeSelector", where),
        tolerations=r.list(raw, "tolerations", where),
        affinity=r.dict(raw, "affinity", where),
        env=r.list(raw, "env", where),
        shm_size=str(raw.get("shmSize", "")),
    )
    gpus = _gpu_count(pool.resources)
    if gpus is not None and 0 < gpus < pool.tensor_parallel:
        r.problems.append(f"{where}.tensorParallel={pool.tensor_parallel} needs that many GPUs per "
                          f"pod, but resources ask for nvidia.com/gpu={gpus}")
    return pool


def _parse_autoscale(r: _Reader, raw: dict, role: str, target_key: str) -> AutoscalePool | None:
    if not raw:
        return None
    where = f"spec.autoscaling.{role}"
    lo = r.int(raw, "minReplicas", where, 1, minimum=1)
    hi = r.int(raw, "maxReplicas", where, None, minimum=1)
    target = r.int(raw, target_key, where, None, minimum=1)
    if hi is None:
        r.problems.append(f"{where}.maxReplicas is required")
        hi = lo
    if target is None:
        r.problems.append(f"{where}.{target_key} is required")
        target = 1
    if lo is not None and hi is not None and lo > hi:
        r.problems.append(f"{where}.minReplicas ({lo}) must be <= maxReplicas ({hi})")
    return AutoscalePool(lo or 1, hi, target)


def parse_spec(name: str, namespace: str, spec: dict[str, Any], default_image: str) -> InferenceServiceSpec:
    """Validate and normalize one InferenceService spec; raise :class:`SpecError` if invalid."""
    problems: list[str] = []
    r = _Reader(problems)
    spec = spec or {}
    if len(name) > MAX_NAME_LEN or not _DNS1123.match(name):
        problems.append(f"metadata.name {name!r} must be a DNS-1123 label of at most "
                        f"{MAX_NAME_LEN} characters (child names append suffixes)")

    raw_model = r.dict(spec, "model", "spec")
    uri = raw_model.get("uri", "")
    source = ModelSource("file", path="/")
    if not uri:
        problems.append("spec.model.uri is required")
    else:
        try:
            source = parse_model_uri(uri)
        except ValueError as e:
            problems.append(str(e))
    hf_secret = raw_model.get("hfTokenSecret", "") or ""
    if hf_secret and source.scheme != "hf":
        problems.append("spec.model.hfTokenSecret is only used with hf:// model URIs")
    model = ModelSpec(
        uri=uri, source=source,
        served_name=raw_model.get("servedName") or name,
        dtype=r.enum(raw_model, "dtype", "spec.model", "auto", DTYPES),
        max_model_len=r.int(raw_model, "maxModelLen", "spec.model", None, minimum=1),
        hf_token_secret=hf_secret,
        hf_token_secret_key=raw_model.get("hfTokenSecretKey") or "HF_TOKEN",
        cache_size=str(raw_model.get("cacheSize", "") or ""),
    )

    raw_router = r.dict(spec, "router", "spec")
    raw_svc = r.dict(raw_router, "service", "spec.router")
    router = RouterSpec(
        replicas=r.int(raw_router, "replicas", "spec.router", 1),
        policy=r.enum(raw_router, "policy", "spec.router", "cache-aware", POLICIES),
        service_type=r.enum(raw_svc, "type", "spec.router.service", "ClusterIP", SERVICE_TYPES),
        http_port=r.int(raw_svc, "httpPort", "spec.router.service", 8000, 1, 65535),
        grpc_port=r.int(raw_svc, "grpcPort", "spec.router.service", 50051, 1, 65535),
        resources=r.dict(raw_router, "resources", "spec.router"),
        node_selector=r.dict(raw_router, "nodeSelector", "spec.router"),
        tolerations=r.list(raw_router, "tolerations", "spec.router"),
        affinity=r.dict(raw_router, "affinity", "spec.router"),
        env=r.list(raw_router, "env", "spec.router"),
    )
    if router.http_port == router.grpc_port:
        problems.append("spec.router.service.httpPort and grpcPort must differ")

    raw_cache = r.dict(spec, "kvCache", "spec")
    raw_xfer = r.dict(spec, "kvTransfer", "spec")
    util = raw_cache.get("gpuMemoryUtilization", 0.9)
    if isinstance(util, bool) or not isinstance(util, (int, float)) or not 0 < util <= 1:
        problems.append(f"spec.kvCache.gpuMemoryUtilization must be in (0, 1], got {util!r}")
        util = 0.9
    kv = KVSpec(
        block_size=r.int(raw_cache, "blockSize", "spec.kvCache", 16, minimum=1, maximum=1024),
        gpu_memory_utilization=float(util),
        backend=r.enum(raw_xfer, "backend", "spec.kvTransfer", "nixl", KV_BACKENDS),
        rdma_resource=raw_xfer.get("rdmaResource", "") or "",
    )
    if kv.rdma_resource and kv.backend != "nixl":
        problems.append("spec.kvTransfer.rdmaResource needs backend nixl (tcp does not use RDMA)")

    raw_auto = r.dict(spec, "autoscaling", "spec")
    raw_mon = r.dict(spec, "monitoring", "spec")
    result = InferenceServiceSpec(
        name=name, namespace=namespace, model=model,
        image=spec.get("image") or default_image,
        device=r.enum(spec, "device", "spec", "auto", DEVICES),
        prefill=_parse_pool(r, r.dict(spec, "prefill", "spec"), "prefill"),
        decode=_parse_pool(r, r.dict(spec, "decode", "spec"), "decode"),
        router=router, kv=kv,
        autoscale_prefill=_parse_autoscale(r, r.dict(raw_auto, "prefill", "spec.autoscaling"),
                                           "prefill", "targetQueuedTokens"),
        autoscale_decode=_parse_autoscale(r, r.dict(raw_auto, "decode", "spec.autoscaling"),
                                          "decode", "targetRunningRequests"),
        pod_monitor=bool(raw_mon.get("podMonitor", False)),
        image_pull_policy=r.enum(spec, "imagePullPolicy", "spec", "IfNotPresent",
                                 ("Always", "IfNotPresent", "Never")),
    )
    if not result.image:
        problems.append("spec.image is empty and the operator has no default image configured")
    if problems:
        raise SpecError(problems)
    return result
