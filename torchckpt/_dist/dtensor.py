"""DTensors: which box of the global tensor this rank holds, and destinations laid out like them.

A save by several ranks stores each DTensor's local chunk under its global box (format 2,
``_format/chunks``); a restore reads into whatever box each destination holds. Both ask the same
questions of a DTensor, answered here without importing ``torch.distributed`` until a DTensor is
actually met: most processes never use it, and plain tensors are told apart in one check.
"""

from __future__ import annotations

import functools
from collections.abc import Iterator
from typing import Any

import torch

from torchckpt._format.chunks import Box, ChunkedInfo
from torchckpt._format.dtypes import TensorInfo
from torchckpt.errors import UnsupportedStateError

_PLAIN_TYPES = (torch.Tensor, torch.nn.Parameter)


def is_dtensor(t: Any) -> bool:
    """Whether ``t`` is a ``torch.distributed.tensor.DTensor`` (without importing it: most
    processes never use torch.distributed, and plain tensors are told apart in one check)."""
    kind = type(t)
    return kind not in _PLAIN_TYPES and kind.__name__ == "DTensor" and hasattr(t, "placements")


def local_of(t: Any) -> torch.Tensor:
    """A DTensor's local tensor, without the autograd function ``to_local()`` runs (about 50 us a
    call: thousands of them add up to a visible part of a restore)."""
    local = getattr(t, "_local_tensor", None)
    return local if isinstance(local, torch.Tensor) else t.to_local()


_STATE_DICT, _SAVE_TO_STATE_DICT = torch.nn.Module.state_dict, torch.nn.Module._save_to_state_dict


def module_state(module: torch.nn.Module) -> dict[str, Any]:
    """``module.state_dict()`` (its ``_metadata`` included), without ``DTensor.detach()``: about 7 us
    a parameter through DTensor's dispatch, most of a 1,000-parameter FSDP2 model's ``state_dict()``.
    Taken with ``keep_vars=True``, then every plain tensor that is a ``Parameter`` or requires grad is
    detached (under a microsecond) as ``state_dict()`` detaches it; a DTensor is kept as it is, its
    local tensor (all that is read or written) never requiring grad, and so is a lazy module's
    uninitialised parameter, as its own ``_save_to_state_dict`` keeps it.

    Only where nothing but torch's own code sees the live parameters: a ``state_dict`` or a
    ``_save_to_state_dict`` of any module's class in the tree, or a state-dict hook anywhere, may
    expect what ``state_dict()`` hands it (no ``keep_vars`` argument; tensors without grad, on
    which ``.numpy()`` works), so such a module is asked ``state_dict()`` as it is."""
    if any(m._state_dict_hooks or m._state_dict_pre_hooks or type(m).state_dict is not _STATE_DICT
           or type(m)._save_to_state_dict is not _SAVE_TO_STATE_DICT for m in module.modules()):
        return module.state_dict()
    state = module.state_dict(keep_vars=True)
    for key, value in state.items():
        if isinstance(value, torch.Tensor) and (value.requires_grad or type(value) is torch.nn.Parameter) \
                and not is_dtensor(value) and not torch.nn.parameter.is_lazy(value):
            state[key] = value.detach()
    return state


def address_of(t: Any) -> int:
    """Where a tensor's bytes are (a DTensor's: its local tensor's); 0 for none. A module's
    ``state_dict()`` holds new tensors over its parameters' memory: the address finds them."""
    if is_dtensor(t):
        t = local_of(t)
    return int(t.data_ptr()) if isinstance(t, torch.Tensor) and not t.is_meta else 0


def dtensor_box(t: Any, key: str) -> Box | None:
    """The global box of this rank's local chunk of DTensor ``t``, or None when this rank is
    outside its mesh. Partial placements (a pending reduction) are refused, and so are strided
    shards whose local chunk is not one box of the global tensor."""
    spec = _spec_of(t)
    box = _spec_box(spec) if spec is not None else _box(t.shape, t.device_mesh, tuple(t.placements))
    if box is _PARTIAL:
        raise UnsupportedStateError(
            f"Cannot checkpoint {key!r}: it is a DTensor with a Partial placement ({t.placements}), a value "
            "whose reduction is still pending. Redistribute it to Shard or Replicate placements first.",
            key=key,
            value_type=type(t),
        )
    if box is _SPREAD:
        raise UnsupportedStateError(
            f"Cannot checkpoint {key!r}: it is a DTensor whose placements ({t.placements}) give this rank rows that "
            "are not one block of the global tensor (a _StridedShard whose pieces no later Shard keeps together), "
            "which a checkpoint can neither store as one chunk nor read into. Redistribute it to Shard or Replicate "
            "placements first (FSDP2 over tensor parallelism gives blocks, and is supported).",
            key=key,
            value_type=type(t),
        )
    return box


