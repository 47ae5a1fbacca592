"""Incremental saves: a shard that the previous checkpoint already holds, byte for byte, is placed
by the storage (a hard link on a local filesystem, a copy the server makes on an object store)
instead of being written again.

Why by content, shard by shard: a shard is reused only when this save would write exactly the
same file (the same tensors in the same order, the same header, every tensor's xxh3-64 equal to
the base's). So the new checkpoint is standalone: it holds its own link (or copy) of every file
it names, deleting the base only drops a link, and every tool reads it as any checkpoint. The
planner keeps tensors that rarely change (frozen parameters) in shards of their own, so that a
frozen backbone is the same shards save after save (``_save.plan.plan_shards``).

Why the placed file is read back before it counts: the base's index says what its shard held
when it was written, not what the disk holds now. A byte flipped since, a truncation, a file
replaced by hand or a hostile index would otherwise pass into the new checkpoint unseen. So a
placed file that does not hold exactly the bytes this save would write is dropped, and the shard
is written afresh. Reading it back costs a fraction of writing it when it is in the page cache (a
single process reads its frozen shards into it after each commit, see ``_storage.local``), about
as much as reading it when it is not, and a download on an object store.

Why a file this process wrote or already checked is not read back again: reading back costs
as much memory bandwidth as hashing the state, and a run saves the same frozen files again and
again. A local file's stamp (device, inode, size, modification and change times;
``Storage.stamp``) changes with every write, truncation or replacement made through the
filesystem: the change time also where a tool sets the modification time back (``cp -p``,
``rsync -t``, ``touch -r``) and where a new file gets a freed inode number. So where the stamp of
the base's file, taken before it is linked (a link moves the change time), is the one this process
recorded when it wrote the file or last read it back (after that save's own link and its
retention's deletions), the file still holds those bytes. Two limits, the ones git's index lives with (its "racily clean"
entries): a change made within the same timestamp tick as that stamp leaves the time as it was, so
a stamp counts only once the checkpoint's index, written after it, carries a later time
(:meth:`Checked.keep`), and the race left is a writer changing the file within one tick of our own
write; and damage under the filesystem (a bit rotting on the disk) changes no stamp, as it changes
no page that a warm page cache would return to a read-back either. A process that did not write
the file (a resumed run, a downloaded directory) reads it back, and so does every save on an
object store, where a reused shard is a new object each time. The stamps live in
``_storage.trusted``, where a restore or ``verify`` that finds a file damaged drops its stamp, so
that the next save reads that file back rather than linking it again.

Why only from a checkpoint saved by as many ranks: on another world size the chunks and the files
differ (a save by one process and by several ranks are different formats), so the save writes in full.
"""

from __future__ import annotations

import array
from collections.abc import Iterator, Sequence
from dataclasses import dataclass, field
from typing import Any

import torch
import xxhash

from torchckpt import _tensorio, _threads
from torchckpt._format import blocks as format_blocks
from torchckpt._format import index as format_index
from torchckpt._format.spec import INDEX_FILE, MAX_INDEX_SIZE
from torchckpt._paths import join, name_of, parent_of
from torchckpt._storage import trusted as storage_trusted
from torchckpt._storage.base import Stage, Stamp, Storage
from torchckpt.errors import CheckpointError

_aside = _threads.Worker("torchckpt-reuse")  # hashes tensors while the placed file is read back


class Checked:
    """The shard files one save wrote or read back, with what they hold, until the save commits:
    then :meth:`keep` lets later saves of this process trust their stamps instead of reading them
    back (see the module's notes)."""

    def __init__(self) -> None:
        self.files: list[tuple[str, Stamp, str, tuple[int, ...], int]] = []

    def add(self, name: str, stamp: Stamp | None, header_checksum: str, digests: Sequence[int],
            checked_at: int | None = None) -> None:
        """The file ``name`` of the stage, whose stamp is ``stamp``, holds the header with
        ``header_checksum`` and tensors with ``digests``, as checked at ``checked_at``
        (``_storage.trusted.now()`` before the check; None: now, for a file this save wrote)."""
        if stamp is not None:
            when = storage_trusted.now() if checked_at is None else checked_at
            self.files.append((name, stamp, header_checksum, tuple(digests), when))

    def keep(self, storage: Storage, path: str) -> set[str]:
        """Trust the files (``_storage.trusted``), once the checkpoint ``path`` is committed and its
        manager's retention has run: those whose modification time is earlier than its index's (a
        change made after that always moves the time), by their stamps as they are now, which is
        what the next save finds before it links them again. Only the change time may have moved
        since the check: this save's own link and retention's deletions of other links move it.
        The rest are read back when next reused. Returns the names of those trusted."""
        marker = storage.stamp(join(path, INDEX_FILE)) if self.files else None
        if marker is None:
            return set()
        earlier = []
        for name, stamp, header_checksum, digests, checked_at in self.files:
            now = storage.stamp(join(path, name))
            if now is not None and now[:4] == stamp[:4] and stamp[0] == marker[0] and stamp[3] < marker[3]:
                earlier.append((name, now, header_checksum, digests, checked_at))
        trusted = storage_trusted.remember(file[1:] for file in earlier)
        self.files.clear()
        return {name for name, stamp, *_ in earlier if (stamp[0], stamp[1]) in trusted}


