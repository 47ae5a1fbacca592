"""Planning a stateful object's restore: an optimizer, a scheduler, a scaler, anything with
``state_dict()`` and ``load_state_dict()``.

Its state dict is rebuilt from the checkpoint (tensors it already has with the same shape and dtype
are read into in place, the others allocated once) and handed to its ``load_state_dict`` when the
reads are done. Unlike a module's, such an object is restored whole or not at all: any shape or
dtype mismatch, or a structure that cannot take the saved state (an optimizer with other parameter
groups), leaves it untouched and is reported.
"""

from __future__ import annotations

import bisect
import random
from typing import Any

import torch

from torchckpt._dist import dtensor as dist_dtensor
from torchckpt._format import keypath
from torchckpt._format import tree as format_tree
from torchckpt._format.dtypes import TensorInfo as SavedTensor
from torchckpt._load import optimizer, optimizer_fit
from torchckpt._load.compat import compatible
from torchckpt._load.destinations import check_destination
from torchckpt._load.plan import MISSING, Plan, is_saved, rebuild, shared_key
from torchckpt._load.report import MismatchReport
from torchckpt.errors import short_repr
from torchckpt.rng import RNGState


def plan_stateful(name: str, obj: Any, saved: Any, plan: Plan) -> None:
    """Rebuild the object's state dict from the checkpoint and hand it to ``load_state_dict``.

    Tensors that already exist in the object with the same shape and dtype are read into in
    place; others are allocated once. An object with any shape or dtype mismatch, or whose
    structure cannot take the checkpoint's state (an optimizer with different parameter groups),
    is left untouched as a whole and reported.
    """
    current = obj.state_dict()
    current_leaves = keypath.leaves(current, name)
    if saved is MISSING:
        plan.report.missing_keys.extend(current_leaves)
        return
    reason = _structure_problem(obj, current, saved)
    if isinstance(obj, torch.optim.Optimizer) and not reason:
        saved = _without_stray_state(saved, name, plan.report)
    if not reason:
        saved = _without_discarded(obj, current, saved, name, plan.report)
    saved_leaves = keypath.leaves(saved, name)
    report = MismatchReport()
    reads: list[tuple[torch.Tensor, SavedTensor]] = []
    params = dist_dtensor.LayoutTemplates(obj) if isinstance(obj, torch.optim.Optimizer) else None

    def destination(key: str, value: SavedTensor) -> torch.Tensor:
        dest = current_leaves.get(key)
        if isinstance(dest, torch.Tensor) and not dest.is_meta:  # compatibility was checked above
            if dest.dtype == value.dtype:
                reads.append((dest, value))
                plan.in_place.append(key)
                return dest
            fresh = torch.empty(value.shape, dtype=dest.dtype)  # cast=True: the object's dtype
            buffer = torch.empty(value.shape, dtype=value.dtype)
            reads.append((buffer, value))
            plan.casts.append((fresh, buffer))
            return fresh
        laid_out = None
        if params is not None:  # an optimizer that never stepped: laid out like its parameter, where that matters
            laid_out = params.destination(key, name, value)
        new = torch.empty(value.shape, dtype=value.dtype) if laid_out is None else laid_out
        reads.append((new, value))
        return new

    for key, dest in current_leaves.items():
        if isinstance(dest, torch.Tensor):
            check_destination(key, dest)
    for key, value in saved_leaves.items():
        dest = current_leaves.get(key)
        if is_saved(value) and isinstance(dest, torch.Tensor):
            compatible(key, value, dest, report, plan.cast)
    if _loads(obj, torch.optim.Optimizer) and not reason:  # state it has not yet: torch's load casts it
        for key, dtype in optimizer_fit.cast_dtypes(obj, saved, name).items():
            if key not in current_leaves and key in saved_leaves:
                value = saved_leaves[key]
                compatible(key, value, torch.empty(value.shape, dtype=dtype, device="meta"), report, plan.cast)
    plan.report.cast_keys.update(report.cast_keys)
    if report.shape_mismatches or report.dtype_mismatches or reason:
        plan.report.shape_mismatches.update(report.shape_mismatches)
        plan.report.dtype_mismatches.update(report.dtype_mismatches)
        plan.report.skipped_objects[name] = reason or "some of its tensors differ in shape or dtype"
        return
    new_state = rebuild(saved, name, destination)
    plan.reads.extend(reads)
    unfilled = _unfilled(current_leaves, saved_leaves)
    if isinstance(obj, torch.optim.Optimizer):  # load_state_dict replaces its state whole: what the checkpoint
        state = keypath.join(name, "state") + keypath.SEP  # has no state for, it has none for after the restore
        unfilled = [k for k in unfilled if not k.startswith(state)]
        plan.replaced.append(state)
    plan.report.missing_keys.extend(unfilled)
    plan.report.restored_keys.extend(shared_key(k, v) if is_saved(v) else k
                                     for k, v in saved_leaves.items())
    if isinstance(obj, torch.optim.Optimizer):
        new_state = optimizer.with_param_ids(new_state)
    plan.loads.append((name, lambda: obj.load_state_dict(new_state)))


