"""``torchckpt consolidate``: a checkpoint saved by several ranks as a single-process one (format 1).

Why: a format-2 checkpoint restores anywhere torchckpt runs, but other tools (an evaluation
harness, a converter, ``safe_open`` of a shard) see the chunks of each sharded tensor rather than
the tensor. Consolidation assembles every tensor whole, of any dtype (integer and bool tensors
included, which DCP's consolidation refuses), keeps the state tree with one rank's per-rank values
(rank 0's, as a single process restoring the checkpoint would take), and writes a format-1
checkpoint a single process restores with ``assert_consumed()``.

Memory stays bounded whatever the size of a tensor: each tensor is streamed from its chunks in
blocks of rows (every chunk checked against its checksum on the way) into the new shard, whose
checksums are computed as the bytes go by. The output is committed as any checkpoint is (a
temporary renamed into place, or the index written last on an object store).
"""

from __future__ import annotations

import array
from collections.abc import Callable
from typing import Any

import torch
import xxhash

from torchckpt._format import index as format_index
from torchckpt._format import spec as format_spec
from torchckpt._format import tree as format_tree
from torchckpt._format.spec import INDEX_FILE
from torchckpt._progress import progress_bar
from torchckpt._save import write as save_write
from torchckpt._storage.base import AlreadyCommitted, Stage, as_path, is_url
from torchckpt._storage.registry import storage_for
from torchckpt.errors import CheckpointError
from torchckpt.reader import CheckpointReader, load_checkpoint

COPY_BYTES = 16 * 2**20  # how much of a tensor is in memory at once


def consolidate(path: str, out: str, *, rank: int = 0, max_shard_size: int | str = format_spec.DEFAULT_MAX_SHARD_SIZE,
                progress: bool | None = None, storage_options: dict[str, Any] | None = None) -> dict[str, Any]:
    """Write the checkpoint at ``path`` as a single-process (format 1) checkpoint at ``out``.

    Args:
        path: a checkpoint, or a directory of them (its latest); a path or a URL.
        out: the new checkpoint directory; it must not exist yet.
        rank: whose per-rank values (``PerRank``, ``RNGState``) the result keeps.
        max_shard_size: bytes per shard, or a string such as ``"5GB"``.
        progress: show a progress bar (None: on a terminal, for large checkpoints).
        storage_options: passed to fsspec for whichever of ``path`` and ``out`` is a URL.

    Returns:
        A summary: ``path``, ``out``, ``world_size``, ``rank``, ``tensors``, ``bytes``, ``shards``.

    Raises:
        CheckpointError: ``out`` exists, ``rank`` is not one that saved, or ``path`` is not a
            torchckpt checkpoint.
        CorruptCheckpointError: a chunk fails its checksum (nothing is committed).
    """
    path, out = as_path(path), as_path(out)
    reader = load_checkpoint(path, storage_options=storage_options if is_url(path) else None)
    if reader.kind != "torchckpt":
        raise CheckpointError(f"{path} is not a torchckpt checkpoint; it is plain safetensors already.")
    world = reader.world_size
    if isinstance(rank, bool) or not isinstance(rank, int) or not 0 <= rank < world:
        raise CheckpointError(f"rank must be one of the {world} ranks that saved {reader.path} (0 to {world - 1}), "
                              f"not {rank!r}.")
    index = format_index.load_index(reader.path, reader.storage)
    format_index.state_tree(index, lambda name: None, rank)  # refuses, naming the index, a tree a restore would refuse
    state, source_of, aliases = format_index.rank_view(index, rank)
    section = {k: v for k, v in index.section.items() if k in ("objects", "metadata")}
    section["state"] = state
    dtypes, shapes = reader.get_variable_to_dtype_map(), reader.get_variable_to_shape_map()
    tensors = {name: (dtypes[source], tuple(shapes[source]), reader.nbytes(source))
               for name, source in source_of.items()}
    shards = _plan(tensors, format_spec.parse_size(max_shard_size))
    files = [format_spec.shard_name(i, len(shards)) for i in range(1, len(shards) + 1)]
    storage = storage_for(out, storage_options if is_url(out) else None)
    if storage.exists(out) or storage.is_dir(out):  # checked before any work; the commit checks again
        raise CheckpointError(f"{out} already exists; consolidate into a new path.")
    stage = storage.stage(out, False)
    files = [stage.member(f) for f in files]  # on an object store, names of this writer's own
    try:
        records, digests = [], []
        with progress_bar(sum(n for _, _, n in tensors.values()), "consolidate", progress) as bar:
            for file, names in zip(files, shards):
                entries = [(n, *tensors[n]) for n in names]
                record, shard_digests = stream_shard(reader, stage, file, entries,
                                                     [source_of[n] for n in names], bar.update)
                records.append(record)
                digests.append(shard_digests)
        order = [n for names in shards for n in names]
        table = {"names": order,
                 "dtypes": format_spec.DTYPE_SEP.join(format_spec.DTYPE_NAMES[tensors[n][0]] for n in order),
                 "shapes": format_spec.SHAPE_SEP.join(format_spec.shape_key(tensors[n][1]) for n in order),
                 "checksums": "".join(save_write.big_endian(d).hex() for d in digests)}
        weight_map = {n: file for file, names in zip(files, shards) for n in names}
        document = save_write.index_document(sum(n for _, _, n in tensors.values()), weight_map,
                                        format_spec.PLAIN_FORMAT_VERSION, section, aliases, records, table)
        stage.write_index(INDEX_FILE, format_spec.sealed_pieces(document))
        stage.commit({r["file"]: r["size"] for r in records})
    except AlreadyCommitted:
        stage.discard()
        raise CheckpointError(f"{out} appeared while it was being written; nothing was replaced.") from None
    except BaseException:
        stage.discard()
        raise
    per_rank = sum(1 for _ in format_tree.per_rank_paths(index.section.get("state", {})))
    return {"path": reader.path, "out": out, "world_size": world, "rank": rank, "tensors": len(tensors),
            "bytes": sum(n for _, _, n in tensors.values()), "shards": len(files), "per_rank_values": per_rank}


