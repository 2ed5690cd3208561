"""``utesla-cli``: keys, users, tokens, networks and requests.

Every command of the original description works as written there (with
``./UTeslaCLI`` replaced by ``utesla-cli``), including its spellings
(``generate_keys -bit_size 3072 -out-public-key F``); the dashed spellings work
too.  Commands that touch a node's database find it through ``--config``, else
``./node.ini``, else the defaults.  Exit status: 0 success, 1 error (one line on
stderr), 2 usage.
"""
from __future__ import annotations

import os
import sys
import time
from datetime import datetime, timezone
from pathlib import Path

import click

from protocol.crypto import RSA_DEFAULT_BITS, PrivateKey

from .. import __version__
from ..auth import hash_password, validate_scopes
from ..keys import load_private_key, load_public_key, write_key_pair
from ..storage import NoSuchEntry, User, open_storage
from .common import (Progress, alias, config_option, fail, load_cfg, read_password, run_async,
                     user_errors)

CONTEXT = {"help_option_names": ["-h", "--help"]}


@click.group(context_settings=CONTEXT)
@click.version_option(__version__, prog_name="utesla-cli")
def main():
    """Administer utesla nodes and talk to them."""


def _when(ts: float) -> str:
    return datetime.fromtimestamp(ts, timezone.utc).strftime("%Y-%m-%d %H:%M:%SZ")


async def _with_storage(config_path, fn):
    cfg = load_cfg(config_path)
    storage = open_storage(cfg.database_url or None, cfg.data_dir)
    await storage.open()
    try:
        return await fn(storage, cfg)
    finally:
        await storage.close()


# --------------------------------------------------------------------------- keys

@main.command("generate_keys", context_settings=CONTEXT)
@click.option("-bit_size", "--bit-size", "bit_size", type=click.IntRange(2048, 8192),
              default=None, help="Make an RSA key of this size (2048..8192).")
@click.option("--type", "key_type", type=click.Choice(["ed25519", "rsa"]), default=None,
              help="Key type (default ed25519; rsa when -bit_size is given).")
@click.option("-out-public-key", "--out-public-key", "out_public", type=click.Path(dir_okay=False),
              default=None, help="Write the public key here.")
@click.option("-out-private-key", "--out-private-key", "out_private",
              type=click.Path(dir_okay=False), default=None,
              help="Write the private key here (mode 0600).")
@click.option("--force", is_flag=True, help="Overwrite existing key files.")
@user_errors
def generate_keys(bit_size, key_type, out_public, out_private, force):
    """Make a key pair; with no output files both halves are printed."""
    if key_type is None:
        key_type = "rsa" if bit_size else "ed25519"
    if key_type == "ed25519" and bit_size:
        fail("-bit_size applies to RSA keys only")
    if bool(out_public) != bool(out_private):
        fail("give both -out-public-key and -out-private-key, or neither")
    if out_public:      # checked before the (slow, for RSA) generation
        if Path(out_public).resolve() == Path(out_private).resolve():
            fail("-out-public-key and -out-private-key name the same file")
        for f in (out_public, out_private):
            if Path(f).exists() and not force:
                fail(f"{f} exists (use --force to overwrite)")
    key = PrivateKey.generate(key_type, bit_size or RSA_DEFAULT_BITS)
    if not out_public:
        click.echo(key.public.to_pem(), nl=False)
        click.echo(key.to_pem(), nl=False)
        return
    write_key_pair(key, Path(out_public), Path(out_private))
    click.echo(f"{key.kind} key {key.public.fingerprint()}: public {out_public}, "
               f"private {out_private} (mode 0600)", err=True)


alias(main, generate_keys, "generate-keys")


@main.command(context_settings=CONTEXT)
@click.argument("key_file", type=click.Path(dir_okay=False))
@user_errors
def fingerprint(key_file):
    """Print the fingerprint of a public (or private) key file."""
    try:
        key = load_public_key(key_file)
    except Exception:
        key = load_private_key(key_file).public
    click.echo(key.fingerprint())


