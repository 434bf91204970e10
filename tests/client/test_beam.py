"""Beam search over the mixture: transformers' beam search for the PLM alone, exact scores for
every hypothesis through forked sessions and adapter caches, and a session lost mid-search."""

from __future__ import annotations

import dataclasses

import pytest
import torch
import torch.nn.functional as F

from data_owner_client.beam import BeamSearch
from data_owner_client.client import PemaClient
from data_owner_client.generate import GenerationConfig, Generator
from data_owner_client.served_model import ServedModel
from plm_owner_server.runner import ModelRunner
from tests.client.test_generate import (
    PROMPTS,
    TEMPLATE,
    _strong_adapter,
    examples,
    generated_tokens,
)
from tests.server.helpers import serve

NEW_TOKENS = 10


def reference_beams(
    runner: ModelRunner, prompt: str, beams: int, eos: list[int], length_penalty: float
) -> list[int]:
    """transformers' beam search of one prompt, cut after its first EOS."""
    ids = runner.tokenizer(prompt, return_tensors="pt")
    out = runner.model.generate(
        **ids, max_new_tokens=NEW_TOKENS, do_sample=False, num_beams=beams, eos_token_id=eos,
        pad_token_id=0, length_penalty=length_penalty, early_stopping=False,
    )  # fmt: skip
    tokens = out[0, ids["input_ids"].shape[1] :].tolist()
    ends = [i for i, t in enumerate(tokens) if t in eos]
    return tokens[: ends[0] + 1] if ends else tokens


def with_eos(served: ServedModel, eos: list[int]) -> ServedModel:
    info = served.info.model_copy(update={"eos_token_ids": eos})
    return dataclasses.replace(served, info=info)


@pytest.mark.parametrize("length_penalty", [1.0, 0.0])
@pytest.mark.parametrize("ends", [[(1, 1)], [(3, 0)], [(1, 1), (3, 0), (2, 2)]])
def test_lambda_zero_is_transformers_beam_search(runner, tmp_path, length_penalty, ends):
    with serve(runner) as http, PemaClient(http=http, retries=0) as client:
        served = ServedModel.fetch(client, cache_dir=tmp_path)
        greedy = GenerationConfig(max_new_tokens=NEW_TOKENS, lambda_max=0.0, batch_size=4)
        # A token greedy decoding reaches early ends hypotheses: some finish, some run on.
        outputs = generated_tokens(Generator(client, served, greedy, TEMPLATE), PROMPTS)
        eos = [outputs[row][position] for row, position in ends]  # several: as instruct models
        served = with_eos(served, eos)
        config = dataclasses.replace(greedy, num_beams=3, length_penalty=length_penalty)
        got = list(Generator(client, served, config, TEMPLATE).generate(examples()))
    want = [reference_beams(runner, p, 3, eos, length_penalty) for p in PROMPTS]
    assert [g.token_ids for g in got] == want
    assert "eos" in {g.finish_reason for g in got}  # hypotheses ended, not only cut


@pytest.mark.parametrize("kind", ["residual", "sequence"])
def test_every_hypothesis_scores_its_mixture_over_the_whole_sequence(served_client, kind):
    """Every finished hypothesis (forked from different parents, in the server's session and
    the sequence adapter's cache) carries the sum of its tokens' mixed log-probabilities as a
    full forward over its sequence gives them; the best one is the output."""
    _, client, served = served_client
    adapter, adapter_config = _strong_adapter(served, kind)
    head = served.head
    assert head is not None
    eos = generated_tokens(
        Generator(client, served, GenerationConfig(max_new_tokens=6, lambda_max=0.0), TEMPLATE),
        PROMPTS[1:2],
    )[0][2]
    served = with_eos(served, [eos])
    config = GenerationConfig(  # the guard and the minimum length rule out, never rescore
        max_new_tokens=NEW_TOKENS, lambda_max=0.7, schedule="constant", num_beams=4,
        no_repeat_ngram=2, min_length=0.5,
    )  # fmt: skip
    generator = Generator(client, served, config, TEMPLATE, adapter, adapter_config)
    prompts = [served.tokenizer(p)["input_ids"] for p in PROMPTS]
    search = BeamSearch(generator, generator.job(prompts, [len(p) for p in prompts]))
    search.run()
    checked = 0
    for prompt, row, finished in zip(prompts, search.job.rows, search.finished, strict=True):
        for hypothesis in finished:
            sequence = prompt + hypothesis.tokens
            x = client.represent([sequence[:-1]], [0]).rows()[0]
            with torch.no_grad():
                z = (
                    adapter(x)
                    if kind == "residual"
                    else adapter(x[None], torch.tensor([sequence[:-1]]))[0]
                )
                p = 0.3 * F.softmax(head(x), -1) + 0.7 * F.softmax(head.project(z), -1)
            picked = p[len(prompt) - 1 :].gather(-1, torch.tensor(hypothesis.tokens)[:, None])
            assert hypothesis.score == pytest.approx(float(picked.log().sum()), abs=1e-4)
            checked += 1
        best = max(finished, key=search._normalised)
        assert row.tokens == best.tokens
    assert checked > 2 * len(PROMPTS)  # hypotheses of several parents


