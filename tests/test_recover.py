"""The manager's history recovery (``_history.recover.recover``) against a table of crash cases.

Each case is what a crash (or a person) leaves in a directory, as :class:`OnDisk`, and the whole
:class:`Recovered` history the manager takes from it at ``NOW``.
"""

from __future__ import annotations

import os
import warnings
from typing import Any

import pytest
import torch

import torchckpt
from torchckpt._history.recover import (
    GONE_INDEX,
    DamagedStateFile,
    OnDisk,
    Ranking,
    Recovered,
    read_disk,
    recover,
    unrecorded,
)
from torchckpt._history.state import Entry, State
from torchckpt._storage.base import ABSENT
from torchckpt._storage.registry import storage_for

NOW = 1000.0
DIR = "run"
GONE = ("The state file of run names {} as the latest checkpoint, but it is not a committed checkpoint there "
        "(deleted, its index.json gone or not a regular file, or a symbolic link, which is never followed (move the "
        "checkpoint itself back), or its replacement cut short): ")
DEFAULT = Ranking(None, None, "min")
DAMAGED = "run/checkpoints.json cannot be used: its seal does not match its content"


def rebuilt_note(why: str, members: int, latest: str | None, adopted: int | None) -> str:
    fate = "They" if not adopted else (
        f"The {adopted} written by a manager named 'ckpt' in the last second are managed again; the others")
    return (f"{DIR}: {why}; rebuilt from the {members} committed checkpoints on disk (latest: {latest}). {fate} are "
            "kept and will never be deleted by this manager, since it cannot know which of them it managed.")


def history(*entries: Entry, latest: str | None = None, lpt: float = 50.0, **fields: Any) -> State:
    return State(latest=latest, checkpoints=list(entries), last_preserved_timestamp=lpt, **fields)


RANKED = {"best_metric": "loss", "best_mode": "max", "keep_best": 2}

