"""The work behind the routes: validation against the model's limits and the key's quota, then
the scheduler (:mod:`plm_owner_server.scheduler`), which batches every key's work into shared
passes on one dedicated model thread, off the event loop."""

from __future__ import annotations

import asyncio
import contextlib
import functools
import itertools
from collections.abc import Callable, Sequence
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass, field
from typing import Any, TypeVar

import torch

from plm_owner_server.backend import Backend, Logits
from plm_owner_server.errors import ApiError
from plm_owner_server.metrics import Metrics
from plm_owner_server.quota import Quotas
from plm_owner_server.runner import resolve_device
from plm_owner_server.scheduler import Kind, Partial, Scheduler
from plm_owner_server.sessions import Session, SessionStore
from plm_owner_server.settings import Settings
from shared.codec import TORCH_DTYPES, encode_tensor
from shared.protocol import (
    HiddenDType,
    LogitsMode,
    RepresentRequest,
    RepresentResponse,
    SessionOpenRequest,
    SessionOpenResponse,
    SessionStepRequest,
    SessionStepResponse,
    TopK,
    WireTensor,
)

T = TypeVar("T")


class ModelThread:
    """One thread owns the model: work is serialised there and never blocks the event loop."""

    def __init__(self) -> None:
        self._executor = ThreadPoolExecutor(max_workers=1, thread_name_prefix="pema-model")

    async def run(self, fn: Callable[..., T], *args: object) -> T:
        loop = asyncio.get_running_loop()
        return await loop.run_in_executor(self._executor, functools.partial(fn, *args))

    def post(self, fn: Callable[..., object], *args: object) -> None:
        """Run ``fn`` there after the work already queued, without waiting for it (nothing once
        the thread is shut down)."""
        with contextlib.suppress(RuntimeError):
            self._executor.submit(fn, *args)

    def shutdown(self) -> None:
        self._executor.shutdown(wait=True, cancel_futures=True)


class ModelWork:
    """The model thread and the scheduler in front of it; services register how to run a pass
    of each kind of work (jobs and each one's grant of tokens in; per job its result, an
    exception, or :class:`~plm_owner_server.scheduler.Partial` for a prefill to go on)."""

    def __init__(self, settings: Settings, metrics: Metrics, quotas: Quotas) -> None:
        self.thread = ModelThread()
        self.metrics, self.quotas = metrics, quotas
        self.scheduler = Scheduler(
            self._execute, settings.max_batch_tokens, self._observe, prefill_chunk(settings)
        )
        # Per kind: run a pass of jobs, each within its grant of tokens.
        self.passes: dict[Kind, Callable[[Sequence[Any], Sequence[int]], list[Any]]] = {}

    async def submit(
        self, owner: str, kind: Kind, job: Any, cost: int, tokens: int, session: str | None = None
    ) -> Any:
        """Charge ``tokens`` to the key's quota, queue the job and wait for its result."""
        self.quotas.charge(owner, tokens)
        self.metrics.queue_depth.labels(kind).inc()
        try:
            result = await self.scheduler.submit(owner, kind, job, cost, session)
        finally:
            self.metrics.queue_depth.labels(kind).dec()
        self.metrics.key_tokens.labels(owner).inc(tokens)
        return result

    async def _execute(self, kind: Kind, jobs: Sequence[Any], grants: Sequence[int]) -> list[Any]:
        return await self.thread.run(self.passes[kind], jobs, grants)

    def _observe(self, kind: Kind, works: Sequence[Any]) -> None:
        self.metrics.pass_jobs.labels(kind).observe(len(works))
        self.metrics.pass_keys.labels(kind).observe(len({w.owner for w in works}))


def prefill_chunk(settings: Settings) -> int:
    """Prefill tokens per iteration while sessions decode: the setting, or by device."""
    if settings.prefill_chunk_tokens is not None:
        return settings.prefill_chunk_tokens
    return 32 if resolve_device(settings.device).type == "cpu" else 512


def check_sequences(
    sequences: Sequence[Sequence[int]], runner: Backend, settings: Settings
) -> None:
    """Refuse batches, lengths and token ids the model or the owner's limits do not allow."""
    if len(sequences) > settings.max_batch_size:
        raise ApiError(
            413,
            "batch_too_large",
            f"{len(sequences)} sequences in one request; the limit is {settings.max_batch_size}, "
            "so split the batch",
        )
    total = sum(map(len, sequences))
    if total > settings.max_request_tokens:
        raise ApiError(
            413,
            "too_many_tokens",
            f"{total} tokens in one request; the limit is {settings.max_request_tokens}, "
            "so split the batch",
        )
    for b, seq in enumerate(sequences):
        if len(seq) > runner.max_positions:
            raise ApiError(
                422,
                "sequence_too_long",
                f"sequence {b} has {len(seq)} tokens; the model's context is "
                f"{runner.max_positions}, so truncate it",
            )
        check_token_ids(seq, runner, f"sequence {b}")


