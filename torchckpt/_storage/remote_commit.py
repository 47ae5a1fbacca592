"""The commit protocol on an object store: a save's stage, the deletion of a checkpoint, and the
clean-up of what crashed writers left.

Why every object a save writes carries a tag of its own: an object store has no rename, so a
checkpoint's shards are uploaded straight into its final prefix, and a second writer of the same
prefix (two jobs writing one path; a manager paused past its lease, and the one that took over)
would otherwise upload objects under the very names a committed checkpoint's index names. With
the tag (``model-00001-of-00002-<tag>.safetensors``), a committed checkpoint's objects are named
by its index alone and written by its writer alone: the loser's index is refused by
create-if-absent, and it deletes its own objects, nobody else's.

Why a deletion is marked before the index goes: a process killed between deleting the index and
the shards would leave a prefix without an index and without a marker, which no later manager
would touch. ``.torchckpt-deleting`` names the index's version and the files it named, so the
next manager that opens the directory finishes the deletion (see :func:`remove_leftovers`).
"""

from __future__ import annotations

import contextlib
import json
import os
import socket
import time
import uuid
from collections.abc import Collection, Iterable
from typing import Any

from torchckpt._format.spec import (
    DELETING_FILE,
    INDEX_FILE,
    MAX_INDEX_SIZE,
    PENDING_FILE,
    SHARD_SUFFIX,
    TORCHCKPT_KEY,
    is_checkpoint_member,
    is_export_member,
    is_pending_marker,
)
from torchckpt._paths import join
from torchckpt._storage.base import LEFTOVER_GRACE_SECS, AlreadyCommitted, Output
from torchckpt.errors import CheckpointError, CheckpointWriteError, CorruptCheckpointError

# ``storage`` below is an ``_storage.fsspec.FsspecStorage`` (not imported: it imports this module).
FsspecStorage = Any

TAG_CHARS = 12  # a save's tag on its object names: 48 random bits in hex
# DELETING_FILE is written into a checkpoint's prefix before its index is deleted, naming the objects
# to delete: a deletion cut short (a killed process) is finished by the next manager that opens the directory.


