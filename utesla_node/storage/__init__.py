"""Persistence for users, tokens and peers, behind one interface with two backends.

``open_storage(url, data_dir)`` picks the backend from the ``[database] url`` setting:

==========================================================  =====================================
``None`` or ``""``                                          SQLite at ``<data_dir>/utesla.db``
``sqlite:///abs/path.db``                                    SQLite at an absolute path
``sqlite:relative.db``                                       SQLite relative to the working dir
``sqlite::memory:``                                          throw-away in-memory SQLite
``mysql://user:password@host:port/db?opt=...``               MariaDB (``mariadb://`` also works)
==========================================================  =====================================

MariaDB query options: ``ssl`` (true/false: TLS with the system CAs), ``ssl_ca``, ``ssl_cert``,
``ssl_key``, ``ssl_verify`` (true/false), ``pool_size`` (connections, default 10),
``connect_timeout`` (seconds).  A URL without a password takes it from the environment variable
``UTESLA_DB_PASSWORD``, so the secret need not sit in ``node.ini``.  Log URLs only through
:func:`redact_url`.
"""
from __future__ import annotations

import os
from pathlib import Path
from typing import Any
from urllib.parse import parse_qsl, unquote, urlsplit, urlunsplit

from .base import (
    MAX_NAME_LEN, MAX_URL_LEN, SCHEMA_VERSION, AlreadyExists, NoSuchEntry, Peer, SchemaTooNew,
    Storage, StorageError, StorageUnavailable, Token, TokenLimitReached, User,
)
from .sqlite import SQLiteStorage

__all__ = [
    "open_storage", "redact_url", "Storage", "SQLiteStorage", "MariaDBStorage",
    "User", "Token", "Peer", "SCHEMA_VERSION", "MAX_NAME_LEN", "MAX_URL_LEN",
    "StorageError", "StorageUnavailable", "AlreadyExists", "NoSuchEntry", "TokenLimitReached",
    "SchemaTooNew", "PASSWORD_ENV",
]

#: Environment variable consulted when a MariaDB URL carries no password.
PASSWORD_ENV = "UTESLA_DB_PASSWORD"

_DB_FILE = "utesla.db"
_MYSQL_SCHEMES = ("mysql", "mariadb")
_TRUE = {"1", "true", "yes", "on"}
_FALSE = {"0", "false", "no", "off"}


def __getattr__(name: str) -> Any:
    # aiomysql is only imported by nodes that use MariaDB: key generation and SQLite-only nodes
    # do not pay for it (and do not need it installed correctly).
    if name == "MariaDBStorage":
        from .mariadb import MariaDBStorage

        return MariaDBStorage
    raise AttributeError(f"module {__name__!r} has no attribute {name!r}")


def open_storage(url: str | None, data_dir: str | os.PathLike[str], **opts: Any) -> Storage:
    """Build the storage named by ``url`` (see the module doc).  It is returned *unopened*.

    ``opts`` go to the backend's constructor and win over options in the URL (for example
    ``busy_timeout_ms`` for SQLite, ``pool_size`` for MariaDB).  Raises ``ValueError`` for a URL
    that cannot be understood.
    """
    if url is None or not url.strip():
        directory = Path(data_dir)
        if not directory.exists():
            directory.mkdir(parents=True, mode=0o700)
            os.chmod(directory, 0o700)  # mkdir's mode is filtered by the umask
        return SQLiteStorage(directory / _DB_FILE, **opts)

    url = url.strip()
    scheme, sep, _ = url.partition(":")
    scheme = scheme.lower()
    if not sep:
        raise ValueError(
            f"database url {redact_url(url)!r} has no scheme; expected sqlite: or mysql://"
        )
    if scheme == "sqlite":
        return SQLiteStorage(_sqlite_path(url), **opts)
    if scheme in _MYSQL_SCHEMES:
        from .mariadb import MariaDBStorage

        kwargs = _mysql_kwargs(url)
        kwargs.update(opts)
        return MariaDBStorage(**kwargs)
    raise ValueError(
        f"unsupported database url {redact_url(url)!r}: expected sqlite:///path.db, "
        "sqlite:relative.db or mysql://user:password@host:port/dbname"
    )


