"""A dict's key order, kept across a layout that stores its tensors in another order.

Why this exists: a tensor inside a string-keyed dict is left out of the JSON tree (its name says
where it goes, ``_format.tree``), and the decoder inserts such tensors after the dict's other
keys, in the order of the index's tensor names. That order is the layout's, not the dict's: a
shard whose save order would misalign a tensor puts its widest elements first (every tensor is
aligned to its element size), frozen tensors get shards of their own, several ranks write theirs
one after another. A dict is ordered,
and code pairs entries by position (an EMA that zips its shadow with ``state_dict().items()``), so
coming back in another order is silently wrong.

:func:`keep_dict_order` runs once the layout is known, on the tree every writer writes: a dict
whose tensors the layout keeps in order costs nothing (the common case, and the one that keeps
the index small for tens of thousands of tensors); a dict whose tensors it reorders gets the
places of its first tensors, ``{"@tensor": null}``, as few as leave the rest in the index's order
(an optimizer's ``step`` before its float64 moments: one mark), which the decoder has always read
(readers of earlier versions too).
"""

from __future__ import annotations

import itertools
import operator
from collections.abc import Iterable
from typing import Any

from torchckpt._format.keypath import SEP, key_part, unescape_part
from torchckpt._format.tree import DICT_TYPES, PER_RANK_TAG, TAG, TENSOR_TAG, decode


def keep_dict_order(tree: Any, saved: Iterable[str], stored: Iterable[str], per_rank: bool = False) -> None:
    """Mark, in place, the tensors of each string-keyed dict of ``tree`` that the decoder would put
    in another order than the dict held them.

    Args:
        tree: an encoded state tree (``_format.tree.encode``), before it is written.
        saved: every tensor name of the tree in the order the encoder met them (the dict's order).
        stored: the order the decoder meets them in: the index's tensor names as laid out, then
            the aliases (``_load.opened.state_tree``). Names in one and not the other (a chunk, a
            per-rank value) are ignored.
        per_rank: look inside per-rank values (``@per_rank``) too: a rank of a save by several
            ranks marks its own, whose tensors only it stores (``stored``: those, in its order).
    """
    saved, stored = list(saved), list(stored)
    if saved == stored:  # the layout kept the tree's order (one process, one element size): nothing to mark
        return
    where = dict(zip(stored, itertools.count()))
    positions = [p for p in map(where.get, saved) if p is not None]  # map, not a comprehension: the common case stays cheap
    if all(map(operator.lt, positions, positions[1:])):  # the layout kept the tree's order
        return
    order = [(name, where[name]) for name in saved if name in where]
    last: dict[str, int] = {}
    reordered: set[str] = set()
    for name, position in order:
        parent = name.rpartition(SEP)[0]
        if position < last.get(parent, -1):
            reordered.add(parent)
        last[parent] = position
    children: dict[str, list[tuple[str, int]]] = {p: [] for p in reordered}
    for name, position in order:
        parent, _, part = name.rpartition(SEP)
        if parent in children:
            children[parent].append((part, position))
    pairs: dict[int, dict[str, Any]] = {}  # id of a tagged dict's pairs -> its values by name part
    nodes: dict[str, Any] = {}  # key path -> its JSON node, for the paths walked so far
    for parent, found in children.items():
        node = _node_at(tree, parent, nodes, pairs, per_rank)
        if not isinstance(node, dict) or _is_tagged(node):
            continue  # a list, a tuple or a tagged dict holds each tensor's place already
        keys = [(unescape_part(part), position) for part, position in found]
        left_out = [(key, position) for key, position in keys if key not in node]
        # The decoder puts the tensors left out after the dict's other keys, in stored order: mark the
        # shortest run of them from the first on that leaves the rest in that order.
        start = len(left_out) - 1
        while start > 0 and left_out[start - 1][1] < left_out[start][1]:
            start -= 1
        node.update((key, {TENSOR_TAG: None}) for key, _ in left_out[:start])  # after the dict's other keys, as saved


def _is_tagged(node: dict[str, Any]) -> bool:
    return len(node) == 1 and next(iter(node)).startswith(TAG)


def _node_at(tree: Any, path: str, nodes: dict[str, Any], pairs: dict[int, dict[str, Any]], per_rank: bool) -> Any:
    """The JSON node at the key path ``path`` (its parts escaped, as in tensor names), or None where
    the path leads nowhere the decoder would place a dict's tensors (a plain value; a per-rank
    value unless ``per_rank``). ``nodes`` keeps the nodes found, so that siblings share the walk."""
    if path in nodes:
        return nodes[path]
    if not path:
        node = _inside(tree, per_rank)
    else:
        parent, _, part = path.rpartition(SEP)
        node = _child(_node_at(tree, parent, nodes, pairs, per_rank), part, pairs, per_rank)
    nodes[path] = node
    return node


def _child(node: Any, part: str, pairs: dict[int, dict[str, Any]], per_rank: bool) -> Any:
    """The node under ``node`` at the name part ``part``, or None."""
    if isinstance(node, dict) and _is_tagged(node):
        tag, payload = next(iter(node.items()))
        if tag in DICT_TYPES and isinstance(payload, list):
            by_part = pairs.get(id(payload))
            if by_part is None:
                by_part = pairs[id(payload)] = {
                    key_part(decode(pair[0], None, lambda name: None)): pair[1] for pair in payload}
            return _inside(by_part.get(part), per_rank)
        if tag != "@tuple":
            return None
        node = payload
    if isinstance(node, list):
        return _inside(node[int(part)], per_rank) if part.isdigit() and int(part) < len(node) else None
    if isinstance(node, dict):
        return _inside(node.get(unescape_part(part)), per_rank)
    return None


def _inside(node: Any, per_rank: bool) -> Any:
    """A per-rank value's own node (it sits at its wrapper's key path), when ``per_rank``."""
    if per_rank and isinstance(node, dict) and len(node) == 1 and PER_RANK_TAG in node:
        return node[PER_RANK_TAG]
    return node
