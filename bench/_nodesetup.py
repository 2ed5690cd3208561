"""Shared set-up of a benchmark node (used by peer_utesla.py and bench_node.py).

``await start_node(folder)`` creates, inside ``folder``, a node with three services
and one registered user with an Ed25519 key, starts it on 127.0.0.1 (port 0), and
writes what a client needs into files:

    folder/complements/hello_world.py   GET  -> 'Hello World!'
    folder/complements/echo.py          POST -> the whole body, read then written back
    folder/complements/echo_stream.py   POST -> each body chunk written back as it arrives
    folder/bench.priv                   the bench user's private key (PEM)
    folder/node.pub                     the node's public key (PEM)
    folder/bench.token                  a token of the bench user

and returns ``(node, info)`` where ``info`` is the JSON-able dict of the ready line:
``{"port", "user", "key", "node_key", "token"}`` (paths as strings).
``client_factory(info)`` loads the keys and token once and returns a function that
builds a fresh (not yet connected) :class:`utesla_node.Client` for that node.
"""
from __future__ import annotations

import asyncio
import logging
import os
import sys
import textwrap
import time
from pathlib import Path

HERE = Path(__file__).resolve().parent
REPO = HERE.parent
if str(REPO) not in sys.path:  # run from a checkout without `pip install -e .`
    sys.path.insert(0, str(REPO))

from utesla_node import auth  # noqa: E402
from utesla_node.client import Client  # noqa: E402
from utesla_node.config import load_config  # noqa: E402
from utesla_node.keys import load_private_key, load_public_key  # noqa: E402
from utesla_node.server import Node  # noqa: E402
from utesla_node.storage import User  # noqa: E402
from protocol.crypto import PrivateKey  # noqa: E402

USER = "bench"

SERVICES = {
    "hello_world": """
        class Handler:
            async def get(self):
                await self.write('Hello World!')
    """,
    "echo": """
        class Handler:
            async def post(self):
                await self.write(await self.body.read())
    """,
    "echo_stream": """
        class Handler:
            async def post(self):
                async for chunk in self.body:
                    await self.write(chunk)
    """,
}


def use_uvloop() -> bool:
    """Install uvloop's policy if it is importable; tell whether it was."""
    try:
        import uvloop
    except ImportError:
        return False
    asyncio.set_event_loop_policy(uvloop.EventLoopPolicy())
    return True


def write_services(folder: Path) -> Path:
    services = Path(folder) / "complements"
    services.mkdir(parents=True, exist_ok=True)
    for name, code in SERVICES.items():
        (services / f"{name}.py").write_text(textwrap.dedent(code).lstrip())
    return services


async def start_node(folder, log_level: str = "WARNING", services: bool = True, **settings):
    """Start the benchmark node in ``folder`` (see the module docstring); with
    ``services=False`` its complements/ folder is empty (a pure forwarder)."""
    folder = Path(folder)
    logging.basicConfig(level=log_level, stream=sys.stderr,
                        format="%(asctime)s %(levelname)-7s %(name)s: %(message)s")
    logging.getLogger().setLevel(log_level)
    # The password is never used by the workloads: a cheap scrypt keeps start-up short.
    auth.set_scrypt_cost(10)
    if services:
        write_services(folder)
    else:
        (folder / "complements").mkdir(parents=True, exist_ok=True)
    settings.setdefault("port", 0)
    settings.setdefault("host", "127.0.0.1")
    config = load_config(None, **settings)
    config.base_dir = folder
    node = Node(config)
    await node.start()

    key = PrivateKey.generate("ed25519")
    await node.storage.add_user(User(
        name=USER, password_hash=await auth.hash_password("bench-password"),
        public_key=key.public.to_pem(), created_at=time.time(), token_limit=0),
        overwrite=True)
    token, _ = await node.authority.issue_token(USER)

    paths = {"key": folder / f"{USER}.priv", "node_key": folder / "node.pub",
             "token": folder / f"{USER}.token"}
    fd = os.open(paths["key"], os.O_WRONLY | os.O_CREAT | os.O_TRUNC, 0o600)
    with os.fdopen(fd, "w") as f:
        f.write(key.to_pem())
    paths["node_key"].write_text(node.key.public.to_pem())
    paths["token"].write_text(token)
    info = {"port": node.address[1], "user": USER, **{k: str(v) for k, v in paths.items()}}
    return node, info


async def link_nodes(near: Path, far: Path, far_port: int) -> None:
    """Make the node in ``near`` a subscriber of the one in ``far`` (both running, in those
    folders), as ``utesla-cli add`` on far and ``add_network`` on near would: an account on
    far for near's node key, a token of it, and a peer row on near (picked up within 1 s)."""
    from utesla_node.storage import Peer, open_storage
    auth.set_scrypt_cost(10)          # the password is never used
    name = "node-" + near.name
    near_pub = (near / "keys" / "key.pub").read_text()
    far_pub = (far / "keys" / "key.pub").read_text()
    st = open_storage(None, far / "data")
    await st.open()
    try:
        await st.add_user(User(name=name, password_hash=await auth.hash_password("unused"),
                               public_key=near_pub, created_at=time.time(), token_limit=0),
                          overwrite=True)
        token, _ = await auth.Authority(st, 86400.0).issue_token(name)
    finally:
        await st.close()
    st = open_storage(None, near / "data")
    await st.open()
    try:
        await st.add_peer(Peer(url=f"utesla://127.0.0.1:{far_port}", public_key=far_pub,
                               user=name, token=token, created_at=time.time()), overwrite=True)
    finally:
        await st.close()


def client_factory(info: dict, **kw):
    """``new()`` -> a fresh, unconnected Client; keys and token are read once, here."""
    token = Path(info["token"]).read_text().strip()
    key, node_key = load_private_key(info["key"]), load_public_key(info["node_key"])
    url = f"utesla://127.0.0.1:{info['port']}"

    def new() -> Client:
        return Client(url, user=info["user"], private_key=key, node_key=node_key, token=token,
                      **kw)

    return new
