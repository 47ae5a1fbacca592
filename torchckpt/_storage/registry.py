"""Which storage holds a path: the local filesystem for a plain path, fsspec for a URL, or a
storage installed for the paths under a prefix.

Why a storage can be installed: every face resolves its storage here, so a storage given for a
prefix serves every call on those paths, the manager's and the reader's alike. Tests install
doubles this way (a disk that fills up, an upload cut short, a slow write), and a third-party
backend can serve a scheme of its own; nothing has to patch a module of the package.
"""

from __future__ import annotations

import contextlib
import os
from collections.abc import Iterator
from typing import Any

from torchckpt._paths import is_url
from torchckpt._storage.base import Storage
from torchckpt._storage.local import LOCAL  # imported with the package: the local backend serves most paths
from torchckpt.errors import CheckpointError

_installed: list[tuple[str, Storage]] = []  # (prefix, storage), the latest installed first
# What to install for a URL scheme whose filesystem package is missing: pip install "torchckpt[<extra>]".
EXTRAS = {"s3": "s3", "s3a": "s3", "gs": "gcs", "gcs": "gcs", "az": "azure", "abfs": "azure", "abfss": "azure",
          "adl": "azure"}


def storage_for(path: str, storage_options: dict[str, Any] | None = None) -> Storage:
    """The storage that holds ``path``: one installed for a prefix of it (see :func:`installed`),
    else local for a plain path and fsspec for a URL.

    Raises:
        CheckpointError: a URL whose filesystem package is not installed (the message names the
            extra to install), or ``storage_options`` given for a local path.
    """
    if _installed:
        key = _key(path)
        for prefix, storage in _installed:
            if key == prefix or key.startswith(prefix + "/"):
                return storage  # built with its own options: ``storage_options`` are not used
    if not is_url(path):
        if storage_options:
            raise CheckpointError(f"storage_options apply to URLs (s3://..., gs://...); {path} is a local path.")
        return LOCAL
    from torchckpt._storage.fsspec import fsspec_storage  # only for URLs: fsspec is an optional dependency

    extra = EXTRAS.get(path.split("://", 1)[0].lower())
    return fsspec_storage(path, storage_options, f'pip install "torchckpt[{extra}]"' if extra else "pip install fsspec")


@contextlib.contextmanager
def installed(prefix: str, storage: Storage) -> Iterator[Storage]:
    """Serve every path under ``prefix`` (a local directory or a URL) with ``storage`` while the
    block runs; the latest installed wins where prefixes nest.

    A storage resolved inside the block is kept by what resolved it (a ``CheckpointManager``
    resolves its directory's once, when it is made).

    Example:
        >>> import tempfile, torch, torchckpt
        >>> from torchckpt._storage.local import LocalStorage
        >>> run = tempfile.mkdtemp()
        >>> with installed(run, LocalStorage(direct_min_bytes=0)):  # direct writes even for small files
        ...     path = torchckpt.Checkpoint(w=torch.ones(2)).write(f"{run}/c")
    """
    entry = (_key(prefix), storage)
    _installed.insert(0, entry)
    try:
        yield storage
    finally:
        _installed.remove(entry)


def _key(path: str) -> str:
    """``path`` as installed prefixes are compared: a URL without its trailing slash, a local path
    made absolute."""
    return path.rstrip("/") if is_url(path) else os.path.abspath(path)
