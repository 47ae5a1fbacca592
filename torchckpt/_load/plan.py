"""The load path after the index is open: plan the restore, then execute it.

Planning matches every value of the checkpoint against a destination (modules' tensors in
place, plain values by assignment; a module with load_state_dict hooks or its own loader through
torch's semantics, see ``_load.hooked``; stateful objects through ``load_state_dict``, see
``_load.stateful``) and records every mismatch in a :class:`~torchckpt.MismatchReport`, before
anything changes. Executing reads the planned tensors and runs the planned loads (``_load.execute``).
"""

from __future__ import annotations

import collections
import functools
import inspect
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Any

import torch

from torchckpt._dist import dtensor as dist_dtensor
from torchckpt._format import keypath
from torchckpt._format.chunks import ChunkedInfo
from torchckpt._format.dtypes import TensorInfo as SavedTensor  # where a saved tensor is: dtype, shape, checksum
from torchckpt._load import hooked, module_keys, tied
from torchckpt._load.compat import casts_to, compatible
from torchckpt._load.destinations import check_destination
from torchckpt._load.report import MismatchReport
from torchckpt.errors import (
    UnsupportedStateError,
)

# -- planning ----------------------------------------------------------------------------------


@dataclass
class Plan:
    """What a restore will do, computed before anything is mutated."""

    report: MismatchReport = field(default_factory=MismatchReport)
    reads: list[tuple[torch.Tensor, SavedTensor]] = field(default_factory=list)
    casts: list[tuple[torch.Tensor, torch.Tensor]] = field(default_factory=list)  # (destination, read buffer)
    loads: list[tuple[str, Callable[[], None]]] = field(default_factory=list)  # (key of the object, its load)
    # Random generators' states, set after every other load: restoring a loader may draw from them (torchdata
    # fast-forwards a dataset without state by iterating it), and its draws must not move them past the saved state
    rng_loads: list[tuple[str, Callable[[], None]]] = field(default_factory=list)
    cast: bool = False  # restore(..., cast=True): dtype mismatches are cast instead of skipped
    assign: bool = False  # restore(..., assign=True): meta tensors (modules', tracked ones) are replaced by restored ones
    read_once: bool | None = None  # several ranks: replicated tensors read by one rank and broadcast (``_load.spread``)
    rank: int = 0  # the rank restoring (which per-rank values it takes)
    world: int = 1  # the restoring job's ranks (per-rank values of ranks beyond are unused, reported)
    saved_world: int = 1  # the saving job's ranks: a rank beyond has no per-rank value (a single process's, too)
    fetch: hooked.Fetch | None = None  # while the loads run: a hooked subtree's tensors, checked as the others
    fetches: bool = False  # a hooked module's load will fetch tensors (so every shard header is checked before reads)
    versions: dict[str, dict[str, int | None]] | None = None  # saved ``_version``s (``Index.module_versions``)
    # With ``assign``: the new tensor of each saved tensor (by its id and the dtype made), so that the keys of
    # one saved tensor (tied weights) are assigned one memory, as from ``torch.load`` (``fresh_for``)
    assigned: dict[tuple[int, torch.dtype], torch.Tensor] = field(default_factory=dict)
    in_place: list[str] = field(default_factory=list)  # keys (the objects') read straight into their own tensors
    # Each tracked module's in-place reads, (storage, saved key), by its key, with how to describe one (``tied.Fed``):
    # a tensor two tracked objects share is fed by both (``_load.shared``)
    fed: list[tuple[str, list[tuple[int, str]], Callable[[str], tied.Fed]]] = field(default_factory=list)
    # A hooked module's in-place reads (in ``fed``), by checkpoint key: how to take one back from what its load
    # will report restored, where a later object's read replaces it (``_load.shared``)
    unreported: dict[str, Callable[[], object]] = field(default_factory=dict)
    # Each module whose load runs after every read (load hooks, a loader of its own), with the tensors it fills
    # (``tied.Fed``): what it loads replaces another object's read into them (``_load.shared.settle_after_loads``)
    late_fills: list[tuple[torch.nn.Module, list[tied.Fed]]] = field(default_factory=list)
    late_shares: list[tuple[torch.nn.Module, tied.Fed, list[tied.Fed]]] = field(default_factory=list)
    # Each such module's key, with the checkpoint keys its load will report restored if nothing else takes them
    # (one module tracked under two names: the name taken back reports them unexpected, ``_load.match``)
    reports_late: dict[str, Callable[[], list[str]]] = field(default_factory=dict)
    replaced: list[str] = field(default_factory=list)  # key prefixes a load replaces whole (an optimizer's state)
    stage: str = "planned"  # then "reading" as bytes reach destinations, "loading" as the loads run
    # ``restore_or_initialize``: what candidates found damaged before this one may have written, ``{key: name}``
    # (one dict for every candidate: a failed restore adds its own, ``_load.resume.note_failed``)
    earlier_writes: dict[str, str] = field(default_factory=dict)
    # ``reads`` grouped by shard when their headers were checked (``_load.execute.check_headers``), with
    # the list they were grouped from: the reads use them while ``reads`` is still that list
    grouped: tuple[list[Any], Any] | None = None

    def fresh_for(self, saved: SavedTensor, dtype: torch.dtype) -> torch.Tensor:
        """The tensor a meta destination is assigned for ``saved`` (read once, however many keys it has)."""
        fresh = self.assigned.get((id(saved), dtype))
        if fresh is None:
            fresh = self.assigned[(id(saved), dtype)] = torch.empty(saved.shape, dtype=dtype)
            _read_into(fresh, saved, self)
        return fresh

    def versions_of(self, name: str, wrapping: tuple[bool, bool] = (False, False)) -> hooked.Versions | None:
        """The saved ``_version``s of the module matched as ``name`` and its submodules, where not 1,
        for ``_load.hooked``; None where the checkpoint recorded none for it. ``wrapping``: whether
        the checkpoint's keys, and the module's, are a DDP wrapper's (``module_keys.wrappers``)."""
        found = None if self.versions is None else self.versions.get(name)
        if found is None:
            return None
        return hooked.Versions({module_keys.prefix_unwrapped(p, wrapping[0]): v for p, v in found.items()}, wrapping[1])


