"""The PLM's output head ``H(x) = cap(scale · lm_head(project_out(norm(x))))`` as a torch module.

The server exports it as safetensors (metadata key ``pema_head`` holds the :class:`HeadSpec`);
the client rebuilds it here and gets the server's logits from representations alone.
"""

from __future__ import annotations

import json
from pathlib import Path

import torch
import torch.nn.functional as F
from safetensors.torch import load, save
from torch import nn

from shared.protocol import HeadSpec

SPEC_KEY = "pema_head"


class Head(nn.Module):
    """A frozen final norm + output projection, rebuilt from the server's exported tensors."""

    def __init__(self, tensors: dict[str, torch.Tensor], spec: HeadSpec) -> None:
        super().__init__()
        self.spec = spec
        for name, tensor in tensors.items():
            self.register_buffer(name.replace(".", "_"), tensor)

    def _get(self, name: str) -> torch.Tensor | None:
        return getattr(self, name.replace(".", "_"), None)

    @property
    def output_weight(self) -> torch.Tensor:
        """The output embedding ``[V, d]`` (every head has one)."""
        weight = self._get("lm_head.weight")
        assert weight is not None, "checked when the head was built"
        return weight

    def embed(self, tokens: torch.Tensor) -> torch.Tensor:
        """The output embedding's rows of ``tokens`` (float32): what the client knows of a token."""
        return F.embedding(tokens, self.output_weight).float()

    def normalize(self, x: torch.Tensor) -> torch.Tensor:
        """The model's final norm, computed in float32."""
        spec, weight, bias = self.spec, self._get("norm.weight"), self._get("norm.bias")
        x = x.float()
        if spec.norm == "none":
            return x
        if spec.norm == "layernorm":
            return F.layer_norm(x, x.shape[-1:], _f32(weight), _f32(bias), spec.eps)
        x = x * torch.rsqrt(x.pow(2).mean(-1, keepdim=True) + spec.eps)
        return x if weight is None else x * (weight.float() + spec.weight_offset)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        """Next-token logits (float32) for representations ``x [..., d]``."""
        return self.project(self.normalize(x))

    def project(self, h: torch.Tensor) -> torch.Tensor:
        """Logits (float32) from vectors ``h [..., d]`` in the space after the final norm."""
        h = h.float()
        project_out = self._get("project_out.weight")
        if project_out is not None:
            h = F.linear(h, project_out.float())
        logits = F.linear(h, self.output_weight.float(), _f32(self._get("lm_head.bias")))
        if self.spec.logit_scale != 1.0:
            logits = logits * self.spec.logit_scale
        if self.spec.logit_softcap:
            logits = torch.tanh(logits / self.spec.logit_softcap) * self.spec.logit_softcap
        return logits

    @classmethod
    def from_bytes(cls, data: bytes) -> Head:
        """Rebuild from the bytes of ``GET /v1/head``."""
        spec = HeadSpec.model_validate_json(_metadata(data)[SPEC_KEY])
        return cls(load(data), spec)

    @classmethod
    def from_file(cls, path: str | Path) -> Head:
        return cls.from_bytes(Path(path).read_bytes())


def _f32(t: torch.Tensor | None) -> torch.Tensor | None:
    return None if t is None else t.float()


def _metadata(data: bytes) -> dict[str, str]:
    """The ``__metadata__`` of a safetensors buffer (its header is JSON after an 8-byte length)."""
    if len(data) < 8:
        raise ValueError("head file is too short to be safetensors")
    size = int.from_bytes(data[:8], "little")
    header = json.loads(data[8 : 8 + size])
    metadata = header.get("__metadata__") or {}
    if SPEC_KEY not in metadata:
        raise ValueError(f"head file has no {SPEC_KEY!r} metadata; was it exported by pema-server?")
    return metadata


def head_to_bytes(tensors: dict[str, torch.Tensor], spec: HeadSpec) -> bytes:
    """Serialise head tensors and spec as the safetensors bytes of ``GET /v1/head``."""
    tensors = {k: v.detach().to("cpu").contiguous().clone() for k, v in tensors.items()}
    return save(tensors, metadata={SPEC_KEY: spec.model_dump_json()})
