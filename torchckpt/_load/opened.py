"""Opening a committed checkpoint for reading: ``index.json``, the shards, their headers, the tree.

:func:`load_index` reads and checks ``index.json`` only (what the lazy inspector needs);
:class:`OpenShards` opens every shard before any is read (one of many ranks: each one it reads,
before reading it); :func:`read_shard_headers` then
validates every shard header against the index (what a restore needs before it touches any
object), or, for a restore by one of many ranks, only the headers of the shards it reads, before
it reads them (:meth:`OpenShards.check`); :func:`state_tree` rebuilds the non-tensor state with
each tensor's place filled in.

Why the I/O is here and the parsing is not: ``_format`` parses the index and the headers from
bytes, so one parser serves a local file, a ranged GET and a test; this module is the edge that
asks a :class:`Storage` for those bytes and turns its failures into the checkpoint errors they mean.
"""

from __future__ import annotations

import contextlib
import errno
import functools
import itertools
from collections.abc import Callable, Iterable, Iterator
from typing import Any, NamedTuple

import xxhash

from torchckpt._format import dtypes as format_dtypes
from torchckpt._format import header as format_header
from torchckpt._format import index as format_index
from torchckpt._format import per_rank as format_per_rank
from torchckpt._format import tree as format_tree
from torchckpt._format.dtypes import TensorInfo
from torchckpt._format.index import Index
from torchckpt._format.spec import (
    HEADER_ALIGNMENT,
    INDEX_FILE,
    MAX_INDEX_SIZE,
    SHARDED_FORMAT_VERSION,
    TORCHCKPT_KEY,
)
from torchckpt._load import index_fields
from torchckpt._load.sources import ShardSources
from torchckpt._paths import join
from torchckpt._storage import trusted as storage_trusted
from torchckpt._storage.base import Source, Storage
from torchckpt.errors import (
    CheckpointDeletedError,
    CheckpointError,
    CheckpointNotFoundError,
    CheckpointReadError,
    CorruptCheckpointError,
    format_keys,
    shard_missing,
    shard_size_mismatch,
    unreadable,
)


def load_index(directory: str, storage: Storage, defer_weight_map: bool = False) -> Index:
    """Read and check ``DIRECTORY/index.json`` on ``storage``: its seal, then every field a reader uses
    (with ``defer_weight_map``, the Hugging Face ``weight_map`` later: see ``parse_index``).

    Raises:
        CheckpointNotFoundError: there is no committed checkpoint at ``directory``.
        CorruptCheckpointError: the index is damaged, malformed, hostile, or from an unknown format
            version; ``.path`` is the checkpoint directory.
    """
    try:
        return format_index.parse_index(directory, _read_index(directory, storage), defer_weight_map)
    except CorruptCheckpointError as e:
        if e.path is None:
            e.path = directory
        raise


def _read_index(directory: str, storage: Storage) -> bytes:
    path = join(directory, INDEX_FILE)
    try:
        return storage.read_file(path, MAX_INDEX_SIZE, "Index")
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
        error = unreadable(path, e, what="the index")
        error.path = directory if isinstance(error, CorruptCheckpointError) else path
        raise error from e


