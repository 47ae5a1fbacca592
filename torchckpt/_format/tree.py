"""Reversible flattening of nested state into ``/`` keys, and typed JSON for everything else.

Why a typed JSON tree and not pickle: pickle runs code on load, so a checkpoint from a stranger
could own the machine. Typed JSON can only ever produce ints, floats, bools, strings, None,
tuples, lists, dicts (with keys of those types), ``torch.Size``, ``torch.dtype`` and
``torch.device``, and it keeps their exact types: a tuple comes back a tuple, ``float("inf")``
comes back ``inf``, an ``int`` dict key comes back an ``int``. A few other common types (a path,
a NumPy scalar or array, an ``argparse.Namespace``, a dict subclass) are stored as the nearest of
these (see ``_format.plain``); the rest is refused at save time, by its key path.

Tensors never enter the JSON. Each tensor is named by its key path (``_format.keypath``: parts
joined by ``/``, a ``/`` or ``~`` inside a part escaped as ``~1`` / ``~0`` as in JSON Pointer),
and stored in a safetensors shard under that name. Inside a plain string-keyed dict a tensor is
simply left out of the JSON (its name says where it goes); inside a list, a tuple or a dict with
non-string keys its position is held by the marker ``{"@tensor": null}``. Leaving tensors out
keeps ``index.json`` small and fast to parse for checkpoints with tens of thousands of tensors.
"""

from __future__ import annotations

import math
from collections import Counter, OrderedDict
from collections.abc import Callable, Iterable, Iterator, Mapping
from typing import TYPE_CHECKING, Any

from torchckpt._format import clashes, floats, plain
from torchckpt._format.keypath import SEP, display, distinct_parts, escape_part, join, key_part, split, unescape_part
from torchckpt.errors import CorruptCheckpointError, UnsupportedStateError, short_repr

if TYPE_CHECKING:
    import torch

TAG = "@"
TENSOR_TAG = "@tensor"
PER_RANK_TAG = "@per_rank"  # format 2: a value saved by each rank, indexed by rank
MAX_DEPTH = 100  # containers nested deeper than this are refused (they would exhaust the stack)
MAX_INT = 2**63  # dimensions of a torch.Size fit in 64 bits, sign included

# Decoded from this table only, never by looking a name up on the torch module: a name like
# "_dynamo" would otherwise make torch import whole subsystems on behalf of a file. Built when a
# dtype is first decoded: torch is imported by the values that need it, so that the command line
# reads a tree of plain values (metrics, a manager's state file) without it.
_DTYPES: dict[str, torch.dtype] = {}


def dtype_named(name: str) -> torch.dtype | None:
    """The torch dtype of a short name (``"float32"``), or None: the inverse of :func:`dtype_name`."""
    if not _DTYPES:
        import torch

        _DTYPES.update((dtype_name(v), v) for v in vars(torch).values() if isinstance(v, torch.dtype))
    return _DTYPES.get(name)


def dtype_name(dtype: torch.dtype) -> str:
    """A torch dtype's short name, as typed JSON and messages write it (``torch.float32`` -> ``"float32"``)."""
    return str(dtype).removeprefix("torch.")

# A leaf of the name trie: the full tensor name.
Trie = dict[str, "Trie | str"]


# -- encoding -------------------------------------------------------------------------------