# --------------------------------------------------------------------------- users

@main.command(context_settings=CONTEXT)
@click.option("-u", "--user", required=True, help="User name.")
@click.option("-p", "--password", default=None,
              help="Password ('-' reads it from standard input; omitted: prompted).")
@click.option("-i", "--public-key", "public_key", required=True,
              type=click.Path(dir_okay=False), help="The user's public key file.")
@click.option("--token-limit", type=click.IntRange(0, 1_000_000), default=1, show_default=True,
              help="Live tokens the user may hold (0 = unlimited).")
@click.option("--guest", is_flag=True, help="A guest reaches only its --scope services.")
@click.option("--scope", "scopes", multiple=True,
              help="Service glob the user may reach (repeatable; default all).")
@click.option("--overwrite", is_flag=True, help="Replace an existing user (revokes its tokens).")
@config_option
@user_errors
def add(user, password, public_key, token_limit, guest, scopes, overwrite, config_path):
    """Register a user with a password and a public key."""
    key = load_public_key(public_key)
    password = read_password(password, confirm=True)
    if not password:
        fail("the password must not be empty")
    scopes = validate_scopes(scopes) if scopes else ("*",)

    async def go(storage, cfg):
        record = User(name=user, password_hash=await hash_password(password),
                      public_key=key.to_pem(), token_limit=token_limit, guest=guest,
                      scopes=scopes, created_at=time.time())
        await storage.add_user(record, overwrite=overwrite)

    run_async(_with_storage(config_path, go))
    click.echo(f"user {user} added ({key.kind} key {key.fingerprint()})")


@main.command("del", context_settings=CONTEXT)
@click.argument("user")
@config_option
@user_errors
def delete(user, config_path):
    """Remove a user and all its tokens."""
    async def go(storage, cfg):
        return await storage.delete_user(user)

    if not run_async(_with_storage(config_path, go)):
        fail(f"no user {user!r}")
    click.echo(f"user {user} removed")


alias(main, delete, "delete")


@main.command(context_settings=CONTEXT)
@click.argument("user", required=False)
@config_option
@user_errors
def show(user, config_path):
    """List users (no secrets are shown)."""
    from protocol.crypto import PublicKey

    async def go(storage, cfg):
        if user:
            u = await storage.get_user(user)
            if u is None:
                fail(f"no user {user!r}")
            return [u]
        return await storage.list_users()

    users = run_async(_with_storage(config_path, go))
    if not users:
        click.echo("no users")
        return
    click.echo(f"{'USER':<20} {'KEY':<10} {'FINGERPRINT':<52} {'TOKENS':>6} {'GUEST':<5} CREATED")
    for u in users:
        try:
            k = PublicKey.from_bytes(u.public_key)
            kind, fp = (k.kind if k.kind == "ed25519" else f"rsa{k.bits}"), k.fingerprint()
        except Exception:
            kind, fp = "?", "(unusable key)"
        limit = "∞" if u.token_limit == 0 else str(u.token_limit)
        click.echo(f"{u.name:<20} {kind:<10} {fp:<52} {limit:>6} {'yes' if u.guest else 'no':<5} "
                   f"{_when(u.created_at)}")


@main.command(context_settings=CONTEXT)
@click.option("-u", "--user", required=True)
@click.option("-p", "--password", default=None,
              help="New password ('-' reads it from standard input; omitted: prompted).")
@config_option
@user_errors
def passwd(user, password, config_path):
    """Change a user's password (revokes all its tokens)."""
    password = read_password(password, "New password", confirm=True)
    if not password:
        fail("the password must not be empty")

    async def go(storage, cfg):
        await storage.set_password(user, await hash_password(password))

    try:
        run_async(_with_storage(config_path, go))
    except NoSuchEntry:
        fail(f"no user {user!r}")
    click.echo(f"password of {user} changed; its tokens are revoked")


