"""Capturing what a save stores: every tensor checked, tied tensors found.

A value that cannot be stored is refused here, with its key, before anything is written; tensors
that are views of one stored tensor (tied weights) are recorded as aliases of it and stored once.
"""

from __future__ import annotations

from collections import OrderedDict
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Any

import torch

from torchckpt import _tensorio
from torchckpt._dist import dtensor as dist_dtensor
from torchckpt._format import dtypes as format_dtypes
from torchckpt._format import keypath, spec
from torchckpt._format import tree as format_tree
from torchckpt._save import plan as save_plan
from torchckpt.errors import CorruptCheckpointError, UnsupportedStateError


def check_tensor(name: str, t: torch.Tensor) -> None:
    reason = _tensorio.unsupported_reason(t)
    if reason is not None:
        advice = "" if torch.nn.parameter.is_lazy(t) else (
            " Materialise it first (for a module built on the meta device: `to_empty(device=...)`, then initialise "
            "or load its weights).") if t.is_meta else (
            " torchckpt saves plain tensors and DTensors (FSDP2, tensor parallel; on several ranks, by a collective "
            "save); convert this one to either first (for FSDP1, switch to FSDP2's fully_shard, or save a full "
            "state dict).")
        raise UnsupportedStateError(f"Cannot save tensor {name!r}: it is {reason}.{advice}", key=name,
                                    value_type=type(t))
    if t.layout != torch.strided or t.is_nested or t.is_quantized:  # (meta: refused above)
        kind, fix = ((f"a {t.layout} tensor", "`.to_dense()`") if t.layout != torch.strided else
                     ("a nested tensor", "`.to_padded_tensor(0)` or `.unbind()`") if t.is_nested else
                     ("a quantized tensor", "`.dequantize()`, or save its `int_repr()`, scale and zero point"))
        raise UnsupportedStateError(
            f"Cannot save tensor {name!r}: it is {kind}, which safetensors cannot store; convert it first "
            f"({fix}).",
            key=name,
            value_type=type(t),
        )
    check_shape(name, t)
    if t.dtype not in format_dtypes.SUPPORTED_DTYPES:
        raise UnsupportedStateError(
            f"Cannot save tensor {name!r}: dtype {t.dtype} is not one torchckpt stores "
            f"(supported: {', '.join(sorted(format_tree.dtype_name(d) for d in format_dtypes.SUPPORTED_DTYPES))}).",
            key=name,
            value_type=type(t),
        )


def check_shape(name: str, t: torch.Tensor) -> None:
    """Refuse a shape the readers refuse (``_format.dtypes.check_shape``), so that no save commits a
    checkpoint they cannot read. Only an empty tensor or an expanded view can have one: memory
    bounds every other."""
    numel = t.numel()
    if numel != 0 and numel <= 2**40:
        return
    try:
        format_dtypes.check_shape(t.shape, "")
    except CorruptCheckpointError:
        raise UnsupportedStateError(
            f"Cannot save tensor {name!r}: its shape {list(t.shape)} is larger than readers accept (the product of "
            "its dimensions, a zero counted as one, times 16 must stay under 2**62), so the checkpoint could never "
            "be read back. Save a tensor of a smaller shape.", key=name, value_type=type(t)) from None


def _alias_key(t: torch.Tensor) -> tuple[Any, ...]:
    """Tensors with equal keys hold the same values: a ``conj()`` or ``_neg_view()`` of a tensor has
    its memory, shape and strides but not its values, hence the two bits."""
    return (t.device, t.data_ptr(), t.dtype, tuple(t.shape), t.stride(), t.is_conj(), t.is_neg())


