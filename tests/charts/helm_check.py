"""Lint, install and schema-check the Helm chart with the real Helm engine (helm-sdkpy).

Runs in the Python 3.12 environment ``.venv-helm`` (helm-sdkpy, kmock, kubernetes-validate);
``test_chart.py`` starts it as a subprocess and reads the JSON it prints.

Data flow, per case (a name, a values dict): start a kmock API server (tests/operator/
kmock_cluster.py) -> ``helm install`` into it with ``HELM_DRIVER=memory`` (so the release record
stays in Helm's memory, not in a Secret kmock cannot decode) and ``wait=False`` (no controllers
run there) -> split the release's rendered manifest into objects -> validate each with
``kubernetes-validate`` against the Kubernetes OpenAPI schemas of ``--k8s-version`` -> report
the objects, the validation errors and the kinds that have no upstream schema (custom resources).
The chart is linted once, and the CRDs in ``crds/`` (which Helm keeps out of the manifest) are
validated too.

Usage: helm_check.py CHART CASES_JSON [--k8s-version 1.33]   (prints one JSON document)
"""

from __future__ import annotations

import argparse
import asyncio
import glob
import json
import os
import sys
import tempfile

# Helm's Go runtime reads its environment when the process starts: set it in the caller.
if os.environ.get("HELM_DRIVER") != "memory":
    sys.exit("helm_check.py: run with HELM_DRIVER=memory in the environment")

import helm_sdkpy  # noqa: E402
import kubernetes_validate  # noqa: E402
import yaml  # noqa: E402

sys.path.insert(0, os.path.join(os.path.dirname(os.path.abspath(__file__)), "..", "operator"))
from kmock_cluster import Cluster  # noqa: E402


def validate(obj: dict, version: str) -> tuple[str, str]:
    """('ok'|'error'|'no-schema', detail)."""
    try:
        kubernetes_validate.validate(obj, version, strict=True)
        return "ok", ""
    except kubernetes_validate.SchemaNotFoundError as e:
        return "no-schema", str(e)
    except kubernetes_validate.ValidationError as e:
        return "error", f"{e.message} at {'/'.join(str(p) for p in e.path)}"
    except Exception as e:  # a malformed object
        return "error", repr(e)


def check_objects(objs: list[dict], version: str) -> dict:
    report = {"objects": [], "errors": [], "no_schema": []}
    for obj in objs:
        key = f"{obj.get('kind')}/{(obj.get('metadata') or {}).get('name')}"
        report["objects"].append({"key": key, "object": obj})
        verdict, detail = validate(obj, version)
        if verdict == "error":
            report["errors"].append(f"{key}: {detail}")
        elif verdict == "no-schema":
            report["no_schema"].append(key)
    return report


async def install(chart: str, case: dict, version: str) -> dict:
    namespace = case.get("namespace", "tandem-system")
    with Cluster() as cluster:
        config = helm_sdkpy.Configuration(namespace=namespace, kubeconfig=cluster.kubeconfig)
        try:
            result = await helm_sdkpy.Install(config).run(
                case.get("release", "tandem"), chart, values=case.get("values") or None,
                wait=False, timeout=60)
        except helm_sdkpy.HelmError as e:
            return {"name": case["name"], "installed": False, "error": str(e)}
        manifest = result.get("manifest", "")
        objs = [d for d in yaml.safe_load_all(manifest) if d]
        report = check_objects(objs, version)
        stored = sorted(f"{k[0].plural}/{k[1] or ''}/{k[2]}" for k in cluster.emulator.objects.keys())
        return {"name": case["name"], "installed": True, "notes": result.get("info", {}).get("notes", ""),
                "stored": stored, **report}


async def main() -> int:
    ap = argparse.ArgumentParser()
    ap.add_argument("chart")
    ap.add_argument("cases")
    ap.add_argument("--k8s-version", default="1.33")
    args = ap.parse_args()
    with open(args.cases) as f:
        cases = json.load(f)
    chart = os.path.abspath(args.chart)

    with tempfile.NamedTemporaryFile("w", suffix=".kubeconfig") as kc:
        kc.write("apiVersion: v1\nkind: Config\nclusters: []\ncontexts: []\nusers: []\n")
        kc.flush()
        lint = await helm_sdkpy.Lint(helm_sdkpy.Configuration(kubeconfig=kc.name)).run(chart)

    crds = []
    for path in sorted(glob.glob(os.path.join(chart, "crds", "*.yaml"))):
        with open(path) as f:
            crds += [d for d in yaml.safe_load_all(f) if d]
    out = {"helm_version": helm_sdkpy.get_version() if hasattr(helm_sdkpy, "get_version") else "",
           "lint": lint, "crds": check_objects(crds, args.k8s_version),
           "cases": [await install(chart, case, args.k8s_version) for case in cases]}
    json.dump(out, sys.stdout, default=str)
    return 0


if __name__ == "__main__":
    sys.exit(asyncio.run(main()))
