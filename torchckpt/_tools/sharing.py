"""Which bytes of a checkpoint are its own, for ``torchckpt ls`` and ``torchckpt inspect``.

An incremental save (``_save.reuse``) places a shard that did not change by a hard link to the
previous checkpoint's file (local) or by a copy the store makes (object stores). Every checkpoint
stays standalone, but on a local disk two checkpoints may then hold one file: deleting either
frees nothing of it. What a user wants to know is what deleting a checkpoint would free.

Why the storage answers, not the index: the index's ``"reused"`` record says where a shard came
from when it was saved, not whether it is still shared (the base may be gone since, and the base
itself records nothing about the checkpoints that reused its files). ``Storage.is_shared`` asks
the file system (a link count over 1: one ``lstat`` per shard); on an object store a reused shard
is an object of its own, so nothing there is ever shared.

Why the record is still read: it is the only place that says which checkpoint a shard came from.
It is untrusted input (``_format.index.reused_record`` checks its types); entries that name no
shard of this checkpoint are left out.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Any

from torchckpt._format import dtypes as format_dtypes
from torchckpt._format import index as format_index
from torchckpt._paths import join
from torchckpt.reader import CheckpointReader

SHOWN_FILES = 5  # files a line of the report names; the rest are counted


@dataclass(frozen=True)
class SharedShard:
    """A shard of a checkpoint that is not (only) its own."""

    file: str
    nbytes: int  # its tensor data bytes, as ``total_size`` counts them
    base_file: str | None  # the base's file it was reused from (None: not recorded)
    shared: bool  # another checkpoint holds this very file now (a hard link)


@dataclass
class Sharing:
    """A checkpoint's bytes against what it shares: ``own_bytes`` of ``total_bytes`` (tensor data,
    as the index's ``total_size``) would be freed by deleting it."""

    total_bytes: int
    own_bytes: int
    base: str | None = None  # the checkpoint its reused shards came from, as recorded
    shards: list[SharedShard] = field(default_factory=list)  # reused or shared, in file order

    @property
    def reused(self) -> list[SharedShard]:
        return [s for s in self.shards if s.base_file is not None]

    @property
    def shared_only(self) -> list[SharedShard]:
        """Shared with another checkpoint, with nothing recorded about where from (the base of a
        later save, or a record left out)."""
        return [s for s in self.shards if s.base_file is None]

    def report(self, size_text: Callable[[int], str]) -> list[str]:
        """Lines for ``inspect``: which shards were reused from where, which are shared, and the
        bytes that are this checkpoint's own (``size_text`` writes a byte count); [] when none."""
        lines = []
        if self.reused:
            lines.append(f"reused from {_printable(self.base or '?')}: {_files(self.reused, size_text)}")
        if self.shared_only:
            lines.append(f"shared with another checkpoint: {_files(self.shared_only, size_text)}")
        if self.own_bytes != self.total_bytes:
            lines.append(f"own: {size_text(self.own_bytes)} of {size_text(self.total_bytes)} (the rest is shared: "
                         "deleting this checkpoint does not free it)")
        return lines

    def as_json(self) -> dict[str, Any]:
        """The keys ``inspect --json`` adds: ``own_bytes``, ``reused`` (null: none recorded) and
        ``shared_files``."""
        reused = {"base": self.base, "files": {s.file: s.base_file for s in self.reused}} if self.reused else None
        return {"own_bytes": self.own_bytes, "reused": reused, "shared_files": [s.file for s in self.shards if s.shared]}


def sharing_of(reader: CheckpointReader) -> Sharing | None:
    """What the checkpoint ``reader`` reads shares, and what its index records about it: one
    ``is_shared`` per shard (no request on an object store), from the index the reader already
    parsed; None for a safetensors file or a Hugging Face folder."""
    index = reader.index
    if index is None:
        return None
    total = index.raw.get("metadata", {}).get("total_size", 0)
    record = format_index.reused_record(index.section) or {"base": None, "files": {}}
    files = {s["file"] for s in index.shards}
    recorded = {here: there for here, there in record["files"].items() if here in files}
    shards, start = [], 0
    for shard in index.shards:
        end = start + shard["tensors"]
        file = shard["file"]
        shared = reader.storage.is_shared(join(reader.path, file))
        if shared or file in recorded:
            shards.append(SharedShard(file, _data_bytes(index, start, end), recorded.get(file), shared))
        start = end
    own = total - sum(s.nbytes for s in shards if s.shared)
    return Sharing(total, max(own, 0), record["base"] if recorded else None, shards)


def _data_bytes(index: format_index.Index, start: int, end: int) -> int:
    """The tensor data bytes of the table's rows ``start:end`` (a shard's tensors; ``parse_index``
    checked their dtypes and shapes)."""
    return sum(format_dtypes.nbytes_of(format_dtypes.dims_of(shape), dtype)
               for dtype, shape in zip(index.dtypes[start:end], index.shapes[start:end]))


def _files(shards: list[SharedShard], size_text: Callable[[int], str]) -> str:
    named = [f"{_printable(s.file)} ({size_text(s.nbytes)}"
             + (f", copied from {_printable(s.base_file)})" if s.base_file not in (None, s.file) else ")")
             for s in shards[:SHOWN_FILES]]
    more = f", and {len(shards) - SHOWN_FILES} more" if len(shards) > SHOWN_FILES else ""
    return ", ".join(named) + more


def _printable(text: str) -> str:
    """Names from an index are untrusted: one with a control character is shown escaped, never
    sent to the terminal as it is."""
    return text if text.isprintable() else ascii(text)
