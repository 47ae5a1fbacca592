"""Writing a checkpoint directory and opening one for reading.

Writing: tensors are deduplicated (tied weights are stored once and recorded as aliases),
grouped greedily into shards of at most ``max_shard_size`` bytes, written into a temporary
sibling directory with ``index.json`` last, fsynced, and committed by rename (see ``_atomic``).

Reading: :func:`load_index` parses and checks ``index.json`` only (what the lazy inspector needs);
:func:`read_shard_headers` then validates every shard header against the index (what a restore
needs before it touches any object).
"""

from __future__ import annotations

import array
import contextlib
import functools
import gc
import io
import itertools
import json
import os
import struct
import sys
import time
from collections.abc import Callable, Iterator
from dataclasses import dataclass, field
from typing import Any

import torch
import xxhash

from torchckpt import _atomic, _format, _tensorio, _tree
from torchckpt._format import INDEX_FILE, TensorInfo
from torchckpt._progress import progress_bar
from torchckpt.errors import CheckpointNotFoundError, CorruptCheckpointError, UnsupportedStateError, format_keys

TORCHCKPT_KEY = "torchckpt"


@contextlib.contextmanager
def gc_paused() -> Iterator[None]:
    """Pause the cyclic garbage collector: saving or restoring tens of thousands of tensors
    allocates many small objects, and collections triggered in between only cost time."""
    was_enabled = gc.isenabled()
    gc.disable()
    try:
        yield
    finally:
        if was_enabled:
            gc.enable()


def is_committed(path: str) -> bool:
    """Whether ``path`` is a committed checkpoint directory (not a temporary or a leftover)."""
    return (
        not _atomic.is_temporary(os.path.basename(path))
        and os.path.isfile(os.path.join(path, INDEX_FILE))
    )


# -- writing ---------------------------------------------------------------------------------


def _check_tensor(name: str, t: torch.Tensor) -> None:
    if t.layout != torch.strided or t.is_meta or t.is_nested or t.is_quantized:
        raise UnsupportedStateError(
            f"Cannot save tensor {name!r}: {t.layout} / meta / nested / quantized tensors are not "
            "supported; convert it to a dense tensor first (for example `.to_dense()`).",
            key=name,
            value_type=type(t),
        )
    if t.dtype not in _format.SUPPORTED_DTYPES:
        raise UnsupportedStateError(
            f"Cannot save tensor {name!r}: dtype {t.dtype} is not one safetensors can store "
            f"(supported: {', '.join(sorted(str(d).removeprefix('torch.') for d in _format.SUPPORTED_DTYPES))}).",
            key=name,
            value_type=type(t),
        )


def _alias_key(t: torch.Tensor) -> tuple[Any, ...]:
    return (t.device, t.data_ptr(), t.dtype, tuple(t.shape), t.stride())


@dataclass
class _Shard:
    names: list[str] = field(default_factory=list)
    nbytes: int = 0


def plan_shards(tensors: dict[str, torch.Tensor], max_shard_size: int) -> list[_Shard]:
    """Greedy grouping in save order; a single tensor over the limit gets a shard of its own."""
    shards: list[_Shard] = []
    current = _Shard()
    for name, t in tensors.items():
        n = t.numel() * t.element_size()
        if current.names and current.nbytes + n > max_shard_size:
            shards.append(current)
            current = _Shard()
        current.names.append(name)
        current.nbytes += n
    if current.names or not shards:
        shards.append(current)
    for shard in shards:  # widest elements first keeps every tensor aligned to its element size
        shard.names.sort(key=lambda k: -tensors[k].element_size())
    return shards


