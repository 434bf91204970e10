"""What the server needs from a model engine. :class:`~plm_owner_server.runner.ModelRunner`
(transformers, in process) is the reference implementation; docs/scale.md says how an existing
engine would implement it.

Every method runs on the server's one model thread; batching across API keys is the scheduler's
job (:mod:`plm_owner_server.scheduler`): a backend gets each pass's work already gathered.
Representations are f(c), the input of the model's final norm, as ``[n, d]`` tensors.
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any, Protocol

import torch

from plm_owner_server.architectures import Logits, ModelHead
from plm_owner_server.settings import Settings
from shared.protocol import LogitsMode

__all__ = ["Backend", "Logits", "SessionState", "load_backend", "open_sessions"]


class SessionState(Protocol):
    """A session's cache as the backend keeps it."""

    @property
    def rows(self) -> list[int]:
        """The caller's ids of the rows still alive."""
        ...

    @property
    def nbytes(self) -> int:
        """Memory the cache holds now (the server bounds the sum over sessions)."""
        ...

    def select(self, rows: Sequence[int], parents: Sequence[int] | None = None) -> None:
        """Keep only the listed rows, in that order; with ``parents``, row ``k`` continues a
        copy of live row ``parents[k]``."""
        ...


class Backend(Protocol):
    model_id: str
    architecture: str
    hidden_size: int
    vocab_size: int
    max_positions: int
    dtype: torch.dtype
    fingerprint: str  # of the weights as served
    eos_token_ids: list[int]
    bos_token_id: int | None
    tokenizer: Any  # saved with ``save_pretrained`` for GET /v1/tokenizer
    head: ModelHead  # exported for GET /v1/head
    prefill_columns: int  # a chunk of a session's prompts ends on a multiple of these columns

    @property
    def kv_bytes_per_token(self) -> int:
        """Cache bytes one token of one row costs (to refuse sessions that cannot fit)."""
        ...

    def represent(
        self, rows: Sequence[Sequence[int]], starts: Sequence[int], max_batch_tokens: int
    ) -> list[torch.Tensor]:
        """Per row, f(c) of positions ``start .. len-1``; passes of at most the padded budget."""
        ...

    def logits(self, hidden: torch.Tensor, mode: LogitsMode) -> Logits:
        """The head applied to representations: all logits or the top-k."""
        ...

    def start_sessions(self, sessions: Sequence[Sequence[Sequence[int]]]) -> list[Any]:
        """Per session (its rows' prompts) a state with nothing read yet; cheap: the reading is
        :meth:`prefill_sessions`'s, in one go or in chunks."""
        ...

    def prefill_sessions(self, chunks: Sequence[tuple[Any, int]]) -> list[list[torch.Tensor]]:
        """Per (state, end): read the session's prompts up to column ``end`` of their
        right-aligned layout (a row of length L holds its token j at column W - L + j, W the
        session's longest prompt; before W a backend may stop a row short of it, as the vLLM
        backend does at a cache-block boundary); each row's f(c) at the positions read now
        (``[n, d]``, n ≥ 0), in order. A session's chunks come in order and end at W, when every
        position is read; then it can step."""
        ...

    def step_sessions(
        self, steps: Sequence[tuple[Any, Sequence[int], Sequence[int]]]
    ) -> list[torch.Tensor]:
        """Per (state, rows, tokens): append one token to each listed row, drop the unlisted
        rows, and return the new f(c) of the listed rows. A closed session's state is simply
        dropped by the server."""
        ...

    def close(self) -> None:
        """Release the engine (its processes, its memory) when the server stops."""
        ...


def load_backend(settings: Settings) -> Backend:
    """The engine ``settings.backend`` names, with the model loaded."""
    if settings.backend == "vllm":
        try:
            from plm_owner_server.vllm_backend import VllmBackend
        except ImportError as exc:
            raise RuntimeError(
                f"--backend vllm needs vLLM, which this environment lacks ({exc}): run `make "
                "vllm` and start .venv-vllm/bin/pema-server"
            ) from exc
        return VllmBackend.load(settings)
    from plm_owner_server.runner import ModelRunner

    return ModelRunner.load(settings)


def open_sessions(
    backend: Backend, sessions: Sequence[Sequence[Sequence[int]]]
) -> list[tuple[Any, list[torch.Tensor]]]:
    """Prefill each session's prompts whole; per session its state and each row's f(c) at every
    prompt position (``[len, d]`` per row)."""
    states = backend.start_sessions(sessions)
    ends = [max(map(len, prompts)) for prompts in sessions]
    hidden = backend.prefill_sessions(list(zip(states, ends, strict=True)))
    return list(zip(states, hidden, strict=True))