def _without_stray_state(saved: Any, name: str, report: MismatchReport) -> Any:
    """``saved`` less the state of parameters its groups do not list (a rename to ``opt/state/7``
    of an optimizer of two): ``load_state_dict`` would keep it under a key no parameter has, and
    the parameter it was meant for would train on without it. Reported unexpected instead."""
    state = saved.get("state") if isinstance(saved, dict) else None
    if not isinstance(state, dict):
        return saved
    ids = {i for group in saved["param_groups"] for i in group["params"] if type(i) in (int, str)}  # checked: dicts
    strays = {k: v for k, v in state.items() if k not in ids}  # load_state_dict maps state by these ids
    if not strays:
        return saved
    report.unexpected_keys.extend(keypath.leaves(strays, keypath.join(name, "state")))
    return {**saved, "state": {k: v for k, v in state.items() if k not in strays}}


def _without_discarded(obj: Any, current: Any, saved: Any, name: str, report: MismatchReport) -> Any:
    """``saved`` less what torch's own loader would take and not use, reported unexpected: a disabled
    ``GradScaler``'s loader returns at once (its state is empty), and ``LambdaLR`` saves a callable
    object's attributes, which it would set on what is now a function (``None`` in its state)."""
    if _loads(obj, torch.amp.GradScaler) and current == {} and isinstance(saved, dict) and saved:
        report.unexpected_keys.extend(keypath.leaves(saved, name))
        return {}
    if _loads(obj, RNGState) and isinstance(saved, dict) and isinstance(current, dict):
        return _rng_unused(current, saved, name, report)
    if _loads(obj, *_CHAINS) and isinstance(saved, dict):  # its schedulers' states, each checked as its own
        inner = [_without_discarded(s, c, t, keypath.join(keypath.join(name, "_schedulers"), str(i)), report)
                 for i, (s, c, t) in enumerate(zip(obj._schedulers, current["_schedulers"], saved["_schedulers"]))]
        return {**saved, "_schedulers": inner}
    if not (_loads(obj, _SCHEDULERS.LambdaLR, _SCHEDULERS.MultiplicativeLR) and isinstance(saved, dict)):
        return saved
    mine, theirs = current.get("lr_lambdas"), saved.get("lr_lambdas")
    if not (isinstance(mine, list) and isinstance(theirs, list) and len(mine) == len(theirs)):
        return saved
    lambdas = keypath.join(name, "lr_lambdas")
    for i, (now, then) in enumerate(zip(mine, theirs)):
        if now is None and then is not None:
            report.unexpected_keys.extend(keypath.leaves(then, keypath.join(lambdas, str(i))))
    return {**saved, "lr_lambdas": [None if now is None else then for now, then in zip(mine, theirs)]}


def _rng_unused(current: dict[str, Any], saved: dict[str, Any], name: str, report: MismatchReport) -> dict[str, Any]:
    """``saved`` less what ``RNGState.load_state_dict`` cannot set here, reported unexpected: the
    states of CUDA devices this process does not have, and NumPy's where NumPy is not installed."""
    cuda, have = saved.get("cuda"), current.get("cuda")
    out = saved
    if isinstance(cuda, list) and isinstance(have, list) and len(cuda) > len(have):
        report.unexpected_keys.extend(keypath.join(keypath.join(name, "cuda"), str(i)) for i in range(len(have), len(cuda)))
        out = {**out, "cuda": cuda[: len(have)]}
    if "numpy" in saved and "numpy" not in current:
        report.unexpected_keys.extend(keypath.leaves(saved["numpy"], keypath.join(name, "numpy")))
        out = {k: v for k, v in out.items() if k != "numpy"}
    return out


