"""The Helm chart through the real Helm engine: lint, install into kmock, schema-check.

Data flow: this test (in .venv) writes the value sets to check into a JSON file and runs
``tests/charts/helm_check.py`` with the Python 3.12 environment ``.venv-helm`` (helm-sdkpy needs
3.12), with ``HELM_DRIVER=memory``; that script lints the chart, installs each value set into a
fresh kmock API server and validates every rendered object with kubernetes-validate (Kubernetes
1.33 schemas), then prints one JSON report that the assertions below read.
"""

from __future__ import annotations

import json
import os
import subprocess
import sys

import pytest

ROOT = os.path.abspath(os.path.join(os.path.dirname(__file__), "..", ".."))
CHART = os.path.join(ROOT, "charts", "tandem")
HELM_PYTHON = os.environ.get("TANDEM_HELM_PYTHON", os.path.join(ROOT, ".venv-helm", "bin", "python"))
# Custom resources with no upstream OpenAPI schema (checked by shape below instead).
NO_SCHEMA_KINDS = {"ClusterKopfPeering", "KopfPeering", "ServiceMonitor"}

CASES = [
    {"name": "defaults"},
    {"name": "namespaced", "values": {
        "operator": {"watchNamespaces": ["team-a", "team-b"], "replicas": 2, "verbose": True},
        "serviceMonitor": {"enabled": True, "labels": {"release": "prom"}},
        "dashboards": {"enabled": True}}},
    {"name": "standalone", "values": {"operator": {"peering": {"enabled": False},
                                                   "image": {"repository": "reg/tandem", "tag": "dev"}}}},
    {"name": "bad-value", "values": {"operator": {"replicas": "two"}}},
    {"name": "replicas-without-peering", "values": {"operator": {"replicas": 2, "peering": {"enabled": False}}}},
]


@pytest.fixture(scope="module")
def report(tmp_path_factory: pytest.TempPathFactory) -> dict:
    if not os.path.exists(HELM_PYTHON):
        if os.environ.get("CI"):
            pytest.fail(f"{HELM_PYTHON} missing: `make test` creates it")
        pytest.skip(f"{HELM_PYTHON} missing: run `make k8s-deps`")
    cases = tmp_path_factory.mktemp("helm") / "cases.json"
    cases.write_text(json.dumps(CASES))
    proc = subprocess.run(
        [HELM_PYTHON, os.path.join(ROOT, "tests", "charts", "helm_check.py"), CHART, str(cases),
         "--k8s-version", "1.33"],
        env={**os.environ, "HELM_DRIVER": "memory"}, capture_output=True, text=True, timeout=180)
    assert proc.returncode == 0, proc.stderr[-3000:]
    return json.loads(proc.stdout)


def case(report: dict, name: str) -> dict:
    return next(c for c in report["cases"] if c["name"] == name)


def objects(c: dict) -> dict[str, dict]:
    return {o["key"]: o["object"] for o in c["objects"]}


def test_lint_passes(report: dict) -> None:
    lint = report["lint"]
    assert lint.get("Errors") in (None, []), lint
    assert all(m.get("Severity", 0) < 2 for m in lint.get("Messages") or []), lint  # 2+ = warning/error


def test_crds_validate(report: dict) -> None:
    assert report["crds"]["errors"] == []
    keys = {o["key"] for o in report["crds"]["objects"]}
    assert keys == {"CustomResourceDefinition/inferenceservices.tandem.dev",
                    "CustomResourceDefinition/clusterkopfpeerings.kopf.dev",
                    "CustomResourceDefinition/kopfpeerings.kopf.dev"}


@pytest.mark.parametrize("name", ["defaults", "namespaced", "standalone"])
def test_install_renders_valid_objects(report: dict, name: str) -> None:
    c = case(report, name)
    assert c["installed"], c.get("error")
    assert c["errors"] == [], c["errors"]
    assert {k.split("/")[0] for k in c["no_schema"]} <= NO_SCHEMA_KINDS
    assert any(s.startswith("customresourcedefinitions//inferenceservices.tandem.dev") for s in c["stored"])
    assert "tisvc" in c["notes"]


def test_default_install(report: dict) -> None:
    objs = objects(case(report, "defaults"))
    dep = objs["Deployment/tandem-operator"]
    container = dep["spec"]["template"]["spec"]["containers"][0]
    assert container["command"] == ["python", "-m", "tandem.operator"]
    assert "--all-namespaces" in container["args"] and "--peering=tandem" in container["args"]
    env = {e["name"]: e["value"] for e in container["env"]}
    assert env["TANDEM_OPERATOR_IMAGE"] == "ghcr.io/tandem-llm/tandem:0.1.0"
    assert container["securityContext"]["readOnlyRootFilesystem"] is True
    assert "ClusterKopfPeering/tandem" in objs
    assert "ClusterRoleBinding/tandem-operator-workloads" in objs
    rules = objs["ClusterRole/tandem-operator-workloads"]["rules"]
    verbs = {(g, r): set(rule["verbs"]) for rule in rules for g in rule["apiGroups"] for r in rule["resources"]}
    assert verbs[("apps", "deployments")] == {"get", "list", "watch", "create", "patch", "delete"}
    assert verbs[("", "services")] == {"get", "create", "patch", "delete"}  # no list/watch needed
    assert verbs[("discovery.k8s.io", "endpointslices")] == {"get", "list", "watch"}  # to grant the router
    assert not any("*" in rule["verbs"] or "*" in rule["resources"] for rule in rules)
    assert not any(k.startswith("ServiceMonitor/") or "dashboard" in k for k in objs)


def test_namespaced_install(report: dict) -> None:
    objs = objects(case(report, "namespaced"))
    args = objs["Deployment/tandem-operator"]["spec"]["template"]["spec"]["containers"][0]["args"]
    assert "--namespace=team-a" in args and "--namespace=team-b" in args and "--verbose" in args
    assert "ClusterRoleBinding/tandem-operator-workloads" not in objs
    stored = case(report, "namespaced")["stored"]
    assert "rolebindings/team-a/tandem-operator-workloads" in stored
    assert "kopfpeerings/team-b/tandem" in stored
    sm = objs["ServiceMonitor/tandem-inference"]
    assert sm["metadata"]["labels"]["release"] == "prom"
    assert sm["spec"]["namespaceSelector"] == {"matchNames": ["team-a", "team-b"]}
    boards = [o for k, o in objs.items() if k.startswith("ConfigMap/") and "dashboard" in k]
    assert len(boards) == 4
    for cm in boards:
        assert cm["metadata"]["labels"]["grafana_dashboard"] == "1"
        (body,) = cm["data"].values()
        assert json.loads(body)["uid"].startswith("tandem-")


def test_standalone_install(report: dict) -> None:
    objs = objects(case(report, "standalone"))
    spec = objs["Deployment/tandem-operator"]["spec"]
    container = spec["template"]["spec"]["containers"][0]
    assert "--standalone" in container["args"] and container["image"] == "reg/tandem:dev"
    assert spec["strategy"]["type"] == "Recreate"
    assert not any(k.startswith("ClusterKopfPeering/") for k in objs)


def test_values_schema_rejects_bad_values(report: dict) -> None:
    c = case(report, "bad-value")
    assert not c["installed"] and "replicas" in c["error"]


def test_replicas_need_peering(report: dict) -> None:
    c = case(report, "replicas-without-peering")
    assert not c["installed"] and "needs operator.peering.enabled" in c["error"]