# (what is on disk, the manager's ranking arguments (keep_best, best_metric, best_mode), the whole result)
CASES = {
    "no-state-file-empty-directory": (
        OnDisk(DIR, None), (None, None, None),
        Recovered(None, [], [], NOW - 1.0, {}, DEFAULT, []),
    ),
    "no-state-file-members-of-this-manager": (  # adopted; only one written in the last second stays deletable
        OnDisk(DIR, None, ["ckpt-1", "ckpt-2"],
               {"ckpt-1": Entry("ckpt-1", 500.0, {"loss": 0.5}), "ckpt-2": Entry("ckpt-2", 999.5)}, "ckpt-2"),
        (None, None, None),
        Recovered("ckpt-2", [Entry("ckpt-2", 999.5)], [Entry("ckpt-1", 500.0, {"loss": 0.5})], NOW - 1.0, {},
                  DEFAULT, [rebuilt_note("there is no state file", 2, "ckpt-2", adopted=1)]),
    ),
    "no-state-file-members-of-another-manager-or-none": (  # latest: the one written last, not the highest number
        OnDisk(DIR, None, ["other-1", "ckpt-2"], {"other-1": None, "ckpt-2": None}, "other-1"),
        (None, None, None),
        Recovered("other-1", [], [Entry("other-1"), Entry("ckpt-2")], NOW - 1.0, {}, DEFAULT,
                  [rebuilt_note("there is no state file", 2, "other-1", adopted=0)]),
    ),
    "damaged-state-file-all-preserved": (  # nothing is adopted, nothing is ever deleted
        OnDisk(DIR, DamagedStateFile(DAMAGED), ["ckpt-1", "ckpt-2", "ckpt-3"], {}, "ckpt-3"),
        (2, "loss", None),
        Recovered("ckpt-3", [], [Entry("ckpt-1"), Entry("ckpt-2"), Entry("ckpt-3")], NOW - 1.0, {},
                  Ranking(2, "loss", "min"), [rebuilt_note(f"the state file is damaged ({DAMAGED})", 3, "ckpt-3", None)]),
    ),
    "damaged-state-file-empty-directory": (
        OnDisk(DIR, DamagedStateFile(DAMAGED)), (None, None, None),
        Recovered(None, [], [], NOW - 1.0, {}, DEFAULT,
                  [rebuilt_note(f"the state file is damaged ({DAMAGED})", 0, None, None)]),
    ),
    "intact-state-file": (
        OnDisk(DIR, history(Entry("ckpt-1", 100.0), Entry("ckpt-2", 200.0, {"loss": 0.2}), latest="ckpt-2"),
               ["ckpt-1", "ckpt-2"]),
        (None, None, None),
        Recovered("ckpt-2", [Entry("ckpt-1", 100.0), Entry("ckpt-2", 200.0, {"loss": 0.2})], [], 50.0, {}, DEFAULT, []),
    ),
    "unrecorded-commit-adopted-becomes-latest": (  # a crash between the commit and the state write
        OnDisk(DIR, history(Entry("ckpt-1", 100.0), Entry("ckpt-2", 200.0), latest="ckpt-2"),
               ["ckpt-1", "ckpt-2", "ckpt-3"], {"ckpt-3": Entry("ckpt-3", 300.0, {"loss": 0.1})}),
        (None, None, None),
        Recovered("ckpt-3", [Entry("ckpt-1", 100.0), Entry("ckpt-2", 200.0), Entry("ckpt-3", 300.0, {"loss": 0.1})],
                  [], 50.0, {}, DEFAULT, []),
    ),
    "unrecorded-commit-adopted-by-time": (  # save(checkpoint_number=2) after ckpt-3, then a crash
        OnDisk(DIR, history(Entry("ckpt-1", 100.0), Entry("ckpt-3", 300.0), latest="ckpt-3"),
               ["ckpt-1", "ckpt-2", "ckpt-3"], {"ckpt-2": Entry("ckpt-2", 400.0)}),
        (None, None, None),
        Recovered("ckpt-3", [Entry("ckpt-1", 100.0), Entry("ckpt-3", 300.0), Entry("ckpt-2", 400.0)],
                  [], 50.0, {}, DEFAULT, []),
    ),
    "unrecorded-unmanaged-commit-is-latest-not-kept": (  # Checkpoint.save, or copied in: never deleted
        OnDisk(DIR, history(Entry("ckpt-1", 100.0), latest="ckpt-1"), ["ckpt-1", "ckpt-2", "other-9"],
               {"ckpt-2": None}, created={"ckpt-2": 150.0}),
        (None, None, None),
        Recovered("ckpt-2", [Entry("ckpt-1", 100.0)], [], 50.0, {}, DEFAULT, []),
    ),
    "unrecorded-commit-created-before-the-latest-is-not-latest": (  # retention was deleting it at the crash
        OnDisk(DIR, history(Entry("ckpt-3", 300.0), latest="ckpt-3"), ["ckpt-3", "ckpt-5"],
               {"ckpt-5": Entry("ckpt-5", 250.0)}),
        (None, None, None),
        Recovered("ckpt-3", [Entry("ckpt-5", 250.0), Entry("ckpt-3", 300.0)], [], 50.0, {}, DEFAULT, []),
    ),
    "rollback-leftovers-are-not-latest": (  # Checkpoint.save of ckpt-3 after restoring ckpt-2 of ckpt-1..5
        OnDisk(DIR, history(latest="ckpt-3"), ["ckpt-1", "ckpt-2", "ckpt-3", "ckpt-4", "ckpt-5"],
               dict.fromkeys(["ckpt-1", "ckpt-2", "ckpt-3", "ckpt-4", "ckpt-5"]),
               created={"ckpt-3": 500.0, "ckpt-4": 400.0, "ckpt-5": 450.0}),
        (None, None, None),
        Recovered("ckpt-3", [], [], 50.0, {}, DEFAULT, []),
    ),
    "unrecorded-commit-of-unknown-time-is-not-latest": (  # its index gave no time: the record stands
        OnDisk(DIR, history(Entry("ckpt-1", 100.0), latest="ckpt-1"), ["ckpt-1", "ckpt-2"], {"ckpt-2": None}),
        (None, None, None),
        Recovered("ckpt-1", [Entry("ckpt-1", 100.0)], [], 50.0, {}, DEFAULT, []),
    ),
    "unrecorded-commit-of-another-name-ignored": (
        OnDisk(DIR, history(Entry("ckpt-1", 100.0), latest="ckpt-1"), ["ckpt-1", "other-9"]),
        (None, None, None),
        Recovered("ckpt-1", [Entry("ckpt-1", 100.0)], [], 50.0, {}, DEFAULT, []),
    ),
    "latest-deleted-by-hand-falls-back-to-the-member-written-last": (  # read_disk: of this manager's name
        OnDisk(DIR, history(Entry("ckpt-1", 100.0), Entry("ckpt-2", 200.0), Entry("ckpt-3", 300.0), latest="ckpt-3"),
               ["ckpt-1", "ckpt-2"], written_last="ckpt-2", latest_committed=False),
        (None, None, None),
        Recovered("ckpt-2", [Entry("ckpt-1", 100.0), Entry("ckpt-2", 200.0)], [], 50.0, {},
                  DEFAULT, [GONE.format("ckpt-3") + "ckpt-2 is the latest now."]),
    ),
    "latest-deleted-by-hand-a-replaced-number-written-last": (  # probe38 F2: not the highest number
        OnDisk(DIR, history(Entry("ckpt-2", 200.0), Entry("ckpt-1", 250.0), Entry("ckpt-3", 300.0), latest="ckpt-3"),
               ["ckpt-1", "ckpt-2"], written_last="ckpt-1", latest_committed=False),
        (None, None, None),
        Recovered("ckpt-1", [Entry("ckpt-2", 200.0), Entry("ckpt-1", 250.0)], [], 50.0, {},
                  DEFAULT, [GONE.format("ckpt-3") + "ckpt-1 is the latest now."]),
    ),
    "latest-deleted-by-hand-falls-back-to-this-managers-newest": (  # not an export of another name
        OnDisk(DIR, history(Entry("ckpt-1", 100.0), Entry("ckpt-2", 200.0), latest="ckpt-2"),
               ["ckpt-1", "model-70"], written_last="ckpt-1", latest_committed=False),
        (None, None, None),
        Recovered("ckpt-1", [Entry("ckpt-1", 100.0)], [], 50.0, {}, DEFAULT,
                  [GONE.format("ckpt-2") + "ckpt-1 is the latest now."]),
    ),
    "latest-deleted-by-hand-nothing-left": (  # said, not silent: the run starts afresh
        OnDisk(DIR, history(Entry("ckpt-1", 100.0), latest="ckpt-1"), [], latest_committed=False),
        (None, None, None),
        Recovered(None, [], [], 50.0, {}, DEFAULT,
                  [GONE.format("ckpt-1") + "no committed checkpoint is left, so restore_or_initialize() starts afresh "
                   "(init_fn)."]),
    ),
    "clock-behind-last-preserved-timestamp": (  # every entry in doubt is preserved
        OnDisk(DIR, history(Entry("ckpt-1", 900.0), Entry("ckpt-2"), Entry("ckpt-3", 1500.0), latest="ckpt-3",
                            lpt=2000.0, preserved=[Entry("ckpt-0", 10.0)]),
               ["ckpt-0", "ckpt-1", "ckpt-2", "ckpt-3"]),
        (None, None, None),
        Recovered("ckpt-3", [], [Entry("ckpt-0", 10.0), Entry("ckpt-1", 900.0), Entry("ckpt-2"), Entry("ckpt-3", 1500.0)],
                  NOW, {}, DEFAULT,
                  ["time.time() returned a value 1000.000000 seconds behind the last preserved checkpoint timestamp; "
                   "keeping every checkpoint whose preservation is in doubt."]),
    ),
    "kept-best-older-than-the-last-preserved-stays-kept": (  # keep_best kept it; the file says so
        OnDisk(DIR, history(Entry("ckpt-1", 100.0, {"loss": 0.1}), Entry("ckpt-7", 700.0, {"loss": 0.4}),
                            latest="ckpt-7", lpt=400.0, preserved=[Entry("ckpt-4", 400.0)], **RANKED),
               ["ckpt-1", "ckpt-4", "ckpt-7"]),
        (None, None, None),
        Recovered("ckpt-7", [Entry("ckpt-1", 100.0, {"loss": 0.1}), Entry("ckpt-7", 700.0, {"loss": 0.4})],
                  [Entry("ckpt-4", 400.0)], 400.0, {}, Ranking(2, "loss", "max"), []),
    ),
    "clock-stepped-back-between-saves-keeps-the-files-order": (  # retention deletes the oldest save, not time
        OnDisk(DIR, history(Entry("ckpt-3", 900.0), Entry("ckpt-4", 850.0), Entry("ckpt-5", 880.0), latest="ckpt-5"),
               ["ckpt-3", "ckpt-4", "ckpt-5"]),
        (None, None, None),
        Recovered("ckpt-5", [Entry("ckpt-3", 900.0), Entry("ckpt-4", 850.0), Entry("ckpt-5", 880.0)], [], 50.0, {},
                  DEFAULT, []),
    ),
    "unrecorded-retention-victim-adopted-at-its-old-place": (  # dropped from the file, the crash before deleting
        OnDisk(DIR, history(Entry("ckpt-3", 300.0), Entry("ckpt-4", 400.0), latest="ckpt-4"),
               ["ckpt-2", "ckpt-3", "ckpt-4"], {"ckpt-2": Entry("ckpt-2", 200.0)}),
        (None, None, None),
        Recovered("ckpt-4", [Entry("ckpt-2", 200.0), Entry("ckpt-3", 300.0), Entry("ckpt-4", 400.0)], [], 50.0, {},
                  DEFAULT, []),
    ),
    "timestamp-in-the-future-capped-at-now": (
        OnDisk(DIR, history(Entry("ckpt-1", 1500.0), Entry("ckpt-2"), latest="ckpt-1"), ["ckpt-1", "ckpt-2"]),
        (None, None, None),
        Recovered("ckpt-1", [Entry("ckpt-1", NOW)], [Entry("ckpt-2")], 50.0, {}, DEFAULT, []),
    ),
    "ranking-of-the-directory-taken": (
        OnDisk(DIR, history(latest=None, **RANKED)), (None, None, None),
        Recovered(None, [], [], 50.0, {}, Ranking(2, "loss", "max"), []),
    ),
    "explicit-best-mode-over-the-directorys": (
        OnDisk(DIR, history(latest=None, **RANKED)), (None, None, "min"),
        Recovered(None, [], [], 50.0, {}, Ranking(2, "loss", "min"), []),
    ),
    "same-metric-takes-the-directorys-mode": (
        OnDisk(DIR, history(latest=None, **RANKED)), (1, "loss", None),
        Recovered(None, [], [], 50.0, {}, Ranking(1, "loss", "max"), []),
    ),
    "another-metric-keeps-its-own-ranking": (
        OnDisk(DIR, history(latest=None, **RANKED)), (1, "acc", None),
        Recovered(None, [], [], 50.0, {}, Ranking(1, "acc", "min"), []),
    ),
    "kept-and-preserved-deleted-by-hand-dropped": (  # before: a phantom best kept its place, a real one went
        OnDisk(DIR, history(Entry("ckpt-1", 100.0, {"loss": 1.0}), Entry("ckpt-3", 300.0), Entry("ckpt-4", 400.0),
                            latest="ckpt-4", preserved=[Entry("ckpt-0", 10.0)], best_metric="loss", keep_best=1),
               ["ckpt-3", "ckpt-4"]),
        (None, None, None),
        Recovered("ckpt-4", [Entry("ckpt-3", 300.0), Entry("ckpt-4", 400.0)], [], 50.0, {}, Ranking(1, "loss", "min"),
                  [f"The state file of {DIR} names ckpt-0, ckpt-1, which are not committed checkpoints there "
                   "(deleted, its index.json gone or not a regular file, or a symbolic link, which is never followed "
                   "(move the checkpoint itself back)): dropped from the history, so that "
                   "retention and keep_best count only the checkpoints that exist."]),
    ),
    "kept-whose-folder-is-left-recorded-damaged": (  # its index.json gone: kept, never best, dropped in its turn
        OnDisk(DIR, history(Entry("ckpt-1", 100.0), Entry("ckpt-2", 200.0), latest="ckpt-2"), ["ckpt-2"],
               listed=frozenset({"ckpt-1", "ckpt-2", "checkpoints.json"})),
        (None, None, None),
        Recovered("ckpt-2", [Entry("ckpt-1", 100.0), Entry("ckpt-2", 200.0)], [], 50.0, {"ckpt-1": GONE_INDEX},
                  DEFAULT, [f"The state file of {DIR} names ckpt-1, which is not a committed checkpoint there "
                            "(deleted, its index.json gone or not a regular file, or a symbolic link, which is never "
                            "followed (move the checkpoint itself back)): recorded damaged: it is never best, and, as "
                            "nothing says any more that this manager wrote it, retention leaves it to be deleted by "
                            "hand."]),
    ),
    "damaged-records-kept": (
        OnDisk(DIR, history(Entry("ckpt-1", 100.0), Entry("ckpt-2", 200.0), latest="ckpt-2",
                            damaged={"ckpt-2": "shard model-00001.safetensors fails its checksum"}),
               ["ckpt-1", "ckpt-2"]),
        (None, None, None),
        Recovered("ckpt-2", [Entry("ckpt-1", 100.0), Entry("ckpt-2", 200.0)], [], 50.0,
                  {"ckpt-2": "shard model-00001.safetensors fails its checksum"}, DEFAULT, []),
    ),
}


