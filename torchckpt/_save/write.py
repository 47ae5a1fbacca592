"""Writing a checkpoint directory: plan the shards, write them, write the index, commit.

Tensors (checked and deduplicated by ``_save.capture``) are grouped greedily into shards of at most
``max_shard_size`` bytes and written into the storage backend's stage, with ``index.json``
last; the backend's commit then makes the checkpoint visible in one step (rename on a local
filesystem, the index created last on an object store; see ``_storage.base``).

Why the bookkeeping is streamed: for 20,000 small tensors, a header and an index built as
Python objects and joined strings cost more memory than a tenth of the tensors themselves.
Headers are encoded in pieces, digests kept in an ``array``, and ``index.json`` written piece
by piece (see ``_format.document.RawJSON``). Reading is in ``_load.opened``.
"""

from __future__ import annotations

import array
import contextlib
import errno
import itertools
from collections.abc import Callable, Iterable, Iterator, Mapping
from typing import Any

import torch
import xxhash

from torchckpt import _tensorio
from torchckpt._format import blocks as format_blocks
from torchckpt._format import document as format_document
from torchckpt._format import dtypes as format_dtypes
from torchckpt._format import header as format_header
from torchckpt._format import index as format_index
from torchckpt._format import spec as format_spec
from torchckpt._format.dict_order import keep_dict_order
from torchckpt._format.spec import INDEX_FILE
from torchckpt._history import members as history_members
from torchckpt._paths import name_of
from torchckpt._progress import progress_bar
from torchckpt._save import plan as save_plan
from torchckpt._save import reuse as save_reuse
from torchckpt._storage.base import AlreadyCommitted, Output, Stage, Storage
from torchckpt.errors import CheckpointWriteError

_REPLACE_FIX = "write to another path"  # how a save that would replace someone's files is told to go on


def refuse_replacing_other(storage: Storage, path: str, replace: bool = True) -> None:
    """A save's check that what is at ``path`` is a checkpoint it may replace
    (``_history.members.refuse_replacing_other``: a ``CheckpointWriteError`` otherwise). For a save
    that replaces nothing (``replace=False``), someone's files there appeared while it was written:
    ``AlreadyCommitted``, as for a checkpoint that did."""
    try:
        history_members.refuse_replacing_other(path, storage, "this save", _REPLACE_FIX, files=True)
    except CheckpointWriteError as e:
        if replace or e.errno != errno.EEXIST:
            raise
        raise AlreadyCommitted(errno.EEXIST, f"something appeared there ({e})", path) from e


# -- writing ---------------------------------------------------------------------------------


def write_checkpoint(
    storage: Storage,
    path: str,
    stored: dict[str, torch.Tensor],
    aliases: dict[str, str],
    section: dict[str, Any],
    max_shard_size: int = format_spec.DEFAULT_MAX_SHARD_SIZE,
    progress: bool | None = None,
    replace: bool = True,
    base: str | None = None,
    groups: Mapping[str, int] | None = None,
    incremental: bool = False,
    after: Callable[[], Any] | None = None,
    warm_page_cache: bool = False,
    order: list[str] | None = None,
) -> str:
    """Write tensors and the ``torchckpt`` index section to the directory ``path``, atomically.

    The steps: plan the shards, write them into the backend's stage, write the index, commit
    (rename on a local filesystem, the index created last on an object store).

    Args:
        storage: where ``path`` is.
        path: the checkpoint directory to create (or, with ``replace``, replace).
        stored: name -> tensor, in save order, as returned by ``_save.capture.prepare_tensors``.
        aliases: alias name -> stored name, as returned by ``_save.capture.prepare_tensors``.
        section: extra keys for the index's ``torchckpt`` section (``state``, ``objects``, ...).
        max_shard_size: bytes per shard (``SaveOptions`` parses what a caller passed).
        progress: show a progress bar (None: on a terminal for large saves).
        replace: replace a checkpoint already at ``path``; without it, one there (even one that
            appears while this one is written) raises ``AlreadyCommitted`` and nothing changes.
        base: a committed checkpoint on ``storage`` whose identical shards are reused instead of
            written (see ``_save.reuse``); None writes every byte.
        groups: how likely each tensor changes before the next save (name -> group; see
            ``_save.plan.plan_shards``): frozen ones are planned into shards of their own.
        incremental: the next save will compare with this one: shards of frozen tensors are
            created to be read back soon (``Stage.create``'s ``keep_cached``).
        after: called once the checkpoint is committed (a manager's bookkeeping), before the
            stage settles (``Stage.settle``: background work for the next save).
        warm_page_cache: another process restores the checkpoint next: the stage settles by
            reading every file into the page cache (``Stage.settle(every_file=True)``).
        order: every tensor name (aliases too) in the order the tree was encoded: a dict whose
            tensors the shards store in another order gets their places marked
            (``_format.dict_order``); ``section["state"]`` is changed in place.

    Returns:
        ``path``.

    Raises:
        CheckpointWriteError: the system refused a write; it names the file and says what to do.
    """
    shards = save_plan.plan_shards(((n, t.numel() * t.element_size(), t.element_size()) for n, t in stored.items()),
                                   max_shard_size, groups)
    if order is not None:
        keep_dict_order(section["state"], order, itertools.chain((n for s in shards for n in s.names), aliases))
    try:
        reference = save_reuse.open_base(storage, base, 1) if base is not None else None
        stage = storage.stage(path, replace)  # what is at ``path`` was checked at the call (``_save.saver``)
        files = [stage.member(format_spec.shard_name(i, len(shards))) for i in range(1, len(shards) + 1)]
        try:
            checked = save_reuse.Checked() if incremental else None
            with progress_bar(sum(s.nbytes for s in shards), f"save {name_of(path)}", progress) as bar:
                records, digests = write_shards(stage, shards, files, stored, bar.update, base=reference,
                                                keep_cached=incremental, checked=checked)
            reused = reference.section(path) if reference is not None else None
            if reused is not None:
                section = {**section, format_spec.REUSED_KEY: reused}
            index = _index_of(shards, files, stored, aliases, section, records, digests)
            stage.write_index(INDEX_FILE, format_index.sealed_index(index, path, len(stored)))
            # again, also where nothing was to be replaced: on an object store the save writes into the
            # prefix itself, and a file someone put there since the call must not end up in a checkpoint
            refuse_replacing_other(storage, path, replace)
            stage.commit({r["file"]: r["size"] for r in records})
        except BaseException:
            stage.discard()
            raise
    except OSError as e:
        if isinstance(e, (CheckpointWriteError, AlreadyCommitted)):
            raise
        raise CheckpointWriteError(storage.describe_write_failure(path, e), path, e) from e
    known: set[str] = set()
    try:
        if after is not None:
            after()
    finally:
        if checked is not None:  # after retention, whose deletions of other links move the files' change time
            with contextlib.suppress(OSError):  # a file not remembered is read back next time: never this save's outcome
                known = checked.keep(storage, path)
        with contextlib.suppress(Exception):  # background work for the next save: never this one's outcome
            stage.settle(() if warm_page_cache else known, every_file=warm_page_cache)
    return path


