"""Discovery sources feeding placement: static lists, DNS with an injected resolver, and the flag
parsing the front end's `tandem router` relies on."""

from __future__ import annotations

import argparse
import asyncio

import pytest

from tandem.router.discovery import (DnsDiscovery, KubernetesDiscovery, StaticDiscovery, parse_endpoints,
                                     selector_matches, slice_endpoints)
from tandem.router.placement import ReplicaPlacement, add_placement_arguments, build_placement


def test_parse_endpoints():
    assert parse_endpoints("a:1, b:2,,") == {"a:1", "b:2"}
    assert parse_endpoints(["a:1,b:2", "c:3"]) == {"a:1", "b:2", "c:3"}
    assert parse_endpoints(None) == set()
    with pytest.raises(ValueError):
        parse_endpoints("nohost")


def test_static_discovery_changes_reach_placement():
    async def main():
        disc = StaticDiscovery("p1:1,p2:1", ["d1:1"])
        pl = ReplicaPlacement(disc, info_interval=60)
        await pl.start()
        assert {r.endpoint for r in pl.replicas("prefill")} == {"p1:1", "p2:1"}
        disc.set("prefill", "p2:1,p3:1")
        await asyncio.sleep(0.05)
        assert {r.endpoint for r in pl.replicas("prefill")} == {"p2:1", "p3:1"}
        assert "p1:1" not in pl.index.slot_of
        await pl.stop()
    asyncio.run(main())


def test_dns_discovery_re_resolves():
    answers = {"prefill.svc": ["10.0.0.1", "10.0.0.2"], "decode.svc": ["10.0.1.1"]}
    calls = []

    async def resolver(host):
        calls.append(host)
        ans = answers[host]
        if isinstance(ans, Exception):
            raise ans
        return ans

    async def main():
        disc = DnsDiscovery("prefill.svc:50061", "decode.svc:7000", interval=0.05, resolver=resolver)
        pl = ReplicaPlacement(disc, info_interval=60)
        seen = []
        disc.subscribe(lambda pool, eps: seen.append((pool, sorted(eps))))
        await pl.start()
        assert {r.endpoint for r in pl.replicas("prefill")} == {"10.0.0.1:50061", "10.0.0.2:50061"}
        assert {r.endpoint for r in pl.replicas("decode")} == {"10.0.1.1:7000"}
        answers["prefill.svc"] = ["10.0.0.2", "10.0.0.3", "fd00::1"]     # one left, two joined
        await asyncio.sleep(0.2)
        assert {r.endpoint for r in pl.replicas("prefill")} == {"10.0.0.2:50061", "10.0.0.3:50061",
                                                                "[fd00::1]:50061"}
        answers["prefill.svc"] = OSError("NXDOMAIN")                      # a blip keeps the last set
        n = len(seen)
        await asyncio.sleep(0.2)
        assert len(pl.replicas("prefill")) == 3 and len(seen) == n
        await pl.stop()
        assert calls.count("prefill.svc") >= 4
    asyncio.run(main())


def test_dns_discovery_default_resolver_localhost():
    async def main():
        disc = DnsDiscovery("localhost:1234", None)
        await disc.resolve_once()
        assert "127.0.0.1:1234" in disc.current("prefill") or "[::1]:1234" in disc.current("prefill")
    asyncio.run(main())


def test_selector_and_slice_parsing():
    labels = {"tandem.dev/inferenceservice": "demo", "tandem.dev/role": "prefill"}
    assert selector_matches("tandem.dev/inferenceservice=demo,tandem.dev/role=prefill", labels)
    assert not selector_matches("tandem.dev/role=decode", labels)
    assert selector_matches("tandem.dev/role!=decode,tandem.dev/role,!other", labels)
    s = {"ports": [{"name": "http", "port": 8081}, {"name": "grpc", "port": 50061}],
         "endpoints": [{"addresses": ["10.1.0.5"], "conditions": {"ready": True}},
                       {"addresses": ["10.1.0.6"], "conditions": {"ready": False}},
                       {"addresses": ["10.1.0.7"]}]}
    assert slice_endpoints(s, 1) == {"10.1.0.5:50061", "10.1.0.7:50061"}
    assert slice_endpoints({"endpoints": [{"addresses": ["10.1.0.8"]}]}, 50061) == {"10.1.0.8:50061"}


def test_flags_build_placement():
    p = argparse.ArgumentParser()
    add_placement_arguments(p)
    a = p.parse_args(["--policy", "round-robin", "--prefill", "a:1,b:2", "--prefill", "c:3",
                      "--decode", "d:4", "--w-prefix", "2", "--request-cost", "64", "--approx-ttl", "5"])
    pl = build_placement(a)
    assert pl.policy == "round-robin" and pl.weights.w_prefix == 2 and pl.weights.request_cost == 64
    assert pl.discovery.current("prefill") == {"a:1", "b:2", "c:3"} and pl.index.ttl == 5
    a = p.parse_args(["--prefill-dns", "pre:50061", "--decode-dns", "dec:50061", "--info-interval", "1"])
    assert isinstance(build_placement(a).discovery, DnsDiscovery)
    # what the operator generates (tandem.operator.pods.router_args)
    a = p.parse_args(["--policy", "cache-aware", "--discovery", "kubernetes", "--namespace", "ns1",
                      "--prefill-selector", "tandem.dev/inferenceservice=x,tandem.dev/role=prefill",
                      "--decode-selector", "tandem.dev/inferenceservice=x,tandem.dev/role=decode",
                      "--worker-grpc-port", "50061"])
    disc = build_placement(a).discovery
    assert isinstance(disc, KubernetesDiscovery) and disc.namespace == "ns1" and disc.port == 50061
    assert disc.selectors["decode"].endswith("role=decode")
