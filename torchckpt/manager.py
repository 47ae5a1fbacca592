"""``CheckpointManager``: numbered checkpoints in a directory, retention, resumable history.

It follows ``tf.train.CheckpointManager`` (numbering, ``max_to_keep``,
``keep_checkpoint_every_n_hours``, ``checkpoint_interval``, ``restore_or_initialize``, the state
file) and improves on it where TensorFlow loses data: a new number never overwrites an existing
checkpoint, a damaged state file is rebuilt from the committed checkpoints instead of silently
starting over, an old checkpoint is deleted only after the new one is committed, one process at a
time writes to a directory, and it can keep the best checkpoints by a metric and save in the
background.
"""

from __future__ import annotations

import contextlib
import os
import warnings
from collections.abc import Callable, Iterable
from typing import Any

import torch

from torchckpt import _clock
from torchckpt._dist import coordinator as dist_coordinator
from torchckpt._dist.coordinator import AnyCoordinator
from torchckpt._dist.preemption import PreemptionWatch
from torchckpt._format import spec
from torchckpt._history import arguments as history_arguments
from torchckpt._history import members as history_members
from torchckpt._history import state as history_state
from torchckpt._history.arguments import check_arguments, number_argument, plain_metrics, plain_number, unranked_metrics
from torchckpt._history.arguments import checkpoint_number as checkpoint_number_of
from torchckpt._history.ledger import Ledger
from torchckpt._history.recover import Ranking, resolve_ranking
from torchckpt._history.retention import MetricFn
from torchckpt._history.state import State
from torchckpt._load.rename import Rename, call_argument
from torchckpt._load.resume import assert_consumed_on_every_rank, restore_newest_intact, restore_order
from torchckpt._paths import as_path, join, name_of
from torchckpt._save.options import FailedAfterCommit, SaveHooks, SaveOptions, parse_size, save_arguments
from torchckpt._storage import claims
from torchckpt._storage.base import AlreadyCommitted
from torchckpt._storage.registry import storage_for
from torchckpt.checkpoint import Checkpoint, commit, restore_from
from torchckpt.errors import CheckpointError
from torchckpt.restore import RestoreStatus

__all__ = ["CheckpointManager"]


def _check_arguments(checkpoint: Any, max_shard_size: Any, **arguments: Any) -> None:
    if not isinstance(checkpoint, Checkpoint):
        raise TypeError(f"CheckpointManager needs a torchckpt.Checkpoint, got {type(checkpoint).__name__}.")
    check_arguments(**arguments)
    parse_size(max_shard_size)


_PARTIAL_ADVICE = ("restore_or_initialize(strict=True) makes this an error; to accept a partial restore, filter the "
                   "warning: warnings.filterwarnings('ignore', category=torchckpt.PartialRestoreWarning).")


