"""The on-disk format: safetensors shard headers, the index schema, dtype tables, names.

A checkpoint is a directory holding ``index.json`` and one or more safetensors shards. Every
shard is a plain safetensors file (``safetensors.safe_open`` reads it); the index is a Hugging
Face sharded index (``metadata.total_size`` and ``weight_map``) with a ``torchckpt`` section that
adds the format version, the typed JSON tree of all non-tensor state, and integrity data.
``docs/format.md`` is the full specification; this module is its single implementation.

Headers and indexes are treated as untrusted input: sizes are capped, offsets checked against
the file size, shard names confined to the checkpoint directory.
"""

from __future__ import annotations

import itertools
import json
import math
import os
import re
import struct
from collections.abc import Callable, Iterable, Iterator, Sequence
from typing import TYPE_CHECKING, Any, NamedTuple

import torch
import xxhash

from torchckpt.errors import CorruptCheckpointError

if TYPE_CHECKING:
    from torchckpt._storage.base import Source

INDEX_FILE = "index.json"  # a checkpoint directory's index; its existence is the commit
STATE_FILE = "checkpoints.json"  # a directory of checkpoints: the latest one and a manager's history
LOCK_FILE = ".torchckpt.lock"  # a manager's claim on its directory (an flock, or a lease object)
PENDING_FILE = ".torchckpt-pending"  # on an object store: a checkpoint being uploaded, removed once committed
# (``.torchckpt-pending-<tag>``, one per writer: see ``is_pending_marker``)
DELETING_FILE = ".torchckpt-deleting"  # on an object store: a checkpoint being deleted, naming what to delete
TMP_MARKER = ".torchckpt-tmp-"  # on a file system: ``<name>.torchckpt-tmp-<pid>-h<host>-<random>``, being written
OLD_MARKER = ".torchckpt-old-"  # on a file system: ``<name>.torchckpt-old-...``, replaced or deleted, being removed
TORCHCKPT_KEY = "torchckpt"  # the index's own section, beside Hugging Face's keys
SHARD_SUFFIX = ".safetensors"
SHARD_NAME = "model-{index:05d}-of-{count:05d}" + SHARD_SUFFIX
FORMAT_NAME = "torchckpt"
FORMAT_VERSION = 3  # the newest version this package reads
PLAIN_FORMAT_VERSION = 1  # what a single process writes: no chunks, nothing per rank
SHARDED_FORMAT_VERSION = 2  # from this version on: ``~@`` chunks, ``@per_rank`` values (a save by several ranks)
BLOCKS_FORMAT_VERSION = 3  # what several ranks write: version 2 plus block checksums (``_blocks``)
CHECKSUM_ALGORITHM = "xxh3-64"
MAX_HEADER_SIZE = 100_000_000
MAX_INDEX_SIZE = 256 * 2**20
MAX_STATE_FILE_SIZE = 64 * 2**20
MAX_DIM = 2**62  # a dimension, an element count or a byte size beyond this is not a real tensor
MAX_JSON_DEPTH = 100  # nesting of the typed state tree; deeper JSON is refused before it is decoded
SEAL_KEY = "checksum"  # the last key of index.json and the state file: the xxh3-64 of the bytes before it
HEADER_ALIGNMENT = 8
DEFAULT_MAX_SHARD_SIZE = 5 * 10**9
SHARD_METADATA = {"format": "pt"}
DTYPE_SEP = ","  # the index's tensor table joins dtypes with this,
SHAPE_SEP = ";"  # shapes with this (dimensions within a shape with ","),
CHECKSUM_CHARS = 16  # and concatenates fixed-width hex checksums: fast to parse for 100k tensors

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
_ST_DTYPES: dict[torch.dtype, str] = {v: k for k, v in _TORCH_DTYPES.items()}
SUPPORTED_DTYPES = frozenset(_ST_DTYPES)


def dtype_to_str(dtype: torch.dtype) -> str:
    """The safetensors name of a torch dtype (``torch.float32`` -> ``"F32"``)."""
    return _ST_DTYPES[dtype]