class RemoteStage:
    """A checkpoint uploaded straight into its final prefix, under names of its own; ``commit``
    creates its index.

    Every object this save writes carries its tag (``model-00001-of-00002-<tag>.safetensors``,
    ``.torchckpt-pending-<tag>``), a random id of this writer and save, and only this save's index
    names them. So a second writer of the same prefix (another job, or a manager that lost its
    lease while it was paused) can never overwrite a committed checkpoint's objects: the loser's
    index is refused by create-if-absent, and it removes its own objects, nobody else's.
    """

    def __init__(self, storage: FsspecStorage, final: str, replace: bool, joined: bool = False) -> None:
        self.storage = storage
        self.path = final
        self.tag = uuid.uuid4().hex[:TAG_CHARS]
        self.marker = f"{PENDING_FILE}-{self.tag}"
        self.created: list[str] = []
        self.index: tuple[str, bytes] | None = None
        self.committed = self.discarded = False
        # A checkpoint committed at this name that this save replaces: it stays whole, and restores,
        # until this save's objects are all uploaded; ``commit`` deletes it just before it creates the
        # new index (this save's objects carry its tag, so the two never share a name). A save that
        # fails or is killed before then leaves it as it was.
        self.replacing = False
        if joined:  # another rank's stage: this process only uploads files into it, under its own tag
            return
        storage.fence(final)  # a manager that lost its lease (paused past it) finds out before it uploads
        names = storage.list_names(final)
        if INDEX_FILE in names:
            if not replace:
                raise AlreadyCommitted(17, "a checkpoint is already committed there", final)
            self.replacing = True
        elif names and not any(is_pending_marker(n) or n == DELETING_FILE for n in names):
            # Uncommitted objects that no writer is writing (a writer puts its marker before any object):
            # a previous export's files, or a crashed writer's. Only names a writer or an export gives: a
            # file someone put there since the save checked the path stays (and its commit refuses it).
            # Another writer's upload in flight is left alone (it has its own names).
            storage.remove_names(final, [n for n in names if is_checkpoint_member(n) or is_export_member(n)])
        storage.make_dirs(final)  # file:// and the like need the directory; object stores have none
        marker = {"writer": f"pid {os.getpid()} on {socket.gethostname()}", "time": time.time(),
                  "session": storage.session_of(final), "tag": self.tag}
        storage.put(join(final, self.marker), json.dumps(marker).encode())

    def member(self, name: str) -> str:
        stem = name[: -len(SHARD_SUFFIX)] if name.endswith(SHARD_SUFFIX) else name
        return f"{stem}-{self.tag}{SHARD_SUFFIX}"

    def create(self, name: str, size: int, keep_cached: bool = False) -> Output:
        del keep_cached  # nothing of an upload stays here
        self.storage.fence(self.path)  # free unless this process's lease term ran out unrenewed
        self.created.append(name)
        out: Output = self.storage.output(join(self.path, name), size)
        return out

    def reuse(self, name: str, source: str) -> str | None:
        # fsspec's copy is the store's own (S3 CopyObject, UploadPartCopy for large objects): no byte
        # is uploaded. The copy is an object of its own, under this save's tag.
        self.storage.fence(self.path)
        target = join(self.path, name)
        self.created.append(name)
        if not self.storage.copy(source, target):
            self.created.remove(name)
            return None
        return target

    def stamp(self, name: str) -> None:
        del name  # see FsspecStorage.stamp
        return None

    def drop(self, name: str) -> None:
        self.storage.remove_quietly(join(self.path, name))
        if name in self.created:
            self.created.remove(name)

    def write_file(self, name: str, data: bytes) -> None:
        self.created.append(name)
        self.storage.put(join(self.path, name), data)

    def write_index(self, name: str, pieces: Iterable[bytes]) -> None:
        self.index = (name, b"".join(pieces))

    def commit(self, sizes: dict[str, int]) -> None:
        self.storage.fence(self.path)
        found = self.storage.sizes(self.path)
        for name, size in sizes.items():
            if found.get(name) != size:
                now = "is not on the store" if name not in found else f"is {found[name]} bytes on the store, not {size},"
                raise CheckpointWriteError(
                    f"Cannot commit {self.path}: {name} {now} after its upload. Nothing was committed; save again.",
                    self.path,
                    OSError(5, "upload lost", join(self.path, name)),
                )
        if self.index is not None:
            name, data = self.index
            if self.replacing:  # un-commit the old one last: never a mix of old and new shards
                delete_checkpoint(self.storage, self.path)  # (fenced: never by a writer that lost its lease)
            try:
                self.storage.create_new(join(self.path, name), data)
            except FileExistsError:
                self.discarded = True  # every rank's files of this save, and its marker; nobody else's
                self.storage.remove_names(self.path, [*sizes, *self.created, self.marker])
                raise AlreadyCommitted(
                    17, "another writer committed a checkpoint there while this one was being uploaded (this "
                    "save's own objects were removed; the other checkpoint is untouched)", self.path) from None
            self._confirm_commit(name, data, sizes)
        self.committed = True
        self.storage.remove_quietly(join(self.path, self.marker))
        if self.replacing:
            self._remove_strays(sizes)

    def _confirm_commit(self, name: str, data: bytes, sizes: dict[str, int]) -> None:
        """Once the index is created: this writer still holds its lease, and every object the index
        names is still there. A writer paused between its checks and the index's creation, past its
        lease, finds here that the next holder took the directory over (and may have removed this
        upload as a crashed writer's leftovers): its index is taken back and the save fails, so a
        late writer never leaves a committed checkpoint, let alone one whose shards are gone."""
        try:
            self.storage.fence(self.path)
        except CheckpointError as e:  # the lease went to another writer
            problem: str | None = str(e)
        else:
            try:
                found = self.storage.sizes(self.path)
            except Exception:  # noqa: BLE001 - a listing that failed (a 503) proves nothing: the commit stands
                return
            lost = sorted(n for n, size in sizes.items() if found.get(n) != size)
            problem = f"{lost[0]} was removed from the store meanwhile" if lost else None
        if problem is None:
            return
        index = join(self.path, name)
        with contextlib.suppress(OSError, CorruptCheckpointError):  # (gone already)
            if self.storage.read_file(index, MAX_INDEX_SIZE, "Index") == data:  # still this save's own index
                self.storage.remove_quietly(index)
        self.discarded = True
        self.storage.remove_names(self.path, [*sizes, *self.created, self.marker])
        self.storage.drop_if_empty(self.path)
        raise CheckpointWriteError(
            f"Cannot commit {self.path}: this writer was paused past its lease while committing, and another "
            f"process took the directory over ({problem}). Its index was taken back: nothing was committed, and "
            "the other process's checkpoints are untouched. Stop this job; the other one writes the run now.",
            self.path, OSError(5, "lease lost during commit", index))

    def _remove_strays(self, sizes: dict[str, int]) -> None:
        """After a replacement: what else the prefix held that the new index does not name (objects
        of the replaced checkpoint's crashed writers, which its deletion kept while this save's
        marker was there), unless another writer's upload is in flight."""
        names = self.storage.list_names(self.path)
        if any(is_pending_marker(n) for n in names) or DELETING_FILE in names:
            return  # another writer's upload, or a deletion: its objects are not this save's to judge
        strays = [n for n in names if n != INDEX_FILE and n not in sizes]
        if strays:
            self.storage.remove_names(self.path, strays)

    def settle(self, known: Collection[str] = (), *, every_file: bool = False) -> None:
        del known, every_file  # nothing to do in the background: a reused object is a copy the server made

    def abandon(self) -> None:
        """Left as it is: an object another rank uploads after a removal would land in a prefix
        without this save's pending marker, which no later manager takes for a leftover. With the
        marker, the next manager removes the whole upload."""

    def discard(self) -> None:
        if self.committed or self.discarded:
            return
        self.discarded = True
        names = self.storage.list_names(self.path)
        busy = INDEX_FILE in names or any(is_pending_marker(n) and n != self.marker for n in names) or DELETING_FILE in names
        if busy:  # a committed checkpoint, another writer's upload or a deletion: remove only this save's objects
            self.storage.remove_names(self.path, [*self.created, self.marker])
        else:  # nobody else's upload: this save's objects (the other ranks' too), never a file of a name no
            # writer gives (someone's, which the commit's check refused to replace)
            mine = {*(n for n in names if is_checkpoint_member(n)), *self.created, self.marker}
            self.storage.remove_names(self.path, sorted(mine))
        self.storage.drop_if_empty(self.path)


