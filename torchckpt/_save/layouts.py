"""Planning a save by several ranks from this rank's own record, when every rank's structure agrees.

The general plan (``_save.plan.global_plan``) gathers every rank's full list of tensors on every
rank: ranks x tensors entries sent, parsed and planned by each, the quadratic planning DCP users
meet at scale (1,024 ranks x 20,000 tensors is 20 million entries on every rank). Yet in the common
case every rank holds the same tensors, laid out by the same meshes and placements, and a rank can
work out alone what it writes:

- a DTensor whose placements are ``Shard``, ``Replicate`` or the ``_StridedShard`` of FSDP2 over
  tensor parallelism has chunks that follow from its global shape, its mesh's shape and its
  placements; this rank holds the chunk at its own coordinate, and ranks that differ only along
  ``Replicate`` dimensions hold the same one: of those, the one whose position along them equals
  the tensor's ordinal (modulo their number) writes it, which spreads the replicated chunks evenly
  without any exchange;
- plain tensors (the same on every rank) are split and spread over the ranks by the same rule as
  the general plan (largest first onto the least loaded), from the one list every rank has;
- per-rank tensors (``PerRank``, ``RNGState``) are this rank's own.

So each rank sends a digest of its *structure* (names, dtypes, global shapes, layouts, the digests
of plain tensors) and the number of files it will write; when every digest is equal, each
rank numbers its files after those of the ranks before it and writes, and nothing else is
exchanged. When they differ (another layout on some rank, a value that differs), or a layout needs
it (a mesh that is not the whole job, another kind of placement, an empty tensor), the save falls
back to the general plan, which also names what differs. The plan of a structure is
kept for the next save of the same structure, the common case of a training run.
"""

from __future__ import annotations

import dataclasses
import heapq
import json
import math
from collections import OrderedDict
from collections.abc import Sequence
from dataclasses import dataclass, field
from typing import Any

import torch
import xxhash

from torchckpt._dist import dtensor as dist_dtensor
from torchckpt._dist.dtensor import Layout
from torchckpt._format import chunks as format_chunks
from torchckpt._format import dtypes as format_dtypes
from torchckpt._format import spec
from torchckpt._save.plan import MIN_BLOCK_BYTES, RankPlan, Unit, plan_shards

_CACHE_SIZE = 4  # plans kept: a run saves one structure again and again (a second one: model + EMA, say)


@dataclass
class Draft:
    """A plan made from this rank's record alone, before the ranks confirm that they agree:
    its files are not numbered yet."""

    structure: str  # the digest every rank must send for this plan to hold
    shards: list[list[str]]
    units: dict[str, Unit]
    chunked: dict[str, tuple[torch.dtype, tuple[int, ...]]] = field(default_factory=dict)


_drafts: OrderedDict[str, Draft] = OrderedDict()


def draft(entries: Sequence[list[Any]], layouts: dict[str, Layout | None], per_rank: set[str], rank: int,
          world: int, max_shard_size: int) -> Draft | None:
    """This rank's plan, assuming every rank sends the same structure; None when its state has a
    layout that needs the general plan. ``entries`` are ``_save.collective.Captured.entries``,
    ``layouts`` each DTensor's (``_dist.dtensor.mesh_layout``), ``per_rank`` the names of per-rank
    tensors."""
    shared: list[list[Any]] = []  # what every rank must hold alike, but for the small values
    values: list[str | None] = []  # the digests of plain tensors (an optimizer's step changes every save)
    own: list[list[Any]] = []
    for entry in entries:
        name, dtype, shape, offsets, sizes, digest, group = entry
        if name in per_rank:
            own.append(entry)
        elif offsets is None:
            shared.append([name, dtype, shape, group])
            values.append(digest)
        else:
            layout = layouts.get(name)
            if layout is None or math.prod(layout[0]) != world or 0 in shape:
                return None
            shared.append([name, dtype, shape, group, layout[0], layout[1]])
            own.append([name, offsets, sizes, layout[2]])
    alike, key = _layout_digests(shared, own, rank, world, max_shard_size)
    structure = xxhash.xxh3_128_hexdigest(f"{alike} {json.dumps(values)}".encode())
    # The plan depends on the layout, not on the values: kept across saves whose values differ.
    found = _drafts.get(key)
    if found is None:
        found = _plan(entries, layouts, per_rank, rank, world, max_shard_size, structure)
        _drafts[key] = found
        while len(_drafts) > _CACHE_SIZE:
            _drafts.popitem(last=False)
    _drafts.move_to_end(key)
    return found if found.structure == structure else dataclasses.replace(found, structure=structure)


# the last save's (shared, own, rank, world, max_shard_size, layout digest, key), replaced whole: a thread
# reads one tuple, never half of another thread's
_last: list[tuple[Any, ...]] = []


def _layout_digests(shared: list[list[Any]], own: list[list[Any]], rank: int, world: int,
                    max_shard_size: int) -> tuple[str, str]:
    """The digest of what every rank must hold alike (``shared``), and the key of this rank's plan.
    A run saves one structure again and again: where the lists are equal to the last save's
    (compared in C, about 1 ms for 8,000 entries), its digests are taken again, instead of
    serializing and hashing the lists (about 13 ms)."""
    last = _last[0] if _last else None
    if last is not None and last[2:5] == (rank, world, max_shard_size) and last[0] == shared and last[1] == own:
        return last[5], last[6]
    layout = xxhash.xxh3_128_hexdigest(json.dumps(shared, separators=(",", ":")).encode())
    key = xxhash.xxh3_128_hexdigest(f"{layout} {rank} {world} {max_shard_size} {json.dumps(own)}".encode())
    _last[:1] = [(shared, own, rank, world, max_shard_size, layout, key)]
    return layout, key


