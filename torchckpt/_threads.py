"""Long-lived helper threads that run small jobs in the order they were submitted.

Saves hash, write and copy on helper threads so that the caller keeps working meanwhile. The
threads are daemons started on first use rather than ``concurrent.futures`` pools, because pools
refuse work once interpreter exit begins, and a save made from an ``atexit`` handler (or the last
asynchronous save) must still finish then. Where the interpreter refuses to start a thread at all
(Python 3.12.0 to 3.12.3 during exit), a job runs on the caller instead. A process forked from one
that used them (a DataLoader worker, say) starts its own on first use: the parent's threads do not
exist in the child.
"""

from __future__ import annotations

import contextlib
import gc
import os
import queue
import sys
import threading
import weakref
from collections.abc import Callable, Iterator
from typing import Generic, TypeVar

T = TypeVar("T")


class Worker:
    """One daemon thread and its queue of jobs. A job must not raise: it records its own failure
    (``call`` does that for you)."""

    def __init__(self, name: str) -> None:
        self.name = name
        self._jobs: queue.SimpleQueue[Callable[[], None] | None] | None = None
        self._lock = threading.Lock()
        _workers.add(self)

    def submit(self, job: Callable[[], None]) -> None:
        """Run ``job`` on the worker thread after the jobs submitted before it."""
        jobs = self._jobs
        if jobs is None:
            with self._lock:
                if self._jobs is None:
                    fresh: queue.SimpleQueue[Callable[[], None] | None] = queue.SimpleQueue()
                    thread = threading.Thread(target=_run_forever, args=(fresh,), daemon=True, name=self.name)
                    try:
                        thread.start()
                        self._jobs = fresh
                    except RuntimeError:  # no new threads at interpreter exit
                        pass
                jobs = self._jobs
        if jobs is None:
            job()  # on the caller, then
        else:
            jobs.put(job)

    def call(self, fn: Callable[..., T], *args: object) -> Pending[T]:
        """Run ``fn(*args)`` on the worker thread; its result, or what it raised, waits in the
        returned ``Pending``."""
        pending: Pending[T] = Pending()
        self.submit(lambda: pending._run(fn, args))
        return pending

    def close(self) -> None:
        """End the thread once the jobs already submitted have run (a later ``submit`` starts a new one)."""
        with self._lock:
            jobs, self._jobs = self._jobs, None
        if jobs is not None:
            jobs.put(None)


class Pending(Generic[T]):
    """The outcome of a ``Worker.call``: ``result()`` waits for it."""

    def __init__(self) -> None:
        self._done = threading.Event()
        self._value: T | None = None
        self._error: BaseException | None = None

    def result(self) -> T:
        """The call's return value, once it has run; raises what the call raised."""
        self._done.wait()
        if self._error is not None:
            raise self._error
        return self._value  # type: ignore[return-value]

    def _run(self, fn: Callable[..., T], args: tuple[object, ...]) -> None:
        try:
            self._value = fn(*args)
        except BaseException as e:  # noqa: BLE001 - raised again by result(), on the caller's thread
            self._error = e
        finally:
            self._done.set()


def _run_forever(jobs: queue.SimpleQueue[Callable[[], None] | None]) -> None:
    while (job := jobs.get()) is not None:
        try:
            job()
        except Exception:  # a bug in a job: report it, and keep serving the jobs behind it
            sys.excepthook(*sys.exc_info())
        del job  # do not hold the last job (and what it refers to) while idle


_workers: weakref.WeakSet[Worker] = weakref.WeakSet()


def _forget_threads() -> None:
    for worker in _workers:
        worker._jobs = None
        worker._lock = threading.Lock()


if hasattr(os, "register_at_fork"):
    os.register_at_fork(after_in_child=_forget_threads)


@contextlib.contextmanager
def gc_paused() -> Iterator[None]:
    """Pause the cyclic garbage collector: saving or restoring tens of thousands of tensors
    allocates many small objects, and collections triggered in between only cost time."""
    was_enabled = gc.isenabled()
    gc.disable()
    try:
        yield
    finally:
        if was_enabled:
            gc.enable()
