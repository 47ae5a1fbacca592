"""A manager's history rebuilt from its state file and the disk: a pure function, tested by a table.

Why a function of its inputs: every crash leaves the directory in one of a few states (no state
file yet, a damaged one, a commit the state file never recorded, a checkpoint deleted by hand, a
clock that went back), and each must come back the same way whatever backend holds it.
:func:`read_disk` does the reading; :func:`recover` decides, from what was read and ``now``, what
the manager keeps, what it never deletes, which checkpoint is the latest, and what to warn about.

The rule is TensorFlow's, made safe: a checkpoint whose history is in doubt is preserved (kept
forever, never deleted), so a damaged or missing state file never costs a checkpoint, and one
committed but never recorded is adopted only when its index says this manager wrote it.
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field
from typing import Any

from torchckpt._format import index as format_index
from torchckpt._format import spec, tree
from torchckpt._history import members as history_members
from torchckpt._history import state as history_state
from torchckpt._history.retention import MetricFn
from torchckpt._history.state import Entry, State, StateFileError
from torchckpt._paths import join
from torchckpt._storage.base import Storage
from torchckpt.errors import CheckpointError, CorruptCheckpointError, format_keys

# Why a checkpoint a history names is not a member: what a note says (a link is never followed:
# a downloaded run directory could link anywhere)
GONE_INDEX = "it is no longer a committed checkpoint: its index.json is gone, or a file or a link is in its place"
NOT_COMMITTED = ("deleted, its index.json gone or not a regular file, or a symbolic link, which is never followed "
                 "(move the checkpoint itself back)")


@dataclass(frozen=True)
class DamagedStateFile:
    """A state file that exists but cannot be used; ``error`` says why."""

    error: str


@dataclass(frozen=True)
class OnDisk:
    """What :func:`read_disk` found in ``directory``: the inputs of :func:`recover`."""

    directory: str
    state: State | DamagedStateFile | None  # None: there is no state file
    members: Sequence[str] = ()  # committed numbered checkpoints of any prefix, by number then name
    managed: Mapping[str, Entry | None] = field(default_factory=dict)  # unrecorded members' managed entries
    written_last: str | None = None  # the member committed last (read only where the state file has no committed latest)
    latest_committed: bool = True  # whether the state file's latest is a committed checkpoint
    # When the unrecorded members and the state file's latest were created (their index's ``created``;
    # None where unknown): an unrecorded member is the latest only if created after the recorded latest
    created: Mapping[str, float | None] = field(default_factory=dict)
    listed: frozenset[str] = frozenset()  # every name in the directory (a checkpoint's folder without its index too)


@dataclass(frozen=True)
class Ranking:
    """How the manager ranks checkpoints for ``keep_best``."""

    keep_best: int | None
    best_metric: str | MetricFn | None
    best_mode: str


@dataclass(frozen=True)
class Recovered:
    """The outcome of :func:`recover`: the manager's history, and the warnings to emit."""

    latest: str | None
    kept: list[Entry]
    preserved: list[Entry]
    last_preserved_timestamp: float
    damaged: dict[str, str]
    ranking: Ranking
    warnings: list[str]


def unrecorded(state: State | DamagedStateFile | None, members: Sequence[str], checkpoint_name: str) -> list[str]:
    """The members whose managed entry :func:`recover` needs: with no state file, all of them (this
    manager's are adopted); with one, those of this manager's name it does not record (a crash
    between the commit and the state write); with a damaged one, none (nothing is adopted)."""
    if state is None:
        return list(members)
    if isinstance(state, DamagedStateFile):
        return []
    known = {e.name for e in [*state.checkpoints, *state.preserved]}
    return [n for n in members if history_members.number_of(n, checkpoint_name) is not None and n not in known]


def read_disk(directory: str, storage: Storage, checkpoint_name: str) -> tuple[OnDisk, Any]:
    """Read what :func:`recover` needs from ``directory``, and the state file's token for a
    conditional write (None when it is damaged: it is then replaced unconditionally)."""
    token = None
    state: State | DamagedStateFile | None
    try:
        state, token = history_state.read_state_versioned(directory, storage)
    except StateFileError as e:
        state = DamagedStateFile(str(e))
    members = history_members.committed_members(directory, None, storage)
    latest_committed = (isinstance(state, State) and state.latest is not None
                        and history_members.is_member(directory, state.latest, storage))
    written_last = None
    if members and not latest_committed:  # no usable state file, or its latest is gone: the one written last
        own = [n for n in members if history_members.number_of(n, checkpoint_name) is not None]
        written_last = history_members.written_last(directory, own if isinstance(state, State) and own else members,
                                                    storage)
    refuse_another_managers(directory, state, checkpoint_name, storage)
    found = {n: _entry_and_created(directory, n, checkpoint_name, storage)
             for n in unrecorded(state, members, checkpoint_name)}
    managed = {n: entry for n, (entry, _) in found.items()}
    created = {n: time for n, (_, time) in found.items()}
    if found and isinstance(state, State) and state.latest is not None and latest_committed:
        created[state.latest] = _entry_and_created(directory, state.latest, checkpoint_name, storage)[1]
    listed = frozenset(storage.list_names(directory)) if isinstance(state, State) else frozenset()
    return OnDisk(directory, state, members, managed, written_last, latest_committed, created, listed), token


