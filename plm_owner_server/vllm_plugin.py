"""The ``vllm.general_plugins`` entry point (``pyproject.toml``): vLLM calls :func:`register` in
every process it starts (the engine core, each tensor-parallel worker), so each knows the
pre-norm classes of :mod:`plm_owner_server.vllm_models` by name. Registering by
``"module:Class"`` keeps this module light: vLLM imports the model module only when it builds
that model."""

from __future__ import annotations

# The Hugging Face architecture → the registered class that serves its f(c).
PRE_NORM = {
    "LlamaForCausalLM": "PemaLlamaForCausalLM",
    "MistralForCausalLM": "PemaMistralForCausalLM",
    "Qwen2ForCausalLM": "PemaQwen2ForCausalLM",
    "Qwen3ForCausalLM": "PemaQwen3ForCausalLM",
}


def register() -> None:
    """Register the pre-norm classes with vLLM's model registry."""
    from vllm import ModelRegistry

    for name in PRE_NORM.values():
        if name not in ModelRegistry.get_supported_archs():
            ModelRegistry.register_model(name, f"plm_owner_server.vllm_models:{name}")
