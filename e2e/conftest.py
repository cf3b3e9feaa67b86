"""Fixtures of the end-to-end suite; the harness itself is serve_harness.py."""

from __future__ import annotations

import os
import sys

import pytest

sys.path.insert(0, os.path.dirname(__file__))

from tandem.engine.make_model import make_test_model  # noqa: E402


@pytest.fixture(scope="session")
def tiny_model(tmp_path_factory) -> str:
    """`tandem make-test-model --preset tiny`, once per session."""
    return str(make_test_model(tmp_path_factory.mktemp("e2e-model"), arch="llama", preset="tiny"))
