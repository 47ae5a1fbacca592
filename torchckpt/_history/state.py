"""A directory of checkpoints: its state file, its latest checkpoint, its committed members.

The state file (``checkpoints.json``, TensorFlow's ``checkpoint`` file in JSON) names the latest
checkpoint and, for a manager, the kept checkpoints with their timestamps and metrics. It is
always replaced atomically, and only after the checkpoint it names is committed, so it never
points at a partial checkpoint. Paths in it are relative to the directory, so a directory can be
moved or copied.
"""

from __future__ import annotations

import math
import os
import re
from dataclasses import dataclass, field
from typing import Any

from torchckpt._format import index as format_index
from torchckpt._format import spec, tree
from torchckpt._storage import atomic
from torchckpt._storage.base import ABSENT, Storage, as_path, is_url, join, name_of, parent_of
from torchckpt._storage.registry import storage_for
from torchckpt.errors import CheckpointDeletedError, CheckpointNotFoundError, CorruptCheckpointError

STATE_FILE = spec.STATE_FILE
STATE_FORMAT = "torchckpt.checkpoints"
STATE_VERSION = 1
_NUMBERED = re.compile(r"^(?P<prefix>.+)-(?P<number>0|[1-9][0-9]*)$")


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

    def to_bytes(self) -> bytes:
        data = {
            "format": STATE_FORMAT,
            "version": STATE_VERSION,
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
        return spec.sealed_bytes(data, depth=1)


class StateFileError(ValueError):
    """The state file exists but cannot be used."""


def _plain_name(name: Any) -> str:
    if (not isinstance(name, str) or not name or len(name) > 255 or name != os.path.basename(name) or "\\" in name
            or name in (".", "..") or "\0" in name or not name.isprintable()):
        raise StateFileError(f"bad checkpoint name {name!r:.80}")
    return name


def _is_time(value: Any) -> bool:
    return type(value) in (int, float) and math.isfinite(value) and abs(value) < 1e11


def _entry(raw: Any) -> Entry:
    if not isinstance(raw, dict):
        raise StateFileError(f"bad entry {raw!r:.80}")
    ts = raw.get("timestamp")
    if ts is not None and not _is_time(ts):
        raise StateFileError(f"bad timestamp {ts!r:.80}")
    metrics = raw.get("metrics")
    if metrics is not None:
        try:
            metrics = tree.decode(metrics, None, _no_tensor, "metrics")
        except CorruptCheckpointError as e:
            raise StateFileError(str(e)) from None
        if not isinstance(metrics, dict) or not all(isinstance(k, str) for k in metrics):
            raise StateFileError(f"bad metrics {metrics!r:.80}")
    return Entry(_plain_name(raw.get("name")), None if ts is None else float(ts), metrics)


def _damaged(raw: Any) -> dict[str, str]:
    if not isinstance(raw, dict) or not all(isinstance(v, str) for v in raw.values()):
        raise StateFileError(f"bad 'damaged' record {raw!r:.80}")
    return {_plain_name(k): v[:2000] for k, v in raw.items()}


def _no_tensor(name: str) -> Any:
    raise CorruptCheckpointError("metrics hold no tensors")


def read_state(directory: str, storage: Storage | None = None) -> State | None:
    """The directory's state, or None when there is no state file.

    Raises:
        StateFileError: the file exists but is damaged (its seal fails) or malformed.
    """
    return read_state_versioned(directory, storage)[0]


def read_state_versioned(directory: str, storage: Storage | None = None) -> tuple[State | None, Any]:
    """:func:`read_state`, with the token a conditional :func:`write_state` needs (``ABSENT`` when
    there is no state file; None for a damaged one, which is then replaced unconditionally)."""
    storage = storage or storage_for(directory)
    path = join(directory, STATE_FILE)
    try:
        data, token = storage.read_versioned(path, spec.MAX_STATE_FILE_SIZE, "State file")
    except FileNotFoundError:
        return None, ABSENT
    except (OSError, CorruptCheckpointError) as e:
        raise StateFileError(f"{path} cannot be used: {e}") from e
    return parse_state(data, path), token


def parse_state(data: bytes, path: str) -> State:
    """Check and parse the bytes of a state file (``path`` names it in errors)."""
    try:
        spec.unseal(data, path, "state file")
        raw = spec.parse_json(data, path, "state file")
    except CorruptCheckpointError as e:
        raise StateFileError(f"{path} cannot be used: {e}") from e
    if not isinstance(raw, dict) or raw.get("format") != STATE_FORMAT:
        raise StateFileError(f"{path} is not a torchckpt state file")
    latest = raw.get("latest")
    lpt = raw.get("last_preserved_timestamp", 0.0)
    if not _is_time(lpt):
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
        )
    except StateFileError as e:
        raise StateFileError(f"{path}: {e}") from None


