"""Atomic file writes: every file the client stores (adapters, memories, checkpoints, output
files) is written to a temp file beside its target, flushed to disk and renamed over it, so a kill
at any moment leaves the old file or the new one, never a mix."""

from __future__ import annotations

import os
import secrets
from pathlib import Path

TMP_PREFIX = ".tmp-"  # temp files start with this; a restarted build removes its leftovers


def write_atomic(target: Path, data: bytes) -> None:
    """Write ``data`` to ``target`` atomically and durably (file and rename fsynced)."""
    # Not mkstemp: its files are private (0600); these get the usual umask permissions.
    tmp = target.parent / f"{TMP_PREFIX}{os.getpid()}-{secrets.token_hex(4)}-{target.name}"
    try:
        with tmp.open("xb") as f:
            f.write(data)
            f.flush()
            os.fsync(f.fileno())
        os.replace(tmp, target)
    except BaseException:
        tmp.unlink(missing_ok=True)
        raise
    fsync_dir(target.parent)


def fsync_dir(path: Path) -> None:
    """Make a rename in ``path`` durable (POSIX; Windows cannot open directories)."""
    if os.name != "posix":
        return
    fd = os.open(path, os.O_RDONLY)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)
