"""`pema-client serve` end to end: a real `pema-server` over a tiny model, the service as a
second real uvicorn process, driven by the official `openai` package."""

from __future__ import annotations

import json
import time
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import httpx
import openai
import pytest
import torch
import torch.nn.functional as F
import transformers

from data_owner_client import cli
from data_owner_client.adapter import ResidualAdapter, build_adapter, load_adapter, save_adapter
from data_owner_client.client import PemaClient
from data_owner_client.schedule import gu_lambda
from data_owner_client.served_model import ServedModel
from shared.keys import hash_key
from tests.client.synthetic import kind_config
from tests.tiny_models import tiny_model, tiny_tokenizer
from tests.tiny_server import TinyServer
from tests.uvicorn_server import free_port, uvicorn_server

pytestmark = pytest.mark.slow

KEY = "pema_serve-test-key"
TEMPLATE = "w7 {source} w8"
CHAT_TEMPLATE = (
    "{% for m in messages %}w3 {{ m['content'] }} w4 {% endfor %}"
    "{% if add_generation_prompt %}w5{% endif %}"
)
SOURCES = ["w5 w9 w11", "w20", "w30 w31 w40 w41 w50", "w44 w45", "w12 w13", "w60 w61 w62"]
ADAPTERS = ("pema", "sequence")


@pytest.fixture(scope="module")
def folder(tmp_path_factory) -> Path:
    return tmp_path_factory.mktemp("serve")


@pytest.fixture(scope="module")
def plm(folder) -> str:
    """pema-server over a tiny llama whose tokenizer has a chat template."""
    model = folder / "tiny-llama"
    tiny_model("llama").save_pretrained(model)
    tokenizer = tiny_tokenizer()
    tokenizer.chat_template = CHAT_TEMPLATE
    tokenizer.save_pretrained(model)
    with uvicorn_server("--model", str(model), log=folder / "plm.log") as url:
        yield url


@pytest.fixture(scope="module")
def cache(folder) -> Path:
    return folder / "client-cache"


@pytest.fixture(scope="module")
def adapters(plm, folder, cache) -> dict[str, Path]:
    """An adapter of each kind with weights strong enough to change the PLM's outputs."""
    with PemaClient(plm) as client:
        served = ServedModel.fetch(client, cache_dir=cache)
    assert served.head is not None
    info, made = served.info, {}
    for kind in ADAPTERS:
        config = kind_config(
            kind, info.hidden_size, info.vocab_size, rank=8, width=16, heads=2,
            dropout=0.0, fingerprint=info.fingerprint, template=TEMPLATE, length_ratio=1.5,
            lambda_max=0.7, schedule="quadratic",
        )  # fmt: skip
        adapter = build_adapter(config, served.head, generator=torch.Generator().manual_seed(0))
        with torch.no_grad():
            if kind == "pema":
                adapter.B_pd.normal_(0, 30, generator=torch.Generator().manual_seed(1))
            else:
                last = adapter.B if isinstance(adapter, ResidualAdapter) else adapter.output.weight
                last.normal_(0, 3, generator=torch.Generator().manual_seed(1))
        made[kind] = save_adapter(folder / kind, adapter, config)
    return made


@pytest.fixture(scope="module")
def service(plm, adapters, folder, cache) -> str:
    keys = folder / "keys.txt"
    keys.write_text(f"{hash_key(KEY)} app\n")
    flags = ["serve", "--server", plm, "--api-keys-file", str(keys)]
    flags += [f"--adapter={name}={path}" for name, path in adapters.items()]
    env = {"PEMA_CLIENT_CACHE": str(cache)}
    with uvicorn_server(
        *flags, log=folder / "serve.log", env=env, module="data_owner_client", health="/health"
    ) as url:
        yield url


@pytest.fixture
def api(service) -> openai.OpenAI:
    return openai.OpenAI(base_url=f"{service}/v1", api_key=KEY, max_retries=0)


@pytest.fixture(scope="module")
def plm_id(plm) -> str:
    with PemaClient(plm) as client:
        return client.model_info().model_id


