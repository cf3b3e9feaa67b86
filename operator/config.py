"""Operator-wide settings (not per InferenceService).

Data flow: ``tandem operator`` (``cli.py``) turns its flags into environment variables before it
starts kopf, and the handlers read :func:`load` once at startup. Going through the environment
keeps one source of truth for both ways the operator is started: the CLI in a pod (the chart sets
the same variables) and ``kopf run -m tandem.operator.handlers`` in tests.
"""

from __future__ import annotations

import os
from dataclasses import dataclass

DEFAULT_IMAGE = "ghcr.io/tandem-llm/tandem:0.1.0"


@dataclass(frozen=True)
class OperatorConfig:
    image: str = DEFAULT_IMAGE            # used when spec.image is empty
    cluster_domain: str = "cluster.local"  # for status.url
    resync_seconds: float = 30.0           # level-based reconcile period (drift repair)
    field_manager: str = "tandem-operator"


ENV = {
    "image": "TANDEM_OPERATOR_IMAGE",
    "cluster_domain": "TANDEM_CLUSTER_DOMAIN",
    "resync_seconds": "TANDEM_RESYNC_SECONDS",
}


def load(environ: dict[str, str] | None = None) -> OperatorConfig:
    env = os.environ if environ is None else environ
    base = OperatorConfig()
    return OperatorConfig(
        image=env.get(ENV["image"]) or base.image,
        cluster_domain=env.get(ENV["cluster_domain"]) or base.cluster_domain,
        resync_seconds=float(env.get(ENV["resync_seconds"]) or base.resync_seconds),
    )
