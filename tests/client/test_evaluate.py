"""Scores of `pema-client evaluate` against sacreBLEU's own functions; the report table."""

from __future__ import annotations

import pytest
import sacrebleu

from data_owner_client.evaluate import markdown_table, score

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
