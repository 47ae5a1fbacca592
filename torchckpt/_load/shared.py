"""A tensor two tracked objects share: which saved value it keeps, and which key the report calls
unused.

``Checkpoint(m=lin, w=lin.weight)``, or an embedding two tracked modules tie, restored from a
checkpoint where the two saved values differ. Reads straight into the tensor are settled when the
plan is complete (:func:`drop_overwritten_across`): the object planned last keeps its read, the
others' are dropped. A module whose load runs after every read (load hooks, a loader of its own)
replaces whatever was read into its tensors, if its loaders use the key and keep the tensor:
known only once it has run (:func:`settle_after_loads`).
"""

from __future__ import annotations

import collections
from collections.abc import Callable
from typing import Any

import torch

from torchckpt._dist import dtensor as dist_dtensor
from torchckpt._load import tied
from torchckpt._load.plan import Plan, drop_reads, shared_key

Owner = tuple[int, list[tuple[int, str]], Callable[[str], tied.Fed]]


def drop_overwritten_across(plan: Plan, tensors: list[tuple[int, str, torch.Tensor, Any]],
                            position: dict[str, int]) -> None:
    """Once every object is planned: a tensor that two tracked objects read into keeps the value of
    the one planned last (``position``: each object's place, by its key), as one object tracked
    under two names does (``Matcher._once``); the reads of the others, where their saved values
    differ, are dropped and reported unexpected (``tied.overwritten_across``). ``tensors``: the
    tracked tensors, (place, key, tensor, saved). Ties inside one module were settled as it was
    planned, and one object under two names by the walk. What a later load fills is noted for
    :func:`settle_after_loads`."""
    if not plan.late_fills and len(plan.fed) + len(tensors) < 2:
        return  # one object read in place alone (a later load's own tied keys are settled below)
    owners: list[Owner] = [(position.get(name, -1), fed, describe)  # -1: taken back (_once)
                           for name, fed, describe in plan.fed]
    for place, key, t, saved in tensors:
        if not t.is_meta and (address := tied.address_of(t)):
            owners.append((place, [(address, key)],
                           lambda _, key=key, t=t, saved=saved: tied.Fed(key, key, saved, t)))  # type: ignore[misc]
    owners.sort(key=lambda owner: owner[0])
    count = collections.Counter(address for _, fed, _ in owners for address in {a for a, _ in fed})

    def scheduled(wanted: Callable[[int], bool]) -> list[tuple[int, tied.Fed]]:
        """The reads into the storages ``wanted`` picks that are still planned (not dropped before)."""
        restored = set(plan.report.restored_keys)
        return [(place, read) for place, fed, describe in owners for address, key in fed if wanted(address)
                for read in [describe(key)] if read.key in plan.unreported or shared_key(read.key, read.saved) in restored]

    if any(n > 1 for n in count.values()):
        drop_reads(tied.overwritten_across(scheduled(lambda address: count[address] > 1)), plan)
    late = {tied.address_of(fill.dest) for _, fills in plan.late_fills for fill in fills}
    if late:
        _note_late_shares(plan, [read for _, read in scheduled(late.__contains__)])


def _note_late_shares(plan: Plan, reads: list[tied.Fed]) -> None:
    """For each tensor a later load fills, the other reads into it, and those other later loads fill
    (in the loads' order)."""
    by_view: dict[tuple[Any, ...], list[tied.Fed]] = {}
    for read in [*reads, *(fill for _, fills in plan.late_fills for fill in fills)]:
        view = tied.view_of(read.dest)
        if view is not None:
            by_view.setdefault(view, []).append(read)
    for module, fills in plan.late_fills:
        for fill in fills:
            others = [read for read in by_view.get(tied.view_of(fill.dest), ()) if read is not fill]  # type: ignore[arg-type]
            if others:
                plan.late_shares.append((module, fill, others))


def settle_after_loads(plan: Plan) -> None:
    """Once every load has run: where a later load filled a tensor another object's read went into
    (or another later load filled before it), and its loaders used the key and kept the tensor, the
    other key's value was replaced: it is unexpected, not restored. Latest load first, so that of two
    later loads the last one's key stays restored."""
    if not plan.late_shares:
        return
    report = plan.report
    states: dict[int, dict[str, Any]] = {}
    for module, fill, others in reversed(plan.late_shares):
        state = states.get(id(module))
        if state is None:
            state = states[id(module)] = dist_dtensor.module_state(module)
        now = state.get(fill.object_key)
        if shared_key(fill.key, fill.saved) not in report.restored_keys or not isinstance(now, torch.Tensor) \
                or tied.view_of(now) != tied.view_of(fill.dest):  # not used, or replaced (assign)
            continue
        for other in others:
            reported = shared_key(other.key, other.saved)
            if reported in report.restored_keys and not tied.same_values(other.saved, fill.saved):
                report.restored_keys.remove(reported)
                report.unexpected_keys.append(other.key)
    plan.late_shares.clear()