def prepare_tensors(tensors: dict[str, torch.Tensor]) -> tuple[dict[str, torch.Tensor], dict[str, str]]:
    """Check every tensor can be stored; split off aliases (tensors that are views of a stored one).

    Returns:
        The tensors to store (``tensors`` itself when nothing is an alias), and alias name ->
        stored name.

    Raises:
        UnsupportedStateError: a tensor has a layout or dtype safetensors cannot hold.
    """
    aliases: dict[str, str] = {}
    first_at: dict[int, str] = {}  # address -> first tensor there (the common, cheap case)
    views_at: dict[tuple[Any, ...], str] = {}  # view key -> stored name, only at addresses that repeat
    supported = _format.SUPPORTED_DTYPES
    strided = torch.strided
    for name, t in tensors.items():
        if t.layout is not strided or t.dtype not in supported or t.is_meta or t.is_nested:
            _check_tensor(name, t)
        address = t.data_ptr()
        if not address:
            continue
        first = first_at.setdefault(address, name)
        if first is not name and t.nbytes:  # views at one address are aliases only if identical views
            head = tensors[first]
            if head.nbytes:
                views_at.setdefault(_alias_key(head), first)
            key = _alias_key(t)
            target = views_at.setdefault(key, name)
            if target is not name:
                aliases[name] = target
    if not aliases:
        return tensors, aliases
    return {n: t for n, t in tensors.items() if n not in aliases}, aliases


def write_checkpoint(
    path: str,
    stored: dict[str, torch.Tensor],
    aliases: dict[str, str],
    section: dict[str, Any],
    max_shard_size: int | str = _format.DEFAULT_MAX_SHARD_SIZE,
    progress: bool | None = None,
    before_commit: Callable[[str], None] | None = None,
) -> str:
    """Write tensors and the ``torchckpt`` index section to the directory ``path``, atomically.

    Args:
        path: the checkpoint directory to create or replace.
        stored: name -> tensor, in save order, as returned by :func:`prepare_tensors`.
        aliases: alias name -> stored name, as returned by :func:`prepare_tensors`.
        section: extra keys for the index's ``torchckpt`` section (``state``, ``objects``, ...).
        max_shard_size: bytes per shard (int), or a string such as ``"2GB"`` (see ``parse_size``).
        progress: show a progress bar (None: on a terminal for large saves).
        before_commit: called with the temporary directory just before the rename (tests use it
            to inject faults).

    Returns:
        ``path``.
    """
    limit = _format.parse_size(max_shard_size)
    shards = plan_shards(stored, limit)
    total = sum(s.nbytes for s in shards)
    files = [_format.shard_name(i, len(shards)) for i in range(1, len(shards) + 1)]
    digests: list[array.array[int]] = []  # per shard, per tensor: 8 bytes each, not an int object
    shard_records: list[dict[str, Any]] = []
    with _atomic.temporary_directory(path) as tmp, progress_bar(total, f"save {os.path.basename(path)}", progress) as bar:
        for shard, file in zip(shards, files):
            header = _format.encode_header_pieces((n, t.dtype, t.shape, t.nbytes) for n in shard.names
                                                  for t in (stored[n],))
            size = sum(map(len, header)) + shard.nbytes
            shard_hash = xxhash.xxh3_64()
            for piece in header:
                shard_hash.update(piece)
            header_checksum = shard_hash.hexdigest()
            fd = os.open(os.path.join(tmp, file), os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o644)
            try:
                _tensorio.write_all(fd, header)
                del header  # a 20,000-tensor header is megabytes: do not hold it while writing data
                shard_digests = _tensorio.write_tensors(fd, [stored[n] for n in shard.names], bar.update)
                os.fsync(fd)
            finally:
                os.close(fd)
            shard_hash.update(_big_endian(shard_digests))
            digests.append(shard_digests)
            shard_records.append({
                "file": file,
                "size": size,
                "checksum": f"{shard_hash.intdigest():016x}",
                "header_checksum": header_checksum,
                "tensors": len(shard.names),
            })
        count = sum(len(shard.names) for shard in shards)
        weight_map: Any = {n: file for shard, file in zip(shards, files) for n in shard.names}
        if count > _format.LAYOUT_MAX_LINES:
            weight_map = _format.RawJSON(lambda: _weight_map_pieces(shards, files))
        index = {
            "metadata": {"total_size": total},
            "weight_map": weight_map,
            TORCHCKPT_KEY: {
                "format_version": _format.FORMAT_VERSION,
                "created": time.time(),
                "torch_version": torch.__version__,
                "torchckpt_version": _version(),
                "checksum_algorithm": _format.CHECKSUM_ALGORITHM,
                **section,
                "aliases": aliases,
                "shards": shard_records,
                "tensors": _format.RawJSON(lambda: _table_pieces(shards, stored, digests)),
            },
        }
        fd = os.open(os.path.join(tmp, INDEX_FILE), os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o644)
        try:
            with io.BufferedWriter(io.FileIO(fd, "w", closefd=False), _INDEX_BUFFER) as out:
                for text in _format.layout_pieces(index):
                    out.write(text.encode())
            os.fsync(fd)
        finally:
            os.close(fd)
        if before_commit is not None:
            before_commit(tmp)
        _atomic.commit_directory(tmp, path)
    return path


