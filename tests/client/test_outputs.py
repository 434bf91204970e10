"""Resumable output files: what a kill can leave behind, and what is kept."""

from __future__ import annotations

import json

import pytest

from data_owner_client.outputs import OutputFileError, read_records, resume

RUN = {"inputs": "sha256:1", "settings": {"stop": ("\n",)}}


def lines(*predictions: str) -> str:
    return "".join(json.dumps({"prediction": p}, ensure_ascii=False) + "\n" for p in predictions)


def test_records_with_unicode_line_separators_are_kept(tmp_path):
    """JSON keeps U+2028, U+2029 and U+0085 raw: only newlines separate records."""
    out = tmp_path / "out.jsonl"
    assert resume(out, RUN, total=4, batch_size=2) == 0
    text = lines("a\u2028b", "c\u0085d", "e\u2029f")
    out.write_text(text + '{"prediction": "cut sho')
    assert resume(out, RUN, total=4, batch_size=2) == 2  # the third record's batch is redone
    assert [r["prediction"] for r in read_records(out)] == ["a\u2028b", "c\u0085d"]
    assert sorted(p.name for p in tmp_path.iterdir()) == ["out.jsonl", "out.jsonl.run.json"]


def test_a_finished_file_is_kept_whole_and_another_run_refused(tmp_path):
    out = tmp_path / "out.jsonl"
    resume(out, RUN, total=3, batch_size=2)
    out.write_text(lines("a", "b", "c"))
    assert resume(out, RUN, total=3, batch_size=2) == 3
    with pytest.raises(OutputFileError, match="settings differ"):
        resume(out, {**RUN, "settings": {}}, total=3, batch_size=2)
    assert resume(out, {**RUN, "settings": {}}, total=3, batch_size=2, overwrite=True) == 0
    assert out.read_text() == ""


def test_a_file_without_its_run_record_is_refused(tmp_path):
    out = tmp_path / "out.jsonl"
    out.write_text(lines("mine"))
    with pytest.raises(OutputFileError, match="--overwrite"):
        resume(out, RUN, total=1, batch_size=1)
    assert read_records(out) == [{"prediction": "mine"}]


def test_a_file_written_before_a_setting_existed_resumes_while_it_is_off(tmp_path):
    out = tmp_path / "out.jsonl"
    older = {**RUN, "settings": {"temperature": 0.0}}  # written before min_length existed
    resume(out, older, total=4, batch_size=2)
    out.write_text(lines("a", "b"))
    newer = {**RUN, "settings": {"temperature": 0.0, "min_length": 0.0, "no_repeat_ngram": 0}}
    assert resume(out, newer, total=4, batch_size=2) == 2
    with pytest.raises(OutputFileError, match="settings differ"):
        resume(out, {**RUN, "settings": {**newer["settings"], "min_length": 0.8}}, 4, 2)
