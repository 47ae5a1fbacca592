"""Shard planning: one process's tensors grouped into shards, and the global plan of a save by
several ranks (who writes which bytes, into which files).

The global plan is computed identically on every rank from the records every rank sent (step 3 of
``_save.collective``), so it needs no further exchange, and it never touches a file:

- a DTensor chunk held by several ranks (replicated along a mesh dimension) is written once, by
  one of its holders;
- plain (replicated) tensors are written once too, their bytes spread over the ranks: units are
  placed largest first onto the least-loaded rank that holds them (LPT), and a replicated tensor
  larger than ``max(MIN_BLOCK_BYTES, replicated bytes / (8 * world))`` is first split into row
  blocks, so that no rank writes much more than the mean;
- files are numbered globally (``model-00003-of-00008.safetensors``), each rank's in a run.
"""

from __future__ import annotations

import array
from collections.abc import Iterable, Mapping
from dataclasses import dataclass, field
from typing import Any

import torch

from torchckpt._dist import dtensor as dist_dtensor
from torchckpt._format import chunks as format_chunks
from torchckpt._format import dtypes as format_dtypes
from torchckpt._format import spec
from torchckpt._format.chunks import Box
from torchckpt.errors import CheckpointError, CorruptCheckpointError

MIN_BLOCK_BYTES = 8 * 2**20  # a replicated tensor is split into row blocks of about this much or more


@dataclass
class Shard:
    names: list[str] = field(default_factory=list)
    nbytes: int = 0
    stable: bool = False  # of tensors likely unchanged since the last save (see ``plan_shards``)
    widths: array.array[int] = field(default_factory=lambda: array.array("B"), repr=False)  # element sizes
    sizes: array.array[int] = field(default_factory=lambda: array.array("Q"), repr=False)  # bytes


CHANGING, FROZEN_PARAMETER, FROZEN_BUFFER = 0, 1, 2  # the groups of ``plan_shards``, by how likely a tensor changes
_GROUP_ORDER = (FROZEN_PARAMETER, FROZEN_BUFFER, CHANGING)


def plan_shards(rows: Iterable[tuple[str, int, int]], max_shard_size: int,
                groups: Mapping[str, int] | None = None) -> list[Shard]:
    """Greedy grouping of ``(name, bytes, element size)`` rows in save order; a single tensor over
    the limit gets a shard of its own. Rows, not tensors: a save, a rank's part of a save by several
    ranks and the tools that rewrite a checkpoint all plan with this one planner. Pass a generator
    for many tensors: each row is read once, and only a byte per tensor is kept besides its name.

    ``groups`` sorts tensors by how likely they are to change before the next save: frozen
    parameters (``FROZEN_PARAMETER``), the buffers of modules that train nothing (``FROZEN_BUFFER``:
    a frozen BatchNorm in training mode still updates its running statistics), and the rest
    (``CHANGING``, the default: trainable parameters, optimizer state, counters). Each group gets
    shards of its own, frozen parameters first, so that an incremental save finds the same shards of
    them save after save and reuses them whole (``_save.reuse``), and a tensor that changes
    anyway costs the shard it is in, not the frozen part."""
    groups = groups or {}
    done: dict[int, list[Shard]] = {g: [] for g in _GROUP_ORDER}
    current = {g: Shard(stable=g != CHANGING) for g in _GROUP_ORDER}
    for name, n, width in rows:
        g = groups.get(name, CHANGING)
        shard = current[g]
        if shard.names and shard.nbytes + n > max_shard_size:
            done[g].append(shard)
            shard = current[g] = Shard(stable=g != CHANGING)
        shard.names.append(name)
        shard.widths.append(width)
        shard.sizes.append(n)
        shard.nbytes += n
    shards = [s for g in _GROUP_ORDER for s in (*done[g], current[g]) if s.names] or [Shard()]
    for shard in shards:  # every tensor aligned to its element size: in save order where it is, else widest first
        widths = shard.widths
        if widths and min(widths) != max(widths) and not _aligned(shard.sizes, widths):
            order = sorted(range(len(widths)), key=lambda i: -widths[i])
            shard.names = [shard.names[i] for i in order]
        shard.widths, shard.sizes = array.array("B"), array.array("Q")
    return shards


def _aligned(sizes: array.array[int], widths: array.array[int]) -> bool:
    """Whether tensors of ``sizes`` bytes laid out one after another, in this order, each start at
    a multiple of their element size (``widths``): then the save's order, which a dict's keys
    keep without marks (``_format.dict_order``), needs no sorting. Float32 weights and an int64
    counter of even-sized layers are, as a BatchNorm model's state dict is."""
    offset = 0
    for size, width in zip(sizes, widths):
        if offset % width:
            return False
        offset += size
    return True