alias(main, passwd, "change_passwd")


@main.command("set-key", context_settings=CONTEXT)
@click.option("-u", "--user", required=True)
@click.option("-i", "--public-key", "public_key", required=True, type=click.Path(dir_okay=False))
@config_option
@user_errors
def set_key(user, public_key, config_path):
    """Rotate a user's public key (revokes all its tokens)."""
    key = load_public_key(public_key)

    async def go(storage, cfg):
        await storage.set_public_key(user, key.to_pem())

    try:
        run_async(_with_storage(config_path, go))
    except NoSuchEntry:
        fail(f"no user {user!r}")
    click.echo(f"key of {user} set to {key.fingerprint()}; its tokens are revoked")


alias(main, set_key, "set_key")


@main.command(context_settings=CONTEXT)
@click.argument("user")
@config_option
@user_errors
def tokens(user, config_path):
    """List a user's tokens (by id: the first hex digits of their hash; never the token)."""
    async def go(storage, cfg):
        return await storage.list_tokens(user)

    items = run_async(_with_storage(config_path, go))
    if not items:
        click.echo(f"no tokens for {user}")
        return
    now = time.time()
    click.echo(f"{'ID':<14} {'STATE':<8} {'CREATED':<21} {'EXPIRES':<21} SCOPES")
    for t in items:
        state = "revoked" if t.revoked else ("expired" if t.expires_at <= now else "live")
        click.echo(f"{t.token_hash.hex()[:12]:<14} {state:<8} {_when(t.created_at):<21} "
                   f"{_when(t.expires_at):<21} {','.join(t.scopes)}")


@main.command(context_settings=CONTEXT)
@click.argument("user")
@click.option("--id", "token_id", default=None, help="Token id (prefix shown by `tokens`).")
@click.option("--all", "revoke_all", is_flag=True, help="Revoke every token of the user.")
@config_option
@user_errors
def revoke(user, token_id, revoke_all, config_path):
    """Revoke one token of a user (--id) or all of them (--all)."""
    if bool(token_id) == bool(revoke_all):
        fail("give exactly one of --id or --all")

    async def go(storage, cfg):
        if revoke_all:
            return await storage.revoke_user_tokens(user)
        matches = [t for t in await storage.list_tokens(user)
                   if t.token_hash.hex().startswith(token_id.lower())]
        if len(matches) != 1:
            fail(f"{'no' if not matches else 'more than one'} token of {user} matches {token_id!r}")
        return int(await storage.revoke_token(matches[0].token_hash))

    n = run_async(_with_storage(config_path, go))
    click.echo(f"{n} token(s) of {user} revoked")


# --------------------------------------------------------------------------- talking to a node

def _client(url, user, private_key, node_key, token=None, timeout=30.0):
    from ..client import Client
    return Client(url, user=user, private_key=private_key, node_key=node_key, token=token,
                  timeout=timeout)


@main.command("generate_token", context_settings=CONTEXT)
@click.argument("url")
@click.option("-u", "--user", required=True)
@click.option("-p", "--password", default=None,
              help="Password ('-' reads it from standard input; omitted: prompted).")
@click.option("-s", "--server-key", "server_key", required=True, type=click.Path(dir_okay=False),
              help="The node's public key (pinned: the node must prove it holds it).")
@click.option("-i", "--public-key", "public_key", required=True, type=click.Path(dir_okay=False))
@click.option("-I", "--private-key", "private_key", required=True,
              type=click.Path(dir_okay=False))
@click.option("--scope", "scopes", multiple=True, help="Limit the token to these service globs.")
@click.option("--expire", type=float, default=None, help="Lifetime in seconds.")
@user_errors
def generate_token(url, user, password, server_key, public_key, private_key, scopes, expire):
    """Get an access token from a node (prints it)."""
    priv = load_private_key(private_key)
    if load_public_key(public_key) != priv.public:
        fail(f"{public_key} is not the public half of {private_key}")
    password = read_password(password)

    async def go():
        async with _client(url, user, priv, server_key) as c:
            return await c.generate_token(password, scopes=list(scopes) or None, expire=expire)

    click.echo(run_async(go()))


