"""Plain dictionaries in and out: the ``torch.save``/``torch.load`` habit, without pickle.

Most PyTorch code saves a dict (``{"model": model.state_dict(), "optimizer": ..., "epoch": 3}``)
and loads it back as a dict. :func:`save_state` writes such a dict as a torchckpt checkpoint
(safetensors shards and an index, atomically, nothing pickled), and :func:`load_state` reads any
checkpoint back as the nested dict ``torch.load`` would give for the same state: one written by
:func:`save_state`, by a :class:`~torchckpt.Checkpoint` (each tracked name a key holding its
``state_dict()``-shaped value), a ``.safetensors`` file or a Hugging Face folder (name -> tensor).

Why a dict and not any object: a checkpoint's state is a tree of named values, and its top-level
names are what ``inspect``, ``diff`` and a ``Checkpoint``'s restore match on; a dict gives them.
"""

from __future__ import annotations

import dataclasses
import os
import warnings
from collections import OrderedDict
from typing import Any

import torch

from torchckpt._dist import coordinator as dist_coordinator
from torchckpt._format import keypath, spec
from torchckpt._load import index_fields
from torchckpt._paths import as_directory, as_path, is_url
from torchckpt._save import capture as save_capture
from torchckpt._save import saver
from torchckpt._save.background import AsyncWriter
from torchckpt._save.options import SaveOptions, save_arguments
from torchckpt._storage.base import AlreadyCommitted
from torchckpt._storage.registry import storage_for
from torchckpt._tools import convert as convert_tool
from torchckpt.checkpoint import PER_RANK_KINDS, kind_of
from torchckpt.errors import CheckpointError, UnsupportedStateError
from torchckpt.reader import CheckpointReader, TensorSpec, load_checkpoint

__all__ = ["convert", "load_state", "save_state"]


def save_state(
    state: dict[Any, Any],
    path: str | os.PathLike[str],
    *,
    max_shard_size: int | str = spec.DEFAULT_MAX_SHARD_SIZE,
    progress: bool | None = None,
    storage_options: dict[str, Any] | None = None,
    process_group: Any = None,
    timeout_secs: float | None = None,
) -> str:
    """Write a nested dict of tensors and plain values as a checkpoint at the directory ``path``.

    The dict may hold tensors, ``state_dict()``s, and the plain values a :class:`Checkpoint`
    stores (int, float, bool, str, None, and lists, tuples and dicts of them), nested to any depth;
    it comes back from :func:`load_state` with the same types and keys in the same order. Written
    atomically (an existing checkpoint at ``path`` is replaced in one step), never pickled. With
    torch.distributed initialised on several ranks it is collective, as :meth:`Checkpoint.write`.

    Args:
        state: the dict to save (its top-level keys, str, are the checkpoint's names).
        path: the checkpoint directory (a local path or an fsspec URL).
        max_shard_size: bytes per shard, or a string such as ``"2GB"``.
        progress: show a progress bar (None: on a terminal, for saves over 256 MiB).
        storage_options: passed to fsspec when ``path`` is a URL.
        process_group, timeout_secs: as for :meth:`Checkpoint.write`; ``process_group=False`` saves from
            this process alone even when torch.distributed runs several (a rank-0-only save).

    Returns:
        ``path`` as a str.

    Raises:
        TypeError: ``state`` is not a dict, or a top-level key is not a str (the checkpoint's names;
            keys of any plain type are fine below).
        UnsupportedStateError: a value cannot be stored without pickle (a module, a lambda, an
            arbitrary object); its key path is named, and nothing is written.

    Example:
        >>> import tempfile, torch, torchckpt
        >>> path = torchckpt.save_state({"w": torch.ones(2), "epoch": 3}, tempfile.mkdtemp() + "/c")
        >>> torchckpt.load_state(path)
        {'w': tensor([1., 1.]), 'epoch': 3}
    """
    path = as_directory(path)
    _save_plain(state, path, max_shard_size, progress, storage_options, process_group, timeout_secs, replace=True)
    return path


