"""CheckpointManager: TensorFlow's checkpoint_management_test.py cases, adapted, and what goes beyond."""

from __future__ import annotations

import errno
import gc
import json
import os
import pathlib
import re
import shutil
import subprocess
import sys
import time
import warnings

import numpy as np
import pytest
import torch

import torchckpt
from torchckpt import CheckpointManager, _clock
from torchckpt._format import spec
from torchckpt._history import retention
from torchckpt._history import state as history_state
from torchckpt._history.state import Entry
from torchckpt._storage.local import LOCAL


@pytest.fixture
def fake_time():
    """The package's clock stopped at 3.0; set its ``now`` to move it."""
    with _clock.frozen(3.0) as clock:
        yield clock


def exists(path: str) -> bool:
    return os.path.isfile(os.path.join(path, "index.json"))


def state_of(directory) -> dict:
    return json.loads(pathlib.Path(directory, "checkpoints.json").read_text())


def ckpt() -> torchckpt.Checkpoint:
    return torchckpt.Checkpoint(v=torch.tensor(1.0))


def test_deletion(tmp_path):
    checkpoint = ckpt()
    manager = CheckpointManager(checkpoint, tmp_path, max_to_keep=3)
    first, second, third = manager.save(), manager.save(), manager.save()
    fourth = manager.save()
    assert not exists(first) and all(exists(p) for p in (second, third, fourth))
    assert manager.checkpoints == [second, third, fourth]
    assert manager.latest_checkpoint == fourth


def test_keep_all_then_tighten_across_managers(tmp_path):
    checkpoint = ckpt()
    directory = tmp_path / "run"
    manager = CheckpointManager(checkpoint, directory, max_to_keep=None)
    first, second, third = manager.save(), manager.save(), manager.save()
    assert manager.latest_checkpoint == third
    assert manager.checkpoints == [first, second, third]
    del manager
    manager = CheckpointManager(checkpoint, directory, max_to_keep=None)
    fourth = manager.save()
    assert manager.checkpoints == [first, second, third, fourth]
    del manager
    manager = CheckpointManager(checkpoint, directory, max_to_keep=3)
    assert manager.checkpoints == [first, second, third, fourth]
    fifth = manager.save()
    assert manager.checkpoints == [third, fourth, fifth]
    assert not exists(first) and not exists(second)


def test_save_restore_state_with_hours(tmp_path, fake_time):
    directory = str(tmp_path)
    checkpoint = ckpt()
    first_manager = CheckpointManager(checkpoint, directory, max_to_keep=2)
    first_time = 10000.0
    first_name = os.path.join(directory, "ckpt-1")
    fake_time.now = first_time
    first_manager.save()
    second_time = first_time + 3610.0
    second_name = os.path.join(directory, "ckpt-2")
    fake_time.now = second_time
    first_manager.save()
    assert [e["timestamp"] for e in state_of(directory)["checkpoints"]] == [first_time, second_time]
    assert first_manager.checkpoints == [first_name, second_name]
    assert first_manager.latest_checkpoint == second_name
    del first_manager

    second_manager = CheckpointManager(checkpoint, directory, max_to_keep=2, keep_checkpoint_every_n_hours=1.5)
    assert second_manager.checkpoints == [first_name, second_name]
    assert second_manager.latest_checkpoint == second_name
    third_name = os.path.join(directory, "ckpt-3")
    third_time = second_time + 3600.0 * 0.2
    fake_time.now = third_time
    second_manager.save()
    assert exists(first_name) and exists(second_name)
    assert second_manager.checkpoints == [second_name, third_name]
    assert state_of(directory)["last_preserved_timestamp"] == first_time
    fourth_time = third_time + 3600.0 * 0.5
    fake_time.now = fourth_time
    fourth_name = os.path.join(directory, "ckpt-4")
    second_manager.save()
    assert exists(first_name) and not exists(second_name)
    assert second_manager.checkpoints == [third_name, fourth_name]
    fifth_time = fourth_time + 3600.0 * 0.5
    fake_time.now = fifth_time
    fifth_name = os.path.join(directory, "ckpt-5")
    second_manager.save()
    assert second_manager.checkpoints == [fourth_name, fifth_name]
    assert state_of(directory)["last_preserved_timestamp"] == first_time
    del second_manager

    third_manager = CheckpointManager(checkpoint, directory, max_to_keep=2, keep_checkpoint_every_n_hours=1.5)
    assert third_manager.latest_checkpoint == fifth_name
    fake_time.now += 10.0
    third_manager.save()
    sixth_name = os.path.join(directory, "ckpt-6")
    assert state_of(directory)["last_preserved_timestamp"] == fourth_time
    assert all(exists(p) for p in (first_name, fourth_name, fifth_name, sixth_name))
    assert not exists(second_name) and not exists(third_name)
    assert third_manager.checkpoints == [fifth_name, sixth_name]
    # Preserved checkpoints are recorded, and no later manager deletes them.
    assert [e["name"] for e in state_of(directory)["preserved"]] == ["ckpt-1", "ckpt-4"]
    fourth_manager = CheckpointManager(checkpoint, directory, max_to_keep=1)
    for _ in range(3):
        fake_time.now += 10.0
        fourth_manager.save()
    assert exists(first_name) and exists(fourth_name)


def test_clock_reset(tmp_path, fake_time):
    directory = str(tmp_path)
    fake_time.now = 10000.0
    checkpoint = ckpt()
    first_manager = CheckpointManager(checkpoint, directory, max_to_keep=1, keep_checkpoint_every_n_hours=1.0)
    first_path = first_manager.save()
    fake_time.now += 3600.0
    second_path = first_manager.save()
    fake_time.now += 3600.0
    third_path = first_manager.save()
    assert not exists(first_path) and exists(second_path) and exists(third_path)
    assert first_manager.checkpoints == [third_path]
    assert state_of(directory)["last_preserved_timestamp"] == 13600.0
    fake_time.now = 5000.0  # the clock is set back
    del first_manager
    with pytest.warns(UserWarning, match="behind the last preserved checkpoint timestamp"):
        second_manager = CheckpointManager(checkpoint, directory, max_to_keep=1)
    assert exists(second_path)
    assert second_manager.latest_checkpoint == third_path
    assert second_manager.checkpoints == []
    fake_time.now += 10.0
    fourth_path = second_manager.save()
    assert exists(second_path) and exists(third_path)
    assert second_manager.latest_checkpoint == fourth_path
    assert second_manager.checkpoints == [fourth_path]
    fake_time.now += 10.0
    fifth_path = second_manager.save()
    assert exists(second_path) and exists(third_path)
    assert second_manager.checkpoints == [fifth_path]
    state = state_of(directory)
    assert state["last_preserved_timestamp"] == 5000.0
    assert [e["timestamp"] for e in state["checkpoints"]] == [5020.0]


def test_continue_from_unmanaged(tmp_path):
    directory = str(tmp_path)
    prefix = os.path.join(directory, "unusual_prefix")
    checkpoint = ckpt()
    first_path = checkpoint.save(prefix)
    second_path = checkpoint.save(prefix)
    del checkpoint
    checkpoint = ckpt()
    manager = CheckpointManager(checkpoint, directory, max_to_keep=2)
    assert manager.latest_checkpoint == second_path
    checkpoint.restore(manager.latest_checkpoint).assert_consumed()
    assert checkpoint.save_counter == 2
    third_path = manager.save()
    assert manager.checkpoints == [third_path]
    fourth_path = manager.save()
    fifth_path = manager.save()
    assert manager.checkpoints == [fourth_path, fifth_path]
    assert exists(first_path) and exists(second_path) and not exists(third_path)


def test_unmanaged_save_into_a_managed_directory_is_adopted_as_latest_but_never_deleted(tmp_path):
    checkpoint = ckpt()
    manager = CheckpointManager(checkpoint, tmp_path, max_to_keep=1)
    manager.save()
    side = checkpoint.save(tmp_path / "side")
    manager = CheckpointManager(checkpoint, tmp_path, max_to_keep=1)
    assert manager.latest_checkpoint == side
    for _ in range(3):
        manager.save()
    assert exists(side)


def test_a_state_file_listing_checkpoints_no_manager_wrote_never_gets_them_deleted(tmp_path):
    # a state file is a file like any other (a downloaded run, a shared bucket): one that lists
    # Checkpoint.save's checkpoints as kept must not make retention delete them
    checkpoint = ckpt()
    first, second = checkpoint.save(tmp_path / "ckpt"), checkpoint.save(tmp_path / "ckpt")
    forged = history_state.State(latest="ckpt-2", checkpoints=[Entry("ckpt-1", 1.8e9), Entry("ckpt-2", 1.8e9 + 1)],
                                 last_preserved_timestamp=1.0)
    (tmp_path / "checkpoints.json").write_bytes(forged.to_bytes())
    manager = CheckpointManager(ckpt(), tmp_path, max_to_keep=1)
    with pytest.warns(UserWarning, match=r"ckpt-[12] was not deleted: the state file listed it as a kept checkpoint, "
                                         r"but its index does not say that a manager with checkpoint_name='ckpt' "
                                         r"wrote it") as record:
        third = manager.save()
    assert len([w for w in record if "was not deleted" in str(w.message)]) == 2
    assert exists(first) and exists(second) and manager.checkpoints == [third]


def test_custom_numbering(tmp_path):
    step = torch.tensor(0, dtype=torch.int64)
    checkpoint = torchckpt.Checkpoint(step=step)
    manager = CheckpointManager(checkpoint, tmp_path, max_to_keep=2)
    for i in range(5):
        path = manager.save(checkpoint_number=step)
        assert path.endswith(f"-{2 * i}")
        step += 2
    assert checkpoint.save_counter == 5
    last_path = manager.save(checkpoint_number=32)
    assert "-32" in last_path
    assert last_path == manager.latest_checkpoint == torchckpt.latest_checkpoint(tmp_path)
    assert [e["name"] for e in state_of(tmp_path)["checkpoints"]] == [os.path.basename(path), "ckpt-32"]
    with pytest.raises(ValueError, match="0-dim integer tensor"):
        manager.save(checkpoint_number=torch.tensor([1, 2]))
    with pytest.raises(ValueError, match="non-negative"):
        manager.save(checkpoint_number=-1)


def test_plain_save_after_a_higher_explicit_number_continues_past_it(tmp_path):
    # numbers only grow: the README's example (TensorFlow would write ckpt-8, its counter)
    manager = CheckpointManager(ckpt(), tmp_path, max_to_keep=None)
    for _ in range(6):
        manager.save()
    assert manager.save(checkpoint_number=9).endswith("ckpt-9")
    assert manager.save().endswith("ckpt-10")
    assert manager.checkpoint.save_counter == 10


def test_custom_checkpoint_name(tmp_path):
    checkpoint = ckpt()
    manager = CheckpointManager(checkpoint, tmp_path, max_to_keep=2, checkpoint_name="ckpt_name")
    assert os.path.basename(manager.save(checkpoint_number=5)) == "ckpt_name-5"
    manager.close()
    # TensorFlow's test then opens a manager named "ckpt" on the same directory; here that is refused
    # (test_a_manager_of_another_name_is_refused_where_one_keeps_its_history): a directory of its own
    manager = CheckpointManager(checkpoint, tmp_path / "other", max_to_keep=2)
    assert os.path.basename(manager.save(checkpoint_number=5)) == "ckpt-5"


def test_resaving_a_number_replaces_it_and_moves_it_to_the_end(tmp_path):
    v = torch.tensor(1.0)
    checkpoint = torchckpt.Checkpoint(v=v)
    manager = CheckpointManager(checkpoint, tmp_path, max_to_keep=3)
    one, two = manager.save(), manager.save()
    v.fill_(7.0)
    again = manager.save(checkpoint_number=1)
    assert again == one and manager.checkpoints == [two, one]
    target = torch.tensor(0.0)
    torchckpt.Checkpoint(v=target).restore(one).assert_consumed()
    assert target.item() == 7.0


