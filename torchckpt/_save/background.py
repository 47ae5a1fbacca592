"""Background saves that block training only for a memory copy.

``save()`` copies every tensor into host memory that is kept and reused from one save to the
next (pinned when the state is on CUDA, so the device-to-host copy is a DMA), then hands the
write, fsync, commit and bookkeeping to a background thread and returns. Training may change its
tensors at once. At most one save is in flight: the next one first waits for it. A failure in
the background is kept and raised by the next ``submit()`` or ``wait()``. Interpreter exit waits
for the save in flight, so the last checkpoint is never abandoned half-written.

Why the copy is grouped: a state of 20,000 small tensors copied one ``copy_`` at a time spends
more time in per-call overhead than in moving bytes. Host tensors of one dtype and trailing
shape are copied by one ``torch.cat`` into one region of a flat buffer, split across cores.
"""

from __future__ import annotations

import atexit
import functools
import os
import sys
import threading
import weakref
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Any

import torch

from torchckpt import _threads
from torchckpt._dist import coordinator as dist_coordinator
from torchckpt._save import capture

_writers: weakref.WeakSet[AsyncWriter] = weakref.WeakSet()
# A writer with a save in flight is held here until it ends, though its checkpoint was dropped (a
# Checkpoint local to a function that returned): interpreter exit finds it in ``_writers`` and waits.
_in_flight: set[AsyncWriter] = set()
_collective_in_flight: set[AsyncWriter] = set()  # those of saves by several ranks (``_settle_in_flight``)

_PLAIN = (torch.Tensor, torch.nn.Parameter)  # anything else is laid out anew, and checked
_ALIGNMENT = 64  # every group's region starts on a cache line (and so on any element size)
_SPLIT_BYTES = 8 * 2**20  # a group larger than this is copied by several threads


@dataclass
class _Group:
    """Host tensors of one dtype and trailing shape, copied together into one region."""

    region: torch.Tensor  # (rows, *trailing), or (count,) for 0-dim tensors
    stack: bool  # 0-dim tensors are stacked, not concatenated
    bounds: list[int] = field(default_factory=list)  # row (or item) where each tensor starts, and the end


