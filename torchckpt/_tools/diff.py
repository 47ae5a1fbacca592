"""``torchckpt diff``: how two checkpoints' plain values and tensor values compare.

The command line prints what these find. Plain values are compared by type and value (an int 1
differs from a float 1.0, as a restore would see them; two NaNs are the same value), under key
paths that tell apart keys of one spelling (``1`` and ``"1"`` of one dict, in either checkpoint,
shown ``1`` and ``'1'``), and shown
shortened when long (a Mersenne Twister state is 625 ints). Tensor values are compared chunk by
chunk as they stream from both checkpoints, so memory stays bounded whatever their size.

Only the comparison of tensor values (``--values``) imports torch: the plain values come from the
index's state tree, read without it.
"""

from __future__ import annotations

import math
from collections.abc import Iterator, Mapping
from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Any

from torchckpt._format import chunks, keypath
from torchckpt._format.tree import MissingPerRank
from torchckpt._load import opened as load_opened
from torchckpt.reader import CheckpointReader

if TYPE_CHECKING:
    import torch

RENDER_LIMIT = 120  # a Mersenne Twister state is 625 ints: shown as its start and its length


class _Absent:
    def __repr__(self) -> str:
        return "<absent>"


ABSENT: Any = _Absent()  # the value of a key one checkpoint does not have


class _Tensor:
    """Where the state tree holds a tensor: left out of the plain values (the tensor pass compares it
    by its stored name), but where its path is not that name (a quoted key above it)."""

    def __repr__(self) -> str:
        return "(tensor)"


_TENSOR = _Tensor()


@dataclass(frozen=True)
class _Container:
    """Where the state tree holds a dict, list or tuple whose items are compared one by one: its
    kind is compared too, so that a list that became a tuple (or a dict an OrderedDict, or a key
    that became another type, tensors below it) is a change although every item is the same."""

    kind: str
    empty: bool = field(default=False, compare=False)  # shown as it is (``{}``), compared by its kind alone

    def __repr__(self) -> str:
        if self.empty:
            return {"dict": "{}", "list": "[]"}.get(self.kind, f"{self.kind}()")
        return f"({self.kind})"


def plain_values(a: CheckpointReader, b: CheckpointReader) -> tuple[dict[str, Any], dict[str, Any]]:
    """Every plain value of each checkpoint's state tree by its ``/`` key path (tensors left out),
    as :meth:`CheckpointReader.get_state` decodes it, without building a spec of each tensor.

    The key path is written as a tensor's name is (``keypath.leaves``), except where a dict holds,
    in either checkpoint, a str key and a key of another type of one spelling (``"1"`` and ``1``,
    ``"None"`` and ``None``, on any rank): the str key is then quoted (``'1'``), and a key after one
    of the same spelling (a second NaN) gets ``#2`` (``keypath.distinct_parts``). One path for each value, so that no change hides behind a
    key of the same spelling, and the paths of other checkpoints are the names as they were."""
    ranks = [[_state(r, rank) for r in (a, b)] for rank in range(max(a.world_size, b.world_size))]
    kinds: dict[tuple[str, str], set[object]] = {}  # (dict's path, key's part) -> whether a str, for each key
    for state in (state for states in ranks for state in states):  # every rank's: a per-rank dict differs on each
        _key_kinds(state, "", kinds)
    quoted: dict[str, set[str]] = {}  # a dict's path -> the parts its str keys are quoted for
    for (path, part), found in kinds.items():
        if len(found) > 1:
            quoted.setdefault(path, set()).add(part)
    va, vb = (_leaves(state, "", "", quoted, {}) for state in ranks[0])
    for rank, states in enumerate(ranks[1:], 1):  # per-rank values: rank 0's above, the others here
        ra, rb = ({k: v for k, v in _leaves(state, "", "", quoted, {}).items()
                   if not isinstance(v, MissingPerRank)} for state in states)  # a rank the checkpoint has none for
        for key in {**ra, **rb}:
            if not (same(ra.get(key, _ABSENT), va.get(key, _ABSENT)) and same(rb.get(key, _ABSENT), vb.get(key, _ABSENT))):
                for mine, theirs in ((ra, va), (rb, vb)):  # differs from its rank 0's in one of them: named by rank
                    if key in mine:
                        theirs[chunks.rank_name(key, rank)] = mine[key]
    return va, vb


