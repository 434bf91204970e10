"""What decoding is asked to do and where each output stands: the settings of `generate` and
`evaluate` (:class:`GenerationConfig`), their resolution against an adapter's stored defaults
(:class:`Mixing`), and the rows being decoded (:class:`Row`, :class:`Job`, :class:`Generation`).
The decoding itself is :mod:`data_owner_client.generate` (one hypothesis per row) and
:mod:`data_owner_client.beam` (beam search)."""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any, Protocol

import torch

from data_owner_client.options import option
from data_owner_client.schedule import SCHEDULES, check_settings, gu_lambda
from shared.protocol import HiddenDType

GREEDY_BELOW = 1e-5  # temperatures below this decode greedily


@dataclass
class GenerationConfig:
    """How to decode; ``None`` mixing settings take the adapter's saved defaults."""

    max_new_tokens: int = option(128, help="most new tokens per input (EOS included)")
    lambda_max: float | None = option(
        None, help="initial PEMA weight λ_0 of Gradual Unrolling; 0 decodes with the PLM alone"
    )
    lambda_min: float | None = option(None, help="floor of λ over a sequence")
    schedule: str | None = option(
        None,
        help="how λ decays over a sequence: quadratic (paper), linear, or constant (no unrolling)",
        choices=SCHEDULES,
    )
    gu_horizon: float | None = option(
        None,
        help="fixed horizon L in tokens (default: the adapter's length ratio × source tokens)",
    )
    temperature: float = option(0.0, help="0 decodes greedily; above 0 samples")
    top_k: int = option(0, help="when sampling, only the k most likely tokens (0: all)")
    top_p: float = option(1.0, help="when sampling, only the smallest set holding this probability")
    seed: int = option(0, help="seeds sampling")
    num_beams: int | None = option(
        None,
        help="beam search over this many hypotheses per input, scored by the mixture's "
        "log-probabilities; 1: one hypothesis, greedy or sampled (default: the adapter's; 1 "
        "when sampling or without an adapter)",
    )
    length_penalty: float = option(
        1.0,
        help="beam search ranks finished hypotheses by their log-probability / length^this "
        "(0: the sum alone, which favours short outputs)",
    )
    no_repeat_ngram: int | None = option(
        None,
        help="never repeat an n-gram of an output, e.g. 4; 0: off (default: the adapter's)",
        metavar="N",
    )
    # A row may not end (EOS, or a token holding a stop string) before this fraction of its
    # expected length: the learned length ratio × its source tokens (× 1 without a ratio).
    min_length: float = option(
        0.0,
        help="no end (EOS or a stop string) before this fraction of an output's expected length, "
        "the adapter's length ratio × source tokens, e.g. 0.8 (0: off)",
    )
    stop: tuple[str, ...] = ()  # end a row when its text contains one of these (not kept)
    # Record each new token's log-probability under the mixture and the N most likely (serve).
    logprobs: int | None = None
    # Outputs follow this llguidance grammar (data_owner_client.constraints.json_grammar).
    grammar: str | None = None
    batch_size: int = option(8, help="inputs decoded together in one server session")
    hidden_dtype: HiddenDType = option("float32", help="representations on the wire")
    reconnect_s: float = option(
        120.0, help="seconds to wait for a server that went away mid-decode"
    )
    device: str = option(
        "auto", help="where the head and adapter run: auto (cuda, mps, cpu) or a torch device"
    )

    def __post_init__(self) -> None:
        if self.max_new_tokens < 1 or self.batch_size < 1:
            raise ValueError("max_new_tokens and batch_size must be at least 1")
        if self.temperature < 0 or self.top_k < 0 or not 0 < self.top_p <= 1:
            raise ValueError("need temperature >= 0, top_k >= 0 and 0 < top_p <= 1")
        if self.reconnect_s < 0:
            raise ValueError(f"reconnect_s must be 0 or more, got {self.reconnect_s}")
        if self.min_length < 0:
            raise ValueError(f"min_length must be 0 (off) or more, got {self.min_length}")
        if self.no_repeat_ngram is not None and self.no_repeat_ngram < 0:
            raise ValueError(f"no_repeat_ngram must be 0 (off) or more, got {self.no_repeat_ngram}")
        if self.gu_horizon is not None and self.gu_horizon <= 0:
            raise ValueError(f"the GU horizon must be positive, got {self.gu_horizon}")
        if any(not s for s in self.stop):
            raise ValueError("stop strings must not be empty")
        if self.num_beams is not None and self.num_beams < 1:
            raise ValueError(f"num_beams must be at least 1, got {self.num_beams}")
        if self.num_beams is not None and self.num_beams > 1 and self.sampling:
            raise ValueError(
                "beam search keeps the most likely hypotheses and samples nothing: "
                "drop the temperature, or decode with num_beams 1"
            )
        if self.logprobs is not None and (self.logprobs < 0 or (self.num_beams or 1) > 1):
            raise ValueError("logprobs: a count of 0 or more, with one hypothesis per input")
        if self.grammar is not None and (self.num_beams or 1) > 1:
            raise ValueError("a grammar constrains one hypothesis per input: decode with 1 beam")

    @property
    def sampling(self) -> bool:
        return self.temperature >= GREEDY_BELOW


class MixingDefaults(Protocol):
    """Where unset mixing settings come from: an adapter's config or a kNN-LM."""

    @property
    def lambda_max(self) -> float: ...
    @property
    def lambda_min(self) -> float: ...
    @property
    def schedule(self) -> str: ...
    @property
    def length_ratio(self) -> float | None: ...
    @property
    def no_repeat_ngram(self) -> int: ...
    @property
    def num_beams(self) -> int: ...


