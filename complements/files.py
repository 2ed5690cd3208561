"""A file share under the node's ``[server] share`` folder (default ``share``).

``GET /files`` lists the files; ``GET /files/NAME`` downloads one (streamed);
``PUT /files/NAME`` (or POST) uploads one (streamed).  Names are single path
segments checked against the node's allowlist (ASCII letters, digits, '_', '-',
plus '.' inside a name), so nothing can escape the folder.  Uploads land
atomically: the body goes to a hidden temporary file (``.NAME.xxxx.part``) that
is renamed into place only once complete, so a broken upload leaves no partial
file.

Stale temporary files.  A node that crashes mid-upload leaves its ``.part``
file behind.  The first request the service serves after the node starts (or
reloads its services) removes the ``.part`` files older than the node's
``request_timeout``: no upload may run longer than that, so none of them can
belong to an upload still running (one begun before a SIGHUP reload, say).  The
service has no start hook of its own, and learns its folder from the node's
configuration with its first request.

Quota.  ``[server] share_quota`` (default 1 GiB, 0 = none) bounds the bytes of
the files in the share, uploads in progress included.  An upload that would pass
it is refused with status 507 (Insufficient Storage) as soon as its body does,
not once it has been written whole, and its temporary file is removed.  The file
an upload replaces is not counted against it.  Files put in the folder by other
means are counted from the next upload on.
"""
import asyncio
import os
import re
import tempfile
import time
from pathlib import Path

NAME_RE = re.compile(r"[A-Za-z0-9][A-Za-z0-9_.-]{0,127}\Z")
CHUNK = 256 * 1024
#: Status for an upload over the quota.  Not in the protocol's status table (SPEC.md §8),
#: so given here as a number; the client raises a plain StatusError with it.
INSUFFICIENT_STORAGE = 507
PART_RE = re.compile(r"\.[A-Za-z0-9][A-Za-z0-9_.-]{0,127}\.[A-Za-z0-9_]+\.part\Z")


class _OverQuota(Exception):
    """An upload's next chunk would pass the share's quota."""


class _Share:
    """Bytes used in one share folder, as this service sees it: the files on disk
    (counted again at each upload's start) plus the uploads running here."""

    def __init__(self, folder: Path):
        self.folder = folder
        self.on_disk = 0
        self.running: dict[str, int] = {}     # temporary file name -> bytes received
        self.changes = 0                      # bumped when this service changes the folder

    def used(self) -> int:
        return self.on_disk + sum(self.running.values())

    def scan(self) -> int:
        """Bytes of the regular files in the folder, less the uploads running here."""
        total = 0
        with os.scandir(self.folder) as entries:
            for e in entries:
                if e.name in self.running:
                    continue
                try:
                    if e.is_file(follow_symlinks=False):
                        total += e.stat(follow_symlinks=False).st_size
                except FileNotFoundError:
                    pass
        return total


_shares: dict[Path, _Share] = {}


def remove_stale_parts(folder: Path, older_than: float) -> list[str]:
    """Remove the upload temporary files not modified for ``older_than`` seconds."""
    removed = []
    cutoff = time.time() - older_than
    for p in folder.iterdir():
        if not PART_RE.match(p.name):
            continue
        try:
            st = p.lstat()
            if st.st_mtime < cutoff and p.is_file():
                p.unlink()
                removed.append(p.name)
        except FileNotFoundError:
            pass
    return removed


class Handler:
    def _folder(self) -> Path:
        folder = self.node.config.share_dir
        folder.mkdir(parents=True, exist_ok=True)
        return folder

    async def _share(self) -> _Share:
        """This folder's books; on first use, after stale temporary files are gone."""
        folder = self._folder()
        share = _shares.get(folder)
        if share is None:
            share = _shares[folder] = _Share(folder)
            await asyncio.get_running_loop().run_in_executor(
                None, remove_stale_parts, folder, self.node.config.request_timeout)
        return share

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
        folder = (await self._share()).folder
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
        share = await self._share()
        folder = share.folder
        quota = self.node.config.share_quota
        loop = asyncio.get_running_loop()
        fd, tmp = tempfile.mkstemp(prefix=f".{name}.", suffix=".part", dir=folder)
        part = os.path.basename(tmp)
        share.running[part] = 0
        size = replaced = 0
        try:
            with os.fdopen(fd, "wb") as fh:
                if quota:
                    await self._count_share(share, loop)
                    try:
                        replaced = (folder / name).stat().st_size
                    except FileNotFoundError:
                        pass
                async for chunk in self.body:
                    if quota and share.used() + len(chunk) > quota + replaced:
                        raise _OverQuota()
                    share.running[part] += len(chunk)
                    await loop.run_in_executor(None, fh.write, chunk)
                    size += len(chunk)
                await loop.run_in_executor(None, fh.flush)
                await loop.run_in_executor(None, os.fsync, fh.fileno())
            os.replace(tmp, folder / name)
            share.on_disk += size - replaced
            share.changes += 1
        except BaseException as exc:
            try:
                os.unlink(tmp)
            except FileNotFoundError:
                pass
            if not isinstance(exc, _OverQuota):
                raise
            return await self._bad(
                INSUFFICIENT_STORAGE,
                f"the share is full: {name} would pass its quota of {quota} bytes")
        finally:
            share.running.pop(part, None)
        await self.write({"name": name, "bytes": size})

    post = put

    @staticmethod
    async def _count_share(share: _Share, loop) -> None:
        """The bytes on disk, counted off the event loop; counted again if this service
        changed the folder meanwhile (an upload ending, a file deleted)."""
        for _ in range(3):
            before = share.changes
            on_disk = await loop.run_in_executor(None, share.scan)
            if share.changes == before:
                break
        share.on_disk = on_disk

    async def delete(self):
        name = self._name()
        if name is None:
            return await self._bad(400, "invalid file name")
        share = await self._share()
        path = share.folder / name
        try:
            size = path.stat().st_size
            path.unlink()
        except FileNotFoundError:
            return await self._bad(404, f"no file {name}")
        share.on_disk = max(0, share.on_disk - size)
        share.changes += 1
        await self.write({"deleted": name})
