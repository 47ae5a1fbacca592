"""A read-only view of a run: ``get_checkpoint_state(directory)`` and ``latest_checkpoint``, and
following a run as it saves (``wait_for_new_checkpoint``, ``checkpoints_iterator``); TensorFlow's names.

An evaluation script, a dashboard or a second machine wants to know what a run has saved without
becoming its manager. This reads the state file and lists the committed checkpoints; it never
takes the directory's claim and never writes, so it works while the run is saving and on a
read-only mount.
"""

from __future__ import annotations

import os
import time
from dataclasses import dataclass, field
from typing import Any

from torchckpt._history import members as history_members
from torchckpt._history import state as history_state
from torchckpt._history.retention import ranked_history
from torchckpt._paths import as_path, join, name_of, parent_of
from torchckpt._storage.registry import storage_for

__all__ = ["CheckpointState", "checkpoints_iterator", "get_checkpoint_state", "latest_checkpoint", "wait_for_new_checkpoint"]


@dataclass(frozen=True)
class CheckpointState:
    """What a directory of checkpoints holds. Paths are ``directory`` joined with each name.

    Attributes:
        latest: the newest committed checkpoint, or None.
        all: every committed numbered checkpoint on disk, oldest first (by the times the state
            file or, for one it does not record, its index records; then by number).
        kept: those a manager keeps and may delete later, oldest first.
        preserved: those kept forever (``keep_checkpoint_every_n_hours``, or in doubt).
        best: the checkpoint (kept or preserved) with the best ``best_metric`` the manager recorded, or None.
        metrics: path -> the metrics recorded with it by the manager.
        damaged: path -> why a manager's ``restore_or_initialize`` found it damaged and fell back.
    """

    latest: str | None
    all: list[str] = field(default_factory=list)
    kept: list[str] = field(default_factory=list)
    preserved: list[str] = field(default_factory=list)
    best: str | None = None
    metrics: dict[str, dict[str, Any]] = field(default_factory=dict)
    damaged: dict[str, str] = field(default_factory=dict)


def get_checkpoint_state(directory: str | os.PathLike[str], *,
                         storage_options: dict[str, Any] | None = None) -> CheckpointState | None:
    """The checkpoints of ``directory`` (a path or a URL), or None when it holds none.

    A damaged state file is ignored (the committed checkpoints on disk are still listed).

    Example:
        >>> import tempfile, torch, torchckpt
        >>> d = tempfile.mkdtemp()
        >>> torchckpt.get_checkpoint_state(d) is None
        True
        >>> mgr = torchckpt.CheckpointManager(torchckpt.Checkpoint(w=torch.zeros(1)), d, max_to_keep=1)
        >>> _ = [mgr.save(metrics={"loss": 1.0 / n}) for n in (1, 2)]
        >>> state = torchckpt.get_checkpoint_state(d)
        >>> [os.path.basename(p) for p in state.all], state.latest == mgr.latest_checkpoint
        (['ckpt-2'], True)
    """
    root = as_path(directory)
    storage = storage_for(root, storage_options)
    try:
        state = history_state.read_state(root, storage) or history_state.State()
    except history_state.StateFileError:
        state = history_state.State()
    members = history_members.committed_members(root, None, storage)
    latest = history_members.latest_in(root, storage)
    if latest is None and not members:
        return None

    def paths(entries: list[history_state.Entry]) -> list[str]:
        return [join(root, e.name) for e in entries if history_members.is_member(root, e.name, storage)]

    kept = [e for e in state.checkpoints if history_members.is_member(root, e.name, storage)]
    preserved = [e for e in state.preserved if history_members.is_member(root, e.name, storage)]
    ranked = ranked_history(kept, preserved, state.best_metric, state.best_mode, state.damaged) \
        if state.best_metric else []
    best = ranked[0] if ranked else None
    metrics = {join(root, e.name): dict(e.metrics) for e in [*state.checkpoints, *state.preserved]
               if e.metrics and history_members.is_member(root, e.name, storage)}
    return CheckpointState(
        latest=latest,
        all=[join(root, n) for n in history_members.oldest_first(root, members, {
            e.name: e.timestamp for e in [*state.checkpoints, *state.preserved] if e.timestamp is not None}, storage)],
        kept=paths(kept),
        preserved=paths(state.preserved),
        best=join(root, best.name) if best is not None else None,
        metrics=metrics,
        damaged={join(root, n): why for n, why in state.damaged.items() if history_members.is_member(root, n, storage)},
    )


def latest_checkpoint(directory: str | os.PathLike[str], *, storage_options: dict[str, Any] | None = None) -> str | None:
    """The newest committed checkpoint in ``directory`` (a path or a URL), or None.

    The state file's ``latest`` wins when it names a committed checkpoint; otherwise (no state
    file, a damaged one, or one naming a checkpoint that is gone) the committed numbered
    checkpoint written last is returned.

    Example:
        >>> import tempfile, torch, torchckpt
        >>> d = tempfile.mkdtemp()
        >>> torchckpt.latest_checkpoint(d) is None
        True
        >>> path = torchckpt.Checkpoint(w=torch.ones(2)).save(f"{d}/ckpt")
        >>> torchckpt.latest_checkpoint(d) == path
        True
    """
    root = as_path(directory)
    return history_members.latest_in(root, storage_for(root, storage_options))


