"""Renames on restore: the checkpoint's keys mapped to the objects' keys before anything is matched.

A model whose ``encoder`` became ``backbone``, or a checkpoint saved as ``Checkpoint(net=...)``
restored into ``Checkpoint(model=...)``, differs from its checkpoint only in names. Why the saved
tree is renamed rather than the objects: the matcher (``_load.match``) and every planner then work
unchanged, on the names the objects have, so a rename costs nothing when none is given and means
the same thing for tensors, optimizers, plain values and nested checkpoints.

A rename works on *keys*: the full names of the checkpoint's values as ``torchckpt.list_variables``
and the report show them (``model/encoder.layer.0.weight``, ``opt/state/0/exp_avg``, ``epoch``).
Each key is renamed on its own; a subtree whose keys all move together (a tracked name renamed) is
moved as one, so its containers keep their types (an optimizer's int state keys stay ints).
"""

from __future__ import annotations

import copy
from collections.abc import Callable, Mapping
from dataclasses import dataclass, field
from typing import Any, NamedTuple

from torchckpt._format import keypath
from torchckpt._load.report import MismatchReport
from torchckpt.errors import RenameConflictError, format_keys

__all__ = ["Rename", "RenameConflictError", "Renamed", "Renamer", "apply", "call_argument", "module_versions",
           "prefix_matches"]

Rename = Mapping[str, str] | Callable[[str], "str | None"]
"""What ``restore(..., rename=...)`` takes: ``{checkpoint prefix: object prefix}``, or a function from
a checkpoint key to its object key (None: the key is left unused)."""

_SEPARATORS = (".", keypath.SEP)


def prefix_matches(prefix: str, key: str) -> bool:
    """Whether ``prefix`` matches ``key`` at a name-part boundary: ``key`` is ``prefix``, or starts
    with it and either the prefix ends with ``.`` or ``/`` or the key goes on with one of them."""
    if not key.startswith(prefix):
        return False
    return len(key) == len(prefix) or prefix.endswith(_SEPARATORS) or key[len(prefix)] in _SEPARATORS


@dataclass(frozen=True)
class Renamer:
    """A checked ``rename`` argument: prefixes longest first, or the caller's function."""

    prefixes: tuple[tuple[str, str], ...] = ()
    function: Callable[[str], Any] | None = None

    @classmethod
    def of(cls, rename: Rename | None) -> Renamer | None:
        """Check ``rename`` (None: no rename).

        Raises:
            TypeError: not a mapping of str to str, nor a callable.
            ValueError: an empty prefix (it would match no key at a boundary).
        """
        if rename is None:
            return None
        if isinstance(rename, Mapping):
            for old, new in rename.items():
                if not isinstance(old, str) or not isinstance(new, str):
                    raise TypeError(f"rename maps checkpoint prefixes (str) to object prefixes (str); got "
                                    f"{old!r}: {new!r}. Pass a function to drop keys (return None).")
                if not old:
                    raise ValueError("rename has an empty checkpoint prefix ''; name the part to rename, for "
                                     "example {'net': 'model'} or {'model/encoder': 'model/backbone'}.")
            return cls(prefixes=tuple(sorted(rename.items(), key=lambda item: -len(item[0]))))
        if callable(rename):
            return cls(function=rename)
        raise TypeError(f"rename takes a mapping {{checkpoint prefix: object prefix}} or a function from a checkpoint "
                        f"key to an object key, not {type(rename).__name__}.")

    def match(self, key: str) -> tuple[str | None, str | None]:
        """The object key for checkpoint key ``key`` (None: unused), and the prefix that renamed it."""
        if self.function is None:
            for old, new in self.prefixes:  # longest first: the longest matching prefix wins
                if prefix_matches(old, key):
                    return new + key[len(old):], old
            return key, None
        result = self.function(key)
        if result is not None and not isinstance(result, str):
            raise TypeError(f"The rename function returned {result!r} for checkpoint key {key!r}; it must return "
                            "the object key (a str) or None to leave the key unused.")
        return result, None


def call_argument(rename: Rename | None) -> dict[str, Any]:
    """The rename as a restore call's compared argument (JSON): on several ranks every rank must
    rename alike. A function cannot be compared; only that one was given is."""
    if rename is None:
        return {}
    if isinstance(rename, Mapping):
        return {"rename": sorted([str(k), str(v)] for k, v in rename.items())}
    return {"rename": "<function>" if callable(rename) else repr(rename)}


_GONE: Any = object()  # a child moved elsewhere or dropped: not kept in place


