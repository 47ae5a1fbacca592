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
import weakref
from collections.abc import Iterable

from torchckpt._storage.base import Storage
from torchckpt._storage.files import is_read_only_error
from torchckpt.errors import CheckpointError, CheckpointWriteError

_holders: collections.Counter[tuple[int, str, str]] = collections.Counter()
# Each open manager of this process (until closed or collected) -> (where its directory really is, its name)
_names: weakref.WeakKeyDictionary[object, tuple[tuple[int, str, str], str]] = weakref.WeakKeyDictionary()
_guard = threading.Lock()


def _key(storage: Storage, directory: str) -> tuple[int, str, str]:
    """Whose count: this process's (a forked child holds no claim of its parent's, ``_storage.lock``),
    for one directory however it is spelled (a local one's symbolic links resolved, as its lock is;
    a URL without a trailing ``/``)."""
    path = storage.real_path(directory)
    return os.getpid(), type(storage).__name__, path.rstrip("/") or path if "://" in path else os.path.realpath(path)


def hold(storage: Storage, directory: str) -> None:
    """Count one more manager of this process holding ``directory``'s claim (taken by ``Storage.claim``)."""
    with _guard:
        _holders[_key(storage, directory)] += 1


def let_go(storage: Storage, directory: str, owner: object = None) -> None:
    """One manager (``owner``) is done with ``directory``: release its claim when no other one holds it."""
    key = _key(storage, directory)
    with _guard:
        if owner is not None:
            _names.pop(owner, None)
        _holders[key] -= 1
        last = _holders[key] <= 0
        if last:
            del _holders[key]
    if last:
        storage.release(directory)


def _refuse_another_name(storage: Storage, directory: str, name: str, owner: object) -> None:
    """One directory holds one manager's history: two open managers of this process under other
    names would each replace the state file with their own (a ``last`` and a ``best`` manager).
    Registers ``owner`` otherwise."""
    where = _key(storage, directory)
    with _guard:
        others = sorted(n for w, n in list(_names.values()) if w == where and n != name)
        if not others:
            _names[owner] = (where, name)
    if others:
        raise CheckpointError(
            f"{directory} is managed by an open CheckpointManager of this process with checkpoint_name={others[0]!r}: "
            f"one directory holds one manager's history, and a manager named {name!r} beside it would replace that "
            "history with its own. Give each manager its own directory (runs/last, runs/best), or close the other "
            "manager first.")


def take(storage: Storage, directory: str, leftovers: Iterable[str], name: str, owner: object) -> bool:
    """Create and claim ``directory`` for a manager of this process (``owner``, of checkpoint_name
    ``name``), and clear crashed writers' leftovers (temporary names starting with one of
    ``leftovers``). Returns True when the directory is read-only (an evaluation job on a read-only
    snapshot of a run): then nothing is claimed.

    Raises:
        CheckpointError: a manager of this process under another checkpoint_name holds the directory.
        CheckpointWriteError: the directory cannot be created or claimed for another reason.
    """
    _refuse_another_name(storage, directory, name, owner)
    try:
        storage.make_dirs(directory)
        storage.claim(directory)
        hold(storage, directory)
    except BaseException as e:  # not claimed (another process holds it, a read-only directory): not open here
        with _guard:
            _names.pop(owner, None)
        if not isinstance(e, OSError):
            raise
        if not is_read_only_error(e) or not storage.follows_to_dir(directory):
            raise CheckpointWriteError(f"Cannot use {directory} as a checkpoint directory: {e.strerror or e}.",
                                       directory, e) from e
        return True
    try:
        for prefix in leftovers:
            storage.remove_leftovers(directory, prefix)
    except BaseException:
        let_go(storage, directory, owner)
        raise
    return False
