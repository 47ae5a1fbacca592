"""The index schema: ``index.json`` as a writer builds it, and its bytes parsed and checked.

:func:`index_document` is the one place the index's keys and their order are written (the
single-process writer, the collective writer and the consolidation tool all call it);
:func:`parse_index` is the one place they are read back. Reading the file, opening the shards and
checking their headers is the load side's (``_load/opened``).

Why memory matters here: a restore into existing tensors should cost little beyond the tensors
themselves, and for 20,000 small tensors the parsed index is most of what it holds. So the file
is decoded once, the Hugging Face ``weight_map`` is checked and dropped, equal strings are shared,
and each tensor's location is one small tuple built by C-level calls.
"""

from __future__ import annotations

import array
import contextlib
import itertools
import json
import os
import re
import sys
from collections.abc import Iterator
from dataclasses import dataclass, field
from typing import Any

import xxhash

from torchckpt import _clock
from torchckpt._format import blocks as format_blocks
from torchckpt._format import chunks as format_chunks
from torchckpt._format import document as format_document
from torchckpt._format import dtypes as format_dtypes
from torchckpt._format import spec as format_spec
from torchckpt._format.spec import INDEX_FILE, TORCHCKPT_KEY, WEIGHT_MAP_KEY
from torchckpt._paths import join
from torchckpt._threads import gc_paused
from torchckpt._version import __version__
from torchckpt.errors import (
    CheckpointTooLargeError,
    CorruptCheckpointError,
    UnsupportedFormatError,
    format_keys,
    short_repr,
)

# -- writing ---------------------------------------------------------------------------------


def index_document(total_size: int, weight_map: Any, format_version: int, section: dict[str, Any],
                   aliases: dict[str, str], records: list[dict[str, Any]], table: Any) -> dict[str, Any]:
    """``index.json`` as a value, its keys in the order every writer uses (see ``docs/format.md``)."""
    import torch  # here, not at the top: the command line reads indexes without torch

    return {
        "metadata": {"total_size": total_size},
        WEIGHT_MAP_KEY: weight_map,
        TORCHCKPT_KEY: {
            "format_version": format_version,
            "created": _clock.now(),
            "torch_version": torch.__version__,
            "torchckpt_version": __version__,
            "checksum_algorithm": format_spec.CHECKSUM_ALGORITHM,
            **section,
            "aliases": aliases,
            "shards": records,
            "tensors": table,
        },
    }


def sealed_index(document: dict[str, Any], path: str, tensors: int) -> Iterator[bytes]:
    """The bytes of ``index.json`` for ``document`` (:func:`index_document`, sealed), as pieces to
    write one after another; ``tensors``: how many stored tensors it lists, for the message.

    The readers' limits are checked on the way (see docs/format.md, "Limits"): a writer that wrote
    an index they refuse would commit a checkpoint nobody can restore. The seal, the last piece, is
    held back until the whole index passed, so a caller that writes the pieces as they come never
    has a complete index when it fails.

    Raises:
        CheckpointTooLargeError: the index would be bigger than ``MAX_INDEX_SIZE`` (``.size``: the
            whole index's bytes; the pieces past the limit are encoded and counted, not kept), or
            hold more JSON objects and arrays than a reader parses for its size (``.what`` is then
            ``"index.json containers"``, ``.size`` and ``.limit`` counts of them).
    """
    size = containers = 0
    pieces = format_document.sealed_pieces(document)
    held: bytes | None = None
    for piece in pieces:
        size += len(piece)
        if size > format_spec.MAX_INDEX_SIZE:
            size += sum(map(len, pieces))
            raise CheckpointTooLargeError(
                f"Cannot save {path}: its {INDEX_FILE} would be {size:,} bytes, over the "
                f"{format_spec.MAX_INDEX_SIZE:,} bytes every reader accepts, so nobody could restore it. It lists "
                f"{tensors:,} stored tensors, {size // max(1, tensors):,} bytes of index each. Nothing was "
                "committed. Store fewer tensors (on many ranks, shard each tensor over fewer of them: replicate "
                "across hosts, shard within one), or use shorter key names.",
                path, INDEX_FILE, size, format_spec.MAX_INDEX_SIZE,
            )
        containers += piece.count(b"{") + piece.count(b"[")  # as a reader counts them (format_document.parse_json)
        if held is not None:
            yield held
        held = piece
    allowed = int(format_spec.MAX_CONTAINERS_PER_BYTE * size + format_spec.MAX_CONTAINERS_FLOOR)
    if containers > allowed:
        raise CheckpointTooLargeError(
            f"Cannot save {path}: its {INDEX_FILE} would hold {containers:,} JSON objects and arrays in {size:,} "
            f"bytes, more than the {allowed:,} a reader parses in a file of that size (the bound on a hostile "
            "file's parsing memory), so nobody could restore it. Nothing was committed. The state holds very many "
            "small containers (empty lists, dicts or tuples); store such values packed, in a tensor or a string.",
            path, f"{INDEX_FILE} containers", containers, allowed,
        )
    if held is not None:
        yield held


