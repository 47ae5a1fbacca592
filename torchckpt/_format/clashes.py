"""Keys and tensor names that a checkpoint could not tell apart: refused by the writer and the reader.

A tensor is named by its key path, each dict key written as one name part (``keypath.key_part``),
so some keys that differ share a part: ``1`` and ``"1"``, ``None`` and ``"None"``, two NaNs. With
tensors below both, one name would stand for two places. Keys that Python holds equal (``1``,
``1.0`` and ``True``; a path and the str it is stored as) cannot both be in one dict, so one value
would be lost. And a name part has one spelling, the escape of its key (``~`` as ``~0``, ``/`` as
``~1``): a part spelled otherwise (``~``, ``~2``) could stand for the key of another name.

The writer never stores such keys (``_format.tree.encode`` refuses them, by the helpers here), nor
such names (it spells each part by ``escape_part``). A reader refuses an index that holds them, a
forger's or another writer's, by the same rules: it would otherwise drop a tensor, or put one
tensor in two places, without a word.
"""

from __future__ import annotations

from collections.abc import Iterable, Mapping
from typing import Any

from torchckpt._format.keypath import SEP, display, escape_part, join, key_part, split, unescape_part
from torchckpt.errors import UnsupportedStateError


def _first_equal(originals: Iterable[Any], keys: Iterable[Any]) -> tuple[Any, Any, Any] | None:
    """The first two of ``keys`` that are equal in Python, as (the first's original, the second's
    original, the key), or None: a dict keeps one of them."""
    first: dict[Any, Any] = {}
    for original, key in zip(originals, keys):
        if key in first:
            return first[key], original, key
        first[key] = original
    return None


def _shared_name(first: Any, second: Any, child: str) -> str:
    """What is wrong with two keys of one dict whose parts of tensor names are the same."""
    return (f"its keys {first!r} and {second!r} both name the tensors below them {display(child)!r}/..., so a "
            "restore could not tell them apart")


# -- writing --------------------------------------------------------------------------------


def same_name(path: str, first: Any, second: Any, child: str) -> UnsupportedStateError:
    """Two keys of one dict (``1`` and ``"1"``, ``None`` and ``"None"``) whose parts of tensor names are
    the same: the tensors below them would be found under both on load."""
    return UnsupportedStateError(
        f"Cannot save {display(path)!r}: {_shared_name(first, second, child)}. Rename one of the keys.",
        key=child,
        value_type=type(second),
    )


def refuse_equal_keys(value: Mapping[Any, Any], decoded: list[Any], path: str) -> None:
    """Two keys that are stored as one (``Path("a")`` and ``"a"``) would lose a value: refused."""
    found = _first_equal(value, decoded)
    if found is not None:
        first, original, key = found
        raise UnsupportedStateError(
            f"Cannot save {display(path)!r}: its keys {first!r} and {original!r} are both stored as "
            f"{key!r} (a path, a NumPy scalar or a str subclass is stored as its plain value), so one value "
            "would be lost. Rename one of the keys.",
            key=join(path, key_part(key)),
            value_type=type(original),
        )


# -- reading --------------------------------------------------------------------------------


def misspelled(name: str) -> tuple[str, str] | None:
    """The key path of the first part of the tensor name ``name`` not spelled as the escape of its
    key, and what is wrong with it; None when every part is."""
    if "~" not in name:  # a part without a '~' is its own key's escape (it holds no '/')
        return None
    parts = split(name)
    for i, part in enumerate(parts):
        key = unescape_part(part)
        if escape_part(key) != part:
            return SEP.join(parts[: i + 1]), (
                f"the tensor name {name!r} spells the key {key!r} as {part!r}, where a writer spells it "
                f"{escape_part(key)!r} (each '~' of a key as '~0', each '/' as '~1'), so two names could "
                "stand for one key")
    return None


def pair_clash(keys: Iterable[Any], key: Any, part: str, path: str) -> str:
    """What is wrong with the keys ``keys`` of a pairs-encoded dict at ``path`` and the key ``key``
    (whose name part is ``part``) of a pair after them: ``key`` equals one of them in Python, or
    shares its name part with one of them while tensors are stored under that part."""
    keys = list(keys)
    found = _first_equal([*keys, key], [*keys, key])
    if found is not None:
        return (f"its keys {found[0]!r} and {found[1]!r} are equal in Python, so a dict would keep one of "
                "them and lose the other's value (torchckpt refuses to save such keys)")
    first = next(k for k in keys if key_part(k) == part)
    return f"{_shared_name(first, key, join(path, part))} (torchckpt refuses to save such keys)"


def listed_again(name: str, found: Mapping[str, Any] | str) -> str:
    """What is wrong with the tensor name ``name`` where the trie of the names before it
    (``_format.tree.build_trie``) holds ``found``: the same name, or names below it."""
    if isinstance(found, str):
        return f"Tensor name {name!r} is listed twice."
    while not isinstance(found, str):
        found = next(iter(found.values()))
    return f"Tensor name {name!r} is also used as a prefix of {found!r}."
