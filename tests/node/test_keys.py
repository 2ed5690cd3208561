"""``keys.write_atomic``: mode from the start, atomic replace, and when it fsyncs."""
from __future__ import annotations

import os
import stat

import pytest

from utesla_node import keys
from utesla_node.keys import write_atomic


@pytest.fixture
def fsyncs(monkeypatch):
    """Every fsync write_atomic makes, as (kind, what the target held at that moment)."""
    calls = []
    real = os.fsync

    def spy(fd):
        kind = "dir" if stat.S_ISDIR(os.fstat(fd).st_mode) else "file"
        calls.append((kind, spy.target.read_bytes() if spy.target.exists() else None))
        real(fd)

    monkeypatch.setattr(keys.os, "fsync", spy)
    spy.calls = calls
    return spy


def test_durable_write_fsyncs_the_file_before_the_rename_and_the_folder_after(tmp_path,
                                                                             fsyncs):
    target = fsyncs.target = tmp_path / "keys" / "key.priv"
    write_atomic(target, b"secret", 0o600)
    assert fsyncs.calls == [("file", None), ("dir", b"secret")]
    assert target.read_bytes() == b"secret"
    assert stat.S_IMODE(target.stat().st_mode) == 0o600


def test_non_durable_write_skips_fsync_and_still_replaces_atomically(tmp_path, fsyncs):
    target = fsyncs.target = tmp_path / "data" / "status.json"
    write_atomic(target, b'{"v": 1}', 0o644, durable=False)
    assert target.read_bytes() == b'{"v": 1}'
    assert stat.S_IMODE(target.stat().st_mode) == 0o644
    old_inode = target.stat().st_ino
    with open(target, "rb") as reader:                  # a reader of the old version
        write_atomic(target, b'{"v": 2}', 0o640, durable=False)
        assert reader.read() == b'{"v": 1}'             # renamed over, not rewritten in place
    assert target.read_bytes() == b'{"v": 2}'
    assert target.stat().st_ino != old_inode
    assert stat.S_IMODE(target.stat().st_mode) == 0o640  # the new file's mode, from the start
    assert fsyncs.calls == []
    assert sorted(p.name for p in target.parent.iterdir()) == ["status.json"]   # no temp left


def test_failed_write_leaves_the_old_file_and_no_temporary(tmp_path, monkeypatch):
    target = tmp_path / "status.json"
    write_atomic(target, b"old", 0o644, durable=False)

    def refuse(src, dst):
        raise OSError("replace refused")

    monkeypatch.setattr(keys.os, "replace", refuse)
    with pytest.raises(OSError, match="replace refused"):
        write_atomic(target, b"new", 0o644, durable=False)
    assert target.read_bytes() == b"old"
    assert [p.name for p in tmp_path.iterdir()] == ["status.json"]
