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
from torchckpt._storage.base import Stage, Storage
from torchckpt.errors import CheckpointError

_aside = _threads.Worker("torchckpt-reuse")  # hashes tensors while the placed file is read back


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
                block_bytes: int) -> Reused | None:
    """Place the shard ``file`` (``names``, ``tensors``, its encoded ``header``) from the base when
    the base holds the same file and the placed copy reads back as exactly these bytes; None (and
    nothing placed) otherwise, for the caller to write it. ``block_bytes``: also compute block
    checksums (format 3), 0 for none."""
    found = base.shards.get(tuple(names))
    if found is None or found.size != len(header) + sum(t.nbytes for t in tensors):
        return None
    if found.header_checksum != xxhash.xxh3_64_hexdigest(header):
        return None
    first = _digests_if_equal(tensors[:1], found.digests[:1], block_bytes)  # a changed shard stops here, usually
    if first is None:
        return None
    placed = stage.reuse(file, join(base.path, found.file))
    if placed is None:
        return None
    # The rest of the tensors are hashed on another thread while the placed file is read back: both
    # are compared with the base's digests, so the file holds these bytes when both match.
    rest = _aside.call(_digests_if_equal, tensors[1:], found.digests[1:], block_bytes)
    file_ok = _reads_back(base.storage, placed, header, [t.nbytes for t in tensors], found.digests)
    current = rest.result()
    if current is None or not file_ok:
        stage.drop(file)
        return None
    base.used[file] = found.file
    return Reused(first.digests + current.digests, first.blocks + current.blocks)


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
