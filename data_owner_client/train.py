"""Adapter training over an external memory (DESIGN §2), through the frozen head.

The ``pema`` kind trains in two stages: stage 1 trains ``A, B_rct`` to reconstruct the memory's
keys; stage 2 starts from a fresh ``A`` and a zero ``B_pd``, keeps ``B_rct`` frozen and minimises
``κ · MSE(s · B_rct A x, x) + (1 − κ) · CE(H(s · B_pd A x), y)``. The ``residual`` and
``sequence`` kinds train only the prediction stage (stage 2), on cross-entropy: ``residual`` on
the memory's pairs, ``sequence`` on its whole examples (padded batches, target positions scored).
Each stage shuffles, validates, stops early and restores its best state. Runs resume from the
last validation with bit-identical results, and run data-parallel under ``torchrun`` (DDP).
"""

from __future__ import annotations

import dataclasses
import hashlib
import io
import itertools
import json
import logging
import math
import os
import time
from collections.abc import Callable, Iterable, Iterator, Sized
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Protocol

import torch
import torch.distributed as dist
import torch.nn.functional as F
from rich.progress import (
    BarColumn,
    MofNCompleteColumn,
    Progress,
    TextColumn,
    TimeElapsedColumn,
)
from torch import nn
from torch.nn.parallel import DistributedDataParallel
from torch.utils.checkpoint import checkpoint

from data_owner_client.adapter import (
    Adapter,
    AdapterConfig,
    PemaAdapter,
    build_adapter,
    save_adapter,
    write_atomic,
)
from data_owner_client.memory import Memory
from data_owner_client.sequence import SequenceAdapter
from shared.head import Head

log = logging.getLogger(__name__)

LOG_FILE = "train_log.jsonl"
PLOT_FILE = "loss_curves.png"
CHECKPOINT_FILE = "trainer_state.pt"
# Default bound on one cross-entropy chunk's logits: 2**24 float32 values (64 MiB).
CE_CHUNK_ELEMENTS = 2**24
# Adapter settings a resumed run must share with the run that wrote the checkpoint, per kind
# (pema's as the first version wrote them, so its older checkpoints still resume).
ADAPTER_SIGNATURE = {
    "pema": ("hidden_size", "vocab_size", "rank", "alpha", "dropout", "kappa", "fingerprint"),
    "residual": (
        "kind", "hidden_size", "vocab_size", "rank", "alpha", "dropout", "activation",
        "fingerprint",
    ),
    "sequence": (
        "kind", "hidden_size", "vocab_size", "width", "layers", "heads", "dropout",
        "token_inputs", "copy", "fingerprint",
    ),
}  # fmt: skip
RUNTIME_ONLY = ("device", "resume", "checkpoint_dir", "log_every_steps")

Batch = tuple[torch.Tensor, ...]


class BatchSource(Protocol):
    """Memory pairs or examples in batches; :class:`data_owner_client.memory.Memory` (pairs) and
    its :meth:`~data_owner_client.memory.Memory.sequences` view (examples) are two.

    ``batches`` yields (keys float32 [b, d], values int64 [b]) for one epoch, or for the sequence
    kind (keys [B, T, d], tokens [B, T], labels [B, T]). The order must depend
    on (seed, epoch) alone, ranks must get disjoint pairs, and every rank the same number of
    batches (training also stops all ranks at the first one that runs out).
    """

    def batches(
        self,
        batch_size: int,
        *,
        seed: int,
        epoch: int,
        rank: int = 0,
        world_size: int = 1,
        shuffle: bool = True,
    ) -> Iterable[Batch]: ...


@dataclass
class TrainConfig:
    """Optimisation settings of both stages (paper defaults where the paper gives one)."""

    lr: float = 1e-3  # Adam learning rate, both stages
    stage1_batch_size: int = 20480  # pairs per step in stage 1, over all ranks
    stage2_batch_size: int = 2048  # pairs per step in stage 2, over all ranks
    sequence_batch_size: int = 16  # examples per step of the sequence kind, over all ranks
    stage1_epochs: int = 20  # most epochs of stage 1; early stopping usually ends it sooner
    stage2_epochs: int = 20  # most epochs of stage 2
    patience: int = 3  # validations without improvement before a stage stops
    min_delta: float = 0.0  # a validation loss must beat the best by more than this
    val_every_steps: int | None = None  # validate every this many steps; None: after each epoch
    val_batch_size: int = 4096  # pairs per validation batch and rank (no gradients kept)
    ce_chunk: int | None = None  # rows per CE chunk; None: keep a chunk's logits ≤ 2**24 values
    log_every_steps: int = 10  # steps between training-loss records in the JSONL log
    seed: int = 0  # seeds the initialisation, the shuffling and dropout
    device: str = "auto"  # "auto" picks cuda, then mps, then cpu
    checkpoint_dir: str | None = None  # where resumable state goes; None: OUT_DIR/checkpoint
    resume: bool = False  # continue from the checkpoint when one exists

    def __post_init__(self) -> None:
        sizes = (
            self.stage1_batch_size,
            self.stage2_batch_size,
            self.sequence_batch_size,
            self.val_batch_size,
        )
        counts = (self.patience, self.stage1_epochs, self.stage2_epochs, self.log_every_steps)
        if min(sizes) < 1 or min(counts) < 1:
            raise ValueError("batch sizes, epochs, patience and log_every_steps must be positive")
        if self.val_every_steps is not None and self.val_every_steps < 1:
            raise ValueError("val_every_steps must be positive (or None for once per epoch)")

    def batch_size(self, stage: int) -> int:
        """The global batch size of ``stage``."""
        return self.stage1_batch_size if stage == 1 else self.stage2_batch_size

    def epochs(self, stage: int) -> int:
        """The most epochs of ``stage``."""
        return self.stage1_epochs if stage == 1 else self.stage2_epochs


