"""Adapters over the server's representations, their config and on-disk format (DESIGN §5).

Three kinds, all trained through the frozen head and mixed with the PLM the same way:

- ``pema``, the paper's (DESIGN §2): ``A ∈ R^{r×d}`` (Kaiming-uniform), ``B_rct, B_pd ∈ R^{d×r}``
  (zero), dropout on the input, no residual: ``h_rct = s · B_rct A x``, ``h_pd = s · B_pd A x``
  with ``s = alpha / r``; the logits are ``H(h_pd)``.
- ``residual`` (:mod:`data_owner_client.residual`): a zero-initialised low-rank correction added
  to ``norm(x)``; equal to the PLM until trained.
- ``sequence`` (:mod:`data_owner_client.sequence`): a small causal transformer over the whole
  sequence of representations, also added to ``norm(x)``.

A saved adapter is a directory in the spirit of peft: ``adapter_config.json`` (its ``kind``; old
configs without one are ``pema``) plus ``adapter_model.safetensors`` holding exactly the kind's
tensors. No pickle anywhere.
"""

from __future__ import annotations

import dataclasses
import importlib.metadata
import json
import logging
import os
import secrets
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path

import torch
import torch.nn.functional as F
from safetensors import SafetensorError
from safetensors.torch import load, save
from torch import nn

from data_owner_client.residual import ACTIVATIONS, ResidualAdapter, init_lora_a
from data_owner_client.schedule import SCHEDULES
from data_owner_client.sequence import POINTERS, SequenceAdapter
from shared.head import Head

log = logging.getLogger(__name__)

FORMAT = "pema-adapter"
FORMAT_VERSION = 1
CONFIG_FILE = "adapter_config.json"
WEIGHTS_FILE = "adapter_model.safetensors"
KINDS = ("pema", "residual", "sequence")
# Settings `pema-client train` gives a new adapter of each kind unless told otherwise: the
# paper's for pema; for the others, the best on the Bible tuning verses (README, "Quality").
KIND_DEFAULTS: dict[str, dict[str, float | str]] = {
    "pema": {
        "rank": 512,
        "alpha": 1.0,
        "lambda_max": 0.9,
        "schedule": "quadratic",
        "no_repeat_ngram": 0,
    },
    "residual": {
        "rank": 64,
        "alpha": 64.0,
        "lambda_max": 0.5,
        "schedule": "constant",
        "no_repeat_ngram": 0,
    },
    "sequence": {"lambda_max": 0.7, "schedule": "constant", "no_repeat_ngram": 4},
}
TMP_PREFIX = ".tmp-"


class AdapterError(ValueError):
    """An adapter directory that is missing, malformed or inconsistent."""


class AdapterFingerprintError(AdapterError):
    """An adapter trained on a model other than the one being served."""


def _package_version() -> str:
    try:
        return importlib.metadata.version("pema-offsite")
    except importlib.metadata.PackageNotFoundError:  # running from a source tree
        return "0+unknown"


