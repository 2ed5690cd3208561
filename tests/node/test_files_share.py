"""The files service's share (issue 12, item 8): stale ``.part`` files from a crash
are removed when the service starts serving, and a quota refuses uploads with 507
as their bodies arrive."""
from __future__ import annotations

import asyncio
import os
import time

from protocol.errors import StatusError

KiB = 1024
INSUFFICIENT_STORAGE = 507


def entries(folder) -> list[str]:
    return sorted(p.name for p in folder.iterdir())


async def test_stale_part_files_are_removed_when_the_service_starts(make_node):
    h = await make_node(request_timeout=30.0)
    share = h.config.share_dir
    share.mkdir(parents=True, exist_ok=True)
    old = time.time() - 31.0 - 60
    for name in (".big.bin.k2j4_x9a.part", ".notes.v1.txt.abcdefgh.part"):
        (share / name).write_bytes(b"x" * 1000)          # a crash mid-upload, long ago
        os.utime(share / name, (old, old))
    (share / ".new.bin.zzzzzzzz.part").write_bytes(b"y")  # an upload that may still run
    (share / "kept.txt").write_bytes(b"k")
    (share / ".hidden").write_bytes(b"h")                  # not ours: left alone
    os.utime(share / "kept.txt", (old, old))
    os.utime(share / ".hidden", (old, old))
    c = h.client()
    assert (await c.get("/files")).json() == {"files": [{"name": "kept.txt", "size": 1}]}
    assert entries(share) == [".hidden", ".new.bin.zzzzzzzz.part", "kept.txt"]


async def test_uploads_over_the_quota_are_refused_with_507(make_node):
    h = await make_node(share_quota=1000 * KiB)
    share = h.config.share_dir
    c = h.client()
    assert (await c.put("/files/a.bin", body=b"a" * (600 * KiB))).json() == \
        {"name": "a.bin", "bytes": 600 * KiB}
    reply = await c.put("/files/b.bin", body=b"b" * (600 * KiB), check=False)
    assert reply.status == INSUFFICIENT_STORAGE
    assert "quota" in reply.text
    assert entries(share) == ["a.bin"]                     # nothing left behind
    # Replacing a file counts the new copy, not both.
    assert (await c.put("/files/a.bin", body=b"A" * (900 * KiB))).json()["bytes"] == 900 * KiB
    assert (await c.put("/files/c.bin", body=b"c" * (100 * KiB))).json()["bytes"] == 100 * KiB
    assert (await c.put("/files/d.bin", body=b"d", check=False)).status == INSUFFICIENT_STORAGE
    # Room again once a file is deleted.
    assert (await c.delete("/files/a.bin")).json() == {"deleted": "a.bin"}
    assert (await c.put("/files/d.bin", body=b"d" * (800 * KiB))).json()["bytes"] == 800 * KiB
    assert entries(share) == ["c.bin", "d.bin"]


async def test_files_put_in_the_folder_by_other_means_count_too(make_node):
    h = await make_node(share_quota=100 * KiB)
    c = h.client()
    assert (await c.put("/files/x", body=b"x")).json()["bytes"] == 1
    (h.config.share_dir / "dropped.bin").write_bytes(b"z" * (100 * KiB))
    reply = await c.put("/files/y", body=b"y" * 10, check=False)
    assert reply.status == INSUFFICIENT_STORAGE


async def test_the_quota_is_checked_as_the_body_streams(make_node):
    h = await make_node(share_quota=1024 * KiB)
    c = h.client()
    sent = 0

    async def endless():
        nonlocal sent
        chunk = b"e" * (64 * KiB)
        while True:                                         # never ends by itself
            sent += len(chunk)
            yield chunk

    try:
        reply = await asyncio.wait_for(c.put("/files/huge.bin", body=endless(), check=False), 60)
        status = reply.status
    except StatusError as exc:                  # the refusal may come as the stream's reset
        status = exc.status
    assert status == INSUFFICIENT_STORAGE
    # Refused once the quota was passed: the client sent about the quota, plus what flow
    # control let it have in flight, not an endless body.
    assert sent <= 1024 * KiB + 2 * h.config.stream_window + 256 * KiB, sent
    assert entries(h.config.share_dir) == []
    assert (await c.get("/hello_world")).text == "Hello World!"     # the session lives on


async def test_zero_quota_means_no_limit(make_node):
    h = await make_node(share_quota=0)
    c = h.client()
    assert (await c.put("/files/big", body=b"b" * (3 * 1024 * KiB))).json()["bytes"] == \
        3 * 1024 * KiB
