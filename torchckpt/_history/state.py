"""A directory's state file: the latest checkpoint and a manager's history.

The state file (``checkpoints.json``, TensorFlow's ``checkpoint`` file in JSON) names the latest
checkpoint and, for a manager, the kept checkpoints with their timestamps and metrics. It is
always replaced atomically, and only after the checkpoint it names is committed, so it never
points at a partial checkpoint. Paths in it are relative to the directory, so a directory can be
moved or copied. Which checkpoints the directory holds is ``members``' business.
"""

from __future__ import annotations

import math
import os
from dataclasses import dataclass, field
from typing import Any

from torchckpt import _clock
from torchckpt._format import document as format_document
from torchckpt._format import spec, tree
from torchckpt._paths import join
from torchckpt._storage.base import ABSENT, Storage
from torchckpt.errors import (
    CheckpointError,
    CheckpointReadError,
    CheckpointWriteError,
    CorruptCheckpointError,
    UnsupportedFormatError,
)

STATE_FILE = spec.STATE_FILE


@dataclass
class Entry:
    """One checkpoint recorded in the state file."""

    name: str
    timestamp: float | None = None
    metrics: dict[str, Any] | None = None

    def to_json(self) -> dict[str, Any]:
        metrics = None if self.metrics is None else tree.encode(self.metrics, "metrics", {})
        return {"name": self.name, "timestamp": self.timestamp, "metrics": metrics}


@dataclass
class State:
    """The content of a directory's state file."""

    latest: str | None = None
    checkpoints: list[Entry] = field(default_factory=list)
    preserved: list[Entry] = field(default_factory=list)
    last_preserved_timestamp: float = 0.0
    best_metric: str | None = None
    best_mode: str = "min"
    keep_best: int | None = None
    damaged: dict[str, str] = field(default_factory=dict)  # name -> why a restore found it damaged
    # the highest-numbered checkpoint the history held and no longer does (deleted by hand, or by retention in
    # a run whose numbers went back), where it is numbered past every one the file names: its number is never
    # given to a new checkpoint (a follower that yielded the deleted one would take the new one, at the same
    # path, for it, and never see it)
    gone: list[str] = field(default_factory=list)

    def to_bytes(self) -> bytes:
        data = {
            "format": spec.STATE_FORMAT,
            "version": spec.STATE_VERSION,
            "latest": self.latest,
            "checkpoints": [e.to_json() for e in self.checkpoints],
            "preserved": [e.to_json() for e in self.preserved],
            "last_preserved_timestamp": self.last_preserved_timestamp,
            "best_metric": self.best_metric,
            "best_mode": self.best_mode,
            "keep_best": self.keep_best,
        }
        if self.damaged:
            data["damaged"] = dict(self.damaged)
        if self.gone:
            data["gone"] = list(self.gone)
        return format_document.sealed_bytes(data, depth=1)


class StateFileError(ValueError):
    """The state file exists but cannot be used."""


def _plain_name(name: Any) -> str:
    if (not isinstance(name, str) or not name or len(name) > 255 or name != os.path.basename(name) or "\\" in name
            or name in (".", "..") or "\0" in name):
        raise StateFileError(f"bad checkpoint name {name!r:.80}")
    return name


def is_timestamp(value: Any) -> bool:
    """Whether ``value`` is a time a state file or an index may record (seconds since the epoch)."""
    return type(value) in (int, float) and math.isfinite(value) and abs(value) < 1e11


def _entry(raw: Any) -> Entry:
    if not isinstance(raw, dict):
        raise StateFileError(f"bad entry {raw!r:.80}")
    ts = raw.get("timestamp")
    if ts is not None and not is_timestamp(ts):
        raise StateFileError(f"bad timestamp {ts!r:.80}")
    metrics = raw.get("metrics")
    if metrics is not None:
        try:
            metrics = tree.decode(metrics, None, no_tensor, "metrics")
        except CorruptCheckpointError as e:
            raise StateFileError(str(e)) from None
        if not isinstance(metrics, dict) or not all(isinstance(k, str) for k in metrics):
            raise StateFileError(f"bad metrics {metrics!r:.80}")
    return Entry(_plain_name(raw.get("name")), None if ts is None else float(ts), metrics)


def _damaged(raw: Any) -> dict[str, str]:
    if not isinstance(raw, dict) or not all(isinstance(v, str) for v in raw.values()):
        raise StateFileError(f"bad 'damaged' record {raw!r:.80}")
    return {_plain_name(k): v[:2000] for k, v in raw.items()}


def _gone(raw: Any) -> list[str]:
    # a number past what save_counter holds would send every later save past it (names too long, or
    # checkpoints no restore takes): refused, as for any forged record
    if not isinstance(raw, list) or len(raw) > 16 or any(isinstance(n, str) and _past_counters(n) for n in raw):
        raise StateFileError(f"bad 'gone' record {raw!r:.80}")
    return [_plain_name(name) for name in raw]


def _past_counters(name: str) -> bool:
    """Whether ``name`` ends in a number of :data:`~torchckpt._format.spec.MAX_CHECKPOINT_NUMBER` or
    more, which no manager gives: the numbers after it would soon pass what ``save_counter`` holds."""
    digits = name.rpartition("-")[2]
    return digits.isascii() and digits.isdigit() and (len(digits) > 19 or int(digits) >= spec.MAX_CHECKPOINT_NUMBER)


def no_tensor(name: str) -> Any:
    """The resolver of a tree that holds no tensors (metrics, metadata): any tensor is corrupt."""
    raise CorruptCheckpointError("metrics hold no tensors")


