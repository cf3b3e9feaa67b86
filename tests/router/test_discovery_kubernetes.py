"""KubernetesDiscovery (EndpointSlice list + watch by label selector) against kmock's emulated API
server (tests/operator/kmock_cluster.py), driving a real ReplicaPlacement: replicas joining,
turning unready and leaving take effect without a restart.

kmock ignores label selectors and resourceVersions and replays every object at the start of a
watch; the discovery filters labels itself and treats replays as idempotent upserts, so the
same code runs against a real API server."""

from __future__ import annotations

import asyncio
import os
import sys

import pytest

pytest.importorskip("kmock")
pytest.importorskip("kubernetes")
sys.path.insert(0, os.path.join(os.path.dirname(__file__), "..", "operator"))

from kmock_cluster import Cluster  # noqa: E402

from placement_fakes import wait_for  # noqa: E402
from tandem.router.discovery import KubernetesDiscovery  # noqa: E402
from tandem.router.placement import ReplicaPlacement  # noqa: E402

NS = "default"
SLICES = f"/apis/discovery.k8s.io/v1/namespaces/{NS}/endpointslices"
SEL = {role: f"tandem.dev/inferenceservice=demo,tandem.dev/role={role}" for role in ("prefill", "decode")}


def eslice(name, role, addrs, isvc="demo", unready=()):
    return {
        "apiVersion": "discovery.k8s.io/v1", "kind": "EndpointSlice",
        "metadata": {"name": name, "namespace": NS,
                     "labels": {"tandem.dev/inferenceservice": isvc, "tandem.dev/role": role,
                                "kubernetes.io/service-name": f"{isvc}-{role}"}},
        "addressType": "IPv4",
        "ports": [{"name": "grpc", "port": 50061, "protocol": "TCP"},
                  {"name": "http", "port": 8081, "protocol": "TCP"}],
        "endpoints": [{"addresses": [a], "conditions": {"ready": a not in unready}} for a in addrs],
    }


@pytest.fixture(scope="module")
def cluster():
    with Cluster(monitoring=False,
                 extra={"discovery.k8s.io/v1/endpointslices": ("EndpointSlice", True, set())}) as c:
        yield c


def eps(pl, pool):
    return {r.endpoint for r in pl.replicas(pool)}


def test_endpointslice_watch_drives_placement(cluster):
    cluster.create(SLICES, eslice("demo-prefill-a", "prefill", ["10.0.0.1", "10.0.0.2"]))
    cluster.create(SLICES, eslice("demo-decode-a", "decode", ["10.0.1.1"]))
    cluster.create(SLICES, eslice("other-prefill", "prefill", ["10.9.9.9"], isvc="other"))

    async def main():
        disc = KubernetesDiscovery(NS, SEL, port=1, kubeconfig=cluster.kubeconfig, watch_timeout=2)
        pl = ReplicaPlacement(disc, info_interval=60)
        await pl.start()
        # the first listing is in place when start() returns
        assert eps(pl, "prefill") == {"10.0.0.1:50061", "10.0.0.2:50061"}
        assert eps(pl, "decode") == {"10.0.1.1:50061"}
        # a second slice of the same pool joins (large pools are split over several slices)
        await asyncio.to_thread(cluster.create, SLICES, eslice("demo-prefill-b", "prefill", ["10.0.0.3"]))
        await wait_for(lambda: eps(pl, "prefill") == {"10.0.0.1:50061", "10.0.0.2:50061", "10.0.0.3:50061"},
                       what="slice b joins")
        # a pod turns unready (e.g. draining): it leaves the pool
        await asyncio.to_thread(cluster.patch, f"{SLICES}/demo-prefill-a",
                                {"endpoints": eslice("x", "prefill", ["10.0.0.1", "10.0.0.2"],
                                                     unready=("10.0.0.1",))["endpoints"]})
        await wait_for(lambda: eps(pl, "prefill") == {"10.0.0.2:50061", "10.0.0.3:50061"}, what="unready")
        assert "10.0.0.1:50061" not in pl.index.slot_of
        # a whole slice goes away; the decode pool is untouched
        await asyncio.to_thread(cluster.delete, f"{SLICES}/demo-prefill-b")
        await wait_for(lambda: eps(pl, "prefill") == {"10.0.0.2:50061"}, what="slice b deleted")
        assert eps(pl, "decode") == {"10.0.1.1:50061"}
        # other services' slices never leak in
        assert not any(e.startswith("10.9.") for e in eps(pl, "prefill"))
        await pl.stop()
    asyncio.run(main())
