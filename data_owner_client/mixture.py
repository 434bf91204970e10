"""The mixed next-token distribution ``(1 − λ)·P_LM + λ·P_adapter`` of representations: what
decoding draws from (:mod:`data_owner_client.generate`) and what scheduled sampling predicts
with (:mod:`data_owner_client.memory.scheduled`)."""

from __future__ import annotations

import torch
import torch.nn.functional as F

from data_owner_client.adapter import Adapter
from data_owner_client.schedule import mix_log_probs
from shared.head import Head


def mixed_log_probs(
    head: Head, adapter: Adapter, x: torch.Tensor, lam: torch.Tensor, adapted: torch.Tensor | None
) -> torch.Tensor:
    """Log-probabilities ``[N, V]`` of the mixture at representations ``x [N, d]`` with each
    row's λ ``[N]``; ``adapted`` are the adapter's outputs there (computed from ``x`` when None,
    for the kinds that read one position)."""
    if adapted is None:
        assert not adapter.reads_sequences, "it reads the whole sequence"
        adapted = adapter(x)
    # One projection over both: the PLM's representation and the adapter's output.
    if adapter.post_norm:
        both = head.project(torch.cat([head.normalize(x), adapted]))
    else:
        both = head(torch.cat([x, adapted]))
    lp_lm, lp_adapter = F.log_softmax(both, dim=-1).chunk(2)
    return mix_log_probs(lp_lm, lp_adapter, lam)
