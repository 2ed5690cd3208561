"""Answers to a client that announced a small ``max_record`` (issue 17 item 1).

A client may accept records of only 16 KiB (``MIN_RECORD``, the least a peer may
announce).  An answer whose headers and body together exceed that must reach it split
into several messages (the RESPONSE with the headers and what fits, then DATA), as an
answer without headers already does; today the node resets the stream instead.
"""
from __future__ import annotations

import pytest

from helpers import link
from protocol import Settings
from protocol.connection import MIN_RECORD

#: Answers with header ``x-note`` of ``h`` bytes and a body of ``n`` bytes, written at
#: once, or (``flush``) all but its last 10 bytes flushed before the rest.
HEADERS_AND_BODY = """
    class Handler:
        async def get(self):
            self.set_header("x-note", "h" * int(self.args["h"]))
            body = b"b" * int(self.args["n"])
            if self.args.get("flush"):
                await self.write(body[:-10])
                await self.flush()
                body = body[-10:]
            await self.write(body)
"""

#: (header bytes, body bytes): each answer is over 16 KiB only with its headers counted.
SHAPES = {
    "both-over-the-limit": (2048, 20000),
    "body-fits-alone": (100, MIN_RECORD - 100),
    "large-headers": (8000, 9000),
}


@pytest.mark.parametrize("path", ["served-here", "streamed", "forwarded"])
@pytest.mark.parametrize("h,n", SHAPES.values(), ids=SHAPES.keys())
async def test_an_answer_over_a_small_max_record_is_split_not_reset(make_node, path, h, n):
    entry = await make_node({"big": HEADERS_AND_BODY})
    if path == "forwarded":
        entry = await make_node(copy_examples=False)
        origin = await make_node({"big": HEADERS_AND_BODY})
        await link(entry, origin, service="big")
    client = entry.client(settings=Settings(max_record=MIN_RECORD))
    args = {"h": h, "n": n, **({"flush": 1} if path == "streamed" else {})}
    reply = await client.get("/big", args=args, check=False)
    assert (reply.status, len(reply.body), reply.headers.get("x-note")) == (200, n, "h" * h)
    assert reply.body == b"b" * n
    # The connection is fine afterwards.
    assert (await client.get("/big", args={"h": 1, "n": 1})).body == b"b"
