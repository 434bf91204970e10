"""Constrained decoding: outputs that are JSON following a schema (or any JSON object), however
the mixture would have it otherwise.

Grammars are llguidance's (the Rust library behind Guidance, also a structured-output backend of
vLLM and SGLang): it covers JSON Schema broadly and computes each step's token mask lazily from
the tokenizer's token trie, with no compile step per schema, so a request's first token is not
delayed. Each row keeps a matcher; a step masks the tokens its grammar forbids before picking (the
bitmask unpacked here with plain torch ops), and the matcher consumes the token picked. A
finished grammar allows only the end of output. llguidance is imported on first use.
"""

from __future__ import annotations

import json
from typing import TYPE_CHECKING, Any

import torch

if TYPE_CHECKING:
    import llguidance

ANY_OBJECT: dict[str, Any] = {"type": "object"}
BITS = torch.arange(32, dtype=torch.int32)


class GrammarError(ValueError):
    """A schema or grammar that cannot constrain decoding; the message says why."""


def json_grammar(schema: dict[str, Any] | None) -> str:
    """The grammar of JSON text following ``schema`` (None: any JSON object), compact (no
    whitespace between tokens the schema does not ask for)."""
    import llguidance

    text = json.dumps(ANY_OBJECT if schema is None else schema)
    compact = llguidance.LLMatcher.grammar_from_json_schema(
        text, defaults={"whitespace_flexible": False}
    )
    return str(compact)


class Grammars:
    """The served tokenizer as llguidance reads it (built once: about a second), and matchers of
    grammars over it."""

    def __init__(self, tokenizer: Any, vocab_size: int, eos_token_ids: list[int]) -> None:
        import llguidance.hf

        try:
            self.tokenizer = llguidance.hf.from_tokenizer(
                tokenizer, n_vocab=vocab_size, eos_token=eos_token_ids
            )
        except ValueError as exc:  # e.g. a slow (Python) tokenizer
            raise GrammarError(f"this model's tokenizer cannot constrain decoding: {exc}") from exc
        self.vocab_size = vocab_size
        self.words = (vocab_size + 31) // 32  # int32 words of one row's bitmask

    def matchers(self, grammar: str, count: int) -> list[llguidance.LLMatcher]:
        """``count`` matchers at the start of ``grammar``; a grammar it cannot use is a
        GrammarError."""
        import llguidance

        if message := llguidance.LLMatcher.validate_grammar(grammar, self.tokenizer):
            raise GrammarError(f"the schema cannot constrain decoding: {message}")
        first = llguidance.LLMatcher(self.tokenizer, grammar)
        if first.is_error():
            raise GrammarError(f"the schema cannot constrain decoding: {first.get_error()}")
        return [first, *(first.deep_copy() for _ in range(count - 1))]

    def mask(self, log_probs: torch.Tensor, matchers: list[llguidance.LLMatcher]) -> torch.Tensor:
        """``log_probs [n, V]`` with each row's forbidden tokens at -inf (a copy)."""
        bitmask = torch.empty(len(matchers), self.words, dtype=torch.int32)
        for row, matcher in zip(bitmask, matchers, strict=True):
            matcher.unsafe_compute_mask_ptr(row.data_ptr(), row.numel() * row.element_size())
        allowed = (bitmask.unsqueeze(-1) >> BITS) & 1  # [n, words, 32]: bit b of word w
        allowed = allowed.flatten(1)[:, : log_probs.shape[-1]].bool().to(log_probs.device)
        return log_probs.masked_fill(~allowed, -torch.inf)


def consume(matchers: list[llguidance.LLMatcher], tokens: list[int]) -> None:
    """Advance each matcher by the token picked for its row."""
    for matcher, token in zip(matchers, tokens, strict=True):
        if not matcher.consume_token(token):
            raise GrammarError(f"the grammar refused token {token}: {matcher.get_error()}")
