"""Log-probabilities in OpenAI's shapes: the legacy completions' parallel lists and chat's list of
tokens. They are the mixture's (:meth:`data_owner_client.generate.Generator.score` for an echoed
prompt, the decoding step's for new tokens), before the repetition guard, temperature and top-k/p.
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any

from data_owner_client.decoding import TokenLogprob
from data_owner_client.serve.protocol import (
    ChatLogprobs,
    ChatTokenLogprob,
    CompletionLogprobs,
    TopLogprob,
)


class TokenTexts:
    """Each token's own text, as the tokenizer decodes it alone (cached)."""

    def __init__(self, tokenizer: Any) -> None:
        self.tokenizer = tokenizer
        self._texts: dict[int, str] = {}

    def __call__(self, token: int) -> str:
        if token not in self._texts:
            self._texts[token] = str(self.tokenizer.decode([token]))
        return self._texts[token]


def completion_logprobs(
    texts: TokenTexts,
    scored: Sequence[TokenLogprob],
    first: int | None = None,
    offset: int = 0,
) -> CompletionLogprobs:
    """``scored`` tokens as the completions API lists them, after ``first`` (an echoed prompt's
    first token, which nothing predicts: no log-probabilities); text offsets count from
    ``offset``. The most likely tokens include the token itself, as OpenAI's do."""
    out = CompletionLogprobs()
    if first is not None:
        out.tokens.append(texts(first))
        out.token_logprobs.append(None)
        out.top_logprobs.append(None)
    for entry in scored:
        out.tokens.append(texts(entry.token))
        out.token_logprobs.append(entry.logprob)
        top: dict[str, float] = {}
        for token, logprob in (*entry.top, (entry.token, entry.logprob)):
            text = texts(token)  # tokens of one text (pieces of a character): the likeliest's
            top[text] = max(logprob, top.get(text, logprob))
        out.top_logprobs.append(top)
    for text in out.tokens:
        out.text_offset.append(offset)
        offset += len(text)
    return out


def chat_logprobs(texts: TokenTexts, scored: Sequence[TokenLogprob]) -> ChatLogprobs:
    """``scored`` tokens as chat completions list them."""

    def top(token: int, logprob: float) -> TopLogprob:
        text = texts(token)
        return TopLogprob(token=text, logprob=logprob, bytes=list(text.encode()))

    return ChatLogprobs(
        content=[
            ChatTokenLogprob(
                **top(entry.token, entry.logprob).model_dump(),
                top_logprobs=[top(token, logprob) for token, logprob in entry.top],
            )
            for entry in scored
        ]
    )