def _is_plain_shard(name: Any) -> bool:
    """A name an index may give a shard, safe to delete within its checkpoint's prefix."""
    return isinstance(name, str) and name.endswith(SHARD_SUFFIX) and "/" not in name and "\\" not in name \
        and name not in (".", "..")


def delete_checkpoint(storage: FsspecStorage, path: str) -> None:
    """Delete a committed checkpoint so that it is never visible half-deleted, and so that a
    deletion cut short is finished later: ``.torchckpt-deleting`` (naming the index's version and
    the files it names) is written first, then the index is deleted (the checkpoint stops
    being committed at once), then those files, then the marker. Only the files the index
    names are deleted (and leftovers of crashed writers): never another writer's upload in flight."""
    storage.fence(path)  # retention by a writer paused past its lease: it finds out before it deletes
    files, token = _named_by_index(storage, path)
    marker = {"time": time.time(), "index": token, "files": sorted(files) if files is not None else None}
    storage.put(join(path, DELETING_FILE), json.dumps(marker).encode())
    storage.remove_quietly(join(path, INDEX_FILE))  # un-commit first: never a half-deleted checkpoint visible
    _finish_deletion(storage, path, marker, set())

def _named_by_index(storage: FsspecStorage, path: str) -> tuple[set[str] | None, Any]:
    """The shard files the index of ``path`` names and the index's version token; (None, None)
    when it cannot be read or parsed."""
    try:
        data, token = storage.read_versioned(join(path, INDEX_FILE), MAX_INDEX_SIZE, "Index")
        index = json.loads(data)
        names = {*index["weight_map"].values(), *(s["file"] for s in index[TORCHCKPT_KEY]["shards"])}
    except (OSError, ValueError, KeyError, TypeError, AttributeError, CorruptCheckpointError):
        return None, None
    return {n for n in names if _is_plain_shard(n)}, token

