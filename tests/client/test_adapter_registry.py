"""The kind registry: a kind defined in one place and registered once trains, saves, loads and is
offered by the CLI with its own flags; old config files of every kind still load."""

from __future__ import annotations

import json
import logging
from collections.abc import Iterator
from dataclasses import dataclass
from typing import ClassVar

import pytest
import torch
from torch import nn

from data_owner_client import cli
from data_owner_client.adapter import (
    CONFIG_FILE,
    KINDS,
    AdapterConfig,
    AdapterKind,
    AdapterModule,
    SequenceConfig,
    build_adapter,
    load_adapter,
    register_kind,
    save_adapter,
)
from data_owner_client.options import option
from data_owner_client.train import train
from shared.head import Head
from tests.client.synthetic import cipher_task, small_configs


@dataclass
class GainConfig(AdapterConfig):
    """A toy kind: a learned per-dimension gain on the normalised representation."""

    kind: ClassVar[str] = "gain"

    scale: float = option(1.0, help="multiplies the learned gain")

    def tensor_shapes(self) -> dict[str, tuple[int, ...]]:
        return {"gain": (self.hidden_size,)}


class GainAdapter(AdapterModule):
    post_norm = True

    def __init__(self, head: Head, hidden_size: int, scale: float) -> None:
        super().__init__()
        self.normalize, self.scale = head.normalize, scale
        self.gain = nn.Parameter(torch.zeros(hidden_size))

    @classmethod
    def from_config(cls, config, head=None, *, generator=None):  # type: ignore[no-untyped-def]
        assert head is not None
        return cls(head, config.hidden_size, config.scale)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.normalize(x) * (1 + self.scale * self.gain)

    def train_outputs(self, x: torch.Tensor, y: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        return self(x), y


GAIN = AdapterKind("gain", GainConfig, GainAdapter, signature=("kind", "hidden_size", "scale"))


@pytest.fixture
def gain_kind() -> Iterator[AdapterKind]:
    register_kind(GAIN)
    try:
        yield GAIN
    finally:
        del KINDS["gain"]


def test_a_registered_kind_trains_saves_and_loads(gain_kind, tmp_path):
    task = cipher_task()
    _, train_config = small_configs(stage2_epochs=2)
    config = GainConfig(hidden_size=32, vocab_size=64, scale=2.0, fingerprint="synthetic")
    untrained = build_adapter(config, task.head)
    x = torch.randn(5, 32)
    assert torch.equal(task.head.project(untrained(x)), task.head(x))  # the PLM until trained
    sources = task.sample(512, 1), task.sample(128, 2)
    result = train(config, *sources, task.head, tmp_path, train_config, progress=False)
    assert result.adapter.gain.abs().sum() > 0 and result.steps > 0
    loaded, loaded_config = load_adapter(tmp_path, fingerprint="synthetic", head=task.head)
    assert isinstance(loaded, GainAdapter) and loaded_config == config
    assert torch.equal(loaded.gain, result.adapter.gain)


def test_a_registered_kind_is_offered_by_the_cli_with_its_own_flags(gain_kind):
    args = cli.build_parser().parse_args(["train", "--out", "x", "--adapter-kind", "gain"])
    assert args.adapter_kind == "gain" and args.scale is None  # unset: the kind's default
    parser = cli.build_parser()
    train_command = parser._subparsers._group_actions[0].choices["train"]  # type: ignore[union-attr]
    text = " ".join(train_command.format_help().split())
    assert "--scale SCALE gain: multiplies the learned gain (default: 1)" in text


def test_a_kind_is_registered_once_under_its_configs_name(gain_kind):
    with pytest.raises(ValueError, match="registered twice"):
        register_kind(GAIN)
    with pytest.raises(ValueError, match="not 'other'"):
        register_kind(AdapterKind("other", GainConfig, GainAdapter, signature=()))


def test_a_config_written_when_one_config_served_every_kind_loads_quietly(tmp_path, caplog):
    """Before kinds had configs of their own, every file held every kind's settings, and a file
    without the repetition guard or the GU defaults meant the flat config's."""
    config = SequenceConfig(hidden_size=32, vocab_size=64, width=16, heads=2)
    data = json.loads(config.to_json())
    for key in ("no_repeat_ngram", "lambda_max", "schedule"):
        del data[key]
    flat = {"rank": 32, "alpha": 1.0, "kappa": 0.2, "input_norm": False, "activation": "none"}
    (tmp_path / CONFIG_FILE).write_text(json.dumps({**data, **flat}))
    with caplog.at_level(logging.WARNING):
        loaded = AdapterConfig.from_json((tmp_path / CONFIG_FILE).read_text())
    assert type(loaded) is SequenceConfig and "unknown" not in caplog.text
    assert (loaded.no_repeat_ngram, loaded.lambda_max, loaded.schedule) == (0, 0.9, "quadratic")
    assert (loaded.width, loaded.heads) == (16, 2)


def test_a_config_is_read_as_its_kinds_config_only():
    data = SequenceConfig(hidden_size=32, vocab_size=64).to_json()
    assert type(SequenceConfig.from_json(data)) is SequenceConfig
    with pytest.raises(ValueError, match="cannot read a sequence"):
        GainConfig.from_json(data)
    saved = json.loads(data)
    assert saved["kind"] == "sequence" and "rank" not in saved  # only the kind's own settings


def test_save_refuses_weights_that_do_not_match_the_config(tmp_path):
    head = cipher_task().head
    config = SequenceConfig(hidden_size=32, vocab_size=64, width=16, heads=2, layers=1)
    adapter = build_adapter(config, head)
    other = SequenceConfig(hidden_size=32, vocab_size=64, width=32, heads=2, layers=1)
    with pytest.raises(ValueError, match="shape"):
        save_adapter(tmp_path, adapter, other)
