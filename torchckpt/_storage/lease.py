"""One writer per directory on an object store: a lease object, created if absent and renewed.

An object store has no ``flock``. The claim is ``DIRECTORY/.torchckpt.lock``, created with
create-if-absent and holding its holder (pid, host, job), a session id and an expiry. A helper thread
renews it every third of its term with a conditional write (``If-Match`` on the ETag it last
wrote), so a second process finds a live lease and is refused; a holder that died stops renewing
and its lease expires, after which the next process takes it over (again conditionally, so two
cannot both take it). A holder whose renewal is refused has lost the directory to another
process: its next save raises instead of interleaving with the new holder's.

Why a crashed holder on this host is taken over at once: a job restarted after a crash (an
out-of-memory kill, a node agent restarting it) is usually started on the same host, and would
otherwise wait out the dead holder's term. The lease records the holder's pid, host name, pid
namespace (with the kernel's boot id) and start time, so a process that sees the same pids can
tell that the holder is gone, or that its pid now belongs to a later process. Where any of that
cannot be told (another host, a platform without ``/proc``, a lease written by an older
torchckpt), the lease expires as before.

Within one process the claim is shared, as on local disk: several managers may open the same
directory one after another.
"""

from __future__ import annotations

import atexit
import contextlib
import json
import os
import socket
import threading
import time
import uuid
from dataclasses import dataclass, field
from typing import Any

from torchckpt._format import spec
from torchckpt._paths import join
from torchckpt._storage.base import ABSENT, ConflictError, holder_note, is_alive, pid_space, process_start
from torchckpt.errors import CheckpointError, CorruptCheckpointError

LEASE_FILE = spec.LOCK_FILE  # the same name as the local claim
LEASE_SECS = 60.0  # how long a lease lives without renewal (a crashed holder's directory is free after this)
_MAX_LEASE_BYTES = 2**16


@dataclass
class Lease:
    storage: Any
    directory: str
    path: str
    session: str
    token: Any
    pid: int
    stop: threading.Event = field(default_factory=threading.Event)
    lost: str | None = None
    valid_until: float = 0.0  # time.monotonic() before which no other process can have taken the lease
    lock: threading.Lock = field(default_factory=threading.Lock)  # one conditional write at a time


def _term_from(started: float, secs: float) -> float:
    """Until when (monotonic) a lease of ``secs`` written at ``started`` is surely ours: half its
    term, a margin for the clocks of the processes that may take it over once it has expired by theirs."""
    return started + secs / 2


_leases: dict[str, Lease] = {}
_guard = threading.RLock()


def _body(session: str, seconds: float) -> bytes:
    pid = os.getpid()
    note = {"holder": holder_note(), "session": session, "expires": time.time() + seconds,
            "pid": pid, "host": socket.gethostname(), "pids": pid_space(), "started": process_start(pid)}
    return json.dumps(note).encode()


def _holder_is_gone(note: dict[str, Any]) -> bool:
    """Whether the lease ``note`` was written by a process of this host (the same host name, boot
    and pid namespace) that is no longer running, or whose pid a later process has reused. False
    whenever that cannot be told: the holder is then waited for until its lease expires."""
    pid, started, space = note.get("pid"), note.get("started"), note.get("pids")
    if not isinstance(pid, int) or isinstance(pid, bool) or pid <= 0 or note.get("host") != socket.gethostname():
        return False
    if space is None or space != pid_space():  # another container, or no /proc: its pids are not ours
        return False
    return not is_alive(pid, started if isinstance(started, int) else None)


def _refusal(directory: str, holder: str, expires: float, here: bool) -> CheckpointError:
    left = max(0.0, expires - time.time())
    if here:
        why = ("That process is running on this host; stop it, or use another directory. Once it is gone, "
               "its lease is taken over at once.")
    else:
        why = ("If that process crashed, its lease expires on its own (a crashed holder on this host is taken "
               "over at once; one on another host cannot be probed); otherwise stop it, or use another directory.")
    return CheckpointError(
        f"{directory} is managed by another live process ({holder[:200]}; its lease runs for {left:.0f} more seconds "
        f"unless renewed). Only one CheckpointManager may write to a directory at a time. {why}"
    )


def claim(storage: Any, directory: str) -> None:
    """Claim ``directory`` for this process (idempotent within the process).

    Raises:
        CheckpointError: another live process holds the lease, or this process lost it.
    """
    key = storage.key(directory)
    with _guard:
        lease = _leases.get(key)
        if lease is not None and lease.pid == os.getpid():
            if lease.lost is not None:
                raise CheckpointError(lease.lost)
            return
        path = join(directory, LEASE_FILE)
        session = uuid.uuid4().hex
        started = time.monotonic()
        try:
            token = storage.replace_file(path, _body(session, storage.lease_secs), ABSENT)
        except ConflictError:
            token = _take_over(storage, directory, path, session)
        lease = Lease(storage, directory, path, session, token, os.getpid(),
                      valid_until=_term_from(started, storage.lease_secs))
        _leases[key] = lease
        threading.Thread(target=_renew, args=(lease,), name="torchckpt-lease", daemon=True).start()


