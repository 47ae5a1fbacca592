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
from torchckpt.errors import CheckpointError, CheckpointWriteError

# By directory, how many managers of this process hold its claim, by their checkpoint_name
_holders: dict[tuple[int, str, str], collections.Counter[str]] = {}
_guard = threading.Lock()


def _key(storage: Storage, directory: str) -> tuple[int, str, str]:
    """Whose count: this process's (a forked child holds no claim of its parent's, ``_storage.lock``)."""
    return os.getpid(), type(storage).__name__, storage.real_path(directory)


def hold(storage: Storage, directory: str, name: str) -> None:
    """Count one more manager of this process, of checkpoint_name ``name``, holding ``directory``'s
    claim (taken by ``Storage.claim``)."""
    with _guard:
        _holders.setdefault(_key(storage, directory), collections.Counter())[name] += 1


def let_go(storage: Storage, directory: str, name: str) -> None:
    """One manager is done with ``directory``: release its claim when no other one holds it."""
    key = _key(storage, directory)
    with _guard:
        names = _holders.get(key, collections.Counter())
        names[name] -= 1
        if names[name] <= 0:
            del names[name]
        last = not names
        if last:
            _holders.pop(key, None)
    if last:
        storage.release(directory)


def _refuse_another_name(storage: Storage, directory: str, name: str) -> None:
    """One directory holds one manager's history: two managers of this process under other names
    would each replace the state file with their own (a ``last`` and a ``best`` manager)."""
    with _guard:
        others = sorted(n for n in _holders.get(_key(storage, directory), ()) if n != name)
    if others:
        raise CheckpointError(
            f"{directory} is managed by a CheckpointManager of this process with checkpoint_name={others[0]!r}: one "
            f"directory holds one manager's history, and a manager named {name!r} beside it would replace that "
            "history with its own. Give each manager its own directory (runs/last, runs/best), or close the other "
            "manager first.")


def take(storage: Storage, directory: str, leftovers: Iterable[str], name: str) -> bool:
    """Create and claim ``directory`` for a manager of this process (checkpoint_name ``name``), and
    clear crashed writers' leftovers (temporary names starting with one of ``leftovers``). Returns
    True when the directory is read-only (an evaluation job on a read-only snapshot of a run): then
    nothing is claimed.

    Raises:
        CheckpointError: a manager of this process under another checkpoint_name holds the directory.
        CheckpointWriteError: the directory cannot be created or claimed for another reason.
    """
    _refuse_another_name(storage, directory, name)
    try:
        storage.make_dirs(directory)
        storage.claim(directory)
        hold(storage, directory, name)
    except OSError as e:
        if not is_read_only_error(e) or not storage.follows_to_dir(directory):
            raise CheckpointWriteError(f"Cannot use {directory} as a checkpoint directory: {e.strerror or e}.",
                                       directory, e) from e
        return True
    try:
        for prefix in leftovers:
            storage.remove_leftovers(directory, prefix)
    except BaseException:
        let_go(storage, directory, name)
        raise
    return False
