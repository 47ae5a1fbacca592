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
import re
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Any

import torch
import xxhash

from torchckpt._format import blocks as format_blocks
from torchckpt._format import chunks as format_chunks
from torchckpt._format import spec as format_spec
from torchckpt._format import tree as format_tree
from torchckpt._format.spec import INDEX_FILE, TORCHCKPT_KEY, TensorInfo
from torchckpt._storage.base import Source, Storage, join
from torchckpt._storage.registry import storage_for
from torchckpt._threads import gc_paused
from torchckpt.errors import (
    CheckpointDeletedError,
    CheckpointError,
    CheckpointNotFoundError,
    CorruptCheckpointError,
    format_keys,
    shard_size_mismatch,
)


@dataclass
class Index:
    """A parsed, checked ``index.json`` of a torchckpt checkpoint. Headers are not read.

    ``raw`` is the parsed JSON less ``weight_map``, which is checked against the tensor table and
    dropped (see :func:`_check_weight_map`).
    """

    directory: str
    storage: Storage
    raw: dict[str, Any]
    names: list[str]
    dtypes: list[str]
    shapes: list[str]
    checksum_text: str
    shards: list[dict[str, Any]]
    aliases: dict[str, str]
    layout: format_chunks.Layout = field(default_factory=format_chunks.Layout)  # format 2: chunks and per-rank names
    blocks: format_blocks.BlockSums | None = None  # format 3: block checksums (None: whole tensors only)

    @property
    def world_size(self) -> int:
        """How many ranks saved it (1 for format 1)."""
        return self.layout.world_size

    @property
    def checksums(self) -> list[str]:
        """Per-tensor checksums (hex), in table order."""
        w = format_spec.CHECKSUM_CHARS
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
    return CorruptCheckpointError(f"{join(directory, INDEX_FILE)} is invalid: {what}.", directory)


def load_index(directory: str, storage: Storage | None = None) -> Index:
    """Read and check ``DIRECTORY/index.json``: its seal, then every field a reader uses.

    Raises:
        CheckpointNotFoundError: there is no committed checkpoint at ``directory``.
        CorruptCheckpointError: the index is damaged, malformed, hostile, or from an unknown format
            version; ``.path`` is the checkpoint directory.
    """
    try:
        return _load_index(directory, storage or storage_for(directory))
    except CorruptCheckpointError as e:
        if e.path is None:
            e.path = directory
        raise


def _load_index(directory: str, storage: Storage) -> Index:
    path = join(directory, INDEX_FILE)
    try:
        data = storage.read_file(path, format_spec.MAX_INDEX_SIZE, "Index")
    except CheckpointDeletedError:  # an object store saw it go between two requests, or being deleted
        raise
    except FileNotFoundError:
        raise CheckpointNotFoundError(
            f"No checkpoint at {directory}: {INDEX_FILE} is missing. A checkpoint directory appears only "
            "once it is completely written; check the path (for a manager's directory, pass the directory "
            "itself to get its latest checkpoint).",
            directory,
        ) from None
    except NotADirectoryError:
        raise CheckpointNotFoundError(f"No checkpoint at {directory}: it is not a directory.", directory) from None
    except OSError as e:
        raise CorruptCheckpointError(f"Cannot read {path}: {e.strerror or e}.", directory) from e
    return parse_index(directory, storage, data)


