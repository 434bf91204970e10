"""The model runner: batched forward passes that return the representations f(c).

Every method runs on the one model thread (see :mod:`plm_owner_server.serving`), never on the
event loop. The representation is captured by a forward pre-hook on the final norm; the base model
runs without the LM head, and logits are computed only for the positions that asked for them.
"""

from __future__ import annotations

import hashlib
import itertools
import json
import logging
import os
from collections.abc import Callable, Iterator, Sequence
from pathlib import Path
from typing import Any, TypeVar

import torch
import torch.nn.functional as F
from safetensors import SafetensorError
from torch import nn
from transformers import AutoModelForCausalLM, AutoTokenizer, DynamicCache, PreTrainedModel

from plm_owner_server import embedded
from plm_owner_server.architectures import Logits, ModelHead
from plm_owner_server.kv import KVState, split, stack, stackable, width_groups
from plm_owner_server.settings import EMBEDDED_MODEL, Settings
from shared.codec import hash_tensors
from shared.protocol import LogitsMode

log = logging.getLogger(__name__)
T = TypeVar("T")


class ModelRunner:
    """A causal LM that answers with its pre-final-norm hidden states: the reference
    :class:`~plm_owner_server.backend.Backend`."""

    def __init__(self, model: PreTrainedModel, tokenizer: Any, model_id: str | None = None) -> None:
        self.model = model.eval()
        self.tokenizer = tokenizer
        self.config = model.config
        self.model_id = model_id or self.config.name_or_path or self.config.model_type
        self.architecture = str(self.config.model_type)
        self.head = ModelHead(model)
        self._base = model.base_model
        self._captured: torch.Tensor | None = None
        self._hook = None
        if self.head.capture is not None:
            self._hook = self.head.capture.register_forward_pre_hook(self._capture)
        embeddings = next(model.get_input_embeddings().parameters())
        self.device = embeddings.device
        self.dtype = embeddings.dtype
        self.hidden_size = int(self.config.hidden_size)
        self.vocab_size = int(self.head.lm_head.weight.shape[0])
        self.max_positions = _max_positions(self.config)
        self.eos_token_ids = _eos_ids(model, tokenizer)
        self.bos_token_id = getattr(tokenizer, "bos_token_id", None)
        self.fingerprint = fingerprint(model)
        self.prefill_columns = 1
        self._kv_bytes_per_token: int | None = None

    @classmethod
    def load(cls, settings: Settings) -> ModelRunner:
        """Load the model named by the settings (the embedded SmolLM2 by default)."""
        device = resolve_device(settings.device)
        dtype = resolve_dtype(settings.dtype, device)
        path = model_source(settings)
        if settings.model not in (EMBEDDED_MODEL, ""):
            return cls(*_from_pretrained(path, dtype, device), model_id=settings.model)
        try:
            model, tokenizer = _from_pretrained(path, dtype, device)
        except (OSError, ValueError, RuntimeError, SafetensorError) as exc:
            log.warning("embedded model cache is broken (%s); rebuilding", exc)
            embedded.ensure_embedded_model(settings.cache_dir, rebuild=True)
            model, tokenizer = _from_pretrained(path, dtype, device)
        return cls(model, tokenizer, model_id=embedded.MODEL_ID)

    def head_only(self) -> ModelHead:
        """The head, the rest of the model let go (the vllm backend holds the body itself)."""
        if self._hook is not None:
            self._hook.remove()
        self.model = self._base = None  # type: ignore[assignment]
        return self.head

    def _capture(self, module: nn.Module, args: tuple[Any, ...]) -> None:
        self._captured = args[0]

    def _forward(
        self,
        ids: torch.Tensor,
        mask: torch.Tensor | None = None,
        positions: torch.Tensor | None = None,
        cache: DynamicCache | None = None,
    ) -> torch.Tensor:
        """Representations [B, T, d] of a padded batch (and the cache filled, if given)."""
        self._captured = None
        out = self._base(
            input_ids=ids,
            attention_mask=mask,
            position_ids=positions,
            past_key_values=cache,
            use_cache=cache is not None,
        )
        return self._captured if self._captured is not None else out.last_hidden_state

    def _pad(self, rows: Sequence[Sequence[int]], left: bool) -> tuple[torch.Tensor, torch.Tensor]:
        width = max(map(len, rows))
        ids = torch.zeros(len(rows), width, dtype=torch.long)
        mask = torch.zeros(len(rows), width, dtype=torch.long)
        for b, row in enumerate(rows):
            cols = slice(width - len(row), width) if left else slice(0, len(row))
            ids[b, cols] = torch.as_tensor(row)
            mask[b, cols] = 1
        return ids.to(self.device), mask.to(self.device)

    @torch.inference_mode()
    def represent(
        self, rows: Sequence[Sequence[int]], starts: Sequence[int], max_batch_tokens: int
    ) -> list[torch.Tensor]:
        """Per row, the representations of positions ``start .. len-1`` ([n, d], model dtype)."""
        out: list[torch.Tensor] = [torch.empty(0)] * len(rows)
        for chunk in _chunks(rows, max_batch_tokens):
            batch = [rows[i] for i in chunk]
            ids, mask = self._pad(batch, left=False)
            ragged = len({len(r) for r in batch}) > 1
            hidden = self._forward(ids, mask if ragged else None)
            for j, i in enumerate(chunk):
                out[i] = hidden[j, starts[i] : len(rows[i])]
        return out

    def logits(self, hidden: torch.Tensor, mode: LogitsMode) -> Logits:
        """``H(hidden)``: all logits, or the top-k (values, int32 indices)."""
        return self.head.logits(hidden, mode)

    @torch.inference_mode()
    def open_session(self, rows: Sequence[Sequence[int]]) -> tuple[KVState, torch.Tensor]:
        """Prefill left-padded prompts; returns the cache and each row's last representation."""
        (state,) = self.start_sessions([rows])
        (hidden,) = self.prefill_sessions([(state, max(map(len, rows)))])
        return state, torch.stack([h[-1] for h in hidden])

    def start_sessions(self, sessions: Sequence[Sequence[Sequence[int]]]) -> list[KVState]:
        """Per session an empty cache and its prompts left-padded, for :meth:`prefill_sessions`."""
        states = []
        for rows in sessions:
            ids, mask = self._pad(rows, left=True)
            cache = DynamicCache(config=self.config)
            states.append(KVState(cache, mask[:, :0], list(range(len(rows))), (ids, mask)))
        return states

    @torch.inference_mode()
    def prefill_sessions(self, chunks: Sequence[tuple[KVState, int]]) -> list[list[torch.Tensor]]:
        """Read each session's prompts up to column ``end`` of their left-padded layout; per
        session, each row's f(c) at its positions read now (``[n, d]``, n ≥ 0). Sessions read
        whole at once share passes (one per group of similar widths); chunks run one by one."""

        def whole(state: KVState, end: int) -> bool:
            return state.width == 0 and state.prompt is not None and end == state.prompt[0].shape[1]

        out: dict[int, list[torch.Tensor]] = {}
        starts = [i for i, (state, end) in enumerate(chunks) if whole(state, end)]
        sizes = [(end, len(state.rows)) for state, end in (chunks[i] for i in starts)]
        grouped = _by_width(sizes, lambda g: self._prefill([chunks[starts[j]][0] for j in g]))
        out.update(zip(starts, grouped, strict=True))
        for i, (state, end) in enumerate(chunks):
            if i not in out:
                out[i] = self._extend(state, end)
        return [out[i] for i in range(len(chunks))]

    def _prefill(self, states: list[KVState]) -> list[list[torch.Tensor]]:
        """Read several sessions' whole prompts in one pass, their rows stacked (left-padded to
        the widest) and their caches split back; one by one where caches cannot be split."""
        if len(states) == 1:
            return [self._extend(states[0], states[0].prompt[0].shape[1])]  # type: ignore[index]
        prompts = [s.prompt for s in states if s.prompt is not None]
        width = max(ids.shape[1] for ids, _ in prompts)
        ids = torch.cat([F.pad(ids, (width - ids.shape[1], 0)) for ids, _ in prompts])
        mask = torch.cat([F.pad(mask, (width - mask.shape[1], 0)) for _, mask in prompts])
        joined = KVState(DynamicCache(config=self.config), mask[:, :0], [], (ids, mask))
        hidden = self._extend(joined, width)
        if not stackable([joined]):
            return [self._extend(s, s.prompt[0].shape[1]) for s in states]  # type: ignore[index]
        widths = [(s.rows, ids.shape[1]) for s, (ids, _) in zip(states, prompts, strict=True)]
        parts = split(joined, widths, self.config)
        for state, part in zip(states, parts, strict=True):
            state.cache, state.mask, state.prompt = part.cache, part.mask, None
        ends = list(itertools.accumulate(len(s.rows) for s in states))
        return [hidden[end - len(s.rows) : end] for s, end in zip(states, ends, strict=True)]

    def _extend(self, state: KVState, end: int) -> list[torch.Tensor]:
        """Read columns ``width .. end - 1`` of the state's prompt into its cache; each row's
        f(c) of its real tokens among them (a suffix of the chunk: the prompt is left-padded)."""
        if state.prompt is None:
            raise ValueError("this session's prompts are read already")
        ids, full = state.prompt
        start = state.width
        positions = (full.cumsum(-1) - 1).clamp(min=0)[:, start:end]
        hidden = self._forward(ids[:, start:end], full[:, :end], positions, state.cache)
        state.mask = full[:, :end]  # only once the pass succeeded
        if end == full.shape[1]:
            state.prompt = None
        real = full[:, start:end].sum(-1).tolist()
        return [hidden[b, end - start - n :] for b, n in enumerate(real)]

    @torch.inference_mode()
    def step_session(
        self, state: KVState, rows: Sequence[int], tokens: Sequence[int]
    ) -> torch.Tensor:
        """Append one token to each listed row; rows left out are dropped from the cache."""
        return self.step_sessions([(state, rows, tokens)])[0]

    @torch.inference_mode()
    def step_sessions(
        self, steps: Sequence[tuple[KVState, Sequence[int], Sequence[int]]]
    ) -> list[torch.Tensor]:
        """One step of several sessions (state, rows, tokens), in one pass where caches stack."""
        for state, rows, _ in steps:
            state.select(rows)

        def step(group: list[int]) -> list[torch.Tensor]:
            states = [steps[i][0] for i in group]
            tokens = [steps[i][2] for i in group]
            if len(group) == 1:
                return [self._step(states[0], tokens[0])]
            if not stackable(states):
                return [self._step(s, t) for s, t in zip(states, tokens, strict=True)]
            stacked = stack(states, self.config)
            joined = self._step(stacked, [t for ts in tokens for t in ts])
            parts = split(stacked, [(s.rows, s.width + 1) for s in states], self.config)
            for state, part in zip(states, parts, strict=True):
                state.cache, state.mask = part.cache, part.mask
            return list(joined.split([len(s.rows) for s in states]))

        return _by_width([(s.width, len(s.rows)) for s, _, _ in steps], step)

    def _step(self, state: KVState, tokens: Sequence[int]) -> torch.Tensor:
        positions = state.mask.sum(-1, keepdim=True)
        mask = torch.cat([state.mask, state.mask.new_ones(len(tokens), 1)], dim=-1)
        ids = torch.tensor(tokens, device=self.device).unsqueeze(-1)
        hidden = self._forward(ids, mask, positions, state.cache)[:, -1]
        state.mask = mask  # only once the pass succeeded (a failed one is dropped by the server)
        return hidden

    def close(self) -> None:
        """Nothing to release: the model lives in this process."""

    @property
    def kv_bytes_per_token(self) -> int:
        """Cache bytes one token of one row costs (measured once on a one-token prompt)."""
        if self._kv_bytes_per_token is None:
            state, _ = self.open_session([[0]])
            self._kv_bytes_per_token = state.nbytes
        return self._kv_bytes_per_token