def encode(value: Any, path: str, tensors: dict[str, torch.Tensor], ordered: bool = False,
           depth: int | None = None, one_process: list[str] | None = None) -> Any:
    """Encode ``value`` as typed JSON, moving every tensor into ``tensors`` under its name.

    A tensor in a dict of str keys is left out of the JSON (its name says where it goes), so it
    decodes after the dict's other keys, in the order of the index's tensor names; a writer whose
    layout reorders a dict's tensors marks their places once it knows the layout
    (``_format.dict_order``). With ``ordered`` every tensor keeps its place (``{"@tensor": null}``).

    A value of a type without a tag of its own (a path, a NumPy scalar or array, a dict subclass)
    is encoded as the nearest type that has one (``_format.plain.nearest``).

    ``depth``: how deep ``value`` is, as the decoder counts it (None: the parts of ``path``). Not
    read off the path below the root: the key ``""`` there adds no part to it.

    A ``PerRank`` value is marked ``@per_rank`` (a save by several ranks gathers every rank's),
    its tensors wrapped in ``PerRank``; with ``one_process`` (a single process's save) it is
    stored as the value it wraps, and its path is appended there.

    Raises:
        UnsupportedStateError: a value has no pickle-free representation, or containers are nested
            more than ``MAX_DEPTH`` deep; ``.key`` is its path.
    """
    import torch  # imported already by whoever holds tensors to save: a dict lookup

    if depth is None:
        depth = path.count(SEP) + 1 if path else 0

    if isinstance(value, torch.Tensor):
        if path in tensors:
            raise UnsupportedStateError(
                f"Two different values at {display(path)!r} map to the same tensor name; "
                "rename one of the keys (for example a dict holding both 0 and '0').",
                key=path,
                value_type=type(value),
            )
        tensors[path] = value
        return {TENSOR_TAG: None}
    if type(value) is str:
        _check_text(value, path)
        return value
    if value is None or isinstance(value, bool):
        return value
    kind = type(value)
    if kind is int:
        if -_TOO_MANY_DIGITS < value < _TOO_MANY_DIGITS:
            return value
        raise _too_many_digits(value, path)
    if kind is float:
        if math.isfinite(value):
            return value
        return {"@float": floats.nonfinite_text(value)}
    if kind is tuple:
        _check_depth(value, path, depth)
        return {"@tuple": [encode(v, join(path, str(i)), tensors, ordered, depth + 1, one_process)
                           for i, v in enumerate(value)]}
    if kind is list:
        _check_depth(value, path, depth)
        return [encode(v, join(path, str(i)), tensors, ordered, depth + 1, one_process) for i, v in enumerate(value)]
    if kind is torch.Size:
        if all(-MAX_INT <= d < MAX_INT for d in value):
            return {"@size": list(value)}
        raise UnsupportedStateError(
            f"Cannot save {display(path)!r}: the torch.Size {short_repr(tuple(value))} has a dimension outside 64 "
            "bits, which no tensor has and readers refuse. Store it as a tuple of ints instead.",
            key=path, value_type=torch.Size)
    if kind is torch.dtype:
        return {"@dtype": dtype_name(value)}
    if kind is torch.device:
        return {"@device": str(value)}
    if kind is dict:
        return _encode_dict(value, path, tensors, ordered, depth, one_process)
    if kind is PerRank and one_process is not None:
        one_process.append(path)
        return encode(value.value, path, tensors, ordered, depth, one_process)
    if kind is PerRank:  # its tensors are marked as this rank's own: wrapped in PerRank
        inner: dict[str, torch.Tensor] = {}
        node = {PER_RANK_TAG: encode(value.value, path, inner, ordered, depth)}  # a reader takes the wrapper off first
        tensors.update((name, PerRank(t)) for name, t in inner.items())  # type: ignore[misc]
        return node
    if kind in _DICT_TAGS:
        return _encode_pairs(_DICT_TAGS[kind], value, path, tensors, ordered, depth, one_process)
    return encode(plain.nearest(value, path), path, tensors, ordered, depth, one_process)  # a type of the tree, or the refusal


# Ints of more digits than this are refused: JSON writes them in decimal, and Python parses at most
# 4,300 digits unless told otherwise (``sys.int_info.default_max_str_digits``): a reader would refuse
# the index. Fixed here, not read from this process's setting, which another reader need not share.
_TOO_MANY_DIGITS = 10**4300


def _too_many_digits(value: int, path: str) -> UnsupportedStateError:
    return UnsupportedStateError(
        f"Cannot save {display(path)!r}: an int of {value.bit_length():,} bits has more than the 4,300 decimal "
        "digits a JSON reader parses. Store hex(x) instead (int(s, 16) reads it back), or its bytes in a tensor.",
        key=path,
        value_type=int,
    )