def generate(plm, cache, monkeypatch, tmp_path, *flags: str, sources=SOURCES) -> list[dict]:
    """`pema-client generate --data` over ``sources``: its JSONL records."""
    monkeypatch.setenv("PEMA_CLIENT_CACHE", str(cache))
    data, out = tmp_path / "in.jsonl", tmp_path / "out.jsonl"
    data.write_text("".join(json.dumps({"source": s}) + "\n" for s in sources))
    out.unlink(missing_ok=True)
    cli.main(["generate", "--server", plm, "--data", str(data), "--output", str(out),
              "--no-progress", "--temperature=0", *flags])  # fmt: skip
    return [json.loads(line) for line in out.read_text().splitlines()]


def render(source: str) -> str:
    return TEMPLATE.replace("{source}", source)


def test_models_are_the_adapters_and_the_plm(api, plm_id):
    models = {m.id: m for m in api.models.list()}
    assert list(models) == [plm_id, *ADAPTERS]
    assert models["pema"].owned_by == "data-owner" and models[plm_id].owned_by == "plm-owner"
    assert api.models.retrieve("sequence").model_extra["adapter_kind"] == "sequence"
    assert api.models.retrieve("sequence").model_extra["template"] == TEMPLATE


@pytest.mark.parametrize("name", [*ADAPTERS, "plm"])
def test_completions_equal_pema_client_generate(
    api, plm, plm_id, adapters, cache, monkeypatch, tmp_path, name
):
    """Greedy completions of the adapter's rendered prompts equal `generate` on the sources
    (same tokens, same GU horizon from the source inside the template): text, finish reason,
    usage; streamed, the text arrives in pieces that add up to the same."""
    model, flags = (plm_id, ["--template", TEMPLATE]) if name == "plm" else (name, [])
    if name != "plm":
        flags = ["--adapter", str(adapters[name])]
    want = generate(plm, cache, monkeypatch, tmp_path, "--max-new-tokens=12", *flags)
    got = api.completions.create(
        model=model, prompt=[render(s) for s in SOURCES], max_tokens=12, temperature=0
    )
    assert [c.text for c in got.choices] == [w["prediction"] for w in want]
    reasons = {"eos": "stop", "length": "length"}
    assert [c.finish_reason for c in got.choices] == [reasons[w["finish_reason"]] for w in want]
    assert got.usage.completion_tokens == sum(w["tokens"] for w in want)
    prompt_tokens = sum(len(tiny_tokenizer()(render(s))["input_ids"]) for s in SOURCES)
    assert got.usage.prompt_tokens == prompt_tokens
    assert got.usage.total_tokens == prompt_tokens + got.usage.completion_tokens

    stream = api.completions.create(
        model=model, prompt=render(SOURCES[2]), max_tokens=12, temperature=0, stream=True,
        stream_options={"include_usage": True},
    )  # fmt: skip
    chunks = list(stream)
    pieces = [c.choices[0].text for c in chunks if c.choices]
    assert "".join(pieces) == want[2]["prediction"] and len([p for p in pieces if p]) > 1
    assert [c.choices[0].finish_reason for c in chunks if c.choices][-1] == reasons[
        want[2]["finish_reason"]
    ]
    assert chunks[-1].usage.completion_tokens == want[2]["tokens"]


def test_stop_strings_and_max_tokens(api, plm, adapters, cache, monkeypatch, tmp_path):
    flags = ["--adapter", str(adapters["pema"]), "--max-new-tokens=12"]
    whole = generate(plm, cache, monkeypatch, tmp_path, *flags)
    words = whole[2]["prediction"].split()
    stop = " ".join(words[3:5])  # appears in the middle
    want = generate(plm, cache, monkeypatch, tmp_path, *flags, "--stop", stop)
    got = api.completions.create(
        model="pema", prompt=[render(s) for s in SOURCES], max_tokens=12, temperature=0,
        stop=[stop],
    )  # fmt: skip
    assert [c.text for c in got.choices] == [w["prediction"] for w in want]
    assert got.choices[2].text == " ".join(words[:3]) and got.choices[2].finish_reason == "stop"
    streamed = api.completions.create(
        model="pema", prompt=render(SOURCES[2]), max_tokens=12, temperature=0, stop=stop,
        stream=True,
    )  # fmt: skip
    assert "".join(c.choices[0].text for c in streamed) == " ".join(words[:3])
    short = api.completions.create(model="pema", prompt=render(SOURCES[2]), max_tokens=3,
                                   temperature=0)  # fmt: skip
    assert short.choices[0].finish_reason == "length" and short.usage.completion_tokens == 3
    assert short.choices[0].text == " ".join(words[:3])


