"""Opening files safely: never through a symbolic link, only regular files, reads bounded by size.

A checkpoint directory may come from anywhere (a download, a shared drive, a colleague's run), so
every name in it is untrusted. A planted ``index.json -> /dev/zero`` must not be read until memory
runs out, a shard that is a FIFO must not hang a reader, and a lock file that is a link to
``~/.bashrc`` must not be truncated. So every file the library opens inside a checkpoint or a
manager's directory is opened here: with ``O_NOFOLLOW`` (a link is refused, not followed), with
``O_NONBLOCK`` on the way in (opening a FIFO cannot block), and checked to be a regular file
before a single byte is read or written.
"""

from __future__ import annotations

import errno
import os
import stat
import threading

from torchckpt._storage.base import REGULAR_FILE, LinkTarget, oversize_file
from torchckpt.errors import CorruptCheckpointError

NOFOLLOW = getattr(os, "O_NOFOLLOW", 0)
CLOEXEC = getattr(os, "O_CLOEXEC", 0)
_NONBLOCK = getattr(os, "O_NONBLOCK", 0)


def is_read_only_error(error: OSError) -> bool:
    """Whether ``error`` means the directory cannot be written at all (a read-only mount or
    permissions), as opposed to a passing failure."""
    return error.errno in (errno.EROFS, errno.EACCES, errno.EPERM)


def _kind(mode: int) -> str:
    for test, name in ((stat.S_ISDIR, "a directory"), (stat.S_ISFIFO, "a FIFO"), (stat.S_ISCHR, "a character device"),
                       (stat.S_ISBLK, "a block device"), (stat.S_ISSOCK, "a socket"), (stat.S_ISLNK, "a symbolic link")):
        if test(mode):
            return name
    return "not a regular file"


def link_target(path: str) -> LinkTarget | None:
    """Where the symbolic link ``path`` leads (None: not a link), found with ``stat`` only: nothing
    is opened, so a link to a FIFO cannot block."""
    if not os.path.islink(path):
        return None
    real = os.path.realpath(path)
    try:
        mode = os.stat(real).st_mode
    except FileNotFoundError:
        return LinkTarget(real, "nothing")
    except OSError as e:  # a loop of links (ELOOP), a folder that may not be read
        return LinkTarget(real, f"unreadable ({e.strerror or e})")
    return LinkTarget(real, REGULAR_FILE if stat.S_ISREG(mode) else _kind(mode))


def reopen(fd: int) -> int | None:
    """A new open file description of the file open at ``fd`` (its own offset and readahead state),
    read-only; None where the system cannot give one (no ``/proc/self/fd``).

    ``/proc/self/fd/N`` names the open file itself, not a path: the same inode even if the file was
    renamed, replaced or deleted since. The check of the device and inode says so again.
    """
    try:
        new = os.open(f"/proc/self/fd/{fd}", os.O_RDONLY | CLOEXEC)
    except OSError:
        return None
    try:
        old_stat, new_stat = os.fstat(fd), os.fstat(new)
    except OSError:
        os.close(new)
        return None
    if (old_stat.st_dev, old_stat.st_ino) != (new_stat.st_dev, new_stat.st_ino):
        os.close(new)
        return None
    return new


def _link_error(path: str, what: str) -> CorruptCheckpointError:
    return CorruptCheckpointError(
        f"{what} {path} is a symbolic link; torchckpt never follows links inside a checkpoint or manager "
        "directory (it could point anywhere). Replace it with the file itself.",
        path,
    )


def open_regular(path: str, what: str = "File") -> int:
    """A read-only descriptor of the regular file ``path``, never through a link or onto a device.

    Raises:
        FileNotFoundError: nothing is there (callers decide what that means).
        CorruptCheckpointError: ``path`` is a link, a directory, a FIFO, a device or a socket.
    """
    return _open_checked(path, os.O_RDONLY, what, "read")


def _os_open(path: str, flags: int) -> int:
    """``os.open``, tried again each time the process's limit on open files could be raised."""
    while True:
        try:
            return os.open(path, flags, 0o644)
        except OSError as e:
            if e.errno != errno.EMFILE or not allow_more_open_files():
                raise


_limit_lock = threading.Lock()