def _check_depth(value: Any, path: str, depth: int) -> None:
    """Refuse a non-empty container at ``MAX_DEPTH`` levels: its values could be saved but never
    loaded (the decoder refuses deeper trees before they could exhaust the stack)."""
    if value and depth >= MAX_DEPTH:
        raise UnsupportedStateError(
            f"Cannot save {display(path)[:200]!r}: containers are nested more than {MAX_DEPTH} deep (does a "
            "container hold itself?), which a checkpoint cannot load back. Flatten the value, for example into a "
            "dict keyed by its path.",
            key=path,
            value_type=type(value),
        )


_DICT_TAGS: dict[type, str] = {dict: "@dict", OrderedDict: "@ordered_dict", Counter: "@counter"}
DICT_TYPES: dict[str, type] = {tag: kind for kind, tag in _DICT_TAGS.items()}


def _check_text(text: str, path: str) -> None:
    """Refuse a string that has no UTF-8 form (a lone surrogate such as ``"\ud800"``)."""
    if not text.isascii():
        try:
            text.encode()
        except UnicodeEncodeError:
            raise UnsupportedStateError(
                f"Cannot save {display(path)!r}: the string {text[:40]!r} holds a lone surrogate, which UTF-8 "
                "(and so JSON) cannot store; encode or replace it first (for example "
                "`s.encode('utf-8', 'surrogatepass').decode('utf-8', 'replace')`).",
                key=path,
                value_type=str,
            ) from None


def _encode_dict(value: dict[Any, Any], path: str, tensors: dict[str, torch.Tensor], ordered: bool,
                 depth: int, one_process: list[str] | None) -> Any:
    import torch

    _check_depth(value, path, depth)
    if not all(type(k) is str and not k.startswith(TAG) for k in value):
        return _encode_pairs("@dict", value, path, tensors, ordered, depth, one_process)
    out: dict[str, Any] = {}
    left_out = mixed = False  # mixed: a value follows a tensor left out, which would decode after it
    for k, v in value.items():
        _check_text(k, path)
        child = join(path, escape_part(k))
        if isinstance(v, torch.Tensor) and not ordered:  # left out of the JSON: its name says where it goes
            if child in tensors:
                encode(v, child, tensors)  # raises the duplicate-name error
            tensors[child] = v
            left_out = True
        else:
            mixed = mixed or left_out
            before, listed = len(tensors), len(one_process or ())
            out[k] = encode(v, child, tensors, ordered, depth + 1, one_process)
            _check_not_root_named(child, path, _one_process_value(v, one_process), len(tensors) > before)
            if child == path and one_process is not None and len(one_process) > listed:
                _refuse_below_root_key(one_process[listed:], depth)
    return {k: out.get(k, _PLACED) for k in value} if mixed else out  # every key in its place, as torch.load


def _one_process_value(value: Any, one_process: list[str] | None) -> Any:
    """What a single process stores for ``value``: a ``PerRank``'s value (``encode``)."""
    return value.value if one_process is not None and type(value) is PerRank else value


def _check_not_root_named(child: str, path: str, value: Any, has_tensors: bool) -> None:
    """Refuse the key ``""`` at the root when tensors are below it: their names would be the root's own.
    (A single process's ``PerRank`` of a tensor is that tensor: the caller passes it unwrapped.)"""
    import torch

    if child == path and has_tensors and not isinstance(value, torch.Tensor):
        raise UnsupportedStateError(
            "Cannot save the top-level key '': the tensors below it would be named as if they were at "
            "the top level, where a restore could not tell them apart. Rename the key.",
            key="",
            value_type=type(value),
        )


_PLACED = {TENSOR_TAG: None}  # a tensor's place among its dict's keys (shared: JSON only reads it)


# Keys stored as they are: any other key (a tuple, a path, a NumPy scalar) is named by the key it
# decodes to, since that is the key whose name the decoder looks its tensors up by.
_PLAIN_KEYS = frozenset({str, int, float, bool, type(None)})


