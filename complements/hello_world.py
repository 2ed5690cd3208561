class Handler:
    async def get(self):
        await self.write('Hello World!')