def big_endian(values: array.array[int]) -> bytes:
    """Unsigned 64-bit ints as 8-byte big-endian integers, back to back (how checksums are hashed and written)."""
    if sys.byteorder == "little":
        values = array.array("Q", values)
        values.byteswap()
    return values.tobytes()


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
    layout: format_chunks.Layout = field(default_factory=format_chunks.Layout)  # format 2: chunks and per-rank names
    blocks: format_blocks.BlockSums | None = None  # format 3: block checksums (None: whole tensors only)
    seal: str = ""  # the seal it ends with: another index at the same path means another checkpoint
    weight_map_digest: int | None = None  # the unparsed weight_map's xxh3-64 (see weight_map_as_written)
    name_keys: dict[str, None] | None = None  # the names as a dict's keys, where parsing built one (deferred map)

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
        return dict(zip(self.names, file_of_each(self.shards)))

    def module_versions(self) -> dict[str, dict[str, int | None]] | None:
        """The saved modules' ``_version``s where not 1, by state dict's key and module prefix
        (``_save.capture.module_versions``); None where the writer recorded none (no module, or
        torchckpt 0.1.0 before the record existed).

        Raises:
            CorruptCheckpointError: the record is not a map of keys to maps of prefixes to
                integers or null.
        """
        found = self.section.get(format_spec.MODULE_VERSIONS_KEY)
        if found is None:
            return None
        if not (isinstance(found, dict) and all(isinstance(inner, dict) and all(
                v is None or type(v) is int and -2**63 <= v < 2**63 for v in inner.values()) for inner in found.values())):
            raise corrupt_index(self.directory, f"{format_spec.MODULE_VERSIONS_KEY!r} must map each key to a map of "
                                                "module prefixes to integers or null")
        return found


def file_of_each(shards: list[dict[str, Any]]) -> Iterator[str]:
    """The shard file of each tensor of the table, in table order (the shards' records, in turn)."""
    return itertools.chain.from_iterable(itertools.repeat(s["file"], s["tensors"]) for s in shards)


def corrupt_index(directory: str, what: str) -> CorruptCheckpointError:
    """The error for an index that is not what a writer wrote: ``what`` says what is wrong."""
    return CorruptCheckpointError(f"{join(directory, INDEX_FILE)} is invalid: {what}.", directory)


