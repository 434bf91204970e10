"""The embedded model cache: converted once, found again, rebuilt when missing or broken."""

from __future__ import annotations

import json
import shutil
from pathlib import Path

import pytest

from plm_owner_server import embedded
from plm_owner_server.embedded import MARKER, ensure_embedded_model
from plm_owner_server.runner import ModelRunner
from plm_owner_server.settings import Settings

pytestmark = pytest.mark.slow


@pytest.fixture(scope="module")
def converted() -> Path:
    """The real converted folder (made by `make model`, or here on first use)."""
    return ensure_embedded_model(Settings().cache_dir)


@pytest.fixture
def conversions(monkeypatch, converted):
    """Count conversions; each one copies the real converted folder instead of re-running it."""
    calls: list[Path] = []

    def fake_convert(source: Path, target: Path, stamp: dict) -> None:
        calls.append(target)
        shutil.rmtree(target, ignore_errors=True)
        shutil.copytree(converted, target)
        (target / MARKER).write_text(json.dumps(stamp))

    monkeypatch.setattr(embedded, "_convert", fake_convert)
    return calls


def test_converted_folder_is_a_plain_transformers_model(converted):
    config = json.loads((converted / "config.json").read_text())
    assert config["model_type"] == "llama" and "quantization_config" not in config
    assert json.loads((converted / MARKER).read_text())["gguf"] == embedded.GGUF_FILE


def test_cache_is_found_again_without_converting(tmp_path, conversions):
    first = ensure_embedded_model(tmp_path)
    assert ensure_embedded_model(tmp_path) == first
    assert len(conversions) == 1


@pytest.mark.parametrize("damage", ["marker", "weights", "stale-marker"])
def test_missing_or_stale_cache_is_rebuilt(tmp_path, conversions, damage):
    folder = ensure_embedded_model(tmp_path)
    if damage == "marker":
        (folder / MARKER).unlink()
    elif damage == "weights":
        (folder / "model.safetensors").unlink()
    else:
        (folder / MARKER).write_text(json.dumps({"version": -1}))
    assert ensure_embedded_model(tmp_path) == folder
    assert len(conversions) == 2


def test_corrupt_weights_are_rebuilt_on_load(tmp_path, conversions):
    """A truncated weights file with an intact marker: loading fails once, then rebuilds."""
    folder = ensure_embedded_model(tmp_path)
    weights = folder / "model.safetensors"
    weights.write_bytes(weights.read_bytes()[:1000])
    runner = ModelRunner.load(Settings(cache_dir=tmp_path, device="cpu"))
    assert runner.config.model_type == "llama"
    assert len(conversions) == 2
