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

import os
import shutil
import time
import warnings
from collections.abc import Callable
from typing import Any

import torch

from torchckpt import _atomic, _directory, _format, _lock
from torchckpt._directory import Entry, State, StateFileError
from torchckpt._retention import MetricFn, best_entries, plan_retention
from torchckpt.checkpoint import Checkpoint

__all__ = ["CheckpointManager"]


def _number(value: Any) -> int:
    if isinstance(value, torch.Tensor):
        if value.dim() != 0 or value.dtype.is_floating_point or value.dtype.is_complex or value.dtype == torch.bool:
            raise ValueError(f"checkpoint_number must be an int or a 0-dim integer tensor, got {value!r}.")
        value = int(value.item())
    if isinstance(value, bool) or not isinstance(value, int):
        raise ValueError(f"checkpoint_number must be an int or a 0-dim integer tensor, got {value!r}.")
    if value < 0:
        raise ValueError(f"checkpoint_number must be non-negative, got {value}.")
    return value


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
        best_mode: str = "min",
        async_save: bool = False,
        max_shard_size: int | str = _format.DEFAULT_MAX_SHARD_SIZE,
        progress: bool | None = None,
    ) -> None:
        if not isinstance(checkpoint, Checkpoint):
            raise TypeError(f"CheckpointManager needs a torchckpt.Checkpoint, got {type(checkpoint).__name__}.")
        if max_to_keep is not None and (isinstance(max_to_keep, bool) or not isinstance(max_to_keep, int) or max_to_keep <= 0):
            raise ValueError(f"Expected a positive integer or `None` for `max_to_keep`, got {max_to_keep!r}.")
        if checkpoint_interval is not None and step_counter is None:
            raise ValueError("`step_counter` should be passed if `checkpoint_interval` is not None.")
        if keep_best is not None and (isinstance(keep_best, bool) or not isinstance(keep_best, int) or keep_best <= 0):
            raise ValueError(f"keep_best must be a positive integer or None, got {keep_best!r}.")
        if keep_best and best_metric is None:
            raise ValueError("keep_best needs best_metric: a key of the metrics passed to save(), or a callable.")
        if best_mode not in ("min", "max"):
            raise ValueError(f"best_mode must be 'min' or 'max', got {best_mode!r}.")
        if not checkpoint_name or os.sep in checkpoint_name or _atomic.is_temporary(checkpoint_name):
            raise ValueError(f"checkpoint_name must be a plain name, got {checkpoint_name!r}.")
        _format.parse_size(max_shard_size)
        self._checkpoint = checkpoint
        self._directory = os.fspath(directory)
        self._max_to_keep = max_to_keep
        self._keep_every_n_hours = keep_checkpoint_every_n_hours
        self._name = checkpoint_name
        self._step_counter = step_counter
        self._checkpoint_interval = checkpoint_interval
        self._init_fn = init_fn
        self._keep_best = keep_best
        self._best_metric = best_metric
        self._best_mode = best_mode
        self._max_shard_size = max_shard_size
        self._progress = progress
        self._last_checkpoint_step: int | None = None
        self._async_save = async_save
        os.makedirs(self._directory, exist_ok=True)
        _lock.claim_directory(self._directory)
        _atomic.remove_stale_temporaries(self._directory, f"{checkpoint_name}-")
        self._load_state()

    # -- state ---------------------------------------------------------------------------

    def _load_state(self) -> None:
        now = time.time()
        try:
            state = _directory.read_state(self._directory)
        except StateFileError as e:
            state = self._rebuild(f"the state file is damaged ({e})")
        else:
            if state is None:
                state = self._rebuild("there is no state file") if self._members() else None
        if state is None:
            self._latest: str | None = None
            self._kept: list[Entry] = []
            self._preserved: list[Entry] = []
            self._last_preserved_timestamp = now - 1.0
            return
        lpt = state.last_preserved_timestamp
        if now < lpt:
            warnings.warn(
                f"time.time() returned a value {lpt - now:f} seconds behind the last preserved checkpoint "
                "timestamp; keeping every checkpoint whose preservation is in doubt.",
                stacklevel=3,
            )
            lpt = now
        self._last_preserved_timestamp = lpt
        self._kept = []
        self._preserved = list(state.preserved)
        for entry in state.checkpoints:
            ts = entry.timestamp if entry.timestamp is not None else lpt
            ts = min(ts, now)
            if ts > lpt:
                self._kept.append(Entry(entry.name, ts, entry.metrics))
            else:  # in doubt: kept forever, never deleted
                self._preserved.append(entry)
        self._latest = state.latest
        newest = self._newest_unknown()
        if newest is not None:
            self._latest = newest
        if self._latest is not None and not os.path.isdir(os.path.join(self._directory, self._latest)):
            members = self._members()
            self._latest = members[-1] if members else self._latest

    def _members(self) -> list[str]:
        return _directory.committed_members(self._directory)

    def _rebuild(self, why: str) -> State:
        members = self._members()
        latest = _directory.latest_checkpoint(self._directory)
        warnings.warn(
            f"{self._directory}: {why}; rebuilt from the {len(members)} committed checkpoints on disk "
            f"(latest: {os.path.basename(latest) if latest else None}). They are kept and will never be deleted "
            "by this manager, since it cannot know which of them it managed.",
            stacklevel=4,
        )
        return State(
            latest=os.path.basename(latest) if latest else None,
            preserved=[Entry(n) for n in members],
            last_preserved_timestamp=time.time() - 1.0,
        )

    def _newest_unknown(self) -> str | None:
        """A committed checkpoint newer than all recorded ones (a crash between commit and state write)."""
        known = {e.name for e in self._kept} | {e.name for e in self._preserved}
        if self._latest:
            known.add(self._latest)
        numbers = [_directory.number_of(n, self._name) for n in known]
        top = max((n for n in numbers if n is not None), default=None)
        if top is None:
            return None
        newer = [n for n in _directory.committed_members(self._directory, self._name)
                 if (_directory.number_of(n, self._name) or -1) > top]
        return newer[-1] if newer else None

    def _record_state(self) -> None:
        metric = self._best_metric if isinstance(self._best_metric, str) else None
        _directory.write_state(
            self._directory,
            State(self._latest, list(self._kept), list(self._preserved), self._last_preserved_timestamp,
                  metric, self._best_mode),
        )

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
        return os.path.join(self._directory, self._latest) if self._latest else None

    @property
    def checkpoints(self) -> list[str]:
        """Paths of the checkpoints this manager keeps (and may delete later), oldest first."""
        return [os.path.join(self._directory, e.name) for e in self._kept]

    @property
    def best_checkpoint(self) -> str | None:
        """The kept checkpoint with the best ``best_metric``, or None."""
        best = best_entries(self._kept, 1, self._best_metric, self._best_mode)
        return os.path.join(self._directory, best[0].name) if best else None

    def metrics_of(self, path: str) -> dict[str, Any] | None:
        """The metrics recorded for a kept or preserved checkpoint."""
        name = os.path.basename(os.fspath(path))
        for entry in [*self._kept, *self._preserved]:
            if entry.name == name:
                return entry.metrics
        return None

    # -- saving --------------------------------------------------------------------------

    def _next_number(self) -> int:
        """The incremented ``save_counter``, moved past every number the directory has or had."""
        counter = self._checkpoint.save_counter
        names = {*os.listdir(self._directory), *(e.name for e in [*self._kept, *self._preserved])}
        if self._latest:
            names.add(self._latest)
        numbers = [_directory.number_of(n.split(_atomic.TMP_MARKER)[0].split(_atomic.OLD_MARKER)[0], self._name)
                   for n in names]
        top = max((n for n in numbers if n is not None), default=-1)
        if counter <= top:
            counter = top + 1
            object.__setattr__(self._checkpoint, "_save_counter", counter)
        return counter

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
                already in the directory.
            check_interval: with ``checkpoint_interval``, skip the save unless the step counter
                advanced enough. False always saves.
            metrics: JSON values recorded with the checkpoint (``keep_best`` ranks by them).

        Returns:
            The checkpoint's path, or None when skipped by the interval.

        Raises:
            UnsupportedStateError: nothing is written. Also any failure of a previous async save.
        """
        self._checkpoint.wait_until_finished()
        if self._checkpoint_interval is not None:
            current = int(self._step_counter)
            last = self._last_checkpoint_step
            if check_interval and last is not None and (
                current == last or current < last + self._checkpoint_interval
            ):
                return None
            self._last_checkpoint_step = current
        if metrics is not None and not isinstance(metrics, dict):
            raise TypeError(f"metrics must be a dict, got {type(metrics).__name__}.")
        counter_before = self._checkpoint.save_counter
        object.__setattr__(self._checkpoint, "_save_counter", counter_before + 1)
        try:
            number = _number(checkpoint_number) if checkpoint_number is not None else self._next_number()
            name = f"{self._name}-{number}"
            path = os.path.join(self._directory, name)
            metrics_copy = dict(metrics) if metrics else None
            self._checkpoint._commit(path, self._max_shard_size, self._progress,
                                     {"metrics": metrics_copy} if metrics_copy else None, self._async_save,
                                     after=lambda: self._record_and_sweep(name, metrics_copy))
        except BaseException:
            object.__setattr__(self._checkpoint, "_save_counter", counter_before)
            raise
        return path

    def _record_and_sweep(self, name: str, metrics: dict[str, Any] | None) -> None:
        now = time.time()
        self._kept = [e for e in self._kept if e.name != name]
        self._preserved = [e for e in self._preserved if e.name != name]
        self._kept.append(Entry(name, now, metrics))
        self._latest = name
        self._record_state()
        plan = plan_retention(self._kept, self._max_to_keep, self._keep_every_n_hours,
                              self._last_preserved_timestamp, self._keep_best, self._best_metric, self._best_mode)
        if not plan.delete and not plan.preserve:
            return
        self._kept = plan.kept
        self._preserved.extend(plan.preserve)
        self._last_preserved_timestamp = plan.last_preserved_timestamp
        self._record_state()  # the state never names a checkpoint that is being deleted
        for entry in plan.delete:
            self._delete(entry.name)

    def _delete(self, name: str) -> None:
        path = os.path.join(self._directory, name)
        if not os.path.isdir(path) or _directory.number_of(name, self._name) is None:
            return
        trash = _atomic.temporary_sibling(path, _atomic.OLD_MARKER)
        try:
            os.rename(path, trash)  # readers stop seeing it at once; removal can take a while
        except FileNotFoundError:
            return
        shutil.rmtree(trash, ignore_errors=True)

    def wait_until_finished(self) -> None:
        """Block until the save in flight is durable; raise its failure, if any."""
        self._checkpoint.wait_until_finished()

    def sync(self) -> None:
        """Alias of :meth:`wait_until_finished` (TensorFlow's name)."""
        self.wait_until_finished()

    # -- restoring -----------------------------------------------------------------------

    def restore_or_initialize(self) -> str | None:
        """Restore the latest checkpoint, or call ``init_fn`` when there is none.

        Returns:
            The restored path, or None when ``init_fn`` ran (or there was nothing to do).
        """
        self.wait_until_finished()
        if self._latest is not None:
            path = self.latest_checkpoint
            assert path is not None
            self._checkpoint.restore(path)
            if self._checkpoint_interval is not None:
                self._last_checkpoint_step = int(self._step_counter)
            return path
        if self._init_fn is not None:
            self._init_fn()
        return None

    def close(self) -> None:
        """Wait for the save in flight and release the directory for other processes."""
        self.wait_until_finished()
        _lock.release_directory(self._directory)

    def __repr__(self) -> str:
        return f"CheckpointManager({self._directory!r}, latest={self._latest!r}, kept={len(self._kept)})"