alias(main, generate_token, "generate-token")


@main.command(context_settings=CONTEXT)
@click.argument("url")
@click.option("-X", "--method", default="GET", show_default=True)
@click.option("-d", "--data", default=None, help="Request body ('@FILE' reads a file).")
@click.option("--upload", type=click.Path(dir_okay=False, exists=True), default=None,
              help="Stream this file as the request body.")
@click.option("-o", "--output", type=click.Path(dir_okay=False), default=None,
              help="Write the answer to this file.")
@click.option("-a", "--arg", "arguments", multiple=True, help="Request argument NAME=VALUE.")
@click.option("-u", "--user", required=True)
@click.option("-I", "--private-key", "private_key", required=True,
              type=click.Path(dir_okay=False))
@click.option("-s", "--server-key", "server_key", required=True, type=click.Path(dir_okay=False))
@click.option("-t", "--token", default=None, help="Access token ('-' reads standard input).")
@click.option("--timeout", type=float, default=60.0, show_default=True)
@user_errors
def call(url, method, data, upload, output, arguments, user, private_key, server_key, token,
         timeout):
    """Send one request to URL and print (or save) the answer: a curl for utesla."""
    from ..client import parse_url
    _, _, path = parse_url(url)
    if token == "-":
        token = sys.stdin.readline().strip()
    args = {}
    for a in arguments:
        k, sep, v = a.partition("=")
        if not sep:
            fail(f"argument {a!r} is not NAME=VALUE")
        args[k] = v
    if data is not None and upload is not None:
        fail("give -d or --upload, not both")

    async def go():
        async with _client(url, user, private_key, server_key, token, timeout) as c:
            body, fh, up = b"", None, None
            if upload:
                fh = open(upload, "rb")
                up = Progress("upload", os.fstat(fh.fileno()).st_size)
                body = _counted(fh, up)
            elif data is not None:
                body = Path(data[1:]).read_bytes() if data.startswith("@") else data.encode()
            try:
                async with c.stream(method, path, args=args or None, body=body) as resp:
                    if up:
                        up.close()
                    size = resp.headers.get("size")
                    down = Progress("download", size if isinstance(size, int) else None,
                                    enabled=None if output else False)
                    out = open(output, "wb") if output else sys.stdout.buffer
                    try:
                        async for chunk in resp:
                            out.write(chunk)
                            down.update(len(chunk))
                    finally:
                        down.close()
                        if output:
                            out.close()
                        else:
                            out.flush()
            finally:
                if fh:
                    fh.close()

    run_async(go())


async def _counted(fh, progress):
    """Read a file in chunks off the event loop, reporting progress."""
    import asyncio
    loop = asyncio.get_running_loop()
    while True:
        chunk = await loop.run_in_executor(None, fh.read, 256 * 1024)
        if not chunk:
            return
        progress.update(len(chunk))
        yield chunk


# --------------------------------------------------------------------------- networks

def _read_status(cfg) -> dict:
    """The running node's ``data/status.json`` ({} when the node is not running)."""
    import json
    try:
        state = json.loads((cfg.data_dir / "status.json").read_text())
    except (FileNotFoundError, ValueError):
        return {}
    if not isinstance(state, dict) or time.time() - state.get("updated", 0) > 5:
        return {}          # written by a node that is no longer running
    return state


def _read_state(cfg) -> dict:
    return _read_status(cfg).get("network", {})


@main.command("add_network", context_settings=CONTEXT)
@click.argument("url")
@click.option("-s", "--server-key", "server_key", required=True, type=click.Path(dir_okay=False),
              help="The peer node's public key.")
@click.option("-p", "--public-key", "public_key", default="keys/key.pub", show_default=True,
              type=click.Path(dir_okay=False), help="This node's public key.")
