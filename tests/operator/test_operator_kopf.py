"""The real operator (kopf, ``kopf.testing.KopfRunner``) against a fake API server (kmock).

One emulator and one operator run for the whole module (starting kopf costs a second); each test
uses its own InferenceService name. The resync timer runs every second, so drift repair is
observable quickly. What kmock cannot show: it has no controllers (Deployments never become ready
unless a test patches their status) and no garbage collector (deleting an owner leaves its
children; we check their owner references instead).
"""

from __future__ import annotations

import logging
import os
import time

import kopf
import pytest
from kopf.testing import KopfRunner

from kmock_cluster import Cluster, wait_for

NS = "default"
ISVC = f"/apis/tandem.dev/v1alpha1/namespaces/{NS}/inferenceservices"
DEPLOY = f"/apis/apps/v1/namespaces/{NS}/deployments"
SVC = f"/api/v1/namespaces/{NS}/services"
CM = f"/api/v1/namespaces/{NS}/configmaps"
HPA = f"/apis/autoscaling/v2/namespaces/{NS}/horizontalpodautoscalers"
PDB = f"/apis/policy/v1/namespaces/{NS}/poddisruptionbudgets"
PODMON = f"/apis/monitoring.coreos.com/v1/namespaces/{NS}/podmonitors"


@kopf.on.login()
def _login(**kwargs):  # kopf runs in a thread here: point it at the kmock kubeconfig explicitly
    return kopf.login_with_kubeconfig(**kwargs)


@pytest.fixture(scope="module")
def operator_cluster():
    logging.getLogger("aiohttp.access").setLevel(logging.WARNING)  # one line per request otherwise
    with Cluster() as c:
        old = {k: os.environ.get(k) for k in ("KUBECONFIG", "TANDEM_RESYNC_SECONDS", "TANDEM_OPERATOR_IMAGE")}
        os.environ.update(KUBECONFIG=c.kubeconfig, TANDEM_RESYNC_SECONDS="1",
                          TANDEM_OPERATOR_IMAGE="tandem:test")
        args = ["run", "-m", "tandem.operator.handlers", "--standalone", "--all-namespaces"]
        with KopfRunner(args, timeout=30) as runner:
            yield c
        for k, v in old.items():
            if v is None:
                os.environ.pop(k, None)
            else:
                os.environ[k] = v
    assert runner.exception is None, runner.output[-3000:]


@pytest.fixture
def cluster(operator_cluster: Cluster):
    """Deletes the test's InferenceServices afterwards, so the resync timers of earlier tests
    do not pile up on a 2-core CI machine."""
    before = {o["metadata"]["name"] for o in operator_cluster.items(ISVC)}
    yield operator_cluster
    for o in operator_cluster.items(ISVC):
        if o["metadata"]["name"] not in before:
            operator_cluster.delete(f"{ISVC}/{o['metadata']['name']}")


def isvc(name: str, **spec) -> dict:
    body = {"model": {"uri": "file:///models/demo"}, "device": "cpu", **spec}
    return {"apiVersion": "tandem.dev/v1alpha1", "kind": "InferenceService",
            "metadata": {"name": name, "namespace": NS}, "spec": body}


def condition(c: Cluster, name: str, ctype: str) -> dict | None:
    for cond in ((c.get(f"{ISVC}/{name}") or {}).get("status") or {}).get("conditions") or []:
        if cond["type"] == ctype:
            return cond
    return None


def args_of(dep: dict) -> list[str]:
    return dep["spec"]["template"]["spec"]["containers"][0]["args"]


def test_create_makes_every_child_with_owner_references(cluster: Cluster) -> None:
    owner = cluster.create(ISVC, isvc("create"))
    dep = wait_for(lambda: cluster.get(f"{DEPLOY}/create-router"), what="router Deployment")
    paths = [f"{DEPLOY}/create-prefill", f"{DEPLOY}/create-decode", f"{DEPLOY}/create-router",
             f"{SVC}/create", f"{SVC}/create-prefill", f"{SVC}/create-decode", f"{CM}/create-config",
             f"/api/v1/namespaces/{NS}/serviceaccounts/create-router",
             f"/apis/rbac.authorization.k8s.io/v1/namespaces/{NS}/roles/create-router",
             f"/apis/rbac.authorization.k8s.io/v1/namespaces/{NS}/rolebindings/create-router",
             f"{PDB}/create-prefill", f"{PDB}/create-decode", f"{PDB}/create-router"]
    for path in paths:
        child = wait_for(lambda: cluster.get(path), what=path)
        (ref,) = child["metadata"]["ownerReferences"]
        assert ref["uid"] == owner["metadata"]["uid"] and ref["controller"] and ref["blockOwnerDeletion"]
    assert cluster.get(f"{HPA}/create-prefill") is None and cluster.get(f"{PODMON}/create") is None
    assert dep["spec"]["template"]["spec"]["containers"][0]["image"] == "tandem:test"
    valid = wait_for(lambda: condition(cluster, "create", "ModelValid"), what="ModelValid")
    assert valid["status"] == "True"
    st = cluster.get(f"{ISVC}/create")["status"]
    assert st["url"] == "http://create.default.svc.cluster.local:8000"
    assert st["observedGeneration"] == 1 and st["decode"]["summary"] == "0/1"
    assert condition(cluster, "create", "Ready")["status"] == "False"
    assert "tandem.dev/finalizer" in cluster.get(f"{ISVC}/create")["metadata"]["finalizers"]


