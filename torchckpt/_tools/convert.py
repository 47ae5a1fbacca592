"""``torchckpt convert``: read a checkpoint of another kind as the dict ``save_state`` writes.

Three kinds of source, told apart by what the bytes are (a suffix only names a file; a ``.bin``
may be either kind and a ``.pt`` may be anything):

- a ``torch.save`` file (``.pt``, ``.pth``, a Lightning ``.ckpt``, ``pytorch_model.bin``): a zip
  archive, or a bare pickle for torch's legacy format. It is read with
  ``torch.load(weights_only=True)``, whose unpickler builds tensors, containers and plain values
  and refuses every other global, so a file's ``__reduce__`` payload never runs. A few plain-data
  classes that real checkpoints hold (Lightning hyperparameters: a ``pathlib`` path, a NumPy
  scalar or array, an ``argparse.Namespace``, Lightning's ``AttributeDict``) are allowed on top,
  by a fixed list of names chosen here, never by a name the file gives: constructing them runs no
  code of the file's choosing, and ``save_state`` turns each into the nearest plain type it stores.
  Anything else (an ``Enum`` member, a dataclass, a class of the program that saved the file) is
  refused by its name;
- a ``.safetensors`` file: its tensors by name, in its order, as ``safetensors.torch.load_file``
  gives them (``safe_open`` for a local file, whatever its name; the checkpoint reader for a URL). Its ``__metadata__`` (free-form strings; ``{"format": "pt"}`` from ``save_pretrained``) is
  not tensors and is not carried: ``load_file`` does not return it either;
- a Hugging Face folder (what ``save_pretrained`` writes): ``model.safetensors`` or its sharded
  ``*.safetensors.index.json``, else ``pytorch_model.bin`` or its ``pytorch_model.bin.index.json``
  shards (safetensors first, as ``from_pretrained`` does). ``config.json`` is not weights and is
  not read: ``torchckpt export --config`` puts it back beside exported weights.

Symbolic links: everywhere else torchckpt refuses a link inside a checkpoint or manager directory,
because such a directory may come from anyone. A conversion source is named by the user and only
read, and the most common Hugging Face folder on a machine, a hub cache snapshot
(``models--gpt2/snapshots/<hash>/``), is made of links to ``../../blobs/<sha>``. So convert follows
a link in two places only: ``SRC`` itself (to a regular file or a folder), and a file it reads in a
Hugging Face folder (weights, shards, index), to a regular file. The target is checked with
``os.stat`` after ``os.path.realpath`` and then opened without blocking (a FIFO cannot hang it), as
the real file, with the same bounded reads as any other; a link to a directory, a device, a FIFO, a
socket or nothing is refused by name, with what it points to.
"""

from __future__ import annotations

import argparse
import errno
import io
import json
import pathlib
import pickle
import re
import struct
import zipfile
import zlib
from collections import Counter, OrderedDict
from collections.abc import Iterator, Mapping
from contextlib import contextmanager
from dataclasses import dataclass, field
from typing import Any

import safetensors
import torch

from torchckpt._format import spec as format_spec
from torchckpt._format.spec import HF_INDEX, HF_SINGLE
from torchckpt._load import foreign as load_foreign
from torchckpt._load.foreign import HF_INDEX_SUFFIX
from torchckpt._paths import is_url, join
from torchckpt._storage.base import REGULAR_FILE, Source, Storage
from torchckpt._tools import pickled_numpy
from torchckpt.errors import (
    CheckpointError,
    CheckpointNotFoundError,
    CorruptCheckpointError,
    UnsafePickleError,
    UnsupportedStateError,
    short_repr,
)
from torchckpt.reader import load_checkpoint

HF_BIN = "pytorch_model.bin"
HF_BIN_INDEX = "pytorch_model.bin.index.json"
TORCH_FILE = "a torch.save file"
LIGHTNING_FILE = "a Lightning checkpoint"
SAFETENSORS_FILE = "a .safetensors file"
HF_FOLDER = "a Hugging Face folder"
LIGHTNING_KEY = "pytorch-lightning_version"  # what every Lightning checkpoint holds (Trainer.save_checkpoint)
_HEAD = 16  # bytes read to tell the kinds apart
_SOURCE = "Source file"
_GLOBAL = re.compile(r"GLOBAL ([\w.]+)")
_SOURCES = "a .pt/.pth/.ckpt/.bin file saved by torch.save, a .safetensors file or a Hugging Face folder"
_FOLLOWS = ("convert follows a symbolic link only as SRC itself (to a regular file or a folder) and as a file it reads "
            "in a Hugging Face folder (to a regular file, as in a Hugging Face cache snapshot)")


