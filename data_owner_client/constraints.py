"""Constrained decoding: outputs that are JSON following a schema (or any JSON object), however
the mixture would have it otherwise.

Grammars are llguidance's (the Rust library behind Guidance, also a structured-output backend of
vLLM and SGLang): it covers JSON Schema broadly, computes each step's token mask lazily from the
tokenizer's token trie (no compile step per schema, so a request's first token is not delayed),
and needs nothing of torch beyond a CPU bitmask. Each row keeps a matcher; a step masks the tokens
its grammar forbids before picking, and the matcher consumes the token picked. A finished grammar
allows only the end of output.
"""

from __future__ import annotations

import json
from typing import Any

import llguidance
import llguidance.hf
import llguidance.torch
import torch

ANY_OBJECT: dict[str, Any] = {"type": "object"}


class GrammarError(ValueError):
    """A schema or grammar that cannot constrain decoding; the message says why."""


def json_grammar(schema: dict[str, Any] | None) -> str:
    """The grammar of JSON text following ``schema`` (None: any JSON object), compact (no
    whitespace between tokens the schema does not ask for)."""
    text = json.dumps(ANY_OBJECT if schema is None else schema)
    compact = llguidance.LLMatcher.grammar_from_json_schema(
        text, defaults={"whitespace_flexible": False}
    )
    return str(compact)


class Grammars:
    """The served tokenizer as llguidance reads it (built once: about a second), and matchers of
    grammars over it."""

    def __init__(self, tokenizer: Any, vocab_size: int, eos_token_ids: list[int]) -> None:
        self.tokenizer = llguidance.hf.from_tokenizer(
            tokenizer, n_vocab=vocab_size, eos_token=eos_token_ids
        )
        self.vocab_size = vocab_size

    def matchers(self, grammar: str, count: int) -> list[llguidance.LLMatcher]:
        """``count`` matchers at the start of ``grammar``; a grammar it cannot use is a
        GrammarError."""
        if message := llguidance.LLMatcher.validate_grammar(grammar, self.tokenizer):
            raise GrammarError(f"the schema cannot constrain decoding: {message}")
        return [llguidance.LLMatcher(self.tokenizer, grammar) for _ in range(count)]

    def mask(self, log_probs: torch.Tensor, matchers: list[llguidance.LLMatcher]) -> torch.Tensor:
        """``log_probs [n, V]`` with each row's forbidden tokens at -inf."""
        bitmask = llguidance.torch.allocate_token_bitmask(len(matchers), self.vocab_size)
        for i, matcher in enumerate(matchers):
            llguidance.torch.fill_next_token_bitmask(matcher, bitmask, i)
        masked = log_probs.to("cpu", copy=True)
        llguidance.torch.apply_token_bitmask_inplace(masked, bitmask)
        return masked.to(log_probs.device)


def consume(matchers: list[llguidance.LLMatcher], tokens: list[int]) -> None:
    """Advance each matcher by the token picked for its row."""
    for matcher, token in zip(matchers, tokens, strict=True):
        if not matcher.consume_token(token):
            raise GrammarError(f"the grammar refused token {token}: {matcher.get_error()}")