def check_token_ids(ids: Sequence[int], runner: Backend, where: str) -> None:
    top = max(ids)
    if top >= runner.vocab_size:
        raise ApiError(
            422,
            "token_out_of_range",
            f"{where} holds token id {top}; ids must be in [0, {runner.vocab_size}) — "
            "tokenize with the server's tokenizer (GET /v1/tokenizer)",
        )


def check_logits(mode: LogitsMode, positions: int, runner: Backend, settings: Settings) -> None:
    if mode == "none":
        return
    if mode != "full" and mode > runner.vocab_size:
        raise ApiError(
            422,
            "logits_out_of_range",
            f"top-{mode} logits asked of a vocabulary of {runner.vocab_size}; ask for k ≤ "
            f"{runner.vocab_size}, or 'full'",
        )
    per_position = runner.vocab_size if mode == "full" else mode
    if positions * per_position > settings.max_logits_values:
        raise ApiError(
            413,
            "logits_too_large",
            f"{positions} positions × {per_position} logits exceed the server's limit of "
            f"{settings.max_logits_values} values; ask for top-k logits or fewer positions",
        )


@torch.inference_mode()
def logits_of(
    backend: Backend, hidden: Sequence[torch.Tensor], modes: Sequence[LogitsMode]
) -> list[Logits | None]:
    """Each part's logits in its mode, with one head pass per distinct mode: the head's weights
    (V × d, the largest matrix read per step) are read once per pass, not once per request."""
    out: list[Logits | None] = [None] * len(hidden)
    for mode in set(modes) - {"none"}:
        picked = [i for i, m in enumerate(modes) if m == mode]
        sizes = [len(hidden[i]) for i in picked]
        logits = backend.logits(torch.cat([hidden[i] for i in picked]), mode)
        if isinstance(logits, tuple):
            parts: Sequence[Logits] = list(zip(*(t.split(sizes) for t in logits), strict=True))
        else:
            parts = logits.split(sizes)
        for i, part in zip(picked, parts, strict=True):
            out[i] = part
    return out


def encode_hidden(hidden: torch.Tensor, dtype: HiddenDType) -> WireTensor:
    return encode_tensor(hidden.to(TORCH_DTYPES[dtype]))


def encode_logits(logits: Logits | None, dtype: HiddenDType) -> WireTensor | TopK | None:
    if logits is None:
        return None
    if isinstance(logits, tuple):
        values, indices = logits
        return TopK(values=encode_hidden(values, dtype), indices=encode_tensor(indices))
    return encode_hidden(logits, dtype)


class Representer:
    """``/v1/represent``: validates, then queues the request; a pass serves many requests."""

    def __init__(
        self, backend: Backend, settings: Settings, work: ModelWork, metrics: Metrics
    ) -> None:
        self.backend, self.settings, self.work, self.metrics = backend, settings, work, metrics
        work.passes["represent"] = self._forward

    async def represent(self, owner: str, request: RepresentRequest) -> RepresentResponse:
        check_sequences(request.sequences, self.backend, self.settings)
        positions = sum(
            len(s) - b for s, b in zip(request.sequences, request.starts(), strict=True)
        )
        check_logits(request.logits, positions, self.backend, self.settings)
        tokens = sum(map(len, request.sequences))
        response: RepresentResponse = await self.work.submit(
            owner, "represent", Reading(request), tokens, tokens
        )
        return response

    def _forward(
        self, jobs: Sequence[Reading], grants: Sequence[int]
    ) -> list[RepresentResponse | Partial]:
        """Each request's next rows within its grant (at least one), all in one call."""
        taken = [job.next_rows(grant) for job, grant in zip(jobs, grants, strict=True)]
        rows = [seq for job, n in zip(jobs, taken, strict=True) for seq in job.rows[:n]]
        starts = [b for job, n in zip(jobs, taken, strict=True) for b in job.starts[:n]]
        hidden = iter(self.backend.represent(rows, starts, self.settings.max_batch_tokens))
        self.metrics.pass_rows.labels("represent").observe(len(rows))
        self.metrics.tokens.inc(sum(map(len, rows)))
        for job, n in zip(jobs, taken, strict=True):
            job.read(list(itertools.islice(hidden, n)))
        done = [i for i, job in enumerate(jobs) if not job.rows]
        joined = {i: torch.cat(jobs[i].parts) for i in done}
        modes = [jobs[i].request.logits for i in done]
        logits = dict(zip(done, logits_of(self.backend, list(joined.values()), modes), strict=True))
        return [
            self._answer(job, joined[i], logits[i]) if i in joined else Partial(job.remaining)
            for i, job in enumerate(jobs)
        ]

    def _answer(
        self, job: Reading, hidden: torch.Tensor, logits: Logits | None
    ) -> RepresentResponse:
        request = job.request
        return RepresentResponse(
            hidden=encode_hidden(hidden, request.dtype),
            offsets=[0, *itertools.accumulate(len(part) for part in job.parts)],
            logits=encode_logits(logits, request.dtype),
            fingerprint=self.backend.fingerprint,
        )


