"""The local filesystem as a :class:`~torchckpt._storage.base.Storage`: today's fast paths, behind the seam.

Writes go through ``_storage.local_output`` (``O_DIRECT`` through reusable aligned buffers for large files),
reads are scatter ``preadv`` straight into the destination tensors, a checkpoint is written into
a temporary sibling and committed by ``renameat2`` (``_storage.atomic``), and a manager's claim is an
``flock`` (``_storage.lock``). Every file inside a checkpoint is opened through ``_storage.files``: never through
a link, only regular files.
"""

from __future__ import annotations

import contextlib
import errno
import io
import mmap
import os
import shutil
import stat
import threading
from collections.abc import Collection, Iterable, Iterator
from typing import Any

from torchckpt._format.spec import INDEX_FILE, OLD_MARKER
from torchckpt._storage import atomic, local_output, lock
from torchckpt._storage import files as storage_files
from torchckpt._storage import warm as storage_warm
from torchckpt._storage.base import IOV_MAX, LinkTarget, Output, Stamp

_INDEX_BUFFER = 2**20
_VIEW_BYTES = 64 * 2**20  # pieces of a mapped file
_MADV_POPULATE_READ = getattr(mmap, "MADV_POPULATE_READ", 22)  # Linux 5.14; Python 3.11 lacks the name


def _populate(mapped: mmap.mmap, start: int, end: int) -> None:
    """Fault in the pages of ``[start, end)`` of a mapping in large reads: a cold 500 MB file read
    through page faults alone took 0.5 to 1.2 s here, populated first 0.3 s (as ``preadv`` of
    16 MiB), and a cached one 0.03 s either way. Elsewhere the faults read it."""
    aligned = start - start % mmap.PAGESIZE
    with contextlib.suppress(OSError, ValueError, AttributeError):
        mapped.madvise(_MADV_POPULATE_READ, aligned, end - aligned)


# preadv's flag for "only what the page cache holds, never wait for the disk" (Linux 4.14+)
_NOWAIT: int | None = getattr(os, "RWF_NOWAIT", None)


class LocalSource:
    """An open regular file, read with ``pread``/``preadv`` (no seeks, safe from several threads).

    A thread inside :meth:`stream` reads through a descriptor of its own. Reads of one descriptor
    from several threads share its readahead state, which then sees no sequential stream and reads
    ahead little: four threads reading contiguous quarters of a cold 1 GiB file took 0.65 s through
    one descriptor and 0.45 s through four here (median of 8 interleaved rounds).
    """

    batch_bytes = 64 * 2**20  # a scatter read this large keeps the disk busy; larger ones gain nothing
    batch_views = IOV_MAX  # preadv's limit
    checked_bytes = 4 * 2**20  # hashed while still in the CPU's cache; read ahead (8 MiB here) keeps the disk busy
    cached_bytes = 2**20  # from the page cache, pieces this small (within a core's L2) are hashed faster;
    # 0 where the file system refuses reads that never wait (``read_cached``: tmpfs, some network ones)
    readers = 4  # threads that may read one file at once (``_load.reads.read_many``): one stream left the disk half idle

    def __init__(self, path: str, fd: int) -> None:
        self.path = path
        self.fd = fd
        found = os.fstat(fd)
        self.size = found.st_size
        self.identity = found.st_dev, found.st_ino, found.st_size, found.st_mtime_ns
        self._own = threading.local()  # .fd: the descriptor of a thread inside stream()

    @contextlib.contextmanager
    def stream(self) -> Iterator[None]:
        """This thread's reads, until the block ends, through a descriptor of its own (the same
        file, see ``_storage.files.reopen``); through the shared one where there is none."""
        fd = storage_files.reopen(self.fd)
        if fd is None:
            yield
            return
        self._own.fd = fd
        try:
            yield
        finally:
            del self._own.fd
            os.close(fd)

    def descriptor(self) -> int:
        """The descriptor this thread reads through: its own inside :meth:`stream`, else the shared one."""
        return getattr(self._own, "fd", self.fd)

    def read(self, offset: int, count: int) -> bytes:
        return os.pread(self.descriptor(), count, offset)

    def prepare(self, nbytes: int) -> None:
        del nbytes  # reads go straight into the destinations: nothing to size

    def readv(self, views: list[memoryview], offset: int) -> None:
        views = [v for v in views if len(v)]
        fd = self.descriptor()
        i, count = 0, len(views)
        while i < count:
            n = os.preadv(fd, views[i:] if i else views, offset)
            if n <= 0:
                raise EOFError(f"unexpected end of file at byte {offset}")
            offset += n
            while i < count and n >= len(views[i]):
                n -= len(views[i])
                i += 1
            if n:
                views[i] = views[i][n:]

    def read_cached(self, view: memoryview, offset: int) -> int:
        if _NOWAIT is None or not self.cached_bytes:
            return 0
        try:
            return os.preadv(self.descriptor(), [view], offset, _NOWAIT)
        except BlockingIOError:  # not in the page cache
            return 0
        except OSError:  # a file system or kernel without the flag (tmpfs: EOPNOTSUPP), or a read error,
            self.cached_bytes = 0  # which the ordinary read that follows raises: this file is not asked again
            return 0

    def views(self, offset: int, count: int) -> Iterator[memoryview]:
        storage_warm.stop_warm_ups()
        if offset + count > self.size:
            raise EOFError(f"{self.path} is {self.size} bytes, not {offset + count}")
        if not count:
            return
        mapped = mmap.mmap(self.fd, 0, prot=mmap.PROT_READ)  # the page cache itself: hashed without a copy
        whole = memoryview(mapped)
        try:
            for start in range(offset, offset + count, _VIEW_BYTES):
                end = min(start + _VIEW_BYTES, offset + count)
                _populate(mapped, start, end)
                yield whole[start:end]
        finally:
            whole.release()
            with contextlib.suppress(BufferError):  # a piece still held: the map closes with it
                mapped.close()

    def mapped(self, offset: int, count: int) -> mmap.mmap | None:
        """The already open file (no path is opened again) mapped copy-on-write, ``[offset, offset + count)``
        read in (see ``Source.mapped``); None for an empty range, a range past the end, or a file that
        cannot be mapped."""
        if count <= 0 or offset < 0 or offset + count > self.size:
            return None
        try:
            mapped = mmap.mmap(self.fd, 0, access=mmap.ACCESS_COPY)
        except (OSError, ValueError):  # no mmap on this file system, out of address space
            return None
        if len(mapped) < offset + count:  # truncated since it was opened: the reads report it
            mapped.close()
            return None
        _populate(mapped, offset, offset + count)
        return mapped

    def close(self) -> None:
        fd, self.fd = self.fd, -1
        if fd >= 0:
            os.close(fd)


