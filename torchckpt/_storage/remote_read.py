"""Reading an object of an fsspec filesystem: ranged requests, several at a time, into the caller's buffers.

Why reads are ranged and parallel: a restore reads whole shards into tensors that already exist,
and one GET of a 5 GB object would hold it all in memory before a byte reaches its destination.
So a file is read in parts of a bounded size, a few requests at a time (about a tenth of what is
read stays in flight), and on S3 each ranged GET is streamed straight into its part of the
destination buffers, with no copy of the data held at all. An object that disappears between its
HEAD and a read is reported by its storage (``vanished``): a checkpoint deleted meanwhile, or a
damaged one.
"""

from __future__ import annotations

import contextlib
from collections.abc import Iterator
from typing import Any, Protocol

from torchckpt._storage import sdk_errors
from torchckpt._storage.base import VIEW_BYTES
from torchckpt.errors import CheckpointError

# Ranged reads (where a GET cannot be streamed into the destinations): READ_PARTS at a time, each
# 1/(10 * READ_PARTS + 1) of what is read from the file, clamped to [READ_PART_MIN, READ_PART_MAX].
# A restore then holds under a tenth of the bytes it reads beyond its destination tensors (or
# READ_PARTS * READ_PART_MIN, if that is more), in as few requests as that allows.
READ_PARTS = 2
READ_PART_MIN = 2 * 2**20
READ_PART_MAX = 64 * 2**20
READ_STREAMS = 4  # on S3: ranged GETs streamed straight into the destinations, this many at a time,
READ_STREAM_MIN = 8 * 2**20  # each of at least this many bytes


class Vanishing(Protocol):
    """What a read asks of its storage (an ``FsspecStorage``, not imported here: it imports this module)."""

    def vanished(self, path: str) -> CheckpointError | FileNotFoundError: ...


