"""utesla-node as one more peer of the shared RPC benchmark (../shared/bench/peers).

    run.py --peer utesla=bench/peer_utesla.py      (bench/run.sh does this)

Server: an in-process :class:`utesla_node.server.Node` (uvloop when importable, as the
``utesla-node`` command runs it) in a temporary folder, with the services
``hello_world`` (GET), ``echo`` (POST: reads the whole body, writes it back) and
``echo_stream`` (POST: writes each chunk back as it arrives), and one user with an
Ed25519 key and a token.  The ready line carries the port and the paths of the
user's private key, the node's public key and the token (see bench/_nodesetup.py).

Client (:class:`Adapter`): :class:`utesla_node.Client`.  ``connect`` = TCP + the full
handshake (X25519 + Ed25519 signatures both ways + the node's user-key lookup);
``hello`` = ``GET /hello_world``; ``echo`` = ``POST /echo``; ``stream_echo`` = one
streamed ``POST /echo_stream`` whose body is sent by an async generator while the
echoed chunks are read.  ``c16_shared``: the 16 tasks share one Client (requests
are multiplexed as streams on one connection, like gRPC's channel).

The client runs on the standard asyncio loop, as the floor's does; set
UTESLA_BENCH_CLIENT_UVLOOP=1 to run it on uvloop.
"""
import asyncio
import os
import shutil
import signal
import sys
import tempfile
from pathlib import Path

_HERE = Path(__file__).resolve().parent
for _p in (os.environ.get("UTESLA_PEERS_DIR"), _HERE.parent.parent / "shared" / "bench" / "peers",
           Path("/work/shared/bench/peers")):
    if _p and (Path(_p) / "harness.py").is_file():
        if str(_p) not in sys.path:
            sys.path.append(str(_p))
        break

import harness  # noqa: E402

from _nodesetup import client_factory, start_node, use_uvloop  # noqa: E402


def serve(args):
    uv = use_uvloop()

    async def amain():
        folder = tempfile.mkdtemp(prefix="utesla-peer-", dir=args.workdir)
        stop = asyncio.Event()
        loop = asyncio.get_running_loop()
        for sig in (signal.SIGTERM, signal.SIGINT):
            loop.add_signal_handler(sig, stop.set)
        try:
            node, info = await start_node(folder, grace_period=1.0)
            harness.ready(**info, uvloop=uv)
            await stop.wait()
            await node.stop("benchmark over")
        finally:
            shutil.rmtree(folder, ignore_errors=True)

    asyncio.run(amain())


class Adapter:
    blocking = False
    c16_shared = True  # one Client: concurrent requests are streams on one connection

    def __init__(self, args, info):
        self.new_client = client_factory(info)

    async def connect(self):
        c = self.new_client()
        await c.connect()
        return c

    async def hello(self, c):
        return (await c.get("/hello_world")).text

    async def echo(self, c, data):
        return (await c.post("/echo", body=data)).body

    async def close(self, c):
        await c.close()

    async def stream_echo(self, c, chunk, n):
        """One streamed request: a generator uploads n chunks while we read the echoes."""
        async def body():
            for _ in range(n):
                yield chunk

        got = 0
        async with c.stream("POST", "/echo_stream", body=body()) as resp:
            async for part in resp:
                got += len(part)
        return got


def prepare(args):
    if args.role == "client" and os.environ.get("UTESLA_BENCH_CLIENT_UVLOOP") == "1":
        use_uvloop()


if __name__ == "__main__":
    harness.main(serve, Adapter, prepare=prepare)
