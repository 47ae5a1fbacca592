"""What a stored tensor is on disk: its dtype's name, its shape key, its checksum, its place.

safetensors names dtypes (``F32``, ``BF16``); the index's tensor table writes a shape as a key
(``"16,8"``) and checksums as fixed-width hex. These encodings, their parsers and the
:class:`TensorInfo` a reader builds from them live here, apart from the header and index parsers
that use them, because the save path, the load path and the tools all need them alone.

Why dtypes are names here: the command line's ``inspect``, ``ls``, ``verify`` and ``diff`` read
only JSON and headers, and importing torch would cost them over a second. So the format layer
knows each dtype by its safetensors name and size (:data:`ITEMSIZES`), and turns a name into a
``torch.dtype`` only when asked (:func:`str_to_dtype`, :attr:`TensorInfo.dtype`), through tables
built on first use; torch is imported then, by the code that builds tensors anyway.

Why caches: a model repeats a few shapes and dtypes across thousands of tensors, so sizes, shape
keys and byte counts are shared objects (bounded, so a hostile index cannot grow them forever).
"""

from __future__ import annotations

import contextlib
import math
import re
import struct
from collections.abc import Sequence
from typing import TYPE_CHECKING, Any, NamedTuple

from torchckpt._format.spec import CHECKSUM_CHARS, MAX_DIM
from torchckpt.errors import CorruptCheckpointError, short_repr

if TYPE_CHECKING:
    import torch

# safetensors dtype name -> bytes per element (the format's own table; no torch needed)
ITEMSIZES: dict[str, int] = {
    "BOOL": 1, "U8": 1, "I8": 1, "F8_E5M2": 1, "F8_E4M3": 1, "F8_E5M2FNUZ": 1, "F8_E4M3FNUZ": 1, "F8_E8M0": 1,
    "I16": 2, "U16": 2, "F16": 2, "BF16": 2,
    "I32": 4, "U32": 4, "F32": 4,
    "C64": 8, "F64": 8, "I64": 8, "U64": 8,
}

# The torch dtype of each name, by its attribute of torch (read when torch is first needed); also
# how the command line names a dtype (``float32``, as ``str(torch.float32)`` without ``torch.``).
TORCH_NAMES = {
    "BOOL": "bool", "U8": "uint8", "I8": "int8", "F8_E5M2": "float8_e5m2", "F8_E4M3": "float8_e4m3fn",
    "F8_E5M2FNUZ": "float8_e5m2fnuz", "F8_E4M3FNUZ": "float8_e4m3fnuz", "F8_E8M0": "float8_e8m0fnu", "I16": "int16", "U16": "uint16",
    "F16": "float16", "BF16": "bfloat16", "I32": "int32", "U32": "uint32", "F32": "float32",
    "C64": "complex64", "F64": "float64", "I64": "int64", "U64": "uint64",
}


class _TorchTable(dict[Any, Any]):
    """A dict that fills itself from torch on its first miss.

    Lookups that hit stay one C-level dict lookup (no Python call on the restore path); the first
    miss imports torch, which only code holding or building tensors reaches. ``fill`` adds the
    entries of every supported dtype, keyed by its name and by the ``torch.dtype`` itself.
    """

    def __init__(self, initial: dict[Any, Any], fill: Any) -> None:
        super().__init__(initial)
        self._fill = fill
        self._filled = False

    def __missing__(self, key: Any) -> Any:
        if self._filled:
            raise KeyError(key)
        import torch

        for name, attr in TORCH_NAMES.items():
            if hasattr(torch, attr):  # F8_E8M0 needs torch 2.7
                self._fill(self, name, getattr(torch, attr))
        self._filled = True  # after the fill: a thread that misses meanwhile fills again (the same entries)
        return self[key]


def _fill_torch_of(table: dict[Any, Any], name: str, dtype: torch.dtype) -> None:
    table[name] = table[dtype] = dtype  # a dtype maps to itself: infos built by hand from torch read the same


def _fill_names(table: dict[Any, Any], name: str, dtype: torch.dtype) -> None:
    table[dtype] = name


def _fill_itemsizes(table: dict[Any, Any], name: str, dtype: torch.dtype) -> None:
    table[dtype] = ITEMSIZES[name]


