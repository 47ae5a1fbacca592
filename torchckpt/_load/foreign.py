"""Checkpoints torchckpt did not write, opened for reading: a plain ``.safetensors`` file, or a
Hugging Face sharded folder through its ``*.safetensors.index.json``; and telling them apart from
a torchckpt checkpoint by the path the caller gave (:func:`classify_path`).

Their headers are validated as a torchckpt shard's are (``_load.opened.read_header``), and an
index's shard names must stay inside its folder: a downloaded folder is untrusted input like any
other. The reader (``torchckpt.reader``) builds its view from what these return.
"""

from __future__ import annotations

import functools
import re
from collections.abc import Mapping

from torchckpt._format import document as format_document
from torchckpt._format import spec as format_spec
from torchckpt._format.dtypes import TensorInfo
from torchckpt._format.spec import HF_SINGLE, INDEX_FILE
from torchckpt._history import members as history_members
from torchckpt._load import opened as load_opened
from torchckpt._paths import join, name_of, parent_of
from torchckpt._storage.base import Storage
from torchckpt._threads import gc_paused
from torchckpt.errors import CheckpointNotFoundError, CorruptCheckpointError, format_keys, shard_missing, unreadable

HF_INDEX_SUFFIX = ".safetensors.index.json"
# A shard of a sharded checkpoint (ours, with an upload's suffix, or Hugging Face's): never a whole one
SHARD_OF_SET = re.compile(r"model-\d{5}-of-\d{5}(-[0-9a-f]+)?" + re.escape(format_spec.SHARD_SUFFIX))


def classify_path(path: str, storage: Storage) -> tuple[str, str]:
    """What ``load_checkpoint(path)`` opens: ``("huggingface", its index)``, ``("safetensors", the
    file)``, or ``("torchckpt", the checkpoint directory)`` (a run directory's latest checkpoint).

    A directory without ``index.json`` holding one ``.safetensors`` file is that file, unless a
    save or a deletion is under way in it or it holds committed checkpoints: then it is read as a
    run directory, and its error says what is wrong.

    Raises:
        CheckpointNotFoundError: ``path`` is a file of no kind a checkpoint has, or nothing is there.
    """
    is_dir = storage.follows_to_dir(path)
    if not is_dir and storage.exists(path):
        if path.endswith(HF_INDEX_SUFFIX):
            return "huggingface", path
        if path.endswith(format_spec.SHARD_SUFFIX):
            return "safetensors", path
        if name_of(path) == INDEX_FILE:
            return "torchckpt", parent_of(path)
        raise CheckpointNotFoundError(f"{path} is neither a checkpoint directory, a .safetensors file nor an index.",
                                      path)
    if is_dir and not storage.exists(join(path, INDEX_FILE)):
        names = storage.list_names(path)
        unfinished = history_members.unfinished_error(path, names)

        @functools.cache
        def is_plain() -> bool:  # no save under way, no checkpoints: a folder of weights, not a run (asked once)
            return unfinished is None and not history_members.committed_members(path, None, storage)

        if HF_SINGLE in names and is_plain():  # as from_pretrained: the single file wins over an index
            return "safetensors", join(path, HF_SINGLE)
        hf = hf_index_in(path, names)
        if hf is not None:
            return "huggingface", hf
        singles = sorted(n for n in names if n.endswith(format_spec.SHARD_SUFFIX))
        if unfinished is not None:  # a save's or a deletion's shard is no plain safetensors file
            raise unfinished
        if len(singles) == 1 and is_plain():
            if SHARD_OF_SET.fullmatch(singles[0]):
                raise CorruptCheckpointError(
                    f"{path} holds {singles[0]}, a shard of a sharded checkpoint, but no index.json (deleted, or "
                    "not copied), so it cannot be read as a checkpoint: restore another one. To see the tensors "
                    f"of the shard itself, pass its path ({join(path, singles[0])}).", path)
            return "safetensors", join(path, singles[0])
    return "torchckpt", history_members.resolve_checkpoint(path, storage)


def headers(storage: Storage, file: str) -> list[TensorInfo]:
    """The tensors of the safetensors file ``file`` (a full path), from its validated header, in file order."""
    try:
        source = storage.open(file, "Shard")
    except FileNotFoundError:
        raise CorruptCheckpointError(shard_missing(file), file) from None
    except OSError as e:
        raise unreadable(file, e) from e
    try:
        infos, _, _ = load_opened.read_header(source, file)  # plain files are addressed by full path
    finally:
        source.close()
    return sorted(infos, key=lambda t: t.start)


def hf_index_in(directory: str, names: list[str]) -> str | None:
    """The Hugging Face index among ``directory``'s ``names``, if it holds one (several are refused:
    which to read?)."""
    found = sorted(n for n in names if n.endswith(HF_INDEX_SUFFIX))
    if len(found) > 1:
        raise CorruptCheckpointError(
            f"{directory} holds several Hugging Face indexes ({', '.join(found)}); pass the one to read.", directory
        )
    return join(directory, found[0]) if found else None


def hf_shards(path: str, storage: Storage) -> tuple[list[str], dict[str, str]]:
    """The shard files (full paths) a Hugging Face index names, and its map of tensor names to
    those full paths."""
    directory = parent_of(path)
    try:
        data = storage.read_file(path, format_spec.MAX_INDEX_SIZE, "Index")
    except OSError as e:
        raise unreadable(path, e, what="the Hugging Face index") from e
    with gc_paused():
        raw = format_document.parse_json(data, path, "Hugging Face index")
    weight_map = raw.get("weight_map") if isinstance(raw, dict) else None
    if not isinstance(weight_map, dict) or not all(isinstance(v, str) for v in weight_map.values()):
        raise CorruptCheckpointError(f"{path} has no 'weight_map' of tensor names to shard files.", path)
    files = {f: join(directory, format_spec.check_member_name(directory, f, "shard", name_of(path)))
             for f in set(weight_map.values())}
    return sorted(files.values()), {name: files[f] for name, f in weight_map.items()}


def check_hf_shards(index: str, weight_map: Mapping[str, str], held: Mapping[str, str]) -> None:
    """Refuse shards that disagree with their Hugging Face index: a tensor the index lists that no
    shard holds, one a shard holds that the index does not list, or one in another shard than the
    index says (``held``: name -> the file holding it; files are named as ``weight_map`` names them).

    Raises:
        CorruptCheckpointError: naming the index and the first few tensors.
    """
    problems = []
    for what, names in (("lists tensors its shards do not hold", sorted(weight_map.keys() - held.keys())),
                        ("does not list tensors its shards hold", sorted(held.keys() - weight_map.keys()))):
        if names:
            problems.append(f"{what}: {format_keys(names, 5)}")
    moved = sorted(n for n, f in held.items() if n in weight_map and weight_map[n] != f)
    if moved:
        problems.append("names another shard than the one holding " + ", ".join(
            f"{n} (listed in {name_of(weight_map[n])}, held by {name_of(held[n])})" for n in moved[:5])
            + (f" ... and {len(moved) - 5} more" if len(moved) > 5 else ""))
    if problems:
        raise CorruptCheckpointError(f"{index} disagrees with its shards: it {'; it '.join(problems)}. The folder "
                                     "is damaged or was put together from different saves; download or save it again.",
                                     index)
