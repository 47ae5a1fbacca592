"""Which managers of this process hold a directory's claim: it is released when the last one closes.

A claim (``Storage.claim``: a lock file's ``flock``, an object store's lease) belongs to the process,
so two managers on one directory in one process share it (as TensorFlow's tests expect). Releasing
it when the first of them closes would leave the other writing without it, and a second process
could then claim the directory beside it; so each manager counts itself in here, and the last one
to close releases the claim.
"""

from __future__ import annotations

import collections
import os
import threading

from torchckpt._storage.base import Storage

_holders: collections.Counter[tuple[int, str, str]] = collections.Counter()
_guard = threading.Lock()


def _key(storage: Storage, directory: str) -> tuple[int, str, str]:
    """Whose count: this process's (a forked child holds no claim of its parent's, ``_storage.lock``)."""
    return os.getpid(), type(storage).__name__, storage.real_path(directory)


def hold(storage: Storage, directory: str) -> None:
    """Count one more manager of this process holding ``directory``'s claim (taken by ``Storage.claim``)."""
    with _guard:
        _holders[_key(storage, directory)] += 1


def let_go(storage: Storage, directory: str) -> None:
    """One manager is done with ``directory``: release its claim when no other one holds it."""
    key = _key(storage, directory)
    with _guard:
        _holders[key] -= 1
        last = _holders[key] <= 0
        if last:
            del _holders[key]
    if last:
        storage.release(directory)