class Move(NamedTuple):
    """A value of the saved tree leaving its place: a changed leaf, or a subtree whose keys all move alike."""

    old: str  # its checkpoint key
    new: str  # its object key
    value: Any
    dict_key: Any = None  # the key it had in its dict (an int key stays an int under a new name)


@dataclass
class Renamed:
    """The saved tree in object terms, and what the rename did (for the report)."""

    state: dict[str, Any]
    renamed: dict[str, str] = field(default_factory=dict)  # checkpoint key -> object key, for keys that changed
    dropped: list[str] = field(default_factory=list)  # checkpoint keys the function left unused
    unused_prefixes: list[str] = field(default_factory=list)
    moved: dict[str, str] = field(default_factory=dict)  # object key -> checkpoint key of each subtree moved whole
    kept: set[str] = field(default_factory=set)  # checkpoint keys left as they were (only when ``moved``)
    by_object: dict[str, str] = field(default_factory=dict)  # ``renamed``, inverted

    def checkpoint_key(self, key: str) -> str:
        """``key`` (a key of the renamed tree) in checkpoint terms."""
        old = self.by_object.get(key)
        if old is not None:
            return old
        if key in self.kept or not self.moved:
            return key
        probe = key
        while probe:
            old = self.moved.get(probe)
            if old is not None:
                return old + key[len(probe):]
            probe = _parent(probe)
        return key

    def annotate(self, report: MismatchReport) -> None:
        """Record the rename in ``report``: what was renamed, prefixes that renamed nothing, and the
        checkpoint's unused values (``unexpected_keys``, the keys of ``remapped_keys``) in checkpoint terms."""
        report.renamed = self.renamed
        report.unused_renames = self.unused_prefixes
        if self.renamed:
            report.unexpected_keys[:] = [self.checkpoint_key(k) for k in report.unexpected_keys]
            report.remapped_keys = {self.checkpoint_key(k): v for k, v in report.remapped_keys.items()}
        report.unexpected_keys.extend(self.dropped)


def apply(renamer: Renamer, saved: dict[str, Any], keep: str) -> Renamed:
    """``saved`` renamed into object terms; its root key ``keep`` (the save counter) is never renamed.

    Raises:
        RenameConflictError: two checkpoint keys would get one object key, or a value cannot be
            placed at its new key. Raised while planning: nothing was changed.
        ValueError: the rename gives a key an empty name part.
    """
    leaves: dict[str, Any] = {}
    for name, value in saved.items():
        if name != keep:
            keypath.leaves(value, keypath.key_part(name), leaves)
    out = Renamed(saved)
    targets = _targets(renamer, leaves, out)
    if targets:
        out.renamed = {k: v for k, v in targets.items() if v is not None}
        out.by_object = {v: k for k, v in out.renamed.items()}
        out.state = _Mover(targets, out).run(saved)
        if out.moved:
            out.kept = {k for k in leaves if k not in targets}
    return out


def module_versions(renamer: Renamer, versions: dict[str, dict[str, int | None]] | None,
                    ) -> dict[str, dict[str, int | None]] | None:
    """The saved modules' ``_version``s (``Index.module_versions``) under the renamed keys: a
    module's key and each submodule's key (``model/encoder.layer``) are renamed as a value's key
    would be. A rename function names leaf keys only, so it cannot be asked about a module's key:
    then None, as for a checkpoint without the record."""
    if versions is None or renamer.function is not None:
        return None
    out: dict[str, dict[str, int | None]] = {}
    for key, inner in versions.items():
        new, _ = renamer.match(key)
        if new is None:
            continue
        moved = out.setdefault(new, {})
        for prefix, version in inner.items():
            full, _ = renamer.match(keypath.join(key, keypath.escape_part(prefix)) if prefix else key)
            if full == new:
                moved[""] = version
            elif full is not None and full.startswith(new + keypath.SEP) and keypath.SEP not in full[len(new) + 1:]:
                moved[keypath.unescape_part(full[len(new) + 1:])] = version
    return out