def refuse_another_managers(directory: str, state: State | DamagedStateFile | None, checkpoint_name: str,
                            storage: Storage) -> None:
    """Refuse to open a directory whose state file holds the history of a manager of another name.

    One directory holds one manager's history, as with TensorFlow (one state file): a manager
    ``"gen"`` opened where a manager ``"disc"`` kept its checkpoints would take ``disc``'s latest
    for its own, restore it into the wrong objects, and spend its ``max_to_keep`` on checkpoints it
    may never delete. Names of another prefix are looked up in their index (a checkpoint
    ``Checkpoint.save`` wrote, which has no manager's mark, is no other manager's).

    Raises:
        CheckpointError: the state file names checkpoints a manager of another name wrote.
    """
    if not isinstance(state, State):
        return
    names = dict.fromkeys([e.name for e in (*state.checkpoints, *state.preserved)] + [state.latest or ""])
    others: dict[str, list[str]] = {}
    for name in names:
        if name and history_members.number_of(name, checkpoint_name) is None:
            metadata, _ = _index_metadata(directory, name, storage)
            owner = metadata.get(spec.MANAGER_KEY) if isinstance(metadata, dict) else None
            if isinstance(owner, str) and owner != checkpoint_name:
                others.setdefault(owner, []).append(name)
    if others:
        owner, written = next(iter(others.items()))
        raise CheckpointError(
            f"{directory} holds the history of a CheckpointManager named {owner!r} ({', '.join(written[:3])}), not "
            f"{checkpoint_name!r}: one directory holds one manager's history (its state file), so this manager would "
            f"take the checkpoints of {owner!r} for its own. Give each manager a directory of its own "
            f"({join(directory, owner)} and {join(directory, checkpoint_name)}, say), or open it with "
            f"checkpoint_name={owner!r}. Nothing was saved or deleted.")


def _index_metadata(directory: str, name: str, storage: Storage) -> Any:
    """The decoded ``metadata`` of checkpoint ``name``'s index, and the index; (None, None) when it
    cannot be read."""
    path = join(directory, name)
    try:
        index = format_index.parse_index(path, storage.read_file(join(path, spec.INDEX_FILE), spec.MAX_INDEX_SIZE,
                                                                 "Index"))
        return tree.decode(index.section.get("metadata", {}), None, history_state.no_tensor, "metadata"), index
    except (CorruptCheckpointError, OSError):
        return None, None


def missing_shard(directory: str, name: str, storage: Storage) -> str | None:
    """Why checkpoint ``name`` cannot be restored whole, judged from its index and one listing
    (a shard file missing: deleted by hand, or by an ``rm -rf`` cut short), or None. Not the
    checksums: that is ``verify``'s and a restore's work.

    Raises:
        OSError, CheckpointError: the storage could not answer (not a sign of damage).
    """
    path = join(directory, name)
    try:
        data = storage.read_file(join(path, spec.INDEX_FILE), spec.MAX_INDEX_SIZE, "Index")
    except FileNotFoundError:
        return f"its {spec.INDEX_FILE} is missing"
    try:
        index = format_index.parse_index(path, data)
    except CorruptCheckpointError as e:
        return f"its index cannot be read ({e})"
    present = set(storage.list_names(path))
    missing = [shard["file"] for shard in index.shards if shard.get("file") not in present]
    return f"shard {missing[0]} listed in index.json is missing" if missing else None


def _entry_and_created(directory: str, name: str, checkpoint_name: str,
                       storage: Storage) -> tuple[Entry | None, float | None]:
    """:func:`managed_entry`, and when the checkpoint was created (None where unknown), from one
    read of its index."""
    metadata, index = _index_metadata(directory, name, storage)
    if index is None:
        return None, None
    created = index.section.get("created")
    return _managed(name, checkpoint_name, metadata, index), (
        float(created) if created is not None and history_state.is_timestamp(created) else None)


def managed_entry(directory: str, name: str, checkpoint_name: str, storage: Storage) -> Entry | None:
    """The history entry of ``name`` when a manager with ``checkpoint_name`` wrote it (its index
    says so), else None: a checkpoint written any other way, or one that cannot be read.

    This is how a manager accounts for checkpoints it committed but never recorded (a crash
    between the commit and the state-file write): they carry the mark, so they are adopted,
    while checkpoints written by ``Checkpoint.save`` or copied in are never deleted.
    """
    metadata, index = _index_metadata(directory, name, storage)
    return None if index is None else _managed(name, checkpoint_name, metadata, index)


