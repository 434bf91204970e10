"""The LoRA baseline: what a data owner with the whole model would do instead of PEMA.

peft LoRA on every linear layer of the local SmolLM2, trained on prompt + target with the loss on
the target tokens + EOS (the tokens the external memory holds), then greedy decoding of the same
prompts with transformers' ``generate`` on the merged model. Used by ``bench_train.py`` (cost) and
``quality.py`` (cost and quality); ``quality.py`` runs it as its own process:

    python bench/lora.py --train train.jsonl --eval eval.jsonl --source-field en \
        --target-field du --template translate --predictions out.jsonl --result figures.json
"""

from __future__ import annotations

import argparse
import json
import random
import time
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch
import torch.nn.functional as F
from bench_common import left_padded

from plm_owner_server.settings import EMBEDDED_MODEL

Rows = list[tuple[list[int], int]]  # (prompt + target + EOS ids, prompt length)


@dataclass(frozen=True)
class LoraSettings:
    rank: int = 8
    alpha: int = 16
    dropout: float = 0.05
    lr: float = 2e-4
    epochs: int = 1
    batch_size: int = 8  # sequences per step


def rss_bytes(field: str) -> int:
    """A memory figure of this process from /proc (VmRSS now, VmHWM peak)."""
    for line in Path("/proc/self/status").read_text().splitlines():
        if line.startswith(field + ":"):
            return int(line.split()[1]) * 1024
    raise RuntimeError(f"/proc/self/status has no {field}")


def load_model(name: str = EMBEDDED_MODEL) -> tuple[Any, Any, torch.device]:
    """``name`` (the embedded SmolLM2 by default, else a Hugging Face id or folder, as
    `pema-server --model` takes it) in float32 with its tokenizer, on CUDA when there is one."""
    from transformers import AutoModelForCausalLM, AutoTokenizer

    from plm_owner_server.embedded import ensure_embedded_model
    from plm_owner_server.settings import Settings

    path = ensure_embedded_model(Settings().cache_dir) if name == EMBEDDED_MODEL else name
    device = torch.device("cuda" if torch.cuda.is_available() else "cpu")
    model = AutoModelForCausalLM.from_pretrained(path, dtype=torch.float32).to(device)
    return model, AutoTokenizer.from_pretrained(path), device


def encode(tokenizer: Any, template: str, examples: Sequence[Any]) -> Rows:
    """Each example as (prompt + target + EOS token ids, prompt length), like the memory's."""
    from data_owner_client.data import encode_prompt, encode_target

    rows = []
    for example in examples:
        prompt = encode_prompt(tokenizer, template, example.source)
        target = encode_target(tokenizer, template, example.target) + [tokenizer.eos_token_id]
        rows.append((prompt + target, len(prompt)))
    return rows


def train(
    model: Any, rows: list[tuple[list[int], int]], settings: LoraSettings, seed: int = 0
) -> Any:
    """LoRA fine-tuning; returns the model with the adapters merged into its weights."""
    from peft import LoraConfig, get_peft_model

    config = LoraConfig(
        r=settings.rank,
        lora_alpha=settings.alpha,
        lora_dropout=settings.dropout,
        target_modules="all-linear",
    )
    torch.manual_seed(seed)
    model = get_peft_model(model, config)
    core = model.get_base_model()  # the causal LM with LoRA layers injected
    device = next(model.parameters()).device
    optimizer = torch.optim.AdamW(
        [p for p in model.parameters() if p.requires_grad], lr=settings.lr
    )
    rng = random.Random(seed)
    model.train()
    for _ in range(settings.epochs):
        for batch in _length_batches(rows, settings.batch_size, rng):
            ids, mask, targets = (t.to(device) for t in _pad(batch))
            hidden = core.model(input_ids=ids, attention_mask=mask).last_hidden_state
            # Logits only where a target token is predicted: the loss the memory's pairs define.
            keep = targets[:, 1:] >= 0
            logits = core.lm_head(hidden[:, :-1][keep])
            loss = F.cross_entropy(logits.float(), targets[:, 1:][keep])
            optimizer.zero_grad(set_to_none=True)
            loss.backward()
            optimizer.step()
    model.eval()
    return model.merge_and_unload()


def _length_batches(rows: Rows, batch_size: int, rng: random.Random) -> list[Rows]:
    """Shuffled batches of rows of similar length (less padding), in shuffled order."""
    order = list(range(len(rows)))
    rng.shuffle(order)
    pool = batch_size * 16
    batches = []
    for first in range(0, len(order), pool):
        chunk = sorted(order[first : first + pool], key=lambda i: len(rows[i][0]))
        batches += [
            [rows[i] for i in chunk[j : j + batch_size]] for j in range(0, len(chunk), batch_size)
        ]
    rng.shuffle(batches)
    return batches


