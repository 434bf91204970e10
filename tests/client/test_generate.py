"""Decoding through a server session: PLM parity, mixing, ragged finishes, stops, sampling."""

from __future__ import annotations

import dataclasses
from pathlib import Path

import pytest
import torch
import torch.nn.functional as F

from data_owner_client.adapter import (
    AdapterConfig,
    PemaAdapter,
    PemaConfig,
    ResidualAdapter,
    SequenceAdapter,
    build_adapter,
)
from data_owner_client.client import PemaClient, ServerError
from data_owner_client.data import Example, source_length
from data_owner_client.generate import GenerationConfig, Generator, Job
from data_owner_client.sampling import filter_top_k_top_p, repeated_ngram_ends
from data_owner_client.served_model import ServedModel
from plm_owner_server.runner import ModelRunner
from tests.client.synthetic import kind_config
from tests.server.helpers import serve

PROMPTS = ["w5 w9 w11", "w20", "w30 w31 w40 w41 w50 w7 w8 w60", "w44 w45"]
TEMPLATE = "{source}"


def examples(prompts: list[str] = PROMPTS) -> list[Example]:
    return [Example(p, None) for p in prompts]


def reference_greedy(runner: ModelRunner, prompt: str, new_tokens: int) -> list[int]:
    """transformers' own greedy decoding of one prompt, cut after its first EOS."""
    ids = runner.tokenizer(prompt, return_tensors="pt")
    eos = runner.model.generation_config.eos_token_id
    out = runner.model.generate(
        **ids, max_new_tokens=new_tokens, do_sample=False, eos_token_id=eos, pad_token_id=0
    )
    tokens = out[0, ids["input_ids"].shape[1] :].tolist()
    return tokens[: tokens.index(eos) + 1] if eos in tokens else tokens


def generated_tokens(generator: Generator, prompts: list[str]) -> list[list[int]]:
    return [g.token_ids for g in generator.generate(examples(prompts))]


@pytest.mark.parametrize("arch", ["llama", "gpt2", "opt"])
def test_lambda_zero_is_transformers_greedy_decoding(make_runner, tmp_path, arch):
    runner = make_runner(arch)
    with serve(runner) as http, PemaClient(http=http, retries=0) as client:
        served = ServedModel.fetch(client, cache_dir=tmp_path)
        config = GenerationConfig(max_new_tokens=16, lambda_max=0.0, batch_size=3)
        got = generated_tokens(Generator(client, served, config, TEMPLATE), PROMPTS)
    for prompt, tokens in zip(PROMPTS, got, strict=True):
        assert tokens == reference_greedy(runner, prompt, 16), prompt


def test_rows_finish_at_different_steps_and_the_rest_continue(served_client):
    runner, client, served = served_client
    config = GenerationConfig(max_new_tokens=14, lambda_max=0.0)
    alone = [reference_greedy(runner, p, 14) for p in PROMPTS]
    # Pretend that tokens the rows reach at different steps are EOS tokens too.
    ends = {*served.info.eos_token_ids, alone[1][2], alone[2][4]}
    info = served.info.model_copy(update={"eos_token_ids": sorted(ends)})
    generator = Generator(client, dataclasses.replace(served, info=info), config, TEMPLATE)
    got = generated_tokens(generator, PROMPTS)
    lengths = set()
    for tokens, reference in zip(got, alone, strict=True):
        first_end = next((i for i, t in enumerate(reference) if t in ends), len(reference) - 1)
        assert tokens == reference[: first_end + 1]
        lengths.add(len(tokens))
    assert len(lengths) >= 3  # the rows really did finish at different steps


def test_stop_strings_cut_the_output(served_client):
    runner, client, served = served_client
    alone = runner.tokenizer.decode(reference_greedy(runner, PROMPTS[1], 12))
    words = alone.split()
    config = GenerationConfig(max_new_tokens=12, lambda_max=0.0, stop=(words[3], "never"))
    [output] = Generator(client, served, config, TEMPLATE).generate(examples(PROMPTS[1:2]))
    assert output.finish_reason == "stop"
    assert output.prediction == " ".join(words[:3])
    assert output.tokens == 4


