"""`pema-client serve`'s settings: flags, PEMA_SERVE_* variables, and clear refusals."""

from __future__ import annotations

import dataclasses
from pathlib import Path

import pytest

from data_owner_client.cli import build_parser
from data_owner_client.serve.settings import ServeSettings


def test_flags_and_variables_fill_the_settings(monkeypatch):
    monkeypatch.setenv("PEMA_SERVE_PORT", "9001")
    monkeypatch.setenv("PEMA_SERVE_ADAPTER", '["bible=adapters/bible"]')
    settings = ServeSettings()
    assert settings.port == 9001 and settings.adapters() == {"bible": Path("adapters/bible")}
    args = build_parser().parse_args(
        ["serve", "--adapter", "a=x", "--adapter", "b=y", "--max-sessions", "2"]
    )
    given = {name: getattr(args, name) for name in ServeSettings.model_fields}
    settings = ServeSettings(**{k: v for k, v in given.items() if v is not None})
    assert settings.adapters() == {"a": Path("x"), "b": Path("y")}
    assert settings.max_sessions == 2 and settings.port == 9001  # the flag, then the variable


@pytest.mark.parametrize(
    ("entries", "message"),
    [(["bible"], "expected NAME=DIR"), (["=dir"], "expected NAME=DIR"), (["a=x", "a=y"], "twice")],
)
def test_bad_adapter_entries_are_refused(entries, message):
    with pytest.raises(ValueError, match=message):
        ServeSettings(adapter=entries).adapters()


def test_no_keys_beyond_loopback_is_refused_unless_asked(tmp_path):
    ServeSettings(host="127.0.0.1").check_exposure()
    with pytest.raises(ValueError, match="--api-keys-file"):
        ServeSettings(host="0.0.0.0").check_exposure()
    ServeSettings(host="0.0.0.0", insecure_no_auth=True).check_exposure()
    ServeSettings(host="0.0.0.0", api_keys_file=tmp_path / "keys.txt").check_exposure()


def test_served_adapters_decode_one_hypothesis_whatever_width_they_store(served_client, tmp_path):
    """serve's choices are greedy or sampled: a sequence adapter's stored 4 beams (for generate
    and evaluate) do not apply there."""
    from data_owner_client.adapter import build_adapter, save_adapter
    from data_owner_client.serve.models import serving_models
    from tests.client.synthetic import kind_config

    _, client, served = served_client
    info = served.info
    config = kind_config("sequence", info.hidden_size, info.vocab_size, width=16, heads=2)
    config = dataclasses.replace(
        config, fingerprint=info.fingerprint, num_beams=4, schedule="constant", lambda_max=0.7
    )
    save_adapter(tmp_path / "seq", build_adapter(config, served.head), config)
    models = serving_models(ServeSettings(adapter=[f"seq={tmp_path / 'seq'}"]), client, served)
    assert [m.generator.mixing.num_beams for m in models] == [1, 1]
