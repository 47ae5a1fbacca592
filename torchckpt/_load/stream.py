"""One stored tensor read for the lazy reader: whole, or piece by piece in bounded memory.

Why apart from a restore's reads (``execute.execute``): a restore reads every planned tensor of a
shard in one pass straight into its destination, while the reader hands one tensor to a caller
that holds a piece at a time (an export streaming it into a new file, a diff comparing two
checkpoints), so a tensor of any size costs one piece of memory. Each function takes an open
``Source`` and closes it; a tensor stored as chunks is assembled by ``boxes.row_blocks`` instead.

torch (and ``_load.reads``, which needs it) is imported by the functions that build tensors: the
command line reads bytes and headers through this module without paying for torch.
"""

from __future__ import annotations

from collections.abc import Iterator
from typing import TYPE_CHECKING

import xxhash

from torchckpt._format.dtypes import TensorInfo, itemsize
from torchckpt._storage.base import Source
from torchckpt.errors import CorruptCheckpointError, checksum_mismatch

if TYPE_CHECKING:
    import torch

PIECE_BYTES = 64 * 2**20  # the reader's pieces of one tensor, by default: bounded memory, few reads


def read_tensor(source: Source, info: TensorInfo, path: str, name: str, expected: str | None) -> torch.Tensor:
    """The tensor ``info`` of the file ``path``, checked against ``expected`` (its recorded checksum, if any).

    Raises:
        CorruptCheckpointError: the file ends early, or the bytes fail their checksum.
    """
    import torch

    from torchckpt._load import reads

    out = torch.empty(info.shape, dtype=info.dtype)
    try:
        digest = reads.read_into(source, info.start, out, verify=True)
    except EOFError as e:
        raise CorruptCheckpointError(f"{path} is truncated: {e}.", path) from e
    finally:
        source.close()
    if expected is not None and digest is not None and f"{digest:016x}" != expected:
        raise CorruptCheckpointError(checksum_mismatch(name, path, expected, digest), path)
    return out


def tensor_bytes(source: Source, info: TensorInfo, path: str, name: str, expected: str | None,
                 chunk_bytes: int) -> Iterator[bytes]:
    """The stored bytes of ``info`` in pieces of at most ``chunk_bytes``, checked against
    ``expected`` once the last piece is read.

    Raises:
        CorruptCheckpointError: the bytes end early or fail their checksum.
    """
    hasher = xxhash.xxh3_64()
    try:
        for offset in range(info.start, info.end, chunk_bytes):
            piece = source.read(offset, min(chunk_bytes, info.end - offset))
            if len(piece) != min(chunk_bytes, info.end - offset):
                raise CorruptCheckpointError(f"{path} is truncated: it ends inside tensor {name!r}.", path)
            hasher.update(piece)
            yield piece
    finally:
        source.close()
    if expected is not None and f"{hasher.intdigest():016x}" != expected:
        raise CorruptCheckpointError(checksum_mismatch(name, path, expected, hasher.intdigest()), path)


def tensor_elements(source: Source, info: TensorInfo, path: str, name: str, expected: str | None,
                    chunk_bytes: int) -> Iterator[torch.Tensor]:
    """The elements of ``info`` as flat 1-D tensors of at most ``chunk_bytes``, checked against
    ``expected`` once the last one is read (as :func:`tensor_bytes`: a consumer such as ``diff
    --values`` fails at the end instead of reporting numbers from damaged bytes).

    Raises:
        CorruptCheckpointError: the file ends early, or the bytes fail their checksum.
    """
    import torch

    from torchckpt import _tensorio
    from torchckpt._load import reads

    item = itemsize(info.dtype_name)
    per = max(1, chunk_bytes // item)
    count = info.nbytes // item
    hasher = xxhash.xxh3_64()
    try:
        for i in range(0, count, per):
            part = torch.empty(min(per, count - i), dtype=info.dtype)
            try:
                reads.read_into(source, info.start + i * item, part, verify=False)
            except EOFError as e:
                raise CorruptCheckpointError(f"{path} is truncated: {e}.", path) from e
            hasher.update(_tensorio.byte_view(part))
            yield part
    finally:
        source.close()
    if expected is not None and f"{hasher.intdigest():016x}" != expected:
        raise CorruptCheckpointError(checksum_mismatch(name, path, expected, hasher.intdigest()), path)
