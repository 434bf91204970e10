"""The architecture table: every supported family resolves; others get a clear error."""

from __future__ import annotations

import pytest
import transformers as tf

from plm_owner_server.architectures import ARCHITECTURES, ModelHead, UnsupportedArchitecture
from tests.tiny_models import ARCHITECTURES as TINY


def test_required_families_are_supported():
    required = {"gpt2", "opt", "llama", "mistral", "qwen2", "qwen3", "gpt_neox", "gemma", "gemma2"}
    assert required | {"gemma3_text"} <= set(ARCHITECTURES)
    assert {t.removesuffix("-no-final-norm") for t in TINY} == set(ARCHITECTURES)


def test_head_spec_per_family(make_runner):
    assert make_runner("gpt2").head.spec.norm == "layernorm"
    assert make_runner("llama").head.spec.norm == "rmsnorm"
    assert make_runner("gemma").head.spec.weight_offset == 1.0
    assert make_runner("gemma2").head.spec.logit_softcap == 0.5
    assert make_runner("opt-no-final-norm").head.spec.norm == "none"
    assert "project_out.weight" in make_runner("opt").head.tensors()


def test_unsupported_architecture_names_the_supported_ones():
    config = tf.BloomConfig(vocab_size=32, hidden_size=16, n_layer=1, n_head=2)
    model = tf.AutoModelForCausalLM.from_config(config)
    with pytest.raises(UnsupportedArchitecture, match="'bloom' is not supported; supported: gpt2"):
        ModelHead(model)