def test_a_session_lost_mid_search_is_reopened_and_the_output_is_unchanged(
    served_client, monkeypatch
):
    _, client, served = served_client
    adapter, adapter_config = _strong_adapter(served, "sequence")
    config = GenerationConfig(max_new_tokens=NEW_TOKENS, num_beams=3, reconnect_s=5)
    generator = Generator(client, served, config, TEMPLATE, adapter, adapter_config)
    want = [g.token_ids for g in generator.generate(examples())]
    step, calls = client.step, []

    def step_losing_the_session(session_id, tokens, rows=None, logits="none", parents=None):
        calls.append(session_id)
        if len(calls) in (2, 5):
            client.close_session(session_id)
        return step(session_id, tokens, rows, logits, parents)

    monkeypatch.setattr(client, "step", step_losing_the_session)
    assert [g.token_ids for g in generator.generate(examples())] == want
    assert len(set(calls)) >= 3  # re-opened twice


def test_the_adapters_stored_beam_width_is_the_default(served_client):
    """An adapter's stored ``num_beams`` decodes by beam search unless told otherwise; sampling
    decodes one hypothesis."""
    _, client, served = served_client
    adapter, adapter_config = _strong_adapter(served, "sequence")
    stored = dataclasses.replace(adapter_config, num_beams=3)
    config = GenerationConfig(max_new_tokens=NEW_TOKENS, schedule="constant")

    def decode(config: GenerationConfig, adapter_config=stored) -> list[list[int]]:
        generator = Generator(client, served, config, TEMPLATE, adapter, adapter_config)
        return [g.token_ids for g in generator.generate(examples())]

    beams = decode(dataclasses.replace(config, num_beams=3), adapter_config)
    assert decode(config) == beams
    greedy = decode(dataclasses.replace(config, num_beams=1))
    assert greedy == decode(config, adapter_config) and greedy != beams
    sampled = Generator(client, served, dataclasses.replace(config, temperature=1.0), TEMPLATE,
                        adapter, stored)  # fmt: skip
    assert sampled.mixing.num_beams == 1


def test_inputs_share_sessions_within_the_servers_row_limit(served_client, monkeypatch):
    """Each input takes num_beams rows: a batch goes to the server in sessions that fit its
    row limit, and decodes as in one session."""
    _, client, served = served_client
    config = GenerationConfig(max_new_tokens=NEW_TOKENS, lambda_max=0.0, num_beams=3)
    want = [g.token_ids for g in Generator(client, served, config, TEMPLATE).generate(examples())]
    limits = served.info.limits.model_copy(update={"max_batch_size": 7})
    small = dataclasses.replace(served, info=served.info.model_copy(update={"limits": limits}))
    opened = []
    open_session = client.open_session

    def recording(sequences, **kwargs):
        opened.append(len(sequences))
        return open_session(sequences, **kwargs)

    monkeypatch.setattr(client, "open_session", recording)
    got = [g.token_ids for g in Generator(client, small, config, TEMPLATE).generate(examples())]
    assert got == want and opened == [2, 2]  # 2 inputs × 3 beams ≤ 7 rows per session
    outputs = list(Generator(client, small, config, TEMPLATE).generate(examples()))
    # Times count from the batch's start: the second session's rows took the first's time too.
    assert min(o.seconds for o in outputs[2:]) > max(o.seconds for o in outputs[:2])
    too_many = dataclasses.replace(config, num_beams=8)
    with pytest.raises(ValueError, match="--num-beams 7 or fewer"):
        list(Generator(client, small, too_many, TEMPLATE).generate(examples()))


def test_beam_search_samples_nothing():
    with pytest.raises(ValueError, match="samples nothing"):
        GenerationConfig(num_beams=2, temperature=0.7)
    with pytest.raises(ValueError, match="num_beams"):
        GenerationConfig(num_beams=0)
