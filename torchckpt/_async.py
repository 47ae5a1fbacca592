"""Background saves that block training only for a memory copy.

``save()`` copies every tensor into host buffers that are kept and reused from one save to the
next (pinned when the source is on CUDA, so the device-to-host copy is a DMA), then hands the
write, fsync, commit and bookkeeping to a background thread and returns. Training may change its
tensors at once. At most one save is in flight: the next one first waits for it. A failure in
the background is kept and raised by the next ``submit()`` or ``wait()``. Interpreter exit waits
for the save in flight, so the last checkpoint is never abandoned half-written.
"""

from __future__ import annotations

import atexit
import os
import threading
import weakref
from collections.abc import Callable

import torch

_writers: weakref.WeakSet[AsyncWriter] = weakref.WeakSet()


def _copy_parallel(dst: list[torch.Tensor], src: list[torch.Tensor], non_blocking: bool) -> None:
    """Copy ``src`` into ``dst`` on one thread per core (the copy is bound by memory bandwidth).

    Tensors are split into groups of about equal bytes; each group is one ``_foreach_copy_``, so
    thousands of small tensors cost a few calls.
    """
    if not src:
        return
    groups = max(1, min(os.cpu_count() or 1, 4, len(src)))
    total = sum(t.nbytes for t in src) or 1
    parts: list[tuple[list[torch.Tensor], list[torch.Tensor]]] = [([], []) for _ in range(groups)]
    acc = 0
    for d, s in zip(dst, src):
        k = min(groups - 1, acc * groups // total)
        parts[k][0].append(d)
        parts[k][1].append(s)
        acc += s.nbytes

    def copy(group: tuple[list[torch.Tensor], list[torch.Tensor]]) -> None:
        with torch.no_grad():  # no autograd involved: no detach needed
            if hasattr(torch, "_foreach_copy_"):
                torch._foreach_copy_(group[0], group[1], non_blocking=non_blocking)
            else:
                for d, s in zip(*group):
                    d.copy_(s, non_blocking=non_blocking)

    threads = [threading.Thread(target=copy, args=(g,)) for g in parts[1:] if g[0]]
    for t in threads:
        t.start()
    copy(parts[0])
    for t in threads:
        t.join()


class AsyncWriter:
    """Runs one background job at a time and remembers its failure."""

    def __init__(self) -> None:
        self._thread: threading.Thread | None = None
        self._error: BaseException | None = None
        self._buffers: dict[str, torch.Tensor] = {}
        _writers.add(self)

    def snapshot(self, tensors: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
        """Copies of ``tensors`` in reusable host buffers; returns once every copy is complete."""
        out: dict[str, torch.Tensor] = {}
        on_cuda = False
        for name, src in tensors.items():
            buf = self._buffers.get(name)
            if buf is None or buf.shape != src.shape or buf.dtype != src.dtype:
                pin = src.device.type == "cuda"
                buf = torch.empty(src.shape, dtype=src.dtype, pin_memory=pin)
                self._buffers[name] = buf
            on_cuda = on_cuda or src.device.type == "cuda"
            out[name] = buf
        if len(self._buffers) != len(out):
            for stale in set(self._buffers) - set(tensors):
                del self._buffers[stale]
        _copy_parallel(list(out.values()), list(tensors.values()), on_cuda)
        if on_cuda:
            torch.cuda.synchronize()
        return out

    def submit(self, job: Callable[[], None]) -> None:
        """Start ``job`` in the background after the previous one finished."""
        self.wait()
        thread = threading.Thread(target=self._run, args=(job,), name="torchckpt-async-save", daemon=True)
        self._thread = thread
        thread.start()

    def _run(self, job: Callable[[], None]) -> None:
        try:
            job()
        except BaseException as e:  # noqa: BLE001 - kept and re-raised on the caller's thread
            self._error = e

    def wait(self) -> None:
        """Block until the job in flight is finished; raise its failure, if any, once."""
        thread = self._thread
        if thread is not None:
            thread.join()
            self._thread = None
        error, self._error = self._error, None
        if error is not None:
            raise error

    @property
    def in_flight(self) -> bool:
        return self._thread is not None and self._thread.is_alive()


@atexit.register
def _wait_for_all() -> None:
    for writer in list(_writers):
        thread = writer._thread
        if thread is not None:
            thread.join()
