"""Reading boxes: saved chunks into whatever part of a tensor this rank holds.

A destination is a box of a global tensor: a DTensor's local chunk (FSDP2, tensor parallel), or a
whole plain tensor. A saved tensor is one or more boxes (a format-2 chunked tensor, or a whole
tensor). Each rank intersects the two and reads only the overlapping byte runs, with scatter reads
straight into its local tensor: a checkpoint saved on 4 ranks restores onto 2 reading each byte
once, and no rank reads a chunk it does not need.

Checksums: a saved chunk read whole is checked against its recorded xxh3-64, as in format 1. A
chunk (or a tensor stored whole) read only in part, as a resharding restore does, is read in the
whole blocks that cover the part and checked block by block (``_format/blocks``; format 3), or, without
block checksums, read whole and checked against its own checksum: every byte a restore uses is
checked.
"""

from __future__ import annotations

import math
from collections.abc import Callable, Iterator
from dataclasses import dataclass, field
from typing import Any

import torch
import xxhash

from torchckpt import _tensorio
from torchckpt._dist import dtensor as dist_dtensor
from torchckpt._format import blocks as format_blocks
from torchckpt._format import chunks as format_chunks
from torchckpt._format.chunks import Box, ChunkedInfo
from torchckpt._format.dtypes import TensorInfo, itemsize
from torchckpt._storage.base import IOV_MAX, Source
from torchckpt.errors import CorruptCheckpointError, checksum_mismatch


def saved_boxes(saved: TensorInfo | ChunkedInfo) -> tuple[tuple[Box, TensorInfo], ...]:
    if isinstance(saved, ChunkedInfo):
        return saved.pieces
    return (((tuple(0 for _ in saved.shape), tuple(saved.shape)), saved),)


@dataclass
class _Piece:
    info: TensorInfo
    full: bool  # the whole saved chunk is read: its checksum can be checked
    views: list[tuple[int, memoryview]] = field(default_factory=list)  # (file offset, destination bytes)


@dataclass
class BoxedReads:
    """The planned reads of one restore that go through boxes, by shard file."""

    by_file: dict[str, list[_Piece]] = field(default_factory=dict)
    copies: list[tuple[torch.Tensor, torch.Tensor]] = field(default_factory=list)  # (destination, read buffer)
    nbytes: int = 0


def plan_boxed(pairs: list[tuple[torch.Tensor, Any]]) -> BoxedReads:
    """Byte runs for each (destination, saved) pair: only the overlaps of this rank's boxes."""
    out = BoxedReads()
    for dest, saved in pairs:
        found = dist_dtensor.destination_box(dest, saved.name)
        if found is None:
            continue
        local, dbox = found
        target = local
        if local.dtype != saved.dtype or not _is_host_contiguous(local):
            target = torch.empty(local.shape, dtype=saved.dtype)
            out.copies.append((local, target))
        _plan_into(out, target, dbox, saved)
    return out


def _plan_into(out: BoxedReads, target: torch.Tensor, dbox: Box, saved: TensorInfo | ChunkedInfo) -> None:
    """The runs that fill ``target`` (contiguous host memory holding box ``dbox``) from ``saved``."""
    view = _tensorio.byte_view(target)
    itemsize = target.element_size()
    pieces = saved_boxes(saved)
    for sbox, info in pieces:
        if sbox == dbox:  # the very chunk (a restore on the layout it was saved from): chunks tile, so no other overlaps
            out.by_file.setdefault(info.file, []).append(_Piece(info, True, [(info.start, view)]))
            out.nbytes += len(view)
            return
    for sbox, info in pieces:
        inner = format_chunks.overlap(sbox, dbox)
        if inner is None:
            continue
        piece = _Piece(info, inner == sbox)
        for s, d, n in format_chunks.runs(inner, sbox, dbox):
            piece.views.append((info.start + s * itemsize, view[d * itemsize : (d + n) * itemsize]))
            out.nbytes += n * itemsize
        out.by_file.setdefault(info.file, []).append(piece)