@dataclass(frozen=True)
class Member:
    """A file convert reads: ``path`` as the user's source names it, and ``real``, the file read:
    ``path`` itself, or the regular file its symbolic link resolves to (see the module docstring)."""

    path: str
    real: str

    def __str__(self) -> str:
        """The path for a message: the link, and what it points to."""
        return self.path if self.real == self.path else f"{self.path} (a link to {self.real})"


@dataclass(frozen=True)
class Found:
    """A source recognised from its bytes (or a folder's names): what to read, and how.

    ``kind`` is ``TORCH_FILE``, ``SAFETENSORS_FILE`` or ``HF_FOLDER``; ``files`` are the files to
    read in order (a Hugging Face index's shards, or the one file); ``pickled`` says they are
    ``torch.save`` files, ``zipped`` that they are zip archives (the format ``torch.load`` can map
    rather than read). ``index`` is the Hugging Face index the shards came from, and ``weight_map``
    its map of tensor names to those files' paths, which the shards must agree with.
    """

    path: str
    kind: str
    files: tuple[Member, ...]
    pickled: bool
    zipped: bool = True
    index: Member | None = None
    weight_map: Mapping[str, str] = field(default_factory=dict)


@dataclass(frozen=True)
class Converted:
    """What a source holds: the state to save, and which kind of source it was (for a summary)."""

    state: dict[str, Any]
    kind: str


def find_source(src: str, storage: Storage) -> Found:
    """Recognise ``src`` (checked in order: exists, kind), reading at most a few bytes of each file.

    Raises:
        CheckpointNotFoundError: nothing at ``src`` (a dangling link too), or a folder with no
            weights file convert reads.
        CheckpointError: ``src`` is a torchckpt checkpoint already.
        CorruptCheckpointError: a file that is none of the kinds (empty, or other bytes), a link to
            something other than a regular file, or a Hugging Face index naming missing shards.
    """
    if storage.follows_to_dir(src):  # a link to a folder is followed: its files are joined to src
        return _find_in_folder(src, storage)
    if not storage.exists(src):
        raise CheckpointNotFoundError(f"No file or folder at {src}; convert reads {_SOURCES}.", src)
    return _sniff(_follow(src, storage, source=True), storage)


def _follow(path: str, storage: Storage, source: bool = False) -> Member:
    """``path`` as it is read: itself, or, when it is a local symbolic link, the regular file it
    resolves to. A link to anything else is refused, naming what it points to, before a byte is read.

    Raises:
        CheckpointNotFoundError: ``source`` and a dangling link (there is nothing to convert).
        CorruptCheckpointError: a link to a directory, a FIFO, a device or a socket, a loop of
            links, or (not ``source``) a dangling one.
    """
    target = None if is_url(path) else storage.link_target(path)
    if target is None:
        return Member(path, path)  # read as it is: anything but a regular file is refused when opened
    real = target.real
    if target.kind == "nothing":
        message = (f"{path} is a symbolic link to {real}, where nothing is (a dangling link: its target was moved "
                   f"or deleted). {_FOLLOWS}. " + ("Pass the file itself." if source else
                                                   "Download the file again, or pass a folder that holds it."))
        raise (CheckpointNotFoundError if source else CorruptCheckpointError)(message, path)
    if target.kind.startswith("unreadable"):  # a loop of links, a target in a folder that may not be read
        raise CorruptCheckpointError(f"{path} is a symbolic link to {real}, which cannot be followed "
                                     f"({target.kind.removeprefix('unreadable (').rstrip(')')}). {_FOLLOWS}. "
                                     "Pass the file itself.", path)
    if target.kind == REGULAR_FILE:
        return Member(path, real)
    raise CorruptCheckpointError(
        f"{path} is a symbolic link to {real}, which is {target.kind}, not a regular file. {_FOLLOWS}; "
        "refusing to read it. Replace the link with the file itself.", path)