SAVED = (SavedTensor, ChunkedInfo)  # what a tensor of the checkpoint resolves to: stored whole, or as chunks


def is_saved(value: Any) -> bool:
    return isinstance(value, SAVED)


def _read_into(dest: torch.Tensor, saved: SavedTensor, plan: Plan, key: str | None = None) -> None:
    """Schedule the read of ``saved`` into ``dest``, through a buffer of the saved dtype when it is cast.
    ``key``: where ``dest`` is an object's own tensor, its key (``Plan.in_place``)."""
    if saved.dtype == dest.dtype or dist_dtensor.is_dtensor(dest) or isinstance(saved, ChunkedInfo):
        plan.reads.append((dest, saved))
        if key is not None:
            plan.in_place.append(key)
        return
    if dest.is_inference() and not torch.is_inference_mode_enabled():  # cast by a torch copy, refused then
        raise UnsupportedStateError(
            f"Cannot restore checkpoint tensor {saved.name!r} with a cast: its destination is an inference tensor (made "
            "under torch.inference_mode()), which torch lets no one write in place outside that mode. Restore under "
            "torch.inference_mode(), or build the model outside it.",
            key=saved.name,
            value_type=type(dest),
        )
    buffer = torch.empty(saved.shape, dtype=saved.dtype)
    plan.reads.append((buffer, saved))
    plan.casts.append((dest, buffer))


def plan_tensor(key: str, dest: torch.Tensor, saved: Any, plan: Plan,
                assign: Callable[[torch.Tensor], None] | None = None) -> None:
    """A tracked tensor is restored in place; one on the meta device has no memory to restore into,
    and is replaced by a new tensor through ``assign`` (where it sits) when ``plan.assign`` allows.

    Raises:
        UnsupportedStateError: ``dest`` is a lazy module's uninitialized parameter, tracked on its own,
            and the checkpoint has a tensor for it.
    """
    check_destination(key, dest)
    if saved is _MISSING:
        plan.report.missing_keys.append(key)
    elif torch.nn.parameter.is_lazy(dest) and is_saved(saved):  # its module's load hook makes it; alone, nothing
        raise UnsupportedStateError(
            f"Cannot restore into {key!r} on its own: it is a lazy module's uninitialized parameter, which has no "
            "shape or memory yet. Track only its module (its load hook makes the parameter from the saved tensor), "
            "or run a forward pass before restoring.", key=key, value_type=type(dest))
    elif not is_saved(saved):
        plan.report.missing_keys.append(key)
        plan.report.unexpected_keys.extend(_saved_leaf_keys(saved, key))
    elif dest.is_meta:
        plan.report.meta_keys.append(key)
        if plan.assign and assign is not None and compatible(key, saved, dest, plan.report, plan.cast):
            fresh = plan.fresh_for(saved, dest.dtype)  # tensors saved as one come back as one memory
            value = torch.nn.Parameter(fresh, dest.requires_grad) if isinstance(dest, torch.nn.Parameter) else fresh
            plan.loads.append((key, lambda: assign(value)))
            plan.report.restored_keys.append(shared_key(key, saved))
        else:  # not replaced: reported, never "restored"
            plan.report.missing_keys.append(key)
    elif compatible(key, saved, dest, plan.report, plan.cast):
        _read_into(dest, saved, plan, key)
        plan.report.restored_keys.append(shared_key(key, saved))


