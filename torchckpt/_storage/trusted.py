"""The shard files this process trusts without reading them back, by their stamps.

An incremental save places a shard of the previous checkpoint (a hard link) instead of writing it,
once it knows the file holds exactly the bytes it would write: by reading it back, or, for a file
this process wrote or read back itself, by its stamp (device, inode, size, modification and
change times), which every write or replacement through the filesystem changes (see
``_save.reuse`` for why, and its limits).

Why here, below both paths: saves add to the table (``_save.reuse``), and a restore or a reader
that finds a file damaged drops it (``_load.opened``). Damage under the filesystem, a bit rotting
on the disk, changes no stamp: without the drop, the next save of the process would link the
damaged file into a new checkpoint again; with it, that save reads the file back, finds the damage
and writes the shard afresh.

Why a save says when it looked (:func:`now`): an async save commits, and only then adds what it
checked, in the background. A file found damaged meanwhile must not come back with it: a save adds
a file only if it was not dropped after the save looked at it.
"""

from __future__ import annotations

import itertools
import threading
from collections.abc import Iterable

from torchckpt._storage.base import Stamp

KNOWN_FILES = 4096  # how many files' stamps a process remembers (oldest forgotten first)

# (device, inode) -> (size, modification time, change time, header checksum, tensor digests)
_known: dict[tuple[int, int], tuple[int, int, int, str, tuple[int, ...]]] = {}
_dropped: dict[tuple[int, int], int] = {}  # (device, inode) -> when it was found damaged (see now())
_clock = itertools.count(1)
_last = 0
_lock = threading.Lock()


def now() -> int:
    """A moment to record with a file a save checks: :func:`remember` skips the file if it was
    found damaged at or after that moment."""
    with _lock:
        return _last


def remember(files: Iterable[tuple[Stamp, str, tuple[int, ...], int]]) -> set[tuple[int, int]]:
    """Trust each file (its stamp, header checksum, tensor digests and the :func:`now` of its
    check) while its stamp stays the same, unless it was found damaged since that check; beyond
    ``KNOWN_FILES`` the oldest are forgotten. Returns the (device, inode) pairs of the given files
    trusted on return."""
    keys, files = [], list(files)  # taken before the lock: the iterable may call now()
    with _lock:
        for (device, inode, size, mtime, ctime), header_checksum, digests, checked_at in files:
            if _dropped.get((device, inode), -1) > checked_at:
                continue
            _known.pop((device, inode), None)  # the newest last: forgotten last
            _known[device, inode] = (size, mtime, ctime, header_checksum, digests)
            keys.append((device, inode))
        while len(_known) > KNOWN_FILES:
            del _known[next(iter(_known))]
        return {key for key in keys if key in _known}


def vouches(stamp: Stamp | None, header_checksum: str, digests: tuple[int, ...]) -> bool:
    """Whether the file with ``stamp`` is one this process wrote or checked holding exactly that."""
    if stamp is None:
        return False
    device, inode, size, mtime, ctime = stamp
    with _lock:
        return _known.get((device, inode)) == (size, mtime, ctime, header_checksum, digests)


def forget(stamp: Stamp | None) -> None:
    """Stop trusting the file with ``stamp`` (by device and inode, whatever its size and time):
    it was found damaged, and the next save that would reuse it reads it back first. A save that
    checked it before now does not trust it again (:func:`remember`)."""
    global _last
    if stamp is None:
        return
    key = (stamp[0], stamp[1])
    with _lock:
        _last = next(_clock)
        _known.pop(key, None)
        _dropped.pop(key, None)
        _dropped[key] = _last
        while len(_dropped) > KNOWN_FILES:
            del _dropped[next(iter(_dropped))]
