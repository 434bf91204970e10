"""Several adapters of one kind decoded as one: the mean of their outputs.

Adapters trained on the same memory with different seeds disagree where each is unsure; their
mean output is steadier than any one of them (docs/design.md, "Ensembles"). For the post-norm
kinds (``residual``, ``sequence``) an output ``z`` is read as ``project(z)``, so the mean output
gives the mean of the members' logits: the normalised geometric mean of their distributions. An
ensemble is built at decoding from saved adapters (``--adapter A B C``); it is not trained or
saved as one.
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any, cast

import torch
from torch import nn

from data_owner_client.adapter.base import AdapterError, AdapterModule


class Ensemble(AdapterModule):
    """Adapters of one kind whose outputs are averaged (their decoding caches kept apart)."""

    def __init__(self, members: Sequence[AdapterModule]) -> None:
        super().__init__()
        kinds = {type(m) for m in members}
        if len(kinds) != 1:
            names = sorted(kind.__name__ for kind in kinds)
            raise AdapterError(f"an ensemble needs adapters of one kind, got {names}")
        self.members = nn.ModuleList(members)
        first = members[0]
        self.post_norm, self.reads_sequences = first.post_norm, first.reads_sequences

    def _members(self) -> list[AdapterModule]:
        return cast(list[AdapterModule], list(self.members))

    def forward(self, *inputs: torch.Tensor) -> torch.Tensor:
        return torch.stack([member(*inputs) for member in self._members()]).mean(0)

    def start(
        self, hidden: list[torch.Tensor], tokens: list[list[int]], capacity: int
    ) -> tuple[torch.Tensor, list[Any]]:
        outputs, caches = zip(
            *(member.start(hidden, tokens, capacity) for member in self._members()), strict=True
        )
        return torch.stack(outputs).mean(0), list(caches)

    def step(
        self, cache: list[Any], x: torch.Tensor, tokens: torch.Tensor, rows: torch.Tensor
    ) -> torch.Tensor:
        outputs = [
            member.step(own, x, tokens, rows)
            for member, own in zip(self._members(), cache, strict=True)
        ]
        return torch.stack(outputs).mean(0)

    def select(self, cache: list[Any], rows: torch.Tensor) -> list[Any]:
        return [m.select(own, rows) for m, own in zip(self._members(), cache, strict=True)]
