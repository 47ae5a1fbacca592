"""The storage seam: one small interface between torchckpt and where checkpoints live.

Everything above this floor (the save and load paths, the directory history, the manager, the
reader, the CLI) names files by path strings and asks a :class:`Storage` for bytes; only the
storage modules call the operating system's file APIs (``_storage.local``, with ``_storage.files``, ``_storage.local_output``,
``_storage.atomic`` and ``_storage.lock``) or fsspec (``_storage.fsspec``). A plain path is the local filesystem, with its
fast paths (direct writes, scatter reads into the destination tensors, rename as the commit, an
``flock`` claim); a URL with a scheme (``s3://``, ``gs://``, ``memory://``, ``file://``) goes
through fsspec, where the commit is the index written last with create-if-absent.

Why a commit is a named strategy of the backend and not ``if`` branches in the writer: rename is
atomic on a POSIX filesystem and does not exist on an object store, where each object appears
atomically instead. So a :class:`Stage` (where one checkpoint is being written) is made by the
backend, and the writer only creates files in it, hands it the index and calls ``commit``.
"""

from __future__ import annotations

import contextlib
import mmap
import os
import socket
import time
import zlib
from collections.abc import Collection, Iterable, Iterator
from dataclasses import dataclass
from typing import Any, Protocol

from torchckpt.errors import CheckpointError, CorruptCheckpointError

IOV_MAX = min(os.sysconf("SC_IOV_MAX") if hasattr(os, "sysconf") else 1024, 1024)  # buffers per scatter call
VIEW_BYTES = 16 * 2**20  # the pieces ``Source.views`` copies a remote file in
# A leftover whose writer cannot be probed (another host, an object store) is stale once this old.
LEFTOVER_GRACE_SECS = 3600.0


def job_id() -> str | None:
    """The launcher's name for this job: torchrun's run id, else the rendezvous address."""
    run = os.environ.get("TORCHELASTIC_RUN_ID")
    if run:
        return run
    addr, port = os.environ.get("MASTER_ADDR"), os.environ.get("MASTER_PORT")
    return f"{addr}:{port}" if addr and port else None


def holder_note() -> str:
    """Who holds a claim, for the error a refused process shows: pid, host, job, and since when."""
    job = job_id()
    return (f"pid {os.getpid()} on {socket.gethostname()}" + (f", job {job}" if job else "")
            + f", since {time.ctime()}")


def pid_space() -> str | None:
    """Which pids this process can probe: the kernel boot and the pid namespace, where ``/proc``
    tells them (None elsewhere). Two processes with the same host name and the same ``pid_space``
    see the same pids; a container with its own pid namespace, or the host after a reboot, does not."""
    try:
        with open("/proc/sys/kernel/random/boot_id") as f:
            boot = f.read().strip()
        return f"{boot}/{os.readlink('/proc/self/ns/pid')}"
    except OSError:
        return None


def _stat(pid: int) -> tuple[bytes, int] | None:
    """(state, start time in clock ticks since boot) of process ``pid`` from ``/proc/<pid>/stat``
    (fields 3 and 22), or None where it is gone or ``/proc`` is not there."""
    try:
        with open(f"/proc/{pid}/stat", "rb") as f:
            stat = f.read()
        fields = stat[stat.rindex(b")") + 2:].split()  # the name before may hold anything
        return fields[0], int(fields[19])
    except (OSError, ValueError, IndexError):
        return None


def process_start(pid: int) -> int | None:
    """When process ``pid`` started, in clock ticks since boot (``/proc/<pid>/stat``), or None where
    it is gone or ``/proc`` is not there. With the pid it names one process of a boot: a pid reused
    by a later process has a later start."""
    stat = _stat(pid)
    return None if stat is None else stat[1]


def is_alive(pid: int, started: int | None = None) -> bool:
    """Whether process ``pid`` of this host (this pid namespace) is running (a zombie, killed but
    not yet reaped by its parent, is not); with ``started`` (its :func:`process_start` when it was
    recorded), also whether it is still that process and not a later one that reused the pid.
    Without a start time, or where none can be read, a reused pid counts as alive: its holder is
    waited for rather than taken over."""
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:
        pass  # another user's process: alive
    except OSError:
        return True  # cannot tell: alive
    stat = _stat(pid)
    if stat is not None and stat[0] in (b"Z", b"X"):
        return False
    return started is None or stat is None or stat[1] == started


