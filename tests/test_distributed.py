"""Saves by several ranks and resharding restores, on real gloo jobs on 127.0.0.1.

Spawning a job costs 6-9 s here, so each job (a session fixture of ``tests/distributed.py``,
shared with ``test_distributed_manager.py``) runs several scenarios of ``tests/jobs/dist_job.py``
in order, and the tests below check what each rank recorded. Restores
into a plain model in this process (no process group) use the same checkpoints.
"""

from __future__ import annotations

import json
import shutil
from pathlib import Path

import pytest
import safetensors
import safetensors.torch
import torch

import torchckpt
from torchckpt import cli
from torchckpt._format import spec
from torchckpt._load import opened as load_opened
from torchckpt._storage.local import LOCAL

from .conftest import read_index, write_index
from .damage import flip_byte
from .distributed import results

pytestmark = pytest.mark.skipif(not torch.distributed.is_available(), reason="needs torch.distributed")


def ok(directory: Path, scenario: str, world: int) -> list[dict]:
    found = results(directory, scenario, world)
    for rank, result in enumerate(found):
        assert "error" not in result, f"rank {rank}: {result['error']}\n{result.get('traceback')}"
    return found


# -- FSDP2 -----------------------------------------------------------------------------------


def test_fsdp2_on_4_ranks_every_rank_writes_its_own_shards(world4):
    found = ok(world4, "save_fsdp_4", 4)
    assert {r["path"] for r in found} == {str(world4 / "fsdp4" / "ckpt-1")}
    assert all(r["shard_ranks"] == [0, 1, 2, 3] and r["format_version"] == 3 for r in found)
    index = read_index(world4 / "fsdp4" / "ckpt-1")
    assert index["torchckpt"]["world_size"] == 4
    head = [n for n in index["torchckpt"]["tensors"]["names"] if n.startswith("model/head.weight~@")]
    assert sorted(head) == ["model/head.weight~@0,0", "model/head.weight~@2,0", "model/head.weight~@4,0"]
    for file in {s["file"] for s in index["torchckpt"]["shards"]}:  # plain safetensors, names and all
        with safetensors.safe_open(str(world4 / "fsdp4" / "ckpt-1" / file), "pt") as f:
            assert set(f.keys()) == {n for n, where in index["weight_map"].items() if where == file}


def test_a_rank_of_a_collective_restore_opens_only_the_shards_it_reads(world2):
    """Before, every rank opened every rank's shard (a job of N ranks opened N times the files it
    read); now each opens its shards as it checks their headers, at the end of its planning."""
    found = ok(world2, "opens_its_own_shards", 2)
    assert all(r["equal"] and r["shards"] == 2 for r in found)
    assert [r["opened"] for r in found] == [r["own"] for r in found]
    assert all(len(r["own"]) == 1 for r in found) and found[0]["own"] != found[1]["own"]


def test_a_process_error_at_a_lazy_open_is_a_read_error_on_every_rank_with_its_errno(world2):
    """The shard a rank opens at its header check fails for a reason of the process: every rank
    raises CheckpointReadError (not damage), said once, with the errno of the failing rank's error."""
    import errno

    found = ok(world2, "opens_its_own_shards", 2)
    for failing, code in ((1, None), (0, errno.EMFILE)):
        for result in found:
            error = result[f"failing{failing}"]
            assert error["type"] == "CheckpointReadError", error
            assert f"failed on rank {failing}" in error["message"]
            assert error["message"].count("Cannot open shard") == 1 and error["message"].count("treated as damaged") == 1
            assert error["errno"] == code
    assert "Access Denied" in found[0]["failing1"]["message"] and "ulimit -n" in found[1]["failing0"]["message"]


