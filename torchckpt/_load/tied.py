"""Tied weights fed two different saved values: which one a restore keeps, as ``load_state_dict`` does.

A model whose ``head.weight`` is its ``emb.weight`` (one tensor under two state-dict keys), restored
from a checkpoint of an untied model, gets two saved values for one tensor. ``load_state_dict``
copies them in the model's order, so the key it reaches last wins. A restore that reads in place
does not run in that order (reads go in file order, on several threads), so it decides here, before
any read: the read of every key that a later key of the same tensor overwrites is dropped, and the
key is reported unexpected (in the checkpoint, not used), since its value is not what the tensor
holds. Two keys whose saved values are one stored tensor (a checkpoint of a tied model: an alias) or
have equal checksums agree, and both are restored. A module restored through its own loaders
(``_load.hooked``) has its tied tensors filled by torch's loader in the walk, in torch's order.
"""

from __future__ import annotations

from typing import Any, NamedTuple

import torch

from torchckpt._dist import dtensor as dist_dtensor
from torchckpt._format.chunks import ChunkedInfo
from torchckpt._format.dtypes import TensorInfo


class Fed(NamedTuple):
    """One in-place read into a module's tensor: its state-dict key, its checkpoint key, the saved
    tensor, and the destination."""

    object_key: str
    key: str
    saved: Any
    dest: torch.Tensor


def view_of(t: torch.Tensor) -> tuple[Any, ...] | None:
    """What makes two tensors one: the same bytes of memory, whatever shape and strides they are
    seen with (a state-dict hook that hands out a weight transposed: its loader writes the
    parameter's bytes); a DTensor's, its local shard's with its placements (None: no memory yet,
    as a lazy module's parameter before its first forward pass, or a tensor on the meta device).
    Not the tensor object: a module with a state-dict hook hands out a new detached one for each
    key. A DTensor whose local part is empty on this rank (FSDP2's last rows) is still told by
    where that part sits in its padded memory, so that every rank settles a tensor two objects
    share alike; without such memory, None."""
    if torch.nn.parameter.is_lazy(t) or t.is_meta:
        return None
    placements: Any = None
    if dist_dtensor.is_dtensor(t):
        placements = tuple(getattr(t, "placements", ()))
        t = dist_dtensor.local_of(t)
    if not t.numel():
        if placements is None or not _storage_bytes(t):
            return None
        return t.untyped_storage().data_ptr(), t.storage_offset(), t.dtype, tuple(t.shape), t.stride(), placements
    return t.data_ptr(), _span(t), placements


def _span(t: torch.Tensor) -> tuple[tuple[int, int], ...]:
    """The bytes a tensor covers from its first one, as (stride, count) steps in bytes, outermost
    first: the same for every shape, order of dimensions and element type over those bytes (a
    weight and its transpose, a flat view of it, a complex tensor and its real view), and other
    for another part of the memory."""
    size = t.element_size()
    if t.is_contiguous():  # the common case, one step: what the loop below gives it
        count = t.numel() * size
        return ((1, count),) if count > 1 else ()
    dims = [(st * size, n) for st, n in zip(t.stride(), t.shape) if n != 1] + ([(1, size)] if size != 1 else [])
    steps: list[tuple[int, int]] = []
    for stride, size in sorted(dims, reverse=True):
        if steps and steps[-1][0] == stride * size:  # contiguous with the step outside it: one longer step
            steps[-1] = (stride, steps[-1][1] * size)
        else:
            steps.append((stride, size))
    return tuple(steps)


def _storage_bytes(t: torch.Tensor) -> int:
    return int(t.untyped_storage().nbytes())


def address_of(t: torch.Tensor) -> int:
    """Where two tensors fed by a restore may be one (``view_of`` decides): the storage of a
    tensor's memory, a DTensor's local part's (padded memory, where that part is empty); 0 where this
    rank holds none of it (or none yet: a lazy module's parameter before its first forward pass)."""
    if torch.nn.parameter.is_lazy(t):
        return 0
    if not dist_dtensor.is_dtensor(t):
        return dist_dtensor.local_storage(t) if t.numel() else 0
    local = dist_dtensor.local_of(t)
    return dist_dtensor.local_storage(t) if local.numel() or _storage_bytes(local) else 0  # as view_of tells it


def repeated_views(tensors: Any) -> set[tuple[Any, ...]]:
    """The views (:func:`view_of`) that more than one of ``tensors`` (a state dict's values) has."""
    seen: set[tuple[Any, ...]] = set()
    repeated: set[tuple[Any, ...]] = set()
    for t in tensors:
        view = view_of(t) if isinstance(t, torch.Tensor) else None
        if view is not None:
            (repeated if view in seen else seen).add(view)
    return repeated


def overwritten(fed: list[Fed], order: list[str]) -> list[Fed]:
    """The reads of ``fed`` (reads into storages read into more than once) whose value a later key
    of the same tensor replaces, by the module's state-dict ``order``; tensors that only share a
    storage (parameters in one flat buffer) are not one tensor and keep their reads."""
    groups: dict[tuple[Any, ...] | None, dict[str, Fed]] = {}
    for read in fed:
        groups.setdefault(view_of(read.dest), {})[read.object_key] = read
    tied = [group for view, group in groups.items() if view is not None and len(group) > 1]
    if not tied:
        return []
    position = {k: i for i, k in enumerate(order)}
    out: list[Fed] = []
    for group in tied:
        ranked = sorted(group.values(), key=lambda read: position[read.object_key])
        out.extend(read for read in ranked[:-1] if not same_values(read.saved, ranked[-1].saved))
    return out


def overwritten_across(reads: list[tuple[int, Fed]]) -> list[Fed]:
    """The reads, each by the tracked object it belongs to (an index, in planning order), of a
    tensor other objects read into too, whose value the read of the object planned last
    replaces (one with an equal value keeps its read)."""
    groups: dict[tuple[Any, ...], list[tuple[int, Fed]]] = {}
    for owner, read in reads:
        view = view_of(read.dest)
        if view is not None:
            groups.setdefault(view, []).append((owner, read))
    out: list[Fed] = []
    for group in groups.values():
        last_owner, last = group[-1]
        out.extend(read for owner, read in group if owner != last_owner and not same_values(read.saved, last.saved))
    return out


def same_values(a: Any, b: Any) -> bool:
    """Whether two saved tensors hold the same bytes, from the index alone: one stored tensor, or
    equal checksums over as many bytes (of any shape and dtype: a complex tensor and its real view
    are one memory)."""
    if a is b or a == b:
        return True
    if isinstance(a, TensorInfo) and isinstance(b, TensorInfo):  # the same bytes: one memory seen as two types
        return ((a.file, a.start) == (b.file, b.start)
                or a.checksum is not None and a.checksum == b.checksum and a.nbytes == b.nbytes)
    if isinstance(a, ChunkedInfo) and isinstance(b, ChunkedInfo):  # saved by several ranks: chunk by chunk
        return (a.shape, a.dtype) == (b.shape, b.dtype) and len(a.pieces) == len(b.pieces) and all(
            box_a == box_b and same_values(x, y) for (box_a, x), (box_b, y) in zip(a.pieces, b.pieces))
    return False