@dataclass(frozen=True)
class BaseShard:
    """One shard of the base checkpoint: where it is, and what its index says it holds."""

    file: str  # its name in the base checkpoint
    size: int
    header_checksum: str
    digests: tuple[int, ...]  # per tensor, in file order


@dataclass
class Base:
    """The checkpoint an incremental save compares with, its shards found by their tensor names;
    ``used`` collects what this save reused (file here -> file there)."""

    storage: Storage
    path: str
    shards: dict[tuple[str, ...], BaseShard]
    used: dict[str, str] = field(default_factory=dict)

    def section(self, path: str) -> dict[str, Any] | None:
        """What the index of the checkpoint ``path`` records about its reused files (None: none,
        or the base is ``path`` itself, replaced by this save: its files are now this checkpoint's own)."""
        base, here = self.storage.real_path(self.path), self.storage.real_path(path)
        if not self.used or base == here:
            return None
        same_parent = parent_of(base) == parent_of(here)
        return {"base": name_of(base) if same_parent else base, "files": dict(sorted(self.used.items()))}


def open_base(storage: Storage, path: str, world: int) -> Base | None:
    """The committed checkpoint ``path`` as a base for a save by ``world`` ranks; None where it
    cannot serve (gone, its index unreadable or damaged, another world size): the save then writes
    every byte, as without a base."""
    try:
        if not storage.is_dir(path):
            return None
        data = storage.read_file(join(path, INDEX_FILE), MAX_INDEX_SIZE, "Checkpoint index")
        index = format_index.parse_index(path, data)
        checksums = [int(c, 16) for c in index.checksums]
    except (OSError, CheckpointError, ValueError):
        return None
    if index.world_size != world:
        return None
    shards: dict[tuple[str, ...], BaseShard] = {}
    start = 0
    for record in index.shards:
        end = start + record["tensors"]
        shards.setdefault(tuple(index.names[start:end]), BaseShard(
            record["file"], record["size"], record.get("header_checksum", ""), tuple(checksums[start:end])))
        start = end
    return Base(storage, path, shards)


@dataclass
class Reused:
    """A shard placed from the base: its tensors' digests (and block checksums) as this save
    would have computed them writing it."""

    digests: array.array[int]
    blocks: list[int]


