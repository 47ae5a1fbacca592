"""Matching a checkpoint's tracked objects to the saved state tree: the walk that fills a ``Plan``.

The walk visits containers (dicts and lists holding tracked objects), nested checkpoints and
per-rank values, and hands each leaf to the planners of ``_load.plan`` (a module, a tensor, a
data loader, a ``Stateful``, a plain value). What a tracked value *is* belongs to the tracking
face (``torchckpt.checkpoint``): the walk sees it through a :class:`Tracking`, so no engine
imports the face, and a nested ``Checkpoint`` is matched through ``Tracking.nested``.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass
from typing import Any

import torch

from torchckpt._format import keypath, tree
from torchckpt._load import loaders
from torchckpt._load.plan import MISSING, Plan, is_saved, plan_module, plan_tensor, plan_value, refuses_missing_keys
from torchckpt._load.shared import drop_overwritten_across
from torchckpt._load.stateful import plan_stateful
from torchckpt.rng import RNGState


def is_stateful(value: Any) -> bool:
    """Whether ``value`` has callable ``state_dict()`` and ``load_state_dict()`` (the Stateful protocol);
    a class (``nn.ReLU``) has them as plain functions, and is not."""
    kind = type(value)  # looked up on the class: an attribute-dict's __getattr__ may raise anything
    return (not isinstance(value, type) and callable(getattr(kind, "state_dict", None))
            and callable(getattr(kind, "load_state_dict", None)) and not loaders.is_plain_loader_adapter(value))


@dataclass(frozen=True)
class Tracking:
    """What the walk needs to know about tracked values, from the face that tracks them.

    ``nested(value)`` is the tracked objects of a nested checkpoint (a dict the walk assigns
    into), None for anything else; ``state_of(value)`` is what a tracked value saves (it names the
    keys a missing nested checkpoint lacks); ``is_trackable(value)`` says whether a dict or list
    holds tracked objects, and is then matched item by item.
    """

    nested: Callable[[Any], dict[str, Any] | None]
    state_of: Callable[[Any], Any]
    is_trackable: Callable[[Any], bool]


class Matcher:
    """One walk: every tracked object matched into ``plan``, every saved value not matched reported."""

    def __init__(self, plan: Plan, tracking: Tracking) -> None:
        self.plan = plan
        self.tracking = tracking
        self._planned: dict[int, tuple[Any, str, Any]] = {}  # id of a tracked object -> (it, its key, its saved value)

    def _once(self, key: str, obj: Any, saved: Any) -> None:
        """Before ``obj`` (a tensor, a module, a stateful object) is planned under ``key``. One
        object tracked under two names (``Checkpoint(a=t, b=t)``, ``[t, t]``) holds one value: where
        the checkpoint has two different ones, the name planned last wins, and the earlier
        planning is taken back and reported unexpected, its value unused (as for tied weights
        inside a module). A dict entry per object: the common case costs nothing more."""
        if saved is MISSING:
            return
        earlier = self._planned.get(id(obj))
        if earlier is not None and earlier[0] is obj and not _same_saved(earlier[2], saved):
            self._take_back(earlier[1], earlier[2])
        self._planned[id(obj)] = (obj, key, saved)

    def _take_back(self, key: str, saved: Any) -> None:
        """Unplan what was planned under ``key`` from ``saved``: its reads, casts and loads; its
        restored keys become unexpected."""
        plan = self.plan
        tensors = {id(v) for v in keypath.leaves(saved, key).values() if is_saved(v)}
        buffers = {id(d) for d, v in plan.reads if id(v) in tensors}
        plan.reads[:] = [(d, v) for d, v in plan.reads if id(v) not in tensors]
        plan.casts[:] = [(d, b) for d, b in plan.casts if id(b) not in buffers]
        plan.loads[:] = [(k, load) for k, load in plan.loads if k != key]
        below = key + keypath.SEP
        taken = [k for k in plan.report.restored_keys if k == key or k.startswith(below)]
        plan.report.restored_keys[:] = [k for k in plan.report.restored_keys if not (k == key or k.startswith(below))]
        plan.report.unexpected_keys.extend(taken)
        if key in plan.reports_late:  # a load that would have reported its keys as it ran (load hooks, its own loader)
            plan.report.unexpected_keys.extend(plan.reports_late.pop(key)())
            for full in [k for k in plan.unreported if k.startswith(below)]:
                del plan.unreported[full]
            plan.late_fills[:] = [(module, kept) for module, fills in plan.late_fills
                                  if (kept := [fill for fill in fills if not fill.key.startswith(below)])]

    def settle_shared_tensors(self) -> None:
        """After the walk: a tensor two tracked objects share keeps the value of the one planned
        last (``_load.shared.drop_overwritten_across``): only where a module was read in place, so a
        restore of tensors alone (a dict of 20,000) pays nothing for it."""
        if not (self.plan.fed or self.plan.late_fills):
            return
        planned = list(self._planned.values())
        position = {key: i for i, (_, key, _) in enumerate(planned)}
        tensors = [(i, key, obj, saved) for i, (obj, key, saved) in enumerate(planned)
                   if isinstance(obj, torch.Tensor) and is_saved(saved)]
        drop_overwritten_across(self.plan, tensors, position)

    def checkpoint(self, tracked: dict[str, Any], saved: dict[str, Any], prefix: str, ignored: str | None) -> None:
        """Match a checkpoint's ``tracked`` objects; ``ignored`` names a saved key the caller plans itself."""
        for name, value in tracked.items():
            key = keypath.join(prefix, keypath.escape_part(name))
            self.value(key, value, saved.get(name, MISSING), _item_setter(tracked, name))
        for name, value in saved.items():
            if name not in tracked and name != ignored:
                self.plan.report.unexpected_keys.extend(keypath.leaves(value, keypath.join(prefix, keypath.key_part(name))))

    def value(self, key: str, value: Any, saved: Any, assign: Callable[[Any], None]) -> None:
        plan = self.plan
        if plan.rank >= plan.saved_world and saved is not MISSING and _per_rank(value):
            saved = tree.MissingPerRank(plan.rank, plan.saved_world)  # saved as one process's (or rank 0's) alone
        if isinstance(saved, tree.MissingPerRank):  # restoring on more ranks than saved
            plan.report.missing_keys.append(key)
            plan.report.skipped_objects[key] = saved.reason
            return
        nested = self.tracking.nested(value)
        if isinstance(value, tree.PerRank):
            self.value(key, value.value, saved, lambda v: setattr(value, "value", v))
        elif nested is not None:
            if saved is MISSING or not isinstance(saved, dict):
                self._missing_checkpoint(key, nested, saved)
                return
            self.checkpoint(nested, saved, key, None)
        elif isinstance(value, torch.nn.Module):
            kept = self._without_missing_entries(saved)
            if kept is not saved and refuses_missing_keys(value, plan.assign):  # its own loader, strict:
                self._left_whole(key, saved)  # all or none, as an object's load_state_dict
                return
            saved = kept
            self._once(key, value, saved)
            plan_module(key, value, saved, plan)
        elif isinstance(value, torch.Tensor):
            self._once(key, value, saved)
            plan_tensor(key, value, saved, plan, assign)
        elif loaders.is_data_state(value):
            loaders.plan_restore(key, value, saved, plan)
        elif isinstance(value, RNGState):  # set last (see ``Plan.rng_loads``)
            loads = len(plan.loads)
            plan_stateful(key, value, saved, plan)
            plan.rng_loads.extend(plan.loads[loads:])
            del plan.loads[loads:]
        elif is_stateful(value):
            if not self._left_whole(key, saved):  # a per-rank value in its state_dict(): left whole
                self._once(key, value, saved)
                plan_stateful(key, value, saved, plan)
        elif self.tracking.is_trackable(value) and (isinstance(value, (dict, list)) or type(value) is tuple):
            self._container(key, value, saved, assign)
        elif not self._left_whole(key, saved):  # a per-rank value within a plain one: all or none
            plan_value(key, saved, assign, plan)

    def _without_missing_entries(self, saved: Any) -> Any:
        """A module's saved state dict less the entries (extra state) that hold a per-rank value
        this rank has none of, where a restore runs on more ranks than saved: each is left to its
        module and reported missing, as any key the checkpoint lacks (``set_extra_state`` is not
        handed a placeholder); every other key restores, as ``load_state_dict(strict=False)``
        restores without it."""
        if self.plan.rank < self.plan.saved_world or not isinstance(saved, dict):
            return saved
        kept = {name: value for name, value in saved.items() if _missing_inside(value) is None}
        return saved if len(kept) == len(saved) else kept

    def _left_whole(self, key: str, saved: Any) -> bool:
        """Where a restore runs on more ranks than saved: whether ``saved`` (a plain value, a
        module's or an object's state) holds a per-rank value this rank has none of; then the
        object is left as it is, as a whole, and that value reported missing (all or none: a
        ``load_state_dict`` is not handed a placeholder, nor half a state)."""
        plan = self.plan
        if plan.rank < plan.saved_world or saved is MISSING:
            return False
        inside = _missing_inside(saved)
        if inside is None:
            return False
        where = key
        for part in reversed(inside[0]):
            where = keypath.join(where, keypath.key_part(part))
        plan.report.missing_keys.append(where)
        plan.report.skipped_objects[key] = f"{where}: {inside[1].reason}; {key} was left as it is, as a whole"
        return True

    def _missing_checkpoint(self, key: str, tracked: dict[str, Any], saved: Any) -> None:
        """A nested checkpoint with nothing (or no dict) to restore from: all of it is missing."""
        state = {name: self.tracking.state_of(v) for name, v in tracked.items()}
        self.plan.report.missing_keys.extend(keypath.leaves(state, key))
        if saved is not MISSING:
            self.plan.report.unexpected_keys.extend(keypath.leaves(saved, key))

    def _container(self, key: str, value: dict[Any, Any] | list[Any] | tuple[Any, ...], saved: Any,
                   assign: Callable[[Any], None]) -> None:
        """Match a dict, list or tuple item by item, by key part (so an int key matches its saved
        digits). A tuple's tensors and objects are restored in place, as a list's; an item it must
        replace (a plain value, a tensor on the meta device) replaces the tuple through ``assign``.
        A dict whose keys differ only in type (``{0: .., "0": ..}``, on either side) is matched by
        key and type: by part, both would take one saved value."""
        report = self.plan.report
        setter = _tuple_setter([value], assign) if type(value) is tuple else _item_setter
        is_dict = isinstance(value, dict)
        saved_items: dict[str, Any] = {}
        typed: dict[tuple[type, Any], Any] | None = None  # saved items by (key type, key), where parts collide
        if isinstance(saved, dict):
            saved_items = saved if all(map(_is_plain_part, saved)) else {keypath.key_part(k): v for k, v in saved.items()}
            if len(saved_items) < len(saved) or isinstance(value, dict) and not _distinct_parts(value):
                typed = {(type(k), k): v for k, v in saved.items()}
        elif isinstance(saved, (list, tuple)):
            saved_items = {str(i): v for i, v in enumerate(saved)}
        elif saved is not MISSING:
            report.unexpected_keys.extend(keypath.leaves(saved, key))
        matched = 0
        items = value.items() if isinstance(value, dict) else enumerate(value)
        planned = self._planned
        for k, v in items:
            part = keypath.key_part(k)
            found = typed.pop((type(k), k), MISSING) if typed is not None else saved_items.get(part, MISSING)
            matched += found is not MISSING
            if isinstance(v, torch.Tensor):  # the common leaf, planned without building a setter (unless on meta)
                path = keypath.join(key, part)
                if id(v) in planned:  # (``_once``, inline: thousands of tensors pay one dict entry each)
                    self._once(path, v, found)
                elif found is not MISSING:
                    planned[id(v)] = (v, path, found)
                plan_tensor(path, v, found, self.plan, setter(value, k) if v.is_meta else None)
            else:
                self.value(keypath.join(key, part), v, found, setter(value, k))
        if typed is not None:  # what no key of the same type took
            for (_, k), v in typed.items():
                report.unexpected_keys.extend(keypath.leaves(v, keypath.join(key, keypath.key_part(k))))
        elif matched < len(saved_items):
            used = {keypath.key_part(k) for k in (value if is_dict else range(len(value)))}
            for part, v in saved_items.items():
                if part not in used:
                    report.unexpected_keys.extend(keypath.leaves(v, keypath.join(key, part)))


