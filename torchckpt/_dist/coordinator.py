"""Coordination of the ranks of a job: small exchanges through the c10d Store, each with a deadline.

Why the Store and not collectives on the training group: a collective has no deadline a caller
can choose and no way to say which rank is missing, and a background save that issues one on the
user's group deadlocks against the training loop's own collectives (DCP's async users meet
this). A Store key per rank gives all three: ``wait`` has a timeout, the keys that never appeared
name the ranks that did not arrive, and it needs no process group beyond the one that exists.

Every exchange carries a JSON payload: either the rank's data or the failure it met, so one
rank's exception reaches every rank as data instead of leaving them waiting (``_dist.payloads``).
Nothing is pickled.
"""

from __future__ import annotations

import contextlib
import datetime
import json
import math
import threading
import time
from collections.abc import Callable, Iterator
from typing import Any, TypeVar

import torch.distributed as dist

from torchckpt._dist.payloads import collective_error, decode, encode, failure_payload, mismatched_calls
from torchckpt.errors import (
    CheckpointError,
    RankTimeoutError,
)

DEFAULT_TIMEOUT_SECS = 1800.0  # as torch.distributed's own default: a slow shared file system is not a dead rank
_KEY_ROOT = "torchckpt"
T = TypeVar("T")

# How long rank 0 waits at the end of a call for the others to have read it (``Coordinator.end_call``):
# they are waiting for its last exchange already, and read it at once unless they have gone.
_END_WAIT_SECS = 15.0
_END_WAIT_AFTER_FAILURE_SECS = 5.0
_GAVE_UP = b"\x00torchckpt: given up: "  # a slot a waiting rank filled in place of a rank that never came
_STOPPED = b"\x00torchckpt: stopped: "  # a slot a rank filled as it stopped in a call (KeyboardInterrupt, SystemExit)
_STOP_AHEAD = 32  # the exchanges past the last one it made that a stopping rank marks (a call makes fewer)
_calls: dict[str, int] = {}  # group name -> collective calls begun by this process; every rank begins the same ones
_calls_lock = threading.Lock()
_before_calls: list[Callable[[], None]] = []  # run as each call begins (see ``before_each_call``)


def checked_timeout(timeout_secs: Any) -> float:
    """``timeout_secs`` as seconds (``DEFAULT_TIMEOUT_SECS`` for None): anything ``float()`` takes
    that is positive and finite (a NumPy or 0-dim tensor number too, not a bool).

    Raises:
        ValueError: it is not such a number.
    """
    if timeout_secs is None:
        return DEFAULT_TIMEOUT_SECS
    is_bool = isinstance(timeout_secs, bool) or str(getattr(timeout_secs, "dtype", "")) in ("bool", "torch.bool")
    try:
        seconds = math.nan if is_bool else float(timeout_secs)
    except (TypeError, ValueError, RuntimeError):  # RuntimeError: a tensor of several elements
        seconds = math.nan
    if not 0 < seconds < math.inf:
        raise ValueError(f"timeout_secs must be a positive, finite number of seconds, not {timeout_secs!r}.")
    return seconds


def before_each_call(hook: Callable[[], None]) -> None:
    """Have ``hook`` run before the first exchange of every collective call of this process
    (``_save.background``: wait for the saves in flight), inside the call: an interrupt there is
    a stop in the call (see ``Coordinator.failures_shared``)."""
    _before_calls.append(hook)



