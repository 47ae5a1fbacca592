"""Writing a checkpoint directory.

Tensors are deduplicated (tied weights are stored once and recorded as aliases), grouped
greedily into shards of at most ``max_shard_size`` bytes, written into a temporary sibling
directory with ``index.json`` last, fsynced, and committed by rename (see ``_atomic``).

Why the bookkeeping is streamed: for 20,000 small tensors, a header and an index built as
Python objects and joined strings cost more memory than a tenth of the tensors themselves.
Headers are encoded in pieces, digests kept in an ``array``, and ``index.json`` written piece
by piece (see ``_format.RawJSON``). Reading is in ``_index``.
"""

from __future__ import annotations

import array
import contextlib
import errno
import gc
import io
import os
import sys
import time
from collections.abc import Callable, Iterator
from dataclasses import dataclass, field
from typing import Any

import torch
import xxhash

from torchckpt import _atomic, _files, _format, _output, _tensorio
from torchckpt._format import INDEX_FILE
from torchckpt._progress import progress_bar
from torchckpt.errors import CheckpointWriteError, UnsupportedStateError


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
    """Whether ``path`` is a committed checkpoint directory (not a temporary or a leftover); its
    ``index.json`` must be a regular file, not a link."""
    return (
        not _atomic.is_temporary(os.path.basename(path))
        and _files.is_regular_file(os.path.join(path, INDEX_FILE))
    )


# -- writing ---------------------------------------------------------------------------------


def _check_tensor(name: str, t: torch.Tensor) -> None:
    reason = _tensorio.unsupported_reason(t)
    if reason is not None:
        raise UnsupportedStateError(
            f"Cannot save tensor {name!r}: it is {reason}. Sharded state (DTensor, FSDP) is not supported yet; "
            "save a full state dict instead (for FSDP2, torch.distributed.checkpoint.state_dict.get_state_dict "
            "with full_state_dict=True).",
            key=name,
            value_type=type(t),
        )
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
        if (type(t) is not torch.Tensor and (type(t) is not torch.nn.Parameter or getattr(t, "_is_flat_param", False))
                or t.layout is not strided or t.dtype not in supported or t.is_meta or t.is_nested):
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
    replace: bool = True,
) -> str:
    """Write tensors and the ``torchckpt`` index section to the directory ``path``, atomically.

    Args:
        path: the checkpoint directory to create (or, with ``replace``, replace).
        stored: name -> tensor, in save order, as returned by :func:`prepare_tensors`.
        aliases: alias name -> stored name, as returned by :func:`prepare_tensors`.
        section: extra keys for the index's ``torchckpt`` section (``state``, ``objects``, ...).
        max_shard_size: bytes per shard (int), or a string such as ``"2GB"`` (see ``parse_size``).
        progress: show a progress bar (None: on a terminal for large saves).
        before_commit: called with the temporary directory just before the rename (tests use it
            to inject faults).
        replace: replace a checkpoint already at ``path``; without it, one there (even one that
            appears while this one is written) raises ``_atomic.AlreadyThere`` and nothing changes.

    Returns:
        ``path``.

    Raises:
        CheckpointWriteError: the system refused a write; it names the file and says what to do.
    """
    try:
        return _write_checkpoint(path, stored, aliases, section, max_shard_size, progress, before_commit, replace)
    except OSError as e:
        if isinstance(e, (CheckpointWriteError, _atomic.AlreadyThere)):
            raise
        raise CheckpointWriteError(_write_failure(path, e), path, e) from e


def _write_failure(path: str, error: OSError) -> str:
    """What went wrong writing the checkpoint ``path``, and what to do, for the user's own path."""
    where = f" ({error.filename})" if error.filename and error.filename != path else ""
    parent = os.path.dirname(os.path.abspath(path))
    if error.errno in (errno.ENOTDIR, errno.EEXIST) and not os.path.isdir(parent):
        blocker = next((p for p in _ancestors(parent) if os.path.lexists(p) and not os.path.isdir(p)), parent)
        return (f"Cannot write checkpoint {path}: {blocker} is a file, not a directory. "
                "Choose a path whose parents are directories (or remove that file).")
    advice = {
        errno.EROFS: "the file system is read-only. Write checkpoints to a writable directory.",
        errno.EACCES: "permission denied. Write checkpoints to a directory you may write to.",
        errno.EPERM: "permission denied. Write checkpoints to a directory you may write to.",
        errno.ENOSPC: "no space left on the device. Free some space (or keep fewer checkpoints with max_to_keep); "
                      "the previous checkpoints are intact.",
        errno.EDQUOT: "the disk quota is exceeded. Free some space; the previous checkpoints are intact.",
        errno.EFBIG: "a file would exceed the largest size allowed (a ulimit, or the file system's limit). Use a "
                     "smaller max_shard_size.",
    }.get(error.errno or 0, f"{error.strerror or error}.")
    return f"Cannot write checkpoint {path}{where}: {advice}"


def _ancestors(path: str) -> list[str]:
    out = []
    while True:
        out.append(path)
        parent = os.path.dirname(path)
        if parent == path:
            return out[::-1]
        path = parent


def _write_checkpoint(
    path: str,
    stored: dict[str, torch.Tensor],
    aliases: dict[str, str],
    section: dict[str, Any],
    max_shard_size: int | str,
    progress: bool | None,
    before_commit: Callable[[str], None] | None,
    replace: bool,
) -> str:
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
            with _output.create(os.path.join(tmp, file), size) as out:
                out.write([memoryview(piece) for piece in header])
                del header  # a 20,000-tensor header is megabytes: do not hold it while writing data
                shard_digests = _tensorio.write_tensors(out, [stored[n] for n in shard.names], bar.update)
                out.finish()
            shard_hash.update(_big_endian(shard_digests))
            digests.append(shard_digests)
            shard_records.append({
                "file": file,
                "size": size,
                "checksum": f"{shard_hash.intdigest():016x}",
                "header_checksum": header_checksum,
                "tensors": len(shard.names),
            })
        weight_map: Any = _format.RawJSON(lambda: _weight_map_pieces(shards, files))
        if sum(len(shard.names) for shard in shards) <= _format.LAYOUT_MAX_LINES:  # small: one name a line
            weight_map = {n: file for shard, file in zip(shards, files) for n in shard.names}
        index = {
            "metadata": {"total_size": total},
            "weight_map": weight_map,
            _format.TORCHCKPT_KEY: {
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
        index_path = os.path.join(tmp, INDEX_FILE)
        fd = _files.create_exclusive(index_path)
        try:
            with io.BufferedWriter(io.FileIO(fd, "w", closefd=False), _INDEX_BUFFER) as out:
                for piece in _format.sealed_pieces(index):
                    out.write(piece)
            os.fsync(fd)
        except OSError as e:
            raise _files.named(e, index_path) from e
        finally:
            os.close(fd)
        if before_commit is not None:
            before_commit(tmp)
        _atomic.commit_directory(tmp, path, replace)
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
