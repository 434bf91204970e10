"""The data owner's datasets and prompt templates.

Reads JSONL, CSV/TSV and Hugging Face `datasets` data into (source, target) examples, renders
prompts from templates with a ``{source}`` placeholder, and tokenises prompt and target so that the
target continues the prompt exactly as the model would continue it. Every error a user can cause
names the file, the line (or row) and the field, and says what to do.
"""

from __future__ import annotations

import csv
import hashlib
import io
import json
import logging
import random
from collections.abc import Callable, Iterator, Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING, Any

if TYPE_CHECKING:
    from transformers import PreTrainedTokenizerBase

log = logging.getLogger(__name__)

PLACEHOLDER = "{source}"

# The paper's prompts are taken from the official code (agwaBom/PEMA,
# external_memory_builder/datastore_save.py), which ends them with "German: " and appends the
# target. Here the trailing space moves into the target (encode_target), because a BPE tokenizer
# would make it a token of its own that the model never sees before a word.
TEMPLATES: dict[str, str] = {
    "translate": "Translate this from English to German: \n{source}\nGerman:",
    "formalize": (
        "Convert the following informal sentence into a formal sentence: \n"
        "Informal: {source}\nFormal:"
    ),
    "modernize": (
        "Rewrite this King James Bible verse in modern English:\n{source}\nModern English:"
    ),
    "plain": "{source}",
}

JSON_LINES_SUFFIXES = (".jsonl", ".json-lines", ".ndjson")
SUFFIXES = (*JSON_LINES_SUFFIXES, ".json", ".csv", ".tsv")
HUB_PREFIX = "hf:"
_MISSING = object()

Row = Mapping[str, Any]
Located = Iterator[tuple[str, Row]]  # (where the row is, for messages; the row)


class DataError(ValueError):
    """Bad input data or settings; the message names the file, line and field, and the fix."""


@dataclass(frozen=True)
class Example:
    source: str  # the text that fills the template's {source}
    target: str | None  # None only when loaded with require_target=False (generation inputs)


# ---------------------------------------------------------------------------- templates


def resolve_template(name_or_string: str) -> str:
    """A built-in template by name, or any string containing ``{source}``."""
    if name_or_string in TEMPLATES:
        return TEMPLATES[name_or_string]
    if PLACEHOLDER in name_or_string:
        return name_or_string
    names = ", ".join(TEMPLATES)
    raise DataError(
        f"template {name_or_string!r} is neither a built-in ({names}) nor a string "
        f"containing {PLACEHOLDER}; pass one of those to --template"
    )


def render_prompt(template: str, source: str) -> str:
    """The template with ``{source}`` filled in; other braces stay literal."""
    return template.replace(PLACEHOLDER, source)


# ---------------------------------------------------------------------------- loading


def load_examples(
    path: str | Path,
    source_field: str = "source",
    target_field: str | None = "target",
    *,
    limit: int | None = None,
    require_target: bool = True,
) -> list[Example]:
    """Examples from a JSONL/CSV/TSV file, a saved HF dataset directory or ``hf:NAME``.

    A directory may name its split as ``DIR:SPLIT`` (default ``train``); the hub form is
    ``hf:NAME[:CONFIG][@SPLIT]``. Field names may be dotted (``translation.en``) for nested rows.
    """
    if target_field is None and require_target:
        raise DataError("training needs targets: pass --target-field")
    if limit is not None and limit < 1:
        raise DataError(f"--limit must be at least 1, got {limit}")
    examples: list[Example] = []
    for where, row in _rows(path):
        examples.append(_example(row, where, source_field, target_field, require_target))
        if limit is not None and len(examples) >= limit:
            break
    if not examples:
        raise DataError(f"{path}: no examples found (the data is empty)")
    log.info("loaded %d examples from %s", len(examples), path)
    return examples


def _example(
    row: Row, where: str, source_field: str, target_field: str | None, require_target: bool
) -> Example:
    source = _text(row, where, source_field, "--source-field", required=True)
    target = None
    if target_field is not None:
        target = _text(row, where, target_field, "--target-field", required=require_target)
    assert source is not None  # required=True never returns None
    return Example(source, target)


