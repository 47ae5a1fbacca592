"""What a restore could not apply: :class:`MismatchReport` (public as ``torchckpt.MismatchReport``)."""

from __future__ import annotations

import re
from collections.abc import Iterable
from dataclasses import dataclass, field
from typing import Any

import torch

from torchckpt._format import tree as format_tree
from torchckpt._format.spec import SAVE_COUNTER
from torchckpt.errors import format_keys, plural

_KINDS = ("missing", "unexpected", "shape", "dtype", "skipped", "left")  # the mismatches :meth:`MismatchReport.shared` sends
_RANK_SUFFIX = re.compile(r"~r[0-9]+\Z")  # ``_load.index_fields.beyond_world``'s names


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
        renamed: ``{key in checkpoint: key in object}`` for every checkpoint key that
            ``restore(..., rename=...)`` changed. Not a mismatch. With a rename, ``unexpected_keys``
            (and the keys of ``remapped_keys``) name checkpoint keys as the checkpoint has them; every
            other list names object keys.
        unused_renames: prefixes of a ``rename`` mapping that renamed no key of the checkpoint (a
            typo, or a rename this checkpoint does not need). Not a mismatch, but shown with the
            mismatches: it usually explains them.
        ranks: on several ranks, ``{key: [ranks]}`` for a mismatch found on some ranks and not
            on others (a model built differently on one rank, a per-rank value that ranks beyond
            the saving job's have none of). Every rank's report lists the mismatches of all ranks,
            so that its assertions raise on every rank alike.
        left_from_damaged: after ``restore_or_initialize`` passed over a damaged checkpoint,
            ``{key: that checkpoint's name}`` for each value its restore may have written before the
            damage was found (tensors are read straight into place) and that the checkpoint restored
            did not restore: it may hold the damaged checkpoint's value, not its initial one. Every
            such key is also missing or mismatched.
        restored_nothing_on: on several ranks, the ranks where nothing (besides ``save_counter``)
            was restored, so that ``assert_nontrivial_match()`` raises on every rank alike.

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
    renamed: dict[str, str] = field(default_factory=dict)
    unused_renames: list[str] = field(default_factory=list)
    ranks: dict[str, list[int]] = field(default_factory=dict)
    left_from_damaged: dict[str, str] = field(default_factory=dict)
    restored_nothing_on: list[int] = field(default_factory=list)
    _found_on: dict[tuple[str, str], list[int]] = field(default_factory=dict, init=False, repr=False, compare=False)

    def __bool__(self) -> bool:
        return bool(
            self.missing_keys or self.unexpected_keys or self.shape_mismatches or self.dtype_mismatches
            or self.skipped_objects or self.left_from_damaged
        )

    def restored_nothing(self) -> bool:
        """Nothing was restored here besides ``save_counter``, which every ``Checkpoint.save`` has."""
        return not any(k != SAVE_COUNTER for k in self.restored_keys)

    def shared(self) -> dict[str, Any] | None:
        """This rank's mismatches as JSON, for :meth:`merge` on the other ranks (None: none, and
        something was restored)."""
        nothing = self.restored_nothing()
        if not self and not nothing:
            return None
        return {"nothing": nothing, "missing": self.missing_keys, "unexpected": self.unexpected_keys,
                "shape": {k: [list(a), list(b)] for k, (a, b) in self.shape_mismatches.items()},
                "dtype": {k: [format_tree.dtype_name(a), format_tree.dtype_name(b)] for k, (a, b) in self.dtype_mismatches.items()},
                "skipped": self.skipped_objects, "left": self.left_from_damaged}

    def merge(self, shared: list[dict[str, Any] | None]) -> None:
        """Make this report the job's: every rank's mismatches (``shared``, in rank order, this
        rank's among them), listed in rank order so that every rank's report reads the same, and
        in ``ranks`` the ranks each one not found on every rank was found on."""
        if not any(shared):
            return
        found: dict[tuple[str, str], list[int]] = {}  # (kind, key): a key can be a shape mismatch here, a dtype one there
        missing: dict[str, None] = {}
        unexpected: dict[str, None] = {}
        shape: dict[str, tuple[torch.Size, torch.Size]] = {}
        dtype: dict[str, tuple[torch.dtype, torch.dtype]] = {}
        skipped: dict[str, str] = {}
        left: dict[str, str] = {}
        nothing: list[int] = []
        for rank, theirs in enumerate(shared):
            if theirs is None:
                continue
            if theirs["nothing"]:
                nothing.append(rank)
            for kind in _KINDS:
                for key in theirs[kind]:
                    found.setdefault((kind, key), []).append(rank)
            missing.update(dict.fromkeys(theirs["missing"]))
            unexpected.update(dict.fromkeys(theirs["unexpected"]))
            for k, (a, b) in theirs["shape"].items():
                shape.setdefault(k, (torch.Size(a), torch.Size(b)))
            for k, (a, b) in theirs["dtype"].items():
                dtype.setdefault(k, (_dtype_of(a), _dtype_of(b)))
            for k, reason in theirs["skipped"].items():
                skipped.setdefault(k, reason)
            for k, name in theirs["left"].items():
                left.setdefault(k, name)
        self.missing_keys, self.unexpected_keys = list(missing), list(unexpected)
        self.shape_mismatches, self.dtype_mismatches, self.skipped_objects = shape, dtype, skipped
        self.left_from_damaged = left
        self._found_on = {kk: ranks for kk, ranks in found.items() if len(ranks) < len(shared)}
        by_key: dict[str, set[int]] = {}
        for (_, key), ranks in found.items():
            by_key.setdefault(key, set()).update(ranks)
        self.ranks = {k: sorted(ranks) for k, ranks in by_key.items() if len(ranks) < len(shared)}
        self.restored_nothing_on = nothing

    def mismatched_on(self, world: int) -> set[int]:
        """The ranks of a job of ``world`` ranks where a mismatch of this report was found."""
        kinds: zip[tuple[str, Iterable[str]]] = zip(_KINDS, (
            self.missing_keys, self.unexpected_keys, self.shape_mismatches, self.dtype_mismatches, self.skipped_objects,
            self.left_from_damaged))
        return {rank for kind, keys in kinds for key in keys for rank in self._found_on.get((kind, key), range(world))}

    def unused_keys(self) -> list[str]:
        """Checkpoint values that were not applied: unexpected plus mismatched."""
        return sorted(set(self.unexpected_keys) | set(self.shape_mismatches) | set(self.dtype_mismatches))

    def lines(self, include: Iterable[str] = ("missing", "unexpected", "shape", "dtype", "skipped")) -> list[str]:
        wanted = set(include)
        out = []
        if "missing" in wanted and self.missing_keys:
            out.append(f"missing from the checkpoint ({len(self.missing_keys)}): {format_keys(self._on('missing', self.missing_keys))}")
        if "unexpected" in wanted and self.unexpected_keys:
            beyond = any(_RANK_SUFFIX.search(k) for k in self.unexpected_keys)
            out.append(
                f"unexpected in the checkpoint ({len(self.unexpected_keys)}): "
                f"{format_keys(self._on('unexpected', self.unexpected_keys))}"
                + (" (key~r<n>: rank n's per-rank value, which no rank of this job takes: the checkpoint was saved "
                   "by more ranks)" if beyond else "")
            )
        if "shape" in wanted and self.shape_mismatches:
            items = [f"{k}{self._ranks_of('shape', k)} (checkpoint {list(a)} vs object {list(b)})"
                     for k, (a, b) in self.shape_mismatches.items()]
            out.append(f"shape mismatches ({len(items)}): {format_keys(items)}")
        if "dtype" in wanted and self.dtype_mismatches:
            items = [f"{k}{self._ranks_of('dtype', k)} (checkpoint {a} vs object {b})" for k, (a, b) in self.dtype_mismatches.items()]
            out.append(f"dtype mismatches ({len(items)}): {format_keys(items)} (restore(..., cast=True) casts them, "
                       "as load_state_dict does, into any dtype but a quantized one)")
        if "missing" in wanted and self.meta_keys and set(self.meta_keys) & set(self.missing_keys):
            out.append(f"on the meta device, so not restored ({len(self.meta_keys)}): {format_keys(self.meta_keys)} "
                       "(restore(..., assign=True) materialises them, as load_state_dict(assign=True) does)")
        if "missing" in wanted and self.left_from_damaged:
            items = [f"{k}{self._ranks_of('left', k)} ({n})" for k, n in self.left_from_damaged.items()]
            out.append(f"written from a damaged checkpoint before its damage was found, and not restored from this "
                       f"one ({len(items)}): {format_keys(items)}; they may hold the damaged checkpoint's values, not "
                       "their initial ones")
        if "skipped" in wanted and self.skipped_objects:
            items = [f"{k}{self._ranks_of('skipped', k)}: {v}" for k, v in sorted(self.skipped_objects.items())]
            out.append(f"objects left untouched ({len(items)}): " + "; ".join(items))
        if wanted & {"missing", "unexpected"} and self.unused_renames:
            out.append(f"rename prefixes that renamed no checkpoint key ({len(self.unused_renames)}): "
                       f"{format_keys(self.unused_renames)}")
        return out

    def _ranks_of(self, kind: str, key: str) -> str:
        ranks = self._found_on.get((kind, key))
        return "" if not ranks else f" (on rank{'s' if len(ranks) > 1 else ''} {', '.join(map(str, ranks))})"

    def _on(self, kind: str, keys: list[str]) -> Iterable[str]:
        return (k + self._ranks_of(kind, k) for k in keys) if self._found_on else keys

    def __str__(self) -> str:
        lines = self.lines()
        if self.remapped_keys:
            lines.append(
                f"matched through a DDP 'module.' or torch.compile '_orig_mod.' prefix ({len(self.remapped_keys)}): "
                + format_keys(f"{a} -> {b}" for a, b in self.remapped_keys.items())
            )
        if self.renamed:
            lines.append(f"renamed ({len(self.renamed)}): "
                         + format_keys(f"{a} -> {b}" for a, b in self.renamed.items()))
        head = f"restored {plural(len(self.restored_keys), 'value')}"
        return head + ("; " + "; ".join(lines) if lines else "; everything matched")


def _dtype_of(name: Any) -> torch.dtype:
    found = format_tree.dtype_named(name) if isinstance(name, str) else None
    if found is None:
        raise ValueError(f"not a dtype: {name!r}")  # another rank of this job sent it: never a checkpoint's
    return found