class CheckpointManager:
    """Saves numbered checkpoints into a directory and keeps the last N (and more).

    Args:
        checkpoint: the :class:`Checkpoint` to save and restore.
        directory: where checkpoints go (created if needed).
        max_to_keep: how many recent checkpoints to keep; None keeps all.
        keep_checkpoint_every_n_hours: also keep forever one checkpoint per this many hours.
        checkpoint_name: checkpoints are ``{directory}/{checkpoint_name}-{n}``.
        step_counter: an int tensor (or anything ``int()`` accepts) read at each save.
        checkpoint_interval: save only when ``step_counter`` advanced by at least this much.
        init_fn: called by :meth:`restore_or_initialize` when there is nothing to restore.
        keep_best: also keep the ``keep_best`` best checkpoints by ``best_metric``.
        best_metric: the key of the ``metrics`` dict passed to :meth:`save`, or a callable on it.
        best_mode: ``"min"`` (lower is better) or ``"max"``.
        async_save: :meth:`save` returns once the state is copied; writing happens in the background.
        max_shard_size: bytes per shard, or a string such as ``"2GB"`` (see ``Checkpoint.write``).
        progress: progress bars (None: on a terminal, for large saves).
        storage_options: passed to fsspec when ``directory`` is a URL (``s3://bucket/run``).
        process_group: on several ranks the manager is collective over this group (None: the
            default group): every rank constructs it and calls ``save``, ``restore_or_initialize``
            and ``wait_until_finished`` in the same order. Rank 0 alone claims the directory,
            numbers, applies retention and writes the state file; every rank reports the same history.
        timeout_secs: how long a collective call waits for the other ranks (default 1800).
        preemption_signals: signals (``signal.SIGTERM``, SLURM's ``signal.SIGUSR1``) meaning "save
            and stop": their handlers (main thread; put back by :meth:`close`) only set a flag. The
            next :meth:`save` then writes whatever the interval, returns once it is durable, and
            :attr:`preempted` becomes True (on every rank at the same call); the loop stops.
        incremental: reuse the latest checkpoint's unchanged shards (hard links, server-side copies);
            each checkpoint stays standalone. False writes every byte.
        warm_page_cache: another process on this machine restores each new checkpoint next (a
            validation loop following the run): once a save is committed, the kernel reads its
            files back into the page cache in the background (up to half the free memory), so that
            process reads memory, not the disk. Costs one read of the checkpoint from the disk. Local
            filesystems only; on several ranks, rank 0's machine (it warms every rank's files).

    Example:
        >>> import tempfile, torch, torchckpt
        >>> ckpt = torchckpt.Checkpoint(w=torch.zeros(2))
        >>> mgr = torchckpt.CheckpointManager(ckpt, tempfile.mkdtemp(), max_to_keep=2)
        >>> paths = [mgr.save() for _ in range(3)]
        >>> [p.rsplit("/", 1)[1] for p in mgr.checkpoints]
        ['ckpt-2', 'ckpt-3']
    """

    def __init__(
        self,
        checkpoint: Checkpoint,
        directory: str | os.PathLike[str],
        max_to_keep: int | None = 5,
        keep_checkpoint_every_n_hours: float | None = None,
        checkpoint_name: str = "ckpt",
        step_counter: Any = None,
        checkpoint_interval: int | None = None,
        init_fn: Callable[[], Any] | None = None,
        *,
        keep_best: int | None = None,
        best_metric: str | MetricFn | None = None,
        best_mode: str | None = None,
        async_save: bool = False,
        max_shard_size: int | str = spec.DEFAULT_MAX_SHARD_SIZE,
        progress: bool | None = None,
        storage_options: dict[str, Any] | None = None,
        process_group: Any = None,
        timeout_secs: float | None = None,
        preemption_signals: Iterable[int] = (),
        incremental: bool = True,
        warm_page_cache: bool = False,
    ) -> None:
        max_to_keep, keep_best, checkpoint_interval, keep_checkpoint_every_n_hours = map(
            plain_number, (max_to_keep, keep_best, checkpoint_interval, keep_checkpoint_every_n_hours))
        self._coord = dist_coordinator.coordinator_for(process_group, timeout_secs)  # one bad on one rank: refused in the call
        arguments = {"call": "CheckpointManager", "directory": history_arguments.comparable(directory, as_path),
                     **{k: history_arguments.comparable(v) for k, v in (
                         ("checkpoint_name", checkpoint_name), ("max_to_keep", max_to_keep),
                         ("keep_checkpoint_every_n_hours", keep_checkpoint_every_n_hours),
                         ("checkpoint_interval", checkpoint_interval), ("keep_best", keep_best),
                         ("best_metric", best_metric if isinstance(best_metric, str) else None),
                         ("best_mode", best_mode), ("save_counter", getattr(checkpoint, "save_counter", None)))},
                     "init_fn": init_fn is not None, **save_arguments(max_shard_size, async_save)}

        signals: list[int] = []  # preemption_signals, checked (an iterator is read once)

        def configure() -> None:  # what may fail on one rank alone: inside the call, so that it fails on every rank
            signals.extend(PreemptionWatch.checked(preemption_signals))
            _check_arguments(checkpoint, max_shard_size, max_to_keep=max_to_keep, checkpoint_name=checkpoint_name,
                             step_counter=step_counter, checkpoint_interval=checkpoint_interval, keep_best=keep_best,
                             best_metric=best_metric, best_mode=best_mode,
                             keep_checkpoint_every_n_hours=keep_checkpoint_every_n_hours)
            self._directory = as_path(directory)
            self._storage = storage_for(self._directory, storage_options)
            self._ledger = Ledger(self._directory, self._storage, checkpoint_name,
                                  Ranking(keep_best, best_metric, best_mode or "min"))

        self._checkpoint = checkpoint
        self._max_to_keep = max_to_keep
        self._keep_every_n_hours = keep_checkpoint_every_n_hours
        self._name = checkpoint_name
        self._step_counter = step_counter
        self._checkpoint_interval = checkpoint_interval
        self._init_fn = init_fn
        self._max_shard_size = max_shard_size
        self._progress = progress
        self._last_checkpoint_step: int | None = None
        self._async_save = async_save
        self._incremental = bool(incremental)
        self._warm_page_cache = bool(warm_page_cache)
        self._warned_metric = False
        self._warned_differing = False  # once per manager: the ranks' metrics differed (rank 0's are recorded)
        self._read_only = False
        self._closed = False  # close() was called: this manager no longer counts among the claim's holders
        self._preempted = False
        self.last_restore: RestoreStatus | None = None  # the status of the last restore_or_initialize's restore
        self._claimed = False  # this construction took the directory's claim (rank 0): let go if it fails
        try:
            for message in self._open(arguments, configure):  # what recovering the history rebuilt, on every rank,
                warnings.warn(message, stacklevel=2)  # at the caller's line (an error where warnings are: everywhere)
            self._preemption = PreemptionWatch(signals)
        except BaseException:
            if self._claimed:  # also after the claim, when a rank gave up on this one meanwhile
                claims.let_go(self._storage, self._directory, self)
            raise

    def _open(self, arguments: dict[str, Any], configure: Callable[[], None]) -> list[str]:
        """Check the arguments (``configure``), claim the directory and load its history: rank 0
        alone touches the directory, and the other ranks take its view of the history (the same
        call on every rank, compared first). Returns the warnings of the recovery (rank 0's, on
        every rank)."""

        def open_on_rank_0() -> dict[str, Any]:
            rebuilt = self._open_and_load(arguments["best_mode"])
            return {"history": self._ledger.mirror(self._read_only) if self._coord.is_collective else None,
                    "rebuilt": rebuilt}

        what = f"Opening {arguments['directory']}"
        call = self._coord.call(what, arguments)
        call.consequence = "Nothing was claimed or changed."
        with call.failures_shared():
            configure()
            opened = dist_coordinator.decided(call, what, open_on_rank_0)
        if self._coord.rank != 0:
            state = self._adopt(opened["history"])
            ranking = self._ledger.ranking
            self._ledger.ranking = resolve_ranking(state, ranking.keep_best, ranking.best_metric, arguments["best_mode"])
        rebuilt: list[str] = opened["rebuilt"]
        return rebuilt

    def _open_and_load(self, best_mode: str | None) -> list[str]:
        if history_members.has_sealed_index(self._directory, self._storage):  # its next replacement would take the run
            raise CheckpointError(f"{self._directory} is a checkpoint, not a directory of checkpoints: pass the "
                                  "directory a manager writes into (its parent, for a manager's checkpoint), or restore "
                                  "this one with Checkpoint.restore.")
        self._read_only = claims.take(self._storage, self._directory, (f"{self._name}-", history_state.STATE_FILE),
                                       self._name, self)
        self._claimed = not self._read_only  # a failed construction holds nothing (see __init__)
        return self._ledger.load(_clock.now(), best_mode)

    @property
    def _is_primary(self) -> bool:
        """Whether this process decides for the job: a single process, or rank 0."""
        return self._coord.rank == 0

    # -- state ---------------------------------------------------------------------------

    def _adopt(self, mirror: dict[str, Any]) -> State:
        """Take rank 0's ledger (on the other ranks, which never read the directory)."""
        state, self._read_only = self._ledger.adopt(mirror)
        return state

    # -- public properties ----------------------------------------------------------------

    @property
    def directory(self) -> str:
        """The directory checkpoints are written into."""
        return self._directory

    @property
    def checkpoint(self) -> Checkpoint:
        return self._checkpoint

    @property
    def checkpoint_interval(self) -> int | None:
        return self._checkpoint_interval

    @property
    def latest_checkpoint(self) -> str | None:
        """The path of the newest checkpoint, or None."""
        return join(self._directory, self._ledger.latest) if self._ledger.latest else None

    @property
    def checkpoints(self) -> list[str]:
        """Paths of the checkpoints this manager keeps (and may delete later), oldest first."""
        return [join(self._directory, e.name) for e in self._ledger.kept]

    @property
    def best_checkpoint(self) -> str | None:
        """The checkpoint with the best ``best_metric``, kept or preserved, or None."""
        best = self._ledger.best()
        return join(self._directory, best) if best else None

    def metrics_of(self, path: str) -> dict[str, Any] | None:
        """The metrics recorded for a kept or preserved checkpoint."""
        return self._ledger.metrics_of(name_of(as_path(path)))

    # -- saving --------------------------------------------------------------------------

    def save(
        self,
        checkpoint_number: int | torch.Tensor | None = None,
        check_interval: bool = True,
        metrics: dict[str, Any] | None = None,
    ) -> str | None:
        """Save a new checkpoint and apply retention.

        Args:
            checkpoint_number: the number to use (an int or a 0-dim integer tensor); an existing
                checkpoint with that number is replaced atomically and moves to the end of
                ``checkpoints``. By default, the incremented ``save_counter``, skipping any number
                already in the directory; such a save never replaces a checkpoint.
            check_interval: with ``checkpoint_interval``, skip the save unless the step counter
                advanced enough. False always saves.
            metrics: str keys to numbers, bools, strings or None, recorded with the checkpoint
                (``keep_best`` ranks by them), at most 64 KiB of them as JSON. 0-dim tensors
                and NumPy scalars become floats; NaN and infinities are kept, and never rank best.

        Returns:
            The checkpoint's path, or None when skipped by the interval.

        Raises:
            UnsupportedStateError: nothing is written. Also any failure of a previous async save.
            TypeError, ValueError: bad ``metrics`` or ``checkpoint_number``; nothing is written.
            CheckpointError: the directory is read-only, or another process holds it.
        """
        what = f"Saving into {self._directory}"
        # every rank makes this same call; a bad argument or a failure on one fails it on every rank
        call = self._coord.call(what, {"call": "CheckpointManager.save", "directory": self._directory,
                                       "checkpoint_number": number_argument(checkpoint_number),
                                       "check_interval": bool(check_interval),
                                       "save_counter": self._checkpoint.save_counter})
        with call.failures_shared():
            return self._save(call, what, checkpoint_number, check_interval, metrics)

    def _save(self, call: AnyCoordinator, what: str, checkpoint_number: Any, check_interval: bool,
              metrics: dict[str, Any] | None) -> str | None:
        proposals = dist_coordinator.agree_all(call, what, lambda: self._propose(checkpoint_number, check_interval,
                                                                                metrics))
        proposal = {**proposals[call.rank], "signalled": any(p["signalled"] for p in proposals)}
        differing = None if self._warned_differing else history_arguments.differing_metrics([p["metrics"] for p in proposals])
        if differing:
            self._warned_differing = True
            warnings.warn(differing, stacklevel=3)  # save()'s caller
        if proposal["signalled"]:  # once any rank was signalled, this save is written, durably, whatever the interval
            self._preempted = True
            proposal["skip"] = False
        # on several ranks, rank 0's decision (number, interval) is everyone's
        decision = dist_coordinator.decided(call, what, lambda: self._decide(proposal))
        if decision["skip"]:
            return None
        previous_step = self._last_checkpoint_step
        if decision["step"] is not None:
            self._last_checkpoint_step = decision["step"]
        path = join(self._directory, f"{self._name}-{decision['number']}")
        try:
            commit(self._checkpoint, self._storage, path, call, self._save_options(decision),
                   SaveHooks(after=lambda: self._after_save(name_of(path), decision["metrics"], decision["time"]),
                             adopt=self._adopt))
        except BaseException as e:
            if self._checkpoint.save_counter != decision["counter"]:  # nothing committed: the interval is not used up
                self._last_checkpoint_step = previous_step
            self._put_back_forgotten()
            if isinstance(e, AlreadyCommitted):
                raise CheckpointError(
                    f"{path} appeared while it was being written: another process writes numbered checkpoints into "
                    f"{self._directory} without holding its claim. Nothing was committed or replaced; save again for "
                    "the next number."
                ) from None
            raise
        return path

    def _save_options(self, decision: dict[str, Any]) -> SaveOptions:
        metadata: dict[str, Any] = {spec.MANAGER_KEY: self._name}
        if decision["metrics"]:
            metadata["metrics"] = decision["metrics"]
        base = join(self._directory, decision["base"]) if decision.get("base") else None
        return SaveOptions.checked(decision["counter"], self._max_shard_size, self._progress, metadata,
                                   self._async_save and not self._preempted, replace=decision["explicit"], base=base,
                                   incremental=self._incremental,
                                   warm_page_cache=self._warm_page_cache and not self._preempted)

    def _after_save(self, name: str, metrics: dict[str, Any] | None, when: float) -> dict[str, Any] | None:
        """Once the checkpoint is committed (rank 0): record it, stamped ``when`` (the ``save()`` call's
        time, also for a save in the background), and apply retention; returns the history for the
        other ranks. A checkpoint retention cannot delete is a warning, not this save's failure (the
        save is committed and recorded). Where the state file cannot be written the save fails, and
        on several ranks every rank still takes the history rank 0 holds, the new checkpoint in it."""
        try:
            for old in self._ledger.record(name, metrics, when, self._max_to_keep, self._keep_every_n_hours):
                self._ledger.retire(old)
            return self._ledger.mirror(self._read_only) if self._coord.is_collective else None
        except BaseException as e:  # an interrupt too: the other ranks still take what this one holds
            if self._coord.is_collective:
                raise FailedAfterCommit(e, self._ledger.mirror(self._read_only)) from e
            raise

    def _propose(self, checkpoint_number: Any, check_interval: bool, metrics: Any) -> dict[str, Any]:
        """The arguments of one ``save`` checked, and the interval applied, before anything is written;
        a previous background failure and a read-only directory are raised here too."""
        self.wait_until_finished()
        if self._read_only:
            raise CheckpointError(
                f"Cannot save into {self._directory}: it is read-only, so this manager only reads it "
                "(restore_or_initialize, latest_checkpoint, checkpoints). Save to a writable directory."
            )
        metrics_copy = self._checked_metrics(metrics)
        self._ledger.check_room(metrics_copy, _clock.now(), self._max_to_keep, self._keep_every_n_hours)
        number = checkpoint_number_of(checkpoint_number) if checkpoint_number is not None else None
        skip, step = False, None
        if self._checkpoint_interval is not None:
            step = int(self._step_counter)
            last = self._last_checkpoint_step
            skip = bool(check_interval and last is not None and (
                step == last or step < last + self._checkpoint_interval))
        signalled = self._preemption.received is not None
        return {"skip": skip, "step": step, "metrics": metrics_copy, "number": number, "signalled": signalled}

    def _decide(self, proposal: dict[str, Any]) -> dict[str, Any]:
        """What this save does (on rank 0 for a job): skip it, or the number it writes and the
        ``save_counter`` it records (the checkpoint takes it once the write is accepted)."""
        self._storage.claim(self._directory)  # a no-op unless this is a forked child (or lost its lease)
        decision = {**proposal, "explicit": proposal["number"] is not None, "counter": self._checkpoint.save_counter,
                    "time": _clock.now()}  # the call's time, also for a save finished in the background
        if proposal["skip"]:
            return decision
        decision["counter"] = self._checkpoint.save_counter + 1
        if decision["number"] is None:
            decision["number"] = decision["counter"] = self._ledger.next_number(
                decision["counter"], self._storage.list_names(self._directory))
        else:
            history_members.refuse_replacing_other(join(self._directory, f"{self._name}-{decision['number']}"),
                                                   self._storage, f"save(checkpoint_number={decision['number']})")
            self._ledger.forget(f"{self._name}-{decision['number']}", _clock.now())  # a crash after the commit: adopted anew
        decision["base"] = self._ledger.latest if self._incremental else None  # the same on every rank
        return decision

    def _checked_metrics(self, metrics: Any) -> dict[str, Any] | None:
        """``metrics`` as plain values (``plain_metrics``); warns once when ``best_metric`` is not among them."""
        out = plain_metrics(metrics)
        if out is None:
            return None
        warning = None if self._warned_metric else unranked_metrics(self._ledger.ranking.best_metric, out)
        if warning:
            self._warned_metric = True
            warnings.warn(warning, stacklevel=7)  # save()'s caller: through _propose, agree_all's work, _save, save
        return out or None

    def wait_until_finished(self) -> None:
        """Block until the save in flight is durable; raise its failure, if any."""
        try:
            self._checkpoint.wait_until_finished()
        except BaseException:
            self._put_back_forgotten()
            raise

    def _put_back_forgotten(self) -> None:
        """After a save failed: the replaced checkpoint's entry back into the state file (rank 0)."""
        if not self._read_only and self._is_primary:
            with contextlib.suppress(CheckpointError, OSError):  # the save's own failure is what is raised
                self._ledger.put_back()

    def sync(self) -> None:
        """Alias of :meth:`wait_until_finished` (TensorFlow's name)."""
        self.wait_until_finished()

    # -- restoring -----------------------------------------------------------------------

    def restore_or_initialize(self, *, fallback: bool = True, strict: bool = False,
                              rename: Rename | None = None, read_once: bool | None = None) -> str | None:
        """Restore the newest intact checkpoint, or call ``init_fn`` when there is none.

        Args:
            fallback: when the latest checkpoint is damaged (a shard missing, truncated or failing
                its checksum; a damaged index), warn with :class:`DamagedCheckpointWarning` and
                restore the one before it (the same choice on every rank), and so on. The
                damaged one is recorded in the state file (``torchckpt ls`` marks it). With
                False, the :class:`CorruptCheckpointError` is raised instead.
            strict: raise :class:`RestoreMismatchError` unless the restore is complete in both
                directions (``assert_consumed()``), instead of warning and training on from
                initial values. :attr:`last_restore` holds the status either way.
            rename, read_once: as for :meth:`Checkpoint.restore`.

        Returns:
            The restored path, or None when ``init_fn`` ran (or there was nothing to do).

        Raises:
            CorruptCheckpointError: every checkpoint is damaged (``init_fn`` is not called: a run
                never silently starts over), or the latest is and ``fallback`` is False.
        """
        call = self._coord.call(f"Restoring from {self._directory}", {
            "call": "CheckpointManager.restore_or_initialize", "directory": self._directory,
            "fallback": bool(fallback), "strict": bool(strict), "read_once": read_once, **call_argument(rename)})
        with call.failures_shared():
            # First, and before any exchange: the history may still change (a background save
            # commits), and that save needs the Store, one operation at a time per process.
            self.wait_until_finished()
            return self._restore_or_initialize(call, fallback, strict, rename, read_once)

    def _restore_or_initialize(self, call: AnyCoordinator, fallback: bool, strict: bool,
                               rename: Rename | None, read_once: bool | None) -> str | None:
        ledger = self._ledger
        if ledger.latest is not None:  # the same on every rank: rank 0's
            paths = [join(self._directory, n) for n in restore_order(ledger.latest, ledger.entries())]
            found: dict[str, str] = {}
            written: dict[str, str] = {}  # what a damaged candidate's restore may have written: reported if left
            try:
                path, status = restore_newest_intact(
                    paths, lambda p: restore_from(self._checkpoint, self._storage, p, call, rename, read_once, written),
                    fallback, self._directory, lambda p, why: found.__setitem__(name_of(p), why))
            finally:
                if found:
                    ledger.damaged.update(found)
                    self._record_damage()
            self.last_restore = status
            if strict:  # one rank's mismatch fails the call on every rank, each with its own report
                assert_consumed_on_every_rank(call, status)
            if self._checkpoint_interval is not None:
                self._last_checkpoint_step = int(self._step_counter)
            if not strict:  # now: the status stays in last_restore, and its own warning would wait for the manager's end
                # last: a warning turned error leaves the manager as restored
                status.warn_if_partial(stacklevel=3, advice=_PARTIAL_ADVICE)
            return path
        if self._init_fn is not None:  # on every rank; a failure on one is raised on all
            dist_coordinator.agree(call, "init_fn", self._init_fn)
        else:
            call.check_call()
        return None

    def _record_damage(self) -> None:
        """Note the damaged checkpoints in the state file (rank 0), for ``ls`` and ``get_checkpoint_state``."""
        if self._read_only or not self._is_primary:
            return
        try:
            self._ledger.write()
        except (CheckpointError, OSError) as e:
            warnings.warn(f"Could not record the damaged checkpoints in {self._directory}'s state file: {e}",
                          stacklevel=4)

    @property
    def preempted(self) -> bool:
        """Whether a preemption signal arrived (on any rank): set by the ``save()`` that saw it,
        which wrote a durable checkpoint. The training loop should stop."""
        return self._preempted

    @property
    def read_only(self) -> bool:
        """Whether the directory could not be claimed for writing (a read-only mount): the manager
        then reads it only, and :meth:`save` raises."""
        return self._read_only

    def close(self) -> None:
        """Wait for the save in flight, put back the signal handlers that were there before
        ``preemption_signals`` were installed, and release the directory for other processes."""
        try:
            self.wait_until_finished()
        finally:
            self._preemption.close()
            if not self._read_only and self._is_primary and not self._closed:
                claims.let_go(self._storage, self._directory, self)  # the claim goes with the last manager of the process
            self._closed = True

    def __enter__(self) -> CheckpointManager:
        return self

    def __exit__(self, *exc: object) -> None:
        """:meth:`close`: the save in flight finishes (its failure is raised), the directory is released."""
        self.close()

    def __repr__(self) -> str:
        return f"CheckpointManager({self._directory!r}, latest={self._ledger.latest!r}, kept={len(self._ledger.kept)})"


