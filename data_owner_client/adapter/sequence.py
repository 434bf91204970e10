"""The ``sequence`` adapter kind: a small causal transformer over the whole sequence of
representations, so each position can attend to the source.

Input at position ``t``: ``W_in · norm(f(c_t))``, plus ``W_tok · E[token_t]`` (the head's output
embedding of the token read at ``t``) with ``token_inputs``. Pre-norm blocks with rotary positions,
then ``z_t = norm(f(c_t)) + W_out · LN(h_t)`` with ``W_out`` zero-initialised, so an untrained
adapter gives exactly the PLM's distribution. The logits are ``project(z_t)``.

With ``copy``, a pointer into the sequence so far is added too: one more causal attention from
``LN(h_t)`` over every position, whose values are the output embeddings of the tokens read there,
scaled by a gate ``g_t`` (zero-initialised): ``z_t += g_t · Σ_i α_ti · E[token_i]``. Read by the
output projection, ``E[token_i]`` raises the logit of ``token_i`` itself (and of tokens like it),
so copying a source word is one attention step away rather than something to rebuild in the
transformer's narrower width.

The pointer's values are the tokens read at the attended positions (``pointer="read"``, over the
whole sequence so far), or, with ``pointer="source"``, the prompt's tokens that follow them:
position ``t`` attends to the prompt positions ``i`` with ``i + 1`` still in the prompt and copies
``token_{i+1}``, an induction head in one step. Reading the token ``w`` that the source also read
at ``i``, it copies the source's next token; its own output, which it cannot point into, cannot
make it loop. A learned sink key with a zero value lets it attend nowhere.

Decoding steps it one position at a time with a :class:`SequenceCache` of its own keys and values
per row, next to the server's session; that equals running it over the whole sequence.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import ClassVar

import torch
import torch.nn.functional as F
from torch import nn

from data_owner_client.adapter.base import AdapterConfig, AdapterError, AdapterKind, AdapterModule
from data_owner_client.options import option, override
from shared.head import Head

ROPE_BASE = 10_000.0
POINTERS = ("read", "source")  # what the copy pointer's values are (see the module docstring)


@dataclass
class SequenceConfig(AdapterConfig):
    """The sequence kind; its defaults are the best on the Bible tuning verses
    (results/quality/README.md)."""

    kind: ClassVar[str] = "sequence"

    lambda_max: float = override(AdapterConfig, "lambda_max", 0.7)
    schedule: str = override(AdapterConfig, "schedule", "constant")
    no_repeat_ngram: int = override(AdapterConfig, "no_repeat_ngram", 4)
    num_beams: int = override(AdapterConfig, "num_beams", 4)
    width: int = option(256, help="width of the side transformer")
    layers: int = option(2, help="transformer blocks")
    heads: int = option(4, help="attention heads per block")
    token_inputs: bool = option(
        True,
        help="read the output embedding of each position's token too, not only the representations",
    )
    copy: bool = option(
        True,
        help="add a gated pointer that copies tokens of the prompt and output so far (not for "
        "heads with a project_out)",
    )
    # The pointer copies the prompt's token after the attended one ("source"), or the token read
    # there, anywhere in the sequence ("read": the only pointer before "source").
    pointer: str = option(
        "source",
        help="the copy pointer copies the token read at the position it attends to (read), or "
        "attends to the prompt alone and copies the token after that position (source: an "
        "induction step, go on where the source matches)",
        choices=POINTERS,
    )

    def __post_init__(self) -> None:
        super().__post_init__()
        if min(self.width, self.layers, self.heads) < 1 or self.width % (2 * self.heads):
            raise AdapterError(
                f"the sequence kind needs a width divisible by 2 × heads, got width {self.width} "
                f"and {self.heads} heads"
            )
        if self.pointer not in POINTERS:
            raise AdapterError(f"pointer must be one of {POINTERS}, got {self.pointer!r}")

    def tensor_shapes(self) -> dict[str, tuple[int, ...]]:
        d, w = self.hidden_size, self.width
        last = f"blocks.{self.layers - 1}.qkv.weight"
        return {"inputs.weight": (w, d), "output.weight": (d, w), last: (3 * w, w)}


@dataclass
class SequenceCache:
    """Each row's keys and values so far, per layer ``[B, heads, capacity, head_dim]``."""

    keys: list[torch.Tensor]  # per block, then the copy pointer's (its values: [B, 1, ·, e])
    values: list[torch.Tensor]
    lengths: torch.Tensor  # [B] positions filled per row
    prompts: torch.Tensor  # [B] each row's prompt positions

    @property
    def capacity(self) -> int:
        return self.keys[0].shape[2]

    def select(self, rows: torch.Tensor) -> SequenceCache:
        """The cache of ``rows``, in that order (a row may repeat: beam search forks)."""
        return SequenceCache(
            [k[rows] for k in self.keys],
            [v[rows] for v in self.values],
            self.lengths[rows],
            self.prompts[rows],
        )