def _managed(name: str, checkpoint_name: str, metadata: Any, index: format_index.Index) -> Entry | None:
    if not isinstance(metadata, dict) or metadata.get(spec.MANAGER_KEY) != checkpoint_name:
        return None
    metrics = metadata.get("metrics")
    created = index.section.get("created")
    return Entry(name, float(created) if created is not None and history_state.is_timestamp(created) else None,
                 metrics if isinstance(metrics, dict) and all(isinstance(k, str) for k in metrics) else None)


def resolve_ranking(state: State, keep_best: int | None, best_metric: str | MetricFn | None,
                    best_mode: str | None) -> Ranking:
    """``keep_best``, ``best_metric`` and ``best_mode`` not passed (None) are the directory's, so an
    evaluation script sees the run's best and a resumed run never deletes its best checkpoint."""
    mode = best_mode or "min"
    if keep_best is None and best_metric is None and state.best_metric is not None:
        keep_best, best_metric = state.keep_best, state.best_metric
        if best_mode is None:
            mode = state.best_mode
    elif best_metric is not None and best_metric == state.best_metric and best_mode is None:
        mode = state.best_mode
    return Ranking(keep_best, best_metric, mode)


def recover(disk: OnDisk, now: float, checkpoint_name: str, keep_best: int | None = None,
            best_metric: str | MetricFn | None = None, best_mode: str | None = None) -> Recovered:
    """The manager's history from what ``disk`` holds, at time ``now``.

    Example:
        >>> r = recover(OnDisk("run", None), now=100.0, checkpoint_name="ckpt")
        >>> r.latest, r.kept, r.last_preserved_timestamp
        (None, [], 99.0)
    """
    notes: list[str] = []
    state = disk.state
    from_file = isinstance(state, State)
    if isinstance(state, DamagedStateFile):  # the history is unknown: nothing it may have named is ever deleted
        state = _rebuilt(disk, now, checkpoint_name, f"the state file is damaged ({state.error})", False, notes)
    elif state is None and disk.members:  # a crash before the first state write: this manager's are managed again
        state = _rebuilt(disk, now, checkpoint_name, "there is no state file", True, notes)
    if state is None:
        return Recovered(None, [], [], now - 1.0, {}, Ranking(keep_best, best_metric, best_mode or "min"), notes)
    ranking = resolve_ranking(state, keep_best, best_metric, best_mode)
    lpt = state.last_preserved_timestamp
    clock_behind = now < lpt
    if clock_behind:
        notes.append(f"time.time() returned a value {lpt - now:f} seconds behind the last preserved checkpoint "
                     "timestamp; keeping every checkpoint whose preservation is in doubt.")
        lpt = now
    adopted = [e for n in unrecorded(state, disk.members, checkpoint_name) if (e := disk.managed.get(n)) is not None]
    kept: list[Entry] = []
    preserved = list(state.preserved)
    unrecorded_names = {e.name for e in adopted}
    for entry in [*state.checkpoints, *sorted(adopted, key=lambda e: e.timestamp or 0.0)]:
        ts = min(entry.timestamp if entry.timestamp is not None else lpt, now)
        # A kept entry of the state file older than the last preserved checkpoint is one that
        # ``keep_best`` kept, or a clock stepped back between saves: still kept, as recorded. Only a
        # clock behind that checkpoint, a missing time, a rebuilt history or a commit never
        # recorded puts it in doubt.
        recorded = from_file and entry.timestamp is not None and not clock_behind and entry.name not in unrecorded_names
        if ts > lpt or recorded:
            _place(kept, Entry(entry.name, ts, entry.metrics), by_time=entry.name in unrecorded_names)
        else:  # in doubt: kept forever, never deleted
            preserved.append(entry)
    damaged = dict(state.damaged)
    if from_file:
        kept, preserved = _present(kept, preserved, disk, state.latest, damaged, notes)
    latest, committed = state.latest, disk.latest_committed or not from_file  # a rebuilt latest is a member
    newest = _newest_unrecorded(state, disk, checkpoint_name, now)
    if newest is not None:
        latest, committed = newest, True
    if latest is not None and not committed:  # deleted by hand: the member written last, of this manager's name if any
        gone, latest = latest, disk.written_last
        notes.append(f"The state file of {disk.directory} names {gone} as the latest checkpoint, but it is not a "
                     f"committed checkpoint there ({NOT_COMMITTED}, or its "
                     "replacement cut short): "
                     + (f"{latest} is the latest now." if latest is not None else
                        "no committed checkpoint is left, so restore_or_initialize() starts afresh (init_fn)."))
    return Recovered(latest, kept, preserved, lpt, damaged, ranking, notes)


