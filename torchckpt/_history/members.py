"""A directory's members: its committed checkpoints, their numbers, its latest one.

A checkpoint is a member once its ``index.json`` is there (the commit, on every backend); a
writer's temporary, a checkpoint being deleted and a manager's other files are not. These are the
questions every face asks of a directory (which checkpoint is the latest, what a path names), so
they are answered here once, from what the storage lists, without reading any checkpoint, but
for one thing: where no state file names the latest, the checkpoint written last is told by the
time each index records, which a copy of the run keeps and its files' times do not.
"""

from __future__ import annotations

import errno
import json
import os
import re
import threading
from collections.abc import Sequence

from torchckpt._format import document as format_document
from torchckpt._format import index as format_index
from torchckpt._format import spec
from torchckpt._history import state as history_state
from torchckpt._paths import is_url, join, name_of, parent_of
from torchckpt._storage.base import LEFTOVER_GRACE_SECS, Storage
from torchckpt.errors import CheckpointDeletedError, CheckpointError, CheckpointNotFoundError, CheckpointWriteError

_NUMBERED = re.compile(r"(?P<prefix>.+)-(?P<number>0|[1-9][0-9]*)\Z")  # \Z: no name ending in a line break


def number_of(name: str, prefix: str | None = None) -> int | None:
    """The number in ``ckpt-7`` (None if the name is not numbered, or has another prefix)."""
    match = _NUMBERED.match(name)
    if not match or (prefix is not None and match.group("prefix") != prefix):
        return None
    return int(match.group("number"))


def committed_members(directory: str, prefix: str | None, storage: Storage) -> list[str]:
    """Names of committed, numbered checkpoints in ``directory`` (of any prefix when ``prefix`` is
    None), by number then name."""
    found = []
    for name in storage.committed_names(directory):  # one listing on an object store, not requests per name
        number = number_of(name, prefix)
        if number is not None and not spec.is_temporary_name(name):
            found.append((number, name))
    return [name for _, name in sorted(found)]


def is_member(directory: str, name: str, storage: Storage) -> bool:
    """Whether ``name`` is a committed checkpoint inside ``directory``: a real directory (a link,
    which could lead anywhere, is never one) holding a regular ``index.json``."""
    path = join(directory, name)
    return storage.is_dir(path) and is_committed(path, storage)


def is_committed(path: str, storage: Storage) -> bool:
    """Whether ``path`` is a committed checkpoint (not a temporary or a leftover): its
    ``index.json`` is a regular file, not a link. On every backend the index is what commits."""
    return not spec.is_temporary_name(name_of(path)) and storage.is_file(join(path, spec.INDEX_FILE))


def refuse_replacing_other(path: str, storage: Storage, what: str, fix: str = "save under another number",
                           files: bool = False) -> None:
    """Before ``what`` replaces what is at ``path``: refuse anything there but a checkpoint (see
    :func:`foreign_files`), so that a save never deletes someone's files. An empty directory is
    replaced too; with ``files``, so is a plain file or a link (``save_state`` over a ``.ckpt``
    file, as ``torch.save`` would), never what a link points to.

    Raises:
        CheckpointWriteError: something other than a checkpoint is at ``path`` (``errno`` EEXIST),
            and nothing was written (``fix`` ends its message: "Move it away, or <fix>."); or the
            storage could not say what is there (its error's ``errno``).
    """
    try:
        entries = storage.list_entries(path)  # one listing: on an object store, one request for most saves
        if entries:
            others = foreign_files(path, storage, entries)
            if not others:
                return
            kind = f"a folder of other files ({', '.join(others[:3])}{', ...' if len(others) > 3 else ''})"
        elif files or not storage.exists(path) or storage.is_dir(path):  # nothing, or an empty directory
            return
        else:
            kind = "a file or a link"
    except OSError as e:
        if isinstance(e, CheckpointWriteError):
            raise
        raise CheckpointWriteError(storage.describe_write_failure(path, e), path, e) from e
    raise CheckpointWriteError(f"{path} is {kind}, not a checkpoint, so {what} did not replace it and nothing was "
                               f"written: it replaces only a checkpoint. Move it away, or {fix}.",
                               path, FileExistsError(errno.EEXIST, os.strerror(errno.EEXIST), path))


