"""The external memory's store (docs/design.md, "On-disk formats"): pairs (f(c), y) on disk, read
in shuffled batches for training. How a memory is made: :mod:`data_owner_client.memory.build`.

A memory is a directory of safetensors shards ``shard-00000.safetensors`` plus ``manifest.json``.
Its ``positions`` say what a shard holds:

- ``"all"`` (version 2, teacher-forced builds): every position of every example's sequence
  (prompt + target without its final EOS): ``keys`` [n, d] in the memory dtype, ``tokens`` int32
  [n] (the token read at each position), ``values`` int32 [n] (the token that follows it),
  ``offsets`` int64 [E + 1] (example ``e`` is rows ``offsets[e]:offsets[e + 1]``) and ``starts``
  int32 [E] (its first row that predicts a target token). Pair kinds read the target rows only;
  the sequence kind reads whole examples (:meth:`Memory.sequences`).
  A scheduled-sampling build (context ``"scheduled"``) reads some target tokens as the adapter's
  own predictions: its ``tokens`` are those read, its ``values`` the gold tokens still.
- ``"targets"`` (version 1 memories, and the generated-context variant): only the pairs, ``keys``
  [n, d] and ``values`` int32 [n].

Shard ``i`` holds the pairs of examples ``[i * shard_examples, (i + 1) * shard_examples)``; every
file is written atomically (:func:`data_owner_client.files.write_atomic`).
"""

from __future__ import annotations

import hashlib
import itertools
import math
import re
from collections.abc import Iterator
from pathlib import Path
from typing import Final, Literal

import torch
from pydantic import BaseModel, ConfigDict, ValidationError
from safetensors import safe_open
from safetensors.torch import save

from data_owner_client.files import write_atomic

FORMAT: Final = "pema-memory"
VERSION: Final = 2
MANIFEST = "manifest.json"
SHARD_NAME = re.compile(r"shard-\d{5,}\.safetensors")
Context = Literal["teacher", "generated", "scheduled"]
Positions = Literal["targets", "all"]
IGNORE: Final = -100  # the label of positions that predict no target token
DTYPES: dict[str, torch.dtype] = {
    "float16": torch.float16,
    "bfloat16": torch.bfloat16,
    "float32": torch.float32,
}
Batch = tuple[torch.Tensor, torch.Tensor]  # keys, values
ExampleRows = tuple[torch.Tensor, torch.Tensor, torch.Tensor]  # one example's keys, tokens, labels
SequenceBatch = tuple[torch.Tensor, torch.Tensor, torch.Tensor]  # the same, padded to [B, T, ...]
SEQUENCE_TENSORS = ("keys", "tokens", "values", "offsets", "starts")  # a shard of all positions


class MemoryStoreError(ValueError):
    """A memory directory that cannot be opened, continued or read; the message says what to do."""


class FingerprintMismatchError(MemoryStoreError):
    """The memory was built on another model than the one the server serves."""


class ShardInfo(BaseModel):
    """One shard file and the examples whose pairs it holds."""

    model_config = ConfigDict(extra="forbid", frozen=True)

    file: str
    count: int  # pairs
    rows: int | None = None  # positions stored, when they are all positions
    examples: tuple[int, int]  # [first, end)
    source_tokens: int
    target_tokens: int  # without EOS


class Sampling(BaseModel):
    """How a scheduled-sampling memory replaced target tokens (context ``"scheduled"``)."""

    model_config = ConfigDict(extra="forbid", frozen=True)

    rate: float  # the chance that a target token is read as the adapter's prediction
    seed: int
    adapter: str  # sha256 of the predicting adapter's config and weights


