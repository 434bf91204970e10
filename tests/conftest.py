from __future__ import annotations

import pytest

from plm_owner_server.runner import ModelRunner
from tests.tiny_models import tiny_model, tiny_tokenizer


@pytest.fixture(scope="session")
def make_runner():
    """Build (and cache) a ModelRunner over a tiny model of the named architecture."""
    cache: dict[str, ModelRunner] = {}

    def make(arch: str = "llama") -> ModelRunner:
        if arch not in cache:
            cache[arch] = ModelRunner(tiny_model(arch), tiny_tokenizer(), model_id=f"tiny-{arch}")
        return cache[arch]

    return make
