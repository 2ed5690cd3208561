"""``keys.write_atomic``: mode from the start, atomic replace, when it fsyncs, and what
a failed fsync of the folder means."""
from __future__ import annotations

import errno
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


def _failing_folder_fsync(monkeypatch, code: int) -> list[int]:
    """fsync fails with ``code`` on directories (files sync for real); returns the
    descriptors it was given, to check they were closed."""
    real = os.fsync
    given = []

    def fsync(fd):
        if stat.S_ISDIR(os.fstat(fd).st_mode):
            given.append(fd)
            raise OSError(code, os.strerror(code))
        real(fd)

    monkeypatch.setattr(keys.os, "fsync", fsync)
    return given


@pytest.mark.parametrize("code", [errno.EIO, errno.ENOSPC, errno.EROFS], ids=errno.errorcode.get)
def test_a_failed_folder_fsync_is_an_error_not_a_durable_write(tmp_path, monkeypatch, code):
    """Issue 17 item 4: the key must not be reported safe when its rename may be lost."""
    target = tmp_path / "keys" / "key.priv"
    given = _failing_folder_fsync(monkeypatch, code)
    with pytest.raises(OSError) as ei:
        write_atomic(target, b"secret", 0o600)
    assert ei.value.errno == code
    assert str(target) in str(ei.value) and "may not survive a crash" in str(ei.value)
    assert os.strerror(code) in str(ei.value)
    assert isinstance(ei.value.__cause__, OSError)
    assert len(given) == 1
    with pytest.raises(OSError):               # the folder's descriptor was closed
        os.fstat(given[0])


@pytest.mark.parametrize("code", [errno.EINVAL, errno.ENOTSUP], ids=errno.errorcode.get)
def test_a_filesystem_that_cannot_sync_folders_is_let_pass(tmp_path, monkeypatch, code):
    target = tmp_path / "keys" / "key.priv"
    given = _failing_folder_fsync(monkeypatch, code)
    write_atomic(target, b"secret", 0o600)
    assert len(given) == 1                     # it was tried, and refused as unsupported
    assert target.read_bytes() == b"secret"
    assert stat.S_IMODE(target.stat().st_mode) == 0o600


def test_generate_keys_reports_a_failed_folder_fsync_clearly(tmp_path, monkeypatch):
    from click.testing import CliRunner

    from utesla_node.cli.admin import main
    _failing_folder_fsync(monkeypatch, errno.EIO)
    monkeypatch.chdir(tmp_path)
    r = CliRunner().invoke(main, ["generate_keys", "-out-public-key", "u.pub",
                                  "-out-private-key", "u.priv"])
    assert r.exit_code == 1, r.output
    assert r.stderr.startswith("error: u.priv was written but may not survive a crash: "
                               "syncing its folder . failed: Input/output error")
