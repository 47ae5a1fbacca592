"""Partial restore with mismatch reporting: matching rules, ``MismatchReport``, ``RestoreStatus``.

A restore is planned before anything is touched: every value in the checkpoint is matched to a
destination by name, shape and dtype, and every mismatch is recorded. Only then are the matching
values applied. Nothing that mismatches is ever applied, and nothing is silently ignored: either an
assertion looks at the report, ``expect_partial()`` acknowledges it, or a warning names the keys
when the status is discarded (as TensorFlow warns when its restore coordinator is collected).
"""

from __future__ import annotations

import os
import warnings
from collections.abc import Callable, Iterable
from dataclasses import dataclass, field
from typing import Any

import torch

from torchckpt import _format, _tensorio, _tree
from torchckpt._format import TensorInfo as SavedTensor  # where a saved tensor is: dtype, shape, checksum
from torchckpt._index import OpenShards
from torchckpt._progress import progress_bar
from torchckpt.errors import (
    CheckpointError,
    CorruptCheckpointError,
    RestoreMismatchError,
    UnsupportedStateError,
    format_keys,
    plural,
)

__all__ = ["MismatchReport", "RestoreStatus", "PartialRestoreWarning"]


class PartialRestoreWarning(UserWarning):
    """Some checkpoint values were not used, or some objects were not fully matched."""




@dataclass
class MismatchReport:
    """What a restore could not apply.

    Attributes:
        missing_keys: in the objects, not in the checkpoint.
        unexpected_keys: in the checkpoint, not used by any object.
        shape_mismatches: ``{key: (shape in checkpoint, shape in object)}``.
        dtype_mismatches: ``{key: (dtype in checkpoint, dtype in object)}``.
        skipped_objects: ``{name: reason}`` for objects left untouched as a whole (for example an
            optimizer whose parameter groups differ from the checkpoint's).
        remapped_keys: ``{key in checkpoint: key in object}`` matched through a DDP ``module.`` or
            ``torch.compile`` ``_orig_mod.`` prefix. Not a mismatch.
        restored_keys: every key that was applied.
        cast_keys: ``{key: (dtype in checkpoint, dtype in object)}`` applied with a cast
            (``restore(..., cast=True)``). Not a mismatch.
        meta_keys: destinations on the meta device (a model built under ``torch.device("meta")``);
            they are also in ``missing_keys`` unless ``restore(..., assign=True)`` materialised them.

    Example:
        >>> report = MismatchReport(missing_keys=["model/head.bias"])
        >>> bool(report), report.missing_keys
        (True, ['model/head.bias'])
    """

    missing_keys: list[str] = field(default_factory=list)
    unexpected_keys: list[str] = field(default_factory=list)
    shape_mismatches: dict[str, tuple[torch.Size, torch.Size]] = field(default_factory=dict)
    dtype_mismatches: dict[str, tuple[torch.dtype, torch.dtype]] = field(default_factory=dict)
    skipped_objects: dict[str, str] = field(default_factory=dict)
    remapped_keys: dict[str, str] = field(default_factory=dict)
    restored_keys: list[str] = field(default_factory=list)
    cast_keys: dict[str, tuple[torch.dtype, torch.dtype]] = field(default_factory=dict)
    meta_keys: list[str] = field(default_factory=list)

    def __bool__(self) -> bool:
        return bool(
            self.missing_keys or self.unexpected_keys or self.shape_mismatches or self.dtype_mismatches
            or self.skipped_objects
        )

    def unused_keys(self) -> list[str]:
        """Checkpoint values that were not applied: unexpected plus mismatched."""
        return sorted(set(self.unexpected_keys) | set(self.shape_mismatches) | set(self.dtype_mismatches))

    def lines(self, include: Iterable[str] = ("missing", "unexpected", "shape", "dtype", "skipped")) -> list[str]:
        wanted = set(include)
        out = []
        if "missing" in wanted and self.missing_keys:
            out.append(f"missing from the checkpoint ({len(self.missing_keys)}): {format_keys(self.missing_keys)}")
        if "unexpected" in wanted and self.unexpected_keys:
            out.append(
                f"unexpected in the checkpoint ({len(self.unexpected_keys)}): {format_keys(self.unexpected_keys)}"
            )
        if "shape" in wanted and self.shape_mismatches:
            items = [f"{k} (checkpoint {list(a)} vs object {list(b)})" for k, (a, b) in self.shape_mismatches.items()]
            out.append(f"shape mismatches ({len(items)}): {format_keys(items)}")
        if "dtype" in wanted and self.dtype_mismatches:
            items = [f"{k} (checkpoint {a} vs object {b})" for k, (a, b) in self.dtype_mismatches.items()]
            out.append(f"dtype mismatches ({len(items)}): {format_keys(items)} (restore(..., cast=True) casts them, "
                       "as load_state_dict does)")
        if "missing" in wanted and self.meta_keys and set(self.meta_keys) & set(self.missing_keys):
            out.append(f"on the meta device, so not restored ({len(self.meta_keys)}): {format_keys(self.meta_keys)} "
                       "(restore(..., assign=True) materialises them, as load_state_dict(assign=True) does)")
        if "skipped" in wanted and self.skipped_objects:
            items = [f"{k}: {v}" for k, v in sorted(self.skipped_objects.items())]
            out.append(f"objects left untouched ({len(items)}): " + "; ".join(items))
        return out

    def __str__(self) -> str:
        lines = self.lines()
        if self.remapped_keys:
            lines.append(
                f"matched through a DDP 'module.' or torch.compile '_orig_mod.' prefix ({len(self.remapped_keys)}): "
                + format_keys(f"{a} -> {b}" for a, b in self.remapped_keys.items())
            )
        head = f"restored {plural(len(self.restored_keys), 'value')}"
        return head + ("; " + "; ".join(lines) if lines else "; everything matched")