def test_a_checkpoint_replaced_before_the_lazy_opens_is_not_called_damaged_on_any_rank(world2):
    """Another checkpoint takes the path (a save under the same number) between the ranks' read of
    the index and their opens of their shards: their checksums fail against the old index, and
    every rank says it was replaced, not damaged."""
    for result in ok(world2, "opens_its_own_shards", 2):
        error = result["replaced"]
        assert error["type"] == "CheckpointDeletedError", error
        assert "was replaced while it was being read" in error["message"] and "Neither checkpoint is damaged" in error["message"]


def test_ranks_that_read_the_index_of_two_checkpoints_all_say_it_was_replaced(world2):
    """Each rank reads index.json itself: a checkpoint replaced between two ranks' reads passed every
    rank's own checks (the headers and checksums of its own checkpoint), and the job restored part
    of one checkpoint and part of the other, silently. The ranks now compare the seals they read."""
    for result in ok(world2, "opens_its_own_shards", 2):
        error = result["split"]
        assert error != "no error" and error["type"] == "CheckpointDeletedError", error
        assert "was replaced while it was being read" in error["message"]
        assert "the ranks read two different index.json files" in error["message"]


def test_fsdp2_restores_on_the_same_4_ranks_and_resumes_bit_for_bit(world4):
    found = ok(world4, "restore_from_4", 4)
    assert all(r["differences"] == [] and r["resume_differences"] == [] and r["unexpected"] == [] for r in found)
    assert [r["cursor"] for r in found] == [100, 101, 102, 103]  # PerRank: each rank its own
    assert [r["counter"] for r in found] == [100, 101, 102, 103]  # also in an object's state_dict()
    assert [r["loaders"] for r in found] == [[10 + r, "epoch"] for r in range(4)]  # tensors inside too
    assert all(r["save_counter"] == 1 and r["missing"] == [] for r in found)


def test_fsdp2_saved_on_4_restores_on_3_and_2(world3, world2):
    for world in (3, 2):
        found = ok(world3, "restore_from_4", world)
        assert all(r["differences"] == [] for r in found), found
        assert [r["cursor"] for r in found] == [100 + r for r in range(world)]
        assert [r["counter"] for r in found] == [100 + r for r in range(world)]
        assert all(r["missing"] == [] for r in found)
        beyond = sorted(f"{k}~r{r}" for k in ("rng", "cursor", "loaders", "cfg/pos", "counter/pos")
                        for r in range(world, 4))
        assert all(r["unexpected"] == beyond for r in found)  # the saving ranks no rank here takes, on every rank


def test_fsdp2_saved_on_4_restores_into_a_plain_model_without_a_process_group(world4):
    from tests.jobs.dist_job import MLP, Cursor

    model = MLP(5)
    opt = torch.optim.Adam(model.parameters(), lr=0.01)
    cursor, counter = torchckpt.PerRank(0), Cursor(0)
    ckpt = torchckpt.Checkpoint(model=model, opt=opt, rng=torchckpt.RNGState(), cursor=cursor,
                                loaders=torchckpt.PerRank({0: torch.tensor([0]), 1: ""}), cfg={}, counter=counter)
    status = ckpt.restore(world4 / "fsdp4").assert_existing_objects_matched()
    assert counter.pos == 100
    per_rank = ["rng", "cursor", "loaders", "cfg/pos", "counter/pos"]  # ranks 1 to 3's values: unused, reported so
    assert sorted(status.report.unexpected_keys) == sorted(f"{k}~r{r}" for k in per_rank for r in (1, 2, 3))
    assert ckpt.cfg == {"pos": 0, "lr": 5}
    reference = safetensors.torch.load_file(str(world4 / "fsdp4-reference.safetensors"))
    found = {f"model/{k}": v for k, v in model.state_dict().items()}
    for index, fields in opt.state_dict()["state"].items():
        found.update({f"opt/{index}/{k}": v for k, v in fields.items()})
    assert sorted(found) == sorted(reference)
    assert all(torch.equal(found[k], v) for k, v in reference.items())
    assert cursor.value == 100  # a single process takes rank 0's


