"""The CheckpointManager and async saves on several ranks, on real gloo jobs on 127.0.0.1.

The jobs are the session fixtures of ``tests/distributed.py``, shared with ``test_distributed.py``;
each rank's findings are read back here.
"""

from __future__ import annotations

import json
import os

import pytest
import safetensors.torch
import torch

import torchckpt
from torchckpt import cli

from .distributed import ROOT, results, run_torchrun
from .test_distributed import ok

pytestmark = pytest.mark.skipif(not torch.distributed.is_available(), reason="needs torch.distributed")


# -- the manager ---------------------------------------------------------------------------------


def test_a_manager_on_2_ranks_agrees_on_every_rank_and_only_rank_0_deletes(world2):
    found = ok(world2, "manager_2", 2)
    first, second = found
    for key in ("returned", "views", "on_disk", "save_counter", "restored"):
        assert first[key] == second[key], key
    assert first["restored"] is None and first["inits"] == [0] and second["inits"] == [1]  # init_fn on every rank
    # The interval (2) skips every other call; max_to_keep=2 plus the best by loss (ckpt-4, loss 1.0).
    assert first["returned"] == ["ckpt-1", None, "ckpt-2", None, "ckpt-3", None, "ckpt-4", None, "ckpt-5", None,
                                 "ckpt-6", None, "ckpt-7", None, "ckpt-8", None]
    assert first["views"][-1] == ["ckpt-8", ["ckpt-4", "ckpt-7", "ckpt-8"], "ckpt-4"]
    assert first["views"][2] == ["ckpt-3", ["ckpt-2", "ckpt-3"], "ckpt-2"]
    assert first["deleted"] == ["ckpt-1", "ckpt-2", "ckpt-3", "ckpt-5", "ckpt-6"]
    assert second["deleted"] == []
    assert first["on_disk"] == [".torchckpt.lock", "checkpoints.json", "ckpt-4", "ckpt-7", "ckpt-8"]


def test_a_new_job_on_4_ranks_resumes_the_history_and_restores_the_same_checkpoint(world4_from_2):
    found = ok(world4_from_2, "manager_resume", 4)
    for result in found:
        assert result["before"] == ["ckpt-8", ["ckpt-4", "ckpt-7", "ckpt-8"], "ckpt-4"]
        assert result["restored"] == "ckpt-8"
        assert result["differences"] == []  # every rank holds the 2-rank job's last state, resharded
        assert result["step"] == 16 and result["save_counter"] == 9  # step 14 restored, +2: the interval allows it
        assert result["saved"] == "ckpt-9"
        assert result["after"] == ["ckpt-9", ["ckpt-8", "ckpt-9"], "ckpt-9"]  # the new best (0.5) displaces ckpt-4
    assert found[0]["deleted"] == ["ckpt-4", "ckpt-7"]
    assert all(r["deleted"] == [] for r in found[1:])
    state = torchckpt.get_checkpoint_state(world4_from_2 / "managed")
    assert [os.path.basename(p) for p in state.kept] == ["ckpt-8", "ckpt-9"]
    assert os.path.basename(state.best) == "ckpt-9"


def test_a_second_job_on_a_claimed_directory_is_refused_on_every_rank_alike(world2):
    found = ok(world2, "second_job", 2)
    assert found[0]["refused"] == found[1]["refused"]
    message = found[0]["refused"]
    assert message.startswith("CheckpointError: Opening ")
    assert "failed on rank 0" in message and "is managed by another live process" in message
    assert f"pid {os.getpid()}" in message  # the holder: this test process


