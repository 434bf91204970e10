"""Scores of `pema-client evaluate` against sacreBLEU's own functions; the report table; an
evaluation that continues after a kill."""

from __future__ import annotations

import dataclasses

import pytest
import sacrebleu
import torch

from data_owner_client.adapter import PemaAdapter, PemaConfig
from data_owner_client.client import PemaClient
from data_owner_client.data import Example
from data_owner_client.evaluate import evaluate, markdown_table, score
from data_owner_client.generate import GenerationConfig
from data_owner_client.served_model import ServedModel
from tests.server.helpers import serve

PREDICTIONS = ["the cat sat on the mat today", "a dog barked loudly at night", "hello there"]
REFERENCES = ["the cat sat on a mat today", "the dog barked at night", "hello there"]


def test_scores_equal_sacrebleus_functions():
    got = score(PREDICTIONS, REFERENCES)
    assert got["bleu"] == pytest.approx(sacrebleu.corpus_bleu(PREDICTIONS, [REFERENCES]).score)
    assert got["chrf"] == pytest.approx(sacrebleu.corpus_chrf(PREDICTIONS, [REFERENCES]).score)
    pairs = zip(PREDICTIONS, REFERENCES, strict=True)
    sentences = [sacrebleu.sentence_bleu(p, [r]).score for p, r in pairs]
    assert got["sentence_bleu"] == pytest.approx(sum(sentences) / len(sentences))
    assert 0 < got["bleu"] < 100 and got["sentence_bleu"] > got["bleu"] * 0.5


def test_identical_outputs_score_100_and_mismatched_lists_are_refused():
    assert score(REFERENCES, REFERENCES) == pytest.approx(
        {"bleu": 100.0, "sentence_bleu": 100.0, "chrf": 100.0}
    )
    with pytest.raises(ValueError, match="as many predictions"):
        score(PREDICTIONS[:2], REFERENCES)


def test_markdown_table_lists_both_methods():
    result = {"bleu": 12.345, "sentence_bleu": 10.0, "chrf": 40.0, "tokens_per_second": 55.55}
    report = {
        "mixing": {"schedule": "quadratic", "lambda_max": 0.5},
        "results": {"plm": result, "pema": {**result, "bleu": 20.0}},
    }
    lines = markdown_table(report).splitlines()
    assert lines[0] == "| method | BLEU | sBLEU | chrF | tokens/s |"
    assert lines[2] == "| PLM alone | 12.35 | 10.00 | 40.00 | 55.5 |"
    assert lines[3] == "| PEMA (quadratic, λ_max 0.5) | 20.00 | 10.00 | 40.00 | 55.5 |"
    report["mixing"] |= {"schedule": "constant", "lambda_max": 0.7, "no_repeat_ngram": 4}
    report["adapter_kind"] = "sequence"
    label = markdown_table(report).splitlines()[3].split(" | ")[0]
    assert label == "| PEMA, sequence adapter (constant, λ_max 0.7, no repeated 4-gram)"
    report["mixing"]["num_beams"] = 4
    lines = markdown_table(report).splitlines()
    assert lines[2].startswith("| PLM alone (4 beams) |")
    assert lines[3].startswith(
        "| PEMA, sequence adapter (constant, λ_max 0.7, no repeated 4-gram, 4 beams) |"
    )


def test_evaluation_continues_after_a_kill(make_runner, tmp_path):
    """Predictions are appended per batch: cut one short, evaluate again, and the report is the
    uninterrupted one's; another evaluation in the same directory is refused."""
    with serve(make_runner("llama")) as http, PemaClient(http=http, retries=0) as client:
        served = ServedModel.fetch(client, cache_dir=tmp_path / "cache")
        info = served.info
        adapter_config = PemaConfig(
            info.hidden_size, info.vocab_size, rank=8, fingerprint=info.fingerprint
        )
        adapter = PemaAdapter.from_config(
            adapter_config, generator=torch.Generator().manual_seed(0)
        )
        examples = [Example(f"w{5 + i} w{9 + i}", f"w{7 + i} w3") for i in range(10)]
        config = GenerationConfig(
            max_new_tokens=5, lambda_max=0.5, schedule="constant", batch_size=4
        )

        def run(folder: str, **kw: bool) -> dict:
            return evaluate(client, served, examples, adapter, adapter_config, config,
                            "{source}", tmp_path / folder, **kw)  # fmt: skip

        whole = run("whole")
        predictions = (tmp_path / "whole" / "predictions_pema.jsonl").read_text()
        cut = tmp_path / "cut"
        run("cut")
        lines = predictions.splitlines(keepends=True)
        (cut / "predictions_pema.jsonl").write_text("".join(lines[:5]) + lines[5][:9])
        again = run("cut")
        for method in ("plm", "pema"):
            for field in ("bleu", "chrf", "rows", "new_tokens"):
                assert again["results"][method][field] == whole["results"][method][field]
        other = dataclasses.replace(config, max_new_tokens=6)
        with pytest.raises(ValueError, match="another run"):
            evaluate(client, served, examples, adapter, adapter_config, other, "{source}", cut)
        assert evaluate(client, served, examples, adapter, adapter_config, other, "{source}",
                        cut, overwrite=True)["examples"] == 10  # fmt: skip