def test_fsdp2_saved_on_2_restores_on_4_and_reports_the_ranks_it_has_no_values_for(world4_from_2):
    found = ok(world4_from_2, "restore_from_2", 4)
    assert all(r["differences"] == [] for r in found)
    assert [r["cursor"] for r in found] == [100, 101, -1, -1]
    # every rank lists the values ranks 2 and 3 have none of, and on which ranks they are missing
    assert all(r["missing"] == ["cfg/pos", "counter/pos", "cursor", "loaders", "rng"] for r in found)
    assert all(r["ranks"] == {k: [2, 3] for k in ("rng", "cursor", "loaders", "cfg", "cfg/pos", "counter", "counter/pos")}
               for r in found), found
    # a per-rank value within a plain one: rank 2 and 3 leave the whole value as it was
    assert [r["cfg"] for r in found] == [{"pos": 0, "lr": 5}, {"pos": 1, "lr": 5}] + [{"pos": None, "lr": 0}] * 2
    # and within an object's state_dict(): its load_state_dict() was handed a placeholder there (probe88 F2)
    assert [r["counter"] for r in found] == [100, 101, -1, -1]


def test_a_plain_checkpoint_restores_into_fsdp2(world2):
    assert all(r["differences"] == [] for r in ok(world2, "plain_into_fsdp", 2))
    # the same with a load pre-hook on the model: its loaders are handed DTensors of each rank's part (probe83 F10)
    assert all(r["hooked_differences"] == [[], []] for r in ok(world2, "plain_into_fsdp", 2))
    # and with a pre-hook that renames a key or adds one, each rank's part of it (probe85 F3)
    assert all(r["migrated_differences"] == [[], []] for r in ok(world2, "plain_into_fsdp", 2))


def test_a_single_process_checkpoint_gives_its_per_rank_state_to_rank_0_alone(world2):
    """probe84 F1: its RNG state and PerRank value were handed to every rank (the same dropout masks
    and batches everywhere), with a clean report. Now rank 1 reports them missing, as a rank beyond
    a job's saving ranks does. probe84 F2: load_state gave every rank rank 0's per-rank values."""
    found = ok(world2, "plain_into_fsdp", 2)
    assert [r["one_process"][0] for r in found] == [5, 101]
    # per-rank values in an object's state_dict() and a module's extra state too (probe88 F1)
    whole = [[6, 6.0, ["m/_extra_state/pos"]], [101, 101.0, ["m/_extra_state/pos"]]]  # a loader of its own
    strict = [[6, 6.0, ["m/_extra_state"]], [101, 6.0, ["m/_extra_state"]]]  # one that takes strict=: the rest
    assert [r["one_process_own"] for r in found] == [
        [5, 6, 6.0, ["counter/pos", "m/_extra_state"], whole[0], strict[0]],
        [101, 101, 6.0, ["counter/pos", "m/_extra_state"], whole[1], strict[1]]]
    assert [r["one_process"][1:] for r in found] == [[["rng", "cursor"], {"rng": [1], "cursor": [1]}, r["one_process"][3]]
                                                     for r in found], found
    assert found[0]["one_process"][3] == ["cursor", "rng", "w"] and found[1]["one_process"][3] == ["w"]
    assert found[0]["hf_warned"] == [] and len(found[1]["hf_warned"]) == 1, found  # probe85 F4: and restored
    assert "rank 1 has no saved value: the checkpoint was saved by 1 rank; this process keeps its own" in \
        found[1]["hf_warned"][0]
    assert [r["load_state"][:2] for r in found] == [[10, 10], [11, 10]]
    assert found[0]["load_state"][3] == [5, []] and found[1]["load_state"][3][0] == 5, found
    assert found[1]["load_state"][3][1][0].endswith("was saved by 1 rank and holds per-rank values (PerRank, RNG "
                                                    "states, data positions), none of them rank 1's: this process gets "
                                                    "rank 0's (pass rank= to choose).")
    assert all(r["load_state"][2].endswith("was saved by 2 ranks and holds per-rank values (PerRank, RNG states, data "
                                           "positions), none of them rank 2's. Pass rank= one of 0..1 to take that "
                                           "rank's values.") for r in found), found