@click.option("-P", "--private-key", "private_key", default="keys/key.priv", show_default=True,
              type=click.Path(dir_okay=False), help="This node's private key.")
@click.option("-u", "--user", required=True, help="The account the peer's admin made for us.")
@click.option("-t", "--token", default=None,
              help="Our token at the peer ('-' reads standard input; omitted: prompted).")
@click.option("--priority", type=int, default=0, show_default=True,
              help="Lower is preferred among equally short routes.")
@click.option("--overwrite", is_flag=True, help="Replace an existing entry for URL.")
@click.option("--wait", is_flag=True,
              help="Return only once the running node has the link up and the peer's table.")
@click.option("--wait-timeout", type=click.FloatRange(min=0.1), default=15.0, show_default=True,
              help="Seconds --wait waits before failing.")
@config_option
@user_errors
def add_network(url, server_key, public_key, private_key, user, token, priority, overwrite,
                wait, wait_timeout, config_path):
    """Link this node to a peer: its services become reachable through this node.

    The peer must answer, prove its key, and accept our account and token
    before anything is stored.  A running node picks the link up within 2 s;
    with --wait the command returns once it has (scripts then need no sleep).
    """
    from ..client import Client, parse_url
    from ..storage import Peer
    host, port, _ = parse_url(url)
    url = f"utesla://{host}:{port}"
    priv = load_private_key(private_key)
    if load_public_key(public_key) != priv.public:
        fail(f"{public_key} is not the public half of {private_key}")
    peer_key = load_public_key(server_key)
    if token == "-":
        token = sys.stdin.readline().strip()
    elif token is None:
        token = read_password(None, "Token at the peer")

    async def go(storage, cfg):
        async with Client(url, user=user, private_key=priv, node_key=peer_key, token=token,
                          timeout=15.0) as c:
            await c.get("/_node/net/status")      # proves the token is accepted
        added = time.time()
        await storage.add_peer(Peer(url=url, public_key=peer_key.to_pem(), user=user,
                                    token=token, priority=priority, created_at=added),
                               overwrite=overwrite)
        return added

    added = run_async(_with_storage(config_path, go))
    click.echo(f"network {url} added (peer key {peer_key.fingerprint()}, as {user})")
    if wait:
        _wait_for_link(load_cfg(config_path), url, added, wait_timeout)


def _wait_for_link(cfg, url: str, added: float, timeout: float) -> None:
    """Poll the running node's status.json until the link to ``url`` made from the entry
    stored at ``added`` (not an older one it replaces) is up and has the peer's table."""
    deadline = time.monotonic() + timeout
    link: dict = {}
    while True:
        status = _read_status(cfg)
        if not status:
            click.echo("no running node here: the link starts with the node", err=True)
            return
        link = next((l for l in status.get("network", {}).get("links", [])
                     if l.get("url") == url and l.get("added") == added), {})
        if link.get("state") == "up" and link.get("synced"):
            click.echo(f"link to {url} is up; {link.get('routes', 0)} route(s) learned")
            return
        if time.monotonic() >= deadline:
            why = link.get("last_error") or f"state {link.get('state', 'not started')}"
            fail(f"link to {url} not up after {timeout:g} s ({why})")
        time.sleep(0.1)


alias(main, add_network, "add-network")


@main.command("del_network", context_settings=CONTEXT)
@click.argument("url")
@config_option
@user_errors
def del_network(url, config_path):
    """Remove a peer link (a running node drops it within 2 s)."""
    from ..client import parse_url
    host, port, _ = parse_url(url)

    async def go(storage, cfg):
        return await storage.delete_peer(f"utesla://{host}:{port}")

    if not run_async(_with_storage(config_path, go)):
        fail(f"no network {url}")
    click.echo(f"network {url} removed")


alias(main, del_network, "del-network")