class OpenShards:
    """The shards of a checkpoint, each opened before any byte of it is read: every one at once, or
    (``lazy``, a rank of a collective restore) each when first asked for.

    On a local filesystem, holding the descriptors pins the checkpoint's bytes: a manager's
    retention may delete the directory meanwhile (a validation process reading while training
    saves), and the reads still see every byte they planned on. Only a deletion before a shard is
    open is noticed, as :class:`CheckpointDeletedError`. An object store has no such pin: a
    shard deleted during the read is a :class:`CheckpointDeletedError` when it is read.

    Why ``lazy`` for one of many ranks: such a rank reads a few of the job's shards, and it opens
    them when it checks their headers, at the end of its planning, before any rank reads. Opening
    every shard on every rank made a job of N ranks open N times as many files as it reads: a
    million opens on a shared file system for a checkpoint of 1,024 ranks restored by 1,024.

    A shard found damaged while they are open (a :class:`CorruptCheckpointError` naming it leaves
    the block) is no longer trusted by its stamp (:func:`distrust_damaged`).

    More shards than this process may hold open (past the hard limit on open files, which
    ``_storage.files.allow_more_open_files`` raises the soft limit toward): the shards are then
    held open a bounded number at a time, a third as many as could be opened (the rest is left to
    the reads' own descriptors and maps), each opened again when read again
    (``_load.sources.ShardSources``). The restore still works; a deletion meanwhile is noticed when
    a shard is opened again (as on an object store), and so is a shard that is another file than
    the one first opened and checked.
    """

    def __init__(self, index: Index, storage: Storage, lazy: bool = False) -> None:
        self.directory = index.directory
        self.storage = storage
        self.seal = index.seal  # which checkpoint at this path the plan was made for (_load.recheck)
        self.blocks = index.blocks  # format 3's block checksums, for reads of part of a tensor
        self.unchecked: dict[str, Callable[[], None]] = {}  # file -> the check of its header, not yet made
        self.files = [shard["file"] for shard in index.shards]
        self.sources = ShardSources(self._open, self.files)
        if lazy:
            return
        try:
            self.sources.open_all()
        except CheckpointReadError as e:
            opened = len(self.sources)
            self.close()
            if e.errno != errno.EMFILE or opened < 2:
                raise
            self.sources = ShardSources(self._open, self.files, limit=max(1, opened // 3))
        except BaseException:
            self.close()
            raise

    def _open(self, file: str) -> Source:
        path = join(self.directory, file)
        try:
            return self.storage.open(path, "Shard")
        except FileNotFoundError:
            raise missing_member(self.directory, path, self.storage) from None
        except OSError as e:
            raise unreadable(path, e, "open") from e

    def path(self, file: str) -> str:
        return join(self.directory, file)

    @property
    def pinned(self) -> bool:
        """Whether the shards open now are files this process holds (a local disk), which a
        checkpoint committed at the same path since would not change: then a read checks, once they
        are open, that they are the index's (``recheck.confirm_unchanged``). An object store reads
        each object by its name, and a save's objects have names of their own there."""
        return any(source.identity is not None for source in self.sources.values())

    def check(self, files: Iterable[str] | None = None) -> None:
        """Validate the headers of ``files`` (None: every shard) that :func:`read_shard_headers`
        left to check: call it before reading them.

        Raises:
            CorruptCheckpointError: a header disagrees with the index.
        """
        for file in list(self.unchecked) if files is None else files:
            check = self.unchecked.get(file)
            if check is not None:
                check()  # left in place when it fails: a later read of the shard fails again
                del self.unchecked[file]

    def close(self) -> None:
        self.sources.close()

    def __enter__(self) -> OpenShards:
        return self

    def __exit__(self, kind: object, error: BaseException | None, traceback: object) -> None:
        try:
            if error is not None:
                distrust_damaged(self.storage, error, {self.path(f) for f in self.files})
        finally:
            self.close()


def distrust_damaged(storage: Storage, error: BaseException | None, paths: set[str] | None = None) -> None:
    """Stop trusting the stamp of each file that ``error`` reports damaged, among ``paths`` (None:
    any), so that a later save of this process reads it back before reusing it
    (``_storage.trusted``): the file of a :class:`CorruptCheckpointError`, of the errors it chains
    (the one this rank found, under the error every rank raises), and every file another rank found
    damaged (the collective error's ``damaged_paths``). Never raises: ``error`` goes on as it was."""
    named: list[str] = []
    seen: set[int] = set()
    while error is not None and id(error) not in seen:
        seen.add(id(error))
        if isinstance(error, CorruptCheckpointError) and error.path is not None:
            named.append(error.path)
        named.extend(getattr(error, "damaged_paths", ()))
        error = error.__cause__ or error.__context__
    for path in named:
        if paths is None or path in paths:
            forget_stamp(storage, path)


def forget_stamp(storage: Storage, path: str) -> None:
    """This process no longer trusts the file at ``path`` by its stamp (``_storage.trusted``)."""
    with contextlib.suppress(Exception):  # a storage that cannot stamp it: there is nothing trusted to drop
        storage_trusted.forget(storage.stamp(path))


@contextlib.contextmanager
def distrusting(storage: Storage, path: str | None = None) -> Iterator[None]:
    """A read whose failure makes this process distrust the file, then goes on: the file a
    :class:`CorruptCheckpointError` names, or ``path`` on an ``OSError`` (``EIO`` from a bad sector)."""
    try:
        yield
    except CorruptCheckpointError as e:
        distrust_damaged(storage, e)
        raise
    except OSError:
        if path is not None:
            forget_stamp(storage, path)
        raise


def missing_member(directory: str, path: str, storage: Storage) -> CheckpointError:
    """The error for a shard that is not there: the checkpoint was deleted, or is corrupt."""
    if not storage.exists(join(directory, INDEX_FILE)):
        return deleted_meanwhile(directory)
    return CorruptCheckpointError(shard_missing(path, INDEX_FILE), path)


def deleted_meanwhile(directory: str) -> CheckpointDeletedError:
    """The error for a checkpoint deleted since its index was read."""
    return CheckpointDeletedError(
        f"Checkpoint {directory} was deleted while it was being read (a manager's max_to_keep, usually); "
        "read a newer checkpoint.",
        directory,
    )


def read_header(source: Source, file_name: str) -> tuple[list[TensorInfo], dict[str, str], int]:
    """Read, parse and validate the safetensors header of the open file ``source``.

    Returns:
        The tensors in file order, the ``__metadata__`` dict, and the file's size in bytes.

    Raises:
        CorruptCheckpointError: not a well-formed safetensors file, or unreadable.
    """
    path, size = source.path, source.size
    try:
        n = format_header.header_length(source.read(0, format_header.PREFIX_BYTES), path, size)
        raw = source.read(format_header.PREFIX_BYTES, n)
    except OSError as e:
        raise unreadable(path, e) from e
    if len(raw) < n:
        raise CorruptCheckpointError(f"{path} is truncated: it ended inside its header.", path)
    return (*format_header.parse_header(raw, path, file_name, size), size)


def read_shard_headers(index: Index, shards: OpenShards, trust_header_checksums: bool = True,
                       deferred: bool = False) -> dict[str, TensorInfo]:
    """Validate every shard against the index; return stored name -> location (aliases resolved).

    Every shard's header must describe exactly the index's tensors for it, in the table's order,
    with the table's dtypes and shapes: then the table's offsets and the header's are the same
    bytes, whichever a reader uses. With ``trust_header_checksums`` a shard whose header hashes
    to its recorded checksum skips the full parse (see :func:`_exact_header`); ``verify`` parses
    every header.

    With ``deferred`` (a rank of a collective restore, which reads a few of the job's shards), each
    location comes from the table and the header's length alone (its first 8 bytes), and the
    header's check waits in ``shards.unchecked`` until :meth:`OpenShards.check` is called for the
    shard, before it is read: a rank never parses the headers of shards it does not read.

    Raises:
        CorruptCheckpointError: a shard is truncated, resized or disagrees with the index.
    """
    infos: dict[str, TensorInfo] = {}
    position = 0
    try:
        checksums = format_dtypes.parse_checksums(index.checksum_text)
    except ValueError as e:
        raise format_index.corrupt_index(index.directory, f"the tensor table's checksums are malformed ({e})") from None
    for shard in index.shards:
        file, count = shard["file"], shard["tensors"]
        path = shards.path(file)
        damaged = functools.partial(forget_stamp, shards.storage, path)
        found = None
        if deferred:
            found = _recorded_infos(index, shard, position, checksums)
            if found is not None:  # the check keeps this shard's columns only, not the index
                end = position + count
                columns = _Columns(index.names[position:end], index.dtypes[position:end], index.shapes[position:end])
                shards.unchecked[file] = functools.partial(_check_deferred, columns, shard, checksums[position:end],
                                                           shards.sources, file, path, found, trust_header_checksums,
                                                           damaged)
        elif trust_header_checksums:
            found = _exact_header(index, shard, position, checksums, shards.sources[file], damaged)
        if found is None:
            found = _parsed_header(index, shard, position, checksums, shards.sources[file], path)
        infos.update(zip(index.names[position : position + count], found))
        position += count
    for alias, target in index.aliases.items():
        if target in infos:  # in format 2 a target may be a chunked tensor, resolved by its logical name
            infos[alias] = infos[target]
    return infos


def _parsed_header(index: Index | _Columns, shard: dict[str, Any], position: int, checksums: tuple[int, ...],
                   source: Source, path: str) -> list[TensorInfo]:
    """The shard's tensors in table order, from its fully parsed and validated header."""
    file, count = shard["file"], shard["tensors"]
    found, _, size = read_header(source, file)
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
        if index.dtypes[j] != info.dtype_name or format_dtypes.dims_of(index.shapes[j], where) != info.dims:
            raise CorruptCheckpointError(
                f"Tensor {name!r}: {INDEX_FILE} says {index.dtypes[j]} [{index.shapes[j]}] but shard {file} "
                f"holds {info.dtype_name} {list(info.dims)}.",
                path,
            )
        out.append(info._replace(checksum=checksums[j]))
    return out


def _exact_header(index: Index | _Columns, shard: dict[str, Any], position: int, checksums: tuple[int, ...],
                  source: Source, damaged: Callable[[], None]) -> list[TensorInfo] | None:
    """The shard's tensors when its header is the one written for this index's table, else None.

    The writer encodes each header from the table (``_format.header.encode_header_pieces``) and
    records its xxh3-64. When the file starts with exactly the bytes the table encodes to, hashing
    to the recorded checksum, and has the recorded size, the header lists the table's names, dtypes
    and shapes in its order, so the offsets follow from the table without parsing thousands of JSON
    entries. Comparing with the table's own encoding, not only with the recorded checksum, matters:
    an index rewritten and resealed (a chunk's name given to another chunk's bytes) leaves the
    header unchanged. Anything else (an index without header checksums, another writer, a
    tampered file or index) goes through the full validating parser. A file whose header differs
    from the one the table encodes to and its recorded checksum seals was changed after it was
    written: ``damaged`` is called (the file is no longer trusted by its stamp), even where the
    full parse accepts it.
    """
    recorded = shard.get("header_checksum")
    if not isinstance(recorded, str) or source.size != shard["size"]:
        return None
    names, dts, shapes, sizes = _columns(index, position, shard["tensors"])
    try:
        expected = b"".join(format_header.encode_header_pieces(zip(names, dts, shapes, sizes)))
    except ValueError:  # over the header size limit: not a header this writer wrote
        return None
    if len(expected) + sum(sizes) != source.size or xxhash.xxh3_64_hexdigest(expected) != recorded:
        return None
    view, offset = memoryview(expected), 0
    while offset < len(expected):  # a 20,000-tensor header is megabytes: compared a bounded piece at a time
        piece = source.read(offset, min(len(expected) - offset, _HEADER_CHUNK))
        if not piece or view[offset : offset + len(piece)] != piece:
            damaged()
            return None
        offset += len(piece)
    return _placed(shard, position, checksums, len(expected), (names, dts, shapes, sizes))


def _recorded_infos(index: Index, shard: dict[str, Any], position: int,
                    checksums: tuple[int, ...]) -> list[TensorInfo] | None:
    """The shard's tensors as the table places them, back to back up to the end of a file of the
    size the shard's record gives, without opening it; None when that size leaves no room for a
    header of the form safetensors writes (it is opened and checked now, for the full message).
    The header's check, before the shard is read, finds a file that differs (``_check_deferred``)."""
    columns = _columns(index, position, shard["tensors"])
    data_start = shard["size"] - sum(columns[3])
    if data_start < format_header.PREFIX_BYTES + 2 or data_start % HEADER_ALIGNMENT:
        return None
    return _placed(shard, position, checksums, data_start, columns)


def _columns(index: Index | _Columns, position: int, count: int) -> tuple[list[str], list[str], list[Any], list[int]]:
    """The names, dtypes (safetensors names, checked by parse_index), dims and byte sizes of the
    table's ``count`` tensors from ``position``."""
    end = position + count
    dts = index.dtypes[position:end]
    shapes = list(map(format_dtypes.dims_of, index.shapes[position:end]))
    return index.names[position:end], dts, shapes, list(map(format_dtypes.nbytes_of, shapes, dts))


def _placed(shard: dict[str, Any], position: int, checksums: tuple[int, ...], data_start: int,
            columns: tuple[list[str], list[str], list[Any], list[int]]) -> list[TensorInfo]:
    """The shard's tensors laid back to back from ``data_start``, as the table lists them. Built by
    C-level calls only: 20,000 tensors take a few milliseconds."""
    names, dts, shapes, sizes = columns
    starts = itertools.accumulate(sizes, initial=data_start)
    return list(map(_NEW_INFO, zip(names, itertools.repeat(shard["file"]), dts, shapes, starts, sizes,
                                   checksums[position : position + len(names)])))


class _Columns(NamedTuple):
    """The tensor table's columns for one shard (an :class:`Index`'s, sliced)."""

    names: list[str]
    dtypes: list[str]
    shapes: list[str]


def _check_deferred(columns: _Columns, shard: dict[str, Any], checksums: tuple[int, ...], sources: ShardSources,
                    file: str, path: str, assumed: list[TensorInfo], trust_header_checksums: bool,
                    damaged: Callable[[], None]) -> None:
    """The deferred check of a shard whose locations :func:`_recorded_infos` took from the table
    (the shard opened now, if it is not yet): its header validated as :func:`read_shard_headers`
    validates it, placing every tensor there."""
    source = sources[file]
    found = _exact_header(columns, shard, 0, checksums, source, damaged) if trust_header_checksums else None
    if found is None:
        found = _parsed_header(columns, shard, 0, checksums, source, path)
    if found != assumed:
        raise CorruptCheckpointError(
            f"Shard {path}'s header does not place its tensors where {INDEX_FILE}'s tensor table does.", path)


_HEADER_CHUNK = 2**20
_NEW_INFO = functools.partial(tuple.__new__, TensorInfo)


def state_tree(index: Index, resolve: Callable[[str], Any], rank: int = 0,
               chunked: Callable[[str], Any] | None = None) -> Any:
    """Decode the typed non-tensor tree with each tensor name resolved by ``resolve``.

    In format 2, a chunked tensor resolves to a :class:`~torchckpt._format.chunks.ChunkedInfo` of its
    chunks (or to ``chunked(name)`` when given), and ``rank`` picks the per-rank values
    (``@per_rank``, tensors named ``~r<rank>``). A single process's per-rank values are rank 0's:
    another rank gets ``MissingPerRank`` for them.
    """
    try:
        state = index.section.get("state", {})
        names: Any = itertools.chain(index.names, index.aliases)
        if index.raw[TORCHCKPT_KEY]["format_version"] >= SHARDED_FORMAT_VERSION:
            state = format_per_rank.select_rank(state, rank, index.world_size)
            names, resolve = index.layout.view(index.names, index.aliases, rank, resolve, chunked)
        trie = format_tree.build_trie(names)
        tree = format_tree.decode(state, trie, resolve)
        if not isinstance(tree, dict) or not all(type(k) is str for k in tree):
            raise CorruptCheckpointError("the state tree's root is not an object of tracked names")
        if index.raw[TORCHCKPT_KEY]["format_version"] < SHARDED_FORMAT_VERSION and rank:
            tree = format_per_rank.missing_on_other_ranks(tree, index_fields.one_process_per_rank(index), rank)
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
    if index.raw[TORCHCKPT_KEY]["format_version"] < SHARDED_FORMAT_VERSION:
        return state, {n: n for n in index.names}, dict(index.aliases)
    names = index.layout.rank_names(index.names, rank)
    return format_per_rank.select_rank(state, rank, index.world_size), names, dict(index.aliases)
