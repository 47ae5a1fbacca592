"""Executing a restore plan: read every planned tensor, then run the planned loads.

The reads go shard by shard, in file order, straight into their destinations, checking each
tensor's checksum as it arrives (``_load.reads.read_many``; format-2 chunks and DTensor boxes
through ``_load.boxes``). Only then do the loads run (``load_state_dict`` of stateful objects,
assignments, and the ``load_state_dict`` walk of hooked modules, which fetch their tensors here
as their load needs them: views of the mapped shards where they can be, see ``_load.mapped``).
"""

from __future__ import annotations

import contextlib
import functools
from collections.abc import Callable, Iterator
from typing import Any

import torch

from torchckpt._dist import dtensor as dist_dtensor
from torchckpt._format import blocks as format_blocks
from torchckpt._format.dtypes import TensorInfo as SavedTensor
from torchckpt._format.keypath import display
from torchckpt._load import boxes, mapped, recheck, shared
from torchckpt._load import reads as tensor_reads
from torchckpt._load.opened import OpenShards, missing_member
from torchckpt._load.plan import Plan
from torchckpt._paths import name_of
from torchckpt._progress import progress_bar
from torchckpt._storage.base import Source
from torchckpt.errors import (
    PARTLY_RESTORED,
    CheckpointDeletedError,
    CheckpointError,
    CorruptCheckpointError,
    checksum_mismatch,
    unreadable,
)


def execute(plan: Plan, shards: OpenShards, verify: bool, progress: bool | None) -> None:
    """Read every planned tensor (shard by shard, in file order), then run the planned loads."""
    read(plan, shards, verify, progress)
    load(plan, shards, verify)


def read(plan: Plan, shards: OpenShards, verify: bool, progress: bool | None) -> None:
    """Read every planned tensor into its destination, shard by shard, in file order."""
    kept, plan.grouped = plan.grouped, None
    grouped = kept[1] if kept is not None and kept[0] is plan.reads else None
    del kept  # the grouping of another list (reads spread over the ranks since): its buffers go before new ones
    by_file, reads = grouped if grouped is not None else _grouped(plan.reads)
    # Every header this restore relies on is checked before any byte lands in a destination: those of
    # the shards read now, and, where a hooked module fetches its tensors later, all of them.
    _check_headers(shards, None if plan.fetches else [*by_file, *reads.by_file])
    total = sum(saved.nbytes for pairs in by_file.values() for _, saved in pairs) + reads.nbytes
    plan.stage = "reading"
    with progress_bar(total, f"restore {name_of(shards.directory)}", progress) as bar, torch.no_grad():
        _read_grouped(shards, by_file, reads, verify, bar.update)
    boxes.finish(reads)
    mark_written([dest for dest, _ in plan.reads])


_PLAIN_TENSORS = {torch.Tensor, torch.nn.Parameter}


def mark_written(tensors: list[torch.Tensor]) -> None:
    """Tell autograd that ``tensors`` changed in place (their version counters move on, as ``copy_``
    moves them): the reads wrote their memory behind its back, and a graph built before the restore
    would otherwise back-propagate the restored weights through the old activations, where
    ``load_state_dict`` makes ``backward()`` raise. A DTensor's local tensor counts as well."""
    if not tensors:
        return
    touched = tensors
    if not set(map(type, tensors)) <= _PLAIN_TENSORS:  # (one pass in C: 0.4 ms for 20,000 tensors, not 3)
        touched = [*tensors, *(dist_dtensor.local_of(t) for t in tensors if dist_dtensor.is_dtensor(t))]
    try:
        torch.autograd.graph.increment_version(touched)
    except TypeError:  # torch before 2.5 takes one tensor at a time
        for t in touched:
            torch.autograd.graph.increment_version(t)


def load(plan: Plan, shards: OpenShards, verify: bool) -> None:
    """Once every tensor is in place: the casts, then the planned loads."""
    directory = shards.directory
    plan.stage = "loading"
    with torch.no_grad():
        for dest, buffer in plan.casts:
            dest.copy_(buffer)
    # a hooked module's tensors, read as its load needs them (with assign, each saved tensor once: tied weights)
    plan.fetch = functools.partial(_fetch, shards, verify, plan.assigned if plan.assign else None)
    try:
        _run_loads(plan, directory)
    finally:
        plan.fetch = None
    shared.settle_after_loads(plan)  # a later load replaced another object's read: its key is unused


