"""The blog, followed by a new user, through the real console scripts.

Every command is the blog's with ``./UTeslaCLI`` -> ``utesla-cli`` and ``./UTesla``
-> ``utesla-node``; the client script is the blog's with only its import line
changed (``from modules.Infrastructure import client`` -> ``from utesla_node import
client``) and its blanks filled in.
"""
from __future__ import annotations

import shutil
import time
import stat
import subprocess
import sys
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import pytest

from helpers import REPO, NodeProcess, run_cli, user_key
from utesla_node.keys import load_private_key, load_public_key, write_key_pair

#: The blog's script, line for line (its numbering removed), import line changed.
BLOG_SCRIPT = """\
import asyncio
from utesla_node import client
async def main():
    UTeslaClient = client.UTeslaClient('{user}')
    await UTeslaClient.set_server_key('{server_key}')
    await UTeslaClient.set_user_keys('{public_key}', '{private_key}')
    cmd = {{
        'token' : '{token}'
    }}
    Response = await UTeslaClient.fetch(
        'http://localhost:{port}/hello_world',
        cmd,
        method='GET'
    )
    dec_body = UTeslaClient.get_message(Response.body)
    print(dec_body)
if __name__ == '__main__':
    asyncio.run(main())
"""


def _parallel(*calls):
    """Run independent CLI invocations at once (each is a ~1 s Python start-up)."""
    with ThreadPoolExecutor(len(calls)) as ex:
        return [f.result() for f in [ex.submit(fn, *args, **kw) for fn, args, kw in calls]]


def _cli(*args, **kw):
    return (run_cli, args, kw)


def _blog(folder: Path, **fields) -> subprocess.CompletedProcess:
    script = folder / f"blog_{fields['user']}.py"
    script.write_text(BLOG_SCRIPT.format(**fields))
    return subprocess.run([sys.executable, "-W", "error", script.name], cwd=folder,
                          capture_output=True, text=True, timeout=60)


def _user_error(proc, *needles):
    """Exit 1, one line on stderr starting 'error:', no traceback."""
    err = proc.stderr.strip()
    assert proc.returncode == 1, (proc.returncode, proc.stdout, proc.stderr)
    assert err.startswith("error:") and "\n" not in err, err
    assert "Traceback" not in proc.stderr
    for n in needles:
        assert n in err, (n, err)


def _mode(path: Path) -> int:
    return stat.S_IMODE(path.stat().st_mode)


@pytest.fixture
def node_folder(tmp_path):
    folder = tmp_path / "node"
    (folder / "complements").mkdir(parents=True)
    for f in (REPO / "complements").glob("*.py"):
        shutil.copy(f, folder / "complements" / f.name)
    return folder


