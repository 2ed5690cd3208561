"""Sink: reads the whole request body chunk by chunk and answers its size and SHA-256.

Memory stays bounded whatever the size: nothing is kept but the running hash.
"""
import hashlib


class Handler:
    async def post(self):
        h = hashlib.sha256()
        size = 0
        async for chunk in self.body:
            h.update(chunk)
            size += len(chunk)
        await self.write({"bytes": size, "sha256": h.hexdigest()})

    put = post
