"""Where each architecture keeps its final norm and output head.

The representation ``f(c)`` is the input of the final norm, captured by a forward pre-hook; the head
``H`` is the model's own norm → project_out → lm_head (→ soft-cap), so ``H(f(c))`` is exactly the
model's logits.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
from torch import nn
from transformers import PreTrainedModel

from shared.protocol import HeadSpec, LogitsMode

Logits = torch.Tensor | tuple[torch.Tensor, torch.Tensor]  # full, or (top-k values, indices)


@dataclass(frozen=True)
class Architecture:
    norm: str  # dotted path of the final norm from the CausalLM root
    project_out: str | None = None  # OPT projects back to the embedding width after the norm
    weight_offset: float = 0.0  # Gemma's RMSNorm scales by (1 + weight)
    softcap_attr: str | None = None  # config attribute with the final logit soft-cap


_LLAMA = Architecture("model.norm")
_GEMMA = Architecture("model.norm", weight_offset=1.0, softcap_attr="final_logit_softcapping")

ARCHITECTURES: dict[str, Architecture] = {
    "gpt2": Architecture("transformer.ln_f"),
    "opt": Architecture("model.decoder.final_layer_norm", project_out="model.decoder.project_out"),
    "llama": _LLAMA,
    "mistral": _LLAMA,
    "qwen2": _LLAMA,
    "qwen3": _LLAMA,
    "gpt_neox": Architecture("gpt_neox.final_layer_norm"),
    "gemma": _GEMMA,
    "gemma2": _GEMMA,
    "gemma3_text": _GEMMA,
}


class UnsupportedArchitecture(ValueError):
    pass


def architecture_of(model: PreTrainedModel) -> Architecture:
    model_type = str(model.config.model_type)
    if model_type not in ARCHITECTURES:
        raise UnsupportedArchitecture(
            f"architecture {model_type!r} is not supported; supported: {', '.join(ARCHITECTURES)}"
        )
    return ARCHITECTURES[model_type]


def _submodule(model: PreTrainedModel, path: str | None) -> nn.Module | None:
    """The module at ``path``, or None where this model has none (OPT-350m has no final norm)."""
    if path is None:
        return None
    module: nn.Module | None = model
    for name in path.split("."):
        module = getattr(module, name, None)
        if module is None:
            return None
    return module


class ModelHead:
    """The model's own final norm and output head, used in place (never copied)."""

    def __init__(self, model: PreTrainedModel) -> None:
        arch = architecture_of(model)
        self.norm = _submodule(model, arch.norm)
        self.project_out = _submodule(model, arch.project_out)
        self.lm_head: nn.Linear = model.get_output_embeddings()
        softcap = getattr(model.config, arch.softcap_attr, None) if arch.softcap_attr else None
        self.spec = HeadSpec(
            norm=_norm_kind(self.norm),
            eps=_norm_eps(self.norm),
            weight_offset=arch.weight_offset,
            logit_softcap=softcap,
        )

    @property
    def capture(self) -> nn.Module | None:
        """The module whose input is the representation f(c) (None: the base model's output)."""
        return self.norm if self.norm is not None else self.project_out

    @torch.inference_mode()
    def __call__(self, hidden: torch.Tensor) -> torch.Tensor:
        """Logits ``H(hidden)``, computed exactly as the model's forward does."""
        h = hidden
        for module in (self.norm, self.project_out):
            if module is not None:
                h = module(h)
        logits = self.lm_head(h)
        if self.spec.logit_softcap:
            cap = self.spec.logit_softcap
            logits = torch.tanh(logits / cap) * cap
        return logits

    @torch.inference_mode()
    def logits(self, hidden: torch.Tensor, mode: LogitsMode, chunk: int = 1024) -> Logits:
        """``H(hidden)``: all logits, or the top-k (values, int32 indices); chunked over rows."""
        if mode == "full":
            return self(hidden)
        assert isinstance(mode, int)
        k = min(mode, self.lm_head.weight.shape[0])
        parts = [self(part).topk(k, dim=-1) for part in hidden.split(chunk)]
        values = torch.cat([p.values for p in parts]) if parts else hidden.new_empty(0, k)
        indices = torch.cat([p.indices for p in parts]) if parts else hidden.new_empty(0, k)
        return values, indices.to(torch.int32)

    def tensors(self) -> dict[str, torch.Tensor]:
        """The head's weights under the names of ``GET /v1/head``."""
        out: dict[str, torch.Tensor] = {}
        for prefix, module in (
            ("norm", self.norm),
            ("project_out", self.project_out),
            ("lm_head", self.lm_head),
        ):
            if module is None:
                continue
            for name in ("weight", "bias"):
                param = getattr(module, name, None)
                if param is not None:
                    out[f"{prefix}.{name}"] = param
        return out


def _norm_kind(norm: nn.Module | None) -> str:
    if norm is None:
        return "none"
    return "layernorm" if isinstance(norm, nn.LayerNorm) else "rmsnorm"


def _norm_eps(norm: nn.Module | None) -> float:
    if norm is None:
        return 1e-5
    for attr in ("eps", "variance_epsilon", "epsilon"):
        value = getattr(norm, attr, None)
        if isinstance(value, float):
            return value
    raise UnsupportedArchitecture(f"cannot find the epsilon of {type(norm).__name__}")