@main.command("set_priority", context_settings=CONTEXT)
@click.argument("url")
@click.argument("priority", type=int)
@config_option
@user_errors
def set_priority(url, priority, config_path):
    """Set a peer's priority (lower is preferred among equally short routes)."""
    from ..client import parse_url
    host, port, _ = parse_url(url)

    async def go(storage, cfg):
        return await storage.set_peer_priority(f"utesla://{host}:{port}", priority)

    if not run_async(_with_storage(config_path, go)):
        fail(f"no network {url}")
    click.echo(f"priority of {url} set to {priority}")


alias(main, set_priority, "set-priority")


@main.command("show_networks", context_settings=CONTEXT)
@click.option("--json", "as_json", is_flag=True, help="Machine-readable output.")
@config_option
@user_errors
def show_networks(as_json, config_path):
    """List peers with their link state (tokens are never shown)."""
    import json
    from protocol.crypto import PublicKey

    async def go(storage, cfg):
        return await storage.list_peers(), _read_state(cfg)

    peers, state = run_async(_with_storage(config_path, go))
    links = {l["url"]: l for l in state.get("links", [])}
    rows = []
    for p in peers:
        l = links.get(p.url, {})
        rows.append({"url": p.url, "user": p.user, "priority": p.priority,
                     "key": PublicKey.from_bytes(p.public_key).fingerprint(),
                     "state": l.get("state", "unknown (node not running?)"),
                     "rtt_ms": l.get("rtt_ms"), "routes": l.get("routes"),
                     "last_error": l.get("last_error", ""),
                     "token_expires_at": l.get("token_expires_at"),
                     "renew_error": l.get("renew_error", "")})
    if as_json:
        click.echo(json.dumps(rows, indent=2))
        return
    if not rows:
        click.echo("no networks")
        return
    click.echo(f"{'URL':<28} {'USER':<12} {'PRI':>3} {'STATE':<11} {'RTT ms':>7} {'ROUTES':>6}  KEY")
    for r in rows:
        rtt = f"{r['rtt_ms']:.2f}" if r["rtt_ms"] is not None else "-"
        click.echo(f"{r['url']:<28} {r['user']:<12} {r['priority']:>3} {r['state']:<11} "
                   f"{rtt:>7} {str(r['routes'] if r['routes'] is not None else '-'):>6}  {r['key']}")
        if r["last_error"] and r["state"] != "up":
            click.echo(f"    last error: {r['last_error']}")
        if r["renew_error"]:
            click.echo(f"    token renewal failed: {r['renew_error']}")
        elif r["token_expires_at"]:
            when = datetime.fromtimestamp(r["token_expires_at"], timezone.utc)
            click.echo(f"    token renewed, valid until {when:%Y-%m-%d %H:%M} UTC")


alias(main, show_networks, "show-networks")


@main.command("show_services", context_settings=CONTEXT)
@click.option("--json", "as_json", is_flag=True, help="Machine-readable output.")
@config_option
@user_errors
def show_services(as_json, config_path):
    """List local and learned services: origin, next hop, hops, replicas."""
    import json
    from ..services import ServiceRegistry
    cfg = load_cfg(config_path)
    state = _read_state(cfg)
    local = state.get("local")
    if local is None:
        local = ServiceRegistry.load(cfg.services_dir).names()
    rows = [{"path": "/" + s, "origin": "local", "next_hop": "-", "hops": 0, "replicas": 1}
            for s in local]
    rows += state.get("routes", [])
    if as_json:
        click.echo(json.dumps(rows, indent=2))
        return
    click.echo(f"{'SERVICE':<28} {'HOPS':>4} {'REPLICAS':>8}  {'NEXT HOP':<28} ORIGIN")
    for r in rows:
        click.echo(f"{r['path']:<28} {r['hops']:>4} {r['replicas']:>8}  {r['next_hop']:<28} "
                   f"{r['origin']}")


alias(main, show_services, "show-services")


# --------------------------------------------------------------------------- status and graph