def str_to_dtype(name: Any, where: str = "", path: str | None = None) -> torch.dtype:
    """The torch dtype of a safetensors name; unknown names are a corrupt checkpoint."""
    try:
        return _TORCH_DTYPES[name]
    except (KeyError, TypeError):
        raise CorruptCheckpointError(f"Unknown dtype {name!r}{where}.", path) from None


_ITEMSIZES = {dtype: torch.empty((), dtype=dtype).element_size() for dtype in _ST_DTYPES}


def itemsize(dtype: torch.dtype) -> int:
    """Bytes per element."""
    return _ITEMSIZES[dtype]


_SIZE_UNITS = {"B": 1, "KB": 10**3, "MB": 10**6, "GB": 10**9, "TB": 10**12,
               "KIB": 2**10, "MIB": 2**20, "GIB": 2**30, "TIB": 2**40}


def parse_size(size: int | str) -> int:
    """Bytes from an int or a string such as ``"2GB"`` (decimal, as Hugging Face) or ``"2GiB"``.

    Example:
        >>> parse_size("1.5GB"), parse_size("2MiB"), parse_size(4096)
        (1500000000, 2097152, 4096)
    """
    if isinstance(size, bool):
        raise TypeError("max_shard_size must be an int (bytes) or a string such as '2GB'.")
    if isinstance(size, int):
        value = size
    elif isinstance(size, str):
        match = re.fullmatch(r"\s*([0-9]*\.?[0-9]+)\s*([A-Za-z]*)\s*", size)
        unit = match.group(2).upper() if match else ""
        if not match or unit not in _SIZE_UNITS and unit:
            raise ValueError(
                f"Cannot parse size {size!r}: use bytes as an int, or a number followed by "
                "B, KB, MB, GB, TB (powers of 1000) or KiB, MiB, GiB, TiB (powers of 1024)."
            )
        value = int(float(match.group(1)) * _SIZE_UNITS[unit or "B"])
    else:
        raise TypeError(f"A size must be an int or a str, not {type(size).__name__}.")
    if value <= 0:
        raise ValueError(f"A size must be positive, got {size!r}.")
    return value


# -- safetensors headers ---------------------------------------------------------------------


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


def parse_checksums(text: str) -> tuple[int, ...]:
    """The concatenated 16-hex-digit checksums of an index, as ints (one C call for any count).

    Raises:
        ValueError: ``text`` is not a whole number of 16-hex-digit checksums.
    """
    if len(text) % CHECKSUM_CHARS or not _HEX.fullmatch(text):
        raise ValueError("checksums must be 16 lower-case hex digits each")
    return struct.unpack(f">{len(text) // CHECKSUM_CHARS}Q", bytes.fromhex(text))


_HEX = re.compile(r"[0-9a-f]*")


_SIZES: dict[Any, torch.Size] = {}


def size_of(dims: Any) -> torch.Size:
    """A cached ``torch.Size`` for a tuple of dims or a shape key (models repeat a few shapes)."""
    size = _SIZES.get(dims)
    if size is None:
        size = torch.Size(parse_shape_key(dims, "") if isinstance(dims, str) else dims)
        if len(_SIZES) < 100_000:
            _SIZES[dims] = size
    return size


_PLAIN_NAME = re.compile(r"[ !#-\[\]-~]*")  # printable ASCII without '"' and '\\': no JSON escaping needed


def encode_header(entries: Iterable[tuple[str, torch.dtype, Sequence[int], int]]) -> bytes:
    """The 8-byte length prefix plus the space-padded JSON header for ``(name, dtype, shape, nbytes)``.

    Entries are laid out back to back in the given order.
    """
    return b"".join(encode_header_pieces(entries))


_HEADER_GROUP = 1024  # entries per piece: few pieces, and never the whole header as small strings