def test_outputs_report_length_and_do_not_use_references(served_client):
    _, client, served = served_client
    config = GenerationConfig(max_new_tokens=5, lambda_max=0.0)
    generator = Generator(client, served, config, TEMPLATE)
    plain = list(generator.generate(examples()))
    with_refs = list(generator.generate([Example(p, "w3 w3 w3") for p in PROMPTS]))
    for a, b in zip(plain, with_refs, strict=True):
        assert a.prediction == b.prediction and b.reference == "w3 w3 w3"
        assert "reference" not in a.to_dict() and b.to_dict()["reference"] == "w3 w3 w3"
        if a.finish_reason == "length":
            assert a.tokens == 5


def _adapter(served: ServedModel, seed: int = 0) -> tuple[PemaAdapter, AdapterConfig]:
    info = served.info
    config = PemaConfig(info.hidden_size, info.vocab_size, rank=8, length_ratio=1.5)
    adapter = PemaAdapter.from_config(config, generator=torch.Generator().manual_seed(seed))
    with torch.no_grad():
        adapter.B_pd.normal_(0, 30, generator=torch.Generator().manual_seed(seed + 1))
    return adapter.eval(), config


def test_next_tokens_follow_the_mixture_of_probabilities(served_client):
    _, client, served = served_client
    adapter, adapter_config = _adapter(served)
    config = GenerationConfig(lambda_max=0.6, schedule="linear")
    generator = Generator(client, served, config, TEMPLATE, adapter, adapter_config)
    hidden = torch.randn(64, served.info.hidden_size, generator=torch.Generator().manual_seed(5))
    horizons = torch.full((64,), 4.0)
    head = served.head
    assert head is not None
    for step, lam in ((0, 0.6), (1, 0.45), (3, 0.15), (4, 0.0)):
        p_lm = F.softmax(head(hidden), -1)
        p_pema = F.softmax(head(adapter(hidden)), -1)
        expected = ((1 - lam) * p_lm + lam * p_pema).argmax(-1)
        assert generator.next_tokens(hidden, step, horizons) == expected.tolist()
    # The adapter really moves the choice, so the check above can fail.
    assert generator.next_tokens(hidden, 0, horizons) != head(hidden).argmax(-1).tolist()


def test_the_horizon_is_the_learned_ratio_times_the_source_length(served_client):
    _, client, served = served_client
    adapter, adapter_config = _adapter(served)
    generator = Generator(client, served, GenerationConfig(), TEMPLATE, adapter, adapter_config)
    source = source_length(served.tokenizer, "w5 w6 w7 w8")
    assert generator.job([[5, 6]], [source]).rows[0].horizon == pytest.approx(1.5 * 4)
    fixed = GenerationConfig(gu_horizon=9)
    generator = Generator(client, served, fixed, TEMPLATE, adapter, adapter_config)
    assert generator.job([[5, 6]], [source]).rows[0].horizon == 9


def test_sampling_is_seeded_and_top_k_one_is_greedy(served_client):
    _, client, served = served_client

    def run(**kwargs) -> list[str]:
        config = GenerationConfig(max_new_tokens=10, lambda_max=0.0, **kwargs)
        return [
            g.prediction for g in Generator(client, served, config, TEMPLATE).generate(examples())
        ]

    greedy = run()
    assert run(temperature=1.0, seed=1) == run(temperature=1.0, seed=1)
    assert run(temperature=1.0, seed=1) != run(temperature=1.0, seed=2)
    assert run(temperature=1.0, seed=1) != greedy
    assert run(temperature=0.7, top_k=1, seed=3) == greedy