def _find_in_folder(src: str, storage: Storage) -> Found:
    names = set(storage.list_names(src))
    if format_spec.INDEX_FILE in names:
        raise CheckpointError(f"{src} is a torchckpt checkpoint already; there is nothing to convert (copy it, or "
                              "write it as a plain dict: torchckpt.save_state(torchckpt.load_state(src), out)).")
    indexes = sorted(n for n in names if n.endswith(HF_INDEX_SUFFIX))
    singles = sorted(n for n in names if n.endswith(format_spec.SHARD_SUFFIX))
    if HF_SINGLE in names or (len(singles) == 1 and not indexes):  # as from_pretrained: before an index
        member = _follow(join(src, HF_SINGLE if HF_SINGLE in names else singles[0]), storage)
        _sniff(member, storage, SAFETENSORS_FILE)
        return Found(src, HF_FOLDER, (member,), False)
    if HF_INDEX in names or len(indexes) == 1:
        return _shards(src, HF_INDEX if HF_INDEX in names else indexes[0], storage, SAFETENSORS_FILE)
    if HF_BIN_INDEX in names:
        return _shards(src, HF_BIN_INDEX, storage, TORCH_FILE)
    if HF_BIN in names:
        found = _sniff(_follow(join(src, HF_BIN), storage), storage, TORCH_FILE)
        return Found(src, HF_FOLDER, found.files, True, found.zipped)
    held = ", ".join(sorted(names)[:8]) + (f" and {len(names) - 8} more" if len(names) > 8 else "") or "nothing"
    raise CheckpointNotFoundError(
        f"{src} is a folder but not a Hugging Face folder: it holds none of {HF_SINGLE}, {HF_INDEX}, {HF_BIN} or "
        f"{HF_BIN_INDEX} (it holds {held}). Pass the weights file itself, or the folder save_pretrained wrote.", src)


def _shards(src: str, name: str, storage: Storage, kind: str) -> Found:
    """The shards a Hugging Face index names, in sorted order (as ``from_pretrained`` reads them),
    each checked to be a file of ``kind``."""
    index = _follow(join(src, name), storage)
    try:
        raw = json.loads(storage.read_file(index.real, format_spec.MAX_INDEX_SIZE, "Index"))
    except ValueError as e:
        raise CorruptCheckpointError(f"{index} is not JSON ({e}).", index.path) from None
    except RecursionError:  # no index save_pretrained writes nests more than three levels
        raise CorruptCheckpointError(f"{index} nests JSON too deeply to be a Hugging Face index.", index.path) from None
    weight_map = raw.get("weight_map") if isinstance(raw, dict) else None
    if not isinstance(weight_map, dict) or not all(isinstance(v, str) for v in weight_map.values()):
        raise CorruptCheckpointError(f"{index} has no 'weight_map' of tensor names to shard files.", index.path)
    if not weight_map:
        raise CorruptCheckpointError(f"{index} names no tensor (its 'weight_map' is empty), so from_pretrained would "
                                     "load nothing from this folder; it is damaged, or was not written by "
                                     "save_pretrained. Pass the weights file itself.", index.path)
    names = sorted({_plain_name(index, f) for f in weight_map.values()})
    missing = [f for f in names if not storage.exists(join(src, f))]
    if missing:
        raise CorruptCheckpointError(f"{index} names shards that are not in {src}: {', '.join(missing[:5])}. "
                                     "Download the folder again (a download stopped part way?).", index.path)
    files = tuple(_follow(join(src, f), storage) for f in names)
    zipped = all([_sniff(f, storage, kind).zipped for f in files])  # every shard checked, not the first that isn't
    return Found(src, HF_FOLDER, files, kind == TORCH_FILE, zipped, index,
                 {name: join(src, file) for name, file in weight_map.items()})


def _plain_name(index: Member, name: str) -> str:
    """A shard's name from an index: a file of the folder, never a path out of it."""
    if not name or name in (".", "..") or any(c in name for c in "/\\\0"):
        raise CorruptCheckpointError(f"{index} names the shard {name!r}, which is not a plain file name inside the "
                                     "folder; refusing to follow it.", index.path)
    return name