def write_state(directory: str, state: State, storage: Storage | None = None, token: Any = None) -> Any:
    """Replace the directory's state file atomically; with a ``token`` from
    :func:`read_state_versioned` (or the one this returned), only if no other writer replaced it
    meanwhile (``ConflictError`` otherwise). Returns the new token."""
    storage = storage or storage_for(directory)
    return storage.replace_file(join(directory, STATE_FILE), state.to_bytes(), token)


def record_latest(directory: str, name: str, storage: Storage | None = None) -> None:
    """Record ``name`` as the directory's latest checkpoint, keeping any manager history.

    This is what ``Checkpoint.save`` does. Unlike TensorFlow's, it keeps a manager's kept and
    preserved lists, so an unmanaged save never orphans a manager's checkpoints; the new
    checkpoint is not added to them, so no manager will ever delete it.
    """
    storage = storage or storage_for(directory)
    try:
        state = read_state(directory, storage) or State()
    except StateFileError:
        state = State()
    state.latest = name
    write_state(directory, state, storage)


MANAGER_KEY = "manager"  # in a checkpoint's metadata: the checkpoint_name of the manager that wrote it


def managed_entry(directory: str, name: str, checkpoint_name: str, storage: Storage | None = None) -> Entry | None:
    """The history entry of ``name`` when a manager with ``checkpoint_name`` wrote it (its index
    says so), else None: a checkpoint written any other way, or one that cannot be read.

    This is how a manager accounts for checkpoints it committed but never recorded (a crash
    between the commit and the state-file write): they carry the mark, so they are adopted,
    while checkpoints written by ``Checkpoint.save`` or copied in are never deleted.
    """
    try:
        index = format_index.load_index(join(directory, name), storage)
        metadata = tree.decode(index.section.get("metadata", {}), None, _no_tensor, "metadata")
    except (CorruptCheckpointError, OSError):
        return None
    if not isinstance(metadata, dict) or metadata.get(MANAGER_KEY) != checkpoint_name:
        return None
    metrics = metadata.get("metrics")
    created = index.section.get("created")
    return Entry(name, float(created) if created is not None and _is_time(created) else None,
                 metrics if isinstance(metrics, dict) and all(isinstance(k, str) for k in metrics) else None)


def number_of(name: str, prefix: str | None = None) -> int | None:
    """The number in ``ckpt-7`` (None if the name is not numbered, or has another prefix)."""
    match = _NUMBERED.match(name)
    if not match or (prefix is not None and match.group("prefix") != prefix):
        return None
    return int(match.group("number"))


def committed_members(directory: str, prefix: str | None = None, storage: Storage | None = None) -> list[str]:
    """Names of committed, numbered checkpoints in ``directory``, by number then name."""
    storage = storage or storage_for(directory)
    found = []
    for name in storage.committed_names(directory):  # one listing on an object store, not requests per name
        number = number_of(name, prefix)
        if number is not None and not atomic.is_temporary(name):
            found.append((number, name))
    return [name for _, name in sorted(found)]


def is_member(directory: str, name: str, storage: Storage | None = None) -> bool:
    """Whether ``name`` is a committed checkpoint inside ``directory``: a real directory (a link,
    which could lead anywhere, is never one) holding a regular ``index.json``."""
    storage = storage or storage_for(directory)
    path = join(directory, name)
    return storage.is_dir(path) and is_committed(path, storage)


