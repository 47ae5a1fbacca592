"""``torchckpt verify``: check every byte of a checkpoint against what its index recorded.

Why a tool apart from the reader: the reader is lazy (it reads the index, and a tensor's bytes
only when asked), while verification reads everything once, in file order, and reports every
problem it finds instead of stopping at the first one, so that one run tells what is damaged.
Each shard header is parsed in full (its recorded checksum is not trusted as a shortcut), each
tensor and each block (format 3) is hashed, each shard's checksum is recomputed from its header
and tensor digests, and the state tree is decoded as a restore in one process decodes it.
"""

from __future__ import annotations

import xxhash

from torchckpt._format import blocks as format_blocks
from torchckpt._format import index as format_index
from torchckpt._format.dtypes import TensorInfo
from torchckpt._load import index_fields, recheck
from torchckpt._load import opened as load_opened
from torchckpt._progress import progress_bar
from torchckpt.errors import (
    CheckpointDeletedError,
    CheckpointReadError,
    CorruptCheckpointError,
    checksum_mismatch,
    unreadable,
)
from torchckpt.reader import CheckpointReader


def verify(reader: CheckpointReader, progress: bool | None = None) -> list[str]:
    """Check every shard and tensor of a checkpoint, and its state tree as a restore in one process
    decodes it; returns the problems found (empty: all good).

    A plain safetensors file or Hugging Face folder has no checksums: its headers were parsed and
    checked when the reader was made, so there is nothing more to find in it.
    """
    if reader.kind != "torchckpt":
        return []
    try:
        index = load_opened.load_index(reader.path, reader.storage)
        shards = load_opened.OpenShards(index, reader.storage)
    except CorruptCheckpointError as e:
        return [str(e)]
    with shards:
        try:  # every header parsed in full and matched against the index before any data is read
            infos = load_opened.read_shard_headers(index, shards, trust_header_checksums=False)
        except CorruptCheckpointError as e:
            load_opened.distrust_damaged(reader.storage, e)
            return [str(e)]
        problems = _verify_data(index, shards, infos, progress)
    try:
        index_fields.check_sections(index, load_opened.state_tree(index, lambda name: None, chunked=lambda name: None))
        if index_fields.per_rank_count(index):  # each rank's view decoded as that rank's restore decodes it
            for rank in range(1, index.world_size):
                load_opened.state_tree(index, lambda name: None, rank, chunked=lambda name: None)
    except CorruptCheckpointError as e:
        problems.append(str(e))
    return problems


def _verify_data(index: format_index.Index, shards: load_opened.OpenShards, infos: dict[str, TensorInfo],
                 progress: bool | None) -> list[str]:
    """Every shard read once, in file order: each tensor's digest and blocks, then the shard's checksum."""
    problems: list[str] = []
    total = sum(s["size"] for s in index.shards)
    checksums = dict(zip(index.names, index.checksums))
    position = 0
    with progress_bar(total, "verify", progress) as bar:
        for shard in index.shards:
            path = shards.path(shard["file"])
            names = index.names[position : position + shard["tensors"]]
            position += shard["tensors"]
            try:  # opened again where the shards are held open a few at a time
                source = shards.sources[shard["file"]]
            except CorruptCheckpointError as e:  # another file at its name: replaced meanwhile, or damage
                explained = recheck.explain(e, index.directory, index.seal, shards.storage)
                if isinstance(explained, CheckpointDeletedError):
                    raise explained from e
                problems.append(str(e))
                bar.update(sum(infos[n].nbytes for n in names))
                continue
            source.prepare(shard["size"])
            first = min((infos[n].start for n in names), default=shard["size"])
            shard_hash = xxhash.xxh3_64(source.read(0, first))
            found = len(problems)
            try:
                for name in names:  # file order
                    info = infos[name]
                    digest, bad_blocks = format_blocks.check_range(source, info, index.blocks)
                    shard_hash.update(digest.to_bytes(8, "big"))
                    if f"{digest:016x}" != checksums[name]:
                        problems.append(checksum_mismatch(name, path, checksums[name], digest))
                    problems += [bad.message(path) for bad in bad_blocks]
                    bar.update(info.nbytes)
            except (EOFError, OSError) as e:  # the disk's error is a problem of the shard; the process's is raised
                if isinstance(e, OSError) and isinstance(error := unreadable(path, e), CheckpointReadError):
                    raise error from e
                problems.append(f"{path}: cannot read it to the end ({e}).")
            else:
                if f"{shard_hash.intdigest():016x}" != shard["checksum"]:
                    problems.append(f"{path}: shard checksum mismatch (recorded {shard['checksum']}, "
                                    f"computed {shard_hash.intdigest():016x}).")
            if len(problems) > found:  # a later save of this process reads it back (``_storage.trusted``)
                load_opened.forget_stamp(shards.storage, path)
    return problems
