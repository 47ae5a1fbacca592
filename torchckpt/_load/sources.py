"""A checkpoint's shards by file name, each opened when first asked for, a bounded number at a time
where the process may not hold them all open (``opened.OpenShards``)."""

from __future__ import annotations

import contextlib
from collections.abc import Callable
from typing import Any

from torchckpt._storage.base import Source
from torchckpt.errors import CorruptCheckpointError


class ShardSources(dict[str, Source]):
    """The shards opened so far, by file name; a shard of the checkpoint that is not open yet is
    opened when asked for (``[]`` and ``get``), and a name that is no shard of it is a KeyError.
    Once closed, nothing is opened again.

    With a ``limit``, at most that many are open at once: opening one more closes the one opened
    first. Every reader of a shard asks for it, uses it and is done before it asks for another, so
    the one closed is never in use. A shard opened again must be the file opened first (the one
    whose header was checked): else it was replaced meanwhile, a :class:`CorruptCheckpointError`
    that the reads' error handling (``_load.recheck.explain``) tells from damage.
    """

    def __init__(self, open_one: Callable[[str], Source], files: list[str], limit: int | None = None) -> None:
        super().__init__()
        self._open: Callable[[str], Source] | None = open_one
        self._files = list(files)
        self._known = frozenset(files)
        self.limit = limit
        self._identities: dict[str, Any] = {}  # file -> the identity of the file first opened there

    def __missing__(self, file: str) -> Source:
        if file not in self._known:
            raise KeyError(file)
        if self._open is None:
            raise RuntimeError(f"shard {file} asked for after the checkpoint's shards were closed")
        while self.limit is not None and len(self) >= self.limit:
            with contextlib.suppress(OSError):  # only a descriptor's release: its reads are done
                self.pop(next(iter(self))).close()
        source = self._open(file)
        first = self._identities.setdefault(file, source.identity)
        if source.identity != first:
            source.close()
            raise CorruptCheckpointError(f"Shard {source.path} is not the file this read opened before: another file "
                                         "took its name while the checkpoint was being read.", source.path)
        self[file] = source
        return source

    def get(self, file: str, default: Any = None) -> Any:
        return self[file] if file in self._known else default

    def open_all(self) -> None:
        for file in self._files:
            self[file]

    def close(self) -> None:
        self._open = None
        sources = list(self.values())
        self.clear()
        for source in sources:
            source.close()
