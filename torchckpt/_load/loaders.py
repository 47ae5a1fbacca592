"""Where the data stands: torchdata's ``StatefulDataLoader`` and ``torch.Generator``, saved and restored.

Why more than ``loader.state_dict()``: torchdata saves the position inside the epoch and the state
the sampler's generator had when the epoch's iterator began, which is enough to rebuild the
epoch's permutation, but not the state the loader's generator has now. Restoring replays the
permutation from that older state, so the generator ends wherever rebuilding the iterator left it
(torchdata 0.11's single-process iterator: one draw short), not where an uninterrupted run has it,
and every later epoch shuffles and seeds its workers differently. So a loader is saved as torchdata's state plus its
generator's state now (and a ``DistributedSampler``'s epoch); a restore hands torchdata its state,
builds the resumed iterator at once (``state_dict()`` builds it, and the next ``iter(loader)``
takes it over), and only then puts the generator back. The user's next ``for batch in loader``
continues mid-epoch, and every later epoch draws what it would have drawn. An epoch whose loop
was left early (``break``) is saved as such, and restored as torchdata's finished iterator: the
next ``iter(loader)`` starts a new epoch, as it does in an uninterrupted run.

torchdata is optional (``torchckpt[data]``) and never imported here: a loader is recognised by
its class, once the user's program has imported torchdata itself.
"""

from __future__ import annotations

import sys
import warnings
from typing import Any

import torch

from torchckpt._format import keypath
from torchckpt._load.plan import MISSING, Plan, plan_tensor, plan_value
from torchckpt.errors import short_repr

STATE = "state_dict"  # torchdata's own state of the loader
GENERATOR = "generator"  # the loader's generator now, after torchdata's state_dict()
SAMPLER_EPOCH = "sampler_epoch"  # a DistributedSampler's set_epoch(), which the resumed iterator needs
SAMPLER_SPLIT = "sampler_split"  # a DistributedSampler's [num_replicas, rank]: a position means nothing in another split
BATCH_SIZE = "batch_size"  # the loader's batch_size (None with a batch_sampler): a position counts batches
DATASET_LENGTH = "dataset_length"  # len(dataset) where it has one: another length is another order
ORDER = "order"  # each sampler's module, class and shuffle: another order makes the position mean other samples
EPOCH_LEFT = "epoch_left"  # True: the epoch's loop was left early (a break), so the next iter(loader) starts a new one
MODULE = "torchdata.stateful_dataloader"


def is_stateful_loader(value: Any) -> bool:
    """Whether ``value`` is a torchdata ``StatefulDataLoader`` (without importing torchdata)."""
    module = sys.modules.get(MODULE)
    cls = getattr(module, "StatefulDataLoader", None)
    return isinstance(cls, type) and isinstance(value, cls)


def is_plain_loader_adapter(value: Any) -> bool:
    """Whether ``value`` wraps a plain ``DataLoader`` behind ``state_dict()`` methods that cannot
    work (Accelerate's prepared loader without ``use_stateful_dataloader``: its ``state_dict()``
    raises AttributeError): refused as the plain loader is, not called."""
    base = getattr(value, "base_dataloader", None)
    return (isinstance(value, torch.utils.data.DataLoader) and isinstance(base, torch.utils.data.DataLoader)
            and not is_stateful_loader(value) and not is_stateful_loader(base))


def is_data_state(value: Any) -> bool:
    """Whether ``value`` is saved by this module: a ``torch.Generator`` or a ``StatefulDataLoader``."""
    return isinstance(value, torch.Generator) or is_stateful_loader(value)


def kind_of(value: Any) -> str:
    return "generator" if isinstance(value, torch.Generator) else "data_loader"


def state_of(value: Any) -> Any:
    """What is saved: a generator's state (a uint8 tensor), or a loader's state (see the module)."""
    if isinstance(value, torch.Generator):
        return value.get_state()
    left = _epoch_left(value)  # before state_dict(), which may build an iterator
    state: dict[str, Any] = {STATE: value.state_dict()}  # first: before any iterator it builds one
    if left:
        state[EPOCH_LEFT] = True
    if value.generator is None:
        warnings.warn(
            f"Saving a StatefulDataLoader over {type(value.dataset).__name__} that has no generator: each new "
            "iterator draws its seed from the global random generator, a resumed one too, so after a restore "
            "the batches or the model's random draws differ from an uninterrupted run. Give it a generator of "
            "its own: StatefulDataLoader(..., generator=torch.Generator().manual_seed(0)).",
            UserWarning,
            stacklevel=4,
        )
    else:
        state[GENERATOR] = value.generator.get_state()
    problem = _sampler_problem(value)
    if problem:
        warnings.warn(problem, UserWarning, stacklevel=4)
    epoch = _sampler_epoch(value)
    if epoch is not None:
        state[SAMPLER_EPOCH] = epoch
    split = _sampler_split(value)
    if split is not None:
        state[SAMPLER_SPLIT] = split
    state[ORDER] = _order(value)
    state[BATCH_SIZE] = value.batch_size if type(value.batch_size) is int else None
    length = _dataset_length(value)
    if length is not None:
        state[DATASET_LENGTH] = length
    return state