def _per_rank(value: Any) -> bool:
    """Whether a tracked object holds each rank's own state (as a save by several ranks stores it):
    a ``PerRank``, an ``RNGState``, a data loader's position."""
    return isinstance(value, (tree.PerRank, RNGState)) or loaders.is_data_state(value)


def _distinct_parts(value: dict[Any, Any]) -> bool:
    """Whether a dict's keys have distinct key parts (they may not where it mixes key types)."""
    return all(type(k) is str for k in value) or len({keypath.key_part(k) for k in value}) == len(value)


def _same_saved(a: Any, b: Any) -> bool:
    """Whether two saved values are one: the same saved tensors (a tensor tracked under two names
    is stored once) and equal plain values, key for key."""
    if a is b:
        return True
    left, right = keypath.leaves(a, ""), keypath.leaves(b, "")
    if left.keys() != right.keys():
        return False
    for k, x in left.items():
        y = right[k]
        if x is y:
            continue
        if is_saved(x) or is_saved(y) or type(x) is not type(y):
            return False
        try:
            if not (x == y or x != x and y != y):  # (NaN equals NaN here)
                return False
        except Exception:  # noqa: BLE001 - values that cannot say: not known to be one
            return False
    return True


def _item_setter(container: Any, key: Any) -> Callable[[Any], None]:
    return lambda v: container.__setitem__(key, v)


