"""What every adapter kind shares: :class:`AdapterConfig`, the settings stored in
``adapter_config.json``; :class:`AdapterModule`, what training and decoding call on a kind's
module; and :class:`AdapterKind`, the one record that registers a kind (its config, module and
training facts) in :data:`KINDS`.

A kind's own settings are fields of its config subclass; their defaults are what
`pema-client train` gives a new adapter of that kind. A config file names its kind (``pema`` when
it does not, as before kinds existed) and :meth:`AdapterConfig.from_json` reads it as that kind's
config.
"""

from __future__ import annotations

import dataclasses
import importlib.metadata
import json
import logging
import math
from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Any, ClassVar, Self, TypeVar

import torch
from torch import nn

from data_owner_client.options import option
from data_owner_client.schedule import SCHEDULES

if TYPE_CHECKING:
    from shared.head import Head

log = logging.getLogger(__name__)

FORMAT = "pema-adapter"
FORMAT_VERSION = 1
# What a file without these keys meant when one config served the kinds of that time (they came
# later, or once had other defaults); a file without a kind is a pema adapter's.
LEGACY_KINDS = ("pema", "residual", "sequence")
FILE_DEFAULTS: dict[str, Any] = {
    "pointer": "read",
    "rank": 512,
    "alpha": 1.0,
    "lambda_max": 0.9,
    "schedule": "quadratic",
    "no_repeat_ngram": 0,
    "num_beams": 1,
}


class AdapterError(ValueError):
    """An adapter directory that is missing, malformed or inconsistent."""


class AdapterFingerprintError(AdapterError):
    """An adapter trained on a model other than the one being served."""


def _package_version() -> str:
    try:
        return importlib.metadata.version("pema-offsite")
    except importlib.metadata.PackageNotFoundError:  # running from a source tree
        return "0+unknown"


C = TypeVar("C", bound="AdapterConfig")


