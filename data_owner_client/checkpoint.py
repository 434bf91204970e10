"""Resumable training state: what a checkpoint holds and the settings a resumed run must share
with the run that wrote it."""

from __future__ import annotations

import dataclasses
import math
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch

from data_owner_client.adapter import KINDS, AdapterConfig
from data_owner_client.devices import World
from data_owner_client.train_config import TrainConfig

CHECKPOINT_FILE = "trainer_state.pt"
RUNTIME_ONLY = ("device", "resume", "checkpoint_dir", "log_every_steps")


def run_signature(
    adapter_config: AdapterConfig, config: TrainConfig, world: World
) -> dict[str, Any]:
    """Settings that must not change between a checkpoint and its resumption."""
    kind = KINDS[adapter_config.kind]
    adapter = {k: getattr(adapter_config, k) for k in kind.signature}
    # Read by the sequence kind alone: left out of the others' signatures, as ever.
    unused = () if kind.module.reads_sequences else ("sequence_batch_size",)
    skip = RUNTIME_ONLY + unused
    train = {k: v for k, v in dataclasses.asdict(config).items() if k not in skip}
    if config.init is None:  # as checkpoints from before --init read
        del train["init"]
    else:  # however the path was spelled
        train["init"] = str(Path(config.init).resolve())
    return {"adapter": adapter, "train": train, "world_size": world.size}


def differences(saved: dict[str, Any], expected: dict[str, Any]) -> list[str]:
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
class RunState:
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


def cpu_copy(state: dict[str, torch.Tensor] | None) -> dict[str, torch.Tensor] | None:
    return None if state is None else {k: v.cpu() for k, v in state.items()}
