"""Structured output from `pema-client serve` over the embedded SmolLM2 (slow: the 135M model):
``response_format`` by constrained decoding on the mixture, sampled answers that always parse
and validate, LangChain's ``with_structured_output``, and a schema that cannot constrain."""

from __future__ import annotations

import json
from pathlib import Path
from typing import Literal

import httpx
import openai
import pytest
import torch
from langchain_openai import ChatOpenAI
from pydantic import BaseModel, ConfigDict, Field

from data_owner_client.adapter import build_adapter, save_adapter
from data_owner_client.client import PemaClient
from data_owner_client.served_model import ServedModel
from shared.keys import hash_key
from tests.client.synthetic import kind_config
from tests.uvicorn_server import uvicorn_server

pytestmark = pytest.mark.slow

KEY = "pema_structured-test-key"
MESSAGES = [{"role": "user", "content": "Describe a person as JSON."}]


class Described(BaseModel):
    """What the json_schema answers must be (extra keys refused)."""

    model_config = ConfigDict(extra="forbid")

    name: str = Field(max_length=16)
    age: int = Field(ge=0, le=120)
    color: Literal["red", "green", "blue"]


SCHEMA = Described.model_json_schema()


class Person(BaseModel):
    name: str = Field(max_length=16)
    age: int = Field(ge=0, le=120)


@pytest.fixture(scope="module")
def folder(tmp_path_factory) -> Path:
    return tmp_path_factory.mktemp("structured")


@pytest.fixture(scope="module")
def service(folder) -> str:
    """pema-server over SmolLM2, and `pema-client serve` over a sequence adapter with random
    weights strong enough to move the mixture (and its stored repetition guard)."""
    env = {"PEMA_MODEL": "smollm2-135m"}
    with uvicorn_server("--log-level", "warning", log=folder / "plm.log", env=env) as plm:
        with PemaClient(plm) as client:
            served = ServedModel.fetch(client, cache_dir=folder / "cache")
        assert served.head is not None
        info = served.info
        config = kind_config("sequence", info.hidden_size, info.vocab_size, width=32, heads=2,
                             dropout=0.0, fingerprint=info.fingerprint,
                             length_ratio=1.0)  # fmt: skip
        adapter = build_adapter(config, served.head, generator=torch.Generator().manual_seed(0))
        with torch.no_grad():
            adapter.output.weight.normal_(0, 0.5, generator=torch.Generator().manual_seed(1))
        path = save_adapter(folder / "sequence", adapter, config)
        keys = folder / "keys.txt"
        keys.write_text(f"{hash_key(KEY)} app\n")
        flags = ["serve", "--server", plm, "--api-keys-file", str(keys), f"--adapter=seq={path}"]
        with uvicorn_server(*flags, log=folder / "serve.log", module="data_owner_client",
                            env={"PEMA_CLIENT_CACHE": str(folder / "cache")},
                            health="/health") as url:  # fmt: skip
            yield url


@pytest.fixture
def api(service) -> openai.OpenAI:
    return openai.OpenAI(base_url=f"{service}/v1", api_key=KEY, max_retries=0)


def test_sampled_json_schema_answers_always_parse_and_validate(api):
    form = {"type": "json_schema", "json_schema": {"name": "person", "schema": SCHEMA}}
    answers = []
    for seed in (1, 2):
        chat = api.chat.completions.create(model="seq", messages=MESSAGES, n=8, seed=seed,
                                           temperature=1.0, max_tokens=96,
                                           response_format=form)  # fmt: skip
        answers += [choice.message.content for choice in chat.choices]
        assert {choice.finish_reason for choice in chat.choices} == {"stop"}
    for answer in answers:
        Described.model_validate_json(answer)
    assert len(set(answers)) > 8  # sampled, not one answer repeated
    plain = api.chat.completions.create(model="seq", messages=MESSAGES, n=4, seed=3,
                                        temperature=1.0, max_tokens=32)  # fmt: skip
    assert not all(_parses(choice.message.content) for choice in plain.choices)


def _parses(text: str) -> bool:
    try:
        json.loads(text)
    except ValueError:
        return False
    return True


def test_json_object_on_chat_and_completions(api):
    chat = api.chat.completions.create(model="seq", messages=MESSAGES, temperature=0,
                                       max_tokens=64, response_format={"type": "json_object"},
                                       extra_body={"schedule": "constant"})  # fmt: skip
    if chat.choices[0].finish_reason == "stop":
        assert isinstance(json.loads(chat.choices[0].message.content), dict)
    form = {"response_format": {"type": "json_object"}}
    completion = api.completions.create(model="seq", prompt="A person as JSON:", max_tokens=64,
                                        temperature=0, extra_body=form)  # fmt: skip
    text = completion.choices[0].text
    assert text.startswith("{") and (completion.choices[0].finish_reason == "length"
                                     or isinstance(json.loads(text), dict))  # fmt: skip


def test_langchain_with_structured_output(service):
    llm = ChatOpenAI(model="seq", base_url=f"{service}/v1", api_key=KEY, temperature=0,
                     max_tokens=96, max_retries=0)  # fmt: skip
    person = llm.with_structured_output(Person).invoke("Describe a person.")
    assert isinstance(person, Person)
    # json_mode asks for any JSON object: a dict schema parses it as it comes
    json_mode = llm.with_structured_output(Person.model_json_schema(), method="json_mode")
    assert isinstance(json_mode.invoke("A person as JSON."), dict)


def test_a_schema_that_cannot_constrain_is_named(service):
    form = {"type": "json_schema", "json_schema": {"name": "x", "schema": {"type": "objectx"}}}
    body = {"model": "seq", "messages": MESSAGES, "response_format": form}
    answer = httpx.post(f"{service}/v1/chat/completions", json=body,
                        headers={"authorization": f"Bearer {KEY}"})  # fmt: skip
    error = answer.json()["error"]
    assert answer.status_code == 400 and error["param"] == "response_format", error
    assert error["code"] == "invalid_schema" and "objectx" in error["message"]


def test_an_echoed_prompt_keeps_the_space_before_its_completion(api):
    """Answers are stripped as `generate`'s are; after an echoed prompt the completion's
    leading space stays (SmolLM2's tokens carry it), streamed or not."""
    prompt, plm = "The capital of France is", {"lambda_max": 0}
    plain = api.completions.create(model="seq", prompt=prompt, max_tokens=3, temperature=0,
                                   extra_body=plm)  # fmt: skip
    echoed = api.completions.create(model="seq", prompt=prompt, max_tokens=3, temperature=0,
                                    echo=True, extra_body=plm)  # fmt: skip
    assert echoed.choices[0].text == f"{prompt} {plain.choices[0].text}"
    stream = api.completions.create(model="seq", prompt=prompt, max_tokens=3, temperature=0,
                                    echo=True, extra_body=plm, stream=True)  # fmt: skip
    assert "".join(c.choices[0].text for c in stream if c.choices) == echoed.choices[0].text
