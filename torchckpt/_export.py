"""Export one tracked module's weights as a standard Hugging Face safetensors folder.

What ``from_pretrained`` needs, and ``save_pretrained`` writes: names relative to the module, with
DDP's ``module.`` and ``torch.compile``'s ``_orig_mod.`` prefixes stripped (as a restore matches
them); tied weights written once, under their first name (the model ties the others again when it
loads); ``model.safetensors`` or shards plus ``model.safetensors.index.json``; and, given one, the
model's ``config.json``.

The folder is written as a temporary sibling and swapped into place in one step, so a re-export
never leaves a stale shard or index of an earlier one behind. Bytes are copied from the
checkpoint's shards range by range (the kernel does the copy where it can), so memory stays
bounded whatever the size of the model.
"""

from __future__ import annotations

import json
import os

from torchckpt import _atomic, _files, _format, _tree
from torchckpt._progress import progress_bar
from torchckpt.errors import CheckpointError, a_or_an
from torchckpt.reader import CheckpointReader, load_checkpoint

HF_SINGLE = "model.safetensors"
HF_INDEX = "model.safetensors.index.json"
HF_CONFIG = "config.json"
_EXPORT_FILES = (HF_INDEX, HF_CONFIG)  # with model*.safetensors: what an existing folder may hold to be replaced


def export_module(path: str, obj: str, out: str, max_shard_size: int | str = "5GB", progress: bool | None = None,
                  config: str | None = None) -> list[str]:
    """Write the module ``obj`` of checkpoint ``path`` to the folder ``out``; returns the files written.

    ``module.load_state_dict(safetensors.torch.load_file(...), strict=False)`` and Hugging Face's
    ``from_pretrained(out)`` load the result (tied names are written once, as ``save_pretrained``
    does; load with ``strict=True`` after tying them again).

    Raises:
        CheckpointError: no such module, names that collide once prefixes are stripped, or an
            ``out`` that holds files an export would not write (it is never overwritten then).
    """
    reader = load_checkpoint(path)
    names = _module_tensors(reader, path, obj)
    local = _local_names(reader, obj, names)
    limit = _format.parse_size(max_shard_size)
    groups: list[list[str]] = [[]]
    size = 0
    for n in names:
        nbytes = reader.nbytes(n)
        if groups[-1] and size + nbytes > limit:
            groups.append([])
            size = 0
        groups[-1].append(n)
        size += nbytes
    dtypes, shapes = reader.get_variable_to_dtype_map(), reader.get_variable_to_shape_map()
    for group in groups:
        group.sort(key=lambda n: -_format.itemsize(dtypes[n]))
    single = len(groups) == 1
    files = [HF_SINGLE] if single else [_format.shard_name(i, len(groups)) for i in range(1, len(groups) + 1)]
    _check_replaceable(out)
    with _atomic.temporary_directory(out) as tmp:
        weight_map: dict[str, str] = {}
        with progress_bar(sum(reader.nbytes(n) for n in names), f"export {obj}", progress) as bar:
            for file, group in zip(files, groups):
                header = _format.encode_header([(local[n], dtypes[n], tuple(shapes[n]), reader.nbytes(n)) for n in group])
                _write_shard(reader, os.path.join(tmp, file), header, group, bar.update)
                weight_map.update((local[n], file) for n in group)
        if not single:
            index = {"metadata": {"total_size": sum(reader.nbytes(n) for n in names)},
                     "weight_map": dict(sorted(weight_map.items()))}
            _write_new(os.path.join(tmp, HF_INDEX), (json.dumps(index, indent=2, sort_keys=True) + "\n").encode())
            files.append(HF_INDEX)
        if config is not None:
            _write_new(os.path.join(tmp, HF_CONFIG), _files.read_regular(config, 64 * 2**20, "Config file"))
            files.append(HF_CONFIG)
        _atomic.commit_directory(tmp, out, replace=True)
    return files


def _module_tensors(reader: CheckpointReader, path: str, obj: str) -> list[str]:
    """The stored tensors of module ``obj``, in the checkpoint's order; tied names only once."""
    if reader.kind != "torchckpt":
        raise CheckpointError(f"{path} is not a torchckpt checkpoint; it is already plain safetensors.")
    objects = reader.metadata.get("objects", {})
    if obj not in objects:
        raise CheckpointError(f"{path} has no object {obj!r}; it has: {', '.join(objects) or 'nothing'}.")
    if objects[obj] != "module":
        raise CheckpointError(f"{obj!r} in {path} is {a_or_an(str(objects[obj]))}, not a module; only modules can "
                              "be exported.")
    prefix = _tree.escape_part(obj) + _tree.SEP
    aliases = reader.aliases
    names = [n for n in reader.get_variable_to_shape_map() if n.startswith(prefix) and n not in aliases]
    if not names:
        raise CheckpointError(f"Module {obj!r} in {path} has no tensors to export.")
    return names


def _local_names(reader: CheckpointReader, obj: str, names: list[str]) -> dict[str, str]:
    """Checkpoint name -> the module's own state-dict key, prefixes stripped; collisions refused."""
    prefix = len(_tree.escape_part(obj) + _tree.SEP)
    local = {n: _tree.canonical_module_key(_tree.unescape_part(n[prefix:])) for n in names}
    seen: dict[str, str] = {}
    for name, key in local.items():
        if key in seen:
            raise CheckpointError(f"{seen[key]!r} and {name!r} both export as {key!r}; rename one of them.")
        seen[key] = name
    return local


def _check_replaceable(out: str) -> None:
    """``out`` may be replaced: it is missing, empty, or holds only what an export writes."""
    if not os.path.lexists(out):
        return
    if not _files.is_real_directory(out):
        raise CheckpointError(f"Cannot export to {out}: it exists and is not a directory.")
    others = [n for n in os.listdir(out) if not (n in _EXPORT_FILES or n.startswith("model") and
                                                 n.endswith(_format.SHARD_SUFFIX))]
    if others:
        raise CheckpointError(
            f"Cannot export to {out}: it holds files an export does not write ({', '.join(sorted(others)[:5])}), "
            "and the folder is replaced as a whole. Export to a new or empty folder."
        )


def _write_shard(reader: CheckpointReader, path: str, header: bytes, group: list[str], progress: object) -> None:
    fd = _files.create_exclusive(path)
    try:
        _write_all(fd, header)
        for name in group:
            file, start, nbytes = reader.locate(name)
            src = _files.open_regular(file, "Shard")
            try:
                _copy_range(src, fd, start, nbytes)
            finally:
                os.close(src)
            progress(nbytes)  # type: ignore[operator]
        os.fsync(fd)
    except OSError as e:
        raise _files.named(e, path) from e
    finally:
        os.close(fd)


def _write_new(path: str, data: bytes) -> None:
    fd = _files.create_exclusive(path)
    try:
        _write_all(fd, data)
        os.fsync(fd)
    finally:
        os.close(fd)


def _write_all(fd: int, data: bytes) -> None:
    view = memoryview(data)
    while view:
        view = view[os.write(fd, view):]


def _copy_range(src: int, dst: int, offset: int, count: int) -> None:
    copy = getattr(os, "copy_file_range", None)
    while count > 0:
        n = 0
        if copy is not None:
            try:
                n = copy(src, dst, min(count, 1 << 30), offset)
            except OSError:
                copy = None
        if not n:
            data = os.pread(src, min(count, 1 << 24), offset)
            if not data:
                raise CheckpointError("unexpected end of a shard while exporting")
            n = os.write(dst, data)
        offset += n
        count -= n

