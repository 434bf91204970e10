from __future__ import annotations

import pytest

from plm_owner_server.runner import ModelRunner


@pytest.fixture(scope="session")
def runner(make_runner) -> ModelRunner:
    """The tiny llama every server test serves (shared: tests must not change its weights)."""
    return make_runner("llama")