@dataclass(eq=False)
class Reading:
    """A ``/v1/represent`` request being read, a few rows per pass when the scheduler chunks."""

    request: RepresentRequest
    rows: list[list[int]] = field(init=False)  # still to read
    starts: list[int] = field(init=False)
    parts: list[torch.Tensor] = field(default_factory=list)  # per row read, f(c) from its start

    def __post_init__(self) -> None:
        self.rows, self.starts = list(self.request.sequences), list(self.request.starts())

    def next_rows(self, grant: int) -> int:
        """How many of the next rows fit in ``grant`` tokens (at least one)."""
        spent = itertools.accumulate(map(len, self.rows))
        return max(1, sum(1 for total in spent if total <= grant))

    @property
    def remaining(self) -> int:
        return sum(map(len, self.rows))

    def read(self, hidden: list[torch.Tensor]) -> None:
        self.parts += hidden
        del self.rows[: len(hidden)], self.starts[: len(hidden)]


@dataclass(eq=False)
class Opening:
    """A session being opened: its prompts read a few columns per pass when the scheduler
    chunks (columns of the right-aligned prompts: every row's token at a column is read
    together, as in one left-padded prefill)."""

    owner: str
    request: SessionOpenRequest
    session: Session | None = None  # from the first chunk
    abandoned: bool = False  # nobody will be answered: read no more
    read: int = 0  # columns read
    parts: list[list[torch.Tensor]] = field(default_factory=list)  # per chunk, per row f(c)

    @property
    def width(self) -> int:
        return max(map(len, self.request.sequences))

    @property
    def height(self) -> int:
        return len(self.request.sequences)

    @property
    def remaining(self) -> int:
        """Padded tokens still to read."""
        return self.height * (self.width - self.read)


