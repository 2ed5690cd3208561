"""Node configuration: one documented dataclass, resolved once from its sources.

Every key of ``node.ini`` is a field below, in a table of (section, key, field,
parser).  Unknown sections or keys and bad values are errors that name the
file, the section and the key, so a typo never silently falls back to a default.

Sources, strongest first (a setting takes its value from the first that has it):

1. command-line flags (``utesla-node --port``; the keyword overrides of
   :func:`load_config`);
2. the environment: ``UTESLA_<SECTION>_<KEY>``, the section's spaces as ``_``
   (``UTESLA_SERVER_PORT=17005``, ``UTESLA_CRYPT_LIMITS_KEY_TYPE=rsa``), so
   containers and systemd units can set what they must without a file;
3. ``node.ini``;
4. the defaults below.

Secrets need not be written in either: ``[database] url_file`` and ``[network]
proxy_file`` (``UTESLA_DATABASE_URL_FILE``, ``UTESLA_NETWORK_PROXY_FILE``) name a file
holding the value (a Docker or systemd credential).  Relative paths, wherever they are
given, are relative to node.ini's folder (the working directory without one).  A
``UTESLA_`` variable that starts like a setting (``UTESLA_SERVER_...``) or is spelt nearly
like one, but names none, is a warning in :attr:`NodeConfig.warnings`, not an error: the
environment is shared with other programs.  ``UTESLA_DB_PASSWORD`` (the MariaDB password when the URL has
none) and ``UTESLA_PROXY`` (utesla-cli's ``--proxy``) are read where they are used.
"""
from __future__ import annotations

import configparser
import dataclasses
import difflib
import math
import os
from collections.abc import Mapping
from dataclasses import dataclass, field
from pathlib import Path
from urllib.parse import quote, unquote

from .errors import NodeError
from .proxy import parse_proxy

__all__ = ["NodeConfig", "ConfigError", "load_config", "find_config", "env_name",
           "ENV_PREFIX", "SECRET_FILE_MAX"]

#: Environment variables that set a node.ini key start with this.
ENV_PREFIX = "UTESLA_"
#: Largest secret file read for a ``*_file`` key, bytes (it holds one line).
SECRET_FILE_MAX = 65536


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
    #: SOCKS5 proxy for the node's links to its peers: ``socks5h://[user:pass@]host:port``
    #: (the proxy resolves names: onion names work) or ``socks5://``; empty = direct.
    #: A peer added with ``add_network --proxy`` uses its own instead.
    proxy: str = ""
    #: Threads for ``await self.run_in_thread(...)`` in services (blocking I/O).
    worker_threads: int = 16
    #: Processes for ``await self.run_in_process(...)`` (CPU-heavy work); started on
    #: first use; 0 = none (run_in_process fails).  Default: the number of CPUs.
    worker_processes: int = field(default_factory=lambda: os.cpu_count() or 1)
    #: A handler that holds the event loop longer than this many seconds is logged (with
    #: its service and how long); 0 = the loop is not watched.
    loop_block_threshold: float = 0.1
    #: The folder relative paths are resolved against, and the file read (if any).
    base_dir: Path = field(default_factory=Path.cwd)
    source: Path | None = None
    #: What the sources said that is not an error (unknown ``UTESLA_`` variables): the
    #: node logs these at start, utesla-cli prints them.
    warnings: list[str] = field(default_factory=list)

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


def _proxy(text: str) -> str:
    text = text.strip()
    parse_proxy(text)           # ValueError (without the password) when it is not one
    return text


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
    ("network", "proxy"): ("proxy", _proxy),
    ("server", "worker_threads"): ("worker_threads", _bounded_int(1, 1024)),
    ("server", "worker_processes"): ("worker_processes", _bounded_int(0, 1024)),
    ("server", "loop_block_threshold"): ("loop_block_threshold", _non_negative_float),
    ("logging", "level"): ("log_level", _level),
    ("logging", "format"): ("log_format", _choice("text", "json")),
    ("logging", "repeat_limit"): ("log_repeat_limit", _bounded_int(0, 1_000_000)),
    ("logging", "repeat_interval"): ("log_repeat_interval", _positive_float),
    ("metrics", "listen"): ("metrics_listen", _listen),
    ("metrics", "max_remote_services"): ("metrics_max_remote_services",
                                         _bounded_int(0, 10_000)),
}
_SECTIONS = {s for s, _ in _KEYS}
#: Keys whose value is a secret: ``KEY_file = PATH`` reads it from a file instead.
_SECRETS = {("database", "url"), ("network", "proxy")}
_FILE_SUFFIX = "_file"