@pytest.mark.parametrize(("disk", "ranking", "expected"), CASES.values(), ids=CASES.keys())
def test_recovery_table(disk, ranking, expected):
    assert recover(disk, NOW, "ckpt", *ranking) == expected


@pytest.mark.parametrize(
    ("state", "expected"),
    [
        (None, ["other-1", "ckpt-2", "ckpt-3"]),
        (DamagedStateFile(DAMAGED), []),
        (history(Entry("ckpt-2"), latest="ckpt-2"), ["ckpt-3"]),
    ],
    ids=["no-state-file-all", "damaged-state-file-none", "state-file-this-name-unrecorded"],
)
def test_unrecorded_members_are_the_ones_read(state, expected):
    assert unrecorded(state, ["other-1", "ckpt-2", "ckpt-3"], "ckpt") == expected


def test_read_disk_reads_what_recover_needs(tmp_path):
    manager = torchckpt.CheckpointManager(torchckpt.Checkpoint(w=torch.zeros(2)), tmp_path)
    manager.save(metrics={"loss": 0.5})
    second = manager.save()
    manager.close()
    os.remove(tmp_path / "checkpoints.json")
    disk, token = read_disk(str(tmp_path), storage_for(str(tmp_path)), "ckpt")
    assert (disk.state, disk.members, disk.written_last, disk.latest_committed) == (None, ["ckpt-1", "ckpt-2"],
                                                                                    "ckpt-2", False)
    assert token is ABSENT  # the first state write must find no state file
    assert sorted(disk.managed) == ["ckpt-1", "ckpt-2"] and disk.managed["ckpt-1"].metrics == {"loss": 0.5}
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        again = torchckpt.CheckpointManager(torchckpt.Checkpoint(w=torch.zeros(2)), tmp_path)
    again.close()
    assert [str(w.message) for w in caught] == recover(disk, 0.0, "ckpt").warnings
    assert again.latest_checkpoint == second


