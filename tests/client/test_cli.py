"""`pema-client` end to end over the in-process tiny server: memory, training, errors, help."""

from __future__ import annotations

import argparse
import json
import re
from collections.abc import Callable
from contextlib import ExitStack
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file

from data_owner_client import cli
from data_owner_client import generate as generate_module
from data_owner_client.adapter import load_adapter
from data_owner_client.client import PemaClient
from data_owner_client.memory import Memory
from tests.server.helpers import serve
from tests.word_cipher import TARGET_WORDS, cipher_rows, write_jsonl

TEMPLATE = "{source}"


@pytest.fixture
def run(make_runner, tmp_path, monkeypatch) -> Callable[..., None]:
    """``run(*argv, arch="llama")``: pema-client against an in-process tiny server."""
    monkeypatch.setenv("PEMA_CLIENT_CACHE", str(tmp_path / "cache"))
    stack = ExitStack()
    served = {"arch": "llama"}

    def connect(args: argparse.Namespace) -> PemaClient:
        http = stack.enter_context(serve(make_runner(served["arch"])))
        return PemaClient(http=http, retries=0)

    monkeypatch.setattr(cli, "connect", connect)

    def run(*argv: str, arch: str = "llama") -> None:
        served["arch"] = arch
        cli.main([*argv, "--no-progress"])

    with stack:
        yield run


@pytest.fixture
def data(tmp_path) -> Path:
    return write_jsonl(tmp_path / "train.jsonl", cipher_rows(120))


MEMORY_FLAGS = (
    "--source-field=src",
    "--target-field=tgt",
    f"--template={TEMPLATE}",
    "--memory-batch-size=16",
    "--memory-dtype=float32",
)
TRAIN_FLAGS = (
    *MEMORY_FLAGS,
    "--rank=32",
    "--dropout=0",
    "--lr=0.01",
    "--stage1-batch-size=64",
    "--stage2-batch-size=32",
    "--stage1-epochs=3",
    "--stage2-epochs=25",
    "--patience=25",
)


def test_train_builds_the_memory_and_learns_what_the_plm_cannot(run, data, tmp_path, make_runner):
    runner = make_runner("llama")
    out = tmp_path / "adapter"
    run("train", "--data", str(data), "--out", str(out), *TRAIN_FLAGS)

    train_memory = Memory.open(out / "memory" / "train")
    dev_memory = Memory.open(out / "memory" / "dev")
    assert len(train_memory) == 108 * 3 and len(dev_memory) == 12 * 3  # 2 words + EOS each
    config = json.loads((out / "adapter_config.json").read_text())
    assert config["template"] == TEMPLATE and config["rank"] == 32
    assert config["length_ratio"] == pytest.approx(TARGET_WORDS)  # target tokens per source token
    assert config["fingerprint"] == train_memory.manifest.fingerprint
    assert (out / "loss_curves.png").read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    log = [json.loads(line) for line in (out / "train_log.jsonl").read_text().splitlines()]
    val = [r for r in log if r["kind"] == "val"]
    assert {r["stage"] for r in val} == {1, 2}
    assert max(r["val_acc"] for r in val if r["stage"] == 2) >= 0.95
    keys, values = dev_memory.load_all()
    plm_accuracy = (runner.head(keys).argmax(-1) == values).float().mean().item()
    assert plm_accuracy <= 0.4  # the PLM alone gets the EOS after the last word at most
    adapter, _ = load_adapter(out, fingerprint=config["fingerprint"])
    assert adapter.A.shape == (32, 32)


def test_memory_build_then_train_on_it_equals_train_from_data(run, data, tmp_path):
    run("train", "--data", str(data), "--out", str(tmp_path / "one"), *MEMORY_FLAGS,
        "--stage2-epochs=2")  # fmt: skip
    run("memory", "build", "--data", str(data), "--out", str(tmp_path / "mem"), *MEMORY_FLAGS)
    run("train", "--memory", str(tmp_path / "mem"), "--out", str(tmp_path / "two"),
        "--stage2-epochs=2")  # fmt: skip
    one = load_file(tmp_path / "one" / "adapter_model.safetensors")
    two = load_file(tmp_path / "two" / "adapter_model.safetensors")
    assert one.keys() == two.keys()
    for name in one:
        torch.testing.assert_close(one[name], two[name], rtol=0, atol=0)