class RestoreStatus:
    """The result of ``Checkpoint.restore`` / ``read``: assertions over its :class:`MismatchReport`.

    Example:
        >>> import torch, torchckpt
        >>> status = torchckpt.Checkpoint(w=torch.zeros(2)).restore(None)
        >>> status.report.restored_keys
        []
    """

    def __init__(self, report: MismatchReport, path: str | None) -> None:
        self.report = report
        self.path = path
        self._acknowledged = False

    def _fail(self, what: str, include: Iterable[str]) -> None:
        self._acknowledged = True
        if self.path is None:
            raise RestoreMismatchError(
                "No checkpoint specified (save_path=None); nothing is being restored.", self.report
            )
        details = self.report.lines(include)
        raise RestoreMismatchError(f"{what} when restoring {self.path}: " + "; ".join(details), self.report)

    def assert_consumed(self) -> RestoreStatus:
        """Every value in the checkpoint was used and every tracked object fully matched."""
        self._acknowledged = True
        if self.path is None or self.report:
            self._fail("Not all values matched", ("missing", "unexpected", "shape", "dtype", "skipped"))
        return self

    def assert_existing_objects_matched(self) -> RestoreStatus:
        """Every tracked object was fully matched; extra checkpoint values are fine."""
        self._acknowledged = True
        r = self.report
        if self.path is None or r.missing_keys or r.shape_mismatches or r.dtype_mismatches or r.skipped_objects:
            self._fail("Some tracked objects were not fully matched", ("missing", "shape", "dtype", "skipped"))
        return self

    def assert_nontrivial_match(self) -> RestoreStatus:
        """Something was restored."""
        self._acknowledged = True
        if self.path is None or not self.report.restored_keys:
            if self.path is not None:
                raise RestoreMismatchError(
                    f"Nothing in {self.path} matched the objects being restored; the checkpoint probably does "
                    "not belong to this program. " + "; ".join(self.report.lines()),
                    self.report,
                )
            self._fail("", ())
        return self

    def expect_partial(self) -> RestoreStatus:
        """Silence the warning about unused or unmatched values."""
        self._acknowledged = True
        return self

    def __del__(self) -> None:
        try:
            if not self._acknowledged and self.path is not None and self.report:
                warnings.warn(
                    f"Checkpoint {self.path} was restored with mismatches: {'; '.join(self.report.lines())}. "
                    "Call status.expect_partial() to silence this warning, or an assert_* method to make it an error.",
                    PartialRestoreWarning,
                    stacklevel=2,
                )
        except Exception:  # noqa: BLE001 - interpreter shutdown; never raise from __del__
            pass


