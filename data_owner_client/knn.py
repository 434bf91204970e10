"""kNN-LM (Khandelwal et al., 2020) over an external memory: the retrieval baseline for PEMA.

The memory's keys are the PLM's context representations ``f(c)`` and its values the tokens that
followed them. For a new representation the ``k`` nearest keys (exact search, squared L2 distance
between the head's final norm of each, the vector the output layer reads) vote for their tokens
with weights ``softmax(−d / T)``; generation mixes that distribution with the PLM's with a
constant λ, as it mixes PEMA's (:mod:`data_owner_client.generate`).
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
import torch.nn.functional as F

from data_owner_client.memory import Memory
from data_owner_client.options import option
from shared.head import Head


@dataclass(frozen=True)
class KnnConfig:
    """How the kNN distribution is formed; defaults follow the kNN-LM paper except ``k``."""

    # Neighbours per query (the paper: 1,024 over 100M keys).
    k: int = option(64, help="neighbours per step", flag="--knn-k")
    # T in softmax(−d / T); larger spreads weight over more neighbours.
    temperature: float = option(1.0, help="T of softmax(-distance / T)", flag="--knn-temperature")
    lambda_max: float = 0.25  # the paper's interpolation weight, used when none is given
    lambda_min: float = 0.0
    schedule: str = "constant"  # kNN-LM interpolates with a fixed λ

    def __post_init__(self) -> None:
        if self.k < 1 or self.temperature <= 0:
            raise ValueError(f"need k >= 1 and temperature > 0, got {self.k}, {self.temperature}")


class KnnLM:
    """Exact nearest-neighbour search over a memory held on ``device``."""

    def __init__(
        self,
        keys: torch.Tensor,
        values: torch.Tensor,
        head: Head,
        config: KnnConfig = KnnConfig(),
        length_ratio: float | None = None,
        device: torch.device | str = "cpu",
    ) -> None:
        if len(keys) == 0 or len(keys) != len(values):
            raise ValueError(f"need as many keys as values (> 0): {len(keys)}, {len(values)}")
        self.head, self.config = head.to(device), config
        self.length_ratio = length_ratio  # the memory's target/source ratio, for GU schedules
        self.keys = torch.cat([self._normalize(part.to(device)) for part in keys.split(65_536)])
        self.key_norms = self.keys.pow(2).sum(-1)
        self.values = values.to(device, torch.int64)
        self.vocab_size = head.output_weight.shape[0]
        self.k = min(config.k, len(keys))

    @classmethod
    def from_memory(
        cls, memory: Memory, head: Head, config: KnnConfig, device: torch.device | str = "cpu"
    ) -> KnnLM:
        keys, values = memory.load_all()
        return cls(keys, values, head, config, memory.manifest.length_ratio, device)

    # Gradual Unrolling defaults, read like an adapter's (see generate.Mixing.resolve).
    @property
    def lambda_max(self) -> float:
        return self.config.lambda_max

    @property
    def lambda_min(self) -> float:
        return self.config.lambda_min

    @property
    def schedule(self) -> str:
        return self.config.schedule

    no_repeat_ngram = 0  # no repetition guard unless asked for
    num_beams = 1  # one hypothesis unless asked for

    def _normalize(self, x: torch.Tensor) -> torch.Tensor:
        return self.head.normalize(x.float())

    @torch.inference_mode()
    def log_probs(self, x: torch.Tensor) -> torch.Tensor:
        """``log p_kNN [B, V]`` for ``x [B, d]``; −inf for tokens no neighbour holds."""
        q = self._normalize(x)
        distances = q.pow(2).sum(-1, keepdim=True) - 2 * q @ self.keys.T + self.key_norms
        nearest, index = distances.topk(self.k, dim=-1, largest=False)
        weights = F.softmax(-nearest.clamp_min(0) / self.config.temperature, dim=-1)
        probs = torch.zeros(len(x), self.vocab_size, device=x.device)
        return probs.scatter_add_(-1, self.values[index], weights).log()
