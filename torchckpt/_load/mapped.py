"""A hooked subtree's saved tensors as views of the shards' page cache, not as copies of it.

``load_state_dict`` copies each value it is given into its parameter, so handing it tensors read
into fresh memory made a second full copy of the subtree's state (100 MiB more for a 100 MiB model
with one pre-hook on the model itself). As ``torch.load(mmap=True)`` does, a local shard is mapped
instead (``Source.mapped``: the file already open, copy-on-write) and each saved tensor becomes a
view of its bytes there: the only copy is from the page cache into the parameters.

- Each view is checked against its checksum (xxh3 of the mapped bytes, as the reads check theirs)
  before any view is made: a damaged shard fails before a hook sees a value.
- Only whole stored tensors are viewed (format 2's chunks are assembled by the reads), on a
  little-endian host (shards are little-endian), aligned to their element size; the rest, and every
  tensor of a file that cannot be mapped (on an object store), are read into fresh tensors as before.
- :meth:`ShardMaps.close` closes the maps once the subtree is loaded. A hook or loader that kept a
  tensor keeps its map: it is freed with that tensor (unmapping under a live view would leave the
  tensor pointing at nothing, and the next read of it would kill the process).
- A write into a view (a hook that changes a value in place) makes a private copy of that page; the
  file never changes.
"""

from __future__ import annotations

import contextlib
import sys
from collections.abc import Mapping
from typing import Any

import torch
import xxhash

from torchckpt._format.dtypes import TensorInfo
from torchckpt._storage.base import Source
from torchckpt.errors import CheckpointError

_LITTLE_ENDIAN = sys.byteorder == "little"
Mismatch = tuple[str, tuple[TensorInfo, int]]  # (file, (saved tensor, digest of its bytes)): a failed checksum


def viewable(saved: Any) -> bool:
    """Whether ``saved`` can be a view of its mapped bytes: a whole stored tensor, aligned, not empty."""
    return (_LITTLE_ENDIAN and type(saved) is TensorInfo and saved.nbytes > 0
            and saved.start % saved.dtype.itemsize == 0)


class ShardMaps:
    """The shards mapped for one hooked subtree's load; :meth:`close` them once it is loaded."""

    def __init__(self, sources: Mapping[str, Source]) -> None:
        self._sources = sources
        self._maps: list[tuple[Any, memoryview]] = []  # (the mmap, a view of it all)

    def views(self, saved: list[Any], verify: bool) -> tuple[list[torch.Tensor | None], Mismatch | None]:
        """A tensor over the mapped bytes of each of ``saved`` that can have one (None for the others),
        each checked against its checksum with ``verify``; or, with no view made, the first that fails it."""
        by_file: dict[str, list[int]] = {}
        for i, info in enumerate(saved):
            if viewable(info):
                by_file.setdefault(info.file, []).append(i)
        found: list[tuple[int, memoryview]] = []
        for file, indices in by_file.items():
            indices.sort(key=lambda i: saved[i].start)  # file order: the pages are read in once, in order
            whole = self._map(file, saved[indices[0]].start, max(saved[i].end for i in indices))
            if whole is None:
                continue
            checked: set[int] = set()  # tied names: one stored tensor, hashed once
            for i in indices:
                info = saved[i]
                view = whole[info.start : info.end]
                if verify and info.start not in checked:
                    digest = xxhash.xxh3_64_intdigest(view)
                    if digest != info.checksum:
                        return [None] * len(saved), (file, (info, digest))
                    checked.add(info.start)
                found.append((i, view))
        out: list[torch.Tensor | None] = [None] * len(saved)
        for i, view in found:  # the map is copy-on-write, so writable: torch.frombuffer does not warn
            out[i] = torch.frombuffer(view, dtype=saved[i].dtype).view(saved[i].shape)
        return out, None

    def _map(self, file: str, start: int, end: int) -> memoryview | None:
        try:
            source = self._sources.get(file)
        except (OSError, CheckpointError):  # opened again (a few held open at a time) and failed: read
            return None  # it instead, where its errors are explained
        mapped = source.mapped(start, end - start) if source is not None else None
        if mapped is None:
            return None
        whole = memoryview(mapped)
        self._maps.append((mapped, whole))
        return whole

    def close(self) -> None:
        """Close every map no tensor views any more; one still viewed is freed with its last view."""
        maps, self._maps = self._maps, []
        for mapped, whole in maps:
            whole.release()  # the views hold the map themselves, not through this one
            with contextlib.suppress(BufferError):
                mapped.close()