class Manifest(BaseModel):
    """``manifest.json``: what the memory was built from and which shards are done."""

    model_config = ConfigDict(extra="forbid")

    format: Literal["pema-memory"] = FORMAT
    version: Literal[1, 2] = VERSION
    fingerprint: str
    model_id: str
    hidden_size: int
    dtype: Literal["float16", "bfloat16", "float32"]
    count: int = 0  # pairs in the recorded shards
    shards: list[ShardInfo] = []
    examples: int  # examples in the whole dataset
    shard_examples: int
    dataset_hash: str
    template: str
    context: Context
    positions: Positions = "targets"  # what the shards hold (see the module docstring)
    eos_token_id: int
    sampling: Sampling | None = None  # context "scheduled" only
    source_tokens: int = 0  # sums over the recorded shards, for the length ratio
    target_tokens: int = 0
    complete: bool = False

    @property
    def num_shards(self) -> int:
        """Shards of the finished memory."""
        return math.ceil(self.examples / self.shard_examples)

    @property
    def length_ratio(self) -> float:
        """Target tokens (without EOS) per source token over the whole dataset."""
        return self.target_tokens / max(self.source_tokens, 1)

    def with_shard(self, shard: ShardInfo) -> Manifest:
        """This manifest with ``shard`` recorded (shards kept in order, totals updated)."""
        shards = sorted({s.file: s for s in [*self.shards, shard]}.values(), key=lambda s: s.file)
        return self.model_copy(
            update={
                "shards": shards,
                "count": sum(s.count for s in shards),
                "source_tokens": sum(s.source_tokens for s in shards),
                "target_tokens": sum(s.target_tokens for s in shards),
            }
        )


def shard_name(index: int) -> str:
    return f"shard-{index:05d}.safetensors"


def check_fingerprint(path: Path, manifest: Manifest, fingerprint: str) -> None:
    """Refuse a memory built on another model than ``fingerprint``."""
    if manifest.fingerprint != fingerprint:
        raise FingerprintMismatchError(
            f"memory at {path} was built on model fingerprint {manifest.fingerprint}, the server "
            f"serves {fingerprint}: rebuild it with pema-client memory build"
        )