def check_local_shape(t: Any, local: torch.Tensor, box: Box, key: str) -> None:
    """Refuse a DTensor whose local tensor is not the chunk ``box`` its layout gives this rank:
    ``from_local(run_check=False)`` trusts what it is given (an empty chunk may have any empty
    shape: FSDP2 gives ``[0, 0]`` where the layout says ``[1, 0]``)."""
    if tuple(local.shape) != box[1] and (local.numel() or 0 not in box[1]):
        raise UnsupportedStateError(
            f"Cannot save {key!r}: this rank's local tensor has shape {list(local.shape)}, but its DTensor's "
            f"layout (global shape {list(t.shape)}, placements {tuple(t.placements)}) gives this rank "
            f"{list(box[1])}. A DTensor made with DTensor.from_local(..., run_check=False) must hold the chunk "
            "torch's sharding gives each rank; build it with distribute_tensor, or save its full_tensor().",
            key=key, value_type=type(t))


_PARTIAL: Box = ((-1,), (-1,))  # what _box answers for a Partial placement (no chunk has a negative size)
_SPREAD: Box = ((-2,), (-2,))  # and for a strided shard whose local rows are not one block


def _spec_of(t: Any) -> Any:
    """A DTensor's ``DTensorSpec`` (its global shape, mesh and placements, with a cached hash), or None."""
    spec: Any = getattr(t, "_spec", None)
    return spec if type(spec).__name__ == "DTensorSpec" and spec.tensor_meta is not None else None


@functools.lru_cache(maxsize=4096)
def _spec_box(spec: Any) -> Box | None:
    """``_box`` of a DTensor's spec (shape, mesh, placements): the spec caches its own hash, where the
    key of ``_box`` hashes the mesh and each placement again at every call (about 0.8 us; a restore of
    an FSDP2 model and its optimizer asks twice per tensor). Equal specs have equal boxes."""
    return _box(tuple(spec.shape), spec.mesh, tuple(spec.placements))


@functools.lru_cache(maxsize=4096)  # a model repeats a few (shape, mesh, placements): 100 us each otherwise
def _box(shape: tuple[int, ...], mesh: Any, placements: tuple[Any, ...]) -> Box | None:
    if any(p.is_partial() for p in placements):
        return _PARTIAL
    if mesh.get_coordinate() is None:
        return None
    from torch.distributed.tensor._utils import compute_local_shape_and_global_offset

    sizes, offsets = compute_local_shape_and_global_offset(shape, mesh, placements)
    box = tuple(int(o) for o in offsets), tuple(int(s) for s in sizes)
    if any(type(p).__name__ == "_StridedShard" for p in placements) and not _is_one_block(shape, mesh, placements, box):
        return _SPREAD
    return box


def _is_one_block(shape: tuple[int, ...], mesh: Any, placements: tuple[Any, ...], box: Box) -> bool:
    """Whether this rank's local chunk, under placements that include a ``_StridedShard``, is the
    box torch's ``compute_local_shape_and_global_offset`` gives (it gives only the first offset of
    rows that a strided shard spreads out). Each sharded dimension's global indices are split as
    ``distribute_tensor`` splits the tensor, one mesh dimension after another."""
    coordinate = mesh.get_coordinate()
    ndim = max(1, len(shape))
    for dim in {p.dim % ndim for p in placements if hasattr(p, "dim") and hasattr(p, "_split_tensor")}:
        # the indices along ``dim``, in a tensor of the DTensor's rank (size 1 elsewhere): the
        # placements split it along their own dimension, as they split the DTensor
        held = torch.arange(shape[dim]).reshape([shape[dim] if d == dim else 1 for d in range(ndim)])
        for mesh_dim, p in enumerate(placements):
            if hasattr(p, "_split_tensor") and hasattr(p, "dim") and p.dim % ndim == dim:
                chunks, _ = p._split_tensor(held, mesh.size(mesh_dim), with_padding=False, contiguous=True)
                held = chunks[coordinate[mesh_dim]] if coordinate[mesh_dim] < len(chunks) else held[:0]
        held = held.reshape(-1)
        offset, size = box[0][dim], box[1][dim]
        if held.numel() != size or (size and not torch.equal(held, torch.arange(offset, offset + size))):
            return False
    return True


Layout = tuple[tuple[int, ...], tuple[str, ...], tuple[int, ...]]  # mesh shape, placements, this rank's coordinate


def mesh_layout(t: Any) -> Layout | None:
    """(mesh shape, placements by name, this rank's mesh coordinate) of a DTensor: ``"R"`` for
    ``Replicate``, ``"S<dim>"`` for ``Shard``, ``"S<dim>/<split factor>"`` for the ``_StridedShard``
    of FSDP2 over tensor parallelism. Every rank's chunk follows from these and the global shape
    (:func:`chunk_count`), so a save can plan without learning other ranks' chunks (see
    ``_save.layouts``). None for a rank outside the mesh and for placements of other kinds."""
    spec = _spec_of(t)
    return _spec_layout(spec) if spec is not None else _layout(t.device_mesh, tuple(t.placements), t.ndim)


