"""What a stored tensor is on disk: its dtype's name, its shape key, its checksum, its place.

safetensors names dtypes (``F32``, ``BF16``); the index's tensor table writes a shape as a key
(``"16,8"``) and checksums as fixed-width hex. These encodings, their parsers and the
:class:`TensorInfo` a reader builds from them live here, apart from the header and index parsers
that use them, because the save path, the load path and the tools all need them alone.

Why caches: a model repeats a few shapes and dtypes across thousands of tensors, so sizes, shape
keys and byte counts are shared objects (bounded, so a hostile index cannot grow them forever).
"""

from __future__ import annotations

import re
import struct
from collections.abc import Sequence
from typing import Any, NamedTuple

import torch

from torchckpt._format.spec import CHECKSUM_CHARS, MAX_DIM
from torchckpt.errors import CorruptCheckpointError, short_repr

_TORCH_DTYPES: dict[str, torch.dtype] = {
    "BOOL": torch.bool,
    "U8": torch.uint8,
    "I8": torch.int8,
    "F8_E5M2": torch.float8_e5m2,
    "F8_E4M3": torch.float8_e4m3fn,
    "F8_E5M2FNUZ": torch.float8_e5m2fnuz,
    "F8_E4M3FNUZ": torch.float8_e4m3fnuz,
    "I16": torch.int16,
    "U16": torch.uint16,
    "F16": torch.float16,
    "BF16": torch.bfloat16,
    "I32": torch.int32,
    "U32": torch.uint32,
    "F32": torch.float32,
    "C64": torch.complex64,
    "F64": torch.float64,
    "I64": torch.int64,
    "U64": torch.uint64,
}
DTYPE_NAMES: dict[torch.dtype, str] = {v: k for k, v in _TORCH_DTYPES.items()}  # torch dtype -> safetensors name
SUPPORTED_DTYPES = frozenset(DTYPE_NAMES)


def dtype_to_str(dtype: torch.dtype) -> str:
    """The safetensors name of a torch dtype (``torch.float32`` -> ``"F32"``)."""
    return DTYPE_NAMES[dtype]


def str_to_dtype(name: Any, where: str = "", path: str | None = None) -> torch.dtype:
    """The torch dtype of a safetensors name; unknown names are a corrupt checkpoint."""
    try:
        return _TORCH_DTYPES[name]
    except (KeyError, TypeError):
        raise CorruptCheckpointError(f"Unknown dtype {name!r}{where}.", path) from None


_ITEMSIZES = {dtype: torch.empty((), dtype=dtype).element_size() for dtype in DTYPE_NAMES}


def itemsize(dtype: torch.dtype) -> int:
    """Bytes per element."""
    return _ITEMSIZES[dtype]


class TensorInfo(NamedTuple):
    """Where one tensor lives: its shard, dtype, shape, absolute byte offset and size, and checksum.

    A restore holds one per stored tensor, so it is kept small: ``nbytes`` objects are shared
    between tensors of one shape and dtype (see :func:`nbytes_of`), and the checksum is an int.
    """

    name: str
    file: str
    dtype: torch.dtype
    shape: torch.Size
    start: int
    nbytes: int
    checksum: int | None = None  # xxh3-64 of the data, where the index records one

    @property
    def end(self) -> int:
        return self.start + self.nbytes


_NBYTES: dict[tuple[torch.Size, torch.dtype], int] = {}


def nbytes_of(shape: torch.Size, dtype: torch.dtype) -> int:
    """The byte size of a tensor, as one shared int object per (shape, dtype)."""
    key = (shape, dtype)
    n = _NBYTES.get(key)
    if n is None:
        n = shape.numel() * itemsize(dtype)
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


_SIZES: dict[Any, torch.Size] = {}


def size_of(dims: Any) -> torch.Size:
    """A cached ``torch.Size`` for a tuple of dims or a shape key (models repeat a few shapes)."""
    size = _SIZES.get(dims)
    if size is None:
        size = torch.Size(parse_shape_key(dims, "") if isinstance(dims, str) else dims)
        if len(_SIZES) < 100_000:
            _SIZES[dims] = size
    return size


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
    would wrap around in ``torch.Size.numel()``)."""
    total = itemsize
    for d in shape:
        total *= d
        if d > MAX_DIM or total > MAX_DIM:
            raise CorruptCheckpointError(f"Shape {list(shape)} {where} is larger than any tensor can be.")