def shared_key(key: str, saved: SavedTensor) -> str:
    """``key``, as the saved tensor's own name string when they are equal: a report of 20,000
    restored keys then holds no second copy of every name."""
    return saved.name if saved.name == key else key


def plan_module(name: str, module: torch.nn.Module, saved: Any, plan: Plan) -> None:
    """Write matching tensors straight into the module's parameters and buffers.

    Entries of the state dict that are not a parameter or a persistent buffer (``_extra_state``,
    a key a state-dict hook adds), even where their tensor is a view of one's memory, go through
    ``load_state_dict(strict=False)`` instead, as torch's loader treats them. A module with load_state_dict
    hooks or a loader of its own anywhere in its tree is restored as ``load_state_dict`` would (:func:`_plan_hooked`).
    """
    current = dist_dtensor.module_state(module)
    if saved is _MISSING or not isinstance(saved, dict) or not all(type(k) is str for k in saved):
        plan.report.missing_keys.extend(keypath.join(name, keypath.escape_part(k)) for k in current)
        if saved is not _MISSING:  # not a state dict (whose keys are str): none of it is used
            plan.report.unexpected_keys.extend(_saved_leaf_keys(saved, name))
        return
    for key, tensor in current.items():
        if isinstance(tensor, torch.Tensor):
            check_destination(keypath.join(name, keypath.escape_part(key)), tensor)
    if _loads_through_its_own(module, current, plan.assign):
        _plan_own_load_state_dict(name, module, saved, current, plan)
        return
    wrapping = module_keys.wrappers(list(saved), list(current))
    versions = plan.versions_of(name, wrapping)
    found = hooked.survey(module, versions)
    if found.needs_load_semantics:
        _plan_hooked(name, module, saved, current, plan, wrapping)
    else:
        _plan_in_place(name, module, saved, current, plan, wrapping, versions, found)


