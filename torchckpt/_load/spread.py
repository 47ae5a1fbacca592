"""Replicated state read once: each tensor by one rank, then broadcast to the others.

In a restore by several ranks, a tensor that every rank restores whole into a plain tensor (a DDP
model's parameters and optimizer state, plain values kept on every rank) is the same bytes on
every rank. Read by every rank, a job on several hosts reads the checkpoint from storage once per
rank: the "every rank reads every file" cost of large jobs, where storage bandwidth is shared. Here
each such tensor is read by one rank and sent to the others over the process group, the way
Orbax's single-replica restore and Megatron's fully parallel load do:

1. every rank lists its candidates (the pairs of the restore plan whose destination is a whole,
   contiguous CPU tensor, and whose saved tensor is not per rank) and the ranks compare digests of
   their lists: only when all are equal are the reads spread, else every rank reads all, as before;
2. the list, in file order, is cut into one run per rank of about equal bytes, so that each rank
   reads a contiguous stretch of the shards: rank r keeps only its run in its plan (a destination
   read twice, by two saved tensors, is read by one rank, whose last read wins as without spreading);
3. after every rank has read its part (checked against the checksums, as every read is), each
   run is broadcast from its reader: tensors of ``DIRECT_BYTES`` or more in place, smaller ones
   packed into buckets, so that thousands of small tensors cost a few collectives.

When: ``read_once=True`` always; ``None`` (the default) only when the ranks run on more than one
host. Ranks of one host share its page cache, so that their reads of the same file cost the
storage one read: measured on one host (gloo, 2 and 4 ranks, 1.5 GB of DDP state), spreading made
the restore 1.7 to 3 times slower than every rank reading, the broadcast over loopback being
slower than copies from the page cache. ``False`` never.

The broadcasts run on the caller's thread, on the process group of the call (a restore never runs
in the background); only groups whose backend carries CPU tensors (gloo) are used. Destinations on
an accelerator are read by every rank.
"""

from __future__ import annotations

import json
import socket
from collections.abc import Sequence
from dataclasses import dataclass, field
from typing import Any

import torch
import torch.distributed as dist
import xxhash

from torchckpt._dist.coordinator import AnyCoordinator
from torchckpt._format import chunks as format_chunks
from torchckpt._format import dtypes as format_dtypes
from torchckpt._format.chunks import ChunkedInfo
from torchckpt._load.plan import Plan

BUCKET_BYTES = 32 * 2**20  # small tensors travel packed, up to this much per broadcast
DIRECT_BYTES = 4 * 2**20  # a tensor this large is broadcast in place


@dataclass
class Spread:
    """The agreed split of a restore's replicated reads: per rank, the destinations it reads and sends."""

    group: Any
    rank: int
    runs: list[list[torch.Tensor]] = field(default_factory=list)


def replicated(plan: Plan) -> list[tuple[torch.Tensor, Any]]:
    """The planned reads every rank makes alike (see :func:`_candidates`), in file order: listed
    once, then described to the other ranks and cut into runs."""
    return sorted(_candidates(plan), key=_position)


def describe(found: list[tuple[torch.Tensor, Any]], coord: AnyCoordinator) -> list[str] | None:
    """A digest of this rank's :func:`replicated` reads, and its host, for the ranks' exchange;
    None when this restore cannot spread them (a single process, a group without CPU collectives)."""
    if not coord.is_collective or not _carries_cpu(getattr(coord, "group", None)):
        return None
    listed = [[saved.name, format_dtypes.DTYPE_NAMES[saved.dtype], str(dest.dtype), list(saved.shape)]
              for dest, saved in found]
    # which destinations share memory here: ranks whose tensors alias otherwise would cut the reads
    # into other runs, and their broadcasts would not pair up
    digest = xxhash.xxh3_128_hexdigest(json.dumps([coord.world, listed, _overlaps(found)],
                                                  separators=(",", ":")).encode())
    return [digest, socket.gethostname()]