def parse_index(directory: str, storage: Storage, data: bytes) -> Index:
    """Check and parse the bytes of ``DIRECTORY/index.json``, however they were read (a local file,
    a GET, a test); ``storage`` is where its shards are."""
    path = join(directory, INDEX_FILE)
    format_spec.unseal(data, path, "checkpoint index")
    with gc_paused():  # parsing allocates many small objects; collections in between only cost time
        raw = format_spec.parse_json(data, path, "checkpoint index")
    del data
    if not isinstance(raw, dict) or not isinstance(raw.get(TORCHCKPT_KEY), dict):
        raise _corrupt(directory, f"it has no {TORCHCKPT_KEY!r} section (not written by torchckpt)")
    raw.pop(format_spec.SEAL_KEY, None)
    section = raw[TORCHCKPT_KEY]
    version = section.get("format_version")
    if type(version) is not int or version < 1:
        raise _corrupt(directory, f"bad format_version {_short(version)}")
    if version > format_spec.FORMAT_VERSION:
        raise CorruptCheckpointError(
            f"{path} uses format version {version}, newer than this torchckpt understands "
            f"({format_spec.FORMAT_VERSION}); upgrade torchckpt to read it.",
            directory,
        )
    _check_section(directory, raw, section)
    table, shards, aliases = section["tensors"], section["shards"], section["aliases"]
    names, dtypes, shapes, checksums = (table[k] for k in ("names", "dtypes", "shapes", "checksums"))
    n = len(names)
    dtypes = _shared(dtypes.split(format_spec.DTYPE_SEP)) if n else []
    shapes = _shared(shapes.split(format_spec.SHAPE_SEP)) if n else []
    if len(dtypes) != n or len(shapes) != n or len(checksums) != n * format_spec.CHECKSUM_CHARS:
        raise _corrupt(directory, f"the tensor table's columns do not all describe {n} tensors")
    where = f"in {path}"
    for dtype in set(dtypes):
        format_spec.str_to_dtype(dtype, f" {where}", directory)
    for shape in set(shapes):
        format_spec.parse_shape_key(shape, where)
    count = 0
    files = set()
    for shard in shards:
        if not (isinstance(shard, dict) and _is_count(shard.get("tensors")) and _is_count(shard.get("size"))
                and _is_hex(shard.get("checksum")) and shard.get("header_checksum", "0" * 16) is not None
                and _is_hex(shard.get("header_checksum", "0" * 16))):
            raise _corrupt(directory, f"malformed shard record {_short(shard)}")
        file = format_spec.check_member_name(directory, shard.get("file"), "shard")
        if file in files:
            raise _corrupt(directory, f"shard {file!r} is listed twice")
        files.add(file)
        count += shard["tensors"]
    if count != len(names):
        raise _corrupt(directory, f"the shards hold {count} tensors but the table lists {len(names)}")
    layout = format_chunks.Layout()
    if version >= format_spec.SHARDED_FORMAT_VERSION:
        layout = format_chunks.parse_layout(section, names, dtypes, shapes, directory, path)
    blocks = None
    if version >= format_spec.BLOCKS_FORMAT_VERSION:
        try:
            blocks = format_blocks.parse(section, names, dtypes, shapes, path)
        except CorruptCheckpointError as e:
            e.path = directory
            raise
    if aliases:
        stored = set(names) | set(layout.chunked)
        for alias, target in aliases.items():
            if not isinstance(target, str) or target not in stored or alias in stored:
                raise _corrupt(directory, f"alias {_short(alias)} must name a stored tensor, not {_short(target)}")
    _check_weight_map(directory, raw, names, shards)
    return Index(directory, storage, raw, names, dtypes, shapes, checksums, shards, aliases, layout, blocks)


def _check_section(directory: str, raw: dict[str, Any], section: dict[str, Any]) -> None:
    """The types of everything in the ``torchckpt`` section that readers use."""
    table, shards, aliases = section.get("tensors"), section.get("shards"), section.get("aliases", {})
    if not isinstance(table, dict) or not isinstance(shards, list) or not isinstance(aliases, dict):
        raise _corrupt(directory, "'tensors', 'shards' and 'aliases' must be present")
    section.setdefault("aliases", aliases)
    names = table.get("names")
    if not isinstance(names, list) or not all(type(n) is str for n in names) or not all(
            isinstance(table.get(k), str) for k in ("dtypes", "shapes", "checksums")):
        raise _corrupt(directory, "the tensor table needs a 'names' list of strings and 'dtypes', 'shapes', "
                                  "'checksums' strings")
    try:  # a lone surrogate ("\ud800" in the JSON) is no name a file system or terminal can take
        "".join(names).encode()
        "".join(aliases).encode()
    except UnicodeEncodeError:
        raise _corrupt(directory, "a tensor name is not valid Unicode") from None
    objects = section.get("objects", {})
    if not isinstance(objects, dict) or not all(isinstance(v, str) for v in objects.values()):
        raise _corrupt(directory, "'objects' must map names to kinds")
    created = section.get("created")
    if created is not None and (type(created) not in (int, float) or not 0 <= created < _LAST_TIMESTAMP):
        raise _corrupt(directory, f"bad 'created' time {_short(created)}")
    for key in ("torch_version", "torchckpt_version"):
        if not isinstance(section.get(key, ""), str):
            raise _corrupt(directory, f"bad {key!r}")
    if not isinstance(section.get("state", {}), dict) or not isinstance(section.get("metadata", {}), dict):
        raise _corrupt(directory, "the state tree and the metadata must be objects")
    metadata = raw.get("metadata", {})
    if not isinstance(metadata, dict) or not _is_count(metadata.get("total_size", 0)):
        raise _corrupt(directory, "bad 'metadata'")


_LAST_TIMESTAMP = 253402300800  # 10000-01-01: datetime cannot show later times


def _is_count(value: Any) -> bool:
    return type(value) is int and 0 <= value <= format_spec.MAX_DIM


def _is_hex(value: Any) -> bool:
    return isinstance(value, str) and len(value) == format_spec.CHECKSUM_CHARS and _HEX16.fullmatch(value) is not None


_HEX16 = re.compile(r"[0-9a-f]{16}")