def _plan_in_place(name: str, module: torch.nn.Module, saved: dict[str, Any], current: dict[str, Any], plan: Plan,
                   wrapping: tuple[bool, bool], versions: hooked.Versions | None, found: hooked.Survey) -> None:
    """:func:`plan_module` for a module without load hooks or a loader of its own: its parameters
    and buffers are read into in place, and what is not one of them goes through
    ``load_state_dict(strict=False)`` (``assign=True`` for meta tensors)."""
    storages = {dist_dtensor.local_storage(t) for t in [*module.parameters(), *module.buffers()]
                if t.numel() and not t.is_meta}
    pairs = module_keys.pair(list(saved), list(current), wrapping)
    via_load: dict[str, Any] = {}
    via_assign: dict[str, Any] = {}
    fed: list[tuple[int, str]] = []  # (storage, saved key) of each in-place read
    restored_as: dict[str, tuple[str, str]] = {}  # a key of via_load -> its checkpoint key, and as reported restored
    for saved_key, value in saved.items():
        full = keypath.join(name, keypath.escape_part(saved_key))
        object_key = pairs.get(saved_key)
        if object_key is None:
            plan.report.unexpected_keys.extend(_saved_leaf_keys(value, full))
            continue
        if object_key != saved_key:
            plan.report.remapped_keys[full] = keypath.join(name, keypath.escape_part(object_key))
        dest = current[object_key]
        if is_saved(value) and isinstance(dest, torch.Tensor) and dest.is_meta:
            plan.report.meta_keys.append(keypath.join(name, keypath.escape_part(object_key)))
            if not plan.assign or not compatible(full, value, dest, plan.report, plan.cast):
                continue  # reported missing below: not matched
            via_assign[object_key] = plan.fresh_for(value, dest.dtype)
        elif is_saved(value) and isinstance(dest, torch.Tensor):
            if not compatible(full, value, dest, plan.report, plan.cast):
                continue
            own = plan.report.remapped_keys.get(full, full) if object_key != saved_key else full  # the object's name
            address, fresh = _read_module_tensor(dest, value, plan, own, object_key in found.own, storages)
            if fresh is not None:
                via_load[object_key] = fresh
            if address:  # read in place: a storage read into twice is tied weights, or parameters of one buffer
                fed.append((address, saved_key))
        elif is_saved(value) or isinstance(dest, torch.Tensor):
            plan.report.unexpected_keys.append(full)
            plan.report.missing_keys.append(keypath.join(name, keypath.escape_part(object_key)))
            continue
        else:
            via_load[object_key] = rebuild(value, full, _fresh_reader(plan))
        plan.report.restored_keys.append(shared_key(full, value) if is_saved(value) else full)
        if object_key in via_load:
            restored_as[object_key] = (full, plan.report.restored_keys[-1])
    if len({address for address, _ in fed}) < len(fed):  # a storage read into twice
        drop_reads(tied.overwritten(_reads_into_shared(fed, name, pairs, saved, current), list(current)), plan)
    if fed:
        plan.fed.append((name, fed, lambda key: tied.Fed(pairs[key], keypath.join(name, keypath.escape_part(key)), saved[key],
                                                   current[pairs[key]])))
    matched = {k for k in pairs.values() if not _is_meta(current[k]) or k in via_assign} | found.kept
    plan.report.missing_keys.extend(keypath.join(name, keypath.escape_part(k)) for k in current if k not in matched)
    if via_load:
        plan.loads.append((name, lambda: _load_the_rest(module, hooked.versioned(via_load, module, versions),
                                                        restored_as, plan.report)))
    if via_assign:
        plan.loads.append((name, lambda: module.load_state_dict(hooked.versioned(via_assign, module, versions),
                                                                strict=False, assign=True)))


def _read_module_tensor(dest: torch.Tensor, value: SavedTensor, plan: Plan, own: str, is_own: bool,
                        storages: set[int]) -> tuple[int, torch.Tensor | None]:
    """Schedule the read of a module's parameter or buffer ``dest`` (its key ``own``): in place for
    a DTensor (into its local part) and for a tensor of the module's own memory that its loader
    would copy into (``is_own``, in one of the module's ``storages``); else into a fresh tensor,
    for ``load_state_dict``. Returns (where it was read into in place, ``tied.address_of``, else
    0; the fresh tensor, else None)."""
    if dist_dtensor.is_dtensor(dest):
        _read_into(dest, value, plan, own)
        return tied.address_of(dest), None
    if dest.numel() and is_own and (address := dest.untyped_storage().data_ptr()) in storages:
        _read_into(dest, value, plan, own)
        return address, None
    fresh = torch.empty(value.shape, dtype=dest.dtype, device=dest.device)
    _read_into(fresh, value, plan)
    return 0, fresh


_LOAD_STATE_DICT = torch.nn.Module.load_state_dict


def _loads_through_its_own(module: torch.nn.Module, current: dict[str, Any], assign: bool) -> bool:
    """Whether ``module``'s class overrides ``load_state_dict`` (a migration of older checkpoints, a
    dequantisation), which ``model.load_state_dict(torch.load(f))`` runs and an in-place read would
    bypass; not for DTensor state (each rank holds only its part), nor meta tensors unless
    ``assign`` and the override takes it."""
    if type(module).load_state_dict is _LOAD_STATE_DICT:
        return False
    tensors = [t for t in current.values() if isinstance(t, torch.Tensor)]
    if any(dist_dtensor.is_dtensor(t) for t in tensors):
        return False
    return not any(t.is_meta for t in tensors) or assign and _takes(module.load_state_dict, "assign")