def _present(kept: list[Entry], preserved: list[Entry], disk: OnDisk, latest: str | None, damaged: dict[str, str],
             notes: list[str]) -> tuple[list[Entry], list[Entry]]:
    """The kept and preserved entries of the state file that are committed checkpoints on disk. One
    deleted by hand is dropped from the history, with a note (the latest has its own): left in it,
    it would hold a place of ``max_to_keep`` or ``keep_best``, and retention would delete a
    checkpoint that exists to keep one that does not. One whose folder is still there (its
    index.json gone, or a link in its place) stays, recorded in ``damaged``: never best, and
    deleted in its turn."""
    members = set(disk.members)
    gone = [e.name for e in [*kept, *preserved] if e.name not in members]
    if not gone:
        return kept, preserved
    broken = [n for n in gone if n in disk.listed]
    for name in broken:
        damaged.setdefault(name, GONE_INDEX)
    dropped = [n for n in gone if n != latest and n not in disk.listed]
    for names, fate in ((dropped, "dropped from the history, so that retention and keep_best count only the "
                                  "checkpoints that exist"),
                        (broken, "recorded damaged: it is never best, and, as nothing says any more that this "
                                 "manager wrote it, retention leaves it to be deleted by hand")):
        if names:
            notes.append(f"The state file of {disk.directory} names {format_keys(names)}, which "
                         f"{'is not a committed checkpoint' if len(names) == 1 else 'are not committed checkpoints'} "
                         f"there ({NOT_COMMITTED}): {fate}.")
    here = members | disk.listed
    return [e for e in kept if e.name in here], [e for e in preserved if e.name in here]


def _newest_unrecorded(state: State, disk: OnDisk, checkpoint_name: str, now: float) -> str | None:
    """The checkpoint of this manager's name that a crash kept from the state file (between its
    commit and the state write), to be the latest: numbered above every recorded one, and created
    after the recorded latest (or at the same time). Not one created before it: a checkpoint
    retention was deleting when the process stopped (after ``save(checkpoint_number=...)`` under an
    older one's number), nor one a rollback left behind (``Checkpoint.save`` after restoring an
    older checkpoint). With the recorded latest stamped after ``now`` (a clock set back since),
    times cannot tell: the number alone decides."""
    entries = [*state.checkpoints, *state.preserved]
    latest_time = next((e.timestamp for e in entries if e.name == state.latest and e.timestamp is not None),
                       disk.created.get(state.latest) if state.latest is not None else None)
    if latest_time is not None and latest_time > now:
        latest_time = None

    def created(name: str) -> float | None:
        entry = disk.managed.get(name)
        return entry.timestamp if entry is not None and entry.timestamp is not None else disk.created.get(name)

    candidates = [n for n in unrecorded(state, disk.members, checkpoint_name)
                  if latest_time is None or (t := created(n)) is not None and t >= latest_time]
    recorded = {e.name for e in entries} | ({state.latest} if state.latest is not None else set())
    return history_members.newest_unknown(recorded, candidates, checkpoint_name)


def _place(kept: list[Entry], entry: Entry, by_time: bool) -> None:
    """Add ``entry`` to ``kept``, oldest first: the state file's in its own order (what retention
    deletes first, whatever a clock stepped back did to the times), a commit it never recorded by
    its time among them (the newest at the end; one that retention had dropped, at its old place)."""
    if by_time:
        later = next((i for i, e in enumerate(kept) if (e.timestamp or 0.0) > (entry.timestamp or 0.0)), len(kept))
        kept.insert(later, entry)
    else:
        kept.append(entry)


def _rebuilt(disk: OnDisk, now: float, checkpoint_name: str, why: str, adopt: bool, notes: list[str]) -> State:
    """A state rebuilt from the members alone; with ``adopt``, the ones this manager wrote are
    recorded, and those it wrote in the last second (the save a crash kept from the state file)
    are managed again: any older one may be one the lost history preserved, so it is kept."""
    managed = {n: e for n in disk.members if adopt and (e := disk.managed.get(n)) is not None}
    recent = [n for n, e in managed.items() if e.timestamp is not None and min(e.timestamp, now) > now - 1.0]
    fate = (f"The {len(recent)} written by a manager named {checkpoint_name!r} in the last second are managed "
            "again; the others" if recent else "They")
    notes.append(
        f"{disk.directory}: {why}; rebuilt from the {len(disk.members)} committed checkpoints on disk "
        f"(latest: {disk.written_last}). {fate} are kept and will never be deleted "
        "by this manager, since it cannot know which of them it managed."
    )
    return State(
        latest=disk.written_last,
        checkpoints=sorted(managed.values(), key=lambda e: e.timestamp or 0.0),
        preserved=[Entry(n) for n in disk.members if n not in managed],
        last_preserved_timestamp=now - 1.0,
    )
