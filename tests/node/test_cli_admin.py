"""``utesla-cli`` where no node is: an old status file, a folder that is not the node's.

Issue 17 item 7: ``show_networks``, ``show_services`` and ``add_network --wait`` showed
what a dead node last wrote (or a table of "unknown" states) and exited 0.  They now
say that no node runs with that data folder and exit 1.

Issue 13 item 4: admin commands run in the wrong folder created a new SQLite database
there: ``add`` said "user added" (the running node never saw the user), ``show`` said
"no users".  A missing database is now an error naming the folder and ``-c node.ini``,
except for ``add``/``add_network`` in a node's folder (before its first start, the
blog's order) or with ``--create``.

In-process through click's CliRunner (the commands are the console script's); the
status files are written by hand, in the node's format, so these tests also pin it.
"""
from __future__ import annotations

import asyncio
import json
import os
import subprocess
import sys
import time
from pathlib import Path

import pytest
from click.testing import CliRunner

from helpers import REPO, NodeProcess, run_cli, user_key
from utesla_node.cli.admin import main
from utesla_node.keys import write_key_pair
from utesla_node.storage import Peer, open_storage

NO_NODE = "no node is running with data folder"


@pytest.fixture(scope="module")
def dead_pid() -> int:
    """The pid of a process that has exited and been reaped."""
    proc = subprocess.Popen([sys.executable, "-c", "pass"])
    proc.wait()
    with pytest.raises(ProcessLookupError):
        os.kill(proc.pid, 0)
    return proc.pid


def cli(*args, cwd: Path) -> subprocess.CompletedProcess:
    """``utesla-cli ARGS`` in ``cwd``, in-process; stdout and stderr kept apart."""
    old = Path.cwd()
    os.chdir(cwd)
    try:
        r = CliRunner().invoke(main, [str(a) for a in args], input="")
    finally:
        os.chdir(old)
    assert r.exception is None or isinstance(r.exception, SystemExit), r.exc_info
    return subprocess.CompletedProcess(args, r.exit_code, r.stdout, r.stderr)


def user_error(proc: subprocess.CompletedProcess, *needles: str) -> str:
    """Exit 1, nothing on stdout, one 'error:' line on stderr holding every needle."""
    err = proc.stderr.strip()
    assert proc.returncode == 1, (proc.returncode, proc.stdout, proc.stderr)
    assert proc.stdout == ""
    assert err.startswith("error: ") and "\n" not in err, err
    for n in needles:
        assert n in err, (n, err)
    return err


def write_old_status(data: Path, pid: int, age: float = 0.0) -> None:
    """What a node wrote before it died: a link up, a learned route."""
    data.mkdir(parents=True, exist_ok=True)
    (data / "status.json").write_text(json.dumps({
        "updated": time.time() - age, "pid": pid, "fingerprint": "SHA256:dead",
        "services": ["hello_world"],
        "network": {"local": ["hello_world"],
                    "links": [{"url": "utesla://127.0.0.1:1", "state": "up", "synced": True,
                               "added": 1.0, "rtt_ms": 0.5, "routes": 1, "last_error": ""}],
                    "routes": [{"path": "/ghost", "origin": "SHA256:gone",
                                "next_hop": "utesla://127.0.0.1:1", "hops": 1,
                                "replicas": 1, "routes": 1}]}}))


def store_peer(data: Path) -> None:
    """A node database holding one peer (as the node would have created it)."""
    async def go():
        storage = open_storage(None, data)
        await storage.open()
        try:
            await storage.add_peer(Peer(url="utesla://127.0.0.1:1",
                                        public_key=user_key(tag="peer").public.to_pem(),
                                        user="us", token="ut1_" + "x" * 43, created_at=1.0))
        finally:
            await storage.close()
    asyncio.run(go())


def stored_peers(data: Path) -> list[str]:
    async def go():
        storage = open_storage(None, data)
        await storage.open()
        try:
            return [p.url for p in await storage.list_peers()]
        finally:
            await storage.close()
    return asyncio.run(go())


@pytest.fixture
def node_dir(tmp_path) -> Path:
    """A node's folder: services and keys, as after a node ran there."""
    folder = tmp_path / "node"
    (folder / "complements").mkdir(parents=True)
    (folder / "complements" / "hello_world.py").write_text(
        (REPO / "complements" / "hello_world.py").read_text())
    write_key_pair(user_key(tag="node"), folder / "keys" / "key.pub", folder / "keys" / "key.priv")
    write_key_pair(user_key(tag="peer"), folder / "peer.pub", folder / "peer.priv")
    return folder