def row_blocks(saved: ChunkedInfo, open_source: Callable[[TensorInfo], Source], block_bytes: int,
               path_of: Callable[[TensorInfo], str]) -> Iterator[torch.Tensor]:
    """The whole tensor ``saved`` assembled from its chunks, as blocks of rows of about
    ``block_bytes`` (at least one row), in order: memory stays bounded whatever the tensor's size.
    Each block is a view of one buffer, valid until the next block is asked for.

    Every chunk is checked against its checksum as its last byte is read, although its bytes
    arrive over several blocks: each chunk's runs are read in its own order, block after block,
    so one running hash per chunk sees its bytes exactly as they were written.

    Raises:
        CorruptCheckpointError: a chunk fails its checksum, or its shard ends early.
    """
    shape = tuple(saved.shape)
    if not shape:
        shape, scalar = (1,), True
    else:
        scalar = False
    row_bytes = max(1, math.prod(shape[1:]) * itemsize(saved.dtype))
    rows = max(1, block_bytes // row_bytes)
    hashes: dict[str, tuple[Any, int]] = {}  # stored name -> (running hash, bytes hashed)
    sources: dict[str, Source] = {}
    # One buffer for every block: allocating a fresh one per block lets the allocator's heap grow
    # (measured: 100 MiB more for a 256 MiB tensor, against 52 MiB with one buffer).
    buffer = torch.empty((min(rows, shape[0]), *shape[1:]), dtype=saved.dtype)
    try:
        for start in range(0, shape[0], rows):
            n = min(rows, shape[0] - start)
            block = buffer[:n]
            reads = BoxedReads()
            _plan_into(reads, block, ((start, *(0 for _ in shape[1:])), (n, *shape[1:])),
                       saved if not scalar else _as_rows(saved))
            for file, pieces in reads.by_file.items():
                source = sources.get(file)
                if source is None:
                    source = sources[file] = open_source(pieces[0].info)
                try:
                    read_file(source, pieces, False, lambda _: None)
                except EOFError as e:
                    raise CorruptCheckpointError(f"{path_of(pieces[0].info)} is truncated: {e}.",
                                                 path_of(pieces[0].info)) from e
                for piece in pieces:
                    _hash_piece(piece, hashes, path_of)
            yield block.view(()) if scalar else block
    finally:
        for source in sources.values():
            source.close()


def _as_rows(saved: ChunkedInfo) -> ChunkedInfo:
    """A 0-dim tensor's one chunk seen as a tensor of one row (boxes need a dimension)."""
    return saved._replace(shape=torch.Size([1]), pieces=tuple((((0,), (1,)), info) for _, info in saved.pieces))


def _hash_piece(piece: _Piece, hashes: dict[str, tuple[Any, int]], path_of: Callable[[TensorInfo], str]) -> None:
    info = piece.info
    if info.checksum is None:
        return
    hasher, seen = hashes.get(info.name) or (xxhash.xxh3_64(), 0)
    for _, view in piece.views:  # in the chunk's own order (runs are planned in source order)
        hasher.update(view)
        seen += len(view)
    hashes[info.name] = (hasher, seen)
    if seen == info.nbytes:
        del hashes[info.name]
        if hasher.intdigest() != info.checksum:
            raise CorruptCheckpointError(checksum_mismatch(info.name, path_of(info), info.checksum,
                                                           hasher.intdigest()), path_of(info))


def _is_host_contiguous(t: torch.Tensor) -> bool:
    return t.is_cpu and t.is_contiguous() and not t.is_conj() and not t.is_neg()


def read_file(source: Source, pieces: list[_Piece], verify: bool, on_bytes: Callable[[int], None],
              blocks: format_blocks.BlockSums | None = None) -> format_blocks.Mismatch | None:
    """Read every run of one file's pieces, batching runs that follow each other in the file into
    one scatter read. With ``verify``, a piece that is a whole saved tensor is checked against its
    checksum, and one that is part of it is read in the whole blocks that cover it (``blocks``: the
    index's block checksums; without them, the whole tensor) and checked block by block. Returns the
    first mismatch, or None."""
    direct = pieces
    blocked: list[format_blocks.Blocked] = []
    if verify:
        direct = []
        for piece in pieces:
            wide = None if piece.full else format_blocks.covering(piece.info, piece.views, blocks)
            if wide is None:
                direct.append(piece)
            else:
                blocked.append(wide)
    runs = sorted(((offset, view) for piece in direct for offset, view in piece.views), key=_first)
    wanted = sum(len(v) for piece in pieces for _, v in piece.views)
    source.prepare(wanted + sum(n for b in blocked for _, n in b.segments if isinstance(n, int)))
    _read_runs(source, runs, on_bytes)
    if blocked:
        bad = format_blocks.read_blocked(blocked, lambda found: _read_runs(source, found, lambda _: None))
        if bad is not None:
            return bad
        on_bytes(sum(len(v) for b in blocked for _, v in b.segments if not isinstance(v, int)))
    if verify:
        for piece in direct:
            if piece.full and piece.info.checksum is not None:
                hasher = xxhash.xxh3_64()
                for _, view in sorted(piece.views, key=_first):
                    hasher.update(view)
                if hasher.intdigest() != piece.info.checksum:
                    return format_blocks.Mismatch(piece.info, piece.info.checksum, hasher.intdigest())
    return None


def _first(run: tuple[int, Any]) -> int:
    return int(run[0])


def _read_runs(source: Source, runs: list[tuple[int, memoryview]], on_bytes: Callable[[int], None]) -> None:
    """Read (file offset, view) runs, in file order, with as few scatter reads as their order allows."""
    k = 0
    limit = min(IOV_MAX, source.batch_views)
    while k < len(runs):
        start, first = runs[k]
        batch = [first]
        end = start + len(first)
        total = len(first)
        k += 1
        while k < len(runs) and runs[k][0] == end and len(batch) < limit and total < source.batch_bytes:
            batch.append(runs[k][1])
            end += len(runs[k][1])
            total += len(runs[k][1])
            k += 1
        source.readv(batch, start)
        on_bytes(total)


def finish(reads: BoxedReads) -> None:
    """Copy what was read through buffers (casts, non-contiguous or device destinations) into place."""
    with torch.no_grad():
        for dest, buffer in reads.copies:
            dest.copy_(buffer)