def foreign_files(path: str, storage: Storage, entries: dict[str, bool] | None = None) -> list[str]:
    """What keeps the directory ``path`` from being a checkpoint this package may replace or delete
    whole, sorted; [] for one (or an empty directory). From one listing, and the index's last bytes
    where it has one.

    A checkpoint is a directory whose ``index.json`` ends with the seal this package writes
    (whatever else it holds, as retention deletes it whole), or one of nothing but regular files
    named as a writer names them: shards, an object store's markers, and an ``index.json`` beside
    shards (damaged: a copy cut short). An ``index.json`` alone is someone's own file.
    ``entries``: the directory's listing (``Storage.list_entries``), where the caller has it.
    """
    entries = storage.list_entries(path) if entries is None else entries
    if entries.get(spec.INDEX_FILE) and index_seal(path, storage) is not None:
        return []
    others = sorted(n for n, regular in entries.items() if not regular or not spec.is_checkpoint_member(n))
    if not others and spec.INDEX_FILE in entries and not any(map(spec.is_shard_name, entries)):
        return [spec.INDEX_FILE]
    return others


def has_sealed_index(path: str, storage: Storage) -> bool:
    """Whether the directory ``path`` holds an ``index.json`` (a regular file) that ends with the
    seal this package's writer gives it: one this package wrote, damaged or not, not someone's own
    file of that name."""
    return storage.is_file(join(path, spec.INDEX_FILE)) and index_seal(path, storage) is not None


def index_seal(path: str, storage: Storage) -> str | None:
    """The seal the checkpoint directory ``path``'s ``index.json`` ends with, unchecked (from its
    last few bytes: whether it is still the index read before, without reading it all); None where
    it ends with none, or cannot be read now (gone, unreadable, not a regular file)."""
    try:
        source = storage.open(join(path, spec.INDEX_FILE), "Index")
        try:
            tail = source.read(max(0, source.size - format_document.SEAL_BYTES), format_document.SEAL_BYTES)
        finally:
            source.close()
    except Exception:  # noqa: BLE001 - whatever it is, it is not an index known to be this package's
        return None
    return format_document.seal_at_end(tail)


def latest_in(directory: str, storage: Storage) -> str | None:
    """The newest committed checkpoint of ``directory`` on ``storage``, or None.

    The state file's ``latest`` wins when it names a committed checkpoint, as TensorFlow's
    ``latest_checkpoint`` reads its state file; otherwise (no state file, a damaged one, or one
    naming a checkpoint that is gone) the committed numbered checkpoint written last is returned.
    A checkpoint committed just before a crash that kept its manager from recording it is the
    next manager's latest (``_history.recover`` adopts it), and the state file's from that
    manager's next save.
    """
    return latest_and_recorded(directory, storage)[0]


def latest_and_recorded(directory: str, storage: Storage) -> tuple[str | None, str | None, frozenset[str]]:
    """:func:`latest_in`; the name the state file records as the latest (None where it has none or
    cannot be read), which may be a checkpoint that is gone: a follower that yielded it has seen
    nothing newer until the state file names another; and the names the state file records
    besides, each recorded (so written) before that latest."""
    try:
        state = history_state.read_state(directory, storage)
    except history_state.StateFileError:
        state = None
    recorded = state.latest if state is not None else None
    earlier = frozenset(e.name for e in [*state.checkpoints, *state.preserved]) - {recorded} if state else frozenset()
    if recorded is not None and is_member(directory, recorded, storage):
        return join(directory, recorded), recorded, earlier
    members = committed_members(directory, None, storage)
    return (join(directory, written_last(directory, members, storage)) if members else None), recorded, earlier


def written_last(directory: str, members: Sequence[str], storage: Storage) -> str:
    """Of ``members`` (committed checkpoints of ``directory``; at least one), the one committed
    last: by the time its index records (``created``), then number. Not by the index file's time:
    a run copied with ``cp -r``, ``gsutil cp -r``, ``rsync`` without ``-t`` or out of an archive
    has the files' times of the copy, in whatever order it copied them (ckpt-9 after ckpt-11, or,
    in name order, ckpt-5 after a ckpt-3 that replaced the first one later), and some stores tell
    no time, or whole seconds only. The recorded times are the writers' clocks: hosts of one job
    whose clocks disagree by more than the time between two saves can mislead it, where no state
    file names the latest. A member whose index cannot be read (damaged, or gone meanwhile) ranks
    by its file's time: the latest when it is the newest file, so that a restore meets the damage
    and says so as it falls back, as it would with a state file."""
    return max(members, key=lambda name: (_written_time(directory, name, storage), number_of(name) or 0))


