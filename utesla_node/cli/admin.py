"""``utesla-cli``: keys, users, tokens, networks and requests.

Every command of the original description works as written there (with
``./UTeslaCLI`` replaced by ``utesla-cli``), including its spellings
(``generate_keys -bit_size 3072 -out-public-key F``); the dashed spellings work
too.  Commands that touch a node's database find it through ``--config``, else
``./node.ini``, else the defaults.  A missing SQLite database is an error (a command run
in the wrong folder says so instead of writing where the node never looks), except for
``add`` and ``add_network`` in a node's folder, before the node's first start, or with
``--create``.  Exit status: 0 success, 1 error (one line on stderr), 2 usage.

A thin shell: each command parses its arguments, calls :mod:`utesla_node.admin`
(or the client) and prints.
"""
from __future__ import annotations

import json
import os
import sys
from datetime import datetime, timezone
from pathlib import Path

import click

from protocol.crypto import RSA_DEFAULT_BITS, PrivateKey

from .. import __version__
from ..admin import (Admin, NetworkRow, NoDatabase, NodeNotRunning, is_node_folder, peer_url,
                     remote_status)
from ..keys import load_private_key, load_public_key, write_key_pair
from ..proxy import parse_proxy
from .common import (Progress, alias, config_option, fail, load_cfg, load_key_pair,
                     read_password, read_secret, run_async, user_errors)

CONTEXT = {"help_option_names": ["-h", "--help"]}


@click.group(context_settings=CONTEXT)
@click.version_option(__version__, prog_name="utesla-cli")
def main():
    """Administer utesla nodes and talk to them."""


def _when(ts: float) -> str:
    return datetime.fromtimestamp(ts, timezone.utc).strftime("%Y-%m-%d %H:%M:%SZ")


def _admin(config_path, action: str, create: bool | None = None) -> Admin:
    """The :class:`Admin` of the configuration's node.  A missing database is reported now,
    saying what could not be done (``action``) and how to point at the node, before any
    prompt or network check that would be wasted.

    ``create`` is the --create flag of the commands that may make the database (``add``,
    ``add_network``; None for the others).  Those make it without the flag too where the
    configuration plainly belongs to a node (:func:`~utesla_node.admin.is_node_folder`):
    its admin may register users before the node's first start.
    """
    cfg = load_cfg(config_path)
    admin = Admin(cfg, create=create is not None and (create or is_node_folder(cfg)))
    try:
        admin.require_database()
    except NoDatabase as exc:
        if create is None:
            how = "utesla-node creates its database on first start"
        else:
            how = (f"{cfg.base_dir} has no node.ini, {cfg.services} folder or "
                   f"{cfg.keys}/key.priv; --create makes a new database anyway")
        fail(f"cannot {action}: {exc}: run utesla-cli in the node's folder or pass "
             f"-c node.ini ({how})")
    return admin


def _run(admin: Admin, fn):
    """``await fn(admin)``, then close the admin's database."""
    async def go():
        async with admin:
            return await fn(admin)
    return run_async(go())


create_option = click.option(
    "--create", is_flag=True,
    help="Make a new SQLite database even outside a node's folder (one with node.ini, "
         "complements/ or keys/key.priv); without it a missing database there is an error.")


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
@create_option
@config_option
@user_errors
def add(user, password, public_key, token_limit, guest, scopes, overwrite, create, config_path):
    """Register a user with a password and a public key."""
    key = load_public_key(public_key)
    password = read_password(password, confirm=True)
    admin = _admin(config_path, f"add user {user!r}", create)
    info = _run(admin, lambda a: a.add_user(user, password, key, token_limit=token_limit,
                                             guest=guest, scopes=scopes, overwrite=overwrite))
    click.echo(f"user {info.name} added ({key.kind} key {info.fingerprint})")


@main.command("del", context_settings=CONTEXT)
@click.argument("user")
@config_option
@user_errors
def delete(user, config_path):
    """Remove a user and all its tokens."""
    _run(_admin(config_path, f"remove user {user!r}"), lambda a: a.delete_user(user))
    click.echo(f"user {user} removed")


alias(main, delete, "delete")


