"""Opening a committed checkpoint for reading: ``index.json`` and the shard headers.

:func:`load_index` parses and checks ``index.json`` only (what the lazy inspector needs);
:func:`read_shard_headers` then validates every shard header against the index (what a restore
needs before it touches any object); :func:`state_tree` rebuilds the non-tensor state with each
tensor's place filled in.

Why memory matters here: a restore into existing tensors should cost little beyond the tensors
themselves, and for 20,000 small tensors the parsed index is most of what it holds. So the file
is decoded once, the Hugging Face ``weight_map`` is checked and dropped, equal strings are shared,
and each tensor's location is one small tuple built by C-level calls.
"""

from __future__ import annotations

import functools
import itertools
import json
import os
import struct
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any

import torch
import xxhash

from torchckpt import _format, _tree
from torchckpt._format import INDEX_FILE, TORCHCKPT_KEY, TensorInfo
from torchckpt._storage import gc_paused
from torchckpt.errors import CheckpointNotFoundError, CorruptCheckpointError, format_keys


@dataclass
class Index:
    """A parsed, checked ``index.json`` of a torchckpt checkpoint. Headers are not read.

    ``raw`` is the parsed JSON less ``weight_map``, which is checked against the tensor table and
    dropped (see :func:`_check_weight_map`).
    """

    directory: str
    raw: dict[str, Any]
    names: list[str]
    dtypes: list[str]
    shapes: list[str]
    checksum_text: str
    shards: list[dict[str, Any]]
    aliases: dict[str, str]

    @property
    def checksums(self) -> list[str]:
        """Per-tensor checksums (hex), in table order."""
        w = _format.CHECKSUM_CHARS
        return [self.checksum_text[i : i + w] for i in range(0, len(self.checksum_text), w)]

    @property
    def section(self) -> dict[str, Any]:
        return self.raw[TORCHCKPT_KEY]  # type: ignore[no-any-return]

    def shard_of(self) -> dict[str, str]:
        """Stored tensor name -> shard file."""
        out: dict[str, str] = {}
        i = 0
        for shard in self.shards:
            for name in self.names[i : i + shard["tensors"]]:
                out[name] = shard["file"]
            i += shard["tensors"]
        return out


def _corrupt(directory: str, what: str) -> CorruptCheckpointError:
    return CorruptCheckpointError(f"{os.path.join(directory, INDEX_FILE)} is invalid: {what}.", directory)