def _written_time(directory: str, name: str, storage: Storage) -> float:
    """When the member ``name`` was committed: the time its index records, else its file's."""
    path = join(directory, name, spec.INDEX_FILE)
    modified = storage.mtime(path)
    created = _created(path, modified, storage)
    return modified if created is None else created


def oldest_first(directory: str, members: Sequence[str], recorded: dict[str, float], storage: Storage) -> list[str]:
    """``members`` in the order they were committed: by the time a manager's state file records
    for each (``recorded``), else by the time its index records (as :func:`written_last` ranks
    them, reading only those indexes), then number. A run numbered by step and restarted from an
    older step, or a number replaced, is not in number order."""
    def written(name: str) -> tuple[float, int]:
        when = recorded.get(name)
        return (_written_time(directory, name, storage) if when is None else when), number_of(name) or 0

    return sorted(members, key=written)


_CREATED: dict[tuple[str, float], float | None] = {}  # (index path, its file's time) -> its created time
_CREATED_LIMIT = 32768  # a directory of more checkpoints would read every index at every poll
_CREATED_LOCK = threading.Lock()


def _created(path: str, modified: float, storage: Storage) -> float | None:
    """The ``created`` time the index at ``path`` records, None where it records none or is
    damaged. Read once per version of the file (its time as ``modified``; every time where the
    storage does not tell it): a follower asking for the latest at every poll reads each index
    once, and a number replaced since (a new index, a new time) is read again. A read that
    failed (an I/O error, the file gone meanwhile) is not kept, and asked again next time."""
    key = (path, modified)
    if modified >= 0:
        with _CREATED_LOCK:  # followers in threads of one process
            if key in _CREATED:
                return _CREATED[key]
    try:
        data = storage.read_file(path, spec.MAX_INDEX_SIZE, "Index")
    except (CheckpointError, OSError):
        return None
    try:
        found = format_index.parse_index(parent_of(path), data, defer_weight_map=True).section.get("created")
        created = float(found) if found is not None and history_state.is_timestamp(found) else None
    except CheckpointError:  # damaged for good (a read error was raised above): kept
        created = None
    if modified >= 0:
        with _CREATED_LOCK:
            while len(_CREATED) >= _CREATED_LIMIT:
                del _CREATED[next(iter(_CREATED))]
            _CREATED[key] = created
    return created


def newest_unknown(recorded: set[str], members: list[str], prefix: str | None = None) -> str | None:
    """The member numbered after every recorded checkpoint (of ``prefix``; by default the prefix of
    the highest recorded one), or None when there is none, or nothing recorded is numbered."""
    numbered = [(number, name) for name in recorded if (number := number_of(name, prefix)) is not None]
    if not numbered:
        return None
    top, highest = max(numbered)
    prefix = prefix if prefix is not None else highest[: highest.rindex("-")]
    newer = [n for n in members if (number_of(n, prefix) or -1) > top]
    return max(newer, key=lambda n: number_of(n, prefix) or 0) if newer else None


def _newer_of_its_run(name: str, names: list[str], directory: str, storage: Storage) -> str | None:
    """For a numbered checkpoint ``name`` that is gone from a directory a manager keeps: the newest
    checkpoint of its prefix, where retention explains the gap, else None. Retention deletes the
    oldest of the latest first, so ``name`` must be numbered below the newest kept checkpoints
    numbered one after another, as a run numbers its saves (the last ``max_to_keep``; the best ones
    ``keep_best`` keeps beside them may be older): a number in the middle of those or past them, or
    below a run that numbers by step (``checkpoint_number=step``), may never have been written (a
    typo), and is not called deleted."""
    number = number_of(name)
    if number is None or spec.STATE_FILE not in names:
        return None
    try:
        state = history_state.read_state(directory, storage)
    except (history_state.StateFileError, CheckpointError):
        return None
    prefix = name[: name.rindex("-")]
    kept = sorted(n for e in state.checkpoints if (n := number_of(e.name, prefix)) is not None) if state else []
    if not kept:
        return None
    tail = 1  # the newest kept numbered one after another
    while tail < len(kept) and kept[-tail - 1] == kept[-tail] - 1:
        tail += 1
    if number >= kept[-tail] or tail == 1 < len(kept):  # the newest alone beside older ones: no rhythm to go by
        return None
    newer = [(n, other) for other in names if (n := number_of(other, prefix)) is not None and n > number]
    return max(newer)[1] if newer else None