@dataclass
class AdapterConfig:
    """Everything needed to rebuild and apply an adapter: sizes, hyperparameters, provenance."""

    hidden_size: int  # d: the server's representation size
    vocab_size: int  # V: the output head's vocabulary size
    kind: str = "pema"  # pema (the paper's), residual or sequence; see the module docstring
    rank: int = 512  # r: adapter rank (paper default), clamped to hidden_size
    alpha: float = 1.0  # scaling numerator: s = alpha / rank
    dropout: float = 0.2  # dropout probability on the adapter's input
    kappa: float = 0.2  # weight of the reconstruction loss in stage 2
    # Feed the adapter norm(f(c)), the head's final norm of the representation, instead of f(c);
    # it then also reconstructs norm(f(c)). Off is DESIGN §2 as written. On conditions models with
    # massive activations (SmolLM2: a few dimensions in the hundreds) as the paper's released code
    # did, which exported a normalised hidden state.
    input_norm: bool = False
    activation: str = "none"  # residual: none (linear) or gelu between A and B
    width: int = 256  # sequence: width of the side transformer
    layers: int = 2  # sequence: transformer blocks
    heads: int = 4  # sequence: attention heads per block
    token_inputs: bool = True  # sequence: also read the output embedding of each position's token
    copy: bool = True  # sequence: add a gated pointer that copies tokens of the sequence so far
    # sequence: the pointer copies the prompt's token after the attended one ("source"), or the
    # token read there, anywhere in the sequence ("read": the only pointer before "source")
    pointer: str = "source"
    fingerprint: str = ""  # fingerprint of the model whose representations trained the adapter
    model_id: str = ""  # that model's id, for messages
    template: str = "{source}"  # the prompt template the memory was built with
    length_ratio: float | None = None  # target/source token ratio, for Gradual Unrolling horizons
    schedule: str = "quadratic"  # default GU schedule: quadratic (paper), linear or constant
    lambda_max: float = 0.9  # default initial PEMA weight λ_0
    lambda_min: float = 0.0  # default floor of λ over a sequence
    no_repeat_ngram: int = 0  # default repetition guard of generate and serve (0: off)
    package_version: str = field(default_factory=_package_version)  # pema-offsite that wrote it
    format: str = FORMAT  # format tag, checked on load
    format_version: int = FORMAT_VERSION  # bumped on incompatible changes

    def __post_init__(self) -> None:
        if self.hidden_size < 1 or self.vocab_size < 1 or self.rank < 1:
            raise AdapterError("hidden_size, vocab_size and rank must be positive")
        if self.rank > self.hidden_size:
            # A rank above d adds parameters but no capacity: B A has rank at most d.
            log.info("adapter rank %d clamped to hidden size %d", self.rank, self.hidden_size)
            self.rank = self.hidden_size
        self._check_ranges()

    def _check_ranges(self) -> None:
        """Refuse hyperparameters outside their meaningful ranges."""
        if self.kind not in KINDS:
            raise AdapterError(f"adapter kind must be one of {KINDS}, got {self.kind!r}")
        if self.activation not in ACTIVATIONS:
            raise AdapterError(f"activation must be one of {ACTIVATIONS}, got {self.activation!r}")
        if min(self.width, self.layers, self.heads) < 1 or self.width % (2 * self.heads):
            raise AdapterError(
                f"the sequence kind needs a width divisible by 2 × heads, got width {self.width} "
                f"and {self.heads} heads"
            )
        if self.pointer not in POINTERS:
            raise AdapterError(f"pointer must be one of {POINTERS}, got {self.pointer!r}")
        if not 0.0 <= self.dropout < 1.0:
            raise AdapterError(f"dropout must be in [0, 1), got {self.dropout}")
        if not 0.0 <= self.kappa <= 1.0:
            raise AdapterError(f"kappa must be in [0, 1], got {self.kappa}")
        if self.schedule not in SCHEDULES:
            raise AdapterError(f"schedule must be one of {SCHEDULES}, got {self.schedule!r}")
        if self.no_repeat_ngram < 0:
            raise AdapterError(
                f"no_repeat_ngram must be 0 (off) or more, got {self.no_repeat_ngram}"
            )
        if not 0.0 <= self.lambda_min <= self.lambda_max <= 1.0:
            raise AdapterError("need 0 <= lambda_min <= lambda_max <= 1")

    @property
    def scaling(self) -> float:
        """The factor ``s = alpha / rank`` applied to both branches."""
        return self.alpha / self.rank

    def to_json(self) -> str:
        """The config as indented JSON (the content of ``adapter_config.json``)."""
        return json.dumps(dataclasses.asdict(self), indent=2, sort_keys=True) + "\n"

    @classmethod
    def from_json(cls, text: str) -> AdapterConfig:
        """Parse ``adapter_config.json``; unknown keys from newer versions are ignored."""
        data = json.loads(text)
        if not isinstance(data, dict):
            raise AdapterError("adapter config must be a JSON object")
        if data.get("format", FORMAT) != FORMAT:
            raise AdapterError(f"adapter config has format {data['format']!r}, not {FORMAT!r}")
        data.setdefault("pointer", "read")  # written before the source pointer existed
        known = {f.name for f in dataclasses.fields(cls)}
        if unknown := sorted(set(data) - known):
            log.warning("ignoring unknown adapter config keys %s", unknown)
        try:
            return cls(**{k: v for k, v in data.items() if k in known})
        except TypeError as exc:
            raise AdapterError(f"adapter config is incomplete: {exc}") from exc


