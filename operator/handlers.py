"""kopf handlers: thin glue that calls :func:`reconcile.reconcile` at the right moments.

Data flow: kopf watches InferenceServices (and the Deployments the operator labels as its own).
Every trigger funnels into :func:`_converge`, which holds a per-object lock, runs the synchronous
reconcile in a worker thread and returns. Triggers:

* create / update of ``spec`` / resume after an operator restart: roll the change out now;
* a timer every ``TANDEM_RESYNC_SECONDS`` (default 30): level-based repair of drift (a child
  edited or deleted by hand) and a status refresh even if no event was seen;
* an event on a child Deployment (deleted, edited, readiness changed): repair and refresh the
  owner's status at once, without waiting for the timer.

Deletion needs no handler work: every child carries an owner reference, so the API server's
garbage collector removes them. kopf does put a finalizer (``tandem.dev/finalizer``) on each
InferenceService, because it must stop the object's timer before the object goes; the operator
removes it on deletion. Delete InferenceServices before uninstalling the operator, or remove
the finalizer by hand.

Loaded by ``tandem operator`` (``cli.py``) or directly: ``kopf run -m tandem.operator.handlers``.
"""

from __future__ import annotations

import asyncio
import logging
import os

import kopf
import kubernetes

from . import config as config_mod
from .kube import Kube
from .reconcile import API_VERSION, reconcile
from .spec import GROUP, KIND, PLURAL, VERSION

CONFIG = config_mod.load()  # read at import: the timer interval is fixed at registration
_locks: dict[str, asyncio.Lock] = {}
_kube: Kube | None = None


def _client() -> Kube:
    global _kube
    if _kube is None:
        try:
            kubernetes.config.load_incluster_config()
        except kubernetes.config.ConfigException:
            # Explicit path: the client reads $KUBECONFIG only once, when first imported.
            kubernetes.config.load_kube_config(config_file=os.environ.get("KUBECONFIG"))
        _kube = Kube(field_manager=CONFIG.field_manager)
    return _kube


@kopf.on.startup()
def configure(settings: kopf.OperatorSettings, logger: logging.Logger, **_) -> None:
    global _kube, CONFIG
    CONFIG = config_mod.load()
    _kube = None  # (re)load credentials for this run
    # Keep kopf's bookkeeping in annotations: our structural schema has no status.kopf field.
    settings.persistence.progress_storage = kopf.AnnotationsProgressStorage(prefix=GROUP)
    settings.persistence.diffbase_storage = kopf.AnnotationsDiffBaseStorage(
        prefix=GROUP, key="last-handled-configuration")
    settings.persistence.finalizer = f"{GROUP}/finalizer"
    settings.posting.level = logging.WARNING  # Kubernetes Events only for problems
    settings.watching.server_timeout = 300
    settings.watching.client_timeout = 330
    settings.networking.request_timeout = 60
    # Deleting an InferenceService waits for its resync timer to stop. A timer caught inside a
    # reconcile (a thread doing API calls) cannot exit within kopf's few instant cycles, and kopf
    # then re-checks only every `cancellation_polling` seconds (60 by default): deletions would
    # hang for up to a minute. Re-check every second instead.
    settings.background.cancellation_polling = 1
    logger.info("tandem operator: default image %s, resync every %ss",
                CONFIG.image, CONFIG.resync_seconds)


async def _converge(body: dict, logger: logging.Logger) -> None:
    meta = body["metadata"]
    key = f"{meta['namespace']}/{meta['name']}"
    lock = _locks.setdefault(key, asyncio.Lock())
    async with lock:
        kube = _client()
        # Re-read: a queued trigger may be older than the object (or the object may be gone).
        fresh = await asyncio.to_thread(kube.get, API_VERSION, KIND, meta["namespace"], meta["name"])
        if fresh is None or fresh["metadata"].get("deletionTimestamp"):
            return
        if fresh["metadata"].get("uid") != meta.get("uid"):
            return  # deleted and re-created under the same name: its own handlers run
        outcome = await asyncio.to_thread(reconcile, kube, fresh, CONFIG)
    if not outcome.valid:
        message = outcome.status["conditions"][1]["message"]
        kopf.warn(fresh, reason="InvalidSpec", message=message)
        logger.warning("invalid spec: %s", message)
    for problem in outcome.errors:
        kopf.warn(fresh, reason="ChildConflict", message=problem)


@kopf.on.resume(GROUP, VERSION, PLURAL)
@kopf.on.create(GROUP, VERSION, PLURAL)
@kopf.on.update(GROUP, VERSION, PLURAL, field="spec")
async def on_change(body: kopf.Body, logger: logging.Logger, **_) -> None:
    await _converge(dict(body), logger)


@kopf.timer(GROUP, VERSION, PLURAL, interval=CONFIG.resync_seconds, initial_delay=CONFIG.resync_seconds)
async def resync(body: kopf.Body, logger: logging.Logger, **_) -> None:
    await _converge(dict(body), logger)


@kopf.on.event("apps", "v1", "deployments", labels={"app.kubernetes.io/managed-by": "tandem-operator"})
async def on_child_event(event: kopf.RawEvent, body: kopf.Body, logger: logging.Logger, **_) -> None:
    owners = [ref for ref in body.get("metadata", {}).get("ownerReferences") or []
              if ref.get("kind") == KIND and ref.get("apiVersion") == API_VERSION]
    if not owners or event.get("type") is None:  # None: the initial listing, the timer covers it
        return
    meta = body["metadata"]
    owner = {"metadata": {"name": owners[0]["name"], "namespace": meta["namespace"],
                          "uid": owners[0]["uid"]}}
    await _converge(owner, logger)


@kopf.on.delete(GROUP, VERSION, PLURAL, optional=True)
def on_delete(body: kopf.Body, logger: logging.Logger, **_) -> None:
    _locks.pop(f"{body['metadata']['namespace']}/{body['metadata']['name']}", None)
    logger.info("deleted; its children go with it (ownerReferences, garbage collection)")