def prepare_tensors(tensors: dict[str, torch.Tensor]) -> tuple[dict[str, torch.Tensor], dict[str, str]]:
    """Check every tensor can be stored; split off aliases (tensors that are views of a stored one).

    Returns:
        The tensors to store (``tensors`` itself when nothing is an alias), and alias name ->
        stored name.

    Raises:
        UnsupportedStateError: a tensor has a layout or dtype safetensors cannot hold.
    """
    aliases: dict[str, str] = {}
    first_at: dict[int, str] = {}  # address -> first tensor there (the common, cheap case)
    views_at: dict[tuple[Any, ...], str] = {}  # view key -> stored name, only at addresses that repeat
    empty_at: dict[int, str] = {}  # an empty tensor (no address) under two names: one object, by its id
    supported = format_dtypes.SUPPORTED_DTYPES
    strided = torch.strided
    for name, t in tensors.items():
        if (type(t) is not torch.Tensor and (type(t) is not torch.nn.Parameter or getattr(t, "_is_flat_param", False))
                or t.layout is not strided or t.dtype not in supported or t.is_meta or t.is_nested):
            check_tensor(name, t)
        address = t.data_ptr()
        if not address:  # empty: its shape alone could fail the readers' check
            check_shape(name, t)
            if (target := empty_at.setdefault(id(t), name)) is not name:
                aliases[name] = target
            continue
        first = first_at.setdefault(address, name)
        if first is not name and t.nbytes:  # views at one address are aliases only if identical views
            head = tensors[first]
            if head.nbytes:
                views_at.setdefault(_alias_key(head), first)
            key = _alias_key(t)
            target = views_at.setdefault(key, name)
            if target is not name:
                aliases[name] = target
    if not aliases:
        return tensors, aliases
    return {n: t for n, t in tensors.items() if n not in aliases}, aliases


@dataclass
class WriteJob:
    """Everything a write needs, captured at call time: the tensors and the encoded rest, and
    how likely each tensor is to change before the next save (``groups``: name -> group of
    ``_save.plan.plan_shards``, for the tensors that are not ``CHANGING``)."""

    stored: dict[str, torch.Tensor]
    aliases: dict[str, str]
    section: dict[str, Any]
    groups: dict[str, int] = field(default_factory=dict)
    order: list[str] = field(default_factory=list)  # every tensor name, aliases too, in the tree's order


def capture(state: dict[str, Any], objects: dict[str, str], metadata: dict[str, Any] | None,
            localize: Callable[[dict[str, torch.Tensor]], dict[str, torch.Tensor]] | None,
            ordered: bool = False, one_process: bool = True) -> WriteJob:
    """Encode a checkpoint's state (what each tracked object saves, by name) now; refuses
    unsupported values before anything is written.

    With ``localize`` (a synchronous save by one process) every tensor is checked and the aliases
    are split off here; without it the job's ``stored`` holds every tensor and ``aliases`` is
    empty: the asynchronous snapshot, or the exchange of a save by several ranks, does that itself.
    ``ordered``: every tensor keeps its place among its dict's keys (see ``_format.tree.encode``).
    ``one_process``: a single process's save, which stores per-rank values (``PerRank``, however
    deeply nested: in a ``state_dict()`` too) as the values they wrap, and records their key paths
    (``spec.ONE_PROCESS_PER_RANK_KEY``: a restore on another rank reports them missing); else they
    are marked, for the exchange of a save by several ranks.
    """
    tensors: dict[str, torch.Tensor] = {}
    per_rank: list[str] | None = [] if one_process else None
    tree = format_tree.encode(state, "", tensors, ordered, one_process=per_rank)
    section: dict[str, Any] = {"objects": objects, "state": tree}
    if per_rank:
        section[spec.ONE_PROCESS_PER_RANK_KEY] = per_rank
    if metadata:
        section["metadata"] = _encode_metadata(metadata)
    if localize is None:
        return WriteJob(tensors, {}, section, order=list(tensors))
    stored, aliases = prepare_tensors(localize(tensors))
    return WriteJob(stored, aliases, section, order=list(tensors))


Nested = Callable[[Any], "dict[str, Any] | None"]  # a nested Checkpoint's tracked values, else None


def modules_in(value: Any, nested: Nested, key: str = "", depth: int = 0) -> list[tuple[str, torch.nn.Module]]:
    """The modules among tracked values (in nested checkpoints, dicts, lists and tuples too), with
    the key each is matched by on restore (``_load.match``); other leaves cost a check or two each.
    None deeper than a checkpoint stores (a container that holds itself: the encoder refuses it)."""
    if isinstance(value, torch.nn.Module):
        return [(key, value)]
    if depth > format_tree.MAX_DEPTH:
        return []
    if isinstance(value, format_tree.PerRank):
        return modules_in(value.value, nested, key, depth)
    inner = nested(value)
    if inner is not None:
        value = inner
    items: Any = value.items() if isinstance(value, dict) else enumerate(value) if isinstance(value, (list, tuple)) else ()
    return [m for k, v in items if not isinstance(v, torch.Tensor) and (isinstance(v, _HOLDERS) or nested(v) is not None)
            for m in modules_in(v, nested, keypath.join(key, keypath.key_part(k)), depth + 1)]


