"""Synthetic memories for training tests, and (run as a module) the DDP worker.

The task is one the PLM cannot do: keys come from Gaussian clusters, and each cluster's label is a
token other than the one a random frozen head predicts for it, so the head alone scores about 0
and only an adapter that learns the cipher scores high.

``python -m torch.distributed.run --nproc-per-node 2 -m tests.client.synthetic OUT_DIR [KIND]``
trains on the small task under DDP and writes the adapter to OUT_DIR (the sequence kind on the copy
task).
"""

from __future__ import annotations

import argparse
import dataclasses
import hashlib
import logging
from collections.abc import Iterator
from dataclasses import dataclass
from typing import Any

import torch

from data_owner_client.adapter import KINDS, AdapterConfig, PemaConfig
from data_owner_client.devices import init_distributed
from data_owner_client.memory import split_batches
from data_owner_client.train import TrainConfig, train
from shared.head import Head
from shared.protocol import HeadSpec

Batch = tuple[torch.Tensor, torch.Tensor]


class TensorSource:
    """An in-RAM batch source with the semantics of ``Memory.batches``: rows of ``tensors``
    (keys and values; or keys, tokens and labels for ``Memory.sequences()``)."""

    def __init__(self, keys: torch.Tensor, *rest: torch.Tensor) -> None:
        self.tensors = (keys.float(), *(t.long() for t in rest))

    @property
    def keys(self) -> torch.Tensor:
        return self.tensors[0]

    @property
    def values(self) -> torch.Tensor:
        return self.tensors[-1]

    def __len__(self) -> int:
        return len(self.keys)

    def num_batches(self, batch_size: int, world_size: int = 1) -> int:
        """Batches each rank gets per epoch."""
        return split_batches(len(self), batch_size, world_size)

    def batches(
        self,
        batch_size: int,
        *,
        seed: int,
        epoch: int,
        rank: int = 0,
        world_size: int = 1,
        shuffle: bool = True,
    ) -> Iterator[tuple[torch.Tensor, ...]]:
        """Global batches in a (seed, epoch) order; rank r takes its slice of each."""
        order = torch.arange(len(self))
        if shuffle:
            digest = hashlib.sha256(f"{seed}:{epoch}".encode()).digest()
            generator = torch.Generator().manual_seed(int.from_bytes(digest[:8], "little") >> 1)
            order = torch.randperm(len(self), generator=generator)
        steps = self.num_batches(batch_size, world_size)
        for rows in order.split(batch_size * world_size)[:steps]:
            mine = rows.tensor_split(world_size)[rank]
            yield tuple(t[mine] for t in self.tensors)


def random_head(d: int = 32, v: int = 64, seed: int = 0) -> Head:
    """A LayerNorm + output projection head with random weights."""
    g = torch.Generator().manual_seed(seed)
    tensors = {
        "norm.weight": 1.0 + 0.1 * torch.randn(d, generator=g),
        "norm.bias": 0.1 * torch.randn(d, generator=g),
        "lm_head.weight": torch.randn(v, d, generator=g),
    }
    return Head(tensors, HeadSpec(norm="layernorm"))


@dataclass
class CipherTask:
    """Clusters of keys whose labels are never the frozen head's own prediction."""

    head: Head  # the frozen output head
    centers: torch.Tensor  # [K, d] cluster centres
    labels: torch.Tensor  # [K] the next token of each cluster
    noise: float  # per-dimension standard deviation around a centre

    def sample(self, n: int, seed: int) -> TensorSource:
        """``n`` pairs drawn from the clusters."""
        g = torch.Generator().manual_seed(seed)
        cluster = torch.randint(len(self.centers), (n,), generator=g)
        keys = self.centers[cluster] + self.noise * torch.randn(
            n, self.centers.shape[1], generator=g
        )
        return TensorSource(keys, self.labels[cluster])


def cipher_task(d: int = 32, v: int = 64, clusters: int = 12, seed: int = 0) -> CipherTask:
    """A task whose labels shift the head's prediction for each cluster by a nonzero offset."""
    head = random_head(d, v, seed)
    g = torch.Generator().manual_seed(seed + 1)
    centers = torch.randn(clusters, d, generator=g)
    own = head(centers).argmax(-1)
    labels = (own + torch.randint(1, v, (clusters,), generator=g)) % v
    return CipherTask(head, centers, labels, noise=0.3)


class SequenceSource(TensorSource):
    """In-RAM examples with the semantics of ``Memory.sequences().batches``."""

    def __init__(self, keys: torch.Tensor, tokens: torch.Tensor, labels: torch.Tensor) -> None:
        super().__init__(keys, tokens, labels)

    @property
    def tokens(self) -> torch.Tensor:
        return self.tensors[1]

    @property
    def labels(self) -> torch.Tensor:
        return self.tensors[2]

    def pairs(self) -> TensorSource:
        """The positions that predict a target token, as pairs (what the pair kinds train on)."""
        scored = self.labels >= 0
        return TensorSource(self.keys[scored], self.labels[scored])


