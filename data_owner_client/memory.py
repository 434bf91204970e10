"""The external memory (DESIGN §5): pairs (f(c), y) on disk, read in shuffled batches for
training, and built resumably through the server.

A memory is a directory of safetensors shards ``shard-00000.safetensors`` plus ``manifest.json``.
Its ``positions`` say what a shard holds:

- ``"all"`` (version 2, teacher-forced builds): every position of every example's sequence
  (prompt + target without its final EOS): ``keys`` [n, d] in the memory dtype, ``tokens`` int32
  [n] (the token read at each position), ``values`` int32 [n] (the token that follows it),
  ``offsets`` int64 [E + 1] (example ``e`` is rows ``offsets[e]:offsets[e + 1]``) and ``starts``
  int32 [E] (its first row that predicts a target token). Pair kinds read the target rows only;
  the sequence kind reads whole examples (:meth:`Memory.sequences`).
- ``"targets"`` (version 1 memories, and the generated-context variant): only the pairs, ``keys``
  [n, d] and ``values`` int32 [n].

Shard ``i`` holds the pairs of
examples ``[i * shard_examples, (i + 1) * shard_examples)``; every file is written to a temp file
and renamed, and a shard is recorded in the manifest only after it is on disk, so a build killed at
any moment and restarted yields the same bytes as an uninterrupted one (same server, same
``batch_size``: a different request shape may change the server's float rounding).
"""

from __future__ import annotations

import hashlib
import itertools
import logging
import math
import os
import re
import tempfile
import time
from collections.abc import Callable, Iterator, Sequence
from contextlib import closing, contextmanager
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Final, Literal

import httpx
import torch
from filelock import FileLock, Timeout
from pydantic import BaseModel, ConfigDict, ValidationError
from safetensors import safe_open
from safetensors.torch import save

from data_owner_client.client import PemaClient, ServerError, pipelined
from data_owner_client.data import DataError, Example, dataset_hash, encode_prompt, encode_target
from data_owner_client.data import source_length as count_source_tokens
from data_owner_client.progress import progress_bar
from shared.protocol import HiddenDType, ModelInfo

log = logging.getLogger(__name__)

FORMAT: Final = "pema-memory"
VERSION: Final = 2
MANIFEST = "manifest.json"
TMP_PREFIX = ".tmp-"
LOCK = ".lock"
DEFAULT_PASS_TOKENS = 16384  # a server too old to say its max_batch_tokens
SHARD_NAME = re.compile(r"shard-\d{5,}\.safetensors")
Context = Literal["teacher", "generated"]
Positions = Literal["targets", "all"]
IGNORE: Final = -100  # the label of positions that predict no target token
DTYPES: dict[str, torch.dtype] = {
    "float16": torch.float16,
    "bfloat16": torch.bfloat16,
    "float32": torch.float32,
}
# Fields that must agree for a build to continue an earlier one in the same directory.
BUILD_FIELDS = (
    "format",
    "version",
    "hidden_size",
    "dtype",
    "examples",
    "shard_examples",
    "dataset_hash",
    "template",
    "context",
    "positions",
    "eos_token_id",
)
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
    _write_atomic(path / MANIFEST, (manifest.model_dump_json(indent=2) + "\n").encode())


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
    _write_atomic(path / name, save(data))
    return ShardInfo(
        file=name,
        count=count,
        rows=rows,
        examples=examples,
        source_tokens=token_counts[0],
        target_tokens=token_counts[1],
    )


def _write_atomic(target: Path, data: bytes) -> None:
    """Write a temp file beside ``target``, flush it to disk, then rename it over ``target``."""
    fd, tmp = tempfile.mkstemp(dir=target.parent, prefix=TMP_PREFIX, suffix=f"-{target.name}")
    try:
        with os.fdopen(fd, "wb") as f:
            f.write(data)
            f.flush()
            os.fsync(f.fileno())
        os.replace(tmp, target)
    except BaseException:
        Path(tmp).unlink(missing_ok=True)
        raise
    _fsync_dir(target.parent)


def _fsync_dir(path: Path) -> None:
    """Make a rename durable (POSIX; Windows cannot open directories)."""
    if os.name != "posix":
        return
    fd = os.open(path, os.O_RDONLY)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


def _is_memory_file(name: str) -> bool:
    return name == MANIFEST or name.startswith(TMP_PREFIX) or SHARD_NAME.fullmatch(name) is not None