class Memory:
    """A finished memory directory: its manifest, and its pairs streamed from disk."""

    def __init__(self, path: Path, manifest: Manifest) -> None:
        self.path, self.manifest = path, manifest

    @classmethod
    def open(cls, path: str | Path) -> Memory:
        """Open a complete memory; a missing, foreign or unfinished one is a clear error."""
        path = Path(path)
        if not (path / MANIFEST).is_file():
            raise MemoryStoreError(
                f"no memory at {path} (no {MANIFEST}): build one with pema-client memory build"
            )
        manifest = read_manifest(path)
        if not manifest.complete:
            raise MemoryStoreError(
                f"memory at {path} is unfinished ({len(manifest.shards)} of "
                f"{manifest.num_shards} shards): run the same build again to finish it"
            )
        if missing := [s.file for s in manifest.shards if not (path / s.file).is_file()]:
            raise MemoryStoreError(f"memory at {path} lacks shard files {missing}: rebuild it")
        return cls(path, manifest)

    def __len__(self) -> int:
        return self.manifest.count

    def check_fingerprint(self, fingerprint: str) -> None:
        """Refuse to pair this memory with a model other than ``fingerprint``."""
        check_fingerprint(self.path, self.manifest, fingerprint)

    def num_batches(self, batch_size: int, world_size: int = 1, *, drop_last: bool = False) -> int:
        """Batches each rank gets from :meth:`batches` per epoch."""
        return split_batches(len(self), batch_size, world_size, drop_last)

    def batches(
        self,
        batch_size: int,
        *,
        seed: int,
        epoch: int,
        rank: int = 0,
        world_size: int = 1,
        shuffle: bool = True,
        buffer_shards: int = 4,
        drop_last: bool = False,
    ) -> Iterator[Batch]:
        """One epoch of (keys float32 [b, d], values int64 [b]) for this rank.

        Shards stream through a shuffle buffer of ``buffer_shards`` shards; shard order and
        in-buffer order come from (seed, epoch) alone. Every rank walks the same sequence of
        global batches of ``batch_size * world_size`` pairs and takes its slice of each, so a step
        of ``world_size`` ranks sees the pairs one process sees with the global batch. The last,
        partial global batch is split as evenly as it goes (dropped with ``drop_last``, or when it
        has fewer pairs than ranks): every rank takes the same number of steps (DDP needs that).
        """
        _check_split(batch_size, rank, world_size, buffer_shards)
        whole = batch_size * world_size
        stream = self._global_batches(whole, _generator(seed, epoch), shuffle, buffer_shards)
        count = self.num_batches(batch_size, world_size, drop_last=drop_last)
        return _rank_slices(itertools.islice(stream, count), rank, world_size)

    def sequences(self) -> SequenceView:
        """The memory as whole examples, for the sequence kind; needs all positions stored."""
        if self.manifest.positions != "all":
            raise MemoryStoreError(
                f"memory at {self.path} holds only the target positions (built with context "
                f"{self.manifest.context!r}, format version {self.manifest.version}); the "
                "sequence adapter reads every position: build a new memory with this version and "
                "--context teacher (pema-client memory build)"
            )
        return SequenceView(self)

    def load_all(self) -> Batch:
        """Every pair in shard order (keys float32, values int64): for small memories only."""
        parts = [self._load_shard(shard) for shard in self.manifest.shards]
        keys = torch.cat([k for k, _ in parts]).to(torch.float32)
        return keys, torch.cat([v for _, v in parts]).to(torch.int64)

    def _global_batches(
        self, batch_size: int, generator: torch.Generator, shuffle: bool, buffer_shards: int
    ) -> Iterator[Batch]:
        """Batches of the whole epoch, the pairs a buffer leaves over carried into the next."""
        carry_keys = torch.empty(0, self.manifest.hidden_size, dtype=DTYPES[self.manifest.dtype])
        carry_values = torch.empty(0, dtype=torch.int32)
        for window_keys, window_values in self._windows(generator, shuffle, buffer_shards):
            keys, values = (
                torch.cat([carry_keys, window_keys]),
                torch.cat([carry_values, window_values]),
            )
            del window_keys, window_values  # at most one buffer alive while the next loads
            full = len(keys) // batch_size * batch_size
            if full:  # split() of an empty tensor would yield one empty batch
                yield from zip(
                    keys[:full].split(batch_size), values[:full].split(batch_size), strict=True
                )
            carry_keys, carry_values = keys[full:].clone(), values[full:].clone()
            del keys, values
        if len(carry_keys):
            yield carry_keys, carry_values

    def _windows(
        self, generator: torch.Generator, shuffle: bool, buffer_shards: int
    ) -> Iterator[Batch]:
        """The pairs of ``buffer_shards`` shards at a time, shuffled together."""
        shards = self.manifest.shards
        if shuffle:
            order = torch.randperm(len(shards), generator=generator).tolist()
        else:
            order = list(range(len(shards)))
        for first in range(0, len(order), buffer_shards):
            parts = [self._load_shard(shards[i]) for i in order[first : first + buffer_shards]]
            keys, values = torch.cat([k for k, _ in parts]), torch.cat([v for _, v in parts])
            del parts
            if shuffle:
                perm = torch.randperm(len(keys), generator=generator)
                keys, values = keys[perm], values[perm]
            yield keys, values
            del keys, values

    def _load_shard(self, shard: ShardInfo) -> Batch:
        """A shard's pairs: keys (memory dtype) and values (int32) of the target positions."""
        tensors = self._read_shard(shard)
        if "starts" not in tensors:
            return tensors["keys"], tensors["values"]
        scored = _scored(tensors)
        keys, values = tensors["keys"][scored], tensors["values"][scored]
        if len(values) != shard.count:
            raise MemoryStoreError(
                f"{self.path / shard.file} holds {len(values)} target positions, the manifest "
                f"says {shard.count}: rebuild the memory"
            )
        return keys, values

    def _load_examples(self, shard: ShardInfo) -> list[ExampleRows]:
        """A shard's examples, each (keys [L, d], tokens [L], labels [L]; IGNORE off-target)."""
        tensors = self._read_shard(shard)
        labels = tensors["values"].masked_fill(~_scored(tensors), IGNORE)
        bounds = tensors["offsets"].tolist()
        return [
            (tensors["keys"][a:b], tensors["tokens"][a:b], labels[a:b])
            for a, b in itertools.pairwise(bounds)
        ]

    def _read_shard(self, shard: ShardInfo) -> dict[str, torch.Tensor]:
        """A shard's tensors, checked against the manifest."""
        path = self.path / shard.file
        with safe_open(str(path), framework="pt") as f:
            tensors = {name: f.get_tensor(name) for name in f.keys()}  # noqa: SIM118
        keys, values = tensors.get("keys"), tensors.get("values")
        rows = shard.rows if self.manifest.positions == "all" else shard.count
        shape = (rows, self.manifest.hidden_size)
        dtype = DTYPES[self.manifest.dtype]
        layout = SEQUENCE_TENSORS if self.manifest.positions == "all" else ("keys", "values")
        if (
            sorted(tensors) != sorted(layout)
            or keys is None
            or values is None
            or tuple(keys.shape) != shape
            or keys.dtype != dtype
            or values.shape != (rows,)
        ):
            found = {name: (tuple(t.shape), str(t.dtype)) for name, t in tensors.items()}
            raise MemoryStoreError(
                f"{path} holds {found}, but the manifest says keys {shape} {dtype} and "
                f"{sorted(layout)}: rebuild the memory"
            )
        return tensors