class LocalStage:
    """A checkpoint being written into a temporary sibling of its final name, fsynced file by
    file, then renamed into place in one step (``_storage.atomic.commit_directory``).

    Files created with ``keep_cached`` (shards of frozen tensors, which the next save reads back
    to check them before it reuses them, unless it can trust their stamps), and with
    ``settle(every_file=True)`` every file of the checkpoint (another process restores it next),
    are read into the page cache by the kernel once the save is done
    (:meth:`settle`, ``_storage.warm``): the next read then reads memory. Writing them through the page
    cache instead measured 3 to 5 times slower here than direct I/O (1.5 s against 0.44 s for
    500 MB). One ``POSIX_FADV_WILLNEED`` for a whole file reads only the readahead window; asked
    for chunk by chunk it reads it all.
    """

    def __init__(self, storage: LocalStorage, final: str, replace: bool, joined: str | None = None) -> None:
        self.storage = storage
        self.final = final
        self.replace = replace
        self.shared = joined is not None
        self.warm: list[str] = []  # files to read into the page cache after the commit
        if joined is not None:  # a stage shared by the ranks of a job: this process writes its files into it
            self.path = joined
            return
        os.makedirs(os.path.dirname(os.path.abspath(final)), exist_ok=True)
        self.path = atomic.temporary_sibling(final)
        os.mkdir(self.path)

    def create(self, name: str, size: int, keep_cached: bool = False) -> Output:
        if keep_cached:
            self.warm.append(name)
        # A stage several ranks write into at once is written through the page cache (see local_output.create).
        return local_output.create(os.path.join(self.path, name), size, shared_disk=self.shared,
                                   direct_min_bytes=self.storage.direct_min_bytes)

    def write_file(self, name: str, data: bytes) -> None:
        self.write_index(name, [data])

    def write_index(self, name: str, pieces: Iterable[bytes]) -> None:
        path = os.path.join(self.path, name)
        fd = storage_files.create_exclusive(path)
        try:
            with io.BufferedWriter(io.FileIO(fd, "w", closefd=False), _INDEX_BUFFER) as out:
                for piece in pieces:
                    out.write(piece)
            os.fsync(fd)
        except OSError as e:
            raise storage_files.named(e, path) from e
        finally:
            os.close(fd)

    def commit(self, sizes: dict[str, int]) -> None:
        # Every file was fsynced as it was written, and rename moves them all or none. Files other
        # ranks wrote (on a shared file system) are checked for their size first: a lost write.
        for name, size in sizes.items():
            path = os.path.join(self.path, name)
            try:
                found = os.stat(path).st_size
            except OSError as e:
                raise storage_files.named(e, path) from e
            if found != size:
                raise OSError(5, f"{name} is {found} bytes, not the {size} its writer reported", path)
        atomic.commit_directory(self.path, self.final, self.replace)

    def settle(self, known: Collection[str] = (), *, every_file: bool = False) -> None:
        warm, self.warm = [name for name in self.warm if name not in known], []
        budget = None
        if every_file:  # every rank's files, placed ones too: the committed directory holds them all
            with contextlib.suppress(OSError):
                warm = sorted(os.listdir(self.final))
            # Readers in another process come next: as much as half the memory now free, the first
            # files first; beyond that the kernel would only evict what it read for them. Nothing
            # where the free memory cannot be known.
            budget = (storage_warm.available_memory() or 0) // 2
        if warm:  # once the save is done: not beside its writes
            storage_warm.submit([os.path.join(self.final, n) for n in warm], budget)

    def discard(self) -> None:
        shutil.rmtree(self.path, ignore_errors=True)

    def abandon(self) -> None:
        # Renamed away first: another rank of the job may still be creating files in the stage, and
        # a file made between rmtree's listing and its rmdir would keep the directory. Once renamed,
        # their creates fail instead (and a temporary name is what the next manager removes).
        trash = atomic.temporary_sibling(self.final, OLD_MARKER)
        try:
            os.rename(self.path, trash)
        except OSError:
            trash = self.path
        shutil.rmtree(trash, ignore_errors=True)

    def reuse(self, name: str, source: str) -> str | None:
        # A hard link: no byte is written, and the committed file's inode outlives the checkpoint
        # it came from (deleting that one only drops a link). The directory entry is made durable
        # by the commit's fsync of the stage.
        target = os.path.join(self.path, name)
        try:
            if not stat.S_ISREG(os.lstat(source).st_mode):
                return None
            os.link(source, target, follow_symlinks=False)
        except OSError:  # gone, another filesystem (EXDEV), no hard links (EPERM), too many (EMLINK)
            return None
        return target

    def drop(self, name: str) -> None:
        os.unlink(os.path.join(self.path, name))

    def stamp(self, name: str) -> Stamp | None:
        return self.storage.stamp(os.path.join(self.path, name))

    def member(self, name: str) -> str:
        return name  # the temporary directory is this save's alone: the names stay as they are