def test_a_manager_on_4_ranks_saves_into_s3(world4, s3_run, s3_endpoint):
    found = ok(world4, "manager_s3", 4)
    assert all(r["views"] == found[0]["views"] for r in found)
    assert found[0]["views"][-1] == ["ckpt-3", ["ckpt-2", "ckpt-3"], ""]  # no metrics: no best
    assert found[0]["deleted"] == ["ckpt-1"] and all(r["deleted"] == [] for r in found[1:])
    options = {"client_kwargs": {"endpoint_url": s3_endpoint}}
    url = s3_run + "/managed"
    state = torchckpt.get_checkpoint_state(url, storage_options=options)
    assert [p.rsplit("/", 1)[1] for p in state.all] == ["ckpt-2", "ckpt-3"]
    from tests.jobs.dist_job import MLP, differences

    model = MLP(1)
    opt = torch.optim.Adam(model.parameters(), lr=0.01)
    torchckpt.Checkpoint(model=model, opt=opt).restore(url, storage_options=options).assert_consumed()
    reference = safetensors.torch.load_file(str(world4 / "s3-managed-reference.safetensors"))
    found_state = {f"model/{k}": v for k, v in model.state_dict().items()}
    for index, fields in opt.state_dict()["state"].items():
        found_state.update({f"opt/{index}/{f}": v for f, v in fields.items()})
    assert differences(found_state, reference) == []


# -- async saves -----------------------------------------------------------------------------------


@pytest.mark.parametrize("world", [2, 4])
def test_20_async_saves_next_to_all_reduce_and_barrier_loops_hold_the_values_as_of_save(world4, world2, world):
    found = ok(world4 if world == 4 else world2, "async_loops", world)
    for result in found:
        assert result["checkpoints"] == [f"ckpt-{i}" for i in range(1, 21)]
        assert result["collectives"] == 60  # every all_reduce summed over the whole group
    directory = world4 / f"async{world}"
    for i in range(1, 21):  # training set every value to -1 right after save() returned
        reader = torchckpt.load_checkpoint(directory / f"ckpt-{i}")
        names = [n for n in reader.names if n.startswith("model/") and "steps_seen" not in n] + ["marker"]
        for name in names:
            value = reader.get_tensor(name)
            assert torch.equal(value, torch.full_like(value, float(i))), (i, name)
        assert cli.main(["verify", str(directory / f"ckpt-{i}")]) == 0


def test_a_background_failure_on_one_rank_is_raised_on_every_rank(world2):
    found = ok(world2, "async_failure", 2)
    assert found[0] == found[1]
    result = found[0]
    for when, number in (("save", 2), ("wait_until_finished", 3)):
        assert result[f"{when}_returned"] == f"ckpt-{number}"
        assert result[when] == (f"CheckpointWriteError: Saving {world2}/async-fault/ckpt-{number} failed on rank 1: "
                                f"Cannot write checkpoint {world2}/async-fault/ckpt-{number}: no space left on the "
                                "device. Free some space (or keep fewer checkpoints with max_to_keep); the previous "
                                "checkpoints are intact.")
        assert result[f"{when}_ranks"] == [1]
    snapshot = result["snapshot"]  # raised by save() itself, on both ranks: torch's allocator refused the copy
    assert snapshot.startswith(f"CheckpointError: Saving {world2}/async-fault/ckpt-4 failed on rank 1: ")
    assert "allocate" in snapshot, snapshot
    assert result["last"] == "ckpt-4"  # the failed copy committed nothing and took no number
    assert result["checkpoints"] == ["ckpt-1", "ckpt-4"]
    assert result["on_disk"] == [".torchckpt.lock", "checkpoints.json", "ckpt-1", "ckpt-4"]  # no stage is left


def test_other_calls_made_while_an_async_save_is_in_flight_wait_for_it_instead_of_deadlocking(world2):
    found = ok(world2, "async_next_to_other_calls", 2)
    for result in found:
        assert result["ema_0"] and result["ema_1"]
        assert max(result["seconds"]) < 10  # the deadlock lasted timeout_secs (20 s here), then failed the save
        assert result["checkpoints"] == ["ckpt-1", "ckpt-2"]
    for i in (1, 2):
        assert cli.main(["verify", str(world2 / "async-next" / f"ckpt-{i}")]) == 0