@functools.lru_cache(maxsize=4096)
def _spec_layout(spec: Any) -> Layout | None:
    """``_layout`` of a DTensor's spec, looked up by the spec's cached hash (see ``_spec_box``)."""
    return _layout(spec.mesh, tuple(spec.placements), len(spec.shape))


@functools.lru_cache(maxsize=4096)
def _layout(mesh: Any, placements: tuple[Any, ...], ndim: int) -> Layout | None:
    coordinate = mesh.get_coordinate()
    if coordinate is None:
        return None
    names: list[str] = []
    for p in placements:
        kind = type(p).__name__
        if p.is_replicate():
            names.append("R")
        elif kind == "Shard":
            names.append(f"S{p.dim % max(1, ndim)}")
        elif kind == "_StridedShard":
            names.append(f"S{p.dim % max(1, ndim)}/{int(p.split_factor)}")
        else:
            return None
    return tuple(int(n) for n in mesh.shape), tuple(names), tuple(int(c) for c in coordinate)


@functools.lru_cache(maxsize=1024)
def chunk_count(shape: tuple[int, ...], mesh: tuple[int, ...], placements: tuple[str, ...]) -> int:
    """How many non-empty chunks the placements (named as :func:`mesh_layout` names them) cut a
    tensor of ``shape`` into, over a mesh of that shape: along each sharded dimension, its indices
    split by each placement in mesh order (:func:`_splits`), and the non-empty pieces counted; the
    dimensions are sharded by different mesh dimensions, so the counts multiply. One count is all
    ranks' view of the layout, whatever chunk each holds."""
    count = 1
    for dim in range(len(shape)):
        pieces = [_indices(shape, dim)]
        for _, size, placement in _splits(dim, mesh, placements):
            pieces = [part for piece in pieces
                      for part in placement._split_tensor(piece, size, with_padding=False, contiguous=True)[0]]
        count *= sum(1 for piece in pieces if piece.numel())
    return count


def box_at(shape: tuple[int, ...], mesh: tuple[int, ...], placements: tuple[str, ...],
           coordinate: tuple[int, ...]) -> Box:
    """The chunk that ``distribute_tensor`` gives the rank at ``coordinate`` (placements named as
    :func:`mesh_layout` names them), where it is one block of the tensor; for a simulated job
    (``benchmarks/bench_planner.py``)."""
    offsets, sizes = [], []
    for dim in range(len(shape)):
        held = _indices(shape, dim)
        for mesh_dim, size, placement in _splits(dim, mesh, placements):
            parts = placement._split_tensor(held, size, with_padding=False, contiguous=True)[0]
            held = parts[coordinate[mesh_dim]] if coordinate[mesh_dim] < len(parts) else held[:0]
        held = held.reshape(-1)
        offsets.append(int(held[0]) if held.numel() else 0)
        sizes.append(int(held.numel()))
    return tuple(offsets), tuple(sizes)


def _indices(shape: tuple[int, ...], dim: int) -> torch.Tensor:
    """The indices along ``dim``, in a tensor of the DTensor's rank (size 1 along the others)."""
    return torch.arange(shape[dim]).reshape([shape[dim] if d == dim else 1 for d in range(len(shape))])


def _splits(dim: int, mesh: tuple[int, ...], placements: tuple[str, ...]) -> Iterator[tuple[int, int, Any]]:
    """(mesh dimension, its size, torch placement) of each placement that shards ``dim``, in mesh
    order: torch's own ``Shard`` and ``_StridedShard`` split the indices as they split the tensor."""
    from torch.distributed.tensor.placement_types import Shard, _StridedShard

    for mesh_dim, (size, name) in enumerate(zip(mesh, placements)):
        at, _, factor = name[1:].partition("/")
        if name != "R" and int(at) == dim:
            yield mesh_dim, size, _StridedShard(dim, split_factor=int(factor)) if factor else Shard(dim)


def localize(tensors: dict[str, Any]) -> dict[str, torch.Tensor]:
    """For a single process's save: each DTensor that this process holds whole (a mesh of one)
    becomes its local tensor; one sharded over several ranks is refused."""
    out = tensors
    for name, t in tensors.items():
        if is_dtensor(t):
            if out is tensors:
                out = dict(tensors)
            box = dtensor_box(t, name)
            if box is None or box[1] != tuple(t.shape):
                raise UnsupportedStateError(
                    f"Cannot save {name!r} from one process: it is a DTensor sharded over {t.device_mesh.size()} "
                    "ranks. Call write/save on every rank of the process group (a collective save).",
                    key=name,
                    value_type=type(t),
                )
            out[name] = local_of(t)
    return out