@dataclass
class TrainResult:
    """What a finished run produced."""

    adapter: Adapter  # the final adapter (best stage-2 state), in eval mode
    config: AdapterConfig  # its config, as saved
    out_dir: Path  # where the adapter, log and plot were written
    stage1_val_loss: float  # best validation reconstruction MSE of stage 1 (pema; else inf)
    stage2_val_loss: float  # best validation joint loss of stage 2
    val_accuracy: float  # next-token accuracy on the validation pairs at that best state
    steps: int  # optimizer steps over both stages


# ---- devices and processes -------------------------------------------------------------------


@dataclass(frozen=True)
class World:
    """This process's place in the (possibly single-process) training job."""

    rank: int = 0  # this process's rank
    size: int = 1  # number of processes

    @property
    def main(self) -> bool:
        """Rank 0 writes files, logs and progress."""
        return self.rank == 0


def current_world() -> World:
    """The initialised process group, or a single process."""
    if dist.is_available() and dist.is_initialized():
        return World(dist.get_rank(), dist.get_world_size())
    return World()


def init_distributed() -> World:
    """Join the process group ``torchrun`` describes (nccl on CUDA, else gloo); no-op without it."""
    if "RANK" not in os.environ or not dist.is_available() or dist.is_initialized():
        return current_world()
    cuda = torch.cuda.is_available()
    if cuda:
        torch.cuda.set_device(int(os.environ.get("LOCAL_RANK", "0")))
    dist.init_process_group("nccl" if cuda else "gloo")
    return current_world()


def resolve_device(name: str = "auto") -> torch.device:
    """``"auto"``: this process's CUDA device, else MPS, else CPU; anything else as given."""
    if name != "auto":
        return torch.device(name)
    if torch.cuda.is_available():
        return torch.device("cuda", torch.cuda.current_device())
    if torch.backends.mps.is_available():
        return torch.device("mps")
    return torch.device("cpu")


def _all_reduce(tensor: torch.Tensor, world: World, op: Any = None) -> torch.Tensor:
    if world.size > 1:
        dist.all_reduce(tensor, op=op or dist.ReduceOp.SUM)
    return tensor


def _in_lockstep(batches: Iterator[Batch], world: World, device: torch.device) -> Iterator[Batch]:
    """Stop every rank as soon as one runs out, so DDP's collectives never wait forever."""
    if world.size == 1:
        yield from batches
        return
    while True:
        batch = next(batches, None)
        flag = torch.tensor([int(batch is not None)], device=device)
        if not _all_reduce(flag, world, dist.ReduceOp.MIN).item():
            return
        assert batch is not None
        yield batch


def _derived_seed(seed: int, purpose: str) -> int:
    """A seed for one purpose, independent of the others drawn from the same run seed."""
    digest = hashlib.sha256(f"{seed}:{purpose}".encode()).digest()
    return int.from_bytes(digest[:8], "little") >> 1


def _generator(seed: int, purpose: str) -> torch.Generator:
    return torch.Generator().manual_seed(_derived_seed(seed, purpose))


# ---- losses ----------------------------------------------------------------------------------