def _unfilled(current: dict[str, Any], saved: dict[str, Any]) -> list[str]:
    """The object's leaves the checkpoint does not fill: absent from it, and no saved key below
    them (an empty container now, such as a never-stepped optimizer's state, is filled then)."""
    absent = [k for k in current if k not in saved]
    if not absent:
        return []
    ordered = sorted(saved)
    return [k for k in absent if not _starts_one(k + keypath.SEP, ordered)]


def _starts_one(prefix: str, ordered: list[str]) -> bool:
    """Whether one of the sorted strings ``ordered`` starts with ``prefix`` (those that do come
    together, from where ``prefix`` would be inserted)."""
    i = bisect.bisect_left(ordered, prefix)
    return i < len(ordered) and ordered[i].startswith(prefix)


def _structure_problem(obj: Any, current: Any, saved: Any) -> str | None:
    """Why ``saved`` cannot be handed to ``obj.load_state_dict``, or None. Found while planning,
    before any object changes: a ``load_state_dict`` that fails after the reads leaves the other
    objects restored and this one not. Checked: an optimizer's parameter groups; a value that is
    no state dict where the object's is one; and, for torch's and torchckpt's own loaders (a
    user's class may read keys its state no longer has, or take any), a state dict saved from
    another kind of object (sharing none of its keys) and the keys and forms they read."""
    if isinstance(obj, torch.optim.Optimizer):
        mine = [len(g["params"]) for g in current.get("param_groups", [])]
        groups = saved.get("param_groups") if isinstance(saved, dict) else None
        if not isinstance(groups, list) or not all(isinstance(g, dict) and isinstance(g.get("params"), list)
                                                   for g in groups):
            return "the checkpoint's state has no parameter groups"
        theirs = [len(g["params"]) for g in groups]
        if mine != theirs:
            return f"the checkpoint's parameter groups have sizes {theirs}, this optimizer's have {mine}"
        return optimizer_fit.problem(obj, current, saved) if _loads(obj, torch.optim.Optimizer) and \
            type(obj).__module__.startswith("torch.optim") else None
    if not isinstance(current, dict):  # an object of its own kind of state: it alone knows what it takes
        return None
    kind = type(obj).__name__
    loader = getattr(type(obj).load_state_dict, "__module__", None) or ""
    if not (loader == "torch" or loader.startswith(("torch.", "torchckpt."))):
        return None  # a user's loader may take what an older version saved (a list, an int, renamed keys)
    if not isinstance(saved, dict):
        return f"the checkpoint holds {_described(saved)} under this name, not a state dict for {kind}.load_state_dict"
    if current and not saved:
        return (f"the checkpoint's state under this name is empty, where this {kind}'s has keys (saved by an object "
                "with nothing to save, such as a disabled GradScaler, or by another kind of object)")
    if current and not any(k in saved for k in current):
        listed = ", ".join(short_repr(k, 30) for k in list(saved)[:4]) + (", ..." if len(saved) > 4 else "")
        return (f"the checkpoint's state under this name ({listed or 'empty'}) shares no key with this {kind}'s "
                f"({', '.join(short_repr(k, 30) for k in list(current)[:4])}): it was saved from another kind of object")
    lacking = [k for k in _needed_keys(obj, current) if k not in saved]
    if lacking:
        return f"the checkpoint's state lacks {', '.join(map(repr, lacking))}, which {kind}.load_state_dict reads"
    if _loads(obj, _SCHEDULERS.LambdaLR, _SCHEDULERS.MultiplicativeLR) and not (
            isinstance(saved["lr_lambdas"], list) and len(saved["lr_lambdas"]) == len(current["lr_lambdas"])):
        return (f"the checkpoint's 'lr_lambdas' are {_described(saved['lr_lambdas'])}, where this {kind} has "
                f"{len(current['lr_lambdas'])}, one for each parameter group")
    if loader.startswith("torch.optim."):  # torch's schedulers: a value for each parameter group, zipped with them
        groups = getattr(getattr(obj, "optimizer", None), "param_groups", None)
        for key in _PER_GROUP:  # as many as its groups when built, or as its optimizer has now (a group added since)
            now, then = current.get(key), saved.get(key)
            if isinstance(now, list) and isinstance(then, list) and len(then) != len(now) and not (
                    isinstance(groups, list) and len(then) == len(groups)):
                return (f"the checkpoint's {key!r} holds {len(then)} values, one for each parameter group of the "
                        f"optimizer it was saved with, where this {kind}'s has {len(now)}")
    if _loads(obj, *_CHAINS):  # each of its schedulers loads one saved state, in order
        schedulers = saved["_schedulers"]
        if not (isinstance(schedulers, list) and len(schedulers) == len(current["_schedulers"])):
            return (f"the checkpoint's '_schedulers' are {_described(schedulers)}, where this {kind} chains "
                    f"{len(current['_schedulers'])}")
        for i, (inner, theirs) in enumerate(zip(obj._schedulers, schedulers)):
            problem = _structure_problem(inner, current["_schedulers"][i], theirs)
            if problem:
                return f"its scheduler {i} ({type(inner).__name__}): {problem}"
    if _loads(obj, RNGState):
        return _rng_problem(current, saved)
    return None


