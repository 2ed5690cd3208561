"""The blog's user flow on both storage backends, through the real console scripts.

``utesla-node`` runs as a subprocess in a temporary folder with its own ``node.ini``
(``[server] port = 0``; ``[database] url`` empty for the embedded SQLite database, or the URL
of a freshly created MariaDB database), and ``utesla-cli`` administers it exactly as the blog
does: ``generate_keys``, ``add``, ``generate_token`` against the running node, then a request
with the token.  Around that flow:

* the MariaDB password comes from ``UTESLA_DB_PASSWORD`` when the URL has none;
* two nodes on one MariaDB database share users and tokens (a token is bound to the user's
  key, not to the node that issued it), and a revocation through one is seen by the other;
* ``utesla-cli del`` and ``set-key`` through the shared database close the user's
  connections on every node (each node watches; nobody tells it);
* the database going away under a running node: requests that need it get 503
  "unavailable", requests that do not (a cached token, ``/_node/ping``) keep working, and
  everything works again afterwards without a restart;
* a schema newer than the code: the node refuses to start, naming both versions.

SQLite outage, as measured through the real scripts (default ``busy_timeout`` 5 s): while
another connection holds ``BEGIN EXCLUSIVE``, ``generate_token`` fails after about 5.7 s with
``error: database unavailable (status 503)`` (exit 1).  In WAL mode that lock only blocks
*writers*: token checks, handshakes and pings go on reading, which is what WAL is for.  The
busy timeout cannot be set from ``node.ini`` (the SQLite URL takes no options), so the
outage test runs the node in-process with a 300 ms timeout instead.  A hard outage that also
stops *readers* is tested on MariaDB (account locked and its connections killed).

MariaDB cases need the server at ``UTESLA_TEST_MYSQL_URL`` (default root@127.0.0.1:3306):
skipped when it is unreachable, a failure under ``CI=true`` (conftest.mariadb_server).
"""
from __future__ import annotations

import asyncio
import os
import secrets
import shutil
import sqlite3
import subprocess
import time
from collections.abc import Callable, Iterator
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass
from pathlib import Path
from typing import TypeVar
from urllib.parse import quote

import pytest

from helpers import BIN, REPO, NodeHarness, NodeProcess, run_cli, user_key, wait_for
from protocol.errors import Unauthorized, Unavailable
from utesla_node import server as server_module
from utesla_node.revocation import KEY_CHANGED, REMOVED
from utesla_node.storage import SCHEMA_VERSION, StorageUnavailable, open_storage

from .conftest import MariaDBBackend, MariaDBServer, SQLiteBackend

pytestmark = pytest.mark.timeout(90)

HELLO = "Hello World!"
T = TypeVar("T")


# --------------------------------------------------------------------------- plumbing

def mysql_url(server: MariaDBServer, database: str, user: str | None = None,
              password: str | None = None) -> str:
    """A ``[database] url``; ``password=None`` leaves it out (taken from the environment)."""
    user = server.user if user is None else user
    if password is None and user == server.user:
        password = server.password      # root-style URLs always spell the password, even ""
    auth = quote(user, safe="")
    if password is not None:
        auth += ":" + quote(password, safe="")
    return f"mysql://{auth}@{server.host}:{server.port}/{database}"


@dataclass
class Db:
    """The database a test's nodes share: its ``[database] url`` and raw access to it."""

    kind: str
    url: str
    backend: SQLiteBackend | MariaDBBackend


@pytest.fixture(params=["sqlite", "mariadb"])
def db(request: pytest.FixtureRequest, tmp_path: Path) -> Db:
    """Empty URL (embedded SQLite in node1/data) or a fresh MariaDB database, dropped after."""
    if request.param == "sqlite":
        return Db("sqlite", "", SQLiteBackend(tmp_path / "node1" / "data" / "utesla.db"))
    backend: MariaDBBackend = request.getfixturevalue("mariadb_backend")
    return Db("mariadb", mysql_url(backend.server, backend.database), backend)