def test_fresh_checkpoint_never_overwrites_existing_numbers(tmp_path):
    manager = CheckpointManager(ckpt(), tmp_path, max_to_keep=5)
    paths = [manager.save() for _ in range(3)]
    fresh = CheckpointManager(ckpt(), tmp_path, max_to_keep=5)
    new = fresh.save()
    assert new.endswith("ckpt-4") and fresh.checkpoint.save_counter == 4
    assert all(exists(p) for p in paths)


def test_restore_or_initialize(tmp_path):
    init_v = torch.tensor(2.0)
    init_path = torchckpt.Checkpoint(v=init_v).save(tmp_path / "init")
    v = torch.tensor(1.0)
    checkpoint = torchckpt.Checkpoint(v=v)
    manager = CheckpointManager(checkpoint, tmp_path / "ckpt", max_to_keep=None,
                                init_fn=lambda: checkpoint.restore(init_path).assert_consumed())
    assert manager.restore_or_initialize() is None
    assert v.item() == 2.0
    manager.save()
    assert manager.restore_or_initialize() == manager.latest_checkpoint


def test_pathlib_directory(tmp_path):
    directory = pathlib.Path(tmp_path)
    manager = CheckpointManager(ckpt(), directory, max_to_keep=2)
    save_path = manager.save()
    assert isinstance(save_path, str)
    assert re.sub("-[0-9]+$", "", save_path) == str(directory / "ckpt")
    assert manager.directory == str(directory)


def test_checkpoint_interval(tmp_path):
    step_counter = torch.tensor(0)
    manager = CheckpointManager(torchckpt.Checkpoint(v=torch.tensor(1.0)), tmp_path, max_to_keep=None,
                                step_counter=step_counter, checkpoint_interval=2)
    assert exists(manager.save(check_interval=True))
    step_counter += 1
    assert manager.save(check_interval=True) is None
    step_counter += 1
    assert exists(manager.save(check_interval=True))
    assert manager.save(check_interval=True) is None  # the same step is never saved twice
    step_counter += 1
    assert manager.save(check_interval=True) is None
    assert exists(manager.save(check_interval=False))
    assert exists(manager.save(check_interval=False))  # a final forced save always writes


def test_checkpoint_interval_with_restore(tmp_path):
    step_counter = torch.tensor(0)
    checkpoint = torchckpt.Checkpoint(v=torch.tensor(1.0), step_counter=step_counter)
    manager = CheckpointManager(checkpoint, tmp_path, max_to_keep=None, step_counter=step_counter, checkpoint_interval=2)
    path = manager.save(check_interval=True)
    assert exists(path)
    assert manager.restore_or_initialize() == path
    step_counter += 1
    assert manager.save(check_interval=True) is None
    step_counter += 1
    assert exists(manager.save(check_interval=True))


def test_interval_seeded_by_restore_in_a_new_manager(tmp_path):
    step_counter = torch.tensor(4)
    checkpoint = torchckpt.Checkpoint(step_counter=step_counter)
    CheckpointManager(checkpoint, tmp_path, step_counter=step_counter, checkpoint_interval=3).save()
    step2 = torch.tensor(0)
    manager = CheckpointManager(torchckpt.Checkpoint(step_counter=step2), tmp_path, step_counter=step2,
                                checkpoint_interval=3)
    manager.restore_or_initialize()
    assert step2.item() == 4
    step2 += 2
    assert manager.save() is None
    step2 += 1
    assert manager.save() is not None


@pytest.mark.parametrize(
    ("kwargs", "match"),
    [
        ({"max_to_keep": 0}, "positive integer or `None` for `max_to_keep`, got 0"),
        ({"max_to_keep": -1}, "got -1"),
        ({"checkpoint_interval": 2}, "`step_counter` should be passed"),
        ({"keep_best": 2}, "keep_best needs best_metric"),
        ({"keep_best": 1, "best_metric": "loss", "best_mode": "lowest"}, "best_mode must be"),
        ({"max_shard_size": "lots"}, "Cannot parse size"),
        ({"keep_checkpoint_every_n_hours": "2"}, "keep_checkpoint_every_n_hours must be a number of hours, not "
                                                 "negative, or None; got '2'"),
        ({"keep_checkpoint_every_n_hours": -1.0}, "got -1.0"),
        ({"keep_checkpoint_every_n_hours": float("nan")}, "got nan"),
        ({"step_counter": 0, "checkpoint_interval": "10"}, "checkpoint_interval must be a number of steps"),
        ({"step_counter": 0, "checkpoint_interval": -5}, "got -5"),
    ],
)
def test_bad_arguments(tmp_path, kwargs, match):
    with pytest.raises(ValueError, match=match):
        CheckpointManager(ckpt(), tmp_path, **kwargs)
    assert not os.listdir(tmp_path)


def test_a_best_metric_that_cannot_rank_a_save_warns_and_retention_goes_on(tmp_path):
    manager = CheckpointManager(ckpt(), tmp_path, max_to_keep=1, keep_best=1,
                                best_metric=lambda m: m["correct"] / m["total"], best_mode="max")
    manager.save(metrics={"correct": 1, "total": 2})
    with pytest.warns(UserWarning, match=r"best_metric cannot rank the metrics passed to save\(\) \(ZeroDivisionError: "
                                         r"division by zero\)"):
        manager.save(metrics={"correct": 0, "total": 0})  # an empty validation batch
    manager.save(metrics={"correct": 1, "total": 4})
    assert manager.best_checkpoint.endswith("ckpt-1")
    assert [os.path.basename(p) for p in manager.checkpoints] == ["ckpt-1", "ckpt-3"]
    assert not (tmp_path / "ckpt-2").exists()  # deleted by retention, as the save after it was kept last


def test_a_checkpoint_saved_again_under_a_damaged_ones_name_is_intact_and_may_be_best(tmp_path):
    options = {"max_to_keep": 2, "keep_best": 1, "best_metric": "loss"}
    checkpoint = ckpt()
    manager = CheckpointManager(checkpoint, tmp_path, **options)
    for step, loss in ((100, 0.5), (200, 0.4), (300, 0.3)):
        checkpoint.v.fill_(step)  # another shard each time (an unchanged one would be shared by hard links)
        manager.save(checkpoint_number=step, metrics={"loss": loss})
    manager.close()
    shard = next((tmp_path / "ckpt-300").glob("*.safetensors"))
    shard.write_bytes(shard.read_bytes()[:-1])  # truncated: the resume falls back to ckpt-200
    manager = CheckpointManager(ckpt(), tmp_path, **options)
    with pytest.warns(torchckpt.DamagedCheckpointWarning):
        assert manager.restore_or_initialize().endswith("ckpt-200")
    manager.save(checkpoint_number=300, metrics={"loss": 0.1})  # step 300 done again, intact
    assert manager.best_checkpoint.endswith("ckpt-300")
    assert not torchckpt.get_checkpoint_state(tmp_path).damaged
    manager.save(checkpoint_number=400, metrics={"loss": 0.2})
    manager.save(checkpoint_number=500, metrics={"loss": 0.3})
    assert (tmp_path / "ckpt-300").is_dir() and manager.best_checkpoint.endswith("ckpt-300")


def test_a_checkpoint_is_not_a_managers_directory(tmp_path):
    """A manager given a checkpoint (ckpt-7 for its parent) wrote its run inside it, and the
    checkpoint's next replacement (a save replaces a checkpoint whole) took the run with it."""
    with CheckpointManager(ckpt(), tmp_path) as manager:
        saved = manager.save()
    for directory in (saved, torchckpt.save_state({"w": torch.ones(1)}, tmp_path / "plain")):
        with pytest.raises(torchckpt.CheckpointError, match=rf"{re.escape(directory)} is a checkpoint, not a directory "
                           "of checkpoints: pass the directory a manager writes into"):
            CheckpointManager(ckpt(), directory)
        assert sorted(os.listdir(directory)) == ["index.json", "model-00001-of-00001.safetensors"]


def test_an_explicit_number_replaces_only_a_checkpoint(tmp_path):
    (tmp_path / "ckpt-1000").mkdir()
    (tmp_path / "ckpt-1000" / "eval_predictions.csv").write_text("id,label\n")
    (tmp_path / "ckpt-2000").write_text("notes")
    manager = CheckpointManager(ckpt(), tmp_path)
    for number, kind in ((1000, r"a folder of other files \(eval_predictions\.csv\)"), (2000, "a file or a link")):
        with pytest.raises(torchckpt.CheckpointWriteError, match=rf"ckpt-{number} is {kind}, not a checkpoint, so "
                           rf"save\(checkpoint_number={number}\) did not replace it and nothing was written") as info:
            manager.save(checkpoint_number=number)
        assert info.value.errno == errno.EEXIST and info.value.path.endswith(f"ckpt-{number}")
    assert (tmp_path / "ckpt-1000" / "eval_predictions.csv").read_text() == "id,label\n"
    assert (tmp_path / "ckpt-2000").read_text() == "notes" and manager.latest_checkpoint is None
    saved = manager.save(checkpoint_number=7)
    (pathlib.Path(saved) / spec.INDEX_FILE).unlink()  # a replacement that stopped after deleting the index
    assert manager.save(checkpoint_number=7) == saved and torchckpt.load_checkpoint(saved).names


REFUSED_CHARS = (", which names may not hold: a control, a line break, a private-use or unassigned code point, or a "
                 "character that reorders or hides text")


@pytest.mark.parametrize(("name", "why"), [
    ("", "a non-empty str is needed"), (7, "a non-empty str is needed"),
    ("a/b", "it holds the path separator '/' (pass the directory as the manager's directory)"),
    ("a\\b", "it holds the path separator '\\\\' (pass the directory as the manager's directory)"),
    (".hidden", "a name that starts with '.' is hidden"),
    ("run.torchckpt-tmp", "it ends in the mark of a writer's temporary names"),
    ("run.torchckpt-old-7", "it ends in the mark of a writer's temporary names"),
    ("a\tb", "it holds '\\t' (a control character)" + REFUSED_CHARS),
    ("a\u2028b", "it holds '\\u2028' (line separator)" + REFUSED_CHARS),
    ("run\u202egpj", "it holds '\\u202e' (right-to-left override)" + REFUSED_CHARS),
    ("a\u200bb", "it holds '\\u200b' (zero width space)" + REFUSED_CHARS),
    ("a\ue000b", "it holds '\\ue000' (a private-use character)" + REFUSED_CHARS),
    ("é" * 81, "it is 162 bytes long, past 160"),
], ids=["empty", "not-a-str", "separator", "backslash", "hidden", "temporary-marker", "removal-marker", "tab",
        "line-separator", "right-to-left-override", "zero-width-space", "private-use", "too-long"])
def test_a_checkpoint_name_that_is_no_plain_name_is_refused_with_the_reason(tmp_path, name, why):
    """probe60-62: before, a name ending in a writer's marker passed (its numbered checkpoints
    counted as temporaries: every save dropped the others from the history), an unprintable one
    made the manager's own state file unreadable, and a long one failed only at the first save."""
    with pytest.raises(ValueError, match="checkpoint_name must be a plain name") as caught:
        CheckpointManager(ckpt(), tmp_path, checkpoint_name=name)
    assert str(caught.value).endswith(f": {why}.")
    assert os.listdir(tmp_path) == []


@pytest.mark.parametrize("name", ["my run", "v1.2", "modèle", "模型", "🚀", "é" * 80, "مدل\u200cنهایی",
                                  "क्\u200dष", "run\u00a01", "モデル\u3000二"],
                         ids=["space", "dots", "accent", "cjk", "emoji", "long", "zero-width-non-joiner",
                              "zero-width-joiner", "no-break-space", "ideographic-space"])
def test_plain_checkpoint_names_work_across_a_restart(tmp_path, name):
    """probe62 #4: names of Persian and Indic text (zero-width joiners inside words) and with a
    no-break or ideographic space were refused, as the state file held printable names only."""
    with CheckpointManager(ckpt(), tmp_path, checkpoint_name=name) as manager:
        manager.save()
    with CheckpointManager(ckpt(), tmp_path, checkpoint_name=name) as manager:
        assert manager.latest_checkpoint == str(tmp_path / f"{name}-1") and manager.save().endswith(f"{name}-2")


