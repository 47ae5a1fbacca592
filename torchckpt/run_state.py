"""A read-only view of a run: ``get_checkpoint_state(directory)``, TensorFlow's name.

An evaluation script, a dashboard or a second machine wants to know what a run has saved without
becoming its manager. This reads the state file and lists the committed checkpoints; it never
takes the directory's claim and never writes, so it works while the run is saving and on a
read-only mount.
"""

from __future__ import annotations

import os
from dataclasses import dataclass, field
from typing import Any

from torchckpt._history import state as history_state
from torchckpt._history.retention import best_entries
from torchckpt._storage.base import as_path, join
from torchckpt._storage.registry import storage_for

__all__ = ["CheckpointState", "get_checkpoint_state"]


@dataclass(frozen=True)
class CheckpointState:
    """What a directory of checkpoints holds. Paths are ``directory`` joined with each name.

    Attributes:
        latest: the newest committed checkpoint, or None.
        all: every committed numbered checkpoint on disk, oldest (lowest number) first.
        kept: those a manager keeps and may delete later, oldest first.
        preserved: those kept forever (``keep_checkpoint_every_n_hours``, or in doubt).
        best: the kept checkpoint with the best ``best_metric`` the manager recorded, or None.
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
    members = history_state.committed_members(root, None, storage)
    latest = history_state.latest_in(root, storage)
    if latest is None and not members:
        return None

    def paths(entries: list[history_state.Entry]) -> list[str]:
        return [join(root, e.name) for e in entries if history_state.is_member(root, e.name, storage)]

    kept = [e for e in state.checkpoints if history_state.is_member(root, e.name, storage)]
    best = best_entries(kept, 1, state.best_metric, state.best_mode) if state.best_metric else []
    metrics = {join(root, e.name): dict(e.metrics) for e in [*state.checkpoints, *state.preserved]
               if e.metrics and history_state.is_member(root, e.name, storage)}
    return CheckpointState(
        latest=latest,
        all=[join(root, n) for n in members],
        kept=paths(kept),
        preserved=paths(state.preserved),
        best=join(root, best[0].name) if best else None,
        metrics=metrics,
        damaged={join(root, n): why for n, why in state.damaged.items() if history_state.is_member(root, n, storage)},
    )
