"""The vLLM backend: the same :class:`~plm_owner_server.backend.Backend` on vLLM's engine (paged
attention, automatic prefix caching, tensor parallelism).

vLLM's pooling runner returns one state per token; the classes of
:mod:`plm_owner_server.vllm_models` make that state f(c), the final norm's input. Sessions keep
no KV cache of their own: the server keeps each row's tokens, and a step resends prefix + new token
with prefix-cache reads on, so vLLM computes only what its cache lacks (up to one block: the
cached prefix ends on a block boundary) and returns the states of those positions, the last being
the new token's. All sessions' steps of a scheduler pass go to the engine in one call.

The head, tokenizer and fingerprint come from the same weights loaded once by transformers (so an
adapter trained against either backend is accepted by the other); only the head's modules are
kept. Importing this module imports vLLM: only the vllm extra (``make vllm``) has it.
"""

from __future__ import annotations

import logging
from collections.abc import Sequence
from dataclasses import dataclass, field
from typing import Any

import torch
from vllm import LLM
from vllm.config import PoolerConfig
from vllm.pooling_params import PoolingParams

from plm_owner_server import embedded, vllm_models
from plm_owner_server.architectures import Logits, UnsupportedArchitecture
from plm_owner_server.runner import ModelRunner
from plm_owner_server.settings import EMBEDDED_MODEL, Settings
from shared.protocol import LogitsMode

log = logging.getLogger(__name__)
TOKEN_BYTES = 8  # what a session holds per token: its id


@dataclass
class TokenSession:
    """A session on vLLM: each live row's tokens so far (its cache lives in vLLM's blocks)."""

    tokens: list[list[int]]
    rows: list[int] = field(default_factory=list)  # the caller's ids of the live rows

    def __post_init__(self) -> None:
        self.rows = self.rows or list(range(len(self.tokens)))

    @property
    def nbytes(self) -> int:
        return TOKEN_BYTES * sum(map(len, self.tokens))

    def select(self, rows: Sequence[int]) -> None:
        """Keep only the listed rows, in that order (the rest are finished)."""
        where = {r: i for i, r in enumerate(self.rows)}
        self.tokens = [self.tokens[where[r]] for r in rows]
        self.rows = list(rows)

    def grown(self, tokens: Sequence[int]) -> TokenSession:
        """This session with one more token on each row."""
        grown = [row + [token] for row, token in zip(self.tokens, tokens, strict=True)]
        return TokenSession(grown, self.rows)