def test_chat_renders_the_chat_template_and_equals_generate(
    api, plm, adapters, cache, monkeypatch, tmp_path
):
    chat_template = "w3 {source} w4 w5"  # what CHAT_TEMPLATE makes of one user message
    want = generate(plm, cache, monkeypatch, tmp_path, "--adapter", str(adapters["sequence"]),
                    "--template", chat_template, "--max-new-tokens=10")  # fmt: skip
    for source, expected in zip(SOURCES, want, strict=True):
        messages = [{"role": "user", "content": source}]
        got = api.chat.completions.create(
            model="sequence", messages=messages, max_tokens=10, temperature=0
        )
        assert got.choices[0].message.content == expected["prediction"]
        assert got.choices[0].message.role == "assistant"
        assert got.usage.completion_tokens == expected["tokens"]
    stream = api.chat.completions.create(
        model="sequence", messages=[{"role": "user", "content": SOURCES[2]}], max_tokens=10,
        temperature=0, stream=True,
    )  # fmt: skip
    chunks = list(stream)
    assert chunks[0].choices[0].delta.role == "assistant"
    assert "".join(c.choices[0].delta.content or "" for c in chunks) == want[2]["prediction"]
    assert chunks[-1].choices[0].finish_reason is not None


def test_lambda_zero_is_the_plm_alone(api, plm_id):
    prompts = [render(s) for s in SOURCES]
    plm = api.completions.create(model=plm_id, prompt=prompts, max_tokens=10, temperature=0)
    for name in ADAPTERS:
        off = api.completions.create(
            model=name, prompt=prompts, max_tokens=10, temperature=0,
            extra_body={"lambda_max": 0},
        )  # fmt: skip
        on = api.completions.create(model=name, prompt=prompts, max_tokens=10, temperature=0)
        assert [c.text for c in off.choices] == [c.text for c in plm.choices]
        assert [c.text for c in on.choices] != [c.text for c in plm.choices]


def test_concurrent_requests_each_get_their_answer_alone(api, plm_id):
    """Eight threads at once, over both adapters, the PLM and sampled settings: each answer is
    what the same request gets alone."""
    requests = [
        dict(model=["pema", "sequence", plm_id][i % 3], prompt=render(SOURCES[i % 6]),
             max_tokens=6 + i, temperature=0.0 if i % 2 else 1.0, seed=i)
        for i in range(8)
    ]  # fmt: skip
    alone = [api.completions.create(**r).choices[0].text for r in requests]
    with ThreadPoolExecutor(8) as pool:
        together = list(pool.map(lambda r: api.completions.create(**r).choices[0].text, requests))
    assert together == alone


def test_errors_have_openai_shape(api, service):
    with pytest.raises(openai.NotFoundError) as missing:
        api.completions.create(model="nope", prompt="w5", max_tokens=2)
    assert missing.value.code == "model_not_found" and "GET /v1/models" in missing.value.message
    wrong = openai.OpenAI(base_url=f"{service}/v1", api_key="wrong", max_retries=0)
    with pytest.raises(openai.AuthenticationError):
        wrong.models.list()
    with pytest.raises(openai.BadRequestError) as bad:
        api.completions.create(model="pema", prompt="w5", max_tokens=2, temperature=5)
    assert bad.value.param == "temperature"
    with pytest.raises(openai.BadRequestError, match="frequency_penalty"):
        api.completions.create(model="pema", prompt="w5", frequency_penalty=1)
    with pytest.raises(openai.BadRequestError, match="no room to generate"):
        api.completions.create(model="pema", prompt="w5 " * 5000, max_tokens=2)
    response = httpx.post(
        f"{service}/v1/completions", json={}, headers={"authorization": f"Bearer {KEY}"}
    )
    assert response.status_code == 400 and set(response.json()["error"]) == {
        "message", "type", "param", "code"
    }  # fmt: skip