def _encode_pairs(tag: str, value: Mapping[Any, Any], path: str, tensors: dict[str, torch.Tensor],
                  ordered: bool, depth: int, one_process: list[str] | None) -> Any:
    _check_depth(value, path, depth)
    pairs = []
    decoded: list[Any] | None = None  # the keys as loaded, from the first one not stored as it is
    named: dict[str, tuple[Any, bool]] = {}  # key path -> the first key named so, and whether tensors are below it
    spelled: list[str] | None = None  # each key's part as diff names it (``keypath.distinct_parts``), once needed
    for i, (k, v) in enumerate(value.items()):
        if type(k) is int and not -_TOO_MANY_DIGITS < k < _TOO_MANY_DIGITS:
            raise _too_many_digits(k, path)
        original = k
        child = join(path, key_part(k))
        key = k if type(k) is int else _encode_key(k, child, depth + 1)  # an int (an optimizer's state) is its own JSON
        if type(k) not in _PLAIN_KEYS:
            decoded = list(value)[:i] if decoded is None else decoded
            k = decode(key, None, lambda name: None, path)
            child = join(path, key_part(k))
        if decoded is not None:
            decoded.append(k)
        before, listed = len(tensors), len(one_process or ())
        node = encode(v, child, tensors, ordered, depth + 1, one_process)
        _check_not_root_named(child, path, _one_process_value(v, one_process), len(tensors) > before)  # beside a key the pairs encoding takes
        if one_process is not None and len(one_process) > listed:  # named as diff and get_value name the key
            if child == path:
                _refuse_below_root_key(one_process[listed:], depth)
            spelled = distinct_parts(_loaded_keys(value, path, depth)) if spelled is None else spelled
            if spelled[i] != key_part(k):
                one_process[listed:] = [join(path, spelled[i]) + p[len(child):] for p in one_process[listed:]]
        first, below = named.setdefault(child, (original, len(tensors) > before))
        if first is not original and (below or len(tensors) > before):
            raise clashes.same_name(path, first, original, child)
        if tag == "@counter" and not _is_count(node):
            raise UnsupportedStateError(
                f"Cannot save {display(child)!r}: a Counter's counts must be numbers, and this one is "
                f"{type(v).__qualname__}. Store dict(counter) to keep other values.",
                key=child,
                value_type=type(v),
            )
        pairs.append([key, node])
    if decoded is not None and len(set(decoded)) < len(decoded):
        clashes.refuse_equal_keys(value, decoded, path)
    return {tag: pairs}


def _refuse_below_root_key(paths: list[str], depth: int) -> None:
    """Refuse per-rank values below the top-level key ``""`` (the key itself may be one): their key
    paths would name them as if they were at the top level (``join("", "")`` is ``""``), as
    tensors' names would, and a rank other than 0 could not be told which values are rank 0's."""
    if depth or any(paths):
        raise UnsupportedStateError(
            "Cannot save the top-level key '': the per-rank values (PerRank, RNG states, data positions) below it "
            "would be named as if they were at the top level. Rename the key.", key="", value_type=PerRank)


def _loaded_keys(value: Mapping[Any, Any], path: str, depth: int) -> list[Any]:
    """A dict's keys as a reader loads them (a key of a type without a tag of its own as the key it
    decodes to), which ``diff`` spells."""
    return [k if type(k) in _PLAIN_KEYS else decode(_encode_key(k, join(path, key_part(k)), depth + 1), None,
                                                    lambda name: None, path) for k in value]


def _is_count(node: Any) -> bool:
    """Whether an encoded value decodes to a number (what a Counter holds)."""
    return type(node) in (int, float, bool) or type(node) is dict and "@float" in node


def _encode_key(key: Any, path: str, depth: int) -> Any:
    inside: dict[str, torch.Tensor] = {}
    per_rank: list[str] = []
    node = encode(key, path, inside, depth=depth, one_process=per_rank)
    if per_rank:
        raise UnsupportedStateError(
            f"Cannot save {display(path)!r}: a dict key cannot be per rank (PerRank); a key names one value for every "
            "rank. Put the PerRank in the value instead.", key=path, value_type=type(key))
    if inside:  # a tensor key, or a tuple key holding one: a key has no name for its tensor to go under
        raise UnsupportedStateError(
            f"Cannot save {display(path)!r}: a tensor used as (or inside) a dict key cannot be stored; "
            "use an int or str key instead.",
            key=path,
            value_type=type(key),
        )
    return node


