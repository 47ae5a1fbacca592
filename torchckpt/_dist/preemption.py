"""Signal handlers that only note a preemption, for a manager to act on at its next ``save()``.

Why a flag and nothing more: a signal arrives between any two bytecodes, in the middle of a
``state_dict()``, an optimizer step or a background save's bookkeeping. Saving from inside the
handler would capture half-updated state and could deadlock on a lock the interrupted code holds.
So the handler records the signal and returns; the training loop's next ``save()`` sees it, writes
a checkpoint whatever the interval, and the loop stops itself (``if manager.preempted: break``).
Later signals of the same kind only set the flag again, so they never interrupt that save.

A handler outlives its watch only if the manager was dropped without ``close()``: then it puts the
previous handler back and re-delivers the signal, so SIGTERM still stops a program whose manager
is gone instead of being swallowed.
"""

from __future__ import annotations

import contextlib
import gc
import multiprocessing
import multiprocessing.util
import os
import signal
import threading
import weakref
from collections.abc import Callable, Iterable
from types import FrameType
from typing import Any


class PreemptionWatch:
    """Handlers for ``signals`` that set :attr:`received`; :meth:`close` puts the previous ones back.

    Example::

        watch = PreemptionWatch([signal.SIGTERM])
        ...                      # a SIGTERM now only sets watch.received
        watch.close()            # the previous SIGTERM handler is back
    """

    def __init__(self, signals: Iterable[int | signal.Signals]) -> None:
        wanted = self.checked(signals)
        self.received: signal.Signals | None = None
        self.closed = False
        self._previous: dict[signal.Signals, Any] = {}
        self._handler: Any = None
        if not wanted:
            return
        self._handler = handler = _handler_for(weakref.ref(self), self._previous)
        try:
            for sig in dict.fromkeys(wanted):
                self._previous[sig] = signal.signal(sig, handler)
        except BaseException:
            self.close()
            raise

    @staticmethod
    def checked(signals: Iterable[int | signal.Signals]) -> list[signal.Signals]:
        """``signals`` as ``signal.Signals``, once they are signals this thread can install handlers for.

        Raises:
            ValueError: not a signal number, one no handler can catch, or not the main thread.
        """
        wanted = [signal.Signals(s) for s in signals]
        uncatchable = [s.name for s in wanted if s in (signal.SIGKILL, signal.SIGSTOP)]
        if uncatchable:
            raise ValueError(f"preemption_signals cannot include {', '.join(uncatchable)}: no handler can catch it.")
        if wanted and threading.current_thread() is not threading.main_thread():
            raise ValueError(
                "preemption_signals can only be installed from the main thread (Python runs signal handlers "
                "there); create the CheckpointManager in the main thread, or pass preemption_signals=()."
            )
        return wanted

    def close(self) -> None:
        """Put back the handlers that were there before (idempotent). Where another handler was
        installed over this one since (a second manager's), it stays: this one, still called by
        nobody or handed the signal, passes it on to the handler it replaced."""
        self.closed = True
        for sig, handler in self._previous.items():
            if signal.getsignal(sig) is self._handler:
                signal.signal(sig, handler if handler is not None else signal.SIG_DFL)


def _handler_for(watch_ref: weakref.ref[PreemptionWatch], previous: dict[signal.Signals, Any]) -> Any:
    """The handler: it holds the watch weakly, and the handlers it replaced (filled in as installed)."""

    def handle(signum: int, frame: FrameType | None) -> None:
        sig = signal.Signals(signum)
        watch = watch_ref()
        if watch is not None and not watch.closed:
            if watch.received is None:
                watch.received = sig
            return
        # The manager was closed while another handler sat on top of this one, or dropped without
        # close(): pass the signal on to the handler this one replaced.
        before = previous.get(sig)
        before = before if before is not None else signal.SIG_DFL
        if signal.getsignal(sig) is handle:
            signal.signal(sig, before)  # out of the chain for good
        if callable(before):
            before(signum, frame)
        elif before != signal.SIG_IGN:
            signal.raise_signal(sig)

    return handle


