"""Lazy inspection: ``load_checkpoint(path)`` reads the index (and headers), never tensor data.

For a torchckpt checkpoint the shapes and dtypes come from ``index.json`` alone (its compact tensor
table is built for this), so inspecting a 100 GB checkpoint costs the same as a 100 KB one; shard
headers are read and validated only when a tensor is read. A checkpoint saved by several ranks
(format 2) is shown as the job saw it: each sharded tensor under its own name with its global
shape, assembled from its chunks when it is read (block by block, so memory stays bounded). Plain
``.safetensors`` files and Hugging Face sharded folders (``*.safetensors.index.json``) are read from
their headers, so any safetensors weights can be inspected the same way. Reading one tensor's bytes
is ``_load/stream``'s; checking a whole checkpoint is a tool's (``_tools/verify``).

Why torch is imported only by the methods that return torch objects: the command line inspects
through this reader, and importing torch costs over a second, a hundred times an inspection's own
work. :meth:`CheckpointReader.get_variable_to_dims_map` and
:meth:`~CheckpointReader.get_variable_to_dtype_name_map` give the same table without it.
"""

from __future__ import annotations

import contextlib
import difflib
import fnmatch
import math
import os
from collections.abc import Iterator
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any

from torchckpt._format import chunks as format_chunks
from torchckpt._format import dtypes as format_dtypes
from torchckpt._format import index as format_index
from torchckpt._format import keypath
from torchckpt._format.dtypes import TensorInfo
from torchckpt._load import foreign, index_fields, recheck, stream
from torchckpt._load import opened as load_opened
from torchckpt._paths import as_path, join, name_of
from torchckpt._storage.base import Source, Storage
from torchckpt._storage.registry import storage_for
from torchckpt.errors import (
    CheckpointError,
    CorruptCheckpointError,
    VariableNotFoundError,
)

if TYPE_CHECKING:
    import torch

__all__ = ["CheckpointReader", "TensorSpec", "list_variables", "load_checkpoint", "load_variable"]


@dataclass(frozen=True)
class TensorSpec:
    """Where the state tree holds a tensor: its name, dtype and shape (the data is not read)."""

    name: str
    dtype: torch.dtype
    shape: torch.Size


