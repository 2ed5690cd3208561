"""Node configuration: one documented dataclass, loaded once from ``node.ini``.

Every key of ``node.ini`` is a field below, in a table of (section, key, field,
parser).  Unknown sections or keys and bad values are errors that name the
file, the section and the key, so a typo never silently falls back to a default.
"""
from __future__ import annotations

import configparser
import dataclasses
import math
import os
from dataclasses import dataclass, field
from pathlib import Path
from urllib.parse import quote, unquote

from .errors import NodeError

__all__ = ["NodeConfig", "ConfigError", "load_config", "find_config"]


class ConfigError(NodeError, ValueError):
    """A configuration problem, with the file, section and key it concerns."""


@dataclass
class NodeConfig:
    """Everything a node needs to run.  Paths are resolved against ``base_dir``."""

    #: Address to listen on.  127.0.0.1 by default: exposing a node is a decision.
    host: str = "127.0.0.1"
    #: TCP port (0 = any free port; the node prints the one it got).
    port: int = 17000
    #: Folder of service modules (``complements/NAME.py``).
    services: Path = Path("complements")
    #: Folder holding the node's ``key.pub`` and ``key.priv``.
    keys: Path = Path("keys")
    #: Folder for the SQLite database and other state.
    data: Path = Path("data")
    #: Folder served by the example file-share service (complements/files.py).
    share: Path = Path("share")
    #: Bytes the files in ``share`` may take together; an upload that would pass it is
    #: refused with 507 as its body arrives (0 = no limit).
    share_quota: int = 1 << 30
    #: Database URL: empty = SQLite in ``data``; ``mysql://user:pass@host:port/db``.
    database_url: str = ""
    #: Connection pool size for MariaDB.
    database_pool_size: int = 10
    #: "ed25519" or "rsa": the type of key the node generates on first start
    #: (a node.ini giving ``rsa_key_length`` without ``key_type`` means rsa).
    key_type: str = "ed25519"
    #: RSA size in bits when ``key_type = rsa`` (2048..8192).
    rsa_key_length: int = 3072
    #: Token lifetime in seconds (default 7 days).
    token_expire: float = 7 * 86400.0
    #: Open connections in total, and per client address.
    max_connections: int = 10000
    max_connections_per_ip: int = 1000
    #: Seconds a client has to complete the handshake.
    handshake_timeout: float = 10.0
    #: Seconds of silence after which an established connection is closed.
    idle_timeout: float = 300.0
    #: Seconds a request may run before it is cancelled (status 408).
    request_timeout: float = 30.0
    #: Largest record accepted, bytes.
    max_record: int = 1 << 20
    #: Largest request body a handler may read whole with ``await self.body.read()``.
    max_body: int = 64 << 20
    #: Initial flow-control window per stream, bytes.
    stream_window: int = 256 * 1024
    #: Concurrent requests per connection.
    max_streams: int = 256
    #: Stop reading from a client once this many bytes wait in its write buffer.
    write_high_water: int = 1 << 20
    #: Seconds in-flight requests get to finish on SIGTERM / Ctrl-C.
    grace_period: float = 10.0
    #: Seconds a validated token is trusted by a session before it is checked again.
    token_cache_ttl: float = 2.0
    #: While the database is unreachable, a token (or user key) verified less than
    #: ``token_cache_ttl`` + this many seconds ago keeps working (a revocation made
    #: elsewhere during the outage is seen when the database returns).  0: none.
    token_outage_grace: float = 300.0
    #: Seconds between two checks that the users of open connections still exist with the
    #: key they authenticated with; the connections of a removed user or a changed key are
    #: closed (CLOSE 401) within this.  0: never (they stay open until they close).
    credential_check_interval: float = 0.5
    #: Failed password attempts (``/_node/token``) per user, and per client address, within
    #: ``password_failure_window`` seconds before further attempts are refused (429) for
    #: ``password_backoff`` seconds, doubling with each lockout up to ``password_backoff_max``.
    max_password_failures: int = 5
    max_password_failures_per_ip: int = 20
    password_failure_window: float = 300.0
    password_backoff: float = 30.0
    password_backoff_max: float = 900.0
    #: Gossip interval and link heartbeat, seconds.
    gossip_interval: float = 1.0
    heartbeat_interval: float = 5.0
    #: Largest number of hops a forwarded request may take.
    max_hops: int = 8
    #: Routes kept per peer link (the best by hops, then name); each peer is told, and
    #: sends no more.
    max_routes_per_link: int = 10000
    #: Longest wait, seconds, between renewals of this node's tokens at its peers (each
    #: link renews on connecting, then at half the token's remaining life, at most this).
    token_renew_interval: float = 21600.0
    #: logging level and format ("text" or "json").
    log_level: str = "INFO"
    log_format: str = "text"
    #: Lines of one kind (logger, level and message template) written per
    #: ``log_repeat_interval`` seconds; the rest are counted in one "N similar lines
    #: suppressed" line (0 = no limit).  Successful requests are always logged.
    log_repeat_limit: int = 20
    log_repeat_interval: float = 60.0
    #: ``host:port`` for Prometheus metrics over plain HTTP; empty = off.
    metrics_listen: str = ""
    #: Remote services (routes) that get a metrics label of their own; requests for
    #: the others are counted under ``service="_other"``.
    metrics_max_remote_services: int = 100
    #: The folder relative paths are resolved against, and the file read (if any).
    base_dir: Path = field(default_factory=Path.cwd)
    source: Path | None = None

    def path(self, p: Path) -> Path:
        return p if p.is_absolute() else self.base_dir / p

    @property
    def services_dir(self) -> Path:
        return self.path(self.services)

    @property
    def keys_dir(self) -> Path:
        return self.path(self.keys)

    @property
    def data_dir(self) -> Path:
        return self.path(self.data)

    @property
    def share_dir(self) -> Path:
        return self.path(self.share)