def encode_header_pieces(entries: Iterable[tuple[str, torch.dtype, Sequence[int], int]]) -> list[bytes]:
    """:func:`encode_header` as a list of byte strings, for ``writev``.

    A 20,000-tensor header is megabytes; built in pieces of ``_HEADER_GROUP`` entries it never
    exists as tens of thousands of small strings plus joined and padded copies of itself.
    """
    # The same bytes as json.dumps(header, separators=(",", ":"), ensure_ascii=False), built directly:
    # five times faster for checkpoints of many small tensors.
    pieces = [b'{"__metadata__":' + json.dumps(SHARD_METADATA, separators=(",", ":")).encode()]
    group: list[str] = []
    offset = 0
    names = _ST_DTYPES
    for name, dtype, shape, nbytes in entries:
        group.append(f',{json_string(name)}:{{"dtype":"{names[dtype]}","shape":[{shape_key(tuple(shape))}],'
                     f'"data_offsets":[{offset},{offset + nbytes}]}}')
        offset += nbytes
        if len(group) == _HEADER_GROUP:
            pieces.append("".join(group).encode())
            group.clear()
    pieces.append(("".join(group) + "}").encode())
    length = sum(map(len, pieces))
    padding = -(length + 8) % HEADER_ALIGNMENT
    pieces[-1] += b" " * padding
    length += padding
    if length > MAX_HEADER_SIZE:
        raise ValueError(
            f"A shard header would be {length} bytes, over safetensors' limit of {MAX_HEADER_SIZE}; "
            "use a smaller max_shard_size so that each shard holds fewer tensors."
        )
    pieces.insert(0, struct.pack("<Q", length))
    return pieces


def read_header(source: Source, file_name: str) -> tuple[list[TensorInfo], dict[str, str], int]:
    """Parse and validate the safetensors header of the open file ``source`` (see ``_backend``).

    Returns:
        The tensors in file order, the ``__metadata__`` dict, and the file's size in bytes.

    Raises:
        CorruptCheckpointError: not a well-formed safetensors file, or unreadable.
    """
    path, size = source.path, source.size
    try:
        prefix = source.read(0, 8)
        if len(prefix) < 8:
            raise CorruptCheckpointError(
                f"{path} is not a safetensors file: it is {size} bytes, shorter than the 8-byte header length.",
                path,
            )
        (n,) = struct.unpack("<Q", prefix)
        if n > MAX_HEADER_SIZE:
            raise CorruptCheckpointError(
                f"{path} declares a {n}-byte header, over the {MAX_HEADER_SIZE}-byte limit; "
                "it is probably not a safetensors file (a pickle or a Git LFS pointer?).",
                path,
            )
        if 8 + n > size:
            raise CorruptCheckpointError(
                f"{path} is truncated: its header needs {8 + n} bytes but the file is only {size} bytes.", path
            )
        raw = source.read(8, n)
    except OSError as e:
        raise CorruptCheckpointError(f"Cannot read shard {path}: {e.strerror or e}.", path) from e
    if len(raw) < n:
        raise CorruptCheckpointError(f"{path} is truncated: it ended inside its header.", path)
    return (*parse_header(raw, path, file_name, size), size)


def parse_header(raw: bytes, path: str, file_name: str, size: int) -> tuple[list[TensorInfo], dict[str, str]]:
    """Parse the JSON header bytes of a safetensors file of ``size`` bytes (see :func:`read_header`)."""
    header = parse_json(raw, path, "safetensors header")
    if not isinstance(header, dict):
        raise CorruptCheckpointError(f"{path} has a header that is not a JSON object.", path)
    metadata = header.pop("__metadata__", None) or {}
    if not isinstance(metadata, dict) or not all(isinstance(v, str) for v in metadata.values()):
        raise CorruptCheckpointError(f"{path}: __metadata__ must map strings to strings.", path)
    data_start = 8 + len(raw)
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
    dtype = str_to_dtype(entry.get("dtype"), where, path)
    shape, offsets = entry.get("shape"), entry.get("data_offsets")
    if not (isinstance(shape, list) and all(type(d) is int and d >= 0 for d in shape)):
        raise CorruptCheckpointError(f"Malformed shape {_short(shape)}{where}.", path)
    check_shape(shape, where, itemsize(dtype))
    if not (isinstance(offsets, list) and len(offsets) == 2 and all(type(o) is int and 0 <= o <= MAX_DIM for o in offsets)):
        raise CorruptCheckpointError(f"Malformed data_offsets {_short(offsets)}{where}.", path)
    begin, end = offsets
    expected = math.prod(shape) * itemsize(dtype)
    if end - begin != expected:
        raise CorruptCheckpointError(
            f"Tensor {name!r} in {path} has data_offsets {offsets} ({end - begin} bytes) but its dtype "
            f"and shape {shape} need {expected} bytes.",
            path,
        )
    size = size_of(tuple(shape))
    return TensorInfo(name, file_name, dtype, size, data_start + begin, nbytes_of(size, dtype))