def _metric(plm: str, name: str) -> float:
    text = httpx.get(f"{plm}/metrics").text
    return sum(
        float(line.split()[-1])
        for line in text.splitlines()
        if line.startswith(name) and not line.startswith("#")
    )


def test_a_client_that_goes_away_frees_its_rows(api, service, plm, plm_id):
    """A stream closed after its first chunk: the service stops decoding it and closes its PLM
    session long before the tokens it asked for (which the same request takes when read)."""
    steps = 'pema_requests_total{method="POST",route="/v1/sessions/{session_id}/step"'
    body = {"model": plm_id, "prompt": render(SOURCES[0]), "max_tokens": 1000, "temperature": 0}
    headers = {"authorization": f"Bearer {KEY}"}
    before = _metric(plm, steps)
    whole = httpx.post(f"{service}/v1/completions", json=body, headers=headers).json()
    assert whole["choices"][0]["finish_reason"] == "length"  # the model's context is the limit
    full = _metric(plm, steps) - before
    assert full > 50
    before = _metric(plm, steps)
    with httpx.stream(
        "POST", f"{service}/v1/completions", json=body | {"stream": True}, headers=headers
    ) as response:
        next(response.iter_lines())
    deadline = time.monotonic() + 10
    while _metric(plm, "pema_sessions_open") > 0:
        assert time.monotonic() < deadline, "the session stayed open"
        time.sleep(0.05)
    assert _metric(plm, steps) - before < full / 2


def test_plm_server_away_is_503_and_back_works(tmp_path):
    """The PLM owner's server killed: requests get a 503 at once, not a hang; started again,
    they work again. (Also: with one session allowed, a request waits for the running one; this
    tiny model's tokenizer has no chat template, so chat is a clear 400.)"""
    plm = TinyServer(free_port(), tmp_path / "plm.log")
    plm.start()
    plm.wait_ready()
    env = {"PEMA_CLIENT_CACHE": str(tmp_path / "cache")}
    flags = ("serve", "--server", plm.url, "--reconnect-s=1", "--max-sessions=1")
    try:
        with uvicorn_server(
            *flags, log=tmp_path / "serve.log", env=env, module="data_owner_client",
            health="/health",
        ) as url:  # fmt: skip
            api = openai.OpenAI(base_url=f"{url}/v1", api_key="none", max_retries=0)
            model = api.models.list().data[0].id

            def ask() -> str:
                answer = api.completions.create(
                    model=model, prompt="w5 w9", max_tokens=5, temperature=0
                )
                return answer.choices[0].text

            first = ask()
            # One session at most: a request arriving while another decodes waits for it.
            long = dict(model=model, prompt="w30 w31", max_tokens=40, temperature=0)
            want = api.completions.create(**long).choices[0].text
            with ThreadPoolExecutor(1) as pool:
                chunks = iter(api.completions.create(**long, stream=True))
                head = next(chunks).choices[0].text
                waiting = pool.submit(ask)
                assert head + "".join(c.choices[0].text for c in chunks) == want
                assert waiting.result() == first
            with pytest.raises(openai.BadRequestError, match="no chat template"):
                api.chat.completions.create(
                    model=model, messages=[{"role": "user", "content": "w5"}]
                )
            plm.kill()
            started = time.monotonic()
            with pytest.raises(openai.InternalServerError) as away:
                ask()
            assert away.value.status_code == 503 and "unavailable" in away.value.message
            assert time.monotonic() - started < 10
            plm.start()
            plm.wait_ready()
            assert ask() == first
    finally:
        if plm.process is not None and plm.process.poll() is None:
            plm.kill()


