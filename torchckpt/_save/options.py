"""The options of a save, parsed and checked once, before any work.

Why here and not with the format: ``max_shard_size`` is what a caller asks for, in the units a
caller writes ("5GB"); the format only ever sees the byte count it became.
"""

from __future__ import annotations

import re
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any

from torchckpt._format import spec

_SIZE_UNITS = {"B": 1, "KB": 10**3, "MB": 10**6, "GB": 10**9, "TB": 10**12,
               "KIB": 2**10, "MIB": 2**20, "GIB": 2**30, "TIB": 2**40}


def parse_size(size: int | str) -> int:
    """Bytes from an int or a string such as ``"2GB"`` (decimal, as Hugging Face) or ``"2GiB"``.

    Example:
        >>> parse_size("1.5GB"), parse_size("2MiB"), parse_size(4096)
        (1500000000, 2097152, 4096)
    """
    if isinstance(size, bool):
        raise TypeError("max_shard_size must be an int (bytes) or a string such as '2GB'.")
    if isinstance(size, int):
        value = size
    elif isinstance(size, str):
        match = re.fullmatch(r"\s*([0-9]*\.?[0-9]+)\s*([A-Za-z]*)\s*", size)
        unit = match.group(2).upper() if match else ""
        if not match or unit not in _SIZE_UNITS and unit:
            raise ValueError(
                f"Cannot parse size {size!r}: use bytes as an int, or a number followed by "
                "B, KB, MB, GB, TB (powers of 1000) or KiB, MiB, GiB, TiB (powers of 1024)."
            )
        value = int(float(match.group(1)) * _SIZE_UNITS[unit or "B"])
    else:
        raise TypeError(f"A size must be an int or a str, not {type(size).__name__}.")
    if value <= 0:
        raise ValueError(f"A size must be positive, got {size!r}.")
    return value


def save_arguments(max_shard_size: int | str, async_save: bool) -> dict[str, Any]:
    """The options of a save that every rank must pass alike (compared in the call's first exchange)."""
    try:
        size: int | str = parse_size(max_shard_size)
    except (TypeError, ValueError):
        size = repr(max_shard_size)  # refused inside the call, on every rank
    return {"async_save": bool(async_save), "max_shard_size": size}


@dataclass(frozen=True)
class SaveOptions:
    """The options of one save, checked once (a bad ``max_shard_size`` is refused before any work).

    ``save_counter`` is the counter the checkpoint records: the write does not change the
    checkpoint's own counter; its caller takes the number once the write is accepted. ``base`` is
    a committed checkpoint on the same storage whose identical shards are reused (an incremental
    save, see ``_save.reuse``); None writes every byte. ``incremental``: a later save will compare
    with this one, so the shards of frozen tensors are written to be read back soon.
    ``warm_page_cache``: another process restores the checkpoint next (``CheckpointManager``'s
    option), so every file is read into the page cache once committed (``Stage.settle``).
    """

    save_counter: int | None  # None: no counter (``save_state`` of a plain dict)
    max_shard_size: int = spec.DEFAULT_MAX_SHARD_SIZE
    progress: bool | None = None
    metadata: dict[str, Any] | None = None
    async_save: bool = False
    replace: bool = True
    base: str | None = None
    incremental: bool = False
    ordered: bool = False  # every tensor keeps its place among its dict's keys (``save_state``)
    warm_page_cache: bool = False

    @classmethod
    def checked(cls, save_counter: int | None, max_shard_size: int | str, progress: bool | None,
                metadata: dict[str, Any] | None, async_save: bool, replace: bool = True,
                base: str | None = None, incremental: bool = False, warm_page_cache: bool = False) -> SaveOptions:
        return cls(save_counter, parse_size(max_shard_size), progress, metadata, bool(async_save), replace, base,
                   incremental or base is not None, warm_page_cache=bool(warm_page_cache))


class FailedAfterCommit(Exception):
    """What a :class:`SaveHooks` ``after`` raises on rank 0 of a job when it failed once the
    checkpoint was committed: the save fails on every rank with ``cause``, and ``result`` (what
    ``after`` would have returned: a manager's history, which holds the new checkpoint) still
    reaches every other rank's ``adopt``, so that no rank's view of the directory differs. A
    ``cause`` that is an interrupt (``KeyboardInterrupt``, ``SystemExit``) is raised again on rank 0
    once the others have ``result``."""

    def __init__(self, cause: BaseException, result: Any) -> None:
        super().__init__(str(cause))
        self.cause = cause
        self.result = result


@dataclass(frozen=True)
class SaveHooks:
    """What a caller runs once the checkpoint is committed: ``after`` (on the background thread for
    an asynchronous save; on rank 0 for a save by several ranks, where ``adopt`` then gets what it
    returned on every other rank, also when it raised :class:`FailedAfterCommit`)."""

    after: Callable[[], Any] | None = None
    adopt: Callable[[Any], object] | None = None


NO_HOOKS = SaveHooks()
