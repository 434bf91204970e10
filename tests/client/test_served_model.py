from __future__ import annotations

from pathlib import Path

import pytest
import torch

from data_owner_client.client import PemaClient
from data_owner_client.served_model import HEAD, ServedModel
from plm_owner_server.runner import ModelRunner
from tests.server.helpers import serve


def count_requests(client: PemaClient) -> list[str]:
    """Record the path of every request the client sends."""
    paths: list[str] = []
    client._http.event_hooks["request"].append(lambda request: paths.append(request.url.path))
    return paths


def test_files_are_fetched_once_and_the_head_matches_the_server(
    client: PemaClient, runner: ModelRunner, tmp_path: Path
) -> None:
    paths = count_requests(client)
    first = ServedModel.fetch(client, tmp_path)
    assert {"/v1/tokenizer", "/v1/head"} <= set(paths)
    paths.clear()
    again = ServedModel.fetch(client, tmp_path)
    assert paths == ["/v1/model"]  # the fingerprint is known: nothing else is downloaded
    assert again.info == first.info and again.eos_token_id == runner.eos_token_ids[0]
    ids = [1, 5, 9, 12]
    assert again.tokenizer.decode(ids) == runner.tokenizer.decode(ids)
    out = client.represent([ids], logits="full")
    assert again.head is not None and isinstance(out.logits, torch.Tensor)
    torch.testing.assert_close(again.head(out.hidden), out.logits, rtol=0, atol=1e-4)


def test_a_corrupt_cache_is_fetched_again(client: PemaClient, tmp_path: Path) -> None:
    ServedModel.fetch(client, tmp_path)
    (head_file,) = tmp_path.glob(f"*/{HEAD}")
    head_file.write_bytes(b"not safetensors")
    paths = count_requests(client)
    assert ServedModel.fetch(client, tmp_path).head is not None
    assert "/v1/head" in paths
    assert not list(tmp_path.glob(".*"))  # no temporary folder left behind


def test_an_unshared_head_is_refused_with_what_to_do(runner: ModelRunner, tmp_path: Path) -> None:
    with serve(runner, share_head=False) as http, PemaClient(http=http, retries=0) as client:
        with pytest.raises(PermissionError, match="--no-share-head"):
            ServedModel.fetch(client, tmp_path)
        assert ServedModel.fetch(client, tmp_path, need_head=False).head is None