def test_a_rank_interrupted_in_a_save_fails_the_call_on_the_others_at_once_and_the_next_save_pairs(world2):
    found = ok(world2, "interrupted_on_one_rank", 2)
    assert found[1]["interrupted"] == "KeyboardInterrupt"  # raised where it happened, as it was
    assert found[0]["interrupted"] == (
        f"CheckpointError: Rank 1 stopped during the plan step of saving into {world2}/interrupted "
        "(KeyboardInterrupt on rank 1), so the call cannot complete. Nothing was committed.")
    for result in found:
        assert result["seconds"] < 10  # before: rank 0 waited out timeout_secs (20 s here)
        assert result["last"] == "ckpt-2" and result["checkpoints"] == ["ckpt-1", "ckpt-2"]
        assert result["stages_left"] == []  # before: rank 0's stage stayed until a later manager opened
    # rank 0 interrupted as it wrote its shard says so in its mark: nothing was committed (before:
    # "Rank 0 was committing ... so it may be committed or not")
    assert found[0]["interrupted_writing"] == "KeyboardInterrupt"
    assert found[1]["interrupted_writing"] == (
        f"CheckpointError: Rank 0 stopped during the outcome step of saving into {world2}/interrupted "
        "(KeyboardInterrupt on rank 0), so the call cannot complete. Rank 0 stopped before the commit: nothing was "
        "committed.")
    # on an object store the upload stays whole, marked, for the next manager (probe59: removed at once,
    # rank 1's shard that landed later was left in ckpt-2/ for good, with no marker and no index)
    assert found[0]["remote_interrupted"] == "KeyboardInterrupt"
    assert found[1]["remote_interrupted"].endswith("Rank 0 stopped before the commit: nothing was committed.")
    for result in found:
        assert result["remote_next"] == "ckpt-2"
        assert {name: [f for f in files if not f.endswith(".safetensors")] for name, files in
                result["remote_left"].items()} == {"ckpt-1": ["index.json"], "ckpt-2": ["index.json"]}
    # interrupted while the call waited for the run's async save in flight: a stop in that call too
    assert found[1]["waiting"] == "KeyboardInterrupt"
    assert found[0]["waiting"] == (
        f"CheckpointError: Rank 1 stopped during the plan step of saving {world2}/interrupted-ema "
        "(KeyboardInterrupt on rank 1), so the call cannot complete. Nothing was committed.")
    # and while it waited to send a failure it met before the call's first exchange
    assert found[1]["sending"] == "KeyboardInterrupt"
    assert found[0]["sending"] == (
        f"CheckpointError: Rank 1 stopped during the call step of restoring {world2}/interrupted-ema "
        "(KeyboardInterrupt on rank 1), so the call cannot complete. Nothing was restored.")
    for result in found:
        assert result["waiting_seconds"] < 10 and result["sending_seconds"] < 10  # before: timeout_secs
        assert result["async_checkpoints"] == ["ckpt-1", "ckpt-2"]
    # rank 0's background part of an async save stopped before the commit: the others raise at once
    # and the ranks stay in step (probe59 #4: rank 1 waited out the outcome timeout, then the next
    # two saves failed on both ranks)
    assert found[0]["background"] == "SystemExit"
    assert found[1]["background"] == (
        f"CheckpointError: Rank 0 stopped during the outcome step of saving into {world2}/interrupted-async "
        "(SystemExit on rank 0), so the call cannot complete. Rank 0 stopped before the commit: nothing was "
        "committed.")
    for result in found:
        assert result["background_seconds"] < 10
        assert result["after_background"] == "ckpt-4"
        assert result["after_background_checkpoints"] == ["ckpt-1", "ckpt-2", "ckpt-4"]
        assert result["after_background_stages"] == []


