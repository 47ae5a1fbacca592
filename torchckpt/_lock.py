"""One writer per directory across processes: an ``flock`` that dies with its process.

The lock file records the holder (pid, host, start time) so that a refused process can say who
holds the directory. Within one process the claim is shared, so a second manager on the same
directory keeps working (as TensorFlow's tests expect).
"""

from __future__ import annotations

import fcntl
import os
import socket
import threading
import time

from torchckpt.errors import CheckpointError

LOCK_FILE = ".torchckpt.lock"
_held: dict[str, int] = {}
_guard = threading.Lock()


def claim_directory(directory: str) -> None:
    """Claim ``directory`` for this process (idempotent within the process).

    Raises:
        CheckpointError: another live process holds it; the message names that process.
    """
    key = os.path.realpath(directory)
    with _guard:
        if key in _held:
            return
        path = os.path.join(directory, LOCK_FILE)
        fd = os.open(path, os.O_RDWR | os.O_CREAT, 0o644)
        try:
            fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except BlockingIOError:
            holder = os.pread(fd, 4096, 0).decode(errors="replace").strip() or "an unknown process"
            os.close(fd)
            raise CheckpointError(
                f"{directory} is managed by another live process ({holder}). Only one CheckpointManager "
                "may write to a directory at a time; stop that process or use another directory."
            ) from None
        os.ftruncate(fd, 0)
        os.pwrite(fd, f"pid {os.getpid()} on {socket.gethostname()}, since {time.ctime()}\n".encode(), 0)
        _held[key] = fd  # kept open for the life of the process; the kernel drops the lock at exit


def release_directory(directory: str) -> None:
    """Give up this process's claim (tests and long-lived processes that switch directories)."""
    key = os.path.realpath(directory)
    with _guard:
        fd = _held.pop(key, None)
        if fd is not None:
            os.close(fd)
