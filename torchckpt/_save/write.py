"""Writing a checkpoint directory: plan the shards, write them, write the index, commit.

Tensors (checked and deduplicated by ``_capture``) are grouped greedily into shards of at most
``max_shard_size`` bytes and written into the storage backend's stage, with ``index.json``
last; the backend's commit then makes the checkpoint visible in one step (rename on a local
filesystem, the index created last on an object store; see ``_backend``).

Why the bookkeeping is streamed: for 20,000 small tensors, a header and an index built as
Python objects and joined strings cost more memory than a tenth of the tensors themselves.
Headers are encoded in pieces, digests kept in an ``array``, and ``index.json`` written piece
by piece (see ``_format.RawJSON``). Reading is in ``_index``.
"""

from __future__ import annotations

import array
import sys
import time
from collections.abc import Callable, Iterator
from dataclasses import dataclass, field
from typing import Any

import torch
import xxhash

from torchckpt import _tensorio
from torchckpt._format import spec as format_spec
from torchckpt._format.spec import INDEX_FILE
from torchckpt._progress import progress_bar
from torchckpt._storage.base import AlreadyCommitted, Stage, Storage, name_of
from torchckpt._storage.registry import storage_for
from torchckpt._version import __version__
from torchckpt.errors import CheckpointWriteError

# -- writing ---------------------------------------------------------------------------------


@dataclass
class Shard:
    names: list[str] = field(default_factory=list)
    nbytes: int = 0


def plan_shards(tensors: dict[str, torch.Tensor], max_shard_size: int) -> list[Shard]:
    """Greedy grouping in save order; a single tensor over the limit gets a shard of its own."""
    shards: list[Shard] = []
    current = Shard()
    for name, t in tensors.items():
        n = t.numel() * t.element_size()
        if current.names and current.nbytes + n > max_shard_size:
            shards.append(current)
            current = Shard()
        current.names.append(name)
        current.nbytes += n
    if current.names or not shards:
        shards.append(current)
    for shard in shards:  # widest elements first keeps every tensor aligned to its element size
        shard.names.sort(key=lambda k: -tensors[k].element_size())
    return shards


def write_checkpoint(
    path: str,
    stored: dict[str, torch.Tensor],
    aliases: dict[str, str],
    section: dict[str, Any],
    max_shard_size: int | str = format_spec.DEFAULT_MAX_SHARD_SIZE,
    progress: bool | None = None,
    before_commit: Callable[[str], None] | None = None,
    replace: bool = True,
    *,
    storage: Storage | None = None,
) -> str:
    """Write tensors and the ``torchckpt`` index section to the directory ``path``, atomically.

    The steps: plan the shards, write them into the backend's stage, write the index, commit
    (rename on a local filesystem, the index created last on an object store).

    Args:
        path: the checkpoint directory to create (or, with ``replace``, replace).
        stored: name -> tensor, in save order, as returned by ``_capture.prepare_tensors``.
        aliases: alias name -> stored name, as returned by ``_capture.prepare_tensors``.
        section: extra keys for the index's ``torchckpt`` section (``state``, ``objects``, ...).
        max_shard_size: bytes per shard (int), or a string such as ``"2GB"`` (see ``parse_size``).
        progress: show a progress bar (None: on a terminal for large saves).
        before_commit: called with the stage's path just before the commit (tests use it to
            inject faults).
        replace: replace a checkpoint already at ``path``; without it, one there (even one that
            appears while this one is written) raises ``AlreadyCommitted`` and nothing changes.
        storage: where ``path`` is (by default, the storage its form names).

    Returns:
        ``path``.

    Raises:
        CheckpointWriteError: the system refused a write; it names the file and says what to do.
    """
    storage = storage or storage_for(path)
    try:
        return _write_checkpoint(storage, path, stored, aliases, section, max_shard_size, progress, before_commit,
                                 replace)
    except OSError as e:
        if isinstance(e, (CheckpointWriteError, AlreadyCommitted)):
            raise
        raise CheckpointWriteError(storage.describe_write_failure(path, e), path, e) from e


def _write_checkpoint(
    storage: Storage,
    path: str,
    stored: dict[str, torch.Tensor],
    aliases: dict[str, str],
    section: dict[str, Any],
    max_shard_size: int | str,
    progress: bool | None,
    before_commit: Callable[[str], None] | None,
    replace: bool,
) -> str:
    shards = plan_shards(stored, format_spec.parse_size(max_shard_size))
    stage = storage.stage(path, replace)
    files = [stage.member(format_spec.shard_name(i, len(shards))) for i in range(1, len(shards) + 1)]
    try:
        total = sum(s.nbytes for s in shards)
        with progress_bar(total, f"save {name_of(path)}", progress) as bar:
            records, digests = write_shards(stage, shards, files, stored, bar.update)
        index = _index_of(shards, files, stored, aliases, section, records, digests)
        stage.write_index(INDEX_FILE, format_spec.sealed_pieces(index))
        if before_commit is not None:
            before_commit(stage.path)
        stage.commit({r["file"]: r["size"] for r in records})
    except BaseException:
        stage.discard()
        raise
    return path