def test_ready_when_deployments_report_ready(cluster: Cluster) -> None:
    cluster.create(ISVC, isvc("ready", decode={"replicas": 2}))
    for role, n in (("prefill", 1), ("decode", 2), ("router", 1)):
        wait_for(lambda: cluster.get(f"{DEPLOY}/ready-{role}"), what=role)
        # what the Deployment controller would write; the child event updates the owner at once
        cluster.patch(f"{DEPLOY}/ready-{role}/status", {"status": {"readyReplicas": n, "updatedReplicas": n}})
    ready = wait_for(lambda: (condition(cluster, "ready", "Ready") or {}).get("status") == "True"
                     and condition(cluster, "ready", "Ready"), what="Ready=True")
    assert ready["reason"] == "Serving"
    assert cluster.get(f"{ISVC}/ready")["status"]["decode"]["summary"] == "2/2"


def test_scale_changes_only_replicas(cluster: Cluster) -> None:
    cluster.create(ISVC, isvc("scale"))
    before = wait_for(lambda: cluster.get(f"{DEPLOY}/scale-decode"), what="decode")
    cluster.patch(f"{ISVC}/scale", {"spec": {"decode": {"replicas": 3}}})
    after = wait_for(lambda: (d := cluster.get(f"{DEPLOY}/scale-decode"))["spec"]["replicas"] == 3 and d,
                     what="decode scaled to 3")
    assert after["spec"]["template"] == before["spec"]["template"]  # scaling restarts nothing
    wait_for(lambda: cluster.get(f"{ISVC}/scale")["status"]["observedGeneration"] == 2, what="generation 2")


def test_spec_change_rolls_out(cluster: Cluster) -> None:
    cluster.create(ISVC, isvc("edit"))
    before = wait_for(lambda: cluster.get(f"{DEPLOY}/edit-prefill"), what="prefill")
    assert "float16" not in args_of(before)
    cluster.patch(f"{ISVC}/edit", {"spec": {"model": {"dtype": "float16"}, "image": "tandem:v2"}})
    for role in ("prefill", "decode", "router"):
        dep = wait_for(lambda: (d := cluster.get(f"{DEPLOY}/edit-{role}"))["spec"]["template"]["spec"][
            "containers"][0]["image"] == "tandem:v2" and d, what=f"{role} on the new image")
        if role != "router":
            assert args_of(dep)[args_of(dep).index("--dtype") + 1] == "float16"
    new = cluster.get(f"{DEPLOY}/edit-prefill")["spec"]["template"]["metadata"]["annotations"]
    assert new["tandem.dev/config-hash"] != before["spec"]["template"]["metadata"]["annotations"][
        "tandem.dev/config-hash"]


def test_drift_is_repaired(cluster: Cluster) -> None:
    cluster.create(ISVC, isvc("drift"))
    wait_for(lambda: cluster.get(f"{SVC}/drift-decode"), what="decode Service")
    orig = wait_for(lambda: cluster.get(f"{DEPLOY}/drift-prefill"), what="prefill")
    # deleted by hand -> recreated
    assert cluster.delete(f"{SVC}/drift-decode") == 200
    assert cluster.delete(f"{CM}/drift-config") == 200
    wait_for(lambda: cluster.get(f"{SVC}/drift-decode"), what="decode Service recreated")
    wait_for(lambda: cluster.get(f"{CM}/drift-config"), what="ConfigMap recreated")
    # edited by hand -> reverted
    cluster.patch(f"{DEPLOY}/drift-prefill", {"spec": {"replicas": 5, "template": {"spec": {"containers": [
        {"name": "prefill", "image": "evil:latest", "args": ["sleep"]}]}}}})
    fixed = wait_for(lambda: (d := cluster.get(f"{DEPLOY}/drift-prefill"))["spec"]["replicas"] == 1
                     and args_of(d) == args_of(orig) and d, what="prefill Deployment reverted")
    assert fixed["spec"]["template"]["spec"]["containers"][0]["image"] == "tandem:test"
    # deleted Deployment -> recreated (the child watch reacts at once)
    assert cluster.delete(f"{DEPLOY}/drift-router") == 200
    wait_for(lambda: cluster.get(f"{DEPLOY}/drift-router"), what="router Deployment recreated")


