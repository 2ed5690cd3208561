"""Logs of a full run: one INFO line per request, text and JSON, and never a secret.

Two ``utesla-node`` processes at ``[logging] level = DEBUG``, the first writing text, the
second JSON.  Users with an RSA key (alice, on the first) and an Ed25519 key (bob, on the
second) are added with known passwords and get tokens; the first node links to the second
with its own token there; requests succeed, are forwarded, and fail in every way (wrong
password, unknown token, no such service, wrong method, a handler that raises); the listing
commands run.  Then every log line and every CLI output is searched for every secret used:
the private keys' PEM bodies, the passwords, the tokens (and any 12-character piece of a
token).  Tokens are printed only by ``generate_token``, whose job that is.
"""
from __future__ import annotations

import asyncio
import collections
import io
import json
import logging
import re
import secrets
from pathlib import Path


from helpers import NodeProcess, run_cli, wait_for
from utesla_node import Client
from utesla_node.logs import configure

INI = """[network]
gossip_interval = 0.3
heartbeat_interval = 0.5

[logging]
level = DEBUG
format = {fmt}
"""

GREET = "class Handler:\n    async def get(self):\n        await self.write('hello!')\n"
REMOTE = "class Handler:\n    async def get(self):\n        await self.write('far away')\n"
BOOM = ("class Handler:\n    async def get(self):\n"
        "        raise RuntimeError('handler failed on purpose')\n")

#: "alice GET /greet -> 200 6B 0.4ms": user, method, path, status, body bytes, duration.
REQUEST = re.compile(r"^(?P<user>\S+) (?P<method>[A-Z]+) (?P<path>/\S*) -> (?P<status>\d{3}) "
                     r"(?P<bytes>\d+)B (?P<ms>\d+\.\d)ms$")
TEXT_LINE = re.compile(r"^\d{4}-\d\d-\d\d \d\d:\d\d:\d\d,\d{3} (?P<level>[A-Z]+) +"
                       r"(?P<logger>[\w.]+): (?P<message>.*)$")


def pem_body_lines(path: Path) -> list[str]:
    lines = [l.strip() for l in path.read_text().splitlines()]
    body = [l for l in lines if l and not l.startswith("-----")]
    assert body and all(len(l) >= 16 for l in body[:-1]), path
    return body


def pieces(secret: str, n: int = 12) -> set[str]:
    """Every ``n``-character piece of a random secret: a partial leak counts too."""
    return {secret[i:i + n] for i in range(len(secret) - n + 1)}


def text_requests(log: str) -> list[dict]:
    out = []
    for line in log.splitlines():
        m = TEXT_LINE.match(line)
        if m and m["logger"] == "utesla.request" and m["level"] == "INFO":
            r = REQUEST.match(m["message"])
            assert r, f"request line without user/path/status/bytes/duration: {line!r}"
            out.append(r.groupdict())
    return out


def json_records(log: str) -> list[dict]:
    records = []
    for line in log.splitlines():
        if not line.strip():
            continue
        rec = json.loads(line)          # every line is one JSON object, tracebacks included
        assert {"time", "level", "logger", "message"} <= set(rec), rec
        records.append(rec)
    return records


def kinds(requests: list[dict], user: str) -> collections.Counter:
    return collections.Counter((r["method"], r["path"], int(r["status"]))
                               for r in requests if r["user"] == user)