def test_openai_clients_may_send_nulls_and_harmless_fields(api, service):
    """Null means the default; fields that ask nothing of decoding are accepted; a temperature
    too small to divide by decodes greedily, and does not fail the others decoding with it."""
    prompt = render(SOURCES[2])
    greedy = api.completions.create(model="pema", prompt=prompt, max_tokens=6, temperature=0)
    body = {"model": "pema", "prompt": prompt, "max_tokens": 6, "temperature": 0, "top_p": None,
            "n": None, "stream": None, "presence_penalty": None, "user": "u", "store": False,
            "metadata": {"app": "test"}}  # fmt: skip
    headers = {"authorization": f"Bearer {KEY}"}
    answer = httpx.post(f"{service}/v1/completions", json=body, headers=headers)
    assert answer.status_code == 200, answer.text
    assert answer.json()["choices"][0]["text"] == greedy.choices[0].text
    with ThreadPoolExecutor(2) as pool:
        tiny = pool.submit(
            api.completions.create, model="pema", prompt=prompt, max_tokens=6, temperature=1e-45
        )
        other = pool.submit(
            api.completions.create, model="pema", prompt=prompt, max_tokens=6, temperature=0
        )
        assert tiny.result().choices[0].text == other.result().choices[0].text
    with pytest.raises(openai.BadRequestError, match="only allowed with stream"):
        api.completions.create(model="pema", prompt=prompt, stream_options={"include_usage": True})


def test_the_published_schema_lists_the_routes(service):
    schema = httpx.get(f"{service}/openapi.json").json()
    assert {"/v1/models", "/v1/completions", "/v1/chat/completions"} <= set(schema["paths"])
    fields = schema["components"]["schemas"]["CompletionRequest"]["properties"]
    assert {"lambda_max", "schedule", "gu_horizon", "min_length", "stream"} <= set(fields)


def test_metrics_count_requests_tokens_and_first_tokens(api, service):
    api.completions.create(model="pema", prompt=render(SOURCES[0]), max_tokens=4, temperature=0)
    list(api.completions.create(model="pema", prompt=render(SOURCES[1]), max_tokens=4,
                                temperature=0, stream=True))  # fmt: skip
    text = httpx.get(f"{service}/metrics").text
    samples = {
        line.rsplit(" ", 1)[0]: float(line.rsplit(" ", 1)[1])
        for line in text.splitlines()
        if line and not line.startswith("#")
    }
    ok = 'pema_serve_requests_total{method="POST",route="/v1/completions",status="200"}'
    assert samples[ok] >= 2
    assert samples['pema_serve_generated_tokens_total{model="pema"}'] >= 2
    assert samples['pema_serve_time_to_first_token_seconds_count{model="pema"}'] >= 1
    assert samples['pema_serve_decoding_rows{model="pema"}'] == 0
    assert samples['pema_serve_waiting_requests{model="sequence"}'] == 0


def reference_log_probs(plm, cache, adapter_dir, ids, lam, prompt_len):
    """The mixture's log-probabilities ``[len(ids), V]`` after each position of ``ids``, from
    one full forward in this process: ``log((1 − λ_t)·P_LM + λ_t·P_adapter)``."""
    with PemaClient(plm) as client:
        served = ServedModel.fetch(client, cache_dir=cache)
        x = client.represent([ids], [0]).rows()[0]
    head = served.head
    assert head is not None
    adapter, _ = load_adapter(adapter_dir, head=head)
    with torch.no_grad():
        if adapter.reads_sequences:
            z = adapter(x[None], torch.tensor([ids]), torch.tensor([prompt_len]))[0]
            adapted = head.project(z)
        else:
            adapted = head.project(adapter(x)) if adapter.post_norm else head(adapter(x))
        lam = torch.tensor(lam).unsqueeze(1)
        mixed = (1 - lam) * F.softmax(head(x), -1) + lam * F.softmax(adapted, -1)
    return mixed.log()