def _plan(tensors: dict[str, tuple[torch.dtype, tuple[int, ...], int]], limit: int) -> list[list[str]]:
    """Greedy shards in checkpoint order, widest elements first within each (alignment)."""
    shards: list[list[str]] = [[]]
    size = 0
    for name, (_, _, nbytes) in tensors.items():
        if shards[-1] and size + nbytes > limit:
            shards.append([])
            size = 0
        shards[-1].append(name)
        size += nbytes
    for names in shards:
        names.sort(key=lambda n: -format_spec.itemsize(tensors[n][0]))
    return shards


def stream_shard(reader: CheckpointReader, stage: Stage, file: str,
                 entries: list[tuple[str, torch.dtype, tuple[int, ...], int]], sources: list[str],
                 progress: Callable[[int], None]) -> tuple[dict[str, Any], array.array[int]]:
    """Write one safetensors shard of ``entries`` (name, dtype, shape, bytes), each tensor's bytes
    streamed from the reader's tensor ``sources[i]``; returns its index record and the per-tensor
    xxh3-64 digests, as ``_save.write_shards`` does for tensors in memory."""
    header = format_spec.encode_header_pieces(entries)
    shard_hash = xxhash.xxh3_64()
    for piece in header:
        shard_hash.update(piece)
    header_checksum = shard_hash.hexdigest()
    size = sum(map(len, header)) + sum(n for *_, n in entries)
    digests: array.array[int] = array.array("Q")
    with stage.create(file, size) as out:
        out.write([memoryview(piece) for piece in header])
        for source in sources:
            tensor_hash = xxhash.xxh3_64()
            for piece in reader.iter_bytes(source, COPY_BYTES):
                tensor_hash.update(piece)
                out.write([memoryview(piece)])
                progress(len(piece))
            digests.append(tensor_hash.intdigest())
        out.finish()
    shard_hash.update(save_write.big_endian(digests))
    record = {"file": file, "size": size, "checksum": f"{shard_hash.intdigest():016x}",
              "header_checksum": header_checksum, "tensors": len(entries)}
    return record, digests
