"""An optimizer's rebuilt state dict, handed to torch's ``Optimizer.load_state_dict`` without its
quadratic lookup.

For every tensor of the state, ``load_state_dict`` finds the parameter group that holds the
parameter by testing ``param_id in group["params"]``, a scan of a list as long as the group. With
thousands of parameters that is quadratic: restoring Adam for 10,000 parameters took 1.3 s here,
nearly all of it in those scans. The state dict a restore hands over has each group's ``params``
as :class:`ParamIds`, a list (equal to the saved one, element for element) whose membership test
is a set lookup. The optimizer never keeps it: ``load_state_dict`` puts its own groups' parameter
lists back, and works on a deep copy of the rest.
"""

from __future__ import annotations

from collections.abc import Hashable, Iterable
from typing import Any


class ParamIds(list[Any]):
    """A list whose ``in`` is a set lookup. Any change to the list drops the set, which is built
    again at the next test; an element that cannot be hashed is looked for by a scan, as in a list."""

    def __init__(self, items: Iterable[Any] = ()) -> None:
        super().__init__(items)
        self._ids: set[Hashable] | None = None

    def __contains__(self, item: object) -> bool:
        ids = self.__dict__.get("_ids")
        if ids is None:
            try:
                ids = self._ids = set(self)
            except TypeError:  # an unhashable element: no set
                return super().__contains__(item)
        try:
            return item in ids
        except TypeError:
            return super().__contains__(item)

    def __reduce_ex__(self, protocol: Any) -> Any:  # copies (deepcopy, pickle) are plain lists
        return list, (list(self),)


def _dropping_ids(name: str) -> Any:
    method = getattr(list, name)

    def changed(self: ParamIds, *args: Any) -> Any:
        self._ids = None
        return method(self, *args)

    changed.__name__ = name
    return changed


for _name in ("__setitem__", "__delitem__", "__iadd__", "__imul__", "append", "extend", "insert", "remove", "pop",
              "clear", "sort", "reverse"):
    setattr(ParamIds, _name, _dropping_ids(_name))
del _name


def with_param_ids(state: Any) -> Any:
    """``state`` (an optimizer's state dict) with each parameter group's ``params`` a :class:`ParamIds`;
    anything else as it is (a malformed state dict is ``load_state_dict``'s to refuse)."""
    if not isinstance(state, dict) or not isinstance(state.get("param_groups"), list):
        return state
    groups = [{**g, "params": ParamIds(g["params"])} if isinstance(g, dict) and type(g.get("params")) is list else g
              for g in state["param_groups"]]
    return {**state, "param_groups": groups}