def _scored(tensors: dict[str, torch.Tensor]) -> torch.Tensor:
    """Which rows of a shard of all positions predict a target token: from each example's start."""
    offsets, lengths = tensors["offsets"], tensors["offsets"].diff()
    position = torch.arange(int(offsets[-1])) - offsets[:-1].repeat_interleave(lengths)
    return position >= tensors["starts"].long().repeat_interleave(lengths)


class SequenceView:
    """A memory's whole examples in shuffled batches: the sequence kind's :class:`BatchSource`.

    A batch is (keys float32 [B, T, d], tokens int64 [B, T], labels int64 [B, T]), right-padded
    to its longest example; labels are the target tokens at the positions that predict one and
    ``IGNORE`` elsewhere. ``batch_size`` counts examples; ordering, shuffling and the split over
    ranks work as :meth:`Memory.batches` does for pairs.
    """

    def __init__(self, memory: Memory) -> None:
        self.memory = memory

    def __len__(self) -> int:
        return self.memory.manifest.examples

    def num_batches(self, batch_size: int, world_size: int = 1) -> int:
        """Batches each rank gets from :meth:`batches` per epoch."""
        return split_batches(len(self), batch_size, world_size)

    def batches(
        self,
        batch_size: int,
        *,
        seed: int,
        epoch: int,
        rank: int = 0,
        world_size: int = 1,
        shuffle: bool = True,
        buffer_shards: int = 4,
    ) -> Iterator[SequenceBatch]:
        """One epoch of this rank's padded batches."""
        _check_split(batch_size, rank, world_size, buffer_shards)
        whole = batch_size * world_size
        generator = _generator(seed, epoch)
        stream = self._global_batches(whole, generator, shuffle, buffer_shards)
        for batch in itertools.islice(stream, self.num_batches(batch_size, world_size)):
            mine = torch.arange(len(batch)).tensor_split(world_size)[rank].tolist()
            yield _pad([batch[i] for i in mine])

    def _global_batches(
        self, batch_size: int, generator: torch.Generator, shuffle: bool, buffer_shards: int
    ) -> Iterator[list[ExampleRows]]:
        shards = self.memory.manifest.shards
        if shuffle:
            order = torch.randperm(len(shards), generator=generator).tolist()
        else:
            order = list(range(len(shards)))
        carry: list[ExampleRows] = []
        for first in range(0, len(order), buffer_shards):
            window = carry + [
                example
                for i in order[first : first + buffer_shards]
                for example in self.memory._load_examples(shards[i])
            ]
            if shuffle:
                window = [window[i] for i in torch.randperm(len(window), generator=generator)]
            full = len(window) // batch_size * batch_size
            for lo in range(0, full, batch_size):
                yield window[lo : lo + batch_size]
            carry = window[full:]
        if carry:
            yield carry