def _text(row: Row, where: str, field: str, flag: str, required: bool) -> str | None:
    """The stripped text of ``field``; None when optional and absent or empty."""
    value = _lookup(row, field)
    if value is _MISSING or value is None:
        if not required:
            return None
        has = ", ".join(map(str, row)) or "no fields"
        state = "is null" if value is None else f"is missing (the row has: {has})"
        raise DataError(
            f"{where}: field {field!r} {state}; fix the row or name the field with {flag}"
        )
    if not isinstance(value, str):
        kind = type(value).__name__
        raise DataError(f"{where}: field {field!r} is a {kind}, not text; fix the row")
    # Surrounding whitespace would double the space encode_target puts between prompt and target.
    text = value.strip()
    if not text and required:
        raise DataError(f"{where}: field {field!r} is empty; fill it in or remove the row")
    return text or None


def _lookup(row: Row, field: str) -> Any:
    """``row[field]``, or the nested value of a dotted name; _MISSING when absent."""
    if field in row:
        return row[field]
    value: Any = row
    for part in field.split("."):
        if not isinstance(value, Mapping) or part not in value:
            return _MISSING
        value = value[part]
    return value


def _rows(path: str | Path) -> Located:
    """Dispatch on the form of ``path``; raises here (not lazily) for a missing or unknown file."""
    spec = str(path)
    if spec.startswith(HUB_PREFIX):
        return _hub_rows(spec)
    directory, split = _directory(spec)
    if directory is not None:
        return _disk_rows(directory, split)
    file = Path(path)
    if not file.is_file():
        raise DataError(f"{file}: no such file; check the --data path")
    suffix = file.suffix.lower()
    if suffix not in SUFFIXES:
        raise DataError(
            f"{file}: unknown format {suffix or '(no extension)'!r}; use {', '.join(SUFFIXES)}, "
            f"a directory saved by datasets' save_to_disk, or {HUB_PREFIX}NAME"
        )
    text = _read_text(file)
    reader = _READERS.get(suffix, _json_lines_rows)
    return reader(file, text)


def _read_text(file: Path) -> str:
    """The file as UTF-8 (a BOM is dropped); a decoding error names its line."""
    data = file.read_bytes()
    try:
        return data.decode("utf-8-sig")
    except UnicodeDecodeError as error:
        line = data[: error.start].count(b"\n") + 1
        raise DataError(f"{file}:{line}: not UTF-8 text; re-save the file as UTF-8") from None


def _json_lines_rows(file: Path, text: str) -> Located:
    """One JSON object per line; blank lines are skipped."""
    # Not splitlines(): JSON strings may hold raw U+2028 and friends, which it splits on.
    for number, line in enumerate(text.split("\n"), 1):
        if not line.strip():
            continue
        try:
            row = json.loads(line)
        except json.JSONDecodeError as error:
            raise DataError(
                f"{file}:{number}: not valid JSON ({error.msg}, column {error.colno}); "
                "each line must be one JSON object"
            ) from None
        yield _object(row, f"{file}:{number}")


def _json_rows(file: Path, text: str) -> Located:
    """A ``.json`` file: a JSON array of objects, or JSON Lines (as the paper's files are)."""
    if not text.lstrip().startswith("["):
        yield from _json_lines_rows(file, text)
        return
    try:
        items = json.loads(text)
    except json.JSONDecodeError as error:
        raise DataError(f"{file}:{error.lineno}: not valid JSON ({error.msg})") from None
    for number, item in enumerate(items, 1):
        yield _object(item, f"{file}: item {number}")


def _object(row: Any, where: str) -> tuple[str, Row]:
    if not isinstance(row, dict):
        raise DataError(f"{where}: expected a JSON object, got {type(row).__name__}")
    return where, row


def _csv_rows(file: Path, text: str) -> Located:
    """A header row names the fields; locations are the physical line a record starts on."""
    delimiter = "\t" if file.suffix.lower() == ".tsv" else ","
    reader = csv.reader(io.StringIO(text, newline=""), delimiter=delimiter)
    header: list[str] | None = None
    end = 0  # physical line the previous record ended on (records may span lines)
    try:
        for cells in reader:
            start, end = end + 1, reader.line_num
            if not cells:
                continue
            if header is None:
                header = cells
                continue
            yield f"{file}:{start}", _csv_record(header, cells, f"{file}:{start}")
    except csv.Error as error:
        raise DataError(
            f"{file}:{reader.line_num}: malformed {delimiter!r} row ({error})"
        ) from None


def _csv_record(header: list[str], cells: list[str], where: str) -> Row:
    if len(cells) > len(header):
        raise DataError(
            f"{where}: {len(cells)} cells but the header names {len(header)} columns; "
            "quote cells that contain the delimiter"
        )
    # A short row keeps only the cells it has, so a missing field reports what the row holds.
    return dict(zip(header, cells, strict=False))