def test_checkpoints_iterator_empty_single_and_fspath(tmp_path):
    assert list(torchckpt.checkpoints_iterator(tmp_path / "none", timeout=0)) == []
    CheckpointManager(ckpt(), tmp_path / "one").save()
    assert len(list(torchckpt.checkpoints_iterator(str(tmp_path / "one"), timeout=0))) == 1
    assert len(list(torchckpt.checkpoints_iterator(pathlib.Path(tmp_path / "one"), timeout=0))) == 1


def test_checkpoints_iterator_timeout_fn_calls():
    calls = [0]

    def timeout_fn():
        calls[0] += 1
        return calls[0] > 3

    start = time.monotonic()
    assert list(torchckpt.checkpoints_iterator("/non-existent-dir", timeout=0.1, timeout_fn=timeout_fn)) == []
    assert calls[0] == 4
    assert time.monotonic() - start >= 0.4  # each timeout waited out, though shorter than the 1 s poll: no spinning


def test_a_follower_whose_last_checkpoint_was_deleted_waits_for_the_next_one(tmp_path):
    """probe58 R5: before, it yielded ckpt-2, older than the ckpt-3 it had, as if new."""
    with CheckpointManager(ckpt(), tmp_path, max_to_keep=None) as manager:
        for _ in range(3):
            manager.save()
        last = str(tmp_path / "ckpt-3")
        assert torchckpt.wait_for_new_checkpoint(tmp_path, timeout=0) == last
        shutil.rmtree(last)
        assert torchckpt.latest_checkpoint(tmp_path) == str(tmp_path / "ckpt-2")
        assert torchckpt.wait_for_new_checkpoint(tmp_path, last, timeout=0) is None  # nothing newer than ckpt-3
        assert manager.save() == torchckpt.wait_for_new_checkpoint(tmp_path, last, timeout=0) == str(tmp_path / "ckpt-4")


def test_a_follower_of_a_run_numbered_by_step_and_restarted_from_an_older_step_is_not_sent_back(tmp_path):
    """probe60 #8: the run saved steps 100 and 200, restarted from 100 and saved 150; with ckpt-150
    deleted by hand, the follower was handed ckpt-200, written before it, as new (its number is
    higher). It waits for the run's next checkpoint instead."""
    with CheckpointManager(ckpt(), tmp_path, max_to_keep=5) as manager:
        for step in (100, 200, 150):
            manager.save(checkpoint_number=step)
        last = str(tmp_path / "ckpt-150")
        assert torchckpt.wait_for_new_checkpoint(tmp_path, timeout=0) == last
        shutil.rmtree(last)
        assert torchckpt.wait_for_new_checkpoint(tmp_path, last, timeout=0) is None
        assert manager.save(checkpoint_number=160) == torchckpt.wait_for_new_checkpoint(tmp_path, last, timeout=0)


def test_iterator_ignores_uncommitted_directories(tmp_path):
    (tmp_path / f"ckpt-9{spec.TMP_MARKER}123-abc").mkdir()
    (tmp_path / "ckpt-8").mkdir()  # no index.json: not committed
    assert list(torchckpt.checkpoints_iterator(tmp_path, timeout=0)) == []
    assert torchckpt.latest_checkpoint(tmp_path) is None


# -- beyond TensorFlow ----------------------------------------------------------------------


@pytest.mark.parametrize(
    ("max_to_keep", "hours", "keep_best", "metrics", "kept", "deleted", "preserved"),
    [
        (2, None, None, [None] * 4, [3, 4], [1, 2], []),
        (5, None, None, [None] * 3, [1, 2, 3], [], []),
        (None, None, None, [None] * 4, [1, 2, 3, 4], [], []),
        (1, 1.5, None, [None] * 4, [4], [1, 3], [2]),
        (2, None, 1, [0.5, 0.1, 0.9, 0.8], [2, 3, 4], [1], []),
        (1, None, 2, [0.5, 0.1, 0.9, 0.8], [1, 2, 4], [3], []),
        (1, None, 1, [None, None, 0.3, None], [3, 4], [1, 2], []),
        (1, None, 1, [float("nan"), 0.2, None, None], [2, 4], [1, 3], []),
    ],
    ids=["last-2", "fewer-than-max", "keep-all", "every-hour", "best-1", "best-2", "best-among-some", "nan-is-not-best"],
)
def test_retention_table(max_to_keep, hours, keep_best, metrics, kept, deleted, preserved):
    entries = [Entry(f"ckpt-{i}", 3600.0 * i, None if m is None else {"loss": m}) for i, m in enumerate(metrics, 1)]
    plan = retention.plan_retention(entries, max_to_keep, hours, 0.0, keep_best, "loss", "min")
    assert [e.name for e in plan.kept] == [f"ckpt-{i}" for i in kept]
    assert [e.name for e in plan.delete] == [f"ckpt-{i}" for i in deleted]
    assert [e.name for e in plan.preserve] == [f"ckpt-{i}" for i in preserved]


def test_keep_best_metrics_persist_and_resume(tmp_path):
    checkpoint = ckpt()
    manager = CheckpointManager(checkpoint, tmp_path, max_to_keep=2, keep_best=1, best_metric="val_loss")
    paths = [manager.save(metrics={"val_loss": loss, "epoch": i}) for i, loss in enumerate([0.9, 0.2, 0.5, 0.7, 0.6])]
    assert manager.best_checkpoint == paths[1]
    assert manager.checkpoints == [paths[1], paths[3], paths[4]]
    assert manager.metrics_of(paths[1]) == {"val_loss": 0.2, "epoch": 1}
    resumed = CheckpointManager(ckpt(), tmp_path, max_to_keep=2, keep_best=1, best_metric="val_loss")
    assert resumed.best_checkpoint == paths[1] and resumed.checkpoints == manager.checkpoints
    later = resumed.save(metrics={"val_loss": 0.1})
    assert resumed.best_checkpoint == later and not exists(paths[1])
    reader = torchckpt.Checkpoint(v=torch.tensor(0.0))
    reader.restore(later).assert_consumed()


def test_keep_best_with_a_callable_and_max_mode(tmp_path):
    manager = CheckpointManager(ckpt(), tmp_path, max_to_keep=1, keep_best=1,
                                best_metric=lambda m: m["acc"] * 2, best_mode="max")
    a = manager.save(metrics={"acc": 0.8})
    manager.save(metrics={"acc": 0.3})
    manager.save(metrics={"acc": 0.5})
    assert manager.best_checkpoint == a and exists(a)


def test_damaged_state_file_is_rebuilt_with_a_warning(tmp_path):
    manager = CheckpointManager(ckpt(), tmp_path, max_to_keep=3)
    paths = [manager.save() for _ in range(3)]
    (tmp_path / "checkpoints.json").write_text("{ this is not json")
    with pytest.warns(UserWarning, match="damaged.*rebuilt from the 3 committed checkpoints.*latest: ckpt-3"):
        fresh = CheckpointManager(ckpt(), tmp_path, max_to_keep=1)
    assert fresh.latest_checkpoint == paths[-1]
    new = fresh.save()
    assert new.endswith("ckpt-4")
    fresh.save()
    assert all(exists(p) for p in paths)  # it never deletes what it did not know it managed


@pytest.mark.parametrize("lost", ["missing", "damaged"])
def test_a_plain_save_into_a_run_that_lost_its_state_file_lets_no_manager_delete_its_checkpoints(tmp_path, lost):
    """probe80 F1: Checkpoint.save wrote a fresh state file over the lost history, and the next
    manager took the run's checkpoints for commits of its own it had not recorded: it deleted them."""
    manager = CheckpointManager(ckpt(), tmp_path, max_to_keep=10)
    paths = [manager.save() for _ in range(4)]
    manager.close()
    if lost == "missing":
        os.remove(tmp_path / "checkpoints.json")
    else:
        (tmp_path / "checkpoints.json").write_text("{ this is not json")
    manual = torchckpt.Checkpoint(w=torch.ones(2)).save(tmp_path / "manual")
    fresh = CheckpointManager(ckpt(), tmp_path, max_to_keep=1)
    assert fresh.latest_checkpoint == manual
    later = [fresh.save() for _ in range(2)]
    assert all(exists(p) for p in [*paths, manual, later[-1]]) and not exists(later[0])  # its own: managed
    assert fresh.checkpoints == [later[-1]]


def test_a_save_that_wrote_nothing_does_not_use_up_the_interval(tmp_path):
    """probe80 F3: the step was recorded before the write: after a refused save, the retry at the
    same step returned None, and so did every save until the interval had passed again."""
    step = torch.tensor(10)
    checkpoint = torchckpt.Checkpoint(w=torch.zeros(1), cfg=lambda: 0)  # a value no checkpoint stores
    manager = CheckpointManager(checkpoint, tmp_path, step_counter=step, checkpoint_interval=5)
    with pytest.raises(torchckpt.UnsupportedStateError, match="cfg"):
        manager.save()
    checkpoint.cfg = 0
    first = manager.save()  # the same step: saved now
    assert first is not None and manager.checkpoints == [first]
    step += 4
    assert manager.save() is None  # the interval counts from the save that was written
    step += 1
    assert manager.save() is not None


def test_the_state_view_lists_every_checkpoint_oldest_first_not_by_number(tmp_path):
    """probe80 F5: get_checkpoint_state().all was in number order: a run numbered by step and
    restarted from an older step (or a number replaced) put the newest checkpoint in its middle."""
    manager = CheckpointManager(ckpt(), tmp_path, max_to_keep=None)
    for step in (100, 200, 300, 150):
        manager.save(checkpoint_number=step)
    manager.close()
    torchckpt.Checkpoint(w=torch.ones(1)).save(tmp_path / "plain")  # one the state file records no time for
    state = torchckpt.get_checkpoint_state(tmp_path)
    assert [os.path.basename(p) for p in state.all] == ["ckpt-100", "ckpt-200", "ckpt-300", "ckpt-150", "plain-1"]
    assert state.kept == state.all[:4] and state.latest == state.all[-1]


def test_missing_state_file_is_rebuilt_with_a_warning(tmp_path):
    manager = CheckpointManager(ckpt(), tmp_path, max_to_keep=3)
    manager.save()
    last = manager.save()
    os.remove(tmp_path / "checkpoints.json")
    with pytest.warns(UserWarning, match="there is no state file"):
        fresh = CheckpointManager(ckpt(), tmp_path)
    assert fresh.latest_checkpoint == last


def test_stale_temporaries_are_removed_when_a_manager_starts(tmp_path):
    import subprocess
    import sys

    pid = int(subprocess.run([sys.executable, "-c", "import os; print(os.getpid())"], capture_output=True, text=True).stdout)
    stale = tmp_path / f"ckpt-3{spec.TMP_MARKER}{pid}-abcdef"
    stale.mkdir()
    (stale / "index.json").write_text("{}")
    foreign = tmp_path / "notes-1"
    foreign.mkdir()
    CheckpointManager(ckpt(), tmp_path)
    assert not stale.exists() and foreign.exists()


def test_deletion_happens_after_commit(tmp_path, disk):
    manager = CheckpointManager(ckpt(), tmp_path, max_to_keep=1)
    first = manager.save()
    disk.fail("stage", OSError(28, "No space left on device"))
    with pytest.raises(OSError, match="no space left on the device"):
        manager.save()
    assert not disk.called("delete_checkpoint")
    assert exists(first) and manager.checkpoints == [first] and manager.latest_checkpoint == first


def test_two_managers_in_one_process_keep_working(tmp_path):
    a = CheckpointManager(ckpt(), tmp_path, max_to_keep=2)
    b = CheckpointManager(ckpt(), tmp_path, max_to_keep=2)
    a.save()
    assert b.save() is not None


def test_state_file_names_are_relative(tmp_path):
    manager = CheckpointManager(ckpt(), tmp_path)
    manager.save()
    state = state_of(tmp_path)
    assert state["latest"] == "ckpt-1" and state["checkpoints"][0]["name"] == "ckpt-1"
    assert history_state.read_state(str(tmp_path), LOCAL).latest == "ckpt-1"


