"""The external memory: parity with an in-process forward, resumable builds, streamed batches."""

from __future__ import annotations

import json
import os
import stat
import threading
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

import pytest
import torch
from filelock import FileLock
from safetensors import safe_open

from data_owner_client import files as files_module
from data_owner_client.client import PemaClient
from data_owner_client.data import DataError, Example, encode_prompt, encode_target, source_length
from data_owner_client.files import TMP_PREFIX
from data_owner_client.memory import (
    DTYPES,
    IGNORE,
    FingerprintMismatchError,
    Manifest,
    Memory,
    MemoryStoreError,
    build_memory,
    write_manifest,
    write_shard,
)
from data_owner_client.memory import build as build_module
from plm_owner_server.runner import ModelRunner
from tests.tiny_models import tiny_tokenizer

TEMPLATE = "w3 {source} w4"
EOS = 2


@pytest.fixture(scope="module")
def tokenizer() -> Any:
    return tiny_tokenizer()


def make_examples(n: int, offset: int = 0) -> list[Example]:
    """Pairs of varied lengths (targets of 0 to 3 words) over the tiny vocabulary."""

    def words(i: int, k: int) -> str:
        return " ".join(f"w{5 + (7 * i + 3 * j + offset) % 85}" for j in range(k))

    return [Example(source=words(i, 1 + i % 4), target=words(i + 1, (3 * i) % 4)) for i in range(n)]


def build(
    client: PemaClient, tokenizer: Any, out: Path, examples: list[Example], **kw: Any
) -> Memory:
    """A small float32 build: 2 examples per request, 3 per shard, one request at a time (so
    counted and failing calls are deterministic and the bytes reproducible)."""
    options: dict[str, Any] = dict(
        template=TEMPLATE,
        dtype="float32",
        batch_size=2,
        shard_examples=3,
        progress=False,
        requests_in_flight=1,
    )
    return build_memory(client, tokenizer, examples, out, **{**options, **kw})


def hooked(runner: ModelRunner, ids: list[int]) -> torch.Tensor:
    """f(c) for every position of ``ids``: the input of the tiny llama's final norm."""
    captured: list[torch.Tensor] = []
    handle = runner.model.get_submodule("model.norm").register_forward_pre_hook(
        lambda m, args: captured.append(args[0])
    )
    try:
        with torch.no_grad():
            runner.model(torch.tensor([ids]))
    finally:
        handle.remove()
    return captured[0][0]


def greedy(runner: ModelRunner, prompt: list[int], steps: int) -> list[int]:
    """The tiny model's own greedy continuation of ``prompt``, ``steps`` tokens long."""
    ids = list(prompt)
    with torch.no_grad():
        for _ in range(steps):
            ids.append(int(runner.model(torch.tensor([ids])).logits[0, -1].argmax()))
    return ids


def encoded(tokenizer: Any, example: Example) -> tuple[list[int], list[int]]:
    assert example.target is not None
    return (
        encode_prompt(tokenizer, TEMPLATE, example.source),
        encode_target(tokenizer, TEMPLATE, example.target),
    )


def files(path: Path) -> dict[str, bytes]:
    return {p.name: p.read_bytes() for p in sorted(path.iterdir())}


# ---- building -------------------------------------------------------------------------------


def test_teacher_forced_keys_equal_hooked_forward(client, runner, tokenizer, tmp_path):
    examples = make_examples(7)
    memory = build(client, tokenizer, tmp_path / "m", examples)
    keys, values = memory.load_all()
    want_keys, want_values = [], []
    for example in examples:
        prompt, target = encoded(tokenizer, example)
        ref = hooked(runner, prompt + target + [EOS])
        want_keys.append(ref[len(prompt) - 1 : len(prompt) + len(target)])
        want_values += target + [EOS]
    torch.testing.assert_close(keys, torch.cat(want_keys), rtol=0, atol=1e-5)
    assert values.tolist() == want_values
    manifest = memory.manifest
    assert manifest.complete and len(memory) == manifest.count == len(want_values)
    assert [s.examples for s in manifest.shards] == [(0, 3), (3, 6), (6, 7)]
    assert manifest.fingerprint == runner.fingerprint and manifest.hidden_size == 32
    assert manifest.source_tokens == sum(source_length(tokenizer, e.source) for e in examples)
    assert manifest.target_tokens == len(want_values) - len(examples)
    assert manifest.length_ratio == manifest.target_tokens / manifest.source_tokens