def _remote_status(url, user, private_key, server_key, token) -> dict:
    if not (user and private_key and server_key):
        fail("querying a node by URL needs -u, -I and -s (and -t TOKEN)")

    async def go():
        async with _client(url, user, private_key, server_key, token, 15.0) as c:
            return (await c.get("/_node/status")).json()

    return run_async(go())


def _status_for(url, user, private_key, server_key, token, config_path) -> dict:
    if url:
        return _remote_status(url, user, private_key, server_key, token)
    state = _read_status(load_cfg(config_path))
    if not state:
        fail("no running node found here (no fresh data/status.json); give its URL")
    return state


_remote_options = [
    click.option("-u", "--user", default=None, help="User to query a remote node as."),
    click.option("-I", "--private-key", "private_key", default=None,
                 type=click.Path(dir_okay=False)),
    click.option("-s", "--server-key", "server_key", default=None,
                 type=click.Path(dir_okay=False)),
    click.option("-t", "--token", default=None, help="Access token at that node."),
]


def _with_remote(fn):
    for opt in reversed(_remote_options):
        fn = opt(fn)
    return fn


@main.command(context_settings=CONTEXT)
@click.argument("url", required=False)
@click.option("--json", "as_json", is_flag=True, help="Machine-readable output.")
@_with_remote
@config_option
@user_errors
def status(url, as_json, user, private_key, server_key, token, config_path):
    """A node's identity, uptime, traffic, links and routes (this machine's node by default)."""
    import json
    st = _status_for(url, user, private_key, server_key, token, config_path)
    if as_json:
        click.echo(json.dumps(st, indent=2))
        return
    c = st.get("counters", {})
    net = st.get("network", {})
    click.echo(f"node        {st.get('fingerprint')}")
    addr = st.get("address") or ["?", "?"]
    click.echo(f"listening   utesla://{addr[0]}:{addr[1]}   version {st.get('version')}")
    click.echo(f"uptime      {st.get('uptime', 0):.0f} s")
    click.echo(f"connections {st.get('connections')}   in flight {st.get('inflight')}")
    click.echo(f"requests    {c.get('requests_total', 0)} served, {c.get('requests_failed', 0)} "
               f"failed, {c.get('forwarded_requests', 0)} forwarded")
    click.echo(f"handshakes  {c.get('handshakes_ok', 0)} ok, {c.get('handshakes_failed', 0)} "
               f"failed; auth failures {c.get('auth_failures', 0)}")
    links = net.get("links", [])
    click.echo(f"links       {len(links)}")
    for l in links:
        rtt = f"{l['rtt_ms']:.2f} ms" if l.get("rtt_ms") is not None else "-"
        click.echo(f"  {l['url']:<28} {l['state']:<10} rtt {rtt:<10} routes {l.get('routes', 0)}")
    routes = net.get("routes", [])
    click.echo(f"services    {len(st.get('services', []))} local, {len(routes)} remote")
    for r in routes:
        click.echo(f"  {r['path']:<28} hops {r['hops']}  via {r['next_hop']}  "
                   f"replicas {r['replicas']}")


@main.command(context_settings=CONTEXT)
@click.argument("url", required=False)
@click.option("--format", "fmt", type=click.Choice(["dot", "mermaid", "json", "html", "svg"]),
              default="dot", show_default=True)
@click.option("-o", "--output", type=click.Path(dir_okay=False), default=None,
              help="Write to this file instead of standard output.")
@_with_remote
@config_option
@user_errors
def graph(url, fmt, output, user, private_key, server_key, token, config_path):
    """The network as a node sees it: Graphviz DOT, Mermaid, JSON or an HTML/SVG page."""
    from ..graph import render
    st = _status_for(url, user, private_key, server_key, token, config_path)
    g = st.get("network", {}).get("graph") or {"nodes": [], "edges": []}
    text = render(g, fmt)
    if output:
        Path(output).write_text(text)
        click.echo(f"wrote {output}", err=True)
    else:
        click.echo(text, nl=False)
