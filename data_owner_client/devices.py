"""Devices and processes of training: the (possibly single-process) DDP world, collectives that
keep ranks in step, and device RNG states for checkpoints."""

from __future__ import annotations

import os
from collections.abc import Iterator
from dataclasses import dataclass
from typing import Any, TypeVar

import torch
import torch.distributed as dist

T = TypeVar("T")


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


def all_reduce(tensor: torch.Tensor, world: World, op: Any = None) -> torch.Tensor:
    if world.size > 1:
        dist.all_reduce(tensor, op=op or dist.ReduceOp.SUM)
    return tensor


def in_lockstep(batches: Iterator[T], world: World, device: torch.device) -> Iterator[T]:
    """Stop every rank as soon as one runs out, so DDP's collectives never wait forever."""
    if world.size == 1:
        yield from batches
        return
    while True:
        batch = next(batches, None)
        flag = torch.tensor([int(batch is not None)], device=device)
        if not all_reduce(flag, world, dist.ReduceOp.MIN).item():
            return
        assert batch is not None
        yield batch


def gather(tensor: torch.Tensor, world: World, device: torch.device) -> list[torch.Tensor]:
    """Every rank's copy of ``tensor`` (an RNG state, same size on all ranks), on the CPU."""
    if world.size == 1:
        return [tensor.cpu()]
    local = tensor.to(device)  # nccl gathers CUDA tensors only
    gathered = [torch.empty_like(local) for _ in range(world.size)]
    dist.all_gather(gathered, local)
    return [t.cpu() for t in gathered]


def device_rng_state(device: torch.device) -> torch.Tensor | None:
    """The RNG state of an accelerator (dropout draws from it there), None on the CPU."""
    if device.type == "cuda":
        return torch.cuda.get_rng_state(device)
    if device.type == "mps":
        return torch.mps.get_rng_state()
    return None


def set_device_rng_state(device: torch.device, state: torch.Tensor) -> None:
    if device.type == "cuda":
        torch.cuda.set_rng_state(state, device)
    elif device.type == "mps":
        torch.mps.set_rng_state(state)