class PerRank:
    """A value that differs from rank to rank (a data cursor, a sampler's position): saved by every rank.

    Without it, a plain value that differs across the ranks of a job is refused at save time, never
    silently collapsed to one rank's copy. Each rank restores its own; a rank the checkpoint has
    no value for (restoring on more ranks than saved) is reported missing. In a single process
    the value is saved as it is. ``RNGState`` is always per rank.

    Example:
        >>> import torchckpt
        >>> cursor = torchckpt.PerRank(1200)
        >>> ckpt = torchckpt.Checkpoint(cursor=cursor)
        >>> cursor.value
        1200
    """

    __slots__ = ("value",)

    def __init__(self, value: Any) -> None:
        self.value = value

    def __repr__(self) -> str:
        return f"PerRank({self.value!r})"


class MissingPerRank:
    """What a ``@per_rank`` value decodes to on a rank the checkpoint holds no value for."""

    def __init__(self, rank: int, saved_world: int) -> None:
        self.rank = rank
        self.saved_world = saved_world

    @property
    def reason(self) -> str:
        return (f"rank {self.rank} has no saved value: the checkpoint was saved by {self.saved_world} "
                f"rank{'s' if self.saved_world != 1 else ''}")


# -- decoding -------------------------------------------------------------------------------


def build_trie(names: Iterator[str] | list[str]) -> Trie:
    """Nest tensor names by their parts: ``{"a": {"b": "a/b"}}``.

    Raises:
        CorruptCheckpointError: a name is listed twice, or is a prefix of another, or a part of it is
            not spelled as a writer escapes its key (``clashes.misspelled``).
    """
    root: Trie = {}
    for name in names:
        if "~" in name and (misspelled := clashes.misspelled(name)):
            raise corrupt_at(*misspelled)
        node = root
        parts = split(name)
        for part in parts[:-1]:
            child = node.setdefault(part, {})
            if isinstance(child, str):
                raise CorruptCheckpointError(f"Tensor name {child!r} is also used as a prefix of {name!r}.")
            node = child
        if parts[-1] in node:
            raise CorruptCheckpointError(clashes.listed_again(name, node[parts[-1]]))
        node[parts[-1]] = name
    return root


def decode(node: Any, trie: Trie | str | None, resolve: Callable[[str], Any], path: str = "", depth: int = 0) -> Any:
    """Rebuild a value from typed JSON, placing ``resolve(name)`` at each tensor's position.

    Raises:
        CorruptCheckpointError: the JSON is not a tree this module writes, or it disagrees with
            the tensor names.
    """
    if depth > MAX_DEPTH:
        raise corrupt_at(path, f"containers are nested more than {MAX_DEPTH} deep")
    depth += 1
    if isinstance(node, MissingPerRank):  # put there by select_rank, never by JSON
        if trie:
            raise corrupt_at(path, "tensors are stored for a rank that has no per-rank value")
        return node
    if isinstance(node, dict):
        if len(node) == 1:
            (tag, payload), = node.items()
            if tag.startswith(TAG):
                return _decode_tagged(tag, payload, trie, resolve, path, depth)
        if isinstance(trie, str):
            raise corrupt_at(path, "a tensor is stored where the state tree has a dict")
        sub = trie or {}
        out: dict[str, Any] = {}
        for k, v in node.items():
            if k.startswith(TAG):
                raise corrupt_at(path, f"unknown tag {k!r}")
            out[k] = decode(v, sub.get(escape_part(k)), resolve, join(path, escape_part(k)), depth)
        for part, child in sub.items():
            key = unescape_part(part)
            if key not in out:
                if not isinstance(child, str):
                    raise corrupt_at(join(path, part), "tensors are stored under a key the state tree lacks")
                out[key] = resolve(child)
        return out
    if isinstance(trie, str):
        raise corrupt_at(path, "a tensor is stored where the state tree has a plain value")
    if isinstance(node, list):
        sub = trie or {}
        return _all_placed([decode(v, sub.get(str(i)), resolve, join(path, str(i)), depth) for i, v in enumerate(node)],
                           sub, map(str, range(len(node))), path)
    if trie:
        raise corrupt_at(path, "tensors are stored under a plain value")
    if node is None or isinstance(node, (bool, int, float, str)):
        return node
    raise corrupt_at(path, f"unexpected JSON value of type {type(node).__name__}")


