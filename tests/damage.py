"""Damage to a file on disk, as tests inflict it: one bit flipped in place, or a bit rotting under
the filesystem (the file's size and modification time kept; with the test's storage double, its
whole stamp, the change time too, which no program can set back)."""

from __future__ import annotations

import json
import os
from typing import Any

from torchckpt._storage.local import LocalStorage


def flip_byte(file: str, offset: int, mask: int = 0x20) -> None:
    """Flip the bits ``mask`` of the byte at ``offset`` of ``file`` in place (the same inode: every
    hard link of it sees the damage). The default flips an ASCII letter's case."""
    with open(file, "r+b") as f:
        f.seek(offset)
        byte = f.read(1)[0]
        f.seek(offset)
        f.write(bytes([byte ^ mask]))


def rot(file: str, offset: int | None = None, disk: Any = None) -> None:
    """Damage under the filesystem, a bit rotting on the disk: a byte changes (at ``offset``, else in
    the middle of the file), and the size and modification time stay as they were. The change time
    moves (a program cannot set it back), as when a tool rewrites a file and puts its time back;
    with ``disk`` (the test's local storage double) the file's stamp is reported as it was before,
    as a bit rotting on the disk leaves it."""
    before = os.stat(file)
    flip_byte(file, os.path.getsize(file) // 2 if offset is None else offset)
    os.utime(file, ns=(before.st_atime_ns, before.st_mtime_ns))
    after = os.stat(file)
    assert (after.st_size, after.st_mtime_ns) == (before.st_size, before.st_mtime_ns)
    if disk is not None:
        kept = (before.st_dev, before.st_ino, before.st_size, before.st_mtime_ns, before.st_ctime_ns)

        def stamp(path: str) -> Any:
            found = LocalStorage.stamp(disk, path)  # the real stamp, past the double's points
            return kept if found is not None and found[:4] == kept[:4] else found  # the same file, its data rotted

        disk.instead("stamp", stamp)


def tensor_span(shard: str, name: str) -> tuple[int, int]:
    """Where tensor ``name``'s bytes lie in the safetensors file ``shard``: (first byte, end), from
    the file's start, as its header says (read here with the standard library, not the package)."""
    with open(shard, "rb") as f:
        length = int.from_bytes(f.read(8), "little")
        start, end = json.loads(f.read(length))[name]["data_offsets"]
    return 8 + length + start, 8 + length + end
