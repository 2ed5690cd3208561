"""``utesla-node`` as a real process: first start, node.ini, bad configs, signals."""
from __future__ import annotations

import asyncio
import os
import shutil
import signal
import stat
import subprocess
import sys
import textwrap
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import pytest

from helpers import (BIN, REPO, NodeProcess, folder_config, register_user, run_cli, user_key,
                     wait_for)
from protocol.errors import NotFound
from utesla_node import Client
from utesla_node.keys import load_private_key, load_public_key, write_key_pair


def _node_folder(path: Path, services: dict[str, str] | None = None,
                 folder: str = "complements") -> Path:
    (path / folder).mkdir(parents=True, exist_ok=True)
    for f in (REPO / "complements").glob("*.py"):
        shutil.copy(f, path / folder / f.name)
    for name, code in (services or {}).items():
        (path / folder / f"{name}.py").write_text(textwrap.dedent(code))
    return path


@pytest.fixture
def procs():
    started: list[NodeProcess] = []
    yield started
    for p in started:
        p.stop(signal.SIGKILL)          # a no-op for a stopped node; closes its stdout pipe


def _start(procs, folder, *args) -> NodeProcess:
    p = NodeProcess(folder, *args)
    procs.append(p)
    return p.start()


async def _client_for(node: NodeProcess, *config_args, user="alice") -> Client:
    """Register ``user`` in the node's database and return a connected client with a token."""
    cfg = folder_config(node.folder, *config_args)
    key = await register_user(cfg, user)
    node_key = load_public_key(cfg.keys_dir / "key.pub")
    c = Client(f"utesla://127.0.0.1:{node.port}", user=user, private_key=key, node_key=node_key)
    c.token = await c.generate_token("pw")
    return c


def _mode(path: Path) -> int:
    return stat.S_IMODE(path.stat().st_mode)


async def test_first_start_creates_keys_and_data_and_prints_the_real_port(tmp_path, procs):
    folder = _node_folder(tmp_path / "n")
    node = _start(procs, folder, "--port", "0")
    assert node.port and node.port != 17000
    assert f"listening on utesla://127.0.0.1:{node.port}" in node.lines[-2]
    keys = folder / "keys"
    assert (keys / "key.pub").is_file() and (keys / "key.priv").is_file()
    assert _mode(keys / "key.priv") == 0o600
    assert _mode(keys) & 0o077 == 0
    key = load_private_key(keys / "key.priv")
    assert key.kind == "ed25519"
    assert load_public_key(keys / "key.pub") == key.public
    assert key.public.fingerprint() in node.lines[-1]
    assert any((folder / "data").iterdir())
    c = await _client_for(node)
    assert (await c.get("/hello_world")).text == "Hello World!"
    await c.close()
    assert node.stop() == 0
    # A second start keeps the same identity.
    again = _start(procs, folder, "--port", "0")
    assert load_private_key(keys / "key.priv").public == key.public
    assert again.stop() == 0


NODE_INI = """\
[server]
host = 127.0.0.1
port = 0
services = svc
keys = k
data = d

[database]
url = sqlite:db/node.db

[crypt limits]
key_type = rsa
rsa_key_length = 2048
token_expire = 3600
"""


async def test_config_file_sets_folders_database_and_rsa_node_key(tmp_path, procs):
    folder = _node_folder(tmp_path / "n", folder="svc")
    (folder / "db").mkdir()
    (folder / "node.ini").write_text(NODE_INI)
    node = _start(procs, folder, "--config", "node.ini")
    key = load_private_key(folder / "k" / "key.priv")
    assert (key.kind, key.public.bits) == ("rsa", 2048)
    assert _mode(folder / "k" / "key.priv") == 0o600
    assert (folder / "db" / "node.db").is_file()
    assert not (folder / "keys").exists() and not (folder / "complements").exists()
    # The admin CLI finds the same database through --config, from another directory.
    write_key_pair(user_key(tag="bob"), tmp_path / "bob.pub", tmp_path / "bob.priv")
    run_cli("add", "-u", "bob", "-p", "pw", "-i", "bob.pub", "--config", "n/node.ini",
            cwd=tmp_path)
    c = Client(f"utesla://127.0.0.1:{node.port}", user="bob", private_key=tmp_path / "bob.priv",
               node_key=folder / "k" / "key.pub")
    reply = await c.post("/_node/token", args={"password": "pw"})
    c.token = reply.text
    import time
    assert abs(float(reply.headers["expires-at"]) - (time.time() + 3600)) < 120
    assert (await c.get("/hello_world")).text == "Hello World!"
    await c.close()
    assert node.stop() == 0


BAD_CONFIGS = {
    "unknown section": ("[server]\nport = 0\n[servr]\nhost = x\n", ["servr"]),
    "unknown key": ("[server]\nprot = 0\n", ["[server]", "prot"]),
    "bad port": ("[server]\nport = seventeen\n", ["[server]", "port", "seventeen"]),
    "port out of range": ("[server]\nport = 70000\n", ["[server]", "port"]),
    "bad key type": ("[crypt limits]\nkey_type = dsa\n", ["[crypt limits]", "key_type"]),
    "weak rsa": ("[crypt limits]\nrsa_key_length = 1024\n",
                 ["[crypt limits]", "rsa_key_length"]),
    "bad token_expire": ("[crypt limits]\ntoken_expire = -5\n",
                         ["[crypt limits]", "token_expire"]),
    "not ini": ("port = 1\n", []),
    "duplicate key": ("[server]\nport = 1\nport = 2\n", ["port"]),
}