class Coordinator:
    """The ranks of one process group, with exchanges that time out and carry failures.

    Exchanges happen inside a *call*: one public collective operation (a save, a restore, a
    manager's construction), begun with :meth:`call` by every rank. Each call has an identity
    every rank agrees on (its number in the group's sequence of calls) and every key of its
    exchanges carries it, so a record of one call can never be read by another, not even when a
    rank gave up on a call by timing out and the others arrive late. The first exchange of a call
    also carries the call's arguments (``arguments``): ranks that made different calls (another
    path, another option) are refused on every rank at once, before anything is written.

    Example (on every rank of a job)::

        coord = Coordinator(None, timeout_secs=60).call("Saving /run/c", {"path": "/run/c"})
        sizes = coord.all_gather("sizes", b"12")  # one payload per rank, in rank order
    """

    is_collective = True

    def __init__(self, group: Any, timeout_secs: float | None) -> None:
        self.group = group
        self.rank = dist.get_rank(group)
        self.world = dist.get_world_size(group)
        try:  # a bad one on one rank alone is refused inside the call, on every rank (``failures_shared``)
            self.timeout_secs = checked_timeout(timeout_secs)
            self._refused: ValueError | None = None
        except ValueError as e:
            self.timeout_secs, self._refused = DEFAULT_TIMEOUT_SECS, e
        pg = group if group is not None else dist.distributed_c10d._get_default_group()
        self.store = dist.distributed_c10d._get_process_group_store(pg)
        self.name = dist.distributed_c10d._get_process_group_name(pg)
        self.what = ""  # the call's description, for messages
        self.consequence = "Nothing was committed."  # what a failure of the call means; a restore updates it
        self.stop_consequence: str | None = None  # what this rank's stop means, when it knows better (see _mark_stopped)
        self._prefix = ""  # the call's key prefix; empty outside a call
        self._arguments: bytes | None = None  # sent with the call's first exchange, then None
        self._exchanges = 0
        self._ended = False  # see ``end_call``

    def call(self, what: str, arguments: dict[str, Any]) -> Coordinator:
        """Begin one collective call on every rank: a coordinator whose exchanges are keyed by the
        call's identity. ``arguments`` (JSON) must be equal on every rank; ``what`` names the call
        in messages ("Saving /run/ckpt-3").

        The identity is the call's number in this process's sequence of calls on the group: every
        public collective entry point begins its call first, unconditionally (a failure before its
        first exchange is sent through that exchange, see :meth:`failures_shared`), so the ranks'
        numbers agree as long as they make the same calls, and a call that times out on one rank
        keeps its number there too."""
        with _calls_lock:
            number = _calls[self.name] = _calls.get(self.name, 0) + 1
        child = object.__new__(Coordinator)
        child.__dict__.update(self.__dict__)
        child.what = what
        child._prefix = f"{_KEY_ROOT}/{self.name}/call{number}"
        child._arguments = json.dumps(arguments, sort_keys=True, separators=(",", ":")).encode()
        child._exchanges = 0
        child._ended = False
        child.stop_consequence = None
        return child

    def scope(self) -> Coordinator:
        """A coordinator of the same call whose exchanges have keys of their own, for the part of
        it that runs on another thread (a background save): its exchanges never interleave with
        the ones this coordinator or a later call makes meanwhile."""
        assert self._prefix and self._arguments is None, "a scope is opened after the call's first exchange"
        child = object.__new__(Coordinator)
        child.__dict__.update(self.__dict__)
        child._prefix = f"{self._prefix}/background"
        child._exchanges = 0
        child._ended = False
        return child

    def _key(self, tag: str) -> str:
        if not self._prefix:
            raise RuntimeError("torchckpt: an exchange outside a collective call (Coordinator.call) is a bug")
        if self._arguments is not None:  # the call's first exchange
            for hook in _before_calls:
                hook()
        self._exchanges += 1
        return f"{self._prefix}/{self._exchanges}"  # the n-th exchange of a call is the same on every rank

    def _post(self, key: str, payload: bytes, tag: str) -> None:
        """Put this rank's part at ``key``, unless a rank that waited for it gave up first: the
        slot then holds that rank's mark (one atomic compare-and-set decides which came first)."""
        stored = bytes(self._store(lambda: self.store.compare_set(key, "", payload), tag))  # type: ignore[arg-type]
        if stored.startswith(_GAVE_UP):
            reason = stored[len(_GAVE_UP):].decode(errors="replace")
            raise CheckpointError(
                f"{self.what or 'A collective call'} was abandoned by the other ranks before this rank arrived "
                f"({reason}): this rank is late, by more than timeout_secs={self.timeout_secs:g}. "
                f"{self.consequence} Make the same call on every rank, or pass a longer timeout_secs."
            )

    def _check_arrived(self, values: list[bytes], tag: str) -> None:
        """Raise when a rank's slot holds a mark: the rank stopped, or another rank gave up on it."""
        stopped = [r for r, v in enumerate(values) if v.startswith(_STOPPED)]
        if stopped:
            why, _, known = values[stopped[0]][len(_STOPPED):].decode(errors="replace").partition("\x00")
            raise CheckpointError(
                f"Rank{'s' if len(stopped) > 1 else ''} {', '.join(map(str, stopped))} stopped during "
                f"{self._during(tag)} ({why}), so the call cannot complete. {known or self.consequence}")
        late = [r for r, v in enumerate(values) if v.startswith(_GAVE_UP)]
        if late:
            raise RankTimeoutError(self._during(tag), late, self.timeout_secs, self.consequence)

    def _store(self, operation: Callable[[], T], tag: str) -> T:
        """One Store operation; a store that is gone (rank 0, which serves it, died) is a typed error."""
        try:
            return operation()
        except (RuntimeError, dist.DistError) as e:
            raise CheckpointError(
                f"Lost contact with the other ranks during {self._during(tag)}: {e}. The process serving the "
                f"c10d store (rank 0) is probably gone. {self.consequence}"
            ) from e

    def _during(self, tag: str) -> str:
        return f"the {tag} step of {self.what[:1].lower()}{self.what[1:]}" if self.what else f"the {tag} step"

    def _wait(self, keys: list[str], tag: str, timeout_secs: float) -> None:
        try:
            self.store.wait(keys, datetime.timedelta(seconds=timeout_secs))
        except (RuntimeError, dist.DistError) as e:  # a timeout, or the store is gone
            # Mark every slot still empty, atomically: a rank that posts after this finds the mark
            # and stops; one that posted meanwhile keeps its part, and this rank goes on.
            mark = _GAVE_UP + f"rank {self.rank} gave up waiting at {tag}".encode()
            try:
                missing = [r for r, k in enumerate(keys)
                           if bytes(self.store.compare_set(k, "", mark)) == mark]  # type: ignore[arg-type]
            except (RuntimeError, dist.DistError):
                raise CheckpointError(
                    f"Lost contact with the other ranks during {self._during(tag)}: {e}. {self.consequence}"
                ) from e
            if missing:
                raise RankTimeoutError(self._during(tag), missing, timeout_secs, self.consequence) from None

    def _framed(self, payload: bytes, failed: bool = False) -> bytes:
        """The payload, preceded in the call's first exchange by the call's arguments and whether
        this rank failed before it (then the payload is its failure)."""
        if self._arguments is None:
            return payload
        return len(self._arguments).to_bytes(4, "big") + self._arguments + (b"F" if failed else b"P") + payload

    def _unframed(self, values: list[bytes]) -> list[bytes]:
        """Every rank's payload of the call's first exchange, once the ranks' arguments are equal
        and none failed before it."""
        if self._arguments is None:
            return values
        mine, self._arguments = self._arguments, None
        arguments, failures, payloads = [], {}, []
        for rank, value in enumerate(values):
            size = int.from_bytes(value[:4], "big")
            arguments.append(value[4 : 4 + size])
            if value[4 + size : 5 + size] == b"F":
                failures[rank] = decode(value[5 + size :])
            payloads.append(value[5 + size :])
        if any(a != mine for a in arguments):
            raise mismatched_calls([json.loads(a) for a in arguments])
        if failures:
            raise collective_error(failures, self.what or "A collective call")
        return payloads

    @contextlib.contextmanager
    def failures_shared(self) -> Iterator[None]:
        """Around the work of a call on this rank: a failure before the call's first exchange is
        sent through it, so that every rank raises it at once (the same error), instead of the
        others waiting for an exchange this rank will never make (a ``timeout_secs`` refused on this
        rank alone is one). A rank interrupted (``KeyboardInterrupt``, ``SystemExit``) marks the
        call's exchanges (:meth:`end_call`). The call ends with :meth:`end_call`, also when it
        fails."""
        try:
            if self._refused is not None:  # an argument of the call's coordinator (timeout_secs)
                raise self._refused
            yield
        except BaseException as e:
            if not isinstance(e, Exception):  # KeyboardInterrupt, SystemExit: this process stops now
                self.end_call(e)
                raise
            try:
                if not self._exchanges:  # once an exchange was made or tried, it carries failures or failed itself
                    self.all_gather("call", encode(failure_payload(e)), failed=True)  # raises: this rank's failure is in it
                raise
            except Exception as shared:
                self.end_call(shared)
                raise
            except BaseException as stop:  # interrupted while sending its failure (waiting for a save in flight)
                self.end_call(stop)
                raise
        self.end_call()

    def _mark_stopped(self, error: BaseException) -> None:
        """As this rank stops in the middle of a call: its slots of the exchange it was in and of the
        ones after it hold a mark, so that the ranks waiting there raise now instead of waiting out
        ``timeout_secs``; a slot it filled already keeps its part (a compare-and-set, as ``_post``).
        The mark carries ``stop_consequence`` when set (rank 0 knows it stopped before the commit,
        where the others can only say that it may have committed)."""
        if not self._prefix or self.world == 1:
            return
        mark = _STOPPED + f"{type(error).__name__} on rank {self.rank}".encode()
        if self.stop_consequence:
            mark += b"\x00" + self.stop_consequence.encode()
        with contextlib.suppress(RuntimeError, dist.DistError):  # the store gone: nobody waits any more
            for n in range(max(1, self._exchanges), self._exchanges + _STOP_AHEAD + 1):
                self.store.compare_set(f"{self._prefix}/{n}/{self.rank}", "", mark)  # type: ignore[arg-type]
                if self.rank == 0:  # rank 0's broadcasts have one key
                    self.store.compare_set(f"{self._prefix}/{n}", "", mark)  # type: ignore[arg-type]

    def end_call(self, failure: BaseException | None = None) -> None:
        """The last step of a call, on every rank: rank 0 returns only once the others have read
        every exchange of the call.

        Why: rank 0 serves the c10d store in most launches (``init_process_group`` with
        ``MASTER_ADDR``, ``mp.spawn``), and a broadcast's sender does not wait for its readers. A
        job whose rank 0 ended right after its last save (a preempted run's exit) took the store
        away from ranks still reading rank 0's verdict: they raised "Lost contact ... Nothing was
        committed" after a save that was committed. The others add one to a counter and go on;
        rank 0 polls it (never a blocking wait: a background save's exchanges share this process's
        store client). A rank that does not come has gone and reads nothing more: rank 0 gives up
        after ``_END_WAIT_SECS`` (after a failure ``_END_WAIT_AFTER_FAILURE_SECS``; not at all for
        the ranks a timeout named, nor when this rank was interrupted), never turning the call's
        outcome into another. A call
        ends once: an asynchronous save ends its own before its background part (:meth:`scope`)
        begins, and that part ends separately.

        A call that ends because this rank stops (``failure`` a ``KeyboardInterrupt`` or
        ``SystemExit``, in the foreground or in the background part) first marks its exchanges
        (:meth:`_mark_stopped`), so the others raise at once."""
        if failure is not None and not isinstance(failure, Exception):
            self._mark_stopped(failure)
        if not self._prefix or self.world == 1 or self._ended:
            return
        self._ended = True
        key = f"{self._prefix}/ended"
        with contextlib.suppress(RuntimeError, dist.DistError):  # the store gone: nobody is left to read it
            if self.rank:
                self.store.add(key, 1)
                return
            if failure is not None and not isinstance(failure, Exception):  # interrupted: no wait
                return
            gone = set(failure.ranks) - {0} if isinstance(failure, RankTimeoutError) else set()
            expected = self.world - 1 - len(gone)
            limit = _END_WAIT_SECS if failure is None else _END_WAIT_AFTER_FAILURE_SECS
            deadline = time.monotonic() + min(self.timeout_secs, limit)
            delay = 1e-4
            while self.store.add(key, 0) < expected and time.monotonic() < deadline:
                time.sleep(delay)
                delay = min(2 * delay, 0.02)
            self.store.delete_key(key)

    def check_call(self) -> None:
        """Compare the call's arguments across ranks now, unless an exchange already did: before
        rank 0 acts alone on everyone's behalf (claims a directory), the call must be the same."""
        if self._arguments is not None:
            self.all_gather("call", b"")

    def all_gather(self, tag: str, payload: bytes, timeout_secs: float | None = None,
                   failed: bool = False) -> list[bytes]:
        """Every rank's ``payload``, in rank order, on every rank (``failed``: see :meth:`failures_shared`)."""
        key = self._key(tag)
        keys = [f"{key}/{r}" for r in range(self.world)]
        self._post(keys[self.rank], self._framed(payload, failed), tag)
        self._wait(keys, tag, self.timeout_secs if timeout_secs is None else timeout_secs)
        values = [bytes(v) for v in self._store(lambda: self.store.multi_get(keys), tag)]
        if self._store(lambda: self.store.add(f"{key}/read", 1), tag) == self.world:  # the last reader removes them
            for k in [*keys, f"{key}/read"]:
                self._store(lambda k=k: self.store.delete_key(k), tag)  # type: ignore[misc]
        self._check_arrived(values, tag)
        return self._unframed(values)

    def gather(self, tag: str, payload: bytes, timeout_secs: float | None = None) -> list[bytes] | None:
        """Every rank's ``payload`` on rank 0 (None elsewhere)."""
        if self._arguments is not None:  # the call's first exchange: every rank checks the arguments
            values = self.all_gather(tag, payload, timeout_secs)
            return values if self.rank == 0 else None
        key = self._key(tag)
        keys = [f"{key}/{r}" for r in range(self.world)]
        self._post(keys[self.rank], payload, tag)
        if self.rank:
            return None
        self._wait(keys, tag, self.timeout_secs if timeout_secs is None else timeout_secs)
        values = [bytes(v) for v in self._store(lambda: self.store.multi_get(keys), tag)]
        for k in keys:
            self._store(lambda k=k: self.store.delete_key(k), tag)  # type: ignore[misc]
        self._check_arrived(values, tag)
        return values

    def broadcast(self, tag: str, payload: bytes | None, timeout_secs: float | None = None) -> bytes:
        """Rank 0's ``payload`` on every rank."""
        if self._arguments is not None:  # the call's first exchange: every rank checks the arguments
            return self.all_gather(tag, payload if self.rank == 0 else b"", timeout_secs)[0]  # type: ignore[arg-type]
        key = self._key(tag)
        if self.rank == 0:
            assert payload is not None
            self._post(key, payload, tag)
            if self.world == 1:
                self._store(lambda: self.store.delete_key(key), tag)
            return payload
        self._wait([key], tag, self.timeout_secs if timeout_secs is None else timeout_secs)
        value = bytes(self._store(lambda: self.store.get(key), tag))
        if self._store(lambda: self.store.add(f"{key}/read", 1), tag) == self.world - 1:
            self._store(lambda: self.store.delete_key(key), tag)
            self._store(lambda: self.store.delete_key(f"{key}/read"), tag)
        self._check_arrived([value], tag)
        return value

    @property
    def outcome_timeout_secs(self) -> float:
        """How long a rank waits for rank 0's verdict: longer than rank 0 waits for the others,
        so that a dead rank is named by rank 0 rather than rank 0 by everyone."""
        return self.timeout_secs * 2 + 5


