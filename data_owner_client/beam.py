"""Beam search over the mixture (docs/design.md, "Beam search").

Each input keeps ``num_beams`` hypotheses, scored by the sum of their tokens' mixed
log-probabilities (the same λ, repetition guard and minimum length as greedy decoding). Each step
every live hypothesis proposes its continuations; per input the ``max(2, 1 + EOS ids) ·
num_beams`` best are read in order: one that ends (EOS, a stop string, the token budget) joins
the finished hypotheses if it ranks among the first ``num_beams``, the others go on until
``num_beams`` do. An input is done once it has ``num_beams`` finished hypotheses that no live one
can beat at its current length (transformers' heuristic); its output is the finished hypothesis
with the best ``score / length^length_penalty``.

The server's session follows the hypotheses with a step's ``parents`` (a row forks or is
dropped), and so does the sequence adapter's cache (:meth:`AdapterModule.select`): the
hypotheses share their prompt's prefill.
"""

from __future__ import annotations

import dataclasses
import math
import time
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any, Protocol

import httpx
import torch

from data_owner_client.client import ServerError
from data_owner_client.sampling import ban_repeats

if TYPE_CHECKING:
    from data_owner_client.adapter import Adapter
    from data_owner_client.client import PemaClient
    from data_owner_client.decoding import GenerationConfig, Job


class Decoder(Protocol):
    """What beam search uses of :class:`data_owner_client.generate.Generator`: the server, the
    mixture and the end-of-output rule of one-hypothesis decoding."""

    client: PemaClient
    config: GenerationConfig
    device: torch.device
    adapter: Adapter | None
    eos: set[int]

    def _log_probs(
        self, x: torch.Tensor, lam: torch.Tensor, adapted: torch.Tensor | None
    ) -> torch.Tensor: ...
    def _endings(self, stops: tuple[str, ...]) -> torch.Tensor: ...
    def ending(
        self, tokens: list[int], budget: int, stops: tuple[str, ...]
    ) -> tuple[str | None, str]: ...
    def text(self, tokens: list[int]) -> str: ...
    def open_session(
        self, prompts: list[list[int]], lambda_max: float
    ) -> tuple[str, torch.Tensor, torch.Tensor | None, Any]: ...
    def _step_sequence(
        self, cache: Any, hidden: torch.Tensor, tokens: list[int], live: list[int]
    ) -> torch.Tensor: ...
    def reopened(
        self, session: str | None, sequences: list[list[int]], cause: Exception
    ) -> tuple[str, torch.Tensor]: ...
    def _close(self, session: str) -> None: ...


@dataclass
class Hypothesis:
    """A continuation of one input."""

    row: int  # the input's index in the job
    tokens: list[int]
    score: float  # the sum of its tokens' log-probabilities
    finish_reason: str | None = None  # "eos", "stop" or "length" once finished
    text: str = ""