def write_shards(stage: Stage, shards: list[save_plan.Shard], files: list[str], stored: dict[str, torch.Tensor],
                 on_bytes: Callable[[int], None], blocks: array.array[int] | None = None,
                 base: save_reuse.Base | None = None, keep_cached: bool = False,
                 checked: save_reuse.Checked | None = None,
                 ) -> tuple[list[dict[str, Any]], list[array.array[int]]]:
    """Write every shard into the stage; returns their records and per-tensor digests. With
    ``blocks``, every tensor's block checksums (format 3, see ``_format.blocks``) are appended to it in
    file order. With ``base``, a shard the base holds byte for byte is placed from it instead
    (``_save.reuse``); with ``keep_cached``, shards of frozen tensors are created to be read back
    by the next save (``Stage.create``). ``checked`` collects the stamps of the files written or
    placed, for the caller to keep once the checkpoint is committed (``_save.reuse.Checked``)."""
    digests: list[array.array[int]] = []  # per shard, per tensor: 8 bytes each, not an int object
    records: list[dict[str, Any]] = []
    for shard, file in zip(shards, files):
        header = format_header.encode_header_pieces((n, t.dtype, t.shape, t.nbytes) for n in shard.names
                                                    for t in (stored[n],))
        tensors = [stored[n] for n in shard.names]
        if base is not None:
            block_bytes = format_blocks.BLOCK_BYTES if blocks is not None else 0
            reused = save_reuse.reuse_shard(stage, base, file, shard.names, tensors, b"".join(header), block_bytes,
                                            checked)
            if reused is not None:
                size = sum(map(len, header)) + shard.nbytes
                records.append(_record(file, size, _header_hash(header), reused.digests, len(tensors)))
                digests.append(reused.digests)
                if blocks is not None:
                    blocks.extend(reused.blocks)
                on_bytes(shard.nbytes)
                continue

        def write_data(out: Output, tensors: list[torch.Tensor] = tensors) -> array.array[int]:
            return _tensorio.write_tensors(out, tensors, on_bytes, blocks)

        record, shard_digests = _write_shard(stage, file, header, shard.nbytes, len(tensors), write_data,
                                             keep_cached and shard.stable)
        if checked is not None:
            checked.add(file, stage.stamp(file), record["header_checksum"], shard_digests)
        digests.append(shard_digests)
        records.append(record)
    return records, digests


def _index_of(shards: list[save_plan.Shard], files: list[str], stored: dict[str, torch.Tensor], aliases: dict[str, str],
              section: dict[str, Any], records: list[dict[str, Any]], digests: list[array.array[int]]) -> dict[str, Any]:
    """The index, with its large tables as streamed pieces (see ``_format.document.RawJSON``)."""
    weight_map: Any = format_document.RawJSON(lambda: _weight_map_pieces(shards, files))
    if sum(len(shard.names) for shard in shards) <= format_spec.LAYOUT_MAX_LINES:  # small: one name a line
        weight_map = {n: file for shard, file in zip(shards, files) for n in shard.names}
    return format_index.index_document(sum(s.nbytes for s in shards), weight_map, format_spec.PLAIN_FORMAT_VERSION, section,
                          aliases, records, format_document.RawJSON(lambda: _table_pieces(shards, stored, digests)))