class CheckpointReader:
    """Read-only, lazy view of a checkpoint's tensors and state. Made by :func:`load_checkpoint`.

    Example:
        >>> import tempfile, torch, torchckpt
        >>> path = torchckpt.Checkpoint(w=torch.ones(2, 3), epoch=4).write(tempfile.mkdtemp() + "/c")
        >>> reader = torchckpt.load_checkpoint(path)
        >>> reader.get_variable_to_shape_map()
        {'w': torch.Size([2, 3])}
        >>> reader.get_value("epoch"), reader.get_tensor("w").sum().item()
        (4, 6.0)
    """

    def __init__(self, path: str, kind: str, storage: Storage) -> None:
        self.path = path
        self.kind = kind  # "torchckpt", "safetensors" or "huggingface"
        self.storage = storage
        self._index: format_index.Index | None = None
        self._names: list[str] = []
        self._name_keys: dict[str, None] | None = None  # ``_names`` as a dict's keys, where the index gave them
        self._dtypes: list[str] = []
        self._shapes: list[str] = []
        self._checksums: dict[str, str] = {}
        self._files: dict[str, str] = {}
        self._aliases: dict[str, str] = {}
        self._headers: dict[str, dict[str, TensorInfo]] = {}
        self._infos: dict[str, TensorInfo] | None = None
        self._shape_map: dict[str, torch.Size] | None = None
        self._dtype_map: dict[str, torch.dtype] | None = None
        self._dims_map: dict[str, tuple[int, ...]] | None = None
        self._dtype_name_map: dict[str, str] | None = None
        self._chunked: dict[str, list[tuple[format_chunks.Box, str]]] = {}  # format 2: logical name -> its chunks

    # -- construction ----------------------------------------------------------------------

    @classmethod
    def _from_torchckpt(cls, directory: str, storage: Storage) -> CheckpointReader:
        reader = cls(directory, "torchckpt", storage)
        index = load_opened.load_index(directory, storage, defer_weight_map=True)  # checked in _info
        reader._index = index
        reader._names, reader._dtypes, reader._shapes = index.names, index.dtypes, index.shapes
        reader._aliases = index.aliases
        reader._name_keys = index.name_keys
        layout = index.layout
        if layout.chunked:
            reader._name_keys = None  # chunks are shown as the tensors they tile
            reader._chunked = layout.pieces
            chunks = layout.chunk_names
            kept = [i for i, n in enumerate(index.names) if n not in chunks]
            reader._names = [index.names[i] for i in kept] + list(layout.chunked)
            reader._dtypes = [index.dtypes[i] for i in kept] + [d for d, _ in layout.chunked.values()]
            reader._shapes = [index.shapes[i] for i in kept] + [s for _, s in layout.chunked.values()]
        return reader

    @classmethod
    def _from_safetensors(cls, files: list[str], path: str, kind: str, storage: Storage) -> CheckpointReader:
        reader = cls(path, kind, storage)
        for file in files:
            infos = foreign.headers(storage, file)
            reader._headers[file] = {t.name: t for t in infos}
            for t in infos:
                if t.name in reader._files:
                    raise CorruptCheckpointError(f"Tensor {t.name!r} is in both {reader._files[t.name]} and {file}.", path)
                reader._files[t.name] = file
                reader._names.append(t.name)
                reader._dtypes.append(t.dtype_name)
                reader._shapes.append(format_dtypes.shape_key(t.dims))
        return reader

    # -- tensors ---------------------------------------------------------------------------

    def get_variable_to_shape_map(self) -> dict[str, torch.Size]:
        """Every tensor name -> its shape, from the index (and headers) only."""
        if self._shape_map is None:  # models repeat a few shapes: build each torch.Size once
            import torch

            known = {t: torch.Size(format_dtypes.parse_shape_key(t, f"in {self.path}")) for t in set(self._shapes)}
            self._shape_map = self._by_name(self._shapes, known)
        return dict(self._shape_map)

    def get_variable_to_dtype_map(self) -> dict[str, torch.dtype]:
        """Every tensor name -> its dtype, from the index (and headers) only."""
        if self._dtype_map is None:
            known = {d: format_dtypes.str_to_dtype(d, f" in {self.path}") for d in set(self._dtypes)}
            self._dtype_map = self._by_name(self._dtypes, known)
        return dict(self._dtype_map)

    def get_variable_to_dims_map(self) -> dict[str, tuple[int, ...]]:
        """Every tensor name -> its shape as a tuple of ints, without importing torch (a command
        line answers in milliseconds, where importing torch alone takes over a second).

        Example:
            >>> import tempfile, torch, torchckpt
            >>> path = torchckpt.Checkpoint(w=torch.ones(2, 3)).write(tempfile.mkdtemp() + "/c")
            >>> torchckpt.load_checkpoint(path).get_variable_to_dims_map()
            {'w': (2, 3)}
        """
        return dict(self._dims())

    def get_variable_to_dtype_name_map(self) -> dict[str, str]:
        """Every tensor name -> its dtype's safetensors name (``"F32"``, ``"BF16"``), without
        importing torch (see :meth:`get_variable_to_dims_map`).

        Example:
            >>> import tempfile, torch, torchckpt
            >>> path = torchckpt.Checkpoint(w=torch.ones(2, 3)).write(tempfile.mkdtemp() + "/c")
            >>> torchckpt.load_checkpoint(path).get_variable_to_dtype_name_map()
            {'w': 'F32'}
        """
        return dict(self._dtype_names())

    def _dims(self) -> dict[str, tuple[int, ...]]:
        if self._dims_map is None:
            known = {t: format_dtypes.parse_shape_key(t, f"in {self.path}") for t in set(self._shapes)}
            self._dims_map = self._by_name(self._shapes, known)
        return self._dims_map

    def _dtype_names(self) -> dict[str, str]:
        if self._dtype_name_map is None:
            known = {d: format_dtypes.check_dtype(d, f" in {self.path}", self.path) for d in set(self._dtypes)}
            self._dtype_name_map = self._by_name(self._dtypes, known)
        return self._dtype_name_map

    def _by_name(self, column: list[str], known: dict[str, Any]) -> dict[str, Any]:
        """Every tensor name (aliases too) -> ``known`` of its entry in ``column`` (dtypes or shapes)."""
        built = next((m for m in (self._shape_map, self._dtype_map, self._dims_map, self._dtype_name_map)
                      if m is not None), None)
        keys = built if built is not None else self._name_keys
        if keys is not None and len(known) == 1:  # one value for every name (one dtype): keys copied, not hashed
            values = dict.fromkeys(keys, next(iter(known.values())))
            if built is not None:
                return values  # a built map's keys hold the aliases already
        else:
            values = dict(zip(self._names, map(known.__getitem__, column)))
        values.update((alias, values[target]) for alias, target in self._aliases.items())
        return values

    @property
    def names(self) -> list[str]:
        """Every tensor name, sorted."""
        return sorted([*self._names, *self._aliases])

    @property
    def _file_map(self) -> dict[str, str]:
        if not self._files and self._index is not None:
            self._files = self._index.shard_of()
        return self._files

    @property
    def index(self) -> format_index.Index | None:
        """The parsed, checked ``index.json`` of a torchckpt checkpoint (None for a safetensors file or
        a Hugging Face folder): the tools read its shard records and section from here."""
        return self._index

    @property
    def aliases(self) -> dict[str, str]:
        """Tied names: alias -> the stored name whose bytes it shares (tied weights are stored once)."""
        return dict(self._aliases)

    def locate(self, name: str) -> tuple[str, int, int]:
        """Where a tensor's bytes are: (file path, byte offset, byte count), as a restore reads them.

        Raises:
            VariableNotFoundError: no such tensor.
            CheckpointError: the tensor is stored as chunks (see :meth:`chunks_of`).
        """
        stored = self._resolve(name)
        if stored in self._chunked:
            raise CheckpointError(f"Tensor {name!r} is stored as {len(self._chunked[stored])} chunks, not in one place; "
                                  "see chunks_of(name).")
        info = self._info(stored)
        return self._file_path(info), info.start, info.nbytes

    def has_tensor(self, name: str) -> bool:
        return name in self._file_map or name in self._aliases or name in self._chunked

    def shard_of(self, name: str) -> str:
        """The shard file (base name) holding ``name``.

        Raises:
            CheckpointError: the tensor is stored as chunks in several shards (see :meth:`shards_of`).
        """
        files = self.shards_of(name)
        if len(files) != 1:
            raise CheckpointError(f"Tensor {name!r} is stored as chunks in {len(files)} shards; see shards_of(name).")
        return files[0]

    def shards_of(self, name: str) -> list[str]:
        """The shard files (base names) holding ``name`` or its chunks, sorted."""
        stored = self._resolve(name)
        if stored in self._chunked:
            return sorted({name_of(self._file_map[n]) for _, n in self._chunked[stored]})
        return [name_of(self._file_map[stored])]

    def chunks_of(self, name: str) -> list[tuple[tuple[int, ...], tuple[int, ...], str]]:
        """Where the parts of a tensor saved by several ranks are: ``(offsets, sizes, shard file)``
        for each chunk, in the checkpoint's order; one whole-tensor entry for any other tensor."""
        stored = self._resolve(name)
        if stored in self._chunked:
            return [(box[0], box[1], name_of(self._file_map[n])) for box, n in self._chunked[stored]]
        shape = self._dims()[stored]
        return [(tuple(0 for _ in shape), shape, name_of(self._file_map[stored]))]

    @property
    def world_size(self) -> int:
        """How many ranks saved the checkpoint (1 for a single process's, and for plain safetensors)."""
        return self._index.world_size if self._index is not None else 1

    def nbytes(self, name: str) -> int:
        return math.prod(self._dims()[name]) * format_dtypes.itemsize(self._dtype_names()[name])

    def _resolve(self, name: str) -> str:
        target = self._aliases.get(name, name)
        if target in self._file_map or target in self._chunked:
            return target
        close = difflib.get_close_matches(name, self.names, n=3)
        hint = f" Did you mean {' or '.join(repr(c) for c in close)}?" if close else ""
        raise VariableNotFoundError(f"Tensor {name!r} is not in {self.path}.{hint}", name, close)

    def _info(self, name: str) -> TensorInfo:
        """Where a stored tensor's bytes are: for a torchckpt checkpoint, the locations a restore
        uses (every shard header checked against the index once); for plain safetensors, its
        validated header entry."""
        if self._index is not None:
            if self._infos is None:  # the first read of bytes: what the inspection did not need is checked now
                recheck.check_weight_map(self._index, self.storage)
                with recheck.noticing(self.path, self._index.seal, self.storage), \
                        load_opened.OpenShards(self._index, self.storage) as shards:
                    self._infos = load_opened.read_shard_headers(self._index, shards)
            return self._infos[name]
        file = self._files[name]
        return self._headers[file][name]

    def _reading(self, path: str | None) -> contextlib.AbstractContextManager[None]:
        seal = self._index.seal if self._index is not None else None
        return recheck.reading(self.path, seal, self.storage, path)

    def _checksum(self, name: str) -> str | None:
        if self._index is None:
            return None
        if not self._checksums:
            self._checksums = dict(zip(self._index.names, self._index.checksums))
        return self._checksums.get(name)

    def _file_path(self, info: TensorInfo) -> str:
        return info.file if self.kind != "torchckpt" else join(self.path, info.file)

    def _open(self, info: TensorInfo) -> Source:
        path = self._file_path(info)
        try:
            return self.storage.open(path, "Shard")
        except FileNotFoundError:
            raise load_opened.missing_member(self.path, path, self.storage) if self._index is not None else \
                CorruptCheckpointError(f"{path} is missing.", path) from None

    def get_tensor(self, name: str) -> torch.Tensor:
        """Read one tensor, checking its size and (for torchckpt checkpoints) its checksum.

        Raises:
            VariableNotFoundError: no such tensor (with "Did you mean ...?").
            CorruptCheckpointError: the bytes do not match what the index recorded.
        """
        import torch

        stored = self._resolve(name)
        if stored in self._chunked:
            blocks = list(self._blocks(stored, _WHOLE))
            return blocks[0] if blocks else torch.empty(self.get_variable_to_shape_map()[stored],
                                                        dtype=self.get_variable_to_dtype_map()[stored])
        info = self._info(stored)
        with self._reading(self._file_path(info)):
            return stream.read_tensor(self._open(info), info, self._file_path(info), stored, self._checksum(stored))

    def iter_bytes(self, name: str, chunk_bytes: int = stream.PIECE_BYTES) -> Iterator[bytes]:
        """The stored bytes of tensor ``name`` (little-endian, row-major), in pieces of at most
        ``chunk_bytes``; checked against the recorded checksum once the last piece is read (an
        export streams them into a new file, so memory stays bounded).

        Raises:
            CorruptCheckpointError: the bytes end early or fail their checksum.
        """
        stored = self._resolve(name)
        if stored in self._chunked:
            from torchckpt import _tensorio

            for block in self._blocks(stored, chunk_bytes):
                view = _tensorio.byte_view(block)
                for offset in range(0, len(view), chunk_bytes):
                    yield bytes(view[offset : offset + chunk_bytes])
            return
        info = self._info(stored)
        with self._reading(self._file_path(info)):
            yield from stream.tensor_bytes(self._open(info), info, self._file_path(info), stored,
                                           self._checksum(stored), chunk_bytes)

    def iter_chunks(self, name: str, chunk_bytes: int = stream.PIECE_BYTES) -> Iterator[torch.Tensor]:
        """The tensor's elements as flat 1-D tensors of at most ``chunk_bytes``: bounded memory;
        checked against the recorded checksum once the last one is read (see :meth:`iter_bytes`)."""
        stored = self._resolve(name)
        if stored in self._chunked:
            for block in self._blocks(stored, chunk_bytes):
                flat = block.reshape(-1)
                per = max(1, chunk_bytes // max(1, flat.element_size()))
                yield from (flat[i : i + per].clone() for i in range(0, flat.numel(), per))
            return
        info = self._info(stored)
        with self._reading(self._file_path(info)):
            yield from stream.tensor_elements(self._open(info), info, self._file_path(info), stored,
                                              self._checksum(stored), chunk_bytes)

    def _blocks(self, stored: str, block_bytes: int) -> Iterator[torch.Tensor]:
        """A chunked tensor assembled block of rows by block of rows, every chunk checksummed."""
        from torchckpt._load import boxes

        assert self._index is not None
        saved = self._index.layout.chunked_info(stored, self._info)
        with self._reading(None):
            yield from boxes.row_blocks(saved, self._open, block_bytes, self._file_path)

    # -- the rest of the checkpoint --------------------------------------------------------

    @property
    def metadata(self) -> dict[str, Any]:
        """Format version, creation time, torch and torchckpt versions, metrics, object kinds, sizes."""
        if self._index is None:
            return {"format": self.kind, "tensors": len(self._names)}
        section = self._index.section
        extra = index_fields.metadata_of(self._index)
        return {
            "format": "torchckpt",
            "format_version": section.get("format_version"),
            "created": section.get("created"),
            "torch_version": section.get("torch_version"),
            "torchckpt_version": section.get("torchckpt_version"),
            "metrics": extra.get("metrics") if isinstance(extra, dict) else None,
            "objects": section.get("objects", {}),
            "total_size": self._index.raw.get("metadata", {}).get("total_size"),
            "shards": len(self._index.shards),
            "tensors": len(self._names) + len(self._aliases),
        }

    def get_state(self, rank: int = 0) -> Any:
        """The non-tensor state tree with exact types; tensors appear as :class:`TensorSpec`.

        Args:
            rank: whose per-rank values (``PerRank``, RNG states, data positions) a checkpoint saved
                by several ranks gives: a tensor of rank 1's is named ``<key>~r1``. A rank it has
                none for (``rank >= world_size``) gets a ``MissingPerRank`` placeholder.
        """
        if self._index is None:
            return {}
        shapes, dtypes = self.get_variable_to_shape_map(), self.get_variable_to_dtype_map()
        if not self._chunked:
            return load_opened.state_tree(self._index, lambda n: TensorSpec(n, dtypes[n], shapes[n]), rank)
        return _specs(load_opened.state_tree(self._index, _Ref, rank), shapes, dtypes)

    def get_value(self, key: str) -> Any:
        """A value of the state tree by its ``/`` key path (``"epoch"``, ``"g_sched/last_epoch"``; a str key
        spelled as another key of its dict, ``"1"`` beside ``1``, quoted: ``"cfg/'1'"``, as ``diff`` shows it)."""
        node = self.get_state()
        for part in key.split(keypath.SEP) if key else []:
            if isinstance(node, dict):
                # 1 and "1" share a part: the str key is then asked for quoted ('1'), as diff shows it
                spelled = dict(zip(keypath.distinct_parts(list(node)), node))
                for k in (k for k in node if type(k) is str):  # also asked for quoted, or not, where no other key is
                    for other in (keypath.escape_part(repr(k)), keypath.key_part(k)):
                        spelled.setdefault(other, k)
                if part not in spelled:
                    raise KeyError(f"{key!r} is not in the state of {self.path}")
                node = node[spelled[part]]
            elif isinstance(node, (list, tuple)) and part.isdigit() and int(part) < len(node):
                node = node[int(part)]
            else:
                raise KeyError(f"{key!r} is not in the state of {self.path}")
        return node

    def filter(self, pattern: str | None) -> list[str]:
        """Sorted names matching a shell-style glob (all names for None)."""
        return [n for n in self.names if pattern is None or fnmatch.fnmatchcase(n, pattern)]

    def __repr__(self) -> str:
        return f"CheckpointReader({self.path!r}, {len(self._names) + len(self._aliases)} tensors)"


_WHOLE = 2**62  # block size that makes one block of a whole tensor


class _Ref(str):
    """A stored tensor's name where the state tree holds a tensor (told apart from a plain str)."""


def _specs(node: Any, shapes: dict[str, torch.Size], dtypes: dict[str, torch.dtype]) -> Any:
    """A format-2 state tree with each tensor as its :class:`TensorSpec` (a chunked one by its
    logical name and global shape)."""
    if isinstance(node, format_chunks.ChunkedInfo):
        return TensorSpec(node.name, dtypes[node.name], shapes[node.name])
    if isinstance(node, _Ref):
        return TensorSpec(str(node), dtypes[node], shapes[node])
    if isinstance(node, dict):
        return {k: _specs(v, shapes, dtypes) for k, v in node.items()}
    if isinstance(node, (list, tuple)):
        items = [_specs(v, shapes, dtypes) for v in node]
        return items if isinstance(node, list) else tuple(items)
    return node


def _read_hf_index(path: str, storage: Storage) -> CheckpointReader:
    files, weight_map = foreign.hf_shards(path, storage)
    reader = CheckpointReader._from_safetensors(files, path, "huggingface", storage)
    foreign.check_hf_shards(path, weight_map, reader._files)
    return reader


def load_checkpoint(path: str | os.PathLike[str], *, storage_options: dict[str, Any] | None = None) -> CheckpointReader:
    """Open a checkpoint for inspection without reading any tensor data.

    Args:
        path: a torchckpt checkpoint directory, a directory a manager writes into (its latest
            checkpoint), a ``.safetensors`` file, a Hugging Face sharded folder or its
            ``*.safetensors.index.json``; a local path or a URL (``s3://bucket/run``).
        storage_options: passed to fsspec when ``path`` is a URL.

    Raises:
        CheckpointNotFoundError: nothing readable is at ``path``, or a save is writing it (a
            directory without an index is read as a plain ``.safetensors`` file only when no
            save or deletion is under way in it).
        CheckpointDeletedError: a deletion (a manager's retention) is removing ``path``.
        CorruptCheckpointError: the index or a header is malformed or hostile.
    """
    p = as_path(path)
    storage = storage_for(p, storage_options)
    kind, found = foreign.classify_path(p, storage)
    if kind == "huggingface":
        return _read_hf_index(found, storage)
    if kind == "safetensors":
        return CheckpointReader._from_safetensors([found], p, "safetensors", storage)
    return CheckpointReader._from_torchckpt(found, storage)


def list_variables(path: str | os.PathLike[str], *,
                   storage_options: dict[str, Any] | None = None) -> list[tuple[str, torch.Size]]:
    """Sorted ``(name, shape)`` pairs of a checkpoint's tensors (as TensorFlow's)."""
    shapes = load_checkpoint(path, storage_options=storage_options).get_variable_to_shape_map()
    return sorted(shapes.items())


def load_variable(path: str | os.PathLike[str], name: str, *,
                  storage_options: dict[str, Any] | None = None) -> torch.Tensor:
    """Read one tensor from a checkpoint; a trailing ``":0"`` is ignored (as TensorFlow's)."""
    if name.endswith(":0"):
        name = name[:-2]
    return load_checkpoint(path, storage_options=storage_options).get_tensor(name)

