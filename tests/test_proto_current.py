"""The committed gRPC stubs match a fresh generation from proto/tandem/v1/*.proto."""

import subprocess
import sys

import pytest


def test_stubs_are_current():
    pytest.importorskip("grpc_tools")
    r = subprocess.run([sys.executable, "-m", "tandem.proto_gen", "--check"], capture_output=True, text=True)
    assert r.returncode == 0, r.stdout + r.stderr