LAYOUT_MAX_LINES = 1000


class RawJSON:
    """A JSON value written as the text pieces ``pieces()`` yields, for values too large to build
    as Python objects first (the weight map and tensor table of 20,000 tensors)."""

    def __init__(self, pieces: Callable[[], Iterator[str]]) -> None:
        self.pieces = pieces


def dumps_layout(value: Any, depth: int = 2) -> bytes:
    """:func:`layout_pieces` joined: the bytes of ``value`` as the index lays it out."""
    return "".join(layout_pieces(value, depth)).encode()


def layout_pieces(value: Any, depth: int = 2) -> Iterator[str]:
    """JSON with the top ``depth`` levels of objects one key per line, everything below compact,
    and a final newline, as text pieces to write one after another.

    Readable where people look (the index's sections) and fast where it is big: an object of more
    than ``LAYOUT_MAX_LINES`` keys is written on one line, and a :class:`RawJSON` value as its
    own pieces.
    """
    yield from _layout(value, 0, depth)
    yield "\n"


def _layout(node: Any, level: int, depth: int) -> Iterator[str]:
    if isinstance(node, RawJSON):
        yield from node.pieces()
    elif isinstance(node, dict) and node and level < depth and len(node) <= LAYOUT_MAX_LINES:
        pad = " " * (level + 1)
        separator = "{\n"
        for k, v in node.items():
            yield f"{separator}{pad}{json.dumps(k, ensure_ascii=False)}: "
            yield from _layout(v, level + 1, depth)
            separator = ",\n"
        yield "\n" + " " * level + "}"
    else:
        yield json.dumps(node, ensure_ascii=False, allow_nan=False, separators=(", ", ": "))


def json_string(text: str) -> str:
    """``json.dumps(text, ensure_ascii=False)``, without the call for plain names (most of them)."""
    return f'"{text}"' if _PLAIN_NAME.fullmatch(text) else json.dumps(text, ensure_ascii=False)


# -- sealed JSON files ------------------------------------------------------------------------

_SEAL = re.compile(rb',\n "' + SEAL_KEY.encode() + rb'": "([0-9a-f]{16})"\n}\n\Z')
_SEAL_LENGTH = len(f',\n "{SEAL_KEY}": "{"0" * CHECKSUM_CHARS}"\n}}\n')


def sealed_pieces(value: dict[str, Any], depth: int = 2) -> Iterator[bytes]:
    """``value`` as :func:`layout_pieces` lays it out, encoded, with a last top-level key
    ``"checksum"``: the xxh3-64 of every byte before it.

    Why a seal: a flipped bit in a JSON number or string is still valid JSON, and an index whose
    Adam ``lr`` silently became 0.011 would restore "successfully". With the seal, every read
    checks every byte (:func:`unseal`), and the file stays plain JSON that any tool can read.
    """
    hasher = xxhash.xxh3_64()
    separator = "{\n"
    for key, child in value.items():
        for text in itertools.chain((f"{separator} {json.dumps(key, ensure_ascii=False)}: ",), _layout(child, 1, depth)):
            piece = text.encode()
            hasher.update(piece)
            yield piece
        separator = ",\n"
    yield f',\n "{SEAL_KEY}": "{hasher.hexdigest()}"\n}}\n'.encode()


def sealed_bytes(value: dict[str, Any], depth: int = 2) -> bytes:
    """:func:`sealed_pieces` joined."""
    return b"".join(sealed_pieces(value, depth))


def unseal(data: bytes, path: str, what: str) -> None:
    """Check the seal :func:`sealed_pieces` wrote at the end of ``data``.

    Raises:
        CorruptCheckpointError: there is no seal, or the bytes before it do not hash to it.
    """
    match = _SEAL.search(data, max(0, len(data) - _SEAL_LENGTH))
    if match is None:
        raise CorruptCheckpointError(
            f"{path} is damaged or not a {what} written by torchckpt: it does not end with its "
            f'"{SEAL_KEY}" entry, so its content cannot be verified.',
            path,
        )
    recorded = match.group(1).decode()
    actual = xxhash.xxh3_64_hexdigest(memoryview(data)[: match.start()])
    if actual != recorded:
        raise CorruptCheckpointError(
            f"{path} fails its checksum (recorded {recorded}, computed {actual}): the {what} is corrupt. "
            "Restore another checkpoint" + (", or delete the state file to have it rebuilt from the checkpoints "
                                            "on disk." if what == "state file" else "."),
            path,
        )


