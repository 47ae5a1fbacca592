"""Test doubles of the storage seam: the local disk and an fsspec store, whose calls a test can
watch, slow down, fail, or follow with an action of its own.

A double is installed for a prefix with ``torchckpt._storage.registry.installed`` (the ``install``
and ``disk`` fixtures of ``conftest.py``), so every face resolves it for the paths under that
prefix; nothing patches a module of the package. A double behaves exactly as its backend until a
test arms it.

Each public method of the backend is a named point (``"stage"``, ``"claim"``, ``"open"``,
``"replace_file"``, ``"put"``...), and so is each method of the stages it opens (``"stage.create"``,
``"stage.commit"``, ``"stage.discard"``...) and of the files they create (``"output.write"``,
``"output.finish"``...). A test arms an action at a point::

    disk.fail("stage.create", OSError(errno.ENOSPC, "No space left on device"), skip=1)  # the second file
    disk.before("stage", lambda final, replace: release.wait(10))  # a slow save
    disk.after("open", lambda path, what: manager.save(), times=1)  # retention deletes it meanwhile
    disk.instead("stage.discard", lambda: None)  # a dead process cleans nothing up

An action is called with the call's arguments; ``times`` (every call by default) and ``skip`` say
which calls it acts on. ``calls`` lists every call as ``(point, args)``, in order.
"""

from __future__ import annotations

import functools
import threading
from collections.abc import Callable, Iterable
from dataclasses import dataclass
from typing import Any

from torchckpt._storage.fsspec import FsspecStorage
from torchckpt._storage.local import LocalStorage

_WHEN = ("before", "instead", "after")


@dataclass
class _Action:
    when: str
    fn: Callable[..., Any]
    times: int | None
    skip: int


class Points:
    """The actions armed at named points, and every call seen (``calls``)."""

    def __init__(self) -> None:
        self.calls: list[tuple[str, tuple[Any, ...]]] = []
        self._armed: dict[str, list[_Action]] = {}
        self._lock = threading.Lock()

    def arm(self, point: str, when: str, fn: Callable[..., Any], times: int | None, skip: int) -> None:
        assert when in _WHEN, when
        with self._lock:
            self._armed.setdefault(point, []).append(_Action(when, fn, times, skip))

    def disarm(self) -> None:
        with self._lock:
            self._armed.clear()

    def call(self, point: str, method: Callable[..., Any], *args: Any, **kwargs: Any) -> Any:
        self.calls.append((point, args))
        for fn in self._due(point, "before"):
            fn(*args, **kwargs)
        instead = self._due(point, "instead")
        result = instead[-1](*args, **kwargs) if instead else method(*args, **kwargs)
        for fn in self._due(point, "after"):
            fn(*args, **kwargs)
        return result

    def _due(self, point: str, when: str) -> list[Callable[..., Any]]:
        """The actions due at this call; one used up is disarmed before it runs, so that it may
        call the double again (a save made meanwhile)."""
        due = []
        with self._lock:
            actions = self._armed.get(point, [])
            for action in actions:
                if action.when != when:
                    continue
                if action.skip:
                    action.skip -= 1
                    continue
                due.append(action.fn)
                if action.times is not None:
                    action.times -= 1
            actions[:] = [a for a in actions if a.times != 0]
        return due


class Hooked:
    """Routes each call of a public method through ``self.points``, as the point
    ``PREFIX + name``; the test-facing methods below are not points."""

    PREFIX = ""
    points: Points

    def __getattribute__(self, name: str) -> Any:
        value = object.__getattribute__(self, name)
        if name.startswith("_") or name in _CONTROLS or not callable(value) or isinstance(value, type):
            return value
        points = object.__getattribute__(self, "points")
        return functools.partial(points.call, object.__getattribute__(self, "PREFIX") + name, value)

    def before(self, point: str, action: Callable[..., Any], *, times: int | None = None, skip: int = 0) -> None:
        """Run ``action(*args)`` before the call at ``point``."""
        self.points.arm(point, "before", action, times, skip)

    def after(self, point: str, action: Callable[..., Any], *, times: int | None = None, skip: int = 0) -> None:
        """Run ``action(*args)`` once the call at ``point`` returned."""
        self.points.arm(point, "after", action, times, skip)

    def instead(self, point: str, action: Callable[..., Any], *, times: int | None = None, skip: int = 0) -> None:
        """Run ``action(*args)`` instead of the call at ``point``; what it returns is the call's result."""
        self.points.arm(point, "instead", action, times, skip)

    def fail(self, point: str, error: BaseException, *, times: int | None = None, skip: int = 0) -> None:
        """Raise ``error`` instead of making the call at ``point``."""

        def raise_error(*args: Any, **kwargs: Any) -> Any:
            raise error

        self.instead(point, raise_error, times=times, skip=skip)

    def heal(self) -> None:
        """Disarm every action: from now on the double behaves as its backend."""
        self.points.disarm()

    @property
    def calls(self) -> list[tuple[str, tuple[Any, ...]]]:
        return self.points.calls

    def called(self, point: str) -> list[tuple[Any, ...]]:
        """The arguments of every call at ``point`` so far."""
        return [args for seen, args in self.points.calls if seen == point]


