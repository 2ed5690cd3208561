"""Source: streams ``n`` bytes (argument, default 1 MiB) of a deterministic pattern.

The pattern is one *period* of ``chunk`` bytes (argument, default 256 KiB): the
concatenation of SHA-256(seed || i as 8 big-endian bytes) for i = 0, 1, ...,
repeated until ``n`` bytes are sent, so a client can recompute what it should
receive (``expected_sha256`` below) and the node spends no CPU producing it.
"""
import hashlib

MAX = 1 << 40


def period(seed: bytes, chunk: int) -> bytes:
    return b"".join(hashlib.sha256(seed + i.to_bytes(8, "big")).digest()
                    for i in range(chunk // 32))


def expected_sha256(n: int, seed: bytes = b"utesla", chunk: int = 256 * 1024) -> str:
    p = period(seed, chunk)
    h = hashlib.sha256()
    full, rest = divmod(n, chunk)
    for _ in range(full):
        h.update(p)
    h.update(p[:rest])
    return h.hexdigest()


class Handler:
    async def get(self):
        try:
            n = int(self.args.get("n", 1 << 20))
            chunk = int(self.args.get("chunk", 256 * 1024))
        except (TypeError, ValueError):
            n = chunk = -1
        if not 0 <= n <= MAX or not 32 <= chunk <= (8 << 20) or chunk % 32:
            self.set_status(400)
            await self.write("n must be 0..2^40 and chunk a multiple of 32 in 32..8 MiB")
            return
        p = period(str(self.args.get("seed", "utesla")).encode()[:64], chunk)
        sent = 0
        while sent < n:
            size = min(chunk, n - sent)
            await self.write(p if size == chunk else p[:size])
            sent += size
