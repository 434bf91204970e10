from __future__ import annotations

from collections.abc import Iterator

import pytest

from data_owner_client.client import PemaClient
from data_owner_client.served_model import ServedModel
from plm_owner_server.runner import ModelRunner
from tests.server.helpers import serve


@pytest.fixture(scope="session")
def runner(make_runner) -> ModelRunner:
    """The tiny llama behind the client tests (shared: tests must not change its weights)."""
    return make_runner("llama")


@pytest.fixture
def client(runner: ModelRunner) -> Iterator[PemaClient]:
    """A PemaClient talking to an in-process server over the tiny llama."""
    with serve(runner) as http, PemaClient(http=http, retries=0) as pema:
        yield pema


@pytest.fixture
def served_client(runner, tmp_path) -> Iterator[tuple[ModelRunner, PemaClient, ServedModel]]:
    """The tiny llama's runner, a client of a server over it and the model as the client sees
    it (info, tokenizer, head)."""
    with serve(runner) as http, PemaClient(http=http, retries=0) as client:
        yield runner, client, ServedModel.fetch(client, cache_dir=tmp_path / "cache")
