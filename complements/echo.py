"""Echo: answers with the request body (streamed back chunk by chunk) and its arguments."""


class Handler:
    async def post(self):
        async for chunk in self.body:
            await self.write(chunk)

    put = post

    async def get(self):
        await self.write({"user": self.user, "args": self.args, "path": self.path,
                          "subpath": self.subpath})