def _pad(batch: Rows) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """Right-padded ids, attention mask and targets (-1 off the target tokens)."""
    width = max(len(ids) for ids, _ in batch)
    ids = torch.zeros(len(batch), width, dtype=torch.long)
    mask = torch.zeros(len(batch), width, dtype=torch.long)
    targets = torch.full((len(batch), width), -1, dtype=torch.long)
    for b, (row, prompt) in enumerate(batch):
        ids[b, : len(row)] = torch.tensor(row)
        mask[b, : len(row)] = 1
        targets[b, prompt : len(row)] = torch.tensor(row[prompt:])
    return ids, mask, targets


@torch.inference_mode()
def generate(
    model: Any,
    tokenizer: Any,
    template: str,
    sources: Sequence[str],
    max_new_tokens: int,
    stop: Sequence[str] = ("\n",),
    batch_size: int = 8,
    num_beams: int = 1,
) -> tuple[list[dict[str, Any]], float]:
    """Greedy outputs, or beam search's with ``num_beams`` (transformers' defaults: length
    penalty 1, ``early_stopping=False``, as ``pema-client generate --num-beams``): prediction and
    new-token count per source, and the decoding seconds."""
    from data_owner_client.data import encode_prompt

    device = next(model.parameters()).device
    eos, pad = tokenizer.eos_token_id, tokenizer.pad_token_id or tokenizer.eos_token_id
    outputs, seconds = [], 0.0
    for first in range(0, len(sources), batch_size):
        prompts = [
            encode_prompt(tokenizer, template, s) for s in sources[first : first + batch_size]
        ]
        ids, mask = left_padded(prompts, pad, device)
        width = ids.shape[1]
        started = time.perf_counter()
        new = model.generate(
            input_ids=ids,
            attention_mask=mask,
            max_new_tokens=max_new_tokens,
            do_sample=False,
            num_beams=num_beams,
            pad_token_id=pad,
            stop_strings=list(stop) or None,
            tokenizer=tokenizer,
        )[:, width:].tolist()
        seconds += time.perf_counter() - started
        for tokens in new:
            count = tokens.index(eos) + 1 if eos in tokens else len(tokens)
            text = tokenizer.decode(tokens[:count], skip_special_tokens=True)
            for s in stop:
                text = text.split(s)[0]
            outputs.append({"prediction": text.strip(), "tokens": count})
    return outputs, seconds


def main(argv: list[str] | None = None) -> None:
    from data_owner_client.data import load_examples, resolve_template, split_dev

    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--train", type=Path, required=True, help="training pairs (JSONL)")
    parser.add_argument("--eval", type=Path, required=True, help="evaluation pairs (JSONL)")
    parser.add_argument("--source-field", required=True)
    parser.add_argument("--target-field", required=True)
    parser.add_argument("--template", required=True)
    parser.add_argument("--dev-fraction", type=float, default=0.1, help="held out, as PEMA's")
    parser.add_argument("--max-new-tokens", type=int, default=128)
    parser.add_argument("--predictions", type=Path, required=True, help="JSONL written here")
    parser.add_argument("--result", type=Path, required=True, help="figures (JSON) written here")
    parser.add_argument("--model", default=EMBEDDED_MODEL, help="Hugging Face id or folder")
    parser.add_argument("--num-beams", type=int, default=1, help="beam search (1: greedy)")
    for name, value in vars(LoraSettings()).items():
        parser.add_argument("--" + name.replace("_", "-"), type=type(value), default=value)
    args = parser.parse_args(argv)
    settings = LoraSettings(**{k: getattr(args, k) for k in vars(LoraSettings())})
    template = resolve_template(args.template)
    fields = (args.source_field, args.target_field)

    base_rss, started = rss_bytes("VmRSS"), time.perf_counter()
    model, tokenizer, _ = load_model(args.model)
    train_examples, _ = split_dev(load_examples(args.train, *fields), args.dev_fraction)
    model = train(model, encode(tokenizer, template, train_examples), settings)
    figures: dict[str, Any] = {
        "train_seconds": time.perf_counter() - started,
        "peak_rss": rss_bytes("VmHWM"),
        "base_rss": base_rss,
        "train_examples": len(train_examples),
        "settings": vars(settings),
    }
    if torch.cuda.is_available():
        figures["cuda_peak"] = torch.cuda.max_memory_allocated()
    examples = load_examples(args.eval, *fields)
    outputs, seconds = generate(
        model,
        tokenizer,
        template,
        [e.source for e in examples],
        args.max_new_tokens,
        num_beams=args.num_beams,
    )
    lines = [
        {"source": e.source, **o, "reference": e.target}
        for e, o in zip(examples, outputs, strict=True)
    ]
    args.predictions.write_text("".join(json.dumps(r, ensure_ascii=False) + "\n" for r in lines))
    figures.update(generate_seconds=seconds, new_tokens=sum(o["tokens"] for o in outputs))
    args.result.write_text(json.dumps(figures, indent=2))


if __name__ == "__main__":
    main()
