"""Uploading one new object through a bounded buffer.

On S3 a large object goes up as a multipart upload with up to ``PARTS`` parts of ``PART_BYTES``
in flight on helper threads: memory stays at a few parts whatever the shard's size, and the
parts travel in parallel (s3fs's own file uploads its parts one at a time). Elsewhere the
filesystem's own buffered file does the streaming. Nothing becomes visible until the upload
completes; an upload that is abandoned is aborted.
"""

from __future__ import annotations

import contextlib
import threading
from typing import Any

from torchckpt import _threads

PART_BYTES = 16 * 2**20  # S3 multipart parts: this big (S3's smallest is 5 MiB), PARTS in flight at most
PARTS = 4
MAX_PARTS = 10_000  # S3's most parts in one upload: 16 MiB parts alone would stop a shard at 156 GiB


def part_bytes_for(size: int, preferred: int, max_parts: int = MAX_PARTS) -> int:
    """The part size for an object of ``size`` bytes: ``preferred``, or, where that would take more
    than ``max_parts`` parts, the fewest whole MiB that fit it in ``max_parts`` (an object of 1 TiB
    goes up in 105 MiB parts, PARTS of them in memory)."""
    if size <= preferred * max_parts:
        return preferred
    least = -(-size // max_parts)  # bytes a part must hold, rounded up
    return -(-least // 2**20) * 2**20
# Daemon workers, not a pool: an asynchronous save still finishing at interpreter exit may upload (see _threads).
_uploaders = [_threads.Worker(f"torchckpt-upload-{i}") for i in range(PARTS)]


class StreamOutput:
    """A new object written through the filesystem's own buffered file (bounded by its block size)."""

    def __init__(self, fs: Any, path: str) -> None:
        self.path = path
        self.file = fs.open(path, "wb")
        self.done = False

    def write(self, views: list[memoryview]) -> None:
        for view in views:
            self.file.write(view)

    def finish(self) -> None:
        self.file.close()
        self.done = True

    def close(self) -> None:
        if not self.done:
            self.done = True
            discard = getattr(self.file, "discard", None)
            try:
                if callable(discard):
                    discard()  # abort a multipart upload: nothing becomes visible
                    return
            except Exception:  # noqa: BLE001 - one that cannot (fsspec's local files commit as they write): closed
                pass
            with contextlib.suppress(Exception):  # never in place of the failure that stopped the write
                self.file.close()

    def __enter__(self) -> StreamOutput:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()


class S3Upload:
    """A multipart upload to S3 with up to ``PARTS`` parts in flight: memory stays at a
    few parts whatever the size, and the parts travel in parallel."""

    def __init__(self, fs: Any, path: str, part_bytes: int = PART_BYTES) -> None:
        self.fs = fs
        self.path = path
        self.part_bytes = part_bytes
        self.bucket, self.key, _ = fs.split_path(path)
        self.buffer = bytearray()
        self.upload_id: str | None = None
        self.parts: list[_threads.Pending[str]] = []
        self.slots = threading.BoundedSemaphore(PARTS)
        self.done = False

    def write(self, views: list[memoryview]) -> None:
        for view in views:
            pos, n = 0, len(view)
            while pos < n:
                k = min(n - pos, self.part_bytes - len(self.buffer))
                self.buffer += view[pos : pos + k]
                pos += k
                if len(self.buffer) == self.part_bytes:
                    self._send()

    def _send(self) -> None:
        if self.upload_id is None:
            self.upload_id = self.fs.call_s3("create_multipart_upload", Bucket=self.bucket, Key=self.key)["UploadId"]
        data, self.buffer = bytes(self.buffer), bytearray()
        number = len(self.parts) + 1
        self.slots.acquire()  # at most PARTS parts in memory
        self.parts.append(_uploaders[number % PARTS].call(self._upload_part, number, data))

    def _upload_part(self, number: int, data: bytes) -> str:
        try:
            out = self.fs.call_s3("upload_part", Bucket=self.bucket, Key=self.key, UploadId=self.upload_id,
                                  PartNumber=number, Body=data)
            return str(out["ETag"])
        finally:
            self.slots.release()

    def finish(self) -> None:
        if self.upload_id is None:
            self.fs.call_s3("put_object", Bucket=self.bucket, Key=self.key, Body=bytes(self.buffer))
        else:
            if self.buffer:
                self._send()
            etags = [part.result() for part in self.parts]
            self.fs.call_s3("complete_multipart_upload", Bucket=self.bucket, Key=self.key, UploadId=self.upload_id,
                            MultipartUpload={"Parts": [{"PartNumber": i, "ETag": e} for i, e in enumerate(etags, 1)]})
        self.done = True
        self.fs.invalidate_cache(self.path)

    def close(self) -> None:
        if self.done:
            return
        self.done = True
        if self.upload_id is not None:
            try:
                for part in self.parts:  # let the parts in flight end before the upload is aborted
                    with contextlib.suppress(Exception):
                        part.result()
                self.fs.call_s3("abort_multipart_upload", Bucket=self.bucket, Key=self.key, UploadId=self.upload_id)
            except Exception:  # noqa: BLE001 - best effort: an unfinished upload never becomes an object
                pass

    def __enter__(self) -> S3Upload:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()