@dataclass
class Unit:
    """One stored tensor of the checkpoint: a whole tensor, or a chunk of one."""

    stored: str
    logical: str
    dtype: torch.dtype
    box: Box | None  # None: the whole tensor
    shape: tuple[int, ...]  # the stored tensor's own shape
    holders: list[int]
    owner: int = -1
    group: int = 0  # how likely it changes before the next save (see ``plan_shards``)

    @property
    def nbytes(self) -> int:
        return format_chunks.volume(self.shape) * format_dtypes.itemsize(self.dtype)


@dataclass
class GlobalPlan:
    units: list[Unit]
    chunked: dict[str, tuple[torch.dtype, tuple[int, ...]]]  # logical name -> (dtype, global shape)
    files: list[list[tuple[str, list[str]]]]  # per rank: (file name, stored names)


@dataclass
class RankPlan:
    """What one rank writes in a save by several ranks: its files (name, stored names) and their
    units by stored name; ``chunked``: every chunked tensor's (dtype, global shape), for the index."""

    files: list[tuple[str, list[str]]]
    units: dict[str, Unit]
    chunked: dict[str, tuple[torch.dtype, tuple[int, ...]]]


def rank_plan(plan: GlobalPlan, rank: int) -> RankPlan:
    """``rank``'s part of a global plan."""
    return RankPlan(plan.files[rank], {u.stored: u for u in plan.units if u.owner == rank}, plan.chunked)


def global_plan(records: list[dict[str, Any]], max_shard_size: int) -> GlobalPlan:
    """Who writes what, and into which files: the same result on every rank."""
    world = len(records)
    units: dict[tuple[Any, ...], Unit] = {}
    logical: dict[str, tuple[torch.dtype, tuple[int, ...]]] = {}
    chunks_of: dict[str, list[Unit]] = {}
    for rank, record in enumerate(records):
        for name, dtype_name, shape, offsets, sizes, _, group in record["entries"]:
            dtype = format_dtypes.str_to_dtype(dtype_name)
            shape = tuple(shape)
            if offsets is None:
                unit = units.setdefault((name,), Unit(name, name, dtype, None, shape, [], group=int(group)))
            else:
                logical.setdefault(name, (dtype, shape))
                box = (tuple(offsets), tuple(sizes))
                if format_chunks.volume(shape) == 0:  # an empty tensor: stored whole, as one process stores it
                    box = (tuple(0 for _ in shape), shape)
                elif format_chunks.volume(box[1]) == 0:
                    continue
                key = (name, box)
                if key not in units:
                    units[key] = Unit(format_chunks.chunk_name(name, box[0]), name, dtype, box, box[1], [],
                                      group=int(group))
                    chunks_of.setdefault(name, []).append(units[key])
                unit = units[key]
            unit.holders.append(rank)
    for name, (_, shape) in logical.items():  # a chunk that is the whole tensor keeps the plain name
        parts = chunks_of.get(name, [])
        if len(parts) == 1 and (parts[0].box == (tuple(0 for _ in shape), shape) or format_chunks.volume(shape) == 0):
            parts[0].stored, parts[0].box = name, None
    ordered = _split_replicated(list(units.values()), world, logical)
    chunked: dict[str, tuple[torch.dtype, tuple[int, ...]]] = {}
    for unit in ordered:
        if unit.box is not None:
            chunked.setdefault(unit.logical, logical[unit.logical])
    boxes: dict[str, list[Unit]] = {}
    for unit in ordered:
        if unit.box is not None:
            boxes.setdefault(unit.logical, []).append(unit)
    for name, (_, shape) in chunked.items():
        _check_layouts(name, shape, boxes[name])
    _assign(ordered, world)
    return GlobalPlan(ordered, chunked, _files(ordered, world, max_shard_size))