@dataclass
class AdapterConfig:
    """Sizes, the stored decoding defaults and provenance, common to every kind."""

    kind: ClassVar[str]  # the registered kind's name, written to the file as "kind"

    hidden_size: int  # d: the server's representation size
    vocab_size: int  # V: the output head's vocabulary size
    dropout: float = option(
        0.2, help="dropout on the adapter's input (sequence: also inside its blocks)"
    )
    fingerprint: str = ""  # fingerprint of the model whose representations trained the adapter
    model_id: str = ""  # that model's id, for messages
    template: str = "{source}"  # the prompt template the memory was built with
    length_ratio: float | None = None  # target/source token ratio, for Gradual Unrolling horizons
    schedule: str = option(
        "quadratic",
        help="default Gradual Unrolling schedule, stored with the adapter",
        choices=SCHEDULES,
    )
    lambda_max: float = option(
        0.9, help="default λ_max of Gradual Unrolling, stored with the adapter"
    )
    lambda_min: float = option(0.0, help="default λ floor of Gradual Unrolling")
    no_repeat_ngram: int = option(
        0, help="default repetition guard of generate, stored with the adapter"
    )
    num_beams: int = option(
        1, help="default beam width of generate and evaluate (1: greedy), stored with the adapter"
    )
    package_version: str = field(default_factory=_package_version)  # pema-offsite that wrote it
    format: str = FORMAT  # format tag, checked on load
    format_version: int = FORMAT_VERSION  # bumped on incompatible changes

    def __post_init__(self) -> None:
        if self.hidden_size < 1 or self.vocab_size < 1:
            raise AdapterError("hidden_size and vocab_size must be positive")
        if not 0.0 <= self.dropout < 1.0:
            raise AdapterError(f"dropout must be in [0, 1), got {self.dropout}")
        if self.schedule not in SCHEDULES:
            raise AdapterError(f"schedule must be one of {SCHEDULES}, got {self.schedule!r}")
        if self.no_repeat_ngram < 0:
            raise AdapterError(
                f"no_repeat_ngram must be 0 (off) or more, got {self.no_repeat_ngram}"
            )
        if not 0.0 <= self.lambda_min <= self.lambda_max <= 1.0:
            raise AdapterError("need 0 <= lambda_min <= lambda_max <= 1")
        if self.num_beams < 1:
            raise AdapterError(f"num_beams must be at least 1, got {self.num_beams}")

    def tensor_shapes(self) -> dict[str, tuple[int, ...]]:
        """The saved tensors whose shapes the config's sizes fix (a kind may save more)."""
        raise NotImplementedError

    @property
    def reconstruction_weight(self) -> float:
        """κ: the weight of the reconstruction loss in the prediction stage (0 without one)."""
        return 0.0

    def to_json(self) -> str:
        """The config as indented JSON (the content of ``adapter_config.json``)."""
        data = {"kind": self.kind, **dataclasses.asdict(self)}
        return json.dumps(data, indent=2, sort_keys=True) + "\n"

    @classmethod
    def from_json(cls: type[C], text: str) -> C:
        """Parse ``adapter_config.json`` as its kind's config; unknown keys are ignored."""
        data = json.loads(text)
        if not isinstance(data, dict):
            raise AdapterError("adapter config must be a JSON object")
        if data.get("format", FORMAT) != FORMAT:
            raise AdapterError(f"adapter config has format {data['format']!r}, not {FORMAT!r}")
        data.setdefault("kind", "pema")
        if data["kind"] in LEGACY_KINDS:
            data = {**FILE_DEFAULTS, **data}
        if data["kind"] not in KINDS:
            raise AdapterError(f"adapter kind must be one of {tuple(KINDS)}, got {data['kind']!r}")
        config = KINDS[data["kind"]].config
        if not issubclass(config, cls):
            raise AdapterError(f"{cls.__name__} cannot read a {data['kind']} adapter config")
        # Files written before kinds had configs of their own hold every kind's settings.
        known = {f.name for kind in KINDS.values() for f in dataclasses.fields(kind.config)}
        if unknown := sorted(set(data) - known - {"kind"}):
            log.warning("ignoring unknown adapter config keys %s", unknown)
        own = {f.name for f in dataclasses.fields(config)}
        try:
            return config(**{k: v for k, v in data.items() if k in own})  # type: ignore[return-value]
        except TypeError as exc:
            raise AdapterError(f"adapter config is incomplete: {exc}") from exc


@dataclass
class LowRankConfig(AdapterConfig):
    """Settings of the kinds built on a rank-r map ``s · B A`` with ``s = alpha / rank``."""

    rank: int = option(512, help="r, clamped to the hidden size")
    alpha: float = option(1.0, help="scaling s = alpha / rank")

    def __post_init__(self) -> None:
        super().__post_init__()
        if self.rank < 1:
            raise AdapterError("rank must be positive")
        if self.rank > self.hidden_size:
            # A rank above d adds parameters but no capacity: B A has rank at most d.
            log.info("adapter rank %d clamped to hidden size %d", self.rank, self.hidden_size)
            self.rank = self.hidden_size

    @property
    def scaling(self) -> float:
        """The factor ``s = alpha / rank``."""
        return self.alpha / self.rank


@torch.no_grad()
def init_lora_a(weight: torch.Tensor, generator: torch.Generator | None) -> None:
    """As nn.Linear and peft's LoRA A: uniform with bound 1/sqrt(fan_in). Drawn on the CPU so a
    CPU generator seeds it wherever the weight lives."""
    fresh = torch.empty(weight.shape)
    nn.init.kaiming_uniform_(fresh, a=math.sqrt(5), generator=generator)
    weight.copy_(fresh)


