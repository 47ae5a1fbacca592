"""Crash-safe commit: write into a temporary sibling, fsync, then rename into place.

Why rename is the commit point: ``rename(2)`` within one filesystem is atomic, so a reader sees
either no checkpoint or a complete one, never a half-written one. Before the rename every file and
the temporary directory itself are fsynced, so the bytes are durable before the name appears; after
it the parent directory is fsynced, so the name itself survives a power loss.

Replacing an existing checkpoint directory uses Linux's ``renameat2(RENAME_EXCHANGE)``, which swaps
the two directories in one atomic step; where that is unavailable the old directory is first moved
aside, a window in which the path is briefly absent but never partial.

Temporary names carry the writer's pid (``ckpt-7.torchckpt-tmp-<pid>-<random>``) so that a later
process can tell the leftovers of a crashed writer from a save in progress.
"""

from __future__ import annotations

import contextlib
import ctypes
import ctypes.util
import errno
import os
import shutil
import uuid
from collections.abc import Iterator

TMP_MARKER = ".torchckpt-tmp-"
OLD_MARKER = ".torchckpt-old-"
_RENAME_EXCHANGE = 2
_AT_FDCWD = -100


def temporary_sibling(path: str, marker: str = TMP_MARKER) -> str:
    """A unique temporary name next to ``path``, tagged with this process's pid."""
    return f"{path}{marker}{os.getpid()}-{uuid.uuid4().hex[:12]}"


def is_temporary(name: str) -> bool:
    """Whether a directory entry is an uncommitted or superseded leftover of ours."""
    return TMP_MARKER in name or OLD_MARKER in name


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
    """Replace ``path`` with ``data`` atomically and durably (temp file, fsync, rename, fsync dir)."""
    tmp = temporary_sibling(path)
    try:
        fd = os.open(tmp, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o644)
        try:
            view = memoryview(data)
            while view:
                view = view[os.write(fd, view):]
            os.fsync(fd)
        finally:
            os.close(fd)
        os.replace(tmp, path)
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


def _exchange(a: str, b: str) -> bool:
    """Atomically swap two paths; False when the platform or filesystem cannot."""
    if _renameat2 is None:
        return False
    rc = _renameat2(_AT_FDCWD, os.fsencode(a), _AT_FDCWD, os.fsencode(b), _RENAME_EXCHANGE)
    if rc == 0:
        return True
    err = ctypes.get_errno()
    if err in (errno.ENOSYS, errno.EINVAL, errno.ENOTSUP, errno.EPERM):
        return False
    raise OSError(err, os.strerror(err), b)


def commit_directory(tmp: str, final: str) -> None:
    """Make the fully written, fsynced directory ``tmp`` appear at ``final`` in one step.

    An existing ``final`` is replaced atomically and then removed.
    """
    fsync_dir(tmp)
    parent = os.path.dirname(os.path.abspath(final))
    if os.path.lexists(final):
        if _exchange(tmp, final):
            fsync_dir(parent)
            shutil.rmtree(tmp, ignore_errors=True)
            return
        old = temporary_sibling(final, OLD_MARKER)
        os.rename(final, old)
        os.rename(tmp, final)
        fsync_dir(parent)
        shutil.rmtree(old, ignore_errors=True)
        return
    os.rename(tmp, final)
    fsync_dir(parent)


@contextlib.contextmanager
def temporary_directory(final: str) -> Iterator[str]:
    """A fresh temporary sibling of ``final``; removed again if the body raises."""
    parent = os.path.dirname(os.path.abspath(final))
    os.makedirs(parent, exist_ok=True)
    tmp = temporary_sibling(final)
    os.mkdir(tmp)
    try:
        yield tmp
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise


def _writer_pid(name: str) -> int | None:
    for marker in (TMP_MARKER, OLD_MARKER):
        if marker in name:
            head = name.rsplit(marker, 1)[1].split("-", 1)[0]
            return int(head) if head.isdigit() else None
    return None


def _is_alive(pid: int) -> bool:
    if pid == os.getpid():
        return True
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:
        return True
    return True


def remove_stale_temporaries(directory: str, prefix: str) -> list[str]:
    """Remove leftovers of crashed writers whose names start with ``prefix``; returns them.

    A leftover is removed only when the process that made it is gone, so a save in progress in
    another live process is never disturbed.
    """
    removed: list[str] = []
    try:
        names = os.listdir(directory)
    except FileNotFoundError:
        return removed
    for name in names:
        if not name.startswith(prefix) or not is_temporary(name):
            continue
        pid = _writer_pid(name)
        if pid is not None and _is_alive(pid):
            continue
        shutil.rmtree(os.path.join(directory, name), ignore_errors=True)
        removed.append(name)
    return removed