class Solo:
    """The coordinator of a single process (no process group, or a group of one): every call is
    trivially the same everywhere, nothing is exchanged, and the functions below (:func:`agree`,
    :func:`decided`, ...) just run their work, raising its own exception.

    Why a coordinator at all: the faces and drivers then have one spelling for one process and for
    many (as DCP's ``_DistWrapper`` turns collectives into no-ops without a group), and branch on
    :attr:`is_collective` only where the steps really differ (the format a save writes).
    """

    is_collective = False
    rank = 0
    world = 1

    def __init__(self) -> None:
        self.consequence = "Nothing was committed."

    def call(self, what: str, arguments: dict[str, Any]) -> Solo:
        return Solo()

    def failures_shared(self) -> contextlib.AbstractContextManager[None]:
        return contextlib.nullcontext()

    def check_call(self) -> None:
        pass


AnyCoordinator = Coordinator | Solo


def agree(coord: AnyCoordinator, what: str, work: Callable[[], T], done: str | None = None) -> T:
    """Every rank runs ``work``; a failure on any rank is raised on every rank (the same error, with
    ``done`` added on the ranks whose own work had succeeded)."""
    if isinstance(coord, Solo):
        return work()
    result: T | None = None
    error, mine = None, {}
    try:
        result = work()
    except Exception as e:
        error, mine = e, {"error": failure_payload(e)}
    outcomes = [decode(o) for o in coord.all_gather("agree", encode(mine))]
    failures = {r: o["error"] for r, o in enumerate(outcomes) if "error" in o}
    if failures:
        raise collective_error(failures, what, done if error is None else None) from error
    return result  # type: ignore[return-value]