class SessionService:
    """``/v1/sessions``: open, step and close KV-cached decoding sessions. Openings of all keys
    share a prefill pass, and steps of all sessions of all keys share a decoding pass."""

    def __init__(
        self, backend: Backend, settings: Settings, work: ModelWork, metrics: Metrics
    ) -> None:
        self.backend, self.settings, self.work, self.metrics = backend, settings, work, metrics
        self._evicted_seen = 0
        self.store = SessionStore(
            settings.session_ttl_s,
            settings.max_sessions_per_key,
            settings.max_kv_cache_bytes,
            on_change=self._observe,
            reclaim_s=settings.session_reclaim_s,
        )
        work.passes["open"] = self._open_pass
        work.passes["step"] = self._step_pass

    def _observe(self, store: SessionStore) -> None:
        self.metrics.sessions.set(len(store))
        self.metrics.kv_bytes.set(store.nbytes)
        self.metrics.evictions.inc(store.evicted - self._evicted_seen)
        self._evicted_seen = store.evicted

    async def open(self, owner: str, request: SessionOpenRequest) -> SessionOpenResponse:
        check_sequences(request.sequences, self.backend, self.settings)
        check_logits(request.logits, len(request.sequences), self.backend, self.settings)
        opening = Opening(owner, request)
        tokens = sum(map(len, request.sequences))
        try:
            response: SessionOpenResponse = await self.work.submit(
                owner, "open", opening, opening.remaining, tokens
            )
        except BaseException:  # its caller left, or it failed: drop what it began (no id out)
            self.work.thread.post(self._abandon, opening)
            raise
        return response

    def _abandon(self, opening: Opening) -> None:
        """Drop the session of an opening nobody will be answered for, and read no more of it
        (on the model thread, after any pass already running)."""
        opening.abandoned = True
        if opening.session is not None:
            self.store.discard(opening.session.id, evicted=False)

    def _open_pass(
        self, jobs: Sequence[Opening], grants: Sequence[int]
    ) -> list[SessionOpenResponse | Exception | Partial]:
        """Read the next columns of every opening's prompts within its grant, in one call; an
        opening's session is in the store from its first chunk (counted in its key's cap and,
        at its full size, in the cache bound) and answered after its last. If the pass fails,
        every opening of it fails, and :meth:`open` drops their half-read sessions."""
        results: dict[int, SessionOpenResponse | Exception | Partial] = {}
        chunks: list[tuple[int, Opening, Session, int]] = []
        for i, (job, grant) in enumerate(zip(jobs, grants, strict=True)):
            if job.abandoned:  # its caller left while the pass was being formed
                results[i] = RuntimeError("the caller went away")
                continue
            try:
                chunks.append((i, job, self._admit(job), self._chunk_end(job, grant)))
            except ApiError as exc:
                results[i] = exc
        results.update(self._read(chunks))
        return [results[i] for i in range(len(jobs))]

    def _chunk_end(self, job: Opening, grant: int) -> int:
        """The column an opening reads up to in a pass granted ``grant`` tokens: all it has left
        if that fits, else whole multiples of the backend's ``prefill_columns`` (at least one)."""
        columns, unit = grant // job.height, self.backend.prefill_columns
        if job.read + columns >= job.width:
            return job.width
        return min(job.width, job.read + max(unit, columns // unit * unit))

    def _read(
        self, chunks: list[tuple[int, Opening, Session, int]]
    ) -> dict[int, SessionOpenResponse | ApiError | Partial]:
        hidden = self.backend.prefill_sessions([(s.state, end) for _, _, s, end in chunks])
        self.metrics.pass_rows.labels("open").observe(sum(j.height for _, j, _, _ in chunks))
        results: dict[int, SessionOpenResponse | ApiError | Partial] = {}
        finished: list[tuple[int, Opening, Session]] = []
        for (i, job, session, end), part in zip(chunks, hidden, strict=True):
            job.read, job.parts = end, [*job.parts, part]
            self.metrics.tokens.inc(sum(map(len, part)))
            if end < job.width:  # counted at its full size since its first chunk
                results[i] = Partial(job.remaining)
            else:
                finished.append((i, job, session))
        read = [[torch.cat(row) for row in zip(*job.parts, strict=True)] for _, job, _ in finished]
        last = [torch.stack([row[-1] for row in rows]) for rows in read]
        logits = logits_of(self.backend, last, [job.request.logits for _, job, _ in finished])
        for (i, job, session), rows, h, lg in zip(finished, read, last, logits, strict=True):
            self.store.get(session.id, job.owner)  # now the most recently used
            session.reserved = 0  # no longer opening
            try:
                self.store.update(session)  # its cache as measured from now on
            except ApiError as exc:
                results[i] = exc
                continue
            request, offsets = job.request, None
            if request.positions == "all":
                h = torch.cat(rows)
                offsets = [0, *itertools.accumulate(len(row) for row in rows)]
            results[i] = SessionOpenResponse(
                session_id=session.id,
                hidden=encode_hidden(h, request.dtype),
                logits=encode_logits(lg, request.dtype),
                fingerprint=self.backend.fingerprint,
                offsets=offsets,
            )
        return results

    def _admit(self, job: Opening) -> Session:
        """An opening's session, in the store from its first chunk: room made in its key's cap
        and, for its full size, in the cache bound; in use until answered."""
        if job.session is not None:
            return self.store.get(job.session.id, job.owner)  # used now: not idle
        nbytes = self.backend.kv_bytes_per_token * job.width * job.height
        self.store.check_room(job.owner, nbytes)
        (state,) = self.backend.start_sessions([job.request.sequences])
        session = Session(job.owner, state, job.request.dtype, prompt_len=job.width)
        session.reserved = nbytes  # opening: in use, counted at its full size
        self.store.add(session)
        job.session = session
        return session

    async def step(
        self, owner: str, session_id: str, request: SessionStepRequest
    ) -> SessionStepResponse:
        check_token_ids(request.tokens, self.backend, "tokens")
        check_logits(request.logits, len(request.tokens), self.backend, self.settings)
        rows = len(request.tokens)
        response: SessionStepResponse = await self.work.submit(
            owner, "step", (owner, session_id, request), rows, rows, session=session_id
        )
        return response

    def _step_pass(
        self, jobs: Sequence[tuple[str, str, SessionStepRequest]], grants: Sequence[int]
    ) -> list[SessionStepResponse | ApiError]:
        """Step the session of every valid job, all in one pass."""
        results: dict[int, SessionStepResponse | ApiError] = {}
        steps: list[tuple[int, Session, list[int]]] = []
        for i, (owner, session_id, request) in enumerate(jobs):
            try:
                session = self.store.get(session_id, owner)
                rows = request.step_rows(session.state.rows)
                self._check_step(session, rows, request)
            except ApiError as exc:
                results[i] = exc
                continue
            steps.append((i, session, list(rows)))
        batch = [(session.state, rows, jobs[i][2].tokens) for i, session, rows in steps]
        try:
            for i, session, rows in steps:
                if (parents := jobs[i][2].parents) is not None:  # forks and reorders first
                    session.state.select(rows, parents)
            hidden = self.backend.step_sessions(batch) if batch else []
        except Exception:
            # A pass that failed part-way leaves its caches half-grown: drop those sessions, so
            # their clients get a 404 and re-open instead of stepping a broken cache.
            for _, session, _ in steps:
                self.store.discard(session.id)
            raise
        self.metrics.pass_rows.labels("step").observe(sum(len(rows) for _, _, rows in steps))
        logits = logits_of(self.backend, hidden, [jobs[i][2].logits for i, _, _ in steps])
        for (i, session, rows), h, lg in zip(steps, hidden, logits, strict=True):
            session.steps += 1
            self.metrics.tokens.inc(len(rows))
            try:
                # May evict other sessions (their answers in this pass stand), or this one.
                self.store.update(session)
            except ApiError as exc:
                results[i] = exc
                continue
            results[i] = SessionStepResponse(
                hidden=encode_hidden(h, session.dtype),
                logits=encode_logits(lg, session.dtype),
            )
        return [results[i] for i in range(len(jobs))]

    def _check_step(
        self, session: Session, rows: Sequence[int], request: SessionStepRequest
    ) -> None:
        """``rows``: the rows the step leaves in the session."""
        tokens, parents = request.tokens, request.parents
        rows = parents if parents is not None else rows  # the live rows the step continues
        if len(rows) != len(tokens):
            raise ApiError(
                422,
                "inconsistent_request",
                f"{len(tokens)} tokens for {len(rows)} live rows; send one token per row, "
                "or list the rows",
            )
        if len(tokens) > self.settings.max_batch_size:
            raise ApiError(
                413,
                "batch_too_large",
                f"{len(tokens)} rows in one session; the limit is {self.settings.max_batch_size}",
            )
        live = set(session.state.rows)
        if dead := sorted({r for r in rows if r not in live}):
            raise ApiError(
                422,
                "row_not_live",
                f"rows {dead} are not live in this session (live: {sorted(live)}); a row left "
                "out of a step is finished",
            )
        if parents is not None:
            self._check_fork(session, parents)
        if session.steps >= self.settings.max_new_tokens:
            raise ApiError(
                422,
                "max_new_tokens",
                f"this session reached the server's limit of {self.settings.max_new_tokens} "
                "steps; close it",
            )
        if session.prompt_len + session.steps >= self.backend.max_positions:
            raise ApiError(
                422,
                "context_full",
                f"this session filled the model's context of {self.backend.max_positions} tokens",
            )

    def _check_fork(self, session: Session, parents: Sequence[int]) -> None:
        """Refuse a fork whose copied caches could never fit in the server's KV budget (its
        other sessions are evicted to make room after the pass, as when a step grows one)."""
        live = session.state.rows
        per_row = session.state.nbytes / max(len(live), 1)
        needed = per_row * len(parents)
        if needed > self.store.max_bytes:
            raise ApiError(
                413,
                "session_too_large",
                f"{len(parents)} rows forked from this session need about {needed / 2**20:.1f} "
                f"MiB of KV cache but the server allows {self.store.max_bytes / 2**20:.1f} MiB in "
                "all; keep fewer rows (fewer beams) or shorter prompts",
            )

    async def close(self, owner: str, session_id: str) -> None:
        await self.work.thread.run(self.store.remove, session_id, owner)
        self.work.scheduler.closed(session_id)

    async def expire(self) -> int:
        return await self.work.thread.run(self.store.expire)