def parse_index(directory: str, data: bytes, defer_weight_map: bool = False) -> Index:
    """Check and parse the bytes of ``DIRECTORY/index.json``, however they were read (a local file,
    a GET, a test).

    ``defer_weight_map`` is for a reader that may never need the Hugging Face ``weight_map`` (the
    lazy inspector answers from the tensor table): where the map is one line, as the writers lay
    out a big one, it is not parsed; its digest is kept (``weight_map_digest``) for
    :func:`weight_map_as_written`, before the reader first locates a tensor's bytes. Everything
    else is checked as without it (tensor names are still unique).

    Raises:
        CorruptCheckpointError: the index is damaged, malformed, hostile, or from an unknown format
            version.
    """
    path = join(directory, INDEX_FILE)
    seal = format_document.unseal(data, path, "checkpoint index")
    if defer_weight_map:
        placeholder = os.urandom(8).hex()
        cut, digest = format_document.cut_member_value(data, WEIGHT_MAP_KEY, b'{"%s": 0}' % placeholder.encode())
        if digest is not None:
            with contextlib.suppress(CorruptCheckpointError):  # a forged layout: read as a restore reads it
                index = _parsed(directory, path, seal, cut, (digest, placeholder))
                if index is not None:
                    return index
    index = _parsed(directory, path, seal, data, None)
    assert index is not None
    return index


def _parsed(directory: str, path: str, seal: str, data: bytes, deferred: tuple[int, str] | None) -> Index | None:
    """:func:`parse_index` of the sealed bytes ``data``, in which the ``weight_map`` is either in
    place (``deferred`` None) or was cut out (``deferred``: the digest of its text, and the key of
    the placeholder object put in its place): None when what was cut was not the one top-level
    map, or the cut skipped the check of unique names."""
    with gc_paused():  # parsing allocates many small objects; collections in between only cost time
        raw = format_document.parse_json(data, path, "checkpoint index")
    del data
    if not isinstance(raw, dict) or not isinstance(raw.get(TORCHCKPT_KEY), dict):
        raise corrupt_index(directory, f"it has no {TORCHCKPT_KEY!r} section (not written by torchckpt)")
    raw.pop(format_spec.SEAL_KEY, None)
    section = raw[TORCHCKPT_KEY]
    version = _version_of(directory, section)
    _check_section(directory, raw, section)
    table, shards, aliases = section["tensors"], section["shards"], section["aliases"]
    names, dtypes, shapes, checksums = (table[k] for k in ("names", "dtypes", "shapes", "checksums"))
    n = len(names)
    dtypes, distinct_dtypes = _column(dtypes, format_spec.DTYPE_SEP, n)
    shapes, distinct_shapes = _column(shapes, format_spec.SHAPE_SEP, n)
    if len(dtypes) != n or len(shapes) != n or len(checksums) != n * format_spec.CHECKSUM_CHARS:
        raise corrupt_index(directory, f"the tensor table's columns do not all describe {n} tensors")
    where = f"in {path}"
    for dtype in distinct_dtypes:
        format_dtypes.check_dtype(dtype, f" {where}", directory)
    for shape in distinct_shapes:
        format_dtypes.parse_shape_key(shape, where)
    _check_shards(directory, shards, n)
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
        _check_aliases(directory, aliases, set(names) | set(layout.chunked))
    keys: dict[str, None] | None = None
    if deferred is None:
        _check_weight_map(directory, raw, names, shards)  # also: no name twice
    elif raw.pop(WEIGHT_MAP_KEY, None) != {deferred[1]: 0} or len(keys := dict.fromkeys(names)) != n:
        return None  # not the writers' layout (a forged one), or a name twice: the full parse says what is wrong
    return Index(directory, raw, names, dtypes, shapes, checksums, shards, aliases, layout, blocks, seal,
                 None if deferred is None else deferred[0], keys)


def weight_map_as_written(index: Index) -> bool:
    """Whether the ``weight_map`` :func:`parse_index` left unparsed is the text a writer encodes
    from this tensor table (or none was left): then it maps exactly the table's tensors (unique, as
    parsing checked) to their shards. False: it is another text (another writer's layout, or a
    wrong map), which only a full parse of the index can judge.
    """
    if index.weight_map_digest is None:
        return True
    with gc_paused():
        expected = json.dumps(index.shard_of(), ensure_ascii=False).encode()
    if xxhash.xxh3_64_intdigest(expected) != index.weight_map_digest:
        return False
    index.weight_map_digest = None
    return True