def test_a_state_file_that_cannot_be_written_is_a_write_error_saying_the_checkpoint_is_committed(tmp_path):
    (tmp_path / "checkpoints.json").mkdir()  # the state file's name taken: its replacement fails
    with pytest.warns(UserWarning, match="the state file is damaged"):
        manager = CheckpointManager(ckpt(), tmp_path, max_to_keep=2)
    message = (r"Checkpoint .*ckpt-1 is committed, but the directory's state file .*checkpoints.json could not be "
               r"written \(a directory has its name: move it away\), so the history does not name it yet")
    with pytest.raises(torchckpt.CheckpointWriteError, match=message) as info:
        manager.save()
    assert info.value.path == str(tmp_path) and info.value.errno is not None
    torchckpt.Checkpoint(v=torch.tensor(0.0)).restore(tmp_path / "ckpt-1").assert_consumed()
    (tmp_path / "plain" / "checkpoints.json").mkdir(parents=True)
    with pytest.raises(torchckpt.CheckpointWriteError, match=message):  # Checkpoint.save records its latest too
        torchckpt.Checkpoint(v=torch.tensor(1.0)).save(tmp_path / "plain" / "ckpt")
    assert exists(str(tmp_path / "plain" / "ckpt-1"))
    (tmp_path / "checkpoints.json").rmdir()
    second = manager.save()  # the next save records both
    assert manager.checkpoints == [str(tmp_path / "ckpt-1"), second]
    assert [e["name"] for e in state_of(tmp_path)["checkpoints"]] == ["ckpt-1", "ckpt-2"]


@pytest.mark.parametrize("restart_before", [None, 6], ids=["one-manager", "restarted"])
def test_keep_best_with_hourly_preservation_keeps_its_best_across_a_restart(tmp_path, fake_time, restart_before):
    # the best is older than the last checkpoint preserved hourly: a new manager must still rank it
    options = dict(max_to_keep=1, keep_best=1, best_metric="loss", keep_checkpoint_every_n_hours=1.0)
    manager = CheckpointManager(ckpt(), tmp_path, **options)
    for number, loss in enumerate([0.1, 0.9, 0.8, 0.7, 0.6, 0.5, 0.4], 1):
        if number == restart_before:
            manager.close()
            manager = CheckpointManager(ckpt(), tmp_path, **options)
        fake_time.now += 1000.0
        manager.save(metrics={"loss": loss})
    state = torchckpt.get_checkpoint_state(tmp_path)
    assert os.path.basename(manager.best_checkpoint) == os.path.basename(state.best) == "ckpt-1"
    assert [os.path.basename(p) for p in manager.checkpoints] == ["ckpt-1", "ckpt-7"]
    assert [os.path.basename(p) for p in state.preserved] == ["ckpt-4"]
    assert sorted(n for n in os.listdir(tmp_path) if n.startswith("ckpt")) == ["ckpt-1", "ckpt-4", "ckpt-7"]


def test_a_copy_whose_name_ends_in_a_line_break_is_no_member(tmp_path):
    # "ckpt-9\n" is not checkpoint 9: adopted, it was written into a state file the next manager
    # read as damaged (the run's history lost, every checkpoint preserved forever)
    manager = CheckpointManager(ckpt(), tmp_path, max_to_keep=None)
    first = manager.save()
    manager.close()
    shutil.copytree(first, tmp_path / "ckpt-9\n")
    manager = CheckpointManager(ckpt(), tmp_path, max_to_keep=None)
    assert manager.save() == str(tmp_path / "ckpt-2")  # numbered after its own, not after the copy
    manager.close()
    with warnings.catch_warnings():
        warnings.simplefilter("error")  # no "damaged state file" rebuild
        again = CheckpointManager(ckpt(), tmp_path, max_to_keep=None)
    assert [os.path.basename(p) for p in again.checkpoints] == ["ckpt-1", "ckpt-2"]
    assert (tmp_path / "ckpt-9\n").is_dir()  # not ours: left alone


def test_a_best_checkpoint_preserved_by_a_rebuilt_history_is_still_best(tmp_path, fake_time, capsys):
    # killed between the first commit and the first state write: relaunched later, the manager keeps
    # that checkpoint forever (its history is in doubt); it is still the run's best, everywhere
    from torchckpt.cli import main

    options = dict(max_to_keep=1, keep_best=1, best_metric="val_loss")
    CheckpointManager(ckpt(), tmp_path, **options).save(metrics={"val_loss": 0.1})
    os.remove(tmp_path / "checkpoints.json")
    fake_time.now += 3600.0
    with pytest.warns(UserWarning, match="there is no state file.*They are kept and will never be deleted"):
        manager = CheckpointManager(ckpt(), tmp_path, **options)
    for loss in (0.9, 0.8, 0.7):
        fake_time.now += 10.0
        manager.save(metrics={"val_loss": loss})
    state = torchckpt.get_checkpoint_state(tmp_path)
    assert os.path.basename(manager.best_checkpoint) == os.path.basename(state.best) == "ckpt-1"
    assert [os.path.basename(p) for p in state.preserved] == ["ckpt-1"]
    assert sorted(n for n in os.listdir(tmp_path) if n.startswith("ckpt")) == ["ckpt-1", "ckpt-4"]
    assert main(["ls", str(tmp_path), "--json"]) == 0
    rows = {r["name"]: r for r in json.loads(capsys.readouterr().out)["checkpoints"]}
    assert "best" in rows["ckpt-1"]["marks"] and "best" not in rows["ckpt-4"]["marks"]
    shutil.rmtree(tmp_path / "ckpt-1")  # deleted by hand: the readers of the disk name the best of what is left
    assert os.path.basename(torchckpt.get_checkpoint_state(tmp_path).best) == "ckpt-4"
    assert main(["ls", str(tmp_path), "--json"]) == 0
    rows = {r["name"]: r for r in json.loads(capsys.readouterr().out)["checkpoints"]}
    assert "best" in rows["ckpt-4"]["marks"]


def test_a_best_checkpoint_deleted_by_hand_no_longer_holds_its_place(tmp_path):
    """Before, the next manager kept the deleted ckpt-1 in its history as the best: `best_checkpoint`
    named a missing path, and the next save deleted ckpt-3, the best that existed."""
    options = dict(max_to_keep=1, keep_best=1, best_metric="loss")
    with CheckpointManager(ckpt(), tmp_path, **options) as manager:
        for loss in (1.0, 5.0, 6.0):
            manager.save(metrics={"loss": loss})
    shutil.rmtree(tmp_path / "ckpt-1")
    with pytest.warns(UserWarning, match=r"names ckpt-1, which is not a committed checkpoint there \(deleted, its "
                                         r"index\.json gone .* symbolic link, .*\): dropped from the history"), \
            CheckpointManager(ckpt(), tmp_path, **options) as manager:
        assert [os.path.basename(p) for p in manager.checkpoints] == ["ckpt-3"]
        assert manager.best_checkpoint == str(tmp_path / "ckpt-3")
        manager.save(metrics={"loss": 7.0})
        assert [os.path.basename(p) for p in manager.checkpoints] == ["ckpt-3", "ckpt-4"]
        assert manager.best_checkpoint == str(tmp_path / "ckpt-3")
    assert sorted(n for n in os.listdir(tmp_path) if n.startswith("ckpt")) == ["ckpt-3", "ckpt-4"]


def test_a_best_checkpoint_whose_shards_are_gone_does_not_cost_an_intact_one(tmp_path):
    """probe58 R2: the shards of ckpt-2, the best, deleted by hand (an `rm -rf` cut short) and its
    index left: before, the next save deleted ckpt-3, the best intact one, to keep ckpt-2."""
    options = dict(max_to_keep=2, keep_best=1, best_metric="loss")
    with CheckpointManager(ckpt(), tmp_path, **options) as manager:
        for loss in (0.5, 0.1, 0.15, 0.4):
            manager.save(metrics={"loss": loss})
    for shard in (tmp_path / "ckpt-2").glob("*.safetensors"):
        shard.unlink()
    with CheckpointManager(ckpt(), tmp_path, **options) as manager:
        with pytest.warns(UserWarning, match=r"ckpt-2 is damaged \(shard model-00001-of-00001\.safetensors listed in "
                                             r"index\.json is missing\): it is no longer ranked for keep_best"), \
                pytest.warns(UserWarning, match=r"ckpt-2 was not deleted: it looked damaged as retention ran"):
            manager.save(metrics={"loss": 0.6})  # left for a look: found so by a listing, not a read
        assert manager.best_checkpoint == str(tmp_path / "ckpt-3")
    assert sorted(n for n in os.listdir(tmp_path) if n.startswith("ckpt")) == ["ckpt-2", "ckpt-3", "ckpt-4", "ckpt-5"]
    assert torchckpt.get_checkpoint_state(tmp_path).best == str(tmp_path / "ckpt-3")


@pytest.mark.parametrize("replacement", ["link", "file"])
def test_a_best_checkpoint_replaced_by_a_link_or_a_file_is_never_followed_nor_deleted(tmp_path, replacement):
    """probe62: the running manager read the best's index through a link (and took a file in its
    place for a store that did not answer), kept it best, and deleted ckpt-4, the best real one."""
    options = dict(max_to_keep=2, keep_best=1, best_metric="loss")
    run, elsewhere = tmp_path / "run", tmp_path / "elsewhere"
    elsewhere.mkdir()
    with CheckpointManager(ckpt(), run, **options) as manager:
        for loss in (0.5, 0.1, 0.3):
            manager.save(metrics={"loss": loss})
        shutil.move(run / "ckpt-2", elsewhere / "ckpt-2")
        if replacement == "link":
            os.symlink(elsewhere / "ckpt-2", run / "ckpt-2")
        else:
            (run / "ckpt-2").write_text("an archive of it")
        with pytest.warns(UserWarning) as caught:
            for loss in (0.2, 0.6, 0.7):
                manager.save(metrics={"loss": loss})
        assert manager.best_checkpoint == str(run / "ckpt-4")
    messages = [str(w.message) for w in caught]
    assert any(m.startswith(f"{run}/ckpt-2 is damaged (it is no longer a committed checkpoint: its index.json is "
                            "gone, or a file or a link is in its place)") for m in messages), messages
    assert sorted(n for n in os.listdir(run) if n.startswith("ckpt")) == ["ckpt-2", "ckpt-4", "ckpt-5", "ckpt-6"]
    assert (elsewhere / "ckpt-2" / spec.INDEX_FILE).exists()


@pytest.mark.parametrize("async_save", [False, True], ids=["sync", "async"])
def test_a_checkpoint_deleted_by_hand_during_the_run_no_longer_holds_its_place(tmp_path, async_save):
    """probe58 R1: before, the running manager kept the deleted ckpt-2 in its history, and the next
    save deleted ckpt-1, leaving two checkpoints where max_to_keep=3 asked for three."""
    with CheckpointManager(ckpt(), tmp_path, max_to_keep=3, async_save=async_save) as manager:
        for _ in range(3):
            manager.save()
        manager.wait_until_finished()
        shutil.rmtree(tmp_path / "ckpt-2")
        with pytest.warns(UserWarning, match=r"ckpt-2 is gone \(deleted by hand, or by another tool\): dropped from the "
                                             r"history of "):
            manager.save()
            manager.wait_until_finished()
        assert [os.path.basename(p) for p in manager.checkpoints] == ["ckpt-1", "ckpt-3", "ckpt-4"]
    assert sorted(n for n in os.listdir(tmp_path) if n.startswith("ckpt")) == ["ckpt-1", "ckpt-3", "ckpt-4"]


