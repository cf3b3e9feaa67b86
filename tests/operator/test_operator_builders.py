"""Unit tests of the pure parts of the operator: spec parsing, builders, drift, status, CLI.

No cluster: every built object is validated against the Kubernetes 1.33 OpenAPI schemas with
kubernetes-validate (the PodMonitor, a Prometheus Operator CRD, has no upstream schema and is
checked by shape only).
"""

from __future__ import annotations

import copy
import os

import kubernetes_validate
import pytest
import yaml

from tandem.operator import cli, objects, pods, status
from tandem.operator.reconcile import drifted
from tandem.operator.spec import SpecError, parse_spec
from tests.charts.crd_defaults import apply_defaults

ROOT = os.path.join(os.path.dirname(__file__), "..", "..")
EXAMPLES = os.path.join(ROOT, "charts", "tandem", "examples")
CRD = os.path.join(ROOT, "charts", "tandem", "crds", "inferenceservices.tandem.dev.yaml")
K8S = "1.33"


def example(name: str) -> dict:
    with open(os.path.join(EXAMPLES, name)) as f:
        return yaml.safe_load(f)


def parse(spec: dict, name: str = "svc") -> object:
    return parse_spec(name, "ns1", spec, "img:1")


def by_key(objs: list[dict]) -> dict[str, dict]:
    return {f"{o['kind']}/{o['metadata']['name']}": o for o in objs}


GPU = example("llama3-8b-gpu-rdma.yaml")
DEMO = example("demo-cpu.yaml")


@pytest.mark.parametrize("doc", [GPU, DEMO], ids=["gpu", "demo"])
def test_every_built_object_validates(doc: dict) -> None:
    isvc = parse_spec(doc["metadata"]["name"], "ns1", doc["spec"], "img:1")
    objs = objects.build_all(isvc)
    assert objs
    for obj in objs:
        if obj["kind"] == "PodMonitor":
            assert obj["spec"]["podMetricsEndpoints"][0]["port"] == "http"
            continue
        kubernetes_validate.validate(obj, K8S, strict=True)


def test_children_of_the_gpu_example() -> None:
    objs = by_key(objects.build_all(parse_spec("llama3-8b", "ns1", GPU["spec"], "img:1")))
    assert set(objs) == {
        "ConfigMap/llama3-8b-config", "ServiceAccount/llama3-8b-router", "Role/llama3-8b-router",
        "RoleBinding/llama3-8b-router", "Service/llama3-8b-prefill", "Service/llama3-8b-decode",
        "Service/llama3-8b", "Deployment/llama3-8b-prefill", "Deployment/llama3-8b-decode",
        "Deployment/llama3-8b-router", "PodDisruptionBudget/llama3-8b-prefill",
        "PodDisruptionBudget/llama3-8b-decode", "PodDisruptionBudget/llama3-8b-router",
        "HorizontalPodAutoscaler/llama3-8b-prefill", "HorizontalPodAutoscaler/llama3-8b-decode",
        "PodMonitor/llama3-8b"}
    assert objs["Deployment/llama3-8b-prefill"]["spec"]["replicas"] == 2
    assert objs["Deployment/llama3-8b-decode"]["spec"]["replicas"] == 4
    hpa = objs["HorizontalPodAutoscaler/llama3-8b-decode"]["spec"]
    assert hpa["metrics"][0]["pods"]["metric"]["name"] == "tandem_engine_requests_running"
    assert hpa["metrics"][0]["pods"]["target"] == {"type": "AverageValue", "averageValue": "192"}
    assert objs["HorizontalPodAutoscaler/llama3-8b-prefill"]["spec"]["metrics"][0]["pods"]["metric"][
        "name"] == "tandem_engine_queued_prompt_tokens"
    role = objs["Role/llama3-8b-router"]["rules"]
    assert role == [{"apiGroups": ["discovery.k8s.io"], "resources": ["endpointslices"],
                     "verbs": ["get", "list", "watch"]}]
    for role_name in ("prefill", "decode"):
        svc = objs[f"Service/llama3-8b-{role_name}"]["spec"]
        assert svc["clusterIP"] == "None" and svc["selector"]["tandem.dev/role"] == role_name