def _epoch_left(loader: Any) -> bool:
    """Whether the loader's epoch was left before its end (``break`` out of ``for batch in loader``,
    as a validation limited to a few batches or a fixed number of steps per epoch does): its
    iterator began, has not finished, and nothing but the loader holds it. An uninterrupted run's
    next ``iter(loader)`` then starts a new epoch, where torchdata's saved position would go on with
    the rest of the one left (``load``). A loop or ``iter(loader)`` still running holds it, and its
    position is the one to resume; so is a loop an exception ended, saved from its handler, and a
    resumed iterator no loop has taken over yet (``load`` builds it; torchdata's
    ``_initial_iter_for_state_dict``: the next ``iter(loader)`` goes on with it), as in a run
    preempted again right after its restore."""
    iterator = getattr(loader, "_iterator", None)
    if iterator is None or getattr(iterator, "_finished", True) or not getattr(iterator, "_num_yielded", 0):
        return False
    if getattr(loader, "_initial_iter_for_state_dict", False) is True:
        return False
    if sys.exc_info()[0] is not None:  # saved while an exception is handled (``except KeyboardInterrupt: save()``):
        return False  # the loop it ended was interrupted, not left, and resumes where it was
    return sys.getrefcount(iterator) <= _held_once()  # the loader's attribute alone holds it


def _held_once() -> int:
    """What ``sys.getrefcount`` says of an object that one container holds and one local name
    names, as the loader holds its iterator above: how a local name counts differs by version."""
    alone = object()
    holder = [alone]
    count = sys.getrefcount(alone)
    holder.clear()
    return count


def _dataset_length(loader: Any) -> int | None:
    """``len(loader.dataset)`` of a map-style dataset, or None: an ``IterableDataset``'s position
    does not depend on its length (it has no sampler's order), and one whose ``__len__`` raises
    anything is taken as having none (the save does not fail for it)."""
    if isinstance(loader.dataset, torch.utils.data.IterableDataset):
        return None
    try:
        length = len(loader.dataset)
    except Exception:  # noqa: BLE001 - a user's __len__ (NotImplementedError, ...)
        return None
    return length if type(length) is int else None


def _sampler_problem(loader: Any) -> str:
    """Why ``loader``'s sampler cannot resume in the middle of an epoch, or ''.

    torchdata resumes a sampler that keeps no state (torch's ``RandomSampler``,
    ``WeightedRandomSampler``, ``SubsetRandomSampler``) by iterating it again and skipping what
    the epoch had yielded: the order is drawn anew, from the global generator (a sampler without a
    generator) or from where the sampler's own generator is now, which is past the draw of the
    epoch's order. Either way the rest of the epoch repeats some samples and skips others.
    torchdata's own samplers (the loader's ``shuffle=True``) and samplers with
    ``state_dict``/``load_state_dict`` resume exactly; so do samplers that draw nothing, such as
    ``DistributedSampler`` (its order is a function of its seed and epoch, which are saved).
    """
    for sampler in _samplers(loader):
        if (type(sampler).__module__.startswith("torchdata.")
                or callable(getattr(sampler, "state_dict", None)) and callable(getattr(sampler, "load_state_dict", None))):
            continue
        if hasattr(sampler, "generator"):
            source = "the global random generator" if sampler.generator is None else "a generator of its own"
        elif any(isinstance(v, torch.Generator) for v in getattr(sampler, "__dict__", {}).values()):
            source = "a generator of its own"  # under another name (self.rng): drawn from, never saved
        else:
            continue
        return (f"Saving a StatefulDataLoader whose sampler ({type(sampler).__name__}) draws its order from {source} "
                "and keeps no state: torchdata resumes an epoch by drawing the order again, so a restore in the middle "
                "of an epoch goes on with other samples (some twice, some never) than an uninterrupted run. Shuffle "
                "with the loader's own generator instead (StatefulDataLoader(..., shuffle=True, generator=g)), or use "
                "torchdata's stateful sampler (torchdata.stateful_dataloader.sampler.RandomSampler(dataset, "
                "generator=g)), which resume exactly.")
    return ""


