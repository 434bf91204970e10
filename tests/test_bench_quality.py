"""The quality benchmark's bookkeeping: shared artefacts, decoding speed, the table and the plot."""

from __future__ import annotations

import sys
from pathlib import Path

import httpx
import pytest

from tests.tiny_models import tiny_model, tiny_tokenizer

sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "bench"))
import lora  # noqa: E402
import quality  # noqa: E402
from bench_common import running_server  # noqa: E402


def test_runs_that_change_nothing_share_the_main_adapter_and_outputs():
    main = {run.name: run for run in quality.main_runs()}
    ablations = {run.name: run for run in quality.ablation_runs()}
    kinds = {run.name for run in quality.kind_ablation_runs()}
    same = ["kappa-0.2", "rank-512", "memory-100", "context-teacher", "schedule-quadratic"]
    same.append(f"lambda-{quality.LAMBDA_MAX:g}")
    for name in same:
        assert ablations[name].predictions_key == main["pema-gu"].predictions_key, name
    keys = {run.predictions_key for name, run in ablations.items() if name not in kinds}
    # κ 0 and 0.5, ranks 64 and 256, two memory sizes, generated context, linear and constant,
    # three other λ_max, and the main run: every other setting decodes once.
    assert len(keys) == 13
    assert main["pema-gu"].adapter_key == main["pema-constant"].adapter_key
    assert ablations["rank-64"].adapter_key != main["pema-gu"].adapter_key
    # The other kinds' main runs are among their λ ablations; their settings train adapters.
    assert ablations["residual-lambda-0.5"].predictions_key == main["residual"].predictions_key
    assert ablations["sequence-no-repeat-4"].predictions_key == main["sequence"].predictions_key
    assert ablations["sequence-lambda-1"].adapter_key == main["sequence"].adapter_key
    # The read pointer's main run is its λ 0.5 ablation and its settings row.
    read = ablations["sequence-read-lambda-0.5"]
    assert read.predictions_key == ablations["sequence-pointer-read"].predictions_key
    # The PLM run trains nothing (key "all"); three main adapters (residual, sequence, its read
    # pointer), two residual and eleven other sequence settings, self-training's two (its
    # own memory, and the run on the pairs that starts from it) and scheduled sampling's one
    # (greedy and 4 beams decode it).
    assert len({ablations[name].adapter_key for name in kinds}) == 1 + 3 + 2 + 11 + 2 + 1
    scheduled = ablations["sequence-scheduled-0.25-beam-4"]
    assert scheduled.init == "sequence" and scheduled.memory == "scheduled-0.25"
    # Ensembles and beams decode adapters trained for other runs: their members, no new one.
    ensemble, beams = ablations["sequence-ensemble-2"], main["sequence-beam-4"]
    assert ensemble.member(0) == ensemble and ensemble.adapter_key == main["sequence"].adapter_key
    assert ensemble.member(1).adapter_key == ablations["sequence-seed-1"].adapter_key
    assert beams.adapter_key == main["sequence"].adapter_key
    assert len({main["sequence"].predictions_key, ensemble.predictions_key,
                beams.predictions_key}) == 3  # fmt: skip
    then = ablations["sequence-self-1000-then-pairs"]
    assert then.memory == "all" and quality.RUNS[then.init].memory == "self-1000"
    assert main["lora-beam-4"].predictions_key != main["lora"].predictions_key
    # The repetition guard only changes decoding: the same adapter, other outputs.
    guarded, plain = ablations["sequence-lambda-0.5-no-repeat-4"], ablations["sequence-lambda-0.5"]
    assert guarded.adapter_key == plain.adapter_key == main["sequence"].adapter_key
    assert guarded.predictions_key != plain.predictions_key
    assert ablations["plm-no-repeat-4"].predictions_key != quality.PLM.predictions_key
    # The source pointer's settings decode as its main run; the read pointer's at λ 0.5.
    assert ablations["sequence-4-layers"].decode == main["sequence"].decode
    assert ablations["sequence-read-4-layers"].decode == read.decode
    # Gradual Unrolling from λ 1 down to the kind's own λ, with the guard, on the main adapter.
    floor = ablations["sequence-quadratic-1-floor"]
    assert floor.adapter_key == main["sequence"].adapter_key
    assert floor.decode[:4] == ("--lambda-max", "1", "--lambda-min", f"{quality.SEQUENCE_LAMBDA:g}")
    assert floor.decode[-2:] == quality.NO_REPEAT_4