class AdapterModule(nn.Module):
    """What training and decoding call on every kind's module (the pema kind adds a
    reconstruction branch and a second stage)."""

    post_norm: bool = False  # outputs live after the final norm: logits are
    # head.project(z) rather than the whole head's H(z)
    # Reads whole sequences (every position of prompt + continuation), not one position: trains
    # on a memory's examples rather than its pairs, and decodes with a cache of its own
    # (start and step).
    reads_sequences: bool = False

    @classmethod
    def from_config(
        cls,
        config: Any,
        head: Head | None = None,
        *,
        generator: torch.Generator | None = None,
    ) -> Self:
        """A freshly initialised module of ``config`` (``head``: the served model's, which the
        kinds that read its norm or embeddings need; ``generator`` seeds the initialisation)."""
        raise NotImplementedError

    def train_outputs(self, *batch: Any, **kwargs: Any) -> tuple[torch.Tensor, torch.Tensor]:
        """The vectors training scores against the labels of a batch, and those labels (each
        kind names its batch's parts)."""
        raise NotImplementedError

    def stage_outputs(self, stage: int, *batch: torch.Tensor) -> tuple[torch.Tensor, ...]:
        """What ``stage`` trains on: ``(vectors, labels)``, then ``h_rct`` where it is trained
        too; stage 1 (reconstruction) only ``(h_rct,)``."""
        return self.train_outputs(*batch)

    def reconstruction_target(self, x: torch.Tensor) -> torch.Tensor | None:
        """What the reconstruction branch reproduces from keys ``x``; None without one."""
        return None

    def trainable(self, stage: int) -> list[nn.Parameter]:
        """Leave trainable exactly what ``stage`` trains (DDP then ignores the rest)."""
        return [p for p in self.parameters() if p.requires_grad]

    def start_stage(self, stage: int, generator: torch.Generator | None = None) -> None:
        """Prepare the parameters for ``stage`` after the previous stage's best state."""

    def start(
        self, hidden: list[torch.Tensor], tokens: list[list[int]], capacity: int
    ) -> tuple[torch.Tensor, Any]:
        """A sequence-reading kind: outputs at each prompt's last position and a decoding cache
        with room for ``capacity`` positions per row."""
        raise NotImplementedError(f"{type(self).__name__} reads one position at a time")

    def step(
        self, cache: Any, x: torch.Tensor, tokens: torch.Tensor, rows: torch.Tensor
    ) -> torch.Tensor:
        """A sequence-reading kind: outputs of one new position of each of ``rows``."""
        raise NotImplementedError(f"{type(self).__name__} reads one position at a time")

    def select(self, cache: Any, rows: torch.Tensor) -> Any:
        """A sequence-reading kind: the decoding cache of ``rows``, in that order (a row may
        repeat: beam search forks its hypotheses)."""
        raise NotImplementedError(f"{type(self).__name__} reads one position at a time")


@dataclass(frozen=True)
class AdapterKind:
    """One adapter kind: its config, its module, and what training needs to know of it."""

    name: str
    config: type[AdapterConfig]
    module: type[AdapterModule]
    # Settings a resumed training run must share with its checkpoint.
    signature: tuple[str, ...]
    stages: tuple[int, ...] = (2,)  # training stages: 1 reconstructs (pema), 2 predicts
    mixture: bool = False  # can train through the mixture with the PLM (--mixture-lambda)

    @property
    def train_options(self) -> tuple[str, ...]:
        """The TrainConfig fields that only some kinds read, which this one does."""
        sequences = ("sequence_batch_size",) if self.module.reads_sequences else ()
        return sequences + (("mixture_lambda",) if self.mixture else ())


KINDS: dict[str, AdapterKind] = {}  # filled by register_kind (data_owner_client.adapter)


def register_kind(kind: AdapterKind) -> None:
    """Make ``kind`` buildable, trainable, loadable and a choice of ``--adapter-kind``."""
    if kind.name in KINDS:
        raise ValueError(f"adapter kind {kind.name!r} is registered twice")
    if kind.config.kind != kind.name:
        raise ValueError(f"{kind.config.__name__}.kind is {kind.config.kind!r}, not {kind.name!r}")
    KINDS[kind.name] = kind
