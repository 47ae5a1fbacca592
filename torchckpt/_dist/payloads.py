"""What the ranks of a call send each other: JSON payloads, and failures carried as data.

Why failures travel as data: a rank that raises while the others wait for its part would leave
them waiting until their timeout, and each would then report a timeout instead of the cause.
Every exchange carries either the rank's data or its failure (:func:`failure_payload`), and
every rank raises the same error from what it received (:func:`collective_error`): the first
failing rank's type, where a caller catches it by type, naming every failing rank. Nothing is
pickled: a failure is its type's name, its message and a few typed attributes.
"""

from __future__ import annotations

import json
import os
import zlib
from typing import Any

from torchckpt.errors import (
    CheckpointDeletedError,
    CheckpointError,
    CheckpointNotFoundError,
    CheckpointReadError,
    CheckpointTooLargeError,
    CheckpointWriteError,
    CorruptCheckpointError,
    RankTimeoutError,
    RenameConflictError,
    UnsupportedStateError,
    format_keys,
)


def mismatched_calls(arguments: list[dict[str, Any]]) -> CheckpointError:
    """The error every rank raises when the ranks made different calls: which argument, on which ranks."""
    differing = []
    for name in sorted({k for a in arguments for k in a}):
        values = [a.get(name, "(not given)") for a in arguments]
        if len({json.dumps(v, sort_keys=True) for v in values}) > 1:
            by_value: dict[str, list[int]] = {}
            for rank, v in enumerate(values):
                by_value.setdefault(json.dumps(v, sort_keys=True), []).append(rank)
            shown = "; ".join(f"{v} on rank{'s' if len(r) > 1 else ''} {format_keys([str(x) for x in r], 4)}"
                              for v, r in by_value.items())
            differing.append(f"{name}: {shown}")
    error = CheckpointError(
        f"{arguments[0].get('call', 'A collective call')} was refused on every rank: the ranks did not make the "
        "same call "
        f"({'; '.join(differing[:4])}{' ...' if len(differing) > 4 else ''}). Every rank must call it with "
        "the same arguments, in the same order. Nothing was written or changed."
    )
    first = json.dumps(arguments[0], sort_keys=True)  # as compared above: 5 and 5.0 differ, as they did there
    error.ranks = [r for r, a in enumerate(arguments) if json.dumps(a, sort_keys=True) != first]  # type: ignore[attr-defined]
    return error


# -- failures carried as data ---------------------------------------------------------------


def failure_payload(error: BaseException) -> dict[str, Any]:
    """A rank's exception as JSON: its type (one of ours, or the built-in's name) and message."""
    out: dict[str, Any] = {"type": type(error).__name__, "message": str(error) or type(error).__name__}
    for attr in ("key", "path"):
        value = getattr(error, attr, None)
        if isinstance(value, str):
            out[attr] = value
    if isinstance(error, (CheckpointReadError, CheckpointWriteError)) and isinstance(error.errno, int):
        out["errno"] = error.errno
    if isinstance(error, CheckpointTooLargeError):
        out.update(what=error.what, size=error.size, limit=error.limit)
    checkpoint_keys = getattr(error, "checkpoint_keys", None)
    if isinstance(checkpoint_keys, list):
        out["checkpoint_keys"] = [str(k) for k in checkpoint_keys]
    ranks = getattr(error, "ranks", None)
    if isinstance(error, RankTimeoutError):
        out["late"] = list(error.ranks)
    elif isinstance(error, CheckpointError) and isinstance(ranks, list):
        # a failure of an exchange every rank made (a background save's outcome): already the same everywhere
        out["ranks"] = ranks
    return out


def encode(payload: Any) -> bytes:
    """JSON, compressed when large: the per-rank tensor lists repeat long names, and rank 0's
    store serves every rank's list to every rank (about 10x less traffic)."""
    data = json.dumps(payload, separators=(",", ":")).encode()
    return b"z" + zlib.compress(data, 1) if len(data) > _COMPRESS_ABOVE else b"j" + data


def decode(data: bytes) -> Any:
    kind, body = data[:1], data[1:]
    return json.loads(zlib.decompress(body) if kind == b"z" else body)


_COMPRESS_ABOVE = 4096


def collective_error(failures: dict[int, dict[str, Any]], what: str, note: str | None = None) -> CheckpointError:
    """The one error every rank raises when some failed: of the first failing rank's type when it
    is a torchckpt error a caller may catch by type, naming every failing rank.

    ``failures`` maps rank -> :func:`failure_payload`.
    """
    first_rank = min(failures)
    first = failures[first_rank]
    ranks = sorted(failures)
    others = "" if len(ranks) == 1 else f" (ranks {format_keys([str(r) for r in ranks[1:]])} failed too)"
    message = f"{what} failed on rank {first_rank}: {first['message']}{others}"
    if first["type"] == "RankTimeoutError":  # rank 0 names the ranks that never reported
        message = f"{what} failed: {first['message']}"
    if "ranks" in first:  # a failure every rank already shares (a background save's outcome): as it was
        message, ranks = first["message"], first["ranks"]
    if note:
        message = f"{message} {note}"
    kind = first["type"]
    error: CheckpointError
    if kind == "UnsupportedStateError":
        error = UnsupportedStateError(message, key=first.get("key", ""))
    elif kind == "RankTimeoutError":  # still the type a caller catches: whoever noticed, the same error
        late = [r for r in first.get("late", []) if isinstance(r, int)]
        error = RankTimeoutError("", late, 0, message=message)
    elif kind == "RenameConflictError":
        error = RenameConflictError(message, first.get("key", ""), list(first.get("checkpoint_keys", [])))
    elif kind == "CheckpointReadError":
        code = first.get("errno")
        error = CheckpointReadError(message, first.get("path"), code if isinstance(code, int) else None)
    elif kind == "CheckpointWriteError":
        code, path = first.get("errno"), first.get("path") or ""
        cause = OSError(code, os.strerror(code), path) if isinstance(code, int) else OSError(message)
        error = CheckpointWriteError(message, path, cause)
    elif kind == "CheckpointTooLargeError":
        error = CheckpointTooLargeError(message, first.get("path"), str(first.get("what", "")), int(first.get("size", 0)),
                                        int(first.get("limit", 0)))
    elif kind in _BY_PATH:
        error = _BY_PATH[kind](message, first.get("path"))
    else:
        error = CheckpointError(message)
        for attr in ("key", "path"):  # an object that refused its state names both (``_load.execute``)
            if isinstance(first.get(attr), str):
                setattr(error, attr, first[attr])
    if not isinstance(error, RankTimeoutError):  # its ranks are the late ones
        error.ranks = ranks  # type: ignore[attr-defined]
    # Every file a rank found damaged, not only the first rank's: each process stops trusting them
    # (``_load.opened.distrust_damaged``).
    error.damaged_paths = sorted({f["path"] for f in failures.values()  # type: ignore[attr-defined]
                                  if f["type"] == "CorruptCheckpointError" and isinstance(f.get("path"), str)})
    return error


_BY_PATH: dict[str, type[CorruptCheckpointError] | type[CheckpointNotFoundError]] = {
    "CorruptCheckpointError": CorruptCheckpointError,
    "CheckpointNotFoundError": CheckpointNotFoundError,
    "CheckpointDeletedError": CheckpointDeletedError,
}
