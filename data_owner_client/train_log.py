"""What a training run records: the JSONL log of losses (``train_log.jsonl``), running means
for it, and the loss-curve plot (``loss_curves.png``)."""

from __future__ import annotations

import io
import json
from pathlib import Path
from typing import Any

import torch

from data_owner_client.files import write_atomic

LOG_FILE = "train_log.jsonl"
PLOT_FILE = "loss_curves.png"


class JsonlLog:
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


class Mean:
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
