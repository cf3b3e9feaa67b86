"""Shared fixtures: generated test models (written once per session)."""

from __future__ import annotations

import pytest

from tandem.engine.make_model import make_test_model


@pytest.fixture(scope="session")
def model_factory(tmp_path_factory):
    cache: dict = {}

    def get(arch: str = "llama", **kw):
        key = (arch, tuple(sorted(kw.items())))
        if key not in cache:
            d = tmp_path_factory.mktemp(f"model-{arch}")
            cache[key] = str(make_test_model(d, arch=arch, **kw))
        return cache[key]

    return get


@pytest.fixture(scope="session")
def tiny_llama(model_factory):
    return model_factory("llama")