def _save_plain(state: dict[str, Any], path: str, max_shard_size: int | str, progress: bool | None,
                storage_options: dict[str, Any] | None, process_group: Any, timeout_secs: float | None,
                replace: bool) -> None:
    """``save_state``'s write; without ``replace``, a checkpoint (or anything else) at ``path``, even
    one that appears while this one is written, raises ``AlreadyCommitted`` and is left as it is."""
    if not isinstance(state, dict):
        raise TypeError(f"save_state takes a dict (a state_dict, or a dict of them and plain values), not "
                        f"{type(state).__name__}; wrap it: save_state({{'value': ...}}, path).")
    names = [k for k in state if not isinstance(k, str)]
    if names:
        raise TypeError(f"save_state's top-level keys are the checkpoint's names and must be str; got {names[0]!r} "
                        f"({type(names[0]).__name__}). Keys of any plain type are fine one level down: "
                        f"save_state({{'state': {{{names[0]!r}: ...}}}}, path).")
    coord = dist_coordinator.coordinator_for(process_group, timeout_secs).call(
        "Saving " + path, {"call": "save_state", "path": path, **save_arguments(max_shard_size, False)})
    with coord.failures_shared():
        storage = storage_for(path, storage_options)
        options = dataclasses.replace(SaveOptions.checked(None, max_shard_size, progress, None, False), ordered=True,
                                      replace=replace)
        objects = {k: kind_of(v) for k, v in state.items()}
        source = saver.Source(lambda distributed: dict(state) if distributed else state, lambda: objects,
                              AsyncWriter, lambda: None, versions=lambda: save_capture.state_dict_versions(state) or None)
        saver.save(source, storage, path, coord, options)


def load_state(path: str | os.PathLike[str], *, map_location: str | torch.device | None = "cpu",
               storage_options: dict[str, Any] | None = None, rank: int | None = None) -> dict[Any, Any]:
    """Any checkpoint as the nested dict ``torch.load`` would give for the same state.

    - written by :func:`save_state`: the dict that was saved, with the same types;
    - written by a :class:`Checkpoint` (or a manager): each tracked name holding its
      ``state_dict()``-shaped value (``save_counter`` is left out: it is the checkpoint's own); a
      module's tensors come as a dict in ``state_dict()``'s order, and every other dict in the
      order saved too;
    - a ``.safetensors`` file or a Hugging Face folder: tensor name -> tensor.

    ``path`` may also be a manager's directory (its latest checkpoint). Every tensor is checked
    against its checksum as it is read; tensors that were tied when saved (the same view of one
    storage under two names) come back as one tensor under both names. A module's state dict
    (one a ``Checkpoint`` saved, or a ``state_dict()`` given to :func:`save_state`) comes back as
    an ``OrderedDict`` with the ``_metadata`` ``load_state_dict`` reads its modules' versions
    from. Tensors come back as plain, contiguous tensors without ``requires_grad``, as
    ``safetensors.torch.load_file`` gives them: an ``nn.Parameter`` or another subclass comes
    back as a ``torch.Tensor``, and views of one storage at other offsets or shapes as separate
    tensors.

    Args:
        path: a checkpoint, a directory of checkpoints, a ``.safetensors`` file or a Hugging Face
            folder (a local path or an fsspec URL).
        map_location: the device the tensors are put on (``"cpu"``, ``"cuda:0"``, a
            ``torch.device``); None leaves them on the CPU.
        storage_options: passed to fsspec when ``path`` is a URL.
        rank: whose per-rank values (``PerRank``, RNG states, data positions) come back from a
            checkpoint saved by several ranks (a single process's are rank 0's); by default the
            caller's rank in an initialized process group, else 0.

    Raises:
        CheckpointNotFoundError: nothing readable at ``path``.
        CorruptCheckpointError: the checkpoint is damaged (a tensor failing its checksum too).
        ValueError: the checkpoint holds per-rank values and none for the ``rank`` asked for (it
            was saved by fewer ranks), or ``rank`` is negative. By default, a rank it has none for
            gets rank 0's, with a warning.
    """
    device = torch.device(map_location) if map_location is not None else None
    reader = load_checkpoint(path, storage_options=storage_options)
    rank = _rank_for(reader, rank)
    read: dict[str, torch.Tensor] = {}

    def tensor(name: str) -> torch.Tensor:
        stored = reader.aliases.get(name, name)
        if stored not in read:
            t = reader.get_tensor(stored)
            read[stored] = t.to(device) if device is not None and t.device != device else t
        return read[stored]

    if reader.kind != "torchckpt":  # in the files' order, as safetensors.torch.load_file gives them (and convert)
        return {name: tensor(name) for name in sorted(reader.names, key=reader.locate)}
    state = _with_tensors(reader.get_state(rank), tensor)
    if isinstance(state, dict) and spec.SAVE_COUNTER not in _objects(reader):
        state.pop(spec.SAVE_COUNTER, None)
    versions = reader.index.module_versions() if reader.index is not None else None
    return _with_metadata(state, versions) if versions else state


