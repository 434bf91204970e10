"""The ``pema`` kind, the paper's adapter (docs/design.md, "Adapter kinds").

``A ∈ R^{r×d}`` (Kaiming-uniform), ``B_rct, B_pd ∈ R^{d×r}`` (zero), dropout on the input, no
residual: ``h_rct = s · B_rct A x``, ``h_pd = s · B_pd A x`` with ``s = alpha / r``; the logits are
the whole head's ``H(h_pd)``. Stage 1 trains ``A, B_rct`` to reconstruct the memory's keys; stage
2 starts from a fresh ``A`` and a zero ``B_pd``, keeps ``B_rct`` frozen and minimises
``κ · MSE(h_rct, x) + (1 − κ) · CE(H(h_pd), y)``.
"""

from __future__ import annotations

from collections.abc import Callable
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
from data_owner_client.options import option
from shared.head import Head


@dataclass
class PemaConfig(LowRankConfig):
    """The paper's adapter; its defaults are the paper's."""

    kind: ClassVar[str] = "pema"

    kappa: float = option(0.2, help="weight of the reconstruction loss in stage 2")
    # Feed the adapter norm(f(c)), the head's final norm of the representation, instead of f(c);
    # it then also reconstructs norm(f(c)). Off is the paper as written. On conditions models
    # with massive activations (SmolLM2: a few dimensions in the hundreds) as the paper's
    # released code did, which exported a normalised hidden state.
    input_norm: bool = option(
        False,
        help="feed the adapter the head's final norm of each representation instead of the raw "
        "one (better conditioned on models with massive activations, such as SmolLM2)",
    )

    def __post_init__(self) -> None:
        super().__post_init__()
        if not 0.0 <= self.kappa <= 1.0:
            raise AdapterError(f"kappa must be in [0, 1], got {self.kappa}")

    @property
    def reconstruction_weight(self) -> float:
        return self.kappa

    def tensor_shapes(self) -> dict[str, tuple[int, ...]]:
        d, r = self.hidden_size, self.rank
        return {"A": (r, d), "B_pd": (d, r), "B_rct": (d, r)}


class PemaAdapter(AdapterModule):
    """Shared down-projection ``A`` and two up-projections: ``B_rct`` (reconstruct), ``B_pd``."""

    post_norm = False  # outputs are representations: logits are the whole head's, H(h_pd)

    def __init__(
        self,
        hidden_size: int,
        rank: int,
        alpha: float = 1.0,
        dropout: float = 0.2,
        *,
        generator: torch.Generator | None = None,
    ) -> None:
        super().__init__()
        self.A = nn.Parameter(torch.empty(rank, hidden_size))
        self.B_rct = nn.Parameter(torch.zeros(hidden_size, rank))
        self.B_pd = nn.Parameter(torch.zeros(hidden_size, rank))
        self.dropout = nn.Dropout(dropout)
        self.scaling = alpha / rank
        self.input_norm: Callable[[torch.Tensor], torch.Tensor] | None = None
        init_lora_a(self.A, generator)

    @classmethod
    def from_config(
        cls,
        config: PemaConfig,
        head: Head | None = None,
        *,
        generator: torch.Generator | None = None,
    ) -> PemaAdapter:
        """A freshly initialised adapter of the config's shape (``head``: for ``input_norm``)."""
        adapter = cls(
            config.hidden_size, config.rank, config.alpha, config.dropout, generator=generator
        )
        if config.input_norm:
            if head is None:
                raise AdapterError("an adapter with input_norm needs the served model's head")
            adapter.input_norm = head.normalize  # a method, not a submodule: saved nowhere
        return adapter

    def features(self, x: torch.Tensor) -> torch.Tensor:
        """What the adapter reads and reconstructs: ``x``, or ``norm(x)`` with ``input_norm``."""
        return x if self.input_norm is None else self.input_norm(x)

    def encode(self, x: torch.Tensor) -> torch.Tensor:
        """The rank-r code ``A · drop(features(x))``."""
        return F.linear(self.dropout(self.features(x).to(self.A.dtype)), self.A)

    def reconstruct(self, x: torch.Tensor) -> torch.Tensor:
        """``h_rct = s · B_rct A drop(x)``, trained to reproduce ``features(x)``."""
        return self.scaling * F.linear(self.encode(x), self.B_rct)

    def predict(self, x: torch.Tensor) -> torch.Tensor:
        """``h_pd = s · B_pd A drop(x)``, a representation to feed the frozen head."""
        return self.scaling * F.linear(self.encode(x), self.B_pd)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        """Same as :meth:`predict`."""
        return self.predict(x)

    def predict_and_reconstruct(self, x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """``(h_pd, h_rct)`` from one dropout mask and one code, as stage 2 trains them."""
        code = self.encode(x)
        return self.scaling * F.linear(code, self.B_pd), self.scaling * F.linear(code, self.B_rct)

    @torch.no_grad()
    def reset_for_stage2(self, *, generator: torch.Generator | None = None) -> None:
        """Fresh ``A``, zero ``B_pd``; ``B_rct`` keeps its stage-1 values and is frozen."""
        init_lora_a(self.A, generator)
        self.B_pd.zero_()
        self.B_rct.requires_grad_(False)

    def train_outputs(self, x: torch.Tensor, y: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """The vectors training scores against the labels: every pair's ``h_pd``."""
        return self(x), y

    def stage_outputs(self, stage: int, *batch: torch.Tensor) -> tuple[torch.Tensor, ...]:
        """Stage 1: ``(h_rct,)``; stage 2: ``(h_pd, y, h_rct)`` from one dropout mask."""
        x, y = batch
        if stage == 1:
            return (self.reconstruct(x),)
        h_pd, h_rct = self.predict_and_reconstruct(x)
        return h_pd, y, h_rct

    def reconstruction_target(self, x: torch.Tensor) -> torch.Tensor:
        return self.features(x)

    def trainable(self, stage: int) -> list[nn.Parameter]:
        self.A.requires_grad_(True)
        self.B_rct.requires_grad_(stage == 1)
        self.B_pd.requires_grad_(stage == 2)
        return super().trainable(stage)

    def start_stage(self, stage: int, generator: torch.Generator | None = None) -> None:
        if stage == 2:
            self.reset_for_stage2(generator=generator)


KIND = AdapterKind(
    "pema",
    PemaConfig,
    PemaAdapter,
    # As the first version wrote it (no "kind"), so its older checkpoints still resume.
    signature=("hidden_size", "vocab_size", "rank", "alpha", "dropout", "kappa", "fingerprint"),
    stages=(1, 2),
)
