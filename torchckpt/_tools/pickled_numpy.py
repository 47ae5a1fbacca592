"""NumPy scalars, arrays and dtypes in a ``torch.save`` file, rebuilt without NumPy's unpickling.

Lightning puts NumPy values into a checkpoint's hyperparameters and callback state, and
``torch.load(weights_only=True)`` refuses them unless NumPy's reconstructors are allowed. Those
trust the pickle: ``dtype.__setstate__`` takes fields, flags and sizes from it, so a crafted file
can declare an object field over raw bytes of its choosing, and freeing the array then treats
those bytes as a pointer (a crash, or worse, from ``torchckpt convert`` of a downloaded file).

So the names a pickle uses for them (``numpy.dtype``, ``numpy.ndarray``, ``numpy.core.multiarray``'s
``_reconstruct`` and ``scalar``, under NumPy 1's and 2's module names) are given to the functions
here. They build stand-ins that check what the pickle says (a dtype is a plain code such as
``"f4"`` or ``"U5"``, with no fields, subarray or objects; an array's bytes are exactly its shape
times its item size) and make each value from its bytes with ``numpy.frombuffer``, never from
the pickle's state. :func:`resolved` swaps the stand-ins for the NumPy values once the file is
loaded.
"""

from __future__ import annotations

import argparse
import math
from typing import Any

from torchckpt.errors import short_repr

_WALK_DEPTH = 200  # twice the deepest tree a checkpoint takes (``_format.tree.MAX_DEPTH``)
# A pickle's memo lets 11 bytes a level nest (t, t) tuples whose tree has 2**levels leaves, and a
# checkpoint stores each use of a shared container: past this many values beyond four times what
# the file holds, it is refused (a real state repeats a container a few times at most)
MAX_REPEATED = 1_000_000
_SAFE_KINDS = frozenset("biufcSUmM")  # numbers, bool, fixed-size text and bytes, dates: no object pointers
_MAX_DIMS = 64  # NumPy's own limit


class NumpyPickleError(ValueError):
    """A NumPy value in a pickle that is not one NumPy writes for a plain dtype."""


class ExpansionError(ValueError):
    """Values a checkpoint would not take: nested deeper than :data:`_WALK_DEPTH`, or shared
    containers repeated far beyond the values the file holds (see :func:`resolved`)."""


class _Dtype:
    """A dtype as the pickle describes it: a plain code, then its byte order (``__setstate__``)."""

    dtype: Any = None

    def __setstate__(self, state: Any) -> None:
        if not isinstance(state, tuple) or len(state) < 5 or state[2:5] != (None, None, None):
            raise NumpyPickleError("a NumPy dtype with fields or a subarray (a record dtype)")
        order = state[1]
        if self.dtype is None:
            raise NumpyPickleError("a NumPy dtype without its code")
        if order not in ("<", ">", "=", "|"):
            raise NumpyPickleError(f"a NumPy dtype pickled with byte order {short_repr(order)}")
        if self.dtype.kind in "mM":  # a date or a duration: its unit is in the state's metadata
            self.dtype = _with_unit(self.dtype, state[8] if len(state) > 8 else None)
        if order in "<>":
            self.dtype = self.dtype.newbyteorder(order)


_UNITS = frozenset(("Y", "M", "W", "D", "h", "m", "s", "ms", "us", "ns", "ps", "fs", "as", "generic"))


def _with_unit(dtype: Any, metadata: Any) -> Any:
    """``datetime64``/``timedelta64`` of the unit NumPy pickles as ``(None, (b"h", 1, 1, 1))``: without
    it, ten hours would read as ten of no unit."""
    import numpy

    if not (isinstance(metadata, tuple) and len(metadata) == 2 and isinstance(metadata[1], tuple)
            and len(metadata[1]) == 4):
        raise NumpyPickleError(f"a NumPy {dtype} without its unit")
    unit, count = metadata[1][0], metadata[1][1]
    unit = unit.decode("ascii", "replace") if isinstance(unit, bytes) else unit
    if unit not in _UNITS or type(count) is not int or not 0 < count < 2**31:
        raise NumpyPickleError(f"a NumPy {dtype} of unit {short_repr(unit)}")
    if unit == "generic":
        return dtype
    try:
        return numpy.dtype(f"{dtype.str[1:3]}[{'' if count == 1 else count}{unit}]")
    except (TypeError, ValueError) as e:
        raise NumpyPickleError(f"a NumPy {dtype} of {short_repr(count)} {short_repr(unit)}") from e