# -- restore destinations --------------------------------------------------------------------


def destination_box(dest: torch.Tensor, key: str) -> tuple[torch.Tensor, Box] | None:
    """(local tensor, its global box) of a destination; None when this rank holds none of it."""
    if is_dtensor(dest):
        box = dtensor_box(dest, key)
        return None if box is None else (local_of(dest), box)
    return dest, (tuple(0 for _ in dest.shape), tuple(dest.shape))


def local_storage(t: torch.Tensor) -> int:
    """The address of the memory a (possibly distributed) tensor's local data lives in."""
    local = local_of(t) if is_dtensor(t) else t
    return int(local.untyped_storage().data_ptr())


def empty_like(t: Any, dtype: torch.dtype) -> torch.Tensor:
    """A new DTensor laid out as the DTensor ``t`` (its mesh, placements, global shape), of ``dtype``,
    its local part uninitialized: what a restore reads this rank's part of a saved tensor into."""
    from torch.distributed.tensor import DTensor

    template = local_of(t)
    local = torch.empty(template.shape, dtype=dtype, device=template.device)
    return DTensor.from_local(local, t.device_mesh, t.placements, shape=t.shape, stride=t.stride(), run_check=False)


def part_of(whole: torch.Tensor, like: Any, key: str) -> torch.Tensor:
    """A new DTensor laid out as the DTensor ``like``, its local part this rank's slice of the plain
    tensor ``whole`` (of ``like``'s global shape; its dtype kept): what torch's loader of a DTensor
    parameter copies from, with no communication."""
    out = empty_like(like, whole.dtype)
    found = destination_box(out, key)
    if found is not None and found[0].numel():
        local, (offsets, sizes) = found
        local.copy_(whole[tuple(slice(o, o + n) for o, n in zip(offsets, sizes))])
    return out


class LayoutTemplates:
    """The optimizer's parameters, in the order its state dict numbers them, where state made for
    them must have their layout (:meth:`destination`), else None: a DTensor, or a plain tensor that
    is not contiguous (``channels_last``, a transposed view), whose state ``torch.zeros_like(p)``
    makes of its strides when the optimizer steps. Fused optimizers read a parameter, its gradient
    and its state as flat buffers of one layout: a contiguous ``exp_avg`` of a ``channels_last``
    weight would pair each element with another's moments. One pass over the parameters, not one
    per state tensor; what a DTensor parameter's state needs (its local box, device and spec) is
    worked out once per parameter, not once per state tensor (Adam has two of each)."""

    def __init__(self, optimizer: torch.optim.Optimizer) -> None:
        self._params: list[torch.Tensor | None] = [
            p if is_dtensor(p) or not p.is_contiguous() else None
            for group in optimizer.param_groups for p in group["params"]]
        self._local: dict[int, tuple[tuple[int, ...], torch.device, Any]] = {}

    def destination(self, key: str, prefix: str, saved: TensorInfo | ChunkedInfo) -> torch.Tensor | None:
        """For optimizer state the optimizer does not have yet (it never stepped): a tensor laid
        out like its parameter, where it has the parameter's shape. For a DTensor parameter, a
        DTensor, so that each rank reads only its part. For a plain one that is not contiguous, a
        CPU tensor of its strides. None for other plain parameters (a contiguous tensor is
        allocated, as in a single process)."""
        parts = key[len(prefix) + 1:].split("/")
        if len(parts) != 3 or parts[0] != "state" or not parts[1].isdigit():
            return None
        index = int(parts[1])
        p: Any = self._params[index] if index < len(self._params) else None
        if p is None or tuple(p.shape) != tuple(saved.shape):
            return None
        if not is_dtensor(p):
            return torch.empty_like(p, dtype=saved.dtype, device="cpu")
        from torch.distributed.tensor import DTensor

        local_shape, device, spec = self._local.get(index) or self._local_of(index, p, key)
        local = torch.empty(local_shape, dtype=saved.dtype, device=device)
        if spec is not None and saved.dtype == p.dtype:  # the parameter's own layout: no checks, no autograd
            return DTensor(local, spec, requires_grad=False)  # type: ignore[no-untyped-call]
        return DTensor.from_local(local, p.device_mesh, p.placements, shape=p.shape, stride=p.stride(),
                                  run_check=False)

    def _local_of(self, index: int, p: Any, key: str) -> tuple[tuple[int, ...], torch.device, Any]:
        box = dtensor_box(p, key)
        template = local_of(p)
        found = self._local[index] = (box[1] if box is not None else tuple(template.shape), template.device,
                                      getattr(p, "_spec", None))
        return found
