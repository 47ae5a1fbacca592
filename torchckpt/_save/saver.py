"""The one write path of a checkpoint: one process or every rank, now or in the background.

Every save runs the same steps, on every rank, in program order:

1. wait for the write in flight (one at a time per checkpoint; its failure is raised here);
2. capture the state now: every tracked object's tensors and the encoded tree (``capture``);
3. plan: one process groups its tensors into shards (format 1); several ranks exchange what each
   holds, agree, and plan every rank's files (format 2, ``collective``);
4. write the shards and the index, and commit, here or on the checkpoint's background writer
   (``background``), then run the caller's ``after`` hook (a manager records the checkpoint and
   applies retention).

A single process is called with a :class:`~torchckpt._dist.coordinator.Solo` coordinator; the
driver branches on it once, where the steps differ (step 3 and the format: one process writes
format 1 itself, several ranks exchange and write format 3 through ``collective``).
"""

from __future__ import annotations

from collections.abc import Callable, Mapping
from dataclasses import dataclass
from typing import Any

import torch

from torchckpt._dist import coordinator as dist_coordinator
from torchckpt._dist import dtensor as dist_dtensor
from torchckpt._dist.coordinator import AnyCoordinator
from torchckpt._format import spec
from torchckpt._save import collective, write
from torchckpt._save.background import AsyncWriter
from torchckpt._save.capture import WriteJob, capture
from torchckpt._save.options import NO_HOOKS, SaveHooks, SaveOptions
from torchckpt._storage.base import Storage
from torchckpt._threads import gc_paused


@dataclass(frozen=True)
class Source:
    """What the driver needs from the checkpoint it saves, without importing it.

    ``state(distributed)`` is what each tracked object saves, by name, its per-rank values marked
    (``PerRank``), for a save by several ranks or one process's; ``objects()`` names the kind
    of each; ``writer()`` is the checkpoint's own background writer (made on first use); ``wait()``
    waits for its write in flight and raises that write's failure; ``groups()`` maps the
    address of each tensor likely unchanged since the last save (a frozen parameter, a buffer of
    a module that trains nothing) to its group of ``_save.plan.plan_shards``; ``versions()`` is
    the ``_version``s of the modules whose state it saves (``capture.module_versions``; None: none).
    """

    state: Callable[[bool], dict[str, Any]]
    objects: Callable[[], dict[str, str]]
    writer: Callable[[], AsyncWriter]
    wait: Callable[[], None]
    groups: Callable[[], Mapping[int, int]] = dict
    versions: Callable[[], dict[str, dict[str, int | None]] | None] = lambda: None


def save(source: Source, storage: Storage, path: str, coord: AnyCoordinator, options: SaveOptions,
         hooks: SaveHooks = NO_HOOKS) -> None:
    """Save ``source`` to ``path`` on ``storage``: the steps of the module docstring.

    Without ``options.replace``, a checkpoint already at ``path`` raises ``AlreadyCommitted``. On
    several ranks (called inside the call's ``failures_shared``), every failure before the writes
    (a previous background failure, a ``state_dict()`` that raises, a value that cannot be stored)
    fails the call on every rank.
    """
    if coord.is_collective:
        _save_by_every_rank(source, storage, path, coord, options, hooks)
        return
    source.wait()  # one write in flight; raises a previous background failure
    if options.replace:  # now, not from the background of an asynchronous save (the write checks again)
        write.refuse_replacing_other(storage, path)

    def run() -> None:
        with gc_paused():
            write.write_checkpoint(storage, path, job.stored, job.aliases, job.section, options.max_shard_size,
                                   options.progress, options.replace, options.base, job.groups,
                                   options.incremental, hooks.after, options.warm_page_cache, job.order)

    # One pause over capture and write: re-enabling the collector in between would make it sweep
    # the tens of thousands of small objects the capture has just made.
    with gc_paused():
        job = _capture(source, options, distributed=False)
        if not options.async_save:
            run()
            return
        writer = source.writer()
        job.stored, job.aliases = writer.snapshot(dist_dtensor.localize(job.stored))
    writer.submit(run, path)


def _capture(source: Source, options: SaveOptions, distributed: bool) -> WriteJob:
    state = source.state(distributed)
    if options.save_counter is not None:  # a Checkpoint's; a plain dict (``save_state``) has none
        state[spec.SAVE_COUNTER] = options.save_counter
    prepare = not options.async_save and not distributed
    job = capture(state, source.objects(), options.metadata, dist_dtensor.localize if prepare else None,
                  options.ordered, one_process=not distributed)
    versions = source.versions()
    if versions is not None:
        job.section[spec.MODULE_VERSIONS_KEY] = versions
    by_address = source.groups()
    if by_address:  # by address: what state_dict() returns are new tensors over the parameters' memory
        found = ((n, by_address.get(dist_dtensor.address_of(t))) for n, t in job.stored.items())
        job.groups = {n: g for n, g in found if g}
    return job


def _save_by_every_rank(source: Source, storage: Storage, path: str, coord: AnyCoordinator, options: SaveOptions,
                        hooks: SaveHooks) -> None:
    """Capture, exchange and plan here, in program order on every rank, and for an asynchronous
    save the copy into host memory; then the writes, the commit and the outcome, on the background
    thread for an asynchronous save, coordinating through keys of their own in the c10d Store
    (never through collectives on the training group).

    Everything that may fail on one rank alone runs inside the first exchange, so that it fails
    this call on every rank instead of leaving the others waiting to pair with the next call."""
    assert isinstance(coord, dist_coordinator.Coordinator)

    def state() -> tuple[dict[str, torch.Tensor], dict[str, Any], dict[str, int]]:
        source.wait()  # one write in flight; raises a previous background failure
        if options.replace and coord.rank == 0:  # now, on every rank: not only from an asynchronous save's background
            write.refuse_replacing_other(storage, path)
        job = _capture(source, options, distributed=True)
        return job.stored, job.section, job.groups

    with gc_paused():
        prepared = collective.prepare(coord, path, state, options.max_shard_size, options.base, options.incremental)
        scope = coord.scope() if options.async_save else coord
        if options.async_save:  # a copy that fails on one rank (out of memory) fails the save on every rank, now
            dist_coordinator.agree(coord, "Saving " + path, lambda: _snapshot(source.writer(), prepared))

    def run() -> None:
        try:
            with gc_paused():
                collective.finish(scope, storage, prepared, False if options.async_save else options.progress,
                                  options.replace, hooks, options.warm_page_cache)
        except BaseException as e:  # a stop too (SystemExit on this thread): the others raise at once
            if options.async_save:  # the background part's exchanges end here (Coordinator.end_call)
                scope.end_call(e)
            raise
        if options.async_save:
            scope.end_call()

    if not options.async_save:
        run()
        return
    coord.end_call()  # before the background part exchanges: a wait of this call must not hold its store client
    source.writer().submit(run, path, collective=True)


def _snapshot(writer: AsyncWriter, prepared: collective.Prepared) -> None:
    """Copy this rank's tensors of a save by several ranks into the writer's host memory."""
    views, aliases = writer.snapshot(prepared.captured.local)
    prepared.captured.local = {n: views[aliases.get(n, n)] for n in prepared.captured.local}