@pytest.mark.parametrize("name", ADAPTERS)
def test_echo_and_logprobs_are_the_mixtures(api, plm, plm_id, adapters, cache, name):
    """Completions' ``echo`` scores each prompt token as the first new token after those before
    it (λ_0), generated tokens as decoding mixed them (λ_t of the quadratic schedule, the
    adapter reading the prompt as its prompt): both equal a full forward to 1e-4, with the
    most likely tokens; ``max_tokens: 0`` scores without decoding, streamed chunks carry the
    same numbers."""
    prompt = render(SOURCES[2])
    tokenizer = tiny_tokenizer()
    ids = tokenizer(prompt)["input_ids"]
    scored = api.completions.create(model=name, prompt=prompt, max_tokens=0, echo=True,
                                    logprobs=3, temperature=0)  # fmt: skip
    choice = scored.choices[0]
    assert choice.text == prompt and choice.finish_reason == "length"
    assert scored.usage.completion_tokens == 0
    logprobs = choice.logprobs
    assert logprobs.tokens == [tokenizer.decode([t]) for t in ids]
    assert logprobs.token_logprobs[0] is None and logprobs.top_logprobs[0] is None
    want = reference_log_probs(plm, cache, adapters[name], ids, [0.7] * len(ids), len(ids))
    for i, token in enumerate(ids[1:], 1):
        assert logprobs.token_logprobs[i] == pytest.approx(float(want[i - 1, token]), abs=1e-4)
        top = want[i - 1].topk(3)
        expected = {tokenizer.decode([t]): float(v) for v, t in zip(*top, strict=True)}
        got = logprobs.top_logprobs[i]
        assert got.keys() == expected.keys() | {logprobs.tokens[i]}
        for text, value in expected.items():
            assert got[text] == pytest.approx(value, abs=1e-4)
    assert logprobs.text_offset == [sum(map(len, logprobs.tokens[:i])) for i in range(len(ids))]
    off = {"lambda_max": 0, "no_repeat_ngram": 0}  # λ = 0: the PLM's own, as its model id gives
    alone = [api.completions.create(model=model, prompt=prompt, max_tokens=0, echo=True,
                                    logprobs=3, extra_body=extra).choices[0].logprobs
             for model, extra in ((name, off), (plm_id, {}))]  # fmt: skip
    assert alone[0].token_logprobs == pytest.approx(alone[1].token_logprobs, abs=1e-6)
    assert alone[0].token_logprobs != pytest.approx(logprobs.token_logprobs, abs=1e-3)

    answer = api.completions.create(model=name, prompt=prompt, max_tokens=4, echo=True,
                                    logprobs=2, temperature=0)  # fmt: skip
    new = answer.choices[0].logprobs
    generated = tokenizer(answer.choices[0].text[len(prompt) :].strip())["input_ids"]
    assert answer.choices[0].text.startswith(prompt) and new.tokens[: len(ids)] == logprobs.tokens
    assert new.token_logprobs[: len(ids)] == pytest.approx(logprobs.token_logprobs[: len(ids)])
    horizon = 1.5 * len(tokenizer(SOURCES[2])["input_ids"])
    lam = [gu_lambda(t, horizon, 0.7) for t in range(len(generated))]
    full = reference_log_probs(plm, cache, adapters[name], ids + generated, [0.7] * (len(ids) - 1)
                               + lam + [0.0], len(ids))  # fmt: skip
    for t, token in enumerate(generated):
        got = new.token_logprobs[len(ids) + t]
        assert got == pytest.approx(float(full[len(ids) - 1 + t, token]), abs=1e-4)

    streamed = api.completions.create(model=name, prompt=prompt, max_tokens=4, echo=True,
                                      logprobs=2, temperature=0, stream=True)  # fmt: skip
    chunks = [c.choices[0] for c in streamed if c.choices]
    assert "".join(c.text for c in chunks) == answer.choices[0].text
    assert [x for c in chunks for x in c.logprobs.token_logprobs] == new.token_logprobs
    assert [x for c in chunks for x in c.logprobs.tokens] == new.tokens
    assert [x for c in chunks for x in c.logprobs.text_offset] == new.text_offset


