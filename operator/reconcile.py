"""Level-based reconciliation of one InferenceService: desired state in, cluster converged.

Data flow (one call of :func:`reconcile`, the same for create, update, resume, the periodic
timer and child-Deployment events):

1. read the InferenceService's spec -> :func:`spec.parse_spec`; an invalid spec patches
   ``ModelValid=False`` into the status and touches nothing else;
2. :func:`objects.build_all` gives the desired manifests; each gets an owner reference
   (controller, blockOwnerDeletion) so the API server's garbage collector deletes it with its
   owner;
3. :func:`apply_one` creates what is missing and merge-patches what has drifted, where "drifted"
   means some field we set differs from the live object (:func:`drifted`: fields the API server
   or other controllers add are not drift, so a converged cluster costs one GET per child and no
   writes);
4. optional children the spec no longer asks for (HPA, PodMonitor) are deleted;
5. the status is computed from the live Deployments and merge-patched into ``/status``.

Replica counts of autoscaled pools are left to the HPA after creation: the Deployment's
``spec.replicas`` is not part of the compared or patched fields then.
"""

from __future__ import annotations

import logging
from dataclasses import dataclass, field
from typing import Any

from . import objects, pods, status
from .config import OperatorConfig
from .kube import Kube, KubeError, object_path, resource_path
from .spec import GROUP, KIND, VERSION, InferenceServiceSpec, SpecError, parse_spec

API_VERSION = f"{GROUP}/{VERSION}"
log = logging.getLogger("tandem.operator")


class ChildConflict(Exception):
    """A child's name is taken by an object this InferenceService does not own."""


@dataclass
class Outcome:
    valid: bool
    actions: dict[str, str] = field(default_factory=dict)  # "Kind/name" -> created|patched|...
    warnings: list[str] = field(default_factory=list)
    errors: list[str] = field(default_factory=list)
    status: dict[str, Any] = field(default_factory=dict)


def owner_reference(owner: dict) -> dict:
    meta = owner["metadata"]
    return {"apiVersion": owner.get("apiVersion", API_VERSION), "kind": owner.get("kind", KIND),
            "name": meta["name"], "uid": meta["uid"], "controller": True,
            "blockOwnerDeletion": True}


def adopt(obj: dict, owner: dict) -> dict:
    obj["metadata"]["ownerReferences"] = [owner_reference(owner)]
    obj["metadata"]["namespace"] = owner["metadata"]["namespace"]
    return obj


def owned_by(actual: dict, owner: dict) -> bool:
    uid = owner["metadata"]["uid"]
    return any(ref.get("uid") == uid for ref in actual.get("metadata", {}).get("ownerReferences") or [])


def _same_scalar(a: Any, b: Any) -> bool:
    if a == b and type(a) is type(b):
        return True
    # Quantities and int-or-string fields come back as strings ("1" for 1).
    if isinstance(a, (int, float)) and not isinstance(a, bool) and isinstance(b, str):
        return str(a) == b
    return a == b and not isinstance(a, bool) and not isinstance(b, bool)


def drifted(desired: Any, actual: Any) -> bool:
    """True if some field of ``desired`` is missing from or different in ``actual``.

    Maps compare as subsets (extra keys in ``actual`` are defaults or someone else's); lists
    compare element-wise and must have the same length (a container or env var added or removed
    by hand is drift)."""
    if isinstance(desired, dict):
        if not isinstance(actual, dict):
            return True
        return any(drifted(v, actual.get(k)) for k, v in desired.items())
    if isinstance(desired, list):
        if not isinstance(actual, list) or len(desired) != len(actual):
            return True
        return any(drifted(d, a) for d, a in zip(desired, actual))
    return not _same_scalar(desired, actual)


def _key(obj: dict) -> str:
    return f"{obj['kind']}/{obj['metadata']['name']}"