def _by_width(sizes: Sequence[tuple[int, int]], run: Callable[[list[int]], list[T]]) -> list[T]:
    """``run`` over each group of :func:`width_groups` of ``sizes`` (width, rows); the results
    back in the order of ``sizes``."""
    out: dict[int, T] = {}
    for group in width_groups(sizes):
        out.update(zip(group, run(group), strict=True))
    return [out[i] for i in range(len(sizes))]


def _chunks(rows: Sequence[Sequence[int]], max_tokens: int) -> Iterator[list[int]]:
    """Row indices in batches of at most ``max_tokens`` padded tokens, longest rows first."""
    order = sorted(range(len(rows)), key=lambda i: -len(rows[i]))
    chunk: list[int] = []
    for i in order:
        # Sorted longest first, so the chunk's width is its first row's length.
        width = len(rows[chunk[0]]) if chunk else len(rows[i])
        if chunk and (len(chunk) + 1) * width > max_tokens:
            yield chunk
            chunk = []
        chunk.append(i)
    if chunk:
        yield chunk


def model_source(settings: Settings) -> str:
    """The hub id or folder the settings name (the embedded model's converted folder by
    default, converted first if need be)."""
    if settings.model in (EMBEDDED_MODEL, ""):
        return str(embedded.ensure_embedded_model(settings.cache_dir))
    name = os.path.expanduser(settings.model)
    if name.startswith(("/", ".")) and not Path(name).is_dir():
        raise ValueError(f"--model {settings.model}: no such folder")
    return name


