"""What a training stage optimises and how an adapter is scored: the batches it reads, the
adapter's outputs per stage, the (chunked) cross-entropy through the frozen head, and next-token
accuracy."""

from __future__ import annotations

import math
from collections.abc import Callable, Iterable
from typing import Protocol

import torch
import torch.nn.functional as F
from torch import nn
from torch.utils.checkpoint import checkpoint

from data_owner_client.adapter import Adapter, AdapterConfig
from data_owner_client.memory import Memory
from shared.head import Head

# Default bound on one cross-entropy chunk's logits: 2**24 float32 values (64 MiB).
CE_CHUNK_ELEMENTS = 2**24
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


def examples_of(source: BatchSource) -> BatchSource:
    """A memory's whole-example view (the sequence kind's batches); other sources as they are."""
    return source.sequences() if isinstance(source, Memory) else source


def ce_chunk_rows(vocab_size: int, elements: int = CE_CHUNK_ELEMENTS) -> int:
    """Rows per chunk so that one chunk's logits hold at most ``elements`` values."""
    return max(1, elements // vocab_size)


Logits = Callable[[torch.Tensor], torch.Tensor]


def _log_probs(head: Logits, h: torch.Tensor, y: torch.Tensor) -> torch.Tensor:
    return -F.cross_entropy(head(h), y, reduction="none")


def chunked_log_probs(
    head: Logits, h: torch.Tensor, y: torch.Tensor, chunk_rows: int
) -> torch.Tensor:
    """``log softmax(head(h))[y]`` per row, with one chunk's ``[chunk_rows, V]`` logits alive at
    a time.

    Each chunk runs under activation checkpointing, so backward recomputes its logits instead of
    keeping all ``n × V`` of them from the forward pass.
    """
    parts = [
        checkpoint(_log_probs, head, h_part, y_part, use_reentrant=False)
        for h_part, y_part in zip(h.split(chunk_rows), y.split(chunk_rows), strict=True)
    ]
    return torch.cat(parts)


def chunked_cross_entropy(
    head: Logits, h: torch.Tensor, y: torch.Tensor, chunk_rows: int
) -> torch.Tensor:
    """Mean ``CE(head(h), y)``, chunked as :func:`chunked_log_probs`."""
    return -chunked_log_probs(head, h, y, chunk_rows).mean()


@torch.no_grad()
def plm_log_probs(head: Head, batch: Batch, chunk_rows: int) -> torch.Tensor:
    """The PLM's ``log P_LM(y)`` at each scored position of ``batch`` (pairs, or whole examples
    with labels), in the order the adapter's outputs list them: ``H(f(c))``, no gradient."""
    return chunked_log_probs(head, *scored(batch), chunk_rows)


def scored(batch: Batch) -> tuple[torch.Tensor, torch.Tensor]:
    """The representations and labels of a batch's scored positions (labels ≥ 0)."""
    if len(batch) == 2:
        return batch[0], batch[1]
    x, _, labels = batch
    keep = labels >= 0
    return x[keep], labels[keep]


def mixture_nll(adapter: torch.Tensor, plm: torch.Tensor, lam: float) -> torch.Tensor:
    """``−log(λ·P_adapter(y) + (1 − λ)·P_LM(y))`` per row, from both log-probabilities: the
    loss of the distribution decoding draws from at constant λ."""
    if lam >= 1.0:
        return -adapter
    return -torch.logaddexp(adapter + math.log(lam), plm + math.log1p(-lam))


class StageModel(nn.Module):
    """The adapter's outputs that one stage trains on: the module DDP wraps.

    Stage 1 (pema): ``(h_rct,)``. Stage 2: ``(vectors, labels)`` of the scored positions, then
    ``h_rct`` for pema, from the same dropout mask.
    """

    def __init__(self, adapter: Adapter, stage: int) -> None:
        super().__init__()
        self.adapter, self.stage = adapter, stage

    def forward(self, *batch: torch.Tensor) -> tuple[torch.Tensor, ...]:
        return self.adapter.stage_outputs(self.stage, *batch)


def logits_of(adapter: Adapter, head: nn.Module) -> Logits:
    """What turns the adapter's outputs into logits: the whole head, or its projection alone
    for the kinds whose outputs live after the final norm."""
    if not adapter.post_norm:
        return head
    if not isinstance(head, Head):
        raise TypeError(f"a {type(adapter).__name__} needs the served model's Head")
    return head.project


def stage_loss(
    outputs: tuple[torch.Tensor, ...],
    target: torch.Tensor | None,
    head: Logits,
    kappa: float,
    chunk_rows: int,
    mixture: tuple[float, torch.Tensor] | None = None,
) -> dict[str, torch.Tensor]:
    """The stage's loss under ``"loss"`` and its parts (pema's stage 2: ``"mse"``, ``"ce"``).

    ``target`` is what ``h_rct`` reconstructs (pema: the adapter's features of the keys). With
    ``mixture`` (λ and the PLM's log-probabilities of the labels), the residual and sequence
    kinds' loss is :func:`mixture_nll`; ``"ce"`` stays the adapter's own.
    """
    if len(outputs) == 2:
        log_probs = chunked_log_probs(head, outputs[0], outputs[1], chunk_rows)
        ce = -log_probs.mean()
        if mixture is None:
            return {"loss": ce, "ce": ce}
        return {"loss": mixture_nll(log_probs, mixture[1], mixture[0]).mean(), "ce": ce}
    assert target is not None, "pema reconstructs its features"
    mse = F.mse_loss(outputs[-1], target)
    if len(outputs) == 1:
        return {"loss": mse}
    ce = chunked_cross_entropy(head, outputs[0], outputs[1], chunk_rows)
    return {"loss": kappa * mse + (1.0 - kappa) * ce, "mse": mse, "ce": ce}


# ---- evaluation ------------------------------------------------------------------------------


@torch.no_grad()
def eval_sums(
    adapter: Adapter,
    head: Logits,
    batches: Iterable[Batch],
    device: torch.device,
    chunk_rows: int,
    stage: int,
    mixture: tuple[float, Head] | None = None,
) -> torch.Tensor:
    """float64 sums over all scored positions: squared error and its elements (pema), CE,
    correct predictions, rows; and with ``mixture`` (λ and the whole head), the
    :func:`mixture_nll`."""
    sums = torch.zeros(6, dtype=torch.float64)
    model = StageModel(adapter, stage)
    for batch in batches:
        batch = tuple(t.to(device) for t in batch)
        outputs = model(*batch)
        sq = elements = ce = correct = mixed = 0.0
        rows = len(batch[0])
        if stage == 2:
            vectors, y = outputs[0], outputs[1]
            log_probs = []
            for part, y_part in zip(vectors.split(chunk_rows), y.split(chunk_rows), strict=True):
                logits = head(part)
                log_probs.append(-F.cross_entropy(logits, y_part, reduction="none"))
                correct += (logits.argmax(-1) == y_part).sum().item()
            ce = -torch.cat(log_probs).sum().item()
            if mixture is not None:
                plm = plm_log_probs(mixture[1], batch, chunk_rows)
                mixed = mixture_nll(torch.cat(log_probs), plm, mixture[0]).sum().item()
            rows = len(y)
        target = adapter.reconstruction_target(batch[0])
        if target is not None:
            target = target.float()
            sq, elements = (outputs[-1].float() - target).pow(2).sum().item(), target.numel()
        sums += torch.tensor([sq, elements, ce, correct, rows, mixed], dtype=torch.float64)
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
    sequences = adapter.reads_sequences
    source = examples_of(source) if sequences else source
    batch_size = batch_size or (16 if sequences else 4096)
    device = torch.device(device) if device is not None else next(adapter.parameters()).device
    adapter, head = adapter.to(device), head.to(device)
    training = adapter.training
    adapter.eval()
    batches = source.batches(batch_size, seed=0, epoch=0, shuffle=False)
    chunk = ce_chunk_rows(vocab_size_of(head))
    sums = eval_sums(adapter, logits_of(adapter, head), batches, device, chunk, stage=2)
    adapter.train(training)
    if sums[4] == 0:
        raise ValueError("the evaluation source yielded no pairs")
    return float(sums[3] / sums[4])


def check_head(head: nn.Module, config: AdapterConfig) -> None:
    """Refuse a head whose vocabulary differs from the adapter config's."""
    weight = getattr(head, "output_weight", None)
    if weight is not None and weight.shape[0] != config.vocab_size:
        raise ValueError(
            f"the head has {weight.shape[0]} output tokens but the adapter config says "
            f"vocab_size={config.vocab_size}: take both from the same server"
        )


def vocab_size_of(head: nn.Module) -> int:
    """V of a head that exposes ``output_weight`` (shared.head.Head), else a generous guess."""
    weight = getattr(head, "output_weight", None)
    return int(weight.shape[0]) if weight is not None else 2**16
