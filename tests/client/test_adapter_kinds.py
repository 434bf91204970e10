"""The residual and sequence adapter kinds: equal to the PLM untrained, incremental decoding equal
to the whole-sequence forward, and their files."""

from __future__ import annotations

import dataclasses
import json

import pytest
import torch
import torch.nn.functional as F

from data_owner_client.adapter import (
    CONFIG_FILE,
    AdapterConfig,
    AdapterError,
    PemaConfig,
    ResidualAdapter,
    SequenceAdapter,
    SequenceConfig,
    build_adapter,
    load_adapter,
    save_adapter,
)
from shared.head import Head
from shared.protocol import HeadSpec
from tests.client.synthetic import kind_config, random_head

D, V = 32, 64


def rms_head(seed: int = 0) -> Head:
    g = torch.Generator().manual_seed(seed)
    tensors = {
        "norm.weight": 1 + 0.1 * torch.randn(D, generator=g),
        "lm_head.weight": torch.randn(V, D, generator=g),
    }
    return Head(tensors, HeadSpec(norm="rmsnorm", eps=1e-6))


def config(kind: str, **overrides) -> AdapterConfig:
    sizes = dict(rank=8, width=16, layers=2, heads=2)
    return kind_config(kind, D, V, **{**sizes, **overrides})


@pytest.mark.parametrize("head", [random_head(D, V), rms_head()], ids=["layernorm", "rmsnorm"])
@pytest.mark.parametrize("kind", ["residual", "sequence", "copy", "copy-source"])
def test_an_untrained_adapter_gives_exactly_the_plms_log_probabilities(kind, head):
    torch.manual_seed(0)
    cfg = config(kind) if kind in ("residual", "sequence") else sequence_config(kind)
    adapter = build_adapter(cfg, head).eval()
    x = 3 * torch.randn(2, 5, D)
    z = adapter(x) if kind == "residual" else adapter(x, torch.randint(V, (2, 5)))
    assert torch.equal(F.log_softmax(head.project(z), -1), F.log_softmax(head(x), -1))


def sequence_config(kind: str, **overrides) -> AdapterConfig:
    """The sequence kind with no pointer ("sequence"), the "read" one ("copy") or "source"."""
    pointer = "source" if kind == "copy-source" else "read"
    return config("sequence", copy=kind != "sequence", pointer=pointer, **overrides)


def test_residual_is_the_normalised_input_plus_a_scaled_low_rank_correction():
    head = random_head(D, V)
    adapter = build_adapter(config("residual", alpha=4.0, dropout=0.0), head)
    assert isinstance(adapter, ResidualAdapter)
    with torch.no_grad():
        adapter.B.normal_()
    x = torch.randn(7, D)
    n = head.normalize(x)
    torch.testing.assert_close(adapter(x), n + 0.5 * n @ adapter.A.T @ adapter.B.T)
    gelu = build_adapter(config("residual", activation="gelu", dropout=0.0), head)
    gelu.load_state_dict(adapter.state_dict())
    torch.testing.assert_close(gelu(x), n + 0.125 * F.gelu(n @ adapter.A.T) @ adapter.B.T)


def trained_sequence_adapter(
    token_inputs: bool = True, kind: str = "sequence"
) -> tuple[SequenceAdapter, Head]:
    head = random_head(D, V)
    adapter = build_adapter(
        sequence_config(kind, token_inputs=token_inputs),
        head,
        generator=torch.Generator().manual_seed(1),
    )
    assert isinstance(adapter, SequenceAdapter)
    with torch.no_grad():  # an untrained output layer is zero: give it something to pass on
        adapter.output.weight.normal_(0, 0.3)
        if adapter.gate is not None:
            adapter.gate.weight.normal_(0, 0.3)
        if adapter.sink is not None:
            adapter.sink.normal_()
    return adapter.eval(), head