def test_each_kind_stores_its_own_mixing_defaults_unless_told(run, data, tmp_path, capsys):
    run("memory", "build", "--data", str(data), "--out", str(tmp_path / "mem"), *MEMORY_FLAGS)
    settings = {
        "pema": (),
        "residual": ("--adapter-kind=residual", "--rank=8", "--activation=gelu"),
        "sequence": ("--adapter-kind=sequence", "--width=16", "--heads=2", "--no-copy"),
        "told": (
            "--adapter-kind=sequence", "--width=16", "--lambda-max=0.2", "--schedule=linear",
            "--no-repeat-ngram=0",
        ),
    }  # fmt: skip
    for name, flags in settings.items():
        out = tmp_path / name
        run("train", "--memory", str(tmp_path / "mem"), "--out", str(out), "--stage1-epochs=1",
            "--stage2-epochs=1", *flags)  # fmt: skip
        settings[name] = json.loads((out / "adapter_config.json").read_text())
    stored = [
        (c["kind"], c["lambda_max"], c["schedule"], c["no_repeat_ngram"]) for c in settings.values()
    ]
    assert stored == [
        ("pema", 0.9, "quadratic", 0),
        ("residual", 0.5, "constant", 0),
        ("sequence", 0.7, "constant", 4),
        ("sequence", 0.2, "linear", 0),
    ]
    assert settings["residual"]["activation"] == "gelu"
    assert not settings["sequence"]["copy"] and settings["told"]["copy"]  # on by default
    assert (settings["pema"]["rank"], settings["residual"]["rank"]) == (32, 8)  # 512 → d
    assert (settings["pema"]["alpha"], settings["residual"]["alpha"]) == (1.0, 64.0)
    assert settings["sequence"]["width"] == 16 and settings["sequence"]["heads"] == 2
    assert "applies to" not in capsys.readouterr().err
    run("train", "--memory", str(tmp_path / "mem"), "--out", str(tmp_path / "x"),
        "--stage1-epochs=1", "--stage2-epochs=1", "--width=16", "--kappa=0.5")  # fmt: skip
    logged = " ".join(capsys.readouterr().err.split())
    assert "--width applies to the sequence kind(s), not pema: ignored" in logged
    assert "--kappa" not in logged


def test_scheduled_sampling_from_the_command_line(run, data, tmp_path):
    flags = (*MEMORY_FLAGS, "--adapter-kind=sequence", "--width=16", "--heads=2",
             "--stage2-epochs=2")  # fmt: skip
    first, memory = tmp_path / "first", tmp_path / "scheduled"
    run("train", "--data", str(data), "--out", str(first), *flags)
    with pytest.raises(SystemExit, match="pass --sampling-adapter DIR"):
        run("memory", "build", "--data", str(data), "--out", str(memory), *MEMORY_FLAGS,
            "--context", "scheduled")  # fmt: skip
    with pytest.raises(SystemExit, match=r"--sampling-rate must be in \(0, 1\], got 0.0"):
        run("memory", "build", "--data", str(data), "--out", str(memory), *MEMORY_FLAGS,
            "--context", "scheduled", "--sampling-adapter", str(first),
            "--sampling-rate", "0")  # fmt: skip
    with pytest.raises(SystemExit, match="--sampling-adapter is for --context scheduled"):
        run("memory", "build", "--data", str(data), "--out", str(memory), *MEMORY_FLAGS,
            "--sampling-adapter", str(first))  # fmt: skip
    run("memory", "build", "--data", str(data), "--out", str(memory), *MEMORY_FLAGS,
        "--context", "scheduled", "--sampling-adapter", str(first),
        "--sampling-rate", "1")  # fmt: skip
    for part in ("train", "dev"):
        read, gold = Memory.open(memory / part), Memory.open(first / "memory" / part)
        assert read.manifest.sampling is not None and read.manifest.sampling.rate == 1.0
        batches = [m.sequences().batches(200, seed=0, epoch=0, shuffle=False) for m in (read, gold)]
        (_, read_tokens, read_labels), (_, gold_tokens, gold_labels) = (next(b) for b in batches)
        assert torch.equal(read_labels, gold_labels)  # the gold labels
        assert not torch.equal(read_tokens, gold_tokens)  # some of the adapter's choices read
    run("train", "--memory", str(memory), "--out", str(tmp_path / "second"), "--init",
        str(first), "--adapter-kind=sequence", "--width=16", "--heads=2",
        "--stage2-epochs=1")  # fmt: skip
    assert (tmp_path / "second" / "adapter_model.safetensors").is_file()