def test_top_k_and_top_p_keep_the_right_tokens():
    scores = torch.tensor([[3.0, 1.0, 2.0, 0.0], [0.0, 0.0, 5.0, 0.0]])
    top2 = filter_top_k_top_p(scores, top_k=2)
    assert torch.isfinite(top2).tolist() == [[True, False, True, False], [True, True, True, True]]
    # Row 0 probabilities are about 0.64, 0.09, 0.24, 0.03: 0.7 needs the two largest.
    nucleus = filter_top_k_top_p(scores, top_p=0.7)
    assert torch.isfinite(nucleus[0]).tolist() == [True, False, True, False]
    assert torch.isfinite(nucleus[1]).tolist() == [False, False, True, False]
    assert torch.equal(filter_top_k_top_p(scores), scores)


def test_limits_of_the_server_bound_the_decode(make_runner, tmp_path):
    runner = make_runner("llama")
    with (
        serve(runner, max_new_tokens=3, max_batch_size=2) as http,
        PemaClient(http=http, retries=0) as client,
    ):
        served = ServedModel.fetch(client, cache_dir=tmp_path)
        config = GenerationConfig(max_new_tokens=50, lambda_max=0.0, batch_size=8)
        generator = Generator(client, served, config, TEMPLATE)
        assert (generator.max_new_tokens, generator.batch_size) == (4, 2)
        outputs = list(generator.generate(examples()))
    assert all(o.tokens <= 4 for o in outputs) and len(outputs) == len(PROMPTS)


def test_mixing_settings_are_checked(served_client, tmp_path: Path):
    _, client, served = served_client
    with pytest.raises(ValueError, match="needs an adapter"):
        Generator(client, served, GenerationConfig(lambda_max=0.5), TEMPLATE)
    adapter, adapter_config = _adapter(served)
    no_ratio = dataclasses.replace(adapter_config, length_ratio=None)
    with pytest.raises(ValueError, match="--gu-horizon"):
        Generator(client, served, GenerationConfig(), TEMPLATE, adapter, no_ratio)
    constant = GenerationConfig(schedule="constant")
    Generator(client, served, constant, TEMPLATE, adapter, no_ratio)  # needs no horizon
    with pytest.raises(ValueError, match="top_p"):
        GenerationConfig(top_p=0)


@pytest.mark.parametrize("kind", ["residual", "sequence"])
def test_every_kind_decodes_as_its_mixture_over_the_whole_sequence(served_client, kind):
    """Greedy decoding picks, at each new position, the argmax of the mixture of the PLM and the
    adapter run over the whole sequence so far: the sequence adapter's stepped cache (rows of
    different lengths, finishing at different steps) equals its full forward."""
    _, client, served = served_client
    head = served.head
    assert head is not None
    info = served.info
    adapter_config = kind_config(
        kind, info.hidden_size, info.vocab_size, rank=8, width=16, heads=2, dropout=0.0
    )
    adapter = build_adapter(adapter_config, head, generator=torch.Generator().manual_seed(0))
    with torch.no_grad():  # untrained, both kinds equal the PLM: give them weight
        last = adapter.B if isinstance(adapter, ResidualAdapter) else adapter.output.weight
        last.normal_(0, 3, generator=torch.Generator().manual_seed(1))
        if isinstance(adapter, SequenceAdapter) and adapter.gate is not None:  # the copy pointer
            adapter.gate.weight.normal_(0, 1, generator=torch.Generator().manual_seed(2))
    adapter.eval()
    config = GenerationConfig(max_new_tokens=10, lambda_max=0.7, schedule="constant")
    first = list(
        Generator(client, served, config, TEMPLATE, adapter, adapter_config).generate(examples())
    )
    plm = Generator(client, served, dataclasses.replace(config, lambda_max=0.0), TEMPLATE)
    assert [o.token_ids for o in first] != generated_tokens(plm, PROMPTS)  # the adapter matters
    # Tokens the rows reach at different steps end them: rows finish at different steps.
    ends = {*served.info.eos_token_ids, first[1].token_ids[2], first[2].token_ids[5]}
    info = served.info.model_copy(update={"eos_token_ids": sorted(ends)})
    served = dataclasses.replace(served, info=info)
    generator = Generator(client, served, config, TEMPLATE, adapter, adapter_config)
    outputs = list(generator.generate(examples()))
    assert len({o.tokens for o in outputs}) >= 2
    for output in outputs:
        prompt = served.tokenizer(output.source)["input_ids"]
        sequence = prompt + output.token_ids[:-1]
        x = client.represent([sequence], [0]).rows()[0]
        with torch.no_grad():
            z = adapter(x) if kind == "residual" else adapter(x[None], torch.tensor([sequence]))[0]
            p = 0.3 * F.softmax(head(x), -1) + 0.7 * F.softmax(head.project(z), -1)
        assert p[len(prompt) - 1 :].argmax(-1).tolist() == output.token_ids