# ---- building -------------------------------------------------------------------------------


@dataclass(frozen=True)
class Encoded:
    """One example as token ids: the prompt, and the target with EOS appended."""

    prompt: list[int]
    target: list[int]
    source_tokens: int

    @property
    def sequence(self) -> list[int]:
        """What the server reads: the prompt and every target token but the final EOS."""
        return self.prompt + self.target[:-1]


@dataclass
class _Builder:
    """The fixed inputs of one build, and how one shard of it is computed."""

    client: PemaClient
    tokenizer: Any
    out: Path  # the memory directory
    examples: Sequence[Example]
    template: str
    info: ModelInfo
    context: Context
    dtype: HiddenDType
    batch_size: int
    in_flight: int = 4  # requests at the server at once (1: one after another)
    advance: Callable[[int, int], None] = lambda pairs, tokens: None

    def encode(self, index: int) -> Encoded:
        """Example ``index`` as ids; a pair the server could not take is a DataError."""
        example = self.examples[index]
        if example.target is None:
            raise DataError(f"example {index} has no target: a memory needs (source, target) pairs")
        prompt = encode_prompt(self.tokenizer, self.template, example.source)
        target = encode_target(self.tokenizer, self.template, example.target)
        if not prompt:
            raise DataError(f"example {index}: the prompt encodes to no tokens")
        self._check_length(index, len(prompt), len(target))
        source = count_source_tokens(self.tokenizer, example.source)
        return Encoded(prompt, target + [self.info.eos_token_ids[0]], source)

    def _check_length(self, index: int, prompt: int, target: int) -> None:
        limit = min(self.info.max_positions, self.info.limits.max_request_tokens)
        if prompt + target > limit:
            raise DataError(
                f"example {index}: prompt ({prompt} tokens) + target ({target} tokens) needs "
                f"{prompt + target} positions but the server takes at most {limit}; filter out or "
                "shorten such long pairs"
            )
        if self.context == "generated" and target > self.info.limits.max_new_tokens:
            raise DataError(
                f"example {index}: its target has {target} tokens but the server decodes at most "
                f"{self.info.limits.max_new_tokens} per session; use context='teacher'"
            )

    def shard(self, index: int, first: int, end: int) -> ShardInfo:
        """Compute the shard of examples ``[first, end)`` and write it as shard ``index``."""
        encoded = [self.encode(i) for i in range(first, end)]
        parts = [
            part
            for lo in range(0, len(encoded), self.batch_size)
            for part in _requests(encoded[lo : lo + self.batch_size], self.info)
        ]
        compute = self.teacher if self.context == "teacher" else self.generated
        # Two of the server's passes in flight: one running, the next one queued behind it.
        window = 2 * (self.info.limits.max_batch_tokens or DEFAULT_PASS_TOKENS)
        calls = self.in_flight
        if self.context == "generated":  # each call holds a session: stay inside the key's cap
            calls = max(1, min(calls, self.info.limits.max_sessions_per_key // 4))
        keys: list[torch.Tensor] = []
        with closing(pipelined(compute, parts, _tokens, window, calls)) as answers:
            for part, rows in zip(parts, answers, strict=True):
                keys.extend(rows)
                self.advance(sum(len(e.target) for e in part), _tokens(part))
        tokens = sum(e.source_tokens for e in encoded), sum(len(e.target) - 1 for e in encoded)
        all_keys, span = torch.cat(keys).to(DTYPES[self.dtype]), (first, end)
        if self.context != "teacher":
            values = torch.tensor([t for e in encoded for t in e.target], dtype=torch.int32)
            return write_shard(self.out, index, all_keys, values, span, tokens)
        # Every position: the token each one reads, the one that follows it, where examples start.
        sequences = {
            "tokens": torch.tensor([t for e in encoded for t in e.sequence]),
            "offsets": torch.tensor([0, *itertools.accumulate(len(e.sequence) for e in encoded)]),
            "starts": torch.tensor([len(e.prompt) - 1 for e in encoded]),
        }
        values = torch.tensor([t for e in encoded for t in (e.prompt + e.target)[1:]])
        return write_shard(self.out, index, all_keys, values, span, tokens, sequences)

    def teacher(self, batch: Sequence[Encoded]) -> list[torch.Tensor]:
        """One forward over prompt + target; every position's representation."""
        starts = [0] * len(batch)
        out = self.client.represent([e.sequence for e in batch], starts, dtype=self.dtype)
        if out.fingerprint != self.info.fingerprint:
            raise FingerprintMismatchError(
                f"the server switched from model fingerprint {self.info.fingerprint} to "
                f"{out.fingerprint} during the build; run the build again to continue"
            )
        rows = out.rows()
        for e, row in zip(batch, rows, strict=True):
            if row.shape != (len(e.sequence), self.info.hidden_size):
                raise RuntimeError(
                    f"server sent {tuple(row.shape)} for {len(e.sequence)} positions"
                )
        return rows

    def generated(self, batch: Sequence[Encoded]) -> list[torch.Tensor]:
        """The model's greedy continuation of each prompt, a step per gold target token."""
        session, hidden, logits = self.client.open_session(
            [e.prompt for e in batch], dtype=self.dtype, logits=1
        )
        try:
            return self._decode(session, batch, hidden, _top1(logits))
        finally:
            self._close(session)

    def _decode(
        self, session: str, batch: Sequence[Encoded], hidden: torch.Tensor, greedy: list[int]
    ) -> list[torch.Tensor]:
        """Step each row until it has a representation per target token (EOS included)."""
        rows: list[list[torch.Tensor]] = [[h] for h in hidden]
        for step in range(1, max(len(e.target) for e in batch)):
            # A row whose target is used up is left out, which finishes it server-side.
            live = [b for b, e in enumerate(batch) if len(e.target) > step]
            tokens = [greedy[b] for b in live]
            hidden, logits = self.client.step(session, tokens, rows=live, logits=1)
            for b, h, token in zip(live, hidden, _top1(logits), strict=True):
                rows[b].append(h)
                greedy[b] = token
        return [torch.stack(r) for r in rows]

    def _close(self, session: str) -> None:
        """Free the server's cache; a session it already dropped is no reason to fail the build."""
        try:
            self.client.close_session(session)
        except (ServerError, httpx.TransportError) as exc:
            log.warning("could not close session %s: %s", session, exc)


def _tokens(part: Sequence[Encoded]) -> int:
    return sum(len(e.sequence) for e in part)


def _top1(logits: Any) -> list[int]:
    """Each row's greedy token from a top-1 answer (values, indices)."""
    if not isinstance(logits, tuple):
        raise RuntimeError("the server sent no top-1 logits")
    return [int(i) for i in logits[1][:, 0]]


def _requests(batch: Sequence[Encoded], info: ModelInfo) -> Iterator[list[Encoded]]:
    """Split a batch so no request exceeds the server's batch-size and token limits."""
    part: list[Encoded] = []
    for e in batch:
        tokens = sum(len(x.sequence) for x in part) + len(e.sequence)
        if part and (
            len(part) == info.limits.max_batch_size or tokens > info.limits.max_request_tokens
        ):
            yield part
            part = []
        part.append(e)
    if part:
        yield part


def build_memory(
    client: PemaClient,
    tokenizer: Any,
    examples: Sequence[Example],
    out_dir: str | Path,
    *,
    template: str,
    context: Context = "teacher",
    dtype: HiddenDType = "float16",
    batch_size: int = 32,
    shard_examples: int = 512,
    progress: bool = True,
    overwrite: bool = False,
    requests_in_flight: int = 4,
) -> Memory:
    """Build (or finish) the external memory of ``examples`` in ``out_dir`` through the server.

    ``context="teacher"`` pairs each target token with the representation of the gold prefix;
    ``"generated"`` (the paper's variant) with that of the model's own greedy continuation.
    Up to ``requests_in_flight`` requests are at the server at once, so it always has the next
    one queued. The server may batch them with each other or with other clients' work, which
    moves float rounding (≤ 1e-5): only a build of one request at a time against an otherwise
    idle server is bit-reproducible.
    A directory holding a matching unfinished build is continued; one holding another build is
    refused unless ``overwrite``. An example without a target, or too long for the server, is a
    :class:`DataError` naming it: the build stops before any request rather than skip data.
    """
    if min(batch_size, shard_examples, requests_in_flight) < 1:
        raise ValueError("batch_size, shard_examples and requests_in_flight must be at least 1")
    if not examples:
        raise DataError("no examples to build a memory from")
    info = client.model_info()
    out = Path(out_dir)
    builder = _Builder(
        client,
        tokenizer,
        out,
        examples,
        template,
        info,
        context,
        dtype,
        batch_size,
        requests_in_flight,
    )
    pairs = [len(builder.encode(i).target) for i in range(len(examples))]  # validates all first
    fresh = _fresh_manifest(info, examples, template, context, dtype, shard_examples)
    out.mkdir(parents=True, exist_ok=True)
    with _locked(out):
        manifest = _start(out, fresh, overwrite)
        todo = [i for i in range(fresh.num_shards) if not _recorded(out, manifest, i)]
        done_pairs = sum(pairs) - sum(_pairs_of(pairs, i, shard_examples) for i in todo)
        started = time.monotonic()
        with progress_bar(
            "memory", "pairs", sum(pairs), done_pairs, enabled=progress and bool(todo)
        ) as advance:
            builder.advance = advance
            for index in todo:
                manifest = _build_shard(out, builder, manifest, index)
        write_manifest(out, manifest.model_copy(update={"complete": True}))
    if todo:
        log.info("memory %s: %d pairs, %.1f s", out, sum(pairs), time.monotonic() - started)
    else:
        log.info("memory %s: already built (%d pairs)", out, sum(pairs))
    return Memory.open(out)


def _fresh_manifest(
    info: ModelInfo,
    examples: Sequence[Example],
    template: str,
    context: Context,
    dtype: HiddenDType,
    shard_examples: int,
) -> Manifest:
    return Manifest(
        fingerprint=info.fingerprint,
        model_id=info.model_id,
        hidden_size=info.hidden_size,
        dtype=dtype,
        examples=len(examples),
        shard_examples=shard_examples,
        dataset_hash=dataset_hash(examples, template),
        template=template,
        context=context,
        positions="all" if context == "teacher" else "targets",
        eos_token_id=info.eos_token_ids[0],
    )


@contextmanager
def _locked(out: Path) -> Iterator[None]:
    """Hold the directory's lock, so two builds never write the same memory."""
    lock = FileLock(str(out / LOCK))
    try:
        lock.acquire(timeout=0)
    except Timeout as exc:
        raise MemoryStoreError(f"another build is writing {out}; wait for it to end") from exc
    try:
        yield
    finally:
        lock.release()


def _start(out: Path, fresh: Manifest, overwrite: bool) -> Manifest:
    """The manifest to continue from: a matching earlier build's, or ``fresh`` (then written)."""
    for leftover in out.glob(f"{TMP_PREFIX}*"):  # from a killed run; never recorded anywhere
        leftover.unlink()
    if overwrite:
        for name in os.listdir(out):
            if _is_memory_file(name):
                (out / name).unlink()
    if (out / MANIFEST).is_file():
        existing = read_manifest(out)
        check_fingerprint(out, existing, fresh.fingerprint)
        _check_same_build(out, existing, fresh)
        return existing
    if not overwrite and (foreign := sorted(set(os.listdir(out)) - {LOCK})):
        raise MemoryStoreError(
            f"{out} is not empty ({', '.join(foreign[:5])}) and holds no memory: use an empty "
            "directory, or overwrite=True (--overwrite)"
        )
    write_manifest(out, fresh)
    return fresh


def _check_same_build(out: Path, existing: Manifest, fresh: Manifest) -> None:
    """Refuse to mix two different builds in one directory."""
    differ = [
        f"{name} {getattr(existing, name)!r} (now {getattr(fresh, name)!r})"
        for name in BUILD_FIELDS
        if getattr(existing, name) != getattr(fresh, name)
    ]
    if differ:
        raise MemoryStoreError(
            f"{out} holds a memory of another build ({'; '.join(differ)}): use a new directory, "
            "or overwrite=True (--overwrite) to replace it"
        )


def _recorded(out: Path, manifest: Manifest, index: int) -> bool:
    name = shard_name(index)
    return any(s.file == name for s in manifest.shards) and (out / name).is_file()


def _pairs_of(pairs: list[int], index: int, shard_examples: int) -> int:
    return sum(pairs[index * shard_examples : (index + 1) * shard_examples])


def _build_shard(out: Path, builder: _Builder, manifest: Manifest, index: int) -> Manifest:
    """Compute shard ``index``, write it, then record it; returns the updated manifest."""
    first = index * manifest.shard_examples
    end = min(first + manifest.shard_examples, manifest.examples)
    manifest = manifest.with_shard(builder.shard(index, first, end))
    write_manifest(out, manifest)
    return manifest