def _samplers(loader: Any) -> list[Any]:
    """Where the loader's order comes from: its ``sampler``, and where a ``batch_sampler`` was given
    (``loader.sampler`` is then a stand-in), the batch sampler and the sampler inside it
    (``BatchSampler(DistributedSampler(...))``)."""
    batch_sampler = getattr(loader, "batch_sampler", None)
    return [getattr(loader, "sampler", None), batch_sampler, getattr(batch_sampler, "sampler", None)]


def _order(loader: Any) -> list[list[Any]]:
    """Where the loader's order comes from, as JSON: each sampler's module, class, and ``shuffle``
    where it has one (a ``DistributedSampler``'s)."""
    out: list[list[Any]] = []
    for sampler in _samplers(loader):
        if sampler is not None:
            shuffle = getattr(sampler, "shuffle", None)
            out.append([type(sampler).__module__, type(sampler).__qualname__, shuffle if type(shuffle) is bool else None])
    return out


def _same_order(saved: Any, mine: list[list[Any]]) -> bool:
    """Whether ``saved`` (an ``_order``) is ``mine``; a class of the script run as ``__main__``
    matches the same class imported from its module (a resume script, ``python -m``)."""
    if not (isinstance(saved, list) and len(saved) == len(mine)):
        return False
    for theirs, ours in zip(saved, mine):
        if not (isinstance(theirs, list) and len(theirs) == 3 and theirs[1:] == ours[1:]):
            return False
        if theirs[0] != ours[0] and "__main__" not in (theirs[0], ours[0]):
            return False
    return True


def _split_sampler(loader: Any) -> Any:
    """The sampler that splits the data over ranks (a ``DistributedSampler``), or None."""
    return next((s for s in _samplers(loader)
                 if type(getattr(s, "num_replicas", None)) is int and type(getattr(s, "rank", None)) is int), None)


def _epoch_sampler(loader: Any) -> Any:
    """The sampler whose order depends on ``set_epoch()`` (a ``DistributedSampler``), or None."""
    return next((s for s in _samplers(loader)
                 if callable(getattr(s, "set_epoch", None)) and type(getattr(s, "epoch", None)) is int), None)


def _sampler_split(loader: Any) -> list[int] | None:
    sampler = _split_sampler(loader)
    return None if sampler is None else [sampler.num_replicas, sampler.rank]


def _sampler_epoch(loader: Any) -> int | None:
    sampler = _epoch_sampler(loader)
    return None if sampler is None else sampler.epoch


def plan_restore(key: str, value: Any, saved: Any, plan: Plan) -> None:
    """Plan the restore of a generator or a loader at ``key``; nothing changes before the loads run."""
    if isinstance(value, torch.Generator):
        _plan_generator(key, value, saved, plan)
        return
    problem = f"the checkpoint holds {type(saved).__name__}, not a data loader's state"
    if isinstance(saved, dict):
        problem = (_split_problem(value, saved) or _workers_problem(value, saved.get(STATE, saved))
                   or _options_problem(value, saved))
    if saved is MISSING or not problem:
        plan_value(key, saved, lambda state: load(value, state), plan)
        if isinstance(saved, dict) and STATE in saved:
            _report_generator(key, value, saved, plan)
        return
    plan.report.missing_keys.append(key)
    plan.report.skipped_objects[key] = problem


def _report_generator(key: str, loader: Any, saved: dict[str, Any], plan: Plan) -> None:
    """The loader's generator, where only one side has it: the saved state with no generator to
    take it is unexpected, a generator with no saved state missing. Either way the epochs after
    this one draw their order from elsewhere than the uninterrupted run did."""
    where = keypath.join(key, GENERATOR)
    if saved.get(GENERATOR) is not None and loader.generator is None:
        plan.report.unexpected_keys.append(where)
    elif saved.get(GENERATOR) is None and loader.generator is not None:
        plan.report.missing_keys.append(where)


def _split_problem(loader: Any, saved: dict[str, Any]) -> str:
    """Why a position saved in one DistributedSampler split cannot go on in another, or ''."""
    split, mine = saved.get(SAMPLER_SPLIT), _sampler_split(loader)
    if split is None or mine is None or list(split) == mine:
        return ""
    return (f"it was saved by rank {split[1]} of a sampler split {split[0]} ways, and this loader's sampler is rank "
            f"{mine[1]} of {mine[0]}: its position in the epoch means other samples here, so the loader was left "
            "as it is (it starts its epoch afresh)")


