"""The InferenceService CRD: example CRs against its schema, and its CEL rules.

Data flow: the CRD's ``openAPIV3Schema`` -> converted to JSON Schema (OpenAPI 3.0's boolean
``exclusiveMinimum``, ``x-kubernetes-int-or-string``) -> ``jsonschema`` validates the examples
(after applying the schema's defaults, as the API server would) -> every
``x-kubernetes-validations`` rule is compiled and evaluated with ``cel-python`` on the defaulted
examples (must pass) and on broken variants (must fail).

Not checked here: CEL cost estimation and the Kubernetes-specific CEL libraries (quantity(),
url(), ...; our rules use none), and ``x-kubernetes-list-type`` semantics. The real API server
checks those when the CRD is installed (e2e/kind).
"""

from __future__ import annotations

import glob
import os
from typing import Any, Iterator

import celpy
import jsonschema
import pytest
import yaml

from tests.charts.crd_defaults import apply_defaults

ROOT = os.path.join(os.path.dirname(__file__), "..", "..")
CRD_PATH = os.path.join(ROOT, "charts", "tandem", "crds", "inferenceservices.tandem.dev.yaml")
EXAMPLES = sorted(glob.glob(os.path.join(ROOT, "charts", "tandem", "examples", "*.yaml")))

with open(CRD_PATH) as _f:
    CRD = yaml.safe_load(_f)
SCHEMA = CRD["spec"]["versions"][0]["schema"]["openAPIV3Schema"]


def to_json_schema(node: Any) -> Any:
    if isinstance(node, list):
        return [to_json_schema(n) for n in node]
    if not isinstance(node, dict):
        return node
    out = {k: to_json_schema(v) for k, v in node.items() if not k.startswith("x-kubernetes-")}
    if node.get("exclusiveMinimum") is True:
        out["exclusiveMinimum"] = out.pop("minimum")
    if node.get("x-kubernetes-int-or-string"):
        out.pop("anyOf", None)
        out["type"] = ["integer", "string"]
    if node.get("x-kubernetes-preserve-unknown-fields"):
        out.setdefault("additionalProperties", True)
    elif out.get("type") == "object" and "properties" in out:
        out.setdefault("additionalProperties", False)  # structural: unknown fields are pruned/rejected
    if out.get("type") == "object" and "properties" in out:
        out["properties"] = {k: to_json_schema(v) for k, v in node["properties"].items()}
    return out


def rules(node: dict, path: tuple[str, ...] = ()) -> Iterator[tuple[tuple[str, ...], dict]]:
    for rule in node.get("x-kubernetes-validations") or []:
        yield path, rule
    for key, sub in (node.get("properties") or {}).items():
        yield from rules(sub, path + (key,))


def at(obj: dict, path: tuple[str, ...]) -> Any:
    for key in path:
        if not isinstance(obj, dict) or key not in obj:
            return None
        obj = obj[key]
    return obj


def cel_violations(obj: dict) -> list[str]:
    env = celpy.Environment()
    out = []
    for path, rule in rules(SCHEMA):
        target = at(obj, path)
        if target is None:
            continue  # rules only run where the field is present
        result = env.program(env.compile(rule["rule"])).evaluate({"self": celpy.json_to_cel(target)})
        if not bool(result):
            out.append(rule["message"])
    return out


def load(path: str) -> dict:
    with open(path) as f:
        return yaml.safe_load(f)


def test_crd_shape() -> None:
    assert CRD["spec"]["names"]["shortNames"] == ["tisvc"] and CRD["spec"]["scope"] == "Namespaced"
    version = CRD["spec"]["versions"][0]
    assert version["name"] == "v1alpha1" and version["subresources"] == {"status": {}}
    assert [c["name"] for c in version["additionalPrinterColumns"]] == ["Ready", "Prefill", "Decode", "URL", "Age"]
    assert len(list(rules(SCHEMA))) >= 5


@pytest.mark.parametrize("path", EXAMPLES, ids=os.path.basename)
def test_examples_match_the_schema_and_rules(path: str) -> None:
    obj = apply_defaults(SCHEMA, load(path))
    jsonschema.validate(obj, to_json_schema(SCHEMA))
    assert cel_violations(obj) == []


@pytest.mark.parametrize("mutate, where", [
    (lambda o: o["spec"]["model"].update(uri="s3://bucket/x"), "uri"),
    (lambda o: o["spec"]["decode"].update(replicas=-1), "replicas"),
    (lambda o: o["spec"].update(device="tpu"), "device"),
    (lambda o: o["spec"]["kvCache"].update(gpuMemoryUtilization=0), "gpuMemoryUtilization"),
    (lambda o: o["spec"]["prefill"].update(unknownField=1), "unknownField"),
])
def test_schema_rejects(mutate, where: str) -> None:
    obj = load(EXAMPLES[0])
    mutate(obj)
    with pytest.raises(jsonschema.ValidationError):
        jsonschema.validate(apply_defaults(SCHEMA, obj), to_json_schema(SCHEMA))


@pytest.mark.parametrize("mutate, message", [
    (lambda o: o["metadata"].update(name="x" * 51), "at most 50 characters"),
    (lambda o: o["spec"]["model"].update(uri="file:///m", hfTokenSecret="s"), "only used with hf://"),
    (lambda o: o["spec"]["kvTransfer"].update(backend="tcp", rdmaResource="rdma/ib"), "needs the nixl backend"),
    (lambda o: o["spec"]["router"]["service"].update(httpPort=9000, grpcPort=9000), "must differ"),
    (lambda o: o["spec"].update(autoscaling={"decode": {"minReplicas": 5, "maxReplicas": 2,
                                                        "targetRunningRequests": 8}}), "minReplicas must be <="),
])
def test_cel_rules_reject(mutate, message: str) -> None:
    gpu = [p for p in EXAMPLES if "gpu" in p][0]
    obj = apply_defaults(SCHEMA, load(gpu))
    assert cel_violations(obj) == []
    mutate(obj)
    assert any(message in v for v in cel_violations(apply_defaults(SCHEMA, obj)))