def test_blog_walkthrough_end_to_end(tmp_path, node_folder):
    users = tmp_path / "users"
    users.mkdir()
    node = NodeProcess(node_folder, "--port", "0").start()
    try:
        port = node.port
        assert port and port != 17000
        # The users make their key pairs: RSA-3072 the blog's way, and the default (Ed25519).
        _parallel(_cli("generate_keys", "-bit_size", "3072", "-out-public-key", "u.pub",
                       "-out-private-key", "u.priv", cwd=users),
                  _cli("generate_keys", "-out-public-key", "e.pub", "-out-private-key", "e.priv",
                       cwd=users))
        rsa = load_private_key(users / "u.priv")
        assert (rsa.kind, rsa.public.bits) == ("rsa", 3072)
        assert load_private_key(users / "e.priv").kind == "ed25519"
        assert load_private_key(node_folder / "keys" / "key.priv").kind == "ed25519"
        for f in ("u.priv", "e.priv"):
            assert _mode(users / f) == 0o600, f
        # The admin registers them (in the node's folder: the defaults find its data).
        _parallel(_cli("add", "-u", "ursula", "-p", "rsa-pass", "-i", users / "u.pub",
                       cwd=node_folder),
                  _cli("add", "-u", "edd", "-p", "ed-pass", "-i", users / "e.pub",
                       cwd=node_folder))
        # Each asks the node for a token.
        url = f"http://localhost:{port}"
        tok_u, tok_e = _parallel(
            _cli("generate_token", url, "-u", "ursula", "-p", "rsa-pass", "-s", "keys/key.pub",
                 "-i", users / "u.pub", "-I", users / "u.priv", cwd=node_folder),
            _cli("generate_token", url, "-u", "edd", "-p", "ed-pass", "-s", "keys/key.pub",
                 "-i", users / "e.pub", "-I", users / "e.priv", cwd=node_folder))
        tokens = {}
        for name, proc in (("ursula", tok_u), ("edd", tok_e)):
            lines = proc.stdout.strip().splitlines()
            assert len(lines) == 1 and lines[0].startswith("ut1_"), proc.stdout
            tokens[name] = lines[0]
        # ... and runs the blog's script.
        server_key = node_folder / "keys" / "key.pub"
        runs = _parallel(
            (_blog, (users,), dict(user="ursula", server_key=server_key, public_key="u.pub",
                                   private_key="u.priv", token=tokens["ursula"], port=port)),
            (_blog, (users,), dict(user="edd", server_key=server_key, public_key="e.pub",
                                   private_key="e.priv", token=tokens["edd"], port=port)))
        for proc in runs:
            assert proc.returncode == 0, proc.stderr
            assert proc.stdout == "Hello World!\n"
            assert proc.stderr == ""
        # A wrong password: exit 1 (the original exited 0), one line, no token printed.
        wrong = run_cli("generate_token", url, "-u", "edd", "-p", "nope", "-s", "keys/key.pub",
                        "-i", users / "e.pub", "-I", users / "e.priv", cwd=node_folder,
                        check=False)
        _user_error(wrong, "401")
        assert wrong.stdout == ""
        # The admin commands around it.
        call, show, toks = _parallel(
            _cli("call", f"{url}/hello_world", "-u", "edd", "-I", users / "e.priv", "-s",
                 server_key, "-t", tokens["edd"], cwd=users),
            _cli("show", cwd=node_folder),
            _cli("tokens", "edd", cwd=node_folder))
        assert call.stdout == "Hello World!"
        assert "ursula" in show.stdout and "rsa3072" in show.stdout and "edd" in show.stdout
        assert "live" in toks.stdout and tokens["edd"] not in toks.stdout
        run_cli("revoke", "edd", "--all", cwd=node_folder)
        # A revocation made outside the node (here: by utesla-cli on the database)
        # reaches it within token_cache_ttl (2 s by default): retry until it has.
        deadline = time.monotonic() + 10
        while True:
            after = _blog(users, user="edd", server_key=server_key, public_key="e.pub",
                          private_key="e.priv", token=tokens["edd"], port=port)
            assert after.returncode == 0
            if "Hello World!" not in after.stdout:
                break
            assert time.monotonic() < deadline, "revoked token still accepted after 10 s"
        # New password through standard input, then a new token with it.
        run_cli("passwd", "-u", "edd", "-p", "-", input="new-pass\n", cwd=node_folder)
        fresh = run_cli("generate_token", url, "-u", "edd", "-p", "-", "-s", "keys/key.pub",
                        "-i", users / "e.pub", "-I", users / "e.priv", input="new-pass\n",
                        cwd=node_folder)
        assert fresh.stdout.strip().startswith("ut1_")
        run_cli("del", "ursula", cwd=node_folder)
        _user_error(run_cli("del", "ursula", cwd=node_folder, check=False), "ursula")
    finally:
        rc = node.stop()
    assert rc == 0, node.log()


REAL_SCRIPT = ("print", "dashed", "add help", "keys help", "missing option", "missing key file")