_INDEX_BUFFER = 2**20
_PIECE = 1024  # names per piece of the streamed index


def _big_endian(values: array.array[int]) -> bytes:
    """Unsigned 64-bit ints as 8-byte big-endian integers, back to back (how checksums are hashed and written)."""
    if sys.byteorder == "little":
        values = array.array("Q", values)
        values.byteswap()
    return values.tobytes()


def _weight_map_pieces(shards: list[_Shard], files: list[str]) -> Iterator[str]:
    """``weight_map`` as compact JSON, a thousand names a piece (the same text as ``json.dumps``)."""
    quote = _format.json_string
    yield "{"
    separator = ""
    for shard, file in zip(shards, files):
        value = quote(file)
        names = shard.names
        for i in range(0, len(names), _PIECE):
            yield separator + ", ".join([f"{quote(n)}: {value}" for n in names[i : i + _PIECE]])
            separator = ", "
    yield "}"


def _table_pieces(shards: list[_Shard], stored: dict[str, torch.Tensor],
                  digests: list[array.array[int]]) -> Iterator[str]:
    """The index's tensor table (names, dtypes, shapes, checksums) as compact JSON, in pieces."""
    names = [n for shard in shards for n in shard.names]
    quote = _format.json_string
    dtype_names = _format._DTYPE_NAMES
    yield '{"names": ['
    yield from _joined(names, ", ", quote)
    yield '], "dtypes": "'
    yield from _joined(names, _format.DTYPE_SEP, lambda n: dtype_names[stored[n].dtype])
    yield '", "shapes": "'
    yield from _joined(names, _format.SHAPE_SEP, lambda n: _format.shape_key(tuple(stored[n].shape)))
    yield '", "checksums": "'
    for shard_digests in digests:
        for i in range(0, len(shard_digests), _PIECE):
            yield _big_endian(shard_digests[i : i + _PIECE]).hex()
    yield '"}'


def _joined(names: list[str], separator: str, render: Callable[[str], str]) -> Iterator[str]:
    """``separator.join(map(render, names))`` in pieces of ``_PIECE`` names."""
    for i in range(0, len(names), _PIECE):
        yield (separator if i else "") + separator.join([render(n) for n in names[i : i + _PIECE]])


def _version() -> str:
    from torchckpt import __version__

    return __version__


# -- reading ---------------------------------------------------------------------------------


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
    for shard in shards:
        file = shard["file"]
        for name in names[position : position + shard["tensors"]]:
            if weight_map.get(name) != file:
                raise _corrupt(directory, f"weight_map puts {name!r} in {weight_map.get(name)!r}, not {file!r}")
        position += shard["tensors"]
    if len(weight_map) != len(names):  # every name was found above: the map has extra entries, or names repeat
        extra = set(weight_map) - set(names)
        what = f"lists tensors that no shard holds: {format_keys(extra)}" if extra else "names a tensor twice"
        raise _corrupt(directory, f"weight_map {what}")


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