def test_generation_speed_counts_each_batch_at_its_slowest_row():
    records = [{"tokens": 10, "seconds": s} for s in (1.0, 2.0, 0.5, 4.0, 3.0)]
    speed = quality.generation_speed(records, batch_size=2)
    assert speed["new_tokens"] == 50
    assert speed["seconds"] == pytest.approx(2.0 + 4.0 + 3.0)
    assert speed["tokens_per_second"] == pytest.approx(50 / 9.0)


def result(task: str, run: quality.Run, bleu: float) -> dict:
    return {
        "task": task,
        "run": quality.asdict(run),
        "split": "test",
        "size": {"train": 10, "eval": 4, "tune": 2},
        "scores": {"bleu": bleu, "sentence_bleu": bleu + 1, "chrf": bleu + 2},
        "generation": {"new_tokens": 40, "seconds": 2.0, "tokens_per_second": 20.0},
        "training": {"seconds": 30.0, "memory_build_s": 12.0, "peak_rss": 2**30}
        if run.method == "pema"
        else {},
        **({"versus_plm": {"bleu_p": 0.0123, "chrf_p": 0.5}} if run.method != "plm" else {}),
    }


def test_table_and_plot_come_from_the_results(tmp_path):
    results = [result("bible", run, i) for i, run in enumerate(quality.main_runs())]
    results += [result("bible", run, 5 + i) for i, run in enumerate(quality.ablation_runs()[:3])]
    table = quality.markdown(results)
    assert "**bible** (10 training examples, 4 test inputs)" in table
    assert "| PLM alone | 0.00 | 1.00 | 2.00 |  |  |  |  | 20.0 |" in table
    pema = f"| PEMA, GU quadratic, λ_max {quality.LAMBDA_MAX:g} | 1.00 | 2.00 | 3.00 |"
    lora = [run.name for run in quality.main_runs()].index("lora")  # its gains over the PLM
    assert (
        pema + f" 0.012 / 0.500 | {1 / lora:.2f} / {1 / lora:.2f} | 42 (12 + 30) | 1.00 | 20.0 |"
        in table
    )
    assert "| LoRA (peft, whole model) |" in table and "| 1.00 / 1.00 |" in table
    assert "| κ | 0.5 | 7.00 | 8.00 | 9.00 | 0.012 / 0.500 | 42 (12 + 30) |" in table
    quality.plot(results, tmp_path / "quality.png")
    assert (tmp_path / "quality.png").read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"


def test_paired_bootstrap_separates_a_real_difference_from_chance():
    references = [f"the {w} sat on the mat near the old red door" for w in ("cat", "dog") * 20]
    worse = ["a bird flew over it" for _ in references]
    better = quality.paired_bootstrap(worse, references, references)
    assert better["bleu_p"] < 0.01 and better["chrf_p"] < 0.01
    close = [*references[:-1], "the dog sat on the mat near the new red door"]
    chance = quality.paired_bootstrap(references, close, references)
    assert chance["bleu_p"] > 0.05 and chance["chrf_p"] > 0.05


@pytest.mark.slow
def test_model_flag_reaches_the_server_and_lora(tmp_path):
    folder = tmp_path / "tiny-llama"
    tiny_model("llama").save_pretrained(folder)
    tiny_tokenizer().save_pretrained(folder)
    model, _, _ = lora.load_model(str(folder))
    with running_server(1, tmp_path / "server.log", str(folder)) as url:
        info = httpx.get(f"{url}/v1/model").json()
    assert info["hidden_size"] == model.config.hidden_size == 32
    assert info["vocab_size"] == model.config.vocab_size


def test_lora_baseline_decodes_a_padded_batch_as_each_row_alone():
    model, tokenizer = tiny_model("llama").eval(), tiny_tokenizer()
    sources = ["w5 w6 w7 w8 w9 w10", "w12 w13 w14", "w20 w21"]  # the short rows are left-padded
    batch, _ = lora.generate(model, tokenizer, "{source}", sources, 6, stop=(), batch_size=3)
    alone = [lora.generate(model, tokenizer, "{source}", [s], 6, stop=())[0][0] for s in sources]
    assert batch == alone
    assert all(len(row["prediction"].split()) == row["tokens"] == 6 for row in batch)
