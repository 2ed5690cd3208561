"""Shared plumbing for the thin click front ends."""
from __future__ import annotations

import asyncio
import functools
import logging
import sys

import click

from protocol.errors import ProtocolError, StatusError

from ..config import ConfigError, NodeConfig, find_config, load_config
from ..keys import KeyFileError
from ..storage import StorageError

__all__ = ["run_async", "fail", "user_errors", "config_option", "load_cfg", "read_password",
           "setup_logging", "alias"]

EXPECTED = (ConfigError, KeyFileError, StorageError, StatusError, ProtocolError, ValueError,
            OSError)


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
        except EXPECTED as exc:
            fail(_describe(exc))
    return wrapper


def _describe(exc: BaseException) -> str:
    if isinstance(exc, StatusError):
        return f"{exc} (status {exc.status})"
    if isinstance(exc, OSError) and exc.strerror:
        return f"{exc.strerror}: {exc.filename}" if exc.filename else exc.strerror
    return str(exc) or type(exc).__name__


config_option = click.option(
    "--config", "-c", "config_path", type=click.Path(dir_okay=False), default=None,
    help="node.ini to use (default: ./node.ini if present, else built-in defaults).")


def load_cfg(config_path: str | None, **overrides) -> NodeConfig:
    return load_config(find_config(config_path), **overrides)


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


def setup_logging(level: str = "INFO", fmt: str = "text") -> None:
    from ..logs import configure
    configure(level, fmt)


def alias(group: click.Group, cmd: click.Command, name: str) -> None:
    """Register ``cmd`` under another spelling, hidden from --help."""
    import copy
    twin = copy.copy(cmd)
    twin.hidden = True
    twin.name = name
    group.add_command(twin, name)
