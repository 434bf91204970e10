"""Atomic file writes: the files the client stores whole (an adapter's two files, a memory's
shards and manifest, checkpoints, reports, an output file's record of its run) are written to a
temp file beside their target, flushed to disk and renamed over it, so a kill at any moment
leaves the old file or the new one, never a mix. (Logs and output records are appended instead.)"""

from __future__ import annotations

import errno
import os
import secrets
from pathlib import Path

TMP_PREFIX = ".tmp-"  # temp files start with this; a restarted memory build removes leftovers


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
    except OSError as exc:
        if exc.errno not in (errno.EINVAL, errno.ENOTSUP):  # file systems that cannot
            raise
    finally:
        os.close(fd)