class IgnoreSignals:
    """A ``worker_init_fn`` for a ``DataLoader`` (or torchdata's ``StatefulDataLoader``): its worker
    processes ignore ``signals``, then run ``worker_init_fn`` (the loader's own, if any).

    Why: a preemption signal often reaches every process of the job, not the training process
    alone (``torchrun``'s agent forwards SIGTERM to each worker's process group, SLURM signals
    every process of a step). PyTorch's data workers die of a SIGTERM their parent did not send,
    and the training process then fails in the middle of a step ("DataLoader worker ... is killed
    by signal: Terminated") before its manager's next ``save()``: no preempted checkpoint. Workers
    that ignore it keep serving batches until that save; they still stop when the loader shuts
    them down, and on their own once the training process has exited. Workers still alive as the
    training process exits (``persistent_workers``, a loop left with ``break``: a preempted run's
    usual end) are another matter: Python's ``multiprocessing`` terminates them with SIGTERM and
    waits for them, forever where they ignore it. So, on Linux, the training process ends such
    workers just before that wait, once torch has stopped watching them (only a loader's workers
    that ignore SIGTERM, read from ``/proc``); elsewhere shut the loader down first (``del loader``).

    Example::

        loader = StatefulDataLoader(data, batch_size=32, num_workers=4, generator=g,
                                    worker_init_fn=torchckpt.IgnoreSignals(signal.SIGTERM))
        manager = torchckpt.CheckpointManager(ckpt, "runs/a", preemption_signals=(signal.SIGTERM,))
    """

    def __init__(self, *signals: int | signal.Signals, worker_init_fn: Callable[[int], Any] | None = None) -> None:
        self.signals = tuple(signal.Signals(s) for s in signals)
        self.worker_init_fn = worker_init_fn
        if signal.SIGTERM in self.signals:  # made in the training process (a worker unpickles it: no __init__)
            _end_workers_that_ignore_sigterm_at_exit()
            # a training process multiprocessing forks from this one is given it (its finalizers are cleared)
            multiprocessing.util.register_after_fork(self, _register_in_child)

    def __setstate__(self, state: dict[str, Any]) -> None:  # unpickled in a process spawned with it
        self.__dict__.update(state)
        if signal.SIGTERM in self.signals:
            _end_workers_that_ignore_sigterm_at_exit()

    def __call__(self, worker_id: int) -> None:
        for sig in self.signals:
            signal.signal(sig, signal.SIG_IGN)
        if self.worker_init_fn is not None:
            self.worker_init_fn(worker_id)

    def __repr__(self) -> str:
        names = ", ".join(s.name for s in self.signals)
        return f"IgnoreSignals({names}{', worker_init_fn=' + repr(self.worker_init_fn) if self.worker_init_fn else ''})"


_registered_in: int | None = None  # the process whose finalizers hold the hook (a child inherits the flag, not the hook)


def _end_workers_that_ignore_sigterm_at_exit() -> None:
    """Register (once per process) :func:`_end_ignoring_workers` as a ``multiprocessing`` finalizer:
    its exit handler runs those (of priority 0 and more, highest first) just before it terminates
    the daemonic children and waits for them, both in a main process (at exit) and in one
    ``multiprocessing`` started."""
    global _registered_in
    if _registered_in != os.getpid():
        # before the finalizers of multiprocessing's queues (priority 10)
        multiprocessing.util.Finalize(None, _end_ignoring_workers, exitpriority=100)
        _registered_in = os.getpid()


def _register_in_child(_: object) -> None:
    _end_workers_that_ignore_sigterm_at_exit()


def _end_ignoring_workers() -> None:
    """At exit: end the data loader workers that ignore SIGTERM, which ``multiprocessing`` is about
    to send them before waiting for them to end (forever). They are found through their iterator,
    still alive (by the garbage collector, only when a child ignores SIGTERM); torch stops watching
    them (as when it shuts them down: their end is no worker failure), and they are killed, as
    Python's SIGTERM would have ended them. A process of the user's own is left to
    ``multiprocessing``."""
    stubborn = {c.pid for c in multiprocessing.active_children()
                if c.daemon and c.pid is not None and _ignores_sigterm(c.pid)}
    if not stubborn:
        return
    for it in gc.get_objects():
        workers = getattr(it, "_workers", None) if type(it).__name__.endswith("MultiProcessingDataLoaderIter") else None
        mine = [w for w in workers or () if isinstance(w, multiprocessing.process.BaseProcess) and w.pid in stubborn]
        if not mine:
            continue
        if getattr(it, "_worker_pids_set", False):  # torch's SIGCHLD watch of them, as its shutdown lifts it
            with contextlib.suppress(Exception):
                from torch.utils.data._utils import signal_handling

                signal_handling._remove_worker_pids(id(it))  # type: ignore[attr-defined]
                it._worker_pids_set = False
        for worker in mine:
            if worker.is_alive() and worker.pid is not None:  # not yet reaped: its pid is still this child's
                with contextlib.suppress(OSError):
                    os.kill(worker.pid, signal.SIGKILL)


def _ignores_sigterm(pid: int) -> bool:
    """Whether process ``pid`` ignores SIGTERM (its ``SigIgn`` mask in ``/proc``; False where unknown)."""
    try:
        with open(f"/proc/{pid}/status") as status:
            mask = next((line.split()[1] for line in status if line.startswith("SigIgn:")), "0")
    except OSError:
        return False
    return bool(int(mask, 16) >> (signal.SIGTERM - 1) & 1)
