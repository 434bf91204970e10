"""The vLLM backend against the transformers runner on the same weights: f(c) of every position,
session openings and steps (across and onto KV-block boundaries), logits, the fingerprint, and the
refusal of architectures it cannot serve pre-norm. Runs in the vllm env (``make vllm``)."""

from __future__ import annotations

from collections.abc import Iterator
from pathlib import Path

import pytest
import torch

from plm_owner_server.architectures import UnsupportedArchitecture
from plm_owner_server.backend import open_sessions
from plm_owner_server.runner import ModelRunner
from plm_owner_server.settings import Settings
from plm_owner_server.vllm_backend import VllmBackend
from tests.tiny_models import VOCAB, tiny_model, tiny_tokenizer

BLOCK = 32  # vLLM's KV-cache block (its CPU attention needs a multiple of 32)
# vLLM's CPU attention takes head sizes such as 64 (SmolLM2's), not the tiny models' 8.
HEADS = dict(hidden_size=128, intermediate_size=256, num_attention_heads=2, num_key_value_heads=2,
             head_dim=64)  # fmt: skip
pytestmark = pytest.mark.slow


def save_tiny(arch: str, folder: Path) -> Path:
    tiny_model(arch, **HEADS).save_pretrained(folder)
    tiny_tokenizer().save_pretrained(folder)
    return folder


def settings(model: str, **changes: object) -> Settings:
    values = dict(model=model, dtype="float32", max_kv_cache_mib=64, vllm_block_size=BLOCK)
    return Settings(**{**values, **changes})  # type: ignore[arg-type]


@pytest.fixture(scope="module", params=["llama", "mistral", "qwen2", "qwen3"])
def backends(request, tmp_path_factory) -> Iterator[tuple[VllmBackend, ModelRunner]]:
    """The vLLM backend and the transformers runner over one tiny model of each architecture."""
    folder = save_tiny(request.param, tmp_path_factory.mktemp(request.param))
    backend = VllmBackend.load(settings(str(folder)))
    try:
        yield backend, ModelRunner.load(settings(str(folder), device="cpu"))
    finally:
        backend.close()


def assert_states_equal(actual: torch.Tensor, expected: torch.Tensor) -> None:
    """Equal within a relative tolerance of 1e-4 of the states' scale (float32)."""
    scale = expected.abs().max().item()
    torch.testing.assert_close(actual, expected, rtol=1e-4, atol=1e-4 * scale)


def rows(lengths: list[int], seed: int = 0) -> list[list[int]]:
    g = torch.Generator().manual_seed(seed)
    return [torch.randint(3, VOCAB, (n,), generator=g).tolist() for n in lengths]


def test_represent_equals_the_transformers_runner(backends):
    backend, runner = backends
    sequences, starts = rows([5, 17, 32, 40]), [0, 3, 16, 39]
    got = backend.represent(sequences, starts, max_batch_tokens=4096)
    want = runner.represent(sequences, starts, max_batch_tokens=4096)
    for g, w in zip(got, want, strict=True):
        assert g.shape == w.shape
        assert_states_equal(g, w)
    assert backend.fingerprint == runner.fingerprint and backend.vocab_size == runner.vocab_size


def test_session_steps_equal_the_full_forward(backends):
    """Rows of different lengths, finishing at different steps; steps that cross a block boundary
    and that land exactly on one (the prefix cache then holds every earlier position)."""
    backend, runner = backends
    prompts = rows([3, BLOCK - 2, BLOCK, 2 * BLOCK - 1], seed=1)
    new = rows([6, 6, 6, 6], seed=2)
    ((state, hidden),) = open_sessions(backend, [prompts])
    want = runner.represent(prompts, [0] * len(prompts), 4096)  # every prompt position
    assert_states_equal(torch.cat(hidden), torch.cat(want))
    live = [0, 1, 2, 3]
    for step in range(5):
        live = [r for r in live if step < 5 - r]  # row r finishes after 5 - r steps
        computed = backend.computed_tokens
        (hidden,) = backend.step_sessions([(state, live, [new[r][step] for r in live])])
        full = [prompts[r] + new[r][: step + 1] for r in live]
        want = runner.represent(full, [len(f) - 1 for f in full], 4096)
        assert_states_equal(hidden, torch.cat(want))
        # Each row recomputes at most what its cached full blocks leave: below one block.
        assert backend.computed_tokens - computed <= BLOCK * len(live)
    assert backend.cached_tokens > 0  # the steps read the prefix cache


def test_forked_rows_continue_as_their_parents_would(backends):
    """A row forked into several (beam search) continues from a copy of its tokens: each equals
    the full forward, and the forks read their parent's cached blocks."""
    backend, runner = backends
    prompts = rows([BLOCK + 3, 5], seed=5)
    ((state, _),) = open_sessions(backend, [prompts])
    cached = backend.cached_tokens
    state.select([0, 1, 2], parents=[0, 0, 1])  # row 0 goes on twice, row 1 once
    (hidden,) = backend.step_sessions([(state, [0, 1, 2], [7, 8, 9])])
    full = [prompts[0] + [7], prompts[0] + [8], prompts[1] + [9]]
    want = runner.represent(full, [len(f) - 1 for f in full], 4096)
    assert_states_equal(hidden, torch.cat(want))
    assert backend.cached_tokens - cached >= 2 * BLOCK  # both forks read the prompt's block