@pytest.fixture
def mariadb_db(mariadb_backend: MariaDBBackend) -> Db:
    return Db("mariadb", mysql_url(mariadb_backend.server, mariadb_backend.database),
              mariadb_backend)


@dataclass
class DbUser:
    name: str
    password: str


@pytest.fixture
def db_user(mariadb_backend: MariaDBBackend) -> Iterator[DbUser]:
    """A dedicated MariaDB account with a password, granted the test database only."""
    server = mariadb_backend.server
    account = DbUser(f"utesla_u_{secrets.token_hex(4)}", secrets.token_urlsafe(12))
    with server.admin.cursor() as cur:
        cur.execute("CREATE USER %s@'%%' IDENTIFIED BY %s", (account.name, account.password))
        cur.execute(f"GRANT ALL PRIVILEGES ON `{mariadb_backend.database}`.* TO %s@'%%'",
                    (account.name,))
    try:
        yield account
    finally:
        kill_user_connections(server, account.name)
        with server.admin.cursor() as cur:
            cur.execute("DROP USER IF EXISTS %s@'%%'", (account.name,))


def user_connection_ids(server: MariaDBServer, user: str) -> list[int]:
    with server.admin.cursor() as cur:
        cur.execute("SELECT ID FROM information_schema.PROCESSLIST WHERE USER = %s", (user,))
        return [row[0] for row in cur.fetchall()]


def kill_user_connections(server: MariaDBServer, user: str) -> int:
    ids = user_connection_ids(server, user)
    for cid in ids:
        try:
            server.kill(cid)
        except Exception:  # already gone
            pass
    return len(ids)


def make_folder(path: Path, url: str, **server: object) -> Path:
    """A node folder: node.ini (port 0, the given url) and complements/hello_world.py."""
    (path / "complements").mkdir(parents=True, exist_ok=True)
    shutil.copy(REPO / "complements" / "hello_world.py", path / "complements")
    lines = ["[server]", "port = 0"] + [f"{k} = {v}" for k, v in server.items()]
    lines += ["", "[database]", f"url = {url}", ""]
    (path / "node.ini").write_text("\n".join(lines))
    return path


@pytest.fixture
def nodes() -> Iterator[list[NodeProcess]]:
    """The test's ``utesla-node`` processes (see :func:`start_node`); stopped at teardown."""
    started: list[NodeProcess] = []
    yield started
    for node in started:
        node.stop()


def start_node(nodes: list[NodeProcess], folder: Path, env: dict | None = None) -> NodeProcess:
    """``utesla-node --config node.ini`` in ``folder``, registered before it starts."""
    node = NodeProcess(folder, "--config", "node.ini", env=env)
    nodes.append(node)
    return node.start()


def parallel(*thunks: Callable[[], T]) -> list[T]:
    """Run independent console-script invocations side by side (each is ~0.6 s of start-up)."""
    with ThreadPoolExecutor(len(thunks)) as pool:
        return [f.result() for f in [pool.submit(t) for t in thunks]]


def timed(fn: Callable[..., T], *args: object, **kw: object) -> tuple[T, float]:
    t0 = time.monotonic()
    result = fn(*args, **kw)
    return result, time.monotonic() - t0


def cli(folder: Path, *args: object, **kw: object) -> subprocess.CompletedProcess:
    return run_cli(*args, cwd=folder, **kw)


def keys(folder: Path, name: str) -> tuple[str, str]:
    """``utesla-cli generate_keys`` with the blog's spellings; returns (public, private)."""
    pub, priv = f"{name}.pub", f"{name}.priv"
    cli(folder, "generate_keys", "-out-public-key", pub, "-out-private-key", priv)
    return pub, priv


def token_from(folder: Path, node: NodeProcess, user: str, password: str, pub: str,
               priv: str, node_key: str = "keys/key.pub") -> str:
    out = cli(folder, "generate_token", f"utesla://127.0.0.1:{node.port}", "-u", user,
              "-p", password, "-s", node_key, "-i", pub, "-I", priv).stdout.strip()
    assert out.startswith("ut1_") and len(out) == 47, out
    return out