def test_a_manager_argument_one_rank_alone_refuses_or_passes_fails_every_rank_at_once(world2):
    found = ok(world2, "arguments_on_one_rank", 2)
    assert found[0] == {**found[1], **{k: v for k, v in found[0].items() if k.endswith("_seconds")}}
    refused = ("CheckpointError: CheckpointManager was refused on every rank: the ranks did not make the same call "
               "({}). Every rank must call it with the same arguments, in the same order. Nothing was written or "
               "changed.")
    result = found[0]
    assert result["max_to_keep"] == refused.format("max_to_keep: 3 on rank 0; 0 on rank 1")
    assert result["init_fn"] == refused.format("init_fn: true on rank 0; false on rank 1")
    assert result["step_counter"] == (f"CheckpointError: Opening {world2}/arguments failed on rank 1: `step_counter` "
                                      "should be passed if `checkpoint_interval` is not None.")
    assert result["timeout_secs"] == (f"CheckpointError: Opening {world2}/arguments failed on rank 1: timeout_secs "
                                      "must be a positive, finite number of seconds, not -1.")
    assert result["preemption_signals"] == (f"CheckpointError: Opening {world2}/arguments failed on rank 1: "
                                            "preemption_signals cannot include SIGKILL: no handler can catch it.")
    assert result["write_timeout"] == (f"CheckpointError: Saving {world2}/arguments-write failed on rank 1: "
                                       "timeout_secs must be a positive, finite number of seconds, not True.")
    for rank_result in found:
        assert max(v for k, v in rank_result.items() if k.endswith("_seconds")) < 10  # before: timeout_secs (20 s)
    assert result["saved"] == "ckpt-1"  # the calls stayed paired
    assert result["metrics_warned"] == [  # on every rank, once; metrics passed on rank 0 alone are no difference
        "The ranks passed different metrics to save() ({'loss': 0.0} on rank 0, {'loss': 1.0} on rank 1): the "
        "checkpoint records rank 0's, and keep_best ranks by them. Reduce them over the ranks first "
        "(torch.distributed.all_reduce), or pass them on rank 0 alone."]
    assert result["metrics"] == [None, {"loss": 1.0}, {"loss": 0.0}, {"loss": -0.0}]
    # the warning of a rebuilt history is given on every rank: where warnings are errors, every rank raises
    assert result["warned"].startswith(f"UserWarning: {world2}/arguments: the state file is damaged (")
    assert "; rebuilt from the 4 committed checkpoints on disk (latest: ckpt-4)." in result["warned"]
    assert result["reopened"] == "ckpt-4"  # the failed construction let go of the directory's claim


def test_a_construction_a_rank_gave_up_on_lets_go_of_the_claim_rank_0_took_meanwhile(world2):
    found = results(world2, "claim_after_a_rank_gave_up", 2)
    assert [r["opened"] for r in found] == ["CheckpointError", "RankTimeoutError"]  # both failed, neither hangs
    assert found[0]["claim_free"]  # before: held by rank 0's process until it exited


def test_a_failure_after_the_commit_leaves_every_rank_with_the_same_history(world2):
    """Rank 0 alone records and deletes; what fails there once a checkpoint is committed must not
    split the ranks' views (before: an undeletable ckpt-1 failed the save that committed ckpt-2,
    and only rank 0's history named it, so restore_or_initialize chose another checkpoint on rank 1)."""
    found = ok(world2, "after_commit_fails", 2)
    run = world2 / "after-commit"
    for rank, result in enumerate(found):
        assert result["undeletable"] == "ckpt-2"  # committed and recorded: the save stands
        assert result["warned"] == ([f"{run}/ckpt-1 was not deleted ([Errno 1] Operation not permitted): retention "
                                     f"dropped it when {run}/ckpt-2 was committed and recorded, which stands. It stays "
                                     "on disk, out of the manager's history; a new manager on the directory adopts it "
                                     "and its retention deletes it, or delete it by hand."] if rank == 0 else [])
        assert result["view_undeletable"] == ["ckpt-2", ["ckpt-2"], ""]
        assert result["unrecorded"] == (
            f"CheckpointWriteError: Saving {run}/ckpt-3 failed on rank 0: Checkpoint {run}/ckpt-3 is committed, but "
            f"the directory's state file {run}/checkpoints.json could not be written (No space left on device), so the "
            "history does not name it yet. Once the state file can be written, the next save (or a new manager on the "
            "directory) records it.")
        assert result["view_unrecorded"] == ["ckpt-3", ["ckpt-3"], ""]  # on every rank: it is committed
        assert result["restored"] == "ckpt-3"
        assert result["view_next"] == ["ckpt-4", ["ckpt-4"], ""]
        # Ctrl-C on rank 0 once its state file names ckpt-5: it raises the interrupt, the others a
        # typed error, and every rank holds rank 0's history (before: rank 1 still named ckpt-4)
        assert result["interrupted"] == ("KeyboardInterrupt" if rank == 0 else (
            f"CheckpointError: Saving {run}/ckpt-5 failed on rank 0: it was interrupted (KeyboardInterrupt) once "
            f"{run}/ckpt-5 was committed, while it recorded it in the directory's history. Every rank holds the "
            "history as rank 0 held it then: latest_checkpoint() says whether it names the new checkpoint (a new "
            "manager on the directory adopts one it does not)."))
        assert result["view_interrupted"] == ["ckpt-5", ["ckpt-5"], ""]
        assert result["restored_after_interrupt"] == "ckpt-5"
        assert result["view_after_interrupt"] == ["ckpt-6", ["ckpt-6"], ""]
        # Ctrl-C on rank 0 after the outcome (before: rank 0 kept save_counter 6 and rank 1 took 7, and the
        # next save was refused as a mismatched call)
        assert result["settling"] == ("KeyboardInterrupt" if rank == 0 else "no error")
        assert result["settled"] == [["ckpt-7", ["ckpt-7"], ""], 7] and result["after_settling"] == "ckpt-8"
        assert result["on_disk"] == [".torchckpt.lock", "checkpoints.json", "ckpt-1", "ckpt-8"]  # ckpt-1: undeletable
        # in Checkpoint.save too (probe59: rank 1 kept save_counter 1, and every later save was refused)
        assert result["plain_interrupted"] == ("KeyboardInterrupt" if rank == 0 else (
            f"CheckpointError: Saving {run}/plain/ckpt-2 failed on rank 0: it was interrupted (KeyboardInterrupt) "
            f"once {run}/plain/ckpt-2 was committed, while it recorded it in the directory's history. Every rank "
            "holds the history as rank 0 held it then: latest_checkpoint() says whether it names the new checkpoint "
            "(a new manager on the directory adopts one it does not)."))
        assert result["plain_counter"] == 2 and result["plain_next"] == "no error"
        assert result["plain_settling"] == ("KeyboardInterrupt" if rank == 0 else "no error")
        assert result["plain_settled"] == 4 and result["plain_after_settling"] == "no error"  # (probe60: 3 on rank 0)
    assert cli.main(["verify", str(run / "ckpt-8")]) == 0