def resolve_device(name: str) -> torch.device:
    if name != "auto":
        return torch.device(name)
    if torch.cuda.is_available():
        return torch.device("cuda")
    if torch.backends.mps.is_available():
        return torch.device("mps")
    return torch.device("cpu")


def resolve_dtype(name: str, device: torch.device) -> torch.dtype:
    if name != "auto":
        return getattr(torch, name)
    if device.type == "cuda" and torch.cuda.is_bf16_supported():
        return torch.bfloat16
    return torch.float32


def _from_pretrained(
    path: str, dtype: torch.dtype, device: torch.device
) -> tuple[PreTrainedModel, Any]:
    # Several GPUs: let accelerate shard the model over them.
    shard = device.type == "cuda" and device.index is None and torch.cuda.device_count() > 1
    model = AutoModelForCausalLM.from_pretrained(
        path, dtype=dtype, device_map="auto" if shard else None
    )
    if not shard:
        model.to(device)  # type: ignore[arg-type]  # transformers' stub wraps .to
    tokenizer = AutoTokenizer.from_pretrained(path)
    return model, tokenizer


def _max_positions(config: Any) -> int:
    for attr in ("max_position_embeddings", "n_positions", "max_sequence_length"):
        value = getattr(config, attr, None)
        if isinstance(value, int) and value > 0:
            return value
    raise ValueError(f"cannot tell the context length of {config.model_type}")


def _eos_ids(model: PreTrainedModel, tokenizer: Any) -> list[int]:
    ids: set[int] = set()
    for source in (getattr(model, "generation_config", None), model.config, tokenizer):
        value = getattr(source, "eos_token_id", None)
        if isinstance(value, int):
            ids.add(value)
        elif isinstance(value, list):
            ids.update(value)
    return sorted(ids)


_VOLATILE_CONFIG_KEYS = ("_name_or_path", "name_or_path", "transformers_version", "_commit_hash")


def fingerprint(model: PreTrainedModel) -> str:
    """SHA-256 of the config and of every weight as served (names, dtypes, shapes, bytes)."""
    config = {k: v for k, v in model.config.to_dict().items() if k not in _VOLATILE_CONFIG_KEYS}
    digest = hashlib.sha256(json.dumps(config, sort_keys=True, default=str).encode())
    hash_tensors(digest, model.state_dict())
    return "sha256:" + digest.hexdigest()
