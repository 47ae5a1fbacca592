"""Path strings: a local path and a URL named, joined and split the same way everywhere.

Why a leaf of its own: the faces, the engines, the format's error messages and the storage
backends all name files by these strings, and none of them should have to import the storage
protocol to do so. Nothing here touches a file system; ``os.path`` and ``posixpath`` are used as
string functions only.
"""

from __future__ import annotations

import os
import posixpath
import re
from typing import Any

_URL = re.compile(r"^[A-Za-z][A-Za-z0-9+.\-]*://")


def is_url(path: str) -> bool:
    """Whether ``path`` names an fsspec location (``s3://bucket/run``) rather than a local path."""
    return _URL.match(path) is not None


def as_path(path: Any) -> str:
    """A path argument as a ``str``: ``str``, ``os.PathLike`` or ``bytes`` (decoded as the file
    system does); anything else is a ``TypeError`` rather than a directory named after its repr.
    A URL is kept as it is."""
    if isinstance(path, (str, bytes, os.PathLike)):
        value = os.fspath(path)
        return os.fsdecode(value) if isinstance(value, bytes) else value
    raise TypeError(f"A checkpoint path must be a str, bytes or os.PathLike, not {type(path).__name__}.")


def as_directory(path: Any) -> str:
    """A path argument that names a checkpoint directory to write, without trailing separators:
    ``"out/"`` is the directory ``out`` (its temporary sibling is ``out.torchckpt-tmp-...``, not a
    name inside a directory that does not exist yet). The root (``/``, ``s3://bucket``) is kept."""
    value = as_path(path)
    if is_url(value):
        stripped = value.rstrip("/")
        return stripped if len(stripped) > value.index("://") + 3 else value
    return value.rstrip(os.sep + (os.altsep or "")) or value


def join(base: str, *names: str) -> str:
    """``base/name/...`` for a local path or a URL (names are plain file names)."""
    return posixpath.join(base, *names) if is_url(base) or not base else os.path.join(base, *names)


def name_of(path: str) -> str:
    """The last component of a local path or a URL (``ckpt-3`` of ``s3://b/run/ckpt-3``)."""
    return posixpath.basename(path.rstrip("/")) if is_url(path) else posixpath.basename(path)


def parent_of(path: str) -> str:
    """The directory holding ``path`` (a URL keeps its scheme; a bare local name's parent is ``.``)."""
    if is_url(path):
        scheme_end = path.index("://") + 3
        head = path.rstrip("/")
        if len(head) < scheme_end:  # the root of a store (``memory://``) is its own parent
            return path[:scheme_end]
        cut = head.rfind("/")
        return head[:cut] if cut >= scheme_end else head
    return posixpath.dirname(path) or "."