@pytest.mark.parametrize(
    ("token_inputs", "kind"),
    [(True, "sequence"), (False, "sequence"), (True, "copy"), (True, "copy-source")],
    ids=["tokens", "representations", "copy", "copy-source"],
)
def test_stepping_equals_the_whole_sequence_forward(token_inputs, kind):
    adapter, _ = trained_sequence_adapter(token_inputs, kind)
    torch.manual_seed(0)
    prompts, totals = (
        [3, 7, 1],
        [9, 8, 6],
    )  # rows of different lengths, finishing at different steps
    x = [torch.randn(t, D) for t in totals]
    tokens = [torch.randint(V, (t,)) for t in totals]
    with torch.no_grad():
        whole = [
            adapter(xi[None], ti[None], torch.tensor([p]))[0]
            for xi, ti, p in zip(x, tokens, prompts, strict=True)
        ]
        first, cache = adapter.start(
            [xi[:p] for xi, p in zip(x, prompts, strict=True)],
            [ti[:p].tolist() for ti, p in zip(tokens, prompts, strict=True)],
            capacity=max(totals),
        )
        got = [[first[b]] for b in range(3)]
        for step in range(max(t - p for t, p in zip(totals, prompts, strict=True))):
            live = [b for b in range(3) if prompts[b] + step < totals[b]]
            at = [prompts[b] + step for b in live]
            z = adapter.step(
                cache,
                torch.stack([x[b][t] for b, t in zip(live, at, strict=True)]),
                torch.stack([tokens[b][t] for b, t in zip(live, at, strict=True)]),
                torch.tensor(live),
            )
            for b, zb in zip(live, z, strict=True):
                got[b].append(zb)
    for b in range(3):
        expected = whole[b][prompts[b] - 1 :]
        torch.testing.assert_close(torch.stack(got[b]), expected, atol=1e-5, rtol=1e-5)
    assert cache.lengths.tolist() == totals


@pytest.mark.parametrize("kind", ["sequence", "copy", "copy-source"])
def test_a_position_never_sees_the_future(kind):
    adapter, _ = trained_sequence_adapter(kind=kind)
    x, tokens = torch.randn(1, 6, D), torch.randint(V, (1, 6))
    changed_x, changed_tokens = x.clone(), tokens.clone()
    changed_x[0, 4:] = torch.randn(2, D)
    changed_tokens[0, 4:] = (tokens[0, 4:] + 1) % V  # the source pointer's values shift by one
    with torch.no_grad():
        a, b = adapter(x, tokens), adapter(changed_x, changed_tokens)
    torch.testing.assert_close(a[0, :4], b[0, :4])
    assert not torch.allclose(a[0, 4:], b[0, 4:])


@pytest.mark.parametrize("kind", ["copy", "copy-source"])
def test_the_source_pointer_copies_from_the_prompt_alone(kind):
    adapter, head = trained_sequence_adapter(kind=kind)
    with torch.no_grad():
        adapter.output.weight.zero_()  # z = n + g·(what the pointer copies)
        tokens = torch.tensor([[5, 5, 5, 5, 7, 9, 11, 13]])  # a prompt of 4 positions reading 5
        x = torch.randn(1, 8, D)
        copied = adapter(x, tokens, torch.tensor([4]))[0] - head.normalize(x)[0]
    e = head.embed(torch.tensor(5))
    off_prompt = copied - (copied @ e / (e @ e)).unsqueeze(-1) * e  # what is not along E[5]
    assert copied[2:].norm(dim=-1).min() > 1e-3
    if kind == "copy-source":  # even the output's positions copy the prompt's token alone
        assert off_prompt.abs().max() < 1e-5
    else:  # the read pointer also copies the output's own tokens
        assert off_prompt[5:].norm(dim=-1).min() > 1e-3


def test_the_cache_refuses_to_overflow():
    adapter, _ = trained_sequence_adapter()
    _, cache = adapter.start([torch.randn(2, D)], [[1, 2]], capacity=3)
    adapter.step(cache, torch.randn(1, D), torch.tensor([3]), torch.tensor([0]))
    with pytest.raises(ValueError, match="3 positions"):
        adapter.step(cache, torch.randn(1, D), torch.tensor([3]), torch.tensor([0]))