def allow_more_open_files() -> bool:
    """Raise this process's soft limit on open files toward its hard limit (double it, by 1,024
    at least); False when it is at the hard limit already, or cannot be changed here.

    A restore holds every shard of a checkpoint open at once (``_load.opened.OpenShards``, which
    holds a few at a time only past the hard limit), and a checkpoint saved by 1,024 ranks has
    1,024 shards or more: the usual soft limit of 1,024 would refuse it. A soft limit is there for a program that needs more to raise it, up to the hard
    limit it was given, as Go's runtime and the JVM do when they start; this raises it only once a
    file would not open, and never lowers it.
    """
    try:
        import resource
    except ImportError:  # no such limits on this platform
        return False
    with _limit_lock:
        try:
            soft, hard = resource.getrlimit(resource.RLIMIT_NOFILE)
            if soft == resource.RLIM_INFINITY or hard != resource.RLIM_INFINITY and soft >= hard:
                return False
            wanted = max(2 * soft, soft + 1024)
            resource.setrlimit(resource.RLIMIT_NOFILE, (wanted if hard == resource.RLIM_INFINITY else min(wanted, hard),
                                                        hard))
        except (OSError, ValueError):
            return False
    return True


def _open_checked(path: str, flags: int, what: str, use: str) -> int:
    """``os.open`` without following a link or blocking on a FIFO, then refuse anything but a
    regular file; the descriptor is blocking again when returned."""
    try:
        fd = _os_open(path, flags | NOFOLLOW | _NONBLOCK | CLOEXEC)
    except OSError as e:
        if e.errno == errno.ELOOP:
            raise _link_error(path, what) from None
        if e.errno in (errno.ENXIO, errno.EISDIR):  # a socket, or a directory on some systems
            raise CorruptCheckpointError(f"{what} {path} is not a regular file; refusing to {use} it.", path) from None
        raise
    try:
        mode = os.fstat(fd).st_mode
        if not stat.S_ISREG(mode):
            raise CorruptCheckpointError(f"{what} {path} is {_kind(mode)}, not a regular file; refusing to {use} it.", path)
        if _NONBLOCK:
            os.set_blocking(fd, True)
    except BaseException:
        os.close(fd)
        raise
    return fd


def read_regular(path: str, limit: int, what: str = "File") -> bytes:
    """The whole content of the regular file ``path``, which must be at most ``limit`` bytes.

    Raises:
        FileNotFoundError: nothing is there.
        CorruptCheckpointError: not a regular file, or larger than ``limit``.
    """
    fd = open_regular(path, what)
    try:
        size = os.fstat(fd).st_size
        if size > limit:
            raise oversize_file(what, path, size, limit)
        ask_readahead(fd, size)
        chunks = []
        left = size
        while left > 0:  # a file that shrinks meanwhile just ends early; one that grows is cut at ``size``
            chunk = os.read(fd, left)
            if not chunk:
                break
            chunks.append(chunk)
            left -= len(chunk)
        return b"".join(chunks)
    finally:
        os.close(fd)


# The kernel reads at most max(read_ahead_kb, max_sectors_kb) per POSIX_FADV_WILLNEED, 128 KiB on
# many disks: larger requests would leave the rest of each one unread.
READAHEAD_CHUNK = 128 * 2**10


def ask_readahead(fd: int, size: int) -> None:
    """Ask the kernel to read the first ``size`` bytes of ``fd`` now, a request per
    :data:`READAHEAD_CHUNK`, where the file is over one chunk: the disk then has them all in flight
    where one ``read`` of the whole file is served a readahead window at a time (a cold 2 MB index
    read in 2.2 ms against 2.9 ms here). Only a hint: a failure is ignored."""
    if size <= READAHEAD_CHUNK or not hasattr(os, "posix_fadvise"):
        return
    try:
        for offset in range(0, size, READAHEAD_CHUNK):
            os.posix_fadvise(fd, offset, READAHEAD_CHUNK, os.POSIX_FADV_WILLNEED)
    except OSError:
        pass


def create_exclusive(path: str, flags: int = os.O_WRONLY, mode: int = 0o644) -> int:
    """Create the new file ``path`` (refused when anything, a link included, is already there)."""
    return os.open(path, flags | os.O_CREAT | os.O_EXCL | NOFOLLOW | CLOEXEC, mode)


def open_or_create(path: str, what: str = "File") -> int:
    """A read-write descriptor of the regular file ``path``, created when missing; never a link's target.

    Raises:
        CorruptCheckpointError: ``path`` is a link or not a regular file.
    """
    return _open_checked(path, os.O_RDWR | os.O_CREAT, what, "use")


def is_real_directory(path: str) -> bool:
    """Whether ``path`` is a directory itself, not a link to one."""
    try:
        return stat.S_ISDIR(os.lstat(path).st_mode)
    except (OSError, ValueError):
        return False


def is_regular_file(path: str) -> bool:
    """Whether ``path`` is a regular file itself, not a link to one."""
    try:
        return stat.S_ISREG(os.lstat(path).st_mode)
    except (OSError, ValueError):
        return False


def named(error: OSError, path: str) -> OSError:
    """``error`` with ``filename`` set to ``path`` when it names no file (``except OSError`` and
    ``e.errno`` keep working; the message now says which file)."""
    if error.filename is not None:
        return error
    return type(error)(error.errno, error.strerror or str(error), path)
