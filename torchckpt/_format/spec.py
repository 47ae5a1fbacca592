"""Every name, version, limit and separator of the on-disk format, in one place.

A checkpoint is a directory holding ``index.json`` and one or more safetensors shards. Every
shard is a plain safetensors file (``safetensors.safe_open`` reads it); the index is a Hugging
Face sharded index (``metadata.total_size`` and ``weight_map``) with a ``torchckpt`` section that
adds the format version, the typed JSON tree of all non-tensor state, and integrity data.
``docs/format.md`` is the full specification. Beside this module: ``dtypes`` (what a tensor is on
disk), ``header`` (shard headers), ``document`` (the JSON files' layout and seal), ``index`` (the
index schema), ``tree`` (the typed state tree) and ``chunks`` and ``blocks`` (formats 2 and 3).

Why one module of names: a reader, a writer, a backend's cleanup and a tool must agree on every
file name and marker, so none of them spells one as a literal of its own.
"""

from __future__ import annotations

import os
import re
import unicodedata
from typing import Any

from torchckpt.errors import CorruptCheckpointError

INDEX_FILE = "index.json"  # a checkpoint directory's index; its existence is the commit
STATE_FILE = "checkpoints.json"  # a directory of checkpoints: the latest one and a manager's history
STATE_FORMAT = "torchckpt.checkpoints"  # the state file's "format" key
STATE_VERSION = 1  # the state file's "version" key
LOCK_FILE = ".torchckpt.lock"  # a manager's claim on its directory (an flock, or a lease object)
PENDING_FILE = ".torchckpt-pending"  # on an object store: a checkpoint being uploaded, removed once committed
# (``.torchckpt-pending-<tag>``, one per writer: see ``is_pending_marker``)
DELETING_FILE = ".torchckpt-deleting"  # on an object store: a checkpoint being deleted, naming what to delete
TMP_MARKER = ".torchckpt-tmp-"  # on a file system: ``<name>.torchckpt-tmp-<pid>-h<host>-<random>``, being written
OLD_MARKER = ".torchckpt-old-"  # on a file system: ``<name>.torchckpt-old-...``, replaced or deleted, being removed
TORCHCKPT_KEY = "torchckpt"  # the index's own section, beside Hugging Face's keys
WEIGHT_MAP_KEY = "weight_map"  # the index's Hugging Face map of tensor names to shard files
MANAGER_KEY = "manager"  # in a checkpoint's metadata: the checkpoint_name of the manager that wrote it
MODULE_VERSIONS_KEY = "module_versions"  # in the index's section: {state dict's key: {module prefix: _version}}, not 1s
# in the index's section of a single process's checkpoint: the key paths of the per-rank values (PerRank, RNG
# states, data positions) its tree holds as plain values, anywhere; absent where none. Other ranks have no values
# of their own there
ONE_PROCESS_PER_RANK_KEY = "per_rank_values"
REUSED_KEY = "reused"  # in the index's section: {"base": checkpoint, "files": {file here: file there}} of an incremental save
SAVE_COUNTER = "save_counter"  # a Checkpoint's counter, a top-level key of the saved state tree
SHARD_SUFFIX = ".safetensors"
HF_SINGLE = "model.safetensors"  # a Hugging Face folder's weights in one file: what from_pretrained reads first
HF_INDEX = "model.safetensors.index.json"  # a sharded Hugging Face folder's index
HF_CONFIG = "config.json"  # a Hugging Face folder's model config
SHARD_NAME = "model-{index:05d}-of-{count:05d}" + SHARD_SUFFIX
FORMAT_VERSION = 3  # the newest version this package reads
PLAIN_FORMAT_VERSION = 1  # what a single process writes: no chunks, nothing per rank
SHARDED_FORMAT_VERSION = 2  # from this version on: ``~@`` chunks, ``@per_rank`` values (a save by several ranks)
BLOCKS_FORMAT_VERSION = 3  # what several ranks write: version 2 plus block checksums (``blocks``)
# An index may list, under this key of its torchckpt section, the format features its contents use
# that a reader of its ``format_version`` may not know; a reader refuses one it does not know
# (``UnsupportedFormatError``: upgrade), rather than misread the checkpoint or call it damaged.
# This version writes none: every feature added since ``format_version`` 3 is read by every reader
# that knows version 3 (a NaN of other bits, ``{"@float": "nan:<hex>"}``, was added before a release).
FEATURES_KEY = "features"
KNOWN_FEATURES: frozenset[str] = frozenset()
CHECKSUM_ALGORITHM = "xxh3-64"
MAX_HEADER_SIZE = 100_000_000
MAX_INDEX_SIZE = 256 * 2**20
MAX_STATE_FILE_SIZE = 64 * 2**20
MAX_DIM = 2**62  # a dimension, an element count or a byte size beyond this is not a real tensor
MAX_CHECKPOINT_NUMBER = 2**62  # a numbered checkpoint's number: the ones given after it must fit save_counter
SEAL_KEY = "checksum"  # the last key of index.json and the state file: the xxh3-64 of the bytes before it
HEADER_ALIGNMENT = 8
DEFAULT_MAX_SHARD_SIZE = 5 * 10**9
SHARD_METADATA = {"format": "pt"}
DTYPE_SEP = ","  # the index's tensor table joins dtypes with this,
SHAPE_SEP = ";"  # shapes with this (dimensions within a shape with ","),
CHECKSUM_CHARS = 16  # and concatenates fixed-width hex checksums: fast to parse for 100k tensors
LAYOUT_MAX_LINES = 1000  # an object of the index with more keys is written on one line