def refuses_missing_keys(module: torch.nn.Module, assign: bool) -> bool:
    """Whether ``module`` is restored through a ``load_state_dict`` of its own that takes no
    ``strict=`` (:func:`_plan_own_load_state_dict`): handed a state without a key, it raises."""
    if type(module).load_state_dict is _LOAD_STATE_DICT:
        return False
    return (_loads_through_its_own(module, dict(dist_dtensor.module_state(module)), assign)
            and not _takes(module.load_state_dict, "strict"))


def _takes(method: Callable[..., Any], keyword: str) -> bool:
    """Whether ``method`` accepts ``keyword`` (an override may have a signature of its own)."""
    try:
        parameters = inspect.signature(method).parameters
    except (TypeError, ValueError):
        return False
    return keyword in parameters or any(p.kind is inspect.Parameter.VAR_KEYWORD for p in parameters.values())


def _plan_own_load_state_dict(name: str, module: torch.nn.Module, saved: dict[str, Any], current: dict[str, Any],
                              plan: Plan) -> None:
    """Restore ``module`` through its own ``load_state_dict``, handed the saved state as
    ``torch.load`` gives it: each key as saved, but under the module's own name where a DDP or
    ``torch.compile`` prefix is all that differs (as every restore matches them), each tensor of
    the saved dtype, fetched when the load runs as a hooked module's are (views of the mapped
    shard where they can be: no second copy). A tensor whose dtype differs from the module's is
    reported and left out unless ``cast``. The override is called with ``strict=False`` (and
    ``assign=True``) where its signature takes them; what it answers (missing and unexpected
    keys) is the report's, and what it raises fails the restore, as its call would."""
    pairs = module_keys.pair(list(saved), list(current))
    state: dict[str, Any] = {}
    as_saved: dict[str, str] = {}  # the module's key -> the checkpoint's name for it
    left_out: set[str] = set()  # reported as dtype mismatches: not missing too
    for key, value in saved.items():
        own = pairs.get(key, key)
        full = keypath.join(name, keypath.escape_part(key))
        dest = current.get(own)
        if is_saved(value) and isinstance(dest, torch.Tensor) and value.dtype != dest.dtype \
                and value.shape == dest.shape and not compatible(full, value, dest, plan.report, plan.cast):
            left_out.add(own)
            continue
        state[own] = value if is_saved(value) else rebuild(value, full, _fresh_reader(plan))
        as_saved[own] = full
    plan.fetches = True
    versions, report = plan.versions_of(name), plan.report
    may_view = not plan.assign and all(t.device.type == "cpu" for t in current.values() if isinstance(t, torch.Tensor))

    def load() -> None:
        if plan.fetch is None:
            raise RuntimeError("a module's own load_state_dict ran outside execute()")
        method = module.load_state_dict
        options = {"strict": False, **({"assign": True} if plan.assign else {})}
        options = {k: v for k, v in options.items() if _takes(method, k)}
        with plan.fetch([v for v in state.values() if is_saved(v)], may_view) as tensors:
            result = method(hooked.versioned(hooked.filled(state, tensors), module, versions), **options)
        unexpected = list(getattr(result, "unexpected_keys", None) or [])
        missing = getattr(result, "missing_keys", None)
        missing = [k for k in current if k not in state] if missing is None else list(missing)
        report.unexpected_keys.extend(as_saved.get(k, keypath.join(name, keypath.escape_part(k))) for k in unexpected)
        report.missing_keys.extend(keypath.join(name, keypath.escape_part(k)) for k in missing if k not in left_out)
        report.restored_keys.extend(full for own, full in as_saved.items() if own not in unexpected and own not in missing)

    plan.loads.append((name, load))
    plan.reports_late[name] = lambda: list(as_saved.values())
    _fills_late(plan, module, [(own, full, state[own], current.get(own)) for own, full in as_saved.items()], current)


def _fills_late(plan: Plan, module: torch.nn.Module, entries: list[tuple[str, str, Any, Any]],
                current: dict[str, Any]) -> None:
    """Record what a load that runs after every read fills: (the module's key, the checkpoint's,
    the saved value, the module's tensor now), where the saved value is a tensor and the module's
    holds memory (``_load.shared``), in the order torch's loaders walk the module (``current``'s:
    of two keys of one tensor, the later one's value stays)."""
    order = {key: i for i, key in enumerate(current)}
    fills = [tied.Fed(own, full, value, dest) for own, full, value, dest in entries
             if is_saved(value) and isinstance(dest, torch.Tensor) and not dest.is_meta and tied.address_of(dest)]
    if fills:
        plan.late_fills.append((module, sorted(fills, key=lambda fill: order.get(fill.object_key, len(order)))))