def test_a_mismatch_on_one_rank_is_in_every_ranks_report_so_assertions_raise_on_every_rank(world2):
    found = ok(world2, "plain_into_fsdp", 2)
    expected = "shape mismatches (1): t (on rank 1) (checkpoint [6] vs object [7])"
    assert [r["divergent"] for r in found] == [f"restored 2 values; {expected}", f"restored 1 value; {expected}"]
    assert [r["ranks"] for r in found] == [{"t": [1]}] * 2
    assert all(r["asserted"].startswith("Some tracked objects were not fully matched") for r in found)
    assert [r["late"] for r in found] == ["restored 2 values; missing from the checkpoint (1): m/extra (on rank 1)"] * 2


def test_a_key_mismatched_in_two_ways_on_two_ranks_names_the_rank_of_each(world2):
    found = ok(world2, "plain_into_fsdp", 2)
    assert [r["kinds"] for r in found] == [
        "restored 1 value; missing from the checkpoint (1): d/x (on rank 0); unexpected in the checkpoint (1): d/x (on rank 1); "
        "shape mismatches (1): w (on rank 0) (checkpoint [4] vs object [5]); "
        "dtype mismatches (1): w (on rank 1) (checkpoint torch.float32 vs object torch.float64) (restore(..., cast=True) casts them, "
        "as load_state_dict does, into any dtype but a quantized one)"] * 2, found
    assert [r["kinds_ranks"] for r in found] == [{}] * 2

def test_nothing_restored_on_one_rank_fails_assert_nontrivial_match_on_every_rank(world2):
    found = ok(world2, "plain_into_fsdp", 2)
    assert [r["restored_nothing_on"] for r in found] == [[1], [1]]
    assert all(r["nontrivial"].startswith("Nothing in ") and "matched the objects being restored on rank 1;" in r["nontrivial"]
               for r in found), found


def test_fsdp2_save_and_resharding_restore_on_s3(world4, s3_run, s3_endpoint):
    found = ok(world4, "s3_fsdp", 4)
    assert {r["path"] for r in found} == {s3_run + "/ckpt-1"}
    assert all(r["differences"] == [] for r in found)
    from tests.jobs.dist_job import MLP

    model = MLP(4)  # and into a plain model in this process, straight from the bucket
    torchckpt.Checkpoint(model=model).read(s3_run, storage_options={
        "client_kwargs": {"endpoint_url": s3_endpoint}}).expect_partial()
    reference = safetensors.torch.load_file(str(world4 / "s3-reference.safetensors"))
    assert all(torch.equal(v, reference[f"model/{k}"]) for k, v in model.state_dict().items())


# -- DDP: replicated state, written once -----------------------------------------------------