class VllmBackend:
    """A causal LM on vLLM that answers with f(c), as the transformers runner does."""

    def __init__(self, llm: LLM, reference: ModelRunner) -> None:
        self.llm = llm
        self.model_id, self.architecture = reference.model_id, reference.architecture
        self.hidden_size, self.vocab_size = reference.hidden_size, reference.vocab_size
        self.max_positions, self.dtype = reference.max_positions, reference.dtype
        self.fingerprint, self.tokenizer = reference.fingerprint, reference.tokenizer
        self.eos_token_ids, self.bos_token_id = reference.eos_token_ids, reference.bos_token_id
        self.head = reference.head  # the norm and lm_head modules; the body is not kept
        self.cached_tokens = self.computed_tokens = 0  # of session steps and openings

    @classmethod
    def load(cls, settings: Settings) -> VllmBackend:
        """Start vLLM on the model named by the settings (the embedded SmolLM2 by default)."""
        path = _model_path(settings)
        reference = ModelRunner.load(settings.model_copy(update={"device": "cpu"}))
        architecture = pre_norm_architecture(reference.model.config)
        dtype = str(reference.dtype).removeprefix("torch.")
        # Keep the head's modules only: the body's weights are vLLM's to hold.
        reference.model = reference._base = None  # type: ignore[assignment]
        vllm_models.register()
        llm = LLM(
            model=path,
            runner="pooling",
            convert="embed",
            dtype=dtype,
            hf_overrides={"architectures": [architecture]},
            pooler_config=PoolerConfig(
                task="token_embed", tok_pooling_type="ALL", use_activation=False
            ),
            enable_prefix_caching=True,
            block_size=settings.vllm_block_size,
            tensor_parallel_size=settings.tensor_parallel_size,
            distributed_executor_backend="mp" if settings.tensor_parallel_size > 1 else None,
            kv_cache_memory_bytes=settings.max_kv_cache_bytes,
            enforce_eager=True,
            seed=0,
        )
        return cls(llm, reference)

    def _encode(self, rows: Sequence[Sequence[int]], read_cache: bool) -> list[torch.Tensor]:
        """Each row's states of the positions vLLM computed: all of them without cache reads;
        with them, those after the cached prefix."""
        params = PoolingParams(use_activation=False, skip_reading_prefix_cache=not read_cache)
        prompts: Any = [{"prompt_token_ids": list(row)} for row in rows]
        outputs = self.llm.encode(
            prompts, pooling_task="token_embed", pooling_params=params, use_tqdm=False
        )
        if read_cache:
            cached = sum(out.num_cached_tokens or 0 for out in outputs)
            self.cached_tokens += cached
            self.computed_tokens += sum(map(len, rows)) - cached
        return [out.outputs.data.to(self.dtype) for out in outputs]

    def represent(
        self, rows: Sequence[Sequence[int]], starts: Sequence[int], max_batch_tokens: int
    ) -> list[torch.Tensor]:
        """Per row, f(c) of positions ``start .. len-1`` (vLLM schedules the passes)."""
        hidden = self._encode(rows, read_cache=False)
        return [h[start:] for h, start in zip(hidden, starts, strict=True)]

    def logits(self, hidden: torch.Tensor, mode: LogitsMode) -> Logits:
        """``H(hidden)`` with the model's own head, as the transformers backend computes it."""
        return self.head.logits(hidden, mode)

    def open_sessions(
        self, sessions: Sequence[Sequence[Sequence[int]]]
    ) -> list[tuple[TokenSession, torch.Tensor]]:
        """Prefill every session's prompts in one call; each row's last f(c)."""
        states = [TokenSession([list(p) for p in prompts]) for prompts in sessions]
        return list(zip(states, self._last_states(states), strict=True))

    def step_sessions(
        self, steps: Sequence[tuple[TokenSession, Sequence[int], Sequence[int]]]
    ) -> list[torch.Tensor]:
        """One token more for each listed row of each session, in one call to the engine."""
        for state, rows, _ in steps:
            state.select(rows)
        grown = [
            TokenSession(
                [t + [new] for t, new in zip(state.tokens, tokens, strict=True)], state.rows
            )
            for state, _, tokens in steps
        ]
        hidden = self._last_states(grown)
        for (state, _, _), new in zip(steps, grown, strict=True):
            state.tokens = new.tokens  # only once the pass succeeded
        return hidden

    def _last_states(self, sessions: Sequence[TokenSession]) -> list[torch.Tensor]:
        """f(c) of each row's last position ``[rows, d]`` per session, prefix-cache reads on."""
        rows = [row for session in sessions for row in session.tokens]
        states = [h[-1] for h in self._encode(rows, read_cache=True)] if rows else []
        last = torch.stack(states) if states else torch.empty(0, self.hidden_size, dtype=self.dtype)
        return list(last.split([len(s.tokens) for s in sessions]))

    @property
    def kv_bytes_per_token(self) -> int:
        """What a session holds here per token (vLLM bounds its own cache)."""
        return TOKEN_BYTES

    def close(self) -> None:
        """Stop vLLM's engine processes."""
        self.llm.llm_engine.engine_core.shutdown()


def pre_norm_architecture(config: Any) -> str:
    """The registered class that serves f(c) for a Hugging Face config; others are refused."""
    names = list(getattr(config, "architectures", None) or [])
    for name in names:
        if name in vllm_models.PRE_NORM:
            return vllm_models.PRE_NORM[name].__name__
    covered = ", ".join(vllm_models.PRE_NORM)
    raise UnsupportedArchitecture(
        f"the vllm backend serves f(c), the final norm's input, for {covered}; this model is "
        f"{', '.join(names) or 'of no named architecture'}: serve it with --backend transformers"
    )


def _model_path(settings: Settings) -> str:
    """The folder or hub id vLLM loads (the embedded model's converted folder by default)."""
    if settings.model in (EMBEDDED_MODEL, ""):
        return str(embedded.ensure_embedded_model(settings.cache_dir))
    return settings.model