def _reads_into_shared(fed: list[tuple[int, str]], name: str, pairs: dict[str, str], saved: dict[str, Any],
                       current: dict[str, Any]) -> list[tied.Fed]:
    """The in-place reads (``fed``) into storages that more than one of them reads into."""
    count = collections.Counter(address for address, _ in fed)
    return [tied.Fed(pairs[key], keypath.join(name, keypath.escape_part(key)), saved[key], current[pairs[key]])
            for address, key in fed if count[address] > 1]


def drop_reads(reads: list[tied.Fed], plan: Plan) -> None:
    """Unschedule the reads ``tied.overwritten`` found: each key is unexpected, not restored (a
    hooked module's is taken back from what its load will report)."""
    for read in reads:
        buffers = {id(b) for d, b in plan.casts if d is read.dest}  # cast: read into a buffer, then copied
        plan.reads[:] = [(d, v) for d, v in plan.reads if v is not read.saved or d is not read.dest and id(d) not in buffers]
        plan.casts[:] = [(d, b) for d, b in plan.casts if d is not read.dest or id(b) not in buffers]
        if read.key in plan.unreported:
            plan.unreported.pop(read.key)()
        else:
            plan.report.restored_keys.remove(shared_key(read.key, read.saved))
        plan.report.unexpected_keys.append(read.key)


def _load_the_rest(module: torch.nn.Module, via_load: dict[str, Any], restored_as: dict[str, tuple[str, str]],
                   report: MismatchReport) -> None:
    """``load_state_dict`` of the entries that alias no parameter or buffer (extra state, what a
    state-dict hook adds); one it does not take (a hook's key no loader reads) is unexpected, as in
    torch, not restored."""
    result = module.load_state_dict(via_load, strict=False)
    for key in result.unexpected_keys:
        full, reported = restored_as.get(key, (key, key))
        if reported in report.restored_keys:
            report.restored_keys.remove(reported)
        report.unexpected_keys.append(full)


def _plan_hooked(name: str, module: torch.nn.Module, saved: dict[str, Any], current: dict[str, Any], plan: Plan,
                 wrapping: tuple[bool, bool]) -> None:
    """Plan ``module``'s restore through load_state_dict semantics (``_load.hooked``). Keys outside
    every hooked subtree keep :func:`plan_module`'s rules (in place; mismatches reported, left as they
    are), except a tensor tied to another (one tensor under two keys), which torch's default loader
    fills when the walk reaches its module, so that the key torch reaches last wins, as in
    ``load_state_dict``; the others go to torch's loaders, read when the walk reaches them. Missing
    and unexpected keys are torch's, known once the hooks have run."""
    load = hooked.HookedLoad(module, plan.assign, plan.versions_of(name, wrapping))
    plan.fetches = True
    pairs = module_keys.pair(list(saved), list(current), wrapping)
    tied_views = tied.repeated_views(current.values())
    in_place: list[tuple[int, str]] = []  # (storage, saved key) of each read straight into a tensor
    reads: dict[str, tied.Fed] = {}
    late: list[tuple[str, str, Any, Any]] = []  # what torch's loaders fill, when the load runs
    for saved_key, value in saved.items():
        full = keypath.join(name, keypath.escape_part(saved_key))
        key = pairs.get(saved_key, saved_key)  # unmatched keys keep their name: a pre-hook may rename them
        target = keypath.join(name, keypath.escape_part(key))
        if key != saved_key:
            plan.report.remapped_keys[full] = target
        owner = load.own_keys.get(key)
        restored = True
        if owner is None:  # under a hooked module, or not this module's: torch's loaders decide
            load.entries[key] = value if is_saved(value) else rebuild(value, full, _fresh_reader(plan))
            dest: Any = current.get(key)
            if is_saved(value) and dist_dtensor.is_dtensor(dest) and not dest.is_meta and dest.shape == value.shape:
                # this rank's part, read into a DTensor laid out as the parameter, which its loader copies from
                load.entries[key] = fresh = dist_dtensor.empty_like(dest, value.dtype)
                _read_into(fresh, value, plan)
            late.append((key, full, value, dest))
            if plan.cast and plan.assign and is_saved(value) and casts_to(current.get(key), value):
                # assigned as its loader is handed it, it would keep the saved dtype: cast after the loader
                load.casts[key] = (value.dtype, current[key].dtype)
        elif owner[1] is None:  # extra state, for set_extra_state
            load.later(owner[0], key, rebuild(value, full, _fresh_reader(plan)))
        elif not is_saved(value):  # a plain value where a tensor belongs: left out, so also missing
            plan.report.unexpected_keys.extend(_saved_leaf_keys(value, full))
            restored = False
        elif owner[1].is_meta or tied_views and not dist_dtensor.is_dtensor(owner[1]) and \
                tied.view_of(owner[1]) in tied_views:  # (a DTensor stays in place: torch's loader cannot copy into it)
            if owner[1].is_meta:
                plan.report.meta_keys.append(target)
            restored = (plan.assign or not owner[1].is_meta) and compatible(full, value, owner[1], plan.report, plan.cast)
            if restored:  # one tensor for every key of one saved tensor: assigned, tied weights stay tied
                load.later(owner[0], key, plan.fresh_for(value, owner[1].dtype))
                late.append((key, full, value, owner[1]))  # filled in the walk, as the hooked keys are
        else:
            load.entries[key] = owner[1]  # present, so neither missing nor unexpected
            restored = compatible(full, value, owner[1], plan.report, plan.cast)
            if restored:
                _read_into(owner[1], value, plan, target)
                if address := tied.address_of(owner[1]):
                    in_place.append((address, saved_key))
                    reads[saved_key] = tied.Fed(key, full, value, owner[1])
                    plan.unreported[full] = functools.partial(load.consumed.pop, key, None)
        if restored:
            load.consumed[key] = shared_key(full, value) if is_saved(value) else full
    if in_place:
        plan.fed.append((name, in_place, reads.__getitem__))
    _fills_late(plan, module, late, current)

    def finish() -> None:
        if plan.fetch is None:
            raise RuntimeError("a hooked module's load ran outside execute()")
        load.finish(plan.fetch, name, plan.report)

    plan.loads.append((name, finish))
    plan.reports_late[name] = lambda: list(load.consumed.values())


