"""kNN-LM over the external memory: its distribution against brute force, its use in decoding."""

from __future__ import annotations

import json
import math

import pytest
import torch

from data_owner_client.client import PemaClient
from data_owner_client.generate import GenerationConfig, Generator
from data_owner_client.knn import KnnConfig, KnnLM
from data_owner_client.served_model import ServedModel
from tests.client.test_cli import MEMORY_FLAGS, run  # noqa: F401  (the pema-client fixture)
from tests.server.helpers import serve
from tests.word_cipher import cipher_rows, write_jsonl


@pytest.fixture
def served(make_runner, tmp_path) -> ServedModel:
    with serve(make_runner("llama")) as http, PemaClient(http=http, retries=0) as client:
        return ServedModel.fetch(client, cache_dir=tmp_path / "cache")


def brute_force(head, keys, values, query, k: int, temperature: float) -> dict[int, float]:
    """p_kNN of one query, neighbour by neighbour, as the kNN-LM paper defines it."""
    q, normed = head.normalize(query), head.normalize(keys)
    pairs = zip(normed, values, strict=True)
    distances = sorted((float((q - key).pow(2).sum()), int(v)) for key, v in pairs)
    near = distances[:k]
    total = sum(math.exp(-(d - near[0][0]) / temperature) for d, _ in near)
    probs: dict[int, float] = {}
    for d, token in near:
        probs[token] = probs.get(token, 0.0) + math.exp(-(d - near[0][0]) / temperature) / total
    return probs


@pytest.mark.parametrize(("k", "temperature"), [(1, 1.0), (5, 1.0), (12, 30.0)])
def test_distribution_equals_brute_force(served, k, temperature):
    head = served.head
    d, vocab = served.info.hidden_size, served.info.vocab_size
    generator = torch.Generator().manual_seed(k)
    keys = torch.randn(40, d, generator=generator) * 3
    values = torch.randint(0, 7, (40,), generator=generator)  # few tokens: neighbours share them
    queries = keys[:3] + 0.5 * torch.randn(3, d, generator=generator)
    knn = KnnLM(keys, values, head, KnnConfig(k=k, temperature=temperature))
    log_probs = knn.log_probs(queries)
    assert log_probs.shape == (3, vocab)
    for query, row in zip(queries, log_probs, strict=True):
        expected = brute_force(head, keys, values, query, k, temperature)
        assert set(torch.nonzero(row > -math.inf).flatten().tolist()) == set(expected)
        for token, p in expected.items():
            assert row[token].exp().item() == pytest.approx(p, rel=1e-4, abs=1e-6)
        assert row.exp().sum().item() == pytest.approx(1.0, abs=1e-5)


def test_settings_are_checked(served):
    with pytest.raises(ValueError, match="temperature"):
        KnnConfig(temperature=0)
    with pytest.raises(ValueError, match="keys"):
        KnnLM(torch.zeros(0, served.info.hidden_size), torch.zeros(0), served.head)


def test_the_generator_mixes_with_the_knn_distribution(make_runner, tmp_path):
    with serve(make_runner("llama")) as http, PemaClient(http=http, retries=0) as client:
        served = ServedModel.fetch(client, cache_dir=tmp_path)
        head, d = served.head, served.info.hidden_size
        keys = torch.randn(30, d, generator=torch.Generator().manual_seed(0))
        knn = KnnLM(keys, torch.arange(30) + 3, head, KnnConfig(k=4, temperature=5.0))
        config = GenerationConfig(lambda_max=0.7)  # constant: kNN-LM's default schedule
        generator = Generator(client, served, config, "{source}", knn=knn)
        assert generator.mixing.schedule == "constant"
        hidden = keys[:6] + 0.1
        lam = 0.7
        p = (1 - lam) * head(hidden).softmax(-1) + lam * knn.log_probs(hidden).exp()
        got = generator.next_tokens(hidden, 0, torch.ones(6))
        assert got == p.argmax(-1).tolist()
        assert got != head(hidden).argmax(-1).tolist()  # the memory changes the choice
        with pytest.raises(ValueError, match="not both"):
            Generator(client, served, config, "{source}", adapter=object(), knn=knn)  # type: ignore[arg-type]


def test_cli_knn_reproduces_memorised_targets(run, tmp_path):  # noqa: F811
    """With λ = 1 and a sharp temperature, each step copies the nearest memorised context's
    next token: on training inputs that is the training target, which the PLM alone never says."""
    data = write_jsonl(tmp_path / "train.jsonl", cipher_rows(40))
    run("memory", "build", "--data", str(data), "--out", str(tmp_path / "mem"), *MEMORY_FLAGS)
    rows = [json.loads(line) for line in data.read_text().splitlines()]
    outputs = {}
    for name, flags in (("knn", ["--knn", str(tmp_path / "mem"), "--lambda-max", "1",
                                 "--knn-temperature", "0.01"]), ("plm", [])):  # fmt: skip
        out = tmp_path / f"{name}.jsonl"
        run("generate", "--data", str(data), "--source-field=src", "--target-field=tgt",
            "--template={source}", "--max-new-tokens=4", *flags, "--output", str(out))  # fmt: skip
        outputs[name] = [json.loads(line)["prediction"] for line in out.read_text().splitlines()]
    # The dev tenth of the memory build is not in train/; those rows are not memorised.
    exact = sum(p == r["tgt"] for p, r in zip(outputs["knn"], rows, strict=True))
    assert exact >= 0.85 * len(rows)
    assert sum(p == r["tgt"] for p, r in zip(outputs["plm"], rows, strict=True)) == 0