def _short(value: Any) -> str:
    text = repr(value)
    return text if len(text) <= 80 else text[:77] + "..."


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


class OpenShards:
    """Every shard of a checkpoint, all opened before any is read.

    On a local filesystem, holding the descriptors pins the checkpoint's bytes: a manager's
    retention may delete the directory meanwhile (a validation process reading while training
    saves), and the reads still see every byte they planned on. Only a deletion before the shards
    are open is noticed, as :class:`CheckpointDeletedError`. An object store has no such pin: a
    shard deleted during the read is a :class:`CheckpointDeletedError` when it is read.
    """

    def __init__(self, index: Index) -> None:
        self.directory = index.directory
        self.storage = index.storage
        self.blocks = index.blocks  # format 3's block checksums, for reads of part of a tensor
        self.sources: dict[str, Source] = {}
        try:
            for shard in index.shards:
                path = join(index.directory, shard["file"])
                try:
                    self.sources[shard["file"]] = self.storage.open(path, "Shard")
                except FileNotFoundError:
                    raise missing_member(index.directory, path, self.storage) from None
                except OSError as e:
                    raise CorruptCheckpointError(f"Cannot open shard {path}: {e.strerror or e}.", path) from e
        except BaseException:
            self.close()
            raise

    def path(self, file: str) -> str:
        return join(self.directory, file)

    def close(self) -> None:
        sources, self.sources = self.sources, {}
        for source in sources.values():
            source.close()

    def __enter__(self) -> OpenShards:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()


def missing_member(directory: str, path: str, storage: Storage) -> CheckpointError:
    """The error for a shard that is not there: the checkpoint was deleted, or is corrupt."""
    if not storage.exists(join(directory, INDEX_FILE)):
        return CheckpointDeletedError(
            f"Checkpoint {directory} was deleted while it was being read (a manager's max_to_keep, usually); "
            "read a newer checkpoint.",
            directory,
        )
    return CorruptCheckpointError(f"Shard {path} listed in {INDEX_FILE} is missing.", path)


def read_shard_headers(index: Index, shards: OpenShards, trust_header_checksums: bool = True) -> dict[str, TensorInfo]:
    """Validate every shard against the index; return stored name -> location (aliases resolved).

    Every shard's header must describe exactly the index's tensors for it, in the table's order,
    with the table's dtypes and shapes: then the table's offsets and the header's are the same
    bytes, whichever a reader uses. With ``trust_header_checksums`` a shard whose header hashes
    to its recorded checksum skips the full parse (see :func:`_exact_header`); ``verify`` parses
    every header.

    Raises:
        CorruptCheckpointError: a shard is truncated, resized or disagrees with the index.
    """
    infos: dict[str, TensorInfo] = {}
    position = 0
    where = f" in {INDEX_FILE} of {index.directory}"
    dtypes = {d: format_spec.str_to_dtype(d, where) for d in set(index.dtypes)}
    try:
        checksums = format_spec.parse_checksums(index.checksum_text)
    except ValueError as e:
        raise _corrupt(index.directory, f"the tensor table's checksums are malformed ({e})") from None
    for shard in index.shards:
        file, count = shard["file"], shard["tensors"]
        path, source = shards.path(file), shards.sources[file]
        found = _exact_header(index, shard, position, dtypes, checksums, source) if trust_header_checksums else None
        if found is None:
            found = _parsed_header(index, shard, position, checksums, source, path)
        infos.update(zip(index.names[position : position + count], found))
        position += count
    for alias, target in index.aliases.items():
        if target in infos:  # in format 2 a target may be a chunked tensor, resolved by its logical name
            infos[alias] = infos[target]
    return infos


def _parsed_header(index: Index, shard: dict[str, Any], position: int, checksums: tuple[int, ...],
                   source: Source, path: str) -> list[TensorInfo]:
    """The shard's tensors in table order, from its fully parsed and validated header."""
    file, count = shard["file"], shard["tensors"]
    found, _, size = format_spec.read_header(source, file)
    if size != shard["size"]:
        raise CorruptCheckpointError(
            shard_size_mismatch(path, size, shard["size"], INDEX_FILE),
            path,
        )
    expected = index.names[position : position + count]
    in_file = [t.name for t in found]  # file order
    if in_file != expected:
        diff = sorted(set(in_file) ^ set(expected)) or [a for a, b in zip(in_file, expected) if a != b]
        raise CorruptCheckpointError(
            f"Shard {path} does not hold the tensors {INDEX_FILE} lists for it, in its order "
            f"(differs in: {format_keys(diff, 5)}).",
            path,
        )
    out = []
    for j, info in enumerate(found, position):
        name = info.name
        where = f"for tensor {name!r} in {INDEX_FILE}"
        if format_spec.str_to_dtype(index.dtypes[j], where) != info.dtype or format_spec.parse_shape_key(
            index.shapes[j], where
        ) != info.shape:
            raise CorruptCheckpointError(
                f"Tensor {name!r}: {INDEX_FILE} says {index.dtypes[j]} [{index.shapes[j]}] but shard {file} "
                f"holds {format_spec.dtype_to_str(info.dtype)} {list(info.shape)}.",
                path,
            )
        out.append(info._replace(checksum=checksums[j]))
    return out