def _run_loads(plan: Plan, directory: str) -> None:
    """Run each object's load. One that refuses the checkpoint's state (an optimizer of another class,
    a ``load_state_dict`` of its own that raises) is the objects' mismatch, not damage: every byte
    was checked before, and an older checkpoint would be refused alike. So it is a plain
    :class:`CheckpointError` naming the object (``.key``) and the checkpoint (``.path``), and a
    manager's ``restore_or_initialize`` neither falls back past the checkpoint nor records it damaged."""
    for key, load in [*plan.loads, *plan.rng_loads]:
        try:
            load()
        except CheckpointError:
            raise
        except (RuntimeError, ValueError, KeyError, TypeError, IndexError, AttributeError, OverflowError,
                RecursionError, AssertionError) as e:  # (torchdata asserts that a loader's options match)
            error = CheckpointError(
                f"Restoring from {directory} failed while {display(key)!r} loaded its state ({type(e).__name__}: "
                f"{e}): the checkpoint's state for it does not fit this object (another class, or other options "
                "than the ones it was saved with). Objects may be partly restored: restore again into objects "
                "like the saved ones, or through a Checkpoint that does not track this one."
            )
            error.key = key  # type: ignore[attr-defined]
            error.path = directory  # type: ignore[attr-defined]
            raise error from e


def _grouped(pairs: list[tuple[torch.Tensor, SavedTensor]]) -> tuple[
        dict[str, list[tuple[torch.Tensor, SavedTensor]]], boxes.BoxedReads]:
    """Reads of whole stored tensors by shard file, and the boxed rest (chunked tensors, DTensors:
    only this rank's overlaps are read)."""
    by_file: dict[str, list[tuple[torch.Tensor, SavedTensor]]] = {}
    boxed: list[tuple[torch.Tensor, Any]] = []
    for pair in pairs:
        if type(pair[1]) is SavedTensor and not dist_dtensor.is_dtensor(pair[0]):
            by_file.setdefault(pair[1].file, []).append(pair)
        else:
            boxed.append(pair)
    return by_file, boxes.plan_boxed(boxed)


def _read_grouped(shards: OpenShards, by_file: dict[str, list[tuple[torch.Tensor, SavedTensor]]],
                  reads: boxes.BoxedReads, verify: bool, on_bytes: Callable[[int], None]) -> None:
    """Read the grouped pairs file by file, in file order, checking each tensor's checksum with ``verify``."""
    started = False  # some tensor bytes landed in their destinations
    for file, pairs in by_file.items():
        pairs.sort(key=_file_offset)
        with _reading(shards, file):  # opened here, where the shards are held open a few at a time
            source = _source(shards, file, started)
            source.prepare(sum(saved.nbytes for _, saved in pairs))
            started = True
            bad = tensor_reads.read_many(source, pairs, verify, on_bytes)
        _check_read(shards, file, bad)
    for file, pieces in reads.by_file.items():
        with _reading(shards, file):
            source = _source(shards, file, started)
            started = True
            mismatch = boxes.read_file(source, pieces, verify, on_bytes, shards.blocks)
        _check_read(shards, file, mismatch)


def _source(shards: OpenShards, file: str, started: bool) -> Source:
    """The shard ``file``, opened again where only a few are held open at a time: when that fails
    once other shards' bytes are in place, the objects may be partly restored, and the error says so."""
    try:
        return shards.sources[file]
    except CheckpointDeletedError as e:
        if not started:
            raise
        raise CheckpointDeletedError(f"{e} The objects may be partly restored until then.", e.path) from e
    except CorruptCheckpointError as e:
        if not started or str(e).endswith(PARTLY_RESTORED):
            raise
        raise CorruptCheckpointError(str(e) + PARTLY_RESTORED, e.path) from e