def _tuple_setter(current: list[tuple[Any, ...]], assign: Callable[[Any], None]) -> Callable[[Any, int], Callable[[Any], None]]:
    """Setters for a tuple's items: each replaces the tuple (``current[0]``, shared by all of them,
    so that several replacements compose) with one holding the new item, through ``assign``."""
    def setter(_: Any, index: int) -> Callable[[Any], None]:
        def set_item(v: Any) -> None:
            items = list(current[0])
            items[index] = v
            current[0] = tuple(items)
            assign(current[0])
        return set_item
    return setter


def _is_plain_part(key: Any) -> bool:
    """Whether a saved dict key is its own key part (a str that needs no escaping)."""
    return type(key) is str and "~" not in key and keypath.SEP not in key


def _missing_inside(saved: Any) -> tuple[list[Any], tree.MissingPerRank] | None:
    """The keys (innermost first) and marker of a per-rank value within the plain value ``saved``
    that this rank has no copy of (``_format.per_rank.select_rank`` on more ranks than saved), or None."""
    if isinstance(saved, tree.MissingPerRank):
        return [], saved
    if is_saved(saved):
        return None
    items = saved.items() if isinstance(saved, dict) else enumerate(saved) if isinstance(saved, (list, tuple)) else ()
    for k, v in items:
        found = _missing_inside(v)
        if found is not None:
            found[0].append(k)
            return found
    return None