def write_shards(stage: Stage, shards: list[Shard], files: list[str], stored: dict[str, torch.Tensor],
                 on_bytes: Callable[[int], None], blocks: array.array[int] | None = None,
                 ) -> tuple[list[dict[str, Any]], list[array.array[int]]]:
    """Write every shard into the stage; returns their records and per-tensor digests. With
    ``blocks``, every tensor's block checksums (format 3, see ``_blocks``) are appended to it in
    file order."""
    digests: list[array.array[int]] = []  # per shard, per tensor: 8 bytes each, not an int object
    records: list[dict[str, Any]] = []
    for shard, file in zip(shards, files):
        header = format_spec.encode_header_pieces((n, t.dtype, t.shape, t.nbytes) for n in shard.names
                                              for t in (stored[n],))
        size = sum(map(len, header)) + shard.nbytes
        shard_hash = xxhash.xxh3_64()
        for piece in header:
            shard_hash.update(piece)
        header_checksum = shard_hash.hexdigest()
        with stage.create(file, size) as out:
            out.write([memoryview(piece) for piece in header])
            del header  # a 20,000-tensor header is megabytes: do not hold it while writing data
            shard_digests = _tensorio.write_tensors(out, [stored[n] for n in shard.names], on_bytes, blocks)
            out.finish()
        shard_hash.update(big_endian(shard_digests))
        digests.append(shard_digests)
        records.append({
            "file": file,
            "size": size,
            "checksum": f"{shard_hash.intdigest():016x}",
            "header_checksum": header_checksum,
            "tensors": len(shard.names),
        })
    return records, digests


def _index_of(shards: list[Shard], files: list[str], stored: dict[str, torch.Tensor], aliases: dict[str, str],
              section: dict[str, Any], records: list[dict[str, Any]], digests: list[array.array[int]]) -> dict[str, Any]:
    """The index, with its large tables as streamed pieces (see ``_format.RawJSON``)."""
    weight_map: Any = format_spec.RawJSON(lambda: _weight_map_pieces(shards, files))
    if sum(len(shard.names) for shard in shards) <= format_spec.LAYOUT_MAX_LINES:  # small: one name a line
        weight_map = {n: file for shard, file in zip(shards, files) for n in shard.names}
    return index_document(sum(s.nbytes for s in shards), weight_map, format_spec.PLAIN_FORMAT_VERSION, section,
                          aliases, records, format_spec.RawJSON(lambda: _table_pieces(shards, stored, digests)))


def index_document(total_size: int, weight_map: Any, format_version: int, section: dict[str, Any],
                   aliases: dict[str, str], records: list[dict[str, Any]], table: Any) -> dict[str, Any]:
    """``index.json`` as a value, its keys in the order every writer uses (see ``docs/format.md``)."""
    return {
        "metadata": {"total_size": total_size},
        "weight_map": weight_map,
        format_spec.TORCHCKPT_KEY: {
            "format_version": format_version,
            "created": time.time(),
            "torch_version": torch.__version__,
            "torchckpt_version": _version(),
            "checksum_algorithm": format_spec.CHECKSUM_ALGORITHM,
            **section,
            "aliases": aliases,
            "shards": records,
            "tensors": table,
        },
    }


_PIECE = 1024  # names per piece of the streamed index


def big_endian(values: array.array[int]) -> bytes:
    """Unsigned 64-bit ints as 8-byte big-endian integers, back to back (how checksums are hashed and written)."""
    if sys.byteorder == "little":
        values = array.array("Q", values)
        values.byteswap()
    return values.tobytes()


def _weight_map_pieces(shards: list[Shard], files: list[str]) -> Iterator[str]:
    """``weight_map`` as compact JSON, a thousand names a piece (the same text as ``json.dumps``)."""
    quote = format_spec.json_string
    yield "{"
    separator = ""
    for shard, file in zip(shards, files):
        value = quote(file)
        names = shard.names
        for i in range(0, len(names), _PIECE):
            yield separator + ", ".join([f"{quote(n)}: {value}" for n in names[i : i + _PIECE]])
            separator = ", "
    yield "}"


def _table_pieces(shards: list[Shard], stored: dict[str, torch.Tensor],
                  digests: list[array.array[int]]) -> Iterator[str]:
    """The index's tensor table (names, dtypes, shapes, checksums) as compact JSON, in pieces."""
    names = [n for shard in shards for n in shard.names]
    quote = format_spec.json_string
    dtype_names = format_spec.DTYPE_NAMES
    yield '{"names": ['
    yield from _joined(names, ", ", quote)
    yield '], "dtypes": "'
    yield from _joined(names, format_spec.DTYPE_SEP, lambda n: dtype_names[stored[n].dtype])
    yield '", "shapes": "'
    yield from _joined(names, format_spec.SHAPE_SEP, lambda n: format_spec.shape_key(tuple(stored[n].shape)))
    yield '", "checksums": "'
    for shard_digests in digests:
        for i in range(0, len(shard_digests), _PIECE):
            yield big_endian(shard_digests[i : i + _PIECE]).hex()
    yield '"}'


def _joined(names: list[str], separator: str, render: Callable[[str], str]) -> Iterator[str]:
    """``separator.join(map(render, names))`` in pieces of ``_PIECE`` names."""
    for i in range(0, len(names), _PIECE):
        yield (separator if i else "") + separator.join([render(n) for n in names[i : i + _PIECE]])


def _version() -> str:
    return __version__