def _version_of(directory: str, section: dict[str, Any]) -> int:
    """The format version, one this package reads."""
    version = section.get("format_version")
    if type(version) is not int or version < 1:
        raise corrupt_index(directory, f"bad format_version {short_repr(version)}")
    if version > format_spec.FORMAT_VERSION:
        raise UnsupportedFormatError(
            f"{join(directory, INDEX_FILE)} uses format version {version}, newer than this torchckpt understands "
            f"({format_spec.FORMAT_VERSION}); upgrade torchckpt to read it. Nothing is wrong with the checkpoint.",
            join(directory, INDEX_FILE), version)
    features = section.get(format_spec.FEATURES_KEY, [])
    if not isinstance(features, list) or not all(type(f) is str for f in features):
        raise corrupt_index(directory, f"bad {format_spec.FEATURES_KEY} {short_repr(features)}")
    unknown = sorted(set(features) - format_spec.KNOWN_FEATURES)
    if unknown:
        raise UnsupportedFormatError(
            f"{join(directory, INDEX_FILE)} uses format features this torchckpt does not know "
            f"({', '.join(map(repr, unknown[:10]))}): it was written by a newer torchckpt; upgrade torchckpt to read it. "
            "Nothing is wrong with the checkpoint.", join(directory, INDEX_FILE), unknown)
    return version


def _check_section(directory: str, raw: dict[str, Any], section: dict[str, Any]) -> None:
    """The types of everything in the ``torchckpt`` section that readers use."""
    table, shards, aliases = section.get("tensors"), section.get("shards"), section.get("aliases", {})
    if not isinstance(table, dict) or not isinstance(shards, list) or not isinstance(aliases, dict):
        raise corrupt_index(directory, "'tensors', 'shards' and 'aliases' must be present")
    section.setdefault("aliases", aliases)
    names = table.get("names")
    try:  # joined, the names are one C-level check: all strings (else TypeError), and valid Unicode
        joined = "".join(names) if isinstance(names, list) else None
    except TypeError:
        joined = None
    if joined is None or not all(isinstance(table.get(k), str) for k in ("dtypes", "shapes", "checksums")):
        raise corrupt_index(directory, "the tensor table needs a 'names' list of strings and 'dtypes', 'shapes', "
                                       "'checksums' strings")
    try:  # a lone surrogate ("\ud800" in the JSON) is no name a file system or terminal can take
        for text in (joined, "".join(aliases)):
            if not text.isascii():  # O(1): CPython knows whether a string is ASCII
                text.encode()
    except UnicodeEncodeError:
        raise corrupt_index(directory, "a tensor name is not valid Unicode") from None
    objects = section.get("objects", {})
    if not isinstance(objects, dict) or not all(isinstance(v, str) for v in objects.values()):
        raise corrupt_index(directory, "'objects' must map names to kinds")
    created = section.get("created")
    if created is not None and (type(created) not in (int, float) or not 0 <= created < _LAST_TIMESTAMP):
        raise corrupt_index(directory, f"bad 'created' time {short_repr(created)}")
    for key in ("torch_version", "torchckpt_version"):
        if not isinstance(section.get(key, ""), str):
            raise corrupt_index(directory, f"bad {key!r}")
    if not isinstance(section.get("state", {}), dict) or not isinstance(section.get("metadata", {}), dict):
        raise corrupt_index(directory, "the state tree and the metadata must be objects")
    metadata = raw.get("metadata", {})
    if not isinstance(metadata, dict) or not _is_count(metadata.get("total_size", 0)):
        raise corrupt_index(directory, "bad 'metadata'")


_LAST_TIMESTAMP = 253402300800  # 10000-01-01: datetime cannot show later times


