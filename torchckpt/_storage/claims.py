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
from collections.abc import Iterable

from torchckpt._storage.base import Storage
from torchckpt._storage.files import is_read_only_error
from torchckpt.errors import CheckpointWriteError

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


def take(storage: Storage, directory: str, leftovers: Iterable[str]) -> bool:
    """Create and claim ``directory`` for a manager of this process, and clear crashed writers'
    leftovers (temporary names starting with one of ``leftovers``). Returns True when the directory
    is read-only (an evaluation job on a read-only snapshot of a run): then nothing is claimed.

    Raises:
        CheckpointWriteError: the directory cannot be created or claimed for another reason.
    """
    try:
        storage.make_dirs(directory)
        storage.claim(directory)
        hold(storage, directory)
    except OSError as e:
        if not is_read_only_error(e) or not storage.follows_to_dir(directory):
            raise CheckpointWriteError(f"Cannot use {directory} as a checkpoint directory: {e.strerror or e}.",
                                       directory, e) from e
        return True
    try:
        for prefix in leftovers:
            storage.remove_leftovers(directory, prefix)
    except BaseException:
        let_go(storage, directory)
        raise
    return False