def read_state(directory: str, storage: Storage) -> State | None:
    """The directory's state, or None when there is no state file.

    Raises:
        StateFileError: the file exists but is damaged (its seal fails) or malformed.
        CheckpointReadError: the storage could not be asked (no credentials, no connection, access
            refused): not an answer about the file, so never taken for a damaged one.
        UnsupportedFormatError: a newer torchckpt's state file (a higher ``version``).
    """
    return read_state_versioned(directory, storage)[0]


def read_state_versioned(directory: str, storage: Storage) -> tuple[State | None, Any]:
    """:func:`read_state`, with the token a conditional :func:`write_state` needs (``ABSENT`` when
    there is no state file; None for a damaged one, which is then replaced unconditionally)."""
    path = join(directory, STATE_FILE)
    try:
        data, token = storage.read_versioned(path, spec.MAX_STATE_FILE_SIZE, "State file")
    except FileNotFoundError:
        return None, ABSENT
    except CheckpointReadError:  # no credentials, no connection, access refused: not a damaged file
        raise
    except (OSError, CorruptCheckpointError) as e:
        raise StateFileError(f"{path} cannot be used: {e}") from e
    return parse_state(data, path), token


def parse_state(data: bytes, path: str) -> State:
    """Check and parse the bytes of a state file (``path`` names it in errors)."""
    try:
        format_document.unseal(data, path, "state file")
        raw = format_document.parse_json(data, path, "state file")
    except CorruptCheckpointError as e:
        raise StateFileError(f"{path} cannot be used: {e}") from e
    if not isinstance(raw, dict) or raw.get("format") != spec.STATE_FORMAT:
        raise StateFileError(f"{path} is not a torchckpt state file")
    version = raw.get("version")
    if type(version) is int and version > spec.STATE_VERSION:  # a newer manager's: neither damaged nor to rebuild
        raise UnsupportedFormatError(
            f"{path} is a state file of version {version}, newer than this torchckpt understands "
            f"({spec.STATE_VERSION}): the directory is managed by a newer torchckpt; upgrade torchckpt to use it. "
            "Nothing was changed.", path, version)
    latest = raw.get("latest")
    lpt = raw.get("last_preserved_timestamp", 0.0)
    if not is_timestamp(lpt):
        raise StateFileError(f"{path}: bad last_preserved_timestamp {lpt!r:.80}")
    checkpoints, preserved = raw.get("checkpoints", []), raw.get("preserved", [])
    if not isinstance(checkpoints, list) or not isinstance(preserved, list):
        raise StateFileError(f"{path}: 'checkpoints' and 'preserved' must be lists")
    best_metric, best_mode, keep_best = raw.get("best_metric"), raw.get("best_mode", "min"), raw.get("keep_best")
    try:
        return State(
            latest=None if latest is None else _plain_name(latest),
            checkpoints=[_entry(e) for e in checkpoints],
            preserved=[_entry(e) for e in preserved],
            last_preserved_timestamp=float(lpt),
            best_metric=best_metric if isinstance(best_metric, str) else None,
            best_mode=best_mode if best_mode in ("min", "max") else "min",
            keep_best=keep_best if type(keep_best) is int and 0 < keep_best < 2**31 else None,
            damaged=_damaged(raw.get("damaged", {})),
            gone=_gone(raw.get("gone", [])),
        )
    except StateFileError as e:
        raise StateFileError(f"{path}: {e}") from None


def write_state(directory: str, state: State, storage: Storage, token: Any = None, data: bytes | None = None) -> Any:
    """Replace the directory's state file atomically; with a ``token`` from
    :func:`read_state_versioned` (or the one this returned), only if no other writer replaced it
    meanwhile (``ConflictError`` otherwise). Returns the new token. ``data``: ``state.to_bytes()``,
    when the caller has it already.

    Raises:
        CheckpointWriteError: the system refused the write (the state file's name taken by a
            directory, a full disk); the checkpoint it would name as the latest is committed all
            the same, which the message says.
    """
    path = join(directory, STATE_FILE)
    try:
        return storage.replace_file(path, state.to_bytes() if data is None else data, token)
    except OSError as e:
        if isinstance(e, CheckpointError):
            raise
        try:
            why = "a directory has its name: move it away" if storage.is_dir(path) else (e.strerror or str(e))
        except Exception:  # noqa: BLE001 - only the wording depends on it
            why = e.strerror or str(e)
        latest = f"Checkpoint {join(directory, state.latest)} is committed, but" if state.latest else "But"
        raise CheckpointWriteError(
            f"{latest} the directory's state file {path} could not be written ({why}), so the history does not "
            "name it yet. Once the state file can be written, the next save (or a new manager on the directory) "
            "records it.", directory, e) from e


def record_latest(directory: str, name: str, storage: Storage) -> None:
    """Record ``name`` as the directory's latest checkpoint, keeping any manager history.

    This is what ``Checkpoint.save`` does. Unlike TensorFlow's, it keeps a manager's kept and
    preserved lists, so an unmanaged save never orphans a manager's checkpoints; the new
    checkpoint is not added to them, so no manager will ever delete it. Where there is no usable
    state file but the directory holds something besides (a manager's run whose state file was
    lost or damaged), its history is unknown: the new file's last preserved time is now, so a
    later manager keeps every checkpoint written before it forever, as one that rebuilds the
    history does, instead of taking them for its own and deleting them.
    """
    try:
        state = read_state(directory, storage)
    except StateFileError:
        state = None
    if state is None:
        state = State()
        if any(n not in (name, STATE_FILE, spec.LOCK_FILE) and not spec.is_temporary_name(n)
               for n in storage.list_names(directory)):
            state.last_preserved_timestamp = _clock.now()
    state.latest = name
    write_state(directory, state, storage)