# name (or torch dtype) -> torch dtype; torch dtype (or name) -> name; either -> bytes per element
TORCH_DTYPES: dict[Any, torch.dtype] = _TorchTable({}, _fill_torch_of)
NAME_OF: dict[Any, str] = _TorchTable({n: n for n in ITEMSIZES}, _fill_names)
_ITEMSIZES: dict[Any, int] = _TorchTable(ITEMSIZES, _fill_itemsizes)

# Built from torch on first access (module __getattr__ below), then plain module attributes.
DTYPE_NAMES: dict[torch.dtype, str]  # torch dtype -> safetensors name
SUPPORTED_DTYPES: frozenset[torch.dtype]


def __getattr__(name: str) -> Any:
    """``DTYPE_NAMES`` and ``SUPPORTED_DTYPES`` hold torch dtypes, so they are built (and torch
    imported) when the save path first reads them."""
    if name in ("DTYPE_NAMES", "SUPPORTED_DTYPES"):
        names = {}
        for n in ITEMSIZES:
            with contextlib.suppress(KeyError):  # a dtype this torch lacks (F8_E8M0 before torch 2.7)
                names[TORCH_DTYPES[n]] = n
        globals().update(DTYPE_NAMES=names, SUPPORTED_DTYPES=frozenset(names))
        return globals()[name]
    raise AttributeError(f"module {__name__!r} has no attribute {name!r}")


# safetensors dtypes of fewer bits than a byte: a file names one only for a tensor whose bytes hold
# several elements each, and its header's shape is not the tensor's torch shape
PACKED_DTYPES = {"F4": "4-bit floats (torch.float4_e2m1fn_x2)", "F6_E2M3": "6-bit floats",
                 "F6_E3M2": "6-bit floats"}


def check_dtype(name: Any, where: str = "", path: str | None = None) -> str:
    """``name`` when it is a safetensors dtype name torchckpt reads; else a corrupt checkpoint."""
    if type(name) is not str or name not in ITEMSIZES:
        if type(name) is str and name in PACKED_DTYPES:  # safetensors' own, never in a checkpoint this package writes
            raise CorruptCheckpointError(
                f"Dtype {name!r}{where} packs {PACKED_DTYPES[name]} into bytes, which torchckpt does not read (the "
                "file's shape counts elements, not bytes). Read it with safetensors.torch.load_file.", path)
        raise CorruptCheckpointError(f"Unknown dtype {name!r}{where}.", path)
    return name


def dtype_to_str(dtype: torch.dtype) -> str:
    """The safetensors name of a torch dtype (``torch.float32`` -> ``"F32"``)."""
    return NAME_OF[dtype]


def str_to_dtype(name: Any, where: str = "", path: str | None = None) -> torch.dtype:
    """The torch dtype of a safetensors name (imports torch); unknown names are a corrupt checkpoint."""
    try:
        return TORCH_DTYPES[check_dtype(name, where, path)]
    except KeyError:
        raise CorruptCheckpointError(f"Dtype {name!r}{where} needs a newer torch (torch.{TORCH_NAMES[name]}).",
                                     path) from None


def itemsize(dtype: torch.dtype | str) -> int:
    """Bytes per element of a torch dtype or a safetensors dtype name."""
    return _ITEMSIZES[dtype]


class TensorInfo(NamedTuple):
    """Where one tensor lives: its shard, dtype, shape, absolute byte offset and size, and checksum.

    A restore holds one per stored tensor, so it is kept small: ``nbytes`` objects are shared
    between tensors of one shape and dtype (see :func:`nbytes_of`), and the checksum is an int.
    The parsers store the dtype's safetensors name and the dims as a plain tuple, so an inspector
    never imports torch; :attr:`dtype` and :attr:`shape` give the torch objects, each one dict
    lookup (a ``torch.dtype`` or ``torch.Size`` given in their place, as a test may, reads the same).
    """

    name: str
    file: str
    dtype_name: str  # the safetensors name, "F32"
    dims: tuple[int, ...]
    start: int
    nbytes: int
    checksum: int | None = None  # xxh3-64 of the data, where the index records one

    @property
    def dtype(self) -> torch.dtype:
        return TORCH_DTYPES[self.dtype_name]

    @property
    def shape(self) -> torch.Size:
        return size_of(self.dims)

    @property
    def end(self) -> int:
        return self.start + self.nbytes


_NBYTES: dict[tuple[tuple[int, ...], Any], int] = {}