def test_the_number_of_the_latest_deleted_by_hand_is_not_given_again_after_a_restart(tmp_path):
    """probe60 #5: the number was kept from reuse only by the manager that dropped the checkpoint;
    the state file it wrote no longer named it, and a restarted run wrote a new ckpt-4 where a
    follower had yielded the deleted one, so the follower never saw it (the same path)."""
    with CheckpointManager(ckpt(), tmp_path, max_to_keep=2) as manager:
        for _ in range(4):
            manager.save()
        followed = manager.latest_checkpoint
        shutil.rmtree(followed)
        with pytest.warns(UserWarning, match=r"ckpt-4 is gone \(deleted by hand"):
            manager.save(checkpoint_number=2)  # retention deletes: the record drops ckpt-4
    assert state_of(tmp_path)["gone"] == ["ckpt-4"]
    assert sorted(n for n in os.listdir(tmp_path) if n.startswith("ckpt")) == ["ckpt-2", "ckpt-3"]
    with CheckpointManager(ckpt(), tmp_path, max_to_keep=2) as manager:  # a fresh Checkpoint: save_counter 0
        assert manager.save() == str(tmp_path / "ckpt-5")
        assert torchckpt.run_state.wait_for_new_checkpoint(tmp_path, followed, 0.01, timeout=5) == str(
            tmp_path / "ckpt-5")
    assert "gone" not in state_of(tmp_path)  # ckpt-5, named there, carries the number past it now
    with CheckpointManager(ckpt(), tmp_path, max_to_keep=2) as manager:
        assert manager.save() == str(tmp_path / "ckpt-6")


def test_a_kept_checkpoint_whose_index_is_gone_is_never_best_and_never_silently_left(tmp_path):
    """probe60/61: dropped from the history as if gone, its folder stayed for good without a word;
    and the note promised a deletion that retention then refused."""
    options = dict(max_to_keep=2, keep_best=1, best_metric="loss")
    with CheckpointManager(ckpt(), tmp_path, **options) as manager:
        for loss in (0.5, 0.1, 0.3):
            manager.save(metrics={"loss": loss})
    (tmp_path / "ckpt-2" / spec.INDEX_FILE).unlink()  # the best
    with pytest.warns(UserWarning, match=r"names ckpt-2, which is not a committed checkpoint there .*: recorded "
                                         r"damaged: it is never best, and, as nothing says any more that this manager "
                                         r"wrote it, retention leaves it to be deleted by hand"), \
            CheckpointManager(ckpt(), tmp_path, **options) as manager:
        assert manager.best_checkpoint == str(tmp_path / "ckpt-3")
        with pytest.warns(UserWarning, match=r"ckpt-2 was not deleted: .*delete it by hand"):
            for loss in (0.9, 0.8):
                manager.save(metrics={"loss": loss})
        assert [os.path.basename(p) for p in manager.checkpoints] == ["ckpt-3", "ckpt-4", "ckpt-5"]
    assert sorted(n for n in os.listdir(tmp_path) if n.startswith("ckpt")) == ["ckpt-2", "ckpt-3", "ckpt-4", "ckpt-5"]


def test_warnings_as_errors_never_keep_a_committed_checkpoint_unrecorded(tmp_path):
    """probe60: the warning about a checkpoint deleted by hand was given before the state file was
    written; raised as an error, it left the committed ckpt-4 out of the history."""
    with CheckpointManager(ckpt(), tmp_path, max_to_keep=2) as manager:
        for _ in range(3):
            manager.save()
        shutil.rmtree(tmp_path / "ckpt-3")
        with warnings.catch_warnings():
            warnings.simplefilter("error")
            with pytest.raises(UserWarning, match="ckpt-3 is gone"):
                manager.save()
        assert [os.path.basename(p) for p in manager.checkpoints] == ["ckpt-2", "ckpt-4"]
    assert torchckpt.get_checkpoint_state(tmp_path).latest == str(tmp_path / "ckpt-4")


def test_the_number_of_a_latest_deleted_by_hand_is_not_given_to_another_checkpoint(tmp_path):
    """probe58 R4: a follower that read ckpt-3 before it was deleted would never see a new ckpt-3."""
    with CheckpointManager(ckpt(), tmp_path) as manager:
        for _ in range(3):
            manager.save()
    shutil.rmtree(tmp_path / "ckpt-3")
    with pytest.warns(UserWarning, match="names ckpt-3 as the latest checkpoint"), \
            CheckpointManager(ckpt(), tmp_path) as manager:
        assert manager.restore_or_initialize() == str(tmp_path / "ckpt-2")
        assert manager.save() == str(tmp_path / "ckpt-4")


def test_a_background_saves_timestamp_is_the_save_calls_time(tmp_path, fake_time):
    # API.md: read at call time; probe38 F3: an async save's was read once its write finished
    manager = CheckpointManager(torchckpt.Checkpoint(w=torch.randn(4 * 2**20)), tmp_path, async_save=True)
    fake_time.now = 1000.0
    manager.save()
    fake_time.now = 5000.0  # the 16 MiB write is still going on
    manager.wait_until_finished()
    manager.close()
    assert [c["timestamp"] for c in state_of(tmp_path)["checkpoints"]] == [1000.0]


def test_with_the_latest_deleted_by_hand_every_reader_takes_the_checkpoint_written_last(tmp_path):
    # probe38 F2: the manager took the highest number (ckpt-3), latest_checkpoint() the one written last
    x = torch.zeros(1)
    with CheckpointManager(torchckpt.Checkpoint(x=x), tmp_path, max_to_keep=5) as manager:
        for value in (1.0, 2.0, 3.0):
            x.fill_(value)
            manager.save()
        x.fill_(10.0)
        manager.save(checkpoint_number=1)  # ckpt-1 replaced: written after ckpt-3
        x.fill_(11.0)
        last = manager.save()
    shutil.rmtree(last)
    newest = str(tmp_path / "ckpt-1")
    assert torchckpt.latest_checkpoint(tmp_path) == torchckpt.get_checkpoint_state(tmp_path).latest == newest
    resumed = torch.zeros(1)
    with pytest.warns(UserWarning, match=r"names ckpt-5 as the latest checkpoint, but .* ckpt-1 is the latest now"), \
            CheckpointManager(torchckpt.Checkpoint(x=resumed), tmp_path, max_to_keep=5) as manager:
        assert manager.latest_checkpoint == newest
        assert manager.restore_or_initialize() == newest and float(resumed) == 10.0


def copied_run(tmp_path, saves: int = 11, replaced: dict[int, float] | None = None):
    """A run of ``saves`` saves (``x`` = the save's number; then each number of ``replaced`` saved
    again with its value) copied as ``cp -r run/ckpt-* copy/`` copies it (no state file), in the
    shell's glob order (ckpt-1, ckpt-10, ckpt-11, ckpt-2, ...), each copy's files given the time of
    the copy, one second after the one before, as ``cp -r``, ``gsutil cp -r`` and unzipping do: of
    11 saves, ckpt-9's index is the newest file. Returns the copy."""
    run, copy = tmp_path / "run", tmp_path / "copy"
    x = torch.zeros(1)
    with CheckpointManager(torchckpt.Checkpoint(x=x), run, max_to_keep=None) as manager:
        for value in range(1, saves + 1):
            x.fill_(value)
            manager.save()
        for number, value in (replaced or {}).items():
            x.fill_(value)
            manager.save(checkpoint_number=number)
    copy.mkdir()
    for i, name in enumerate(sorted(n for n in os.listdir(run) if n.startswith("ckpt-"))):
        shutil.copytree(run / name, copy / name)
        os.utime(copy / name / "index.json", (2_000_000_000 + i, 2_000_000_000 + i))
    return copy


def test_a_run_copied_without_its_state_file_resumes_from_its_newest_checkpoint(tmp_path, capsys):
    # probe58 R3: the newest was told by the index file's time, which a copy resets in the order it
    # copied: the copy resumed from ckpt-9, lost steps 10 and 11, and numbered its next save ckpt-12
    copy = copied_run(tmp_path)
    newest = str(copy / "ckpt-11")
    assert torchckpt.latest_checkpoint(copy) == newest
    assert torchckpt.cli.main(["ls", "--json", str(copy)]) == 0
    listed = json.loads(capsys.readouterr().out)["checkpoints"]
    assert [c["name"] for c in listed if "latest" in c["marks"]] == ["ckpt-11"]
    resumed = torch.zeros(1)
    with pytest.warns(UserWarning, match=r"there is no state file; rebuilt from the 11 committed checkpoints on disk "
                                         r"\(latest: ckpt-11\)"), \
            CheckpointManager(torchckpt.Checkpoint(x=resumed), copy, max_to_keep=None) as manager:
        assert manager.latest_checkpoint == newest
        assert manager.restore_or_initialize() == newest and float(resumed) == 11.0
        assert manager.save() == str(copy / "ckpt-12")


def test_a_run_copied_in_name_order_without_its_state_file_resumes_from_the_checkpoint_written_last(tmp_path):
    """probe64 F1: copied in name order, the newest file is the highest number (ckpt-5) although
    ckpt-3 was replaced after it; the files' times, with numbers to break ties, took ckpt-5."""
    copy = copied_run(tmp_path, saves=5, replaced={3: 30.0})  # in name order: ckpt-5's index is the newest file
    assert torchckpt.latest_checkpoint(copy) == str(copy / "ckpt-3")
    resumed = torch.zeros(1)
    with pytest.warns(UserWarning, match=r"latest: ckpt-3\)"), \
            CheckpointManager(torchckpt.Checkpoint(x=resumed), copy, max_to_keep=None) as manager:
        assert manager.restore_or_initialize() == str(copy / "ckpt-3") and float(resumed) == 30.0


def test_in_a_copied_run_an_index_read_that_failed_once_is_asked_again(tmp_path, disk):
    """probe63 F6: the failed read's answer (no recorded time) was kept for the process: every later
    call took the checkpoint copied last, and ``Checkpoint.restore`` of the directory restored step 9."""
    copy = copied_run(tmp_path)
    disk.fail("read_file", OSError(errno.EIO, "Input/output error"), times=1)
    torchckpt.latest_checkpoint(copy)  # whichever: one index could not be read this time
    assert torchckpt.latest_checkpoint(copy) == str(copy / "ckpt-11")
    x = torch.zeros(1)
    torchckpt.Checkpoint(x=x).restore(copy)
    assert float(x) == 11.0


def test_in_a_copied_run_a_damaged_index_copied_last_is_met_and_reported_then_the_newest_intact_restored(tmp_path):
    # an index that cannot be read has no recorded time: its file's time ranks it, so the restore
    # meets the damage, says so, and falls back to the newest intact checkpoint, not an older one
    # (a guard: the restore did this before the change too, when the index's time alone ranked)
    copy = copied_run(tmp_path)
    index = copy / "ckpt-9" / "index.json"
    stat = index.stat()
    index.write_bytes(index.read_bytes().replace(b'"format_version"', b'"format_versiox"'))
    os.utime(index, ns=(stat.st_atime_ns, stat.st_mtime_ns))
    assert torchckpt.latest_checkpoint(copy) == str(copy / "ckpt-9")  # as before: the damaged one, met below
    resumed = torch.zeros(1)
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        with CheckpointManager(torchckpt.Checkpoint(x=resumed), copy, max_to_keep=None) as manager:
            assert manager.restore_or_initialize() == str(copy / "ckpt-11") and float(resumed) == 11.0
    damaged = [w for w in caught if issubclass(w.category, torchckpt.DamagedCheckpointWarning)]
    assert len(damaged) == 1 and "ckpt-9" in str(damaged[0].message) and "ckpt-11" in str(damaged[0].message)


@pytest.mark.parametrize("restart_before", [None, 6], ids=["one-manager", "restarted"])
def test_a_clock_stepped_back_between_saves_keeps_the_last_saves_across_a_restart(tmp_path, fake_time, restart_before):
    manager = CheckpointManager(ckpt(), tmp_path, max_to_keep=3)
    for number, when in enumerate([1000.0, 1010.0, 1020.0, 1005.0, 1015.0, 1025.0], 1):  # back 15 s after the third
        if number == restart_before:
            manager.close()
            manager = CheckpointManager(ckpt(), tmp_path, max_to_keep=3)
        fake_time.now = when
        manager.save()
    assert [os.path.basename(p) for p in manager.checkpoints] == ["ckpt-4", "ckpt-5", "ckpt-6"]
    assert sorted(n for n in os.listdir(tmp_path) if n.startswith("ckpt")) == ["ckpt-4", "ckpt-5", "ckpt-6"]


