"""Per-rank values (``PerRank``) around the state tree's codec (``_format.tree``).

A ``PerRank`` marks a value that differs from rank to rank, so that a save by several ranks keeps
every rank's own (format 2: ``{"@per_rank": [one value per rank]}``). A single process has no
ranks to keep apart, and a single-process checkpoint (format 1) has no place for the tag: readers
refuse it there. So a one-process save stores the values they wrap, wherever they sit
(``_format.tree.encode``), and lists their key paths in the index
(``spec.ONE_PROCESS_PER_RANK_KEY``), which a restore on another rank reports missing
(:func:`missing_on_other_ranks`).
:func:`without_per_rank` unwraps a live value. A reader of format 2 walks the JSON as it was read:
a rank's view of the tree (:func:`select_rank`), and the key paths of the per-rank values
(:func:`per_rank_paths`), named as the decoder names values.
"""

from __future__ import annotations

import copy
from collections.abc import Iterator
from typing import Any

from torchckpt._format.keypath import distinct_parts, escape_part, join, split
from torchckpt._format.tree import DICT_TYPES, MAX_DEPTH, PER_RANK_TAG, TAG, MissingPerRank, PerRank, corrupt_at, decode


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
        for k, v in changed.items():  # assigned: a Counter's own update() would add to its counts
            out[k] = v
        return out
    if type(value) in (list, tuple):
        items = [without_per_rank(v, depth + 1) for v in value]
        if all(a is b for a, b in zip(items, value)):
            return value
        return items if type(value) is list else tuple(items)
    return value


# The walks over raw JSON below count every dict and list (a tagged value's payload and each
# ``@dict`` pair too: a level of pairs is three, its tag's dict, the list of pairs and a pair), so a
# tree the decoder accepts is at most this deep for them.
_RAW_DEPTH = 3 * MAX_DEPTH + 3


def select_rank(node: Any, rank: int, saved_world: int, path: str = "", depth: int = 0) -> Any:
    """A format-2 state tree as rank ``rank`` sees it: each ``@per_rank`` value replaced by that
    rank's element, or by :class:`MissingPerRank` when the checkpoint has none for it.

    Raises:
        CorruptCheckpointError: a per-rank value without one element per rank, or containers
            nested deeper than the decoder takes (before they could exhaust the stack).
    """
    if depth > _RAW_DEPTH:
        raise corrupt_at(path, f"containers are nested more than {MAX_DEPTH} deep")
    if isinstance(node, dict):
        if len(node) == 1 and PER_RANK_TAG in node:
            values = node[PER_RANK_TAG]
            if not isinstance(values, list) or len(values) != saved_world:
                raise corrupt_at(path, f"a per-rank value must list one value for each of the {saved_world} ranks")
            return values[rank] if rank < saved_world else MissingPerRank(rank, saved_world)
        return {k: select_rank(v, rank, saved_world, join(path, k), depth + 1) for k, v in node.items()}
    if isinstance(node, list):
        return [select_rank(v, rank, saved_world, path, depth + 1) for v in node]
    return node


def per_rank_paths(node: Any, path: str = "", depth: int = 0) -> Iterator[str]:
    """The key paths of a format-2 state tree's per-rank values.

    Raises:
        CorruptCheckpointError: containers nested deeper than the decoder takes.
    """
    if depth > _RAW_DEPTH:
        raise corrupt_at(path, f"containers are nested more than {MAX_DEPTH} deep")
    if isinstance(node, dict):
        (tag, payload), = node.items() if len(node) == 1 and next(iter(node)).startswith(TAG) else ((None, None),)
        if tag == PER_RANK_TAG:
            yield path
        elif tag in DICT_TYPES and isinstance(payload, list):
            pairs = [pair for pair in payload if isinstance(pair, list) and len(pair) == 2]
            keys = [decode(pair[0], None, lambda name: None, path) for pair in pairs]  # a key, of its own depth
            for (_, value), part in zip(pairs, distinct_parts(keys)):
                yield from per_rank_paths(value, join(path, part), depth + 1)
        elif tag == "@tuple":
            yield from per_rank_paths(payload, path, depth + 1)
        elif tag is None:
            for k, v in node.items():
                yield from per_rank_paths(v, join(path, escape_part(k)), depth + 1)
    elif isinstance(node, list):
        for i, v in enumerate(node):
            yield from per_rank_paths(v, join(path, str(i)), depth + 1)


def missing_on_other_ranks(tree: Any, paths: list[str], rank: int) -> Any:
    """A single process's decoded state tree as rank ``rank`` (not 0) sees it: the values at
    ``paths`` (its index lists them, each key named as ``diff`` and ``get_value`` name it) are rank
    0's, and :class:`MissingPerRank` here, as a format-2 checkpoint gives a rank it has no value for.
    One walk for all of them (a dict of thousands of per-rank values is spelled out once); a path
    that leads nowhere changes nothing."""
    wanted: dict[str, Any] = {}
    for path in paths:
        node = wanted
        for part in split(path):
            if _HERE in node:
                break  # within a value already replaced
            node = node.setdefault(part, {})
        else:
            node.clear()  # the whole value: what is below it goes with it
            node[_HERE] = {}
    return _marked(tree, wanted, MissingPerRank(rank, 1))


_HERE: Any = object()  # in the walk's tree of parts, where a value is replaced (not a part: parts are str)


def _marked(node: Any, wanted: dict[str, Any], missing: MissingPerRank) -> Any:
    if _HERE in wanted:
        return missing
    if isinstance(node, dict):
        spelled = dict(zip(distinct_parts(list(node)), node))
        for part, below in wanted.items():  # (no _HERE among them: it ends its walk)
            key = spelled.get(part, _NOTHING)
            if key is not _NOTHING:
                node[key] = _marked(node[key], below, missing)
    elif isinstance(node, (list, tuple)):
        items = list(node)
        for part, below in wanted.items():
            if part.isdigit() and int(part) < len(items):
                items[int(part)] = _marked(items[int(part)], below, missing)
        return items if isinstance(node, list) else tuple(items)
    return node


_NOTHING: Any = object()