class LocalStorage:
    """Plain paths on this machine's filesystems.

    Args:
        direct_min_bytes: files this large or larger are written with direct I/O (see ``local_output``).
    """


    def __init__(self, direct_min_bytes: int = local_output.DIRECT_MIN_BYTES) -> None:
        self.direct_min_bytes = direct_min_bytes

    def read_file(self, path: str, limit: int, what: str) -> bytes:
        return storage_files.read_regular(path, limit, what)

    def read_versioned(self, path: str, limit: int, what: str) -> tuple[bytes, Any]:
        return storage_files.read_regular(path, limit, what), None

    def open(self, path: str, what: str) -> LocalSource:
        fd = storage_files.open_regular(path, what)
        try:
            return LocalSource(path, fd)
        except BaseException:
            os.close(fd)
            raise

    def is_file(self, path: str) -> bool:
        return storage_files.is_regular_file(path)

    def is_dir(self, path: str) -> bool:
        return storage_files.is_real_directory(path)

    def exists(self, path: str) -> bool:
        return os.path.lexists(path)

    def follows_to_dir(self, path: str) -> bool:
        """Whether ``path`` is a directory, through a link too (what a user passed may be one)."""
        return os.path.isdir(path)

    def link_target(self, path: str) -> LinkTarget | None:
        return storage_files.link_target(path)

    def mtime(self, path: str) -> float:
        try:
            return os.lstat(path).st_mtime_ns / 1e9
        except OSError:
            return -1.0

    def stamp(self, path: str) -> Stamp | None:
        try:
            found = os.lstat(path)
        except OSError:
            return None
        if not stat.S_ISREG(found.st_mode):
            return None
        return found.st_dev, found.st_ino, found.st_size, found.st_mtime_ns, found.st_ctime_ns

    def is_shared(self, path: str) -> bool:
        try:
            return os.lstat(path).st_nlink > 1
        except OSError:
            return False

    def list_names(self, directory: str) -> list[str]:
        try:
            return os.listdir(directory)
        except (FileNotFoundError, NotADirectoryError):
            return []

    def list_entries(self, directory: str) -> dict[str, bool]:
        if os.path.islink(directory):  # not a directory here, whatever it leads to
            return {}
        try:
            with os.scandir(directory) as entries:
                return {e.name: e.is_file(follow_symlinks=False) for e in entries}
        except (FileNotFoundError, NotADirectoryError):
            return {}

    def committed_names(self, directory: str) -> list[str]:
        return [n for n in self.list_names(directory)
                if self.is_dir(os.path.join(directory, n)) and self.is_file(os.path.join(directory, n, INDEX_FILE))]

    def join_stage(self, final: str, stage_path: str) -> LocalStage:
        return LocalStage(self, final, False, joined=stage_path)

    def stage(self, final: str, replace: bool) -> LocalStage:
        return LocalStage(self, final, replace)

    def make_dirs(self, path: str) -> None:
        os.makedirs(path, exist_ok=True)

    def replace_file(self, path: str, data: bytes, token: Any) -> Any:
        del token  # one writer per directory: the claim
        atomic.write_file_atomic(path, data)
        return None

    def delete_checkpoint(self, path: str) -> None:
        trash = atomic.temporary_sibling(path, OLD_MARKER)
        try:
            os.rename(path, trash)  # readers stop seeing it at once; removal can take a while
        except FileNotFoundError:
            return
        atomic.remove_entry(trash)

    def remove_leftovers(self, directory: str, prefix: str) -> list[str]:
        return atomic.remove_stale_temporaries(directory, prefix)

    def claim(self, directory: str) -> None:
        lock.claim_directory(directory)

    def holds(self, directory: str) -> bool:
        return lock.holds(directory)

    def release(self, directory: str) -> None:
        lock.release_directory(directory)

    def real_path(self, path: str) -> str:
        return os.path.abspath(path)

    def describe_write_failure(self, path: str, error: OSError) -> str:
        return write_failure(path, error)