def host_tag() -> str:
    """A short, stable tag of this host for temporary names (a host name may hold any character)."""
    return f"{zlib.crc32(socket.gethostname().encode()):08x}"


class Source(Protocol):
    """An open file for reading (a shard): its size, and reads at offsets."""

    path: str
    size: int
    identity: Any  # tells this open file from another at its path later (None: the store cannot tell)
    batch_bytes: int  # how many contiguous bytes one ``readv`` should cover at most,
    batch_views: int  # and into how many buffers
    checked_bytes: int  # how many bytes a checked read lands before hashing them (``_load.reads``)
    cached_bytes: int  # the same, for bytes already in memory (``read_cached``; 0: no such reads)
    readers: int  # how many threads may ``readv`` disjoint ranges of the file at once (1: one stream)

    def read(self, offset: int, count: int) -> bytes:
        """Up to ``count`` bytes at ``offset`` (fewer only at the end of the file)."""

    def prepare(self, nbytes: int) -> None:
        """About ``nbytes`` will be read from this file: a remote source sizes its reads from it."""

    def readv(self, views: list[memoryview], offset: int) -> None:
        """Fill ``views`` with the bytes from ``offset`` on, back to back; EOFError at the end."""

    def read_cached(self, view: memoryview, offset: int) -> int:
        """Fill ``view`` from ``offset`` on as far as the bytes are already in memory (a local
        file's page cache), without waiting for the storage; the bytes filled (0: none, or the
        source cannot tell)."""

    def stream(self) -> contextlib.AbstractContextManager[None]:
        """One of several threads reading this file at once (``readers``) reads inside this block:
        a local file gives the thread a descriptor of its own (``LocalSource.stream``)."""

    def views(self, offset: int, count: int) -> Iterator[memoryview]:
        """``count`` bytes from ``offset``, in pieces to use before asking for the next (a local
        file is mapped, not copied); EOFError at the end."""

    def mapped(self, offset: int, count: int) -> mmap.mmap | None:
        """The whole file mapped copy-on-write (``mmap.ACCESS_COPY``), with the pages of the ``count``
        bytes from ``offset`` read in; None where it cannot be (a remote file, a file system without
        ``mmap``, a range past the end), and the caller reads the bytes instead.

        Why copy-on-write and not read-only: a tensor over the map (``torch.frombuffer``) is handed
        to code that may write into it (a ``load_state_dict`` hook). A write into a read-only map
        kills the process (SIGSEGV; torch has no read-only tensors, and warns as much); into this one
        it makes a private copy of that page, and the file never changes. The caller closes the map
        once nothing views it (``BufferError`` while something still does: it is then freed with
        the last view)."""

    def close(self) -> None: ...


class Output(Protocol):
    """A new file being written from start to end (see ``_storage.local_output``)."""

    path: str

    def write(self, views: list[memoryview]) -> None: ...

    def finish(self) -> None: ...

    def close(self) -> None: ...

    def __enter__(self) -> Output: ...

    def __exit__(self, *exc: object) -> None: ...


Stamp = tuple[int, int, int, int, int]  # Storage.stamp: (device, inode, size, modification and change times in ns)