def resolve_checkpoint(path: str, storage: Storage) -> str:
    """A checkpoint directory for ``path``: itself, or the latest checkpoint of a directory of them.

    Raises:
        CheckpointNotFoundError: nothing committed is there (or a save is writing it).
        CheckpointDeletedError: a deletion is removing it.
    """
    is_dir = storage.follows_to_dir(path)  # asked once: a deletion may finish between two questions
    if not is_dir and not storage.exists(path):
        raise _absent(path, storage)
    if not is_dir:
        if name_of(path) == spec.INDEX_FILE:
            return parent_of(path)
        raise CheckpointNotFoundError(
            f"{path} is a file; pass a checkpoint directory (the one holding {spec.INDEX_FILE}).", path
        )
    if storage.exists(join(path, spec.INDEX_FILE)):
        return path
    latest = latest_in(path, storage)
    if latest is None:
        names = storage.list_names(path)
        unfinished = unfinished_error(path, names)
        if unfinished is not None:
            raise unfinished
        if not names and not storage.follows_to_dir(path):  # there a moment ago: a deletion finished meanwhile
            raise _absent(path, storage, meanwhile=True)
        if not names:  # an empty directory: a deletion's last step (the folder, after its marker), or a user's
            deleted = _absent(path, storage)
            if isinstance(deleted, CheckpointDeletedError):  # its run's retention explains the name
                raise deleted
        shards = sorted(n for n in names if n.endswith(spec.SHARD_SUFFIX))
        found = (f"it holds {len(shards)} shard file{'s' if len(shards) > 1 else ''} ({shards[0]}"
                 f"{', ...' if len(shards) > 1 else ''}) but no {spec.INDEX_FILE}, which commits a checkpoint: the "
                 "index was deleted or not copied (a save that was interrupted leaves nothing behind), so it "
                 "cannot be restored; restore another checkpoint." if shards else
                 f"it has no {spec.INDEX_FILE} and no checkpoint directories. A save that was interrupted leaves "
                 "nothing behind; check the path.")
        raise CheckpointNotFoundError(f"No committed checkpoint in {path}: {found}", path)
    return latest


def _absent(path: str, storage: Storage, meanwhile: bool = False) -> CheckpointNotFoundError:
    """The error for a checkpoint path that is not there: never was (a typo: the closest name), or
    deleted by its run's retention (a newer checkpoint of its run is there), or (``meanwhile``)
    deleted while this reader was resolving it, a moment after it found it."""
    parent, newer, close = parent_of(path), None, []
    if storage.follows_to_dir(parent):
        names = storage.list_names(parent)
        newer = _newer_of_its_run(name_of(path), names, parent, storage)
        if newer is None and not meanwhile:
            import difflib

            close = difflib.get_close_matches(name_of(path), names, n=1)
    if meanwhile:
        since = f"; {sibling(path, newer)} was written since" if newer is not None else ""
        return CheckpointDeletedError(
            f"Checkpoint {path} was deleted while it was being read (a manager's max_to_keep, usually{since}); "
            "read a newer checkpoint (latest_checkpoint, checkpoints_iterator).", path)
    if newer is not None:  # a run's retention deleted it: a follower reads the newer one
        return CheckpointDeletedError(
            f"{path} was deleted: the run writing {parent} keeps only its latest checkpoints (max_to_keep), "
            f"and has written {sibling(path, newer)} since. Read that one (latest_checkpoint, "
            "checkpoints_iterator).", path)
    hint = f" Did you mean {sibling(path, close[0])!r}?" if close else ""
    return CheckpointNotFoundError(f"No checkpoint at {path}: the path does not exist.{hint}", path)