def nbytes_of(dims: tuple[int, ...], dtype: torch.dtype | str) -> int:
    """The byte size of a tensor of ``dims`` (a tuple or a ``torch.Size``) and ``dtype`` (a torch
    dtype or a safetensors name), as one shared int object per (dims, dtype)."""
    key = (dims, dtype)
    n = _NBYTES.get(key)
    if n is None:
        n = math.prod(dims) * _ITEMSIZES[dtype]
        if len(_NBYTES) < 100_000:
            _NBYTES[key] = n
    return n


_HEX = re.compile(r"[0-9a-f]*")


def parse_checksums(text: str) -> tuple[int, ...]:
    """The concatenated 16-hex-digit checksums of an index, as ints (one C call for any count).

    Raises:
        ValueError: ``text`` is not a whole number of 16-hex-digit checksums.
    """
    if len(text) % CHECKSUM_CHARS or not _HEX.fullmatch(text):
        raise ValueError("checksums must be 16 lower-case hex digits each")
    return struct.unpack(f">{len(text) // CHECKSUM_CHARS}Q", bytes.fromhex(text))


# The caches of parsed shapes keep a model's few shapes, not what a hostile index holds: at most
# this many keys, none longer than a real tensor's shape (a forged index of 100,000 long shapes
# would otherwise stay in memory for the life of the process)
CACHED_KEYS = 50_000
CACHED_KEY_CHARS = 128
_SIZES: dict[Any, torch.Size] = {}


def size_of(dims: Any) -> torch.Size:
    """A cached ``torch.Size`` for a tuple of dims or a shape key (models repeat a few shapes).
    Imports torch: torch-free code keeps dims as tuples (:func:`dims_of`)."""
    size = _SIZES.get(dims)
    if size is None:
        import torch

        size = torch.Size(dims_of(dims) if isinstance(dims, str) else dims)
        if len(_SIZES) < CACHED_KEYS and len(dims) <= CACHED_KEY_CHARS:
            _SIZES[dims] = size
    return size


_DIMS: dict[str, tuple[int, ...]] = {}


def dims_of(key: str, where: str = "") -> tuple[int, ...]:
    """The dims of a shape key (``"16,8"`` -> ``(16, 8)``), one shared tuple per key; checked as
    :func:`parse_shape_key` checks them."""
    dims = _DIMS.get(key)
    if dims is None:
        dims = parse_shape_key(key, where)
        if len(_DIMS) < CACHED_KEYS and len(key) <= CACHED_KEY_CHARS:
            _DIMS[key] = dims
    return dims


_SHAPE_KEYS: dict[Any, str] = {}


def shape_key(shape: tuple[int, ...] | list[int]) -> str:
    """Shapes are stored in the index as ``"16,8"`` strings (``""`` for a scalar): fast to parse."""
    key = _SHAPE_KEYS.get(shape) if isinstance(shape, tuple) else None
    if key is None:
        key = ",".join(map(str, shape))
        if isinstance(shape, tuple) and len(_SHAPE_KEYS) < 100_000:
            _SHAPE_KEYS[shape] = key
    return key


_SHAPE_KEY = re.compile(r"(?:0|[1-9][0-9]{0,18})(?:,(?:0|[1-9][0-9]{0,18}))*")


def parse_shape_key(text: Any, where: str) -> tuple[int, ...]:
    """The dimensions of a shape key (``"16,8"``); refuses anything but a real tensor's shape."""
    if not isinstance(text, str) or text and not _SHAPE_KEY.fullmatch(text):
        raise CorruptCheckpointError(f"Malformed shape {short_repr(text)} {where}.")
    shape = tuple(map(int, text.split(","))) if text else ()
    check_shape(shape, where)
    return shape


def check_shape(shape: Sequence[int], where: str, itemsize: int = 16) -> None:
    """Refuse a shape whose dimensions, element count or byte size no real tensor has (they
    would wrap around in ``torch.Size.numel()``). A zero dimension does not end the count: the
    other dimensions still make the strides, which overflow as well (``[0, 2**62, 2**62]``)."""
    total = itemsize
    for d in shape:
        total *= d or 1
        if d > MAX_DIM or total > MAX_DIM:
            raise CorruptCheckpointError(f"Shape {list(shape)} {where} is larger than any tensor can be.")