def test_a_session_never_reads_another_sessions_cache(backends):
    """Prefixes are cached under each session's own salt: the same prompt in another session
    (another data owner's, say) is computed again, and nothing tells one about the other."""
    backend, _ = backends
    prompt = rows([3 * BLOCK], seed=7)
    open_sessions(backend, [prompt])
    cached = backend.cached_tokens
    open_sessions(backend, [prompt])
    assert backend.cached_tokens == cached


def test_several_sessions_step_together(backends):
    backend, runner = backends
    a, b = rows([4, 9], seed=3), rows([20], seed=4)
    (sa, _), (sb, _) = open_sessions(backend, [a, b])
    ha, hb = backend.step_sessions([(sa, [0, 1], [7, 8]), (sb, [0], [9])])
    want = runner.represent([a[0] + [7], a[1] + [8], b[0] + [9]], [4, 9, 20], 4096)
    assert_states_equal(torch.cat([ha, hb]), torch.cat(want))


def test_logits_are_the_heads_of_the_states(backends):
    backend, runner = backends
    (sequence,) = rows([12], seed=5)
    got = backend.represent([sequence], [0], 4096)[0]
    want = runner.represent([sequence], [0], 4096)[0]
    full = backend.logits(got, "full")
    assert isinstance(full, torch.Tensor)
    torch.testing.assert_close(full, runner.logits(want, "full"), rtol=1e-4, atol=1e-4)
    values, indices = backend.logits(got, 5)
    assert torch.equal(indices, full.topk(5).indices.to(torch.int32))


def test_an_architecture_it_cannot_serve_pre_norm_is_refused(tmp_path):
    folder = save_tiny("gpt2", tmp_path / "gpt2")
    with pytest.raises(UnsupportedArchitecture, match="--backend transformers"):
        VllmBackend.load(settings(str(folder)))


def test_tensor_parallel_states_equal_one_process(tmp_path, monkeypatch):
    """TP=2 over two worker processes (vLLM's CPU backend binds each to its own cores) gives the
    states of the transformers runner, as TP=1 does."""
    folder = save_tiny("llama", tmp_path / "llama")
    monkeypatch.setenv("VLLM_CPU_OMP_THREADS_BIND", "0|1")  # one core per rank: one NUMA node here
    backend = VllmBackend.load(settings(str(folder), tensor_parallel_size=2))
    try:
        runner = ModelRunner.load(settings(str(folder), device="cpu"))
        sequences = rows([7, 33], seed=6)
        for got, want in zip(
            backend.represent(sequences, [0, 0], 4096),
            runner.represent(sequences, [0, 0], 4096),
            strict=True,
        ):
            assert_states_equal(got, want)
        ((state, _),) = open_sessions(backend, [sequences])
        (hidden,) = backend.step_sessions([(state, [0, 1], [5, 6])])
        want = runner.represent([sequences[0] + [5], sequences[1] + [6]], [7, 33], 4096)
        assert_states_equal(hidden, torch.cat(want))
    finally:
        backend.close()


def test_a_prefill_in_chunks_equals_the_transformers_runner(backends):
    """Prompts read in chunks (columns of their right-aligned layout; chunk ends inside and on
    block boundaries, where rows stop before the last chunk; rows that start late, two alike
    rows) give every position's f(c), and the session steps on as after a whole prefill; the
    later chunks read the earlier ones' blocks."""
    backend, runner = backends
    prompts = rows([2 * BLOCK + 5, 7, BLOCK + 1], seed=8)
    prompts.append(list(prompts[1]))
    (state,) = backend.start_sessions([prompts])
    cached = backend.cached_tokens
    parts = [
        backend.prefill_sessions([(state, end)])[0] for end in (BLOCK, BLOCK + 3, 2 * BLOCK + 5)
    ]
    assert [len(p) for p in parts[0]] == [BLOCK, 0, 0, 0]
    assert [len(p) for p in parts[1]] == [0, 0, 0, 0]  # rows stop on a block boundary
    want = runner.represent(prompts, [0] * len(prompts), 4096)
    for got, expected in zip(zip(*parts, strict=True), want, strict=True):
        assert_states_equal(torch.cat(got), expected)
    if getattr(runner.config, "sliding_window", None) is None:  # vLLM's own choice for those
        assert backend.cached_tokens > cached  # later chunks read the earlier ones' blocks
    (hidden,) = backend.step_sessions([(state, [0, 1, 2, 3], [7, 8, 9, 9])])
    full = [p + [t] for p, t in zip(prompts, [7, 8, 9, 9], strict=True)]
    assert_states_equal(hidden, torch.cat(runner.represent(full, [len(f) - 1 for f in full], 4096)))


def test_rows_sharing_a_prefix_are_read_in_chunks(backends):
    """A longer row of the session computes a prefix it shares with a shorter one before the
    shorter row reads it: the shorter row finds it cached and is read again without the cache;
    every position still equals the transformers runner's."""
    backend, runner = backends
    (shared,) = rows([2 * BLOCK], seed=9)
    long, short = (shared + tail for tail in rows([40, 5], seed=10))
    (state,) = backend.start_sessions([[long, short]])
    parts = [backend.prefill_sessions([(state, end)])[0] for end in (2 * BLOCK + 8, len(long))]
    assert [len(p) for p in parts[0]] == [2 * BLOCK, BLOCK]  # the short row: one block of two
    want = runner.represent([long, short], [0, 0], 4096)
    for got, expected in zip(zip(*parts, strict=True), want, strict=True):
        assert_states_equal(torch.cat(got), expected)
