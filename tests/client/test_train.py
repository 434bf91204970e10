"""Two-stage training: chunked CE, learning what the PLM cannot, early stopping, resume, DDP."""

from __future__ import annotations

import dataclasses
import math
import os
import subprocess
import sys
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest
import torch
import torch.nn.functional as F
from torch import nn

from data_owner_client.adapter import AdapterError, build_adapter, load_adapter
from data_owner_client.devices import init_distributed, resolve_device
from data_owner_client.objectives import (
    ce_chunk_rows,
    chunked_cross_entropy,
    evaluate_accuracy,
    mixture_nll,
)
from data_owner_client.train import TrainConfig, train
from data_owner_client.train_log import LOG_FILE, PLOT_FILE, read_log
from tests.client.synthetic import (
    TensorSource,
    as_kind,
    cipher_task,
    copy_task,
    ddp_run,
    small_configs,
)

REPO = Path(__file__).resolve().parents[2]


@pytest.fixture(scope="module")
def task():
    return cipher_task()


# ---- chunked cross-entropy -------------------------------------------------------------------


class RowRecorder(nn.Module):
    """A linear head that remembers how many rows each call received."""

    def __init__(self, weight: torch.Tensor) -> None:
        super().__init__()
        self.weight = nn.Parameter(weight, requires_grad=False)
        self.rows: list[int] = []

    def forward(self, h: torch.Tensor) -> torch.Tensor:
        self.rows.append(h.shape[0])
        return torch.tanh(h) @ self.weight.T


def test_chunked_ce_value_and_gradient_equal_the_unchunked_ones():
    torch.manual_seed(0)
    head = RowRecorder(torch.randn(50, 8, dtype=torch.float64))
    h = torch.randn(37, 8, dtype=torch.float64, requires_grad=True)
    y = torch.randint(50, (37,))
    reference = F.cross_entropy(head(h), y)
    (grad_reference,) = torch.autograd.grad(reference, h)
    chunked = chunked_cross_entropy(head, h, y, chunk_rows=5)
    (grad_chunked,) = torch.autograd.grad(chunked, h)
    torch.testing.assert_close(chunked, reference, rtol=1e-12, atol=1e-12)
    torch.testing.assert_close(grad_chunked, grad_reference, rtol=1e-12, atol=1e-12)


def test_chunked_ce_through_the_real_head_matches(task):
    h = torch.randn(40, 32, requires_grad=True)
    y = torch.randint(64, (40,))
    reference = F.cross_entropy(task.head(h), y)
    chunked = chunked_cross_entropy(task.head, h, y, chunk_rows=7)
    torch.testing.assert_close(chunked, reference)
    torch.testing.assert_close(torch.autograd.grad(chunked, h), torch.autograd.grad(reference, h))