def test_repeated_ngram_ends():
    assert repeated_ngram_ends([1, 2, 3, 1, 2], 3) == [3]
    assert repeated_ngram_ends([1, 2, 3, 1, 2], 2) == [3]
    assert repeated_ngram_ends([5, 2, 5, 7, 5], 2) == [2, 7]
    assert repeated_ngram_ends([4, 4, 6], 1) == [4, 4, 6]
    assert repeated_ngram_ends([1, 2], 4) == []
    assert repeated_ngram_ends([], 1) == []


def ngrams(tokens: list[int], n: int) -> list[tuple[int, ...]]:
    return [tuple(tokens[i : i + n]) for i in range(len(tokens) - n + 1)]


def test_no_repeat_ngram_stops_loops_and_changes_nothing_before(served_client):
    """Greedy decoding of the tiny model loops; with no_repeat_ngram=3 no 3-gram of an output
    repeats, and each output equals plain greedy up to where that would repeat one."""
    runner, client, served = served_client
    plain = GenerationConfig(max_new_tokens=40, lambda_max=0.0)
    free = generated_tokens(Generator(client, served, plain, TEMPLATE), PROMPTS)
    guarded = dataclasses.replace(plain, no_repeat_ngram=3)
    outputs = generated_tokens(Generator(client, served, guarded, TEMPLATE), PROMPTS)
    looped = 0
    for loose, tight in zip(free, outputs, strict=True):
        grams = ngrams(tight, 3)
        assert len(grams) == len(set(grams))
        first_repeat = next(
            (i + 3 for i, g in enumerate(ngrams(loose, 3)) if g in ngrams(loose, 3)[:i]),
            len(loose),
        )
        looped += first_repeat < len(loose)
        assert tight[: first_repeat - 1] == loose[: first_repeat - 1]
    assert looped  # the check had loops to stop


def test_the_adapters_stored_repetition_guard_is_the_default(served_client):
    """An adapter's stored no_repeat_ngram applies unless the run gives one (0 turns it off)."""
    _, client, served = served_client
    adapter, adapter_config = _adapter(served)
    guarding = dataclasses.replace(adapter_config, no_repeat_ngram=3)
    plain = GenerationConfig(max_new_tokens=40, lambda_max=0.0)

    def tokens(config: GenerationConfig, stored: AdapterConfig) -> list[list[int]]:
        return generated_tokens(
            Generator(client, served, config, TEMPLATE, adapter, stored), PROMPTS
        )

    free, guarded = tokens(plain, adapter_config), tokens(plain, guarding)
    assert guarded != free
    assert guarded == tokens(dataclasses.replace(plain, no_repeat_ngram=3), adapter_config)
    assert tokens(dataclasses.replace(plain, no_repeat_ngram=0), guarding) == free


def test_no_repeat_ngram_must_not_be_negative():
    with pytest.raises(ValueError, match="no_repeat_ngram"):
        GenerationConfig(no_repeat_ngram=-1)


