"""Which storage holds a path: the local filesystem for a plain path, fsspec for a URL."""

from __future__ import annotations

from typing import Any

from torchckpt._storage.base import Storage, is_url
from torchckpt._storage.local import LOCAL  # imported with the package: the local backend serves most paths
from torchckpt.errors import CheckpointError


def storage_for(path: str, storage_options: dict[str, Any] | None = None) -> Storage:
    """The storage that holds ``path``: local for a plain path, fsspec for a URL.

    Raises:
        CheckpointError: a URL whose filesystem package is not installed (the message names the
            extra to install), or ``storage_options`` given for a local path.
    """
    if not is_url(path):
        if storage_options:
            raise CheckpointError(f"storage_options apply to URLs (s3://..., gs://...); {path} is a local path.")
        return LOCAL
    from torchckpt._storage.fsspec import fsspec_storage  # only for URLs: fsspec is an optional dependency

    return fsspec_storage(path, storage_options)