@dataclass
class CopyTask:
    """Sources of ``length`` random tokens, a separator, then the source again: each target token
    is the token ``length + 1`` positions back. The "PLM" representation of a position encodes
    only its own token and its position, so no single position tells what comes next."""

    head: Head
    tokens: torch.Tensor  # [K, d] what a token contributes to a representation
    positions: torch.Tensor  # [T, d] what a position contributes
    alphabet: int  # source tokens are 0 .. alphabet - 1
    length: int  # source tokens per example
    separator: int
    eos: int

    def sample(self, n: int, seed: int) -> SequenceSource:
        g = torch.Generator().manual_seed(seed)
        source = torch.randint(self.alphabet, (n, self.length), generator=g)
        separator = torch.full((n, 1), self.separator)
        full = torch.cat([source, separator, source, torch.full((n, 1), self.eos)], dim=1)
        read, follows = full[:, :-1], full[:, 1:]
        keys = self.tokens[read] + self.positions[: read.shape[1]]
        keys = keys + 0.1 * torch.randn(keys.shape, generator=g)
        labels = follows.clone()
        labels[:, : self.length] = -100  # the prompt's own positions predict no target
        return SequenceSource(keys, read, labels)


def copy_task(d: int = 32, v: int = 64, alphabet: int = 16, length: int = 5) -> CopyTask:
    g = torch.Generator().manual_seed(7)
    return CopyTask(
        random_head(d, v),
        torch.randn(v, d, generator=g),
        torch.randn(2 * length + 2, d, generator=g),
        alphabet,
        length,
        separator=v - 2,
        eos=v - 1,
    )


def as_kind(config: AdapterConfig, kind: str, **changes: Any) -> AdapterConfig:
    """``config``'s settings (with ``changes``) as a ``kind`` config, those the kind does not
    have left out: the settings these tests had when one config served every kind."""
    own = {f.name for f in dataclasses.fields(KINDS[kind].config)}
    values = {**dataclasses.asdict(config), **changes}
    return KINDS[kind].config(**{k: v for k, v in values.items() if k in own})


def kind_config(kind: str, hidden_size: int, vocab_size: int, **settings: Any) -> AdapterConfig:
    """A ``kind`` config from ``settings``, the other kinds' left out (see :func:`as_kind`)."""
    return as_kind(PemaConfig(hidden_size, vocab_size), kind, **settings)


def small_configs(
    d: int = 32, v: int = 64, **train_overrides: object
) -> tuple[AdapterConfig, TrainConfig]:
    """A rank-16 adapter and a few seconds of training on the CPU."""
    adapter = PemaConfig(hidden_size=d, vocab_size=v, rank=16, fingerprint="synthetic")
    options: dict = dict(
        lr=1e-2,
        stage1_batch_size=64,
        stage2_batch_size=64,
        stage1_epochs=4,
        stage2_epochs=4,
        val_batch_size=128,
        ce_chunk=16,
        device="cpu",
    )
    return adapter, TrainConfig(**{**options, **train_overrides})


def ddp_run(kind: str) -> tuple[AdapterConfig, TrainConfig, Head, tuple[Any, Any]]:
    """What the DDP test trains, in one process or under torchrun (dropout 0, so they agree)."""
    adapter_config, train_config = small_configs(sequence_batch_size=32)
    adapter_config = as_kind(
        adapter_config, kind, dropout=0.0, width=32, heads=2, layers=1, copy=False
    )
    if kind == "sequence":
        copy = copy_task()
        train_set = copy.sample(256, 1)
        # Ranks then score different numbers of target tokens per step: the loss must weigh them.
        unscored = torch.rand(train_set.labels.shape, generator=torch.Generator().manual_seed(3))
        train_set.labels[unscored < 0.5] = -100
        # 3 validation batches of 32 (the sequence batch): one more than the ranks.
        return adapter_config, train_config, copy.head, (train_set, copy.sample(80, 2))
    task = cipher_task()
    # 3 validation batches: one more than the ranks.
    return adapter_config, train_config, task.head, (task.sample(512, 1), task.sample(300, 2))


def main() -> None:
    """DDP worker: train on the small task."""
    parser = argparse.ArgumentParser()
    parser.add_argument("out_dir")
    parser.add_argument("kind", nargs="?", default="pema")
    args = parser.parse_args()
    logging.basicConfig(level=logging.WARNING)
    init_distributed()
    adapter_config, train_config, head, sources = ddp_run(args.kind)
    train(
        adapter_config,
        *sources,
        head,
        args.out_dir,
        train_config,
        progress=False,
    )


if __name__ == "__main__":
    main()
