"""Export one tracked module's weights (or a state dict's) as a standard Hugging Face safetensors folder.

What ``from_pretrained`` needs, and ``save_pretrained`` writes: names relative to the module, with
DDP's ``module.`` and ``torch.compile``'s ``_orig_mod.`` prefixes stripped (as a restore matches
them); tied weights written once, under their first name (the model ties the others again when it
loads); ``model.safetensors`` or shards plus ``model.safetensors.index.json``; and, given one, the
model's ``config.json``. A checkpoint that holds a state dict rather than a module (one written by
``torchckpt convert`` or ``save_state``) exports a tracked dict of tensors by its name, or, with no
object named, every tensor under its own name: a Hugging Face folder converted and exported again
is the folder it was.

On a local filesystem the folder is written as a temporary sibling and swapped into place in one
step, so a re-export never leaves a stale shard or index of an earlier one behind; on an object
store its old files are deleted first and the new ones uploaded, the index last. Bytes are
streamed from the checkpoint's shards piece by piece (and checked against their checksums), so
memory stays bounded whatever the size of the model; a tensor saved by several ranks is assembled
from its chunks block by block. Either side may be a URL.
"""

from __future__ import annotations

import json
from collections.abc import Callable

from torchckpt._format import dtypes as format_dtypes
from torchckpt._format import keypath, spec
from torchckpt._format.spec import HF_CONFIG, HF_INDEX, HF_SINGLE
from torchckpt._paths import as_directory, join
from torchckpt._progress import progress_bar
from torchckpt._save import plan as save_plan
from torchckpt._save import write as save_write
from torchckpt._save.options import parse_size
from torchckpt._storage.base import Storage
from torchckpt.errors import CheckpointError, a_or_an
from torchckpt.reader import CheckpointReader

_CONFIG_LIMIT = 64 * 2**20  # the largest config.json copied into the folder


def export_module(reader: CheckpointReader, obj: str | None, out: str, storage: Storage,
                  max_shard_size: int | str = spec.DEFAULT_MAX_SHARD_SIZE, progress: bool | None = None,
                  config: Callable[[int], bytes] | None = None) -> list[str]:
    """Write the module ``obj`` of the checkpoint ``reader`` reads to the folder ``out`` (a tracked
    dict of tensors too; None: every tensor of the checkpoint); returns the files written.

    ``module.load_state_dict(safetensors.torch.load_file(...), strict=False)`` and Hugging Face's
    ``from_pretrained(out)`` load the result (tied names are written once, as ``save_pretrained``
    does; load with ``strict=True`` after tying them again).

    Args:
        reader: the checkpoint (``load_checkpoint`` of any path it takes).
        storage: the storage that holds ``out`` (the command line resolves it from the path).
        config: reads the ``config.json`` to copy into the folder, given a size limit; called once
            the export is known to be possible, before anything is written. None: the folder's own
            ``config.json``, if it has one (an earlier export, or ``save_pretrained``'s), is kept.

    Raises:
        CheckpointError: no such module, names that collide once prefixes are stripped, or an
            ``out`` that holds files an export would not write (it is never overwritten then).
    """
    path, out = reader.path, as_directory(out)
    names = _module_tensors(reader, path, obj)
    local = _local_names(reader, obj, names)
    dtypes, shapes = reader.get_variable_to_dtype_map(), reader.get_variable_to_shape_map()
    rows = [(n, reader.nbytes(n), format_dtypes.itemsize(dtypes[n])) for n in names]
    groups = [s.names for s in save_plan.plan_shards(rows, parse_size(max_shard_size))]
    single = len(groups) == 1
    files = [HF_SINGLE] if single else [spec.shard_name(i, len(groups)) for i in range(1, len(groups) + 1)]
    _check_replaceable(out, storage)
    kept, given = join(out, HF_CONFIG), config is not None
    if config is None and storage.exists(kept):  # an earlier folder's (save_pretrained's): the weights are replaced
        config = lambda limit: storage.read_file(kept, limit, "config.json")  # noqa: E731 - and it is kept
    config_bytes = _checked_config(config(_CONFIG_LIMIT), "The --config file" if given else f"{kept}, kept as no "
                                   "--config was given,") if config is not None else None
    stage = storage.stage(out, replace=True)
    try:
        sizes: dict[str, int] = {}
        weight_map: dict[str, str] = {}
        with progress_bar(sum(reader.nbytes(n) for n in names), f"export {obj or ''}".rstrip(), progress) as bar:
            for file, group in zip(files, groups):
                entries = [(local[n], dtypes[n], tuple(shapes[n]), reader.nbytes(n)) for n in group]
                record, _ = save_write.stream_shard(stage, file, entries, group, reader.iter_bytes, bar.update)
                sizes[file] = record["size"]
                weight_map.update((local[n], file) for n in group)
        if config_bytes is not None:
            stage.write_file(HF_CONFIG, config_bytes)
            files.append(HF_CONFIG)
        if not single:
            index = {"metadata": {"total_size": sum(reader.nbytes(n) for n in names)},
                     "weight_map": dict(sorted(weight_map.items()))}
            stage.write_index(HF_INDEX, [(json.dumps(index, indent=2, sort_keys=True) + "\n").encode()])
            files.insert(len(groups), HF_INDEX)
        _check_replaceable(out, storage, meanwhile=True)  # someone's files put there while it was written
        stage.commit(sizes)
    except BaseException:
        stage.discard()
        raise
    return files