class RemoteSource:
    """A file read with ranged requests, several at a time, into the caller's buffers."""

    batch_bytes = batch_views = 2**62  # one readv may span a whole shard: its requests are sized below
    checked_bytes = 2**62  # and is hashed after: each readv is a round of requests
    readers = 1  # its own requests already run in parallel
    cached_bytes = 0  # no bytes are in memory before they are asked for

    def __init__(self, fs: Any, path: str, size: int, storage: Vanishing | None = None, *,
                 part_min: int = READ_PART_MIN, part_max: int = READ_PART_MAX) -> None:
        self.fs = fs
        self.path = path
        self.size = size
        self.identity = None  # an object opened again is read by its name: a replacement shows in its checks
        self.part_min, self.part_max = part_min, part_max  # the bounds of one ranged read
        self.part = part_min
        self.storage = storage

    def vanished(self) -> CheckpointError | FileNotFoundError:
        """The error for this object gone between its HEAD and a read (see :meth:`FsspecStorage.vanished`)."""
        if self.storage is None:
            return FileNotFoundError(2, "No such file", self.path)
        return self.storage.vanished(self.path)

    def stream(self) -> contextlib.AbstractContextManager[None]:
        return contextlib.nullcontext()  # readers is 1: no other thread reads it

    def prepare(self, nbytes: int) -> None:
        self.part = max(self.part_min, min(self.part_max, nbytes // (READ_PARTS * 10 + 1)))

    def read(self, offset: int, count: int) -> bytes:
        end = min(self.size, offset + count)
        if end <= offset:
            return b""
        try:
            return bytes(self.fs.cat_file(self.path, start=offset, end=end))
        except FileNotFoundError:
            raise self.vanished() from None

    def views(self, offset: int, count: int) -> Iterator[memoryview]:
        buffer = memoryview(bytearray(min(VIEW_BYTES, max(1, count))))
        while count > 0:
            view = buffer[: min(len(buffer), count)]
            self.readv([view], offset)
            offset, count = offset + len(view), count - len(view)
            yield view

    def mapped(self, offset: int, count: int) -> None:
        """Never: an object is not a file to map. Its bytes are read into the caller's tensors instead."""
        del offset, count

    def read_cached(self, view: memoryview, offset: int) -> int:
        del view, offset  # nothing of an object is kept in memory between reads
        return 0

    def readv(self, views: list[memoryview], offset: int) -> None:
        try:
            self._readv(views, offset)
        except FileNotFoundError as e:
            if isinstance(e, CheckpointError):
                raise
            raise self.vanished() from None

    def _readv(self, views: list[memoryview], offset: int) -> None:
        total = sum(len(v) for v in views)
        if offset + total > self.size:
            raise EOFError(f"unexpected end of file at byte {self.size}")
        targets = iter([v for v in views if len(v)])
        current, at = next(targets, None), 0
        position, end = offset, offset + total
        while position < end:  # READ_PARTS ranged reads at a time: bounded memory, parallel requests
            starts = list(range(position, min(end, position + self.part * READ_PARTS), self.part))
            ends = [min(end, s + self.part) for s in starts]
            parts = self.fs.cat_ranges([self.path] * len(starts), starts, ends)
            for data, s, e in zip(parts, starts, ends):
                if isinstance(data, Exception):
                    raise data
                if len(data) != e - s:
                    raise EOFError(f"unexpected end of file at byte {s + len(data)}")
                pos = 0
                while pos < len(data):  # scatter into the destinations
                    assert current is not None
                    k = min(len(current) - at, len(data) - pos)
                    current[at : at + k] = data[pos : pos + k]
                    at += k
                    pos += k
                    if at == len(current):
                        current, at = next(targets, None), 0
            position = ends[-1]

    def close(self) -> None:
        pass


class S3Source(RemoteSource):
    """A file on S3, read with up to ``READ_STREAMS`` ranged GETs at a time, each streamed
    straight into its part of the destination buffers: no copy of the data is held, so a restore
    needs no memory beyond its tensors, and a whole shard takes a handful of requests."""

    def _readv(self, views: list[memoryview], offset: int) -> None:
        views = [v for v in views if len(v)]
        total = sum(len(v) for v in views)
        if offset + total > self.size:
            raise EOFError(f"unexpected end of file at byte {self.size}")
        if not total:
            return
        per = max(READ_STREAM_MIN, -(-total // READ_STREAMS))
        segments: list[tuple[int, list[memoryview]]] = []
        position, current, filled = offset, [], 0
        for view in views:  # cut the destinations into READ_STREAMS runs of about equal size
            while len(view):
                k = min(len(view), per - filled)
                if k == len(view):  # the common case: a whole tensor, kept as its own view (no slice object)
                    current.append(view)
                    view, filled = view[:0], filled + k
                else:
                    current.append(view[:k])
                    view, filled = view[k:], filled + k
                if filled == per:
                    segments.append((position, current))
                    position, current, filled = position + per, [], 0
        if current:
            segments.append((position, current))
        from fsspec.asyn import sync

        with sdk_errors.translating():  # the ranged GETs run on fsspec's loop: its SDK's errors come out here
            sync(self.fs.loop, self._fetch_all, segments)

    async def _fetch_all(self, segments: list[tuple[int, list[memoryview]]]) -> None:
        import asyncio

        await asyncio.gather(*(self._fetch(start, targets) for start, targets in segments))

    async def _fetch(self, start: int, targets: list[memoryview]) -> None:
        bucket, key, version = self.fs.split_path(self.path)
        end = start + sum(len(t) for t in targets) - 1
        extra = {"VersionId": version} if version else {}
        response = await self.fs._call_s3("get_object", Bucket=bucket, Key=key, Range=f"bytes={start}-{end}", **extra)
        body = response["Body"]
        try:
            for target in targets:
                pos = 0
                while pos < len(target):
                    n = await body.readinto(target[pos:])
                    if not n:
                        raise EOFError(f"unexpected end of file at byte {start + pos}")
                    pos += n
                start += len(target)
        finally:
            body.close()