def _sniff(member: Member, storage: Storage, expected: str | None = None) -> Found:
    """A file's kind from its first bytes: a zip archive or a pickle (``torch.save``), or a safetensors
    header; a file of a Hugging Face folder must be of the ``expected`` kind its name says."""
    source = storage.open(member.real, _SOURCE)  # a regular file, opened without blocking (never a FIFO)
    try:
        head, size = source.read(0, _HEAD), source.size
    finally:
        source.close()
    if head.startswith(b"PK\x03\x04"):
        found = Found(member.path, TORCH_FILE, (member,), True, True)
    elif len(head) > 1 and head[0] == 0x80 and 2 <= head[1] <= 5:  # a pickle's PROTO opcode: torch's legacy format
        found = Found(member.path, TORCH_FILE, (member,), True, False)
    elif len(head) > 8 and head[8:9] == b"{" and int.from_bytes(head[:8], "little") <= size - 8:
        found = Found(member.path, SAFETENSORS_FILE, (member,), False)
    else:
        what = "is empty" if size == 0 else f"starts with {head[:8]!r}"
        raise CorruptCheckpointError(
            f"{member} is not a file convert reads: it {what}, which is neither a torch.save file (a zip archive, or a "
            f"pickle in torch's legacy format) nor a .safetensors file. convert reads {_SOURCES}.", member.path)
    if expected is not None and found.kind != expected:
        raise CorruptCheckpointError(f"{member} is {found.kind}, not {expected} as its name in a Hugging Face folder "
                                     "says; the folder is damaged. Download or save it again.", member.path)
    return found


def read_source(found: Found, storage: Storage, storage_options: dict[str, Any] | None = None) -> Converted:
    """Read a recognised source as a dict of tensors and plain values (nothing of the file's runs).

    Raises:
        UnsafePickleError: a pickle that needs a global beyond tensors and plain values.
        CorruptCheckpointError: a file ``torch.load`` or ``safetensors`` cannot read (truncated,
            damaged), or shards that disagree with their index.
        UnsupportedStateError: a ``torch.save`` file that does not hold a dict with str keys.
    """
    state: dict[str, Any] = {}
    held: dict[str, str] = {}  # name -> the shard holding it, as the index names the shard
    for member in found.files:  # one file's dict, or a Hugging Face index's shards one after another
        part = _torch_dict(member, storage, found.zipped) if found.pickled else _tensors(member, storage_options)
        if type(part) in (OrderedDict, Counter) and len(found.files) == 1:  # its type kept, as save_state keeps it
            fresh: dict[str, Any] = OrderedDict() if type(part) is OrderedDict else Counter()
            if "_metadata" in vars(part):  # a saved ``state_dict()``: its modules' versions are kept too
                fresh._metadata = vars(part)["_metadata"]  # type: ignore[attr-defined]
            state = fresh
        twice = [name for name in part if name in state]
        if twice:
            raise CorruptCheckpointError(f"{member} holds {', '.join(twice[:5])}, which another shard of {found.path} "
                                         "holds too; the folder is damaged. Download or save it again.", member.path)
        for name, value in part.items():  # assigned: a Counter's own update() would add to its counts
            state[name] = value
        held.update(dict.fromkeys(part, member.path))
    if found.index is not None:
        load_foreign.check_hf_shards(found.index.path, found.weight_map, held)
    kind = LIGHTNING_FILE if found.kind == TORCH_FILE and LIGHTNING_KEY in state else found.kind
    return Converted(state, kind)


def _torch_dict(member: Member, storage: Storage, zipped: bool) -> dict[str, Any]:
    loaded = _torch_load(member, storage, zipped)
    if not isinstance(loaded, dict):
        raise UnsupportedStateError(
            f"{member} holds {type(loaded).__module__}.{type(loaded).__qualname__}, not a dict; a checkpoint is a "
            "dict of named values. Load it with torch.load(..., weights_only=True) and save "
            "{'value': it} with torchckpt.save_state.", "", type(loaded))
    keys = [k for k in loaded if not isinstance(k, str)]
    if keys:
        raise UnsupportedStateError(
            f"{member} holds a dict whose key {short_repr(keys[0])} ({type(keys[0]).__name__}) is not a str; the top-level "
            "keys are the checkpoint's names. Load it with torch.load(..., weights_only=True) and save "
            "{'state': it} with torchckpt.save_state.", short_repr(keys[0]), type(keys[0]))
    return loaded