def _targets(renamer: Renamer, leaves: dict[str, Any], out: Renamed) -> dict[str, str | None]:
    """Each changed checkpoint key's object key (None: dropped), checked: no two keys get one object key."""
    targets: dict[str, str | None] = {}
    owner: dict[str, str] = {}  # object key -> the checkpoint key that gets it
    used: set[str] = set()
    for key in leaves:
        new, prefix = renamer.match(key)
        if prefix is not None:
            used.add(prefix)
        if new is not None and not all(keypath.split(new)):
            raise ValueError(f"The rename gives checkpoint key {key!r} the object key {new!r}, which has an empty "
                             "name part; object keys are names joined by '/', as torchckpt.list_variables shows.")
        if new != key:
            targets[key] = new
        if new is None:
            out.dropped.append(key)
        elif new in owner:
            raise RenameConflictError(
                f"The rename maps two checkpoint keys to the object key {new!r}: {format_keys([owner[new], key])}. "
                "An object key takes one value: change the rename so that they differ. Nothing was restored.",
                new, [owner[new], key])
        else:
            owner[new] = key
    out.unused_prefixes = sorted(old for old, _ in renamer.prefixes if old not in used)
    return targets


class _Mover:
    """Rebuilds the saved tree with ``targets`` (checkpoint leaf key -> object key, or None) applied.

    Containers above a changed key are rebuilt, everything else is kept as it is (the same
    objects). A container whose keys all move alike moves whole; a key renamed within its dict
    keeps its place there; any other move is placed from the root, creating dicts on the way.
    """

    def __init__(self, targets: dict[str, str | None], out: Renamed) -> None:
        self.targets = targets
        self.out = out
        self.touched: set[str] = set()  # the changed leaves and every container above them
        for key in targets:
            while key and key not in self.touched:
                self.touched.add(key)
                key = _parent(key)

    def run(self, saved: dict[str, Any]) -> dict[str, Any]:
        root, moves, _ = self._split(saved, "", None)
        for move in moves:
            self._insert(root, move)
            self._moved(move)
        return root  # type: ignore[no-any-return]

    def _split(self, node: Any, path: str, dict_key: Any) -> tuple[Any, list[Move], bool]:
        """``node`` (``dict_key`` in its dict) with its changed parts taken out: (what stays in place
        or ``_GONE``, the moves still to place, whether anything below was dropped)."""
        if path and path not in self.touched:
            return node, [], False
        if path in self.targets:  # a changed leaf
            new = self.targets[path]
            return _GONE, ([] if new is None else [Move(path, new, node, dict_key)]), new is None
        is_dict = isinstance(node, dict)
        kept: list[tuple[Any, Any]] = []
        moves: list[Move] = []
        dropped = False
        for k, child in (node.items() if is_dict else enumerate(node)):
            child_path = keypath.join(path, keypath.key_part(k))
            child_kept, child_moves, child_dropped = self._split(child, child_path, k if is_dict else None)
            dropped |= child_dropped
            kept.append((k, child_kept))
            moves.extend(child_moves)
        gone = [k for k, c in kept if c is _GONE]
        if path and len(gone) == len(kept):
            whole = None if dropped else _common_target(path, moves)
            if whole is not None:  # everything below moves alike: move the container itself, as it is
                return _GONE, [Move(path, whole, node, dict_key)], False
            if not moves:  # everything below was dropped
                return _GONE, [], True
        if is_dict:
            rebuilt, rest = self._dict(node, path, kept, moves)
            return rebuilt, rest, dropped
        if gone:
            raise _list_item_moved(path, gone[0], moves)
        return type(node)(c for _, c in kept), moves, dropped

    def _dict(self, node: dict[Any, Any], path: str, kept: list[tuple[Any, Any]],
              moves: list[Move]) -> tuple[Any, list[Move]]:
        """The dict's kept children in order, a child renamed within it in its place (in a dict of
        the same type: an ``OrderedDict`` stays one); and the moves that go elsewhere."""
        here = {m.old: m for m in moves if _parent(m.new) == path and _parent(m.old) == path}
        rebuilt = copy.copy(node)
        rebuilt.clear()
        for k, child in kept:
            move = here.get(keypath.join(path, keypath.key_part(k)))
            if move is not None:
                self._place(rebuilt, keypath.split(move.new)[-1], move)
                self._moved(move)
            elif child is not _GONE:
                if k in rebuilt:  # a sibling was renamed to this name: merged if both are dicts
                    key = keypath.join(path, keypath.key_part(k))
                    mover = next((m for m in here.values() if m.new == key), None)
                    if mover is not None and not (isinstance(rebuilt[k], dict) and isinstance(child, dict)):
                        raise RenameConflictError(  # named by the move, not by the value that stays
                            f"The rename cannot move checkpoint key {mover.old!r} to {key!r}: the checkpoint has its "
                            "own value there, which stays. Nothing was restored.", key, [mover.old, key])
                    moved = rebuilt[k]  # merged into the value that stays, which keeps its type (a Counter)
                    rebuilt[k] = copy.copy(child)
                    self._place(rebuilt, keypath.key_part(k), Move(mover.old if mover else key, key, moved, k))
                else:
                    rebuilt[k] = child
        rest = [m for m in moves if m.old not in here]
        return (_GONE if path and not rebuilt else rebuilt), rest

    def _moved(self, move: Move) -> None:
        """Remember a subtree moved whole (a leaf's move is in ``renamed``), to name its keys in checkpoint terms."""
        if move.old not in self.targets:
            self.out.moved[move.new] = move.old

    def _insert(self, root: dict[str, Any], move: Move) -> None:
        """Place a move at its object key, creating dicts on the way."""
        node: Any = root
        parts = keypath.split(move.new)
        for i, part in enumerate(parts[:-1]):
            key = _find_key(node, part)
            if key is None:
                key = _new_key(node, part, None)
                node[key] = {}
            node = node[key]
            if not isinstance(node, dict):
                where = keypath.SEP.join(parts[: i + 1])
                raise self._conflict(move, f"the value at {where!r} is not a dict of names")
        self._place(node, parts[-1], move)

    def _place(self, node: dict[Any, Any], part: str, move: Move) -> None:
        """Set ``node``'s child named ``part`` to the move's value; dicts that meet there are merged."""
        key = _find_key(node, part)
        if key is None:
            key = _new_key(node, part, move.dict_key)
            node[key] = move.value
            return
        present = node[key]
        if not (isinstance(present, dict) and isinstance(move.value, dict)):
            raise self._conflict(move, "another value of the checkpoint is already there")
        for k, v in move.value.items():
            inner = Move(keypath.join(move.old, keypath.key_part(k)), keypath.join(move.new, keypath.key_part(k)), v, k)
            self._place(present, keypath.key_part(k), inner)

    @staticmethod
    def _conflict(move: Move, why: str) -> RenameConflictError:
        return RenameConflictError(
            f"The rename cannot move checkpoint key {move.old!r} to {move.new!r}: {why}. Nothing was restored.",
            move.new, [move.old])