_SCHEDULERS = torch.optim.lr_scheduler
_CHAINS = (_SCHEDULERS.SequentialLR, _SCHEDULERS.ChainedScheduler)
_NEEDED = [  # what torch's and torchckpt's own loaders read unconditionally, by the class that defines them
    ((RNGState,), ("python", "torch")),
    ((_SCHEDULERS.LambdaLR, _SCHEDULERS.MultiplicativeLR), ("lr_lambdas",)),
    (_CHAINS, ("_schedulers",)),
    ((_SCHEDULERS.CyclicLR,), ("_scale_fn_custom",)),
]
_PER_GROUP = ("base_lrs", "_last_lr", "min_lrs", "max_lrs", "base_momentums", "max_momentums")  # torch's schedulers
_SCALER_KEYS = ("scale", "growth_factor", "backoff_factor", "growth_interval", "_growth_tracker")


def _loads(obj: Any, *classes: type) -> bool:
    """Whether ``obj``'s ``load_state_dict`` is the one one of ``classes`` defines (not a subclass's own)."""
    mine = type(obj).load_state_dict
    return any(mine is cls.__dict__.get("load_state_dict") for cls in classes)


def _needed_keys(obj: Any, current: dict[Any, Any]) -> tuple[str, ...]:
    """The keys ``obj``'s loader reads unconditionally, where it is torch's or torchckpt's own."""
    for classes, keys in _NEEDED:
        if _loads(obj, *classes):
            return keys
    if _loads(obj, torch.amp.GradScaler) and current:  # a disabled one (an empty state) loads nothing
        return _SCALER_KEYS
    return ()


def _rng_problem(current: dict[str, Any], saved: dict[str, Any]) -> str | None:
    """Why ``RNGState.load_state_dict`` would refuse ``saved``: each generator's state must have
    the form this process's has (checked on a scratch ``random.Random`` for Python's)."""
    try:
        random.Random().setstate(saved["python"])
    except Exception as e:  # noqa: BLE001 - any form setstate refuses (a scratch generator: nothing changes)
        return f"its Python random state cannot be set ({type(e).__name__}: {short_repr(str(e), 60)})"
    mine = current["torch"]
    theirs = saved["torch"]
    if not (is_saved(theirs) and theirs.dtype == mine.dtype and tuple(theirs.shape) == tuple(mine.shape)):
        return (f"its torch random state is {_described(theirs)}, where this process's is a "
                f"{format_tree.dtype_name(mine.dtype)} tensor of shape {tuple(mine.shape)}")
    cuda = saved.get("cuda", [])
    if not isinstance(cuda, list) or not all(is_saved(s) for s in cuda):
        return f"its CUDA random states are {_described(cuda)}, not a list of tensors"
    numpy = saved.get("numpy")
    if numpy is not None and "numpy" in current:
        forms = {"algorithm": str, "pos": int, "has_gauss": int, "cached_gaussian": float}
        keys: Any = numpy.get("keys") if isinstance(numpy, dict) else None
        if not (isinstance(numpy, dict) and all(type(numpy.get(f)) is t for f, t in forms.items()) and is_saved(keys)
                and tuple(keys.shape) == tuple(current["numpy"]["keys"].shape)):
            return f"its NumPy random state is {_described(numpy)}, not the form NumPy's get_state() gives"
    return None


def _described(value: Any) -> str:
    if is_saved(value):
        return f"a {format_tree.dtype_name(value.dtype)} tensor of shape {tuple(value.shape)}"
    if isinstance(value, (dict, list, tuple)):
        return f"a {type(value).__name__} of {len(value)} items"
    return f"the value {short_repr(value, 40)}"

