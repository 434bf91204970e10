"""Ensembles: several saved adapters of one kind decoded as the mean of their outputs."""

from __future__ import annotations

import dataclasses

import pytest
import torch

from data_owner_client.adapter import (
    AdapterError,
    Ensemble,
    build_adapter,
    load_adapters,
    save_adapter,
)
from tests.client.synthetic import random_head
from tests.client.test_adapter_kinds import D, V, config, trained_sequence_adapter


def test_an_ensemble_steps_as_the_mean_of_its_members_whole_sequence_forwards():
    members = [trained_sequence_adapter(kind="copy-source")[0] for _ in range(2)]
    with torch.no_grad():  # two different adapters
        for p in members[1].parameters():
            p.add_(0.1 * torch.randn_like(p))
    ensemble = Ensemble(members).eval()
    assert ensemble.reads_sequences and ensemble.post_norm
    torch.manual_seed(0)
    x, tokens, prompt = torch.randn(1, 7, D), torch.randint(V, (1, 7)), 4
    with torch.no_grad():
        whole = [m(x, tokens, torch.tensor([prompt]))[0] for m in members]
        assert not torch.allclose(whole[0], whole[1])
        first, cache = ensemble.start([x[0, :prompt]], [tokens[0, :prompt].tolist()], 7)
        got = [first[0]]
        for t in range(prompt, 7):
            got.append(ensemble.step(cache, x[:, t], tokens[:, t], torch.tensor([0]))[0])
    expected = (whole[0] + whole[1])[prompt - 1 :] / 2
    torch.testing.assert_close(torch.stack(got), expected, atol=1e-5, rtol=1e-5)


def test_load_adapters_gives_one_adapter_alone_and_several_as_an_ensemble(tmp_path):
    head = random_head(D, V)
    folders = []
    for seed, kind in enumerate(["residual", "residual", "sequence"]):
        cfg = dataclasses.replace(config(kind), fingerprint="f")
        folders.append(tmp_path / f"{kind}-{seed}")
        generator = torch.Generator().manual_seed(seed)
        save_adapter(folders[-1], build_adapter(cfg, head, generator=generator), cfg)
    one, _ = load_adapters(folders[:1], fingerprint="f", head=head)
    assert not isinstance(one, Ensemble)
    both, cfg = load_adapters(folders[:2], fingerprint="f", head=head)
    assert isinstance(both, Ensemble) and cfg.kind == "residual" and not both.training
    x = torch.randn(3, D)
    singles = [load_adapters([f], head=head)[0](x) for f in folders[:2]]
    torch.testing.assert_close(both(x), (singles[0] + singles[1]) / 2)
    with pytest.raises(AdapterError, match="one kind"):
        load_adapters(folders[1:], head=head)