# --------------------------------------------------------------------------- no running node

@pytest.mark.parametrize("why,age", [("dead pid, fresh file", 0.0), ("stale file", 60.0)])
def test_show_commands_refuse_a_dead_nodes_status_file(node_dir, dead_pid, why, age):
    data = node_dir / "data"
    store_peer(data)
    write_old_status(data, dead_pid if age == 0 else os.getpid(), age)
    for args in (("show_services",), ("show_services", "--json"), ("show_networks",),
                 ("show_networks", "--json")):
        err = user_error(cli(*args, cwd=node_dir), f"{NO_NODE} {data}",
                         "start utesla-node or pass -c node.ini")
        assert "/ghost" not in err
    user_error(cli("status", cwd=node_dir), f"{NO_NODE} {data}", "give the node's URL")


def test_show_commands_without_any_status_file(node_dir):
    store_peer(node_dir / "data")
    for args in (("show_services",), ("show_networks",), ("graph",)):
        user_error(cli(*args, cwd=node_dir), NO_NODE, "does not exist")


def test_add_network_wait_without_a_running_node_fails_before_storing(node_dir, dead_pid):
    data = node_dir / "data"
    store_peer(data)
    write_old_status(data, dead_pid)
    proc = cli("add_network", "utesla://127.0.0.1:2", "-s", "peer.pub", "-u", "us",
               "-t", "ut1_" + "y" * 43, "--wait", "--wait-timeout", "1", cwd=node_dir)
    user_error(proc, f"{NO_NODE} {data}", "start utesla-node or pass -c node.ini")
    assert stored_peers(data) == ["utesla://127.0.0.1:1"]      # nothing added


def test_show_services_of_a_node_killed_a_moment_ago(tmp_path):
    """The real thing: SIGKILL skips the clean-up, so the node's last file stays behind."""
    folder = tmp_path / "n"
    (folder / "complements").mkdir(parents=True)
    (folder / "complements" / "hello_world.py").write_text(
        (REPO / "complements" / "hello_world.py").read_text())
    node = NodeProcess(folder, "--port", "0").start()
    try:
        listed = run_cli("show_services", "--json", cwd=folder)
        assert [r["path"] for r in json.loads(listed.stdout)] == ["/hello_world"]
    finally:
        node.stop(sig=9)
    assert (folder / "data" / "status.json").exists()          # left behind
    gone = run_cli("show_services", cwd=folder, check=False)
    user_error(gone, f"{NO_NODE} {folder / 'data'}")


# --------------------------------------------------------------------------- the wrong folder

def test_admin_commands_in_a_stray_folder_create_nothing(tmp_path):
    stray = tmp_path / "home"
    stray.mkdir()
    write_key_pair(user_key(tag="alice"), stray / "alice.pub", stray / "alice.priv")
    add = cli("add", "-u", "alice", "-p", "pw", "-i", "alice.pub", cwd=stray)
    user_error(add, "cannot add user 'alice'", f"no node database at {stray / 'data'}",
               "-c node.ini", "--create")
    for args, what in ((("show",), "cannot list users"),
                       (("del", "alice"), "cannot remove user 'alice'"),
                       (("tokens", "alice"), "cannot list the tokens of 'alice'"),
                       (("passwd", "-u", "alice", "-p", "x"), "cannot change the password"),
                       (("revoke", "alice", "--all"), "cannot revoke tokens of 'alice'"),
                       (("del_network", "utesla://127.0.0.1:1"), "cannot remove network"),
                       (("set_priority", "utesla://127.0.0.1:1", "3"), "cannot set the prio")):
        err = user_error(cli(*args, cwd=stray), what, str(stray / "data"), "-c node.ini",
                         "utesla-node creates its database on first start")
        assert "--create" not in err                  # these never create anything
    add_network = cli("add_network", "utesla://127.0.0.1:1", "-s", "alice.pub",
                      "-p", "alice.pub", "-P", "alice.priv", "-u", "us", "-t", "ut1_x",
                      cwd=stray)
    user_error(add_network, "cannot add network", "--create")
    assert sorted(p.name for p in stray.iterdir()) == ["alice.priv", "alice.pub"]


