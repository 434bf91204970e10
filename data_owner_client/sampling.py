"""Choosing among next tokens: the repetition guard, top-k / top-p filtering, stop strings."""

from __future__ import annotations

import math
from collections.abc import Iterable, Sequence

import torch


def ban_repeats(log_probs: torch.Tensor, history: Sequence[Sequence[int]], n: int) -> None:
    """Rule out, in place, each row's tokens that would repeat an n-gram of its output."""
    if n:
        for b, tokens in enumerate(history):
            if banned := repeated_ngram_ends(tokens, n):
                log_probs[b, banned] = -math.inf


def filter_top_k_top_p(scores: torch.Tensor, top_k: int = 0, top_p: float = 1.0) -> torch.Tensor:
    """``scores [B, V]`` with everything outside the top-k and the top-p nucleus set to -inf."""
    if 0 < top_k < scores.shape[-1]:
        kth = scores.topk(top_k, dim=-1).values[..., -1:]
        scores = scores.masked_fill(scores < kth, float("-inf"))
    if top_p < 1.0:
        ordered, order = scores.sort(dim=-1, descending=True)
        # Drop a token when the tokens ranked above it already hold top_p of the probability.
        before = ordered.softmax(-1).cumsum(-1) - ordered.softmax(-1)
        drop_sorted = before >= top_p
        drop = torch.empty_like(drop_sorted).scatter_(-1, order, drop_sorted)
        scores = scores.masked_fill(drop, float("-inf"))
    return scores


def repeated_ngram_ends(tokens: Sequence[int], n: int) -> list[int]:
    """The tokens that would complete an n-gram already in ``tokens`` (as transformers'
    ``no_repeat_ngram_size``, over the output only: copying from the prompt stays allowed)."""
    if len(tokens) < n - 1:
        return []
    prefix = list(tokens[len(tokens) - n + 1 :]) if n > 1 else []
    return [
        tokens[i + n - 1]
        for i in range(len(tokens) - n + 1)
        if list(tokens[i : i + n - 1]) == prefix
    ]


def stop_index(text: str, stops: Iterable[str]) -> int | None:
    """Where the earliest stop string starts in ``text``, or None."""
    found = [i for s in stops if (i := text.find(s)) >= 0]
    return min(found) if found else None