def _sqlite_path(url: str) -> str:
    rest = url[len("sqlite:"):]
    if rest == ":memory:":
        return rest
    if rest.startswith("//"):
        # sqlite:///abs/path.db: empty authority, absolute path.  Anything between the slashes
        # would be a host, which means nothing for a local file.
        parts = urlsplit(url)
        if parts.netloc:
            raise ValueError(f"sqlite url {url!r} names a host; use sqlite:///absolute/path.db")
        if parts.query or parts.fragment:
            raise ValueError(f"sqlite url {url!r} takes no query or fragment")
        path = unquote(parts.path)
    else:
        path = unquote(rest)
    if not path or path.endswith("/"):
        raise ValueError(f"sqlite url {url!r} names no database file")
    return str(Path(path).expanduser().absolute())


def _parse_bool(name: str, value: str) -> bool:
    lowered = value.lower()
    if lowered in _TRUE:
        return True
    if lowered in _FALSE:
        return False
    raise ValueError(f"database url option {name}={value!r} must be true or false")


def _mysql_kwargs(url: str) -> dict[str, Any]:
    try:
        parts = urlsplit(url)
        port = parts.port or 3306
    except ValueError as exc:
        raise ValueError(f"invalid database url {redact_url(url)!r}: {exc}") from exc
    if not parts.hostname:
        raise ValueError(f"database url {redact_url(url)!r} names no host")
    if not parts.username:
        raise ValueError(f"database url {redact_url(url)!r} names no user")
    database = unquote(parts.path.lstrip("/"))
    if not database or "/" in database:
        raise ValueError(f"database url {redact_url(url)!r} must name one database: .../dbname")
    if parts.fragment:
        raise ValueError(f"database url {redact_url(url)!r} takes no fragment")

    password = unquote(parts.password) if parts.password is not None else None
    if password is None:
        password = os.environ.get(PASSWORD_ENV, "")
    kwargs: dict[str, Any] = {
        "host": parts.hostname,
        "port": port,
        "user": unquote(parts.username),
        "password": password,
        "database": database,
    }
    try:
        query = parse_qsl(parts.query, keep_blank_values=True, strict_parsing=bool(parts.query))
    except ValueError as exc:
        raise ValueError(f"database url {redact_url(url)!r} has a malformed query: {exc}") from exc
    for name, value in query:
        if name in kwargs and name not in ("host", "port", "user", "password", "database"):
            raise ValueError(f"database url option {name} is given twice")
        if name in ("ssl_ca", "ssl_cert", "ssl_key"):
            if not value:
                raise ValueError(f"database url option {name} needs a file name")
            kwargs[name] = value
        elif name == "ssl_verify":
            kwargs[name] = _parse_bool(name, value)
        elif name in ("ssl", "tls"):
            kwargs["tls"] = _parse_bool(name, value)
        elif name == "pool_size":
            if not value.isdigit() or not 1 <= int(value) <= 1000:
                raise ValueError(f"database url option pool_size={value!r} must be 1..1000")
            kwargs[name] = int(value)
        elif name == "connect_timeout":
            try:
                timeout = float(value)
            except ValueError:
                timeout = -1.0
            if not 0 < timeout <= 3600:
                raise ValueError(f"database url option connect_timeout={value!r} must be 0..3600 s")
            kwargs[name] = timeout
        else:
            raise ValueError(
                f"unknown database url option {name!r} (known: ssl, ssl_ca, ssl_cert, ssl_key, "
                "ssl_verify, pool_size, connect_timeout)"
            )
    return kwargs


def redact_url(url: str | None) -> str:
    """``url`` with any password replaced by ``***``, safe to log or print."""
    if not url:
        return ""
    try:
        parts = urlsplit(url)
        if parts.password is None:
            return url
        host = parts.netloc.rpartition("@")[2]
        user = parts.netloc.rpartition("@")[0].partition(":")[0]
        return urlunsplit(parts._replace(netloc=f"{user}:***@{host}"))
    except ValueError:
        # Unparseable: assume the worst and hide everything that might be credentials.
        scheme, sep, rest = url.partition("://")
        if "@" in rest:
            return f"{scheme}{sep}***@{rest.rpartition('@')[2]}"
        return url