def test_create_makes_a_database_where_asked(tmp_path):
    stray = tmp_path / "elsewhere"
    stray.mkdir()
    write_key_pair(user_key(tag="alice"), stray / "alice.pub", stray / "alice.priv")
    add = cli("add", "-u", "alice", "-p", "pw", "-i", "alice.pub", "--create", cwd=stray)
    assert add.returncode == 0 and add.stdout.startswith("user alice added"), add.stderr
    assert (stray / "data" / "utesla.db").is_file()
    shown = cli("show", cwd=stray)
    assert shown.returncode == 0 and "alice" in shown.stdout


def test_a_nodes_folder_before_its_first_start(node_dir):
    """The blog's order: the admin may register users before starting the node; the
    commands that only read or change entries still say there is no database yet."""
    shown = cli("show", cwd=node_dir)
    user_error(shown, "cannot list users", "utesla-node creates its database on first start")
    assert not (node_dir / "data").exists()
    add = cli("add", "-u", "peer", "-p", "pw", "-i", "peer.pub", cwd=node_dir)
    assert add.returncode == 0, add.stderr
    assert (node_dir / "data" / "utesla.db").is_file()
    assert "peer" in cli("show", cwd=node_dir).stdout


def test_config_names_the_node_from_anywhere(tmp_path, node_dir):
    """``-c node.ini`` points at the node's folders (relative to the file), and a
    node.ini is a node's: ``add`` may create its database before the first start."""
    (node_dir / "node.ini").write_text("[server]\ndata = state\n")
    other = tmp_path / "other"
    other.mkdir()
    ini = node_dir / "node.ini"
    add = cli("add", "-u", "peer", "-p", "pw", "-i", node_dir / "peer.pub", "-c", ini,
              cwd=other)
    assert add.returncode == 0, add.stderr
    assert (node_dir / "state" / "utesla.db").is_file() and not (other / "data").exists()
    assert "peer" in cli("show", "-c", ini, cwd=other).stdout
    # The same from the node's folder, found as ./node.ini.
    assert "peer" in cli("show", cwd=node_dir).stdout


def test_sqlite_url_naming_a_missing_file_is_refused(tmp_path):
    folder = tmp_path / "n"
    folder.mkdir()
    (folder / "node.ini").write_text("[database]\nurl = sqlite:db/users.db\n")
    user_error(cli("show", cwd=folder), f"no node database at {folder / 'db' / 'users.db'}")
    assert not (folder / "db").exists()


# --------------------------------------------------------------------------- new user commands

def test_change_services_token_limit_and_renew(node_dir):
    from utesla_node import auth

    assert cli("add", "-u", "gus", "-p", "pw", "-i", "peer.pub", "--token-limit", "0",
               cwd=node_dir).returncode == 0

    async def issue():
        storage = open_storage(None, node_dir / "data")
        await storage.open()
        try:
            _, record = await auth.Authority(storage).issue_token("gus", expire=60.0)
            return record.token_hash.hex()
        finally:
            await storage.close()

    token_id = asyncio.run(issue())[:12]
    renewed = cli("renew", "gus", "--id", token_id[:6], cwd=node_dir)
    assert renewed.returncode == 0, renewed.stderr
    assert renewed.stdout.startswith(f"token {token_id} of gus renewed, valid until ")
    changed = cli("change_services", "-u", "gus", "--scope", "hello_world", "--guest",
                  cwd=node_dir)
    assert changed.stdout == "guest gus may reach hello_world; its tokens are revoked\n"
    listing = cli("tokens", "gus", cwd=node_dir).stdout
    assert token_id in listing and "revoked" in listing
    user_error(cli("renew", "gus", "--id", token_id, cwd=node_dir), "revoked")
    limited = cli("set-token-limit", "-u", "gus", "5", cwd=node_dir)
    assert limited.stdout == "token limit of gus set to 5; its tokens are revoked\n"
    row = next(l for l in cli("show", "gus", cwd=node_dir).stdout.splitlines()
               if l.startswith("gus"))
    assert row.split()[3:5] == ["5", "yes"]           # TOKENS, GUEST
    user_error(cli("set-token-limit", "-u", "nobody", "2", cwd=node_dir), "no user 'nobody'")
    user_error(cli("renew", "gus", "--id", "zz", cwd=node_dir), "no token of gus matches")
