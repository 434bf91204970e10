"""Building an external memory through the server (docs/design.md, "On-disk formats"): the
server's representation of every example, written shard by shard into a memory directory
(:mod:`data_owner_client.memory.store`).

A shard is recorded in the manifest only after it is on disk, and every file is written to a temp
file and renamed, so a build killed at any moment and restarted yields the same bytes as an
uninterrupted one (same server, same ``batch_size``: a different request shape may change the
server's float rounding).
"""

from __future__ import annotations

import itertools
import logging
import os
import time
from collections.abc import Callable, Iterator, Sequence
from contextlib import closing, contextmanager
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Protocol

import httpx
import torch
from filelock import FileLock, Timeout

from data_owner_client.client import PemaClient, ServerError, pipelined, within_limits
from data_owner_client.data import DataError, Example, dataset_hash, encode_prompt, encode_target
from data_owner_client.data import source_length as count_source_tokens
from data_owner_client.files import TMP_PREFIX
from data_owner_client.memory.store import (
    DTYPES,
    MANIFEST,
    SHARD_NAME,
    Context,
    FingerprintMismatchError,
    Manifest,
    Memory,
    MemoryStoreError,
    Sampling,
    ShardInfo,
    check_fingerprint,
    read_manifest,
    shard_name,
    write_manifest,
    write_shard,
)
from data_owner_client.progress import progress_bar
from shared.protocol import HiddenDType, ModelInfo

log = logging.getLogger(__name__)

LOCK = ".lock"
DEFAULT_PASS_TOKENS = 16384  # a server too old to say its max_batch_tokens
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
    "sampling",
)
Read = tuple[torch.Tensor, list[int]]  # an example's keys, and the tokens read at them


@dataclass(frozen=True)
class Encoded:
    """One example as token ids: the prompt, and the target with EOS appended."""

    prompt: list[int]
    target: list[int]
    source_tokens: int
    index: int = 0  # in the dataset

    @property
    def sequence(self) -> list[int]:
        """What the server reads: the prompt and every target token but the final EOS."""
        return self.prompt + self.target[:-1]


class Resampler(Protocol):
    """Scheduled sampling: the target tokens an example is read with, from the representations
    of its gold sequence (:class:`data_owner_client.memory.scheduled.OwnPredictions`)."""

    @property
    def sampling(self) -> Sampling: ...

    def __call__(self, example: Encoded, hidden: torch.Tensor) -> list[int]: ...


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
    resample: Resampler | None = None  # context "scheduled"

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
        return Encoded(prompt, target + [self.info.eos_token_ids[0]], source, index)

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
            for part in within_limits(
                encoded[lo : lo + self.batch_size], lambda e: len(e.sequence), self.info.limits
            )
        ]
        compute = {
            "teacher": self.teacher,
            "generated": self.generated,
            "scheduled": self.scheduled,
        }[self.context]
        # Two of the server's passes in flight: one running, the next one queued behind it.
        window = 2 * (self.info.limits.max_batch_tokens or DEFAULT_PASS_TOKENS)
        calls = self.in_flight
        if self.context == "generated":  # each call holds a session: stay inside the key's cap
            calls = max(1, min(calls, self.info.limits.max_sessions_per_key // 4))
        reads: list[Read] = []
        with closing(pipelined(compute, parts, _tokens, window, calls)) as answers:
            for part, rows in zip(parts, answers, strict=True):
                reads.extend(rows)
                self.advance(sum(len(e.target) for e in part), _tokens(part))
        tokens = sum(e.source_tokens for e in encoded), sum(len(e.target) - 1 for e in encoded)
        all_keys, span = torch.cat([k for k, _ in reads]).to(DTYPES[self.dtype]), (first, end)
        if self.context == "generated":
            values = torch.tensor([t for e in encoded for t in e.target], dtype=torch.int32)
            return write_shard(self.out, index, all_keys, values, span, tokens)
        # Every position: the token each one reads, the gold one that follows it, where examples
        # start.
        sequences = {
            "tokens": torch.tensor([t for _, read in reads for t in read]),
            "offsets": torch.tensor([0, *itertools.accumulate(len(e.sequence) for e in encoded)]),
            "starts": torch.tensor([len(e.prompt) - 1 for e in encoded]),
        }
        values = torch.tensor([t for e in encoded for t in (e.prompt + e.target)[1:]])
        return write_shard(self.out, index, all_keys, values, span, tokens, sequences)

    def teacher(self, batch: Sequence[Encoded]) -> list[Read]:
        """One forward over prompt + target; every position's representation."""
        sequences = [e.sequence for e in batch]
        return list(zip(self._represent(sequences), sequences, strict=True))

    def scheduled(self, batch: Sequence[Encoded]) -> list[Read]:
        """Scheduled sampling in one parallel pass: a forward over prompt + gold target, whose
        representations the resampler turns into the target tokens read, then a forward over
        prompt + those."""
        assert self.resample is not None, "build_memory checks it"
        gold = self._represent([e.sequence for e in batch])
        read = [e.prompt + self.resample(e, h)[:-1] for e, h in zip(batch, gold, strict=True)]
        return list(zip(self._represent(read), read, strict=True))

    def _represent(self, sequences: list[list[int]]) -> list[torch.Tensor]:
        """Every position's representation of each of ``sequences``."""
        out = self.client.represent(sequences, [0] * len(sequences), dtype=self.dtype)
        if out.fingerprint != self.info.fingerprint:
            raise FingerprintMismatchError(
                f"the server switched from model fingerprint {self.info.fingerprint} to "
                f"{out.fingerprint} during the build; run the build again to continue"
            )
        rows = out.rows()
        for sequence, row in zip(sequences, rows, strict=True):
            if row.shape != (len(sequence), self.info.hidden_size):
                raise RuntimeError(f"server sent {tuple(row.shape)} for {len(sequence)} positions")
        return rows

    def generated(self, batch: Sequence[Encoded]) -> list[Read]:
        """The model's greedy continuation of each prompt, a step per gold target token."""
        session, hidden, logits = self.client.open_session(
            [e.prompt for e in batch], dtype=self.dtype, logits=1
        )
        try:
            return [(keys, []) for keys in self._decode(session, batch, hidden, _top1(logits))]
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
    resample: Resampler | None = None,
) -> Memory:
    """Build (or finish) the external memory of ``examples`` in ``out_dir`` through the server.

    ``context="teacher"`` pairs each target token with the representation of the gold prefix;
    ``"generated"`` (the paper's variant) with that of the model's own greedy continuation;
    ``"scheduled"`` reads the target tokens ``resample`` gives (scheduled sampling: some are the
    adapter's own predictions) and pairs each position with the gold next token.
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
    if (context == "scheduled") != (resample is not None):
        raise ValueError("a scheduled-sampling build (and only it) needs a resampler")
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
        resample=resample,
    )
    pairs = [len(builder.encode(i).target) for i in range(len(examples))]  # validates all first
    sampling = resample.sampling if resample is not None else None
    fresh = _fresh_manifest(info, examples, template, context, dtype, shard_examples, sampling)
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
    sampling: Sampling | None = None,
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
        positions="targets" if context == "generated" else "all",
        eos_token_id=info.eos_token_ids[0],
        sampling=sampling,
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


def _is_memory_file(name: str) -> bool:
    return name == MANIFEST or name.startswith(TMP_PREFIX) or SHARD_NAME.fullmatch(name) is not None


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
