"""A manager's ledger of its directory: which checkpoints it keeps, preserves and found damaged.

The ledger is the manager's history in memory, written to the state file after every change and
read back (``recover``) when a manager opens the directory. On several ranks rank 0 alone reads
and writes it; the other ranks take rank 0's copy, in the state file's own encoding
(:meth:`Ledger.mirror`, :meth:`Ledger.adopt`), so every rank reports the same history.

Why a ledger apart from the manager: the manager decides (arguments, numbering, when to save);
the ledger records, and applies the pure retention policy to what it records.
"""

from __future__ import annotations

import json
import warnings
from collections.abc import Iterable
from typing import Any

from torchckpt._format import spec
from torchckpt._history import members as history_members
from torchckpt._history import state as history_state
from torchckpt._history.recover import (
    GONE_INDEX,
    Ranking,
    managed_entry,
    missing_shard,
    read_disk,
    recover,
)
from torchckpt._history.retention import best_entries, plan_retention, ranked_history
from torchckpt._history.state import Entry, State
from torchckpt._paths import join
from torchckpt._storage.base import ConflictError, Storage
from torchckpt.errors import CheckpointError, CheckpointWriteError, format_keys


class Ledger:
    """The history of the checkpoints ``{name}-{n}`` in ``directory``, as one manager keeps it.

    ``kept`` may be deleted by retention later (oldest first); ``preserved`` never are; ``damaged``
    maps a checkpoint's name to why a restore passed it over.
    """

    def __init__(self, directory: str, storage: Storage, name: str, ranking: Ranking) -> None:
        self.directory = directory
        self.storage = storage
        self.name = name
        self.ranking = ranking
        self.latest: str | None = None
        self.kept: list[Entry] = []
        self.preserved: list[Entry] = []
        self.last_preserved_timestamp = 0.0
        self.damaged: dict[str, str] = {}
        self._token: Any = None  # the state file's version, for a write conditional on it
        self._recorded: set[str] = set()  # checkpoints this ledger recorded as committed: this manager's own
        # The state file's ranking (best_metric, best_mode, keep_best) when this ledger read it: what a
        # manager that has not saved writes back (an evaluation script recording a damaged checkpoint
        # must not put its own ranking in the run's file: the resumed run would take it, and delete its best).
        self._file_ranking: tuple[str | None, str, int | None] | None = None
        self._forgotten: tuple[str, float] | None = None  # (name, when) :meth:`forget` wrote out, until recorded
        self._undeleted: list[str] = []  # dropped by a record whose write failed: deleted after the next one
        self._size: int | None = None  # the state file's bytes as last written or adopted (:meth:`check_room`)
        self._had: set[str] = set()  # names the history held before it dropped them as gone: never numbered again
        self._whole: set[str] = set()  # checkpoints whose shards were all there when keep_best looked
        self._looked = False  # whether this record listed the directory for checkpoints deleted by hand
        self._verified: set[str] = set()  # best candidates this record found still a directory
        self._suspect: set[str] = set()  # found damaged by a look (not by a read): retention never deletes them

    def load(self, now: float, best_mode: str | None) -> list[str]:
        """Recover the history from the state file and the directory; returns the warnings about
        what was rebuilt. ``best_mode`` is the manager's argument (None: the directory's)."""
        disk, self._token = read_disk(self.directory, self.storage, self.name)
        if isinstance(disk.state, State):
            self._file_ranking = (disk.state.best_metric, disk.state.best_mode, disk.state.keep_best)
        history = recover(disk, now, self.name, self.ranking.keep_best, self.ranking.best_metric, best_mode)
        if isinstance(disk.state, State):  # a checkpoint deleted by hand leaves the history, not its number
            self._had = {e.name for e in [*disk.state.checkpoints, *disk.state.preserved]}
            self._had.update([disk.state.latest] if disk.state.latest else [], disk.state.gone)
        self.latest = history.latest
        self.kept = list(history.kept)
        self.preserved = list(history.preserved)
        self.last_preserved_timestamp = history.last_preserved_timestamp
        self.damaged = dict(history.damaged)
        self.ranking = history.ranking
        return list(history.warnings)

    def entries(self) -> list[Entry]:
        return [*self.kept, *self.preserved]

    def next_number(self, counter: int, listed: Iterable[str]) -> int:
        """``counter``, moved past every number the directory has (``listed``: its names) or had."""
        names = {*listed, *self._had, *(e.name for e in self.entries())}
        if self.latest:
            names.add(self.latest)
        numbers = [history_members.number_of(spec.final_name(n), self.name) for n in names]
        # a name past what the numbers may reach (put there by hand) is passed over, not numbered after
        return max(counter, max((n for n in numbers if n is not None and n < spec.MAX_CHECKPOINT_NUMBER), default=-1) + 1)

    def metrics_of(self, name: str) -> dict[str, Any] | None:
        for entry in self.entries():
            if entry.name == name:
                return entry.metrics
        return None

    def best(self) -> str | None:
        """The name of the checkpoint with the best metric, kept or preserved, or None. From the
        history alone (no request, the same on every rank: rank 0's), so a checkpoint deleted by hand
        since the last save can be named; ``get_checkpoint_state`` and ``ls`` look at the disk."""
        ranked = ranked_history(self.kept, self.preserved, self.ranking.best_metric, self.ranking.best_mode,
                                self.damaged)
        return ranked[0].name if ranked else None

    def state(self) -> State:
        """The ledger as the state file records it."""
        metric = self.ranking.best_metric if isinstance(self.ranking.best_metric, str) else None
        mode, keep_best = self.ranking.best_mode, self.ranking.keep_best if metric else None
        if not self._recorded and self._file_ranking is not None:  # it has not saved: the directory's ranking stays
            metric, mode, keep_best = self._file_ranking
        known = {e.name for e in self.entries()} | {self.latest}
        damaged = {name: why for name, why in self.damaged.items() if name in known}
        return State(self.latest, list(self.kept), list(self.preserved), self.last_preserved_timestamp,
                     metric, mode, keep_best, damaged, self._highest_gone(known))

    def _highest_gone(self, known: set[str | None]) -> list[str]:
        """The name of the highest number the history held and dropped, where it is higher than any the
        state file names otherwise: written into the state file, so that a restarted manager does not
        number a new checkpoint with it either (see :meth:`next_number`)."""
        def number(name: str | None) -> int:  # (one past what numbers may reach is never numbered after: -1)
            found = None if name is None else history_members.number_of(spec.final_name(name), self.name)
            return -1 if found is None or found >= spec.MAX_CHECKPOINT_NUMBER else found

        highest = max(self._had - known, key=lambda n: (number(n), n), default=None)
        return [highest] if highest is not None and number(highest) > max(map(number, known), default=-1) else []

    def mirror(self, read_only: bool) -> dict[str, Any]:
        """Rank 0's ledger, for the other ranks (the state file's own encoding)."""
        return {"state": self.state().to_bytes().decode(), "read_only": read_only}

    def adopt(self, mirror: dict[str, Any]) -> tuple[State, bool]:
        """Take rank 0's ledger (on the other ranks, which never read the directory); returns it and
        whether the directory is read-only."""
        state = history_state.parse_state(mirror["state"].encode(), join(self.directory, history_state.STATE_FILE))
        self.latest = state.latest
        self.kept = list(state.checkpoints)
        self.preserved = list(state.preserved)
        self.last_preserved_timestamp = state.last_preserved_timestamp
        self.damaged = dict(state.damaged)
        self._size = len(mirror["state"].encode())
        return state, bool(mirror["read_only"])

    def write(self) -> None:
        """Write the state file, unless another writer replaced it since this ledger read or wrote it."""
        state = self.state()
        data = state.to_bytes()
        try:
            self._token = history_state.write_state(self.directory, state, self.storage, self._token, data)
            self._size = len(data)
        except ConflictError:
            latest = f"Checkpoint {join(self.directory, self.latest)} is committed, but " if self.latest else ""
            raise CheckpointError(
                f"{latest}{join(self.directory, history_state.STATE_FILE)} was replaced by another writer since this "
                f"manager last wrote it: two managers (of this process or another) are writing to {self.directory}. "
                "Its history was not overwritten, so it does not name that checkpoint yet, and nothing was deleted; "
                "stop the other manager (or use another directory) and create this one again: it records the "
                "checkpoint."
            ) from None

    def check_room(self, metrics: dict[str, Any] | None, now: float, max_to_keep: int | None,
                   keep_every_n_hours: float | None) -> None:
        """Before a save writes anything: refuse it when recording it (with ``metrics``, at ``now``,
        retention applied as :meth:`record` applies it) would take the state file past the size its
        readers take, which would leave the history unreadable and rebuilt from the directory, its
        retention and ranking lost. Far from that size, a bound on the entry's size answers.

        Raises:
            ValueError: the state file has no room for one more entry.
        """
        entry = Entry(f"{self.name}-{2**63}", now, metrics)  # the longest name
        # as ASCII, every character escaped as the file may escape it: at least its bytes, laid out
        bound = 2 * len(json.dumps(entry.to_json(), ensure_ascii=True, default=repr)) + 1024
        if self._size is not None and self._size + bound <= spec.MAX_STATE_FILE_SIZE:
            return
        r = self.ranking
        plan = plan_retention([*self.kept, entry], max_to_keep, keep_every_n_hours, self.last_preserved_timestamp,
                              r.keep_best, r.best_metric, r.best_mode, self.damaged)
        state = self.state()
        state.checkpoints, state.preserved = plan.kept, [*state.preserved, *plan.preserve]
        size = len(state.to_bytes())
        if size > spec.MAX_STATE_FILE_SIZE:
            raise ValueError(
                f"Recording another checkpoint would take {join(self.directory, history_state.STATE_FILE)} to about "
                f"{size:,} bytes, past the {spec.MAX_STATE_FILE_SIZE:,} its readers take (it lists every checkpoint "
                f"kept, {len(self.kept) + len(self.preserved)} now, with its metrics). Nothing was written. Keep fewer "
                "checkpoints (max_to_keep, keep_best) or pass smaller metrics.")

    def record(self, name: str, metrics: dict[str, Any] | None, now: float, max_to_keep: int | None,
               keep_every_n_hours: float | None) -> list[str]:
        """Record a committed checkpoint as the latest and apply retention, in one write of the
        state file; returns the names to delete, which the state file no longer names by then (a
        crash before they are deleted leaves them on disk unnamed: the next manager adopts them, as
        any commit the state file missed, and its retention deletes them in turn). Where the write
        fails, the names it dropped are returned by the next record instead."""
        self._forgotten = None  # recorded now, with the new checkpoint's metrics
        self.kept = [e for e in self.kept if e.name != name]
        self.preserved = [e for e in self.preserved if e.name != name]
        self.kept.append(Entry(name, now, metrics))
        self.damaged.pop(name, None)  # a damaged checkpoint saved again under its name: this one is intact
        self._recorded.add(name)
        self.latest = name
        r = self.ranking
        notes: list[str] = []  # warned once the state file is written: never a reason for this record to fail
        self._looked, self._verified = False, set()
        while True:
            self._check_best(name, notes)
            plan = plan_retention(self.kept, max_to_keep, keep_every_n_hours, self.last_preserved_timestamp,
                                  r.keep_best, r.best_metric, r.best_mode, self.damaged)
            # where retention deletes (or preserves): what it keeps in their place must still be there
            if not (plan.delete or plan.preserve) or self._looked:
                break
            self._drop_gone(name, notes)  # then once more: the best looked at again, and the plan made again
        if plan.delete or plan.preserve:
            self.kept = plan.kept
            self.preserved.extend(plan.preserve)
            self.last_preserved_timestamp = plan.last_preserved_timestamp
        doomed = [*self._undeleted, *(entry.name for entry in plan.delete)]
        try:
            self.write()
        except BaseException:  # out of the history in memory already: deleted after the next record
            self._undeleted = doomed
            raise
        self._undeleted = []
        for note in notes:
            warnings.warn(note, stacklevel=2)
        held = {e.name for e in self.entries()}  # one recorded again since (an explicit number) stays
        return [name for name in dict.fromkeys(doomed) if name not in held]

    def _drop_gone(self, committed: str, notes: list[str]) -> bool:
        """Drop from the history the checkpoints deleted since it was recorded (by hand, by another
        tool): left in it, one would hold a place of ``max_to_keep`` or ``keep_best``, and retention
        would delete a checkpoint that exists to keep one that does not. One listing of the
        directory, once a record, where retention deletes (not at every save); a name the listing
        lacks is asked for once more (a listing may lag a write), and where the storage cannot
        tell, the history stays as it is. Returns whether any was dropped."""
        self._looked = True
        try:
            listed = set(self.storage.list_names(self.directory))
        except (OSError, CheckpointError):
            return False
        gone = []
        for name in dict.fromkeys(e.name for e in self.entries() if e.name not in listed and e.name != committed):
            try:
                if not self.storage.exists(join(self.directory, name)):
                    gone.append(name)
            except (OSError, CheckpointError):
                continue
        if not gone:
            return False
        self._had.update(gone)
        self.kept = [e for e in self.kept if e.name not in gone]
        self.preserved = [e for e in self.preserved if e.name not in gone]
        notes.append(f"{format_keys(join(self.directory, n) for n in gone)} {'is' if len(gone) == 1 else 'are'} gone "
                     f"(deleted by hand, or by another tool): dropped from the history of {self.directory}, so that "
                     "retention and keep_best count only the checkpoints that exist.")
        return True

    def _check_best(self, committed: str, notes: list[str]) -> None:
        """Before retention runs: the checkpoints ``keep_best`` would keep (and ``best_checkpoint``
        would name) are whole: a real directory (a link or a file in its place is never followed)
        with every shard its index lists. One that is not is recorded damaged, with a warning, so
        that it is never best (retention would otherwise delete an intact checkpoint to keep it);
        one deleted whole leaves the history (:meth:`_drop_gone`). Each one's shards are looked at
        once (its index and one listing); that it is still a directory, again at each record where
        retention deletes (``_looked``), as it may have been replaced since."""
        r = self.ranking
        if not r.keep_best or r.best_metric is None:
            return
        skipped: set[str] = set()  # where the storage could not tell: looked at again at the next record
        while True:
            best = [*best_entries(self.kept, r.keep_best, r.best_metric, r.best_mode, self.damaged),
                    *ranked_history(self.kept, self.preserved, r.best_metric, r.best_mode, self.damaged)[:1]]
            unchecked = [n for n in dict.fromkeys(e.name for e in best) if n != committed and n not in skipped
                         and (n not in self._whole or self._looked and n not in self._verified)]
            if not unchecked:
                return
            for name in unchecked:
                try:
                    member = history_members.is_member(self.directory, name, self.storage) or self._listed_whole(name)
                    present = member or self.storage.exists(join(self.directory, name))
                    why = (None if name in self._whole else missing_shard(self.directory, name, self.storage)) \
                        if member else GONE_INDEX
                except (OSError, CheckpointError):
                    skipped.add(name)
                    continue
                if self._looked:
                    self._verified.add(name)
                if not present:  # deleted whole: not damaged but gone, with any others (the list changes: look again)
                    if self._looked or not self._drop_gone(committed, notes):
                        skipped.add(name)
                    break
                if why is None:
                    self._whole.add(name)
                    continue
                self._whole.discard(name)
                self._suspect.add(name)
                self.damaged[name] = why
                notes.append(f"{join(self.directory, name)} is damaged ({why}): it is no longer ranked for keep_best, "
                             "so retention does not keep it in place of an intact checkpoint. Restore another one, or "
                             "delete it by hand.")

    def _listed_whole(self, name: str) -> bool:
        """A second look where :func:`~torchckpt._history.members.is_member` said no (a store that did
        not answer says no too): a listing of the checkpoint holds its index, and it is no link.
        Raises where the store cannot answer."""
        path = join(self.directory, name)
        return (spec.INDEX_FILE in self.storage.list_names(path) and self.storage.link_target(path) is None
                and self.storage.is_file(join(path, spec.INDEX_FILE)))

    def forget(self, name: str, now: float) -> None:
        """Before a save replaces checkpoint ``name`` (an explicit number): write the state file
        without its entry, so that a crash between the commit and :meth:`record` leaves the new
        checkpoint unrecorded, to be adopted with its own metrics and time (``recover``), not
        recorded under the metrics of the one it replaced (which ``keep_best`` would rank). The
        ledger in memory keeps the entry: a save that fails before its commit leaves the old
        checkpoint as it was, and this manager's next write records it again (a manager opened
        before then adopts it from its index), and :meth:`put_back` writes it back if the save fails."""
        if not any(e.name == name for e in self.entries()):
            return
        kept, preserved = self.kept, self.preserved
        self.kept = [e for e in kept if e.name != name]
        self.preserved = [e for e in preserved if e.name != name]
        try:
            self.write()
        except CheckpointWriteError as e:  # its message speaks of a commit: here nothing was written yet
            why = e.strerror or str(e.__cause__ or e)
            raise CheckpointWriteError(
                f"Cannot replace {join(self.directory, name)}: the directory's state file could not be written "
                f"({why}). Nothing was written into {name}, which holds what it held; the next save that "
                "writes the state file records the history as this manager holds it.",
                self.directory, OSError(e.errno, why, e.filename)) from e
        finally:
            self.kept, self.preserved = kept, preserved
        self._forgotten = (name, now)

    def put_back(self) -> None:
        """After the save that :meth:`forget` prepared failed: write the state file with the
        replaced checkpoint's entry again, unless the new checkpoint was committed before the
        failure (its index created since), which the next manager adopts with its own metrics."""
        forgotten, self._forgotten = self._forgotten, None
        if forgotten is None:
            return
        name, since = forgotten
        entry = managed_entry(self.directory, name, self.name, self.storage)
        if entry is None or entry.timestamp is None or entry.timestamp < since:  # the old one is still there
            self.write()

    def retire(self, name: str) -> None:
        """Delete ``name``, a checkpoint retention dropped from the history (the state file no longer
        names it), if it is one a manager of this name wrote: recorded by this ledger, or marked so
        in its index (see ``recover.managed_entry``). Anything else stays on disk, with a warning: a
        state file is a file like any other, and one that lists a checkpoint written by
        ``Checkpoint.save`` or copied in (or one whose index cannot be read) must not get it deleted."""
        path = join(self.directory, name)
        if history_members.number_of(name, self.name) is None or not self.storage.is_dir(path):
            return
        if name in self._suspect:  # found damaged by looking, not by reading it whole: a store that did not answer?
            warnings.warn(
                f"{path} was not deleted: it looked damaged as retention ran ({self.damaged.get(name, 'damaged')}), "
                "so it was no longer kept; a restore or `torchckpt verify` tells whether it is. It is no longer in the "
                "manager's history; delete it by hand if it is not wanted.", stacklevel=2)
            return
        if name not in self._recorded and managed_entry(self.directory, name, self.name, self.storage) is None:
            warnings.warn(
                f"{path} was not deleted: the state file listed it as a kept checkpoint, but its index does not "
                f"say that a manager with checkpoint_name={self.name!r} wrote it (it was written by Checkpoint.save "
                "or write, copied in, or its index cannot be read). It is no longer in the manager's history; delete "
                "it by hand if it is not wanted.",
                stacklevel=2,
            )
            return
        try:
            self.storage.delete_checkpoint(path)  # un-committed at once (renamed, or its index deleted first)
        except OSError as e:  # the checkpoint just recorded stands: this is no failure of its save
            warnings.warn(
                f"{path} was not deleted ({e}): retention dropped it when {join(self.directory, str(self.latest))} "
                "was committed and recorded, which stands. It stays on disk, out of the manager's history; a new "
                "manager on the directory adopts it and its retention deletes it, or delete it by hand.",
                stacklevel=2)