def _rotary(positions: torch.Tensor, head_dim: int) -> tuple[torch.Tensor, torch.Tensor]:
    """cos and sin ``[B, 1, T, head_dim / 2]`` of rotary embeddings at ``positions [B, T]``."""
    exponents = torch.arange(0, head_dim, 2, device=positions.device, dtype=torch.float32)
    inverse = ROPE_BASE ** (-exponents / head_dim)
    angles = positions.float().unsqueeze(-1) * inverse
    return angles.cos().unsqueeze(1), angles.sin().unsqueeze(1)


def _rotate(x: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor) -> torch.Tensor:
    first, second = x.chunk(2, dim=-1)
    return torch.cat([first * cos - second * sin, first * sin + second * cos], dim=-1)


def _attend(
    q: torch.Tensor,
    k: torch.Tensor,
    v: torch.Tensor,
    dropout: float,
    cache: tuple[torch.Tensor, torch.Tensor] | None = None,
    rows: torch.Tensor | None = None,
    positions: torch.Tensor | None = None,
) -> torch.Tensor:
    """Causal attention ``[B, heads, T, ·]``: over the queries' own positions without a cache;
    with one, ``k`` and ``v`` (one new position of each of ``rows``, at ``positions``) are written
    into it first and each query attends to its row up to there."""
    if cache is None:
        return F.scaled_dot_product_attention(q, k, v, dropout_p=dropout, is_causal=True)
    assert rows is not None and positions is not None
    cache_k, cache_v = cache
    cache_k[rows, :, positions] = k[:, :, 0]
    cache_v[rows, :, positions] = v[:, :, 0]
    slots = torch.arange(cache_k.shape[2], device=q.device)
    mask = (slots <= positions.unsqueeze(-1)).view(len(rows), 1, 1, -1)
    return F.scaled_dot_product_attention(
        q, cache_k[rows], cache_v[rows], attn_mask=mask, dropout_p=dropout
    )