def _finish_deletion(storage: FsspecStorage, path: str, marker: dict[str, Any] | None, present: set[str]) -> None:
    """Complete the deletion ``marker`` describes: the index (if it is still the one the marker
    condemned), the files it named, leftovers without a live writer, then the marker."""
    marker = marker or {}
    files = marker.get("files")
    files = {f for f in files if _is_plain_shard(f)} if isinstance(files, list) else None
    if INDEX_FILE in present:
        current, token = _named_by_index(storage, path)
        if token == marker.get("index"):  # still the condemned one (or both unreadable)
            storage.remove_quietly(join(path, INDEX_FILE))  # un-commit first
        elif files is not None and current is not None:  # a new checkpoint was committed at this name since: keep its files
            files -= current
    if files:
        storage.remove_names(path, files)
    rest = storage.list_names(path)
    leftovers = [n for n in rest if n != DELETING_FILE]
    if leftovers and INDEX_FILE not in rest and not any(is_pending_marker(n) for n in rest):  # crashed writers'
        storage.remove_names(path, leftovers)
    storage.remove_quietly(join(path, DELETING_FILE))
    storage.drop_if_empty(path)


def remove_leftovers(storage: FsspecStorage, directory: str, prefix: str) -> list[str]:
    """Remove crashed writers' leftovers under prefixes ``prefix...``, from one listing.

    A deletion cut short (its ``.torchckpt-deleting`` marker is there) is finished. An
    uncommitted prefix is removed when every pending marker in it is stale; in a committed one,
    a stale marker's writer lost the commit race and was killed before its clean-up, so the
    objects with its tag that the index does not name are removed, with the marker. A writer on
    another host cannot be probed by pid, so a marker is stale when it was written under a
    manager's lease that is not the live one (this process holds the lease now, so that writer is
    gone), or when it is older than ``LEFTOVER_GRACE_SECS`` (an unmanaged write). A prefix without
    a marker is not torchckpt's to judge, and costs no request.
    """
    removed = []
    ours = storage.session_of(join(directory, "x"))
    for name, files in sorted(storage.tree(directory).items()):
        if not name.startswith(prefix):
            continue
        path = join(directory, name)
        if DELETING_FILE in files:
            _finish_deletion(storage, path, _marker(storage, join(path, DELETING_FILE)), files)
            removed.append(name)
            continue
        markers = [f for f in files if is_pending_marker(f)]
        if not markers:
            continue  # committed and clean, or not ours to judge: no torchckpt write made it
        if INDEX_FILE in files:
            stale = [m for m in markers if _is_stale(_marker(storage, join(path, m)), ours)]
            if stale:
                _remove_losers(storage, path, files, stale)
            continue
        if all(_is_stale(_marker(storage, join(path, m)), ours) for m in markers):
            # the dead writers' objects: names a writer or an export gives, never a file someone put there
            storage.remove_names(path, [n for n in storage.list_names(path)
                                        if is_checkpoint_member(n) or is_export_member(n)])
            storage.drop_if_empty(path)
            removed.append(name)
    return removed

def _remove_losers(storage: FsspecStorage, path: str, files: set[str], stale: list[str]) -> None:
    """In the committed checkpoint ``path``: the objects of the writers of the ``stale`` markers
    that its index does not name, and those markers (the index and what it names stay)."""
    named, _ = _named_by_index(storage, path)
    if named is None:
        return  # an index that cannot be read: nothing in the prefix is judged
    tags = {m[len(PENDING_FILE) + 1:] for m in stale if m != PENDING_FILE}
    theirs = [f for f in files if f not in named and any(f.endswith(f"-{t}{SHARD_SUFFIX}") for t in tags)]
    storage.remove_names(path, [*theirs, *stale])


def _is_stale(marker: dict[str, Any] | None, ours: str | None) -> bool:
    if marker is None:
        return False
    session, written = marker.get("session"), marker.get("time")
    stale_session = session is not None and ours is not None and session != ours
    old = isinstance(written, (int, float)) and time.time() - written > LEFTOVER_GRACE_SECS
    return stale_session or old

def _marker(storage: FsspecStorage, path: str) -> dict[str, Any] | None:
    try:
        value = json.loads(storage.read_file(path, 2**16, "Pending marker"))
    except (OSError, ValueError, CorruptCheckpointError):
        return None
    return value if isinstance(value, dict) else None
