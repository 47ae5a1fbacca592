"""One writer per directory across processes: an ``flock`` that dies with its process.

The lock file records the holder (pid, host, the job's id under torchrun, start time) so that a refused process can say who
holds the directory. Within one process the claim is shared, so a second manager on the same
directory keeps working (as TensorFlow's tests expect).

A claim belongs to the process that made it. A child forked from a holder inherits the locked
descriptor, and with it (as far as the kernel is concerned) the lock, but not the claim: the
child closes its copies right after the fork and must claim for itself, which is refused while
the parent holds the directory. Otherwise parent and child would both write numbered checkpoints
and could pick the same number.
"""

from __future__ import annotations

import contextlib
import fcntl
import os
import threading

from torchckpt._format import spec
from torchckpt._storage import files
from torchckpt._storage.base import holder_note
from torchckpt.errors import CheckpointError

LOCK_FILE = spec.LOCK_FILE
_held: dict[str, int] = {}
# Reentrant: a KeyboardInterrupt that lands while the guard is held must not leave it locked for
# the `except KeyboardInterrupt: manager.save()` that follows on the same thread.
_guard = threading.RLock()


def _key(directory: str) -> str:
    return os.path.realpath(directory)


def claim_directory(directory: str) -> None:
    """Claim ``directory`` for this process (idempotent within the process).

    Raises:
        CheckpointError: another live process (a parent, too) holds it; the message names it.
        OSError: the lock file cannot be created (a read-only directory, say); nothing is held.
    """
    key = _key(directory)
    if key in _held:  # already this process's (every save asks): no lock taken
        return
    with _guard:
        if key in _held:
            return
        path = os.path.join(directory, LOCK_FILE)
        fd = files.open_or_create(path, "Lock file")
        try:
            try:
                fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
            except BlockingIOError:
                holder = os.pread(fd, 4096, 0).decode(errors="replace").strip() or "an unknown process"
                raise CheckpointError(
                    f"{directory} is managed by another live process ({holder[:300]}). Only one CheckpointManager "
                    "may write to a directory at a time; stop that process or use another directory."
                ) from None
            note = f"{holder_note()}\n".encode()
            os.ftruncate(fd, 0)
            os.pwrite(fd, note, 0)
        except BaseException:
            os.close(fd)  # a failed claim holds nothing: the lock goes with the descriptor
            raise
        _held[key] = fd  # kept open for the life of the process; the kernel drops the lock at exit


def holds(directory: str) -> bool:
    """Whether this process holds its claim on ``directory``."""
    with _guard:
        return _key(directory) in _held


def release_directory(directory: str) -> None:
    """Give up this process's claim (tests and long-lived processes that switch directories)."""
    with _guard:
        fd = _held.pop(_key(directory), None)
    if fd is not None:
        os.close(fd)


def _forget_after_fork() -> None:
    """In a forked child: close the inherited lock descriptors and drop the parent's claims. The
    parent's lock stays (it still has its own descriptor), so a claim by the child is refused."""
    global _guard
    _guard = threading.RLock()
    for fd in _held.values():
        with contextlib.suppress(OSError):
            os.close(fd)
    _held.clear()


if hasattr(os, "register_at_fork"):
    os.register_at_fork(after_in_child=_forget_after_fork)
