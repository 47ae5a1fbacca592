"""Export one tracked module's weights as a standard Hugging Face safetensors folder.

Bytes are copied from the checkpoint's shards into the new files range by range (the kernel does
the copy where it can), so memory stays bounded whatever the size of the model.
"""

from __future__ import annotations

import json
import os

from torchckpt import _atomic, _format, _tree
from torchckpt._progress import progress_bar
from torchckpt.errors import CheckpointError
from torchckpt.reader import load_checkpoint

HF_SINGLE = "model.safetensors"
HF_INDEX = "model.safetensors.index.json"


def export_module(path: str, obj: str, out: str, max_shard_size: int | str = "5GB", progress: bool | None = None) -> list[str]:
    """Write the module ``obj`` of checkpoint ``path`` to the folder ``out``; returns the files written.

    Names are relative to the module (``generator/net.0.weight`` becomes ``net.0.weight``), so
    ``module.load_state_dict(safetensors.torch.load_file(...), strict=True)`` works; tied weights
    are written under each of their names.
    """
    reader = load_checkpoint(path)
    if reader.kind != "torchckpt":
        raise CheckpointError(f"{path} is not a torchckpt checkpoint; it is already plain safetensors.")
    objects = reader.metadata.get("objects", {})
    if obj not in objects:
        raise CheckpointError(f"{path} has no object {obj!r}; it has: {', '.join(objects) or 'nothing'}.")
    if objects[obj] != "module":
        raise CheckpointError(f"{obj!r} in {path} is a {objects[obj]}, not a module; only modules can be exported.")
    prefix = _tree.escape_part(obj) + _tree.SEP
    names = [n for n in reader._names + list(reader._aliases) if n.startswith(prefix)]
    if not names:
        raise CheckpointError(f"Module {obj!r} in {path} has no tensors to export.")
    shapes, dtypes = reader.get_variable_to_shape_map(), reader.get_variable_to_dtype_map()
    local = {n: _tree.unescape_part(n[len(prefix):]) for n in names}
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
    for group in groups:
        group.sort(key=lambda n: -_format.itemsize(dtypes[n]))
    os.makedirs(out, exist_ok=True)
    single = len(groups) == 1
    files = [HF_SINGLE] if single else [_format.shard_name(i, len(groups)) for i in range(1, len(groups) + 1)]
    total = sum(reader.nbytes(n) for n in names)
    weight_map: dict[str, str] = {}
    with progress_bar(total, f"export {obj}", progress) as bar:
        for file, group in zip(files, groups):
            header = _format.encode_header([(local[n], dtypes[n], tuple(shapes[n]), reader.nbytes(n)) for n in group])
            target = os.path.join(out, file)
            tmp = _atomic.temporary_sibling(target)
            try:
                with open(tmp, "wb") as dst:
                    dst.write(header)
                    dst.flush()
                    for n in group:
                        info = reader._info(reader._resolve(n))
                        with open(reader._file_path(info), "rb") as src:
                            _copy_range(src.fileno(), dst.fileno(), info.start, info.nbytes)
                        bar.update(info.nbytes)
                        weight_map[local[n]] = file
                    dst.flush()
                    os.fsync(dst.fileno())
                os.replace(tmp, target)
            except BaseException:
                if os.path.exists(tmp):
                    os.unlink(tmp)
                raise
    if not single:
        index = {"metadata": {"total_size": total}, "weight_map": dict(sorted(weight_map.items()))}
        _atomic.write_file_atomic(os.path.join(out, HF_INDEX), (json.dumps(index, indent=2, sort_keys=True) + "\n").encode())
        files.append(HF_INDEX)
    _atomic.fsync_dir(out)
    return files


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