def test_chat_logprobs_are_the_completions_of_its_prompt(api):
    """Chat's ``logprobs``/``top_logprobs`` are the same mixture's as completions over the
    rendered chat (constant λ, so the source's length does not matter), whole and streamed."""
    messages = [{"role": "user", "content": SOURCES[2]}]
    constant = {"schedule": "constant"}
    chat = api.chat.completions.create(model="sequence", messages=messages, max_tokens=5,
                                       temperature=0, logprobs=True, top_logprobs=2,
                                       extra_body=constant)  # fmt: skip
    rendered = f"w3 {SOURCES[2]} w4 w5"
    completion = api.completions.create(model="sequence", prompt=rendered, max_tokens=5,
                                        temperature=0, logprobs=2, extra_body=constant)  # fmt: skip
    content = chat.choices[0].logprobs.content
    want = completion.choices[0].logprobs
    assert [c.token for c in content] == want.tokens
    assert [c.logprob for c in content] == pytest.approx(want.token_logprobs, abs=1e-5)
    for entry, top in zip(content, want.top_logprobs, strict=True):
        assert len(entry.top_logprobs) == 2 and entry.bytes == list(entry.token.encode())
        assert {t.token: t.logprob for t in entry.top_logprobs}.items() <= top.items()
    stream = api.chat.completions.create(model="sequence", messages=messages, max_tokens=5,
                                         temperature=0, logprobs=True, top_logprobs=2,
                                         extra_body=constant, stream=True)  # fmt: skip
    streamed = [e for c in stream if c.choices and c.choices[0].logprobs
                for e in c.choices[0].logprobs.content]  # fmt: skip
    assert streamed == content


@pytest.mark.parametrize(
    ("field", "value"),
    [("frequency_penalty", 1), ("presence_penalty", 0.5), ("logit_bias", {"5": 1}),
     ("suffix", "w9"), ("best_of", 2), ("stream_options", {"include_usage": True}),
     ("max_tokens", 0), ("stop", ["w9"] * 33)],
)  # fmt: skip
def test_each_field_refused_alone_is_named(service, field, value):
    body = {"model": "pema", "prompt": "w5 w6", field: value}
    answer = httpx.post(f"{service}/v1/completions", json=body,
                        headers={"authorization": f"Bearer {KEY}"})  # fmt: skip
    error = answer.json()["error"]
    assert answer.status_code == 400 and error["param"] == field, error
    assert field in error["message"] or "stop strings" in error["message"]
    assert "Value error" not in error["message"] and "body" not in error["message"]


@pytest.mark.parametrize(
    ("field", "value"),
    [("tools", [{"type": "function", "function": {"name": "f"}}]), ("top_logprobs", 2),
     ("response_format", {"type": "json_schema"})],
)  # fmt: skip
def test_each_chat_field_refused_alone_is_named(service, field, value):
    body = {"model": "pema", "messages": [{"role": "user", "content": "w5"}], field: value}
    answer = httpx.post(f"{service}/v1/chat/completions", json=body,
                        headers={"authorization": f"Bearer {KEY}"})  # fmt: skip
    error = answer.json()["error"]
    assert answer.status_code == 400 and error["param"] == field and field in error["message"]


def test_more_than_four_stop_strings(api):
    prompt = render(SOURCES[2])
    whole = api.completions.create(model="pema", prompt=prompt, max_tokens=8, temperature=0)
    words = whole.choices[0].text.split()
    stops = [f"w{90 + i}x" for i in range(7)] + [words[2]]
    cut = api.completions.create(model="pema", prompt=prompt, max_tokens=8, temperature=0,
                                 stop=stops)  # fmt: skip
    assert cut.choices[0].text == " ".join(words[:2]) and cut.choices[0].finish_reason == "stop"


