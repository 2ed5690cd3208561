"""Shared plumbing for the thin click front ends."""
from __future__ import annotations

import asyncio
import functools
import os
import sys

import click

from protocol.errors import ProtocolError, StatusError

from ..admin import AdminError
from ..config import ConfigError, NodeConfig, find_config, load_config
from ..keys import KeyFileError, load_private_key, load_public_key
from ..status import NodeNotRunning
from ..storage import StorageError

__all__ = ["run_async", "fail", "user_errors", "config_option", "load_cfg", "read_password",
           "read_secret", "load_key_pair", "setup_logging", "alias"]

EXPECTED = (ConfigError, KeyFileError, StorageError, StatusError, ProtocolError, ValueError,
            OSError, AdminError, NodeNotRunning)


def run_async(coro):
    try:
        import uvloop
    except ImportError:  # pragma: no cover
        return asyncio.run(coro)
    return uvloop.run(coro)


def fail(message: str) -> None:
    """A user error: one line on stderr, exit status 1, no traceback."""
    click.echo(f"error: {message}", err=True)
    sys.exit(1)


def user_errors(fn):
    """Turn expected failures into ``fail()``; real bugs still show their traceback."""
    @functools.wraps(fn)
    def wrapper(*args, **kwargs):
        try:
            return fn(*args, **kwargs)
        except click.exceptions.ClickException:
            raise
        except BrokenPipeError:
            # `utesla-cli generate_keys | head -1`: the reader left; not our error.
            # Point stdout at /dev/null so the exit-time flush does not complain.
            devnull = os.open(os.devnull, os.O_WRONLY)
            os.dup2(devnull, sys.stdout.fileno())
            sys.exit(1)
        except EXPECTED as exc:
            fail(_describe(exc))
    return wrapper


def _describe(exc: BaseException) -> str:
    if isinstance(exc, NodeNotRunning):
        return f"{exc}; start utesla-node or pass -c node.ini"
    if isinstance(exc, StatusError):
        return f"{exc} (status {exc.status})"
    if isinstance(exc, OSError) and exc.strerror:
        return f"{exc.strerror}: {exc.filename}" if exc.filename else exc.strerror
    return str(exc) or type(exc).__name__


config_option = click.option(
    "--config", "-c", "config_path", type=click.Path(dir_okay=False), default=None,
    help="node.ini to use (default: ./node.ini if present, else built-in defaults).")


def load_cfg(config_path: str | None, *, warn: bool = True, **overrides) -> NodeConfig:
    """The configuration (``--config``, else ./node.ini, else defaults; the environment;
    ``overrides`` from flags).  ``warn``: print its warnings (unknown ``UTESLA_``
    variables) on stderr; the node logs them itself instead."""
    cfg = load_config(find_config(config_path), **overrides)
    if warn:
        for line in cfg.warnings:
            click.echo(f"warning: {line}", err=True)
    return cfg


def read_password(value: str | None, prompt: str = "Password", confirm: bool = False) -> str:
    """``-p VALUE`` as given; ``-p -`` one line from stdin; omitted: prompt without echo."""
    if value == "-":
        line = sys.stdin.readline()
        if not line:
            raise ValueError("no password on standard input")
        return line.rstrip("\r\n")
    if value is not None:
        return value
    if not sys.stdin.isatty():
        raise ValueError("no password given: use -p, or -p - to read it from standard input")
    return click.prompt(prompt, hide_input=True, confirmation_prompt=confirm)


def read_secret(value: str | None, prompt: str) -> str:
    """A token option: ``-t VALUE`` as given; ``-t -`` one line from stdin; omitted: prompt."""
    if value == "-":
        return sys.stdin.readline().strip()
    if value is None:
        return read_password(None, prompt)
    return value


def load_key_pair(public_path, private_path):
    """The private key in ``private_path``, after checking ``public_path`` is its public half."""
    priv = load_private_key(private_path)
    if load_public_key(public_path) != priv.public:
        raise KeyFileError(f"{public_path} is not the public half of {private_path}")
    return priv


def setup_logging(level: str = "INFO", fmt: str = "text", **limits) -> None:
    from ..logs import configure
    configure(level, fmt, **limits)


def alias(group: click.Group, cmd: click.Command, name: str) -> None:
    """Register ``cmd`` under another spelling, hidden from --help."""
    import copy
    twin = copy.copy(cmd)
    twin.hidden = True
    twin.name = name
    group.add_command(twin, name)


class Progress:
    """A one-line progress report on stderr (bytes, rate, time left); silent when piped."""

    def __init__(self, label: str, total: int | None = None, stream=None, enabled=None):
        import time as _time
        self._time = _time
        self.stream = stream or sys.stderr
        self.enabled = self.stream.isatty() if enabled is None else enabled
        self.label = label
        self.total = total
        self.done = 0
        self.start = _time.monotonic()
        self._last = 0.0

    def update(self, n: int) -> None:
        self.done += n
        now = self._time.monotonic()
        if self.enabled and now - self._last >= 0.2:
            self._last = now
            self._draw(now)

    def _draw(self, now: float) -> None:
        elapsed = max(now - self.start, 1e-6)
        rate = self.done / elapsed
        line = f"\r{self.label}: {_size(self.done)}"
        if self.total:
            pct = 100 * self.done / self.total
            left = (self.total - self.done) / rate if rate > 0 else 0
            line += f" / {_size(self.total)} ({pct:5.1f}%)  {_size(rate)}/s  {left:5.0f} s left"
        else:
            line += f"  {_size(rate)}/s  {elapsed:5.0f} s"
        self.stream.write(line.ljust(78)[:120])
        self.stream.flush()

    def close(self) -> None:
        if self.enabled:
            self._draw(self._time.monotonic())
            self.stream.write("\n")
            self.stream.flush()


def _size(n: float) -> str:
    for unit in ("B", "KiB", "MiB", "GiB", "TiB"):
        if n < 1024 or unit == "TiB":
            return f"{n:.0f} {unit}" if unit == "B" else f"{n:.1f} {unit}"
        n /= 1024
    return f"{n:.1f} TiB"  # pragma: no cover