@dataclass(frozen=True)
class Mixing:
    """The resolved Gradual Unrolling settings of one run, and its repetition guard and beam
    width (which an adapter stores with them)."""

    lambda_max: float
    lambda_min: float
    schedule: str
    length_ratio: float | None  # target/source tokens learned in training
    horizon: float | None  # fixed horizon; overrides the ratio
    no_repeat_ngram: int = 0  # never repeat an n-gram of a row's output (0: off)
    num_beams: int = 1  # beam search's hypotheses per input (1: greedy or sampled)

    def __post_init__(self) -> None:
        check_settings(self.lambda_max, self.lambda_min, self.schedule)
        if self.needs_horizon and self.horizon is None and self.length_ratio is None:
            raise ValueError(
                "the adapter has no learned length ratio for Gradual Unrolling; pass a fixed "
                "horizon (--gu-horizon N) or use --schedule constant"
            )

    @property
    def needs_horizon(self) -> bool:
        return self.lambda_max > 0 and self.schedule != "constant"

    def lambda_at(self, step: int, horizon: float) -> float:
        """λ of a row of horizon ``horizon`` at generation step ``step``."""
        return gu_lambda(step, horizon, self.lambda_max, self.lambda_min, self.schedule)

    def horizon_of(self, source_tokens: int) -> float:
        """The row's horizon L: fixed, or the learned ratio × its source length."""
        if self.horizon is not None:
            return self.horizon
        return (self.length_ratio or 0.0) * source_tokens

    @classmethod
    def resolve(cls, config: GenerationConfig, defaults: MixingDefaults | None) -> Mixing:
        """The config's settings, falling back to the adapter's or kNN-LM's (λ = 0 without)."""

        def pick(name: str, alone: Any) -> Any:
            value = getattr(config, name)
            if value is not None:
                return value
            return getattr(defaults, name) if defaults is not None else alone

        mixing = cls(
            lambda_max=pick("lambda_max", 0.0),
            lambda_min=pick("lambda_min", 0.0),
            schedule=pick("schedule", "constant"),
            length_ratio=defaults.length_ratio if defaults is not None else None,
            horizon=config.gu_horizon,
            no_repeat_ngram=pick("no_repeat_ngram", 0),
            # Sampling decodes one hypothesis (the config refuses sampling with more).
            num_beams=1 if config.sampling else pick("num_beams", 1),
        )
        if mixing.lambda_max > 0 and defaults is None:
            raise ValueError(
                "mixing with λ_max > 0 needs an adapter (--adapter DIR) or a kNN memory (--knn DIR)"
            )
        return mixing


@dataclass
class Generation:
    """One row's output."""

    source: str
    prediction: str  # the decoded text, without EOS or the stop string
    reference: str | None
    token_ids: list[int]  # the new tokens (EOS included when the row ended on it)
    seconds: float  # from the batch's session opening until this row finished
    finish_reason: str  # "eos", "stop" or "length"

    @property
    def tokens(self) -> int:
        return len(self.token_ids)

    def to_dict(self) -> dict[str, Any]:
        """The JSONL record: source, prediction, reference (when known), token count, time."""
        record: dict[str, Any] = {"source": self.source, "prediction": self.prediction}
        if self.reference is not None:
            record["reference"] = self.reference
        record.update(tokens=self.tokens, seconds=self.seconds, finish_reason=self.finish_reason)
        return record


@dataclass(frozen=True)
class TokenLogprob:
    """A token's log-probability under the mixture, and the most likely tokens' there."""

    token: int
    logprob: float
    top: tuple[tuple[int, float], ...] = ()  # (token, log-probability), most likely first


LOGPROB_FLOOR = (
    -9999.0
)  # an impossible token's log-probability, as vLLM reports it (JSON has no -inf)


def token_logprobs(log_probs: torch.Tensor, tokens: list[int], top: int) -> list[TokenLogprob]:
    """Each row of ``log_probs [n, V]``: ``tokens[i]``'s log-probability and the ``top`` most
    likely tokens' (-inf reported as ``LOGPROB_FLOOR``)."""
    log_probs = log_probs.clamp(min=LOGPROB_FLOOR)
    index = torch.tensor(tokens, device=log_probs.device).unsqueeze(1)
    chosen = log_probs.gather(1, index).squeeze(1).tolist()
    values, ids = log_probs.topk(top, dim=-1) if top else (log_probs[:, :0], log_probs[:, :0])
    return [
        TokenLogprob(token, logprob, tuple(zip(i, v, strict=True)))
        for token, logprob, i, v in zip(
            tokens, chosen, ids.long().tolist(), values.tolist(), strict=True
        )
    ]


@dataclass
class Row:
    """One prompt being decoded."""

    prompt: list[int]
    horizon: float
    budget: int  # new tokens this row may take
    min_tokens: int = 0  # new tokens before the row may end
    tokens: list[int] = field(default_factory=list)
    text: str = ""  # the output so far, once finished (kept up to date with stop strings)
    finish_reason: str | None = None  # "eos", "stop", "length"; or "cancelled", "error"
    seconds: float = 0.0
    logprobs: list[TokenLogprob] = field(default_factory=list)  # per token, when asked for
    matcher: Any = None  # where the row stands in its grammar (an llguidance matcher), if any


@dataclass(eq=False)
class Job:
    """Rows decoded with one set of settings and one sampler: a batch of ``generate``, or one
    request to ``pema-client serve``. ``cancelled`` may be set from any thread: the rows end at
    the next step."""

    rows: list[Row]
    config: GenerationConfig
    mixing: Mixing
    sampler: torch.Generator
    cancelled: bool = False
    error: Exception | None = None  # why its rows ended early (its settings failed)

    @property
    def finished(self) -> bool:
        return all(r.finish_reason is not None for r in self.rows)