def _pad(examples: list[ExampleRows]) -> SequenceBatch:
    """Right-pad examples into one batch (keys float32, tokens and labels int64)."""
    keys, tokens, labels = zip(*examples, strict=True)
    pad = torch.nn.utils.rnn.pad_sequence
    return (
        pad([k.float() for k in keys], batch_first=True),
        pad([t.long() for t in tokens], batch_first=True),
        pad([y.long() for y in labels], batch_first=True, padding_value=IGNORE),
    )


def _rank_slices(stream: Iterator[Batch], rank: int, world_size: int) -> Iterator[Batch]:
    """Slice ``rank`` of each global batch, as float32 keys and int64 values."""
    for keys, values in stream:
        keys, values = (t.tensor_split(world_size)[rank] for t in (keys, values))
        # Copies, so a batch the caller holds does not pin the whole shuffle buffer.
        yield keys.to(torch.float32, copy=True), values.to(torch.int64, copy=True)


def split_batches(pairs: int, batch_size: int, world_size: int = 1, drop_last: bool = False) -> int:
    """Steps per epoch over ``pairs`` at ``batch_size`` per rank (see :meth:`Memory.batches`)."""
    whole, rest = divmod(pairs, batch_size * world_size)
    return whole + (0 < rest and rest >= world_size and not drop_last)


def _check_split(batch_size: int, rank: int, world_size: int, buffer_shards: int) -> None:
    if batch_size < 1 or buffer_shards < 1 or world_size < 1:
        raise ValueError("batch_size, buffer_shards and world_size must be at least 1")
    if not 0 <= rank < world_size:
        raise ValueError(f"rank {rank} is outside [0, {world_size})")


def _generator(seed: int, epoch: int) -> torch.Generator:
    """A generator seeded from (seed, epoch), so every rank draws the same permutations."""
    digest = hashlib.sha256(f"{seed}:{epoch}".encode()).digest()
    return torch.Generator().manual_seed(int.from_bytes(digest[:8], "little") >> 1)


# ---- files ----------------------------------------------------------------------------------


def read_manifest(path: Path) -> Manifest:
    """The manifest of the memory directory ``path``."""
    try:
        return Manifest.model_validate_json((path / MANIFEST).read_bytes())
    except ValidationError as exc:
        raise MemoryStoreError(
            f"{path / MANIFEST} is not a {FORMAT} manifest of version 1 to {VERSION} "
            f"({exc.error_count()} "
            f"problems, first: {exc.errors()[0]['loc']}: {exc.errors()[0]['msg']})"
        ) from exc


def write_manifest(path: Path, manifest: Manifest) -> None:
    """Write the manifest of the memory directory ``path`` atomically."""
    write_atomic(path / MANIFEST, (manifest.model_dump_json(indent=2) + "\n").encode())


def write_shard(
    path: Path,
    index: int,
    keys: torch.Tensor,
    values: torch.Tensor,
    examples: tuple[int, int],
    token_counts: tuple[int, int],
    sequences: dict[str, torch.Tensor] | None = None,
) -> ShardInfo:
    """Write shard ``index`` atomically; returns its manifest entry (``token_counts``: source and
    target tokens of its examples).

    With ``sequences`` (``tokens``, ``offsets``, ``starts``) the keys and values are every
    position's, as in a memory of all positions; without, they are the pairs.
    """
    name = shard_name(index)
    data = {"keys": keys.contiguous(), "values": values.to(torch.int32).contiguous()}
    count, rows = len(values), None
    if sequences is not None:
        data["tokens"] = sequences["tokens"].to(torch.int32).contiguous()
        data["offsets"] = sequences["offsets"].to(torch.int64).contiguous()
        data["starts"] = sequences["starts"].to(torch.int32).contiguous()
        rows, count = len(values), int((data["offsets"].diff() - data["starts"]).sum())
    write_atomic(path / name, save(data))
    return ShardInfo(
        file=name,
        count=count,
        rows=rows,
        examples=examples,
        source_tokens=token_counts[0],
        target_tokens=token_counts[1],
    )
