"""Crash-safe commit: write into a temporary sibling, fsync, then rename into place.

Why rename is the commit point: ``rename(2)`` within one filesystem is atomic, so a reader sees
either no checkpoint or a complete one, never a half-written one. Before the rename every file and
the temporary directory itself are fsynced, so the bytes are durable before the name appears; after
it the parent directory is fsynced, so the name itself survives a power loss.

A new checkpoint is committed with ``renameat2(RENAME_NOREPLACE)``: if anything appeared at its
name meanwhile (another process, a forked child), the commit fails instead of swapping over a
committed, acknowledged checkpoint. Only an explicit replacement (``Checkpoint.write`` onto an
existing path, a manager's explicit ``checkpoint_number``) replaces, with
``renameat2(RENAME_EXCHANGE)``, which swaps the two directories in one atomic step; where that is
unavailable the old directory is first moved aside, a window in which the path is briefly absent
but never partial.

Temporary names carry the writer's pid and a tag of its host
(``ckpt-7.torchckpt-tmp-<pid>-h<host>-<random>``) so that a later process can tell the leftovers of
a crashed writer from a save in progress: on the same host by asking whether that pid is alive, and
from another host (a job restarted elsewhere on a shared file system), where no pid can be probed,
by age: only once nothing in it changed for ``LEFTOVER_GRACE_SECS``.
"""

from __future__ import annotations

import contextlib
import ctypes
import ctypes.util
import errno
import os
import shutil
import time
import uuid

from torchckpt._format.spec import OLD_MARKER, TMP_MARKER, is_temporary_name
from torchckpt._storage import files as storage_files
from torchckpt._storage.base import LEFTOVER_GRACE_SECS, AlreadyCommitted, host_tag, is_alive

_RENAME_NOREPLACE = 1
_RENAME_EXCHANGE = 2
_AT_FDCWD = -100


def temporary_sibling(path: str, marker: str = TMP_MARKER) -> str:
    """A unique temporary name next to ``path``, tagged with this process's pid and host."""
    return f"{path}{marker}{os.getpid()}-h{host_tag()}-{uuid.uuid4().hex[:12]}"


def fsync_dir(path: str) -> None:
    """fsync a directory so that the names inside it are durable."""
    fd = os.open(path, os.O_RDONLY | getattr(os, "O_DIRECTORY", 0))
    try:
        os.fsync(fd)
    except OSError as e:  # some filesystems (and platforms) refuse fsync on directories
        if e.errno not in (errno.EINVAL, errno.ENOTSUP, errno.EBADF):
            raise
    finally:
        os.close(fd)


def write_file_atomic(path: str, data: bytes) -> None:
    """Replace ``path`` with ``data`` atomically and durably (temp file, fsync, rename, fsync dir).

    The temporary is created exclusively (never through a planted link), and the rename replaces
    whatever is at ``path`` itself, a link included, never a link's target. Errors name the file.
    """
    tmp = temporary_sibling(path)
    try:
        fd = storage_files.create_exclusive(tmp)
        try:
            view = memoryview(data)
            while view:
                view = view[os.write(fd, view):]
            os.fsync(fd)
        finally:
            os.close(fd)
        os.replace(tmp, path)
    except OSError as e:
        with contextlib.suppress(OSError):
            os.unlink(tmp)
        raise storage_files.named(e, path) from e
    except BaseException:
        with contextlib.suppress(OSError):
            os.unlink(tmp)
        raise
    fsync_dir(os.path.dirname(os.path.abspath(path)))


def _libc_renameat2() -> ctypes._CFuncPtr | None:  # type: ignore[name-defined]
    name = ctypes.util.find_library("c")
    try:
        libc = ctypes.CDLL(name, use_errno=True)
        return libc.renameat2
    except (OSError, AttributeError, TypeError):
        return None


_renameat2 = _libc_renameat2()


AlreadyThere = AlreadyCommitted  # a commit that must not replace found a checkpoint at its name

def _rename2(a: str, b: str, flags: int) -> bool:
    """``renameat2(a, b, flags)``; False when the platform or filesystem cannot do it."""
    if _renameat2 is None:
        return False
    rc = _renameat2(_AT_FDCWD, os.fsencode(a), _AT_FDCWD, os.fsencode(b), flags)
    if rc == 0:
        return True
    err = ctypes.get_errno()
    if err in (errno.ENOSYS, errno.EINVAL, errno.ENOTSUP, errno.EPERM):
        return False
    if err == errno.EEXIST:
        raise AlreadyThere(err, os.strerror(err), b)
    raise OSError(err, os.strerror(err), b)