@contextlib.contextmanager
def _fetch(shards: OpenShards, verify: bool, assigned: dict[tuple[int, torch.dtype], torch.Tensor] | None,
           saved: list[Any], may_view: bool) -> Iterator[list[torch.Tensor]]:
    """A hooked subtree's tensors while its load runs, checked as the planned reads: views of the mapped
    shards where ``may_view`` and they can be (``_load.mapped``), else read now; the maps close after.
    ``assigned`` (``Plan.assigned``, with ``assign``): tensors already made for saved tensors, taken
    again and added to, so that one saved tensor under several keys is one memory."""
    _check_headers(shards, None)  # read() checked them all already, where the plan fetches
    maps = mapped.ShardMaps(shards.sources if may_view else {})
    views: list[torch.Tensor | None] = []
    out: list[torch.Tensor] = []
    try:
        views, bad = maps.views(saved, verify)
        if bad is not None:
            _check_read(shards, *bad)
        made = {} if assigned is None else assigned
        known = {(id(s), s.dtype): t for s in saved if (t := made.get((id(s), s.dtype))) is not None}
        pairs = []
        for s, v in zip(saved, views):
            if v is None and (id(s), s.dtype) not in known:
                known[(id(s), s.dtype)] = t = torch.empty(s.shape, dtype=s.dtype)
                pairs.append((t, s))
        by_file, reads = _grouped(pairs)
        with torch.no_grad():
            _read_grouped(shards, by_file, reads, verify, lambda _: None)
        boxes.finish(reads)
        if assigned is not None:
            assigned.update(known)
        out = [v if v is not None else known[(id(s), s.dtype)] for s, v in zip(saved, views)]
        yield out
    finally:
        views.clear()
        out.clear()  # no view left here: each map closes, unless a hook kept a tensor of it
        maps.close()


def check_headers(plan: Plan, shards: OpenShards) -> None:
    """Check the headers of every shard this plan reads (all of them, where a hooked module fetches
    its tensors as its load runs): a rank of a collective restore does it before any rank reads.
    The reads' grouping by shard, which names those shards, is kept for :func:`read`."""
    if plan.fetches:
        _check_headers(shards, None)
        return
    by_file, reads = _grouped(plan.reads)
    plan.grouped = (plan.reads, (by_file, reads))
    _check_headers(shards, sorted([*by_file, *reads.by_file]))


def _check_headers(shards: OpenShards, files: list[str] | None) -> None:
    """The checks of ``files``' headers (None: every shard's) that opening left for their first read."""
    for file in list(shards.unchecked) if files is None else files:
        with _reading(shards, file):
            shards.check([file])


@contextlib.contextmanager
def _reading(shards: OpenShards, file: str) -> Iterator[None]:
    """Read errors of one shard as the checkpoint errors they mean."""
    path = shards.path(file)
    try:
        yield
    except CorruptCheckpointError as e:
        raise recheck.explain(e, shards.directory, shards.seal, shards.storage)  # noqa: B904 (explain chains it)
    except CheckpointError:  # already what it means (a lazy open's CheckpointReadError is an OSError too)
        raise
    except EOFError as e:
        raise CorruptCheckpointError(f"Shard {path} is truncated: {e}.", path) from e
    except FileNotFoundError:  # an object store has no pin on open files: deleted meanwhile
        error = missing_member(shards.directory, path, shards.storage)
        if isinstance(error, CorruptCheckpointError):
            explained = recheck.explain(error, shards.directory, shards.seal, shards.storage)
            if explained is not error:
                raise explained  # noqa: B904 (it chains the missing shard)
        raise error from None
    except OSError as e:
        raise unreadable(path, e) from e


def _check_read(shards: OpenShards, file: str, bad: tuple[Any, int] | format_blocks.Mismatch | None) -> None:
    if bad is None:
        return
    path = shards.path(file)
    if isinstance(bad, format_blocks.Mismatch):  # a block, or a whole tensor, of a boxed read
        message = bad.message(path)
    else:
        saved, digest = bad
        message = checksum_mismatch(saved.name, path, saved.checksum, digest)
    raise recheck.explain(CorruptCheckpointError(message + PARTLY_RESTORED, path), shards.directory, shards.seal,
                          shards.storage)


def _file_offset(read: tuple[torch.Tensor, SavedTensor]) -> int:
    return read[1].start
