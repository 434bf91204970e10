"""How `pema-client train` optimises an adapter: :class:`TrainConfig`, whose fields are also the
command's optimisation flags."""

from __future__ import annotations

from dataclasses import dataclass

from data_owner_client.options import option


@dataclass
class TrainConfig:
    """Optimisation settings of both stages (paper defaults where the paper gives one)."""

    lr: float = option(1e-3, help="Adam learning rate")
    stage1_batch_size: int = option(
        20480, help="pairs per reconstruction step (over all processes)"
    )
    stage2_batch_size: int = option(
        2048,
        help="pairs per joint-retraining step (over all processes); also the residual kind's",
    )
    sequence_batch_size: int = option(16, help="examples per step (over all processes)")
    stage1_epochs: int = option(
        20, help="most reconstruction epochs (early stopping usually ends sooner)"
    )
    stage2_epochs: int = option(
        20, help="most joint-retraining epochs (residual, sequence: most epochs)"
    )
    patience: int = option(3, help="validations without improvement before a stage stops")
    min_delta: float = option(0.0, help="least improvement of the validation loss that counts")
    # Train (and validate) the mixture that decoding reads at this constant λ,
    # −log(λ·P_adapter(y) + (1 − λ)·P_LM(y)), instead of the adapter's own CE.
    mixture_lambda: float | None = option(
        None,
        help="train the mixture with the PLM that decoding reads at this constant λ, "
        "-log(λ·P_adapter + (1-λ)·P_LM), instead of the adapter alone",
        metavar="LAMBDA",
    )
    val_every_steps: int | None = option(
        None, help="validate every N steps (default: after each epoch)", flag="--val-every"
    )
    val_batch_size: int = option(4096, help="pairs per validation batch")
    ce_chunk: int | None = None  # rows per CE chunk; None: keep a chunk's logits ≤ 2**24 values
    log_every_steps: int = 10  # steps between training-loss records in the JSONL log
    seed: int = option(0, help="seeds initialisation, shuffling and dropout")
    init: str | None = option(
        None,
        help="start from this adapter's weights instead of a fresh initialisation (same kind, "
        "shape and model), e.g. one trained on self-labelled pairs, then fine-tune it",
        metavar="ADAPTER",
    )
    device: str = option("auto", help="auto (cuda, then mps, then cpu), or a torch device name")
    checkpoint_dir: str | None = None  # where resumable state goes; None: OUT_DIR/checkpoint
    resume: bool = option(False, help="continue from OUT/checkpoint when there is one")

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
        if self.mixture_lambda is not None and not 0.0 < self.mixture_lambda <= 1.0:
            raise ValueError(f"mixture_lambda must be in (0, 1], got {self.mixture_lambda}")

    def batch_size(self, stage: int) -> int:
        """The global batch size of ``stage``."""
        return self.stage1_batch_size if stage == 1 else self.stage2_batch_size

    def epochs(self, stage: int) -> int:
        """The most epochs of ``stage``."""
        return self.stage1_epochs if stage == 1 else self.stage2_epochs