def test_autoscaling_and_pod_monitor_come_and_go(cluster: Cluster) -> None:
    cluster.create(ISVC, isvc("auto", monitoring={"podMonitor": True}, autoscaling={
        "decode": {"minReplicas": 2, "maxReplicas": 6, "targetRunningRequests": 64}}))
    hpa = wait_for(lambda: cluster.get(f"{HPA}/auto-decode"), what="decode HPA")
    assert hpa["spec"]["maxReplicas"] == 6
    assert wait_for(lambda: cluster.get(f"{PODMON}/auto"), what="PodMonitor")
    dep = wait_for(lambda: cluster.get(f"{DEPLOY}/auto-decode"), what="decode")
    assert dep["spec"]["replicas"] == 2
    cluster.patch(f"{DEPLOY}/auto-decode", {"spec": {"replicas": 5}})  # what the HPA would do
    time.sleep(2.5)  # two resync periods: the operator must leave the HPA's choice alone
    assert cluster.get(f"{DEPLOY}/auto-decode")["spec"]["replicas"] == 5
    cluster.patch(f"{ISVC}/auto", {"spec": {"autoscaling": None, "monitoring": {"podMonitor": False}}})
    wait_for(lambda: cluster.get(f"{HPA}/auto-decode") is None, what="HPA deleted")
    wait_for(lambda: cluster.get(f"{PODMON}/auto") is None, what="PodMonitor deleted")
    wait_for(lambda: cluster.get(f"{DEPLOY}/auto-decode")["spec"]["replicas"] == 1, what="replicas managed again")


def test_invalid_spec_creates_nothing_then_recovers(cluster: Cluster) -> None:
    body = isvc("bad")
    body["spec"]["model"]["uri"] = "s3://bucket/model"
    cluster.create(ISVC, body)
    cond = wait_for(lambda: condition(cluster, "bad", "ModelValid"), what="ModelValid")
    assert cond["status"] == "False" and cond["reason"] == "InvalidSpec"
    assert "scheme must be hf://, pvc:// or file:///" in cond["message"]
    assert condition(cluster, "bad", "Ready")["status"] == "False"
    time.sleep(1.5)  # a resync later, still nothing
    names = [o["metadata"]["name"] for path in (DEPLOY, SVC, CM) for o in cluster.items(path)]
    assert not [n for n in names if n.startswith("bad")]
    cluster.patch(f"{ISVC}/bad", {"spec": {"model": {"uri": "file:///models/demo"}}})
    wait_for(lambda: cluster.get(f"{DEPLOY}/bad-decode"), what="children after the fix")
    wait_for(lambda: (condition(cluster, "bad", "ModelValid") or {}).get("status") == "True", what="valid")


def test_foreign_object_is_not_taken_over(cluster: Cluster) -> None:
    cluster.create(CM, {"apiVersion": "v1", "kind": "ConfigMap",
                        "metadata": {"name": "clash-config", "namespace": NS}, "data": {"mine": "yes"}})
    cluster.create(ISVC, isvc("clash"))
    cond = wait_for(lambda: (c := condition(cluster, "clash", "Ready")) and c["reason"] == "ChildConflict" and c,
                    what="ChildConflict")
    assert "ConfigMap/clash-config" in cond["message"]
    assert cluster.get(f"{CM}/clash-config")["data"] == {"mine": "yes"}


def test_delete_releases_the_finalizer_and_stops_reconciling(cluster: Cluster) -> None:
    owner = cluster.create(ISVC, isvc("gone"))
    wait_for(lambda: cluster.get(f"{DEPLOY}/gone-decode"), what="children")
    wait_for(lambda: "tandem.dev/finalizer" in cluster.get(f"{ISVC}/gone")["metadata"].get("finalizers", []),
             what="finalizer")
    assert cluster.delete(f"{ISVC}/gone") == 200
    wait_for(lambda: cluster.get(f"{ISVC}/gone") is None, what="InferenceService gone")
    # kmock has no garbage collector: the API server would delete these through their owner refs
    dep = cluster.get(f"{DEPLOY}/gone-decode")
    assert dep["metadata"]["ownerReferences"][0]["uid"] == owner["metadata"]["uid"]
    cluster.delete(f"{SVC}/gone-decode")
    time.sleep(2.5)  # no resurrection by a timer of a deleted owner
    assert cluster.get(f"{SVC}/gone-decode") is None
