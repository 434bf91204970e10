"""Scheduled sampling (Bengio et al. 2015) for a memory, in one parallel pass (Duckworth et al.
2019): an adapter trained with teacher forcing decodes from its own prefixes, so it never saw the
representations of its own mistakes. A ``memory build --context scheduled`` reads each example's
gold sequence once, takes the mixture's greedy choice at every target position after the gold
prefix, replaces each target token with it at ``rate``, and reads the example again as the
memory's keys; the labels stay the gold tokens. Training on that memory (``train --init`` the
predicting adapter) teaches the adapter to go on from the representations of its own choices.
"""

from __future__ import annotations

import hashlib
import random
from dataclasses import dataclass

import torch

from data_owner_client.adapter import Adapter, AdapterConfig, adapter_tensors
from data_owner_client.decoding import GenerationConfig, Mixing
from data_owner_client.memory.build import Encoded
from data_owner_client.memory.store import Sampling
from data_owner_client.mixture import mixed_log_probs
from shared.codec import hash_tensors
from shared.head import Head


@dataclass
class OwnPredictions:
    """Replaces target tokens with the mixture's greedy choices (an adapter with its stored λ
    and schedule, as ``generate`` mixes them; no repetition guard: the prefix is gold)."""

    adapter: Adapter
    head: Head
    mixing: Mixing
    eos_token_ids: frozenset[int]
    rate: float
    seed: int = 0

    def __post_init__(self) -> None:
        if not 0.0 < self.rate <= 1.0:
            raise ValueError(f"the sampling rate must be in (0, 1], got {self.rate}")
        digest = hashlib.sha256()
        hash_tensors(digest, adapter_tensors(self.adapter))
        self._digest = f"sha256:{digest.hexdigest()}"

    @classmethod
    def of(
        cls,
        adapter: Adapter,
        config: AdapterConfig,
        head: Head,
        eos_token_ids: list[int],
        rate: float,
        seed: int = 0,
    ) -> OwnPredictions:
        """The predictions of ``adapter`` mixed as its config says."""
        mixing = Mixing.resolve(GenerationConfig(), config)
        return cls(adapter.eval(), head.eval(), mixing, frozenset(eos_token_ids), rate, seed)

    @property
    def sampling(self) -> Sampling:
        return Sampling(rate=self.rate, seed=self.seed, adapter=self._digest)

    def __call__(self, example: Encoded, hidden: torch.Tensor) -> list[int]:
        """``example``'s target with each token but the final EOS replaced, with probability
        ``rate`` (drawn per example index and seed), by the prediction after the gold prefix;
        a predicted end of output is never read mid-sequence."""
        draws = random.Random(f"{self.seed}:{example.index}")
        target = list(example.target)
        for t, token in enumerate(self.predictions(example, hidden)):
            if draws.random() < self.rate and token not in self.eos_token_ids:
                target[t] = token
        return target

    @torch.inference_mode()
    def predictions(self, example: Encoded, hidden: torch.Tensor) -> list[int]:
        """The mixture's greedy choice for each target token but the final EOS, from the
        representations ``hidden [len(sequence), d]`` of the gold sequence."""
        start, count = len(example.prompt) - 1, len(example.target) - 1
        x = hidden.float()
        adapted = None
        if self.adapter.reads_sequences:
            tokens = torch.tensor(example.sequence).unsqueeze(0)
            prompts = torch.tensor([len(example.prompt)])
            adapted = self.adapter(x.unsqueeze(0), tokens, prompts)[0, start : start + count]
        horizon = self.mixing.horizon_of(example.source_tokens)
        lam = torch.tensor([self.mixing.lambda_at(t, horizon) for t in range(count)])
        log_probs = mixed_log_probs(self.head, self.adapter, x[start : start + count], lam, adapted)
        return log_probs.argmax(-1).tolist()