def _state(reader: CheckpointReader, rank: int) -> Any:
    """The checkpoint's state tree as ``rank`` restores it, each tensor ``_TENSOR``."""
    if reader.index is None:
        return {}
    return load_opened.state_tree(reader.index, lambda name: _TENSOR, rank, chunked=lambda name: _TENSOR)


_ABSENT = object()


def _key_kinds(value: Any, path: str, out: dict[tuple[str, str], set[object]]) -> None:
    """Whether each key of each dict below ``value`` is a str, by the dict's path and the key's part
    (and ``"twice"`` where two keys of one dict have that part: two NaNs)."""
    if isinstance(value, Mapping):
        seen: set[str] = set()
        for k, v in value.items():
            part = keypath.key_part(k)
            found = out.setdefault((path, part), set())
            found.add(type(k) is str)
            if part in seen:
                found.add("twice")
            seen.add(part)
            _key_kinds(v, keypath.join(path, part), out)
    elif isinstance(value, (list, tuple)):
        for i, v in enumerate(value):
            _key_kinds(v, keypath.join(path, str(i)), out)


def _leaves(value: Any, prefix: str, path: str, quoted: dict[str, set[str]], out: dict[str, Any]) -> dict[str, Any]:
    """``keypath.leaves``, with the parts of :func:`plain_values` (``path``: ``prefix`` unquoted)."""
    if prefix and (isinstance(value, (Mapping, list)) or type(value) is tuple and not all(map(_is_scalar, value))):
        out[prefix] = _Container(type(value).__name__, empty=not value)  # an empty one that fills up is no change
    if isinstance(value, Mapping) and value:
        for (k, v), part in zip(value.items(), keypath.distinct_parts(list(value), quoted.get(path, set()))):
            _leaves(v, keypath.join(prefix, part), keypath.join(path, keypath.key_part(k)), quoted, out)
    elif isinstance(value, list) and value or type(value) is tuple and not all(map(_is_scalar, value)):
        for i, v in enumerate(value):
            _leaves(v, keypath.join(prefix, str(i)), keypath.join(path, str(i)), quoted, out)
    elif isinstance(value, (Mapping, list)):
        pass  # empty: its kind is above
    elif value is not _TENSOR or prefix != path:  # a tensor under a key quoted in this checkpoint: its key changed
        out[prefix] = value
    return out


def _is_scalar(value: Any) -> bool:
    return value is None or isinstance(value, (bool, int, float, str))


def same(x: Any, y: Any) -> bool:
    """Whether two plain values are the same: same type and equal, or both NaN (also inside a
    tuple), and a float zero only of its own sign (as tensors are compared, bit for bit)."""
    if type(x) is not type(y):
        return False
    if type(x) is float:
        return (math.isnan(x) and math.isnan(y)) or (x == y and math.copysign(1.0, x) == math.copysign(1.0, y))
    if type(x) is tuple:
        return len(x) == len(y) and all(map(same, x, y))
    return bool(x == y)


def render(v: Any) -> str:
    """A plain value for one line of output: its repr, shortened past :data:`RENDER_LIMIT`."""
    if v is ABSENT:
        return "(absent)"
    text = repr(v)
    if len(text) <= RENDER_LIMIT:
        return text
    size = f"{len(v)} items, " if isinstance(v, (list, tuple, dict, str)) else ""
    return f"{text[: RENDER_LIMIT - 20]}... ({size}{len(text)} characters)"