def test_a_session_lost_mid_decode_is_reopened_and_the_output_is_unchanged(
    served_client, monkeypatch
):
    """The server drops the session (eviction, or a restart) in the middle: the generator
    re-opens it from each live row's prompt and output, and decodes exactly as without."""
    runner, client, served = served_client
    config = GenerationConfig(max_new_tokens=20, lambda_max=0.0, reconnect_s=5)
    want = generated_tokens(Generator(client, served, config, TEMPLATE), PROMPTS)
    step, calls, opened = client.step, [], []
    open_session = client.open_session

    def recording_open(*args, **kwargs):
        answer = open_session(*args, **kwargs)
        opened.append(answer[0])
        return answer

    def step_losing_the_session(session_id, tokens, rows=None, logits="none"):
        calls.append(rows)
        if len(calls) in (3, 9):  # the server forgets the session twice
            client.close_session(session_id)
        return step(session_id, tokens, rows, logits)

    monkeypatch.setattr(client, "open_session", recording_open)
    monkeypatch.setattr(client, "step", step_losing_the_session)
    assert generated_tokens(Generator(client, served, config, TEMPLATE), PROMPTS) == want
    assert len(opened) == 3  # the first session and two re-openings
    assert calls[-1] == list(range(len(calls[-1])))  # live rows renumbered by the re-opening


def test_a_session_error_other_than_loss_is_raised(served_client, monkeypatch):
    runner, client, served = served_client
    config = GenerationConfig(max_new_tokens=8, lambda_max=0.0)

    def refuse(*args, **kwargs):
        raise ServerError(422, "row_not_live", "no")

    monkeypatch.setattr(client, "step", refuse)
    with pytest.raises(ServerError, match="row_not_live"):
        generated_tokens(Generator(client, served, config, TEMPLATE), PROMPTS)


def _strong_adapter(served: ServedModel, kind: str):
    info = served.info
    assert served.head is not None
    config = kind_config(
        kind, info.hidden_size, info.vocab_size, rank=8, width=16, heads=2, dropout=0.0,
        length_ratio=1.5,
    )  # fmt: skip
    adapter = build_adapter(config, served.head, generator=torch.Generator().manual_seed(0))
    with torch.no_grad():
        last = adapter.B if isinstance(adapter, ResidualAdapter) else adapter.output.weight
        last.normal_(0, 3, generator=torch.Generator().manual_seed(1))
    return adapter.eval(), config


@pytest.mark.parametrize("kind", ["residual", "sequence"])
def test_batches_advanced_together_decode_as_each_alone(served_client, kind):
    """Jobs of different settings in different sessions, stepped together (one mixture pass,
    concurrent server steps, some joining later), each give what they give alone; a cancelled
    job's rows leave and the rest go on."""
    _, client, served = served_client
    adapter, adapter_config = _strong_adapter(served, kind)
    base = GenerationConfig(max_new_tokens=8, schedule="constant")
    generator = Generator(client, served, base, TEMPLATE, adapter, adapter_config)
    tokenizer = served.tokenizer
    settings = [
        base,
        dataclasses.replace(base, lambda_max=0.0),  # the PLM alone
        dataclasses.replace(base, temperature=1.0, seed=5),
        dataclasses.replace(base, lambda_max=0.3, schedule="quadratic", gu_horizon=4),
    ]

    def jobs() -> list[Job]:
        made = []
        for i, config in enumerate(settings):
            prompts = [p for p in PROMPTS[i : i + 2]]
            ids = [tokenizer(p)["input_ids"] for p in prompts]
            made.append(generator.job(ids, [len(p) for p in ids], config))
        return made

    alone = jobs()
    for job in alone:
        generator.decode([job])
    together = jobs()
    batches = [generator.open(together[:2])]
    generator.advance(batches)
    batches += [generator.open([together[2]])]  # joins a step later
    generator.advance(batches)
    batches += [generator.open([together[3]])]
    while any(b.live for b in batches):
        generator.advance(batches)
    assert all(b.error is None and b.session is None for b in batches)
    for a, b in zip(alone, together, strict=True):
        assert [r.tokens for r in a.rows] == [r.tokens for r in b.rows]
        assert [r.text for r in a.rows] == [r.text for r in b.rows]
    plm = Generator(client, served, dataclasses.replace(base, lambda_max=0.0), TEMPLATE)
    assert [r.tokens for r in alone[1].rows] == generated_tokens(plm, PROMPTS[1:3])

    broken, other = jobs()[2:4]  # a job whose sampling fails ends alone, with its error
    broken.sampler = "not a generator"  # type: ignore[assignment]
    batches = [generator.open([broken, other])]
    while batches[0].live:
        generator.advance(batches)
    assert isinstance(broken.error, TypeError) and batches[0].error is None
    assert {r.finish_reason for r in broken.rows} == {"error"}
    assert [r.tokens for r in other.rows] == [r.tokens for r in alone[3].rows]

    cancelled, other = jobs()[:2]
    batches = [generator.open([cancelled]), generator.open([other])]
    generator.advance(batches)
    cancelled.cancelled = True
    while any(b.live for b in batches):
        generator.advance(batches)
    assert {r.finish_reason for r in cancelled.rows} <= {"cancelled", "eos"}
    assert batches[0].session is None
    assert [r.tokens for r in other.rows] == [r.tokens for r in alone[1].rows]


