"""Block checksums (format 3): every byte a partial read uses is checked, not only whole tensors.

Why: a tensor's checksum covers all of its bytes, so a reader that reads only part of a stored
tensor cannot check it, and a resharding restore almost always does (FSDP2 rarely keeps chunk
boundaries across a resize: a chunk saved on 2 ranks is read as parts by 3). So a save by several
ranks records, beside each tensor's checksum, the xxh3-64 of each fixed block of
:data:`BLOCK_BYTES` of its data (the last block may be shorter), for every stored tensor larger
than one block. A partial reader reads the whole blocks that cover what it needs (the bytes it does
not need into bounded scratch memory) and checks each; a tensor of one block has its tensor
checksum as its block. An index without block checksums (formats 1 and 2) is read the same way with
the whole tensor as its one block: a partial read of it reads and checks the whole tensor.

1 MiB blocks cost 16 hex digits of index per MiB of state (16 MiB for a terabyte), a second
hash pass over the data at save (xxh3 runs at about 18 GB/s, on the hashing thread that overlaps
the writes), and at most one block more read at each end of every part a restore reads.
"""

from __future__ import annotations

from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from typing import Any, NamedTuple

import xxhash

from torchckpt._format import dtypes as format_dtypes
from torchckpt._format import spec as format_spec
from torchckpt._format.dtypes import TensorInfo
from torchckpt.errors import CorruptCheckpointError, checksum_mismatch

BLOCK_BYTES = 2**20  # the block size a save writes; a reader takes the index's
KEY = "blocks"  # format 3's key in the index's torchckpt section: {"size": bytes, "checksums": hex}
SCRATCH_BYTES = 32 * 2**20  # at most this many unneeded bytes of covering blocks are held at once


# -- writing ---------------------------------------------------------------------------------


def digests(view: memoryview, size: int) -> list[int]:
    """The block checksums of one tensor's bytes: none for a tensor of at most one block."""
    if len(view) <= size:
        return []
    intdigest = xxhash.xxh3_64_intdigest
    return [intdigest(view[i : i + size]) for i in range(0, len(view), size)]


class Hasher:
    """A tensor's checksum and block checksums from its bytes fed in order, in pieces of any size."""

    def __init__(self, size: int) -> None:
        self.size = size
        self.whole = xxhash.xxh3_64()
        self.block = xxhash.xxh3_64()
        self.filled = 0  # bytes of the current block seen
        self.blocks: list[int] = []

    def update(self, view: memoryview) -> None:
        self.whole.update(view)
        while len(view):
            take = min(len(view), self.size - self.filled)
            self.block.update(view[:take])
            self.filled += take
            view = view[take:]
            if self.filled == self.size:
                self.blocks.append(self.block.intdigest())
                self.block, self.filled = xxhash.xxh3_64(), 0

    def result(self) -> tuple[int, list[int]]:
        """(the tensor's checksum, its block checksums: none when it fits in one block)."""
        if self.filled and self.blocks:
            self.blocks.append(self.block.intdigest())
        if len(self.blocks) == 1:  # exactly one full block: the tensor checksum says it all
            self.blocks = []
        return self.whole.intdigest(), self.blocks


# -- the index -------------------------------------------------------------------------------