@main.command(context_settings=CONTEXT)
@click.argument("user", required=False)
@config_option
@user_errors
def show(user, config_path):
    """List users (no secrets are shown)."""
    async def go(admin):
        return [await admin.user(user)] if user else await admin.users()

    users = _run(_admin(config_path, "list users"), go)
    if not users:
        click.echo("no users")
        return
    click.echo(f"{'USER':<20} {'KEY':<10} {'FINGERPRINT':<52} {'TOKENS':>6} {'GUEST':<5} CREATED")
    for u in users:
        limit = "∞" if u.token_limit == 0 else str(u.token_limit)
        click.echo(f"{u.name:<20} {u.key_kind:<10} {u.fingerprint:<52} {limit:>6} "
                   f"{'yes' if u.guest else 'no':<5} {_when(u.created_at)}")


@main.command(context_settings=CONTEXT)
@click.option("-u", "--user", required=True)
@click.option("-p", "--password", default=None,
              help="New password ('-' reads it from standard input; omitted: prompted).")
@config_option
@user_errors
def passwd(user, password, config_path):
    """Change a user's password (revokes all its tokens)."""
    password = read_password(password, "New password", confirm=True)
    admin = _admin(config_path, f"change the password of {user!r}")
    _run(admin, lambda a: a.set_password(user, password))
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
    _run(_admin(config_path, f"set the key of {user!r}"), lambda a: a.set_public_key(user, key))
    click.echo(f"key of {user} set to {key.fingerprint()}; its tokens are revoked")


alias(main, set_key, "set_key")


@main.command("change_services", context_settings=CONTEXT)
@click.option("-u", "--user", required=True)
@click.option("--scope", "scopes", multiple=True,
              help="Service glob the user may reach (repeatable; none: all services).")
@click.option("--guest/--no-guest", default=None,
              help="Make the user a guest (only its --scope services) or an ordinary user.")
@config_option
@user_errors
def change_services(user, scopes, guest, config_path):
    """Set the services a user may reach (revokes all its tokens)."""
    info = _run(_admin(config_path, f"change the services of {user!r}"),
                lambda a: a.set_scopes(user, scopes, guest=guest))
    kind = "guest" if info.guest else "user"
    click.echo(f"{kind} {user} may reach {', '.join(info.scopes)}; its tokens are revoked")


alias(main, change_services, "change-services")


@main.command("set-token-limit", context_settings=CONTEXT)
@click.option("-u", "--user", required=True)
@click.argument("limit", type=click.IntRange(0, 1_000_000))
@config_option
@user_errors
def set_token_limit(user, limit, config_path):
    """Set how many live tokens a user may hold, 0 = unlimited (revokes all its tokens)."""
    _run(_admin(config_path, f"set the token limit of {user!r}"),
         lambda a: a.set_token_limit(user, limit))
    shown = "unlimited" if limit == 0 else str(limit)
    click.echo(f"token limit of {user} set to {shown}; its tokens are revoked")


alias(main, set_token_limit, "set_token_limit")