LOCAL = LocalStorage()


def write_failure(path: str, error: OSError) -> str:
    """What went wrong writing the checkpoint ``path``, and what to do, for the user's own path."""
    where = f" ({error.filename})" if error.filename and error.filename != path else ""
    parent = os.path.dirname(os.path.abspath(path))
    if error.errno in (errno.ENOTDIR, errno.EEXIST) and not os.path.isdir(parent):
        blocker = next((p for p in _ancestors(parent) if os.path.lexists(p) and not os.path.isdir(p)), parent)
        return (f"Cannot write checkpoint {path}: {blocker} is a file, not a directory. "
                "Choose a path whose parents are directories (or remove that file).")
    advice = {
        errno.EROFS: "the file system is read-only. Write checkpoints to a writable directory.",
        errno.EACCES: "permission denied. Write checkpoints to a directory you may write to.",
        errno.EPERM: "permission denied. Write checkpoints to a directory you may write to.",
        errno.ENOSPC: "no space left on the device. Free some space (or keep fewer checkpoints with max_to_keep); "
                      "the previous checkpoints are intact.",
        errno.EDQUOT: "the disk quota is exceeded. Free some space; the previous checkpoints are intact.",
        errno.EFBIG: "a file would exceed the largest size allowed (a ulimit, or the file system's limit). Use a "
                     "smaller max_shard_size.",
        errno.ENAMETOOLONG: _name_too_long(path, error),
    }.get(error.errno or 0, f"{error.strerror or error}.")
    return f"Cannot write checkpoint {path}{where}: {advice}"


def _name_too_long(path: str, error: OSError) -> str:
    """Why a name was too long: a checkpoint is written under a temporary name longer than its own
    (``<name>.torchckpt-tmp-<pid>-h<host>-<random>``), so a name the file system takes may still be
    too long for the save; say how long it may be."""
    name, written = os.path.basename(os.path.abspath(path)), os.path.basename(str(error.filename or ""))
    try:
        limit = os.pathconf(os.path.dirname(os.path.abspath(path)), "PC_NAME_MAX")
    except (OSError, ValueError):
        limit = 255
    extra = len(os.fsencode(written)) - len(os.fsencode(name)) if written.startswith(name) else 0
    if extra > 0 and len(os.fsencode(written)) > limit:
        return (f"the file name is too long: a checkpoint is first written under a temporary name {extra} bytes longer "
                f"than its own, so its name may hold at most {limit - extra} bytes here, not {len(os.fsencode(name))}. "
                "Choose a shorter name (or checkpoint_name).")
    return "a file name or the path is too long for the file system. Choose a shorter path."


def _ancestors(path: str) -> list[str]:
    out = []
    while True:
        out.append(path)
        parent = os.path.dirname(path)
        if parent == path:
            return out[::-1]
        path = parent
