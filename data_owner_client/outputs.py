"""Resumable output files (`pema-client generate --output FILE`): records are appended as each
batch of rows finishes, and a sidecar ``FILE.run.json`` records what produced them. Run again with
the same inputs, model, adapter and settings, the command keeps the finished batches and continues
after them (a batch cut off by a kill is decoded again, so the file ends as an uninterrupted run's
would); a run of anything else is refused rather than mixed in."""

from __future__ import annotations

import dataclasses
import hashlib
import json
from collections.abc import Iterable, Sequence
from pathlib import Path
from typing import Any

from data_owner_client.adapter import adapter_tensors
from data_owner_client.data import Example, dataset_hash
from data_owner_client.files import write_atomic
from data_owner_client.generate import Generator
from shared.codec import hash_tensors

SIDECAR_SUFFIX = ".run.json"


# Generation settings added after the record format, with their off values.
ADDED_OFF: dict[str, Any] = {"no_repeat_ngram": 0, "min_length": 0.0}


class OutputFileError(ValueError):
    """The output file belongs to another run, or to nobody we know."""


def file_digest(*paths: Path) -> str:
    """``sha256:<hex>`` of the files' names and bytes, in order (a kNN memory's identity)."""
    digest = hashlib.sha256()
    for path in paths:
        digest.update(path.name.encode() + b"\0" + path.read_bytes())
    return f"sha256:{digest.hexdigest()}"


def run_record(
    generator: Generator, examples: Sequence[Example], **identity: Any
) -> dict[str, Any]:
    """What decides a generator's records over ``examples``: the inputs, the model, the
    adapter's weights, its settings, and ``identity`` (e.g. the method, or a kNN memory)."""
    adapter = None
    if generator.adapter is not None:
        digest = hashlib.sha256()
        hash_tensors(digest, adapter_tensors(generator.adapter))
        adapter = f"sha256:{digest.hexdigest()}"
    return {
        "inputs": dataset_hash(examples, generator.template),
        "model": generator.served.info.fingerprint,
        "adapter": adapter,
        **identity,
        "settings": settings_record(generator),
    }


def settings_record(generator: Generator) -> dict[str, Any]:
    """A Generator's settings that decide its outputs: its config as applied (the batch size and
    token budget after the server's limits), not where or how patiently it decodes."""
    settings = dataclasses.asdict(generator.config)
    for volatile in ("device", "reconnect_s"):
        settings.pop(volatile, None)
    settings["num_beams"] = generator.mixing.num_beams  # the adapter's when not given
    if generator.mixing.num_beams == 1:  # as records from before beam search read
        del settings["num_beams"], settings["length_penalty"]
    settings.update(
        batch_size=generator.batch_size,
        max_new_tokens=generator.max_new_tokens,
        no_repeat_ngram=generator.mixing.no_repeat_ngram,  # the adapter's when not given
    )
    return settings


def read_records(path: Path) -> list[dict[str, Any]]:
    """The JSON records of an output file (split on newlines only)."""
    return [json.loads(line) for line in path.read_text(encoding="utf-8").split("\n") if line]


def append_outputs(path: Path, outputs: Iterable[Any]) -> None:
    """Append each output's JSON record to ``path`` as it comes (flushed: a kill loses at most
    the record being written)."""
    with path.open("a", encoding="utf-8") as f:
        for output in outputs:
            f.write(json.dumps(output.to_dict(), ensure_ascii=False) + "\n")
            f.flush()


def resume(
    path: Path, run: dict[str, Any], total: int, batch_size: int, overwrite: bool = False
) -> int:
    """Prepare ``path`` for the run described by ``run`` (JSON data) over ``total`` inputs;
    returns how many records it keeps (whole batches, or all when finished), after which the run
    continues appending."""
    sidecar = path.with_name(path.name + SIDECAR_SUFFIX)
    run = json.loads(json.dumps(run))  # as it reads back (tuples become lists)
    if overwrite or not path.exists():
        # In this order, a kill anywhere leaves no outputs (a fresh start next time) or empty
        # outputs under this run's record: never old outputs under a new record, or none.
        path.unlink(missing_ok=True)
        write_atomic(sidecar, (json.dumps(run, indent=2, sort_keys=True) + "\n").encode())
        write_atomic(path, b"")
        return 0
    if not sidecar.is_file():
        raise OutputFileError(
            f"{path} exists but pema-client generate did not write it (no {sidecar.name}); "
            "choose another --output, or pass --overwrite to replace it"
        )
    before, now = (_comparable(r) for r in (json.loads(sidecar.read_text()), run))
    if differ := sorted(k for k in now.keys() | before.keys() if before.get(k) != now.get(k)):
        raise OutputFileError(
            f"{path} holds the outputs of another run ({', '.join(differ)} differ); choose "
            "another --output, or pass --overwrite to start again"
        )
    finished = _complete_records(path.read_text(encoding="utf-8"))
    if len(finished) < total:
        finished = finished[: len(finished) - len(finished) % batch_size]
    keep = finished[:total]
    write_atomic(path, "".join(keep).encode("utf-8"))
    return len(keep)


def _comparable(run: dict[str, Any]) -> dict[str, Any]:
    """``run`` without the settings that were added after output files were first written and
    are off: an older file, which does not name them, resumes under a newer client."""
    settings = run.get("settings")
    if not isinstance(settings, dict):
        return run
    kept = {k: v for k, v in settings.items() if not (k in ADDED_OFF and v == ADDED_OFF[k])}
    return {**run, "settings": kept}


def _complete_records(text: str) -> list[str]:
    """The file's lines up to the first that a kill cut short (unterminated or not JSON)."""
    records = []
    # Split on newlines only: a prediction may hold U+2028 and the like, which JSON keeps raw.
    for line in text.split("\n")[:-1] if text.endswith("\n") else text.split("\n"):
        line += "\n"
        try:
            if not line.endswith("\n"):
                break
            json.loads(line)
        except json.JSONDecodeError:
            break
        records.append(line)
    return records