@pytest.mark.parametrize(
    ("max_to_keep", "hours", "keep_best", "metrics", "damaged", "kept", "deleted", "preserved"),
    [
        (2, None, None, [None] * 4, {3}, [2, 3, 4], [1], []),
        (2, None, None, [None] * 5, {3}, [4, 5], [1, 2, 3], []),
        (1, 1.5, None, [None] * 4, {2}, [4], [1, 2], [3]),
        (1, None, 1, [0.5, 0.1, 0.9, 0.8], {2}, [1, 4], [2, 3], []),
        (2, None, None, [None] * 3, {1, 2, 3}, [1, 2, 3], [], []),
    ],
    ids=["damaged-among-the-last-intact", "damaged-older-than-them", "damaged-never-preserved",
         "damaged-never-best", "all-damaged-none-deleted"],
)
def test_retention_table_with_damaged_checkpoints(max_to_keep, hours, keep_best, metrics, damaged, kept, deleted,
                                                  preserved):
    # a checkpoint a restore passed over counts for nothing: the last max_to_keep are the last intact
    entries = [Entry(f"ckpt-{i}", 3600.0 * i, None if m is None else {"loss": m}) for i, m in enumerate(metrics, 1)]
    plan = retention.plan_retention(entries, max_to_keep, hours, 0.0, keep_best, "loss", "min",
                                    damaged={f"ckpt-{i}" for i in damaged})
    assert [e.name for e in plan.kept] == [f"ckpt-{i}" for i in kept]
    assert [e.name for e in plan.delete] == [f"ckpt-{i}" for i in deleted]
    assert [e.name for e in plan.preserve] == [f"ckpt-{i}" for i in preserved]


def test_a_manager_of_another_name_is_refused_where_one_keeps_its_history(tmp_path):
    generator = CheckpointManager(ckpt(), tmp_path, max_to_keep=2, checkpoint_name="gen")
    for _ in range(3):
        generator.save()
    generator.close()
    with pytest.raises(torchckpt.CheckpointError, match=r"holds the history of a CheckpointManager named 'gen' "
                       r"\(gen-2, gen-3\), not 'disc': one directory holds one manager's history") as info:
        CheckpointManager(ckpt(), tmp_path, checkpoint_name="disc")
    assert "Give each manager a directory of its own" in str(info.value)
    assert sorted(p.name for p in tmp_path.iterdir() if not p.name.startswith(".")) == ["checkpoints.json", "gen-2",
                                                                                         "gen-3"]
    again = CheckpointManager(ckpt(), tmp_path, max_to_keep=2, checkpoint_name="gen")  # the claim was released
    assert again.latest_checkpoint.endswith("gen-3")
    again.close()
    checkpoint = ckpt()
    checkpoint.save(tmp_path / "other" / "model")  # Checkpoint.save records model-1: no manager's, not refused
    CheckpointManager(ckpt(), tmp_path / "other").close()


def test_closing_one_of_two_managers_on_a_directory_keeps_the_claim_for_the_other(tmp_path):
    first = CheckpointManager(ckpt(), tmp_path)
    (tmp_path.parent / f"{tmp_path.name}-link").symlink_to(tmp_path, target_is_directory=True)
    # one process: the claim is shared (as TensorFlow's tests expect), also by a symbolic link (probe86 F2: the
    # count went by the path as spelled, and closing the first released the lock the second still needed)
    second = CheckpointManager(ckpt(), tmp_path.parent / f"{tmp_path.name}-link")
    first.close()
    other = subprocess.run([sys.executable, "-c", "import sys, torch, torchckpt; torchckpt.CheckpointManager("
                            "torchckpt.Checkpoint(w=torch.zeros(1)), sys.argv[1])", str(tmp_path)],
                           capture_output=True, text=True, timeout=120)
    assert other.returncode == 1 and "is managed by another live process" in other.stderr
    assert second.save() is not None
    second.close()  # the last one releases it
    other = subprocess.run([sys.executable, "-c", "import sys, torch, torchckpt; torchckpt.CheckpointManager("
                            "torchckpt.Checkpoint(w=torch.zeros(1)), sys.argv[1]).save()", str(tmp_path)],
                           capture_output=True, text=True, timeout=120)
    assert other.returncode == 0, other.stderr


def test_a_commit_the_state_file_never_recorded_is_adopted_by_the_next_manager(tmp_path, fake_time):
    """A crash between a checkpoint's commit and the state file's write (a SIGTERM save, say)
    leaves the state file naming the checkpoint before it. The next manager adopts the commit as
    its latest, also after the clock was set back (the recorded latest stamped in the future); the
    directory's readers go by the state file, as TensorFlow's do, until that manager's next save."""
    for set_back in (False, True):
        directory = tmp_path / f"set-back-{set_back}"
        fake_time.now = 10_000.0
        manager = CheckpointManager(ckpt(), directory, max_to_keep=None)
        paths = [manager.save()]
        fake_time.now += 60.0
        paths.append(manager.save())
        lagging = (directory / "checkpoints.json").read_bytes()
        fake_time.now += 60.0
        if set_back:
            fake_time.now = 5_000.0  # the last checkpoint is stamped before the recorded latest
        paths.append(manager.save())
        manager.close()
        (directory / "checkpoints.json").write_bytes(lagging)  # as after ckpt-2: ckpt-3 unrecorded
        (directory / "ckpt-9").mkdir()  # a folder that is not a checkpoint (no index.json) is never the latest
        assert torchckpt.latest_checkpoint(directory) == paths[1]
        again = CheckpointManager(ckpt(), directory)
        assert again.latest_checkpoint == paths[-1], set_back
        restored = again.save()
        assert torchckpt.latest_checkpoint(directory) == restored
        again.close()


def test_rollback_leftovers_and_retired_checkpoints_never_become_the_latest(tmp_path):
    """Numbered above the state file's latest but created before it: a rollback's abandoned
    checkpoints (``Checkpoint.save`` after restoring an older one) and a checkpoint retention was
    deleting when the process stopped. The record stands, for a new manager as for every reader."""
    checkpoint = torchckpt.Checkpoint(step=torch.tensor(0))
    for step in range(1, 6):
        checkpoint.step.fill_(step)
        checkpoint.save(str(tmp_path / "plain" / "ckpt"))
    checkpoint.restore(str(tmp_path / "plain" / "ckpt-2")).assert_consumed()
    checkpoint.step.fill_(1000)
    rolled = checkpoint.save(str(tmp_path / "plain" / "ckpt"))
    assert rolled.endswith("ckpt-3") and os.path.isdir(tmp_path / "plain" / "ckpt-5")
    assert torchckpt.latest_checkpoint(tmp_path / "plain") == rolled
    manager = CheckpointManager(torchckpt.Checkpoint(step=torch.tensor(0)), tmp_path / "plain")
    assert manager.latest_checkpoint == rolled
    manager.close()
    assert torchckpt.latest_checkpoint(tmp_path / "plain") == rolled
    manager = CheckpointManager(ckpt(), tmp_path / "managed", max_to_keep=1)
    high = manager.save(checkpoint_number=5)
    shutil.copytree(high, tmp_path / "copy")
    low = manager.save(checkpoint_number=3)  # records ckpt-3, then retention deletes ckpt-5
    manager.close()
    os.rename(tmp_path / "copy", high)  # as if the process had stopped before the deletion
    assert torchckpt.latest_checkpoint(tmp_path / "managed") == low
    manager = CheckpointManager(ckpt(), tmp_path / "managed", max_to_keep=1)
    assert manager.latest_checkpoint == low
    manager.close()


def test_a_checkpoint_saved_with_a_lower_number_after_a_higher_one_stays_the_latest(tmp_path):
    """Numbers are not times: when the state file records a higher number than its latest (an
    explicit ``checkpoint_number``), the recorded latest stands, as a new manager keeps it."""
    manager = CheckpointManager(ckpt(), tmp_path, max_to_keep=None)
    manager.save(checkpoint_number=10)
    low = manager.save(checkpoint_number=3)
    assert manager.latest_checkpoint == low
    assert torchckpt.latest_checkpoint(tmp_path) == low
    assert CheckpointManager(ckpt(), tmp_path).latest_checkpoint == low


def test_a_manager_used_as_a_context_manager_is_closed_when_the_block_ends(tmp_path):
    """The save in flight is durable and the directory released at the end of the block, and
    the block's exception is what propagates."""
    with CheckpointManager(ckpt(), tmp_path, async_save=True) as manager:
        path = manager.save()
    assert not LOCAL.holds(str(tmp_path)) and os.path.exists(os.path.join(path, spec.INDEX_FILE))
    with pytest.raises(KeyError, match="inside"), CheckpointManager(ckpt(), tmp_path) as again:
        again.save()
        raise KeyError("inside")
    assert not LOCAL.holds(str(tmp_path))
    assert torchckpt.latest_checkpoint(tmp_path).endswith("ckpt-2")


def test_numpy_numbers_are_taken_as_the_python_numbers_they_hold(tmp_path):
    """``np.int64`` from ``np.arange`` or a config, as TensorFlow's manager takes them; the state
    file records plain JSON numbers. A NumPy bool is still no count."""
    np = pytest.importorskip("numpy")
    step = torch.tensor(0)
    manager = CheckpointManager(ckpt(), tmp_path, max_to_keep=np.int64(2), keep_best=np.int32(1), best_metric="loss",
                                step_counter=step, checkpoint_interval=np.int64(5),
                                keep_checkpoint_every_n_hours=np.float32(1.5))
    paths = [manager.save(checkpoint_number=number, metrics={"loss": float(number)}, check_interval=False)
             for number in np.arange(1, 5)]
    assert [os.path.basename(p) for p in paths] == ["ckpt-1", "ckpt-2", "ckpt-3", "ckpt-4"]
    assert [os.path.basename(p) for p in manager.checkpoints] == ["ckpt-1", "ckpt-3", "ckpt-4"]  # 2 kept + the best
    step += 3
    assert manager.save() is None  # 3 steps of an interval of 5
    manager.close()
    assert json.loads((tmp_path / "checkpoints.json").read_text())["keep_best"] == 1
    with pytest.raises(ValueError, match="max_to_keep"):
        CheckpointManager(ckpt(), tmp_path / "b", max_to_keep=np.bool_(True))
    with pytest.raises(ValueError, match="checkpoint_number must be non-negative"):
        CheckpointManager(ckpt(), tmp_path / "c").save(checkpoint_number=np.int64(-1))


def test_numbers_past_what_save_counter_holds_are_neither_taken_nor_numbered_after(tmp_path):
    """probe63 F4: a number near 2**63 numbered every later save past what save_counter holds, and
    each restore called those checkpoints damaged; a manager's own state file holding one (a save
    numbered so) would be damaged at every open."""
    with CheckpointManager(ckpt(), tmp_path, max_to_keep=2) as manager:
        with pytest.raises(ValueError, match=r"checkpoint_number must be below 2\*\*62 .*got 4611686018427387904"):
            manager.save(checkpoint_number=2**62)
        assert not [n for n in os.listdir(tmp_path) if n.startswith("ckpt")]  # nothing written
        (tmp_path / f"ckpt-{2**63}").mkdir()  # put there by hand
        assert manager.save(checkpoint_number=2**62 - 1) == str(tmp_path / f"ckpt-{2**62 - 1}")
    with warnings.catch_warnings():
        warnings.simplefilter("error")  # its own state file is not damaged
        with CheckpointManager(ckpt(), tmp_path, max_to_keep=2) as manager:
            assert manager.latest_checkpoint == str(tmp_path / f"ckpt-{2**62 - 1}")
    shutil.rmtree(tmp_path / f"ckpt-{2**62 - 1}")
    os.remove(tmp_path / history_state.STATE_FILE)
    with CheckpointManager(ckpt(), tmp_path, max_to_keep=2) as manager:
        assert manager.save() == str(tmp_path / "ckpt-1")  # not numbered after the folder put there by hand