def wait_for_new_checkpoint(
    checkpoint_dir: str | os.PathLike[str],
    last_checkpoint: str | None = None,
    seconds_to_sleep: float = 1.0,
    timeout: float | None = None,
    *,
    storage_options: dict[str, Any] | None = None,
) -> str | None:
    """Wait until ``latest_checkpoint(checkpoint_dir)`` differs from ``last_checkpoint``.

    Not for an older checkpoint of the same name while ``last_checkpoint`` is being replaced on
    an object store (``save(checkpoint_number=n)``: its index is gone for a moment before the new
    one is created): the replacement is waited for instead. A replacement under the same path is
    not new (as in TensorFlow, paths are compared).

    Returns:
        The new checkpoint's path, or None if ``timeout`` seconds passed first.
    """

    root = as_path(checkpoint_dir)
    storage = storage_for(root, storage_options)
    stop = time.time() + timeout if timeout is not None else None
    while True:
        path, recorded, earlier = history_members.latest_and_recorded(root, storage)
        if (path is not None and path != last_checkpoint and not _back_in_a_replacement(path, last_checkpoint, storage)
                and not _gone_since(last_checkpoint, recorded, path, earlier)):
            return path
        if stop is not None and time.time() >= stop:
            return None
        # the timeout is waited out, never cut short (TensorFlow returns as soon as the next poll
        # would pass it, so that checkpoints_iterator with a timeout_fn spins when it is shorter)
        time.sleep(seconds_to_sleep if stop is None else max(0.0, min(seconds_to_sleep, stop - time.time())))


def _gone_since(last: str | None, recorded: str | None, path: str, earlier: frozenset[str]) -> bool:
    """Whether ``last`` (yielded before) is the latest the state file still records, deleted since:
    ``path``, the checkpoint written before it, is not new (TensorFlow's ``latest_checkpoint`` is
    None then). One the state file records besides (``earlier``) was recorded before ``last``,
    whatever its number (a run numbered by step and restarted from an older one saves lower
    numbers after higher ones). A checkpoint the state file has not recorded yet (its writer died
    between the commit and the record) and is numbered after ``last`` is new."""
    if last is None or recorded is None or name_of(last) != recorded or parent_of(last) != parent_of(path):
        return False
    if name_of(path) in earlier:
        return True
    number, last_number = history_members.number_of(name_of(path)), history_members.number_of(recorded)
    return number is None or last_number is None or number <= last_number


def _back_in_a_replacement(path: str, last: str | None, storage: Any) -> bool:
    """Whether ``path`` is an older checkpoint than ``last`` (a lower number of the same name) that
    is the latest only because ``last`` is being replaced right now."""
    if last is None:
        return False
    new, old = name_of(path), name_of(last)
    number, last_number = history_members.number_of(new), history_members.number_of(old)
    if number is None or last_number is None or number >= last_number \
            or new[: new.rindex("-")] != old[: old.rindex("-")]:
        return False
    return history_members.is_being_replaced(join(parent_of(path), old), storage, time.time())


def checkpoints_iterator(
    checkpoint_dir: str | os.PathLike[str],
    min_interval_secs: float = 0,
    timeout: float | None = None,
    timeout_fn: Any = None,
    *,
    poll_interval_secs: float = 1.0,
    storage_options: dict[str, Any] | None = None,
) -> Any:
    """Yield each new committed checkpoint of ``checkpoint_dir`` as it appears (as TensorFlow's).

    A validation process uses it to follow a training run: it only ever yields checkpoints that
    are completely written. If several are written between two looks, only the newest is yielded.

    Args:
        checkpoint_dir: the directory a manager (or ``Checkpoint.save``) writes into.
        min_interval_secs: at least this long between yields (time the consumer spends counts).
        timeout: stop waiting for a new checkpoint after this many seconds (None: forever).
        timeout_fn: called after each yield and each timeout; when it returns True the iteration ends.
            Without it, a timeout ends the iteration.
        poll_interval_secs: how often to look for a new checkpoint (TensorFlow: 1 second).
        storage_options: passed to fsspec when ``checkpoint_dir`` is a URL.

    Example:
        >>> import tempfile, torchckpt
        >>> list(torchckpt.checkpoints_iterator(tempfile.mkdtemp(), timeout=0))
        []
    """

    path = None
    while True:
        new = wait_for_new_checkpoint(checkpoint_dir, path, poll_interval_secs, timeout,
                                      storage_options=storage_options)
        if new is None:
            if timeout_fn is None:
                return
        else:
            start = time.time()
            path = new
            yield new
            time.sleep(max(0.0, start + min_interval_secs - time.time()))
        if timeout_fn is not None and timeout_fn():
            return