def call(folder: Path, node: NodeProcess, user: str, priv: str, token: str,
         path: str = "/hello_world", node_key: str = "keys/key.pub",
         check: bool = True) -> subprocess.CompletedProcess:
    return cli(folder, "call", f"utesla://127.0.0.1:{node.port}{path}", "-u", user,
               "-I", priv, "-s", node_key, "-t", token, check=check)


# --------------------------------------------------------------------------- the blog's flow

def test_blog_flow_through_console_scripts(db: Db, tmp_path: Path,
                                           nodes: list[NodeProcess]) -> None:
    folder = make_folder(tmp_path / "node1", db.url)
    node, (alice_pub, alice_priv), (bob_pub, bob_priv) = parallel(
        lambda: start_node(nodes, folder), lambda: keys(folder, "alice"),
        lambda: keys(folder, "bob"))
    # Password on standard input for one user, on the command line for the other.
    out = cli(folder, "add", "-u", "alice", "-p", "-", "-i", alice_pub, "--config", "node.ini",
              input="alice's secret\n").stdout
    assert "user alice added" in out
    cli(folder, "add", "-u", "bob", "-p", "bob-pw", "-i", bob_pub, "--config", "node.ini")
    dup = cli(folder, "add", "-u", "bob", "-p", "x", "-i", bob_pub, "--config", "node.ini",
              check=False)
    assert dup.returncode == 1 and "already exists" in dup.stderr
    assert "Traceback" not in dup.stderr

    # The users really are in the backend under test, not in some other database.
    names = sorted(row[0] for row in db.backend.execute("SELECT name FROM users"))
    assert names == ["alice", "bob"]

    alice_token, bob_token = parallel(
        lambda: token_from(folder, node, "alice", "alice's secret", alice_pub, alice_priv),
        lambda: token_from(folder, node, "bob", "bob-pw", bob_pub, bob_priv))
    alice, bob, stolen, wrong = parallel(
        lambda: call(folder, node, "alice", alice_priv, alice_token),
        lambda: call(folder, node, "bob", bob_priv, bob_token),
        # Bound to the user: alice's token on bob's session is the generic "unauthorized".
        lambda: call(folder, node, "bob", bob_priv, alice_token, check=False),
        # A wrong password is refused the same way.
        lambda: cli(folder, "generate_token", f"utesla://127.0.0.1:{node.port}", "-u", "bob",
                    "-p", "nope", "-s", "keys/key.pub", "-i", bob_pub, "-I", bob_priv,
                    check=False))
    assert alice.stdout == HELLO and bob.stdout == HELLO
    assert stolen.returncode == 1 and "status 401" in stolen.stderr, stolen.stderr
    assert wrong.returncode == 1 and "status 401" in wrong.stderr, wrong.stderr
    assert node.proc.poll() is None, node.log()


