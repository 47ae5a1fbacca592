"""Which checkpoints a manager keeps: a pure function of its history, tested by a table.

TensorFlow's rule, extended with keep-best: the last ``max_to_keep`` checkpoints are kept, plus
(``keep_best``) the ``k`` best by a metric. A checkpoint that falls out of both, oldest first, is
preserved forever when ``keep_checkpoint_every_n_hours`` is set and it was written at least that
long after the last preserved one; otherwise it is deleted.

A checkpoint a restore found damaged (and passed over) counts for none of these: the last
``max_to_keep`` are the last intact ones, a damaged one is never best and never preserved, and it
is deleted once it is older than every one of those. Otherwise the save after a fallback would
keep the damaged checkpoint and delete the intact one the run had just resumed from.
"""

from __future__ import annotations

import math
from collections.abc import Callable, Collection, Sequence
from dataclasses import dataclass
from typing import Any

from torchckpt._history.state import Entry

MetricFn = Callable[[dict[str, Any]], Any]


@dataclass(frozen=True)
class Retention:
    """The outcome of :func:`plan_retention`."""

    kept: list[Entry]
    delete: list[Entry]
    preserve: list[Entry]
    last_preserved_timestamp: float


def metric_value(entry: Entry, metric: str | MetricFn | None) -> float | None:
    """The entry's metric as a float, or None when it has none (or it is NaN or infinite: a diverged
    run's loss never ranks best)."""
    if metric is None or not entry.metrics:
        return None
    try:
        raw = metric(entry.metrics) if callable(metric) else entry.metrics.get(metric)
        value = float(raw) if raw is not None else None
    except Exception:  # noqa: BLE001 - a caller's callable that cannot rank these metrics (0 / 0): never best
        return None  # (raising here, after the commit, would fail every save from this one on)
    return None if value is None or not math.isfinite(value) else value


def metric_failure(metric: MetricFn, metrics: dict[str, Any]) -> str | None:
    """What a callable ``best_metric`` raises on ``metrics`` (``"ZeroDivisionError: division by
    zero"``), for the manager's warning; None when it ranks them."""
    try:
        raw = metric(metrics)
        if raw is not None:  # None: no value for these metrics, as metric_value takes it
            float(raw)
    except Exception as e:  # noqa: BLE001 - whatever the caller's callable raises
        return f"{type(e).__name__}: {e}"
    return None


def best_entries(entries: Sequence[Entry], k: int, metric: str | MetricFn | None, mode: str,
                 damaged: Collection[str] = ()) -> list[Entry]:
    """The ``k`` best entries by metric (ties: the newer one wins), best first; one ``damaged``
    names (a restore found it damaged) is never best."""
    scored = [(v, i, e) for i, e in enumerate(entries)
              if e.name not in damaged and (v := metric_value(e, metric)) is not None]
    sign = 1.0 if mode == "min" else -1.0
    scored.sort(key=lambda item: (sign * item[0], -item[1]))
    return [e for _, _, e in scored[:k]]


def ranked_history(kept: Sequence[Entry], preserved: Sequence[Entry], metric: str | MetricFn | None, mode: str,
                   damaged: Collection[str] = ()) -> list[Entry]:
    """Every checkpoint a manager has, kept or preserved, with a metric, best first: the candidates
    for ``best_checkpoint``. Retention keeps the best among the kept, but a preserved one (kept
    forever: every n hours, or a history rebuilt after a crash) can be better, and is on disk as
    long as any. Ties: the newer wins."""
    ordered = sorted([*preserved, *kept], key=lambda e: e.timestamp if e.timestamp is not None else -math.inf)
    return best_entries(ordered, len(ordered), metric, mode, damaged)


def plan_retention(
    entries: Sequence[Entry],
    max_to_keep: int | None,
    keep_checkpoint_every_n_hours: float | None,
    last_preserved_timestamp: float,
    keep_best: int | None = None,
    best_metric: str | MetricFn | None = None,
    best_mode: str = "min",
    damaged: Collection[str] = (),
) -> Retention:
    """Split ``entries`` (oldest first) into kept, deleted and preserved; ``damaged`` names the
    checkpoints a restore found damaged (see the module).

    Example:
        >>> e = [Entry(f"ckpt-{i}", float(i)) for i in range(1, 5)]
        >>> r = plan_retention(e, max_to_keep=2, keep_checkpoint_every_n_hours=None, last_preserved_timestamp=0.0)
        >>> [x.name for x in r.kept], [x.name for x in r.delete]
        (['ckpt-3', 'ckpt-4'], ['ckpt-1', 'ckpt-2'])
    """
    if max_to_keep is None:
        return Retention(list(entries), [], [], last_preserved_timestamp)
    intact = [e for e in entries if e.name not in damaged]
    last = intact[max(0, len(intact) - max_to_keep):]
    keep = {id(e) for e in last}
    if damaged:  # a damaged one among (or after) the last intact ones stays, for a look; older ones go
        start = next((i for i, e in enumerate(entries) if e is last[0]), 0) if last else 0  # none intact: all stay
        keep |= {id(e) for e in entries[start:]}
    if keep_best:
        keep |= {id(e) for e in best_entries(entries, keep_best, best_metric, best_mode, damaged)}
    kept, delete, preserve = [], [], []
    lpt = last_preserved_timestamp
    for entry in entries:
        if id(entry) in keep:
            kept.append(entry)
            continue
        ts = entry.timestamp if entry.timestamp is not None else lpt
        if (keep_checkpoint_every_n_hours and entry.name not in damaged
                and ts - keep_checkpoint_every_n_hours * 3600.0 >= lpt):
            preserve.append(entry)
            lpt = ts
        else:
            delete.append(entry)
    return Retention(kept, delete, preserve, lpt)