def parse_json(data: bytes, path: str, what: str) -> Any:
    """Decode JSON from bytes, every failure a :class:`CorruptCheckpointError` naming ``path``.

    Refuses, before parsing, a file whose brackets would cost more memory than
    :data:`MAX_CONTAINER_BYTES` allows (see docs/format.md, "Limits"), and any nesting deeper
    than the recursion limit.
    """
    containers = data.count(b"{") + data.count(b"[")
    if containers > MAX_CONTAINERS_PER_BYTE * len(data) + MAX_CONTAINERS_FLOOR:
        raise CorruptCheckpointError(
            f"{path} holds {containers} JSON objects and arrays in {len(data)} bytes, far more than any {what} "
            "torchckpt writes; refusing to parse it (it would take many times its size in memory).",
            path,
        )
    try:
        return json.loads(data)
    except RecursionError:
        raise CorruptCheckpointError(f"{path} nests JSON too deeply to be a {what} torchckpt wrote.", path) from None
    except (UnicodeDecodeError, ValueError) as e:  # JSONDecodeError, and ints over Python's digit limit
        raise CorruptCheckpointError(f"{path} is not valid JSON, so not a {what} torchckpt wrote: {e}.", path) from e
    except MemoryError:
        raise CorruptCheckpointError(f"{path} is too large to parse as a {what}.", path) from None


# A JSON object or array costs a Python object of 56 to 200 bytes, twice over once the state tree
# is decoded. The files torchckpt writes have one per 40 bytes or fewer (an optimizer's state has two
# per parameter, beside the parameter's tensor names), or a few tens of thousands in all; "{}," and
# '{"k":0},' repeated have one per 3 to 8 bytes and would take 25 to 50 times their size in memory.
# At one per 16 bytes, parsing takes at most about 13 times the file's size (docs/format.md, "Limits").
MAX_CONTAINERS_PER_BYTE = 1 / 16
MAX_CONTAINERS_FLOOR = 200_000


# -- shard names -------------------------------------------------------------------------------


def shard_name(index: int, count: int) -> str:
    """``model-00001-of-00002.safetensors`` for the first of two shards (1-based)."""
    return SHARD_NAME.format(index=index, count=count)


def is_pending_marker(name: str) -> bool:
    """Whether ``name`` is a writer's pending marker (``.torchckpt-pending-<tag>``, or one untagged
    from before the tags)."""
    return name == PENDING_FILE or name.startswith(PENDING_FILE + "-")


def is_temporary_name(name: str) -> bool:
    """Whether ``name`` is a local writer's temporary (being written) or superseded (being removed) entry."""
    return TMP_MARKER in name or OLD_MARKER in name


def check_member_name(directory: str, name: Any, what: str) -> str:
    """Refuse a file name from an index that could escape the checkpoint directory."""
    if (
        not isinstance(name, str)
        or not name
        or name != os.path.basename(name)
        or "\\" in name
        or name in (".", "..")
        or "\0" in name
    ):
        raise CorruptCheckpointError(
            f"{directory}/{INDEX_FILE} names {what} {name!r}, which is not a plain file name "
            "inside the checkpoint directory; refusing to follow it.",
            directory,
        )
    if not name.endswith(SHARD_SUFFIX):
        raise CorruptCheckpointError(
            f"{directory}/{INDEX_FILE} names {what} {name!r}, which is not a .safetensors file.",
            directory,
        )
    return name


_SHAPE_KEYS: dict[Any, str] = {}
DTYPE_NAMES = _ST_DTYPES  # torch dtype -> its safetensors name


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
        raise CorruptCheckpointError(f"Malformed shape {_short(text)} {where}.")
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


def _short(value: Any, limit: int = 80) -> str:
    text = repr(value)
    return text if len(text) <= limit else text[: limit - 3] + "..."
