"""Decoding through a server session, mixing the PLM with the adapter under Gradual Unrolling.

Each step the server returns every live row's representation ``f(c_t)``; the client computes
``log P_LM = log softmax H(f(c_t))`` with the cached head and ``log P_PEMA`` from the adapter's
output (or, for the kNN-LM baseline, ``log p_kNN`` from the memory), mixes them with that row's
λ_t (:mod:`data_owner_client.schedule`), picks the next token and steps only the rows still alive.
The sequence adapter also reads the prompt's representations (one ``/v1/represent`` call per
batch) and keeps its own cache per row next to the server's session. With λ_max = 0 this is
exactly the PLM's own decoding.
"""

from __future__ import annotations

import dataclasses
import logging
import math
import time
from collections.abc import Iterator, Sequence
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass, field
from typing import Any

import httpx
import numpy as np
import torch
import torch.nn.functional as F

from data_owner_client.adapter import Adapter, AdapterConfig
from data_owner_client.beam import BeamSearch
from data_owner_client.client import PemaClient, ServerError, within_limits
from data_owner_client.constraints import Grammars, consume
from data_owner_client.data import DataError, Example, encode_prompt, source_length
from data_owner_client.decoding import (
    GREEDY_BELOW,
    Generation,
    GenerationConfig,
    Job,
    Mixing,
    MixingDefaults,
    Row,
    TokenLogprob,
    token_logprobs,
)
from data_owner_client.devices import resolve_device
from data_owner_client.knn import KnnLM
from data_owner_client.mixture import mixed_log_probs
from data_owner_client.progress import progress_bar
from data_owner_client.sampling import ban_repeats, filter_top_k_top_p, stop_index
from data_owner_client.sampling import repeated_ngram_ends as repeated_ngram_ends  # re-exported
from data_owner_client.schedule import mix_log_probs
from data_owner_client.served_model import ServedModel

log = logging.getLogger(__name__)
RECONNECT_POLL_S = 0.5  # between health checks while the server is away


class EmptyPrompt(DataError):
    """A prompt without tokens."""


class PromptTooLong(DataError):
    """A prompt that leaves no position to generate in."""


@dataclass
class Batch:
    """The rows of some jobs in one server session, with what their next tokens need."""

    jobs: list[Job]
    session: str | None
    hidden: torch.Tensor  # the live rows' last representations [len(live), d]
    started: float
    cache: Any = None  # a sequence-reading adapter's, over the same rows
    adapted: torch.Tensor | None = None  # its outputs for the live rows
    step: int = 0  # tokens each row has taken so far
    error: Exception | None = None  # why the batch ended early
    rows: list[Row] = field(init=False)
    owners: list[Job] = field(init=False)  # each row's job
    live: list[int] = field(init=False)  # the rows still decoding, in ``hidden``'s order
    slots: list[int] = field(init=False)  # each row's row id in the server's session

    def __post_init__(self) -> None:
        self.owners = [job for job in self.jobs for _ in job.rows]
        self.rows = [row for job in self.jobs for row in job.rows]
        self.live, self.slots = list(range(len(self.rows))), list(range(len(self.rows)))

    def drop_finished(self) -> None:
        """Only the live rows without a finish reason go on."""
        keep = [k for k, b in enumerate(self.live) if self.rows[b].finish_reason is None]
        if len(keep) < len(self.live):
            index = torch.tensor(keep, dtype=torch.long)
            self.hidden = self.hidden[index.to(self.hidden.device)]
            if self.adapted is not None:
                self.adapted = self.adapted[index.to(self.adapted.device)]
            self.live = [self.live[k] for k in keep]