def load_index(directory: str) -> Index:
    """Read and check ``DIRECTORY/index.json``.

    Raises:
        CheckpointNotFoundError: there is no committed checkpoint at ``directory``.
        CorruptCheckpointError: the index is malformed or from an unknown format version.
    """
    path = os.path.join(directory, INDEX_FILE)
    try:
        with open(path, "rb") as f:
            size = os.fstat(f.fileno()).st_size
            if size > _format.MAX_INDEX_SIZE:
                raise _corrupt(directory, f"it is {size} bytes, over the {_format.MAX_INDEX_SIZE}-byte limit")
            data = f.read()
    except FileNotFoundError:
        raise CheckpointNotFoundError(
            f"No checkpoint at {directory}: {INDEX_FILE} is missing. A checkpoint directory appears only "
            "once it is completely written; check the path (for a manager's directory, pass the directory "
            "itself to get its latest checkpoint).",
            directory,
        ) from None
    except IsADirectoryError:
        raise _corrupt(directory, "it is a directory") from None
    with gc_paused():  # parsing allocates many small objects; collections in between only cost time
        try:
            text = data.decode()
            del data  # json.loads would decode bytes into a second copy; hold one at a time
            raw = json.loads(text)
        except (UnicodeDecodeError, json.JSONDecodeError) as e:
            raise _corrupt(directory, f"not valid JSON ({e})") from e
        del text
    if not isinstance(raw, dict) or not isinstance(raw.get(TORCHCKPT_KEY), dict):
        raise _corrupt(directory, f"it has no {TORCHCKPT_KEY!r} section (not written by torchckpt)")
    section = raw[TORCHCKPT_KEY]
    version = section.get("format_version")
    if type(version) is not int or version < 1:
        raise _corrupt(directory, f"bad format_version {version!r}")
    if version > _format.FORMAT_VERSION:
        raise CorruptCheckpointError(
            f"{path} uses format version {version}, newer than this torchckpt understands "
            f"({_format.FORMAT_VERSION}); upgrade torchckpt to read it.",
            directory,
        )
    table = section.get("tensors")
    shards = section.get("shards")
    aliases = section.get("aliases", {})
    if not isinstance(table, dict) or not isinstance(shards, list) or not isinstance(aliases, dict):
        raise _corrupt(directory, "'tensors', 'shards' and 'aliases' must be present")
    names, dtypes, shapes, checksums = (table.get(k) for k in ("names", "dtypes", "shapes", "checksums"))
    if not isinstance(names, list) or not all(isinstance(c, str) for c in (dtypes, shapes, checksums)):
        raise _corrupt(directory, "the tensor table needs a 'names' list and 'dtypes', 'shapes', 'checksums' strings")
    n = len(names)
    dtypes = _shared(dtypes.split(_format.DTYPE_SEP)) if n else []  # type: ignore[union-attr]
    shapes = _shared(shapes.split(_format.SHAPE_SEP)) if n else []  # type: ignore[union-attr]
    if len(dtypes) != n or len(shapes) != n or len(checksums) != n * _format.CHECKSUM_CHARS:  # type: ignore[arg-type]
        raise _corrupt(directory, f"the tensor table's columns do not all describe {n} tensors")
    count = 0
    for shard in shards:
        if not (isinstance(shard, dict) and type(shard.get("tensors")) is int and type(shard.get("size")) is int
                and isinstance(shard.get("checksum"), str) and shard["tensors"] >= 0):
            raise _corrupt(directory, f"malformed shard record {shard!r}")
        _format.check_member_name(directory, shard.get("file"), "shard")
        count += shard["tensors"]
    if count != len(names):
        raise _corrupt(directory, f"the shards hold {count} tensors but the table lists {len(names)}")
    for alias, target in aliases.items():
        if not isinstance(target, str):
            raise _corrupt(directory, f"alias {alias!r} must name a stored tensor")
    _check_weight_map(directory, raw, names, shards)
    return Index(directory, raw, names, dtypes, shapes, checksums, shards, aliases)  # type: ignore[arg-type]


def _shared(parts: list[str]) -> list[str]:
    """``parts`` with equal strings replaced by one object (20,000 tensors share a few dtypes and shapes)."""
    seen: dict[str, str] = {}
    return [seen.setdefault(p, p) for p in parts]


def _check_weight_map(directory: str, raw: dict[str, Any], names: list[str], shards: list[dict[str, Any]]) -> None:
    """The Hugging Face ``weight_map`` must map exactly the stored tensors to their shards.

    Once checked it is dropped from ``raw``: the tensor table says the same, and for 20,000 tensors
    the map's 40,000 strings would otherwise stay in memory for the whole restore.
    """
    weight_map = raw.pop("weight_map", None)
    if not isinstance(weight_map, dict):
        raise _corrupt(directory, "'weight_map' is missing")
    position = 0
    for shard in shards:  # each entry is taken out as it is checked: what is left at the end is extra
        file = shard["file"]
        for name in names[position : position + shard["tensors"]]:
            found = weight_map.pop(name, None)
            if found is None:
                raise _corrupt(directory, f"weight_map has no entry for {name!r}, or the tensor table lists it twice")
            if found != file:
                raise _corrupt(directory, f"weight_map puts {name!r} in {found!r}, not {file!r}")
        position += shard["tensors"]
    if weight_map:
        raise _corrupt(directory, f"weight_map lists tensors that no shard holds: {format_keys(weight_map)}")


def read_shard_headers(index: Index) -> dict[str, TensorInfo]:
    """Validate every shard against the index; return stored name -> location (aliases resolved).

    Raises:
        CorruptCheckpointError: a shard is missing, truncated, resized or disagrees with the index.
    """
    infos: dict[str, TensorInfo] = {}
    position = 0
    where = f" in {INDEX_FILE} of {index.directory}"
    dtypes = {d: _format.str_to_dtype(d, where) for d in set(index.dtypes)}
    try:
        checksums = _format.parse_checksums(index.checksum_text)
    except ValueError as e:
        raise _corrupt(index.directory, f"the tensor table's checksums are malformed ({e})") from None
    for shard in index.shards:
        file, count = shard["file"], shard["tensors"]
        path = os.path.join(index.directory, file)
        if not os.path.isfile(path):
            raise CorruptCheckpointError(f"Shard {path} listed in {INDEX_FILE} is missing.", path)
        found = _exact_header(index, shard, position, dtypes, checksums, path)
        if found is None:
            found = _parsed_header(index, shard, position, checksums, path)
        infos.update(zip(index.names[position : position + count], found))
        position += count
    for alias, target in index.aliases.items():
        if target not in infos:
            raise _corrupt(index.directory, f"alias {alias!r} points at {target!r}, which is not stored")
        infos[alias] = infos[target]
    return infos


