"""The ``residual`` adapter kind: a low-rank correction added to the vector the output layer reads.

With ``n = norm(x)`` (the head's final norm of the representation) the adapter outputs
``z = n + s · B · act(A · drop(n))`` and the logits are ``project(z)``, the head without its norm.
``B`` starts at zero, so an untrained adapter gives exactly the PLM's distribution and training
learns a correction to it, where the paper's adapter must rebuild the whole representation.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import ClassVar

import torch
import torch.nn.functional as F
from torch import nn

from data_owner_client.adapter.base import (
    AdapterError,
    AdapterKind,
    AdapterModule,
    LowRankConfig,
    init_lora_a,
)
from data_owner_client.options import option, override
from shared.head import Head

ACTIVATIONS = ("none", "gelu")


@dataclass
class ResidualConfig(LowRankConfig):
    """The residual kind; its defaults are the best on the Bible tuning verses
    (results/quality/README.md)."""

    kind: ClassVar[str] = "residual"

    rank: int = override(LowRankConfig, "rank", 64)
    alpha: float = override(LowRankConfig, "alpha", 64.0)
    lambda_max: float = override(LowRankConfig, "lambda_max", 0.5)
    schedule: str = override(LowRankConfig, "schedule", "constant")
    activation: str = option("none", help="non-linearity between A and B", choices=ACTIVATIONS)

    def __post_init__(self) -> None:
        super().__post_init__()
        if self.activation not in ACTIVATIONS:
            raise AdapterError(f"activation must be one of {ACTIVATIONS}, got {self.activation!r}")

    def tensor_shapes(self) -> dict[str, tuple[int, ...]]:
        return {"A": (self.rank, self.hidden_size), "B": (self.hidden_size, self.rank)}


class ResidualAdapter(AdapterModule):
    """``z = norm(x) + s · B act(A drop(norm(x)))``, read by the head's output projection."""

    post_norm = True  # outputs live after the final norm: logits are head.project(z)

    def __init__(
        self,
        head: Head,
        hidden_size: int,
        rank: int,
        alpha: float = 1.0,
        dropout: float = 0.0,
        activation: str = "none",
        *,
        generator: torch.Generator | None = None,
    ) -> None:
        super().__init__()
        if activation not in ACTIVATIONS:
            raise ValueError(f"activation must be one of {ACTIVATIONS}, got {activation!r}")
        self.A = nn.Parameter(torch.empty(rank, hidden_size))
        self.B = nn.Parameter(torch.zeros(hidden_size, rank))
        self.dropout = nn.Dropout(dropout)
        self.scaling = alpha / rank
        self.activation = activation
        self.normalize = head.normalize  # a method, not a submodule: saved nowhere
        init_lora_a(self.A, generator)

    @classmethod
    def from_config(
        cls,
        config: ResidualConfig,
        head: Head | None = None,
        *,
        generator: torch.Generator | None = None,
    ) -> ResidualAdapter:
        if head is None:
            raise AdapterError("a residual adapter needs the served model's head")
        return cls(
            head,
            config.hidden_size,
            config.rank,
            config.alpha,
            config.dropout,
            config.activation,
            generator=generator,
        )

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        """``z [..., d]`` for representations ``x [..., d]``."""
        n = self.normalize(x)
        code = F.linear(self.dropout(n), self.A)
        if self.activation == "gelu":
            code = F.gelu(code)
        return n + self.scaling * F.linear(code, self.B)

    def train_outputs(self, x: torch.Tensor, y: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """The vectors training scores against the labels: here every pair's ``z``."""
        return self(x), y


KIND = AdapterKind(
    "residual",
    ResidualConfig,
    ResidualAdapter,
    signature=(
        "kind",
        "hidden_size",
        "vocab_size",
        "rank",
        "alpha",
        "dropout",
        "activation",
        "fingerprint",
    ),  # fmt: skip
    mixture=True,
)