def _bounded_int(lo: int, hi: int):
    def parse(text: str) -> int:
        v = int(text)
        if not lo <= v <= hi:
            raise ValueError(f"must be between {lo} and {hi}")
        return v
    return parse


def _positive_float(text: str) -> float:
    v = float(text)
    if not (v > 0 and math.isfinite(v)):
        raise ValueError("must be a positive number")
    return v


def _non_negative_float(text: str) -> float:
    v = float(text)
    if not (v >= 0 and math.isfinite(v)):
        raise ValueError("must be a number >= 0")
    return v


def _choice(*options: str):
    def parse(text: str) -> str:
        v = text.strip().lower()
        if v not in options:
            raise ValueError(f"must be one of {', '.join(options)}")
        return v
    return parse


def _level(text: str) -> str:
    v = text.strip().upper()
    if v not in ("DEBUG", "INFO", "WARNING", "ERROR", "CRITICAL"):
        raise ValueError("must be DEBUG, INFO, WARNING, ERROR or CRITICAL")
    return v


def _str(text: str) -> str:
    return text.strip()


def _path(text: str) -> Path:
    if not text.strip():
        raise ValueError("must not be empty")
    return Path(text.strip()).expanduser()


def _listen(text: str) -> str:
    text = text.strip()
    if text:
        host, sep, port = text.rpartition(":")
        if not sep or not host or not port.isdigit() or not 0 <= int(port) <= 65535:
            raise ValueError("must be host:port")
    return text


# (section, key) -> (field, parser).  Section names are matched case-insensitively.
_KEYS: dict[tuple[str, str], tuple[str, object]] = {
    ("server", "host"): ("host", _str),
    ("server", "port"): ("port", _bounded_int(0, 65535)),
    ("server", "services"): ("services", _path),
    ("server", "keys"): ("keys", _path),
    ("server", "data"): ("data", _path),
    ("server", "share"): ("share", _path),
    ("server", "share_quota"): ("share_quota", _bounded_int(0, 1 << 50)),
    ("server", "max_connections"): ("max_connections", _bounded_int(1, 1_000_000)),
    ("server", "max_connections_per_ip"): ("max_connections_per_ip", _bounded_int(1, 1_000_000)),
    ("server", "handshake_timeout"): ("handshake_timeout", _positive_float),
    ("server", "idle_timeout"): ("idle_timeout", _positive_float),
    ("server", "request_timeout"): ("request_timeout", _positive_float),
    ("server", "max_record"): ("max_record", _bounded_int(16384, 16 << 20)),
    ("server", "max_body"): ("max_body", _bounded_int(0, 1 << 40)),
    ("server", "stream_window"): ("stream_window", _bounded_int(65536, (1 << 31) - 1)),
    ("server", "max_streams"): ("max_streams", _bounded_int(16, 65536)),
    ("server", "write_high_water"): ("write_high_water", _bounded_int(65536, 1 << 30)),
    ("server", "grace_period"): ("grace_period", _positive_float),
    ("server", "token_cache_ttl"): ("token_cache_ttl", _non_negative_float),
    ("server", "token_outage_grace"): ("token_outage_grace", _non_negative_float),
    ("server", "credential_check_interval"): ("credential_check_interval",
                                              _non_negative_float),
    ("server", "max_password_failures"): ("max_password_failures", _bounded_int(1, 1_000_000)),
    ("server", "max_password_failures_per_ip"): ("max_password_failures_per_ip",
                                                 _bounded_int(1, 1_000_000)),
    ("server", "password_failure_window"): ("password_failure_window", _positive_float),
    ("server", "password_backoff"): ("password_backoff", _positive_float),
    ("server", "password_backoff_max"): ("password_backoff_max", _positive_float),
    ("database", "url"): ("database_url", _str),
    ("database", "pool_size"): ("database_pool_size", _bounded_int(1, 1000)),
    ("crypt limits", "key_type"): ("key_type", _choice("ed25519", "rsa")),
    ("crypt limits", "rsa_key_length"): ("rsa_key_length", _bounded_int(2048, 8192)),
    ("crypt limits", "token_expire"): ("token_expire", _positive_float),
    ("network", "gossip_interval"): ("gossip_interval", _positive_float),
    ("network", "heartbeat_interval"): ("heartbeat_interval", _positive_float),
    ("network", "max_hops"): ("max_hops", _bounded_int(1, 64)),
    ("network", "max_routes_per_link"): ("max_routes_per_link", _bounded_int(1, 1_000_000)),
    ("network", "token_renew_interval"): ("token_renew_interval", _positive_float),
    ("logging", "level"): ("log_level", _level),
    ("logging", "format"): ("log_format", _choice("text", "json")),
    ("logging", "repeat_limit"): ("log_repeat_limit", _bounded_int(0, 1_000_000)),
    ("logging", "repeat_interval"): ("log_repeat_interval", _positive_float),
    ("metrics", "listen"): ("metrics_listen", _listen),
    ("metrics", "max_remote_services"): ("metrics_max_remote_services",
                                         _bounded_int(0, 10_000)),
}
_SECTIONS = {s for s, _ in _KEYS}