def _is_meta(value: Any) -> bool:
    return isinstance(value, torch.Tensor) and value.is_meta


def rebuild(saved: Any, path: str, destination: Callable[[str, SavedTensor], torch.Tensor]) -> Any:
    """``saved`` with each saved tensor replaced by ``destination(key, saved)``. Containers without
    a tensor below them are returned as they are: a large plain value is not copied again."""
    if is_saved(saved):
        return destination(path, saved)
    if isinstance(saved, dict):
        items = {k: rebuild(v, keypath.join(path, keypath.key_part(k)), destination) for k, v in saved.items()}
        return saved if all(items[k] is v for k, v in saved.items()) else type(saved)(items)
    if isinstance(saved, (list, tuple)) and not isinstance(saved, torch.Size):
        parts = [rebuild(v, keypath.join(path, str(i)), destination) for i, v in enumerate(saved)]
        if all(a is b for a, b in zip(parts, saved)):
            return saved
        return parts if isinstance(saved, list) else tuple(parts)
    return saved


def plan_value(key: str, saved: Any, assign: Callable[[Any], None], plan: Plan) -> None:
    """A plain value is restored by re-assigning it (tensors inside are read into new tensors)."""
    if saved is _MISSING:
        plan.report.missing_keys.append(key)
        return

    value = rebuild(saved, key, _fresh_reader(plan))
    plan.loads.append((key, lambda: assign(value)))
    plan.report.restored_keys.append(key)


def _fresh_reader(plan: Plan) -> Callable[[str, SavedTensor], torch.Tensor]:
    """Allocates a new CPU tensor for each saved tensor and schedules the read into it."""

    def fresh(_: str, value: SavedTensor) -> torch.Tensor:
        t = torch.empty(value.shape, dtype=value.dtype)
        plan.reads.append((t, value))
        return t

    return fresh


def _saved_leaf_keys(saved: Any, prefix: str) -> list[str]:
    return list(keypath.leaves(saved, prefix))


# -- executing -------------------------------------------------------------------------------


class _Missing:
    def __repr__(self) -> str:
        return "<missing>"


_MISSING: Any = _Missing()
MISSING = _MISSING
