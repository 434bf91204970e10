"""What the app holds while it runs: the model, its services and what it serves as files."""

from __future__ import annotations

import io
import tempfile
import zipfile
from dataclasses import dataclass
from pathlib import Path

from plm_owner_server.auth import ApiKeys
from plm_owner_server.backend import Backend
from plm_owner_server.metrics import Metrics
from plm_owner_server.quota import Quotas
from plm_owner_server.serving import ModelWork, Representer, SessionService
from plm_owner_server.settings import Settings
from shared.head import head_to_bytes
from shared.protocol import Limits, ModelInfo


@dataclass
class AppState:
    settings: Settings
    backend: Backend
    keys: ApiKeys
    metrics: Metrics
    work: ModelWork
    representer: Representer
    sessions: SessionService
    model_info: ModelInfo
    tokenizer_zip: bytes
    head_bytes: bytes | None

    @classmethod
    def build(
        cls, settings: Settings, backend: Backend, keys: ApiKeys, metrics: Metrics
    ) -> AppState:
        work = ModelWork(settings, metrics, Quotas(keys.quotas, settings.tokens_per_minute))
        head = backend.head
        return cls(
            settings=settings,
            backend=backend,
            keys=keys,
            metrics=metrics,
            work=work,
            representer=Representer(backend, settings, work, metrics),
            sessions=SessionService(backend, settings, work, metrics),
            model_info=model_info(backend, settings),
            tokenizer_zip=tokenizer_zip(backend),
            head_bytes=head_to_bytes(head.tensors(), head.spec) if settings.share_head else None,
        )


def model_info(runner: Backend, settings: Settings) -> ModelInfo:
    return ModelInfo(
        model_id=runner.model_id,
        architecture=runner.architecture,
        hidden_size=runner.hidden_size,
        vocab_size=runner.vocab_size,
        max_positions=runner.max_positions,
        dtype=str(runner.dtype).removeprefix("torch."),
        fingerprint=runner.fingerprint,
        head_shared=settings.share_head,
        eos_token_ids=runner.eos_token_ids,
        bos_token_id=runner.bos_token_id,
        limits=Limits(
            max_batch_size=settings.max_batch_size,
            max_request_tokens=settings.max_request_tokens,
            max_body_bytes=settings.max_body_bytes,
            max_logits_values=settings.max_logits_values,
            max_new_tokens=settings.max_new_tokens,
            max_sessions_per_key=settings.max_sessions_per_key,
            session_ttl_s=settings.session_ttl_s,
            max_batch_tokens=settings.max_batch_tokens,
        ),
    )


def tokenizer_zip(runner: Backend) -> bytes:
    """The tokenizer's files, as ``save_pretrained`` writes them, zipped at the archive root."""
    buffer = io.BytesIO()
    with tempfile.TemporaryDirectory() as tmp:
        runner.tokenizer.save_pretrained(tmp)
        with zipfile.ZipFile(buffer, "w", zipfile.ZIP_DEFLATED) as archive:
            for path in sorted(Path(tmp).iterdir()):
                archive.write(path, path.name)
    return buffer.getvalue()