def ce_chunk_rows(vocab_size: int, elements: int = CE_CHUNK_ELEMENTS) -> int:
    """Rows per chunk so that one chunk's logits hold at most ``elements`` values."""
    return max(1, elements // vocab_size)


Logits = Callable[[torch.Tensor], torch.Tensor]


def _ce_sum(head: Logits, h: torch.Tensor, y: torch.Tensor) -> torch.Tensor:
    return F.cross_entropy(head(h), y, reduction="sum")


def chunked_cross_entropy(
    head: Logits, h: torch.Tensor, y: torch.Tensor, chunk_rows: int
) -> torch.Tensor:
    """Mean ``CE(head(h), y)`` with one chunk's ``[chunk_rows, V]`` logits alive at a time.

    Each chunk runs under activation checkpointing, so backward recomputes its logits instead of
    keeping all ``n × V`` of them from the forward pass.
    """
    parts = [
        checkpoint(_ce_sum, head, h_part, y_part, use_reentrant=False)
        for h_part, y_part in zip(h.split(chunk_rows), y.split(chunk_rows), strict=True)
    ]
    return torch.stack(parts).sum() / len(y)


class _StageModel(nn.Module):
    """The adapter's outputs that one stage trains on: the module DDP wraps.

    Stage 1 (pema): ``(h_rct,)``. Stage 2: ``(vectors, labels)`` of the scored positions, then
    ``h_rct`` for pema, from the same dropout mask.
    """

    def __init__(self, adapter: Adapter, stage: int) -> None:
        super().__init__()
        self.adapter, self.stage = adapter, stage

    def forward(self, *batch: torch.Tensor) -> tuple[torch.Tensor, ...]:
        adapter = self.adapter
        if not isinstance(adapter, PemaAdapter):
            return adapter.train_outputs(*batch)
        x, y = batch
        if self.stage == 1:
            return (adapter.reconstruct(x),)
        h_pd, h_rct = adapter.predict_and_reconstruct(x)
        return h_pd, y, h_rct


def _freeze_for_stage(adapter: Adapter, stage: int) -> list[nn.Parameter]:
    """Leave trainable exactly what ``stage`` trains (DDP then ignores the rest)."""
    if isinstance(adapter, PemaAdapter):
        adapter.A.requires_grad_(True)
        adapter.B_rct.requires_grad_(stage == 1)
        adapter.B_pd.requires_grad_(stage == 2)
    return [p for p in adapter.parameters() if p.requires_grad]


def logits_of(adapter: Adapter, head: nn.Module) -> Logits:
    """What turns the adapter's outputs into logits: the whole head, or its projection alone
    for the kinds whose outputs live after the final norm."""
    if not adapter.post_norm:
        return head
    if not isinstance(head, Head):
        raise TypeError(f"a {type(adapter).__name__} needs the served model's Head")
    return head.project


def _stage_loss(
    outputs: tuple[torch.Tensor, ...],
    target: torch.Tensor | None,
    head: Logits,
    kappa: float,
    chunk_rows: int,
) -> dict[str, torch.Tensor]:
    """The stage's loss under ``"loss"`` and its parts (pema's stage 2: ``"mse"``, ``"ce"``).

    ``target`` is what ``h_rct`` reconstructs (pema: the adapter's features of the keys).
    """
    if len(outputs) == 2:
        ce = chunked_cross_entropy(head, outputs[0], outputs[1], chunk_rows)
        return {"loss": ce, "ce": ce}
    assert target is not None, "pema reconstructs its features"
    mse = F.mse_loss(outputs[-1], target)
    if len(outputs) == 1:
        return {"loss": mse}
    ce = chunked_cross_entropy(head, outputs[0], outputs[1], chunk_rows)
    return {"loss": kappa * mse + (1.0 - kappa) * ce, "mse": mse, "ce": ce}


# ---- evaluation ------------------------------------------------------------------------------


@torch.no_grad()
def _eval_sums(
    adapter: Adapter,
    head: Logits,
    batches: Iterable[Batch],
    device: torch.device,
    chunk_rows: int,
    stage: int,
) -> torch.Tensor:
    """float64 sums over all scored positions: squared error and its elements (pema), CE,
    correct predictions, rows."""
    sums = torch.zeros(5, dtype=torch.float64)
    model = _StageModel(adapter, stage)
    for batch in batches:
        batch = tuple(t.to(device) for t in batch)
        outputs = model(*batch)
        sq = elements = ce = correct = 0.0
        rows = len(batch[0])
        if stage == 2:
            vectors, y = outputs[0], outputs[1]
            for part, y_part in zip(vectors.split(chunk_rows), y.split(chunk_rows), strict=True):
                logits = head(part)
                ce += F.cross_entropy(logits, y_part, reduction="sum").item()
                correct += (logits.argmax(-1) == y_part).sum().item()
            rows = len(y)
        if isinstance(adapter, PemaAdapter):
            target = adapter.features(batch[0]).float()
            sq, elements = (outputs[-1].float() - target).pow(2).sum().item(), target.numel()
        sums += torch.tensor([sq, elements, ce, correct, rows], dtype=torch.float64)
    return sums


def evaluate_accuracy(
    adapter: Adapter,
    head: nn.Module,
    source: BatchSource,
    *,
    batch_size: int | None = None,
    device: str | torch.device | None = None,
) -> float:
    """Next-token accuracy of the adapter's own prediction over every scored position of
    ``source`` (pairs, or examples for the sequence kind: a memory is read as such; ``batch_size``
    counts those, default 4096 pairs or 16 examples).

    The adapter and head are moved to ``device`` (default: the adapter's) in place.
    """
    sequences = isinstance(adapter, SequenceAdapter)
    source = _examples(source) if sequences else source
    batch_size = batch_size or (16 if sequences else 4096)
    device = torch.device(device) if device is not None else next(adapter.parameters()).device
    adapter, head = adapter.to(device), head.to(device)
    training = adapter.training
    adapter.eval()
    batches = source.batches(batch_size, seed=0, epoch=0, shuffle=False)
    chunk = ce_chunk_rows(_vocab_size(head))
    sums = _eval_sums(adapter, logits_of(adapter, head), batches, device, chunk, stage=2)
    adapter.train(training)
    if sums[4] == 0:
        raise ValueError("the evaluation source yielded no pairs")
    return float(sums[3] / sums[4])


def _check_head(head: nn.Module, config: AdapterConfig) -> None:
    """Refuse a head whose vocabulary differs from the adapter config's."""
    weight = getattr(head, "output_weight", None)
    if weight is not None and weight.shape[0] != config.vocab_size:
        raise ValueError(
            f"the head has {weight.shape[0]} output tokens but the adapter config says "
            f"vocab_size={config.vocab_size}: take both from the same server"
        )


def _vocab_size(head: nn.Module) -> int:
    """V of a head that exposes ``output_weight`` (shared.head.Head), else a generous guess."""
    weight = getattr(head, "output_weight", None)
    return int(weight.shape[0]) if weight is not None else 2**16


# ---- logs, checkpoints, plots ----------------------------------------------------------------


class _JsonlLog:
    """Append-only JSONL records, written by rank 0; a resume cuts it back to the checkpoint."""

    def __init__(self, path: Path, enabled: bool, keep_bytes: int) -> None:
        self.path, self.enabled = path, enabled
        if enabled:
            with self.path.open("ab") as f:
                f.truncate(keep_bytes)

    def write(self, record: dict[str, Any]) -> None:
        if self.enabled:
            with self.path.open("a") as f:
                f.write(json.dumps(record) + "\n")

    def size(self) -> int:
        return self.path.stat().st_size if self.enabled else 0


def read_log(path: str | Path) -> list[dict[str, Any]]:
    """The records of a ``train_log.jsonl``."""
    return [json.loads(line) for line in Path(path).read_text().splitlines() if line.strip()]


def plot_loss_curves(log_path: str | Path, png_path: str | Path) -> Path:
    """Draw training and validation curves of both stages (two panels) into a PNG."""
    from matplotlib.figure import Figure  # imported here: only plotting needs matplotlib

    records = read_log(log_path)
    stages = sorted({r["stage"] for r in records}) or [2]
    fig = Figure(figsize=(5.5 * len(stages), 4))
    titles = {1: "stage 1: reconstruction MSE", 2: "stage 2: κ·MSE + (1−κ)·CE"}
    if stages == [2]:  # a kind trained on cross-entropy alone
        titles[2] = "cross-entropy"
    axes = fig.subplots(1, len(stages), squeeze=False)[0]
    for ax, stage in zip(axes, stages, strict=True):
        title = titles[stage]
        for kind, key, style in (("train", "loss", "-"), ("val", "val_loss", "o-")):
            points = [
                (r["global_step"], r[key])
                for r in records
                if (r["stage"], r["kind"]) == (stage, kind)
            ]
            if points:
                ax.plot(
                    *zip(*points, strict=True),
                    style,
                    label="train" if kind == "train" else "validation",
                )
        ax.set(title=title, xlabel="step", ylabel="loss", yscale="log")
        ax.legend()
    fig.tight_layout()
    buffer = io.BytesIO()
    fig.savefig(buffer, format="png", dpi=100)
    write_atomic(Path(png_path), buffer.getvalue())
    return Path(png_path)


def _signature(adapter_config: AdapterConfig, config: TrainConfig, world: World) -> dict[str, Any]:
    """Settings that must not change between a checkpoint and its resumption."""
    kind = adapter_config.kind
    adapter = {k: getattr(adapter_config, k) for k in ADAPTER_SIGNATURE[kind]}
    unused = () if kind == "sequence" else ("sequence_batch_size",)
    skip = RUNTIME_ONLY + unused
    train = {k: v for k, v in dataclasses.asdict(config).items() if k not in skip}
    return {"adapter": adapter, "train": train, "world_size": world.size}


def _differences(saved: dict[str, Any], expected: dict[str, Any]) -> list[str]:
    """``name saved → now`` for each setting that differs between two signatures."""

    def flat(signature: dict[str, Any]) -> dict[str, Any]:
        groups = ("adapter", "train")
        settings = {f"{g}.{k}": v for g in groups for k, v in signature[g].items()}
        return {**settings, "world_size": signature["world_size"]}

    before, now = flat(saved), flat(expected)
    return [
        f"{k} {before.get(k)!r} → {now.get(k)!r}"
        for k in sorted(before.keys() | now.keys())
        if before.get(k) != now.get(k)
    ]


@dataclass
class _State:
    """Where a run stands; saved in every checkpoint."""

    stage: int = 1  # the stage being trained
    epoch: int = 0  # epochs finished in this stage
    step: int = 0  # batches done in the current epoch
    global_step: int = 0  # optimizer steps over both stages
    since_val: int = 0  # steps since the last validation
    best_loss: float = math.inf  # best validation loss of this stage
    bad: int = 0  # validations in a row without improvement
    best_metrics: dict[str, float] = field(default_factory=dict)  # metrics at the best validation
    stage1_best: float = math.inf  # best validation loss of stage 1, once it is over
    elapsed: float = 0.0  # seconds spent training before this process started
    log_bytes: int = 0  # length of the JSONL log when the checkpoint was written


# ---- the trainer -----------------------------------------------------------------------------


class _Trainer:
    """One run: both stages over a memory, with validation, early stopping and checkpoints."""

    def __init__(
        self,
        adapter_config: AdapterConfig,
        sources: tuple[BatchSource, BatchSource],
        head: nn.Module,
        out_dir: Path,
        config: TrainConfig,
        progress: bool,
    ) -> None:
        self.adapter_config, self.config, self.out_dir = adapter_config, config, out_dir
        self.train_source, self.val_source = sources
        self.world, self.device = current_world(), resolve_device(config.device)
        _check_head(head, adapter_config)
        # The head is frozen and moved to the training device in place.
        self.head = head.to(self.device).eval().requires_grad_(False)
        self.chunk_rows = config.ce_chunk or ce_chunk_rows(adapter_config.vocab_size)
        ckpt_dir = Path(config.checkpoint_dir) if config.checkpoint_dir else out_dir / "checkpoint"
        self.checkpoint_path = ckpt_dir / CHECKPOINT_FILE
        self.pema = adapter_config.kind == "pema"
        self.state = _State(stage=1 if self.pema else 2)  # the other kinds only predict
        self.best_state: dict[str, torch.Tensor] | None = None
        self.windows = {"log": _Mean(), "val": _Mean()}
        self.bar = _progress_bar(progress and self.world.main)

    # -- set-up --

    def start(self) -> None:
        """Build a fresh run, or continue the checkpoint when asked to and one exists."""
        torch.manual_seed(_derived_seed(self.config.seed, f"dropout:{self.world.rank}"))
        init = _generator(self.config.seed, "stage1")
        head = self.head if isinstance(self.head, Head) else None
        self.adapter = build_adapter(self.adapter_config, head, generator=init).to(self.device)
        self.logits = logits_of(self.adapter, self.head)
        saved = self._load_checkpoint() if self.config.resume else None
        if saved is not None:
            self._restore(saved)
        self._build_stage(optimizer_state=saved["optimizer"] if saved else None)
        self.log = _JsonlLog(self.out_dir / LOG_FILE, self.world.main, self.state.log_bytes)
        self.t0 = time.monotonic() - self.state.elapsed

    def _build_stage(self, optimizer_state: dict[str, Any] | None = None) -> None:
        """Freeze for the current stage, wrap for DDP, make the stage's optimizer."""
        params = _freeze_for_stage(self.adapter, self.state.stage)
        model: nn.Module = _StageModel(self.adapter, self.state.stage)
        if self.world.size > 1:
            ids = [self.device.index] if self.device.type == "cuda" else None
            model = DistributedDataParallel(model, device_ids=ids)
        self.model = model
        self.optimizer = torch.optim.Adam(params, lr=self.config.lr)
        if optimizer_state is not None:
            self.optimizer.load_state_dict(optimizer_state)

    def _load_checkpoint(self) -> dict[str, Any] | None:
        """The saved run state, checked against this run's settings; None when there is none."""
        if not self.checkpoint_path.is_file():
            log.info("no checkpoint at %s; starting from scratch", self.checkpoint_path)
            return None
        saved = torch.load(self.checkpoint_path, map_location="cpu", weights_only=True)
        expected = _signature(self.adapter_config, self.config, self.world)
        if saved["signature"] != json.dumps(expected, sort_keys=True):
            differ = _differences(json.loads(saved["signature"]), expected)
            raise ValueError(
                f"checkpoint {self.checkpoint_path} was written with other settings "
                f"({'; '.join(differ)}); resume with the same settings and number of processes, "
                "or start over without resume"
            )
        log.info("resuming from %s (stage %d)", self.checkpoint_path, saved["state"]["stage"])
        return saved

    def _restore(self, saved: dict[str, Any]) -> None:
        """Adapter, best state, run state and this rank's RNG from a checkpoint."""
        self.adapter.load_state_dict(saved["adapter"])
        self.best_state = saved["best_state"]
        self.state = _State(**saved["state"])
        torch.set_rng_state(saved["rng"][self.world.rank])
        if saved["device_rng"] is not None:
            _set_device_rng_state(self.device, saved["device_rng"][self.world.rank])

    # -- the stages --

    def run(self) -> None:
        """Stage 1 (unless a resumed run is past it), then stage 2."""
        if self.state.stage == 1:
            self._run_stage()
            self._enter_stage2()
        self._run_stage()
        self._restore_best()

    def _run_stage(self) -> None:
        """Epochs until the limit or early stopping, then a last validation if one is due."""
        stage, config = self.state.stage, self.config
        self.task = self.bar.add_task(self._stage_name(), total=None, loss="", val="")
        while self.state.epoch < config.epochs(stage) and self.state.bad < config.patience:
            self._run_epoch()
        if self.state.since_val and self.state.bad < config.patience:
            self._validate()
        self.bar.remove_task(self.task)

    def _run_epoch(self) -> None:
        """One epoch, or its rest after a resume; validations as configured."""
        state, config = self.state, self.config
        skip = state.step  # batches a resumed run already trained on
        self._reset_bar()
        for batch in _in_lockstep(self._epoch_batches(skip), self.world, self.device):
            self._train_step(batch)
            self._after_step()
            if config.val_every_steps and state.since_val >= config.val_every_steps:
                self._validate()
                if state.bad >= config.patience:
                    return
        if state.step == 0:
            raise ValueError(
                f"the training memory yielded no batches of {self._local_batch()} "
                f"{'examples' if self._sequences else 'pairs'}: "
                "use a smaller batch size or a larger memory"
            )
        state.epoch, state.step = state.epoch + 1, 0
        if config.val_every_steps is None:
            self._validate()

    def _epoch_batches(self, skip: int) -> Iterator[Batch]:
        """This rank's batches of the current epoch, the first ``skip`` left out."""
        batches = self.train_source.batches(
            self._local_batch(),
            seed=self.config.seed,
            epoch=self.state.epoch,
            rank=self.world.rank,
            world_size=self.world.size,
            shuffle=True,
        )
        return itertools.islice(iter(batches), skip, None)

    @property
    def _sequences(self) -> bool:
        """Batches are whole examples (the sequence kind), not pairs."""
        return self.adapter_config.kind == "sequence"

    def _stage_name(self) -> str:
        return f"stage {self.state.stage}" if self.pema else "train"

    def _local_batch(self) -> int:
        """This rank's share of the stage's global batch."""
        whole = self.config.batch_size(self.state.stage)
        if self._sequences:
            whole = self.config.sequence_batch_size
        return max(1, whole // self.world.size)

    def _train_step(self, batch: Batch) -> None:
        """One optimizer step on one batch."""
        batch = tuple(t.to(self.device, non_blocking=True) for t in batch)
        x = batch[0]
        if x.shape[-1] != self.adapter_config.hidden_size:
            raise ValueError(
                f"memory keys have size {x.shape[-1]} but the adapter expects "
                f"{self.adapter_config.hidden_size}: was the memory built on another model?"
            )
        outputs = self.model(*batch)
        # What h_rct reconstructs (pema only).
        target = self.adapter.features(x) if isinstance(self.adapter, PemaAdapter) else None
        kappa = self.adapter_config.kappa
        losses = _stage_loss(outputs, target, self.logits, kappa, self.chunk_rows)
        loss = losses["loss"]
        if self._sequences and self.world.size > 1:
            # A rank's mean is over its own target tokens, which differ between ranks: weigh it
            # by its share, so DDP's mean of the gradients is that of the global batch's mean.
            count = torch.tensor([float(len(outputs[1]))], device=self.device)
            total = _all_reduce(count.clone(), self.world)
            loss = loss * count * self.world.size / total
        self.optimizer.zero_grad(set_to_none=True)
        loss.backward()
        self.optimizer.step()
        for window in self.windows.values():
            window.add(losses)

    def _after_step(self) -> None:
        """Count the step; log and show the training loss every ``log_every_steps``."""
        state = self.state
        state.step, state.global_step, state.since_val = (
            state.step + 1,
            state.global_step + 1,
            state.since_val + 1,
        )
        self.bar.advance(self.task)
        if state.global_step % self.config.log_every_steps == 0:
            means = self.windows["log"].pop()
            self.log.write(self._record("train", means))
            self.bar.update(self.task, loss=f"loss {means['loss']:.4g}")

    def _enter_stage2(self) -> None:
        """Restore stage 1's best state, then re-initialise ``A`` and ``B_pd`` for stage 2."""
        self._restore_best()
        assert isinstance(self.adapter, PemaAdapter), "only the pema kind has two stages"
        self.adapter.reset_for_stage2(generator=_generator(self.config.seed, "stage2"))
        state = self.state
        self.state = _State(stage=2, global_step=state.global_step, stage1_best=state.best_loss)
        self.best_state = None
        self._build_stage()

    def _restore_best(self) -> None:
        if self.best_state is None:
            raise RuntimeError(f"stage {self.state.stage} ended without a validation")
        self.adapter.load_state_dict(self.best_state)

    # -- validation --

    def _validate(self) -> None:
        """Validate, track the best state and early stopping, log, and write a checkpoint."""
        metrics = self._val_metrics()
        state = self.state
        if metrics["val_loss"] < state.best_loss - self.config.min_delta:
            state.best_loss, state.bad, state.best_metrics = metrics["val_loss"], 0, metrics
            self.best_state = {k: v.detach().clone() for k, v in self.adapter.state_dict().items()}
        else:
            state.bad += 1
        state.since_val = 0
        train_means = self.windows["val"].pop()
        self.log.write(self._record("val", {**train_means, **metrics}))
        self.bar.update(self.task, val=f"val {metrics['val_loss']:.4g}")
        self._save_checkpoint()

    def _val_metrics(self) -> dict[str, float]:
        """Validation loss of the current stage (and its parts), summed over all ranks."""
        stage2 = self.state.stage == 2
        size = self.config.sequence_batch_size if self._sequences else self.config.val_batch_size
        every = self.val_source.batches(size, seed=self.config.seed, epoch=0, shuffle=False)
        # Every pair counts, the remainder batches too (no lockstep needed without gradients):
        # each rank takes every world-size-th batch of the whole set.
        batches = itertools.islice(every, self.world.rank, None, self.world.size)
        self.adapter.eval()
        stage = self.state.stage
        sums = _eval_sums(self.adapter, self.logits, batches, self.device, self.chunk_rows, stage)
        self.adapter.train()
        sq, elements, ce, correct, rows = _all_reduce(sums.to(self.device), self.world).tolist()
        if rows == 0:
            raise ValueError("the validation memory yielded nothing to score: give it some data")
        if not self.pema:
            return {"val_loss": ce / rows, "val_ce": ce / rows, "val_acc": correct / rows}
        mse = sq / elements
        if not stage2:
            return {"val_loss": mse, "val_mse": mse}
        kappa = self.adapter_config.kappa
        loss = kappa * mse + (1.0 - kappa) * ce / rows
        return {"val_loss": loss, "val_mse": mse, "val_ce": ce / rows, "val_acc": correct / rows}

    def _record(self, kind: str, values: dict[str, float]) -> dict[str, Any]:
        """One JSONL record: where the run is, the values, the learning rate and the time."""
        state = self.state
        where = {"kind": kind, "stage": state.stage, "epoch": state.epoch, "step": state.step}
        clock = {"lr": self.optimizer.param_groups[0]["lr"], "time": self._elapsed()}
        return {**where, "global_step": state.global_step, **values, **clock}

    def _elapsed(self) -> float:
        return round(time.monotonic() - self.t0, 3)

    def _save_checkpoint(self) -> None:
        """Write the whole run state atomically (rank 0; every rank contributes its RNG)."""
        rng = _gather(torch.get_rng_state(), self.world, self.device)
        local_device_rng = _device_rng_state(self.device)
        device_rng = None
        if local_device_rng is not None:
            device_rng = _gather(local_device_rng, self.world, self.device)
        if not self.world.main:
            return
        self.state.elapsed, self.state.log_bytes = self._elapsed(), self.log.size()
        signature = _signature(self.adapter_config, self.config, self.world)
        saved = {
            "signature": json.dumps(signature, sort_keys=True),
            "state": dataclasses.asdict(self.state),
            "adapter": {k: v.detach().cpu() for k, v in self.adapter.state_dict().items()},
            "best_state": _to_cpu(self.best_state),
            "optimizer": self.optimizer.state_dict(),
            "rng": rng,
            "device_rng": device_rng,
        }
        buffer = io.BytesIO()
        torch.save(saved, buffer)
        self.checkpoint_path.parent.mkdir(parents=True, exist_ok=True)
        write_atomic(self.checkpoint_path, buffer.getvalue())

    # -- progress --

    def _reset_bar(self) -> None:
        """Point the stage's bar at the current epoch."""
        epochs = self.config.epochs(self.state.stage)
        total = _steps_per_epoch(self.train_source, self._local_batch(), self.world.size)
        description = f"{self._stage_name()} epoch {self.state.epoch + 1}/{epochs}"
        self.bar.reset(self.task, total=total, completed=self.state.step, description=description)


class _Mean:
    """Running means of loss tensors, kept on the device until read (no sync per step)."""

    def __init__(self) -> None:
        self.sums: dict[str, torch.Tensor] = {}
        self.count = 0

    def add(self, values: dict[str, torch.Tensor]) -> None:
        for key, value in values.items():
            previous = self.sums.get(key)
            self.sums[key] = value.detach() if previous is None else previous + value.detach()
        self.count += 1

    def pop(self) -> dict[str, float]:
        means = {k: float(v) / self.count for k, v in self.sums.items()} if self.count else {}
        self.sums, self.count = {}, 0
        return means


def _gather(tensor: torch.Tensor, world: World, device: torch.device) -> list[torch.Tensor]:
    """Every rank's copy of ``tensor`` (an RNG state, same size on all ranks), on the CPU."""
    if world.size == 1:
        return [tensor.cpu()]
    local = tensor.to(device)  # nccl gathers CUDA tensors only
    gathered = [torch.empty_like(local) for _ in range(world.size)]
    dist.all_gather(gathered, local)
    return [t.cpu() for t in gathered]


def _device_rng_state(device: torch.device) -> torch.Tensor | None:
    """The RNG state of an accelerator (dropout draws from it there), None on the CPU."""
    if device.type == "cuda":
        return torch.cuda.get_rng_state(device)
    if device.type == "mps":
        return torch.mps.get_rng_state()
    return None


def _set_device_rng_state(device: torch.device, state: torch.Tensor) -> None:
    if device.type == "cuda":
        torch.cuda.set_rng_state(state, device)
    elif device.type == "mps":
        torch.mps.set_rng_state(state)


def _to_cpu(state: dict[str, torch.Tensor] | None) -> dict[str, torch.Tensor] | None:
    return None if state is None else {k: v.cpu() for k, v in state.items()}


def _steps_per_epoch(source: BatchSource, batch_size: int, world_size: int) -> int | None:
    """Batches per rank and epoch, when the source can tell."""
    num_batches = getattr(source, "num_batches", None)
    if callable(num_batches):
        return int(num_batches(batch_size, world_size))
    if isinstance(source, Sized):
        return math.ceil(len(source) / batch_size) // world_size
    return None


def _progress_bar(enabled: bool) -> Progress:
    return Progress(
        TextColumn("{task.description}"),
        BarColumn(),
        MofNCompleteColumn(),
        TimeElapsedColumn(),
        TextColumn("{task.fields[loss]}"),
        TextColumn("{task.fields[val]}"),
        disable=not enabled,
    )


def _examples(source: BatchSource) -> BatchSource:
    """A memory's whole-example view (the sequence kind's batches); other sources as they are."""
    return source.sequences() if isinstance(source, Memory) else source


def train(
    adapter_config: AdapterConfig,
    train_source: BatchSource,
    val_source: BatchSource,
    head: nn.Module,
    out_dir: str | Path,
    config: TrainConfig | None = None,
    *,
    progress: bool = True,
) -> TrainResult:
    """Train the adapter kind's stages; write the adapter, ``train_log.jsonl`` and
    ``loss_curves.png``.

    Under ``torchrun`` (call :func:`init_distributed` first) every rank runs this with the same
    arguments: each trains on its share of the memory and only rank 0 writes files. Batch sizes
    in ``config`` are global (split over the ranks). The head is frozen and moved to the training
    device in place; torch's global RNG is seeded (it drives dropout).
    """
    config = config or TrainConfig()
    out_dir = Path(out_dir)
    sources = (train_source, val_source)
    if adapter_config.kind == "sequence":  # whole examples: a memory's view of them
        sources = (_examples(train_source), _examples(val_source))
    trainer = _Trainer(adapter_config, sources, head, out_dir, config, progress)
    if trainer.world.main:
        out_dir.mkdir(parents=True, exist_ok=True)
    trainer.start()
    with trainer.bar:
        trainer.run()
    adapter = trainer.adapter.eval()
    if trainer.world.main:
        save_adapter(out_dir, adapter, adapter_config)
        plot_loss_curves(out_dir / LOG_FILE, out_dir / PLOT_FILE)
    if trainer.world.size > 1:
        dist.barrier()  # the other ranks return once the files exist
    best = trainer.state.best_metrics
    return TrainResult(
        adapter=adapter,
        config=adapter_config,
        out_dir=out_dir,
        stage1_val_loss=trainer.state.stage1_best,
        stage2_val_loss=trainer.state.best_loss,
        val_accuracy=best.get("val_acc", math.nan),
        steps=trainer.state.global_step,
    )