def test_a_memory_holds_every_position_for_the_sequence_kind(client, runner, tokenizer, tmp_path):
    examples = make_examples(7)
    memory = build(client, tokenizer, tmp_path / "m", examples)
    assert memory.manifest.positions == "all" and memory.manifest.version == 2
    view = memory.sequences()
    batches = list(view.batches(3, seed=0, epoch=0, shuffle=False))
    assert len(view) == 7 and view.num_batches(3) == len(batches) == 3
    for i, example in enumerate(examples):
        keys, tokens, labels = (t[i % 3] for t in batches[i // 3])
        prompt, target = encoded(tokenizer, example)
        sequence = prompt + target
        length = len(sequence)
        torch.testing.assert_close(keys[:length], hooked(runner, sequence), rtol=0, atol=1e-5)
        assert tokens[:length].tolist() == sequence
        # Positions before the prompt's last predict no target; the rest predict target + EOS.
        want = [IGNORE] * (len(prompt) - 1) + target + [EOS]
        assert labels[:length].tolist() == want
        assert set(labels[length:].tolist()) <= {IGNORE}  # padding


def test_sequence_batches_shuffle_by_seed_and_split_over_ranks(client, tokenizer, tmp_path):
    view = build(client, tokenizer, tmp_path / "m", make_examples(11)).sequences()

    def identity(batches) -> list[tuple[int, ...]]:
        return [tuple(row[row > 0].tolist()) for _, tokens, _ in batches for row in tokens]

    one = identity(view.batches(4, seed=1, epoch=0))
    assert one == identity(view.batches(4, seed=1, epoch=0))
    assert one != identity(view.batches(4, seed=1, epoch=1))
    assert sorted(one) == sorted(identity(view.batches(4, seed=0, epoch=0, shuffle=False)))
    ranks = [list(view.batches(2, seed=1, epoch=0, rank=r, world_size=2)) for r in (0, 1)]
    assert len(ranks[0]) == len(ranks[1]) == view.num_batches(2, 2) == 3
    assert sorted(identity(ranks[0]) + identity(ranks[1])) == sorted(one)


def test_generated_context_and_old_memories_serve_pairs_but_not_sequences(
    client, tokenizer, tmp_path
):
    generated = build(client, tokenizer, tmp_path / "g", make_examples(4), context="generated")
    assert generated.manifest.positions == "targets"
    (tmp_path / "old").mkdir()
    synthetic(tmp_path / "old", [3, 2])
    manifest = json.loads((tmp_path / "old" / "manifest.json").read_text())
    manifest["version"] = 1
    del manifest["positions"]  # as version 1 wrote it
    for shard in manifest["shards"]:
        del shard["rows"]
    (tmp_path / "old" / "manifest.json").write_text(json.dumps(manifest))
    old = Memory.open(tmp_path / "old")
    assert old.load_all()[1].tolist() == [0, 1, 2, 3, 4]
    for memory in (generated, old):
        with pytest.raises(MemoryStoreError, match="only the target positions.*--context teacher"):
            memory.sequences()


def test_half_precision_memory_stores_keys_in_its_dtype(client, tokenizer, tmp_path):
    examples = make_examples(3)
    memory = build(client, tokenizer, tmp_path / "m", examples, dtype="bfloat16", progress=True)
    with safe_open(str(tmp_path / "m" / "shard-00000.safetensors"), framework="pt") as f:
        assert f.get_tensor("keys").dtype == torch.bfloat16
        assert f.get_tensor("values").dtype == torch.int32
    exact = build(client, tokenizer, tmp_path / "f32", examples).load_all()[0]
    torch.testing.assert_close(memory.load_all()[0], exact, rtol=2e-2, atol=2e-2)


def test_generated_context_pairs_greedy_continuation_with_gold_tokens(
    client, runner, tokenizer, tmp_path
):
    examples = make_examples(7)
    memory = build(client, tokenizer, tmp_path / "m", examples, context="generated")
    keys, values = memory.load_all()
    want_keys, want_values = [], []
    for example in examples:
        prompt, target = encoded(tokenizer, example)
        ids = greedy(runner, prompt, len(target))
        want_keys.append(hooked(runner, ids)[len(prompt) - 1 :])
        want_values += target + [EOS]
    # Sessions left-pad ragged prompts, which moves float rounding a little.
    torch.testing.assert_close(keys, torch.cat(want_keys), rtol=0, atol=1e-4)
    assert values.tolist() == want_values
    teacher = build(client, tokenizer, tmp_path / "t", examples).load_all()[0]
    assert not torch.allclose(keys, teacher, atol=1e-3)  # the contexts really differ


@pytest.mark.parametrize("context", ["teacher", "generated"])
def test_requests_in_flight_overlap_and_build_the_same_memory(
    client, tokenizer, tmp_path, monkeypatch, context
):
    """With several requests in flight the server gets them together (they overlap) and the
    memory equals the one-at-a-time build within float tolerance."""
    examples = make_examples(9)
    one = build(client, tokenizer, tmp_path / "one", examples, context=context).load_all()
    name = "represent" if context == "teacher" else "open_session"
    lock, live, peak = threading.Lock(), [0], [0]
    call = getattr(client, name)

    def overlapping(*args, **kwargs):
        with lock:
            live[0] += 1
            peak[0] = max(peak[0], live[0])
        time.sleep(0.05)
        try:
            return call(*args, **kwargs)
        finally:
            with lock:
                live[0] -= 1

    monkeypatch.setattr(client, name, overlapping)
    many = build(
        client, tokenizer, tmp_path / "many", examples, context=context, requests_in_flight=4
    ).load_all()
    assert peak[0] > 1
    torch.testing.assert_close(many[0], one[0], rtol=0, atol=1e-5)
    assert torch.equal(many[1], one[1])


def test_generated_build_closes_its_session_when_a_step_fails(
    client, tokenizer, tmp_path, monkeypatch
):
    opened: list[str] = []
    closed: list[str] = []
    close, open_session = client.close_session, client.open_session

    def recording_open(*args, **kwargs):
        answer = open_session(*args, **kwargs)
        opened.append(answer[0])
        return answer

    monkeypatch.setattr(client, "open_session", recording_open)
    monkeypatch.setattr(client, "close_session", lambda sid: closed.append(sid) or close(sid))
    monkeypatch.setattr(client, "step", fail_after(1, client.step))
    with pytest.raises(Killed):
        build(client, tokenizer, tmp_path / "m", make_examples(4), context="generated")
    assert opened and sorted(closed) == sorted(opened)


def test_example_without_target_or_too_long_is_refused_before_any_request(
    client, tokenizer, tmp_path, monkeypatch
):
    def no_request(*args: Any, **kw: Any) -> None:
        raise AssertionError("a request was sent")

    monkeypatch.setattr(client, "represent", no_request)
    examples = make_examples(3)
    with pytest.raises(DataError, match="example 1 has no target"):
        build(client, tokenizer, tmp_path / "a", [examples[0], Example("w5 w6", None)])
    long_target = " ".join(["w9"] * 130)
    with pytest.raises(DataError, match=r"example 2: prompt \(4 tokens\) \+ target \(130 tokens\)"):
        build(client, tokenizer, tmp_path / "b", [*examples[:2], Example("w5 w6", long_target)])
    assert not (tmp_path / "a").exists() and not (tmp_path / "b").exists()


def with_limits(client: PemaClient, monkeypatch: pytest.MonkeyPatch, **limits: Any) -> None:
    """Make the server announce tighter limits."""
    info = client.model_info()
    info = info.model_copy(update={"limits": info.limits.model_copy(update=limits)})
    monkeypatch.setattr(client, "model_info", lambda: info)


def test_requests_respect_the_server_limits(client, tokenizer, tmp_path, monkeypatch):
    examples = make_examples(7)
    whole = build(client, tokenizer, tmp_path / "whole", examples).load_all()
    with_limits(client, monkeypatch, max_batch_size=1)
    requests = counted(client, monkeypatch)
    one_by_one = build(client, tokenizer, tmp_path / "one", examples).load_all()
    assert len(requests) == 7 and all(len(r) == 1 for r in requests)
    torch.testing.assert_close(one_by_one, whole, rtol=0, atol=1e-5)
    longest = max(len(s) for r in requests for s in r)
    with_limits(client, monkeypatch, max_request_tokens=longest + 1)
    requests.clear()
    build(client, tokenizer, tmp_path / "tokens", examples)
    assert max(sum(map(len, r)) for r in requests) <= longest + 1 and len(requests) >= 6
    with_limits(client, monkeypatch, max_new_tokens=2)
    with pytest.raises(DataError, match="example 1: its target has 3 tokens.*at most 2"):
        build(client, tokenizer, tmp_path / "gen", examples, context="generated")


# ---- resuming -------------------------------------------------------------------------------


class Killed(BaseException):
    """A fault like a kill: not an Exception, so no ``except Exception`` swallows it."""


def fail_after(calls: int, function: Callable[..., Any]) -> Callable[..., Any]:
    """``function``, except that the call after the first ``calls`` raises."""
    count = 0

    def wrapped(*args: Any, **kw: Any) -> Any:
        nonlocal count
        count += 1
        if count > calls:
            raise Killed(f"injected fault at call {count}")
        return function(*args, **kw)

    return wrapped


def counted(client: PemaClient, monkeypatch: pytest.MonkeyPatch) -> list[list[list[int]]]:
    """The sequences of every later ``client.represent`` call, one list per call."""
    calls: list[list[list[int]]] = []
    represent = client.represent

    def wrapped(sequences: Any, *args: Any, **kw: Any) -> Any:
        calls.append([list(s) for s in sequences])
        return represent(sequences, *args, **kw)

    monkeypatch.setattr(client, "represent", wrapped)
    return calls


@pytest.fixture
def uninterrupted(client, tokenizer, tmp_path) -> dict[str, bytes]:
    build(client, tokenizer, tmp_path / "whole", make_examples(7))
    return files(tmp_path / "whole")


@pytest.mark.parametrize("calls", range(5))  # 7 examples: 2 + 2 + 1 requests over 3 shards
def test_build_killed_at_a_request_resumes_to_identical_bytes(
    client, tokenizer, tmp_path, monkeypatch, uninterrupted, calls
):
    out = tmp_path / "resumed"
    with monkeypatch.context() as patch:
        patch.setattr(client, "represent", fail_after(calls, client.represent))
        with pytest.raises(Killed):
            build(client, tokenizer, out, make_examples(7))
    with pytest.raises(MemoryStoreError, match="unfinished"):
        Memory.open(out)
    leftover = out / f"{TMP_PREFIX}abc123-shard-00002.safetensors"
    leftover.write_bytes(b"half a shard")  # a killed write
    requests = counted(client, monkeypatch)
    build(client, tokenizer, out, make_examples(7))
    assert files(out) == uninterrupted
    finished_calls = {0: 0, 1: 0, 2: 2, 3: 2, 4: 4}[calls]  # requests of shards already recorded
    assert len(requests) == 5 - finished_calls


@pytest.mark.parametrize("target", ["write_manifest", "replace"])
@pytest.mark.parametrize("calls", [1, 2, 3])
def test_build_killed_while_writing_resumes_to_identical_bytes(
    client, tokenizer, tmp_path, monkeypatch, uninterrupted, target, calls
):
    """Dying in a file write, or between writing a shard and recording it, loses nothing."""
    out = tmp_path / "resumed"
    with monkeypatch.context() as patch:
        if target == "replace":
            patch.setattr(files_module.os, "replace", fail_after(calls, files_module.os.replace))
        else:
            patch.setattr(build_module, target, fail_after(calls, build_module.write_manifest))
        with pytest.raises(Killed):
            build(client, tokenizer, out, make_examples(7))
    assert not list(out.glob(f"{TMP_PREFIX}*"))
    build(client, tokenizer, out, make_examples(7))
    assert files(out) == uninterrupted


def test_finished_memory_is_not_rebuilt(client, tokenizer, tmp_path, monkeypatch):
    build(client, tokenizer, tmp_path / "m", make_examples(4))
    before = files(tmp_path / "m")
    monkeypatch.setattr(client, "represent", fail_after(0, client.represent))
    build(client, tokenizer, tmp_path / "m", make_examples(4))
    assert files(tmp_path / "m") == before


def test_other_build_in_the_directory_is_refused_and_kept(client, tokenizer, tmp_path):
    out = tmp_path / "m"
    build(client, tokenizer, out, make_examples(4))
    before = files(out)
    with pytest.raises(MemoryStoreError, match="template 'w3 {source} w4'.*use a new directory"):
        build(client, tokenizer, out, make_examples(4), template="w3 w3 {source} w4")
    with pytest.raises(MemoryStoreError, match="dataset_hash"):
        build(client, tokenizer, out, make_examples(4, offset=1))
    with pytest.raises(MemoryStoreError, match="context 'teacher'"):
        build(client, tokenizer, out, make_examples(4), context="generated")
    with pytest.raises(MemoryStoreError, match="shard_examples 3"):
        build(client, tokenizer, out, make_examples(4), shard_examples=2)
    assert files(out) == before
    replaced = build(client, tokenizer, out, make_examples(5, offset=1), overwrite=True)
    assert replaced.manifest.examples == 5 and files(out) != before


def test_directory_with_foreign_files_is_refused(client, tokenizer, tmp_path):
    (tmp_path / "notes.txt").write_text("mine")
    with pytest.raises(MemoryStoreError, match="not empty"):
        build(client, tokenizer, tmp_path, make_examples(2))
    left = files(tmp_path)
    left.pop(".lock", None)  # the build lock may stay behind, empty
    assert left == {"notes.txt": b"mine"}


def test_two_builds_never_write_one_directory(client, tokenizer, tmp_path):
    with FileLock(str(tmp_path / ".lock")):  # as another build holds it
        with pytest.raises(MemoryStoreError, match="another build is writing"):
            build(client, tokenizer, tmp_path, make_examples(2))
    assert not (tmp_path / "manifest.json").exists()


def test_memory_of_another_model_is_refused(client, runner, tokenizer, tmp_path):
    out = tmp_path / "m"
    build(client, tokenizer, out, make_examples(4))
    manifest = json.loads((out / "manifest.json").read_text())
    (out / "manifest.json").write_text(json.dumps({**manifest, "fingerprint": "f" * 16}))
    with pytest.raises(FingerprintMismatchError, match=f"built on model fingerprint {'f' * 16}"):
        build(client, tokenizer, out, make_examples(4))
    with pytest.raises(FingerprintMismatchError, match=f"the server serves {runner.fingerprint}"):
        Memory.open(out).check_fingerprint(runner.fingerprint)


def test_open_explains_what_is_wrong(tmp_path):
    with pytest.raises(MemoryStoreError, match="no memory at .*build one"):
        Memory.open(tmp_path)
    (tmp_path / "manifest.json").write_text(json.dumps({"format": "other", "version": 1}))
    with pytest.raises(MemoryStoreError, match="is not a pema-memory manifest of version 1 to 2"):
        Memory.open(tmp_path)
    synthetic(tmp_path, [3, 2])
    (tmp_path / "shard-00001.safetensors").unlink()
    with pytest.raises(MemoryStoreError, match=r"lacks shard files \['shard-00001"):
        Memory.open(tmp_path)


# ---- reading --------------------------------------------------------------------------------


def synthetic(path: Path, counts: list[int], dtype: str = "float32") -> Memory:
    """A memory of shards with ``counts`` pairs; pair i has value i and keys (i, i, i, i)."""
    manifest = Manifest(
        fingerprint="fp",
        model_id="m",
        hidden_size=4,
        dtype=dtype,
        examples=len(counts),
        shard_examples=1,
        dataset_hash="h",
        template="{source}",
        context="teacher",
        eos_token_id=EOS,
    )
    first = 0
    for index, count in enumerate(counts):
        values = torch.arange(first, first + count, dtype=torch.int32)
        keys = values[:, None].expand(count, 4).to(DTYPES[dtype])
        shard = write_shard(path, index, keys, values, (index, index + 1), (count, count))
        manifest, first = manifest.with_shard(shard), first + count
    write_manifest(path, manifest.model_copy(update={"complete": True}))
    return Memory.open(path)


@pytest.mark.skipif(os.name != "posix", reason="POSIX permissions")
def test_memory_files_get_the_usual_permissions(tmp_path):
    """Shards and manifest are readable as any file the user writes, not private (0600)."""
    old = os.umask(0o022)
    try:
        synthetic(tmp_path, [2, 1])
    finally:
        os.umask(old)
    modes = {p.name: stat.S_IMODE(p.stat().st_mode) for p in tmp_path.iterdir()}
    names = ["manifest.json", "shard-00000.safetensors", "shard-00001.safetensors"]
    assert modes == dict.fromkeys(names, 0o644)


COUNTS = [7, 3, 9, 4, 6]  # 29 pairs


def pairs(batches: list[tuple[torch.Tensor, torch.Tensor]]) -> list[int]:
    """The values of a batch list, after checking every key still matches its value."""
    for keys, values in batches:
        assert keys.dtype == torch.float32 and values.dtype == torch.int64
        assert torch.equal(keys, values[:, None].float().expand(-1, 4))
    return [v for _, values in batches for v in values.tolist()]


def test_an_epoch_covers_every_pair_once(tmp_path):
    memory = synthetic(tmp_path, COUNTS, dtype="float16")
    batches = list(memory.batches(4, seed=0, epoch=0))
    assert len(batches) == memory.num_batches(4) == 8
    assert [len(v) for _, v in batches] == [4] * 7 + [1]
    assert sorted(pairs(batches)) == list(range(29))
    dropped = list(memory.batches(4, seed=0, epoch=0, drop_last=True))
    assert len(dropped) == memory.num_batches(4, drop_last=True) == 7
    assert pairs(list(memory.batches(5, seed=0, epoch=0, shuffle=False))) == list(range(29))
    assert pairs([memory.load_all()]) == list(range(29))


@pytest.mark.parametrize("buffer_shards", [1, 4])
def test_batch_larger_than_the_memory_is_the_whole_memory(tmp_path, buffer_shards):
    memory = synthetic(tmp_path, COUNTS)
    batches = list(memory.batches(100, seed=0, epoch=0, buffer_shards=buffer_shards))
    assert [len(v) for _, v in batches] == [29]
    assert sorted(pairs(batches)) == list(range(29))


def test_order_depends_on_seed_and_epoch_only(tmp_path):
    memory = synthetic(tmp_path, COUNTS)

    def order(seed: int, epoch: int) -> list[int]:
        return pairs(list(memory.batches(4, seed=seed, epoch=epoch)))

    assert order(0, 0) == order(0, 0)
    assert order(0, 1) != order(0, 0)
    assert order(1, 0) != order(0, 0)
    assert sorted(order(0, 1)) == list(range(29))


@pytest.mark.parametrize("world_size", [2, 3])
def test_ranks_split_each_global_batch(tmp_path, world_size):
    """A step of all ranks sees what one process sees at the global batch; nothing is dropped."""
    memory = synthetic(tmp_path, COUNTS)  # 29 pairs: 3 global batches of 8, or 2 of 12, + 5
    whole = list(memory.batches(4 * world_size, seed=3, epoch=2))
    ranks = [
        list(memory.batches(4, seed=3, epoch=2, rank=r, world_size=world_size))
        for r in range(world_size)
    ]
    steps = memory.num_batches(4, world_size)
    assert [len(r) for r in ranks] == [steps] * world_size and steps == len(whole)
    for step, batch in enumerate(whole):
        assert [v for r in ranks for v in pairs([r[step]])] == pairs([batch])
    assert [len(v) for _, v in (r[-1] for r in ranks)] == [5 // world_size + (r < 5 % world_size)
                                                           for r in range(world_size)]  # fmt: skip
    assert memory.num_batches(4, world_size, drop_last=True) == steps - 1
    assert memory.num_batches(14, 2) == 1  # a 1-pair remainder cannot feed 2 ranks: dropped
    with pytest.raises(ValueError, match="rank 3 is outside"):
        memory.batches(4, seed=0, epoch=0, rank=3, world_size=3)


def open_shards_at_most(order: list[int], counts: list[int]) -> int:
    """The most shards whose pairs are part-way through the stream at any one point."""
    starts = [sum(counts[:i]) for i in range(len(counts))]
    shard_of = {
        v: s for s, (a, n) in enumerate(zip(starts, counts, strict=True)) for v in range(a, a + n)
    }
    spans = {}
    for position, value in enumerate(order):
        first, _ = spans.get(shard_of[value], (position, position))
        spans[shard_of[value]] = (first, position)
    return max(sum(a <= p <= b for a, b in spans.values()) for p in range(len(order)))


@pytest.mark.parametrize("buffer_shards", [1, 2])
def test_shuffle_buffer_holds_at_most_buffer_shards(tmp_path, monkeypatch, buffer_shards):
    memory = synthetic(tmp_path, COUNTS)
    loads = []
    load = memory._load_shard
    monkeypatch.setattr(memory, "_load_shard", lambda shard: loads.append(shard) or load(shard))
    stream = memory.batches(3, seed=0, epoch=0, buffer_shards=buffer_shards)
    next(stream)
    assert len(loads) == buffer_shards  # streamed: the rest is still on disk
    order = pairs([next(stream)] + list(stream))
    assert open_shards_at_most(order, COUNTS) <= buffer_shards
    everything = pairs(list(memory.batches(3, seed=0, epoch=0, buffer_shards=len(COUNTS))))
    assert open_shards_at_most(everything, COUNTS) > buffer_shards  # the check can fail