@pytest.mark.parametrize("world", [2, 4])
def test_ddp_state_is_stored_once_with_bytes_spread_over_the_ranks(world4, world2, world, tmp_path):
    found = ok(world4, "ddp", world)
    path = world4 / f"ddp{world}"
    index = read_index(path)
    names = index["torchckpt"]["tensors"]["names"]
    assert len(names) == len(set(names))
    by_rank = [sum(s["size"] for s in index["torchckpt"]["shards"] if s["rank"] == r) for r in range(world)]
    assert max(by_rank) / (sum(by_rank) / world) <= 1.15, by_rank
    written = [r["written"] for r in found]  # what each process wrote, by its own I/O counter
    assert max(written) / (sum(written) / world) <= 1.15, written
    from tests.jobs.dist_job import DDP_SIZES

    model = torch.nn.Sequential(*[torch.nn.Linear(s, s, bias=False) for s in DDP_SIZES])
    status = torchckpt.Checkpoint(model=model).read(path).expect_partial()
    assert "model/module.0.weight" in status.report.remapped_keys
    reference = safetensors.torch.load_file(str(world4 / f"ddp{world}-reference.safetensors"))
    assert all(torch.equal(v, reference[k]) for k, v in model.state_dict().items())
    # the ranks stored the tensors largest first, each its own: every dict still comes back in its order
    state = torchckpt.load_state(path)
    assert list(state["model"]) == [f"module.{i}.weight" for i in range(len(DDP_SIZES))]
    assert [list(s) for s in state["opt"]["state"].values()] == [["step", "exp_avg", "exp_avg_sq"]] * len(DDP_SIZES)
    assert list(state["cursor"]) == ["small", "big"]  # rank 0's per-rank value; each rank stores its own
    last = tmp_path / "last-rank"
    assert cli.main(["consolidate", str(path), str(last), "--rank", str(world - 1)]) == 0
    cursor = torchckpt.load_state(last)["cursor"]
    assert list(cursor) == ["small", "big"] and int(cursor["small"][0]) == world - 1


# -- values that differ by rank --------------------------------------------------------------


def test_a_value_that_differs_across_ranks_is_refused_on_every_rank(world4):
    found = ok(world4, "differing_value", 4)
    for r in found:
        assert r["epoch"].startswith("CheckpointError: Values differ across ranks: epoch (ranks 0, 1, 2, 3)")
        assert "torchckpt.PerRank" in r["epoch"]
        for name in ("cursor", "buffer", "noise"):
            assert r[name].startswith(f"CheckpointError: Values differ across ranks: {name} (ranks 0, 1, 2, 3)")
        assert r["tracked"].startswith("Values differ across ranks: ema (only on ranks 0, 2). A value saved once must "
                                       "be equal, and tracked, on every rank"), r["tracked"]
        assert r["exists"] == []


# -- 2-D: dp x tp ------------------------------------------------------------------------------


def test_a_dp_by_tp_checkpoint_restores_on_fsdp_2_and_on_a_plain_model(world2):
    ok(world2, "tp_mesh", 4)
    assert all(r["differences"] == [] for r in ok(world2, "restore_tp", 2))
    from tests.jobs.dist_job import MLP

    model = MLP(6)
    opt = torch.optim.Adam(model.parameters(), lr=0.01)
    torchckpt.Checkpoint(model=model, opt=opt).read(world2 / "tp").assert_consumed()
    reference = safetensors.torch.load_file(str(world2 / "tp-reference.safetensors"))
    assert all(torch.equal(v, reference[f"model/{k}"]) for k, v in model.state_dict().items())
    # row-wise tp: 18 x 18 boxes of one weight
    names = read_index(world2 / "tp")["torchckpt"]["tensors"]["names"]
    assert sorted(n for n in names if n.startswith("model/body.2.weight~@")) == [
        "model/body.2.weight~@0,0", "model/body.2.weight~@0,18", "model/body.2.weight~@18,0",
        "model/body.2.weight~@18,18"]


# -- failures ----------------------------------------------------------------------------------


def test_a_strided_shard_restores_exactly_where_it_is_one_block_and_is_refused_where_it_is_not(world4):
    for result in ok(world4, "strided_shards", 4):
        assert result["blocks_exact"] and result["columns_exact"] and result["spread_untouched"]
        for what in ("save", "restore"):
            assert result[what]["type"] == "UnsupportedStateError", result[what]
            assert "Cannot checkpoint 'st/t': it is a DTensor whose placements" in result[what]["message"]
            assert "not one block of the global tensor" in result[what]["message"]
    assert not (world4 / "strided-spread").exists()
    for result in ok(world4, "strided_shards", 4):
        assert result["per_rank"].startswith("UnsupportedStateError: "), result["per_rank"]
        assert "it is a DTensor inside a per-rank value (PerRank)" in result["per_rank"]
        assert "`.to_local()`" in result["per_rank"]
        assert result["off_layout"].startswith(  # rank 0 holds 3 rows where its layout gives it 2
            f"UnsupportedStateError: Saving {world4}/strided-off failed on rank 0: Cannot save 'st/off': this rank's "
            "local tensor has shape [3, 3], but its DTensor's layout (global shape [6, 3], placements (Shard(dim=0), "
            "Shard(dim=0))) gives this rank [2, 3].")
    assert not (world4 / "strided-off").exists()