def test_cli_keys_help_usage_and_user_errors(tmp_path, monkeypatch):
    """A handful through the real console script, the whole table in-process (CliRunner)."""
    from click.testing import CliRunner

    from utesla_node.cli.admin import main

    write_key_pair(user_key(tag="cli"), tmp_path / "e.pub", tmp_path / "e.priv")
    (tmp_path / "not-a-key.pub").write_text("hello\n")
    from Crypto.PublicKey import RSA
    (tmp_path / "weak.pub").write_bytes(RSA.generate(1024).publickey().export_key())
    cases = {
        "print": ("generate_keys",),
        "dashed": ("generate-keys", "--bit-size", "2048", "--out-public-key", "r.pub",
                   "--out-private-key", "r.priv"),
        "add help": ("add", "--help"),
        "keys help": ("generate_keys", "--help"),
        "token help": ("generate_token", "--help"),
        "main help": ("--help",),
        # usage errors: exit 2
        "missing option": ("add", "-u", "x"),
        "bit size range": ("generate_keys", "-bit_size", "100"),
        "no such command": ("frobnicate",),
        "bad type": ("generate_keys", "--type", "dsa"),
        "missing url": ("generate_token",),
        # user errors: exit 1
        "missing key file": ("add", "-u", "x", "-p", "y", "-i", "missing.pub"),
        "private as public": ("add", "-u", "x", "-p", "y", "-i", "e.priv"),
        "garbage key": ("add", "-u", "x", "-p", "y", "-i", "not-a-key.pub"),
        "weak rsa key": ("add", "-u", "x", "-p", "y", "-i", "weak.pub"),
        "no password": ("add", "-u", "x", "-i", "e.pub"),
        "only one out file": ("generate_keys", "-out-public-key", "only.pub"),
        "would overwrite": ("generate_keys", "-out-public-key", "e.pub", "-out-private-key",
                            "new.priv"),
        "ed25519 with bits": ("generate_keys", "--type", "ed25519", "-bit_size", "2048"),
        "same out file": ("generate_keys", "-out-public-key", "k.pem", "-out-private-key",
                          "./k.pem"),
        "missing config": ("show", "--config", "nope.ini"),
        "bad config": ("show", "--config", "e.pub"),
        "unreachable node": ("generate_token", "http://127.0.0.1:1", "-u", "x", "-p", "y",
                             "-s", "e.pub", "-i", "e.pub", "-I", "e.priv"),
        "key pair mismatch": ("generate_token", "http://127.0.0.1:1", "-u", "x", "-p", "y",
                              "-s", "e.pub", "-i", "r.pub", "-I", "e.priv"),
        "del unknown": ("del", "nobody"),
        "revoke neither": ("revoke", "nobody"),
    }
    with ThreadPoolExecutor(len(REAL_SCRIPT)) as ex:
        real = dict(zip(REAL_SCRIPT, ex.map(
            lambda n: run_cli(*cases[n], cwd=tmp_path, check=False, input=""), REAL_SCRIPT)))
    monkeypatch.chdir(tmp_path)
    runner = CliRunner()
    results = {}
    for name, args in cases.items():
        if name in real:
            results[name] = real[name]
            continue
        r = runner.invoke(main, list(args), input="")
        assert not isinstance(r.exception, Exception) or isinstance(r.exception, SystemExit), (
            name, r.exc_info)
        results[name] = subprocess.CompletedProcess(args, r.exit_code, r.stdout, r.stderr)

    ok = results["print"]
    assert ok.returncode == 0
    assert ok.stdout.count("-----BEGIN PUBLIC KEY-----") == 1
    assert ok.stdout.count("-----BEGIN PRIVATE KEY-----") == 1
    assert results["dashed"].returncode == 0, results["dashed"].stderr
    r = load_private_key(tmp_path / "r.priv")
    assert (r.kind, r.public.bits) == ("rsa", 2048)
    assert load_public_key(tmp_path / "r.pub") == r.public
    assert _mode(tmp_path / "r.priv") == 0o600
    for name in ("add help", "keys help", "token help", "main help"):
        assert results[name].returncode == 0, name
        assert "Usage:" in results[name].stdout
    assert "-bit_size" in results["keys help"].stdout
    assert "-out-public-key" in results["keys help"].stdout
    for name in ("missing option", "bit size range", "no such command", "bad type",
                 "missing url"):
        assert results[name].returncode == 2, (name, results[name].stderr)
        assert "Traceback" not in results[name].stderr
    needles = {"missing key file": ["missing.pub"], "private as public": ["private"],
               "garbage key": ["not-a-key.pub"], "no password": ["-p -"],
               "weak rsa key": ["1024", "weak.pub"],
               "only one out file": [], "would overwrite": ["e.pub"],
               "ed25519 with bits": [], "missing config": ["nope.ini"],
               "same out file": ["same file"],
               "bad config": ["e.pub"], "unreachable node": ["127.0.0.1"],
               "key pair mismatch": ["r.pub"], "del unknown": ["nobody"],
               "revoke neither": ["--all"]}
    for name, words in needles.items():
        _user_error(results[name], *words)
    assert (tmp_path / "e.pub").read_text() == user_key(tag="cli").public.to_pem()


def test_add_reads_password_from_stdin(tmp_path, node_folder):
    write_key_pair(user_key(tag="stdin"), tmp_path / "s.pub", tmp_path / "s.priv")
    run_cli("add", "-u", "sam", "-p", "-", "-i", tmp_path / "s.pub", input="from stdin\n",
            cwd=node_folder)
    node = NodeProcess(node_folder, "--port", "0").start()
    try:
        url = f"utesla://127.0.0.1:{node.port}"
        args = ("-u", "sam", "-s", "keys/key.pub", "-i", tmp_path / "s.pub",
                "-I", tmp_path / "s.priv")
        bad, good = _parallel(
            _cli("generate_token", url, "-p", "-", *args, input="-\n", cwd=node_folder,
                 check=False),
            _cli("generate_token", url, "-p", "-", *args, input="from stdin\n",
                 cwd=node_folder, check=False))
        _user_error(bad)
        assert good.returncode == 0 and good.stdout.startswith("ut1_"), good.stderr
    finally:
        assert node.stop() == 0
