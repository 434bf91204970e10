"""Both parties end to end: a real uvicorn `pema-server` over a tiny model saved to disk, then
`pema-client train`, `generate` and `evaluate` over loopback HTTP on a task the PLM cannot do."""

from __future__ import annotations

import json
from pathlib import Path

import pytest

from data_owner_client import cli
from tests.tiny_models import tiny_model, tiny_tokenizer
from tests.uvicorn_server import uvicorn_server
from tests.word_cipher import cipher_rows, write_jsonl

pytestmark = pytest.mark.slow

FIELDS = ("--source-field=src", "--target-field=tgt")
TRAIN = (
    *FIELDS,
    "--template={source}",
    "--memory-dtype=float32",
    "--dropout=0",
    "--lr=0.01",
    "--stage2-epochs=30",
    "--patience=30",
    # The PLM cannot do any of the task, so mixing keeps the adapter's weight high throughout.
    "--schedule=constant",
    "--lambda-max=0.9",
)
KINDS = {
    "pema": ("--rank=32", "--stage1-batch-size=64", "--stage2-batch-size=32", "--stage1-epochs=3"),
    "sequence": (
        "--adapter-kind=sequence",
        "--width=64",
        "--heads=4",
        "--sequence-batch-size=16",
        "--stage2-epochs=10",
    ),
}


@pytest.fixture(scope="module")
def server(tmp_path_factory) -> str:
    """pema-server over a tiny llama saved as a plain transformers folder."""
    folder = tmp_path_factory.mktemp("tiny-llama")
    tiny_model("llama").save_pretrained(folder)
    tiny_tokenizer().save_pretrained(folder)
    with uvicorn_server("--model", str(folder), log=folder / "server.log") as url:
        yield url


@pytest.fixture(scope="module")
def task(tmp_path_factory) -> tuple[Path, Path, list[dict[str, str]]]:
    """Training rows and held-out rows whose sources never occur in training."""
    rows = cipher_rows(400, seed=1, source_words=3)
    held_out = list({r["src"]: r for r in rows if len(r["src"].split()) == 3}.values())[:40]
    train = [r for r in rows if r["src"] not in {h["src"] for h in held_out}]
    folder = tmp_path_factory.mktemp("task")
    train_file = write_jsonl(folder / "train.jsonl", train)
    return train_file, write_jsonl(folder / "test.jsonl", held_out), held_out


def exact_match(predictions: Path, rows: list[dict[str, str]]) -> float:
    outputs = [json.loads(line) for line in predictions.read_text().splitlines()]
    assert [o["source"] for o in outputs] == [r["src"] for r in rows]
    return sum(o["prediction"] == r["tgt"] for o, r in zip(outputs, rows, strict=True)) / len(rows)


@pytest.mark.parametrize("kind", KINDS)
def test_train_then_generate_does_what_the_plm_cannot(server, task, tmp_path, monkeypatch, kind):
    monkeypatch.setenv("PEMA_CLIENT_CACHE", str(tmp_path / "cache"))
    train_file, test_file, held_out = task
    adapter = tmp_path / "adapter"
    run = lambda *argv: cli.main([*argv, "--server", server, "--no-progress"])  # noqa: E731

    run("train", "--data", str(train_file), "--out", str(adapter), *TRAIN, *KINDS[kind])
    assert json.loads((adapter / "adapter_config.json").read_text())["kind"] == kind
    for name, flags in (("pema", ()), ("plm", ("--lambda-max=0",))):
        output = tmp_path / f"{name}.jsonl"
        run("generate", "--adapter", str(adapter), "--data", str(test_file), *FIELDS,
            "--output", str(output), *flags)  # fmt: skip
        if name == "pema":
            assert exact_match(output, held_out) >= 0.9
        else:
            assert exact_match(output, held_out) <= 0.05

    report_dir = tmp_path / "report"
    run("evaluate", "--adapter", str(adapter), "--data", str(test_file), *FIELDS,
        "--report", str(report_dir))  # fmt: skip
    report = json.loads((report_dir / "report.json").read_text())
    plm, pema = report["results"]["plm"], report["results"]["pema"]
    assert report["examples"] == len(held_out) and report["mixing"]["schedule"] == "constant"
    # Two-word outputs have no 4-grams, so corpus BLEU is 0; sentence BLEU uses the orders it has.
    assert pema["sentence_bleu"] >= 90 and plm["sentence_bleu"] <= 10
    assert pema["chrf"] > plm["chrf"] + 50
    assert exact_match(report_dir / "predictions_pema.jsonl", held_out) >= 0.9
    # Both decode with the kind's stored beam width: the sequence kind's 4 beams, else greedy.
    beams = 4 if kind == "sequence" else 1
    assert report["mixing"]["num_beams"] == beams
    plm_label = "| PLM alone (4 beams) |" if beams > 1 else "| PLM alone |"
    assert plm_label in (report_dir / "report.md").read_text()


def test_a_prompt_gets_its_answer_on_stdout(server, tmp_path, monkeypatch, capsys):
    monkeypatch.setenv("PEMA_CLIENT_CACHE", str(tmp_path / "cache"))
    cli.main(["generate", "--prompt", "w5 w6", "--prompt", "w7", "--max-new-tokens", "4",
              "--server", server])  # fmt: skip
    lines = capsys.readouterr().out.splitlines()
    assert len(lines) == 2 and all(len(line.split()) <= 4 for line in lines)