def env_name(section: str, key: str) -> str:
    """The environment variable for a node.ini key: ``UTESLA_SERVER_PORT``."""
    return f"{ENV_PREFIX}{section.upper().replace(' ', '_')}_{key.upper()}"


#: UTESLA_<SECTION>_<KEY> -> (section, key), the ``_file`` forms of the secrets included.
_ENV: dict[str, tuple[str, str]] = {
    env_name(s, k): (s, k)
    for s, k in [*_KEYS, *((s, k + _FILE_SUFFIX) for s, k in _SECRETS)]}
assert len(_ENV) == len(_KEYS) + len(_SECRETS), "two settings share an environment name"
_ENV_SECTIONS = tuple(f"{ENV_PREFIX}{s.upper().replace(' ', '_')}_" for s in _SECTIONS)


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


class _Value:
    """One setting as a source gave it: the text, and where it came from (for messages)."""

    __slots__ = ("text", "where")

    def __init__(self, text: str, where: str):
        self.text, self.where = text, where


def load_config(path: str | os.PathLike | None = None, *,
                environ: Mapping[str, str] | None = None,
                **overrides) -> NodeConfig:
    """The configuration from ``path`` (None: no file), the environment (``environ``,
    default ``os.environ``) and keyword overrides (the flags), strongest last applied;
    see the module docstring for the order and the names."""
    cfg = NodeConfig()
    environ = os.environ if environ is None else environ
    if path is not None:
        path = Path(path)
        cfg.base_dir = path.resolve().parent
        cfg.source = path
    ini = _read_ini(path, cfg.base_dir) if path is not None else {}
    env = _read_env(environ, cfg.base_dir, cfg.warnings)
    seen: set[tuple[str, str]] = set()
    for layer in (ini, env):
        for (section, key), value in layer.items():
            fname, parse = _KEYS[(section, key)]
            try:
                setattr(cfg, fname, parse(value.text))
            except ValueError as exc:
                shown = value.text if (section, key) not in _SECRETS else "(secret)"
                raise ConfigError(f"{value.where} = {shown!r}: {exc}") from None
            seen.add((section, key))
    if ("crypt limits", "rsa_key_length") in seen and ("crypt limits", "key_type") not in seen:
        # The original's node.ini sized the node's RSA key with rsa_key_length alone:
        # giving a size asks for RSA, as -bit_size does for generate_keys.
        cfg.key_type = "rsa"
    if cfg.password_backoff_max < cfg.password_backoff:
        raise ConfigError(f"{path or 'configuration'}: [server] password_backoff_max = "
                          f"{cfg.password_backoff_max:g} is less than password_backoff = "
                          f"{cfg.password_backoff:g}")
    if ("database", "url") in seen:
        cfg.database_url = _anchor_sqlite(cfg.database_url, cfg.base_dir)
    for key, value in overrides.items():
        if value is not None:
            if key not in {f.name for f in dataclasses.fields(cfg)}:
                raise ConfigError(f"unknown setting {key!r}")
            setattr(cfg, key, value)
    return cfg