def _tensors(member: Member, storage_options: dict[str, Any] | None) -> dict[str, torch.Tensor]:
    """A ``.safetensors`` file's tensors in ``load_file``'s order: a local file (the real one a link
    resolves to, whatever its name) through ``safe_open``, a URL through the reader."""
    if is_url(member.path):
        reader = load_checkpoint(member.path, storage_options=storage_options)
        return {name: reader.get_tensor(name) for name in sorted(reader.names, key=reader.locate)}
    try:
        with safetensors.safe_open(member.real, "pt") as f:
            names = f.offset_keys() if hasattr(f, "offset_keys") else f.keys()  # load_file's order, by version
            return {name: f.get_tensor(name) for name in names}
    except safetensors.SafetensorError as e:
        raise CorruptCheckpointError(f"{member} is not a valid .safetensors file: {e}.", member.path) from None


def _torch_load(member: Member, storage: Storage, zipped: bool) -> Any:
    """``torch.load(weights_only=True)``, mapped from the file when it is a local zip archive (and
    read through the storage from a URL, or from a file torch would take for safetensors by its name)."""
    path = member.real
    if zipped:
        _check_archive(member, storage)
    try:
        with plain_types():
            if is_url(path) or path.endswith(format_spec.SHARD_SUFFIX):
                source = storage.open(path, _SOURCE)
                try:
                    loaded = torch.load(io.BufferedReader(_SourceFile(source)), map_location="cpu", weights_only=True)
                finally:
                    source.close()
            else:
                loaded = torch.load(path, map_location="cpu", weights_only=True, mmap=zipped)
        return pickled_numpy.resolved(loaded)
    except pickled_numpy.ExpansionError as e:
        raise UnsupportedStateError(
            f"{member} holds {e}, which a checkpoint does not store, so nothing was written. If you trust the "
            "file, load it yourself with torch.load(path, weights_only=True) and save what it holds, flattened, "
            "with torchckpt.save_state.", "", type(e)) from None
    except pickled_numpy.NumpyPickleError as e:
        raise UnsafePickleError(
            f"{member} holds {e}: torchckpt rebuilds NumPy values of plain dtypes only (numbers, bool, text, dates), "
            "from their bytes alone, never from a file's description of their memory, so nothing was written. If "
            "you trust the file, "
            "load it yourself with torch.load(path, weights_only=False) and save the tensors and plain values "
            "with torchckpt.save_state.", member.path, None) from None
    except OSError as e:
        if e.errno == errno.EINVAL:  # torch.load's own word for bytes it cannot map (an archive cut short)
            raise _corrupt(member, e) from None
        raise  # the storage's: not found, no access, an I/O error
    except pickle.UnpicklingError as e:
        if "weights only" not in str(e).lower():
            raise _corrupt(member, e) from None
        raise _unsafe(member, e) from None
    except Exception as e:  # noqa: BLE001 - torch.load's failures on damaged bytes are many and undocumented
        raise _corrupt(member, e) from None


_CHECK_BYTES = 1 << 20  # read at a time while checking an archive


def _check_archive(member: Member, storage: Storage) -> None:
    """Every entry of a ``torch.save`` zip archive read once against its CRC-32, where it has one
    (``set_crc32_options(False)`` writes 0; ``torch.load`` checks none: a flipped bit in a tensor's bytes would be converted, under new checksums that
    ``verify`` then finds intact). One more read of the file; from a local one, the load that
    follows finds it in the page cache."""
    source = storage.open(member.real, _SOURCE)
    try:
        with zipfile.ZipFile(io.BufferedReader(_SourceFile(source), _CHECK_BYTES)) as archive:
            for info in archive.infolist():
                if info.CRC == 0 and info.file_size:  # saved with torch.serialization.set_crc32_options(False)
                    continue
                with archive.open(info) as entry:
                    while entry.read(_CHECK_BYTES):
                        pass
    except (zipfile.BadZipFile, zipfile.LargeZipFile, EOFError, ValueError, struct.error, OverflowError,
            zlib.error, NotImplementedError) as e:
        raise CorruptCheckpointError(
            f"{member} is damaged: its zip archive does not check ({type(e).__name__}: {e}). The file is truncated "
            "or damaged (copy or download it again); nothing was written.", member.path) from None
    finally:
        source.close()


