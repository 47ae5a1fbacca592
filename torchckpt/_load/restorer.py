"""The one restore path of a checkpoint: resolve, open, plan, execute; one process or every rank.

1. resolve: the checkpoint to read (a directory of checkpoints names its latest; on several
   ranks rank 0 decides, once, for everyone);
2. open: the index, and every shard at once, so that a deletion from then on cannot touch the read
   (one of many ranks opens each shard it reads as it checks its header, at the end of planning;
   past the process's hard limit on open files, a few are held open at a time: ``opened.OpenShards``);
3. plan: rename the saved state tree's keys into the objects' (``rename``, when asked), then
   match the tracked objects to it (``match``); the tree is dropped before any tensor is read,
   and only the plan stays in memory;
4. execute: read the planned tensors file by file, straight into their destinations, then run
   the loads (``execute.execute``).

On several ranks every rank restores its own part, and a failure on any rank is raised on every
rank; a rank whose part was restored when another failed says so. A single process takes the same
steps with a ``Solo`` coordinator, for which deciding and agreeing just run the work.
"""

from __future__ import annotations

import contextlib
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any

from torchckpt._dist import coordinator as dist_coordinator
from torchckpt._dist.coordinator import AnyCoordinator
from torchckpt._format import index as format_index
from torchckpt._format.spec import SAVE_COUNTER
from torchckpt._history import members as history_members
from torchckpt._load import index_fields, opened, recheck, rename, resume, spread
from torchckpt._load.execute import check_headers, execute, load, mark_written, read
from torchckpt._load.match import Matcher, Tracking
from torchckpt._load.plan import MISSING, Plan, plan_value
from torchckpt._load.rename import Renamer
from torchckpt._load.report import MismatchReport
from torchckpt._paths import name_of
from torchckpt._storage.base import Storage
from torchckpt._threads import gc_paused
from torchckpt.errors import RESTORED_ON_THIS_RANK, CheckpointNotFoundError, CorruptCheckpointError


@dataclass(frozen=True)
class Target:
    """What a restore writes into: a checkpoint's tracked objects (assigned into by name), how to see
    what they are, where its ``save_counter`` goes (None: not expected, as ``Checkpoint.read``), and
    the rename from the checkpoint's keys to the objects' (None: keys match as they are)."""

    tracked: dict[str, Any]
    tracking: Tracking
    set_counter: Callable[[int], None] | None
    rename: Renamer | None = None


@dataclass(frozen=True)
class Restored:
    """What a restore did: the mismatches it skipped, and the checkpoint it read."""

    report: MismatchReport
    directory: str


def restore(target: Target, storage: Storage, path: str, coord: AnyCoordinator, plan: Plan, verify: bool,
            progress: bool | None) -> Restored:
    """Restore ``target`` from ``path`` (a checkpoint, or a directory of them: its latest)."""
    plan.rank = coord.rank
    plan.world = coord.world
    coord.consequence = "Nothing was restored."

    def choose() -> str:  # on rank 0, for everyone
        with gc_paused():
            return history_members.resolve_checkpoint(path, storage)

    def restore_mine(directory: str) -> Restored:
        with gc_paused():
            return _restore_from(target, storage, directory, plan, verify, progress if coord.rank == 0 else False,
                                 coord)

    what = f"Restoring {path}"
    chosen = dist_coordinator.decided(coord, what, choose)
    mine: list[Restored] = []

    def run() -> dict[str, Any] | None:
        mine.append(restore_mine(chosen))
        coord.consequence = RESTORED_ON_THIS_RANK
        resume.note_left(plan)
        return mine[0].report.shared()

    # the outcome's exchange carries each rank's mismatches, those the loads found too: every
    # rank's report lists the job's, so assertions raise on every rank alike
    try:
        shared = dist_coordinator.agree_all(coord, what, run, RESTORED_ON_THIS_RANK)
    except (CorruptCheckpointError, CheckpointNotFoundError):
        resume.note_failed(plan, name_of(chosen))  # for the next candidate of restore_or_initialize
        raise
    if coord.is_collective:
        mine[0].report.merge(shared)
    return mine[0]


