"""Datasets and prompt templates: formats, error messages, splits, hashes, tokenisation."""

from __future__ import annotations

import csv
import json
import sys
from pathlib import Path
from typing import Any

import pytest

from data_owner_client.data import (
    TEMPLATES,
    DataError,
    Example,
    dataset_hash,
    encode_prompt,
    encode_target,
    load_examples,
    render_prompt,
    resolve_template,
    source_length,
    split_dev,
)
from tests.tiny_models import tiny_tokenizer

PAIRS = [
    ("Hello, world.", "Hallo, Welt."),
    ('She said "yes"\tthen left.', "Sie sagte „ja“ und ging."),
    ("Line one\nline two", "Zeile eins\nZeile zwei"),
    ("Ünïcödé {braces} 1,2", "Ü {x}"),
]
EXPECTED = [Example(s, t) for s, t in PAIRS]
WMT22_TRAIN = Path(__file__).resolve().parents[3] / "shared" / "data" / "wmt22" / "train.jsonl"


def write_jsonl(path: Path, rows: list[Any]) -> Path:
    path.write_text("".join(json.dumps(row, ensure_ascii=False) + "\n" for row in rows))
    return path


def write_table(path: Path, rows: list[list[str]], delimiter: str) -> Path:
    with path.open("w", newline="", encoding="utf-8") as f:
        csv.writer(f, delimiter=delimiter).writerows(rows)
    return path


def error_text(path: str | Path, **kw: Any) -> str:
    with pytest.raises(DataError) as caught:
        load_examples(path, **kw)
    return str(caught.value)


# ---------------------------------------------------------------------------- formats


@pytest.mark.parametrize("suffix", [".jsonl", ".json-lines", ".ndjson", ".json"])
def test_json_lines_round_trip(tmp_path: Path, suffix: str) -> None:
    rows = [{"source": s, "target": t, "id": i} for i, (s, t) in enumerate(PAIRS)]
    path = write_jsonl(tmp_path / f"data{suffix}", rows)
    # Blank lines (and a trailing one) are skipped.
    path.write_text(path.read_text().replace("\n", "\n\n", 1) + "\n")
    assert load_examples(path) == EXPECTED


def test_json_array(tmp_path: Path) -> None:
    rows = [{"en": s, "du": t} for s, t in PAIRS]
    path = tmp_path / "data.json"
    path.write_text(json.dumps(rows, indent=2))
    assert load_examples(path, "en", "du") == EXPECTED


@pytest.mark.parametrize(("suffix", "delimiter"), [(".csv", ","), (".tsv", "\t")])
def test_table_round_trip(tmp_path: Path, suffix: str, delimiter: str) -> None:
    rows = [["id", "src", "tgt"]] + [[str(i), s, t] for i, (s, t) in enumerate(PAIRS)]
    path = write_table(tmp_path / f"data{suffix}", rows, delimiter)
    assert load_examples(path, "src", "tgt") == EXPECTED


def test_utf8_bom_and_crlf(tmp_path: Path) -> None:
    path = tmp_path / "data.csv"
    path.write_bytes("\ufeffsource,target\r\nA,B\r\n".encode())
    assert load_examples(path) == [Example("A", "B")]


def test_fields_are_stripped_and_nested_names_work(tmp_path: Path) -> None:
    row = {"translation": {"en": "  Hi \n", "de": "\tHallo "}}
    path = write_jsonl(tmp_path / "d.jsonl", [row])
    assert load_examples(path, "translation.en", "translation.de") == [Example("Hi", "Hallo")]


def test_limit_keeps_the_first_rows(tmp_path: Path) -> None:
    rows = [{"source": f"s{i}", "target": f"t{i}"} for i in range(10)]
    # A bad row after the limit is never read.
    path = write_jsonl(tmp_path / "d.jsonl", rows + [{"nope": 1}])
    assert load_examples(path, limit=3) == [Example(f"s{i}", f"t{i}") for i in range(3)]
    assert "--limit" in error_text(path, limit=0)