_HOLDERS = (torch.nn.Module, format_tree.PerRank, dict, list, tuple)  # what may hold a module, besides a Checkpoint


def frozen_groups(tracked: dict[str, Any], nested: Nested) -> dict[int, int]:
    """Where the tensors likely unchanged from save to save are, and their group of
    ``_save.plan.plan_shards``: the frozen parameters (``requires_grad=False``) of every tracked
    module, and the buffers of its submodules that train no parameter of their own (a frozen
    BatchNorm in training mode still updates its running statistics: they get shards of their
    own). Shards of them are reused by an incremental save; a tensor that changes anyway costs
    its shard."""
    found: dict[int, int] = {}
    for _, module in modules_in(tracked, nested):
        for sub in module.modules():
            params = list(sub.parameters(recurse=False))
            frozen = [p for p in params if not p.requires_grad]
            found.update((dist_dtensor.address_of(p), save_plan.FROZEN_PARAMETER) for p in frozen)
            if len(frozen) == len(params):
                found.update((dist_dtensor.address_of(b), save_plan.FROZEN_BUFFER) for b in sub.buffers(recurse=False))
    found.pop(0, None)
    return found


VersionRecord = dict[str, dict[str, "int | None"]]  # state dict's key -> {module prefix: its _version, where not 1}


def module_versions(modules: list[tuple[str, torch.nn.Module]]) -> VersionRecord | None:
    """What ``state_dict()`` records in its ``_metadata`` for each tracked module, by the key it is
    matched by: the ``_version`` of every submodule (by state-dict prefix, ``""`` the module
    itself) that is not 1, ``nn.Module``'s. ``load_state_dict`` hands each loader its version, so
    that a class that migrates older checkpoints by version migrates only those. None: no modules."""
    if not modules:
        return None
    return {key: _not_one({prefix: getattr(m, "_version", 1) for prefix, m in module.named_modules(remove_duplicate=False)})
            for key, module in modules}


def state_dict_versions(value: Any, path: str = "", out: VersionRecord | None = None) -> VersionRecord:
    """The same record for the state dicts in a plain state (``save_state``): every dict that
    carries the ``_metadata`` of ``state_dict()``, by its key."""
    out = {} if out is None else out
    if isinstance(value, dict):
        metadata = vars(value).get("_metadata") if type(value) is OrderedDict else None  # what state_dict() returns
        if isinstance(metadata, dict):
            out[path] = _not_one({p: m.get("version") for p, m in metadata.items() if type(p) is str and isinstance(m, dict)})
        items: Any = value.items()
    elif isinstance(value, (list, tuple)):
        items = enumerate(value)
    else:
        return out
    for k, v in items:
        if isinstance(v, (dict, list, tuple)):
            state_dict_versions(v, keypath.join(path, keypath.key_part(k)), out)
    return out


def _not_one(versions: dict[str, Any]) -> dict[str, int | None]:
    """The versions that differ from 1 and JSON stores exactly (an int of 64 bits, or None)."""
    return {p: v for p, v in versions.items()
            if v != 1 and (v is None or type(v) is int and -2**63 <= v < 2**63)}


def _encode_metadata(metadata: dict[str, Any]) -> Any:
    """``metadata`` as typed JSON. It is JSON only: a tensor (or a NumPy array, which is stored as
    one) would have no shard to live in, and the checkpoint's metadata could not be read back.

    Raises:
        UnsupportedStateError: a tensor or an array in ``metadata``, a ``PerRank``, or a value without a
            JSON form.
    """
    tensors: dict[str, torch.Tensor] = {}
    per_rank: list[str] = []
    tree = format_tree.encode(metadata, "metadata", tensors, one_process=per_rank)
    if per_rank:
        raise UnsupportedStateError(
            f"Cannot save {per_rank[0]!r}: metadata is the checkpoint's, one value for every rank, and holds no "
            "per-rank values (PerRank); store the value itself there, or track the PerRank in the Checkpoint.",
            key=per_rank[0], value_type=format_tree.PerRank)
    if tensors:
        name, t = next(iter(tensors.items()))
        raise UnsupportedStateError(
            f"Cannot save {name!r}: metadata holds JSON values, not tensors or arrays; store t.tolist() or t.item() "
            "there, or track the tensor in the Checkpoint.",
            key=name,
            value_type=type(t),
        )
    return tree