def test_a_container_style_node_configured_from_the_environment(
        mariadb_backend: MariaDBBackend, db_user: DbUser, tmp_path: Path,
        nodes: list[NodeProcess]) -> None:
    """No node.ini at all: the port from UTESLA_SERVER_PORT, the database URL from a secret
    file (UTESLA_DATABASE_URL_FILE, as Docker or systemd mount one), its password from
    UTESLA_DB_PASSWORD; utesla-cli administers the same database the same way."""
    from helpers import free_port
    server = mariadb_backend.server
    folder = tmp_path / "container"
    (folder / "complements").mkdir(parents=True)
    shutil.copy(REPO / "complements" / "hello_world.py", folder / "complements")
    secret = tmp_path / "secrets" / "db_url"
    secret.parent.mkdir()
    secret.write_text(mysql_url(server, mariadb_backend.database, db_user.name) + "\n")
    port = free_port()
    env = {"UTESLA_SERVER_PORT": str(port), "UTESLA_DATABASE_URL_FILE": str(secret),
           "UTESLA_DB_PASSWORD": db_user.password, "UTESLA_SERVER_PROT": "1"}
    node = NodeProcess(folder, env=env)
    nodes.append(node)
    node.start()
    assert node.port == port
    assert "UTESLA_SERVER_PROT is not a setting and is ignored (did you mean " \
           "UTESLA_SERVER_PORT?)" in node.log()
    pub, priv = keys(folder, "alice")
    added = cli(folder, "add", "-u", "alice", "-p", "pw", "-i", pub, env=env)
    assert "warning: environment variable UTESLA_SERVER_PROT" in added.stderr
    # The user went to MariaDB (there is no SQLite database in the folder).
    assert mariadb_backend.execute("SELECT name FROM users") == [("alice",)]
    assert not (folder / "data" / "utesla.db").exists()
    token = token_from(folder, node, "alice", "pw", pub, priv)
    assert call(folder, node, "alice", priv, token).stdout == HELLO
    # A flag beats the environment.
    flagged = NodeProcess(folder, "--port", "0", env=env)
    nodes.append(flagged)
    flagged.start()
    assert flagged.port not in (0, port)


def test_mariadb_password_from_environment(mariadb_backend: MariaDBBackend, db_user: DbUser,
                                           tmp_path: Path, nodes: list[NodeProcess]) -> None:
    server = mariadb_backend.server
    url = mysql_url(server, mariadb_backend.database, db_user.name)   # no password in it
    assert db_user.password not in url and ":" not in url.split("@")[0][len("mysql://"):]
    folder = make_folder(tmp_path / "node1", url)
    env = {"UTESLA_DB_PASSWORD": db_user.password}

    # Without the variable the node cannot log in: exit 1, one line, no traceback.
    refused = subprocess.run([str(BIN / "utesla-node"), "--config", "node.ini"], cwd=folder,
                             capture_output=True, text=True, timeout=30,
                             env={**os.environ, "UTESLA_DB_PASSWORD": ""})
    assert refused.returncode == 1, refused.stderr
    assert "error:" in refused.stderr and "Access denied" in refused.stderr
    assert "Traceback" not in refused.stderr

    node = start_node(nodes, folder, env=env)
    pub, priv = keys(folder, "alice")
    cli(folder, "add", "-u", "alice", "-p", "pw", "-i", pub, "--config", "node.ini", env=env)
    token = token_from(folder, node, "alice", "pw", pub, priv)
    assert call(folder, node, "alice", priv, token).stdout == HELLO
    # It really is the dedicated account doing the work, and the secret is not logged.
    assert mariadb_backend.execute("SELECT name FROM users") == [("alice",)]
    assert user_connection_ids(server, db_user.name)
    assert db_user.password not in node.log()


def test_second_node_on_same_mariadb_shares_users_and_tokens(
        mariadb_db: Db, tmp_path: Path, nodes: list[NodeProcess]) -> None:
    one = make_folder(tmp_path / "node1", mariadb_db.url)
    two = make_folder(tmp_path / "node2", mariadb_db.url)
    node1, node2, (pub, priv) = parallel(lambda: start_node(nodes, one),
                                         lambda: start_node(nodes, two),
                                         lambda: keys(one, "alice"))
    key1, key2 = (one / "keys" / "key.pub").read_text(), (two / "keys" / "key.pub").read_text()
    assert key1 != key2                                   # two distinct node identities

    for f in (pub, priv):
        shutil.copy(one / f, two / f)
    cli(one, "add", "-u", "alice", "-p", "pw", "-i", pub, "--token-limit", "2",
        "--config", "node.ini")

    # Issued by node 1, used on node 2 by a client pinning node 2's key (and vice versa).
    token1 = token_from(one, node1, "alice", "pw", pub, priv)
    assert call(two, node2, "alice", priv, token1).stdout == HELLO
    token2 = token_from(two, node2, "alice", "pw", pub, priv)
    assert call(one, node1, "alice", priv, token2).stdout == HELLO
    # Pinning the wrong node's key fails the handshake: the client really checks who it reached.
    wrong_pin = call(one, node2, "alice", priv, token1, check=False)
    assert wrong_pin.returncode == 1

    # The token limit (2) is counted over the shared database, whichever node issues.
    third = cli(one, "generate_token", f"utesla://127.0.0.1:{node1.port}", "-u", "alice",
                "-p", "pw", "-s", "keys/key.pub", "-i", pub, "-I", priv, check=False)
    assert third.returncode == 1 and "token limit" in third.stderr, third.stderr
    # Revoked through node 2's config: node 1 refuses the token on its next check (it never
    # validated token1 itself, so nothing is cached there; a cached check would last up to
    # token_cache_ttl).
    cli(two, "revoke", "alice", "--all", "--config", "node.ini")
    gone = call(one, node1, "alice", priv, token1, check=False)
    assert gone.returncode == 1 and "status 401" in gone.stderr, gone.stderr