def test_targets_optional_for_generation(tmp_path: Path) -> None:
    rows = [{"source": "a", "target": "b"}, {"source": "c"}, {"source": "d", "target": ""}]
    path = write_jsonl(tmp_path / "d.jsonl", rows)
    expected = [Example("a", "b"), Example("c", None), Example("d", None)]
    assert load_examples(path, require_target=False) == expected
    no_field = load_examples(path, target_field=None, require_target=False)
    assert [e.target for e in no_field] == [None, None, None]
    assert "--target-field" in error_text(path, target_field=None)


# ---------------------------------------------------------------------------- errors


def test_missing_file(tmp_path: Path) -> None:
    message = error_text(tmp_path / "nope.jsonl")
    assert "nope.jsonl" in message and "no such file" in message


def test_unknown_extension_lists_supported(tmp_path: Path) -> None:
    path = tmp_path / "data.xlsx"
    path.write_text("x")
    message = error_text(path)
    assert "data.xlsx" in message and ".xlsx" in message
    assert all(suffix in message for suffix in (".jsonl", ".csv", ".tsv", "hf:"))


def test_malformed_json_line(tmp_path: Path) -> None:
    path = tmp_path / "d.jsonl"
    path.write_text('{"source": "a", "target": "b"}\n\n{"source": "c", "target": }\n')
    assert f"{path}:3: not valid JSON" in error_text(path)


def test_json_line_not_an_object(tmp_path: Path) -> None:
    path = write_jsonl(tmp_path / "d.jsonl", [{"source": "a", "target": "b"}, ["a", "b"]])
    assert f"{path}:2: expected a JSON object, got list" in error_text(path)


def test_missing_field_names_file_line_field_and_present_fields(tmp_path: Path) -> None:
    rows = [{"en": "a", "du": "b"}, {"en": "c", "de": "d"}]
    path = write_jsonl(tmp_path / "d.jsonl", rows)
    message = error_text(path, source_field="en", target_field="du")
    assert f"{path}:2: field 'du' is missing (the row has: en, de)" in message
    assert "--target-field" in message
    assert "--source-field" in error_text(path, source_field="src", target_field="du")


def test_csv_error_names_the_physical_line(tmp_path: Path) -> None:
    # Quoted cells span lines 2-3 and 4-5: the short record starts on physical line 4.
    rows = [["source", "target"], ["multi\nline", "ok"], ["short\nrecord"]]
    path = write_table(tmp_path / "d.csv", rows, ",")
    assert f"{path}:4: field 'target' is missing (the row has: source)" in error_text(path)


def test_csv_row_with_extra_cells(tmp_path: Path) -> None:
    path = tmp_path / "d.csv"
    path.write_text("source,target\na,b\nc,d,e\n")
    assert f"{path}:3: 3 cells but the header names 2 columns" in error_text(path)


@pytest.mark.parametrize(
    ("value", "problem"),
    [(7, "is a int, not text"), (None, "is null"), ("  ", "is empty"), ([], "is a list")],
)
def test_bad_source_values(tmp_path: Path, value: Any, problem: str) -> None:
    rows = [{"source": "ok", "target": "ok"}, {"source": value, "target": "x"}]
    path = write_jsonl(tmp_path / "d.jsonl", rows)
    assert f"{path}:2: field 'source' {problem}" in error_text(path)


@pytest.mark.parametrize("content", ["", "\n\n", "source,target\n"])
def test_empty_data(tmp_path: Path, content: str) -> None:
    path = tmp_path / ("d.csv" if "," in content else "d.jsonl")
    path.write_text(content)
    assert f"{path}: no examples" in error_text(path)


def test_not_utf8_names_the_line(tmp_path: Path) -> None:
    path = tmp_path / "d.jsonl"
    path.write_bytes(b'{"source": "a", "target": "b"}\n{"source": "\xff"}\n')
    assert f"{path}:2: not UTF-8" in error_text(path)


# ---------------------------------------------------------------------------- Hugging Face


@pytest.mark.parametrize("spec", ["hf:wmt16:de-en@train", "DIR", "DIR:validation"])
def test_hf_without_datasets_says_what_to_install(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch, spec: str
) -> None:
    monkeypatch.setitem(sys.modules, "datasets", None)  # makes `import datasets` fail
    spec = spec.replace("DIR", str(tmp_path))
    with pytest.raises(DataError, match="pip install datasets"):
        load_examples(spec)