class BeamSearch:
    """Decodes a job's rows by beam search in one server session, writing each row's best
    hypothesis into it (its tokens, text, finish reason and time)."""

    def __init__(self, generator: Decoder, job: Job, started: float | None = None) -> None:
        """``started``: when the batch began (its rows' ``seconds`` count from there)."""
        self.generator, self.job = generator, job
        self.started = time.perf_counter() if started is None else started
        self.width = job.mixing.num_beams
        self.mixing = job.mixing
        self.finished: list[list[Hypothesis]] = [[] for _ in job.rows]  # per input
        self.endings = generator._endings(job.config.stop)
        # As transformers: enough candidates that width go on however many end on an EOS.
        self.candidates = max(2, 1 + len(generator.eos)) * self.width

    def run(self) -> None:
        g, rows = self.generator, self.job.rows
        prompts = [row.prompt for row in rows]
        session, hidden, adapted, cache = g.open_session(prompts, self.mixing.lambda_max)
        live = [Hypothesis(r, [], 0.0) for r in range(len(rows))]
        try:
            step = 0
            while live:
                parents, live = self._advance(live, hidden, adapted, step)
                if not live:
                    break
                tokens = [h.tokens[-1] for h in live]
                session, hidden = self._step(session, live, parents, tokens)
                if cache is not None:
                    index = torch.tensor(parents, device=g.device)
                    cache = g.adapter.select(cache, index)  # type: ignore[union-attr]
                    adapted = g._step_sequence(cache, hidden, tokens, list(range(len(live))))
                step += 1
        finally:
            g._close(session)
        for row, finished in zip(rows, self.finished, strict=True):
            best = max(finished, key=self._normalised)
            row.tokens, row.text, row.finish_reason = best.tokens, best.text, best.finish_reason
            row.seconds = time.perf_counter() - self.started

    @torch.inference_mode()
    def _advance(
        self,
        live: list[Hypothesis],
        hidden: torch.Tensor,
        adapted: torch.Tensor | None,
        step: int,
    ) -> tuple[list[int], list[Hypothesis]]:
        """The hypotheses that go on after one more token, and the live one each continues."""
        g, rows = self.generator, self.job.rows
        lam = [self.mixing.lambda_at(step, rows[h.row].horizon) for h in live]
        x = hidden.to(g.device, torch.float32)
        log_probs = g._log_probs(x, torch.tensor(lam, device=g.device), adapted)
        ban_repeats(log_probs, [h.tokens for h in live], self.mixing.no_repeat_ngram)
        early = [i for i, h in enumerate(live) if len(h.tokens) < rows[h.row].min_tokens]
        if early:
            log_probs[torch.tensor(early, device=g.device)[:, None], self.endings] = -math.inf
        totals = log_probs + torch.tensor([h.score for h in live], device=g.device)[:, None]
        parents: list[int] = []
        going: list[Hypothesis] = []
        vocab = totals.shape[1]
        for r, finished in enumerate(self.finished):
            members = [i for i, h in enumerate(live) if h.row == r]
            if not members:
                continue
            flat = totals[members].flatten()
            values, where = flat.topk(min(self.candidates, flat.numel()))
            kept: list[tuple[int, Hypothesis]] = []
            ranked = zip(values.tolist(), where.tolist(), strict=True)
            for rank, (value, index) in enumerate(ranked):
                if value == -math.inf or len(kept) == self.width:
                    break
                parent = members[index // vocab]
                hypothesis = self._extend(live[parent], index % vocab, value)
                if hypothesis.finish_reason is None:
                    kept.append((parent, hypothesis))
                elif rank < self.width:  # only the best may finish (as transformers)
                    finished.append(hypothesis)
            if not finished and not kept:  # every continuation ruled out: the best so far
                best = max((live[i] for i in members), key=lambda h: h.score)
                finished.append(dataclasses.replace(best, finish_reason="length",
                                                    text=g.text(best.tokens)))  # fmt: skip
            if self._done(finished, [h for _, h in kept]):
                continue
            parents += [p for p, _ in kept]
            going += [h for _, h in kept]
        return parents, going

    def _extend(self, hypothesis: Hypothesis, token: int, score: float) -> Hypothesis:
        """``hypothesis`` with ``token``, finished where the token ends it."""
        tokens = [*hypothesis.tokens, token]
        budget = self.job.rows[hypothesis.row].budget
        reason, text = self.generator.ending(tokens, budget, self.job.config.stop)
        return Hypothesis(hypothesis.row, tokens, score, reason, text)

    def _done(self, finished: list[Hypothesis], live: list[Hypothesis]) -> bool:
        """No live hypothesis left, or ``width`` finished ones none of them can beat at its
        current length."""
        if not live:
            return True
        if len(finished) < self.width:
            return False
        worst = sorted(map(self._normalised, finished), reverse=True)[self.width - 1]
        best_live = max(h.score for h in live) / len(live[0].tokens) ** self._penalty
        return worst >= best_live

    @property
    def _penalty(self) -> float:
        return self.job.config.length_penalty

    def _normalised(self, hypothesis: Hypothesis) -> float:
        return hypothesis.score / max(len(hypothesis.tokens), 1) ** self._penalty

    def _step(
        self, session: str, live: list[Hypothesis], parents: list[int], tokens: list[int]
    ) -> tuple[str, torch.Tensor]:
        """Step the session's rows, forked to follow ``parents``; re-open it if the server lost
        it (restarted or evicted), with each hypothesis's whole sequence."""
        g = self.generator
        try:
            hidden, _ = g.client.step(session, tokens, parents=parents)
            return session, hidden
        except (ServerError, httpx.TransportError) as exc:
            sequences = [self.job.rows[h.row].prompt + h.tokens for h in live]
            return g.reopened(session, sequences, exc)
