"""A real SOCKS5 server for the proxy tests: Debian's ``dante-server`` (``danted``).

:class:`Dante` writes a configuration for loopback only (a free port, no root-only
feature), starts ``danted`` in the foreground as a child process, waits until its port
accepts connections and stops it by its PID.  Its log (``log_text()``) records every
connection it passes or blocks, with both ends' addresses.

``danted`` is required under ``CI=true`` (``.ci/run`` installs it); elsewhere the tests
that need it are skipped with a reason when it is absent.  The ``username`` method checks
passwords against the system's accounts, so :func:`system_user` makes one, and only when
running as root (CI is); otherwise those cases are skipped.
"""
from __future__ import annotations

import contextlib
import os
import secrets
import shutil
import socket
import subprocess
import time
from pathlib import Path

import pytest

from helpers import free_port

CI = os.environ.get("CI", "").lower() == "true"


def danted_binary() -> str:
    path = shutil.which("danted") or ("/usr/sbin/danted" if os.access("/usr/sbin/danted",
                                                                      os.X_OK) else None)
    if path is None:
        if CI:
            pytest.fail("danted is not installed but CI=true: .ci/run installs it "
                        "(apt-get install dante-server)")
        pytest.skip("Debian's dante-server is not installed (apt-get install dante-server): "
                    "no real SOCKS5 server to test against")
    return path


class Dante:
    """One ``danted`` on 127.0.0.1; ``method`` is ``none`` or ``username``."""

    def __init__(self, folder: Path, method: str = "none", port: int | None = None):
        self.folder = Path(folder)
        self.folder.mkdir(parents=True, exist_ok=True)
        self.method = method
        self.port = port or free_port()
        self.log = self.folder / "danted.log"
        self.conf = self.folder / "danted.conf"
        self.proc: subprocess.Popen | None = None

    @property
    def url(self) -> str:
        return f"socks5h://127.0.0.1:{self.port}"

    def url_with(self, user: str, password: str) -> str:
        from urllib.parse import quote
        return f"socks5h://{quote(user, safe='')}:{quote(password, safe='')}@127.0.0.1:{self.port}"

    def start(self, timeout: float = 30.0) -> "Dante":
        binary = danted_binary()
        self.conf.write_text(
            f"logoutput: {self.log}\n"
            f"internal: 127.0.0.1 port = {self.port}\n"
            "external: 127.0.0.1\n"
            "clientmethod: none\n"
            f"socksmethod: {self.method}\n"
            "client pass { from: 127.0.0.0/8 to: 0.0.0.0/0 log: error connect disconnect }\n"
            "socks pass { from: 127.0.0.0/8 to: 127.0.0.0/8 log: error connect disconnect }\n")
        with open(self.folder / "danted.err", "ab") as err:
            self.proc = subprocess.Popen(
                [binary, "-f", str(self.conf), "-p", str(self.folder / "danted.pid"),
                 "-N", "1"], stdout=subprocess.DEVNULL, stderr=err)
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            if self.proc.poll() is not None:
                raise AssertionError(f"danted exited ({self.proc.returncode}): "
                                     f"{(self.folder / 'danted.err').read_text()} "
                                     f"{self.log_text()}")
            with contextlib.suppress(OSError), socket.create_connection(
                    ("127.0.0.1", self.port), timeout=1):
                return self
            time.sleep(0.05)         # polling a condition (the port), bounded by timeout
        self.stop()
        raise AssertionError("danted did not start listening in time")

    def log_text(self) -> str:
        try:
            return self.log.read_text(errors="replace")
        except FileNotFoundError:
            return ""

    def connections_to(self, port: int) -> list[str]:
        """The log's lines of connections the proxy made to 127.0.0.1:``port``."""
        return [line for line in self.log_text().splitlines()
                if "tcp/connect" in line and f"127.0.0.1.{port} " in line + " "]

    def stop(self) -> None:
        """Stop the server by its PID (SIGTERM, then SIGKILL after 10 s)."""
        if self.proc is None or self.proc.poll() is not None:
            return
        self.proc.terminate()
        try:
            self.proc.wait(10)
        except subprocess.TimeoutExpired:
            self.proc.kill()
            self.proc.wait(10)


@contextlib.contextmanager
def system_user():
    """A throw-away system account (name, password) for dante's ``username`` method,
    removed afterwards.  Only as root; skipped otherwise."""
    if os.geteuid() != 0:
        pytest.skip("dante's username method checks system accounts, and making one needs "
                    "root (CI runs as root)")
    for tool in ("useradd", "chpasswd", "userdel"):
        if shutil.which(tool) is None:
            pytest.skip(f"{tool} is not available to make a system account for dante")
    name = "utpx" + secrets.token_hex(4)
    password = "Px-" + secrets.token_urlsafe(12)
    subprocess.run(["useradd", "-M", "-s", "/usr/sbin/nologin", name], check=True,
                   capture_output=True)
    try:
        subprocess.run(["chpasswd"], input=f"{name}:{password}\n", text=True, check=True,
                       capture_output=True)
        yield name, password
    finally:
        subprocess.run(["userdel", name], capture_output=True)