async def test_cli_del_and_set_key_close_sessions_on_every_node_sharing_mariadb(
        mariadb_db: Db, tmp_path: Path) -> None:
    # Issue 17 item 6 with several nodes: utesla-cli writes the shared database, and each
    # node finds out by itself that alice is gone and bob has a new key.
    one = NodeHarness(tmp_path / "node1", database_url=mariadb_db.url)
    two = NodeHarness(tmp_path / "node2", database_url=mariadb_db.url)
    admin = make_folder(tmp_path / "admin", mariadb_db.url)
    await one.start()
    await two.start()
    try:
        for name in ("alice", "bob", "carol"):
            await one.add_user(name)
        two.keys, two.tokens = one.keys, one.tokens
        users = ("alice", "bob", "carol")
        clients = {(h, u): h.client(u) for h in (one, two) for u in users}
        for c in clients.values():
            assert (await c.get("/hello_world")).text == HELLO
        (tmp_path / "bob-new.pub").write_text(user_key(tag="bob-new").public.to_pem())

        await asyncio.to_thread(cli, admin, "del", "alice", "--config", "node.ini")
        await asyncio.to_thread(cli, admin, "set-key", "-u", "bob", "-i",
                                tmp_path / "bob-new.pub", "--config", "node.ini")

        await wait_for(lambda: not any(clients[h, u].connected
                                       for h in (one, two) for u in ("alice", "bob")), 10)
        for h in (one, two):
            with pytest.raises(Unauthorized, match=REMOVED):
                await clients[h, "alice"].get("/hello_world")
            with pytest.raises(Unauthorized, match=KEY_CHANGED):
                await clients[h, "bob"].get("/hello_world")
            carol = clients[h, "carol"]
            session = await carol.connect()
            assert (await carol.get("/hello_world")).text == HELLO
            assert await carol.connect() is session                 # never closed
    finally:
        await one.stop()
        await two.stop()


# --------------------------------------------------------------------------- outages

def test_sqlite_locked_under_real_node(tmp_path: Path, nodes: list[NodeProcess]) -> None:
    """The console scripts' view, with the default 5 s busy timeout."""
    folder = make_folder(tmp_path / "node1", "")
    node, (pub, priv) = parallel(lambda: start_node(nodes, folder), lambda: keys(folder, "alice"))
    cli(folder, "add", "-u", "alice", "-p", "pw", "-i", pub, "--token-limit", "0",
        "--config", "node.ini")
    token = token_from(folder, node, "alice", "pw", pub, priv)

    holder = sqlite3.connect(folder / "data" / "utesla.db", isolation_level=None)
    holder.execute("BEGIN EXCLUSIVE")
    try:
        # While a write waits out the busy timeout, reads (the token check, the handshake)
        # and ping go on: WAL blocks writers only.
        (refused, took), (hello, hello_t), (pong, _) = parallel(
            lambda: timed(cli, folder, "generate_token", f"utesla://127.0.0.1:{node.port}",
                          "-u", "alice", "-p", "pw", "-s", "keys/key.pub", "-i", pub,
                          "-I", priv, check=False),
            lambda: timed(call, folder, node, "alice", priv, token),
            lambda: timed(call, folder, node, "alice", priv, token, path="/_node/ping"))
        assert refused.returncode == 1, refused
        assert refused.stderr.strip() == "error: database unavailable (status 503)"
        assert 5.0 <= took < 15.0, took                   # the busy timeout, then 503
        assert hello.stdout == HELLO and pong.stdout == "pong"
        assert hello_t < took - 2.0, (hello_t, took)      # not queued behind the write
    finally:
        holder.execute("ROLLBACK")
        holder.close()

    again = token_from(folder, node, "alice", "pw", pub, priv)
    assert call(folder, node, "alice", priv, again).stdout == HELLO
    assert node.proc.poll() is None, node.log()