def is_committed(path: str, storage: Storage | None = None) -> bool:
    """Whether ``path`` is a committed checkpoint (not a temporary or a leftover): its
    ``index.json`` is a regular file, not a link. On every backend the index is what commits."""
    storage = storage or storage_for(path)
    return not atomic.is_temporary(name_of(path)) and storage.is_file(join(path, spec.INDEX_FILE))


def latest_checkpoint(directory: str | os.PathLike[str], *, storage_options: dict[str, Any] | None = None) -> str | None:
    """The newest committed checkpoint in ``directory`` (a path or a URL), or None.

    The state file's ``latest`` wins when it names a committed checkpoint; otherwise (no state
    file, a damaged one, or one naming a checkpoint that is gone) the committed numbered
    checkpoint written last is returned.

    Example:
        >>> import tempfile, torch, torchckpt
        >>> d = tempfile.mkdtemp()
        >>> torchckpt.latest_checkpoint(d) is None
        True
        >>> path = torchckpt.Checkpoint(w=torch.ones(2)).save(f"{d}/ckpt")
        >>> torchckpt.latest_checkpoint(d) == path
        True
    """
    root = as_path(directory)
    return latest_in(root, storage_for(root, storage_options))


def latest_in(directory: str, storage: Storage) -> str | None:
    """:func:`latest_checkpoint` of a directory on ``storage``."""
    try:
        state = read_state(directory, storage)
    except StateFileError:
        state = None
    if state is not None and state.latest is not None and is_member(directory, state.latest, storage):
        return join(directory, state.latest)
    members = committed_members(directory, None, storage)
    if not members:
        return None
    newest = max(members, key=lambda n: (storage.mtime(join(directory, n, spec.INDEX_FILE)), number_of(n) or 0))
    return join(directory, newest)


def resolve_checkpoint(path: str, storage: Storage) -> str:
    """A checkpoint directory for ``path``: itself, or the latest checkpoint of a directory of them.

    Raises:
        CheckpointNotFoundError: nothing committed is there (or a save is writing it).
        CheckpointDeletedError: a deletion is removing it.
    """
    if not storage.exists(path) and not storage.follows_to_dir(path):
        hint = ""
        parent = parent_of(path)
        if storage.follows_to_dir(parent):
            import difflib

            close = difflib.get_close_matches(name_of(path), storage.list_names(parent), n=1)
            if close:
                hint = f" Did you mean {sibling(path, close[0])!r}?"
        raise CheckpointNotFoundError(f"No checkpoint at {path}: the path does not exist.{hint}", path)
    if not storage.follows_to_dir(path):
        if name_of(path) == spec.INDEX_FILE:
            return parent_of(path)
        raise CheckpointNotFoundError(
            f"{path} is a file; pass a checkpoint directory (the one holding {spec.INDEX_FILE}).", path
        )
    if storage.exists(join(path, spec.INDEX_FILE)):
        return path
    latest = latest_in(path, storage)
    if latest is None:
        unfinished = unfinished_error(path, storage.list_names(path))
        if unfinished is not None:
            raise unfinished
        raise CheckpointNotFoundError(
            f"No committed checkpoint in {path}: it has no {spec.INDEX_FILE} and no checkpoint directories. "
            "A save that was interrupted leaves nothing behind; check the path.",
            path,
        )
    return latest