class PemaAdapter(nn.Module):
    """Shared down-projection ``A`` and two up-projections: ``B_rct`` (reconstruct), ``B_pd``."""

    post_norm = False  # outputs are representations: logits are the whole head's, H(h_pd)

    def __init__(
        self,
        hidden_size: int,
        rank: int,
        alpha: float = 1.0,
        dropout: float = 0.2,
        *,
        generator: torch.Generator | None = None,
    ) -> None:
        super().__init__()
        self.A = nn.Parameter(torch.empty(rank, hidden_size))
        self.B_rct = nn.Parameter(torch.zeros(hidden_size, rank))
        self.B_pd = nn.Parameter(torch.zeros(hidden_size, rank))
        self.dropout = nn.Dropout(dropout)
        self.scaling = alpha / rank
        self.input_norm: Callable[[torch.Tensor], torch.Tensor] | None = None
        self._init_A(generator)

    @classmethod
    def from_config(
        cls,
        config: AdapterConfig,
        head: Head | None = None,
        *,
        generator: torch.Generator | None = None,
    ) -> PemaAdapter:
        """A freshly initialised adapter of the config's shape (``head``: for ``input_norm``)."""
        adapter = cls(
            config.hidden_size, config.rank, config.alpha, config.dropout, generator=generator
        )
        if config.input_norm:
            if head is None:
                raise AdapterError("an adapter with input_norm needs the served model's head")
            adapter.input_norm = head.normalize  # a method, not a submodule: saved nowhere
        return adapter

    def features(self, x: torch.Tensor) -> torch.Tensor:
        """What the adapter reads and reconstructs: ``x``, or ``norm(x)`` with ``input_norm``."""
        return x if self.input_norm is None else self.input_norm(x)

    def _init_A(self, generator: torch.Generator | None) -> None:
        init_lora_a(self.A, generator)

    def encode(self, x: torch.Tensor) -> torch.Tensor:
        """The rank-r code ``A · drop(features(x))``."""
        return F.linear(self.dropout(self.features(x).to(self.A.dtype)), self.A)

    def reconstruct(self, x: torch.Tensor) -> torch.Tensor:
        """``h_rct = s · B_rct A drop(x)``, trained to reproduce ``features(x)``."""
        return self.scaling * F.linear(self.encode(x), self.B_rct)

    def predict(self, x: torch.Tensor) -> torch.Tensor:
        """``h_pd = s · B_pd A drop(x)``, a representation to feed the frozen head."""
        return self.scaling * F.linear(self.encode(x), self.B_pd)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        """Same as :meth:`predict`."""
        return self.predict(x)

    def predict_and_reconstruct(self, x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """``(h_pd, h_rct)`` from one dropout mask and one code, as stage 2 trains them."""
        code = self.encode(x)
        return self.scaling * F.linear(code, self.B_pd), self.scaling * F.linear(code, self.B_rct)

    @torch.no_grad()
    def reset_for_stage2(self, *, generator: torch.Generator | None = None) -> None:
        """Fresh ``A``, zero ``B_pd``; ``B_rct`` keeps its stage-1 values and is frozen."""
        self._init_A(generator)
        self.B_pd.zero_()
        self.B_rct.requires_grad_(False)

    def train_outputs(self, x: torch.Tensor, y: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """The vectors training scores against the labels: every pair's ``h_pd``."""
        return self(x), y


Adapter = PemaAdapter | ResidualAdapter | SequenceAdapter


def build_adapter(
    config: AdapterConfig, head: Head | None = None, *, generator: torch.Generator | None = None
) -> Adapter:
    """A freshly initialised adapter of the config's kind and shape (``head``: the served model's;
    every kind but a plain ``pema`` reads its norm)."""
    if config.kind == "pema":
        return PemaAdapter.from_config(config, head, generator=generator)
    if head is None:
        raise AdapterError(f"a {config.kind} adapter needs the served model's head")
    if config.kind == "residual":
        return ResidualAdapter(
            head,
            config.hidden_size,
            config.rank,
            config.alpha,
            config.dropout,
            config.activation,
            generator=generator,
        )
    with torch.random.fork_rng(devices=[]):  # nn.Linear draws from the global CPU RNG
        if generator is not None:
            seed = int(torch.randint(2**62, (1,), generator=generator))
            torch.random.default_generator.manual_seed(seed)  # not the accelerators' RNGs
        return SequenceAdapter(
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


def adapter_tensors(adapter: Adapter) -> dict[str, torch.Tensor]:
    """The adapter's saved tensors under their file names, detached, contiguous, on the CPU."""
    return {name: t.detach().cpu().contiguous() for name, t in adapter.state_dict().items()}


def write_atomic(target: Path, data: bytes) -> None:
    """Write ``data`` to a temp file beside ``target``, flush it, then rename it over ``target``."""
    # Not mkstemp: its files are private (0600), these should get the usual umask permissions.
    tmp = target.parent / f"{TMP_PREFIX}{os.getpid()}-{secrets.token_hex(4)}-{target.name}"
    try:
        with tmp.open("xb") as f:
            f.write(data)
            f.flush()
            os.fsync(f.fileno())
        os.replace(tmp, target)
    except BaseException:
        tmp.unlink(missing_ok=True)
        raise


def save_adapter(directory: str | Path, adapter: Adapter, config: AdapterConfig) -> Path:
    """Write ``adapter_config.json`` and ``adapter_model.safetensors`` into ``directory``."""
    directory = Path(directory)
    directory.mkdir(parents=True, exist_ok=True)
    tensors = adapter_tensors(adapter)
    _check_tensors(tensors, _config_shapes(config), directory, exact=False)
    metadata = {"format": FORMAT, "format_version": str(FORMAT_VERSION)}
    write_atomic(directory / WEIGHTS_FILE, save(tensors, metadata=metadata))
    # The config goes last: a directory with a config always has matching weights next to it.
    write_atomic(directory / CONFIG_FILE, config.to_json().encode())
    return directory


def load_adapter(
    directory: str | Path,
    *,
    fingerprint: str | None = None,
    head: Head | None = None,
    device: str | torch.device = "cpu",
) -> tuple[Adapter, AdapterConfig]:
    """Load a saved adapter (in eval mode); with ``fingerprint``, refuse one trained elsewhere.

    Every kind but a ``pema`` adapter without ``input_norm`` needs the served model's ``head``.
    """
    directory = Path(directory)
    config = read_adapter_config(directory)
    if fingerprint is not None:
        check_fingerprint(directory, config, fingerprint)
    adapter = build_adapter(config, head)
    tensors = _read_tensors(directory)
    expected = {name: tuple(t.shape) for name, t in adapter.state_dict().items()}
    _check_tensors(tensors, expected, directory)
    adapter.load_state_dict(tensors)
    return adapter.to(device).eval(), config


def read_adapter_config(directory: str | Path) -> AdapterConfig:
    """The config of the adapter saved in ``directory``."""
    directory = Path(directory)
    if not directory.is_dir():
        raise AdapterError(f"no adapter directory at {directory}: train one with pema-client train")
    path = directory / CONFIG_FILE
    if not path.is_file():
        raise AdapterError(f"{directory} has no {CONFIG_FILE}; is it an adapter directory?")
    try:
        return AdapterConfig.from_json(path.read_text())
    except json.JSONDecodeError as exc:
        raise AdapterError(f"{path} is not valid JSON: {exc}") from exc


def check_fingerprint(directory: Path, config: AdapterConfig, fingerprint: str) -> None:
    """Refuse an adapter trained on representations of a model other than ``fingerprint``."""
    if config.fingerprint == fingerprint:
        return
    trained_on = config.model_id or "an unnamed model"
    raise AdapterFingerprintError(
        f"adapter at {directory} was trained on {trained_on} (fingerprint {config.fingerprint!r}), "
        f"but the server serves fingerprint {fingerprint!r}: use the server that hosts the model "
        "it was trained on, or train a new adapter against this one"
    )


def _read_tensors(directory: Path) -> dict[str, torch.Tensor]:
    """The tensors of ``adapter_model.safetensors``."""
    path = directory / WEIGHTS_FILE
    if not path.is_file():
        raise AdapterError(f"{directory} has a config but no {WEIGHTS_FILE}: save it again")
    try:
        tensors = load(path.read_bytes())
    except SafetensorError as exc:
        raise AdapterError(f"{path} is not a valid safetensors file: {exc}") from exc
    return tensors


def _config_shapes(config: AdapterConfig) -> dict[str, tuple[int, ...]]:
    """The shapes of the tensors that the config's sizes fix."""
    d, r, w = config.hidden_size, config.rank, config.width
    if config.kind == "pema":
        return {"A": (r, d), "B_pd": (d, r), "B_rct": (d, r)}
    if config.kind == "residual":
        return {"A": (r, d), "B": (d, r)}
    last = f"blocks.{config.layers - 1}.qkv.weight"
    return {"inputs.weight": (w, d), "output.weight": (d, w), last: (3 * w, w)}


def _check_tensors(
    tensors: dict[str, torch.Tensor],
    expected: dict[str, tuple[int, ...]],
    where: Path,
    exact: bool = True,
) -> None:
    """The expected tensor names (exactly these, with ``exact``), each of its expected shape."""
    if sorted(tensors) != sorted(expected) if exact else not set(expected) <= set(tensors):
        raise AdapterError(f"{where} holds tensors {sorted(tensors)}, expected {sorted(expected)}")
    for name, shape in expected.items():
        if tuple(tensors[name].shape) != shape:
            raise AdapterError(
                f"adapter {name} at {where} has shape {tuple(tensors[name].shape)}, but its "
                f"config needs {shape}"
            )