def agree_all(coord: AnyCoordinator, what: str, work: Callable[[], T], done: str | None = None) -> list[T]:
    """Every rank runs ``work`` (returning JSON) and gets every rank's result, in rank order; a
    failure on any rank is raised on every rank (the same error, with ``done`` added on the ranks
    whose own work had succeeded)."""
    if isinstance(coord, Solo):
        return [work()]
    error: Exception | None = None
    mine: dict[str, Any] = {}
    try:
        mine = {"result": work()}
    except Exception as e:
        error, mine = e, {"error": failure_payload(e)}
    outcomes = [decode(o) for o in coord.all_gather("agree", encode(mine))]
    failures = {r: o["error"] for r, o in enumerate(outcomes) if "error" in o}
    if failures:
        raise collective_error(failures, what, done if error is None else None) from error
    return [o["result"] for o in outcomes]


def decided(coord: AnyCoordinator, what: str, decide: Callable[[], Any]) -> Any:
    """Rank 0 runs ``decide`` and every rank gets its JSON answer, or raises its failure."""
    if isinstance(coord, Solo):
        return decide()
    coord.check_call()
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


def coordinator_for(process_group: Any, timeout_secs: float | None) -> AnyCoordinator:
    """The coordinator of ``process_group`` (the default group when None); a :class:`Solo` one when
    the call is a single process's: no process group, a group of one, or ``process_group=False``
    (this process alone although others run: a rank-0-only save, as Lightning's on DDP)."""
    if process_group is False or not dist.is_available() or not dist.is_initialized() or dist.get_world_size(process_group) <= 1:
        checked_timeout(timeout_secs)  # refused alike in one process
        return Solo()
    return Coordinator(process_group, timeout_secs)


def default_rank() -> int:
    """This process's rank in the default process group (0 without one)."""
    return dist.get_rank() if dist.is_available() and dist.is_initialized() else 0
