"""PEMA training versus LoRA fine-tuning of the whole local model, on the same pairs, in one run.

    python bench/bench_train.py [--pairs 128] [--epochs 2] [--json PATH]

On SmolLM2 and WMT22 en→de pairs (the paper's translation prompt):

1. External memory through a `pema-server` subprocess, with the library's ``build_memory``:
   teacher forcing versus the generated context (seconds; goal ≥ 10×).
2. PEMA: ``pema-client train --memory DIR`` in its own process, ``--epochs`` epochs of stage 1
   and of stage 2 (no early stop), the paper's batch sizes.
3. LoRA with peft (``lora.py``: r = 8 on every linear layer, AdamW, 8 sequences per step) on the
   whole local model in its own process, ``--epochs`` epochs over the same training examples,
   the loss on the same target tokens + EOS that the memory holds (logits only there).

Peak memory is each trainer process's peak resident set (VmHWM; on CUDA, peak allocated), also
counted above the same process right after its imports. Wall time is the whole trainer process
(loading included); PEMA is also shown with its memory build included.
"""

from __future__ import annotations

import argparse
import json
import subprocess
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

import torch
from bench_common import DATA, machine, publish, running_server
from lora import LoraSettings, encode, load_model, rss_bytes, train

TEMPLATE = "translate"
MEMORY_GOAL, TIME_GOAL, BUILD_GOAL = 0.1, 1 / 3, 10.0


def examples(args: argparse.Namespace) -> tuple[list[Any], list[Any]]:
    """The train and dev examples, split exactly as ``pema-client`` splits them."""
    from data_owner_client.data import load_examples, split_dev

    return split_dev(load_examples(args.data, "en", "du", limit=args.pairs), 0.1)


# ---- the trainer processes --------------------------------------------------------------------


def pema_worker(cli_args: list[str]) -> None:
    """``pema-client train`` in this process."""
    from data_owner_client import cli

    cli.main(cli_args)


def lora_worker(args: argparse.Namespace) -> None:
    """LoRA fine-tuning of the whole model on the prompts + targets of the training examples."""
    from data_owner_client.data import resolve_template

    model, tokenizer, _ = load_model()
    rows = encode(tokenizer, resolve_template(TEMPLATE), examples(args)[0])
    train(model, rows, LoraSettings(epochs=args.epochs))


def worker(kind: str, result: Path, args: argparse.Namespace, rest: list[str]) -> None:
    """Run one trainer; write its wall time and memory figures to ``result``."""
    import transformers  # noqa: F401  (both trainers import it: part of the baseline)

    base = rss_bytes("VmRSS")
    started = time.perf_counter()
    if kind == "pema":
        pema_worker(rest)
    else:
        lora_worker(args)
    figures = {"wall_s": time.perf_counter() - started, "base_rss": base}
    figures["peak_rss"] = rss_bytes("VmHWM")
    if torch.cuda.is_available():
        figures["cuda_peak"] = torch.cuda.max_memory_allocated()
    result.write_text(json.dumps(figures))


def run_worker(kind: str, args: argparse.Namespace, rest: list[str], tmp: Path) -> dict[str, Any]:
    result = tmp / f"{kind}.json"
    argv = [sys.executable, __file__, "--worker", kind, "--result", str(result)]
    argv += ["--pairs", str(args.pairs), "--epochs", str(args.epochs), "--data", str(args.data)]
    subprocess.run([*argv, "--", *rest], check=True)
    figures: dict[str, Any] = json.loads(result.read_text())
    figures["above_base"] = figures["peak_rss"] - figures["base_rss"]
    return figures


# ---- the parent ---------------------------------------------------------------------------------


def build_memories(url: str, args: argparse.Namespace, tmp: Path) -> dict[str, Any]:
    """Time teacher-forced and generated-context builds of the same train and dev examples."""
    from data_owner_client.client import PemaClient
    from data_owner_client.data import resolve_template
    from data_owner_client.memory import build_memory
    from data_owner_client.served_model import ServedModel

    train, dev = examples(args)
    seconds: dict[str, float] = {}
    with PemaClient(url) as client:
        served = ServedModel.fetch(client)
        for context in ("teacher", "generated"):
            started = time.perf_counter()
            for name, part in (("train", train), ("dev", dev)):
                build_memory(client, served.tokenizer, part, tmp / context / name,
                             template=resolve_template(TEMPLATE), context=context)  # fmt: skip
            seconds[context] = time.perf_counter() - started
    return {"seconds": seconds, "train_examples": len(train), "dev_examples": len(dev)}