def _decode_tagged(tag: str, payload: Any, trie: Trie | str | None, resolve: Callable[[str], Any], path: str,
                   depth: int) -> Any:
    if tag == TENSOR_TAG:
        if payload is not None:
            raise corrupt_at(path, f'a tensor\'s marker is {{"{TENSOR_TAG}": null}}, and this one holds '
                                 f"{short_repr(payload)} in place of null")
        if not isinstance(trie, str):
            raise corrupt_at(path, "the state tree expects a tensor here but no tensor has this name")
        return resolve(trie)
    if isinstance(trie, str):
        raise corrupt_at(path, "a tensor is stored where the state tree has a value")
    if tag == "@float":
        value = floats.nonfinite_value(payload)
        if value is None:
            raise corrupt_at(path, f"bad @float {payload!r}")
        return value
    if tag == "@tuple" and isinstance(payload, list):
        sub = trie or {}
        return _all_placed(tuple(decode(v, sub.get(str(i)), resolve, join(path, str(i)), depth)
                                 for i, v in enumerate(payload)), sub, map(str, range(len(payload))), path)
    if tag in DICT_TYPES and isinstance(payload, list):
        return _decode_pairs(tag, payload, trie or {}, resolve, path, depth)
    if trie:
        raise corrupt_at(path, "tensors are stored under a plain value")
    if tag == "@size" and isinstance(payload, list) and all(type(d) is int and -MAX_INT <= d < MAX_INT for d in payload):
        import torch

        return torch.Size(payload)
    if tag == "@dtype" and isinstance(payload, str):
        dtype = dtype_named(payload)
        if dtype is not None:
            return dtype
    if tag == "@device" and isinstance(payload, str) and len(payload) < 64:
        import torch

        try:
            return torch.device(payload)
        except (RuntimeError, ValueError, TypeError):
            pass
    raise corrupt_at(path, f"bad tagged value {tag!r}")


def _decode_pairs(tag: str, payload: list[Any], sub: Trie, resolve: Callable[[str], Any], path: str,
                  depth: int) -> Any:
    """A pairs-encoded dict (``@dict``, ``@ordered_dict``, ``@counter``), refused where two keys are
    equal in Python or share the name part that tensors are stored under (``clashes.pair_clash``)."""
    out: dict[Any, Any] = DICT_TYPES[tag]()
    parts: set[str] = set()
    for pair in payload:
        if not (isinstance(pair, list) and len(pair) == 2):
            raise corrupt_at(path, "@dict entries must be [key, value] pairs")
        key = decode(pair[0], None, resolve, path, depth)
        try:
            hash(key)
        except TypeError:
            raise corrupt_at(path, f"a dict key of type {type(key).__name__} cannot be a key") from None
        part = key_part(key)
        if key in out or part in parts and part in sub:
            raise corrupt_at(path, clashes.pair_clash(out, key, part, path))
        parts.add(part)
        item = decode(pair[1], sub.get(part), resolve, join(path, part), depth)
        if tag == "@counter" and type(item) not in (int, float, bool):
            raise corrupt_at(path, "a Counter's values must be numbers")
        out[key] = item
    return _all_placed(out, sub, parts, path)


def _all_placed(value: Any, sub: Trie, parts: Iterable[str], path: str) -> Any:
    """``value``, the container decoded at ``path`` from positions ``parts``, once no tensor is
    stored below it at a position it lacks (an index past a list's end, a key no ``@dict`` pair has):
    decoding would drop those without a word, where a plain dict's missing key is refused as met."""
    unplaced = set(sub).difference(parts) if sub else ()
    if unplaced:
        raise corrupt_at(join(path, min(unplaced)), "tensors are stored under a key the state tree lacks")
    return value


def corrupt_at(path: str, what: str) -> CorruptCheckpointError:
    """The error of a state tree that is not one this module writes, naming the key path."""
    return CorruptCheckpointError(f"Invalid state tree at {display(path)[:200]!r}: {what}.")