def _check_shards(directory: str, shards: list[Any], tensors: int) -> None:
    """Each shard record well formed, its file a plain shard name listed once, the counts adding up."""
    count = 0
    files = set()
    for shard in shards:
        if not (isinstance(shard, dict) and _is_count(shard.get("tensors")) and _is_count(shard.get("size"))
                and _is_hex(shard.get("checksum")) and shard.get("header_checksum", "0" * 16) is not None
                and _is_hex(shard.get("header_checksum", "0" * 16))):
            raise corrupt_index(directory, f"malformed shard record {short_repr(shard)}")
        file = format_spec.check_member_name(directory, shard.get("file"), "shard")
        if file in files:
            raise corrupt_index(directory, f"shard {file!r} is listed twice")
        files.add(file)
        count += shard["tensors"]
    if count != tensors:
        raise corrupt_index(directory, f"the shards hold {count} tensors but the table lists {tensors}")


def _check_aliases(directory: str, aliases: dict[str, Any], stored: set[str]) -> None:
    """Each alias names a stored tensor (a chunked one by its logical name), and is not one itself."""
    for alias, target in aliases.items():
        if not isinstance(target, str) or target not in stored or alias in stored:
            raise corrupt_index(directory, f"alias {short_repr(alias)} must name a stored tensor, not {short_repr(target)}")


def _is_count(value: Any) -> bool:
    return type(value) is int and 0 <= value <= format_spec.MAX_DIM


def _is_hex(value: Any) -> bool:
    return isinstance(value, str) and len(value) == format_spec.CHECKSUM_CHARS and _HEX16.fullmatch(value) is not None


_HEX16 = re.compile(r"[0-9a-f]{16}")


def _column(text: str, separator: str, n: int) -> tuple[list[str], list[str]]:
    """A column of the tensor table (``n`` entries joined by ``separator``), split, with equal
    strings shared: 20,000 tensors have a few dtypes and shapes; and its distinct entries. A column
    of one value repeated (every tensor of one dtype, the usual case) is told by one comparison,
    without 20,000 strings."""
    if not n:
        return ([], []) if not text else ([text], [text])  # entries without tensors: the length check reports it
    first = text.partition(separator)[0]
    if len(text) == n * (len(first) + 1) - 1 and text == separator.join(itertools.repeat(first, n)):
        return [first] * n, [first]
    seen: dict[str, str] = {}
    parts = text.split(separator)
    return list(map(seen.setdefault, parts, parts)), list(seen)


def _check_weight_map(directory: str, raw: dict[str, Any], names: list[str], shards: list[dict[str, Any]]) -> None:
    """The Hugging Face ``weight_map`` must map exactly the stored tensors to their shards.

    Once checked it is dropped from ``raw``: the tensor table says the same, and for 20,000 tensors
    the map's 40,000 strings would otherwise stay in memory for the whole restore.
    """
    weight_map = raw.pop(WEIGHT_MAP_KEY, None)
    if not isinstance(weight_map, dict):
        raise corrupt_index(directory, f"{WEIGHT_MAP_KEY!r} is missing")
    expected = dict(zip(names, file_of_each(shards)))
    if len(expected) == len(names) and weight_map == expected:  # compared in C; the walk below names a difference
        return
    position = 0
    for shard in shards:  # each entry is taken out as it is checked: what is left at the end is extra
        file = shard["file"]
        for name in names[position : position + shard["tensors"]]:
            found = weight_map.pop(name, None)
            if found is None:
                raise corrupt_index(directory, f"weight_map has no entry for {name!r}, or the tensor table lists it twice")
            if found != file:
                raise corrupt_index(directory, f"weight_map puts {name!r} in {found!r}, not {file!r}")
        position += shard["tensors"]
    if weight_map:
        raise corrupt_index(directory, f"weight_map lists tensors that no shard holds: {format_keys(weight_map)}")


def reused_record(section: dict[str, Any]) -> dict[str, Any] | None:
    """The ``reused`` record of an index's section (an incremental save's: what it reused from
    which checkpoint), checked, since an index is untrusted: None when absent or malformed. Only
    shown by the tools; nothing opens a file by it."""
    record = section.get(format_spec.REUSED_KEY)
    if not isinstance(record, dict) or not isinstance(record.get("base"), str):
        return None
    files = record.get("files")
    if not isinstance(files, dict) or not all(isinstance(k, str) and isinstance(v, str) for k, v in files.items()):
        return None
    return record