@main.command(context_settings=CONTEXT)
@click.argument("user")
@config_option
@user_errors
def tokens(user, config_path):
    """List a user's tokens (by id: the first hex digits of their hash; never the token)."""
    items = _run(_admin(config_path, f"list the tokens of {user!r}"), lambda a: a.tokens(user))
    if not items:
        click.echo(f"no tokens for {user}")
        return
    click.echo(f"{'ID':<14} {'STATE':<8} {'CREATED':<21} {'EXPIRES':<21} SCOPES")
    for t in items:
        click.echo(f"{t.id:<14} {t.state:<8} {_when(t.created_at):<21} "
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

    async def go(admin):
        if revoke_all:
            return await admin.revoke_all(user)
        await admin.revoke_token(user, token_id)
        return 1

    n = _run(_admin(config_path, f"revoke tokens of {user!r}"), go)
    click.echo(f"{n} token(s) of {user} revoked")


@main.command(context_settings=CONTEXT)
@click.argument("user")
@click.option("--id", "token_id", required=True, help="Token id (prefix shown by `tokens`).")
@click.option("--expire", type=click.FloatRange(min=1.0), default=None,
              help="Lifetime in seconds from now (default: the one it was issued with; "
                   "never beyond [crypt limits] token_expire).")
@config_option
@user_errors
def renew(user, token_id, expire, config_path):
    """Make a user's token valid again from now (also an expired one; not a revoked one)."""
    t = _run(_admin(config_path, f"renew a token of {user!r}"),
             lambda a: a.renew_token(user, token_id, expire))
    click.echo(f"token {t.id} of {user} renewed, valid until {_when(t.expires_at)}")


# --------------------------------------------------------------------------- talking to a node

def _client(url, user, private_key, node_key, token=None, timeout=30.0, proxy=None):
    from ..client import Client
    return Client(url, user=user, private_key=private_key, node_key=node_key, token=token,
                  timeout=timeout, proxy=proxy)


proxy_option = click.option(
    "--proxy", default=None, envvar="UTESLA_PROXY", show_envvar=True,
    help="Connect through this SOCKS5 proxy: socks5h://[user:pass@]host:port (the proxy "
         "resolves names, onion names too) or socks5://.")


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
@proxy_option
@user_errors
def generate_token(url, user, password, server_key, public_key, private_key, scopes, expire,
                   proxy):
    """Get an access token from a node (prints it)."""
    proxy = parse_proxy(proxy)
    priv = load_key_pair(public_key, private_key)
    password = read_password(password)

    async def go():
        async with _client(url, user, priv, server_key, proxy=proxy) as c:
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
@proxy_option
@user_errors
def call(url, method, data, upload, output, arguments, user, private_key, server_key, token,
         timeout, proxy):
    """Send one request to URL and print (or save) the answer: a curl for utesla."""
    from ..client import parse_url
    _, _, path = parse_url(url)
    proxy = parse_proxy(proxy)
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
        async with _client(url, user, private_key, server_key, token, timeout, proxy) as c:
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
@click.option("--proxy", default="",
              help="Reach this peer through this SOCKS5 proxy (socks5h://[user:pass@]host:port"
                   ", or 'direct' for none), whatever [network] proxy says; stored with the "
                   "peer.  The check before storing goes the same way (without --proxy: "
                   "through [network] proxy, if set).")
@click.option("--wait", is_flag=True,
              help="Return only once the running node has the link up and the peer's table.")
@click.option("--wait-timeout", type=click.FloatRange(min=0.1), default=15.0, show_default=True,
              help="Seconds --wait waits before failing.")
@create_option
@config_option
@user_errors
def add_network(url, server_key, public_key, private_key, user, token, priority, overwrite,
                proxy, wait, wait_timeout, create, config_path):
    """Link this node to a peer: its services become reachable through this node.

    The peer must answer, prove its key, and accept our account and token
    before anything is stored.  A running node picks the link up within 2 s;
    with --wait the command returns once it has (scripts then need no sleep),
    and fails at once, storing nothing, when no node is running.
    """
    url = peer_url(url)
    parse_proxy(proxy)                  # a malformed proxy is reported before anything else
    priv = load_key_pair(public_key, private_key)
    peer_key = load_public_key(server_key)
    admin = _admin(config_path, f"add network {url}", create)
    if wait:
        admin.node_status()             # no running node: the link would never come up
    token = read_secret(token, "Token at the peer")

    async def go(admin):
        peer = await admin.add_peer(url, node_key=priv, peer_key=peer_key, user=user,
                                    token=token, priority=priority, overwrite=overwrite,
                                    proxy=proxy)
        via = f", through {peer.proxy}" if peer.proxy and peer.proxy != "direct" else ""
        click.echo(f"network {peer.url} added (peer key {peer.key}, as {user}{via})")
        if wait:
            await admin.close()         # the database is not needed while waiting
            link = await admin.wait_for_link(peer, wait_timeout)
            click.echo(f"link to {peer.url} is up; {link.routes} route(s) learned")

    _run(admin, go)


alias(main, add_network, "add-network")


@main.command("del_network", context_settings=CONTEXT)
@click.argument("url")
@config_option
@user_errors
def del_network(url, config_path):
    """Remove a peer link (a running node drops it within 2 s)."""
    _run(_admin(config_path, f"remove network {url}"), lambda a: a.delete_peer(url))
    click.echo(f"network {url} removed")


alias(main, del_network, "del-network")


@main.command("set_priority", context_settings=CONTEXT)
@click.argument("url")
@click.argument("priority", type=int)
@config_option
@user_errors
def set_priority(url, priority, config_path):
    """Set a peer's priority (lower is preferred among equally short routes)."""
    _run(_admin(config_path, f"set the priority of {url}"),
         lambda a: a.set_priority(url, priority))
    click.echo(f"priority of {url} set to {priority}")


alias(main, set_priority, "set-priority")


@main.command("show_networks", context_settings=CONTEXT)
@click.option("--json", "as_json", is_flag=True, help="Machine-readable output.")
@config_option
@user_errors
def show_networks(as_json, config_path):
    """List peers with the running node's link states (tokens are never shown)."""
    rows: list[NetworkRow] = _run(_admin(config_path, "list networks"), lambda a: a.networks())
    if as_json:
        click.echo(json.dumps([r.as_dict() for r in rows], indent=2))
        return
    if not rows:
        click.echo("no networks")
        return
    click.echo(f"{'URL':<28} {'USER':<12} {'PRI':>3} {'STATE':<11} {'RTT ms':>7} {'ROUTES':>6}  KEY")
    for r in rows:
        rtt = f"{r.rtt_ms:.2f}" if r.rtt_ms is not None else "-"
        routes = str(r.routes if r.routes is not None else "-")
        click.echo(f"{r.url:<28} {r.user:<12} {r.priority:>3} {r.state:<11} "
                   f"{rtt:>7} {routes:>6}  {r.key}")
        if r.proxy:
            click.echo(f"    proxy: {r.proxy}")
        if r.last_error and r.state != "up":
            click.echo(f"    last error: {r.last_error}")
        if r.renew_error:
            click.echo(f"    token renewal failed: {r.renew_error}")
        elif r.token_expires_at:
            when = datetime.fromtimestamp(r.token_expires_at, timezone.utc)
            click.echo(f"    token renewed, valid until {when:%Y-%m-%d %H:%M} UTC")


alias(main, show_networks, "show-networks")


@main.command("show_services", context_settings=CONTEXT)
@click.option("--json", "as_json", is_flag=True, help="Machine-readable output.")
@config_option
@user_errors
def show_services(as_json, config_path):
    """List the running node's local and learned services: origin, next hop, hops, replicas."""
    rows = Admin(load_cfg(config_path)).services()
    if as_json:
        click.echo(json.dumps([r.as_dict() for r in rows], indent=2))
        return
    click.echo(f"{'SERVICE':<28} {'HOPS':>4} {'REPLICAS':>8}  {'NEXT HOP':<28} ORIGIN")
    for r in rows:
        click.echo(f"{r.path:<28} {r.hops:>4} {r.replicas:>8}  {r.next_hop:<28} {r.origin}")


alias(main, show_services, "show-services")


# --------------------------------------------------------------------------- status and graph

def _status_for(url, user, private_key, server_key, token, config_path, proxy=None) -> dict:
    """The node at ``url`` (as a user), else the one running with this configuration."""
    if url:
        if not (user and private_key and server_key):
            fail("querying a node by URL needs -u, -I and -s (and -t TOKEN)")
        return run_async(remote_status(url, user=user, private_key=private_key,
                                       node_key=server_key, token=token,
                                       proxy=parse_proxy(proxy)))
    try:
        return Admin(load_cfg(config_path)).node_status()
    except NodeNotRunning as exc:
        fail(f"{exc}; start utesla-node, pass -c node.ini, or give the node's URL")


_remote_options = [
    click.option("-u", "--user", default=None, help="User to query a remote node as."),
    click.option("-I", "--private-key", "private_key", default=None,
                 type=click.Path(dir_okay=False)),
    click.option("-s", "--server-key", "server_key", default=None,
                 type=click.Path(dir_okay=False)),
    click.option("-t", "--token", default=None, help="Access token at that node."),
    proxy_option,
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
def status(url, as_json, user, private_key, server_key, token, proxy, config_path):
    """A node's identity, uptime, traffic, links and routes (this machine's node by default)."""
    st = _status_for(url, user, private_key, server_key, token, config_path, proxy)
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
def graph(url, fmt, output, user, private_key, server_key, token, proxy, config_path):
    """The network as a node sees it: Graphviz DOT, Mermaid, JSON or an HTML/SVG page."""
    from ..graph import render
    st = _status_for(url, user, private_key, server_key, token, config_path, proxy)
    g = st.get("network", {}).get("graph") or {"nodes": [], "edges": []}
    text = render(g, fmt)
    if output:
        Path(output).write_text(text)
        click.echo(f"wrote {output}", err=True)
    else:
        click.echo(text, nl=False)
