"""Tiny causal LMs built from configs (no download), one per supported architecture family."""

from __future__ import annotations

from collections.abc import Callable

import torch
import transformers as tf
from tokenizers import Tokenizer, models, pre_tokenizers

VOCAB = 96
MAX_POSITIONS = 128
_COMMON = dict(vocab_size=VOCAB, bos_token_id=1, eos_token_id=2, pad_token_id=0)
_DECODER = dict(
    hidden_size=32,
    intermediate_size=64,
    num_hidden_layers=2,
    num_attention_heads=4,
    num_key_value_heads=2,
    max_position_embeddings=MAX_POSITIONS,
    **_COMMON,
)

CONFIGS: dict[str, Callable[[], tf.PretrainedConfig]] = {
    "gpt2": lambda: tf.GPT2Config(
        n_embd=32, n_layer=2, n_head=4, n_positions=MAX_POSITIONS, **_COMMON
    ),
    "opt": lambda: tf.OPTConfig(
        hidden_size=32,
        word_embed_proj_dim=16,  # exercises project_out
        ffn_dim=64,
        num_hidden_layers=2,
        num_attention_heads=4,
        max_position_embeddings=MAX_POSITIONS,
        **_COMMON,
    ),
    "opt-no-final-norm": lambda: tf.OPTConfig(
        hidden_size=32,
        word_embed_proj_dim=16,
        ffn_dim=64,
        num_hidden_layers=2,
        num_attention_heads=4,
        max_position_embeddings=MAX_POSITIONS,
        do_layer_norm_before=False,  # OPT-350m: no final norm, representation feeds project_out
        **_COMMON,
    ),
    "llama": lambda: tf.LlamaConfig(**_DECODER),
    "mistral": lambda: tf.MistralConfig(sliding_window=4, **_DECODER),
    "qwen2": lambda: tf.Qwen2Config(**_DECODER),
    "qwen3": lambda: tf.Qwen3Config(head_dim=8, **_DECODER),
    "gpt_neox": lambda: tf.GPTNeoXConfig(
        hidden_size=32,
        intermediate_size=64,
        num_hidden_layers=2,
        num_attention_heads=4,
        max_position_embeddings=MAX_POSITIONS,
        **_COMMON,
    ),
    "gemma": lambda: tf.GemmaConfig(head_dim=8, **_DECODER),
    "gemma2": lambda: tf.Gemma2Config(
        head_dim=8, sliding_window=4, final_logit_softcapping=0.5, **_DECODER
    ),
    "gemma3_text": lambda: tf.Gemma3TextConfig(
        head_dim=8, sliding_window=4, final_logit_softcapping=0.5, **_DECODER
    ),
}
ARCHITECTURES = list(CONFIGS)


def tiny_tokenizer() -> tf.PreTrainedTokenizerFast:
    """A word-level tokenizer over ``w3 w4 ...`` with the usual special tokens."""
    specials = ["<pad>", "<s>", "</s>"]
    vocab = {tok: i for i, tok in enumerate(specials + [f"w{i}" for i in range(3, VOCAB)])}
    backend = Tokenizer(models.WordLevel(vocab, unk_token="<pad>"))
    backend.pre_tokenizer = pre_tokenizers.WhitespaceSplit()
    return tf.PreTrainedTokenizerFast(
        tokenizer_object=backend, bos_token="<s>", eos_token="</s>", pad_token="<pad>"
    )


def tiny_model(arch: str, seed: int = 0, **config: object) -> torch.nn.Module:
    """A random float32 model (``config``: changes to the architecture's tiny config); norm
    weights and biases are perturbed so no term is trivially 1/0."""
    torch.manual_seed(seed)
    settings = CONFIGS[arch]()
    for name, value in config.items():
        setattr(settings, name, value)
    model = tf.AutoModelForCausalLM.from_config(settings)
    with torch.no_grad():
        for param in model.parameters():
            if param.dim() == 1:
                param.add_(0.2 * torch.randn_like(param))
    return model.eval()
