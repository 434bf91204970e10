"""The ``residual`` adapter kind: a low-rank correction added to the vector the output layer reads.

With ``n = norm(x)`` (the head's final norm of the representation) the adapter outputs
``z = n + s · B · act(A · drop(n))`` and the logits are ``project(z)``, the head without its norm.
``B`` starts at zero, so an untrained adapter gives exactly the PLM's distribution and training
learns a correction to it, where the paper's adapter must rebuild the whole representation.
"""

from __future__ import annotations

import math

import torch
import torch.nn.functional as F
from torch import nn

from shared.head import Head

ACTIVATIONS = ("none", "gelu")


class ResidualAdapter(nn.Module):
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


@torch.no_grad()
def init_lora_a(weight: torch.Tensor, generator: torch.Generator | None) -> None:
    """As nn.Linear and peft's LoRA A: uniform with bound 1/sqrt(fan_in). Drawn on the CPU so a
    CPU generator seeds it wherever the weight lives."""
    fresh = torch.empty(weight.shape)
    nn.init.kaiming_uniform_(fresh, a=math.sqrt(5), generator=generator)
    weight.copy_(fresh)
