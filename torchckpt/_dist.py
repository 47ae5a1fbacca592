"""Coordination of the ranks of a job: small exchanges through the c10d Store, each with a deadline.

Why the Store and not collectives on the training group: a collective has no deadline a caller
can choose and no way to say which rank is missing, and a background save that issues one on the
user's group deadlocks against the training loop's own collectives (DCP's async users meet
this). A Store key per rank gives all three: ``wait`` has a timeout, the keys that never appeared
name the ranks that did not arrive, and it needs no process group beyond the one that exists.

Every exchange carries a JSON payload: either the rank's data or the failure it met, so one
rank's exception reaches every rank as data instead of leaving them waiting. Nothing is pickled.
"""

from __future__ import annotations

import datetime
import json
import threading
import zlib
from collections.abc import Callable
from typing import Any, TypeVar

import torch.distributed as dist

from torchckpt.errors import (
    CheckpointDeletedError,
    CheckpointError,
    CheckpointNotFoundError,
    CorruptCheckpointError,
    RankTimeoutError,
    UnsupportedStateError,
    format_keys,
)

DEFAULT_TIMEOUT_SECS = 1800.0  # as torch.distributed's own default: a slow shared file system is not a dead rank
_KEY_ROOT = "torchckpt"

_sequence: dict[str, int] = {}  # group name -> exchanges so far; every rank makes the same ones in order
_sequence_lock = threading.Lock()


class Coordinator:
    """The ranks of one process group, with exchanges that time out and carry failures.

    Example (on every rank of a job)::

        coord = Coordinator(None, timeout_secs=60)
        sizes = coord.all_gather("sizes", b"12")  # one payload per rank, in rank order
    """

    def __init__(self, group: Any, timeout_secs: float | None) -> None:
        self.group = group
        self.rank = dist.get_rank(group)
        self.world = dist.get_world_size(group)
        self.timeout_secs = float(DEFAULT_TIMEOUT_SECS if timeout_secs is None else timeout_secs)
        if self.timeout_secs <= 0:
            raise ValueError(f"timeout_secs must be positive, not {timeout_secs!r}.")
        pg = group if group is not None else dist.distributed_c10d._get_default_group()
        self.store = dist.distributed_c10d._get_process_group_store(pg)
        self.name = dist.distributed_c10d._get_process_group_name(pg)
        self._prefix = _KEY_ROOT

    def _key(self, tag: str) -> str:
        with _sequence_lock:
            seq = _sequence[self.name] = _sequence.get(self.name, 0) + 1
        return f"{self._prefix}/{seq}/{tag}"

    def scope(self) -> Coordinator:
        """A coordinator of the same ranks whose exchanges have keys of their own, for work that runs
        on another thread (a background save): its exchanges never interleave with the ones this
        coordinator makes meanwhile. Every rank must open scopes in the same order."""
        with _sequence_lock:
            number = _sequence[f"{self.name}/scopes"] = _sequence.get(f"{self.name}/scopes", 0) + 1
        child = object.__new__(Coordinator)
        child.__dict__.update(self.__dict__)
        child.name = f"{self.name}/scope{number}"
        child._prefix = f"{_KEY_ROOT}/scope{number}"
        return child

    def close_scope(self) -> None:
        """Forget a finished scope's sequence counter."""
        with _sequence_lock:
            _sequence.pop(self.name, None)

    def _wait(self, keys: list[str], what: str, timeout_secs: float) -> None:
        try:
            self.store.wait(keys, datetime.timedelta(seconds=timeout_secs))
        except (RuntimeError, dist.DistStoreError) as e:  # a timeout, or the store is gone
            missing = _missing(self.store, keys)
            if missing is None:
                raise CheckpointError(f"Lost contact with the other ranks during {what}: {e}.") from e
            raise RankTimeoutError(what, missing, timeout_secs) from None

    def all_gather(self, tag: str, payload: bytes) -> list[bytes]:
        """Every rank's ``payload``, in rank order, on every rank."""
        key = self._key(tag)
        keys = [f"{key}/{r}" for r in range(self.world)]
        self.store.set(keys[self.rank], payload)  # type: ignore[arg-type]
        self._wait(keys, tag, self.timeout_secs)
        values = [bytes(v) for v in self.store.multi_get(keys)]
        if self.store.add(f"{key}/read", 1) == self.world:  # the last reader removes the keys
            for k in [*keys, f"{key}/read"]:
                self.store.delete_key(k)
        return values

    def gather(self, tag: str, payload: bytes, timeout_secs: float | None = None) -> list[bytes] | None:
        """Every rank's ``payload`` on rank 0 (None elsewhere)."""
        key = self._key(tag)
        keys = [f"{key}/{r}" for r in range(self.world)]
        self.store.set(keys[self.rank], payload)  # type: ignore[arg-type]
        if self.rank:
            return None
        self._wait(keys, tag, self.timeout_secs if timeout_secs is None else timeout_secs)
        values = [bytes(v) for v in self.store.multi_get(keys)]
        for k in keys:
            self.store.delete_key(k)
        return values

    def broadcast(self, tag: str, payload: bytes | None, timeout_secs: float | None = None) -> bytes:
        """Rank 0's ``payload`` on every rank."""
        key = self._key(tag)
        if self.rank == 0:
            assert payload is not None
            self.store.set(key, payload)  # type: ignore[arg-type]
            if self.world == 1:
                self.store.delete_key(key)
            return payload
        self._wait([key], tag, self.timeout_secs if timeout_secs is None else timeout_secs)
        value = bytes(self.store.get(key))
        if self.store.add(f"{key}/read", 1) == self.world - 1:
            self.store.delete_key(key)
            self.store.delete_key(f"{key}/read")
        return value

    @property
    def outcome_timeout_secs(self) -> float:
        """How long a rank waits for rank 0's verdict: longer than rank 0 waits for the others,
        so that a dead rank is named by rank 0 rather than rank 0 by everyone."""
        return self.timeout_secs * 2 + 5