CHOICE_TASK = """
task: pema_choice
dataset_path: json
dataset_kwargs:
  data_files:
    test: {data}
test_split: test
output_type: multiple_choice
doc_to_text: "{{{{question}}}}"
doc_to_choice: "{{{{choices}}}}"
doc_to_target: "{{{{answer}}}}"
metric_list:
  - metric: acc
"""
UNTIL_TASK = """
task: pema_until
dataset_path: json
dataset_kwargs:
  data_files:
    test: {data}
test_split: test
output_type: generate_until
doc_to_text: "{{{{source}}}}"
doc_to_target: "{{{{target}}}}"
generation_kwargs:
  until: ["w99"]
  max_gen_toks: 6
  do_sample: false
  temperature: 0
metric_list:
  - metric: exact_match
"""


def lm_eval_samples(service, folder, model, tmp_path, monkeypatch) -> dict[str, list[dict]]:
    """The real lm-evaluation-harness (`local-completions`, the tiny model's tokenizer) over a
    local multiple-choice task and a generate-until task against `serve`: its logged samples."""
    from lm_eval import simple_evaluate
    from lm_eval.tasks import TaskManager

    monkeypatch.setenv("OPENAI_API_KEY", KEY)
    monkeypatch.setenv("HF_DATASETS_OFFLINE", "1")
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    rows = [{"question": s, "choices": ["w20 w21", "w30", "w44 w45 w46"], "answer": i % 3,
             "source": render(s), "target": "w9"} for i, s in enumerate(SOURCES)]  # fmt: skip
    data = tmp_path / "docs.jsonl"
    data.write_text("".join(json.dumps(r) + "\n" for r in rows))
    for name, task in (("choice", CHOICE_TASK), ("until", UNTIL_TASK)):
        (tmp_path / f"{name}.yaml").write_text(task.format(data=data))
    args = (f"model={model},base_url={service}/v1/completions,tokenizer_backend=huggingface,"
            f"tokenizer={folder / 'tiny-llama'},num_concurrent=1,max_retries=1")  # fmt: skip
    results = simple_evaluate(
        model="local-completions", model_args=args, tasks=["pema_choice", "pema_until"],
        task_manager=TaskManager(include_path=str(tmp_path)), log_samples=True,
        cache_requests=False,
    )  # fmt: skip
    assert results is not None
    return results["samples"]


def test_lm_eval_scores_the_mixture_and_the_plm(
    api, service, plm, plm_id, adapters, cache, folder, tmp_path, monkeypatch
):
    """lm-eval's loglikelihoods of each choice are the mixture's log-probabilities computed in
    this process (λ_0 = 0.7 at every continuation token); the PLM alone's equal a plain
    transformers forward; its generate_until outputs are serve's completions."""
    tokenizer = tiny_tokenizer()
    model = transformers.AutoModelForCausalLM.from_pretrained(folder / "tiny-llama").eval()
    for name in ("sequence", plm_id):
        samples = lm_eval_samples(service, folder, name, tmp_path, monkeypatch)
        checked = 0
        for sample in samples["pema_choice"]:
            context = sample["doc"]["question"]
            for choice, response in zip(sample["doc"]["choices"], sample["resps"], strict=True):
                ctx = tokenizer(context)["input_ids"]
                ids = ctx + tokenizer(choice)["input_ids"]
                if name == plm_id:
                    with torch.no_grad():
                        lp = model(torch.tensor([ids])).logits[0].log_softmax(-1)
                else:
                    lp = reference_log_probs(plm, cache, adapters[name], ids, [0.7] * len(ids),
                                             len(ids))  # fmt: skip
                want = sum(float(lp[i - 1, ids[i]]) for i in range(len(ctx), len(ids)))
                loglikelihood, greedy = response[0]
                assert loglikelihood == pytest.approx(want, abs=1e-4)
                argmax = all(int(lp[i - 1].argmax()) == ids[i] for i in range(len(ctx), len(ids)))
                assert greedy == argmax
                checked += 1
        assert checked == 3 * len(SOURCES)
        for sample in samples["pema_until"]:
            prompt = sample["doc"]["source"]
            want = api.completions.create(model=name, prompt=prompt, max_tokens=6, temperature=0,
                                          stop=["w99"])  # fmt: skip
            assert sample["resps"][0][0] == want.choices[0].text