def test_a_rank_killed_during_an_async_save_fails_the_others_and_the_next_job_cleans_up(killed_async):
    assert not (killed_async / "killed_async-w2-rank0.json").exists()  # rank 0 died
    survivor = results(killed_async, "killed_async", 2, ranks=[1])[0]
    assert survivor["second"].startswith("CheckpointError: Lost contact with the other ranks during "), survivor
    assert survivor["seconds"] < 3 * 2 + 5, survivor
    for later in survivor["later"]:  # every later call is a typed error too (the store died with rank 0)
        assert later.startswith("torchckpt.errors.CheckpointError: Lost contact with the other ranks during "), later
    directory = killed_async / "killed-async"
    leftovers = [n for n in os.listdir(directory) if ".torchckpt-tmp-" in n]
    assert len(leftovers) == 1, os.listdir(directory)  # rank 0's stage, with the files it wrote
    from tests.jobs.dist_job import MLP

    manager = torchckpt.CheckpointManager(torchckpt.Checkpoint(model=MLP(0)), directory)
    try:
        assert not [n for n in os.listdir(directory) if ".torchckpt-tmp-" in n]  # its writer is gone
        assert manager.restore_or_initialize().endswith("ckpt-1")
        assert manager.save().endswith("ckpt-2")
    finally:
        manager.close()


# -- incremental saves ------------------------------------------------------------------------------


@pytest.mark.parametrize("mode", ["sync", "async"])
def test_an_incremental_save_on_2_ranks_reuses_each_ranks_frozen_files_and_stays_standalone(world2, mode):
    found = ok(world2, "incremental_fsdp", 2)
    assert found[0][mode] == found[1][mode]  # every figure is the whole checkpoint's: the same on both ranks
    result = found[0][mode]
    assert (result["first"], result["second"], result["base"]) == ("ckpt-1", "ckpt-2", "ckpt-1")
    assert len(result["frozen_files"]) == 2  # the backbone's chunks, kept apart from the head: a file per rank
    assert result["reused_files"] == result["frozen_files"]  # and only those: the head and Adam's state changed
    assert result["reusing_ranks"] == [0, 1] and result["same_writer"] == [True, True]  # each rank its own files
    assert result["links"] == [2, 2]  # hard links to the first checkpoint's files: no byte of them written again
    assert result["differences"] == []  # bit-exact on every rank, everything consumed
    assert result["links_after_delete"] == [1, 1]  # the first checkpoint deleted by hand...
    assert result["differences_after_delete"] == []  # ...changes nothing in the second
    directory = "incremental-async" if mode == "async" else "incremental"
    assert cli.main(["verify", str(world2 / directory / "ckpt-2")]) == 0