_CONTROLS = frozenset(["before", "after", "instead", "fail", "heal", "calls", "called", "points"])


class OutputDouble(Hooked):
    """A file being written into a stage; its methods are the points ``output.*``."""

    PREFIX = "output."

    def __init__(self, inner: Any, points: Points) -> None:
        self.inner = inner
        self.points = points

    def write(self, views: list[memoryview]) -> None:
        self.inner.write(views)

    def finish(self) -> None:
        self.inner.finish()

    def close(self) -> None:
        self.inner.close()

    def __enter__(self) -> OutputDouble:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()

    def __getattr__(self, name: str) -> Any:  # ``path``, and whatever else the file has
        return getattr(self.inner, name)


class StageDouble(Hooked):
    """A stage of a double; its methods are the points ``stage.*``, and its files are doubles too."""

    PREFIX = "stage."

    def __init__(self, inner: Any, points: Points) -> None:
        self.inner = inner
        self.points = points

    def create(self, name: str, size: int, keep_cached: bool = False) -> OutputDouble:
        return OutputDouble(self.inner.create(name, size, keep_cached), self.points)

    def write_file(self, name: str, data: bytes) -> None:
        self.inner.write_file(name, data)

    def write_index(self, name: str, pieces: Iterable[bytes]) -> None:
        self.inner.write_index(name, pieces)

    def commit(self, sizes: dict[str, int]) -> None:
        self.inner.commit(sizes)

    def discard(self) -> None:
        self.inner.discard()

    def abandon(self) -> None:
        self.inner.abandon()

    def settle(self, known: Any = (), *, every_file: bool = False) -> None:
        self.inner.settle(known, every_file=every_file)

    def member(self, name: str) -> str:
        return str(self.inner.member(name))

    def reuse(self, name: str, source: str) -> str | None:
        placed: str | None = self.inner.reuse(name, source)
        return placed

    def drop(self, name: str) -> None:
        self.inner.drop(name)

    def stamp(self, name: str) -> Any:
        return self.inner.stamp(name)

    def __getattr__(self, name: str) -> Any:  # ``path``, and whatever else the stage has
        return getattr(self.inner, name)


class StorageDouble(Hooked):
    """What both storage doubles add to their backend: points, and stages that are doubles."""

    def __init__(self, *args: Any, **kwargs: Any) -> None:
        self.points = Points()
        super().__init__(*args, **kwargs)

    def stage(self, final: str, replace: bool) -> StageDouble:
        return StageDouble(super().stage(final, replace), self.points)  # type: ignore[misc]

    def join_stage(self, final: str, stage_path: str) -> StageDouble:
        return StageDouble(super().join_stage(final, stage_path), self.points)  # type: ignore[misc]


class LocalDouble(StorageDouble, LocalStorage):
    """The local disk. Takes ``LocalStorage``'s tuning (``direct_min_bytes``)."""


class RemoteDouble(StorageDouble, FsspecStorage):
    """An fsspec store: ``RemoteDouble(fs, protocol, **tuning)`` with ``FsspecStorage``'s tuning
    (``part_bytes``, ``read_part_min``, ``read_part_max``, ``lease_secs``, ``warned``). Its own
    calls are points too: retention's ``put``, ``remove_quietly`` and ``remove_names``, a lease's
    ``replace_file``."""


def remote_double(url: str, options: dict[str, Any] | None = None, **tuning: Any) -> RemoteDouble:
    """A :class:`RemoteDouble` of the store ``url`` names, its filesystem made with ``options``."""
    import fsspec

    protocol = url.split("://", 1)[0]
    return RemoteDouble(fsspec.filesystem(protocol, **(options or {})), protocol, **tuning)


class Killed(BaseException):
    """The process dies here: raised by an action, it goes through every ``except Exception``."""