def test_a_partial_restore_or_initialize_warns_at_once_not_when_the_manager_is_dropped(tmp_path):
    """The manager keeps the status in ``last_restore``: its warning, if left to the status, would
    come at the end of the run. It comes from ``restore_or_initialize``, once."""
    CheckpointManager(torchckpt.Checkpoint(v=torch.tensor(1.0), extra=torch.ones(2)), tmp_path).save()
    manager = CheckpointManager(ckpt(), tmp_path)
    with pytest.warns(torchckpt.PartialRestoreWarning, match="unexpected in the checkpoint.*extra") as caught:
        manager.restore_or_initialize()
    assert caught[0].filename == __file__  # pointing at the caller's line
    # advice that still helps once the warning is given: expect_partial() would come too late
    assert "expect_partial" not in str(caught[0].message)
    assert re.search(r"restore_or_initialize\(strict=True\) makes this an error; to accept a partial restore, "
                     r"filter the warning", str(caught[0].message))
    assert manager.last_restore.report.unexpected_keys == ["extra"]
    with warnings.catch_warnings(record=True) as later:
        warnings.simplefilter("always")
        del manager
        gc.collect()
    assert not [w for w in later if issubclass(w.category, torchckpt.PartialRestoreWarning)]  # once


def test_a_partial_restore_warning_made_an_error_leaves_the_manager_as_restored(tmp_path):
    """Under ``-W error``, the warning is raised after the manager has taken in the restore: the
    step it resumed at is known, so a save at that step is still skipped by the interval."""
    step = torch.tensor(10)
    CheckpointManager(torchckpt.Checkpoint(v=torch.tensor(1.0), step=step, extra=torch.ones(2)), tmp_path,
                      step_counter=step, checkpoint_interval=5).save()
    step = torch.tensor(0)
    manager = CheckpointManager(torchckpt.Checkpoint(v=torch.tensor(0.0), step=step), tmp_path, step_counter=step,
                                checkpoint_interval=5)
    with warnings.catch_warnings():
        warnings.simplefilter("error", torchckpt.PartialRestoreWarning)
        with pytest.raises(torchckpt.PartialRestoreWarning):
            manager.restore_or_initialize()
    assert int(step) == 10 and manager.save() is None  # at the step it resumed at: nothing to write
    manager.close()


def test_a_newer_torchckpts_checkpoint_is_neither_fallen_back_past_nor_marked_damaged(tmp_path):
    """An older torchckpt meeting a newer format must say so and stop: falling back to the checkpoint
    before would resume steps back, and recording the latest damaged would outlast the upgrade."""
    from .conftest import read_index, write_index

    manager = CheckpointManager(ckpt(), tmp_path, max_to_keep=3)
    manager.save(), manager.save()
    manager.close()
    index = read_index(tmp_path / "ckpt-2")
    index["torchckpt"]["format_version"] = 99
    write_index(tmp_path / "ckpt-2", index)
    state_before = (tmp_path / history_state.STATE_FILE).read_bytes()
    manager = CheckpointManager(ckpt(), tmp_path, max_to_keep=3)
    with pytest.raises(torchckpt.UnsupportedFormatError, match="ckpt-2.*newer than this torchckpt"):
        manager.restore_or_initialize()
    manager.close()
    assert (tmp_path / history_state.STATE_FILE).read_bytes() == state_before  # nothing recorded damaged
    assert sorted(p.name for p in tmp_path.glob("ckpt-*")) == ["ckpt-1", "ckpt-2"]


def test_a_newer_torchckpts_state_file_is_neither_rebuilt_nor_overwritten(tmp_path):
    from .conftest import sealed_json

    manager = CheckpointManager(ckpt(), tmp_path, max_to_keep=2)
    manager.save(), manager.save()
    manager.close()
    state_file = tmp_path / history_state.STATE_FILE
    raw = json.loads(state_file.read_text())
    raw["version"] = 2
    state_file.write_bytes(sealed_json(raw))
    before = state_file.read_bytes()
    for attempt in (lambda: CheckpointManager(ckpt(), tmp_path, max_to_keep=2),
                    lambda: torchckpt.latest_checkpoint(tmp_path)):
        with pytest.raises(torchckpt.UnsupportedFormatError, match=r"state file of version 2, newer .* upgrade") as info:
            attempt()
        assert info.value.found == 2
    assert state_file.read_bytes() == before


@pytest.mark.parametrize(("record", "value", "why"), [
    ("gone", "ckpt-9", "bad 'gone' record"), ("gone", ["../ckpt-9"], "bad checkpoint name"),
    ("gone", ["ckpt-9"] * 17, "bad 'gone' record"), ("gone", [7], "bad checkpoint name"),
    ("gone", [f"ckpt-{2**63 - 1}"], "bad 'gone' record"), ("gone", ["ckpt-" + "9" * 5000], "bad 'gone' record"),
], ids=["gone-not-a-list", "gone-a-path", "gone-too-many", "gone-not-a-name", "gone-past-the-counter",
        "gone-5000-digits"])
def test_a_state_file_with_a_forged_record_is_damaged_and_rebuilt(tmp_path, record, value, why):
    """probe63 F4: a number past what save_counter holds sent every later save past it: saves the
    restores called damaged (save_counter out of range), or names too long to write."""
    from .conftest import sealed_json

    with CheckpointManager(ckpt(), tmp_path, max_to_keep=2) as manager:
        manager.save()
    state_file = tmp_path / history_state.STATE_FILE
    raw = json.loads(state_file.read_text())
    raw[record] = value
    state_file.write_bytes(sealed_json(raw))
    with pytest.warns(UserWarning, match=why), CheckpointManager(ckpt(), tmp_path, max_to_keep=2) as manager:
        assert manager.save() == str(tmp_path / "ckpt-2")


def test_names_numbered_past_the_counter_are_kept_never_numbered_after_and_never_damage_the_state_file(tmp_path):
    """probe63 F4 and probe64 F2: an entry numbered near 2**63 (forged, or a checkpoint named by a
    20-digit date) numbered every later save past what save_counter holds; refusing it made the
    manager's own rebuilt state file damaged at every open."""
    from .conftest import sealed_json

    torchckpt.Checkpoint(w=torch.zeros(1)).write(tmp_path / "snap-20261207124714123456")  # a date, in microseconds
    with CheckpointManager(ckpt(), tmp_path, max_to_keep=2) as manager:
        manager.save()
    state_file = tmp_path / history_state.STATE_FILE
    raw = json.loads(state_file.read_text())
    raw["checkpoints"].append({"name": f"ckpt-{2**63 - 1}"})  # forged, and not on disk
    state_file.write_bytes(sealed_json(raw))
    with pytest.warns(UserWarning, match=f"names ckpt-{2**63 - 1}, which is not a committed checkpoint there"), \
            CheckpointManager(ckpt(), tmp_path, max_to_keep=2) as manager:
        assert manager.save() == str(tmp_path / "ckpt-2")
    for _ in range(2):
        with warnings.catch_warnings():
            warnings.simplefilter("error", UserWarning)  # no rebuild at any open
            with CheckpointManager(ckpt(), tmp_path, max_to_keep=2) as manager:
                manager.save()
    assert sorted(n for n in os.listdir(tmp_path) if n.startswith("ckpt")) == ["ckpt-3", "ckpt-4"]
    assert (tmp_path / "snap-20261207124714123456").is_dir()


def test_a_checkpoint_saved_under_any_name_never_damages_the_state_file(tmp_path):
    """probe64 F3: Checkpoint.save under a prefix the manager refuses (a zero-width space) recorded
    a latest the state file's reader refused: every manager's open rebuilt it, keeping every
    checkpoint for good."""
    with CheckpointManager(ckpt(), tmp_path, max_to_keep=2) as manager:
        manager.save()
    torchckpt.Checkpoint(w=torch.zeros(1)).save(tmp_path / "exp\u200b")
    for _ in range(3):
        with warnings.catch_warnings():
            warnings.simplefilter("error", UserWarning)
            with CheckpointManager(ckpt(), tmp_path, max_to_keep=2) as manager:
                manager.save()
    assert sorted(n for n in os.listdir(tmp_path) if n.startswith("ckpt")) == ["ckpt-3", "ckpt-4"]
    assert torchckpt.get_checkpoint_state(tmp_path).latest == str(tmp_path / "ckpt-4")


def test_a_replacing_save_cut_short_after_its_commit_is_adopted_with_its_own_metrics(tmp_path, disk, fake_time):
    """save(checkpoint_number=n) of a recorded n, the process stopping between the commit and the
    state write: the next manager must rank the new checkpoint by its own metrics, not keep the
    replaced one's (keep_best then kept it as best and deleted the true best)."""
    def ranked():
        return CheckpointManager(ckpt(), tmp_path, max_to_keep=1, keep_best=1, best_metric="loss")

    manager = ranked()
    for loss in (0.5, 0.1, 0.3):  # ckpt-2 is the best
        manager.save(metrics={"loss": loss})
        fake_time.now += 10
    # the process stops at the state write after the commit: armed as the commit begins
    disk.before("stage.commit", lambda *args: disk.fail("replace_file", KeyboardInterrupt(), times=1))
    with pytest.raises(KeyboardInterrupt):
        manager.save(checkpoint_number=2, metrics={"loss": 0.9})
    disk.heal()
    disk.release(str(tmp_path))  # the process is gone: its claim with it
    resumed = ranked()
    assert resumed.metrics_of(str(tmp_path / "ckpt-2")) == {"loss": 0.9}
    for loss in (0.2, 0.6, 0.7):
        fake_time.now += 10
        resumed.save(metrics={"loss": loss})
    assert resumed.best_checkpoint == str(tmp_path / "ckpt-4")  # loss 0.2, kept
    assert (tmp_path / "ckpt-4").is_dir()
    resumed.close()


@pytest.mark.parametrize("ranking", [dict(best_metric="acc", best_mode="max"), dict(best_metric=lambda m: m["loss"])],
                         ids=["another-metric", "a-callable"])
def test_an_evaluator_that_records_damage_leaves_the_runs_ranking(tmp_path, ranking):
    """An evaluation script opening a finished run with a ranking of its own, whose restore falls
    back past a damaged checkpoint, records the damage: its own ranking must not go into the run's
    state file, which the resumed run (omitting its ranking) would take, deleting its best."""
    from .damage import rot

    state = torchckpt.Checkpoint(v=torch.tensor(0.0))
    run = CheckpointManager(state, tmp_path, max_to_keep=2, keep_best=1, best_metric="loss")
    for loss in (0.5, 0.1, 0.3, 0.4):
        state.v = torch.tensor(loss)  # a new value each save: no shard shared with the one before
        run.save(metrics={"loss": loss, "acc": 1 - loss})
    run.close()
    shard = next((tmp_path / "ckpt-4").glob("*.safetensors"))
    rot(str(shard))
    evaluator = CheckpointManager(ckpt(), tmp_path, max_to_keep=1, keep_best=1, **ranking)
    with pytest.warns(torchckpt.DamagedCheckpointWarning):
        assert evaluator.restore_or_initialize() == str(tmp_path / "ckpt-3")
    evaluator.close()
    recorded = history_state.read_state(str(tmp_path), LOCAL)
    assert (recorded.best_metric, recorded.best_mode, recorded.keep_best) == ("loss", "min", 1)
    assert "ckpt-4" in recorded.damaged
    resumed = CheckpointManager(ckpt(), tmp_path, max_to_keep=2)  # the ranking from the directory
    assert resumed.best_checkpoint == str(tmp_path / "ckpt-2")
    resumed.close()


def test_a_checkpoint_retention_deleted_is_checkpoint_deleted_error_naming_the_newer_one(tmp_path):
    # a follower handed ckpt-1 by checkpoints_iterator, which the run deleted before it opened it
    manager = CheckpointManager(ckpt(), tmp_path, max_to_keep=1)
    first, second = manager.save(), manager.save()
    manager.close()
    for read in (torchckpt.load_state, torchckpt.load_checkpoint, lambda p: ckpt().restore(p)):
        with pytest.raises(torchckpt.CheckpointDeletedError, match=r"ckpt-1 was deleted: the run writing .* keeps only "
                                                                 r"its latest checkpoints \(max_to_keep\), and has "
                                                                 r"written .*ckpt-2 since") as info:
            read(first)
        assert info.value.path == first and second in str(info.value)
    with pytest.raises(torchckpt.CheckpointNotFoundError, match=r"does not exist\. Did you mean") as info:
        torchckpt.load_state(tmp_path / "ckpt_2")  # a typo, not a deletion
    assert not isinstance(info.value, torchckpt.CheckpointDeletedError)


