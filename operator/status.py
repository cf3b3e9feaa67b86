"""Pure computation of an InferenceService's ``status`` from the state of its children.

Data flow: after ``reconcile.py`` has applied the desired objects, it passes the Deployments as the
API server returned them (their ``status`` is filled by the Deployment controller) to
:func:`compute_status`, and merge-patches the result into the ``status`` subresource. The
``conditions`` list is replaced as a whole on purpose (merge patch semantics), keeping each
condition's ``lastTransitionTime`` when its status did not change.

Condition semantics: a pool is Ready when at least one replica is ready (it can serve, perhaps
degraded), like a Deployment's ``Available``; the reason tells whether all replicas are.
``Ready`` = ModelValid and all three pools ready.
"""

from __future__ import annotations

import datetime
from typing import Any

POOL_CONDITIONS = {"prefill": "PrefillReady", "decode": "DecodeReady", "router": "RouterReady"}
CONDITION_TYPES = ("Ready", "ModelValid", "PrefillReady", "DecodeReady", "RouterReady")


def now() -> str:
    return datetime.datetime.now(datetime.timezone.utc).strftime("%Y-%m-%dT%H:%M:%SZ")


def condition(ctype: str, ok: bool, reason: str, message: str, generation: int | None,
              previous: list[dict] | None = None) -> dict:
    status = "True" if ok else "False"
    stamp = now()
    for old in previous or []:
        if old.get("type") == ctype and old.get("status") == status and old.get("lastTransitionTime"):
            stamp = old["lastTransitionTime"]
    out = {"type": ctype, "status": status, "reason": reason, "message": message,
           "lastTransitionTime": stamp}
    if generation is not None:
        out["observedGeneration"] = generation
    return out


def pool_state(deployment: dict | None) -> dict[str, Any]:
    """replicas (desired), readyReplicas, updatedReplicas and the 'ready/desired' summary."""
    if not deployment:
        return {"replicas": 0, "readyReplicas": 0, "updatedReplicas": 0, "summary": "0/0"}
    desired = int((deployment.get("spec") or {}).get("replicas", 1) or 0)
    st = deployment.get("status") or {}
    ready = int(st.get("readyReplicas") or 0)
    return {"replicas": desired, "readyReplicas": ready,
            "updatedReplicas": int(st.get("updatedReplicas") or 0), "summary": f"{ready}/{desired}"}


def _pool_condition(role: str, state: dict, exists: bool) -> tuple[bool, str, str]:
    desired, ready = state["replicas"], state["readyReplicas"]
    if not exists:
        return False, "NotCreated", f"the {role} Deployment does not exist yet"
    if desired == 0:
        return False, "ScaledToZero", f"{role} has 0 replicas desired"
    if ready >= desired:
        return True, "AllReplicasReady", f"{ready}/{desired} {role} replicas ready"
    if ready > 0:
        return True, "MinimumReplicasAvailable", f"{ready}/{desired} {role} replicas ready"
    return False, "NoReplicasReady", f"0/{desired} {role} replicas ready"


def compute_status(deployments: dict[str, dict | None], url: str, generation: int | None,
                   previous: dict | None = None, warnings: list[str] | None = None,
                   errors: list[str] | None = None) -> dict:
    """``deployments`` maps role -> the Deployment as read back from the API (or None).
    ``warnings`` are shown in the Ready message; ``errors`` (e.g. a child name taken by a foreign
    object) also make Ready False."""
    prev = (previous or {}).get("conditions") or []
    out: dict[str, Any] = {"observedGeneration": generation, "url": url}
    conds = [condition("ModelValid", True, "Valid", "the spec is valid", generation, prev)]
    all_ok = True
    for role, ctype in POOL_CONDITIONS.items():
        state = pool_state(deployments.get(role))
        out[role] = state
        ok, reason, message = _pool_condition(role, state, deployments.get(role) is not None)
        all_ok = all_ok and ok
        conds.append(condition(ctype, ok, reason, message, generation, prev))
    ready_msg = "serving at " + url if all_ok else "waiting for: " + ", ".join(
        c["type"] for c in conds[1:] if c["status"] != "True")
    reason = "Serving" if all_ok else "NotReady"
    if errors:
        all_ok, reason, ready_msg = False, "ChildConflict", "; ".join(errors)
    if warnings:
        ready_msg += " (warnings: " + "; ".join(warnings) + ")"
    conds.insert(0, condition("Ready", all_ok, reason, ready_msg, generation, prev))
    out["conditions"] = conds
    return out


def invalid_status(message: str, generation: int | None, previous: dict | None = None) -> dict:
    """Status of a spec that failed validation: nothing is created or changed."""
    prev = (previous or {}).get("conditions") or []
    conds = [condition("Ready", False, "InvalidSpec", message, generation, prev),
             condition("ModelValid", False, "InvalidSpec", message, generation, prev)]
    # Keep the pools' last known conditions (children of a previously valid spec stay as they were).
    conds += [c for c in prev if c.get("type") in POOL_CONDITIONS.values()]
    return {"observedGeneration": generation, "conditions": conds}


def get_condition(status: dict | None, ctype: str) -> dict | None:
    for c in (status or {}).get("conditions") or []:
        if c.get("type") == ctype:
            return c
    return None