class _Block(nn.Module):
    """Pre-norm causal self-attention and MLP, each added to the stream."""

    def __init__(self, width: int, heads: int, dropout: float) -> None:
        super().__init__()
        self.heads, self.dropout = heads, dropout
        self.norm1, self.norm2 = nn.LayerNorm(width), nn.LayerNorm(width)
        self.qkv = nn.Linear(width, 3 * width)
        self.out = nn.Linear(width, width)
        self.mlp = nn.Sequential(
            nn.Linear(width, 4 * width), nn.GELU(), nn.Linear(4 * width, width)
        )
        self.drop = nn.Dropout(dropout)

    def forward(
        self,
        h: torch.Tensor,
        rotary: tuple[torch.Tensor, torch.Tensor],
        cache: tuple[torch.Tensor, torch.Tensor] | None = None,
        rows: torch.Tensor | None = None,
        positions: torch.Tensor | None = None,
    ) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        """``h [B, T, W]`` → (``h``, keys, values of these positions).

        Without a cache the positions are whole sequences (causal). With one, ``h`` holds one
        new position of each of ``rows``, at ``positions``: its key and value are written into
        the cache and it attends to everything that row has up to there.
        """
        b, t, width = h.shape
        qkv = self.qkv(self.norm1(h)).view(b, t, 3, self.heads, width // self.heads)
        q, k, v = qkv.permute(2, 0, 3, 1, 4)  # each [B, heads, T, head_dim]
        q, k = _rotate(q, *rotary), _rotate(k, *rotary)
        p = self.dropout if self.training else 0.0
        attended = _attend(q, k, v, p, cache, rows, positions)
        h = h + self.drop(self.out(attended.transpose(1, 2).reshape(b, t, width)))
        h = h + self.drop(self.mlp(self.norm2(h)))
        return h, k, v


class SequenceAdapter(AdapterModule):
    """A causal transformer over the representations of prompt + continuation."""

    post_norm = True  # outputs live after the final norm: logits are head.project(z)
    reads_sequences = True

    def __init__(
        self,
        head: Head,
        hidden_size: int,
        width: int = 256,
        layers: int = 2,
        heads: int = 4,
        dropout: float = 0.1,
        token_inputs: bool = True,
        copy: bool = False,
        pointer: str = "read",
    ) -> None:
        super().__init__()
        if width % heads or (width // heads) % 2:
            raise ValueError(f"width {width} must split into {heads} heads of an even size")
        if pointer not in POINTERS:
            raise ValueError(f"pointer must be one of {POINTERS}, got {pointer!r}")
        self.heads, self.head_dim = heads, width // heads
        self.normalize, self.embed = head.normalize, head.embed  # methods: saved nowhere
        self.inputs = nn.Linear(hidden_size, width)
        embedding_size = head.output_weight.shape[1]
        if copy and embedding_size != hidden_size:
            raise ValueError(
                "the copy pointer adds output embeddings to the vector the head's projection "
                f"reads, but this head projects {hidden_size} to {embedding_size} first "
                "(project_out): train with --no-copy"
            )
        self.tokens = nn.Linear(embedding_size, width, bias=False) if token_inputs else None
        self.drop = nn.Dropout(dropout)
        self.blocks = nn.ModuleList(_Block(width, heads, dropout) for _ in range(layers))
        self.norm = nn.LayerNorm(width)
        self.output = nn.Linear(width, hidden_size, bias=False)
        nn.init.zeros_(self.output.weight)
        self.pointer = nn.Linear(width, 2 * width) if copy else None  # query and key
        self.gate = nn.Linear(width, 1) if copy else None
        if self.gate is not None:
            nn.init.zeros_(self.gate.weight)
            nn.init.zeros_(self.gate.bias)
        self.sink = nn.Parameter(torch.zeros(width)) if copy and pointer == "source" else None

    @classmethod
    def from_config(
        cls,
        config: SequenceConfig,
        head: Head | None = None,
        *,
        generator: torch.Generator | None = None,
    ) -> SequenceAdapter:
        if head is None:
            raise AdapterError("a sequence adapter needs the served model's head")
        with torch.random.fork_rng(devices=[]):  # nn.Linear draws from the global CPU RNG
            if generator is not None:
                seed = int(torch.randint(2**62, (1,), generator=generator))
                torch.random.default_generator.manual_seed(seed)  # not the accelerators' RNGs
            return cls(
                head,
                config.hidden_size,
                config.width,
                config.layers,
                config.heads,
                config.dropout,
                config.token_inputs,
                config.copy,
                config.pointer,
            )

    def _embed(self, x: torch.Tensor, tokens: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """(``norm(x)``, the stream's input) for representations ``x`` and the tokens read."""
        n = self.normalize(x)
        h = self.inputs(n)
        if self.tokens is not None:
            h = h + self.tokens(self.embed(tokens))
        return n, self.drop(h)

    def _out(
        self,
        n: torch.Tensor,
        h: torch.Tensor,
        tokens: torch.Tensor,
        prompts: torch.Tensor,
        cache: tuple[torch.Tensor, torch.Tensor] | None = None,
        rows: torch.Tensor | None = None,
        positions: torch.Tensor | None = None,
    ) -> tuple[torch.Tensor, torch.Tensor | None, torch.Tensor | None]:
        """``z`` from the stream ``h [B, T, W]``; and the copy pointer's keys and values.
        ``prompts [B]`` are the rows' prompt lengths (those of ``rows`` with a cache)."""
        h = self.norm(h)
        z = n + self.output(h)
        if self.pointer is None or self.gate is None:
            return z, None, None
        q, k = self.pointer(h).unsqueeze(1).chunk(2, dim=-1)  # [B, 1, T, W]
        v = self.embed(tokens).unsqueeze(1)  # [B, 1, T, e]
        if self.sink is None:
            copied = _attend(q, k, v, 0.0, cache, rows, positions)
        else:
            copied, v = self._point_to_source(q, k, v, prompts, cache)
        return z + self.gate(h) * copied.squeeze(1), k, v

    def _point_to_source(
        self,
        q: torch.Tensor,
        k: torch.Tensor,
        v: torch.Tensor,
        prompts: torch.Tensor,
        cache: tuple[torch.Tensor, torch.Tensor] | None,
    ) -> tuple[torch.Tensor, torch.Tensor]:
        """The "source" pointer: each query attends to the sink and to the prompt positions
        ``i < prompt - 1`` before its own, whose values are the tokens read at ``i + 1``; and the
        values to cache (the prompt's, shifted; decoding never adds to them)."""
        assert self.sink is not None
        if cache is None:
            t = q.shape[2]
            v = F.pad(v[:, :, 1:], (0, 0, 0, 1))  # slot i: the token read at i + 1
            slots = torch.arange(t, device=q.device)
            causal = slots.unsqueeze(1) > slots  # [T, T]: query t, slot i < t
            in_prompt = slots < (prompts - 1).view(-1, 1, 1)  # [B, 1, T]
            mask = (causal & in_prompt).unsqueeze(1)
            keys, values = k, v
        else:
            keys, values = cache  # the rows' own, already
            slots = torch.arange(keys.shape[2], device=q.device)
            mask = (slots < (prompts - 1).unsqueeze(-1)).view(len(q), 1, 1, -1)
        sink = self.sink.view(1, 1, 1, -1).expand(len(q), 1, 1, -1)
        keys = torch.cat([sink, keys], dim=2)
        values = F.pad(values, (0, 0, 1, 0))  # the sink's value is zero
        mask = F.pad(mask, (1, 0), value=True)
        return F.scaled_dot_product_attention(q, keys, values, attn_mask=mask), v

    def forward(
        self, x: torch.Tensor, tokens: torch.Tensor, prompts: torch.Tensor | None = None
    ) -> torch.Tensor:
        """``z [B, T, d]`` for whole sequences ``x [B, T, d]`` read as ``tokens [B, T]``, whose
        first ``prompts [B]`` positions are the prompt (default: all of them; only the "source"
        pointer reads it).

        Right padding is harmless: causal attention never lets a real position see it.
        """
        return self._forward(x, tokens, prompts)[0]

    def _forward(
        self, x: torch.Tensor, tokens: torch.Tensor, prompts: torch.Tensor | None = None
    ) -> tuple[torch.Tensor, list[torch.Tensor], list[torch.Tensor]]:
        if prompts is None:
            prompts = torch.full((x.shape[0],), x.shape[1], device=x.device)
        n, h = self._embed(x, tokens)
        positions = torch.arange(x.shape[1], device=x.device).expand(x.shape[0], -1)
        rotary = _rotary(positions, self.head_dim)
        keys, values = [], []
        for block in self.blocks:
            h, k, v = block(h, rotary)
            keys.append(k)
            values.append(v)
        z, k, v = self._out(n, h, tokens, prompts)
        if k is not None and v is not None:
            keys.append(k)
            values.append(v)
        return z, keys, values

    def train_outputs(
        self, x: torch.Tensor, tokens: torch.Tensor, labels: torch.Tensor
    ) -> tuple[torch.Tensor, torch.Tensor]:
        """``z`` and labels of the positions that predict a target token (labels ≥ 0); the
        prompt ends at the first of them."""
        scored = labels >= 0
        first = torch.where(scored.any(1), scored.int().argmax(1), labels.shape[1] - 1)
        return self(x, tokens, first + 1)[scored], labels[scored]

    def start(
        self, hidden: list[torch.Tensor], tokens: list[list[int]], capacity: int
    ) -> tuple[torch.Tensor, SequenceCache]:
        """Run over each row's prompt (``hidden[b]`` ``[len_b, d]``, read as ``tokens[b]``);
        ``z`` of each row's last position ``[B, d]`` and a cache with room for ``capacity``."""
        lengths = torch.tensor([len(t) for t in tokens], device=hidden[0].device)
        if int(lengths.max()) > capacity or int(lengths.min()) < 1:
            raise ValueError(f"prompts need 1 to {capacity} positions, got {lengths.tolist()}")
        x = nn.utils.rnn.pad_sequence(hidden, batch_first=True)
        ids = nn.utils.rnn.pad_sequence(
            [torch.tensor(t, device=x.device) for t in tokens], batch_first=True
        )
        z, keys, values = self._forward(x, ids, lengths)
        cache = SequenceCache(
            [_room(k, capacity) for k in keys],
            [_room(v, capacity) for v in values],
            lengths,
            lengths.clone(),
        )
        return z[torch.arange(len(tokens)), lengths - 1], cache

    def step(
        self, cache: SequenceCache, x: torch.Tensor, tokens: torch.Tensor, rows: torch.Tensor
    ) -> torch.Tensor:
        """``z [n, d]`` of one new position of each of ``rows [n]`` (its representation
        ``x [n, d]``, read as ``tokens [n]``); the rows' caches grow by that position."""
        positions = cache.lengths[rows]
        if int(positions.max()) >= cache.capacity:
            raise ValueError(f"the adapter's cache holds {cache.capacity} positions per row")
        tokens = tokens.unsqueeze(1)
        n, h = self._embed(x.unsqueeze(1), tokens)
        rotary = _rotary(positions.unsqueeze(1), self.head_dim)
        layers = len(self.blocks)
        for block, k, v in zip(
            self.blocks, cache.keys[:layers], cache.values[:layers], strict=True
        ):
            h = block(h, rotary, (k, v), rows, positions)[0]
        pointer = None
        if self.pointer is not None:
            pointer = (cache.keys[-1], cache.values[-1])
            if self.sink is not None:  # the source pointer reads the prompts alone
                pointer = (pointer[0][rows], pointer[1][rows])
        z = self._out(n, h, tokens, cache.prompts[rows], pointer, rows, positions)[0]
        cache.lengths[rows] += 1
        return z.squeeze(1)

    def select(self, cache: SequenceCache, rows: torch.Tensor) -> SequenceCache:
        return cache.select(rows)


def _room(t: torch.Tensor, capacity: int) -> torch.Tensor:
    """``t [B, heads, T, head_dim]`` copied into a zeroed tensor of ``capacity`` positions."""
    room = t.new_zeros(*t.shape[:2], capacity, t.shape[3])
    room[:, :, : t.shape[2]] = t
    return room


KIND = AdapterKind(
    "sequence",
    SequenceConfig,
    SequenceAdapter,
    signature=(
        "kind",
        "hidden_size",
        "vocab_size",
        "width",
        "layers",
        "heads",
        "dropout",
        "token_inputs",
        "copy",
        "pointer",
        "fingerprint",
    ),  # fmt: skip
    mixture=True,
)