def test_a_save_the_state_file_has_no_room_for_is_refused_before_anything_is_written(tmp_path):
    # a state file past the 64 MiB readers take was written, then read as damaged and rebuilt,
    # its retention and ranking lost (1,200 saves of 60 KB metrics with max_to_keep=None)
    from torchckpt._format import spec
    from torchckpt._history.ledger import Ledger

    ledger = Ledger(str(tmp_path), storage_for(str(tmp_path)), "ckpt", DEFAULT)
    metrics = {f"m{i}": "x" * 1000 for i in range(60)}
    entry_size = len(State(None, [Entry("ckpt-1", 1.0, metrics)]).to_bytes()) - len(State(None, []).to_bytes())
    room = spec.MAX_STATE_FILE_SIZE // entry_size
    ledger.kept = [Entry(f"ckpt-{i}", float(i), metrics) for i in range(room - 2)]
    ledger.check_room(metrics, 1e6, None, None)  # one more fits
    ledger.kept += [Entry(f"ckpt-{i}", float(i), metrics) for i in range(room - 2, room)]
    with pytest.raises(ValueError, match=r"Recording another checkpoint would take .*checkpoints.json to about "
                                         r"[0-9,]+ bytes, past the 67,108,864 its readers take .* Nothing was written"):
        ledger.check_room(metrics, 1e6, None, None)
    ledger.check_room(metrics, 1e6, len(ledger.kept), None)  # probe44 F4: retention drops the oldest as it records
