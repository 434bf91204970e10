"""vLLM model classes whose hidden states are f(c), the input of the final norm.

vLLM's Llama-style models end with a fused add-and-norm, ``hidden, _ = norm(hidden, residual)``;
f(c) is ``hidden + residual`` there. Each class here is vLLM's own with that norm replaced by one
that returns its input (keeping the norm's weight, so checkpoints load unchanged, and the head's
norm is applied by the server, as for the transformers backend). Tensor parallelism is untouched:
at the final norm every rank holds the whole, all-reduced state.

:mod:`plm_owner_server.vllm_plugin` registers these classes in every vLLM process under their own
names; the server asks for them with ``hf_overrides={"architectures": [...]}`` and vLLM's own
classes stay as they are. Importing this module imports vLLM: only the vllm extra has it.
"""

from __future__ import annotations

from typing import Any

import torch
from torch import nn
from vllm.model_executor.models.llama import LlamaForCausalLM
from vllm.model_executor.models.mistral import MistralForCausalLM
from vllm.model_executor.models.qwen2 import Qwen2ForCausalLM
from vllm.model_executor.models.qwen3 import Qwen3ForCausalLM


class NormInput(nn.Module):
    """In place of a final ``norm(x, residual)``: returns its input ``x + residual`` (twice, as
    the fused norm returns the normalised sum and the new residual)."""

    def __init__(self, norm: nn.Module) -> None:
        super().__init__()
        self.weight = norm.weight  # loaded as before; the server's head applies the norm

    def forward(
        self, x: torch.Tensor, residual: torch.Tensor | None = None
    ) -> torch.Tensor | tuple[torch.Tensor, torch.Tensor]:
        if residual is None:
            return x
        total = x + residual
        return total, total


class _PreNorm:
    """Mixed into a vLLM CausalLM: its model's final norm returns its input."""

    model: Any

    def __init__(self, *, vllm_config: Any, prefix: str = "") -> None:
        super().__init__(vllm_config=vllm_config, prefix=prefix)  # type: ignore[call-arg]
        if not hasattr(self.model.norm, "weight"):  # a pipeline stage without the final norm
            raise NotImplementedError("the vllm backend does not run pipeline parallelism")
        self.model.norm = NormInput(self.model.norm)


class PemaLlamaForCausalLM(_PreNorm, LlamaForCausalLM):
    pass


class PemaMistralForCausalLM(_PreNorm, MistralForCausalLM):
    pass


class PemaQwen2ForCausalLM(_PreNorm, Qwen2ForCausalLM):
    pass


class PemaQwen3ForCausalLM(_PreNorm, Qwen3ForCausalLM):
    pass