class _Array:
    """An array as the pickle describes it: shape, dtype, order and bytes (``__setstate__``)."""

    array: Any = None

    def __setstate__(self, state: Any) -> None:
        import numpy

        if not isinstance(state, tuple) or len(state) != 5:
            raise NumpyPickleError("a NumPy array whose pickled state is not (version, shape, dtype, order, bytes)")
        _, shape, dtype, fortran, data = state
        dtype = _dtype_of(dtype)
        if (not isinstance(shape, tuple) or len(shape) > _MAX_DIMS
                or not all(type(n) is int and n >= 0 for n in shape)):
            raise NumpyPickleError(f"a NumPy array of shape {short_repr(shape)}")
        if type(fortran) is not bool or not isinstance(data, (bytes, bytearray)):
            raise NumpyPickleError("a NumPy array whose bytes are not stored as bytes (an object array)")
        if len(data) != math.prod(shape) * dtype.itemsize:
            raise NumpyPickleError(f"a NumPy array of shape {list(shape)} and dtype {dtype} stored in {len(data)} bytes")
        if not dtype.itemsize:  # empty strings (``U0``): nothing to read
            self.array = numpy.empty(shape, dtype=dtype)
            return
        try:
            self.array = numpy.frombuffer(bytes(data), dtype=dtype).reshape(shape, order="F" if fortran else "C")
        except (TypeError, ValueError) as e:
            raise NumpyPickleError(f"a NumPy array of shape {list(shape)} and dtype {dtype}") from e


class _ArrayClass:
    """What the pickle's ``numpy.ndarray`` global stands for: only an argument of ``_reconstruct``."""


def _dtype(code: Any, align: Any = False, copy: Any = True) -> _Dtype:
    """``numpy.dtype(code, align, copy)`` for a plain code; the byte order comes with ``__setstate__``."""
    import numpy

    if not isinstance(code, str) or align not in (False, 0) or len(code) > 16:
        raise NumpyPickleError(f"a NumPy dtype made from {short_repr(code)}")
    try:
        dtype = numpy.dtype(code)
    except (TypeError, ValueError) as e:
        raise NumpyPickleError(f"a NumPy dtype made from {short_repr(code)}") from e
    if dtype.kind not in _SAFE_KINDS or dtype.hasobject or dtype.fields is not None or dtype.subdtype is not None:
        raise NumpyPickleError(f"a NumPy dtype {dtype} (an object, record or void dtype)")
    made = _Dtype()
    made.dtype = dtype
    return made


def _reconstruct(cls: Any, shape: Any, typecode: Any) -> _Array:
    if cls is not _ArrayClass:
        raise NumpyPickleError(f"a NumPy array of class {short_repr(cls)}")
    return _Array()


def _scalar(dtype: Any, data: Any = None) -> Any:
    import numpy

    dtype = _dtype_of(dtype)
    if not isinstance(data, (bytes, bytearray)) or len(data) != dtype.itemsize:
        raise NumpyPickleError(f"a NumPy {dtype} scalar stored as {type(data).__name__}")
    if not dtype.itemsize:  # an empty string, pickled with the unsized dtype ``<U``
        return numpy.empty((), dtype=dtype)[()]
    return numpy.frombuffer(bytes(data), dtype=dtype)[0]


def _empty_bytes(*args: Any) -> bytes:
    """``bytes()``, which protocol 2 pickles an empty array's data as (non-empty bytes are
    ``_codecs.encode`` calls, which torch allows)."""
    if args:
        raise NumpyPickleError(f"bytes made by bytes{short_repr(args, 60)}")
    return b""


def _dtype_of(value: Any) -> Any:
    if not isinstance(value, _Dtype) or value.dtype is None:
        raise NumpyPickleError(f"a NumPy value whose dtype is {type(value).__name__}")
    return value.dtype