@pytest.fixture
def short_busy_timeout(monkeypatch: pytest.MonkeyPatch) -> int:
    """Nodes started in-process open SQLite with a 1 s busy timeout (node.ini cannot set it)."""
    real = server_module.open_storage
    ms = 1000

    def open_short(url, data_dir, **opts):
        if not url:
            opts.setdefault("busy_timeout_ms", ms)
        return real(url, data_dir, **opts)

    monkeypatch.setattr(server_module, "open_storage", open_short)
    return ms


async def test_sqlite_locked_under_running_node(tmp_path: Path, short_busy_timeout: int) -> None:
    h = NodeHarness(tmp_path / "node1", token_cache_ttl=60.0)
    await h.start()
    try:
        assert h.node.storage.busy_timeout_ms == short_busy_timeout
        busy = short_busy_timeout / 1000
        await h.add_user("alice")
        await h.add_user("bob")                                    # first connects under it
        fresh, _ = await h.node.authority.issue_token("alice")     # never used before the lock
        c = h.client("alice")
        assert (await c.get("/hello_world")).text == HELLO        # now cached by the node

        holder = sqlite3.connect(h.config.data_dir / "utesla.db", isolation_level=None)
        holder.execute("BEGIN EXCLUSIVE")
        try:
            # Needs the database (a write): 503 "unavailable" once the busy timeout is spent.
            t0 = time.monotonic()
            issuing = asyncio.ensure_future(c.generate_token("pw"))
            await asyncio.sleep(busy / 4)                  # the write is waiting for the lock
            assert not issuing.done()
            # WAL: the lock stops writers only, so reads go on *while that write waits*:
            # checking a token nobody cached yet, and the handshake of a user the node has
            # not seen yet.  They must not queue behind the stuck write.
            t1 = time.monotonic()
            assert (await c.get("/hello_world", token=fresh)).text == HELLO
            assert (await h.client("bob").get("/hello_world")).text == HELLO
            assert time.monotonic() - t1 < busy / 2, "reads waited behind a blocked write"
            assert not issuing.done()
            # Needs no database: a token the node validated, and ping.
            assert (await c.get("/hello_world")).text == HELLO
            assert (await c.get("/_node/ping")).text == "pong"

            with pytest.raises(Unavailable) as info:
                await issuing
            took = time.monotonic() - t0
            assert info.value.status == 503 and "unavailable" in str(info.value)
            assert busy <= took < busy + 3, took

            # The admin commands' path (a separate storage on the same file) fails cleanly.
            other = open_storage("", h.config.data_dir, busy_timeout_ms=100)
            await other.open()
            try:
                with pytest.raises(StorageUnavailable):
                    await other.revoke_user_tokens("alice")
            finally:
                await other.close()
        finally:
            holder.execute("ROLLBACK")
            holder.close()

        # Lock released: everything works again, no restart.
        token = await c.generate_token("pw")
        assert (await h.client("alice", token=token).get("/hello_world")).text == HELLO
        assert h.node.stopping is False
    finally:
        await h.stop()


