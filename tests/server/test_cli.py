"""`pema-server` flags and PEMA_* variables fill the same Settings; flags win."""

from __future__ import annotations

import pytest

from plm_owner_server.cli import build_parser, main, settings_from


def test_flags_override_environment(monkeypatch):
    monkeypatch.setenv("PEMA_PORT", "9001")
    monkeypatch.setenv("PEMA_MAX_BATCH_TOKENS", "512")
    settings = settings_from(build_parser().parse_args(["--port", "9002", "--no-share-head"]))
    assert settings.port == 9002  # flag beats env
    assert settings.max_batch_tokens == 512  # env fills what no flag set
    assert settings.share_head is False


def test_defaults_serve_the_embedded_model_on_loopback(monkeypatch):
    for name in ("PEMA_MODEL", "PEMA_HOST", "PEMA_PORT"):
        monkeypatch.delenv(name, raising=False)
    settings = settings_from(build_parser().parse_args([]))
    assert (settings.model, settings.host, settings.port) == ("smollm2-135m", "127.0.0.1", 8000)


def test_help_documents_every_flag_with_default_and_variable(capsys):
    with pytest.raises(SystemExit):
        main(["--help"])
    out = capsys.readouterr().out
    for flag in ("--model", "--api-keys-file", "--no-share-head", "--max-batch-tokens", "--dtype"):
        assert flag in out
    assert "PEMA_MAX_BATCH_TOKENS" in out


def test_invalid_setting_exits_with_a_message(capsys):
    with pytest.raises(SystemExit, match="invalid setting"):
        main(["--port", "not-a-port", "prepare"])


def test_empty_keys_file_variable_means_no_keys(monkeypatch):
    monkeypatch.setenv("PEMA_API_KEYS_FILE", "")
    assert settings_from(build_parser().parse_args([])).api_keys_file is None


def test_the_vllm_backend_without_vllm_says_how_to_get_it():
    """In the main env (vLLM lives in .venv-vllm) the server stops with one line saying how."""
    with pytest.raises(SystemExit, match="needs vLLM.*make vllm"):
        main(["--backend", "vllm"])


def test_the_prefill_chunk_flag_sets_the_schedulers_chunk(capsys):
    """--prefill-chunk-tokens reaches the scheduler; unset, the device picks it; 0 is refused
    naming the setting."""
    from plm_owner_server.serving import prefill_chunk

    chosen = settings_from(build_parser().parse_args(["--prefill-chunk-tokens", "96"]))
    assert prefill_chunk(chosen) == 96
    assert prefill_chunk(settings_from(build_parser().parse_args(["--device", "cpu"]))) == 32
    with pytest.raises(SystemExit, match="(?s)invalid setting.*prefill_chunk_tokens"):
        main(["--prefill-chunk-tokens", "0", "prepare"])
