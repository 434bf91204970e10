"""An adapter directory on disk, in the spirit of peft's: ``adapter_config.json`` (the kind's
config, see docs/design.md, "On-disk formats") and ``adapter_model.safetensors`` holding exactly
the kind's tensors. Configs are written last, so a config always has its weights beside it. No
pickle anywhere.
"""

from __future__ import annotations

import json
from pathlib import Path

import torch
from safetensors import SafetensorError
from safetensors.torch import load, save

from data_owner_client.adapter.base import (
    FORMAT,
    FORMAT_VERSION,
    KINDS,
    AdapterConfig,
    AdapterError,
    AdapterFingerprintError,
    AdapterModule,
)
from data_owner_client.adapter.ensemble import Ensemble
from data_owner_client.files import write_atomic
from shared.head import Head

CONFIG_FILE = "adapter_config.json"
WEIGHTS_FILE = "adapter_model.safetensors"


def build_adapter(
    config: AdapterConfig, head: Head | None = None, *, generator: torch.Generator | None = None
) -> AdapterModule:
    """A freshly initialised adapter of the config's kind and shape (``head``: the served model's;
    every kind but a plain ``pema`` reads its norm)."""
    return KINDS[config.kind].module.from_config(config, head, generator=generator)


def adapter_tensors(adapter: AdapterModule) -> dict[str, torch.Tensor]:
    """The adapter's saved tensors under their file names, detached, contiguous, on the CPU."""
    return {name: t.detach().cpu().contiguous() for name, t in adapter.state_dict().items()}


def save_adapter(directory: str | Path, adapter: AdapterModule, config: AdapterConfig) -> Path:
    """Write ``adapter_config.json`` and ``adapter_model.safetensors`` into ``directory``."""
    directory = Path(directory)
    directory.mkdir(parents=True, exist_ok=True)
    tensors = adapter_tensors(adapter)
    _check_tensors(tensors, config.tensor_shapes(), directory, exact=False)
    metadata = {"format": FORMAT, "format_version": str(FORMAT_VERSION)}
    write_atomic(directory / WEIGHTS_FILE, save(tensors, metadata=metadata))
    # The config goes last: a directory with a config always has matching weights next to it.
    write_atomic(directory / CONFIG_FILE, config.to_json().encode())
    return directory


def load_adapter(
    directory: str | Path,
    *,
    fingerprint: str | None = None,
    head: Head | None = None,
    device: str | torch.device = "cpu",
) -> tuple[AdapterModule, AdapterConfig]:
    """Load a saved adapter (in eval mode); with ``fingerprint``, refuse one trained elsewhere.

    Every kind but a ``pema`` adapter without ``input_norm`` needs the served model's ``head``.
    """
    directory = Path(directory)
    config = read_adapter_config(directory)
    if fingerprint is not None:
        check_fingerprint(directory, config, fingerprint)
    adapter = build_adapter(config, head)
    tensors = _read_tensors(directory)
    expected = {name: tuple(t.shape) for name, t in adapter.state_dict().items()}
    _check_tensors(tensors, expected, directory)
    adapter.load_state_dict(tensors)
    return adapter.to(device).eval(), config


def load_adapters(
    directories: list[str | Path],
    *,
    fingerprint: str | None = None,
    head: Head | None = None,
    device: str | torch.device = "cpu",
) -> tuple[AdapterModule, AdapterConfig]:
    """One adapter, or several of one kind and template as an :class:`Ensemble` that decodes
    with the first one's settings."""
    loaded = [
        load_adapter(d, fingerprint=fingerprint, head=head, device=device) for d in directories
    ]
    if len(loaded) == 1:
        return loaded[0]
    first = loaded[0][1]
    for directory, (_, config) in zip(directories[1:], loaded[1:], strict=True):
        if (config.kind, config.template) != (first.kind, first.template):
            raise AdapterError(
                f"an ensemble needs adapters of one kind and prompt template: {directory} is a "
                f"{config.kind} adapter with template {config.template!r}, {directories[0]} a "
                f"{first.kind} adapter with {first.template!r}"
            )
    return Ensemble([adapter for adapter, _ in loaded]).to(device).eval(), first


def read_adapter_config(directory: str | Path) -> AdapterConfig:
    """The config of the adapter saved in ``directory``."""
    directory = Path(directory)
    if not directory.is_dir():
        raise AdapterError(f"no adapter directory at {directory}: train one with pema-client train")
    path = directory / CONFIG_FILE
    if not path.is_file():
        raise AdapterError(f"{directory} has no {CONFIG_FILE}; is it an adapter directory?")
    try:
        return AdapterConfig.from_json(path.read_text())
    except json.JSONDecodeError as exc:
        raise AdapterError(f"{path} is not valid JSON: {exc}") from exc


def check_fingerprint(directory: Path, config: AdapterConfig, fingerprint: str) -> None:
    """Refuse an adapter trained on representations of a model other than ``fingerprint``."""
    if config.fingerprint == fingerprint:
        return
    trained_on = config.model_id or "an unnamed model"
    raise AdapterFingerprintError(
        f"adapter at {directory} was trained on {trained_on} (fingerprint {config.fingerprint!r}), "
        f"but the server serves fingerprint {fingerprint!r}: use the server that hosts the model "
        "it was trained on, or train a new adapter against this one"
    )


def _read_tensors(directory: Path) -> dict[str, torch.Tensor]:
    """The tensors of ``adapter_model.safetensors``."""
    path = directory / WEIGHTS_FILE
    if not path.is_file():
        raise AdapterError(f"{directory} has a config but no {WEIGHTS_FILE}: save it again")
    try:
        tensors = load(path.read_bytes())
    except SafetensorError as exc:
        raise AdapterError(f"{path} is not a valid safetensors file: {exc}") from exc
    return tensors


def _check_tensors(
    tensors: dict[str, torch.Tensor],
    expected: dict[str, tuple[int, ...]],
    where: Path,
    exact: bool = True,
) -> None:
    """The expected tensor names (exactly these, with ``exact``), each of its expected shape."""
    if sorted(tensors) != sorted(expected) if exact else not set(expected) <= set(tensors):
        raise AdapterError(f"{where} holds tensors {sorted(tensors)}, expected {sorted(expected)}")
    for name, shape in expected.items():
        if tuple(tensors[name].shape) != shape:
            raise AdapterError(
                f"adapter {name} at {where} has shape {tuple(tensors[name].shape)}, but its "
                f"config needs {shape}"
            )