def assign(plan: Plan, found: list[tuple[torch.Tensor, Any]], described: Sequence[list[str] | None],
           coord: AnyCoordinator) -> Spread | None:
    """Cut this rank's :func:`replicated` reads ``found`` into one run per rank and drop the other
    ranks' runs from its plan; None (and the plan unchanged) unless every rank described the same
    reads, and (with ``read_once=None``) the ranks run on more than one host."""
    if any(d is None for d in described) or len({d[0] for d in described if d is not None}) != 1:
        return None
    if plan.read_once is None and len({d[1] for d in described if d is not None}) == 1:
        return None  # one host: its page cache already reads each byte of storage once
    candidates = found
    total = sum(saved.nbytes for _, saved in candidates)
    if not total:
        return None
    world = len(described)
    spread = Spread(getattr(coord, "group", None), coord.rank, [[] for _ in range(world)])
    # One reader for destinations whose bytes overlap (a tensor read twice, a buffer and a view of
    # it): it reads them in the plan's order and sends them in that order, so the last read wins as
    # without spreading. Views of one flat buffer that do not overlap are spread as any tensors.
    first = _overlaps(candidates)
    readers: dict[int, int] = {}  # the first candidate of each overlapping group -> its one reader
    reader_of: dict[int, int] = {}  # id(destination) -> its reader
    before = 0
    for position, (dest, saved) in enumerate(candidates):
        reader = min(world - 1, (2 * before + saved.nbytes) * world // (2 * total))  # the rank its middle byte falls to
        before += saved.nbytes
        reader = readers.setdefault(first[position], reader)
        if id(dest) not in reader_of:
            reader_of[id(dest)] = reader
            spread.runs[reader].append(dest)
    plan.reads = [pair for pair in plan.reads if reader_of.get(id(pair[0]), coord.rank) == coord.rank]
    return spread


def _overlaps(found: list[tuple[torch.Tensor, Any]]) -> list[int]:
    """For each destination of ``found``, the position of the first one whose bytes overlap it
    (through others too); its own position where it overlaps none."""
    spans = sorted((t.data_ptr(), t.data_ptr() + t.numel() * t.element_size(), i) for i, (t, _) in enumerate(found))
    groups: list[list[int]] = []
    end = -1
    for start, stop, i in spans:
        if groups and start < end:
            groups[-1].append(i)
            end = max(end, stop)
        else:
            groups.append([i])
            end = stop
    first = list(range(len(found)))
    for group in groups:
        for i in group:
            first[i] = min(group)
    return first


def broadcast(spread: Spread) -> None:
    """Send every run from its reader to the other ranks, in the same order on every rank."""
    with torch.no_grad():
        for src, run in enumerate(spread.runs):
            bucket: list[torch.Tensor] = []
            size = 0
            for t in run:
                if t.nbytes >= DIRECT_BYTES:  # as bytes: gloo has no collectives for some dtypes (int16, float8)
                    dist.broadcast(_bytes_of(t), src=_global(spread, src), group=spread.group)
                    continue
                if t.nbytes:
                    bucket.append(t)
                    size += t.nbytes
                if size >= BUCKET_BYTES:
                    _send_bucket(spread, src, bucket, size)
                    bucket, size = [], 0
            if bucket:
                _send_bucket(spread, src, bucket, size)


def _send_bucket(spread: Spread, src: int, bucket: list[torch.Tensor], size: int) -> None:
    mine = src == spread.rank
    flat = torch.cat([_bytes_of(t) for t in bucket]) if mine else torch.empty(size, dtype=torch.uint8)
    dist.broadcast(flat, src=_global(spread, src), group=spread.group)
    if not mine:
        offset = 0
        for t in bucket:
            _bytes_of(t).copy_(flat[offset : offset + t.nbytes])
            offset += t.nbytes


def _global(spread: Spread, rank: int) -> int:
    """The global rank of the group's ``rank`` (``broadcast``'s ``src``, on every torch we support)."""
    return rank if spread.group is None else dist.get_global_rank(spread.group, rank)


def _bytes_of(t: torch.Tensor) -> torch.Tensor:
    """A contiguous tensor's bytes as a 1-D uint8 view of the same memory."""
    return t.reshape(-1).view(torch.uint8)


def _candidates(plan: Plan) -> list[tuple[torch.Tensor, Any]]:
    """The planned reads every rank makes alike: a whole saved tensor (or all chunks of one) into a
    plain, contiguous CPU tensor, not a per-rank value."""
    out = []
    for dest, saved in plan.reads:  # the type first: a DTensor (most reads of a sharded job) fails it at once
        if (type(dest) in _PLAIN and dest.is_cpu and dest.is_contiguous() and not dest.is_conj()
                and not dest.is_neg() and format_chunks.parse_rank_name(saved.name) is None
                and tuple(dest.shape) == tuple(saved.shape)):
            out.append((dest, saved))
    return out


_PLAIN = (torch.Tensor, torch.nn.Parameter)


def _position(pair: tuple[torch.Tensor, Any]) -> tuple[str, int]:
    """Where a saved tensor (its first chunk) starts: runs follow the shards' order."""
    saved = pair[1]
    info = saved.pieces[0][1] if isinstance(saved, ChunkedInfo) else saved
    return info.file, info.start


def _carries_cpu(group: Any) -> bool:
    """Whether collectives of ``group`` (None: the default group) take CPU tensors (gloo does)."""
    try:
        return "gloo" in str(dist.get_backend(group)).lower()
    except (RuntimeError, ValueError):
        return False
