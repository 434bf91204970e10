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

import secrets
from collections.abc import Sequence
from dataclasses import dataclass, field
from typing import Any

import torch
from transformers import AutoConfig
from vllm import LLM
from vllm.config import PoolerConfig
from vllm.inputs import TokensPrompt
from vllm.pooling_params import PoolingParams

from plm_owner_server import vllm_plugin
from plm_owner_server.architectures import Logits, UnsupportedArchitecture
from plm_owner_server.runner import ModelRunner, model_source, resolve_device, resolve_dtype
from plm_owner_server.settings import Settings
from shared.protocol import LogitsMode


def _salt() -> str:
    return secrets.token_hex(16)


@dataclass
class TokenSession:
    """A session on vLLM: each live row's tokens so far (its cache lives in vLLM's blocks, under
    the session's own salt, so no other session or key reads them)."""

    tokens: list[list[int]]
    token_bytes: int  # the engine's KV-cache bytes per token: what the session costs it
    rows: list[int] = field(default_factory=list)  # the caller's ids of the live rows
    salt: str = field(default_factory=_salt)
    read: int = 0  # prompt columns read (right-aligned), while the prompts are read in chunks

    def __post_init__(self) -> None:
        self.rows = self.rows or list(range(len(self.tokens)))

    @property
    def nbytes(self) -> int:
        return self.token_bytes * sum(map(len, self.tokens))

    def select(self, rows: Sequence[int], parents: Sequence[int] | None = None) -> None:
        """Keep only the listed rows, in that order (the rest are finished); with ``parents``,
        row ``k`` continues live row ``parents[k]``'s tokens (their cached blocks are shared)."""
        where = {r: i for i, r in enumerate(self.rows)}
        # Rows are never changed in place (a step builds new lists): forks may share one.
        self.tokens = [self.tokens[where[r]] for r in (rows if parents is None else parents)]
        self.rows = list(rows)

    def grown(self, tokens: Sequence[int]) -> list[list[int]]:
        """Each row with one more token."""
        return [row + [token] for row, token in zip(self.tokens, tokens, strict=True)]