def test_labels_on_every_pod_template() -> None:
    isvc = parse_spec("llama3-8b", "ns1", GPU["spec"], "img:1")
    for role in pods.ROLES:
        lab = pods.build_deployment(isvc, role)["spec"]["template"]["metadata"]["labels"]
        assert lab["app.kubernetes.io/name"] == "tandem"
        assert lab["app.kubernetes.io/instance"] == "llama3-8b"
        assert lab["app.kubernetes.io/component"] == role
        assert lab["tandem.dev/inferenceservice"] == "llama3-8b"
        assert lab["tandem.dev/role"] == role


def test_worker_command_line_contract() -> None:
    isvc = parse_spec("llama3-8b", "ns1", GPU["spec"], "img:1")
    c = pods.worker_container(isvc, isvc.prefill)
    assert pods.command_line(c) == (
        "tandem prefill --model /models/model --served-model-name llama3-8b --host 0.0.0.0 "
        "--grpc-port 50061 --http-port 8081 --advertise-host '$(POD_IP)' --device cuda "
        "--dtype bfloat16 --max-model-len 8192 --block-size 16 --gpu-memory-utilization 0.9 "
        "--kv-transfer nixl --tensor-parallel-size 1 --max-batch-tokens 8192")
    d = pods.worker_container(isvc, isvc.decode)["args"]
    assert d[0] == "decode" and d[-2:] == ["--max-running-requests", "256"]
    assert {"name": "POD_IP", "valueFrom": {"fieldRef": {"fieldPath": "status.podIP"}}} in c["env"]
    assert c["livenessProbe"]["httpGet"]["path"] == "/health"
    assert c["readinessProbe"]["httpGet"]["path"] == "/ready"
    # RDMA: one device requested and limited, plus IPC_LOCK for memory registration
    assert c["resources"]["limits"]["rdma/ib"] == 1 and c["resources"]["requests"]["rdma/ib"] == 1
    assert c["resources"]["limits"]["nvidia.com/gpu"] == 1
    assert c["securityContext"]["capabilities"]["add"] == ["IPC_LOCK"]
    assert {"name": "dshm", "mountPath": "/dev/shm"} in c["volumeMounts"]


def test_router_command_line_contract() -> None:
    isvc = parse_spec("llama3-8b", "ns1", GPU["spec"], "img:1")
    assert pods.command_line(pods.router_container(isvc)) == (
        "tandem router --model /models/model --served-model-name llama3-8b --host 0.0.0.0 "
        "--http-port 8000 --grpc-port 50051 --policy cache-aware --discovery kubernetes "
        "--namespace ns1 --prefill-selector tandem.dev/inferenceservice=llama3-8b,tandem.dev/role=prefill "
        "--decode-selector tandem.dev/inferenceservice=llama3-8b,tandem.dev/role=decode "
        "--worker-grpc-port 50061")
    tmpl = pods.pod_template(isvc, "router")["spec"]
    assert tmpl["serviceAccountName"] == "llama3-8b-router"
    assert pods.pod_template(isvc, "decode")["spec"]["automountServiceAccountToken"] is False


def test_hf_download_init_container() -> None:
    isvc = parse_spec("llama3-8b", "ns1", GPU["spec"], "img:1")
    spec = pods.pod_template(isvc, "router")["spec"]  # the router needs the tokenizer too
    init = spec["initContainers"][0]
    assert init["command"] == ["python", "/etc/tandem/download.py", "meta-llama/Llama-3.1-8B-Instruct",
                               "", "/models/model"]
    assert {"name": "HF_TOKEN", "valueFrom": {"secretKeyRef": {"name": "hf-token", "key": "HF_TOKEN"}}} \
        in init["env"]
    assert {"name": "model", "emptyDir": {"sizeLimit": "40Gi"}} in spec["volumes"]
    assert "snapshot_download" in pods.config_data(isvc)["download.py"]