def globals_for_numpy() -> list[tuple[Any, str]]:
    """``(stand-in, pickled name)`` pairs for ``torch.serialization.safe_globals``: the names NumPy 1
    and 2 pickle its dtypes, arrays and scalars under. Empty without NumPy."""
    try:
        import numpy  # noqa: F401
    except ImportError:
        return []
    pairs: list[tuple[Any, str]] = [(_dtype, "numpy.dtype"), (_ArrayClass, "numpy.ndarray"),
                                    (_Dtype, f"{__name__}._Dtype"), (_Array, f"{__name__}._Array"),
                                    (_empty_bytes, "builtins.bytes")]
    for core in ("numpy.core", "numpy._core"):
        pairs += [(_reconstruct, f"{core}.multiarray._reconstruct"), (_scalar, f"{core}.multiarray.scalar")]
    return pairs


def resolved(value: Any) -> Any:
    """``value`` (what ``torch.load`` returned) with every stand-in replaced by its NumPy value:
    dicts, lists and ``argparse.Namespace`` objects changed in place, tuples rebuilt.

    Raises:
        NumpyPickleError: an array the pickle never filled, or the class ``numpy.ndarray`` as a value.
        ExpansionError: containers nested more than :data:`_WALK_DEPTH` deep (a checkpoint refuses
            half that), or shared containers that a checkpoint would store once per use, far more
            values than the file holds (:data:`MAX_REPEATED`).
    """
    resolver = _Resolver()
    out = resolver.value(value, 0)
    expanded = resolver.size_of(out)
    if expanded > 4 * resolver.visits + MAX_REPEATED:
        raise ExpansionError(f"shared containers that a checkpoint would store once per use: {expanded:,} values "
                             f"or more, from {resolver.visits:,} in the file")
    return out


class _Resolver:
    def __init__(self) -> None:
        self._done: dict[int, Any] = {}  # id of a container visited -> its value with stand-ins replaced
        self._kept: list[Any] = []  # the containers visited, alive, so that no other object takes their ids
        self._sizes: dict[int, int] = {}  # id of a resolved container -> the values it holds, repeats counted
        self.visits = 0  # values walked: each shared container once

    def size_of(self, value: Any) -> int:
        """How many values ``value`` holds, itself included, each use of a shared container counted
        (a container still being walked, in a cycle, counts one)."""
        return self._sizes.get(id(value), 1)

    def _sized(self, value: Any, items: Any) -> Any:
        self._kept.append(value)
        self._sizes[id(value)] = min(1 + sum(map(self.size_of, items)), 2**62)
        return value

    def value(self, value: Any, depth: int) -> Any:
        if isinstance(value, _Dtype):
            return _dtype_of(value)
        if isinstance(value, _Array):
            if value.array is None:
                raise NumpyPickleError("a NumPy array without its data")
            return value.array
        if value is _ArrayClass or isinstance(value, _ArrayClass):
            raise NumpyPickleError("the class numpy.ndarray as a value")
        self.visits += 1
        if not (isinstance(value, (dict, list, argparse.Namespace)) or type(value) is tuple):
            return value  # a tensor, a number, a str, a path, a torch.Size...: nothing inside to replace
        if depth > _WALK_DEPTH:  # a checkpoint refuses what is nested half as deep
            raise ExpansionError(f"values nested more than {_WALK_DEPTH} deep")
        key = id(value)
        if key in self._done:  # shared, or a cycle through a list or dict
            return self._done[key]
        self._kept.append(value)
        if type(value) is not tuple:  # a tuple is done once its items are (a cycle through it passes a list)
            self._done[key] = value
        if isinstance(value, dict):
            pairs = [(self.value(name, depth + 1), self.value(item, depth + 1)) for name, item in value.items()]
            if any(new is not old for (new, _), old in zip(pairs, value)):  # a key was a stand-in (a dtype)
                value.clear()
            for name, item in pairs:  # assigned: a Counter's own update() would count the pairs as new keys
                value[name] = item
            return self._sized(value, [v for pair in pairs for v in pair])
        if isinstance(value, list):
            value[:] = [self.value(item, depth + 1) for item in value]
            return self._sized(value, value)
        if isinstance(value, argparse.Namespace):
            vars(value).update({name: self.value(item, depth + 1) for name, item in vars(value).items()})
            return self._sized(value, vars(value).values())
        items = tuple(self.value(item, depth + 1) for item in value)
        self._done[key] = items if any(a is not b for a, b in zip(items, value)) else value
        return self._sized(self._done[key], items)
