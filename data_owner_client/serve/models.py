"""The models ``pema-client serve`` offers: each adapter under its name, and the PLM alone under
the served model's id, each with a generator and an engine."""

from __future__ import annotations

import dataclasses
import logging
import time
from dataclasses import dataclass
from pathlib import Path

from data_owner_client.adapter import load_adapter
from data_owner_client.client import PemaClient
from data_owner_client.data import TEMPLATES
from data_owner_client.devices import resolve_device
from data_owner_client.generate import GenerationConfig, Generator
from data_owner_client.serve.engine import Engine, SessionPool
from data_owner_client.serve.protocol import ModelCard
from data_owner_client.serve.settings import ServeSettings
from data_owner_client.served_model import ServedModel

log = logging.getLogger(__name__)


@dataclass
class ServedAdapter:
    """One model of ``/v1/models``: an adapter (or the PLM alone) and the engine decoding it."""

    id: str
    generator: Generator
    engine: Engine
    kind: str | None  # the adapter's kind; None for the PLM alone
    template: str | None  # the prompt template the adapter was trained with
    created: int

    def card(self) -> ModelCard:
        """The model as ``/v1/models`` lists it."""
        return ModelCard(
            id=self.id,
            created=self.created,
            owned_by="plm-owner" if self.kind is None else "data-owner",
            adapter_kind=self.kind,
            template=self.template,
        )


def serving_models(
    settings: ServeSettings, client: PemaClient, served: ServedModel
) -> list[ServedAdapter]:
    """The PLM alone, then each ``--adapter NAME=DIR`` (loaded and checked against the served
    model now, so a wrong one fails before the service starts)."""
    limits = served.info.limits
    if served.head is not None:  # one copy on the device for every model's generator
        served = dataclasses.replace(served, head=served.head.to(resolve_device(settings.device)))
    config = GenerationConfig(
        max_new_tokens=settings.max_tokens or limits.max_new_tokens + 1,
        batch_size=limits.max_batch_size,
        hidden_dtype=settings.hidden_dtype,
        reconnect_s=settings.reconnect_s,
        device=settings.device,
        num_beams=1,  # one hypothesis per choice: an adapter's stored width is generate's
    )
    sessions = SessionPool(min(settings.max_sessions, limits.max_sessions_per_key))
    plm = served.info.model_id
    adapters: dict[str, Path] = settings.adapters()
    if plm in adapters:
        raise ValueError(f"--adapter {plm}=...: that name is the PLM's own; choose another")
    now = int(time.time())

    def model(
        name: str, generator: Generator, kind: str | None, template: str | None
    ) -> ServedAdapter:
        engine = Engine(generator, sessions, name)
        return ServedAdapter(name, generator, engine, kind, template, now)

    models = [model(plm, Generator(client, served, config, TEMPLATES["plain"]), None, None)]
    for name, folder in adapters.items():
        adapter, adapter_config = load_adapter(
            folder, fingerprint=served.info.fingerprint, head=served.head
        )
        generator = Generator(
            client, served, config, adapter_config.template, adapter, adapter_config
        )
        models.append(model(name, generator, adapter_config.kind, adapter_config.template))
        log.info("serving %s (%s adapter) as %r", folder, adapter_config.kind, name)
    return models