# -- planning ----------------------------------------------------------------------------------


@dataclass
class Plan:
    """What a restore will do, computed before anything is mutated."""

    report: MismatchReport = field(default_factory=MismatchReport)
    reads: list[tuple[torch.Tensor, SavedTensor]] = field(default_factory=list)
    casts: list[tuple[torch.Tensor, torch.Tensor]] = field(default_factory=list)  # (destination, read buffer)
    loads: list[Callable[[], None]] = field(default_factory=list)
    cast: bool = False  # restore(..., cast=True): dtype mismatches are cast instead of skipped
    assign: bool = False  # restore(..., assign=True): modules' meta tensors are replaced by restored ones


def _compatible(key: str, saved: SavedTensor, dest: torch.Tensor, report: MismatchReport, cast: bool = False) -> bool:
    """Whether ``saved`` can go into ``dest``; records the mismatch (or, with ``cast``, the cast)."""
    if saved.shape != dest.shape:
        report.shape_mismatches[key] = (saved.shape, dest.shape)
        return False
    if saved.dtype != dest.dtype:
        if cast and dest.dtype in _format.SUPPORTED_DTYPES:
            report.cast_keys[key] = (saved.dtype, dest.dtype)
            return True
        report.dtype_mismatches[key] = (saved.dtype, dest.dtype)
        return False
    return True


def _read_into(dest: torch.Tensor, saved: SavedTensor, plan: Plan) -> None:
    """Schedule the read of ``saved`` into ``dest``, through a buffer of the saved dtype when it is cast."""
    if saved.dtype == dest.dtype:
        plan.reads.append((dest, saved))
        return
    buffer = torch.empty(saved.shape, dtype=saved.dtype)
    plan.reads.append((buffer, saved))
    plan.casts.append((dest, buffer))


def check_destination(key: str, dest: torch.Tensor) -> None:
    """Refuse, before anything changes, a destination the library cannot write as plain memory."""
    reason = _tensorio.unsupported_reason(dest, allow_meta=True)
    if reason is not None:
        raise UnsupportedStateError(
            f"Cannot restore into {key!r}: it is {reason}. Sharded state (DTensor, FSDP) is not supported yet; "
            "restore into a plain (unsharded) model, then shard it.",
            key=key,
            value_type=type(dest),
        )


def plan_tensor(key: str, dest: torch.Tensor, saved: Any, plan: Plan) -> None:
    """A tracked tensor is restored in place."""
    check_destination(key, dest)
    if saved is _MISSING:
        plan.report.missing_keys.append(key)
    elif not isinstance(saved, SavedTensor):
        plan.report.missing_keys.append(key)
        plan.report.unexpected_keys.extend(_saved_leaf_keys(saved, key))
    elif dest.is_meta:  # a bare tensor cannot be replaced in place: reported, never "restored"
        plan.report.missing_keys.append(key)
        plan.report.meta_keys.append(key)
    elif _compatible(key, saved, dest, plan.report, plan.cast):
        _read_into(dest, saved, plan)
        plan.report.restored_keys.append(_shared_key(key, saved))


def _shared_key(key: str, saved: SavedTensor) -> str:
    """``key``, as the saved tensor's own name string when they are equal: a report of 20,000
    restored keys then holds no second copy of every name."""
    return saved.name if saved.name == key else key