def _restore_from(target: Target, storage: Storage, directory: str, plan: Plan, verify: bool,
                  progress: bool | None, coord: AnyCoordinator) -> Restored:
    """Steps 2 to 4 on this rank. On several ranks the plan (with the check of the headers each rank
    reads) and the reads each end in an exchange every rank makes, failed or not: a failure in
    planning is raised on every rank before any rank reads, and, when the ranks spread their
    replicated reads (``_load.spread``), a failed read before any broadcast."""
    with contextlib.ExitStack() as stack:
        opened_shards: list[opened.OpenShards] = []
        seals: list[str] = []  # the seal of the index the plan was made from
        found: list[Any] = []  # the reads every rank makes alike (``spread.replicated``)

        def open_and_plan() -> None:
            index = opened.load_index(directory, storage)
            # opened together (one of many ranks: each shard it reads, as it checks its header at
            # the end of planning): a deletion from then on cannot touch the read (past the hard
            # limit on open files a few at a time, and a shard replaced meanwhile is noticed)
            solo = isinstance(coord, dist_coordinator.Solo)
            # a shard missing, or a header not the index's: damaged, or replaced meanwhile
            with recheck.noticing(directory, index.seal, storage):
                shards = stack.enter_context(opened.OpenShards(index, storage, lazy=not solo))
                opened_shards.append(shards)
                # One of many ranks checks only the headers of the shards it reads (plan_and_describe).
                _plan(target, index, shards, plan, deferred=not solo)
            if solo and shards.pinned:  # every shard is open and checked: still this index's?
                recheck.confirm_unchanged(directory, index.seal, storage)
            seals.append(index.seal)
            # the index is dropped: only the plan stays in memory

        if isinstance(coord, dist_coordinator.Solo):
            open_and_plan()
            execute(plan, opened_shards[0], verify, progress)
            return Restored(plan.report, directory)

        def plan_and_describe() -> dict[str, Any]:
            open_and_plan()
            # Each rank checks the headers of the shards it reads, and every rank learns the outcome
            # before any reads: a damaged header fails the restore before any object changes.
            check_headers(plan, opened_shards[0])
            if opened_shards[0].pinned:  # the shards it opened: still this index's?
                recheck.confirm_unchanged(directory, seals[0], storage)
            if plan.read_once is False:
                return {"seal": seals[0], "described": None}
            found.extend(spread.replicated(plan))
            return {"seal": seals[0], "described": spread.describe(found, coord)}

        planned = dist_coordinator.agree_all(coord, coord.what, plan_and_describe)
        if len({p["seal"] for p in planned}) > 1:  # each rank read index.json itself: one read another checkpoint
            raise recheck.replaced_meanwhile(directory, "the ranks read two different index.json files")
        described = [p["described"] for p in planned]
        spreading = spread.assign(plan, found, described, coord)
        shards = opened_shards[0]
        dist_coordinator.agree(coord, coord.what, lambda: read(plan, shards, verify, progress))
        if spreading is not None:
            spread.broadcast(spreading)
            mark_written([t for run in spreading.runs for t in run])  # gloo wrote them behind autograd's back
        load(plan, shards, verify)
    return Restored(plan.report, directory)


def _plan(target: Target, index: format_index.Index, shards: opened.OpenShards, plan: Plan, deferred: bool) -> None:
    """Match the checkpoint against the tracked objects into ``plan``. The state tree is dropped on
    return, before any tensor is read. ``deferred``: leave each shard header's check until the shard
    is read (``opened.read_shard_headers``)."""
    infos = opened.read_shard_headers(index, shards, deferred=deferred)
    saved = opened.state_tree(index, infos.__getitem__, plan.rank)
    del infos
    plan.versions = index.module_versions()
    plan.saved_world = index.world_size
    index_fields.metadata_of(index)  # unused here, but what verify and ls call damaged is not restored either
    renamed = None
    if target.rename is not None:  # the same on every rank: each renames the tree it restores from
        renamed = rename.apply(target.rename, saved, SAVE_COUNTER)
        saved = renamed.state
        plan.versions = rename.module_versions(target.rename, plan.versions)
    matcher = Matcher(plan, target.tracking)
    matcher.checkpoint(target.tracked, saved, "", SAVE_COUNTER)
    matcher.settle_shared_tensors()
    if renamed is not None:
        renamed.annotate(plan.report)
    plan.report.unexpected_keys.extend(index_fields.beyond_world(index, plan.world))
    if target.set_counter is not None:
        counter = saved.get(SAVE_COUNTER, MISSING)
        if counter is not MISSING:
            index_fields.save_counter_of(saved, index.directory)
        set_counter = target.set_counter
        plan_value(SAVE_COUNTER, counter, lambda v: set_counter(int(v)), plan)