def test_bad_node_ini_exits_1_naming_file_section_and_key(tmp_path):
    def run(item):
        name, (text, needles) = item
        d = tmp_path / name.replace(" ", "_")
        d.mkdir()
        (d / "bad.ini").write_text(text)
        proc = subprocess.run([str(BIN / "utesla-node"), "--config", "bad.ini"], cwd=d,
                              capture_output=True, text=True, timeout=60)
        return name, needles, proc, d

    with ThreadPoolExecutor(4) as ex:
        results = list(ex.map(run, BAD_CONFIGS.items()))
    for name, needles, proc, d in results:
        assert proc.returncode == 1, (name, proc.returncode, proc.stderr)
        err = proc.stderr.strip()
        assert err.startswith("error:") and "\n" not in err, (name, err)
        assert "Traceback" not in proc.stderr
        assert "bad.ini" in err, (name, err)
        for needle in needles:
            assert needle in err, (name, needle, err)
        assert not (d / "keys").exists(), name     # nothing created before the check
    # a missing file is an error too
    proc = subprocess.run([str(BIN / "utesla-node"), "--config", "nope.ini"], cwd=tmp_path,
                          capture_output=True, text=True, timeout=60)
    assert proc.returncode == 1 and "nope.ini" in proc.stderr


async def test_sigterm_lets_requests_in_flight_finish_then_exits_0(tmp_path, procs):
    folder = _node_folder(tmp_path / "n")
    node = _start(procs, folder, "--port", "0")
    c = await _client_for(node)
    chunks = []
    async with c.stream("GET", "/countdown", args={"n": 4, "delay": 0.15}) as resp:
        it = resp.__aiter__()
        chunks.append(await it.__anext__())           # the request is running
        node.proc.send_signal(signal.SIGTERM)
        chunks += [chunk async for chunk in it]
    assert b"".join(chunks) == b"4\n3\n2\n1\nliftoff\n"
    loop = asyncio.get_running_loop()
    assert await loop.run_in_executor(None, node.proc.wait, 20) == 0
    await c.close()
    log = node.log()
    assert "stopping (SIGTERM)" in log and "1 request(s) in flight" in log


HANG = """
    import asyncio

    class Handler:
        async def get(self):
            await self.write("started ")
            await self.flush()
            await asyncio.Event().wait()
"""


async def test_sigterm_cancels_what_outlives_the_grace_period_and_exits_0(tmp_path, procs):
    folder = _node_folder(tmp_path / "n", {"hang": HANG})
    (folder / "node.ini").write_text("[server]\nport = 0\ngrace_period = 0.5\n")
    node = _start(procs, folder)                       # ./node.ini is found by default
    c = await _client_for(node)
    loop = asyncio.get_running_loop()
    with pytest.raises(Exception) as ei:
        async with c.stream("GET", "/hang") as resp:
            it = resp.__aiter__()
            assert await it.__anext__() == b"started "
            node.proc.send_signal(signal.SIGTERM)
            async for _ in it:
                pass
    assert getattr(ei.value, "status", None) == 503, repr(ei.value)
    assert await loop.run_in_executor(None, node.proc.wait, 20) == 0
    await c.close()


SLOW_V1 = """
    import asyncio

    class Handler:
        async def get(self):
            gate = self.node.__dict__.setdefault("test_gate", asyncio.Event())
            await self.write("v1 start, ")
            await self.flush()
            await asyncio.wait_for(gate.wait(), 20)
            await self.write("v1 end")
"""
SLOW_V2 = """
    class Handler:
        async def get(self):
            await self.write("v2")
"""
OPENER = """
    class Handler:
        async def get(self):
            self.node.test_gate.set()
            await self.write("opened")
"""
FRESH = """
    class Handler:
        async def get(self):
            await self.write("fresh")
"""


async def test_sighup_reloads_services_running_request_keeps_old_code(tmp_path, procs):
    folder = _node_folder(tmp_path / "n", {"slow": SLOW_V1, "opener": OPENER})
    node = _start(procs, folder, "--port", "0")
    c = await _client_for(node)
    with pytest.raises(NotFound):
        await c.get("/fresh")
    async with c.stream("GET", "/slow") as resp:
        it = resp.__aiter__()
        assert await it.__anext__() == b"v1 start, "
        # New code on disk, then SIGHUP, while that request is still running.
        (folder / "complements" / "fresh.py").write_text(textwrap.dedent(FRESH))
        (folder / "complements" / "slow.py").write_text(textwrap.dedent(SLOW_V2))
        node.proc.send_signal(signal.SIGHUP)

        async def fresh_served() -> bool:
            return (await c.get("/fresh", check=False)).status == 200

        await wait_for(fresh_served, timeout=10, interval=0.05)
        assert (await c.get("/slow")).text == "v2"             # new requests: new code
        assert (await c.get("/opener")).text == "opened"
        rest = b"".join([chunk async for chunk in it])
    assert rest == b"v1 end"                                     # the old one: old code
    await c.close()
    assert node.stop() == 0
    assert "services reloaded" in node.log()


def test_python_m_utesla_node_help(tmp_path):
    proc = subprocess.run([sys.executable, "-m", "utesla_node", "--help"], cwd=tmp_path,
                          capture_output=True, text=True, timeout=60,
                          env={**os.environ, "PYTHONPATH": str(REPO)})
    assert proc.returncode == 0, proc.stderr
    assert "Usage:" in proc.stdout and "--config" in proc.stdout and "--port" in proc.stdout
    assert not any(tmp_path.iterdir())                      # --help creates nothing