async def test_full_run_logs_every_request_and_no_secret(tmp_path):
    n1_dir, n2_dir, home = tmp_path / "n1", tmp_path / "n2", tmp_path / "home"
    for d, fmt, services in ((n1_dir, "text", {"greet": GREET, "boom": BOOM}),
                             (n2_dir, "json", {"remote": REMOTE, "boom2": BOOM})):
        (d / "complements").mkdir(parents=True)
        for name, code in services.items():
            (d / "complements" / f"{name}.py").write_text(code)
        (d / "node.ini").write_text(INI.format(fmt=fmt))
    home.mkdir()

    passwords = {"alice": "alice-Pw-" + secrets.token_hex(8),
                 "bob": "bob-Pw-" + secrets.token_hex(8),
                 "node1": "node1-Pw-" + secrets.token_hex(8),
                 "wrong": "wrong-Pw-" + secrets.token_hex(8)}
    bad_token = "ut1_" + secrets.token_urlsafe(32)[:43]
    outputs: list[tuple[str, str]] = []           # (command, stdout + stderr) of every CLI run

    def cli(*args, cwd, input=None, check=True):
        proc = run_cli(*args, cwd=cwd, input=input, check=check)
        outputs.append((" ".join(map(str, args[:2])), proc.stdout + proc.stderr))
        return proc

    def cli_token(*args, cwd, input):
        """generate_token: prints the token (its job), and nothing else."""
        proc = run_cli(*args, cwd=cwd, input=input)
        token = proc.stdout.strip()
        assert re.fullmatch(r"ut1_[A-Za-z0-9_-]{20,}", token) and proc.stdout == token + "\n"
        outputs.append(("generate_token (stderr)", proc.stderr))
        return token

    n1, n2 = NodeProcess(n1_dir, "--port", "0"), NodeProcess(n2_dir, "--port", "0")
    try:
        n1.start()
        n2.start()
        url1, url2 = f"utesla://127.0.0.1:{n1.port}", f"utesla://127.0.0.1:{n2.port}"

        # Users: alice (RSA) on n1, bob (Ed25519) on n2, with known passwords.
        cli("generate_keys", "-bit_size", "2048", "-out-public-key", "alice.pub",
            "-out-private-key", "alice.priv", cwd=home)
        cli("generate_keys", "-out-public-key", "bob.pub", "-out-private-key", "bob.priv",
            cwd=home)
        cli("add", "-u", "alice", "-p", "-", "-i", "../home/alice.pub", "--token-limit", "0",
            cwd=n1_dir, input=passwords["alice"] + "\n")
        cli("add", "-u", "bob", "-p", "-", "-i", "../home/bob.pub", cwd=n2_dir,
            input=passwords["bob"] + "\n")
        alice_args = ["-u", "alice", "-p", "-", "-s", "../n1/keys/key.pub", "-i", "alice.pub",
                      "-I", "alice.priv"]
        wrong = cli("generate_token", url1, *alice_args, cwd=home,
                    input=passwords["wrong"] + "\n", check=False)
        assert wrong.returncode == 1 and "status 401" in wrong.stderr, wrong.stderr
        alice_token = cli_token("generate_token", url1, *alice_args, cwd=home,
                                input=passwords["alice"] + "\n")
        bob_token = cli_token("generate_token", url2, "-u", "bob", "-p", "-",
                              "-s", "../n2/keys/key.pub", "-i", "bob.pub", "-I", "bob.priv",
                              cwd=home, input=passwords["bob"] + "\n")

        # n1 links to n2 with the account n2's admin made for it; a wrong token first.
        cli("add", "-u", "node1", "-p", "-", "-i", "../n1/keys/key.pub", cwd=n2_dir,
            input=passwords["node1"] + "\n")
        peer_token = cli_token("generate_token", url2, "-u", "node1", "-p", "-",
                               "-s", "keys/key.pub", "-i", "../n1/keys/key.pub",
                               "-I", "../n1/keys/key.priv", cwd=n2_dir,
                               input=passwords["node1"] + "\n")
        refused = cli("add_network", url2, "-s", "../n2/keys/key.pub", "-u", "node1", "-t", "-",
                      cwd=n1_dir, input=bad_token + "\n", check=False)
        assert refused.returncode == 1 and "status 401" in refused.stderr, refused.stderr
        cli("add_network", url2, "-s", "../n2/keys/key.pub", "-u", "node1", "-t", "-",
            cwd=n1_dir, input=peer_token + "\n")

        def routed() -> bool:
            try:
                st = json.loads((n1_dir / "data" / "status.json").read_text())
            except (FileNotFoundError, ValueError):
                return False
            return any(r["path"] == "/remote" for r in st["network"]["routes"])

        await wait_for(routed, 20, interval=0.05)

        # Requests, as alice on n1 (forwarded ones included) and bob on n2, failing ones too.
        async with Client(url1, user="alice", private_key=home / "alice.priv",
                          node_key=n1_dir / "keys" / "key.pub", token=alice_token) as c:
            for _ in range(3):
                assert (await c.get("/greet")).text == "hello!"
            for _ in range(2):
                assert (await c.get("/remote")).text == "far away"
            assert (await c.get("/nosuch", check=False)).status == 404
            assert (await c.post("/greet", b"x", check=False)).status == 405
            boom = await c.get("/boom", check=False)
            assert boom.status == 500 and b"internal error (id " in boom.body
            assert (await c.get("/greet", token=bad_token, check=False)).status == 401
        async with Client(url2, user="bob", private_key=home / "bob.priv",
                          node_key=n2_dir / "keys" / "key.pub", token=bob_token) as c:
            for _ in range(2):
                assert (await c.get("/remote")).text == "far away"
            assert (await c.get("/nosuch", check=False)).status == 404
            assert (await c.get("/boom2", check=False)).status == 500
            assert (await c.get("/remote", token=bad_token, check=False)).status == 401
        as_alice = ["-u", "alice", "-I", "alice.priv", "-s", "../n1/keys/key.pub",
                    "-t", alice_token]
        assert (await asyncio.to_thread(cli, "call", url1 + "/greet", *as_alice,
                                        cwd=home)).stdout == "hello!"
        missing = await asyncio.to_thread(cli, "call", url1 + "/nosuch", *as_alice, cwd=home,
                                          check=False)
        assert missing.returncode == 1 and "status 404" in missing.stderr

        # Every listing command, on both nodes: none may print a token.
        listings = [(n1_dir, ("show",)), (n1_dir, ("tokens", "alice")),
                    (n1_dir, ("show_networks",)), (n1_dir, ("show_networks", "--json")),
                    (n1_dir, ("show_services",)), (n1_dir, ("status", "--json")),
                    (n1_dir, ("graph", "--format", "html")),
                    (n2_dir, ("tokens", "node1")), (n2_dir, ("tokens", "bob"))]
        await asyncio.gather(*(asyncio.to_thread(cli, *args, cwd=d) for d, args in listings))
        listed = next(out for cmd, out in outputs if cmd == "tokens alice")
        assert re.search(r"^[0-9a-f]{12} +live ", listed, re.M), listed      # ids, not tokens
        state_files = {d.name: (d / "data" / "status.json").read_text() for d in (n1_dir, n2_dir)}
    finally:
        codes = []
        for n in (n1, n2):
            try:
                codes.append(n.stop())
            except AssertionError as exc:        # did not stop in time: killed
                codes.append(str(exc))
    assert codes == [0, 0]
    logs = {"n1": n1.log() + n1.output, "n2": n2.log() + n2.output}

    # ---------------------------------------------------------------- one line per request
    text = text_requests(logs["n1"])
    assert kinds(text, "alice") == collections.Counter({
        ("POST", "/_node/token", 401): 1, ("POST", "/_node/token", 200): 1,
        ("GET", "/greet", 200): 4, ("GET", "/remote", 200): 2, ("GET", "/nosuch", 404): 2,
        ("POST", "/greet", 405): 1, ("GET", "/boom", 500): 1, ("GET", "/greet", 401): 1,
    }), text
    assert {int(r["bytes"]) for r in text if r["path"] == "/greet" and r["status"] == "200"} \
        == {len("hello!")}
    assert {int(r["bytes"]) for r in text if r["path"] == "/remote"} == {len("far away")}
    assert all(float(r["ms"]) >= 0 for r in text)
    assert re.search(r" ERROR +utesla\.request: error [0-9a-f]{12} in GET /boom \(user alice\)"
                     r"\nTraceback", logs["n1"]), "the handler's traceback is logged"
    assert "\033[" not in logs["n1"], "no colour codes when standard error is a file"
    assert " DEBUG " in logs["n1"]                     # the level really is DEBUG

    records = json_records(logs["n2"])
    assert any(r["level"] == "DEBUG" for r in records)
    request_records = [r for r in records if r["logger"] == "utesla.request"
                       and r["level"] == "INFO"]
    parsed = []
    for r in request_records:
        m = REQUEST.match(r["message"])
        assert m, f"request record without user/path/status/bytes/duration: {r}"
        parsed.append(m.groupdict())
    assert kinds(parsed, "bob") == collections.Counter({
        ("POST", "/_node/token", 200): 1, ("GET", "/remote", 200): 2, ("GET", "/nosuch", 404): 1,
        ("GET", "/boom2", 500): 1, ("GET", "/remote", 401): 1}), parsed
    # The first node's account: its token, the add_network checks, the two forwarded
    # requests (and the gossip subscription, logged when it ended).
    node1 = kinds(parsed, "node1")
    assert node1[("POST", "/_node/token", 200)] == 1
    assert node1[("GET", "/_node/net/status", 401)] == 1
    assert node1[("GET", "/_node/net/status", 200)] == 1
    assert node1[("GET", "/remote", 200)] == 2
    errors = [r for r in records if r["level"] == "ERROR" and "/boom2" in r["message"]]
    assert len(errors) == 1 and "RuntimeError: handler failed on purpose" in \
        errors[0]["traceback"]

    # ---------------------------------------------------------------- no secret anywhere
    keys = {f"{p.parent.name}/{p.name}": pem_body_lines(p)
            for p in (home / "alice.priv", home / "bob.priv", n1_dir / "keys" / "key.priv",
                      n2_dir / "keys" / "key.priv")}
    assert len(keys["home/alice.priv"]) > 10               # RSA: many lines
    tokens = {"alice": alice_token, "bob": bob_token, "peer": peer_token, "bad": bad_token}
    haystacks = {f"log {k}": v for k, v in logs.items()}
    haystacks.update({f"status.json {k}": v for k, v in state_files.items()})
    haystacks.update({f"`utesla-cli {cmd}` output #{i}": out
                      for i, (cmd, out) in enumerate(outputs)})
    for where, text in haystacks.items():
        for name, lines in keys.items():
            for line in lines:
                assert line not in text, f"private key {name} in {where}"
        for name, pw in passwords.items():
            assert pw not in text, f"password of {name} in {where}"
        for name, tok in tokens.items():
            leaked = [p for p in pieces(tok[4:]) if p in text]
            assert not leaked, f"{name}'s token (or a piece of it: {leaked[0]}) in {where}"


def test_text_logs_are_coloured_on_a_terminal_only():
    class Tty(io.StringIO):
        def isatty(self):
            return True

    root = logging.getLogger()
    saved = (list(root.handlers), root.level)
    try:
        for stream, coloured in ((Tty(), True), (io.StringIO(), False)):
            configure("INFO", "text", stream=stream)
            logging.getLogger("utesla.test").warning("careful")
            logging.getLogger("utesla.test").error("broken")
            out = stream.getvalue()
            assert ("\033[33m" in out and "\033[31m" in out) == coloured, repr(out)
            assert ("\033[" in out) == coloured
        stream = Tty()
        configure("INFO", "json", stream=stream)       # JSON is never coloured
        logging.getLogger("utesla.test").warning("careful")
        assert json.loads(stream.getvalue())["message"] == "careful"
    finally:
        for h in list(root.handlers):
            root.removeHandler(h)
        for h in saved[0]:
            root.addHandler(h)
        root.setLevel(saved[1])