class Generator:
    """Decodes examples through ``client`` with the served model's head, mixed with an optional
    adapter or kNN-LM.

    The decoding step is :meth:`advance`: one token for every live row of some batches, their
    mixtures computed together, then one server step per batch. :meth:`generate` runs it on one
    batch at a time; ``pema-client serve`` runs it on every open batch at once.
    """

    def __init__(
        self,
        client: PemaClient,
        served: ServedModel,
        config: GenerationConfig,
        template: str,
        adapter: Adapter | None = None,
        adapter_config: AdapterConfig | None = None,
        knn: KnnLM | None = None,
    ) -> None:
        if served.head is None:
            raise ValueError("decoding needs the served model's output head")
        if adapter is not None and knn is not None:
            raise ValueError("mix the PLM with an adapter or with a kNN memory, not both")
        self.client, self.served, self.config, self.template = client, served, config, template
        self.defaults: MixingDefaults | None = adapter_config if knn is None else knn
        self.mixing = Mixing.resolve(config, self.defaults)
        self.device = resolve_device(config.device)
        self.head = served.head.to(self.device).eval()
        self.adapter = adapter.to(self.device).eval() if adapter is not None else None
        self.knn = knn
        self.eos = set(served.info.eos_token_ids)
        self.sampler = torch.Generator(self.device).manual_seed(config.seed)
        limits = served.info.limits
        # The session's first token comes with its opening; each later one is a step.
        self.max_new_tokens = min(config.max_new_tokens, limits.max_new_tokens + 1)
        if self.max_new_tokens < config.max_new_tokens:
            log.warning("the server decodes at most %d new tokens per row", self.max_new_tokens)
        self.batch_size = min(config.batch_size, limits.max_batch_size)
        self._pool: ThreadPoolExecutor | None = None  # steps of several batches at once
        self._ending_ids: dict[tuple[str, ...], torch.Tensor] = {}  # stop strings -> tokens
        self._grammars: Grammars | None = None  # the tokenizer as grammars read it, once needed
        self._opens_all_positions = True  # the server's session openings read every position

    @property
    def grammars(self) -> Grammars:
        if self._grammars is None:
            info = self.served.info
            self._grammars = Grammars(self.served.tokenizer, info.vocab_size, info.eos_token_ids)
        return self._grammars

    def generate(
        self, examples: Sequence[Example], progress: bool = False, start: int = 0
    ) -> Iterator[Generation]:
        """Each example's generation from ``start`` on (a multiple of ``batch_size``), in order,
        a batch at a time. A batch samples with its own seed, so a run continued from a batch
        decodes it as the whole run would."""
        if start % self.batch_size and start < len(examples):
            raise ValueError(f"start {start} is not a multiple of the batch size")
        total, tokenizer = len(examples), self.served.tokenizer
        with progress_bar("generate", "rows", total, start, enabled=progress) as advance:
            for first in range(start, total, self.batch_size):
                batch = examples[first : first + self.batch_size]
                prompts = [encode_prompt(tokenizer, self.template, e.source) for e in batch]
                sources = [source_length(tokenizer, e.source) for e in batch]
                job = self.job(prompts, sources, seed=self.config.seed + first, first=first)
                if self.mixing.num_beams > 1:
                    self._beam_search(job)
                else:
                    self.decode([job])
                advance(len(job.rows), sum(len(r.tokens) for r in job.rows))
                for example, row in zip(batch, job.rows, strict=True):
                    yield Generation(
                        example.source,
                        row.text,
                        example.target,
                        row.tokens,
                        round(row.seconds, 4),
                        row.finish_reason or "length",
                    )

    def _beam_search(self, job: Job) -> None:
        """Decode ``job`` by beam search, in sessions of as many inputs as the server's row
        limit leaves room for (each input takes ``num_beams`` rows)."""
        limit, beams = self.served.info.limits.max_batch_size, job.mixing.num_beams
        if beams > limit:
            raise ValueError(
                f"{beams} beams need {beams} rows per input, but the server steps at most "
                f"{limit} rows in a session: decode with --num-beams {limit} or fewer"
            )
        started, inputs = time.perf_counter(), limit // beams
        for first in range(0, len(job.rows), inputs):
            part = dataclasses.replace(job, rows=job.rows[first : first + inputs])
            BeamSearch(self, part, started).run()

    def job(
        self,
        prompts: Sequence[list[int]],
        source_tokens: Sequence[int],
        config: GenerationConfig | None = None,
        seed: int | None = None,
        first: int = 0,
        copies: int = 1,
    ) -> Job:
        """A job of ``prompts`` (token ids; ``source_tokens``: each one's source length, the
        basis of its GU horizon), ``copies`` rows each, decoded with ``config`` (default: the
        generator's), its unset mixing settings taken from the adapter's; ``first`` numbers the
        prompts in errors."""
        config = config or self.config
        mixing = self.mixing if config is self.config else Mixing.resolve(config, self.defaults)
        info = self.served.info
        budget = min(config.max_new_tokens, self.max_new_tokens)
        rows = []
        for index, (prompt, source) in enumerate(zip(prompts, source_tokens, strict=True), first):
            room = min(info.max_positions, info.limits.max_request_tokens) - len(prompt)
            if not prompt:
                raise EmptyPrompt(f"example {index}: the prompt is empty; give it some text")
            if room < 1:
                raise PromptTooLong(
                    f"example {index}: the prompt has {len(prompt)} tokens, leaving no room to "
                    f"generate within the model's {info.max_positions} positions; shorten it"
                )
            # float32, as λ's horizons always were: the same λ bit for bit.
            horizon = float(np.float32(mixing.horizon_of(source)))
            most = min(budget, room)
            least = min(math.ceil(config.min_length * (mixing.length_ratio or 1.0) * source), most)
            rows += [Row(prompt, horizon, most, least) for _ in range(copies)]
        if config.grammar is not None:
            for row, matcher in zip(
                rows, self.grammars.matchers(config.grammar, len(rows)), strict=True
            ):
                row.matcher = matcher
        sampler = torch.Generator(self.device).manual_seed(config.seed if seed is None else seed)
        return Job(rows, config, mixing, sampler)

    def decode(self, jobs: list[Job]) -> None:
        """Decode ``jobs`` together in one session until each row ends on EOS, a stop string or
        its budget."""
        batch = self.open(jobs)
        try:
            while batch.live:
                self.advance([batch])
            for error in (batch.error, *(job.error for job in jobs)):
                if error is not None:
                    raise error
        finally:
            self.close(batch)

    def open(self, jobs: list[Job]) -> Batch:
        """A server session over the rows of ``jobs``, with their first representations (and the
        sequence adapter's cache over their prompts)."""
        started = time.perf_counter()
        prompts = [row.prompt for job in jobs for row in job.rows]
        weight = max(job.mixing.lambda_max for job in jobs)  # 0: nobody reads the adapter
        session, hidden, adapted, cache = self.open_session(prompts, weight)
        return Batch(jobs, session, hidden, started, cache=cache, adapted=adapted)

    def shutdown(self) -> None:
        """Stop the threads that step several batches at once (when there are any)."""
        if self._pool is not None:
            self._pool.shutdown()
            self._pool = None

    def close(self, batch: Batch) -> None:
        """Free the batch's server session (once; an error closing it is only logged)."""
        session, batch.session = batch.session, None
        if session is not None:
            self._close(session)

    def advance(self, batches: Sequence[Batch]) -> None:
        """One token for every live row of ``batches``, their distributions computed together;
        then one server step of each batch that still has live rows, sent at once so that the
        server can run them in one pass. A batch whose step fails ends with the error in
        ``error``; its session is closed, as is each batch's whose rows all finished."""
        for batch in batches:
            for b in batch.live:
                if batch.owners[b].cancelled:
                    batch.rows[b].finish_reason = "cancelled"
            batch.drop_finished()
        active = [batch for batch in batches if batch.live]
        if active:
            self._next_tokens(active)
        stepping = []
        for batch in batches:
            batch.drop_finished()
            if batch.live:
                stepping.append(batch)
            else:
                self.close(batch)
        if len(stepping) > 1:
            self._pool = self._pool or ThreadPoolExecutor(thread_name_prefix="pema-step")
            list(self._pool.map(self._step, stepping))
        elif stepping:
            self._step(stepping[0])

    def _next_tokens(self, batches: list[Batch]) -> None:
        """Pick and append the next token of every live row of ``batches``."""
        lam: list[float] = []
        adapted: list[torch.Tensor] = []
        groups: list[tuple[Job, Batch, list[tuple[int, int]]]] = []  # rows of a job, in order
        for batch in batches:
            for b in batch.live:
                job = batch.owners[b]
                lam.append(job.mixing.lambda_at(batch.step, batch.rows[b].horizon))
                if not groups or groups[-1][0] is not job:
                    groups.append((job, batch, []))
                groups[-1][2].append((len(lam) - 1, b))
            if batch.adapted is not None:
                adapted.append(batch.adapted)
            elif self.adapter is not None and self.adapter.reads_sequences:
                # Weighed 0 (none of its λ are above 0): zeros stand in for its outputs.
                adapted.append(batch.hidden.new_zeros(batch.hidden.shape))
        hidden = torch.cat([batch.hidden for batch in batches]).to(self.device, torch.float32)
        lams = torch.tensor(lam, device=self.device)
        with torch.inference_mode():
            log_probs = self._log_probs(
                hidden, lams, torch.cat(adapted).to(self.device) if adapted else None
            )
            for job, batch, members in groups:
                index = torch.tensor([p for p, _ in members], device=self.device)
                rows = [batch.rows[b] for _, b in members]
                try:
                    tokens = self._choose(log_probs[index], rows, job)  # on a copy of its rows
                except Exception as exc:  # this job's settings: it alone ends
                    log.warning("a job failed to pick its tokens: %s", exc)
                    job.error = exc
                    for row in rows:
                        row.finish_reason = "error"
                    continue
                if job.config.logprobs is not None:  # the mixture's, before guard and sampling
                    scored = token_logprobs(log_probs[index], tokens, job.config.logprobs)
                    for row, logprob in zip(rows, scored, strict=True):
                        row.logprobs.append(logprob)
                for row, token in zip(rows, tokens, strict=True):
                    self._append(row, token, batch.started, job.config)

    def _choose(self, log_probs: torch.Tensor, rows: list[Row], job: Job) -> list[int]:
        """The next token of each of a job's ``rows`` from their mixed log-probabilities: the
        repetition guard and the minimum length rule out tokens, then the grammar, which wins
        where they leave it no token."""
        allowed = None
        if job.config.grammar is not None:
            allowed = self.grammars.mask(log_probs, [row.matcher for row in rows])
        ban_repeats(log_probs, [row.tokens for row in rows], job.mixing.no_repeat_ngram)
        early = [i for i, row in enumerate(rows) if len(row.tokens) < row.min_tokens]
        if early:
            index = torch.tensor(early, device=log_probs.device)[:, None]
            log_probs[index, self._endings(job.config.stop)] = -math.inf
        if allowed is not None:
            log_probs = log_probs.masked_fill(allowed == -math.inf, -math.inf)
            stuck = ~torch.isfinite(log_probs).any(-1)
            log_probs[stuck] = allowed[stuck]
        tokens = _pick(log_probs, job.config, job.sampler).tolist()
        if allowed is not None:
            consume([row.matcher for row in rows], tokens)
        return tokens

    def _endings(self, stops: tuple[str, ...]) -> torch.Tensor:
        """The tokens that end a row: EOS, and each token whose text holds a stop string."""
        if stops not in self._ending_ids:
            tokenizer, vocab = self.served.tokenizer, self.served.info.vocab_size
            texts = tokenizer.batch_decode([[t] for t in range(vocab)])
            ids = set(self.eos) | {
                t for t, text in enumerate(texts) if any(s in text for s in stops)
            }
            self._ending_ids[stops] = torch.tensor(
                sorted(ids), device=self.device, dtype=torch.long
            )
        return self._ending_ids[stops]

    def _step(self, batch: Batch) -> None:
        """Step the batch's live rows by their last tokens on the server (re-opening the session
        if the server lost it) and in the sequence adapter's cache; an error ends the batch."""
        new = [batch.rows[b].tokens[-1] for b in batch.live]
        try:
            assert batch.session is not None, "a live batch has a session"
            try:
                slots = [batch.slots[b] for b in batch.live]
                batch.hidden, _ = self.client.step(batch.session, new, slots)
            except (ServerError, httpx.TransportError) as exc:
                self._reopen(batch, exc)  # restarted, evicted or unreachable
            if batch.cache is not None:  # the sequence adapter reads the same new position
                batch.adapted = self._step_sequence(batch.cache, batch.hidden, new, batch.live)
            batch.step += 1
        except Exception as exc:
            batch.error, batch.live = exc, []
            self.close(batch)

    def open_session(
        self, prompts: list[list[int]], lambda_max: float
    ) -> tuple[str, torch.Tensor, torch.Tensor | None, Any]:
        """A server session over ``prompts``: its id, each row's last representation, and the
        sequence adapter's outputs there with its cache over the prompts (room for the new
        tokens); (None, None) for the other kinds, or when the adapter has no weight
        (``lambda_max`` 0). One prefill reads the prompts for both."""
        dtype = self.config.hidden_dtype
        if self.adapter is None or not self.adapter.reads_sequences or lambda_max <= 0:
            session, hidden, _ = self.client.open_session(prompts, dtype=dtype)
            return session, hidden, None, None
        session, rows = self._open_reading(prompts)
        try:
            rows = [h.to(self.device, torch.float32) for h in rows]
            capacity = max(len(p) for p in prompts) + self.max_new_tokens
            with torch.inference_mode():
                adapted, cache = self.adapter.start(rows, prompts, capacity)
        except BaseException:
            self._close(session)
            raise
        return session, torch.stack([h[-1] for h in rows]), adapted, cache

    def _open_reading(self, prompts: list[list[int]]) -> tuple[str, list[torch.Tensor]]:
        """A session over ``prompts`` and every prompt position's representations: from its
        opening, or, from a server older than that option, through ``/v1/represent``."""
        dtype = self.config.hidden_dtype
        if self._opens_all_positions:
            try:
                return self.client.open_reading(prompts, dtype=dtype)
            except ServerError as exc:
                if exc.status != 422 or "positions" not in exc.message:
                    raise
                log.info("the server opens sessions on last positions only: prompts are read again")
                self._opens_all_positions = False
        session, _, _ = self.client.open_session(prompts, dtype=dtype)
        try:
            return session, self.client.represent(prompts, [0] * len(prompts), dtype=dtype).rows()
        except BaseException:
            self._close(session)
            raise

    @torch.inference_mode()
    def _step_sequence(
        self, cache: Any, hidden: torch.Tensor, tokens: list[int], live: list[int]
    ) -> torch.Tensor:
        assert self.adapter is not None
        x = hidden.to(self.device, torch.float32)
        ids, rows = (torch.tensor(t, device=self.device) for t in (tokens, live))
        return self.adapter.step(cache, x, ids, rows)

    @torch.inference_mode()
    def next_tokens(
        self,
        hidden: torch.Tensor,
        step: int,
        horizons: torch.Tensor,
        adapted: torch.Tensor | None = None,
        history: Sequence[Sequence[int]] | None = None,
    ) -> list[int]:
        """The next token of each row from its representation ``[B, d]`` at step ``step``, with
        the generator's settings (``adapted``: the adapter's outputs for them, when it needs more
        than ``hidden``; ``history``: each row's output so far, for ``no_repeat_ngram``)."""
        lam = torch.tensor([self.mixing.lambda_at(step, float(h)) for h in horizons])
        x = hidden.to(self.device, torch.float32)
        log_probs = self._log_probs(x, lam.to(self.device), adapted)
        if history is not None:
            ban_repeats(log_probs, history, self.mixing.no_repeat_ngram)
        return _pick(log_probs, self.config, self.sampler).tolist()

    @torch.inference_mode()
    def score(
        self, prompts: list[list[int]], mixing: Mixing, top: int = 0
    ) -> list[list[TokenLogprob]]:
        """Each token of each prompt after its first, scored as the first new token after the
        tokens before it: its log-probability under the mixture (λ_0 of ``mixing``), and the
        ``top`` most likely tokens'. Representation passes over the prompts alone (as many as
        the server's limits need), for every kind: the sequence adapter reads a prompt as it
        reads one, causally."""
        rows: list[torch.Tensor] = []
        for part in within_limits(prompts, len, self.served.info.limits):
            out = self.client.represent(part, [0] * len(part), dtype=self.config.hidden_dtype)
            rows += out.rows()
        return [
            self._scored(prompt, x, mixing, top) for prompt, x in zip(prompts, rows, strict=True)
        ]

    def _scored(
        self, prompt: list[int], hidden: torch.Tensor, mixing: Mixing, top: int
    ) -> list[TokenLogprob]:
        if len(prompt) < 2:
            return []
        x = hidden.to(self.device, torch.float32)
        lam = torch.full((len(prompt) - 1,), mixing.lambda_at(0, 0.0), device=self.device)
        adapted = None
        if self.adapter is not None and self.adapter.reads_sequences and mixing.lambda_max > 0:
            ids = torch.tensor([prompt], device=self.device)
            length = torch.tensor([len(prompt)], device=self.device)
            adapted = self.adapter(x.unsqueeze(0), ids, length)[0, :-1]
        return token_logprobs(self._log_probs(x[:-1], lam, adapted), prompt[1:], top)

    def _log_probs(
        self, x: torch.Tensor, lam: torch.Tensor, adapted: torch.Tensor | None
    ) -> torch.Tensor:
        """The mixed next-token log-probabilities ``[B, V]`` of representations ``x [B, d]``
        with each row's λ."""
        if not bool(lam.any()):
            return F.log_softmax(self.head(x), dim=-1)
        if self.adapter is not None:
            return mixed_log_probs(self.head, self.adapter, x, lam, adapted)
        assert self.knn is not None, "λ > 0 needs an adapter or a kNN-LM (Mixing.resolve)"
        lp_lm = F.log_softmax(self.head(x), dim=-1)
        return mix_log_probs(lp_lm, self.knn.log_probs(x), lam)

    def _append(self, row: Row, token: int, started: float, config: GenerationConfig) -> None:
        """Add ``token`` to ``row`` and decide whether the row is finished."""
        row.tokens.append(token)
        row.finish_reason, row.text = self.ending(row.tokens, row.budget, config.stop)
        if row.finish_reason is not None:
            row.seconds = time.perf_counter() - started

    def ending(
        self, tokens: list[int], budget: int, stops: tuple[str, ...]
    ) -> tuple[str | None, str]:
        """Whether an output of ``tokens`` (its last just taken) is finished ("eos", "stop",
        "length"; None) and its text: the finished text, or the text so far with stop strings
        (decoding the text every step costs: only then), else ""."""
        if tokens[-1] in self.eos:
            return "eos", self.text(tokens[:-1])
        text = ""
        if stops:
            text = self.text(tokens)
            if (cut := stop_index(text, stops)) is not None:
                return "stop", text[:cut].rstrip()
        if len(tokens) >= budget:
            return "length", self.text(tokens)
        return None, text

    def text(self, tokens: list[int]) -> str:
        """The text of output ``tokens``, as a finished row's (special tokens out, stripped)."""
        return str(self.served.tokenizer.decode(tokens, skip_special_tokens=True)).strip()

    def _reopen(self, batch: Batch, cause: Exception) -> None:
        """A new session of each live row's prompt and output so far, once the server answers
        again (within ``reconnect_s``): its last representations are what the lost step would
        have returned."""
        sequences = [batch.rows[b].prompt + batch.rows[b].tokens for b in batch.live]
        batch.session, batch.hidden = self.reopened(batch.session, sequences, cause)
        for slot, b in enumerate(batch.live):
            batch.slots[b] = slot

    def reopened(
        self, session: str | None, sequences: list[list[int]], cause: Exception
    ) -> tuple[str, torch.Tensor]:
        """A new session of ``sequences`` (each row's prompt and output so far) and its last
        representations, once the server answers again (within ``reconnect_s``), in place of
        ``session``, which a step failed on with ``cause``: re-raised unless the server lost
        the session (restarted, evicted or unreachable)."""
        if isinstance(cause, ServerError) and not _lost(cause):
            raise cause
        log.warning("the server lost the session (%s); re-opening it", cause)
        deadline = time.monotonic() + self.config.reconnect_s
        while not self.client.health():
            if time.monotonic() > deadline:
                raise RuntimeError(
                    f"the server has not answered for {self.config.reconnect_s:g} s after "
                    f"{cause}; run again, or wait longer with --reconnect-s"
                ) from cause
            time.sleep(RECONNECT_POLL_S)
        fingerprint = self.client.model_info().fingerprint
        if fingerprint != self.served.info.fingerprint:
            raise RuntimeError(
                f"the server came back with another model ({fingerprint}, was "
                f"{self.served.info.fingerprint}); the outputs so far would not match"
            ) from cause
        if session is not None:  # if it is still there (a dropped connection), free its slot
            self._close(session)
        session, hidden, _ = self.client.open_session(sequences, dtype=self.config.hidden_dtype)
        return session, hidden

    def _close(self, session: str) -> None:
        try:
            self.client.close_session(session)
        except (ServerError, httpx.TransportError) as exc:  # gone, or the server is: no matter
            log.debug("could not close session %s: %s", session, exc)


def _pick(
    log_probs: torch.Tensor, config: GenerationConfig, sampler: torch.Generator
) -> torch.Tensor:
    if config.temperature < GREEDY_BELOW:  # dividing by it would overflow: greedy, as vLLM does
        return log_probs.argmax(-1)
    scores = filter_top_k_top_p(log_probs / config.temperature, config.top_k, config.top_p)
    return torch.multinomial(scores.softmax(-1), 1, generator=sampler).squeeze(-1)


def _lost(error: ServerError) -> bool:
    """Whether the server no longer has the session: restarted or evicted (404), or down."""
    return error.code == "session_not_found" or error.status >= 500