def test_a_checkpoint_retention_deleted_beside_the_best_kept_is_checkpoint_deleted_error(tmp_path):
    """probe70 N2: with keep_best the kept numbers are not one after another (an old best beside
    the latest), and a follower whose yielded checkpoint retention deleted got CheckpointNotFoundError."""
    state = torchckpt.Checkpoint(v=torch.tensor(0.0))
    with CheckpointManager(state, tmp_path, max_to_keep=2, keep_best=1, best_metric="loss") as manager:
        for loss in (0.5, 0.1, 0.3, 0.4, 0.6, 0.7):  # ckpt-2 is the best; ckpt-5 and ckpt-6 the latest
            manager.save(metrics={"loss": loss})
        assert [os.path.basename(p) for p in manager.checkpoints] == ["ckpt-2", "ckpt-5", "ckpt-6"]
    with pytest.raises(torchckpt.CheckpointDeletedError, match=r"ckpt-4 was deleted: .*ckpt-6 since"):
        torchckpt.load_state(tmp_path / "ckpt-4")
    for never in ("ckpt-7", "ckpt-5x"):  # past the latest, or not a number of the run: never written
        with pytest.raises(torchckpt.CheckpointNotFoundError) as info:
            torchckpt.load_state(tmp_path / never)
        assert not isinstance(info.value, torchckpt.CheckpointDeletedError)


def test_a_replacing_save_that_fails_leaves_the_history_as_it_was(tmp_path, disk):
    state = torchckpt.Checkpoint(v=torch.tensor(0.0))
    manager = CheckpointManager(state, tmp_path, max_to_keep=1, keep_best=1, best_metric="loss")
    for loss in (0.5, 0.1, 0.3):  # ckpt-2 is the best
        state.v = torch.tensor(loss)
        manager.save(metrics={"loss": loss})
    disk.fail("stage.commit", OSError(errno.ENOSPC, "No space left on device"))  # before the commit
    with pytest.raises(torchckpt.CheckpointWriteError):
        manager.save(checkpoint_number=2, metrics={"loss": 0.9})
    disk.heal()
    assert manager.best_checkpoint == str(tmp_path / "ckpt-2")
    assert manager.metrics_of(str(tmp_path / "ckpt-2")) == {"loss": 0.1}
    assert str(tmp_path / "ckpt-2") in manager.checkpoints
    # and so does the state file, which the save wrote without ckpt-2 before it began: a run that
    # ends on this exception leaves the file naming the true best
    assert torchckpt.get_checkpoint_state(tmp_path).best == str(tmp_path / "ckpt-2")
    manager.save(metrics={"loss": 0.7})
    assert torchckpt.get_checkpoint_state(tmp_path).best == str(tmp_path / "ckpt-2")
    manager.close()


def test_a_number_a_run_numbering_by_step_never_wrote_is_not_called_deleted(tmp_path):
    manager = CheckpointManager(ckpt(), tmp_path, max_to_keep=None)
    for step in (10, 20):
        manager.save(checkpoint_number=step)
    manager.close()
    with pytest.raises(torchckpt.CheckpointNotFoundError, match=r"does not exist\. Did you mean .*ckpt-20") as info:
        torchckpt.load_state(tmp_path / "ckpt-2")  # a typo for ckpt-20, not a deletion
    assert not isinstance(info.value, torchckpt.CheckpointDeletedError)


def test_a_checkpoint_deleted_while_a_reader_resolves_it_is_checkpoint_deleted_error(tmp_path, disk):
    # found (the path exists), then the run's retention deletes it before the reader looks for its index
    manager = CheckpointManager(ckpt(), tmp_path, max_to_keep=1)
    first = manager.save()
    disk.after("follows_to_dir", lambda path: manager.save() if path == first else None, skip=1, times=1)
    with pytest.raises(torchckpt.CheckpointDeletedError, match="was deleted while it was being read") as info:
        torchckpt.load_state(first)
    assert info.value.path == first and "ckpt-2 was written since" in str(info.value)
    assert disk.called("delete_checkpoint")
    manager.close()


def test_a_checkpoint_retention_cannot_delete_is_warned_about_and_the_save_stands(tmp_path, disk):
    manager = CheckpointManager(ckpt(), tmp_path, max_to_keep=1)
    manager.save()
    disk.fail("delete_checkpoint", PermissionError(errno.EPERM, "Operation not permitted"), times=1)
    with pytest.warns(UserWarning, match=r"ckpt-1 was not deleted \(\[Errno 1\] Operation not permitted\): retention "
                                         r"dropped it when .*ckpt-2 was committed and recorded, which stands") as caught:
        assert manager.save() == os.path.join(tmp_path, "ckpt-2")
    assert len(caught) == 1
    assert manager.checkpoints == [os.path.join(tmp_path, "ckpt-2")]
    assert torchckpt.latest_checkpoint(tmp_path) == os.path.join(tmp_path, "ckpt-2")
    manager.close()
    again = CheckpointManager(ckpt(), tmp_path, max_to_keep=1)  # adopts the one left, and retention deletes it
    again.save()
    assert sorted(p.name for p in tmp_path.glob("ckpt-*")) == ["ckpt-3"]
    again.close()


def test_what_retention_dropped_when_the_state_file_could_not_be_written_is_deleted_at_the_next_save(tmp_path,
                                                                                                      disk):
    manager = CheckpointManager(ckpt(), tmp_path, max_to_keep=1)
    manager.save()
    disk.fail("replace_file", OSError(errno.ENOSPC, "No space left on device"), times=1)
    with pytest.raises(torchckpt.CheckpointWriteError, match=r"ckpt-2 is committed, but the directory's state file"):
        manager.save()
    assert manager.save() == os.path.join(tmp_path, "ckpt-3")
    assert sorted(p.name for p in tmp_path.glob("ckpt-*")) == ["ckpt-3"]  # before: ckpt-1 stayed, out of the history
    manager.close()


@pytest.mark.parametrize("timeout", [60, 60.5, "60", np.int64(60), torch.tensor(60)], ids=repr)
def test_timeout_secs_is_any_positive_number_float_takes(tmp_path, timeout):
    CheckpointManager(ckpt(), tmp_path, timeout_secs=timeout).close()


@pytest.mark.parametrize("timeout", [0, -1, True, np.bool_(True), torch.tensor(True), float("inf"), float("nan"),
                                     "soon", torch.ones(2)], ids=repr)
def test_a_timeout_secs_that_is_no_positive_finite_number_is_refused(tmp_path, timeout):
    with pytest.raises(ValueError, match=r"timeout_secs must be a positive, finite number of seconds, not "):
        CheckpointManager(ckpt(), tmp_path, timeout_secs=timeout)
    CheckpointManager(ckpt(), tmp_path).close()  # the refused one holds no claim
    with pytest.raises(ValueError, match=r"timeout_secs must be a positive, finite number of seconds, not "):
        ckpt().write(tmp_path / "c", timeout_secs=timeout)  # one process too, as on several ranks


def test_a_replacement_whose_state_file_cannot_be_written_first_says_nothing_was_replaced(tmp_path, disk):
    manager = CheckpointManager(ckpt(), tmp_path, max_to_keep=3)
    manager.save(checkpoint_number=5)
    disk.fail("replace_file", OSError(errno.ENOSPC, "No space left on device"), times=1)
    with pytest.raises(torchckpt.CheckpointWriteError, match=r"Cannot replace .*ckpt-5: the directory's state file "
                       r"could not be written \(No space left on device\)\. Nothing was written into ckpt-5") as info:
        manager.save(checkpoint_number=5)  # before: "ckpt-5 is committed, but ... the history does not name it yet"
    assert info.value.errno == errno.ENOSPC
    assert manager.checkpoints == [os.path.join(tmp_path, "ckpt-5")]
    manager.close()


def test_an_empty_folder_retention_is_about_to_remove_is_checkpoint_deleted_error(tmp_path):
    # on a store with real folders a deletion removes its marker, then the empty folder: in between
    manager = CheckpointManager(ckpt(), tmp_path, max_to_keep=1)
    first, second = manager.save(), manager.save()
    manager.close()
    os.mkdir(first)  # the folder's last moment, after its files and marker are gone
    with pytest.raises(torchckpt.CheckpointDeletedError, match="was deleted: the run writing") as info:
        torchckpt.load_state(first)
    assert info.value.path == first and second in str(info.value)
    os.mkdir(tmp_path / "mine")  # a user's empty folder stays what it is
    with pytest.raises(torchckpt.CheckpointNotFoundError, match="No committed checkpoint in") as found:
        torchckpt.load_state(tmp_path / "mine")
    assert not isinstance(found.value, torchckpt.CheckpointDeletedError)


def test_a_second_manager_of_another_name_on_one_directory_in_one_process_is_refused(tmp_path):
    """probe84 F3: a ``last`` and a ``best`` manager of one process on one directory each replaced
    the state file with their own history (on a disk without a word; a restarted ``last`` was then
    refused as the directory of ``best``). One of the same name still shares the claim, as in TF."""
    last = CheckpointManager(ckpt(), tmp_path, checkpoint_name="last")
    with pytest.raises(torchckpt.CheckpointError, match=r"is managed by an open CheckpointManager of this process with "
                       r"checkpoint_name='last': one directory holds one manager's history, .* Give each manager its "
                       r"own directory"):
        CheckpointManager(ckpt(), tmp_path, checkpoint_name="best")
    again = CheckpointManager(ckpt(), tmp_path, checkpoint_name="last")
    assert again.save().endswith("last-1")
    again.close()
    assert last.save().endswith("last-2")
    last.close()
    with pytest.raises(torchckpt.CheckpointError, match="holds the history of a CheckpointManager named 'last'"):
        CheckpointManager(ckpt(), tmp_path, checkpoint_name="best")  # closed: the directory's own check, as before
    assert torchckpt.get_checkpoint_state(tmp_path).all == [str(tmp_path / "last-1"), str(tmp_path / "last-2")]
    # probe85 F7, F8: one never closed and collected does not count; one directory by a symbolic link does
    CheckpointManager(ckpt(), tmp_path / "gone", checkpoint_name="last")
    gc.collect()
    CheckpointManager(ckpt(), tmp_path / "gone", checkpoint_name="best").close()
    (tmp_path / "link").symlink_to(tmp_path / "real", target_is_directory=True)
    (tmp_path / "real").mkdir()
    with CheckpointManager(ckpt(), tmp_path / "real", checkpoint_name="last"), \
            pytest.raises(torchckpt.CheckpointError, match=r"link is managed by an open CheckpointManager"):
        CheckpointManager(ckpt(), tmp_path / "link", checkpoint_name="best")


def test_a_manager_refused_by_another_process_does_not_hold_the_directory_for_its_name(tmp_path):
    """probe86 F1: its name stayed registered as an open manager of this process while the refused
    object lived (in the exception's traceback), and a manager of another name was then refused."""
    holder = subprocess.Popen([sys.executable, "-c", "import sys, torch, torchckpt; m = torchckpt.CheckpointManager("
                               "torchckpt.Checkpoint(w=torch.zeros(1)), sys.argv[1]); print('held', flush=True); "
                               "sys.stdin.read()", str(tmp_path)], stdin=subprocess.PIPE, stdout=subprocess.PIPE,
                              text=True)
    try:
        assert holder.stdout.readline().strip() == "held"
        with pytest.raises(torchckpt.CheckpointError, match="is managed by another live process") as refused:
            CheckpointManager(ckpt(), tmp_path, checkpoint_name="last")
    finally:
        holder.communicate("", timeout=60)
    CheckpointManager(ckpt(), tmp_path, checkpoint_name="best").close()
    assert refused.value is not None  # kept alive to the end, with the refused manager in its traceback
