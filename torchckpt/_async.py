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
import threading
import weakref
from collections.abc import Callable

import torch

_writers: weakref.WeakSet[AsyncWriter] = weakref.WeakSet()


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
        sources = list(tensors.values())  # copy_ under no_grad: no autograd, no detach needed
        with torch.no_grad():
            copy_all = getattr(torch, "_foreach_copy_", None)
            if copy_all is not None and sources:  # one call for thousands of tensors
                copy_all(list(out.values()), sources, non_blocking=on_cuda)
            else:
                for buf, src in zip(out.values(), sources):
                    buf.copy_(src, non_blocking=src.device.type == "cuda")
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