def test_empty_dtensors_sharded_along_a_dimension_that_is_not_empty_save_and_restore(world4):
    for result in ok(world4, "empty_dtensors", 4):
        assert result == {"same": True, "shape": [0, 4]}
    state = torchckpt.load_state(world4 / "empty-dtensors")  # stored whole, as one process stores them
    assert state["model"]["1.weight"].shape == (4, 0) and state["st"]["e"].shape == (0, 4)
    assert "model/1.weight" in read_index(world4 / "empty-dtensors")["torchckpt"]["tensors"]["names"]


def test_a_write_failure_on_one_rank_fails_every_rank_and_commits_nothing(world4):
    found = ok(world4, "write_fails_on_one_rank", 4)
    for r in found:
        assert r["second"].startswith("CheckpointWriteError: Saving ") and "failed on rank 1" in r["second"]
        assert "exceed the largest size" in r["second"] and r["ranks"] == [1]
        assert r["save_counter"] == 1 and r["latest"].endswith("ckpt-1")
        assert r["entries"] == ["checkpoints.json", "ckpt-1"]  # the stage was discarded
    assert len({r["second"] for r in found}) == 1  # the same error on every rank
    from tests.jobs.dist_job import MLP

    status = torchckpt.Checkpoint(model=MLP(0)).restore(world4 / "faults")
    assert status.report.restored_keys and not status.report.missing_keys


@pytest.mark.slow
def test_rank_0_killed_right_after_its_commit_leaves_the_others_unsure_not_wrong(killed_after_commit):
    survivor = results(killed_after_commit, "killed_after_commit", 2, ranks=[1])[0]
    assert survivor["committed"] is not None and survivor["committed"].endswith("ckpt-1")  # it was committed
    assert "Nothing was committed" not in survivor["second"], survivor["second"]
    assert "Rank 0 was committing " in survivor["second"] and "so it may be committed or not: latest_checkpoint()" \
        in survivor["second"], survivor["second"]


def test_a_rank_killed_mid_save_makes_the_others_raise_within_the_timeout(killed):
    survivor = results(killed, "killed_mid_save", 2, ranks=[0])[0]
    assert not (killed / "killed_mid_save-w2-rank1.json").exists()  # rank 1 died
    assert survivor["second"].startswith("RankTimeoutError: Saving ")  # the type a caller catches, wherever it died
    assert "Rank 1 did not reach the report step of saving " in survivor["second"]
    assert "within 3 s" in survivor["second"] and "Nothing was committed." in survivor["second"]
    assert survivor["seconds"] < 3 + 5, survivor
    assert survivor["entries"] == ["checkpoints.json", "ckpt-1"]  # rank 0 removed the uncommitted stage
    assert torchckpt.latest_checkpoint(killed / "killed").endswith("ckpt-1")
    from tests.jobs.dist_job import MLP

    model = MLP(0)
    ckpt = torchckpt.Checkpoint(model=model, big=torch.zeros(4 * 2**20))
    manager = torchckpt.CheckpointManager(ckpt, killed / "killed", max_to_keep=3)
    try:
        assert manager.latest_checkpoint.endswith("ckpt-1")  # the next job resumes from the last commit
        assert manager.restore_or_initialize().endswith("ckpt-1")
        assert manager.save().endswith("ckpt-2")
    finally:
        manager.close()


# -- format 2: validation ----------------------------------------------------------------------


