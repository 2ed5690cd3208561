"""A streaming service: writes one line per step (``n`` argument, default 5)."""
import asyncio


class Handler:
    async def get(self):
        n = int(self.args.get("n", 5))
        delay = float(self.args.get("delay", 0))
        if not 0 <= n <= 10000 or not 0 <= delay <= 1:
            self.set_status(400)
            await self.write("n must be 0..10000 and delay 0..1")
            return
        for i in range(n, 0, -1):
            await self.write(f"{i}\n")
            if delay:
                await asyncio.sleep(delay)
        await self.write("liftoff\n")