def _list_item_moved(path: str, index: int, moves: list[Move]) -> RenameConflictError:
    item = keypath.join(path, str(index))
    new = next((m.new for m in moves if m.old == item), None)
    what = "drops" if new is None else f"moves (to {new!r})"
    return RenameConflictError(
        f"The rename {what} checkpoint key {item!r}, an item of the list at {keypath.display(path)!r}: list items are "
        "matched by position, so a list is renamed or dropped as a whole, or not at all. Nothing was restored.",
        item if new is None else new, [item])


def _common_target(path: str, moves: list[Move]) -> str | None:
    """The key that every move out of ``path`` goes under alike (``old = path + rest``, ``new =
    target + rest``), or None."""
    target = None
    for move in moves:
        rest = move.old[len(path):]
        if not move.new.endswith(rest) or len(move.new) == len(rest):
            return None
        head = move.new[: len(move.new) - len(rest)]
        if target is not None and head != target:
            return None
        target = head
    return target


def _parent(key: str) -> str:
    cut = key.rfind(keypath.SEP)
    return key[:cut] if cut >= 0 else ""


def _find_key(node: dict[Any, Any], part: str) -> Any:
    """The key of ``node`` named ``part``: a str key (escaped) or an int key (its digits). Other keys
    (a tuple's repr) are not looked for: two values under one such name were refused as two
    checkpoint keys for one object key."""
    key = keypath.unescape_part(part)
    if key in node and type(key) is str:
        return key
    if _is_number(part) and int(part) in node:  # the int key itself, not True or 1.0, which hash alike
        number = int(part)
        return next((k for k in node if type(k) is int and k == number), None)
    return None


def _new_key(node: dict[Any, Any], part: str, dict_key: Any) -> Any:
    """The key a value moved to ``part`` gets in ``node``: an int where ``part`` is digits and
    either the value had an int key or the dict it goes into has only int keys (a rename to
    ``"steps/3"`` of a dict ``{1: .., 2: ..}``), else the name."""
    if _is_number(part) and (type(dict_key) is int or (node and all(type(k) is int for k in node))):
        return int(part)
    return keypath.unescape_part(part)


def _is_number(part: str) -> bool:
    """Whether ``part`` is an int key's name: ASCII digits (``str.isdigit`` also takes "²")."""
    return part.isascii() and part.isdigit()