@dataclass
class BlockSums:
    """The block checksums of a format-3 index: the block size, and where each stored tensor's are."""

    size: int
    text: str = ""
    first: dict[str, int] = field(default_factory=dict)  # stored name -> index of its first block

    def of(self, info: TensorInfo) -> tuple[int, Sequence[int]] | None:
        """(block size, checksums) of a stored tensor; None when it is one block (its checksum)."""
        first = self.first.get(info.name)
        if first is None:
            return None
        count = -(-info.nbytes // self.size)
        w = format_spec.CHECKSUM_CHARS
        return self.size, format_dtypes.parse_checksums(self.text[first * w : (first + count) * w])


def parse(section: dict[str, Any], names: list[str], dtypes: list[str], shapes: list[str],
          index_path: str) -> BlockSums:
    """Check and parse the ``blocks`` entry of a format-3 index against its tensor table.

    Raises:
        CorruptCheckpointError: it is missing, malformed, or does not hold exactly one checksum per
            block of every stored tensor larger than one block.
    """
    entry = section.get(KEY)
    size = entry.get("size") if isinstance(entry, dict) else None
    text = entry.get("checksums") if isinstance(entry, dict) else None
    if type(size) is not int or not 1 <= size <= format_spec.MAX_DIM or not isinstance(text, str):
        raise CorruptCheckpointError(
            f"{index_path} is invalid: format 3 needs a {KEY!r} entry with an integer 'size' of at least 1 and a "
            f"'checksums' string, not {str(entry)[:80]!r}.")
    sizes: dict[tuple[str, str], int] = {}
    where = f"in {index_path}"
    first: dict[str, int] = {}
    count = 0
    for name, dtype, shape in zip(names, dtypes, shapes):
        nbytes = sizes.get((dtype, shape))
        if nbytes is None:
            dims = format_dtypes.dims_of(shape, where)
            nbytes = sizes[dtype, shape] = format_dtypes.nbytes_of(dims, format_dtypes.check_dtype(dtype, f" {where}"))
        if nbytes > size:
            first[name] = count
            count += -(-nbytes // size)
    w = format_spec.CHECKSUM_CHARS
    if len(text) != count * w:
        raise CorruptCheckpointError(
            f"{index_path} is invalid: its {KEY!r} entry holds {len(text) // w} block checksums, but its tensors "
            f"of more than {size} bytes have {count} blocks of {size} bytes.")
    try:
        format_dtypes.parse_checksums(text)
    except ValueError as e:
        raise CorruptCheckpointError(f"{index_path} is invalid: its block checksums are malformed ({e}).") from None
    return BlockSums(size, text, first)


# -- reading part of a tensor ------------------------------------------------------------------


class Mismatch(NamedTuple):
    """A block (or a whole tensor) whose bytes do not hash to what the index recorded."""

    info: TensorInfo
    recorded: int
    digest: int
    block: int = -1  # -1: the whole tensor
    size: int = 0

    def message(self, path: str) -> str:
        if self.block < 0:
            return checksum_mismatch(self.info.name, path, self.recorded, self.digest)
        start = self.block * self.size
        end = min(start + self.size, self.info.nbytes)
        return (f"Tensor {self.info.name!r} in {path} fails the checksum of its block {self.block} (bytes {start} to "
                f"{end} of its {self.info.nbytes}; recorded {self.recorded:016x}, read {self.digest:016x}): the "
                "shard is corrupt.")


@dataclass
class Blocked:
    """Part of one stored tensor, read in the whole blocks that cover it and checked block by block."""

    info: TensorInfo
    size: int  # block bytes (the whole tensor when it has no block checksums)
    sums: Sequence[int]  # per block
    segments: list[tuple[int, memoryview | int]]  # (file offset, destination bytes or an unneeded byte count)
    hasher: Any = None
    at: int = 0  # bytes of the tensor hashed so far (relative to its start)

    def update(self, offset: int, view: memoryview) -> Mismatch | None:
        """Hash the next bytes (in file order); the mismatch of a block they complete, if any."""
        if self.hasher is None:
            self.at = offset - self.info.start  # a span of blocks starts on a block boundary
        while len(view):
            block = self.at // self.size
            end = min((block + 1) * self.size, self.info.nbytes)
            take = min(len(view), end - self.at)
            if self.hasher is None:
                self.hasher = xxhash.xxh3_64()
            self.hasher.update(view[:take])
            view = view[take:]
            self.at += take
            if self.at == end:
                digest, self.hasher = self.hasher.intdigest(), None
                if digest != self.sums[block]:
                    size = self.size if self.size < self.info.nbytes else 0
                    return Mismatch(self.info, self.sums[block], digest, block if size else -1, size)
        return None


def covering(info: TensorInfo, views: list[tuple[int, memoryview]], sums: BlockSums | None) -> Blocked | None:
    """The read of ``views`` (file offset, destination bytes; in file order) of stored tensor
    ``info`` widened to whole blocks, or None when the index records no checksum for it."""
    found = sums.of(info) if sums is not None else None
    if found is not None:
        size, checks = found
    elif info.checksum is None:
        return None
    else:
        size, checks = max(1, info.nbytes), (info.checksum,)
    segments: list[tuple[int, memoryview | int]] = []
    start, nbytes = info.start, info.nbytes
    pos = -1  # relative end of what the segments cover
    for offset, view in views:
        rel = offset - start
        lo = rel // size * size
        if pos < 0:
            pos = lo
        elif lo > pos:  # the next span of blocks: close the current one at its block's end
            _gap(segments, start, pos, min(-(-pos // size) * size, nbytes))
            pos = lo
        _gap(segments, start, pos, rel)
        segments.append((offset, view))
        pos = rel + len(view)
    if pos >= 0:
        _gap(segments, start, pos, min(-(-pos // size) * size, nbytes))
    return Blocked(info, size, checks, segments)


def _gap(segments: list[tuple[int, memoryview | int]], start: int, lo: int, hi: int) -> None:
    if hi > lo:
        segments.append((start + lo, hi - lo))


def read_blocked(pieces: list[Blocked], read: Callable[[list[tuple[int, memoryview]]], None],
                 scratch_bytes: int = SCRATCH_BYTES) -> Mismatch | None:
    """Read every piece's segments (``read`` takes (file offset, view) runs in file order) and
    check each block; the unneeded bytes go through one scratch buffer of at most
    ``scratch_bytes``, so a whole-tensor check of a large tensor is streamed. Returns the first
    mismatch, or None."""
    scratch = memoryview(bytearray(0))
    group: list[tuple[Blocked, int, memoryview | int]] = []
    gaps = 0

    def flush() -> Mismatch | None:
        nonlocal scratch, group, gaps
        if len(scratch) < gaps:
            scratch = memoryview(bytearray(gaps))
        items, at = [], 0
        for piece, offset, part in group:
            if isinstance(part, int):
                view, at = scratch[at : at + part], at + part
            else:
                view = part
            items.append((piece, offset, view))
        read(sorted(((offset, view) for _, offset, view in items), key=lambda run: run[0]))
        group, gaps = [], 0
        for piece, offset, view in items:
            bad = piece.update(offset, view)
            if bad is not None:
                return bad
        return None

    for piece in pieces:
        for offset, part in piece.segments:
            while isinstance(part, int) and gaps + part > scratch_bytes:
                take = scratch_bytes - gaps
                if take:
                    group.append((piece, offset, take))
                    gaps, offset, part = gaps + take, offset + take, part - take
                bad = flush()
                if bad is not None:
                    return bad
            if isinstance(part, int):
                if not part:
                    continue
                gaps += part
            group.append((piece, offset, part))
    return flush() if group else None


# -- verify ------------------------------------------------------------------------------------


def check_range(source: Any, info: TensorInfo, sums: BlockSums | None) -> tuple[int, list[Mismatch]]:
    """Hash a stored tensor's bytes in bounded pieces: (its checksum, the blocks that fail theirs)."""
    found = sums.of(info) if sums is not None else None
    size = found[0] if found is not None else 0
    hasher: Any = Hasher(size) if size else xxhash.xxh3_64()
    step = max(size, SCRATCH_BYTES // size * size) if size else SCRATCH_BYTES
    buffer = memoryview(bytearray(min(step, max(1, info.nbytes))))
    offset = info.start
    while offset < info.end:
        part = buffer[: min(len(buffer), info.end - offset)]
        source.readv([part], offset)
        hasher.update(part)
        offset += len(part)
    if found is None:
        return hasher.intdigest(), []
    digest, blocks = hasher.result()
    return digest, [Mismatch(info, want, got, i, size) for i, (want, got) in enumerate(zip(found[1], blocks))
                    if want != got]