_READERS: dict[str, Callable[[Path, str], Located]] = {
    ".json": _json_rows,
    ".csv": _csv_rows,
    ".tsv": _csv_rows,
}


# ---------------------------------------------------------------------------- Hugging Face


def _directory(spec: str) -> tuple[str | None, str | None]:
    """(directory, split) when ``spec`` is ``DIR`` or ``DIR:SPLIT``; else (None, None)."""
    if Path(spec).is_dir():
        return spec, None
    head, sep, split = spec.rpartition(":")
    if sep and head and Path(head).is_dir():
        return head, split
    return None, None


def _import_datasets(where: str) -> Any:
    try:
        import datasets
    except ImportError:
        raise DataError(
            f"{where}: reading a Hugging Face dataset needs the datasets package: "
            "pip install datasets"
        ) from None
    return datasets


def _disk_rows(directory: str, split: str | None) -> Located:
    """A Dataset or DatasetDict written by ``save_to_disk``."""
    datasets = _import_datasets(directory)
    try:
        data = datasets.load_from_disk(directory)
    except FileNotFoundError as error:
        raise DataError(f"{directory}: not a dataset saved by save_to_disk ({error})") from None
    if isinstance(data, datasets.DatasetDict):
        split = split or "train"
        if split not in data:
            names = ", ".join(data)
            raise DataError(f"{directory}: no split {split!r} (has: {names}); pass DIR:SPLIT")
        data = data[split]
    return _dataset_rows(directory, data)


def _hub_rows(spec: str) -> Located:
    """``hf:NAME[:CONFIG][@SPLIT]`` through ``datasets.load_dataset``."""
    datasets = _import_datasets(spec)
    name_config, _, split = spec.removeprefix(HUB_PREFIX).partition("@")
    name, _, config = name_config.partition(":")
    data = datasets.load_dataset(name, config or None, split=split or "train")
    return _dataset_rows(spec, data)


def _dataset_rows(name: str, data: Any) -> Located:
    for number, row in enumerate(data, 1):
        yield f"{name} row {number}", row


# ---------------------------------------------------------------------------- splits and hashes


def split_dev(
    examples: list[Example], fraction: float, seed: int = 0
) -> tuple[list[Example], list[Example]]:
    """(train, dev): a deterministic shuffled hold-out of ``fraction``, both in input order."""
    if not 0 <= fraction < 1:
        raise DataError(f"the dev fraction must be in [0, 1), got {fraction}")
    count = round(len(examples) * fraction)
    if fraction > 0 and len(examples) >= 2:
        # A tiny set still gets a dev example, and training keeps at least one.
        count = min(max(count, 1), len(examples) - 1)
    order = list(range(len(examples)))
    random.Random(seed).shuffle(order)
    held = set(order[:count])
    train = [e for i, e in enumerate(examples) if i not in held]
    dev = [e for i, e in enumerate(examples) if i in held]
    return train, dev


def dataset_hash(examples: Sequence[Example], template: str) -> str:
    """``sha256:<hex>`` of the template and every (source, target) pair, in order."""
    digest = hashlib.sha256(b"pema-data-v1\n")
    # One JSON document per line: escaping keeps the encoding unambiguous.
    digest.update(json.dumps(template).encode() + b"\n")
    for example in examples:
        digest.update(json.dumps([example.source, example.target]).encode() + b"\n")
    return f"sha256:{digest.hexdigest()}"


# ---------------------------------------------------------------------------- tokenising


def encode_prompt(tokenizer: PreTrainedTokenizerBase, template: str, source: str) -> list[int]:
    """Token ids of the rendered prompt, with the tokenizer's own special tokens (BOS if any)."""
    return list(tokenizer(render_prompt(template, source))["input_ids"])


def encode_target(tokenizer: PreTrainedTokenizerBase, template: str, target: str) -> list[int]:
    """Token ids of ``target`` as it continues the prompt (no special tokens, no EOS)."""
    # Sources are stripped, so the prompt ends in whitespace only if the template does.
    separator = "" if template[-1:].isspace() else " "
    return list(tokenizer(separator + target, add_special_tokens=False)["input_ids"])


def source_length(tokenizer: PreTrainedTokenizerBase, source: str) -> int:
    """Tokens in the bare source (no special tokens): the basis of the learned length ratio."""
    return len(tokenizer(source, add_special_tokens=False)["input_ids"])