def _match_keys(saved_keys: Iterable[str], object_keys: Iterable[str]) -> dict[str, str]:
    """Pair checkpoint keys with object keys: exactly, or through DDP / compile prefixes."""
    object_keys = list(object_keys)
    pairs = {k: k for k in saved_keys if k in set(object_keys)}
    left_saved = [k for k in saved_keys if k not in pairs]
    taken = set(pairs.values())
    left_object = [k for k in object_keys if k not in taken]
    by_canon: dict[str, list[str]] = {}
    for k in left_object:
        by_canon.setdefault(_tree.canonical_module_key(k), []).append(k)
    saved_canon: dict[str, list[str]] = {}
    for k in left_saved:
        saved_canon.setdefault(_tree.canonical_module_key(k), []).append(k)
    for canon, keys in saved_canon.items():
        candidates = by_canon.get(canon, [])
        if len(keys) == 1 and len(candidates) == 1:
            pairs[keys[0]] = candidates[0]
    return pairs


def plan_module(name: str, module: torch.nn.Module, saved: Any, plan: Plan) -> None:
    """Write matching tensors straight into the module's parameters and buffers.

    Entries of the state dict that do not alias a parameter or buffer (state-dict hooks,
    ``_extra_state``) go through ``load_state_dict(strict=False)`` instead.
    """
    current = module.state_dict()
    if saved is _MISSING:
        plan.report.missing_keys.extend(_tree.join(name, _tree.escape_part(k)) for k in current)
        return
    if not isinstance(saved, dict) or not all(type(k) is str for k in saved):  # a state dict has str keys
        plan.report.missing_keys.extend(_tree.join(name, _tree.escape_part(k)) for k in current)
        plan.report.unexpected_keys.extend(_saved_leaf_keys(saved, name))
        return
    for key, tensor in current.items():
        if isinstance(tensor, torch.Tensor):
            check_destination(_tree.join(name, _tree.escape_part(key)), tensor)
    storages = {t.untyped_storage().data_ptr() for t in [*module.parameters(), *module.buffers()]
                if t.numel() and not t.is_meta}
    pairs = _match_keys(list(saved), list(current))
    via_load: dict[str, Any] = {}
    via_assign: dict[str, Any] = {}
    for saved_key, value in saved.items():
        full = _tree.join(name, _tree.escape_part(saved_key))
        object_key = pairs.get(saved_key)
        if object_key is None:
            plan.report.unexpected_keys.extend(_saved_leaf_keys(value, full))
            continue
        if object_key != saved_key:
            plan.report.remapped_keys[full] = _tree.join(name, _tree.escape_part(object_key))
        dest = current[object_key]
        if isinstance(value, SavedTensor) and isinstance(dest, torch.Tensor) and dest.is_meta:
            plan.report.meta_keys.append(_tree.join(name, _tree.escape_part(object_key)))
            if not plan.assign or not _compatible(full, value, dest, plan.report, plan.cast):
                continue  # reported missing below: not matched
            fresh = torch.empty(value.shape, dtype=dest.dtype)
            _read_into(fresh, value, plan)
            via_assign[object_key] = fresh
        elif isinstance(value, SavedTensor) and isinstance(dest, torch.Tensor):
            if not _compatible(full, value, dest, plan.report, plan.cast):
                continue
            if dest.numel() and dest.untyped_storage().data_ptr() in storages:
                _read_into(dest, value, plan)
            else:
                fresh = torch.empty(value.shape, dtype=dest.dtype, device=dest.device)
                _read_into(fresh, value, plan)
                via_load[object_key] = fresh
        elif isinstance(value, SavedTensor) or isinstance(dest, torch.Tensor):
            plan.report.unexpected_keys.append(full)
            plan.report.missing_keys.append(_tree.join(name, _tree.escape_part(object_key)))
            continue
        else:
            via_load[object_key] = _rebuild(value, full, _fresh_reader(plan))
        plan.report.restored_keys.append(_shared_key(full, value) if isinstance(value, SavedTensor) else full)
    matched = {k for k in pairs.values() if not _is_meta(current[k]) or k in via_assign}
    plan.report.missing_keys.extend(_tree.join(name, _tree.escape_part(k)) for k in current if k not in matched)
    if via_load:
        plan.loads.append(lambda: module.load_state_dict(via_load, strict=False))
    if via_assign:
        plan.loads.append(lambda: module.load_state_dict(via_assign, strict=False, assign=True))