def _read_ini(path: Path, base: Path) -> dict[tuple[str, str], _Value]:
    """node.ini's settings by (section, key); ConfigError naming file, section and key."""
    parser = configparser.ConfigParser(interpolation=None, strict=True)
    try:
        with open(path, encoding="utf-8") as fh:
            parser.read_file(fh)
    except FileNotFoundError:
        raise ConfigError(f"{path}: configuration file not found") from None
    except (configparser.Error, UnicodeDecodeError) as exc:
        raise ConfigError(f"{path}: {_ini_problem(exc)}") from None
    found: dict[tuple[str, str], _Value] = {}
    for section in parser.sections():
        name = section.strip().lower()
        if name not in _SECTIONS:
            raise ConfigError(f"{path}: unknown section [{section}] "
                              f"(known: {', '.join(sorted(_SECTIONS))})")
        for key, text in parser.items(section):
            where = f"{path}: [{section}] {key}"
            _put(found, (name, key.lower()), text, where, base,
                 lambda: ", ".join(sorted(k for s, k in _KEYS if s == name)), where)
    return found


def _read_env(environ, base: Path, warnings: list[str]) -> dict[tuple[str, str], _Value]:
    """The ``UTESLA_<SECTION>_<KEY>`` settings; unknown ones that look like settings are
    added to ``warnings`` (with the nearest real name)."""
    found: dict[tuple[str, str], _Value] = {}
    for var in sorted(environ):
        if not var.startswith(ENV_PREFIX):
            continue
        entry = _ENV.get(var)
        if entry is None:
            # It looks like a setting when it starts like one (UTESLA_SERVER_...) or is
            # spelt nearly like one (UTESLA_DATABSE_URL); other UTESLA_ names
            # (UTESLA_DB_PASSWORD, UTESLA_PROXY, a test's) are someone else's.
            near = difflib.get_close_matches(var, list(_ENV), n=1, cutoff=0.6)
            if var.startswith(_ENV_SECTIONS) or difflib.get_close_matches(
                    var, list(_ENV), n=1, cutoff=0.85):
                hint = f" (did you mean {near[0]}?)" if near else ""
                warnings.append(f"environment variable {var} is not a setting and is "
                                f"ignored{hint}")
            continue
        _put(found, entry, environ[var], f"environment variable {var}", base, None, var)
    return found


def _put(found: dict, entry: tuple[str, str], text: str, where: str, base: Path,
         known, label: str) -> None:
    """Record one setting of one source: a ``*_file`` key of a secret is read now and
    recorded as the secret itself; a secret given both ways in one source is an error."""
    section, key = entry
    if key.endswith(_FILE_SUFFIX) and (section, key[:-len(_FILE_SUFFIX)]) in _SECRETS:
        entry = (section, key[:-len(_FILE_SUFFIX)])
        text = _read_secret_file(text, base, where)
    elif entry not in _KEYS:
        raise ConfigError(f"{where}: unknown key (known: {known()})")
    if entry in found:
        raise ConfigError(f"{where}: [{entry[0]}] {entry[1]} is given twice in one place "
                          f"(as {found[entry].where.rpartition(' ')[2]} and {label}); "
                          f"keep one")
    found[entry] = _Value(text, where)


def _read_secret_file(name: str, base: Path, where: str) -> str:
    """The secret held in file ``name`` (relative to ``base``): its text without the line
    end.  Never shown in messages; only its file name is."""
    name = name.strip()
    if not name:
        raise ConfigError(f"{where}: names no file")
    file = Path(name).expanduser()
    file = file if file.is_absolute() else base / file
    try:
        with open(file, "rb") as fh:
            data = fh.read(SECRET_FILE_MAX + 1)
    except OSError as exc:
        raise ConfigError(f"{where}: cannot read {file}: {exc.strerror or exc}") from None
    if len(data) > SECRET_FILE_MAX:
        raise ConfigError(f"{where}: {file} is larger than {SECRET_FILE_MAX} bytes; "
                          "it should hold one line")
    try:
        text = data.decode("utf-8").strip()
    except UnicodeDecodeError:
        raise ConfigError(f"{where}: {file} is not UTF-8 text") from None
    if not text or "\n" in text:
        raise ConfigError(f"{where}: {file} must hold the value on one line "
                          f"({'it is empty' if not text else 'it has several'})")
    return text
