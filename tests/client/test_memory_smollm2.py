"""Memory parity on the embedded SmolLM2 and real WMT22 pairs (slow: loads the 135M model)."""

from __future__ import annotations

from pathlib import Path

import pytest
import torch
from transformers import AutoModelForCausalLM

from data_owner_client.client import PemaClient
from data_owner_client.data import TEMPLATES, encode_prompt, encode_target, load_examples
from data_owner_client.memory import build_memory
from data_owner_client.served_model import ServedModel
from plm_owner_server.embedded import ensure_embedded_model
from plm_owner_server.runner import ModelRunner
from plm_owner_server.settings import Settings
from tests.server.helpers import serve

pytestmark = pytest.mark.slow
WMT = Path(__file__).resolve().parents[3] / "shared/data/wmt22/dev.jsonl"


def test_teacher_forced_keys_equal_hooked_forward_smollm2(tmp_path, monkeypatch):
    if not WMT.is_file():
        pytest.skip(f"no WMT22 data at {WMT}")
    monkeypatch.setenv("PEMA_CLIENT_CACHE", str(tmp_path / "cache"))
    path = ensure_embedded_model(Settings().cache_dir)
    model = AutoModelForCausalLM.from_pretrained(path, dtype=torch.float32).eval()
    runner = ModelRunner.load(Settings())
    examples = load_examples(WMT, "en", "du", limit=4)
    template = TEMPLATES["translate"]
    with serve(runner) as http, PemaClient(http=http, retries=0) as client:
        served = ServedModel.fetch(client)
        memory = build_memory(client, served.tokenizer, examples, tmp_path / "m",
                              template=template, dtype="float32", progress=False)  # fmt: skip
    keys, values = memory.load_all()

    captured: list[torch.Tensor] = []
    hook = model.model.norm.register_forward_pre_hook(lambda m, a: captured.append(a[0][0]))
    want_keys, want_values = [], []
    eos = served.eos_token_id
    with torch.no_grad():
        for example in examples:
            assert example.target is not None
            prompt = encode_prompt(served.tokenizer, template, example.source)
            target = encode_target(served.tokenizer, template, example.target)
            model(torch.tensor([prompt + target + [eos]]))
            # The representation at the last prompt token predicts the first target token.
            want_keys.append(captured.pop()[len(prompt) - 1 : len(prompt) + len(target)])
            want_values += target + [eos]
    hook.remove()
    assert values.tolist() == want_values
    # Rows were batched (right-padded) on the server and alone here: float rounding only.
    torch.testing.assert_close(keys, torch.cat(want_keys), rtol=1e-4, atol=1e-3)
    assert memory.manifest.fingerprint == runner.fingerprint