def _parsed_header(index: Index, shard: dict[str, Any], position: int, checksums: tuple[int, ...],
                   path: str) -> list[TensorInfo]:
    """The shard's tensors in table order, from its fully parsed and validated header."""
    file, count = shard["file"], shard["tensors"]
    found, _, size = _format.read_header(path, file)
    if size != shard["size"]:
        raise CorruptCheckpointError(
            f"Shard {path} is {size} bytes but {INDEX_FILE} records {shard['size']}; it was truncated or replaced.",
            path,
        )
    by_name = {t.name: t for t in found}
    expected = index.names[position : position + count]
    if set(by_name) != set(expected):
        diff = sorted(set(by_name) ^ set(expected))
        raise CorruptCheckpointError(
            f"Shard {path} does not hold the tensors {INDEX_FILE} lists for it (differs in: {', '.join(diff[:5])}).",
            path,
        )
    out = []
    for j, name in enumerate(expected, position):
        info = by_name[name]
        where = f"for tensor {name!r} in {INDEX_FILE}"
        if _format.str_to_dtype(index.dtypes[j], where) != info.dtype or _format.parse_shape_key(
            index.shapes[j], where
        ) != info.shape:
            raise CorruptCheckpointError(
                f"Tensor {name!r}: {INDEX_FILE} says {index.dtypes[j]} [{index.shapes[j]}] but shard {file} "
                f"holds {_format.dtype_to_str(info.dtype)} {list(info.shape)}.",
                path,
            )
        out.append(info._replace(checksum=checksums[j]))
    return out


def _exact_header(index: Index, shard: dict[str, Any], position: int, dtypes: dict[str, torch.dtype],
                  checksums: tuple[int, ...], path: str) -> list[TensorInfo] | None:
    """The shard's tensors when its header is the one written with this index, else None.

    The index records the xxh3-64 of each shard's header bytes. When the header hashes to it and
    the file has exactly the recorded size, the header is the one the writer produced from this
    very table, so the offsets follow from the table without parsing thousands of JSON entries.
    Anything else (an index without header checksums, another writer, a tampered file) goes
    through the full validating parser.
    """
    recorded = shard.get("header_checksum")
    if not isinstance(recorded, str):
        return None
    with open(path, "rb", buffering=0) as f:
        size = os.fstat(f.fileno()).st_size
        prefix = f.read(8)
        if size != shard["size"] or len(prefix) < 8:
            return None
        (n,) = struct.unpack("<Q", prefix)
        if n > _format.MAX_HEADER_SIZE or 8 + n > size:
            return None
        hasher = xxhash.xxh3_64(prefix)
        buffer = memoryview(bytearray(min(n, _HEADER_CHUNK)))  # a 20,000-tensor header is megabytes
        left = n
        while left:
            got = f.readinto(buffer[: min(left, len(buffer))])
            if not got:
                return None
            hasher.update(buffer[:got])
            left -= got
    if hasher.hexdigest() != recorded:
        return None
    end = position + shard["tensors"]
    dts = [dtypes[d] for d in index.dtypes[position:end]]
    shapes = [_format.size_of(s) for s in index.shapes[position:end]]
    sizes = list(map(_format.nbytes_of, shapes, dts))
    starts = list(itertools.accumulate(sizes, initial=8 + n))
    if starts[-1] != size:
        return None
    # Built by C-level calls only: 20,000 tensors take a few milliseconds.
    return list(map(_NEW_INFO, zip(index.names[position:end], itertools.repeat(shard["file"]), dts, shapes,
                                   starts, sizes, checksums[position:end])))


_HEADER_CHUNK = 2**20
_NEW_INFO = functools.partial(tuple.__new__, TensorInfo)


def state_tree(index: Index, resolve: Callable[[str], Any]) -> Any:
    """Decode the typed non-tensor tree with each tensor name resolved by ``resolve``."""
    names = list(index.names) + list(index.aliases)
    trie = _tree.build_trie(names)
    return _tree.decode(index.section.get("state", {}), trie, resolve)
