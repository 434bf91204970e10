"""What the data owner needs of the served model, fetched once and cached by its fingerprint:
the model description, the tokenizer and the output head."""

from __future__ import annotations

import logging
import os
import shutil
import tempfile
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from transformers import AutoTokenizer

from data_owner_client.client import PemaClient
from shared.head import Head
from shared.protocol import ModelInfo

log = logging.getLogger(__name__)
INFO, TOKENIZER, HEAD = "model.json", "tokenizer", "head.safetensors"


def default_cache_dir() -> Path:
    """``$PEMA_CLIENT_CACHE``, else ``$XDG_CACHE_HOME/pema/client`` (``~/.cache/pema/client``)."""
    if explicit := os.environ.get("PEMA_CLIENT_CACHE"):
        return Path(explicit)
    return Path(os.environ.get("XDG_CACHE_HOME", Path.home() / ".cache")) / "pema" / "client"


@dataclass
class ServedModel:
    info: ModelInfo
    tokenizer: Any  # a transformers tokenizer
    head: Head | None  # None when the owner does not share it and it was not required

    @property
    def eos_token_id(self) -> int:
        """The token a target ends with (the model's first EOS id)."""
        if not self.info.eos_token_ids:
            raise ValueError(f"{self.info.model_id} declares no EOS token; cannot end targets")
        return self.info.eos_token_ids[0]

    @classmethod
    def fetch(
        cls, client: PemaClient, cache_dir: Path | None = None, need_head: bool = True
    ) -> ServedModel:
        """The served model's files, from the cache when its fingerprint was seen before."""
        info = client.model_info()
        if need_head and not info.head_shared:
            raise PermissionError(
                f"the server does not share the output head of {info.model_id}; PEMA needs it "
                "to train and decode (ask the model's owner to run without --no-share-head)"
            )
        folder = (cache_dir or default_cache_dir()) / info.fingerprint.replace(":", "-")
        try:
            return cls._load(folder, info, need_head)
        except (OSError, ValueError) as exc:  # missing, partial or corrupt: fetch again
            if folder.exists():
                log.warning("model cache %s is unusable (%s); fetching again", folder, exc)
        _download(client, info, folder)
        return cls._load(folder, info, need_head)

    @classmethod
    def _load(cls, folder: Path, info: ModelInfo, need_head: bool) -> ServedModel:
        cached = ModelInfo.model_validate_json((folder / INFO).read_bytes())
        if cached.fingerprint != info.fingerprint:
            raise ValueError(f"{folder} holds {cached.fingerprint}")
        head_file = folder / HEAD
        head = Head.from_file(head_file) if info.head_shared else None
        if head is not None and head.output_weight.shape[0] != info.vocab_size:
            raise ValueError(f"{head_file} does not match the model's vocabulary")
        tokenizer = AutoTokenizer.from_pretrained(folder / TOKENIZER)
        return cls(info, tokenizer, head)


def _download(client: PemaClient, info: ModelInfo, folder: Path) -> None:
    """Fetch into a temporary folder, then rename it into place (a crash leaves no half cache)."""
    folder.parent.mkdir(parents=True, exist_ok=True)
    tmp = Path(tempfile.mkdtemp(dir=folder.parent, prefix=f".{folder.name}-"))
    try:
        client.download_tokenizer(tmp / TOKENIZER)
        if info.head_shared:
            (tmp / HEAD).write_bytes(client.head_bytes())
        (tmp / INFO).write_text(info.model_dump_json(indent=2))
        shutil.rmtree(folder, ignore_errors=True)
        tmp.rename(folder)
    finally:
        shutil.rmtree(tmp, ignore_errors=True)
    log.info("cached %s (%s) in %s", info.model_id, info.fingerprint, folder)