def _check_layouts(name: str, shape: tuple[int, ...], units: list[Unit]) -> None:
    """The ranks' chunks of ``name`` tile its global ``shape`` exactly once.

    Raises:
        CheckpointError: they overlap or leave a gap: the ranks hold the tensor under different
            layouts (another mesh or placements on some rank), naming each rank's chunks.
    """
    try:
        format_chunks.check_tiling(name, shape, [u.box for u in units if u.box is not None], "in this save")
    except CorruptCheckpointError as e:  # the reader's check, of what this save's ranks hold: no damage
        held: dict[int, list[str]] = {}
        for unit in units:
            assert unit.box is not None
            for rank in unit.holders:
                held.setdefault(rank, []).append(_box_text(unit.box))
        ranks = "; ".join(f"rank {r}: {', '.join(b[:3])}{', ...' if len(b) > 3 else ''}" for r, b in sorted(held.items()))
        raise CheckpointError(
            f"The ranks hold {name!r} (global shape {list(shape)}) under layouts that do not fit together ({ranks}): "
            f"{e} Every rank must hold each DTensor with the same mesh and placements."
        ) from None


def _box_text(box: Box) -> str:
    offsets, sizes = box
    return "[" + ", ".join(f"{o}:{o + n}" for o, n in zip(offsets, sizes)) + "]"


def _split_replicated(units: list[Unit], world: int,
                      logical: dict[str, tuple[torch.dtype, tuple[int, ...]]]) -> list[Unit]:
    """Replicated whole tensors larger than a fair block become row blocks, each a chunk (their
    global shapes are added to ``logical``)."""
    replicated = sum(u.nbytes for u in units if len(u.holders) > 1)
    block = max(MIN_BLOCK_BYTES, -(-replicated // (world * 8)))
    out: list[Unit] = []
    for unit in units:
        if len(unit.holders) < 2 or unit.box is not None or unit.nbytes <= block or len(unit.shape) == 0:
            out.append(unit)
            continue
        rows = unit.shape[0]
        row_bytes = unit.nbytes // max(1, rows)
        step = max(1, block // max(1, row_bytes))
        if step >= rows:
            out.append(unit)
            continue
        logical[unit.logical] = (unit.dtype, unit.shape)
        for start in range(0, rows, step):
            n = min(step, rows - start)
            offsets = (start,) + (0,) * (len(unit.shape) - 1)
            sizes = (n, *unit.shape[1:])
            out.append(Unit(format_chunks.chunk_name(unit.logical, offsets), unit.logical, unit.dtype, (offsets, sizes),
                            sizes, list(unit.holders), group=unit.group))
    return out


def _assign(units: list[Unit], world: int) -> None:
    """Largest first onto the least-loaded holder, after every rank's own (single-holder) bytes."""
    load = [0] * world
    for unit in units:
        if len(unit.holders) == 1:
            unit.owner = unit.holders[0]
            load[unit.owner] += unit.nbytes
    shared = sorted((u for u in units if len(u.holders) > 1), key=lambda u: -u.nbytes)  # stable: plan order
    for unit in shared:
        unit.owner = min(unit.holders, key=lambda r: (load[r], r))
        load[unit.owner] += unit.nbytes


def _files(units: list[Unit], world: int, max_shard_size: int) -> list[list[tuple[str, list[str]]]]:
    owned: list[list[Unit]] = [[] for _ in range(world)]
    for unit in units:  # one pass, in plan order (a pass per rank made this ranks x ranks x tensors)
        owned[unit.owner].append(unit)
    per_rank: list[list[list[str]]] = []
    for rank in range(world):
        mine = [(u.stored, u.nbytes, format_dtypes.itemsize(u.dtype)) for u in owned[rank]]
        groups = {u.stored: u.group for u in owned[rank] if u.group}
        per_rank.append([s.names for s in plan_shards(mine, max_shard_size, groups)] if mine else [])
    if not any(per_rank):
        per_rank[0] = [[]]  # nothing to store: one empty shard, as a single process writes
    total = sum(map(len, per_rank))
    out: list[list[tuple[str, list[str]]]] = []
    number = 1
    for shards in per_rank:
        out.append([])
        for names in shards:
            out[-1].append((spec.shard_name(number, total), names))
            number += 1
    return out


def local_bytes(unit: Unit, local: dict[str, torch.Tensor]) -> torch.Tensor:
    """What this rank writes for ``unit``: its tensor, its DTensor chunk, or a row block (an empty
    tensor's chunk, whatever its box, is the empty whole tensor: :func:`global_plan`)."""
    if unit.stored in local:
        t = local[unit.stored]
        return t if t.numel() or tuple(t.shape) == unit.shape else t.new_empty(unit.shape)
    t = local[unit.logical]
    if unit.box is None or dist_dtensor.is_dtensor(t) or tuple(t.shape) == unit.shape:
        return t
    start, n = unit.box[0][0], unit.box[1][0]
    return t[start : start + n]