def unfinished_error(path: str, names: list[str]) -> CheckpointNotFoundError | None:
    """The error for reading the directory ``path`` (holding ``names``, without an index) while a
    writer is writing it or a deletion is deleting it, or None when neither is under way.

    On an object store a writer's ``.torchckpt-pending-<tag>`` and a deletion's
    ``.torchckpt-deleting`` lie in the prefix; on a file system a save is written in a temporary
    sibling (``<name>.torchckpt-tmp-...``) and a replaced or deleted checkpoint is removed from one
    (``<name>.torchckpt-old-...``), which a reader may be handed by name.
    """
    name = name_of(path)
    if spec.DELETING_FILE in names or spec.OLD_MARKER in name:
        why = (f"{spec.DELETING_FILE} is there" if spec.DELETING_FILE in names
               else f"its name holds {spec.OLD_MARKER}")
        return CheckpointDeletedError(
            f"Checkpoint {path} is being deleted ({why}: a manager's max_to_keep or a replacement removes it, and a "
            "deletion cut short is finished by the next manager); it is no longer a checkpoint. Read a newer "
            "checkpoint of its directory.", path)
    if any(spec.is_pending_marker(n) for n in names) or spec.TMP_MARKER in name:
        why = (f"a writer's {spec.PENDING_FILE}-<tag> marker is there" if spec.TMP_MARKER not in name
               else f"its name holds {spec.TMP_MARKER}")
        return CheckpointNotFoundError(
            f"{path} is a checkpoint being written ({why}) and has no {spec.INDEX_FILE} yet: it is not a "
            "checkpoint until its save commits it (a crashed save's leftovers are removed by the next manager on its "
            "directory). Read it once its save has finished, or read its directory's latest checkpoint.", path)
    return None


def is_being_replaced(path: str, storage: Storage, now: float) -> bool:
    """Whether the checkpoint ``path`` is between the deletion of its index and the creation of
    its replacement's (an object store's ``save(checkpoint_number=n)`` of an existing ``n``): no
    index, and a pending marker that a writer put there within ``LEFTOVER_GRACE_SECS`` (an older
    one is a crashed writer's; one from the future, or not a marker at all, counts for nothing)."""
    names = storage.list_names(path)
    if spec.INDEX_FILE in names:
        return False
    for name in names:
        if spec.is_pending_marker(name):
            try:
                written = json.loads(storage.read_file(join(path, name), 2**16, "Pending marker")).get("time")
            except (OSError, ValueError, AttributeError, RecursionError, CheckpointError):
                continue  # (a marker is anyone's file: what is not a writer's marker counts for nothing)
            if isinstance(written, (int, float)) and 0 <= now - written < LEFTOVER_GRACE_SECS:
                return True
    return False


def sibling(path: str, name: str) -> str:
    """``name`` next to ``path``, written as the user wrote ``path`` (relative stays relative)."""
    return join(parent_of(path), name) if is_url(path) else os.path.join(os.path.dirname(path), name)


def refuse_taken_number(storage: Storage, path: str, counter: int) -> None:
    """A save of a never-restored ``Checkpoint`` (``save_counter`` ``counter``, counting from 0)
    replaces no checkpoint at its number ``path`` (a sealed index: a folder of someone's files gets
    the saver's own refusal) and no file there: ``CheckpointWriteError`` (``errno.EEXIST``)."""
    exists = FileExistsError(errno.EEXIST, os.strerror(errno.EEXIST), path)
    if storage.is_file(path):
        raise CheckpointWriteError(
            f"Cannot save {path}: a file is there, not a checkpoint, and save() never replaces one. Move it away, or "
            "save under another prefix.", path, exists)
    if has_sealed_index(path, storage):
        raise CheckpointWriteError(
            f"Cannot save {path}: it exists, and this Checkpoint's save_counter was never restored, so save() does "
            f"not replace it (its count, {counter}, numbers its next save {counter + 1}: it is not the run that saved "
            f"there). Restore first (ckpt.restore({parent_of(path)!r})) to go on from that run's count, save under "
            "another prefix, or replace that checkpoint on purpose with write(path); a CheckpointManager numbers past "
            "the checkpoints it finds.", path, exists)
