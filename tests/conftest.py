from __future__ import annotations

import importlib.util

import pytest

from plm_owner_server.runner import ModelRunner
from tests.tiny_models import tiny_model, tiny_tokenizer

# tests/vllm runs in the vllm env (make vllm; make test runs it there), the rest in the main one.
collect_ignore = [] if importlib.util.find_spec("vllm") else ["vllm"]


@pytest.fixture(scope="session")
def make_runner():
    """Build (and cache) a ModelRunner over a tiny model of the named architecture."""
    cache: dict[str, ModelRunner] = {}

    def make(arch: str = "llama") -> ModelRunner:
        if arch not in cache:
            cache[arch] = ModelRunner(tiny_model(arch), tiny_tokenizer(), model_id=f"tiny-{arch}")
        return cache[arch]

    return make