def test_model_sources() -> None:
    pvc = parse({"model": {"uri": "pvc://weights/llama/8b"}})
    vols, mounts = pods.model_volumes(pvc)
    assert vols == [{"name": "model", "persistentVolumeClaim": {"claimName": "weights", "readOnly": True}}]
    assert pods.model_dir(pvc) == "/models/llama/8b" and mounts[0]["readOnly"] is True
    assert pods.init_containers(pvc) == []
    local = parse({"model": {"uri": "file:///models/demo"}})
    assert pods.model_volumes(local) == ([], []) and pods.model_dir(local) == "/models/demo"
    rev = parse({"model": {"uri": "hf://org/name@v2"}})
    assert pods.init_containers(rev)[0]["command"][3] == "v2"
    assert not any(e["name"] == "HF_TOKEN" for e in pods.init_containers(rev)[0]["env"])


def test_defaults_match_the_crd() -> None:
    """Python defaults == CRD schema defaults (the API server applies the latter)."""
    with open(CRD) as f:
        schema = yaml.safe_load(f)["spec"]["versions"][0]["schema"]["openAPIV3Schema"]["properties"]["spec"]

    bare = {"model": {"uri": "file:///m"}}
    server_side = apply_defaults(schema, copy.deepcopy(bare))
    assert server_side["prefill"]["replicas"] == 1 and server_side["kvCache"]["blockSize"] == 16
    assert parse(bare) == parse(server_side)


@pytest.mark.parametrize("spec, fragment", [
    ({}, "spec.model.uri is required"),
    ({"model": {"uri": "s3://bucket/x"}}, "scheme must be hf://, pvc:// or file:///"),
    ({"model": {"uri": "hf://just-a-name"}}, "hf://ORG/NAME"),
    ({"model": {"uri": "pvc://Bad_Claim/x"}}, "valid claim name"),
    ({"model": {"uri": "file:///m", "hfTokenSecret": "s"}}, "only used with hf://"),
    ({"model": {"uri": "file:///m", "dtype": "int4"}}, "spec.model.dtype must be one of"),
    ({"model": {"uri": "file:///m"}, "decode": {"replicas": -1}}, "spec.decode.replicas must be >= 0"),
    ({"model": {"uri": "file:///m"}, "kvCache": {"gpuMemoryUtilization": 1.5}}, "gpuMemoryUtilization"),
    ({"model": {"uri": "file:///m"}, "kvTransfer": {"backend": "tcp", "rdmaResource": "rdma/ib"}},
     "needs backend nixl"),
    ({"model": {"uri": "file:///m"}, "router": {"service": {"httpPort": 9, "grpcPort": 9}}}, "must differ"),
    ({"model": {"uri": "file:///m"}, "autoscaling": {"decode": {"minReplicas": 5, "maxReplicas": 2,
                                                               "targetRunningRequests": 1}}},
     "minReplicas (5) must be <= maxReplicas (2)"),
    ({"model": {"uri": "file:///m"}, "prefill": {"tensorParallel": 4,
                                                 "resources": {"limits": {"nvidia.com/gpu": 2}}}},
     "tensorParallel=4 needs that many GPUs"),
])
def test_invalid_specs(spec: dict, fragment: str) -> None:
    with pytest.raises(SpecError) as err:
        parse(spec)
    assert fragment in str(err.value)


def test_all_problems_reported_at_once() -> None:
    with pytest.raises(SpecError) as err:
        parse_spec("x" * 60, "ns", {"model": {"uri": "nope"}, "device": "tpu"}, "")
    assert len(err.value.problems) == 4  # name, uri, device, image