class Stage(Protocol):
    """Where one checkpoint (or export) is being written, until ``commit`` makes it visible.

    The calls a backend can expect, in this order:

    - one process: ``Storage.stage(path, replace)``; for each shard ``member`` then ``create``
      (``write_file`` for a small file), or ``reuse`` (then ``drop`` if what it placed fails its
      check, and ``create``); ``write_index``; then ``commit``, or ``discard`` after any failure.
    - several ranks: rank 0 calls ``Storage.stage``; every rank then calls
      ``Storage.join_stage(path, stage.path)`` and ``member``/``create``/``reuse`` for its own
      files; once every rank has reported, rank 0 alone calls ``write_index``, then ``commit`` or ``discard``
      (``abandon`` where it stops before they all reported).
    """

    path: str

    def create(self, name: str, size: int, keep_cached: bool = False) -> Output:
        """A new file ``name`` in the stage, for ``size`` bytes; ``keep_cached``: the next save
        will read it back (a shard of frozen tensors, see ``_save.reuse``), so a local stage reads
        it once into the page cache after its commit (an upload keeps nothing here)."""

    def write_file(self, name: str, data: bytes) -> None:
        """A new small file ``name`` in the stage, written whole."""

    def write_index(self, name: str, pieces: Iterable[bytes]) -> None:
        """The file whose existence commits the stage (``index.json``); on an object store it is
        only written by :meth:`commit`."""

    def commit(self, sizes: dict[str, int]) -> None:
        """Make the stage visible at its final name, after checking (where the backend cannot
        fsync) that every file of ``sizes`` is there with its size."""

    def discard(self) -> None:
        """Remove what the stage holds (a failed write)."""

    def abandon(self) -> None:
        """Rank 0 stopped (an interrupt) before every rank reported: remove what can be removed
        while other ranks may still be writing into the stage, and leave it recognisable as a
        leftover (the next manager removes what is left)."""

    def settle(self, known: Collection[str] = (), *, every_file: bool = False) -> None:
        """After :meth:`commit` and the caller's bookkeeping (a manager's state file and retention):
        start what the backend does in the background for the next save. The local backend reads
        the files created with ``keep_cached`` into the page cache, except those named in ``known``
        (the next save will trust their stamps, ``_save.reuse.Checked``, and not read them);
        started at the commit, those reads slowed the state file's fsync behind them (a 64 MiB save
        took 0.062 s, against 0.053 s without them). With ``every_file``, every file of the
        committed checkpoint, up to half the memory available (a reader in another process
        restores it next: ``CheckpointManager(warm_page_cache=True)``)."""

    def reuse(self, name: str, source: str) -> str | None:
        """Place at ``name`` the bytes of ``source``, a shard of a committed checkpoint, without
        sending them: a hard link on a local filesystem, a copy the server makes on an object store.
        Returns the placed file's path, for the caller to read back and check; None where the
        backend cannot (no hard links, another filesystem, ``source`` gone or not a regular file),
        and nothing is placed: the caller writes the file instead."""

    def drop(self, name: str) -> None:
        """Remove a file :meth:`reuse` placed (it failed its check)."""

    def stamp(self, name: str) -> Stamp | None:
        """:meth:`Storage.stamp` of the stage's file ``name``."""

    def member(self, name: str) -> str:
        """The name a new shard meant as ``name`` is written under: ``name`` itself where the stage
        is private to this save (a local temporary directory); on an object store, ``name`` with a
        tag of this writer and save (``model-00001-of-00002-<tag>.safetensors``), so that no other
        writer's upload can ever land on this save's objects, nor this one's on theirs."""


REGULAR_FILE = "a regular file"


@dataclass(frozen=True)
class LinkTarget:
    """Where a symbolic link leads: ``real``, the path it resolves to, and ``kind``, what is there
    (``REGULAR_FILE``, "a directory", "a FIFO", ..., "nothing" for a dangling link, or why it cannot
    be followed: "unreadable (Too many levels of symbolic links)")."""

    real: str
    kind: str