def test_a_file_one_rank_found_damaged_is_written_afresh_by_that_rank_at_the_next_save(world2):
    found = ok(world2, "damaged_then_saved", 2)
    assert found[0] == found[1]  # the same outcome on both ranks
    result = found[0]
    assert result["linked_in_second"] == [0, 1]  # each rank's frozen file, linked and trusted by its stamp
    rotten = os.path.join(world2, "damaged-then-saved", "ckpt-2", result["frozen_names"]["1"])
    assert result["restore"].startswith(f"CorruptCheckpointError: Restoring {os.path.dirname(rotten)} failed on "
                                        f"rank 1: Tensor "), result["restore"]
    assert f"in {rotten} fails its checksum" in result["restore"]
    assert result["damaged_paths"] == [os.path.relpath(rotten, world2 / "damaged-then-saved")]
    # the next save: rank 1 read its file back and wrote it afresh; rank 0 linked its intact one again
    assert result["third"] == "ckpt-3"
    assert result["reused_in_third"] == [result["frozen_names"]["0"]]
    assert result["links_in_third"] == {"0": 3, "1": 1}
    assert result["differences"] == []  # restored bit-exact on both ranks, everything consumed
    assert cli.main(["verify", str(world2 / "damaged-then-saved" / "ckpt-3")]) == 0


def test_a_2_rank_checkpoint_as_the_base_of_a_single_process_write_reuses_nothing(world2, tmp_path):
    from tests.jobs.dist_job import FrozenMLP, differences, full_state

    ok(world2, "incremental_fsdp", 2)
    base = world2 / "incremental" / "ckpt-2"
    model = FrozenMLP(3)
    opt = torch.optim.Adam([p for p in model.parameters() if p.requires_grad], lr=0.01)
    ckpt = torchckpt.Checkpoint(model=model, opt=opt)
    ckpt.restore(base).assert_consumed()
    reference = safetensors.torch.load_file(str(world2 / "incremental-reference.safetensors"))
    assert differences(full_state(model, opt), reference) == []
    path = ckpt.write(tmp_path / "one-process", base=base)  # another world size: other chunks, other files
    index = json.loads((tmp_path / "one-process" / "index.json").read_text())
    assert "reused" not in index["torchckpt"]
    assert [os.stat(os.path.join(path, s["file"])).st_nlink for s in index["torchckpt"]["shards"]] == [1, 1]
    fresh = FrozenMLP(4)
    fresh_opt = torch.optim.Adam([p for p in fresh.parameters() if p.requires_grad], lr=0.01)
    torchckpt.Checkpoint(model=fresh, opt=fresh_opt).restore(path).assert_consumed()
    assert differences(full_state(fresh, fresh_opt), reference) == []


# -- the example -------------------------------------------------------------------------------------


@pytest.mark.slow  # 13 s: torchrun twice; CI runs it with the slow set
def test_the_fsdp_example_is_killed_on_2_ranks_and_resumes_on_1(tmp_path):
    script = str(ROOT / "examples" / "train_fsdp.py")
    run = str(tmp_path / "run")
    first = run_torchrun(2, [script, "--dir", run, "--crash-at", "27"])
    assert first.returncode != 0 and "rank 0: killed at step 27" in first.stdout, first.stdout[-3000:]
    assert "saving " + os.path.join(run, "ckpt-6") in first.stdout
    assert torchckpt.latest_checkpoint(run) == os.path.join(run, "ckpt-6")
    second = run_torchrun(1, [script, "--dir", run])
    assert second.returncode == 0, second.stdout[-3000:]
    assert f"world size 1: resumed from {os.path.join(run, 'ckpt-6')} at step 26" in second.stdout
    assert "done at step 40; kept ['ckpt-6', 'ckpt-7', 'ckpt-8']" in second.stdout
    assert torchckpt.load_checkpoint(os.path.join(run, "ckpt-8")).get_tensor("step").item() == 36
