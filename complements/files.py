"""A file share under the node's ``[server] share`` folder (default ``share``).

``GET /files`` lists the files; ``GET /files/NAME`` downloads one (streamed);
``PUT /files/NAME`` (or POST) uploads one (streamed).  Names are single path
segments checked against the node's allowlist (ASCII letters, digits, '_', '-',
plus '.' inside a name), so nothing can escape the folder.  Uploads land
atomically: the body goes to a hidden temporary file that is renamed into place
only once complete, so a broken upload leaves no partial file.
"""
import asyncio
import os
import re
import tempfile
from pathlib import Path

NAME_RE = re.compile(r"[A-Za-z0-9][A-Za-z0-9_.-]{0,127}\Z")
CHUNK = 256 * 1024


class Handler:
    def _folder(self) -> Path:
        folder = self.node.config.share_dir
        folder.mkdir(parents=True, exist_ok=True)
        return folder

    def _name(self):
        if len(self.subpath) != 1:
            return None
        name = self.subpath[0]
        if not NAME_RE.match(name) or ".." in name:
            return None
        return name

    async def _bad(self, status, text):
        self.set_status(status)
        await self.write(text)

    async def get(self):
        folder = self._folder()
        if not self.subpath:
            entries = sorted((p.name, p.stat().st_size) for p in folder.iterdir()
                             if p.is_file() and not p.name.startswith("."))
            await self.write({"files": [{"name": n, "size": s} for n, s in entries]})
            return
        name = self._name()
        if name is None:
            return await self._bad(400, "invalid file name")
        path = folder / name
        if not path.is_file():
            return await self._bad(404, f"no file {name}")
        loop = asyncio.get_running_loop()
        with open(path, "rb") as fh:
            self.set_header("size", os.fstat(fh.fileno()).st_size)
            while True:
                chunk = await loop.run_in_executor(None, fh.read, CHUNK)
                if not chunk:
                    break
                await self.write(chunk)

    async def put(self):
        name = self._name()
        if name is None:
            return await self._bad(400, "invalid file name")
        folder = self._folder()
        loop = asyncio.get_running_loop()
        fd, tmp = tempfile.mkstemp(prefix=f".{name}.", suffix=".part", dir=folder)
        size = 0
        try:
            with os.fdopen(fd, "wb") as fh:
                async for chunk in self.body:
                    await loop.run_in_executor(None, fh.write, chunk)
                    size += len(chunk)
                await loop.run_in_executor(None, fh.flush)
                await loop.run_in_executor(None, os.fsync, fh.fileno())
            os.replace(tmp, folder / name)
        except BaseException:
            try:
                os.unlink(tmp)
            except FileNotFoundError:
                pass
            raise
        await self.write({"name": name, "bytes": size})

    post = put

    async def delete(self):
        name = self._name()
        if name is None:
            return await self._bad(400, "invalid file name")
        try:
            (self._folder() / name).unlink()
        except FileNotFoundError:
            return await self._bad(404, f"no file {name}")
        await self.write({"deleted": name})
