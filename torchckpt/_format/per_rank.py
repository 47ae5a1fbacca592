"""Per-rank values in a single process's save: each ``PerRank`` saved as the value it wraps.

A ``PerRank`` marks a value that differs from rank to rank, so that a save by several ranks keeps
every rank's own (format 2, ``_format.tree``). A single process has no ranks to keep apart, and a
single-process checkpoint (format 1) has no place for per-rank values: readers refuse the tag there.
So a one-process save unwraps them first, wherever they sit in the state.
"""

from __future__ import annotations

import copy
from typing import Any

from torchckpt._format.tree import MAX_DEPTH, PerRank


def without_per_rank(value: Any, depth: int = 0) -> Any:
    """``value`` with each ``PerRank`` in it replaced by the value it wraps; containers without one
    are returned as they are, not copied. Anything else (a tensor, a module) is left for the
    encoder, which stores it or refuses it by name."""
    if type(value) is PerRank:
        return without_per_rank(value.value, depth)
    if depth > MAX_DEPTH:  # too deep: the encoder refuses it by name
        return value
    if isinstance(value, dict):
        changed = {k: new for k, v in value.items() if (new := without_per_rank(v, depth + 1)) is not v}
        if not changed:
            return value
        out = copy.copy(value)  # a dict subclass (an OrderedDict, a defaultdict) stays one
        out.update(changed)
        return out
    if type(value) in (list, tuple):
        items = [without_per_rank(v, depth + 1) for v in value]
        if all(a is b for a, b in zip(items, value)):
            return value
        return items if type(value) is list else tuple(items)
    return value