def numbered(plan: Draft, counts: Sequence[int], rank: int) -> RankPlan:
    """The draft with its files numbered after the ranks before it (``counts``: every rank's number
    of files). A save that stores nothing still writes one empty shard, on rank 0, as a single
    process does."""
    shards = plan.shards
    total = sum(counts)
    if total == 0:
        total, shards = 1, ([[]] if rank == 0 else [])
    first = sum(counts[:rank]) + 1
    files = [(spec.shard_name(first + i, total), names) for i, names in enumerate(shards)]
    return RankPlan(files, plan.units, plan.chunked)


def _plan(entries: Sequence[list[Any]], layouts: dict[str, Layout | None], per_rank: set[str], rank: int,
          world: int, max_shard_size: int, structure: str) -> Draft:
    """Units of this rank's state in entry order, who writes each (see the module's docstring),
    and this rank's shards of those it writes."""
    units: list[Unit] = []
    plain: list[Unit] = []
    chunked: dict[str, tuple[torch.dtype, tuple[int, ...]]] = {}
    ordinal = 0
    for name, dtype_name, shape, offsets, sizes, _, group in entries:
        dtype = format_dtypes.str_to_dtype(dtype_name)
        if name in per_rank:
            units.append(Unit(name, name, dtype, None, tuple(shape), [rank], rank, int(group)))
        elif offsets is None:
            unit = Unit(name, name, dtype, None, tuple(shape), [], -1, int(group))
            units.append(unit)
            plain.append(unit)
        else:
            layout = layouts[name]
            assert layout is not None
            writer = _writes_chunk(layout, ordinal)
            ordinal += 1
            whole = _pieces(shape, layout) == 1  # one chunk, the whole tensor: stored under its own name
            if not whole:
                chunked[name] = (dtype, tuple(shape))
            box = (tuple(offsets), tuple(sizes))
            if not writer or format_chunks.volume(box[1]) == 0:
                continue
            if whole:
                units.append(Unit(name, name, dtype, None, tuple(shape), [], rank, int(group)))
            else:
                units.append(Unit(format_chunks.chunk_name(name, box[0]), name, dtype, box, box[1], [], rank,
                                  int(group)))
    split = _split_plain(plain, world)
    if split:  # the index lists chunked tensors in the order of the state
        chunked = {e[0]: (format_dtypes.str_to_dtype(e[1]), tuple(e[2])) for e in entries
                   if e[0] in chunked or e[0] in split}
        units = [b for u in units for b in split.get(u.stored, (u,))]
    _spread([u for u in units if u.owner == -1], world)  # the plain tensors: every rank has the same list
    mine = [u for u in units if u.owner == rank]
    groups = {u.stored: u.group for u in mine if u.group}
    rows = ((u.stored, u.nbytes, format_dtypes.itemsize(u.dtype)) for u in mine)
    shards = [s.names for s in plan_shards(rows, max_shard_size, groups)] if mine else []
    return Draft(structure, shards, {u.stored: u for u in mine}, chunked)


def _writes_chunk(layout: Layout, ordinal: int) -> bool:
    """Whether this rank writes its chunk of the ``ordinal``-th DTensor: of the ranks holding the
    same chunk (those that differ only along ``Replicate`` mesh dimensions), the one whose position
    along those dimensions is ``ordinal`` modulo their number."""
    mesh, placements, coordinate = layout
    position, count = 0, 1
    for size, placement, c in zip(mesh, placements, coordinate):
        if placement == "R":
            position, count = position * size + c, count * size
    return position == ordinal % count


def _pieces(shape: Sequence[int], layout: Layout) -> int:
    """How many non-empty chunks the layout cuts a tensor of ``shape`` into (``torch.chunk``'s
    rule, as DTensor's ``Shard``: pieces of ``ceil(n / k)`` rows, the last ones short or empty);
    a strided shard, or a dimension sharded twice, by torch's own split
    (``_dist.dtensor.chunk_count``)."""
    sharded = [p for p in layout[1] if p != "R"]
    if any("/" in p for p in sharded) or len(set(sharded)) < len(sharded):
        return dist_dtensor.chunk_count(tuple(shape), tuple(layout[0]), tuple(layout[1]))
    count = 1
    for size, placement in zip(layout[0], layout[1]):
        if placement != "R":
            n = shape[int(placement[1:])]
            count *= -(-n // -(-n // size))
    return count


def _split_plain(plain: list[Unit], world: int) -> dict[str, list[Unit]]:
    """Plain tensors larger than a fair block, each as its row blocks (the rule of ``_save.plan``)."""
    block = max(MIN_BLOCK_BYTES, -(-sum(u.nbytes for u in plain) // (world * 8)))
    split: dict[str, list[Unit]] = {}
    for unit in plain:
        rows = unit.shape[0] if unit.shape else 0
        if unit.nbytes <= block or rows == 0:
            continue
        step = max(1, block // max(1, unit.nbytes // rows))
        if step >= rows:
            continue
        blocks = split[unit.stored] = []
        for start in range(0, rows, step):
            offsets = (start,) + (0,) * (len(unit.shape) - 1)
            sizes = (min(step, rows - start), *unit.shape[1:])
            blocks.append(Unit(format_chunks.chunk_name(unit.logical, offsets), unit.logical, unit.dtype,
                               (offsets, sizes), sizes, [], -1, unit.group))
    return split


def _spread(units: list[Unit], world: int) -> None:
    """Largest first onto the least-loaded rank (ties: the lower rank), in ``log(world)`` a unit."""
    heap = [(0, r) for r in range(world)]
    for unit in sorted(units, key=lambda u: -u.nbytes):  # stable: plan order among equal sizes
        load, r = heapq.heappop(heap)
        unit.owner = r
        heapq.heappush(heap, (load + unit.nbytes, r))
