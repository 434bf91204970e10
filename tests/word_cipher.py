"""A word cipher the tiny random PLMs cannot do, as (source, target) rows for the client's CLI.

Sources are words from the band w5..w12; the target continues from the last source word with words
from the next bands (w13..w20, then w21..w28, ...), each a fixed permutation of the word before it.
"""

from __future__ import annotations

import json
from pathlib import Path

import torch

FIRST, WIDTH, TARGET_WORDS = 5, 8, 2


def cipher(word: int) -> int:
    """The word after ``word``: the next band of WIDTH words, permuted."""
    band, offset = divmod(word - FIRST, WIDTH)
    return FIRST + (band + 1) * WIDTH + (7 * offset + 3) % WIDTH


def cipher_rows(
    n: int, seed: int = 0, source_words: int = 1, target_words: int = TARGET_WORDS
) -> list[dict[str, str]]:
    """Rows ``{"src": "w<a> ... w<z>", "tgt": "w<c(z)> w<c(c(z))> ..."}``: 1..source_words words
    in, target_words out."""
    generator = torch.Generator().manual_seed(seed)
    rows = []
    for _ in range(n):
        length = int(torch.randint(1, source_words + 1, (1,), generator=generator))
        source = torch.randint(FIRST, FIRST + WIDTH, (length,), generator=generator).tolist()
        chain = [source[-1]]
        for _ in range(target_words):
            chain.append(cipher(chain[-1]))
        rows.append(
            {"src": " ".join(f"w{w}" for w in source), "tgt": " ".join(f"w{w}" for w in chain[1:])}
        )
    return rows


def write_jsonl(path: Path, rows: list[dict[str, str]]) -> Path:
    path.write_text("".join(json.dumps(row) + "\n" for row in rows))
    return path
