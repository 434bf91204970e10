"""The client-side head rebuilt from exported tensors equals each norm/cap variant's formula."""

from __future__ import annotations

import pytest
import torch

from shared.head import Head, head_to_bytes
from shared.protocol import HeadSpec


def _tensors(d: int = 8, v: int = 11, bias: bool = True) -> dict[str, torch.Tensor]:
    torch.manual_seed(0)
    out = {"norm.weight": torch.randn(d), "lm_head.weight": torch.randn(v, d)}
    if bias:
        out["norm.bias"] = torch.randn(d)
    return out


def test_layernorm_head_matches_torch_modules():
    tensors = _tensors()
    head = Head.from_bytes(head_to_bytes(tensors, HeadSpec(norm="layernorm", eps=1e-5)))
    norm = torch.nn.LayerNorm(8)
    norm.weight.data, norm.bias.data = tensors["norm.weight"], tensors["norm.bias"]
    x = torch.randn(3, 8)
    expected = norm(x) @ tensors["lm_head.weight"].T
    torch.testing.assert_close(head(x), expected.detach())


@pytest.mark.parametrize("offset", [0.0, 1.0])
def test_rmsnorm_head_with_offset_and_softcap(offset):
    tensors = _tensors(bias=False)
    spec = HeadSpec(norm="rmsnorm", eps=1e-6, weight_offset=offset, logit_softcap=2.0)
    head = Head.from_bytes(head_to_bytes(tensors, spec))
    x = torch.randn(4, 8)
    normed = (
        x / torch.sqrt(x.pow(2).mean(-1, keepdim=True) + 1e-6) * (tensors["norm.weight"] + offset)
    )
    expected = 2.0 * torch.tanh((normed @ tensors["lm_head.weight"].T) / 2.0)
    torch.testing.assert_close(head(x), expected)


def test_project_out_and_no_norm():
    tensors = {"project_out.weight": torch.randn(5, 8), "lm_head.weight": torch.randn(11, 5)}
    head = Head.from_bytes(head_to_bytes(tensors, HeadSpec(norm="none")))
    x = torch.randn(2, 8)
    torch.testing.assert_close(
        head(x), x @ tensors["project_out.weight"].T @ tensors["lm_head.weight"].T
    )


def test_bytes_without_spec_are_refused():
    from safetensors.torch import save

    with pytest.raises(ValueError, match="pema_head"):
        Head.from_bytes(save({"lm_head.weight": torch.ones(2, 2)}))
