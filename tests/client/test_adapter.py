"""The PEMA adapter: its math, its stage-2 reset, and its directory format."""

from __future__ import annotations

import json
import logging
import math
from pathlib import Path

import pytest
import torch
from safetensors import safe_open
from safetensors.torch import save_file

from data_owner_client.adapter import (
    CONFIG_FILE,
    WEIGHTS_FILE,
    AdapterConfig,
    AdapterError,
    AdapterFingerprintError,
    PemaAdapter,
    PemaConfig,
    load_adapter,
    save_adapter,
)

D, V, R = 12, 20, 4


def config(**overrides: object) -> AdapterConfig:
    options: dict = dict(hidden_size=D, vocab_size=V, rank=R, fingerprint="fp-1", model_id="tiny")
    return PemaConfig(**{**options, **overrides})


def trained_adapter(cfg: AdapterConfig, seed: int = 0) -> PemaAdapter:
    """An adapter whose three tensors are all nonzero, as after training."""
    adapter = PemaAdapter.from_config(cfg, generator=torch.Generator().manual_seed(seed))
    with torch.no_grad():
        adapter.B_rct.normal_()
        adapter.B_pd.normal_()
    return adapter


# ---- config ----------------------------------------------------------------------------------


def test_config_defaults_are_the_papers():
    cfg = PemaConfig(hidden_size=1024, vocab_size=V)
    assert (cfg.rank, cfg.alpha, cfg.dropout, cfg.kappa) == (512, 1.0, 0.2, 0.2)
    assert (cfg.schedule, cfg.lambda_max, cfg.lambda_min) == ("quadratic", 0.9, 0.0)
    assert cfg.scaling == 1.0 / 512
    assert cfg.package_version and cfg.format == "pema-adapter"


def test_config_json_round_trip():
    cfg = config(template="Translate: {source}", length_ratio=1.25, schedule="linear", kappa=0.3)
    again = AdapterConfig.from_json(cfg.to_json())
    assert again == cfg
    assert json.loads(cfg.to_json())["length_ratio"] == 1.25


def test_rank_above_hidden_size_is_clamped_with_a_note(caplog):
    with caplog.at_level(logging.INFO, logger="data_owner_client.adapter"):
        cfg = PemaConfig(hidden_size=D, vocab_size=V)
    assert cfg.rank == D
    assert "clamped" in caplog.text


@pytest.mark.parametrize(
    "bad",
    [
        dict(dropout=1.0),
        dict(kappa=1.5),
        dict(schedule="cosine"),
        dict(lambda_max=1.2),
        dict(rank=0),
    ],
)
def test_config_refuses_out_of_range_values(bad):
    with pytest.raises(AdapterError):
        config(**bad)


def test_config_from_json_ignores_unknown_keys_and_refuses_other_formats():
    data = json.loads(config().to_json())
    assert AdapterConfig.from_json(json.dumps({**data, "added_later": 1})) == config()
    with pytest.raises(AdapterError, match="format"):
        AdapterConfig.from_json(json.dumps({**data, "format": "lora"}))
    with pytest.raises(AdapterError, match="incomplete"):
        AdapterConfig.from_json(json.dumps({"rank": 4}))


# ---- math ------------------------------------------------------------------------------------


def test_init_kaiming_a_and_zero_bs():
    adapter = PemaAdapter(hidden_size=64, rank=8)
    bound = 1.0 / math.sqrt(64)  # nn.Linear's bound for fan_in 64
    assert adapter.A.shape == (8, 64) and adapter.A.abs().max() <= bound
    assert adapter.A.std() > bound / 3  # uniform on [-b, b] has std b/sqrt(3)
    assert adapter.B_rct.shape == adapter.B_pd.shape == (64, 8)
    assert not adapter.B_rct.any() and not adapter.B_pd.any()
    x = torch.randn(5, 64)
    assert not adapter(x).any() and not adapter.reconstruct(x).any()


def test_same_generator_same_init():
    a, b = (PemaAdapter(D, R, generator=torch.Generator().manual_seed(3)) for _ in range(2))
    assert torch.equal(a.A, b.A)


def test_branches_are_scaled_low_rank_maps_without_residual():
    cfg = config(alpha=2.0)
    adapter = trained_adapter(cfg).eval()
    x = torch.randn(7, D)
    s = 2.0 / R
    torch.testing.assert_close(adapter.reconstruct(x), s * x @ adapter.A.T @ adapter.B_rct.T)
    torch.testing.assert_close(adapter.predict(x), s * x @ adapter.A.T @ adapter.B_pd.T)
    torch.testing.assert_close(adapter(x), adapter.predict(x))
    pd, rct = adapter.predict_and_reconstruct(x)
    torch.testing.assert_close(pd, adapter.predict(x))
    torch.testing.assert_close(rct, adapter.reconstruct(x))


