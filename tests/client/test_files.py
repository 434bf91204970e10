"""Atomic writes: a write leaves the new file or the old one, never a mix or a stray temp file."""

from __future__ import annotations

import os
import stat
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path

import pytest

from data_owner_client import files as files_module
from data_owner_client.files import TMP_PREFIX, write_atomic

posix = pytest.mark.skipif(os.name != "posix", reason="POSIX permissions and directory fsync")


class Killed(BaseException):
    """A fault like a kill: not an Exception, so no ``except Exception`` swallows it."""


@contextmanager
def umask(mask: int) -> Iterator[None]:
    old = os.umask(mask)
    try:
        yield
    finally:
        os.umask(old)


def mode(path: Path) -> int:
    return stat.S_IMODE(path.stat().st_mode)


@posix
def test_a_written_file_gets_the_usual_permissions(tmp_path):
    """Like any file the user writes (umask applied), not private 0600 as mkstemp makes them."""
    target = tmp_path / "old.bin"
    target.write_bytes(b"old")
    target.chmod(0o600)
    with umask(0o022):
        write_atomic(target, b"new")
        write_atomic(tmp_path / "fresh.bin", b"fresh")
        (tmp_path / "plain.bin").write_bytes(b"plain")
    assert target.read_bytes() == b"new" and (tmp_path / "fresh.bin").read_bytes() == b"fresh"
    assert mode(target) == mode(tmp_path / "fresh.bin") == mode(tmp_path / "plain.bin") == 0o644
    assert sorted(p.name for p in tmp_path.iterdir()) == ["fresh.bin", "old.bin", "plain.bin"]


@pytest.mark.parametrize("fault", ["fsync", "replace"])
def test_a_failed_write_leaves_the_old_file_and_no_temp_file(tmp_path, monkeypatch, fault):
    target = tmp_path / "data.bin"
    target.write_bytes(b"old")
    temps: list[Path] = []

    def failing(*args: object) -> None:
        if fault == "replace":
            temps.append(Path(str(args[0])))
        raise Killed(f"injected fault in os.{fault}")

    monkeypatch.setattr(files_module.os, fault, failing)
    with pytest.raises(Killed):
        write_atomic(target, b"new")
    monkeypatch.undo()
    assert target.read_bytes() == b"old"
    assert [p.name for p in tmp_path.iterdir()] == ["data.bin"]
    assert len(temps) == (fault == "replace")
    # The temp file was beside the target under TMP_PREFIX, where a restarted build removes it.
    for temp in temps:
        assert temp.parent == tmp_path and temp.name.startswith(TMP_PREFIX)


@posix
def test_a_write_syncs_the_file_then_its_directory(tmp_path, monkeypatch):
    synced: list[int] = []
    fsync = os.fsync

    def recording(fd: int) -> None:
        synced.append(stat.S_IFMT(os.fstat(fd).st_mode))
        fsync(fd)

    monkeypatch.setattr(files_module.os, "fsync", recording)
    write_atomic(tmp_path / "data.bin", b"data")
    assert synced == [stat.S_IFREG, stat.S_IFDIR]