def _rank_for(reader: CheckpointReader, rank: int | None) -> int:
    """The rank whose per-rank values :func:`load_state` gives: ``rank``, or the caller's (rank 0's,
    with a warning, where the checkpoint has none of the caller's: a larger job loading weights)."""
    asked = rank is not None
    rank = dist_coordinator.default_rank() if rank is None else rank
    if not isinstance(rank, int) or isinstance(rank, bool) or rank < 0:
        raise ValueError(f"rank={rank!r} must be an int of at least 0.")
    if reader.index is None or rank < reader.world_size or not _holds_per_rank(reader):
        return rank
    world = reader.world_size
    message = (f"{reader.path} was saved by {world} rank{'s' if world != 1 else ''} and holds per-rank values "
               f"(PerRank, RNG states, data positions), none of them rank {rank}'s")
    if asked:
        raise ValueError(f"{message}. Pass rank= one of 0..{world - 1} to take that rank's values.")
    warnings.warn(f"{message}: this process gets rank 0's (pass rank= to choose).", stacklevel=3)
    return 0


def _holds_per_rank(reader: CheckpointReader) -> bool:
    """Whether the checkpoint holds values of each rank's own (a single process's: rank 0's)."""
    if reader.index is not None and index_fields.per_rank_count(reader.index):
        return True
    if reader.world_size != 1 or reader.index is None:
        return False
    return bool(index_fields.one_process_per_rank(reader.index)) or \
        any(kind in PER_RANK_KINDS for kind in _objects(reader).values())  # a checkpoint saved before they were recorded


def _with_metadata(state: dict[str, Any], versions: dict[str, dict[str, int | None]]) -> dict[str, Any]:
    """``state`` with each module's state dict as ``state_dict()`` made it: an ``OrderedDict`` whose
    ``_metadata`` gives every module its saved ``_version`` (``Index.module_versions``; the
    modules' prefixes are found from the keys, with version 1 where none is recorded), which
    ``load_state_dict`` hands to each module's loader."""
    for key, recorded in versions.items():
        state = _replaced(state, keypath.split(key) if key else [], lambda node, r=recorded: _versioned(node, r))
    return state


def _versioned(node: Any, recorded: dict[str, int | None]) -> Any:
    if not isinstance(node, dict) or not all(type(k) is str for k in node):
        return node  # not a state dict here (a damaged or renamed record): nothing to attach
    out: OrderedDict[str, Any] = OrderedDict(node)
    prefixes = {k.rsplit(".", n)[0] for k in node for n in range(1, k.count(".") + 1)} | {""} | set(recorded)
    out._metadata = {p: {"version": recorded.get(p, 1)} for p in sorted(prefixes)}  # type: ignore[attr-defined]
    return out


def _replaced(node: Any, parts: list[str], change: Any) -> Any:
    """``node`` with ``change`` applied to its value at the key path ``parts`` (dicts and lists
    changed in place, a tuple on the way rebuilt); as it is where the path leads nowhere."""
    if not parts:
        return change(node)
    part, rest = parts[0], parts[1:]
    if isinstance(node, dict):
        key = next((k for k in node if keypath.key_part(k) == part), _NONE)
        if key is not _NONE:
            node[key] = _replaced(node[key], rest, change)
    elif isinstance(node, (list, tuple)) and part.isdigit() and int(part) < len(node):
        items = node if isinstance(node, list) else list(node)
        items[int(part)] = _replaced(node[int(part)], rest, change)
        return items if isinstance(node, list) else tuple(items)
    return node


_NONE = object()


def _objects(reader: CheckpointReader) -> dict[str, str]:
    objects = reader.metadata.get("objects")
    return objects if isinstance(objects, dict) else {}