def test_dropout_acts_on_the_input_in_training_only():
    adapter = trained_adapter(config(dropout=0.5))
    x = torch.randn(64, D)
    torch.manual_seed(0)
    pd, rct = adapter.train().predict_and_reconstruct(x)
    torch.manual_seed(0)
    dropped = torch.nn.functional.dropout(x, 0.5, training=True)
    # One mask feeds both branches, as stage 2 trains them.
    torch.testing.assert_close(rct, adapter.scaling * dropped @ adapter.A.T @ adapter.B_rct.T)
    torch.testing.assert_close(pd, adapter.scaling * dropped @ adapter.A.T @ adapter.B_pd.T)
    assert torch.equal(adapter.eval().predict(x), adapter.eval().predict(x))


def test_reset_for_stage2_keeps_and_freezes_b_rct():
    adapter = trained_adapter(config())
    a, b_rct = adapter.A.detach().clone(), adapter.B_rct.detach().clone()
    adapter.reset_for_stage2(generator=torch.Generator().manual_seed(9))
    assert not torch.equal(adapter.A, a) and adapter.A.requires_grad
    assert not adapter.B_pd.any() and adapter.B_pd.requires_grad
    assert torch.equal(adapter.B_rct, b_rct) and not adapter.B_rct.requires_grad


# ---- files -----------------------------------------------------------------------------------


def test_save_and_load_round_trip(tmp_path):
    cfg = config(length_ratio=0.9)
    adapter = trained_adapter(cfg)
    save_adapter(tmp_path / "out", adapter, cfg)
    assert sorted(p.name for p in (tmp_path / "out").iterdir()) == [CONFIG_FILE, WEIGHTS_FILE]
    loaded, loaded_cfg = load_adapter(tmp_path / "out", fingerprint="fp-1")
    assert loaded_cfg == cfg and not loaded.training
    for name in ("A", "B_pd", "B_rct"):
        assert torch.equal(getattr(loaded, name), getattr(adapter, name))


def test_weights_file_holds_exactly_the_three_named_tensors(tmp_path):
    save_adapter(tmp_path, trained_adapter(config()), config())
    with safe_open(str(tmp_path / WEIGHTS_FILE), framework="pt") as f:
        assert sorted(f.keys()) == ["A", "B_pd", "B_rct"]
        assert f.get_tensor("A").shape == (R, D) and f.get_tensor("B_pd").shape == (D, R)
        assert f.metadata()["format"] == "pema-adapter"


def test_fingerprint_mismatch_is_refused_with_both_models_named(tmp_path):
    save_adapter(tmp_path, trained_adapter(config()), config())
    with pytest.raises(AdapterFingerprintError) as excinfo:
        load_adapter(tmp_path, fingerprint="fp-2")
    message = str(excinfo.value)
    assert "tiny" in message and "fp-1" in message and "fp-2" in message
    load_adapter(tmp_path)  # no fingerprint given: nothing to check


def test_missing_directory_and_files_are_clear_errors(tmp_path):
    with pytest.raises(AdapterError, match="no adapter directory"):
        load_adapter(tmp_path / "absent")
    with pytest.raises(AdapterError, match=CONFIG_FILE):
        load_adapter(tmp_path)
    (tmp_path / CONFIG_FILE).write_text(config().to_json())
    with pytest.raises(AdapterError, match=WEIGHTS_FILE):
        load_adapter(tmp_path)
    (tmp_path / WEIGHTS_FILE).write_bytes(b"not safetensors")
    with pytest.raises(AdapterError, match="safetensors"):
        load_adapter(tmp_path)


def test_wrong_shapes_and_names_are_refused(tmp_path):
    cfg = config()
    save_adapter(tmp_path, trained_adapter(cfg), cfg)
    (tmp_path / CONFIG_FILE).write_text(config(rank=3).to_json())
    with pytest.raises(AdapterError, match="shape"):
        load_adapter(tmp_path)
    save_file({"A": torch.zeros(R, D), "B_pd": torch.zeros(D, R)}, str(tmp_path / WEIGHTS_FILE))
    (tmp_path / CONFIG_FILE).write_text(cfg.to_json())
    with pytest.raises(AdapterError, match="expected"):
        load_adapter(tmp_path)
    with pytest.raises(AdapterError, match="shape"):
        save_adapter(tmp_path / "other", trained_adapter(cfg), config(hidden_size=D + 1))


def test_save_leaves_no_temp_files_and_overwrites(tmp_path: Path):
    cfg = config()
    save_adapter(tmp_path, trained_adapter(cfg, seed=0), cfg)
    second = trained_adapter(cfg, seed=1)
    save_adapter(tmp_path, second, cfg)
    assert sorted(p.name for p in tmp_path.iterdir()) == [CONFIG_FILE, WEIGHTS_FILE]
    assert torch.equal(load_adapter(tmp_path)[0].A, second.A)