def test_template_flag_reads_backslash_n_as_a_newline(run, data, tmp_path):
    run("memory", "build", "--data", str(data), "--out", str(tmp_path / "mem"),
        "--source-field=src", "--target-field=tgt", "--template=w3 {source}\\nw4")  # fmt: skip
    assert Memory.open(tmp_path / "mem" / "train").manifest.template == "w3 {source}\nw4"


def test_memory_of_another_model_is_refused(run, data, tmp_path):
    run("memory", "build", "--data", str(data), "--out", str(tmp_path / "mem"),
        "--source-field=src", "--target-field=tgt")  # fmt: skip
    with pytest.raises(SystemExit, match=r"fingerprint .* rebuild it with pema-client memory"):
        run("train", "--memory", str(tmp_path / "mem"), "--out", str(tmp_path / "a"), arch="qwen2")
    assert not (tmp_path / "a" / "adapter_model.safetensors").exists()


@pytest.mark.parametrize(
    ("rows", "message"),
    [
        ([{"src": "w5", "tgt": "w6"}, {"src": "w7"}], r"train\.jsonl:2: field 'tgt' is missing"),
        ([{"src": "w5", "tgt": 3}], r"train\.jsonl:1: field 'tgt' is a int, not text"),
        ([{"source": "w5", "tgt": "w6"}], r"field 'src' is missing \(the row has: source, tgt\)"),
    ],
)
def test_bad_data_names_file_line_and_field(run, tmp_path, rows, message):
    data = write_jsonl(tmp_path / "train.jsonl", rows)
    with pytest.raises(SystemExit, match=message):
        run("train", "--data", str(data), "--out", str(tmp_path / "a"), *TRAIN_FLAGS[:2])
    assert not (tmp_path / "a" / "memory" / "train" / "manifest.json").exists()


def test_bad_invocations_say_what_to_do(run, data, tmp_path):
    out = str(tmp_path / "a")
    with pytest.raises(SystemExit, match="either --data .* or --memory"):
        run("train", "--data", str(data), "--memory", out, "--out", out)
    with pytest.raises(SystemExit, match="no data: pass --data"):
        run("train", "--out", out)
    with pytest.raises(SystemExit, match="neither a built-in .* nor a string containing"):
        run("memory", "build", "--data", str(data), "--out", out, "--template", "nonsense")
    with pytest.raises(SystemExit, match="no memory at .* build one with pema-client memory"):
        run("train", "--memory", str(tmp_path / "nowhere"), "--out", out)


def test_no_server_is_a_clear_error(monkeypatch, tmp_path):
    monkeypatch.delenv("PEMA_SERVER", raising=False)
    with pytest.raises(SystemExit, match="no server given: pass --server URL or set PEMA_SERVER"):
        cli.main(["info"])


@pytest.mark.parametrize(
    ("argv", "server"),
    [
        (["--server", "http://a", "info"], "http://a"),
        (["info", "--server", "http://b"], "http://b"),
        (["--server", "http://a", "info", "--server", "http://b"], "http://b"),
        (["info"], None),
    ],
)
def test_server_flag_before_or_after_the_command(argv, server):
    args = cli.build_parser().parse_args(argv)
    assert args.server == server and args.api_key is None


@pytest.mark.parametrize("command", ["train", "generate", "evaluate"])
def test_help_documents_every_flag_with_its_default(capsys, command):
    with pytest.raises(SystemExit):
        cli.main([command, "--help"])
    text = " ".join(capsys.readouterr().out.split())
    parser = cli.build_parser()
    sub = parser._subparsers._group_actions[0].choices[command]  # type: ignore[union-attr]
    for action in sub._actions:
        assert action.help, f"{action.option_strings} has no help"
        if action.default not in (None, False, [], argparse.SUPPRESS):
            flag = action.option_strings[-1]
            assert re.search(rf"{flag} \S+ .*?\(default: {re.escape(str(action.default))}\)", text)
    assert "(default: [])" not in text and "(default: None)" not in text
    if command != "train":
        return
    for default in (
        "clamped to the hidden size (default per kind: pema: 512; residual: 64)",
        "(default: 20480)",
    ):
        assert default in text