def tampered(world4: Path, tmp_path: Path, edit) -> Path:
    path = tmp_path / "c"
    shutil.copytree(world4 / "fsdp4" / "ckpt-1", path)
    index = read_index(path)
    edit(index)
    write_index(path, index)
    return path


def rename(index: dict, old: str, new: str) -> None:
    table = index["torchckpt"]["tensors"]
    table["names"] = [new if n == old else n for n in table["names"]]
    index["weight_map"] = {(new if k == old else k): v for k, v in index["weight_map"].items()}


@pytest.mark.parametrize("case, edit, message", [
    ("overlap", lambda i: rename(i, "model/head.weight~@4,0", "model/head.weight~@3,0"), "overlap"),
    ("out of bounds", lambda i: rename(i, "model/head.weight~@4,0", "model/head.weight~@5,0"), "outside its shape"),
    ("gap", lambda i: i["torchckpt"]["chunked"].update(
        shapes=i["torchckpt"]["chunked"]["shapes"].replace("5,36", "6,36", 1)), "cover 180 of its 216"),
    ("orphan chunk", lambda i: rename(i, "model/head.weight~@4,0", "model/nothing~@4,0"), "belongs to no tensor"),
    ("rank beyond the world", lambda i: rename(i, "rng/torch~r3", "rng/torch~r4"), "beyond the world size"),
    ("bad world size", lambda i: i["torchckpt"].update(world_size=0), "bad world_size"),
], ids=lambda v: v if isinstance(v, str) else "")
def test_a_chunk_table_that_does_not_tile_is_a_corrupt_checkpoint(world4, tmp_path, case, edit, message):
    path = tampered(world4, tmp_path, edit)
    with pytest.raises(torchckpt.CorruptCheckpointError, match=message) as info:
        load_opened.load_index(str(path), LOCAL)
    assert info.value.path == str(path)


def test_a_format_3_checkpoint_verifies_and_a_single_process_save_stays_format_1(world4, tmp_path):
    assert load_opened.load_index(str(world4 / "fsdp4" / "ckpt-1"), LOCAL).section["format_version"] == 3
    from torchckpt import cli

    assert cli.main(["verify", str(world4 / "fsdp4" / "ckpt-1")]) == 0
    path = torchckpt.Checkpoint(w=torch.ones(3), rng=torchckpt.RNGState(), c=torchckpt.PerRank(4)).write(tmp_path / "p")
    section = read_index(path)["torchckpt"]
    assert section["format_version"] == spec.PLAIN_FORMAT_VERSION == 1
    assert "world_size" not in section and "chunked" not in section
    assert "@per_rank" not in json.dumps(section["state"])


# -- bit flips in chunks a resharding restore reads in part (block checksums, format 3) --------


def flip_results(directory: Path, scenario: str, world: int, flips: int) -> list[dict]:
    """Each rank's flip counts, checked: every flip a CorruptCheckpointError, none silent, and the
    intact checkpoint restoring exactly afterwards."""
    found = ok(directory, scenario, world)
    for r in found:
        assert r["flips"] == flips
        assert r["silent"] == [] and r["other"] == [], r
        assert r["caught"] == flips
        assert r["paths_name_the_shard"]  # .path is the corrupt shard, on every rank
        assert r["differences"] == []
    return found