def _exchange(a: str, b: str) -> bool:
    """Atomically swap two paths; False when the platform or filesystem cannot."""
    return _rename2(a, b, _RENAME_EXCHANGE)


def _rename_new(tmp: str, final: str) -> None:
    """Rename ``tmp`` to ``final``, which must not exist: FileExistsError if it does, even when
    it appears between a check and the rename."""
    if _rename2(tmp, final, _RENAME_NOREPLACE):
        return
    if os.path.lexists(final):  # no renameat2: rename(2) would replace an empty directory or a file
        raise AlreadyThere(errno.EEXIST, os.strerror(errno.EEXIST), final)
    try:
        os.rename(tmp, final)  # replaces no non-empty directory, and every checkpoint has its index
    except OSError as e:
        if e.errno in (errno.ENOTEMPTY, errno.EEXIST):
            raise AlreadyThere(errno.EEXIST, os.strerror(errno.EEXIST), final) from None
        raise


def remove_entry(path: str) -> None:
    """Remove what ``path`` names, best effort: a directory with everything in it; a link or a file
    itself (a link is removed, never followed: what it points to stays)."""
    try:
        if os.path.isdir(path) and not os.path.islink(path):
            shutil.rmtree(path, ignore_errors=True)
        else:
            os.unlink(path)
    except OSError:
        pass


def commit_directory(tmp: str, final: str, replace: bool = True) -> None:
    """Make the fully written, fsynced directory ``tmp`` appear at ``final`` in one step.

    With ``replace``, an existing ``final`` is replaced atomically and then removed. Without it,
    an existing ``final`` (even one that appears at the last moment) raises :class:`AlreadyThere`
    and ``tmp`` is left for the caller to remove.
    """
    fsync_dir(tmp)
    parent = os.path.dirname(os.path.abspath(final))
    if not replace:
        _rename_new(tmp, final)
        fsync_dir(parent)
        return
    if os.path.lexists(final):
        if _exchange(tmp, final):
            fsync_dir(parent)
            remove_entry(tmp)
            return
        old = temporary_sibling(final, OLD_MARKER)
        os.rename(final, old)
        os.rename(tmp, final)
        fsync_dir(parent)
        remove_entry(old)
        return
    try:
        _rename_new(tmp, final)
    except AlreadyThere:  # appeared meanwhile: replace it after all, as asked
        commit_directory(tmp, final, replace=True)
        return
    fsync_dir(parent)


def _writer(name: str) -> tuple[int | None, str | None]:
    """(pid, host tag) of the process that made a temporary; the tag is None in names made before
    hosts were recorded (judged as this host's, as they were then)."""
    for marker in (TMP_MARKER, OLD_MARKER):
        if marker in name:
            parts = name.rsplit(marker, 1)[1].split("-")
            pid = int(parts[0]) if parts[0].isdigit() else None
            host = parts[1][1:] if len(parts) > 2 and parts[1].startswith("h") else None
            return pid, host
    return None, None


def _newest_change(path: str) -> float:
    """The newest mtime of ``path`` and, for a directory, of everything in it (links not followed)."""
    newest = os.lstat(path).st_mtime
    if storage_files.is_real_directory(path):
        for root, dirs, files in os.walk(path):
            for name in [*dirs, *files]:
                with contextlib.suppress(OSError):
                    newest = max(newest, os.lstat(os.path.join(root, name)).st_mtime)
    return newest


def _is_stale(path: str, name: str) -> bool:
    pid, host = _writer(name)
    if host is not None and host != host_tag():  # its writer cannot be probed from here
        try:
            return time.time() - _newest_change(path) > LEFTOVER_GRACE_SECS
        except OSError:
            return False
    return pid is None or not is_alive(pid)


def remove_stale_temporaries(directory: str, prefix: str) -> list[str]:
    """Remove leftovers of crashed writers whose names start with ``prefix``; returns them.

    A leftover is removed only when the process that made it is gone (made on this host), or when
    nothing in it changed for ``LEFTOVER_GRACE_SECS`` (made on another host), so a save in progress
    in another live process is never disturbed.
    """
    removed: list[str] = []
    try:
        names = os.listdir(directory)
    except FileNotFoundError:
        return removed
    for name in names:
        if not name.startswith(prefix) or not is_temporary_name(name):
            continue
        path = os.path.join(directory, name)
        if not _is_stale(path, name):
            continue
        if storage_files.is_real_directory(path):
            shutil.rmtree(path, ignore_errors=True)
        else:  # a state-file temporary, or a link (removed itself, never followed)
            with contextlib.suppress(OSError):
                os.unlink(path)
        removed.append(name)
    return removed