def _checked_config(data: bytes, what: str = "The --config file") -> bytes:
    """The ``config.json`` bytes, once they are a JSON object: ``from_pretrained`` reads nothing else,
    and a wrong file (a tokenizer's, a truncated one) would otherwise surface only when it loads."""
    try:
        value = json.loads(data)
    except ValueError as e:  # JSONDecodeError, and bytes that are not UTF-8
        raise CheckpointError(f"{what} is not valid JSON ({e}); pass the model's config.json (--config).") from None
    except RecursionError:
        raise CheckpointError(f"{what} nests JSON too deeply to be a model's config.json; pass the model's "
                              "config.json (--config).") from None
    if not isinstance(value, dict):
        raise CheckpointError(f"{what} holds a JSON {type(value).__name__}, not an object; pass the model's "
                              "config.json (--config).")
    return data


def _module_tensors(reader: CheckpointReader, path: str, obj: str | None) -> list[str]:
    """The stored tensors of ``obj`` (a module, or a dict of tensors; None: the whole checkpoint), in
    the checkpoint's order; a name tied to another of them only once (the model ties it again), one
    tied to a tensor outside them under its own name (a module tracked twice)."""
    if reader.kind != "torchckpt":
        raise CheckpointError(f"{path} is not a torchckpt checkpoint; it is already plain safetensors.")
    prefix = ""
    if obj is not None:
        objects = reader.metadata.get("objects", {})
        if obj not in objects:
            raise CheckpointError(f"{path} has no object {obj!r}; it has: {', '.join(objects) or 'nothing'}.")
        if objects[obj] not in ("module", "container"):
            raise CheckpointError(f"{obj!r} in {path} is {a_or_an(str(objects[obj]))}, not a module or a dict of "
                                  "tensors; name one of those, or no object to export every tensor.")
        prefix = keypath.escape_part(obj) + keypath.SEP
    aliases = reader.aliases
    names = [n for n in reader.get_variable_to_shape_map()
             if n.startswith(prefix) and not (n in aliases and aliases[n].startswith(prefix))]
    if not names:
        raise CheckpointError(f"{obj!r} in {path} has no tensors to export." if obj is not None else
                              f"{path} has no tensors to export.")
    return names


_WRAPPER = "module."  # DDP's only child


def _local_names(reader: CheckpointReader, obj: str | None, names: list[str]) -> dict[str, str]:
    """Checkpoint name -> the module's own state-dict key, wrappers' prefixes stripped (without
    ``obj``, every tensor under its own name: a converted Hugging Face folder exports back as it
    was); collisions refused."""
    if obj is None:
        local = {n: keypath.unescape_part(n) for n in names}
    else:
        prefix = len(keypath.escape_part(obj) + keypath.SEP)
        local = {n: keypath.canonical_module_key(keypath.unescape_part(n[prefix:]), ddp=False) for n in names}
        if all(key.startswith(_WRAPPER) for key in local.values()):  # a DDP wrapper's keys: all under its module
            local = {n: key[len(_WRAPPER):] for n, key in local.items()}  # (a child named module has siblings)
    seen: dict[str, str] = {}
    for name, key in local.items():
        if key in seen:
            raise CheckpointError(f"{seen[key]!r} and {name!r} both export as {key!r}; rename one of them.")
        seen[key] = name
    return local


def _check_replaceable(out: str, storage: Storage, meanwhile: bool = False,
                       ignored: Callable[[str], bool] = lambda name: False) -> None:
    """``out`` may be replaced: it is missing, empty, or an earlier export (weights, and nothing an
    export does not write: a lone ``config.json`` is someone's own, not an export's). Checked before
    anything is written and again right before the commit (``meanwhile``): files an export does not
    write that appeared there in between (a user's folder, notes put beside an earlier export) are
    left alone too. Another export committed there meanwhile is replaced, as a later save replaces
    a checkpoint: the last export wins."""
    if not storage.exists(out) and not storage.is_dir(out):
        return
    if meanwhile:
        try:
            _check_replaceable(out, storage, ignored=spec.is_pending_marker)  # on an object store: the stage's own
        except CheckpointError as e:
            raise CheckpointError(f"{e} It appeared while the export was being written; nothing was replaced.") from e
        return
    if not storage.is_dir(out):
        raise CheckpointError(f"Cannot export to {out}: it exists and is not a directory.")
    names = [n for n in storage.list_names(out) if not ignored(n)]
    others = [n for n in names if not spec.is_export_member(n)]  # model_ema.safetensors too: not an export's
    weights = [n for n in names if spec.is_export_member(n) and n != HF_CONFIG]
    if others:
        raise CheckpointError(
            f"Cannot export to {out}: it holds files an export does not write ({', '.join(sorted(others)[:5])}), "
            "and the folder is replaced as a whole. Export to a new or empty folder."
        )
    if names and not weights:
        raise CheckpointError(
            f"Cannot export to {out}: it holds {', '.join(sorted(names)[:5])} but no weights, so it is no earlier "
            "export, and the folder is replaced as a whole. Export to a new or empty folder (with --config to "
            "write a config.json beside the weights)."
        )
