"""Session KV caches, and how several sessions' caches share one forward pass.

Each session owns a left-padded ``DynamicCache``: real tokens sit at the right end of every row,
so caches of different widths stack into one batch by padding more on the left (masked out) and
split back by keeping each session's rightmost columns. The result of a stacked step equals each
session's own step up to float rounding: padded keys get no attention weight.

Only the transformers cache layers whose layout is known (``DynamicLayer`` and
``DynamicSlidingWindowLayer``) are stacked; sessions of other layers step one by one.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass
from typing import Any, cast

import torch
import torch.nn.functional as F
from transformers import DynamicCache
from transformers.cache_utils import DynamicLayer, DynamicSlidingWindowLayer

_STACKABLE = (DynamicLayer, DynamicSlidingWindowLayer)


@dataclass
class KVState:
    """A generation session's cache: rows still alive, in cache order, and their padding mask."""

    cache: DynamicCache
    mask: torch.Tensor  # [B, T], 1 where a real token is cached (prompts are left-padded)
    rows: list[int]  # the caller's row ids of the cache's batch entries
    # While the prompts are read in chunks: their left-padded ids and mask [B, W]; the first
    # ``width`` columns are cached.
    prompt: tuple[torch.Tensor, torch.Tensor] | None = None

    @property
    def width(self) -> int:
        """Cached positions per row, padding included."""
        return int(self.mask.shape[1])

    @property
    def nbytes(self) -> int:
        total = self.mask.nbytes
        for layer in self.cache.layers:
            for t in (getattr(layer, "keys", None), getattr(layer, "values", None)):
                if isinstance(t, torch.Tensor):
                    total += t.nbytes
        return total

    def select(self, rows: Sequence[int], parents: Sequence[int] | None = None) -> None:
        """Keep only the listed rows, in that order (the rest are finished); with ``parents``,
        row ``k`` is a copy of live row ``parents[k]`` (a row may go on as several)."""
        sources = list(rows if parents is None else parents)
        if sources == self.rows and list(rows) == self.rows:
            return
        where = {r: i for i, r in enumerate(self.rows)}
        keep = torch.tensor([where[r] for r in sources], device=self.mask.device)
        self.cache.batch_select_indices(keep)
        self.mask = self.mask[keep]
        self.rows = list(rows)


MAX_PADDING = 2.0  # a stack may hold at most this many times the cells of its sessions


def width_groups(sizes: Sequence[tuple[int, int]]) -> list[list[int]]:
    """Indices of (width, rows) items grouped for stacking: widest first, each group padded to
    its widest item, and a group's padded cells at most ``MAX_PADDING`` times its real ones, so a
    long session never pads a batch of short ones to its length."""
    groups: list[list[int]] = []
    cells = padded = 0
    for i in sorted(range(len(sizes)), key=lambda i: -sizes[i][0]):
        width, rows = sizes[i]
        if groups:
            widest = sizes[groups[-1][0]][0]
            if padded + widest * rows <= MAX_PADDING * (cells + width * rows):
                groups[-1].append(i)
                cells, padded = cells + width * rows, padded + widest * rows
                continue
        groups.append([i])
        cells = padded = width * rows
    return groups


def stackable(states: Sequence[KVState]) -> bool:
    """Whether these caches can be stacked (known layer types, every layer filled)."""
    return all(
        type(layer) in _STACKABLE and getattr(layer, "keys", None) is not None
        for state in states
        for layer in state.cache.layers
    )


def _layers(cache: DynamicCache) -> list[tuple[torch.Tensor, torch.Tensor]]:
    """Each layer's (keys, values), of a cache that :func:`stackable` accepted."""
    layers = cast(list[DynamicLayer], cache.layers)
    return [(cast(torch.Tensor, layer.keys), cast(torch.Tensor, layer.values)) for layer in layers]


def stack(states: Sequence[KVState], config: Any) -> KVState:
    """One batch of all rows of ``states``, left-padded to the widest; the states are unchanged."""
    width = max(s.width for s in states)
    mask = torch.cat([F.pad(s.mask, (width - s.width, 0)) for s in states])
    cache = DynamicCache(config=config)
    sources = [_layers(s.cache) for s in states]
    for i, layer in enumerate(cache.layers):
        parts = [layers[i] for layers in sources]
        # A full layer holds every position; a sliding one at most its window: pad to the longest.
        length = max(k.shape[-2] for k, _ in parts)
        keys = torch.cat([_left_pad(k, length) for k, _ in parts])
        values = torch.cat([_left_pad(v, length) for _, v in parts])
        _fill(layer, keys, values, width)
    return KVState(cache, mask, [r for s in states for r in s.rows])


def split(stacked: KVState, parts: Sequence[tuple[list[int], int]], config: Any) -> list[KVState]:
    """Undo :func:`stack`: part ``(rows, width)`` takes the next ``len(rows)`` batch entries and
    their rightmost ``width`` positions, as if its rows had run alone.

    The parts are copies: views would keep the whole stacked buffer alive (and uncounted by
    the sessions' ``nbytes``) until every session of the pass stepped again.
    """
    out, first = [], 0
    for rows, width in parts:
        batch = slice(first, first + len(rows))
        first += len(rows)
        cache = DynamicCache(config=config)
        for layer, (keys, values) in zip(cache.layers, _layers(stacked.cache), strict=True):
            keep = min(keys.shape[-2], width)
            _fill(layer, keys[batch, :, -keep:].clone(), values[batch, :, -keep:].clone(), width)
        out.append(KVState(cache, stacked.mask[batch, -width:].clone(), list(rows)))
    return out


def _fill(layer: Any, keys: torch.Tensor, values: torch.Tensor, width: int) -> None:
    """Make an empty cache layer hold ``keys``/``values`` of a sequence ``width`` positions long."""
    layer.lazy_initialization(keys, values)
    layer.keys, layer.values = keys, values
    if isinstance(layer, DynamicSlidingWindowLayer):
        layer.cumulative_length = width


def _left_pad(t: torch.Tensor, length: int) -> torch.Tensor:
    return F.pad(t, (0, 0, length - t.shape[-2], 0))