class VllmBackend:
    """A causal LM on vLLM that answers with f(c), as the transformers runner does."""

    def __init__(self, llm: LLM, reference: ModelRunner, block_size: int) -> None:
        self.llm = llm
        # Chunks of a prompt end on block boundaries: each reads the blocks cached before it
        # whole, instead of recomputing the part of a block the last chunk left.
        self.prefill_columns = block_size
        self.model_id, self.architecture = reference.model_id, reference.architecture
        self.hidden_size, self.vocab_size = reference.hidden_size, reference.vocab_size
        self.max_positions, self.dtype = reference.max_positions, reference.dtype
        self.fingerprint, self.tokenizer = reference.fingerprint, reference.tokenizer
        self.eos_token_ids, self.bos_token_id = reference.eos_token_ids, reference.bos_token_id
        self.kv_bytes_per_token = kv_bytes_per_token(reference.config, reference.dtype)
        self.head = reference.head_only()  # the norm and lm_head; the body is vLLM's
        self.cached_tokens = self.computed_tokens = 0  # of session steps and openings

    @classmethod
    def load(cls, settings: Settings) -> VllmBackend:
        """Start vLLM on the model named by the settings (the embedded SmolLM2 by default)."""
        path = model_source(settings)
        architecture = pre_norm_architecture(AutoConfig.from_pretrained(path))
        device = resolve_device(settings.device)
        dtype = str(resolve_dtype(settings.dtype, device)).removeprefix("torch.")
        # The same weights in the same dtype as the transformers backend: the same fingerprint.
        reference = ModelRunner.load(settings.model_copy(update={"device": "cpu", "dtype": dtype}))
        tp = settings.tensor_parallel_size
        vllm_plugin.register()
        llm = LLM(
            model=path,
            runner="pooling",
            convert="embed",
            dtype=dtype,
            hf_overrides={"architectures": [architecture]},
            pooler_config=PoolerConfig(task="token_embed", tok_pooling_type="ALL"),
            enable_prefix_caching=True,
            block_size=settings.vllm_block_size,
            max_model_len=reference.max_positions,
            tensor_parallel_size=tp,
            distributed_executor_backend="mp" if tp > 1 else None,
            kv_cache_memory_bytes=settings.max_kv_cache_bytes // tp,  # vLLM's is per rank
            enforce_eager=device.type == "cpu",  # graphs and compilation pay off on GPUs
            seed=0,
        )
        return cls(llm, reference, settings.vllm_block_size)

    def _encode(
        self, rows: Sequence[Sequence[int]], salts: Sequence[str] | None = None
    ) -> list[torch.Tensor]:
        """Each row's states of the positions vLLM computed. Without salts: all of them, the
        cache unread; with one per row, those after the prefix cached under the row's salt."""
        read = salts is not None
        params = PoolingParams(use_activation=False, skip_reading_prefix_cache=not read)
        prompts = [
            TokensPrompt(prompt_token_ids=list(row), cache_salt=salt)
            for row, salt in zip(rows, salts or [_salt() for _ in rows], strict=True)
        ]
        outputs = self.llm.encode(
            prompts, pooling_task="token_embed", pooling_params=params, use_tqdm=False
        )
        if read:
            cached = sum(out.num_cached_tokens or 0 for out in outputs)
            self.cached_tokens += cached
            self.computed_tokens += sum(map(len, rows)) - cached
        states = [out.outputs.data.to(self.dtype) for out in outputs]
        if any(h.shape[-1] != self.hidden_size for h in states):
            raise RuntimeError(f"vLLM returned states of another width than {self.hidden_size}")
        return states

    def represent(
        self, rows: Sequence[Sequence[int]], starts: Sequence[int], max_batch_tokens: int
    ) -> list[torch.Tensor]:
        """Per row, f(c) of positions ``start .. len-1`` (vLLM schedules the passes)."""
        hidden = self._encode(rows)
        if [len(h) for h in hidden] != [len(row) for row in rows]:
            raise RuntimeError("vLLM returned another number of states than tokens sent")
        return [h[start:] for h, start in zip(hidden, starts, strict=True)]

    def logits(self, hidden: torch.Tensor, mode: LogitsMode) -> Logits:
        """``H(hidden)`` with the model's own head, as the transformers backend computes it."""
        return self.head.logits(hidden, mode)

    def start_sessions(self, sessions: Sequence[Sequence[Sequence[int]]]) -> list[TokenSession]:
        """A session per prompts, nothing read yet."""
        return [
            TokenSession([list(p) for p in prompts], self.kv_bytes_per_token)
            for prompts in sessions
        ]

    def prefill_sessions(
        self, chunks: Sequence[tuple[TokenSession, int]]
    ) -> list[list[torch.Tensor]]:
        """Each session's rows read up to column ``end`` of their right-aligned layout, all in
        one call to the engine. Before the last chunk a row stops at the block boundary below
        it, so that the next chunk reads the blocks cached under the session's salt whole and
        computes only new positions."""
        wanted: list[tuple[int, int, list[int], str]] = []  # (session, row, tokens, salt)
        new: list[list[int]] = []  # per session, per row, positions read now
        for k, (state, end) in enumerate(chunks):
            width = max(map(len, state.tokens))

            def upto(column: int, length: int, width: int = width) -> int:
                if column >= width:
                    return length
                block = self.prefill_columns
                return max(0, column - width + length) // block * block

            counts = []
            for b, row in enumerate(state.tokens):
                before, after = upto(state.read, len(row)), upto(end, len(row))
                counts.append(after - before)
                if after > before:
                    wanted.append((k, b, row[:after], state.salt))
            new.append(counts)
        # Rows alike in a session (samples of one prompt) are computed once.
        unique: dict[tuple[str, tuple[int, ...]], int] = {}
        index = [unique.setdefault((salt, tuple(row)), len(unique)) for *_, row, salt in wanted]
        rows, salts = [list(row) for _, row in unique], [salt for salt, _ in unique]
        states = self._encode(rows, salts) if rows else []
        # A row that shares a prefix with a longer one of its session may find more of it
        # cached than it has read: those are read again without the cache, for every state.
        need = [0] * len(rows)
        for (k, b, _, _), u in zip(wanted, index, strict=True):
            need[u] = max(need[u], new[k][b])
        short = [u for u, h in enumerate(states) if len(h) < need[u]]
        if short:
            again = self._encode([rows[u] for u in short])
            for u, h in zip(short, again, strict=True):
                states[u] = h
        empty = torch.empty(0, self.hidden_size, dtype=self.dtype)
        out = [[empty] * len(counts) for counts in new]
        for (k, b, _, _), u in zip(wanted, index, strict=True):
            out[k][b] = states[u][len(states[u]) - new[k][b] :]
        for state, end in chunks:
            state.read = end
        return out

    def step_sessions(
        self, steps: Sequence[tuple[TokenSession, Sequence[int], Sequence[int]]]
    ) -> list[torch.Tensor]:
        """One token more for each listed row of each session, in one call to the engine."""
        for state, rows, _ in steps:
            state.select(rows)
        grown = [(state, state.grown(tokens)) for state, _, tokens in steps]
        hidden = self._last_states(grown)
        for state, tokens in grown:
            state.tokens = tokens  # only once the pass succeeded
        return hidden

    def _last_states(
        self, sessions: Sequence[tuple[TokenSession, list[list[int]]]]
    ) -> list[torch.Tensor]:
        """f(c) of each row's last position ``[rows, d]`` per session, all in one call to the
        engine, each row reading the prefix its session cached."""
        rows = [row for _, tokens in sessions for row in tokens]
        salts = [session.salt for session, tokens in sessions for _ in tokens]
        states = [h[-1] for h in self._encode(rows, salts)] if rows else []
        last = torch.stack(states) if states else torch.empty(0, self.hidden_size, dtype=self.dtype)
        return list(last.split([len(tokens) for _, tokens in sessions]))

    def close(self) -> None:
        """Stop vLLM's engine processes."""
        self.llm.llm_engine.engine_core.shutdown()


def kv_bytes_per_token(config: Any, dtype: torch.dtype) -> int:
    """KV-cache bytes one token costs the engine: keys and values of every layer."""
    heads = getattr(config, "num_key_value_heads", None) or config.num_attention_heads
    head_dim = getattr(config, "head_dim", None) or config.hidden_size // config.num_attention_heads
    item = torch.empty(0, dtype=dtype).element_size()
    return int(config.num_hidden_layers * 2 * heads * head_dim * item)


def pre_norm_architecture(config: Any) -> str:
    """The registered class that serves f(c) for a Hugging Face config; others are refused."""
    names = list(getattr(config, "architectures", None) or [])
    for name in names:
        if name in vllm_plugin.PRE_NORM:
            return vllm_plugin.PRE_NORM[name]
    covered = ", ".join(vllm_plugin.PRE_NORM)
    raise UnsupportedArchitecture(
        f"the vllm backend serves f(c), the final norm's input, for {covered}; this model is "
        f"{', '.join(names) or 'of no named architecture'}: serve it with --backend transformers"
    )