@pytest.mark.parametrize("kind", ["residual", "sequence", "copy", "copy-source"])
def test_save_and_load_round_trip_every_kind(kind, tmp_path):
    head = random_head(D, V)
    cfg = config(kind) if kind in ("residual", "sequence") else sequence_config(kind)
    cfg = dataclasses.replace(cfg, fingerprint="f")
    adapter = build_adapter(cfg, head, generator=torch.Generator().manual_seed(0))
    with torch.no_grad():
        for p in adapter.parameters():
            p.add_(0.01 * torch.randn_like(p))
    save_adapter(tmp_path, adapter, cfg)
    loaded, loaded_cfg = load_adapter(tmp_path, fingerprint="f", head=head)
    assert loaded_cfg == cfg and type(loaded) is type(adapter)
    for (name, a), (other, b) in zip(
        adapter.state_dict().items(), loaded.state_dict().items(), strict=True
    ):
        assert name == other and torch.equal(a, b)
    with pytest.raises(AdapterError, match="head"):
        load_adapter(tmp_path)


def test_a_config_without_a_kind_loads_as_the_papers_adapter(tmp_path):
    cfg = PemaConfig(hidden_size=D, vocab_size=V, rank=8)
    save_adapter(tmp_path, build_adapter(cfg), cfg)
    data = json.loads((tmp_path / CONFIG_FILE).read_text())
    del data["kind"]  # as written before the kinds existed
    (tmp_path / CONFIG_FILE).write_text(json.dumps(data))
    _, loaded = load_adapter(tmp_path)
    assert loaded.kind == "pema"


def test_a_sequence_adapter_from_before_the_source_pointer_loads_with_the_read_one(tmp_path):
    head = random_head(D, V)
    cfg = dataclasses.replace(sequence_config("copy"), fingerprint="f")
    save_adapter(tmp_path, build_adapter(cfg, head), cfg)
    data = json.loads((tmp_path / CONFIG_FILE).read_text())
    del data["pointer"], data["num_beams"]  # as written before the settings existed
    (tmp_path / CONFIG_FILE).write_text(json.dumps(data))
    adapter, loaded = load_adapter(tmp_path, head=head)
    assert loaded.pointer == "read" and isinstance(adapter, SequenceAdapter)
    assert loaded.num_beams == 1  # decoded greedily, as it was
    assert adapter.sink is None
    assert SequenceConfig(hidden_size=D, vocab_size=V).pointer == "source"  # new adapters'


@pytest.mark.parametrize(
    "bad",
    [
        dict(kind="residual", activation="relu"),
        dict(width=30, heads=4),
        dict(layers=0),
        dict(pointer="previous"),
    ],
)
def test_bad_kind_settings_are_refused(bad):
    with pytest.raises(AdapterError):
        config(bad.pop("kind", "sequence"), **bad)


def test_a_config_of_an_unknown_kind_is_refused():
    data = json.loads(config("sequence").to_json())
    with pytest.raises(AdapterError, match="kind must be one of"):
        AdapterConfig.from_json(json.dumps({**data, "kind": "lora"}))


def test_the_copy_pointer_is_refused_for_a_head_that_projects_out_first():
    g = torch.Generator().manual_seed(0)
    tensors = {
        "norm.weight": torch.ones(D),
        "norm.bias": torch.zeros(D),
        "project_out.weight": torch.randn(16, D, generator=g),
        "lm_head.weight": torch.randn(V, 16, generator=g),
    }
    head = Head(tensors, HeadSpec(norm="layernorm"))
    adapter = build_adapter(config("sequence", copy=False), head).eval()  # works without it
    x, tokens = torch.randn(1, 4, D), torch.randint(V, (1, 4))
    assert torch.equal(head.project(adapter(x, tokens)), head(x))
    with pytest.raises(ValueError, match="with --no-copy"):
        build_adapter(config("sequence", copy=True), head)