def unfinished_error(path: str, names: list[str]) -> CheckpointNotFoundError | None:
    """The error for reading the directory ``path`` (holding ``names``, without an index) while a
    writer is writing it or a deletion is deleting it, or None when neither is under way.

    On an object store a writer's ``.torchckpt-pending-<tag>`` and a deletion's
    ``.torchckpt-deleting`` lie in the prefix; on a file system a save is written in a temporary
    sibling (``<name>.torchckpt-tmp-...``) and a replaced or deleted checkpoint is removed from one
    (``<name>.torchckpt-old-...``), which a reader may be handed by name.
    """
    name = name_of(path)
    if spec.DELETING_FILE in names or spec.OLD_MARKER in name:
        why = (f"{spec.DELETING_FILE} is there" if spec.DELETING_FILE in names
               else f"its name holds {spec.OLD_MARKER}")
        return CheckpointDeletedError(
            f"Checkpoint {path} is being deleted ({why}: a manager's max_to_keep or a replacement removes it, and a "
            "deletion cut short is finished by the next manager); it is no longer a checkpoint. Read a newer "
            "checkpoint of its directory.", path)
    if any(spec.is_pending_marker(n) for n in names) or spec.TMP_MARKER in name:
        why = (f"a writer's {spec.PENDING_FILE}-<tag> marker is there" if spec.TMP_MARKER not in name
               else f"its name holds {spec.TMP_MARKER}")
        return CheckpointNotFoundError(
            f"{path} is a checkpoint being written ({why}) and has no {spec.INDEX_FILE} yet: it is not a "
            "checkpoint until its save commits it (a crashed save's leftovers are removed by the next manager on its "
            "directory). Read it once its save has finished, or read its directory's latest checkpoint.", path)
    return None


def sibling(path: str, name: str) -> str:
    """``name`` next to ``path``, written as the user wrote ``path`` (relative stays relative)."""
    return join(parent_of(path), name) if is_url(path) else os.path.join(os.path.dirname(path), name)


def wait_for_new_checkpoint(
    checkpoint_dir: str | os.PathLike[str],
    last_checkpoint: str | None = None,
    seconds_to_sleep: float = 1.0,
    timeout: float | None = None,
    *,
    storage_options: dict[str, Any] | None = None,
) -> str | None:
    """Wait until ``latest_checkpoint(checkpoint_dir)`` differs from ``last_checkpoint``.

    Returns:
        The new checkpoint's path, or None if ``timeout`` seconds passed first.
    """
    import time

    root = as_path(checkpoint_dir)
    storage = storage_for(root, storage_options)
    stop = time.time() + timeout if timeout is not None else None
    while True:
        path = latest_in(root, storage)
        if path is not None and path != last_checkpoint:
            return path
        if stop is not None and time.time() + seconds_to_sleep > stop:
            return None
        time.sleep(seconds_to_sleep)


def checkpoints_iterator(
    checkpoint_dir: str | os.PathLike[str],
    min_interval_secs: float = 0,
    timeout: float | None = None,
    timeout_fn: Any = None,
    *,
    poll_interval_secs: float = 1.0,
    storage_options: dict[str, Any] | None = None,
) -> Any:
    """Yield each new committed checkpoint of ``checkpoint_dir`` as it appears (as TensorFlow's).

    A validation process uses it to follow a training run: it only ever yields checkpoints that
    are completely written. If several are written between two looks, only the newest is yielded.

    Args:
        checkpoint_dir: the directory a manager (or ``Checkpoint.save``) writes into.
        min_interval_secs: at least this long between yields (time the consumer spends counts).
        timeout: stop waiting for a new checkpoint after this many seconds (None: forever).
        timeout_fn: called after each yield and each timeout; when it returns True the iteration ends.
            Without it, a timeout ends the iteration.
        poll_interval_secs: how often to look for a new checkpoint (TensorFlow: 1 second).
        storage_options: passed to fsspec when ``checkpoint_dir`` is a URL.

    Example:
        >>> import tempfile, torchckpt
        >>> list(torchckpt.checkpoints_iterator(tempfile.mkdtemp(), timeout=0))
        []
    """
    import time

    path = None
    while True:
        new = wait_for_new_checkpoint(checkpoint_dir, path, poll_interval_secs, timeout,
                                      storage_options=storage_options)
        if new is None:
            if timeout_fn is None:
                return
        else:
            start = time.time()
            path = new
            yield new
            time.sleep(max(0.0, start + min_interval_secs - time.time()))
        if timeout_fn is not None and timeout_fn():
            return
