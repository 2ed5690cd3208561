"""Key files: atomic writes with mode 0600 for private keys, and loading with clear errors."""
from __future__ import annotations

import errno
import os
import tempfile
from pathlib import Path

from protocol.crypto import KeyFormatError, PrivateKey, PublicKey, WeakKeyError

from .errors import NodeError

__all__ = ["write_atomic", "write_key_pair", "load_private_key", "load_public_key",
           "ensure_node_keys", "KeyFileError"]


class KeyFileError(NodeError):
    """A key file is missing, unreadable, or not a usable key."""


def write_atomic(path: Path, data: bytes, mode: int, *, durable: bool = True) -> None:
    """Write ``data`` to ``path`` so that readers see the old file or the whole new one.

    The temporary file is created with ``mode`` from the start (never briefly
    world-readable), then renamed over the target.  With ``durable`` (the default) the
    file is fsynced before the rename and its directory after it, so once this returns
    the new content survives a crash or power loss: what private keys need.  If the
    folder cannot be synced, :class:`OSError` says so (the file is in place, but may not
    be after a crash); only a filesystem that cannot sync folders at all is let pass.

    ``durable=False`` skips both fsyncs, for a file rewritten often and worthless after a
    restart (``data/status.json``): readers still never see a partial file, but after a
    crash the file may hold older content (on some filesystems, none).
    """
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(prefix=f".{path.name}.", dir=path.parent)
    try:
        with os.fdopen(fd, "wb") as fh:     # owns fd from here: closed on any failure
            os.fchmod(fh.fileno(), mode)
            fh.write(data)
            if durable:
                fh.flush()
                os.fsync(fh.fileno())
        os.replace(tmp, path)
    except BaseException:
        try:
            os.unlink(tmp)
        except FileNotFoundError:
            pass
        raise
    if durable:
        _sync_folder(path)


#: What fsync of a directory fails with where the filesystem cannot sync directories at
#: all (some network and FUSE filesystems): no more durability to be had there.
_DIR_FSYNC_UNSUPPORTED = frozenset({errno.EINVAL, errno.ENOTSUP, errno.EOPNOTSUPP})


def _sync_folder(path: Path) -> None:
    """Make the rename of ``path`` durable by syncing its folder.

    A real failure (EIO, ENOSPC, ...) is raised: the file may be gone again after a
    crash, and whoever wrote a key must not be told it is safe.
    """
    try:
        dfd = os.open(path.parent, os.O_RDONLY)
        try:
            os.fsync(dfd)
        finally:
            os.close(dfd)
    except OSError as exc:
        if exc.errno in _DIR_FSYNC_UNSUPPORTED:
            return
        message = (f"{path} was written but may not survive a crash: syncing its folder "
                   f"{path.parent} failed: {exc.strerror or exc}")
        raise (OSError(exc.errno, message) if exc.errno else OSError(message)) from exc


def write_key_pair(key: PrivateKey, public_path: Path, private_path: Path) -> None:
    write_atomic(Path(private_path), key.to_pem().encode(), 0o600)
    write_atomic(Path(public_path), key.public.to_pem().encode(), 0o644)


def _read(path: Path, what: str) -> bytes:
    try:
        return Path(path).read_bytes()
    except FileNotFoundError:
        raise KeyFileError(f"{what} file not found: {path}") from None
    except OSError as exc:
        raise KeyFileError(f"cannot read {what} file {path}: {exc.strerror}") from None


def load_private_key(path: str | os.PathLike) -> PrivateKey:
    try:
        return PrivateKey.from_bytes(_read(Path(path), "private key"))
    except KeyFormatError as exc:
        raise KeyFileError(f"{path}: {exc}") from None


def load_public_key(path: str | os.PathLike) -> PublicKey:
    data = _read(Path(path), "public key")
    try:
        return PublicKey.from_bytes(data)
    except WeakKeyError as exc:
        raise KeyFileError(f"{path}: {exc}") from None
    except KeyFormatError:
        try:  # a private key file given where a public key is expected: use its public half
            PrivateKey.from_bytes(data)
        except KeyFormatError:
            pass
        else:
            raise KeyFileError(f"{path}: this is a private key; give the public key file") from None
        raise KeyFileError(f"{path}: not an Ed25519 or RSA public key (PEM)") from None


def ensure_node_keys(keys_dir: Path, key_type: str = "ed25519",
                     rsa_bits: int = 3072) -> tuple[PrivateKey, bool]:
    """Load ``keys/key.priv``, creating the pair on first start.  Returns (key, created)."""
    priv, pub = Path(keys_dir) / "key.priv", Path(keys_dir) / "key.pub"
    if priv.exists():
        key = load_private_key(priv)
        if not pub.exists() or load_public_key(pub) != key.public:
            write_atomic(pub, key.public.to_pem().encode(), 0o644)
        return key, False
    Path(keys_dir).mkdir(parents=True, exist_ok=True, mode=0o700)
    key = PrivateKey.generate(key_type, rsa_bits)
    write_key_pair(key, pub, priv)
    return key, True