def _with_tensors(node: Any, tensor: Any) -> Any:
    """The state tree with every :class:`TensorSpec` replaced by its tensor, types kept."""
    if isinstance(node, TensorSpec):
        return tensor(node.name)
    if isinstance(node, dict):
        out = type(node)()  # a dict, or the OrderedDict or Counter the tree kept
        for k, v in node.items():
            out[k] = _with_tensors(v, tensor)
        return out
    if isinstance(node, list):
        return [_with_tensors(v, tensor) for v in node]
    if isinstance(node, tuple):
        items = [_with_tensors(v, tensor) for v in node]
        return node if all(a is b for a, b in zip(items, node)) else tuple(items)  # a torch.Size stays one
    return node


def convert(
    src: str | os.PathLike[str],
    out: str | os.PathLike[str],
    *,
    max_shard_size: int | str = spec.DEFAULT_MAX_SHARD_SIZE,
    progress: bool | None = None,
    storage_options: dict[str, Any] | None = None,
) -> str:
    """Write a checkpoint of another kind as a torchckpt checkpoint at the new directory ``out``.

    ``src`` is a ``torch.save`` file (``.pt``, ``.pth``, ``.bin``, a Lightning ``.ckpt``), a
    ``.safetensors`` file or a Hugging Face folder (``model.safetensors``, its sharded index, or
    ``pytorch_model.bin``), recognised by its bytes. A pickle is read with
    ``torch.load(weights_only=True)``, which never runs code: one that needs any other global (a
    ``__reduce__`` payload, a class of the program that saved it) is refused by that global's
    name, and nothing is written. The result is written by :func:`save_state`, so
    :func:`load_state` of ``out`` gives what ``torch.load(src, weights_only=True)`` (or
    ``safetensors.torch.load_file``) gives, in the same order, with the plain types ``save_state``
    turns some values into (a ``pathlib`` path becomes a str, a NumPy scalar a Python number).
    It is one process's work, also under torch.distributed: no other rank takes part.

    Args:
        src: the file or folder to convert (a local path or an fsspec URL).
        out: the checkpoint directory to write; it must not exist (as for ``consolidate``).
        max_shard_size: bytes per shard, or a string such as ``"2GB"``.
        progress: show a progress bar (None: on a terminal, for saves over 256 MiB).
        storage_options: passed to fsspec for whichever of ``src`` and ``out`` is a URL.

    Returns:
        ``out`` as a str.

    Raises:
        CheckpointNotFoundError: nothing at ``src`` (also a dangling link), or a folder with no
            weights file.
        CheckpointError: ``out`` exists, or ``src`` is a torchckpt checkpoint already.
        UnsafePickleError: the pickle needs more than tensors and plain values (its ``global_name``).
        CorruptCheckpointError: ``src`` is truncated, damaged or of no kind convert reads, or a
            link in it leads to something other than a regular file (``src`` itself and the files
            of a Hugging Face folder are followed through links, as a hub cache snapshot needs).
        UnsupportedStateError: ``src`` holds a value no checkpoint stores (a set, bytes), or is not
            a dict with str keys; its key is named.

    Example:
        >>> import tempfile, torch, torchckpt
        >>> d = tempfile.mkdtemp()
        >>> torch.save({"w": torch.ones(2), "epoch": 3}, d + "/model.pt")
        >>> torchckpt.load_state(convert(d + "/model.pt", d + "/model"))
        {'w': tensor([1., 1.]), 'epoch': 3}
    """
    src, out = as_path(src), as_directory(out)
    source_options = storage_options if is_url(src) else None
    found = convert_tool.find_source(src, storage_for(src, source_options))
    target = storage_for(out, storage_options if is_url(out) else None)
    if target.exists(out) or target.is_dir(out):  # checked before reading anything
        raise CheckpointError(f"{out} already exists; convert into a new path.")
    converted = convert_tool.read_source(found, storage_for(src, source_options), source_options)
    try:  # never replaces: what appeared at ``out`` since the check above stays as it is
        _save_plain(converted.state, out, max_shard_size, progress, storage_options if is_url(out) else None, False, None,
                    replace=False)
    except UnsupportedStateError as e:
        raise UnsupportedStateError(f"Cannot convert {src}: {e}", e.key, e.value_type) from None
    except AlreadyCommitted:
        raise CheckpointError(f"{out} appeared while it was being written; nothing was replaced.") from None
    return out
