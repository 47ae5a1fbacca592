"""Long-lived helper threads that run small jobs in the order they were submitted.

Saves hash and write on helper threads so that the caller keeps copying meanwhile. The threads
are daemons started on first use rather than ``concurrent.futures`` pools, because pools refuse
work once interpreter exit begins, and the last asynchronous save must still finish then. A
process forked from one that used them (a DataLoader worker, say) starts its own on first use:
the parent's threads do not exist in the child.
"""

from __future__ import annotations

import os
import queue
import sys
import threading
import weakref
from collections.abc import Callable


class Worker:
    """One daemon thread and its queue of jobs. A job must not raise: it records its own failure."""

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
                    self._jobs = queue.SimpleQueue()
                    threading.Thread(target=_run_forever, args=(self._jobs,), daemon=True, name=self.name).start()
                jobs = self._jobs
        jobs.put(job)

    def close(self) -> None:
        """End the thread once the jobs already submitted have run (a later ``submit`` starts a new one)."""
        with self._lock:
            jobs, self._jobs = self._jobs, None
        if jobs is not None:
            jobs.put(None)


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