def table(r: dict[str, Any]) -> str:
    pema, lora, build = r["pema"], r["lora"], r["memory"]["seconds"]
    gib = 1024**3

    def goal(value: float, target: float, at_least: bool = False) -> str:
        met = value >= target if at_least else value <= target
        return f"{'≥' if at_least else '≤'} {target:.3g} {'✓' if met else '✗'}"

    with_build = pema["wall_s"] + build["teacher"]
    rows = [
        "| measurement | PEMA | LoRA | ratio | goal |",
        "|---|---|---|---|---|",
        f"| peak RSS of the trainer (GiB) | {pema['peak_rss'] / gib:.2f} | "
        f"{lora['peak_rss'] / gib:.2f} | {pema['peak_rss'] / lora['peak_rss']:.3f} | |",
        f"| peak RSS above imports (GiB) | {pema['above_base'] / gib:.2f} | "
        f"{lora['above_base'] / gib:.2f} | {pema['above_base'] / lora['above_base']:.3f} | "
        f"{goal(pema['above_base'] / lora['above_base'], MEMORY_GOAL)} |",
        f"| training wall time, memory build excluded (s) | {pema['wall_s']:.0f} | "
        f"{lora['wall_s']:.0f} | {pema['wall_s'] / lora['wall_s']:.3f} | "
        f"{goal(pema['wall_s'] / lora['wall_s'], TIME_GOAL)} |",
        f"| training wall time, memory build included (s) | {with_build:.0f} | "
        f"{lora['wall_s']:.0f} | {with_build / lora['wall_s']:.3f} | "
        f"{goal(with_build / lora['wall_s'], TIME_GOAL)} |",
        f"| memory build: generated ÷ teacher-forced (s) | {build['generated']:.0f} ÷ "
        f"{build['teacher']:.0f} | | {build['generated'] / build['teacher']:.2f}× | "
        f"{goal(build['generated'] / build['teacher'], BUILD_GOAL, True)} |",
    ]
    return "\n".join(rows)


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--pairs", type=int, default=128, help="WMT22 examples (train + dev)")
    parser.add_argument("--epochs", type=int, default=2, help="epochs of each method and stage")
    parser.add_argument("--data", type=Path, default=DATA, help="JSONL with en and du fields")
    parser.add_argument("--json", type=Path, help="also write the results here")
    parser.add_argument("--worker", choices=("pema", "lora"), help=argparse.SUPPRESS)
    parser.add_argument("--result", type=Path, help=argparse.SUPPRESS)
    args, rest = parser.parse_known_args(argv)
    rest = [a for a in rest if a != "--"]
    if args.worker:
        return worker(args.worker, args.result, args, rest)
    started = time.perf_counter()
    threads = torch.get_num_threads()
    with tempfile.TemporaryDirectory() as name:
        tmp = Path(name)
        with running_server(threads, tmp / "log") as url:
            results: dict[str, Any] = {"memory": build_memories(url, args, tmp)}
            epochs = str(args.epochs)
            pema_args = ["train", "--server", url, "--memory", str(tmp / "teacher"), "--out",
                         str(tmp / "adapter"), "--stage1-epochs", epochs, "--stage2-epochs",
                         epochs, "--patience", str(args.epochs + 1), "--no-progress"]  # fmt: skip
            results["pema"] = run_worker("pema", args, pema_args, tmp)
        results["lora"] = run_worker("lora", args, [], tmp)  # the server stopped: RAM to spare
    results["machine"] = machine(threads)
    results["wall_s"] = time.perf_counter() - started
    m, r = results["machine"], results["memory"]
    header = (
        f"\nSmolLM2-135M-Instruct, {r['train_examples']} WMT22 train + {r['dev_examples']} dev "
        f"examples, {args.epochs} epochs; {m['cpus']} CPUs ({m['cpu']}), torch {m['torch']}; "
        f"{results['wall_s']:.0f} s"
    )
    publish(results, header, table(results), args.json)


if __name__ == "__main__":
    main()
