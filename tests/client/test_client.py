from __future__ import annotations

import torch

from data_owner_client.client import PemaClient
from plm_owner_server.runner import ModelRunner


def test_head_applied_to_representations_equals_server_logits(
    client: PemaClient, runner: ModelRunner
) -> None:
    head = client.head()
    out = client.represent([[1, 5, 9, 12], [1, 7]], logits="full")
    assert isinstance(out.logits, torch.Tensor)
    torch.testing.assert_close(head(out.hidden), out.logits, rtol=0, atol=1e-4)
    assert out.fingerprint == client.model_info().fingerprint == runner.fingerprint
