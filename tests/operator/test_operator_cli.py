"""``python -m tandem.operator`` as a pod runs it: a separate process, kopf's default login from
$KUBECONFIG, the liveness endpoint, SIGTERM -> clean exit. Against a kmock API server."""

from __future__ import annotations

import os
import subprocess
import sys
import urllib.request

from kmock_cluster import Cluster, wait_for

from tandem.serve.config import free_port


def test_python_m_tandem_operator_serves() -> None:
    port = free_port()
    with Cluster() as c:
        proc = subprocess.Popen(
            [sys.executable, "-m", "tandem.operator", "--all-namespaces", "--standalone",
             "--liveness", f"http://127.0.0.1:{port}/healthz", "--image", "cli:1"],
            env={**os.environ, "KUBECONFIG": c.kubeconfig}, stdout=subprocess.PIPE,
            stderr=subprocess.STDOUT, text=True)
        try:
            c.create("/apis/tandem.dev/v1alpha1/namespaces/default/inferenceservices", {
                "apiVersion": "tandem.dev/v1alpha1", "kind": "InferenceService",
                "metadata": {"name": "cli", "namespace": "default"},
                "spec": {"model": {"uri": "file:///m"}}})
            dep = wait_for(lambda: c.get("/apis/apps/v1/namespaces/default/deployments/cli-decode"),
                           timeout=30, what="decode Deployment from the CLI-started operator")
            assert dep["spec"]["template"]["spec"]["containers"][0]["image"] == "cli:1"
            with urllib.request.urlopen(f"http://127.0.0.1:{port}/healthz", timeout=5) as resp:
                assert resp.status == 200
        finally:
            proc.terminate()
            out = proc.communicate(timeout=30)[0]
        assert proc.returncode == 0, out[-3000:]