async def test_mariadb_connections_killed_and_account_locked(
        mariadb_backend: MariaDBBackend, db_user: DbUser, tmp_path: Path) -> None:
    server = mariadb_backend.server
    url = mysql_url(server, mariadb_backend.database, db_user.name, db_user.password)
    h = NodeHarness(tmp_path / "node1", database_url=url, token_cache_ttl=60.0)
    await h.start()
    try:
        await h.add_user("alice")
        await h.add_user("bob")                                    # never connects until (2)
        spare = [(await h.node.authority.issue_token("alice"))[0] for _ in range(4)]
        c = h.client("alice")
        assert (await c.get("/hello_world")).text == HELLO        # cached from here on

        # 1. Every connection of the node killed: the first requests (a read, a write) may
        #    see 503 while the pool finds out; then it has reconnected by itself.
        assert kill_user_connections(server, db_user.name) >= 1
        read = await c.get("/hello_world", token=spare[0], check=False)
        write = await c.request("POST", "/_node/token", args={"password": "pw"}, check=False)
        assert {read.status, write.status} <= {200, 503}, (read, write)
        assert (await c.get("/hello_world", token=spare[1])).text == HELLO
        assert (await c.generate_token("pw")).startswith("ut1_")
        assert user_connection_ids(server, db_user.name)          # fresh connections

        # 2. A hard outage: the account locked and its connections killed, so no new
        #    connection can be made.  What needs the database answers 503 promptly.
        with server.admin.cursor() as cur:
            cur.execute("ALTER USER %s@'%%' ACCOUNT LOCK", (db_user.name,))
        try:
            kill_user_connections(server, db_user.name)
            t0 = time.monotonic()
            uncached = await c.get("/hello_world", token=spare[2], check=False)
            assert uncached.status == 503 and "unavailable" in uncached.text, uncached
            with pytest.raises(Unavailable):
                await c.generate_token("pw")
            # A user the node has not seen yet: the handshake must read its key, and the
            # node refuses the handshake with 503, which the client reports as Unavailable.
            with pytest.raises(Unavailable) as refused:
                await h.client("bob").get("/hello_world")
            assert refused.value.status == 503 and "database" in str(refused.value)
            assert time.monotonic() - t0 < 10
            # What does not need it keeps working.
            assert (await c.get("/hello_world")).text == HELLO
            assert (await c.get("/_node/ping")).text == "pong"
        finally:
            with server.admin.cursor() as cur:
                cur.execute("ALTER USER %s@'%%' ACCOUNT UNLOCK", (db_user.name,))

        # Back: no restart needed.
        assert (await c.get("/hello_world", token=spare[3])).text == HELLO
        token = await c.generate_token("pw")
        assert (await h.client("alice", token=token).get("/hello_world")).text == HELLO
    finally:
        await h.stop()


# --------------------------------------------------------------------------- schema

async def test_node_refuses_newer_schema(db: Db, tmp_path: Path) -> None:
    folder = make_folder(tmp_path / "node1", db.url)
    store = (open_storage(db.url, folder / "data") if db.kind == "sqlite"
             else db.backend.make())
    await store.open()                                    # creates the current schema
    await store.close()
    newer = SCHEMA_VERSION + 1
    db.backend.execute("UPDATE meta SET value = ? WHERE name = 'schema_version'", (newer,))

    proc = subprocess.run([str(BIN / "utesla-node"), "--config", "node.ini"], cwd=folder,
                          capture_output=True, text=True, timeout=30)
    assert proc.returncode == 1, proc.stderr
    assert "listening" not in proc.stdout
    assert (f"schema version {newer} is newer than this code knows ({SCHEMA_VERSION})"
            in proc.stderr), proc.stderr
    assert "upgrade utesla-node" in proc.stderr and "Traceback" not in proc.stderr
    # The admin commands refuse it the same way, and nothing was touched.
    admin = cli(folder, "show", "--config", "node.ini", check=False)
    assert admin.returncode == 1 and f"schema version {newer}" in admin.stderr, admin.stderr
    (row,) = db.backend.execute("SELECT value FROM meta WHERE name = 'schema_version'")
    assert int(row[0]) == newer