def test_generate_output_continues_after_a_kill_and_refuses_another_run(
    run, data, tmp_path, monkeypatch
):
    """A killed `generate --output` run, started again, keeps the finished batches, decodes the
    rest and ends as the uninterrupted run; other settings, or a foreign file, are refused."""
    out = tmp_path / "out.jsonl"
    flags = ("generate", "--data", str(data), "--source-field=src", f"--template={TEMPLATE}",
             "--limit=10", "--batch-size=4", "--max-new-tokens=6", "--lambda-max=0",
             "--output", str(out))  # fmt: skip
    run(*flags)
    whole = out.read_text()
    assert len(whole.splitlines()) == 10
    decoded: list[int] = []
    decode = generate_module.Generator.decode

    def counting(self, jobs):
        decoded.append(sum(len(job.rows) for job in jobs))
        return decode(self, jobs)

    monkeypatch.setattr(generate_module.Generator, "decode", counting)
    lines = whole.splitlines(keepends=True)
    out.write_text("".join(lines[:6]) + lines[6][:15])  # killed while writing row 7
    run(*flags)
    assert out.read_text().startswith("".join(lines[:4]))  # the finished batch, untouched
    assert timeless(out.read_text()) == timeless(whole)
    assert decoded == [4, 2]  # rows 0-3 kept; the cut batch and the last one again
    decoded.clear()
    resumed = out.read_text()
    run(*flags)  # finished: nothing to decode
    assert timeless(out.read_text()) == timeless(resumed) and decoded == []
    with pytest.raises(SystemExit, match=r"another run \(settings differ\)"):
        run(*flags[:-2], "--max-new-tokens=7", "--output", str(out))
    assert out.read_text() == resumed
    foreign = tmp_path / "foreign.jsonl"
    foreign.write_text("mine\n")
    with pytest.raises(SystemExit, match="--overwrite"):
        run(*flags[:-1], str(foreign))
    assert foreign.read_text() == "mine\n"
    run(*flags[:-1], str(foreign), "--overwrite")
    assert timeless(foreign.read_text()) == timeless(whole)


def test_generate_decodes_with_an_ensemble_of_adapters_and_by_beam_search(run, data, tmp_path):
    """Several --adapter folders decode as one ensemble; --num-beams searches; each is recorded
    as its own run of the output file."""
    adapters = [tmp_path / f"adapter-{seed}" for seed in range(2)]
    for seed, out in enumerate(adapters):
        run("train", "--data", str(data), "--out", str(out), *MEMORY_FLAGS, "--limit=40",
            "--adapter-kind=residual", "--rank=8", "--stage2-epochs=2",
            f"--seed={seed}")  # fmt: skip
    flags = ("generate", "--data", str(data), "--source-field=src", "--limit=6",
             "--max-new-tokens=4", "--lambda-max=0.5")  # fmt: skip
    records = {}
    for name, extra in (
        ("one", ("--adapter", str(adapters[0]))),
        ("both", ("--adapter", *map(str, adapters))),
        ("beams", ("--adapter", *map(str, adapters), "--num-beams=3")),
    ):
        out = tmp_path / f"{name}.jsonl"
        run(*flags, *extra, "--output", str(out))
        records[name] = timeless(out.read_text())
        assert len(records[name]) == 6
    with pytest.raises(SystemExit, match="--report"):
        run("evaluate", "--data", str(data), "--source-field=src", "--target-field=tgt",
            "--limit=4", "--adapter", *map(str, adapters))  # fmt: skip
    settings = json.loads((tmp_path / "beams.jsonl.run.json").read_text())["settings"]
    assert settings["num_beams"] == 3
    assert "num_beams" not in json.loads((tmp_path / "both.jsonl.run.json").read_text())["settings"]
    run("train", "--data", str(data), "--out", str(tmp_path / "pema"), *MEMORY_FLAGS,
        "--limit=40", "--rank=8", "--stage1-epochs=1", "--stage2-epochs=1")  # fmt: skip
    with pytest.raises(SystemExit, match="one kind"):
        run(*flags, "--adapter", str(adapters[0]), str(tmp_path / "pema"))


def timeless(jsonl: str) -> list[dict[str, object]]:
    """The records without their decoding times."""
    records = [json.loads(line) for line in jsonl.splitlines()]
    return [{k: v for k, v in r.items() if k != "seconds"} for r in records]
