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

from typing import Any

import torch

from torchckpt._format import dtypes as format_dtypes
from torchckpt._format import index as format_index
from torchckpt._format import per_rank as format_per_rank
from torchckpt._format import spec as format_spec
from torchckpt._format.dict_order import keep_dict_order
from torchckpt._format.spec import INDEX_FILE
from torchckpt._load import index_fields
from torchckpt._load import opened as load_opened
from torchckpt._paths import as_directory
from torchckpt._progress import progress_bar
from torchckpt._save import plan as save_plan
from torchckpt._save import write as save_write
from torchckpt._save.options import parse_size
from torchckpt._storage.base import AlreadyCommitted, Stage, Storage
from torchckpt.errors import CheckpointError
from torchckpt.reader import CheckpointReader

Tensors = dict[str, tuple[torch.dtype, tuple[int, ...], int]]  # name -> (dtype, shape, bytes), in checkpoint order


def consolidate(reader: CheckpointReader, out: str, storage: Storage, *, rank: int = 0,
                max_shard_size: int | str = format_spec.DEFAULT_MAX_SHARD_SIZE,
                progress: bool | None = None) -> dict[str, Any]:
    """Write the checkpoint ``reader`` reads as a single-process (format 1) checkpoint at ``out``.

    Args:
        reader: the checkpoint (``load_checkpoint`` of a checkpoint, or of a directory of them).
        out: the new checkpoint directory; it must not exist yet.
        storage: the storage that holds ``out`` (the command line resolves it from the path).
        rank: whose per-rank values (``PerRank``, ``RNGState``) the result keeps.
        max_shard_size: bytes per shard, or a string such as ``"5GB"``.
        progress: show a progress bar (None: on a terminal, for large checkpoints).

    Returns:
        A summary: ``path``, ``out``, ``world_size``, ``rank``, ``tensors``, ``bytes``, ``shards``.

    Raises:
        CheckpointError: ``out`` exists, ``rank`` is not one that saved, or ``path`` is not a
            torchckpt checkpoint.
        CorruptCheckpointError: a chunk fails its checksum (nothing is committed).
    """
    path, out = reader.path, as_directory(out)
    if reader.kind != "torchckpt":
        raise CheckpointError(f"{path} is not a torchckpt checkpoint; it is plain safetensors already.")
    world = reader.world_size
    if isinstance(rank, bool) or not isinstance(rank, int) or not 0 <= rank < world:
        raise CheckpointError(f"rank must be one of the {world} ranks that saved {reader.path} (0 to {world - 1}), "
                              f"not {rank!r}.")
    index = load_opened.load_index(path, reader.storage)
    # refuses, naming the index, what a restore or the reader would refuse (the new seal must not launder it)
    index_fields.check_sections(index, load_opened.state_tree(index, lambda name: None, rank))
    state, source_of, aliases = load_opened.rank_view(index, rank)
    # what describes the state (a versioned module's loader migrates by its version), not how the job stored it
    kept = ("objects", "metadata", format_spec.MODULE_VERSIONS_KEY, format_spec.ONE_PROCESS_PER_RANK_KEY)
    section = {k: v for k, v in index.section.items() if k in kept}
    section["state"] = state
    if index_fields.per_rank_count(index):  # this rank's values, kept as plain ones: no other rank's
        section[format_spec.ONE_PROCESS_PER_RANK_KEY] = list(format_per_rank.per_rank_paths(index.section["state"]))
    dtypes, shapes = reader.get_variable_to_dtype_map(), reader.get_variable_to_shape_map()
    tensors = {name: (dtypes[source], tuple(shapes[source]), reader.nbytes(source))
               for name, source in source_of.items()}
    rows = [(name, nbytes, format_dtypes.itemsize(dtype)) for name, (dtype, _, nbytes) in tensors.items()]
    shards = [s.names for s in save_plan.plan_shards(rows, parse_size(max_shard_size))]
    if storage.exists(out) or storage.is_dir(out):  # checked before any work; the commit checks again
        raise CheckpointError(f"{out} already exists; consolidate into a new path.")
    stage = storage.stage(out, False)
    try:
        _write(reader, storage, stage, out, tensors, source_of, shards, section, aliases, progress)
    except AlreadyCommitted:
        stage.discard()
        raise CheckpointError(f"{out} appeared while it was being written; nothing was replaced.") from None
    except BaseException:
        stage.discard()
        raise
    per_rank = index_fields.per_rank_count(index)
    return {"path": reader.path, "out": out, "world_size": world, "rank": rank, "tensors": len(tensors),
            "bytes": sum(n for _, _, n in tensors.values()), "shards": len(shards), "per_rank_values": per_rank}


def _write(reader: CheckpointReader, storage: Storage, stage: Stage, out: str, tensors: Tensors, source_of: dict[str, str],
           shards: list[list[str]], section: dict[str, Any], aliases: dict[str, str], progress: bool | None) -> None:
    """Stream every shard into ``stage`` (each tensor from its source in the reader), then write the
    index and commit ``out``."""
    files = [stage.member(format_spec.shard_name(i, len(shards))) for i in range(1, len(shards) + 1)]
    records, digests = [], []  # on an object store, ``files`` are names of this writer's own
    with progress_bar(sum(n for _, _, n in tensors.values()), "consolidate", progress) as bar:
        for file, names in zip(files, shards):
            record, shard_digests = save_write.stream_shard(stage, file, [(n, *tensors[n]) for n in names],
                                                            [source_of[n] for n in names], reader.iter_bytes,
                                                            bar.update)
            records.append(record)
            digests.append(shard_digests)
    order = [n for names in shards for n in names]
    table = {"names": order,
             "dtypes": format_spec.DTYPE_SEP.join(format_dtypes.DTYPE_NAMES[tensors[n][0]] for n in order),
             "shapes": format_spec.SHAPE_SEP.join(format_dtypes.shape_key(tensors[n][1]) for n in order),
             "checksums": "".join(format_index.big_endian(d).hex() for d in digests)}
    weight_map = {n: file for file, names in zip(files, shards) for n in names}
    # the tree came back in the source's order; this layout may store a dict's tensors in another
    keep_dict_order(section["state"], [*source_of, *aliases], [*order, *aliases])
    document = format_index.index_document(sum(n for _, _, n in tensors.values()), weight_map,
                                           format_spec.PLAIN_FORMAT_VERSION, section, aliases, records, table)
    stage.write_index(INDEX_FILE, format_index.sealed_index(document, out, len(order)))
    save_write.refuse_replacing_other(storage, out, False)  # someone's file put at ``out`` meanwhile: not beside it
    stage.commit({r["file"]: r["size"] for r in records})