def _is_meta(value: Any) -> bool:
    return isinstance(value, torch.Tensor) and value.is_meta


def plan_stateful(name: str, obj: Any, saved: Any, plan: Plan) -> None:
    """Rebuild the object's state dict from the checkpoint and hand it to ``load_state_dict``.

    Tensors that already exist in the object with the same shape and dtype are read into in
    place; others are allocated once. An object with any shape or dtype mismatch, or whose
    structure cannot take the checkpoint's state (an optimizer with different parameter groups),
    is left untouched as a whole and reported.
    """
    current = obj.state_dict()
    current_leaves = _tree.leaves(current, name)
    if saved is _MISSING:
        plan.report.missing_keys.extend(current_leaves)
        return
    saved_leaves = _tree.leaves(saved, name)
    reason = _structure_problem(obj, current, saved)
    report = MismatchReport()
    reads: list[tuple[torch.Tensor, SavedTensor]] = []

    def destination(key: str, value: SavedTensor) -> torch.Tensor:
        dest = current_leaves.get(key)
        if isinstance(dest, torch.Tensor) and not dest.is_meta:  # compatibility was checked above
            if dest.dtype == value.dtype:
                reads.append((dest, value))
                return dest
            fresh = torch.empty(value.shape, dtype=dest.dtype)  # cast=True: the object's dtype
            buffer = torch.empty(value.shape, dtype=value.dtype)
            reads.append((buffer, value))
            plan.casts.append((fresh, buffer))
            return fresh
        fresh = torch.empty(value.shape, dtype=value.dtype)
        reads.append((fresh, value))
        return fresh

    for key, dest in current_leaves.items():
        if isinstance(dest, torch.Tensor):
            check_destination(key, dest)
    for key, value in saved_leaves.items():
        dest = current_leaves.get(key)
        if isinstance(value, SavedTensor) and isinstance(dest, torch.Tensor):
            _compatible(key, value, dest, report, plan.cast)
    plan.report.cast_keys.update(report.cast_keys)
    if report.shape_mismatches or report.dtype_mismatches or reason:
        plan.report.shape_mismatches.update(report.shape_mismatches)
        plan.report.dtype_mismatches.update(report.dtype_mismatches)
        plan.report.skipped_objects[name] = reason or "some of its tensors differ in shape or dtype"
        return
    new_state = _rebuild(saved, name, destination)
    plan.reads.extend(reads)
    for key in current_leaves:
        if key not in saved_leaves and not any(k.startswith(key + _tree.SEP) for k in saved_leaves):
            plan.report.missing_keys.append(key)
    plan.report.restored_keys.extend(_shared_key(k, v) if isinstance(v, SavedTensor) else k
                                     for k, v in saved_leaves.items())
    plan.loads.append(lambda: obj.load_state_dict(new_state))


def _structure_problem(obj: Any, current: Any, saved: Any) -> str | None:
    if isinstance(obj, torch.optim.Optimizer):
        mine = [len(g["params"]) for g in current.get("param_groups", [])]
        groups = saved.get("param_groups") if isinstance(saved, dict) else None
        if not isinstance(groups, list) or not all(isinstance(g, dict) and isinstance(g.get("params"), list)
                                                   for g in groups):
            return "the checkpoint's state has no parameter groups"
        theirs = [len(g["params"]) for g in groups]
        if mine != theirs:
            return f"the checkpoint's parameter groups have sizes {theirs}, this optimizer's have {mine}"
    return None


