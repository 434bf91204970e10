"""Scheduled sampling: the predictions are the mixture's greedy choices after the gold prefix (as
`generate` decodes), the draws depend on seed and example alone, and a scheduled memory reads
those tokens with the gold labels, resumes to the same bytes and is refused as another build."""

from __future__ import annotations

import dataclasses
from typing import Any

import pytest
import torch

from data_owner_client.data import Example, encode_prompt, encode_target
from data_owner_client.generate import GenerationConfig, Generator
from data_owner_client.memory import IGNORE, MemoryStoreError
from data_owner_client.memory.build import Encoded
from data_owner_client.memory.scheduled import OwnPredictions
from data_owner_client.served_model import ServedModel
from tests.client.test_generate import PROMPTS, _strong_adapter, generated_tokens
from tests.client.test_memory import TEMPLATE, Killed, build, fail_after, files, hooked
from tests.client.test_memory import make_examples as memory_examples


def resampler(served: ServedModel, kind: str = "sequence", rate: float = 0.5, seed: int = 0):
    adapter, config = _strong_adapter(served, kind)
    assert served.head is not None
    return OwnPredictions.of(adapter, config, served.head, served.info.eos_token_ids, rate, seed)


def encoded(served: ServedModel, example: Example, index: int = 0) -> Encoded:
    assert example.target is not None
    prompt = encode_prompt(served.tokenizer, TEMPLATE, example.source)
    target = encode_target(served.tokenizer, TEMPLATE, example.target)
    source = len(served.tokenizer(example.source, add_special_tokens=False)["input_ids"])
    return Encoded(prompt, target + [served.info.eos_token_ids[0]], source, index)


@pytest.mark.parametrize("kind", ["residual", "sequence"])
def test_after_its_own_greedy_output_each_prediction_is_the_next_token(served_client, kind):
    """A gold target that is the generator's own greedy output (stored λ and schedule, no
    guard) is predicted token for token: the predictions mix as decoding does, step by step."""
    _, client, served = served_client
    adapter, adapter_config = _strong_adapter(served, kind)
    assert served.head is not None
    own = OwnPredictions.of(adapter, adapter_config, served.head, served.info.eos_token_ids, 1.0)
    config = GenerationConfig(max_new_tokens=8, no_repeat_ngram=0, num_beams=1)
    generator = Generator(client, served, config, "{source}", adapter, adapter_config)
    eos = served.info.eos_token_ids[0]
    for prompt, tokens in zip(PROMPTS, generated_tokens(generator, PROMPTS), strict=True):
        ids = encode_prompt(served.tokenizer, "{source}", prompt)
        tokens = [t for t in tokens if t != eos]
        example = Encoded(ids, [*tokens, eos], len(ids))
        hidden = client.represent([example.sequence], [0]).rows()[0]
        assert own.predictions(example, hidden) == tokens


def test_draws_depend_on_seed_and_example_and_never_read_an_end(served_client, monkeypatch):
    _, client, served = served_client
    eos = served.info.eos_token_ids[0]
    example = Encoded([5, 6], [10, 11, 12, 13, 14, 15, 16, 17, 18, 19, eos], 2, index=3)
    predicted = [20, 21, eos, 23, 24, 25, 26, 27, 28, 29]
    replaced = {}
    for rate, seed, index in ((1.0, 0, 3), (0.5, 0, 3), (0.5, 0, 4), (0.5, 1, 3)):
        own = resampler(served, rate=rate, seed=seed)
        monkeypatch.setattr(own, "predictions", lambda example, hidden: predicted)
        case = dataclasses.replace(example, index=index)
        target = own(case, torch.zeros(12, 32))
        assert target == own(case, torch.zeros(12, 32))  # the same draws again
        assert target[-1] == eos and target[2] == 12  # an end is never read mid-sequence
        assert all(
            t in (gold, new)
            for t, gold, new in zip(target[:-1], case.target[:-1], predicted, strict=True)
        )
        replaced[rate, seed, index] = [
            t != gold for t, gold in zip(target, case.target, strict=True)
        ]
    assert replaced[1.0, 0, 3] == [True, True, False, *[True] * 7, False]
    assert 0 < sum(replaced[0.5, 0, 3]) < 9
    assert replaced[0.5, 0, 3] != replaced[0.5, 0, 4]  # another example
    assert replaced[0.5, 0, 3] != replaced[0.5, 1, 3]  # another seed
    with pytest.raises(ValueError, match=r"rate must be in \(0, 1\]"):
        resampler(served, rate=0.0)


def test_a_scheduled_memory_reads_the_predictions_with_the_gold_labels(served_client, tmp_path):
    runner, client, served = served_client
    own = resampler(served, rate=0.5)
    data = memory_examples(7)
    memory = build(client, served.tokenizer, tmp_path / "m", data, context="scheduled",
                   resample=own)  # fmt: skip
    assert memory.manifest.positions == "all" and memory.manifest.sampling == own.sampling
    batches = list(memory.sequences().batches(7, seed=0, epoch=0, shuffle=False))
    keys, tokens, labels = batches[0]
    differ = 0
    for i, example in enumerate(data):
        gold = encoded(served, example, i)
        read = gold.prompt + own(gold, hooked(runner, gold.sequence))[:-1]
        length = len(read)
        assert tokens[i, :length].tolist() == read
        torch.testing.assert_close(keys[i, :length], hooked(runner, read), rtol=0, atol=1e-5)
        assert labels[i, :length].tolist() == [IGNORE] * (len(gold.prompt) - 1) + gold.target
        differ += read != gold.sequence
    assert differ >= 2  # the adapter's own choices are read, not the gold ones


def test_a_scheduled_build_resumes_to_the_same_bytes_and_is_its_own_build(
    served_client, tmp_path, monkeypatch
):
    _, client, served = served_client
    own = resampler(served)
    kw: dict[str, Any] = {"context": "scheduled", "resample": own}
    build(client, served.tokenizer, tmp_path / "whole", memory_examples(7), **kw)
    with monkeypatch.context() as patch:
        patch.setattr(client, "represent", fail_after(3, client.represent))
        with pytest.raises(Killed):
            build(client, served.tokenizer, tmp_path / "resumed", memory_examples(7), **kw)
    build(client, served.tokenizer, tmp_path / "resumed", memory_examples(7), **kw)
    assert files(tmp_path / "resumed") == files(tmp_path / "whole")
    other = {"context": "scheduled", "resample": resampler(served, rate=0.25)}
    with pytest.raises(MemoryStoreError, match="sampling .*use a new directory"):
        build(client, served.tokenizer, tmp_path / "whole", memory_examples(7), **other)
    with pytest.raises(ValueError, match="needs a resampler"):
        build(client, served.tokenizer, tmp_path / "x", memory_examples(7), context="scheduled")
