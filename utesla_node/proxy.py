"""Outgoing connections through a SOCKS5 proxy.

A node may have to reach its peers through Tor (``socks5h://127.0.0.1:9050``) or a
company's proxy: ``[network] proxy`` for all its links, ``utesla-cli add_network
--proxy`` for one peer, ``--proxy`` / ``UTESLA_PROXY`` for ``utesla-cli`` and
``Client(proxy=...)`` for scripts.  The SOCKS conversation is python-socks's (a
well-kept asyncio client, not ours): it returns a socket already connected to the
peer, which :func:`utesla_node.transport.connect` hands to the event loop, so a
session through a proxy is the same session as a direct one (same handshake, same
pinned key: the proxy sees only ciphertext).

``socks5h://`` lets the proxy resolve the peer's name (onion names, names only the
proxy's side knows); ``socks5://`` resolves it here and sends the proxy an address.
``direct`` as a peer's proxy means "no proxy, whatever ``[network] proxy`` says".

A proxy URL may hold a password: :class:`Proxy` keeps it out of ``repr`` and ``str``,
and every message names the proxy by :func:`redact` (``socks5h://user:***@host:port``).
Failures are :class:`ProxyError`, a ``ConnectionError``: code that handles a refused
connection handles a refused proxy the same way, with words that say which it was.
"""
from __future__ import annotations

import asyncio
import os
import socket
from dataclasses import dataclass, field
from urllib.parse import unquote, urlsplit

from protocol.errors import Status

from .errors import NodeError

__all__ = ["Proxy", "ProxyError", "parse_proxy", "redact", "open_socket", "choose", "DIRECT"]

#: A peer's proxy setting meaning "connect directly, ignore [network] proxy".
DIRECT = "direct"
SCHEMES = ("socks5h", "socks5")
#: RFC 1929: user name and password are 1..255 bytes each.
MAX_CREDENTIAL = 255


class ProxyError(NodeError, ConnectionError):
    """The proxy could not be used: unreachable, refused our credentials, or could not
    reach the peer.  Its message names the proxy without its password."""

    status = Status.UNAVAILABLE
    public = "peer unreachable"


@dataclass(frozen=True)
class Proxy:
    """A parsed proxy URL (see :func:`parse_proxy`)."""

    host: str
    port: int
    username: str | None = None
    password: str | None = field(default=None, repr=False)
    #: True for ``socks5h://``: the proxy resolves the peer's host name.
    remote_dns: bool = True

    def __str__(self) -> str:
        scheme = "socks5h" if self.remote_dns else "socks5"
        host = f"[{self.host}]" if ":" in self.host else self.host
        user = f"{self.username}:***@" if self.username is not None else ""
        return f"{scheme}://{user}{host}:{self.port}"


def parse_proxy(text: str | None) -> Proxy | None:
    """``socks5h://[user:pass@]host:port`` (or ``socks5://``) -> :class:`Proxy`;
    empty, None or ``direct`` -> None (no proxy).  ValueError, without the password in
    its words, for anything else."""
    if text is None:
        return None
    text = text.strip()
    if not text or text.lower() == DIRECT:
        return None
    shown = redact(text)
    try:
        parts = urlsplit(text)
        port = parts.port
    except ValueError:
        raise ValueError(f"proxy {shown!r} is not a URL of the form "
                         "socks5h://[user:password@]host:port") from None
    scheme = parts.scheme.lower()
    if scheme not in SCHEMES:
        raise ValueError(f"proxy {shown!r}: unsupported scheme {scheme or '(none)'!r}; "
                         "use socks5h:// (the proxy resolves names) or socks5://")
    if not parts.hostname:
        raise ValueError(f"proxy {shown!r} names no host")
    if port is None or port == 0:
        raise ValueError(f"proxy {shown!r} names no port (Tor's is 9050, SOCKS's usual 1080)")
    if parts.path not in ("", "/") or parts.query or parts.fragment:
        raise ValueError(f"proxy {shown!r}: a proxy URL has no path, query or fragment")
    username = password = None
    if parts.username is not None or parts.password is not None:
        username = unquote(parts.username or "")
        password = unquote(parts.password or "")
        for what, value in (("user name", username), ("password", password)):
            if not 0 < len(value.encode()) <= MAX_CREDENTIAL:
                raise ValueError(f"proxy {shown!r}: the {what} must be 1 to "
                                 f"{MAX_CREDENTIAL} bytes (SOCKS5, RFC 1929)")
    return Proxy(parts.hostname, port, username, password, remote_dns=scheme == "socks5h")


