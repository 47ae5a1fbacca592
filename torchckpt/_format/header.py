"""safetensors shard headers, encoded for writing and parsed from bytes.

A shard is a plain safetensors file: an 8-byte little-endian length, a JSON header naming each
tensor's dtype, shape and data offsets, padded with spaces to 8 bytes, then the data. Headers
are untrusted input: the length is capped before anything is read, and the offsets must tile the
data section exactly, so the same parser serves a local file, a ranged GET and a test. Reading
the bytes is the load side's (``_load/opened.read_header``).
"""

from __future__ import annotations

import json
import math
import struct
from collections.abc import Iterable, Sequence
from typing import TYPE_CHECKING, Any

from torchckpt._format.document import json_string, parse_json
from torchckpt._format.dtypes import ITEMSIZES, NAME_OF, TensorInfo, check_dtype, check_shape, nbytes_of, shape_key
from torchckpt._format.spec import HEADER_ALIGNMENT, MAX_DIM, MAX_HEADER_SIZE, SHARD_METADATA
from torchckpt.errors import CheckpointTooLargeError, CorruptCheckpointError, short_repr

if TYPE_CHECKING:
    import torch

PREFIX_BYTES = 8  # the header's length, before it


_HEADER_GROUP = 1024  # entries per piece: few pieces, and never the whole header as small strings


def encode_header_pieces(entries: Iterable[tuple[str, torch.dtype | str, Sequence[int], int]]) -> list[bytes]:
    """The 8-byte length prefix plus the space-padded JSON header for ``(name, dtype, shape, nbytes)``,
    as a list of byte strings, for ``writev``. Entries are laid out back to back in the given order.
    A dtype is a torch dtype (the save path) or its safetensors name (a reader checking a header).

    A 20,000-tensor header is megabytes; built in pieces of ``_HEADER_GROUP`` entries it never
    exists as tens of thousands of small strings plus joined and padded copies of itself.
    """
    # The same bytes as json.dumps(header, separators=(",", ":"), ensure_ascii=False), built directly:
    # five times faster for checkpoints of many small tensors.
    pieces = [b'{"__metadata__":' + json.dumps(SHARD_METADATA, separators=(",", ":")).encode()]
    group: list[str] = []
    offset = 0
    names = NAME_OF
    for name, dtype, shape, nbytes in entries:
        group.append(f',{json_string(name)}:{{"dtype":"{names[dtype]}","shape":[{shape_key(tuple(shape))}],'
                     f'"data_offsets":[{offset},{offset + nbytes}]}}')
        offset += nbytes
        if len(group) == _HEADER_GROUP:
            pieces.append("".join(group).encode())
            group.clear()
    pieces.append(("".join(group) + "}").encode())
    length = sum(map(len, pieces))
    padding = -(length + PREFIX_BYTES) % HEADER_ALIGNMENT
    pieces[-1] += b" " * padding
    length += padding
    if length > MAX_HEADER_SIZE:
        raise CheckpointTooLargeError(
            f"A shard header would be {length:,} bytes, over safetensors' limit of {MAX_HEADER_SIZE:,}; "
            "use a smaller max_shard_size so that each shard holds fewer tensors. Nothing was committed.",
            None, "shard header", length, MAX_HEADER_SIZE,
        )
    pieces.insert(0, struct.pack("<Q", length))
    return pieces


def header_length(prefix: bytes, path: str, size: int) -> int:
    """The JSON header's length from the first bytes of a safetensors file of ``size`` bytes.

    Raises:
        CorruptCheckpointError: the file is too short, or declares a header over the limit or
            past its end.
    """
    if len(prefix) < PREFIX_BYTES:
        raise CorruptCheckpointError(
            f"{path} is not a safetensors file: it is {size} bytes, shorter than the 8-byte header length.",
            path,
        )
    (n,) = struct.unpack("<Q", prefix[:PREFIX_BYTES])
    if n > MAX_HEADER_SIZE:
        raise CorruptCheckpointError(
            f"{path} declares a {n}-byte header, over the {MAX_HEADER_SIZE}-byte limit; "
            "it is probably not a safetensors file (a pickle or a Git LFS pointer?).",
            path,
        )
    if PREFIX_BYTES + n > size:
        raise CorruptCheckpointError(
            f"{path} is truncated: its header needs {PREFIX_BYTES + n} bytes but the file is only {size} bytes.", path
        )
    return int(n)


def parse_header(raw: bytes, path: str, file_name: str, size: int) -> tuple[list[TensorInfo], dict[str, str]]:
    """Parse the JSON header bytes of a safetensors file of ``size`` bytes.

    Returns:
        The tensors in file order, and the ``__metadata__`` dict.

    Raises:
        CorruptCheckpointError: not a well-formed header, or offsets that do not tile the data.
    """
    header = parse_json(raw, path, "safetensors header")
    if not isinstance(header, dict):
        raise CorruptCheckpointError(f"{path} has a header that is not a JSON object.", path)
    metadata = header.pop("__metadata__", None) or {}
    if not isinstance(metadata, dict) or not all(isinstance(v, str) for v in metadata.values()):
        raise CorruptCheckpointError(f"{path}: __metadata__ must map strings to strings.", path)
    data_start = PREFIX_BYTES + len(raw)
    infos = []
    for name, entry in header.items():
        infos.append(_tensor_info(path, file_name, name, entry, data_start))
    infos.sort(key=lambda t: (t.start, t.end))
    cursor = data_start
    for info in infos:
        if info.start != cursor:
            raise CorruptCheckpointError(
                f"{path}: tensor {info.name!r} starts at byte {info.start - data_start} of the data section "
                f"but the previous tensor ends at {cursor - data_start} (overlapping or gapped offsets).",
                path,
            )
        cursor = info.end
    if cursor != size:
        raise CorruptCheckpointError(
            f"{path} is truncated or has trailing bytes: its header declares tensor data through byte "
            f"{cursor}, but the file is {size} bytes.",
            path,
        )
    return infos, metadata


def _tensor_info(path: str, file_name: str, name: str, entry: Any, data_start: int) -> TensorInfo:
    where = f" for tensor {name!r} in {path}"
    if not isinstance(entry, dict):
        raise CorruptCheckpointError(f"Malformed header entry{where}.", path)
    dtype = check_dtype(entry.get("dtype"), where, path)
    shape, offsets = entry.get("shape"), entry.get("data_offsets")
    if not (isinstance(shape, list) and all(type(d) is int and d >= 0 for d in shape)):
        raise CorruptCheckpointError(f"Malformed shape {short_repr(shape)}{where}.", path)
    check_shape(shape, where.lstrip(), ITEMSIZES[dtype])
    if not (isinstance(offsets, list) and len(offsets) == 2 and all(type(o) is int and 0 <= o <= MAX_DIM for o in offsets)):
        raise CorruptCheckpointError(f"Malformed data_offsets {short_repr(offsets)}{where}.", path)
    begin, end = offsets
    expected = math.prod(shape) * ITEMSIZES[dtype]
    if end - begin != expected:
        raise CorruptCheckpointError(
            f"Tensor {name!r} in {path} has data_offsets {offsets} ({end - begin} bytes) but its dtype "
            f"and shape {shape} need {expected} bytes.",
            path,
        )
    dims = tuple(shape)
    return TensorInfo(name, file_name, dtype, dims, data_start + begin, nbytes_of(dims, dtype))