def test_chunked_ce_never_holds_more_than_a_chunk_of_logits():
    n, v, chunk = 64, 50, 8
    head = RowRecorder(torch.randn(v, 8))
    h = torch.randn(n, 8, requires_grad=True)
    y = torch.randint(v, (n,))
    saved: list[int] = []

    def pack(t: torch.Tensor) -> torch.Tensor:
        saved.append(t.numel())
        return t

    with torch.autograd.graph.saved_tensors_hooks(pack, lambda t: t):
        loss = chunked_cross_entropy(head, h, y, chunk_rows=chunk)
    loss.backward()
    # Every call saw one chunk, and backward called the head again: logits were recomputed.
    assert max(head.rows) == chunk and len(head.rows) == 2 * (n // chunk)
    assert max(saved) < n * v / 4
    # The same probe sees the whole [n, V] logits kept by an unchunked cross-entropy.
    saved.clear()
    with torch.autograd.graph.saved_tensors_hooks(pack, lambda t: t):
        F.cross_entropy(head(h), y)
    assert max(saved) >= n * v


def test_default_chunk_bounds_a_chunks_logits():
    assert ce_chunk_rows(49_152) * 49_152 <= 2**24 < (ce_chunk_rows(49_152) + 1) * 49_152
    assert ce_chunk_rows(2**30) == 1


# ---- training results ------------------------------------------------------------------------


def test_training_learns_what_the_plm_cannot(task, tmp_path):
    train_set, val_set, held_out = task.sample(2048, 1), task.sample(512, 2), task.sample(512, 3)
    adapter_config, train_config = small_configs(stage1_epochs=5, stage2_epochs=6)
    result = train(adapter_config, train_set, val_set, task.head, tmp_path, train_config)

    baseline = val_set.keys.pow(2).mean().item()  # MSE of the zero adapter
    assert result.stage1_val_loss < 0.2 * baseline
    plm_alone = (task.head(held_out.keys).argmax(-1) == held_out.values).float().mean().item()
    assert plm_alone < 0.1
    assert evaluate_accuracy(result.adapter, task.head, held_out) >= 0.95
    assert result.val_accuracy >= 0.95 and result.steps == 5 * 32 + 6 * 32

    loaded, loaded_config = load_adapter(tmp_path, fingerprint="synthetic")
    assert loaded_config == adapter_config
    assert torch.equal(loaded.B_pd, result.adapter.B_pd)
    assert (tmp_path / PLOT_FILE).read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"


def test_mixture_nll_is_the_loss_of_the_mixture_decoding_reads():
    torch.manual_seed(0)
    adapter_logits, plm_logits, y = torch.randn(6, 10), torch.randn(6, 10), torch.randint(10, (6,))
    a = F.log_softmax(adapter_logits, -1)[torch.arange(6), y]
    b = F.log_softmax(plm_logits, -1)[torch.arange(6), y]
    for lam in (0.3, 0.5, 1.0):
        mixed = lam * adapter_logits.softmax(-1) + (1 - lam) * plm_logits.softmax(-1)
        expected = -mixed[torch.arange(6), y].log()
        torch.testing.assert_close(mixture_nll(a, b, lam), expected)


@pytest.mark.parametrize("lam", [0.0, -0.5, 1.5])
def test_a_mixture_lambda_outside_0_to_1_is_refused(lam):
    with pytest.raises(ValueError, match="mixture_lambda must be in"):
        TrainConfig(mixture_lambda=lam)


@pytest.mark.parametrize("kind", ["residual", "sequence"])
def test_training_through_the_mixture_lowers_the_mixtures_loss(kind, tmp_path):
    """The objective and early stopping read the mixture at λ; untrained, it is the PLM's CE."""
    adapter_config, train_config = small_configs(
        stage2_epochs=3, sequence_batch_size=32, mixture_lambda=0.5
    )
    adapter_config = as_kind(adapter_config, kind, width=32, heads=2, layers=1)
    if kind == "sequence":
        copy = copy_task()
        head, sources = copy.head, (copy.sample(256, seed=1), copy.sample(64, seed=2))
        x, y = sources[1].pairs().keys, sources[1].pairs().values
    else:
        cipher = cipher_task()
        head, sources = cipher.head, (cipher.sample(1024, 1), cipher.sample(256, 2))
        x, y = sources[1].keys, sources[1].values
    train(adapter_config, *sources, head, tmp_path, train_config, progress=False)
    vals = [r for r in read_log(tmp_path / LOG_FILE) if r["kind"] == "val"]
    assert vals and all(r["val_loss"] == r["val_mixture"] for r in vals)
    plm_ce = F.cross_entropy(head(x), y).item()  # the untrained mixture's loss
    assert min(r["val_mixture"] for r in vals) < 0.5 * plm_ce


def test_log_records_both_stages(task, tmp_path):
    adapter_config, train_config = small_configs(stage1_epochs=2, stage2_epochs=2)
    train(
        adapter_config, task.sample(256, 1), task.sample(128, 2), task.head, tmp_path, train_config
    )
    records = read_log(tmp_path / LOG_FILE)
    vals = [r for r in records if r["kind"] == "val"]
    assert [(r["stage"], r["epoch"]) for r in vals] == [(1, 1), (1, 2), (2, 1), (2, 2)]
    assert {"loss", "val_loss", "lr", "time", "step", "global_step"} <= set(vals[0])
    assert {"val_acc", "val_ce", "val_mse", "ce", "mse"} <= set(vals[-1])
    assert any(r["kind"] == "train" and r["stage"] == 2 for r in records)
    kappa = adapter_config.kappa
    joint = kappa * vals[-1]["val_mse"] + (1 - kappa) * vals[-1]["val_ce"]
    assert vals[-1]["val_loss"] == pytest.approx(joint)


def test_early_stopping_restores_the_best_state(task, tmp_path):
    """Stage-2 validation labels that contradict training: validation gets worse as CE falls."""
    train_set, val_set = task.sample(512, 1), task.sample(128, 2)
    contrary = TensorSource(val_set.keys, (val_set.values + 7) % 64)
    adapter_config, train_config = small_configs(stage1_epochs=1, stage2_epochs=10, patience=2)
    result = train(adapter_config, train_set, contrary, task.head, tmp_path, train_config)
    vals = [r for r in read_log(tmp_path / LOG_FILE) if r["kind"] == "val" and r["stage"] == 2]
    best = min(vals, key=lambda r: r["val_loss"])
    assert len(vals) < 10 and len(vals) == vals.index(best) + 1 + 2  # stopped `patience` after
    assert result.stage2_val_loss == best["val_loss"]
    # The saved adapter is the best one, not the last one trained.
    adapter = load_adapter(tmp_path)[0]
    with torch.no_grad():
        h_pd, h_rct = adapter.predict_and_reconstruct(contrary.keys)
        mse = F.mse_loss(h_rct, contrary.keys)
        ce = F.cross_entropy(task.head(h_pd), contrary.values)
    kappa = adapter_config.kappa
    assert (kappa * mse + (1 - kappa) * ce).item() == pytest.approx(best["val_loss"], rel=1e-5)
    assert evaluate_accuracy(adapter, task.head, contrary) == pytest.approx(best["val_acc"])


class RecordingSource(TensorSource):
    """Remembers the arguments of every ``batches`` call."""

    calls: list[dict[str, Any]]

    def batches(self, batch_size: int, **kw: Any) -> Iterator[tuple[torch.Tensor, torch.Tensor]]:
        self.__dict__.setdefault("calls", []).append({"batch_size": batch_size, **kw})
        return super().batches(batch_size, **kw)


def test_each_epoch_is_a_fresh_shuffle_at_the_stage_batch_size(task, tmp_path):
    base = task.sample(256, 1)
    source = RecordingSource(base.keys, base.values)
    adapter_config, train_config = small_configs(
        stage1_epochs=2, stage2_epochs=1, stage1_batch_size=128, stage2_batch_size=32
    )
    train(adapter_config, source, task.sample(64, 2), task.head, tmp_path, train_config)
    seen = [(c["batch_size"], c["epoch"], c["shuffle"]) for c in source.calls]
    assert seen == [(128, 0, True), (128, 1, True), (32, 0, True)]


def test_val_every_steps_and_empty_sources(task, tmp_path):
    adapter_config, train_config = small_configs(
        stage1_epochs=1, stage2_epochs=1, val_every_steps=3
    )
    train(
        adapter_config, task.sample(256, 1), task.sample(64, 2), task.head, tmp_path, train_config
    )
    vals = [r for r in read_log(tmp_path / LOG_FILE) if r["kind"] == "val"]
    # 4 steps per epoch: validations after steps 3 and 4 in each stage.
    assert [r["global_step"] for r in vals] == [3, 4, 7, 8]
    empty = TensorSource(torch.zeros(0, 32), torch.zeros(0, dtype=torch.long))
    with pytest.raises(ValueError, match="no batches"):
        train(adapter_config, empty, task.sample(64, 2), task.head, tmp_path / "a", train_config)
    with pytest.raises(ValueError, match="validation memory"):
        train(adapter_config, task.sample(64, 1), empty, task.head, tmp_path / "b", train_config)


def test_memory_or_head_of_another_model_is_refused(task, tmp_path):
    adapter_config, train_config = small_configs(stage1_epochs=1, stage2_epochs=1)
    wide = TensorSource(torch.randn(64, 48), torch.zeros(64, dtype=torch.long))
    with pytest.raises(ValueError, match="another model"):
        train(adapter_config, wide, wide, task.head, tmp_path, train_config)
    other_vocab = small_configs(v=65)[0]
    with pytest.raises(ValueError, match="vocab_size=65"):
        train(
            other_vocab, task.sample(64, 1), task.sample(64, 2), task.head, tmp_path, train_config
        )


# ---- resume ----------------------------------------------------------------------------------


class Interrupted(RuntimeError):
    """Stands for the process being killed."""


class FailAfter:
    """Wraps a batch source; raises after yielding ``limit`` training batches in total, like a
    killed process."""

    def __init__(self, base: TensorSource, limit: int) -> None:
        self.base, self.limit = base, limit

    def __len__(self) -> int:
        return len(self.base)

    def num_batches(self, batch_size: int, world_size: int = 1) -> int:
        return self.base.num_batches(batch_size, world_size)

    def batches(self, batch_size: int, **kw: Any) -> Iterator[tuple[torch.Tensor, ...]]:
        for batch in self.base.batches(batch_size, **kw):
            if self.limit == 0:
                raise Interrupted
            self.limit -= 1
            yield batch


@pytest.mark.parametrize("fail_after", [5, 13])  # mid stage 1; mid stage 2 (8 steps per stage)
def test_resume_ends_with_the_uninterrupted_result(task, tmp_path, fail_after):
    train_set, val_set = task.sample(256, 1), task.sample(64, 2)
    adapter_config, train_config = small_configs(
        stage1_epochs=2, stage2_epochs=2, val_every_steps=3, log_every_steps=1
    )  # dropout stays 0.2: the RNG must resume too
    whole = train(adapter_config, train_set, val_set, task.head, tmp_path / "whole", train_config)

    out = tmp_path / "killed"
    with pytest.raises(Interrupted):
        train(
            adapter_config, FailAfter(train_set, fail_after), val_set, task.head, out, train_config
        )
    train_config.resume = True
    resumed = train(adapter_config, train_set, val_set, task.head, out, train_config)

    assert_same_run(resumed, whole, out, tmp_path / "whole")


def assert_same_run(resumed: Any, whole: Any, resumed_dir: Path, whole_dir: Path) -> None:
    for (name, got), want in zip(
        resumed.adapter.state_dict().items(), whole.adapter.state_dict().values(), strict=True
    ):
        assert torch.equal(got, want), name
    assert resumed.steps == whole.steps
    keys = lambda path: [(r["kind"], r["stage"], r["global_step"]) for r in read_log(path)]  # noqa: E731
    assert keys(resumed_dir / LOG_FILE) == keys(whole_dir / LOG_FILE)


def test_the_sequence_kind_resumes_to_the_uninterrupted_result(tmp_path):
    copy = copy_task()
    train_set, val_set = copy.sample(128, 1), copy.sample(32, 2)
    adapter_config, train_config = small_configs(
        stage2_epochs=3, sequence_batch_size=32, val_every_steps=3, log_every_steps=1
    )  # dropout stays 0.2: the RNG must resume too
    adapter_config = as_kind(adapter_config, "sequence", width=32, heads=2)
    whole = train(adapter_config, train_set, val_set, copy.head, tmp_path / "whole", train_config)
    out = tmp_path / "killed"
    with pytest.raises(Interrupted):
        train(adapter_config, FailAfter(train_set, 7), val_set, copy.head, out, train_config)
    train_config.resume = True
    resumed = train(adapter_config, train_set, val_set, copy.head, out, train_config)
    assert_same_run(resumed, whole, out, tmp_path / "whole")


def test_resume_with_other_settings_is_refused(task, tmp_path):
    adapter_config, train_config = small_configs(stage1_epochs=1, stage2_epochs=1)
    train(
        adapter_config, task.sample(128, 1), task.sample(64, 2), task.head, tmp_path, train_config
    )
    other = small_configs(stage1_epochs=1, stage2_epochs=1, lr=0.5, resume=True)[1]
    with pytest.raises(ValueError, match=r"other settings \(train.lr 0.01 → 0.5\)"):
        train(adapter_config, task.sample(128, 1), task.sample(64, 2), task.head, tmp_path, other)


def test_a_run_started_from_another_adapter_goes_on_from_its_weights(tmp_path):
    """--init: the first validation of a run started from a trained adapter is that adapter's
    (no step has changed it yet); one of another shape is refused."""
    copy = copy_task()
    train_set, val_set = copy.sample(128, 1), copy.sample(32, 2)
    adapter_config, train_config = small_configs(stage2_epochs=4, sequence_batch_size=32)
    adapter_config = as_kind(adapter_config, "sequence", width=32, heads=2, dropout=0.0)
    first = train(adapter_config, train_set, val_set, copy.head, tmp_path / "first", train_config)
    fresh = dataclasses.replace(train_config, stage2_epochs=1, val_every_steps=1, lr=0.0)
    started = dataclasses.replace(fresh, init=str(tmp_path / "first"))
    again = train(adapter_config, train_set, val_set, copy.head, tmp_path / "again", started)
    scratch = train(adapter_config, train_set, val_set, copy.head, tmp_path / "scratch", fresh)
    assert again.stage2_val_loss == pytest.approx(first.stage2_val_loss, rel=1e-5)
    assert scratch.stage2_val_loss > 1.5 * first.stage2_val_loss
    wider = as_kind(adapter_config, "sequence", width=64, heads=2, dropout=0.0)
    with pytest.raises(AdapterError, match="another shape"):
        train(wider, train_set, val_set, copy.head, tmp_path / "wider", started)
    residual = as_kind(adapter_config, "residual")
    with pytest.raises(AdapterError, match="--adapter-kind sequence"):
        train(residual, train_set.pairs(), val_set.pairs(), copy.head, tmp_path / "r", started)


# ---- devices and DDP -------------------------------------------------------------------------


def test_device_resolution_and_single_process_world(monkeypatch):
    monkeypatch.delenv("RANK", raising=False)
    assert resolve_device("cpu") == torch.device("cpu")
    assert init_distributed().size == 1 and init_distributed().main
    if not torch.cuda.is_available() and not torch.backends.mps.is_available():
        assert resolve_device("auto") == torch.device("cpu")
    assert TrainConfig().stage1_batch_size == 20480 and TrainConfig().stage2_batch_size == 2048


@pytest.mark.slow
@pytest.mark.parametrize("kind", ["pema", "sequence"])
def test_ddp_on_two_processes_matches_one_process(tmp_path, kind):
    """torchrun with 2 CPU ranks (gloo) ends where one process with the same global batch does."""
    env = {**os.environ, "PYTHONPATH": str(REPO), "OMP_NUM_THREADS": "1"}
    command = [sys.executable, "-m", "torch.distributed.run", "--nproc-per-node", "2"]
    command += ["--standalone", "-m", "tests.client.synthetic", str(tmp_path / "ddp"), kind]
    done = subprocess.run(command, cwd=REPO, env=env, capture_output=True, text=True, timeout=300)
    assert done.returncode == 0, done.stderr[-3000:]

    adapter_config, train_config, head, sources = ddp_run(kind)
    single = train(
        adapter_config, *sources, head, tmp_path / "single", train_config, progress=False
    )
    ddp, _ = load_adapter(tmp_path / "ddp", fingerprint="synthetic", head=head)
    for (name, got), want in zip(
        ddp.state_dict().items(), single.adapter.state_dict().values(), strict=True
    ):
        torch.testing.assert_close(got, want, atol=1e-4, rtol=1e-4, msg=name)
    ddp_log, single_log = (
        read_log(tmp_path / "ddp" / LOG_FILE),
        read_log(tmp_path / "single" / LOG_FILE),
    )
    assert [r["global_step"] for r in ddp_log] == [r["global_step"] for r in single_log]
    # Validation covers every pair on both, the batch the ranks cannot share evenly included.
    val = [[r["val_loss"] for r in log if r["kind"] == "val"] for log in (ddp_log, single_log)]
    assert val[0] == pytest.approx(val[1], rel=1e-5)


def test_input_norm_trains_on_normalised_features_and_reloads_with_the_head(task, tmp_path):
    train_set, val_set = task.sample(2048, 1), task.sample(512, 2)
    adapter_config, train_config = small_configs(stage1_epochs=5, stage2_epochs=6)
    adapter_config = dataclasses.replace(adapter_config, input_norm=True)
    result = train(adapter_config, train_set, val_set, task.head, tmp_path, train_config)

    features = task.head.normalize(val_set.keys)
    assert result.stage1_val_loss < 0.2 * features.pow(2).mean().item()  # reconstructs norm(x)
    assert result.val_accuracy >= 0.95
    with pytest.raises(AdapterError, match="needs the served model's head"):
        load_adapter(tmp_path)
    loaded, config = load_adapter(tmp_path, head=task.head)
    assert config.input_norm
    x = val_set.keys[:8]
    torch.testing.assert_close(loaded(x), result.adapter.eval()(x))
    torch.testing.assert_close(loaded.features(x), task.head.normalize(x))


# ---- the residual and sequence kinds ------------------------------------------------------------


@pytest.mark.parametrize("kind", ["pema", "residual", "sequence"])
def test_only_the_sequence_kind_learns_a_task_that_needs_the_source(kind, tmp_path):
    task = copy_task()
    train_set, held_out = task.sample(768, seed=1), task.sample(128, seed=2)
    adapter_config, train_config = small_configs(
        stage1_epochs=2, stage2_epochs=12, sequence_batch_size=32, patience=12
    )
    adapter_config = as_kind(adapter_config, kind, dropout=0.0, width=64, layers=2, heads=4)
    pairs = kind != "sequence"
    sources = (train_set.pairs(), held_out.pairs()) if pairs else (train_set, held_out)
    result = train(adapter_config, *sources, task.head, tmp_path, train_config, progress=False)
    untrained = build_adapter(as_kind(adapter_config, "residual"), task.head)
    plm = evaluate_accuracy(untrained, task.head, held_out.pairs())  # equal to the PLM's
    accuracy = evaluate_accuracy(result.adapter, task.head, sources[1])
    if kind == "sequence":
        assert plm < 0.1 and accuracy >= 0.9
        assert math.isinf(result.stage1_val_loss)
    else:  # one position tells the end of a target, never its tokens: chance is 1/16 each
        assert accuracy < 0.35
    records = read_log(tmp_path / LOG_FILE)
    assert {r["stage"] for r in records} == ({1, 2} if kind == "pema" else {2})
