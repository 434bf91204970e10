"""`pema-client evaluate`: the PLM alone and PEMA on the same inputs, scored with sacreBLEU.

Scores are corpus BLEU, mean sentence BLEU (the paper's sBLEU) and chrF. The report directory gets
``report.json``, ``report.md`` (the printed table) and each method's predictions as JSONL.
"""

from __future__ import annotations

import dataclasses
import json
import logging
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from sacrebleu.metrics import BLEU, CHRF

from data_owner_client.adapter import Adapter, AdapterConfig
from data_owner_client.client import PemaClient
from data_owner_client.data import DataError, Example
from data_owner_client.files import write_atomic
from data_owner_client.generate import GenerationConfig, Generator, Mixing
from data_owner_client.outputs import (
    append_outputs,
    read_records,
    resume,
    run_record,
)
from data_owner_client.served_model import ServedModel

log = logging.getLogger(__name__)
REPORT_JSON, REPORT_MD = "report.json", "report.md"
_LABELS = {"plm": "the PLM alone", "pema": "PEMA"}


@dataclass
class Scores:
    """One method's scores and decoding cost over the evaluation set."""

    bleu: float  # corpus BLEU
    sentence_bleu: float  # mean sentence BLEU with effective order (the paper's sBLEU)
    chrf: float  # corpus chrF
    rows: int
    new_tokens: int
    seconds: float  # wall time of the whole decode

    @property
    def tokens_per_second(self) -> float:
        return self.new_tokens / max(self.seconds, 1e-9)


def score(predictions: Sequence[str], references: Sequence[str]) -> dict[str, float]:
    """Corpus BLEU, mean sentence BLEU and chrF of ``predictions`` against one reference each."""
    if len(predictions) != len(references) or not predictions:
        raise ValueError("need as many predictions as references, at least one")
    sentence = BLEU(effective_order=True)
    sentence_scores = [
        sentence.sentence_score(p, [r]).score for p, r in zip(predictions, references, strict=True)
    ]
    return {
        "bleu": BLEU().corpus_score(list(predictions), [list(references)]).score,
        "sentence_bleu": sum(sentence_scores) / len(sentence_scores),
        "chrf": CHRF().corpus_score(list(predictions), [list(references)]).score,
    }


def _scores(records: list[dict[str, Any]], batch_size: int) -> Scores:
    """Scores of the prediction records; the decoding time is each batch's slowest row (a row's
    seconds run from its batch's start), so a continued evaluation times like a whole one."""
    batches = [records[i : i + batch_size] for i in range(0, len(records), batch_size)]
    return Scores(
        **score([r["prediction"] for r in records], [r.get("reference", "") for r in records]),
        rows=len(records),
        new_tokens=sum(r["tokens"] for r in records),
        seconds=round(sum(max(r["seconds"] for r in batch) for batch in batches), 3),
    )


def evaluate(
    client: PemaClient,
    served: ServedModel,
    examples: Sequence[Example],
    adapter: Adapter,
    adapter_config: AdapterConfig,
    config: GenerationConfig,
    template: str,
    report_dir: Path,
    progress: bool = False,
    overwrite: bool = False,
) -> dict[str, Any]:
    """Decode ``examples`` with the PLM alone and with PEMA; write and return the report.

    Each method's predictions are appended to ``predictions_<method>.jsonl`` batch by batch, so
    an evaluation run again after a kill continues after the finished batches (another
    evaluation in the same directory is refused unless ``overwrite``)."""
    if missing := [i for i, e in enumerate(examples) if not e.target]:
        raise DataError(f"example {missing[0]} has no reference; evaluation needs --target-field")
    mixing = Mixing.resolve(config, adapter_config)
    if mixing.lambda_max == 0:
        raise ValueError("evaluate compares the PLM with PEMA: pass a --lambda-max above 0")
    # The PLM decodes as PEMA does: greedy, sampled, or by beam search of the same width.
    plm_config = dataclasses.replace(
        config, lambda_max=0.0, lambda_min=0.0, num_beams=mixing.num_beams
    )
    runs = {
        "plm": Generator(client, served, plm_config, template),
        "pema": Generator(client, served, config, template, adapter, adapter_config),
    }
    report_dir.mkdir(parents=True, exist_ok=True)
    results: dict[str, dict[str, float]] = {}
    for name, generator in runs.items():
        path = report_dir / f"predictions_{name}.jsonl"
        run = run_record(generator, examples, method=name)
        start = resume(path, run, len(examples), generator.batch_size, overwrite)
        log.info("evaluate: decoding %d inputs with %s", len(examples) - start, _LABELS[name])
        append_outputs(path, generator.generate(examples, progress=progress, start=start))
        records = read_records(path)
        scores = _scores(records, generator.batch_size)
        results[name] = {
            **dataclasses.asdict(scores),
            "tokens_per_second": scores.tokens_per_second,
        }
    report = {
        "model_id": served.info.model_id,
        "fingerprint": served.info.fingerprint,
        "examples": len(examples),
        "template": template,
        "adapter_kind": adapter_config.kind,
        "mixing": dataclasses.asdict(mixing),
        "decoding": dataclasses.asdict(config),
        "results": results,
    }
    write_atomic(report_dir / REPORT_JSON, (json.dumps(report, indent=2) + "\n").encode())
    write_atomic(report_dir / REPORT_MD, markdown_table(report).encode())
    return report


def markdown_table(report: dict[str, Any]) -> str:
    """The report's scores as a markdown table."""
    mixing = report["mixing"]
    kind = report.get("adapter_kind", "pema")
    adapter = "PEMA" if kind == "pema" else f"PEMA, {kind} adapter"
    guard = mixing.get("no_repeat_ngram", 0)  # reports from before it was stored lack it
    guarded = f", no repeated {guard}-gram" if guard else ""
    beams = mixing.get("num_beams", 1)  # both decode with the same width
    searched = f", {beams} beams" if beams > 1 else ""
    pema = f"{adapter} ({mixing['schedule']}, λ_max {mixing['lambda_max']:g}{guarded}{searched})"
    plm = f"PLM alone ({beams} beams)" if beams > 1 else "PLM alone"
    rows = [
        "| method | BLEU | sBLEU | chrF | tokens/s |",
        "|---|---:|---:|---:|---:|",
    ]
    for name, label in (("plm", plm), ("pema", pema)):
        r = report["results"][name]
        rows.append(
            f"| {label} | {r['bleu']:.2f} | {r['sentence_bleu']:.2f} | {r['chrf']:.2f} "
            f"| {r['tokens_per_second']:.1f} |"
        )
    return "\n".join(rows) + "\n"
