"""Key paths: the name of a value by where it sits in nested state (``opt/state/0/exp_avg``).

Each part is a dict key or a list index; parts are joined by ``/``, and a ``/`` or ``~`` inside a
part is escaped as ``~1`` / ``~0``, as in JSON Pointer. A tensor's key path is its name in the
shards (``_format.tree`` stores everything else as typed JSON); a restore matches saved values to
the tracked objects' by their flattened key paths (:func:`leaves`).
"""

from __future__ import annotations

import collections
from collections.abc import Collection, Mapping, Sequence
from typing import Any

SEP = "/"


def escape_part(part: str) -> str:
    """Escape one key part so that it contains no ``/``.

    Example:
        >>> escape_part("a/b~c")
        'a~1b~0c'
    """
    if "~" in part or SEP in part:
        return part.replace("~", "~0").replace(SEP, "~1")
    return part


def unescape_part(part: str) -> str:
    """Invert :func:`escape_part`.

    Example:
        >>> unescape_part("a~1b~0c")
        'a/b~c'
    """
    return part.replace("~1", SEP).replace("~0", "~")


def key_part(key: Any) -> str:
    """The name part for a dict key or list index: ints as digits, strings as-is, else repr."""
    if isinstance(key, str):
        return escape_part(key)
    if isinstance(key, int) and not isinstance(key, bool):
        return str(key)
    return escape_part(repr(key))


def distinct_parts(keys: Sequence[Any], shared: Collection[str] | None = None) -> list[str]:
    """One part for each key of a dict, as ``diff`` and :meth:`CheckpointReader.get_value` spell them.

    A str key whose part is also another key's (``"1"`` beside ``1``) is quoted (``'1'``); in such
    a dict every str key whose part starts with a quote or holds a ``#`` is quoted too (``"'1'"``,
    ``'nan#2'``), so that a part names one key whatever the order. A part seen before gets ``#2``
    (a second NaN). ``shared``: the parts to quote (``diff`` passes those of both checkpoints); by
    default those that two of ``keys`` share.
    """
    parts = [key_part(k) for k in keys]
    if shared is None:
        shared = {p for p, n in collections.Counter(parts).items() if n > 1}
    seen: dict[str, int] = {}
    out = []
    for key, part in zip(keys, parts):
        if type(key) is str and (part in shared or shared and (part.startswith(("'", '"')) or "#" in part)):
            part = escape_part(repr(key))
        seen[part] = count = seen.get(part, 0) + 1
        out.append(part if count == 1 else f"{part}#{count}")
    return out


def join(prefix: str, part: str) -> str:
    """Join an (already escaped) part onto a prefix."""
    return f"{prefix}{SEP}{part}" if prefix else part


def split(name: str) -> list[str]:
    """Split a name into its escaped parts."""
    return name.split(SEP)


def canonical_module_key(key: str, ddp: bool = True) -> str:
    """A module's state-dict key without ``torch.compile``'s ``_orig_mod.`` parts and (``ddp``)
    DDP's leading ``module.``: ``module._orig_mod.net.0.weight`` -> ``net.0.weight``."""
    parts = [p for p in key.split(".") if p != "_orig_mod"]
    while ddp and len(parts) > 1 and parts[0] == "module":
        parts.pop(0)
    return ".".join(parts)



def display(path: str) -> str:
    """A key path for messages (the root is shown as ``<root>``)."""
    return path or "<root>"


def _is_scalar(value: Any) -> bool:
    return value is None or isinstance(value, (bool, int, float, str))


def leaves(value: Any, prefix: str, out: dict[str, Any] | None = None) -> dict[str, Any]:
    """Flatten containers into ``{name: leaf}``.

    An empty container, and a tuple of plain scalars (such as Python's RNG state), is one leaf.
    """
    if out is None:
        out = {}
    if isinstance(value, Mapping) and value:
        for k, v in value.items():
            leaves(v, join(prefix, key_part(k)), out)
    elif isinstance(value, list) and value or type(value) is tuple and not all(map(_is_scalar, value)):
        for i, v in enumerate(value):
            leaves(v, join(prefix, str(i)), out)
    else:
        out[prefix] = value
    return out
