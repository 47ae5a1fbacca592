"""The wall clock that stamps checkpoints: an index's ``created``, and a manager's history
(``keep_checkpoint_every_n_hours`` counts from these stamps).

Why a leaf of its own rather than ``time.time()`` at each use: retention by age and the golden
index bytes are tested at set times, and a test stops this clock (:func:`frozen`) instead of
patching ``time`` inside the package's modules.
"""

from __future__ import annotations

import contextlib
import time
from collections.abc import Iterator


class Frozen:
    """A stopped clock: it shows ``now`` until a test sets ``now`` to another time."""

    def __init__(self, now: float) -> None:
        self.now = now


_stopped: Frozen | None = None


def now() -> float:
    """Seconds since the epoch: ``time.time()``, unless a test stopped the clock."""
    return time.time() if _stopped is None else _stopped.now


@contextlib.contextmanager
def frozen(at: float) -> Iterator[Frozen]:
    """Stop the clock at ``at`` while the block runs; set ``now`` of what it yields to move it.

    Example:
        >>> with frozen(10_000.0) as clock:
        ...     clock.now += 3600.0
        ...     now()
        13600.0
    """
    global _stopped
    before, _stopped = _stopped, Frozen(at)
    try:
        yield _stopped
    finally:
        _stopped = before