_PIECE = 1024  # names per piece of the streamed index


def _weight_map_pieces(shards: list[save_plan.Shard], files: list[str]) -> Iterator[str]:
    """``weight_map`` as compact JSON, a thousand names a piece (the same text as ``json.dumps``)."""
    quote = format_document.json_string
    yield "{"
    separator = ""
    for shard, file in zip(shards, files):
        value = quote(file)
        names = shard.names
        for i in range(0, len(names), _PIECE):
            yield separator + ", ".join([f"{quote(n)}: {value}" for n in names[i : i + _PIECE]])
            separator = ", "
    yield "}"


def _table_pieces(shards: list[save_plan.Shard], stored: dict[str, torch.Tensor],
                  digests: list[array.array[int]]) -> Iterator[str]:
    """The index's tensor table (names, dtypes, shapes, checksums) as compact JSON, in pieces."""
    names = [n for shard in shards for n in shard.names]
    quote = format_document.json_string
    dtype_names = format_dtypes.DTYPE_NAMES
    yield '{"names": ['
    yield from _joined(names, ", ", quote)
    yield '], "dtypes": "'
    yield from _joined(names, format_spec.DTYPE_SEP, lambda n: dtype_names[stored[n].dtype])
    yield '", "shapes": "'
    yield from _joined(names, format_spec.SHAPE_SEP, lambda n: format_dtypes.shape_key(tuple(stored[n].shape)))
    yield '", "checksums": "'
    for shard_digests in digests:
        for i in range(0, len(shard_digests), _PIECE):
            yield format_index.big_endian(shard_digests[i : i + _PIECE]).hex()
    yield '"}'


def _joined(names: list[str], separator: str, render: Callable[[str], str]) -> Iterator[str]:
    """``separator.join(map(render, names))`` in pieces of ``_PIECE`` names."""
    for i in range(0, len(names), _PIECE):
        yield (separator if i else "") + separator.join([render(n) for n in names[i : i + _PIECE]])


STREAM_BYTES = 16 * 2**20  # how much of a streamed tensor is in memory at once


def stream_shard(stage: Stage, file: str, entries: list[tuple[str, torch.dtype, tuple[int, ...], int]],
                 sources: list[str], read: Callable[[str, int], Iterable[bytes]],
                 on_bytes: Callable[[int], None]) -> tuple[dict[str, Any], array.array[int]]:
    """Write one shard of ``entries`` (name, dtype, shape, bytes) whose bytes are not in memory:
    tensor ``i`` comes from ``read(sources[i], STREAM_BYTES)`` piece by piece (a reader's
    ``iter_bytes``), so a tool that rewrites a checkpoint holds one piece whatever the tensor's size.
    Returns the shard's index record and its per-tensor xxh3-64 digests, as :func:`write_shards` does."""
    def write_data(out: Output) -> array.array[int]:
        digests: array.array[int] = array.array("Q")
        for source in sources:
            tensor_hash = xxhash.xxh3_64()
            for piece in read(source, STREAM_BYTES):
                tensor_hash.update(piece)
                out.write([memoryview(piece)])
                on_bytes(len(piece))
            digests.append(tensor_hash.intdigest())
        return digests

    header = format_header.encode_header_pieces(entries)
    return _write_shard(stage, file, header, sum(n for *_, n in entries), len(entries), write_data)


def _write_shard(stage: Stage, file: str, header: list[bytes], data_bytes: int, count: int,
                 write_data: Callable[[Output], array.array[int]], keep_cached: bool = False,
                 ) -> tuple[dict[str, Any], array.array[int]]:
    """One shard file: its header, then the tensors ``write_data`` writes (returning their digests).
    Returns the shard's index record (its checksum covers the header and the tensors' digests) and
    the digests."""
    shard_hash = _header_hash(header)
    size = sum(map(len, header)) + data_bytes
    with stage.create(file, size, keep_cached) as out:
        out.write([memoryview(piece) for piece in header])
        header.clear()  # a 20,000-tensor header is megabytes: do not hold it while writing data
        digests = write_data(out)
        out.finish()
    return _record(file, size, shard_hash, digests, count), digests


def _header_hash(header: list[bytes]) -> Any:
    shard_hash = xxhash.xxh3_64()
    for piece in header:
        shard_hash.update(piece)
    return shard_hash


def _record(file: str, size: int, shard_hash: Any, digests: array.array[int], count: int) -> dict[str, Any]:
    """A shard's index record: its checksum continues the header's hash over the tensors' digests."""
    header_checksum = shard_hash.hexdigest()
    shard_hash.update(format_index.big_endian(digests))
    return {"file": file, "size": size, "checksum": f"{shard_hash.intdigest():016x}",
            "header_checksum": header_checksum, "tensors": count}