def _rebuild(saved: Any, path: str, destination: Callable[[str, SavedTensor], torch.Tensor]) -> Any:
    """``saved`` with each saved tensor replaced by ``destination(key, saved)``. Containers without
    a tensor below them are returned as they are: a large plain value is not copied again."""
    if isinstance(saved, SavedTensor):
        return destination(path, saved)
    if isinstance(saved, dict):
        items = {k: _rebuild(v, _tree.join(path, _tree.key_part(k)), destination) for k, v in saved.items()}
        return saved if all(items[k] is v for k, v in saved.items()) else type(saved)(items)
    if isinstance(saved, (list, tuple)) and not isinstance(saved, torch.Size):
        parts = [_rebuild(v, _tree.join(path, str(i)), destination) for i, v in enumerate(saved)]
        if all(a is b for a, b in zip(parts, saved)):
            return saved
        return parts if isinstance(saved, list) else tuple(parts)
    return saved


def plan_value(key: str, saved: Any, assign: Callable[[Any], None], plan: Plan) -> None:
    """A plain value is restored by re-assigning it (tensors inside are read into new tensors)."""
    if saved is _MISSING:
        plan.report.missing_keys.append(key)
        return

    value = _rebuild(saved, key, _fresh_reader(plan))
    plan.loads.append(lambda: assign(value))
    plan.report.restored_keys.append(key)


def _fresh_reader(plan: Plan) -> Callable[[str, SavedTensor], torch.Tensor]:
    """Allocates a new CPU tensor for each saved tensor and schedules the read into it."""

    def fresh(_: str, value: SavedTensor) -> torch.Tensor:
        t = torch.empty(value.shape, dtype=value.dtype)
        plan.reads.append((t, value))
        return t

    return fresh


def _saved_leaf_keys(saved: Any, prefix: str) -> list[str]:
    return list(_tree.leaves(saved, prefix))


# -- executing -------------------------------------------------------------------------------


def execute(plan: Plan, shards: OpenShards, verify: bool, progress: bool | None) -> None:
    """Read every planned tensor (shard by shard, in file order), then run the planned loads."""
    by_file: dict[str, list[tuple[torch.Tensor, SavedTensor]]] = {}
    for pair in plan.reads:
        by_file.setdefault(pair[1].file, []).append(pair)
    total = sum(saved.nbytes for _, saved in plan.reads)
    directory = shards.directory
    with progress_bar(total, f"restore {os.path.basename(directory)}", progress) as bar, torch.no_grad():
        for file, reads in by_file.items():
            reads.sort(key=_file_offset)
            path = shards.path(file)
            try:
                bad = _tensorio.read_many(shards.fds[file], reads, verify, bar.update)
            except EOFError as e:
                raise CorruptCheckpointError(f"Shard {path} is truncated: {e}.", path) from e
            except OSError as e:
                raise CorruptCheckpointError(f"Cannot read shard {path}: {e.strerror or e}.", path) from e
            if bad is not None:
                saved, digest = bad
                raise CorruptCheckpointError(
                    f"Tensor {saved.name!r} in {path} fails its checksum (recorded {saved.checksum:016x}, "
                    f"read {digest:016x}): the shard is corrupt. Objects may be partly restored; restore "
                    "another checkpoint, and run `torchckpt verify` on this one.",
                    path,
                )
    with torch.no_grad():
        for dest, buffer in plan.casts:
            dest.copy_(buffer)
    for load in plan.loads:
        try:
            load()
        except CheckpointError:
            raise
        except (RuntimeError, ValueError, KeyError, TypeError, IndexError, AttributeError, OverflowError,
                RecursionError) as e:
            raise CorruptCheckpointError(
                f"Restoring from {directory} failed while loading state ({type(e).__name__}: {e}); the values in "
                "the checkpoint do not fit the objects. Objects may be partly restored.",
                directory,
            ) from e


def _file_offset(read: tuple[torch.Tensor, SavedTensor]) -> int:
    return read[1].start


class _Missing:
    def __repr__(self) -> str:
        return "<missing>"


_MISSING: Any = _Missing()
MISSING = _MISSING