class FakeDatasets:
    """Stands in for the `datasets` module: records calls, returns lists of row dicts."""

    class DatasetDict(dict):
        pass

    def __init__(self) -> None:
        self.calls: list[tuple[Any, ...]] = []

    def load_dataset(self, name: str, config: str | None, split: str) -> list[dict[str, str]]:
        self.calls.append((name, config, split))
        return [{"en": "a", "de": "b"}, {"en": "c"}]

    def load_from_disk(self, directory: str) -> Any:
        self.calls.append((directory,))
        return self.DatasetDict(train=[{"en": "a", "de": "b"}], dev=[{"en": "x", "de": "y"}])


def test_hf_branches_with_a_fake_module(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    fake = FakeDatasets()
    monkeypatch.setitem(sys.modules, "datasets", fake)
    message = error_text("hf:wmt16:de-en@validation", source_field="en", target_field="de")
    assert fake.calls == [("wmt16", "de-en", "validation")]
    assert "hf:wmt16:de-en@validation row 2: field 'de' is missing (the row has: en)" in message
    load_examples("hf:opus", "en", "de", limit=1)
    assert fake.calls[-1] == ("opus", None, "train")
    assert load_examples(tmp_path, "en", "de") == [Example("a", "b")]
    assert load_examples(f"{tmp_path}:dev", "en", "de") == [Example("x", "y")]
    assert "no split 'test' (has: train, dev)" in error_text(f"{tmp_path}:test")


def test_hf_saved_dataset(tmp_path: Path) -> None:
    datasets = pytest.importorskip("datasets")
    rows = {"en": [s for s, _ in PAIRS], "du": [t for _, t in PAIRS]}
    splits = datasets.DatasetDict(
        train=datasets.Dataset.from_dict(rows), dev=datasets.Dataset.from_dict({"en": ["x"]})
    )
    splits.save_to_disk(str(tmp_path / "ds"))
    assert load_examples(tmp_path / "ds", "en", "du") == EXPECTED
    assert load_examples(f"{tmp_path / 'ds'}:dev", "en", "du", require_target=False) == [
        Example("x", None)
    ]
    with pytest.raises(DataError, match="no split 'test'"):
        load_examples(f"{tmp_path / 'ds'}:test", "en", "du")


@pytest.mark.skipif(not WMT22_TRAIN.is_file(), reason="shared WMT22 data not on this machine")
def test_real_wmt22_file_loads() -> None:
    examples = load_examples(WMT22_TRAIN, "en", "du")
    assert len(examples) == 10_000
    assert examples[0] == Example("$10,000 Gold?", "Steigt Gold auf 10.000 Dollar?")


# ---------------------------------------------------------------------------- templates


def test_builtin_templates() -> None:
    assert set(TEMPLATES) == {"translate", "formalize", "modernize", "plain"}
    for name, template in TEMPLATES.items():
        assert resolve_template(name) == template
        assert template.count("{source}") == 1
        # The target follows after a space that encode_target adds, not one in the template.
        assert not template[-1].isspace()
    assert TEMPLATES["plain"] == "{source}"


def test_paper_prompts() -> None:
    assert render_prompt(TEMPLATES["translate"], "Hi.") + " " == (
        "Translate this from English to German: \nHi.\nGerman: "
    )
    assert render_prompt(TEMPLATES["formalize"], "hey") + " " == (
        "Convert the following informal sentence into a formal sentence: \nInformal: hey\nFormal: "
    )


def test_custom_template_keeps_other_braces_literal() -> None:
    template = resolve_template("{source} -> {x} {0} {")
    assert render_prompt(template, "a{b}") == "a{b} -> {x} {0} {"


def test_template_without_placeholder_is_refused() -> None:
    with pytest.raises(DataError) as caught:
        resolve_template("Translate:")
    message = str(caught.value)
    assert "{source}" in message and all(name in message for name in TEMPLATES)


# ---------------------------------------------------------------------------- splits and hashes


def numbered(n: int) -> list[Example]:
    return [Example(f"s{i}", f"t{i}") for i in range(n)]


def test_split_dev_is_deterministic_and_disjoint() -> None:
    examples = numbered(100)
    train, dev = split_dev(examples, 0.2, seed=1)
    assert (train, dev) == split_dev(examples, 0.2, seed=1)
    assert len(dev) == 20 and len(train) == 80
    assert sorted(train + dev, key=examples.index) == examples
    assert not set(train) & set(dev)
    # Shuffled, not the tail; a different seed holds out different examples.
    assert dev != examples[-20:]
    assert split_dev(examples, 0.2, seed=2)[1] != dev


def test_split_dev_small_sets() -> None:
    assert [len(part) for part in split_dev(numbered(2), 0.01)] == [1, 1]
    assert [len(part) for part in split_dev(numbered(3), 0.9)] == [1, 2]
    assert split_dev(numbered(5), 0.0) == (numbered(5), [])
    assert split_dev(numbered(1), 0.5) == (numbered(1), [])


@pytest.mark.parametrize("fraction", [-0.1, 1.0, 1.5])
def test_split_dev_rejects_bad_fraction(fraction: float) -> None:
    with pytest.raises(DataError, match="fraction"):
        split_dev(numbered(10), fraction)


def test_dataset_hash() -> None:
    examples = numbered(5)
    base = dataset_hash(examples, "T {source}")
    assert base.startswith("sha256:") and len(base) == len("sha256:") + 64
    assert dataset_hash(numbered(5), "T {source}") == base
    assert dataset_hash(examples[::-1], "T {source}") != base
    assert dataset_hash(examples, "U {source}") != base
    assert dataset_hash(examples[:4] + [Example("s4", "t4!")], "T {source}") != base
    # Unambiguous: moving text across a boundary, or None against "", changes the hash.
    assert dataset_hash([Example("ab", "c")], "") != dataset_hash([Example("a", "bc")], "")
    assert dataset_hash([Example("a", None)], "") != dataset_hash([Example("a", "")], "")


# ---------------------------------------------------------------------------- tokenising


@pytest.fixture(scope="module")
def smollm2_tokenizer() -> Any:
    """The embedded SmolLM2 tokenizer, when its converted folder is in the cache."""
    from plm_owner_server.embedded import FOLDER
    from plm_owner_server.settings import default_cache_dir

    folder = default_cache_dir() / "models" / FOLDER
    if not (folder / "tokenizer.json").is_file():
        pytest.skip(f"no converted SmolLM2 at {folder} (run pema-server once)")
    from transformers import AutoTokenizer

    return AutoTokenizer.from_pretrained(folder)


@pytest.mark.parametrize("name", ["translate", "formalize", "modernize", "plain"])
def test_target_continues_prompt_smollm2(smollm2_tokenizer: Any, name: str) -> None:
    tok, template = smollm2_tokenizer, TEMPLATES[name]
    source, target = "The house is small.", "Das Haus ist klein."
    prompt, follow = encode_prompt(tok, template, source), encode_target(tok, template, target)
    text = tok.decode(prompt + follow, skip_special_tokens=True)
    assert text == render_prompt(template, source) + " " + target
    assert tok.decode(follow).startswith(" Das")  # one word token carrying the space
    assert tok.eos_token_id not in follow
    assert source_length(tok, source) == len(tok(source, add_special_tokens=False)["input_ids"])


def test_target_after_whitespace_gets_no_extra_space(smollm2_tokenizer: Any) -> None:
    tok = smollm2_tokenizer
    follow = encode_target(tok, "Q: {source}\nA:\n", "Yes.")
    assert tok.decode(follow) == "Yes."


def test_tiny_tokenizer_encoding() -> None:
    tok = tiny_tokenizer()
    template = "w3 {source} w4"
    prompt = encode_prompt(tok, template, "w10 w11")
    follow = encode_target(tok, template, "w20 w21")
    assert prompt == [3, 10, 11, 4] and follow == [20, 21]
    assert tok.decode(prompt + follow) == "w3 w10 w11 w4 w20 w21"
    assert source_length(tok, "w10 w11 w12") == 3