class Staging:
    """Reusable host memory for snapshots of one set of tensors, in the given order: one flat
    buffer (pinned when a tensor is on CUDA) and one view of it per tensor.

    Laid out once, and reused by every save whose tensors have the same names, dtypes, shapes
    and devices (the usual case: training changes values, not layouts).
    """

    def __init__(self, tensors: dict[str, torch.Tensor], flat: torch.Tensor | None = None) -> None:
        stored, self.aliases = capture.prepare_tensors(tensors)  # raises for what cannot be stored
        group_of: dict[Any, int] = {}
        members: list[list[str]] = []
        # Per tensor, what a later save must match to reuse this layout: name, dtype, shape, off the
        # CPU, address, strides and conj/neg flags (what decided which ones are aliases: ``w.t()`` at
        # ``w``'s address is no alias of ``w``), and its group (-1 for an alias: not copied).
        self.plan: list[tuple[str, torch.dtype, torch.Size, bool, int, tuple[int, ...], tuple[bool, bool], int]] = []
        for name, t in tensors.items():
            on_device = not t.is_cpu
            g = -1
            if name not in self.aliases:
                key = ("device", name) if on_device else (t.dtype, tuple(t.shape[1:]), t.dim() == 0)
                g = group_of.setdefault(key, len(members))
                if g == len(members):
                    members.append([])
                members[g].append(name)
            self.plan.append((name, t.dtype, t.shape, on_device, t.data_ptr(), t.stride(), (t.is_conj(), t.is_neg()),
                              g))
        sizes = [sum(stored[n].nbytes for n in names) for names in members]
        total = sum(-(-size // _ALIGNMENT) * _ALIGNMENT for size in sizes)
        pin = any(t.is_cuda for t in stored.values())
        if flat is None or flat.numel() < total or flat.is_pinned() != pin:
            flat = torch.empty(max(total, 1), dtype=torch.uint8, pin_memory=pin)
        self.flat = flat
        self.groups: list[_Group] = []
        view_of: dict[str, torch.Tensor] = {}
        offset = 0
        for names, size in zip(members, sizes):
            first = stored[names[0]]
            raw = flat[offset : offset + size].view(first.dtype)
            offset += -(-size // _ALIGNMENT) * _ALIGNMENT
            stack = first.dim() == 0
            rows = [1 if stack else stored[n].shape[0] for n in names]
            region = raw.view(-1) if stack else raw.view(sum(rows), *first.shape[1:])
            group = _Group(region, stack, [0])
            for n, r in zip(names, rows):
                start = group.bounds[-1]
                view_of[n] = region[start] if stack else region[start : start + r]
                group.bounds.append(start + r)
            self.groups.append(group)
        self.views = {name: view_of[name] for name in stored}  # the callers' order: it decides shard order

    def copy_from(self, tensors: dict[str, torch.Tensor]) -> bool:
        """Copy ``tensors`` into the views, or return False if they do not fit this layout.

        Fitting means the same names in the same order, each with the same dtype, shape, device,
        address, strides and conj/neg flags as when the layout was made: then the same tensors are
        stored and the same ones are aliases, and every check ``prepare_tensors`` made still holds.
        """
        if len(tensors) != len(self.plan):
            return False
        sources: list[list[torch.Tensor]] = [[] for _ in self.groups]
        strided = torch.strided
        try:
            for (name, dtype, shape, on_device, address, strides, flagged, index), (key, src) in zip(self.plan,
                                                                                                  tensors.items()):
                if (key != name or type(src) not in _PLAIN or src.dtype is not dtype or src.layout is not strided
                        or src.shape != shape or src.is_cpu == on_device or src.data_ptr() != address
                        or src.stride() != strides or (src.is_conj(), src.is_neg()) != flagged):
                    return False
                if index >= 0:
                    sources[index].append(src)
        except RuntimeError:  # a tensor without storage or strides (nested, sparse): laid out anew, and refused
            return False
        cuda_pairs: list[tuple[torch.Tensor, torch.Tensor]] = []
        other_pairs: list[tuple[torch.Tensor, torch.Tensor]] = []
        tasks: list[tuple[torch.Tensor, list[torch.Tensor], bool]] = []
        for group, srcs in zip(self.groups, sources):
            if srcs and not srcs[0].is_cpu:
                (cuda_pairs if srcs[0].is_cuda else other_pairs).append((group.region.view(srcs[0].shape), srcs[0]))
                continue
            tasks.extend(_split(group, srcs))
        with torch.no_grad():
            if cuda_pairs:  # device-to-host into pinned memory: DMA on each source's stream, waited for below
                torch._foreach_copy_([d for d, _ in cuda_pairs], [s for _, s in cuda_pairs], non_blocking=True)
            for host, src in other_pairs:  # other accelerators: a plain copy, complete when it returns
                host.copy_(src)
            _run_parallel(tasks)
            for device in {src.device for _, src in cuda_pairs}:  # every GPU the state is on, not just the current one
                torch.cuda.synchronize(device)
        return True


def _split(group: _Group, srcs: list[torch.Tensor]) -> list[tuple[torch.Tensor, list[torch.Tensor], bool]]:
    """The group's copy as (out, sources, stack) tasks: one, or about one per core when it is large."""
    parts = 1
    if group.region.nbytes > _SPLIT_BYTES and len(srcs) > 1:
        parts = min(len(srcs), _lanes())
    count = len(srcs)
    tasks = []
    for p in range(parts):
        a, b = p * count // parts, (p + 1) * count // parts
        if a < b:
            out = group.region[group.bounds[a] : group.bounds[b]]
            tasks.append((out, srcs[a:b], group.stack))
    return tasks


def _copy(task: tuple[torch.Tensor, list[torch.Tensor], bool]) -> None:
    out, srcs, stack = task
    if stack:
        torch.stack(srcs, out=out)
    else:
        torch.cat(srcs, out=out)


def _run_parallel(tasks: list[tuple[torch.Tensor, list[torch.Tensor], bool]]) -> None:
    """Run the copy tasks over the cores: large ones spread across the copy threads (torch
    releases the GIL while it copies), the rest on this thread."""
    lanes = _lanes()
    buckets: list[list[tuple[torch.Tensor, list[torch.Tensor], bool]]] = [[] for _ in range(lanes)]
    loads = [0] * lanes
    for task in sorted(tasks, key=lambda t: -t[0].nbytes):
        lane = loads.index(min(loads)) if task[0].nbytes > _SPLIT_BYTES // 4 else 0
        buckets[lane].append(task)
        loads[lane] += task[0].nbytes
    copies = [copier.call(_copy_all, bucket) for copier, bucket in zip(_COPIERS, buckets[1:]) if bucket]
    _copy_all(buckets[0])
    for copy in copies:
        copy.result()


def _copy_all(tasks: list[tuple[torch.Tensor, list[torch.Tensor], bool]]) -> None:
    for task in tasks:
        _copy(task)


_COPIERS = [_threads.Worker("torchckpt-copy") for _ in range(3)]


def _lanes() -> int:
    """How many threads copy at once: the caller and the copiers, one per core."""
    return min(os.cpu_count() or 1, len(_COPIERS) + 1)


_WORKER_NAME = "torchckpt-async-save"  # the thread each writer runs its saves on


class AsyncWriter:
    """Runs one background job at a time on a long-lived worker thread and remembers its failure.

    A thread started per save would take the GIL from the caller as it starts, and ``save()``
    would return only once the new thread gave it back (up to the 5 ms switch interval).
    """

    def __init__(self) -> None:
        self._done = threading.Event()
        self._done.set()
        self._failure: list[BaseException] = []
        self._worker = _threads.Worker(_WORKER_NAME)
        weakref.finalize(self, self._worker.close)  # the thread ends with its writer
        self._staging: Staging | None = None
        self._path = ""
        _writers.add(self)

    def snapshot(self, tensors: dict[str, torch.Tensor]) -> tuple[dict[str, torch.Tensor], dict[str, str]]:
        """Copies of the tensors to store, in reusable host memory, and the aliases among ``tensors``
        (as ``_save.capture.prepare_tensors``); returns once every copy is complete.

        The copies stay valid until the next ``snapshot``, which callers make only after the job
        using them has finished (``submit`` waits for it).

        Raises:
            UnsupportedStateError: a tensor cannot be stored.
        """
        staging = self._staging
        if staging is None or not staging.copy_from(tensors):
            flat = staging.flat if staging is not None else None
            self._staging = staging = None  # drop the old views before laying out new ones
            staging = self._staging = Staging(tensors, flat)
            if not staging.copy_from(tensors):
                raise AssertionError("a fresh snapshot layout must fit its own tensors")
        return staging.views, staging.aliases

    def submit(self, job: Callable[[], None], path: str = "", collective: bool = False) -> None:
        """Start ``job``, the save of ``path``, in the background after the previous one finished;
        ``collective``: a save by several ranks, which the process's next collective call waits for."""
        self.wait()
        self._done.clear()
        self._path = path
        _in_flight.add(self)
        if collective:
            _collective_in_flight.add(self)
        _wait_in_a_multiprocessing_child()
        # The job and this writer travel in a list the run empties: once the save ends, the worker
        # thread holds neither (the writer may then be collected, and its thread end with it).
        self._worker.submit(functools.partial(_run, [job, self], self._done, self._failure))
        if _exiting or not threading.main_thread().is_alive():  # exiting: nothing will wait for it later
            self.wait()

    def wait(self) -> None:
        """Block until the job in flight is finished; raise its failure, if any, once."""
        self._done.wait()
        if self._failure:
            raise self._failure.pop()


def _run(held: list[Any], done: threading.Event, failure: list[BaseException]) -> None:
    """Run the job of ``held`` (``[job, writer]``) on the worker, record its failure, let go of
    both, then signal completion: whatever the job held (a dropped manager, its tensors) is freed
    here before anyone waiting (interpreter exit) goes on."""
    job, writer = held
    held.clear()
    try:
        job()
    except BaseException as e:  # noqa: BLE001 - kept and re-raised on the caller's thread
        failure[:] = [e]
    finally:
        del job
        _in_flight.discard(writer)
        _collective_in_flight.discard(writer)
        del writer
        done.set()


def _settle_in_flight() -> None:
    """Before a collective call's first exchange: wait for this process's saves by several ranks in
    flight (not raising their failures, which their own managers raise). Why: c10d's TCPStore client runs one operation at
    a time, and the exchanges of a call block in ``store.wait``. A call on another ``Checkpoint``
    (an EMA's export next to the run's async save) blocked this process's background save from
    posting, while the other ranks' background saves, holding their clients, blocked their calls
    from posting: both waited until ``timeout_secs`` ran out. One job's calls run one at a time."""
    if threading.current_thread().name == _WORKER_NAME:  # a background save's own part begins no call
        return
    for writer in list(_collective_in_flight):  # a single process's save uses no store: not waited for
        writer._done.wait()


dist_coordinator.before_each_call(_settle_in_flight)


_finalized_in: int | None = None  # the process whose multiprocessing finalizers wait for its saves


def _wait_in_a_multiprocessing_child() -> None:
    """In a ``multiprocessing`` child, have its exit wait for the saves in flight: the fork and
    forkserver methods end a child with ``os._exit`` once its target returns, which runs no
    ``atexit`` hook, only multiprocessing's own finalizers (``multiprocessing.util.Finalize``)."""
    global _finalized_in
    pid = os.getpid()
    if _finalized_in == pid:
        return
    mp = sys.modules.get("multiprocessing")  # never imported: this is no multiprocessing child
    if mp is None or mp.parent_process() is None:
        return
    from multiprocessing import util

    util.Finalize(None, _wait_for_all, exitpriority=0)
    _finalized_in = pid


def _after_fork_in_child() -> None:
    """A forked child does not wait for a save the parent had in flight (the parent's threads do
    not exist in the child; the child's own start on first use)."""
    _in_flight.clear()
    _collective_in_flight.clear()
    for writer in list(_writers):
        writer._done.set()


if hasattr(os, "register_at_fork"):
    os.register_at_fork(after_in_child=_after_fork_in_child)


_exiting = False


@atexit.register
def _wait_for_all() -> None:
    """Interpreter exit waits for every save in flight. Registered on import, so it runs after the
    exit handlers registered later (a final save from one of them is waited for); a save started
    after it ran (from a handler registered before torchckpt was imported) finishes in ``submit``."""
    global _exiting
    _exiting = True
    for writer in list(_writers):
        writer._done.wait()
        _report_unraised(writer)


def _report_unraised(writer: AsyncWriter) -> None:
    """A background failure nobody will raise any more (the program is exiting) goes to stderr:
    the last checkpoint of a run must never be lost in silence."""
    for error in writer._failure:
        print(f"torchckpt: the background save of {writer._path} failed and was not committed "
              f"({type(error).__name__}: {error}). The checkpoints saved before it are intact.",
              file=sys.stderr, flush=True)
    writer._failure.clear()