def reuse_shard(stage: Stage, base: Base, file: str, names: list[str], tensors: list[torch.Tensor], header: bytes,
                block_bytes: int, checked: Checked | None = None) -> Reused | None:
    """Place the shard ``file`` (``names``, ``tensors``, its encoded ``header``) from the base when
    the base holds the same file and the placed copy reads back as exactly these bytes (or is a
    file this process knows holds them, by its stamp); None (and nothing placed) otherwise, for the
    caller to write it. ``block_bytes``: also compute block checksums (format 3), 0 for none.
    ``checked`` collects the placed file's stamp for later saves."""
    found = base.shards.get(tuple(names))
    if found is None or found.size != len(header) + sum(t.nbytes for t in tensors):
        return None
    if found.header_checksum != xxhash.xxh3_64_hexdigest(header):
        return None
    first = _digests_if_equal(tensors[:1], found.digests[:1], block_bytes)  # a changed shard stops here, usually
    if first is None:
        return None
    source = join(base.path, found.file)
    before = base.storage.stamp(source)  # before the link, which moves the file's change time
    placed = stage.reuse(file, source)
    if placed is None:
        return None
    # The stamp is taken before the read-back: a change made after it moves the time, and damage
    # found after it keeps the file out of the trusted ones (``_storage.trusted.now``).
    checked_at = storage_trusted.now()
    stamp = stage.stamp(file)
    # The file stat() saw, unchanged but for the change time the link itself moved
    linked = before is not None and stamp is not None and before[:4] == stamp[:4]
    if linked and storage_trusted.vouches(before, found.header_checksum, found.digests):
        # Nothing to read back: the rest of the tensors are hashed on two threads.
        half = _half(tensors, 1)
        later = _aside.call(_digests_if_equal, tensors[half:], found.digests[half:], block_bytes)
        middle = _digests_if_equal(tensors[1:half], found.digests[1:half], block_bytes)
        current, file_ok = _joined(middle, later.result()), True
    else:
        # The rest of the tensors are hashed on another thread while the placed file is read back:
        # both are compared with the base's digests, so the file holds these bytes when both match.
        rest = _aside.call(_digests_if_equal, tensors[1:], found.digests[1:], block_bytes)
        file_ok = _reads_back(base.storage, placed, header, [t.nbytes for t in tensors], found.digests)
        current = rest.result()
    if current is None or not file_ok:
        stage.drop(file)
        return None
    if checked is not None:
        checked.add(file, stamp, found.header_checksum, found.digests, checked_at)
    base.used[file] = found.file
    return Reused(first.digests + current.digests, first.blocks + current.blocks)


def _half(tensors: list[torch.Tensor], start: int) -> int:
    """Where ``tensors[start:]`` splits into two runs of about equal bytes: the first index after
    the tensor that reaches half of them."""
    total, seen = sum(t.nbytes for t in tensors[start:]), 0
    for i in range(start, len(tensors)):
        seen += tensors[i].nbytes
        if 2 * seen >= total:
            return i + 1
    return len(tensors)


def _joined(first: Reused | None, second: Reused | None) -> Reused | None:
    """Both runs' digests (and block checksums) in order; None when either differed."""
    if first is None or second is None:
        return None
    return Reused(first.digests + second.digests, first.blocks + second.blocks)


def _digests_if_equal(tensors: list[torch.Tensor], expected: tuple[int, ...], block_bytes: int) -> Reused | None:
    """Each tensor's digest (and block checksums), stopping at the first that differs from ``expected``."""
    out = Reused(array.array("Q"), [])
    for t, want in zip(tensors, expected):
        hasher: Any = format_blocks.Hasher(block_bytes) if block_bytes else xxhash.xxh3_64()
        for chunk in _tensorio.host_chunks(t):
            hasher.update(_tensorio.byte_view(chunk))
        digest, blocks = hasher.result() if block_bytes else (hasher.intdigest(), [])
        if digest != want:
            return None
        out.digests.append(digest)
        out.blocks += blocks
    return out


def _reads_back(storage: Storage, path: str, header: bytes, sizes: list[int], digests: Sequence[int]) -> bool:
    """Whether the file ``path`` holds exactly ``header`` then tensors of ``sizes`` bytes with
    ``digests``: opened as every file of a checkpoint is (no link followed, a regular file only)."""
    try:
        source = storage.open(path, "Shard")
    except (OSError, CheckpointError):
        return False
    try:
        total = len(header) + sum(sizes)
        if source.size != total:
            return False
        source.prepare(total)
        if source.read(0, len(header)) != header:
            return False
        return _data_matches(source.views(len(header), sum(sizes)), sizes, digests)
    except (OSError, EOFError, CheckpointError):
        return False
    finally:
        source.close()


def _data_matches(pieces: Iterator[memoryview], sizes: list[int], digests: Sequence[int]) -> bool:
    """Whether the tensors laid back to back in ``pieces`` have ``digests``."""
    hasher = xxhash.xxh3_64()
    i, left = 0, sizes[0] if sizes else 0
    for piece in pieces:
        while len(piece):
            while left == 0:  # tensors that ended (or are empty) are checked in order
                if hasher.intdigest() != digests[i]:
                    return False
                hasher, i = xxhash.xxh3_64(), i + 1
                left = sizes[i]
            take = min(left, len(piece))
            hasher.update(piece[:take])
            piece, left = piece[take:], left - take
    while i < len(sizes):  # the last tensor, and empty ones after it
        if left or hasher.intdigest() != digests[i]:
            return False
        hasher, i = xxhash.xxh3_64(), i + 1
        left = sizes[i] if i < len(sizes) else 0
    return True
