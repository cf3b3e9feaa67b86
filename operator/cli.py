"""Command line of the operator: ``tandem operator`` and ``python -m tandem.operator``.

Data flow: flags -> environment variables read by ``config.load()`` (so that a plain
``kopf run -m tandem.operator.handlers`` sees the same settings) -> import of ``handlers`` (which
registers them with kopf) -> ``kopf.run`` until SIGTERM.

Leader election: kopf *peering*. Every replica keeps itself alive in a peering object
(``ClusterKopfPeering`` when watching all namespaces, ``KopfPeering`` in each watched namespace
otherwise; the chart installs both CRDs and the object). A replica pauses while a live peer of a
higher priority exists, so with a distinct random priority per replica (the default) exactly one
replica works and the others are hot standbys that take over when its keep-alive expires (about a
minute). Equal priorities make kopf pause *all* of them: give explicit priorities only if they
differ. ``--standalone`` skips peering (a single replica, or tests).
"""

from __future__ import annotations

import argparse
import logging
import os
import random

from .config import DEFAULT_IMAGE, ENV


def build_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(
        prog="tandem operator",
        description="Run the Tandem Kubernetes operator: reconciles InferenceService "
                    "(tandem.dev/v1alpha1) objects into prefill, decode and router Deployments, "
                    "Services, RBAC, PodDisruptionBudgets, HPAs and PodMonitors.",
        formatter_class=argparse.ArgumentDefaultsHelpFormatter)
    scope = p.add_mutually_exclusive_group()
    scope.add_argument("-n", "--namespace", action="append", default=[], metavar="NS",
                       help="watch only this namespace (repeatable; globs like 'team-*' work)")
    scope.add_argument("-A", "--all-namespaces", action="store_true",
                       help="watch every namespace (the default when no --namespace is given)")
    p.add_argument("--image", default=os.environ.get(ENV["image"], DEFAULT_IMAGE),
                   help=f"image for pods whose spec.image is empty (env {ENV['image']})")
    p.add_argument("--cluster-domain", default=os.environ.get(ENV["cluster_domain"], "cluster.local"),
                   help="DNS domain used to build status.url")
    p.add_argument("--resync-seconds", type=float,
                   default=float(os.environ.get(ENV["resync_seconds"], "30")),
                   help="period of the level-based reconcile that repairs drift")
    peer = p.add_mutually_exclusive_group()
    peer.add_argument("--peering", default="tandem", metavar="NAME",
                      help="kopf peering object used for leader election")
    peer.add_argument("--standalone", action="store_true",
                      help="no peering: only for a single replica (or tests)")
    p.add_argument("--priority", default="random",
                   help="peering priority: an integer, or 'random' (a distinct one per replica)")
    p.add_argument("--liveness", default="http://0.0.0.0:8080/healthz", metavar="URL",
                   help="kopf liveness endpoint ('' disables it)")
    p.add_argument("-v", "--verbose", action="store_true", help="verbose logging")
    p.add_argument("--debug", action="store_true", help="debug logging (very noisy)")
    return p


def main(argv: list[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    os.environ[ENV["image"]] = args.image
    os.environ[ENV["cluster_domain"]] = args.cluster_domain
    os.environ[ENV["resync_seconds"]] = str(args.resync_seconds)

    import kopf  # late: --help works without the k8s extra installed

    from . import handlers  # noqa: F401  (registers the handlers)

    priority = (random.SystemRandom().randint(1, 2**31 - 1) if args.priority == "random"
                else int(args.priority))
    kopf.configure(verbose=args.verbose, debug=args.debug)
    logging.getLogger("tandem.operator").setLevel(logging.DEBUG if args.verbose else logging.INFO)
    kopf.run(
        clusterwide=not args.namespace,
        namespaces=args.namespace,
        standalone=args.standalone,
        peering_name=None if args.standalone else args.peering,
        priority=priority,
        liveness_endpoint=args.liveness or None,
    )
    return 0