def test_min_length_holds_off_the_end_and_changes_nothing_before(served_client):
    """A row that would end (on EOS or a token holding a stop string) before its minimum length
    goes on; until then its tokens are those of plain greedy decoding."""
    _, client, served = served_client
    config = GenerationConfig(max_new_tokens=12)
    plain = list(Generator(client, served, config, TEMPLATE).generate(examples()))
    # Tokens each row takes early end it: every row would stop within 3 tokens.
    ends = {*served.info.eos_token_ids, *(o.token_ids[min(2, o.tokens - 1)] for o in plain)}
    info = served.info.model_copy(update={"eos_token_ids": sorted(ends)})
    short = dataclasses.replace(served, info=info)
    stopped = list(Generator(client, short, config, TEMPLATE).generate(examples()))
    assert all(o.tokens <= 3 for o in stopped)
    held = dataclasses.replace(config, min_length=2.0)  # 2 × source tokens (no learned ratio)
    generator = Generator(client, short, held, TEMPLATE)
    for source, output, alone in zip(PROMPTS, generator.generate(examples()), plain, strict=True):
        least = min(2 * len(source.split()), 12)
        assert output.tokens >= least
        assert not ends & set(output.token_ids[: least - 1])
        first_end = next(i for i, t in enumerate(alone.token_ids + [-1]) if t in ends or t == -1)
        assert output.token_ids[:first_end] == alone.token_ids[:first_end]
    with pytest.raises(ValueError, match="min_length"):
        GenerationConfig(min_length=-1)


def test_the_sequence_kind_reads_each_prompt_once(served_client, monkeypatch):
    """The session's opening returns every prompt position for the sequence adapter: no second
    read of the prompts; against a server without that option (its 422), they are read through
    /v1/represent, and the outputs are the same."""
    _, client, served = served_client
    adapter, adapter_config = _strong_adapter(served, "sequence")
    config = GenerationConfig(max_new_tokens=6, lambda_max=0.7, schedule="constant")

    def decode() -> list[list[int]]:
        generator = Generator(client, served, config, TEMPLATE, adapter, adapter_config)
        return generated_tokens(generator, PROMPTS)

    read = []
    represent = client.represent
    monkeypatch.setattr(client, "represent", lambda *a, **k: read.append(a) or represent(*a, **k))
    once = decode()
    assert read == []

    def older_server(*args, **kwargs):
        message = "positions: Extra inputs are not permitted"
        raise ServerError(422, "invalid_request", message)

    monkeypatch.setattr(client, "open_reading", older_server)
    assert decode() == once and len(read) == 1  # one batch: its prompts read once more