def _take_over(storage: Any, directory: str, path: str, session: str) -> Any:
    """Take an expired (or unreadable) lease conditionally; a live one is a refusal."""
    try:
        data, token = storage.read_versioned(path, _MAX_LEASE_BYTES, "Lease")
        note = json.loads(data)
        holder, expires = str(note["holder"]), float(note["expires"])
    except FileNotFoundError:  # released meanwhile: create it
        token, note, holder, expires = ABSENT, {}, "", 0.0
    except (ValueError, KeyError, TypeError, CorruptCheckpointError):
        raise CheckpointError(
            f"{path} is not a lease torchckpt can read, so the directory may be in use. If no process writes to "
            f"{directory}, delete that file and start again."
        ) from None
    if expires > time.time() and not _holder_is_gone(note):
        here = pid_space()
        raise _refusal(directory, holder, expires, here is not None and note.get("pids") == here
                       and note.get("host") == socket.gethostname())
    try:
        return storage.replace_file(path, _body(session, storage.lease_secs), token)
    except ConflictError:
        raise CheckpointError(
            f"{directory} was claimed by another process at the same moment; only one CheckpointManager may write "
            "to a directory at a time."
        ) from None


def _renew(lease: Lease) -> None:
    while not lease.stop.wait(lease.storage.lease_secs / 3):
        try:
            _renew_once(lease)
        except ConflictError:
            return
        except Exception:  # noqa: BLE001 - a passing network failure: try again at the next renewal
            continue


def _renew_once(lease: Lease) -> None:
    """Renew the lease conditionally; ConflictError (and ``lease.lost`` set) when another process took it."""
    with lease.lock:
        if lease.lost is not None:
            raise ConflictError(lease.lost)
        started = time.monotonic()
        try:
            lease.token = lease.storage.replace_file(lease.path, _body(lease.session, lease.storage.lease_secs),
                                                     lease.token)
        except ConflictError:
            lease.lost = (f"{lease.directory}: this process lost its claim on the directory (its lease expired "
                          "unrenewed, and another process took it over); nothing more is saved there. Use another "
                          "directory, or stop the other process and start again.")
            raise ConflictError(lease.lost) from None
        lease.valid_until = _term_from(started, lease.storage.lease_secs)


def fence(storage: Any, directory: str) -> None:
    """Check, before a write into ``directory``, that this process still holds its lease there (a
    no-op where it holds none). Free while the term of its last renewal runs; past it (this process
    was paused, or renewals failed), the lease is renewed now, conditionally, so that a holder that
    lost it finds out before it uploads anything.

    Raises:
        CheckpointError: the lease was lost, or cannot be confirmed now.
    """
    with _guard:
        lease = _leases.get(storage.key(directory))
    if lease is None or lease.pid != os.getpid():
        return
    if lease.lost is not None:
        raise CheckpointError(lease.lost)
    if time.monotonic() < lease.valid_until:
        return
    try:
        _renew_once(lease)
    except ConflictError as e:
        raise CheckpointError(str(e)) from None
    except Exception as e:
        raise CheckpointError(
            f"{directory}: this process's lease on the directory ran out unrenewed and cannot be renewed now ({e}); "
            "nothing was written. Save again once the store is reachable."
        ) from e


def session_for(storage: Any, directory: str) -> str | None:
    """The session id of this process's lease on ``directory``, if it holds one."""
    with _guard:
        lease = _leases.get(storage.key(directory))
        return lease.session if lease is not None and lease.pid == os.getpid() else None


def holds(storage: Any, directory: str) -> bool:
    return session_for(storage, directory) is not None


def release(storage: Any, directory: str) -> None:
    """Give up the lease: stop renewing it and delete it (if it is still ours)."""
    with _guard:
        lease = _leases.pop(storage.key(directory), None)
    if lease is None or lease.pid != os.getpid():
        return
    lease.stop.set()
    if lease.lost is None:
        try:
            data, token = storage.read_versioned(lease.path, _MAX_LEASE_BYTES, "Lease")
            if json.loads(data).get("session") == lease.session:
                storage.remove_quietly(lease.path)
        except (OSError, ValueError, CorruptCheckpointError):
            pass


def _release_all() -> None:
    """At a clean exit, give up this process's leases, so that the next run need not wait for them
    to expire (a crashed process's lease still expires on its own)."""
    for lease in list(_leases.values()):
        with contextlib.suppress(Exception):  # best effort at exit: the lease expires anyway
            release(lease.storage, lease.directory)


# Registered when the package is imported, before the asynchronous writer's hook: atexit runs
# hooks last-in first-out, so a final background save completes before its lease is released.
atexit.register(_release_all)


def _forget_after_fork() -> None:
    global _guard
    _guard = threading.RLock()
    _leases.clear()  # a child claims for itself (and is refused while the parent's lease lives)


if hasattr(os, "register_at_fork"):
    os.register_at_fork(after_in_child=_forget_after_fork)