def redact(text: str | None) -> str:
    """A proxy setting safe to show: any password replaced by ``***``."""
    if not text:
        return ""
    scheme, sep, rest = text.partition("://")
    if not sep or "@" not in rest:
        return text
    userinfo, _, host = rest.rpartition("@")
    user = userinfo.partition(":")[0]
    return f"{scheme}{sep}{user}:***@{host}"


def choose(peer_setting: str | None, node_setting: str | None) -> Proxy | None:
    """The proxy a link uses: the peer's own setting (``add_network --proxy``; ``direct``
    for none) if it has one, else the node's ``[network] proxy``."""
    setting = (peer_setting or "").strip()
    return parse_proxy(setting if setting else node_setting)


async def open_socket(proxy: Proxy, host: str, port: int,
                      timeout: float | None = None) -> socket.socket:
    """A non-blocking TCP socket connected to ``host:port`` through ``proxy``.

    :class:`ProxyError` when the proxy cannot be reached, refuses us (credentials,
    rules) or cannot reach the peer; ``asyncio.TimeoutError`` after ``timeout``.
    """
    # Imported here: only nodes and clients that use a proxy load python-socks.
    from python_socks import ProxyConnectionError, ProxyTimeoutError, ProxyType
    from python_socks import ProxyError as SocksError
    from python_socks.async_.asyncio import Proxy as SocksProxy

    client = SocksProxy(ProxyType.SOCKS5, proxy.host, proxy.port, proxy.username,
                        proxy.password, rdns=proxy.remote_dns,
                        loop=asyncio.get_running_loop())
    try:
        sock = await client.connect(host, port, timeout=timeout)
    except ProxyTimeoutError:
        raise asyncio.TimeoutError(f"proxy {proxy} did not connect us to {host}:{port} "
                                   f"within {timeout:g} s") from None
    except ProxyConnectionError as exc:
        raise ProxyError(f"cannot reach the proxy {proxy}: {_reason(exc)}") from None
    except SocksError as exc:
        raise ProxyError(_refusal(proxy, host, port, exc)) from None
    except OSError as exc:         # the proxy hung up in the middle of the exchange
        raise ProxyError(f"proxy {proxy} failed: {exc.strerror or exc}") from None
    sock.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
    return sock


#: SOCKS5 reply codes (RFC 1928 §6), as a person would say them.
_REPLIES = {
    1: "general failure",
    2: "its rules do not allow this connection",
    3: "network unreachable",
    4: "host unreachable",
    5: "connection refused by the peer",
    6: "TTL expired",
    7: "command not supported",
    8: "address type not supported",
}


def _reason(exc: BaseException) -> str:
    """Why the proxy could not be reached, as the system says it ("Connection refused")."""
    cause = exc.__cause__
    if isinstance(cause, OSError) and cause.errno:
        return os.strerror(cause.errno)
    text = str(exc)
    # python-socks appends "[the socket error]"; keep only that.
    if text.endswith("]") and "[" in text:
        return text[text.rindex("[") + 1:-1]
    return text


def _refusal(proxy: Proxy, host: str, port: int, exc: Exception) -> str:
    code = getattr(exc, "error_code", None)
    text = str(exc)
    if code in _REPLIES:
        return (f"proxy {proxy} could not connect to {host}:{port}: {_REPLIES[code]} "
                f"(SOCKS5 reply {code})")
    if "authentication failure" in text.lower():
        return f"proxy {proxy} refused the user name or password"
    if "no acceptable authentication" in text.lower():
        wanted = "a user name and password" if proxy.username is None else \
            "another authentication method"
        return f"proxy {proxy} wants {wanted} (none of ours was acceptable)"
    return f"proxy {proxy} refused the connection: {text}"