def jsonable(v: Any) -> Any:
    """A plain value for JSON output: null when absent, scalars as they are, anything else its repr."""
    return None if v is ABSENT else v if isinstance(v, (int, str, bool)) or v is None else repr(v)


@dataclass(frozen=True)
class ValueDiff:
    """How the values of one tensor in two checkpoints compare."""

    elements: int  # elements whose bits differ: NaN against a number, -0.0 against 0.0 included
    max_abs: float  # the largest |a - b| among those that are numbers in both (0.0 when none is)


def value_diff(a: CheckpointReader, b: CheckpointReader, name: str, bar: Any) -> ValueDiff:
    """How the tensor ``name`` of two checkpoints (same shape and dtype) differs, streamed chunk by
    chunk; ``bar.update`` is told the bytes read.

    Elements are compared by their bits, so nothing that differs is missed: not a NaN, nor a
    difference below float32's or float64's precision, nor one between int64 or uint64 values past
    2**53. The largest difference is exact for integers and computed in float64 (complex128) for
    floating-point and complex types."""
    import torch

    elements, worst = 0, 0.0
    for x, y in _aligned(a.iter_chunks(name), b.iter_chunks(name)):
        bar.update(2 * x.numel() * x.element_size())
        differs = _bits(x) != _bits(y)
        count = int(differs.sum())
        if not count:
            continue
        elements += count
        xs, ys = x[differs], y[differs]
        if xs.dtype.is_complex:
            d = (xs.to(torch.complex128) - ys.to(torch.complex128)).abs()  # complex64, exactly
        elif xs.dtype.is_floating_point:
            d = (xs.double() - ys.double()).abs()
        elif xs.dtype in (torch.int64, torch.uint64):
            d = _wide_difference(xs, ys)
        else:
            d = (xs.to(torch.int64) - ys.to(torch.int64)).abs().double()
        d = d[~d.isnan()]
        if d.numel():
            worst = max(worst, float(d.max()))
    return ValueDiff(elements, worst)


def _wide_difference(xs: torch.Tensor, ys: torch.Tensor) -> torch.Tensor:
    """|xs - ys| of int64 or uint64 elements, exact before it is made a float64: in int64 where no
    difference can overflow (every value within 2**62), in Python's ints otherwise (the rare tensor
    of values near the type's ends)."""
    import torch

    x, y = xs.view(torch.int64), ys.view(torch.int64)  # uint64 has no comparisons on the CPU: its bits as int64
    low = 0 if xs.dtype == torch.uint64 else -(2**62)  # a uint64 past 2**63 has a negative int64 view
    if bool(((x >= low) & (x < 2**62) & (y >= low) & (y < 2**62)).all()):
        return (x - y).abs().double()
    return torch.tensor([float(abs(p - q)) for p, q in zip(xs.tolist(), ys.tolist())], dtype=torch.float64)


def _bits(t: torch.Tensor) -> torch.Tensor:
    """The bits of each element of a flat tensor, as integers of its width (every dtype a
    checkpoint holds is 1, 2, 4 or 8 bytes wide): equal bits, equal elements."""
    import torch

    return t.view({1: torch.uint8, 2: torch.int16, 4: torch.int32, 8: torch.int64}[t.element_size()])


def _aligned(a: Iterator[torch.Tensor], b: Iterator[torch.Tensor]) -> Iterator[tuple[torch.Tensor, torch.Tensor]]:
    """Pairs of equally long pieces of two streams of the same elements cut differently (a whole
    tensor in pieces of a size, a chunked one in blocks of rows). Both streams run to their end,
    where each checks its checksum (``zip`` would stop at the first one's end)."""
    x = y = None
    while True:
        if x is None:
            x = next(a, None)
        if y is None:
            y = next(b, None)
        if x is None or y is None:
            if x is not None or y is not None:
                raise ValueError("the two tensors have different numbers of elements")
            return
        n = min(x.numel(), y.numel())
        yield x[:n], y[:n]
        x = x[n:] if x.numel() > n else None
        y = y[n:] if y.numel() > n else None