def _unsafe(member: Member, error: Exception) -> UnsafePickleError:
    text = str(error)
    match = _GLOBAL.search(text)
    name = match.group(1) if match else None
    if name is not None:
        needs = (f"needs {name} to be unpickled, which is not a tensor or a plain value (code, or a class such "
                 "as an Enum or a dataclass of the program that saved it)")
    else:
        _, marker, rest = text.partition("WeightsUnpickler error:")  # torch puts its reason on the lines after it
        detail = " ".join(rest.split("Check the documentation")[0].split()) if marker else ""
        detail = detail or (text.splitlines()[0] if text else type(error).__name__)
        needs = f"was refused by torch.load(weights_only=True) ({detail})"
    return UnsafePickleError(
        f"{member} {needs}: torchckpt never unpickles arbitrary code, so nothing in the file ran and nothing was "
        "written. If you trust the file, load it yourself with torch.load(path, weights_only=False) and save the "
        "tensors and plain values with torchckpt.save_state.", member.path, name)


def _corrupt(member: Member, error: Exception) -> CorruptCheckpointError:
    first = " ".join(str(error).split()).split(". ")[0].rstrip(".") or type(error).__name__
    return CorruptCheckpointError(f"{member} cannot be read by torch.load: {type(error).__name__}: {first}. The file "
                                  "is truncated or damaged, or was not written by torch.save.", member.path)


def _plain_globals() -> list[Any]:
    """The plain-data classes allowed on top of torch's weights-only types, each under the names
    pickles give it: a path as the pure path of its flavour (so a Windows path reads on Linux), an
    ``argparse.Namespace``, Lightning's ``AttributeDict`` as a dict (Lightning is never imported),
    and NumPy's scalars, arrays and dtypes of plain number, text and date types, rebuilt by
    :mod:`torchckpt._tools.pickled_numpy` (never by NumPy's unpickling, which trusts the file)."""
    allowed: list[Any] = [argparse.Namespace]
    for module in ("pathlib", "pathlib._local"):  # Python 3.13 pickles paths from pathlib._local
        allowed += [(pathlib.PurePosixPath, f"{module}.{name}") for name in ("PurePosixPath", "PosixPath")]
        allowed += [(pathlib.PureWindowsPath, f"{module}.{name}") for name in ("PureWindowsPath", "WindowsPath")]
    allowed += [(dict, f"{module}.AttributeDict") for module in (
        "lightning.fabric.utilities.data", "lightning_fabric.utilities.data",
        "lightning.pytorch.utilities.parsing", "pytorch_lightning.utilities.parsing")]
    allowed += pickled_numpy.globals_for_numpy()  # stand-ins that check what the pickle says, not NumPy's own
    return allowed


@contextmanager
def plain_types() -> Iterator[None]:
    """torch's weights-only unpickler, with the plain-data classes of :func:`_plain_globals` allowed."""
    safe_globals = getattr(torch.serialization, "safe_globals", None)  # torch >= 2.5
    if safe_globals is None:
        yield
        return
    with safe_globals(_plain_globals()):
        yield


class _SourceFile(io.RawIOBase):
    """A remote file as the seekable binary file ``torch.load`` reads (it seeks within a zip archive)."""

    def __init__(self, source: Source) -> None:
        super().__init__()
        self._source, self._at = source, 0

    def readable(self) -> bool:
        return True

    def seekable(self) -> bool:
        return True

    def tell(self) -> int:
        return self._at

    def seek(self, offset: int, whence: int = io.SEEK_SET) -> int:
        base = {io.SEEK_SET: 0, io.SEEK_CUR: self._at, io.SEEK_END: self._source.size}[whence]
        self._at = max(0, base + offset)
        return self._at

    def readinto(self, buffer: Any) -> int:
        view = memoryview(buffer).cast("B")
        data = self._source.read(self._at, min(len(view), max(0, self._source.size - self._at)))
        view[: len(data)] = data
        self._at += len(data)
        return len(data)
