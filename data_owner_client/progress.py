"""The rich progress bar of long client work: items done, and tokens per second."""

from __future__ import annotations

import time
from collections.abc import Callable, Iterator
from contextlib import contextmanager

from rich.progress import (
    BarColumn,
    MofNCompleteColumn,
    Progress,
    TextColumn,
    TimeElapsedColumn,
    TimeRemainingColumn,
)

Advance = Callable[[int, int], None]


@contextmanager
def progress_bar(
    label: str, unit: str, total: int, done: int = 0, enabled: bool = True
) -> Iterator[Advance]:
    """A bar over ``total`` ``unit`` (``done`` already); yields ``advance(items, tokens)``."""
    columns = (
        TextColumn(label),
        BarColumn(),
        MofNCompleteColumn(),
        TextColumn(unit + " {task.fields[speed]}"),
        TimeElapsedColumn(),
        TimeRemainingColumn(),
    )
    started, tokens_seen = time.monotonic(), 0
    with Progress(*columns, disable=not enabled) as bar:
        task = bar.add_task(label, total=total, completed=done, speed="")

        def advance(items: int, tokens: int) -> None:
            nonlocal tokens_seen
            tokens_seen += tokens
            rate = tokens_seen / max(time.monotonic() - started, 1e-9)
            bar.update(task, advance=items, speed=f"{rate:,.1f} tokens/s")

        yield advance


def stage_bar(enabled: bool) -> Progress:
    """The trainer's bar: stage and epoch, steps, time, and the last training and validation
    losses."""
    return Progress(
        TextColumn("{task.description}"),
        BarColumn(),
        MofNCompleteColumn(),
        TimeElapsedColumn(),
        TextColumn("{task.fields[loss]}"),
        TextColumn("{task.fields[val]}"),
        disable=not enabled,
    )