def apply_one(kube: Kube, obj: dict, owner: dict, keep_replicas: bool = False) -> tuple[str, dict | None]:
    """Create or patch one child; returns (action, live object)."""
    meta = obj["metadata"]
    actual = kube.get(obj["apiVersion"], obj["kind"], meta["namespace"], meta["name"])
    if actual is None:
        created = kube.create(obj)
        return "created", created or kube.get(obj["apiVersion"], obj["kind"], meta["namespace"],
                                              meta["name"])
    if not owned_by(actual, owner):
        raise ChildConflict(f"{_key(obj)} exists and is not owned by this InferenceService")
    compare = obj
    if keep_replicas:  # the HPA owns spec.replicas now
        compare = {**obj, "spec": {k: v for k, v in obj["spec"].items() if k != "replicas"}}
    if not drifted(compare, actual):
        return "unchanged", actual
    return "patched", kube.patch(object_path(obj), compare)


def router_url(isvc: InferenceServiceSpec, cfg: OperatorConfig) -> str:
    host = f"{pods.router_service_name(isvc)}.{isvc.namespace}.svc.{cfg.cluster_domain}"
    return f"http://{host}:{isvc.router.http_port}"


def patch_status(kube: Kube, owner: dict, new_status: dict) -> None:
    meta = owner["metadata"]
    path = resource_path(API_VERSION, KIND, meta["namespace"], meta["name"]) + "/status"
    kube.patch(path, {"status": new_status})


def reconcile(kube: Kube, owner: dict, cfg: OperatorConfig) -> Outcome:
    """Converge one InferenceService (``owner`` is its full body as last seen)."""
    meta = owner["metadata"]
    generation = meta.get("generation")
    previous = owner.get("status") or {}
    try:
        isvc = parse_spec(meta["name"], meta["namespace"], owner.get("spec") or {}, cfg.image)
    except SpecError as e:
        out = Outcome(valid=False, status=status.invalid_status(str(e), generation, previous))
        if drifted(out.status, previous):
            patch_status(kube, owner, out.status)
        return out

    out = Outcome(valid=True)
    live: dict[str, dict | None] = {}
    for obj in objects.build_all(isvc):
        adopt(obj, owner)
        role = obj["metadata"]["labels"].get("tandem.dev/role")
        keep = obj["kind"] == "Deployment" and role in ("prefill", "decode") \
            and isvc.autoscale(role) is not None
        try:
            action, actual = apply_one(kube, obj, owner, keep_replicas=keep)
        except ChildConflict as e:
            out.errors.append(str(e))  # never take over someone else's object
            continue
        except KubeError as e:
            if e.status == 404 and obj["kind"] == "PodMonitor":
                # The Prometheus Operator's CRD is not installed: serve anyway, say so.
                out.warnings.append("PodMonitor requested but monitoring.coreos.com/v1 is not served")
                continue
            raise
        out.actions[_key(obj)] = action
        if obj["kind"] == "Deployment":
            live[role] = actual

    wanted = {(o["apiVersion"], o["kind"], o["metadata"]["name"]) for o in objects.build_all(isvc)}
    for api_version, kind, name in objects.optional_keys(isvc.name):
        if (api_version, kind, name) in wanted:
            continue
        try:
            stale = kube.get(api_version, kind, isvc.namespace, name)
        except KubeError as e:
            if e.status == 404:
                continue
            raise
        if stale is not None and owned_by(stale, owner):
            kube.delete(api_version, kind, isvc.namespace, name)
            out.actions[f"{kind}/{name}"] = "deleted"

    out.status = status.compute_status(live, router_url(isvc, cfg), generation, previous,
                                       out.warnings, out.errors)
    if drifted(out.status, previous):  # a converged, unchanged service costs no status write
        patch_status(kube, owner, out.status)
    changed = {k: v for k, v in out.actions.items() if v != "unchanged"}
    if changed:
        log.info("reconciled %s/%s: %s", meta["namespace"], meta["name"], changed)
    return out