class Storage(Protocol):
    """What torchckpt needs from a place checkpoints live. Paths are the caller's strings."""


    # -- reading
    def read_file(self, path: str, limit: int, what: str) -> bytes:
        """The whole regular file ``path``, at most ``limit`` bytes (FileNotFoundError if absent)."""

    def read_versioned(self, path: str, limit: int, what: str) -> tuple[bytes, Any]:
        """As :meth:`read_file`, with a token for :meth:`replace_file` (an ETag, say)."""

    def open(self, path: str, what: str) -> Source:
        """A regular file for reading (FileNotFoundError if absent)."""

    def is_file(self, path: str) -> bool: ...

    def is_dir(self, path: str) -> bool: ...

    def exists(self, path: str) -> bool: ...

    def follows_to_dir(self, path: str) -> bool:
        """Whether ``path`` is a directory, through a link too (a path the user passed)."""

    def link_target(self, path: str) -> LinkTarget | None:
        """Where ``path`` leads when it is a symbolic link (None when it is not one; always None on
        an object store). Only for paths a user named to be read once (``convert``'s sources):
        inside checkpoints and managers' directories links are refused, never followed."""

    def mtime(self, path: str) -> float:
        """When ``path`` was last written (seconds since the epoch; -1.0 when unknown)."""

    def stamp(self, path: str) -> Stamp | None:
        """What tells this version of the file ``path`` from any other without reading it: on a
        local filesystem its device, inode, size, and modification and change times in
        nanoseconds, which any write, truncation or replacement changes (the change time also
        where a tool puts the modification time back, and a new file reuses a freed inode number,
        as ``cp -p`` and ``rsync -t`` may; a link made or removed moves it too); None where the storage has nothing as cheap to
        trust (an object store) or ``path`` is not a regular file. See ``_save.reuse`` for what a
        stamp may be trusted for."""

    def is_shared(self, path: str) -> bool:
        """Whether the file ``path`` is also a file of another checkpoint (a hard link an
        incremental save made). False on an object store, where a reused shard is a copy."""

    def list_names(self, directory: str) -> list[str]:
        """Names directly inside ``directory`` ([] when it is missing or not a directory)."""

    def list_entries(self, directory: str) -> dict[str, bool]:
        """Names directly inside ``directory``, each -> whether it is a regular file (not a
        directory, a link or anything else), from one listing ({} when it is missing, not a
        directory, or a link to one)."""

    def committed_names(self, directory: str) -> list[str]:
        """Names directly inside ``directory`` that are committed checkpoints (a real directory
        holding a regular ``index.json``), in as few requests as the backend allows: one listing
        on an object store, however many other prefixes the directory holds."""

    # -- writing
    def stage(self, final: str, replace: bool) -> Stage:
        """Start writing the directory ``final`` (see :class:`Stage`)."""

    def join_stage(self, final: str, stage_path: str) -> Stage:
        """Write files into a stage another rank opened at ``stage_path`` (only ``create`` is used)."""

    def make_dirs(self, path: str) -> None: ...

    def replace_file(self, path: str, data: bytes, token: Any) -> Any:
        """Replace the small file ``path`` atomically; with a ``token`` from :meth:`read_versioned`
        (or ``ABSENT``: it must not exist), only if nobody replaced it since (else ``ConflictError``).
        Returns the new token."""

    def delete_checkpoint(self, path: str) -> None:
        """Remove a checkpoint directory so that it stops being committed first."""

    def remove_leftovers(self, directory: str, prefix: str) -> list[str]:
        """Remove crashed writers' leftovers of checkpoints named ``prefix...``; returns their names."""

    # -- the directory claim
    def claim(self, directory: str) -> None: ...

    def holds(self, directory: str) -> bool: ...

    def release(self, directory: str) -> None: ...

    def real_path(self, path: str) -> str:
        """``path`` made absolute (a URL is its own)."""

    def describe_write_failure(self, path: str, error: OSError) -> str:
        """What went wrong writing the checkpoint ``path``, and what to do."""


class ConflictError(CheckpointError):
    """A conditional write found that another writer changed the file first."""


class AlreadyCommitted(CheckpointError, FileExistsError):
    """A commit that must not replace found a checkpoint at its name: another writer committed it
    first (made with ``errno``, what happened, and the checkpoint's path, as a ``FileExistsError``).

    Attributes:
        path: the checkpoint that was already committed.
    """

    @property
    def path(self) -> str:
        return str(self.filename)

    def __str__(self) -> str:
        generic = not self.strerror or self.strerror == os.strerror(self.errno or 0)
        what = "a checkpoint is already committed there" if generic else self.strerror
        return (f"Cannot commit {self.filename}: {what}. Nothing of this save was committed, and the "
                "checkpoint there was left as it is. Only one writer may write a given checkpoint path: write to "
                "another path, or stop the other job.")


def oversize_file(what: str, path: str, size: int, limit: int) -> CorruptCheckpointError:
    """The error for a file (an index, a state file) larger than any of its kind that torchckpt
    writes: every backend refuses to read it, in these words, before reading a byte of it."""
    return CorruptCheckpointError(f"{what} {path} is {size} bytes, over the {limit}-byte limit for such a file; it "
                                  "is not one torchckpt wrote.", path)


ABSENT = object()  # the token of a file that must not exist yet