@pytest.mark.parametrize("world, job", [(3, "world3"), (4, "world4_from_2")])
def test_a_bit_flipped_in_a_chunk_read_in_part_fails_the_restore_on_every_rank(world, job, request):
    from tests.jobs.flips import FLIPS

    directory = request.getfixturevalue(job)
    found = flip_results(directory, "flips_from_2", world, FLIPS)
    assert found[0]["kinds"] == [FLIPS // 2, FLIPS // 2]  # model and optimizer state
    messages = [m for r in found for m in r["messages"]]
    assert any("fails the checksum of its block" in m for m in messages), messages  # a block, named
    assert all("~@" in m and "the shard is corrupt" in m for m in messages)


@pytest.mark.parametrize("scenario", ["flips_format_2", "flips_format_1"])
def test_without_block_checksums_a_part_read_is_checked_against_the_whole_tensor(world3, scenario):
    found = flip_results(world3, scenario, 3, 6)
    assert all("fails its checksum" in m for r in found for m in r["messages"])


@pytest.mark.slow
@pytest.mark.parametrize("world", [3, 4])
def test_100_bits_flipped_in_chunks_read_in_part_are_100_errors_and_0_silent_restores(world2, world):
    from tests.jobs.flips import FULL_FLIPS

    from .distributed import run_ranks

    run_ranks(world, world2, ["flips_from_2_full"], timeout=900)
    found = flip_results(world2, "flips_from_2_full", world, FULL_FLIPS)
    assert found[0]["kinds"] == [FULL_FLIPS // 2, FULL_FLIPS // 2]


def test_a_flipped_bit_in_a_block_is_reported_by_verify_and_refused_by_the_tools(world2, tmp_path, capsys):
    from torchckpt import cli

    path = tmp_path / "flips"
    shutil.copytree(world2 / "flips2", path)
    section = read_index(path)["torchckpt"]
    assert section["format_version"] == 3 and section["blocks"]["size"] == 2**20
    assert cli.main(["verify", str(path)]) == 0
    reader = torchckpt.load_checkpoint(path)
    name = "model/0.weight"  # 1200 x 768 float32: two chunks of two 1 MiB blocks each
    chunk = sorted(n for n in section["tensors"]["names"] if n.startswith(name + "~@"))[1]
    file, start, _ = reader.locate(chunk)
    flip_byte(file, start + 2**20 + 5, 0x10)  # one bit in the chunk's second block
    capsys.readouterr()
    assert cli.main(["verify", str(path)]) == 1
    err = capsys.readouterr()
    report = err.out + err.err
    assert f"Tensor {chunk!r}" in report and "fails its checksum" in report
    assert f"fails the checksum of its block 1 (bytes {2**20} to " in report
    with pytest.raises(torchckpt.CorruptCheckpointError, match=f"Tensor '{chunk}' in .* fails its checksum") as info:
        torchckpt.load_checkpoint(path).get_tensor(name)
    assert info.value.path == file
    assert cli.main(["export", str(path), "--object", "model", str(tmp_path / "export")]) == 1
    assert f"Tensor {chunk!r}" in capsys.readouterr().err
    assert cli.main(["consolidate", str(path), str(tmp_path / "one")]) == 1
    assert f"Tensor {chunk!r}" in capsys.readouterr().err


def test_fsdp2_restores_through_torchs_loaders_tied_weights_and_typed_refusals_on_2_ranks(world2):
    """A module with a loader of its own beside same-shaped DTensor parameters (none of them tied),
    an untied checkpoint into tied FSDP2 weights (both saved values would land in one local shard),
    and a manager's refusal to replace what is not a checkpoint: the same on every rank."""
    for found in results(world2, "hooked_and_tied", 2):
        assert found["hooked"] == "ok" and found["hooked_equal"] and found["hooked_version"] == 3, found
        assert found["tied"] == "ok" and found["tied_value"], found
        assert found["tied_unexpected"] == ["model/head.weight"], found
        assert found["refused"] == ["CheckpointWriteError", True] and found["notes_kept"], found
        assert found["hooked_tied"] == "ok" and found["hooked_tied_value"], found
        assert found["hooked_tied_unexpected"] == ["model/head.weight"], found
        assert found["shared"] == "ok" and found["shared_value"], found  # the head tracked last wins
        assert found["shared_unexpected"] == ["model/1.weight", "model/1.bias"], found  # used nowhere
        # probe79 F5: rank 1 holds no row of the head, and it reported them restored ("on rank 0" in ranks)
        assert found["shared_ranks"] == {} and found["shared_restored"] == [], found