def _missing(store: Any, keys: list[str]) -> list[int] | None:
    try:
        return [r for r, k in enumerate(keys) if not store.check([k])]
    except (RuntimeError, dist.DistStoreError):
        return None


# -- failures carried as data ---------------------------------------------------------------


def failure_payload(error: BaseException) -> dict[str, Any]:
    """A rank's exception as JSON: its type (one of ours, or the built-in's name) and message."""
    out: dict[str, Any] = {"type": type(error).__name__, "message": str(error) or type(error).__name__}
    for attr in ("key", "path"):
        value = getattr(error, attr, None)
        if isinstance(value, str):
            out[attr] = value
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


def collective_error(failures: dict[int, dict[str, Any]], what: str) -> CheckpointError:
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
    kind = first["type"]
    error: CheckpointError
    if kind == "UnsupportedStateError":
        error = UnsupportedStateError(message, key=first.get("key", ""))
    elif kind in _BY_PATH:
        error = _BY_PATH[kind](message, first.get("path"))
    else:
        error = CheckpointError(message)
    error.ranks = ranks  # type: ignore[attr-defined]
    return error


_BY_PATH: dict[str, type[CorruptCheckpointError] | type[CheckpointNotFoundError]] = {
    "CorruptCheckpointError": CorruptCheckpointError,
    "CheckpointNotFoundError": CheckpointNotFoundError,
    "CheckpointDeletedError": CheckpointDeletedError,
}


T = TypeVar("T")


def run_collectively(coord: Coordinator, what: str, choose: Callable[[], str], work: Callable[[str], T]) -> T:
    """Rank 0 runs ``choose`` and every rank runs ``work`` on its answer; a failure of either, on
    any rank, is raised on every rank (the same error, naming the rank)."""
    chosen = decided(coord, what, choose)
    return agree(coord, what, lambda: work(chosen))


def agree(coord: Coordinator, what: str, work: Callable[[], T]) -> T:
    """Every rank runs ``work``; a failure on any rank is raised on every rank (the same error)."""
    result: T | None = None
    error, mine = None, {}
    try:
        result = work()
    except Exception as e:
        error, mine = e, {"error": failure_payload(e)}
    outcomes = [decode(o) for o in coord.all_gather("agree", encode(mine))]
    failures = {r: o["error"] for r, o in enumerate(outcomes) if "error" in o}
    if failures:
        raise collective_error(failures, what) from error
    return result  # type: ignore[return-value]


def decided(coord: Coordinator, what: str, decide: Callable[[], Any]) -> Any:
    """Rank 0 runs ``decide`` and every rank gets its JSON answer, or raises its failure."""
    if coord.rank == 0:
        try:
            chosen: dict[str, Any] = {"value": decide()}
        except Exception as e:
            chosen = {"error": failure_payload(e)}
            coord.broadcast("decide", encode(chosen))
            raise collective_error({0: chosen["error"]}, what) from e
        coord.broadcast("decide", encode(chosen))
    else:
        chosen = decode(coord.broadcast("decide", None, coord.outcome_timeout_secs))
        if "error" in chosen:
            raise collective_error({0: chosen["error"]}, what)
    return chosen["value"]


def coordinator_for(process_group: Any, timeout_secs: float | None) -> Coordinator | None:
    """The coordinator of ``process_group`` (the default group when None), or None when the call is
    a single process's: no process group, or a group of one."""
    if not dist.is_available() or not dist.is_initialized():
        return None
    if dist.get_world_size(process_group) <= 1:
        return None
    return Coordinator(process_group, timeout_secs)