def test_autoscaled_replicas_start_within_bounds() -> None:
    isvc = parse({"model": {"uri": "file:///m"}, "prefill": {"replicas": 1},
                  "autoscaling": {"prefill": {"minReplicas": 3, "maxReplicas": 5, "targetQueuedTokens": 10}}})
    assert pods.deployment_replicas(isvc, "prefill") == 3
    assert objects.build_hpa(isvc, "decode") is None


def test_config_hash_ignores_replicas_but_not_the_model() -> None:
    a = parse({"model": {"uri": "file:///m"}, "decode": {"replicas": 1}})
    b = parse({"model": {"uri": "file:///m"}, "decode": {"replicas": 9}})
    c = parse({"model": {"uri": "file:///m", "dtype": "float16"}})
    assert pods.config_hash(a) == pods.config_hash(b) != pods.config_hash(c)


def test_drift_detection() -> None:
    desired = {"spec": {"replicas": 2, "template": {"spec": {"containers": [
        {"name": "c", "args": ["a"], "resources": {"limits": {"nvidia.com/gpu": 1}}}]}}}}
    live = copy.deepcopy(desired)
    live["spec"]["template"]["spec"]["containers"][0]["imagePullPolicy"] = "IfNotPresent"  # a default
    live["spec"]["template"]["spec"]["containers"][0]["resources"]["limits"]["nvidia.com/gpu"] = "1"
    live["status"] = {"readyReplicas": 1}
    assert not drifted(desired, live)
    edited = copy.deepcopy(live)
    edited["spec"]["replicas"] = 7
    assert drifted(desired, edited)
    extra = copy.deepcopy(live)
    extra["spec"]["template"]["spec"]["containers"].append({"name": "sidecar"})
    assert drifted(desired, extra)
    assert drifted({"a": True}, {"a": "true"})


def test_status_conditions() -> None:
    dep = {"spec": {"replicas": 2}, "status": {"readyReplicas": 1, "updatedReplicas": 2}}
    full = {"spec": {"replicas": 1}, "status": {"readyReplicas": 1}}
    st = status.compute_status({"prefill": dep, "decode": full, "router": full}, "http://u", 3)
    conds = {c["type"]: c for c in st["conditions"]}
    assert set(conds) == set(status.CONDITION_TYPES)
    assert conds["Ready"]["status"] == "True" and conds["PrefillReady"]["reason"] == "MinimumReplicasAvailable"
    assert st["prefill"]["summary"] == "1/2" and st["observedGeneration"] == 3
    none_ready = status.compute_status({"prefill": dep, "decode": {"spec": {"replicas": 1}}, "router": full},
                                       "http://u", 3, previous=st)
    conds2 = {c["type"]: c for c in none_ready["conditions"]}
    assert conds2["DecodeReady"]["reason"] == "NoReplicasReady" and conds2["Ready"]["status"] == "False"
    # an unchanged condition keeps its transition time
    assert conds2["PrefillReady"]["lastTransitionTime"] == conds["PrefillReady"]["lastTransitionTime"]
    bad = status.invalid_status("spec.model.uri is required", 4, previous=st)
    assert [c["type"] for c in bad["conditions"][:2]] == ["Ready", "ModelValid"]
    assert bad["conditions"][1]["status"] == "False"


def test_cli_help_and_flags(capsys: pytest.CaptureFixture) -> None:
    with pytest.raises(SystemExit) as e:
        cli.main(["--help"])
    assert e.value.code == 0
    out = capsys.readouterr().out
    for flag in ("--namespace", "--all-namespaces", "--image", "--peering", "--standalone",
                 "--priority", "--resync-seconds", "--liveness"):
        assert flag in out
    args = cli.build_parser().parse_args(["-n", "a", "-n", "b", "--standalone"])
    assert args.namespace == ["a", "b"] and args.standalone
    with pytest.raises(SystemExit):
        cli.build_parser().parse_args(["-n", "a", "--all-namespaces"])
