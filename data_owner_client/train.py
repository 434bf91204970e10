"""Adapter training over an external memory, through the frozen head (docs/design.md, "Training").

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
import time
from collections.abc import Iterator, Sized
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch
import torch.distributed as dist
from torch import nn
from torch.nn.parallel import DistributedDataParallel

from data_owner_client.adapter import (
    KINDS,
    Adapter,
    AdapterConfig,
    AdapterError,
    build_adapter,
    load_adapter,
    save_adapter,
)
from data_owner_client.checkpoint import (
    CHECKPOINT_FILE,
    RunState,
    cpu_copy,
    differences,
    run_signature,
)
from data_owner_client.devices import (
    World,
    all_reduce,
    current_world,
    device_rng_state,
    gather,
    in_lockstep,
    init_distributed,
    resolve_device,
    set_device_rng_state,
)
from data_owner_client.files import write_atomic
from data_owner_client.objectives import (
    Batch,
    BatchSource,
    StageModel,
    ce_chunk_rows,
    check_head,
    eval_sums,
    examples_of,
    logits_of,
    plm_log_probs,
    stage_loss,
)
from data_owner_client.progress import stage_bar
from data_owner_client.train_config import TrainConfig
from data_owner_client.train_log import LOG_FILE, PLOT_FILE, JsonlLog, Mean, plot_loss_curves
from shared.head import Head

__all__ = ["TrainConfig", "TrainResult", "World", "init_distributed", "resolve_device", "train"]
log = logging.getLogger(__name__)


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


def _derived_seed(seed: int, purpose: str) -> int:
    """A seed for one purpose, independent of the others drawn from the same run seed."""
    digest = hashlib.sha256(f"{seed}:{purpose}".encode()).digest()
    return int.from_bytes(digest[:8], "little") >> 1


def _generator(seed: int, purpose: str) -> torch.Generator:
    return torch.Generator().manual_seed(_derived_seed(seed, purpose))


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
        check_head(head, adapter_config)
        # The head is frozen and moved to the training device in place.
        self.head = head.to(self.device).eval().requires_grad_(False)
        self.chunk_rows = config.ce_chunk or ce_chunk_rows(adapter_config.vocab_size)
        ckpt_dir = Path(config.checkpoint_dir) if config.checkpoint_dir else out_dir / "checkpoint"
        self.checkpoint_path = ckpt_dir / CHECKPOINT_FILE
        self.kind = KINDS[adapter_config.kind]
        self.state = RunState(stage=self.kind.stages[0])
        self.best_state: dict[str, torch.Tensor] | None = None
        self.windows = {"log": Mean(), "val": Mean()}
        self.bar = stage_bar(progress and self.world.main)

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
        elif self.config.init is not None:
            self._initialise(Path(self.config.init), head)
        self._build_stage(optimizer_state=saved["optimizer"] if saved else None)
        self.log = JsonlLog(self.out_dir / LOG_FILE, self.world.main, self.state.log_bytes)
        self.t0 = time.monotonic() - self.state.elapsed

    def _initialise(self, directory: Path, head: Head | None) -> None:
        """Start from the weights of the adapter in ``directory``, of this run's kind and shape
        and trained on this model's representations."""
        fingerprint = self.adapter_config.fingerprint or None
        initial, config = load_adapter(directory, fingerprint=fingerprint, head=head)
        shapes = {k: tuple(t.shape) for k, t in initial.state_dict().items()}
        expected = {k: tuple(t.shape) for k, t in self.adapter.state_dict().items()}
        if config.kind != self.adapter_config.kind:
            raise AdapterError(
                f"--init {directory} is a {config.kind} adapter; train it with --adapter-kind "
                f"{config.kind}, or start a {self.adapter_config.kind} adapter afresh"
            )
        if shapes != expected:
            differ = sorted(k for k in expected if shapes.get(k) != expected[k])
            raise AdapterError(
                f"--init {directory} has another shape ({', '.join(differ[:3])} differ); train "
                "with the sizes it was trained with (width, layers, rank, ...)"
            )
        self.adapter.load_state_dict(initial.state_dict())

    def _build_stage(self, optimizer_state: dict[str, Any] | None = None) -> None:
        """Freeze for the current stage, wrap for DDP, make the stage's optimizer."""
        params = self.adapter.trainable(self.state.stage)
        model: nn.Module = StageModel(self.adapter, self.state.stage)
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
        expected = run_signature(self.adapter_config, self.config, self.world)
        if saved["signature"] != json.dumps(expected, sort_keys=True):
            differ = differences(json.loads(saved["signature"]), expected)
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
        self.state = RunState(**saved["state"])
        torch.set_rng_state(saved["rng"][self.world.rank])
        if saved["device_rng"] is not None:
            set_device_rng_state(self.device, saved["device_rng"][self.world.rank])

    # -- the stages --

    def run(self) -> None:
        """Stage 1 (unless a resumed run is past it), then stage 2."""
        stages = self.kind.stages
        for stage in stages[stages.index(self.state.stage) + 1 :]:
            self._run_stage()
            self._enter_stage(stage)
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
        for batch in in_lockstep(self._epoch_batches(skip), self.world, self.device):
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
        return self.adapter.reads_sequences

    @property
    def _mixture(self) -> tuple[float, Head] | None:
        """λ and the whole head when training through the mixture (kinds that offer it)."""
        lam = self.config.mixture_lambda
        if lam is None or not self.kind.mixture:
            return None
        return (lam, self.head) if isinstance(self.head, Head) else None

    @property
    def _stages(self) -> bool:
        """The kind trains in more than one stage (pema: reconstruction, then prediction)."""
        return len(self.kind.stages) > 1

    def _stage_name(self) -> str:
        return f"stage {self.state.stage}" if self._stages else "train"

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
        target = self.adapter.reconstruction_target(x)
        kappa = self.adapter_config.reconstruction_weight
        mixture = None
        if self._mixture is not None:
            lam, head = self._mixture
            mixture = lam, plm_log_probs(head, batch, self.chunk_rows)
        losses = stage_loss(outputs, target, self.logits, kappa, self.chunk_rows, mixture)
        loss = losses["loss"]
        if self._sequences and self.world.size > 1:
            # A rank's mean is over its own target tokens, which differ between ranks: weigh it
            # by its share, so DDP's mean of the gradients is that of the global batch's mean.
            count = torch.tensor([float(len(outputs[1]))], device=self.device)
            total = all_reduce(count.clone(), self.world)
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

    def _enter_stage(self, stage: int) -> None:
        """Restore the last stage's best state, then let the adapter prepare ``stage`` (pema:
        a fresh ``A`` and a zero ``B_pd`` for stage 2)."""
        self._restore_best()
        self.adapter.start_stage(stage, generator=_generator(self.config.seed, f"stage{stage}"))
        state = self.state
        self.state = RunState(
            stage=stage, global_step=state.global_step, stage1_best=state.best_loss
        )
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
        sums = eval_sums(
            self.adapter, self.logits, batches, self.device, self.chunk_rows, stage, self._mixture
        )
        self.adapter.train()
        totals = all_reduce(sums.to(self.device), self.world).tolist()
        sq, elements, ce, correct, rows, mixed = totals
        if rows == 0:
            raise ValueError("the validation memory yielded nothing to score: give it some data")
        if not self._stages:
            metrics = {"val_loss": ce / rows, "val_ce": ce / rows, "val_acc": correct / rows}
            if self._mixture is not None:
                metrics |= {"val_loss": mixed / rows, "val_mixture": mixed / rows}
            return metrics
        mse = sq / elements
        if not stage2:
            return {"val_loss": mse, "val_mse": mse}
        kappa = self.adapter_config.reconstruction_weight
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
        rng = gather(torch.get_rng_state(), self.world, self.device)
        local_device_rng = device_rng_state(self.device)
        device_rng = None
        if local_device_rng is not None:
            device_rng = gather(local_device_rng, self.world, self.device)
        if not self.world.main:
            return
        self.state.elapsed, self.state.log_bytes = self._elapsed(), self.log.size()
        signature = run_signature(self.adapter_config, self.config, self.world)
        saved = {
            "signature": json.dumps(signature, sort_keys=True),
            "state": dataclasses.asdict(self.state),
            "adapter": {k: v.detach().cpu() for k, v in self.adapter.state_dict().items()},
            "best_state": cpu_copy(self.best_state),
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


def _steps_per_epoch(source: BatchSource, batch_size: int, world_size: int) -> int | None:
    """Batches per rank and epoch, when the source can tell."""
    num_batches = getattr(source, "num_batches", None)
    if callable(num_batches):
        return int(num_batches(batch_size, world_size))
    if isinstance(source, Sized):
        return math.ceil(len(source) / batch_size) // world_size
    return None


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
    if KINDS[adapter_config.kind].module.reads_sequences:  # whole examples: a memory's view
        sources = (examples_of(train_source), examples_of(val_source))
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