# A JSON object or array costs a Python object of 56 to 200 bytes, twice over once the state tree
# is decoded. The files torchckpt writes have one per 40 bytes or fewer (an optimizer's state has two
# per parameter, beside the parameter's tensor names), or a few tens of thousands in all; "{}," and
# '{"k":0},' repeated have one per 3 to 8 bytes and would take 25 to 50 times their size in memory.
# At one per 16 bytes, parsing takes at most about 13 times the file's size (docs/format.md, "Limits").
MAX_CONTAINERS_PER_BYTE = 1 / 16
MAX_CONTAINERS_FLOOR = 200_000


# -- names -------------------------------------------------------------------------------------


def shard_name(index: int, count: int) -> str:
    """``model-00001-of-00002.safetensors`` for the first of two shards (1-based)."""
    return SHARD_NAME.format(index=index, count=count)


_WRITTEN_SHARD = re.compile(r"model-\d{5,}-of-\d{5,}(-[0-9a-f]+)?" + re.escape(SHARD_SUFFIX))  # an object store's tagged


def is_checkpoint_member(name: str) -> bool:
    """Whether ``name`` is one a checkpoint this package writes holds: its index, a shard named as
    it names them (``model.safetensors`` is someone's), a pending or deleting marker."""
    return name in (INDEX_FILE, DELETING_FILE) or is_shard_name(name) or is_pending_marker(name)


def is_export_member(name: str) -> bool:
    """Whether ``name`` is one ``torchckpt export`` writes into a Hugging Face folder."""
    return name in (HF_SINGLE, HF_INDEX, HF_CONFIG) or is_shard_name(name)


def is_shard_name(name: str) -> bool:
    """Whether ``name`` is a shard's as this package names them (``model-00001-of-00002.safetensors``,
    with a tag on an object store)."""
    return _WRITTEN_SHARD.fullmatch(name) is not None


def is_pending_marker(name: str) -> bool:
    """Whether ``name`` is a writer's pending marker (``.torchckpt-pending-<tag>``, or one untagged
    from before the tags)."""
    return name == PENDING_FILE or name.startswith(PENDING_FILE + "-")


def is_temporary_name(name: str) -> bool:
    """Whether ``name`` is a local writer's temporary (being written) or superseded (being removed) entry."""
    return TMP_MARKER in name or OLD_MARKER in name


# Format characters that reorder text (bidirectional controls: a name shown reversed or disguised;
# deprecated shaping controls) or hide it (zero-width space, word joiner, invisible operators, tags,
# a byte-order mark, interlinear annotations); the joiners and non-joiners scripts need are not here
_REORDERING_OR_HIDING = frozenset(
    "\u061c\u200e\u200f\u202a\u202b\u202c\u202d\u202e\u2066\u2067\u2068\u2069\u206a\u206b\u206c\u206d"
    "\u206e\u206f\u200b\u2060\u2061\u2062\u2063\u2064\u180e\ufeff\ufff9\ufffa\ufffb"
) | frozenset(map(chr, range(0xE0000, 0xE0080)))


def is_name_char(c: str) -> bool:
    """Whether a manager's ``checkpoint_name`` (and so the names of its checkpoints) may hold the
    character ``c`` (a state file takes any name of one path component): a printable one, a space of another width (a no-break or
    ideographic space), or a format character that scripts need inside words (the zero-width
    non-joiner and joiner of Persian and Indic text, a soft hyphen); not a control, a line
    break, a private-use or unassigned code point, or a format character that reorders or hides text."""
    return c.isprintable() or unicodedata.category(c) in ("Zs", "Cf") and c not in _REORDERING_OR_HIDING


_KINDS = {"Cc": "a control character", "Co": "a private-use character", "Cn": "an unassigned code point",
          "Cs": "a lone surrogate", "Zl": "a line break", "Zp": "a paragraph break"}


def char_description(c: str) -> str:
    """What a character is, for an error: its Unicode name (lower case), or its kind where it has none."""
    return unicodedata.name(c, "").lower() or _KINDS.get(unicodedata.category(c), "a character without a name")


def final_name(name: str) -> str:
    """The name a temporary or superseded entry stands for (``ckpt-3`` of
    ``ckpt-3.torchckpt-tmp-...``); any other name is its own."""
    return name.split(TMP_MARKER)[0].split(OLD_MARKER)[0]


def _encodable(name: str) -> bool:
    """Whether ``name`` can name a file: valid Unicode, or bytes that are not (a file named in
    Latin-1, which Python carries as U+DC80-U+DCFF); no other lone surrogate encodes."""
    try:
        name.encode("utf-8", "surrogateescape")
    except UnicodeEncodeError:
        return False
    return True


def check_member_name(directory: str, name: Any, what: str, index_file: str = INDEX_FILE) -> str:
    """Refuse a file name from an index (``index_file`` in ``directory``) that could escape the
    checkpoint directory, or that no file system can hold."""
    if (
        not isinstance(name, str)
        or not name
        or name != os.path.basename(name)
        or "\\" in name
        or name in (".", "..")
        or "\0" in name
        or not _encodable(name)
    ):
        raise CorruptCheckpointError(
            f"{directory}/{index_file} names {what} {name!r}, which is not a plain file name "
            "inside the checkpoint directory; refusing to follow it.",
            directory,
        )
    if not name.endswith(SHARD_SUFFIX):
        raise CorruptCheckpointError(
            f"{directory}/{index_file} names {what} {name!r}, which is not a .safetensors file.",
            directory,
        )
    return name
