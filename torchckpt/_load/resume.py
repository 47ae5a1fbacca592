"""Resuming a run: the newest intact checkpoint, loudly, and a strict match on every rank.

Why fall back at all: a node that died while a disk was flaky, or a bit flipped on its way to an
object store, damages the newest checkpoint of a run; raising then makes a job crash-loop, and
starting over silently loses the run. So a resume tries the checkpoints newest first, warns with
``DamagedCheckpointWarning`` for each damaged one it passes, and raises only when none is intact
(never calling ``init_fn``). On several ranks the restore of each candidate is one collective
call whose failure is the same on every rank, so every rank passes the same candidates.
"""

from __future__ import annotations

import warnings
from collections.abc import Callable
from typing import Any, TypeVar

from torchckpt._dist import coordinator
from torchckpt._history import members as history_members
from torchckpt._history.state import Entry
from torchckpt._load.plan import Plan
from torchckpt._paths import name_of
from torchckpt.errors import (
    CheckpointNotFoundError,
    CorruptCheckpointError,
    DamagedCheckpointWarning,
    RestoreMismatchError,
)

T = TypeVar("T")


def restore_order(latest: str | None, entries: list[Entry]) -> list[str]:
    """The names to try: ``latest``, then every other known checkpoint, newest first (by time,
    then number)."""
    others = sorted(entries, reverse=True, key=lambda e: (e.timestamp or 0.0, history_members.number_of(e.name) or -1))
    return list(dict.fromkeys([n for n in [latest, *(e.name for e in others)] if n is not None]))


def restore_newest_intact(paths: list[str], restore: Callable[[str], T], fallback: bool, directory: str,
                          damaged: Callable[[str, str], None]) -> tuple[str, T]:
    """``restore`` the first of ``paths`` that is intact; returns its path and what ``restore`` returned.

    A damaged one (``CorruptCheckpointError``; ``CheckpointNotFoundError`` for one that is gone)
    is reported to ``damaged(path, reason)`` and warned about, and the next one is tried.

    Raises:
        CorruptCheckpointError: the first one is damaged and ``fallback`` is False (its own
            error), or every one is damaged.
    """
    passed: list[str] = []
    for i, path in enumerate(paths):
        try:
            return path, restore(path)
        except (CorruptCheckpointError, CheckpointNotFoundError) as e:
            if not fallback:
                raise
            reason = "it is gone" if isinstance(e, CheckpointNotFoundError) else str(e)
            damaged(path, reason)
            passed.append(name_of(path))
            warnings.warn(DamagedCheckpointWarning(path, reason, paths[i + 1] if i + 1 < len(paths) else None),
                          stacklevel=4)
    raise CorruptCheckpointError(
        f"Every checkpoint of {directory} is damaged ({', '.join(passed)}), so nothing was restored and init_fn "
        "was not called: the run does not silently start over. See the warnings for what is wrong with each; "
        "restore an older copy, or move them away to start afresh.",
        directory,
    )


def assert_consumed_on_every_rank(call: coordinator.AnyCoordinator, status: Any) -> None:
    """``status.assert_consumed()`` (a ``RestoreStatus``) on every rank: a mismatch on any rank
    raises ``RestoreMismatchError`` on every rank, naming the ranks, with this rank's own report."""
    if not call.is_collective:
        status.assert_consumed()
        return

    def mismatch() -> str | None:
        try:
            status.assert_consumed()
        except RestoreMismatchError as e:
            return str(e)
        return None

    found = coordinator.agree_all(call, f"Restoring {status.path}", mismatch)
    ranks = [rank for rank, message in enumerate(found) if message is not None]
    if ranks:  # every rank's report lists every rank's mismatches: name the ranks they were found on
        ranks = [r for r in ranks if r in status.report.mismatched_on(len(found))] or ranks
        error = RestoreMismatchError(
            f"The restore of {status.path} did not match on rank{'s' if len(ranks) > 1 else ''} "
            f"{', '.join(map(str, ranks))} (strict=True). On rank {ranks[0]}: {found[ranks[0]]}", status.report)
        error.ranks = ranks  # type: ignore[attr-defined]
        raise error


def note_failed(plan: Plan, name: str) -> None:
    """The restore of the checkpoint ``name`` planned as ``plan`` failed: add to its ``earlier_writes``
    (shared by every candidate of one resume) the keys whose objects it may have changed: none
    before a byte was read; the tensors read in place; once the loads ran, everything it planned."""
    if plan.stage != "planned":
        written = plan.in_place if plan.stage == "reading" else [*plan.in_place, *_objects_keys(plan, plan.report.restored_keys)]
        plan.earlier_writes.update(dict.fromkeys(written, name))


def note_left(plan: Plan) -> None:
    """The restore planned as ``plan`` succeeded: report what an earlier, damaged candidate may have
    written that it did not restore (``MismatchReport.left_from_damaged``)."""
    if plan.earlier_writes:
        restored = {*_objects_keys(plan, plan.report.restored_keys), *plan.in_place}
        replaced = tuple(plan.replaced)  # the tensors read into before are no longer the object's
        plan.report.left_from_damaged = {k: n for k, n in plan.earlier_writes.items()
                                         if k not in restored and not k.startswith(replaced)}


def _objects_keys(plan: Plan, keys: list[str]) -> list[str]:
    """``keys`` as the objects name them: two checkpoints may name one parameter differently (a
    DDP ``module.`` or ``torch.compile`` ``_orig_mod.`` prefix, ``MismatchReport.remapped_keys``)."""
    remapped = plan.report.remapped_keys
    return [remapped.get(k, k) for k in keys] if remapped else keys