def _options_problem(loader: Any, saved: dict[str, Any]) -> str:
    """Why a position saved with another ``batch_size`` or dataset length would mean other samples
    here, or '' (a checkpoint that recorded neither is not checked)."""
    if BATCH_SIZE in saved and saved[BATCH_SIZE] != (loader.batch_size if type(loader.batch_size) is int else None):
        return (f"it was saved with batch_size={saved[BATCH_SIZE]}, this loader has batch_size={loader.batch_size}: "
                "its position counts batches, so it would go on from another sample; the loader was left as it is")
    if ORDER in saved and not _same_order(saved[ORDER], _order(loader)):
        theirs = ", ".join(_sampler_text(s) for s in saved[ORDER]) if isinstance(saved[ORDER], list) else "?"
        return (f"it was saved with samplers {theirs}, this loader's are "
                f"{', '.join(_sampler_text(s) for s in _order(loader))}: its position in another order means other "
                "samples; the loader was left as it is")
    length = _dataset_length(loader)
    if DATASET_LENGTH in saved and length is not None and saved[DATASET_LENGTH] != length:
        return (f"it was saved over a dataset of {saved[DATASET_LENGTH]} samples, this loader's has {length}: the "
                "epoch's order and position mean other samples; the loader was left as it is")
    return ""


def _sampler_text(sampler: Any) -> str:
    if not (isinstance(sampler, list) and len(sampler) == 3 and all(isinstance(p, str) for p in sampler[:2])):
        return short_repr(sampler, 60)
    module, name, shuffle = sampler
    return short_repr(f"{module}.{name}", 100)[1:-1] + (f" (shuffle={shuffle})" if shuffle is not None else "")


def _workers_problem(loader: Any, state: Any) -> str:
    """Why torchdata cannot take ``state`` (saved with another ``num_workers``), or ''."""
    if not isinstance(state, dict) or not state:
        return ""
    snapshot = state.get("_snapshot")
    main = snapshot.get("_main_snapshot") if isinstance(snapshot, dict) else None
    saved = main.get("_num_workers") if isinstance(main, dict) else 0 if "_num_yielded" in state else None
    if saved == loader.num_workers:
        return ""
    if saved is None:
        return "its saved state is not a StatefulDataLoader's (neither '_num_yielded' nor '_snapshot')"
    return (f"it was saved with num_workers={saved}, this loader has num_workers={loader.num_workers}: torchdata "
            "resumes a position only with the same number of workers; the loader was left as it is")


def _plan_generator(key: str, generator: torch.Generator, saved: Any, plan: Plan) -> None:
    """Read into a copy of the generator's state (same size and dtype), then ``set_state`` it."""
    dest = generator.get_state()
    reads = len(plan.reads)
    plan_tensor(key, dest, saved, plan)
    if len(plan.reads) > reads:  # compatible: the read was scheduled

        def load() -> None:
            generator.set_state(dest)

        plan.rng_loads.append((key, load))  # after the loads that may draw from it (a loader fast-forwarding)


def _forget_finished_count(loader: Any) -> None:
    """After a position saved once the epoch's loop had ended: torchdata 0.11's
    ``StatefulDistributedSampler`` hands its count of the finished epoch (``next_yielded``) to the
    next epoch's iterator, which then skips every sample, so the whole next epoch would yield
    nothing. An uninterrupted run's sampler holds no such count there."""
    for sampler in _samplers(loader):
        if getattr(sampler, "next_yielded", None) is not None:
            sampler.next_yielded = None


def load(loader: Any, saved: dict[str, Any]) -> None:
    """Restore ``loader`` (see the module); a state saved as torchdata's alone is taken as it is."""
    if STATE not in saved:
        loader.load_state_dict(saved)
        return
    epoch, sampler = saved.get(SAMPLER_EPOCH), _epoch_sampler(loader)
    if epoch is not None and sampler is not None:
        sampler.set_epoch(epoch)  # the resumed iterator lays the epoch out now
    state = saved[STATE]
    if saved.get(EPOCH_LEFT) is True and isinstance(state, dict):  # the next iter(loader) starts a new epoch:
        state = {**state, "_iterator_finished": True}  # torchdata's finished iterator, its dataset and samplers kept
    loader.load_state_dict(state)
    loader.state_dict()  # builds the resumed iterator, which the next iter(loader) takes over
    if isinstance(state, dict) and state.get("_iterator_finished") is True:
        _forget_finished_count(loader)
    _set_generator(loader, saved)


def _set_generator(loader: Any, saved: dict[str, Any]) -> None:
    """The loader's generator as it was at the save, once the resumed iterator is built."""
    state = saved.get(GENERATOR)
    if state is not None and loader.generator is not None:
        loader.generator.set_state(state)