def _exact_header(index: Index, shard: dict[str, Any], position: int, dtypes: dict[str, torch.dtype],
                  checksums: tuple[int, ...], source: Source) -> list[TensorInfo] | None:
    """The shard's tensors when its header is the one written for this index's table, else None.

    The writer encodes each header from the table (``_format.encode_header_pieces``) and records
    its xxh3-64. When the file starts with exactly the bytes the table encodes to, hashing to the
    recorded checksum, and has the recorded size, the header lists the table's names, dtypes and
    shapes in its order, so the offsets follow from the table without parsing thousands of JSON
    entries. Comparing with the table's own encoding, not only with the recorded checksum, matters:
    an index rewritten and resealed (a chunk's name given to another chunk's bytes) leaves the
    header unchanged. Anything else (an index without header checksums, another writer, a
    tampered file or index) goes through the full validating parser.
    """
    recorded = shard.get("header_checksum")
    if not isinstance(recorded, str) or source.size != shard["size"]:
        return None
    end = position + shard["tensors"]
    names = index.names[position:end]
    dts = [dtypes[d] for d in index.dtypes[position:end]]
    shapes = [format_spec.size_of(s) for s in index.shapes[position:end]]
    sizes = list(map(format_spec.nbytes_of, shapes, dts))
    try:
        expected = b"".join(format_spec.encode_header_pieces(zip(names, dts, shapes, sizes)))
    except ValueError:  # over the header size limit: not a header this writer wrote
        return None
    starts = list(itertools.accumulate(sizes, initial=len(expected)))
    if starts[-1] != source.size or xxhash.xxh3_64_hexdigest(expected) != recorded:
        return None
    view, offset = memoryview(expected), 0
    while offset < len(expected):  # a 20,000-tensor header is megabytes: compared a bounded piece at a time
        piece = source.read(offset, min(len(expected) - offset, _HEADER_CHUNK))
        if not piece or view[offset : offset + len(piece)] != piece:
            return None
        offset += len(piece)
    # Built by C-level calls only: 20,000 tensors take a few milliseconds.
    return list(map(_NEW_INFO, zip(names, itertools.repeat(shard["file"]), dts, shapes, starts, sizes,
                                   checksums[position:end])))


_HEADER_CHUNK = 2**20
_NEW_INFO = functools.partial(tuple.__new__, TensorInfo)


def state_tree(index: Index, resolve: Callable[[str], Any], rank: int = 0) -> Any:
    """Decode the typed non-tensor tree with each tensor name resolved by ``resolve``.

    In format 2, a chunked tensor resolves to a :class:`~torchckpt._format.chunks.ChunkedInfo` of its
    chunks, and ``rank`` picks the per-rank values (``@per_rank``, tensors named ``~r<rank>``).
    """
    try:
        state = index.section.get("state", {})
        names: Any = itertools.chain(index.names, index.aliases)
        if index.raw[TORCHCKPT_KEY]["format_version"] >= format_spec.SHARDED_FORMAT_VERSION:
            state = format_tree.select_rank(state, rank, index.world_size)
            names, resolve = index.layout.view(index.names, index.aliases, rank, resolve)
        trie = format_tree.build_trie(names)
        tree = format_tree.decode(state, trie, resolve)
        if not isinstance(tree, dict) or not all(type(k) is str for k in tree):
            raise CorruptCheckpointError("the state tree's root is not an object of tracked names")
        return tree
    except CorruptCheckpointError as e:
        if e.path is not None:
            raise
        raise CorruptCheckpointError(f"{join(index.directory, INDEX_FILE)}: {e}", index.directory) from None


def rank_view(index: Index, rank: int) -> tuple[Any, dict[str, str], dict[str, str]]:
    """A format-2 checkpoint as one rank's single-process checkpoint: the state tree with that
    rank's per-rank values, each tensor name it then holds -> the name a reader knows the tensor
    by (a chunked tensor's logical name, a per-rank tensor's stored ``~r`` name), and the aliases.
    A format-1 index is returned as it is."""
    state = index.section.get("state", {})
    if index.raw[TORCHCKPT_KEY]["format_version"] < format_spec.SHARDED_FORMAT_VERSION:
        return state, {n: n for n in index.names}, dict(index.aliases)
    names = index.layout.rank_names(index.names, rank)
    return format_tree.select_rank(state, rank, index.world_size), names, dict(index.aliases)
