"""The shard files this process trusts without reading them back, by their stamps.

An incremental save places a shard of the previous checkpoint (a hard link) instead of writing it,
once it knows the file holds exactly the bytes it would write: by reading it back, or, for a file
this process wrote or read back itself, by its stamp (device, inode, size, modification time),
which every write through the filesystem changes (see ``_save.reuse`` for why, and its limits).

Why here, below both paths: saves add to the table (``_save.reuse``), and a restore, a reader or
``verify`` that finds a file damaged drops it (``_load.opened``). Damage under the filesystem, a
bit rotting on the disk, changes no stamp: without the drop, the next save of the process would
link the damaged file into a new checkpoint again; with it, that save reads the file back, finds
the damage and writes the shard afresh.
"""

from __future__ import annotations

import threading
from collections.abc import Iterable

from torchckpt._storage.base import Stamp

KNOWN_FILES = 4096  # how many files' stamps a process remembers (oldest forgotten first)

# (device, inode) -> (size, modification time, header checksum, tensor digests)
_known: dict[tuple[int, int], tuple[int, int, str, tuple[int, ...]]] = {}
_lock = threading.Lock()


def remember(files: Iterable[tuple[Stamp, str, tuple[int, ...]]]) -> set[tuple[int, int]]:
    """Trust each file (its stamp, header checksum and tensor digests) while its stamp stays the
    same; beyond ``KNOWN_FILES`` the oldest are forgotten. Returns the (device, inode) pairs of the
    given files still trusted on return."""
    keys = []
    with _lock:
        for (device, inode, size, mtime), header_checksum, digests in files:
            _known.pop((device, inode), None)  # the newest last: forgotten last
            _known[device, inode] = (size, mtime, header_checksum, digests)
            keys.append((device, inode))
        while len(_known) > KNOWN_FILES:
            del _known[next(iter(_known))]
        return {key for key in keys if key in _known}


def vouches(stamp: Stamp | None, header_checksum: str, digests: tuple[int, ...]) -> bool:
    """Whether the file with ``stamp`` is one this process wrote or checked holding exactly that."""
    if stamp is None:
        return False
    device, inode, size, mtime = stamp
    with _lock:
        return _known.get((device, inode)) == (size, mtime, header_checksum, digests)


def forget(stamp: Stamp | None) -> None:
    """Stop trusting the file with ``stamp`` (by device and inode, whatever its size and time):
    it was found damaged, and the next save that would reuse it reads it back first."""
    if stamp is not None:
        with _lock:
            _known.pop((stamp[0], stamp[1]), None)