def _ini_problem(exc: Exception) -> str:
    """configparser's multi-line messages as one line naming the section and key."""
    if isinstance(exc, configparser.DuplicateOptionError):
        return f"[{exc.section}] {exc.option}: set twice (line {exc.lineno})"
    if isinstance(exc, configparser.DuplicateSectionError):
        return f"[{exc.section}]: section appears twice (line {exc.lineno})"
    if isinstance(exc, configparser.MissingSectionHeaderError):
        return f"line {exc.lineno}: {exc.line.strip()!r} is outside any [section]"
    if isinstance(exc, configparser.ParsingError):
        lines = ", ".join(f"line {n}: {text}" for n, text in exc.errors[:3])
        return f"not a valid INI file ({lines})"
    return "not a valid INI file: " + " ".join(str(exc).split())


def _anchor_sqlite(url: str, base_dir: Path) -> str:
    """``sqlite:rel/path.db`` in a node.ini means relative to that file, like every path.

    (Left alone, it was relative to the working directory: ``utesla-cli add --config
    /etc/utesla/node.ini`` run elsewhere would have written to another database.)
    """
    if not url.lower().startswith("sqlite:"):
        return url
    rest = url[len("sqlite:"):]
    if rest == ":memory:" or rest.startswith("/") or not rest:
        return url
    return "sqlite://" + quote(str((base_dir / unquote(rest)).resolve()))


def find_config(explicit: str | os.PathLike | None) -> Path | None:
    """``--config FILE`` if given, else ``./node.ini`` if present, else None (defaults)."""
    if explicit:
        return Path(explicit)
    local = Path("node.ini")
    return local if local.is_file() else None


def load_config(path: str | os.PathLike | None = None, **overrides) -> NodeConfig:
    """Read ``path`` (or use the defaults when None) and apply keyword overrides."""
    cfg = NodeConfig()
    if path is not None:
        path = Path(path)
        parser = configparser.ConfigParser(interpolation=None, strict=True)
        try:
            with open(path, encoding="utf-8") as fh:
                parser.read_file(fh)
        except FileNotFoundError:
            raise ConfigError(f"{path}: configuration file not found") from None
        except (configparser.Error, UnicodeDecodeError) as exc:
            raise ConfigError(f"{path}: {_ini_problem(exc)}") from None
        seen: set[tuple[str, str]] = set()
        for section in parser.sections():
            name = section.strip().lower()
            if name not in _SECTIONS:
                raise ConfigError(f"{path}: unknown section [{section}] "
                                  f"(known: {', '.join(sorted(_SECTIONS))})")
            for key, value in parser.items(section):
                entry = _KEYS.get((name, key.lower()))
                if entry is None:
                    known = sorted(k for s, k in _KEYS if s == name)
                    raise ConfigError(f"{path}: [{section}] unknown key {key!r} "
                                      f"(known: {', '.join(known)})")
                fname, parse = entry
                try:
                    setattr(cfg, fname, parse(value))
                except ValueError as exc:
                    raise ConfigError(f"{path}: [{section}] {key} = {value!r}: {exc}") from None
                seen.add((name, key.lower()))
        if cfg.password_backoff_max < cfg.password_backoff:
            raise ConfigError(f"{path}: [server] password_backoff_max = "
                              f"{cfg.password_backoff_max:g} is less than password_backoff = "
                              f"{cfg.password_backoff:g}")
        if ("crypt limits", "rsa_key_length") in seen and ("crypt limits", "key_type") not in seen:
            # The original's node.ini sized the node's RSA key with rsa_key_length alone:
            # giving a size asks for RSA, as -bit_size does for generate_keys.
            cfg.key_type = "rsa"
        cfg.base_dir = path.resolve().parent
        cfg.source = path
        cfg.database_url = _anchor_sqlite(cfg.database_url, cfg.base_dir)
    for key, value in overrides.items():
        if value is not None:
            if key not in {f.name for f in dataclasses.fields(cfg)}:
                raise ConfigError(f"unknown setting {key!r}")
            setattr(cfg, key, value)
    return cfg
