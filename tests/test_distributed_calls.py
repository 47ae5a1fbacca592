"""Every rank makes the same collective call, or none of it happens: on real gloo jobs.

A rank that fails before the first exchange (its ``state_dict()`` raises), or that passes other
arguments, must fail that call on every rank at once, and the next call must pair step with step:
a checkpoint never holds one step on some ranks' rows and another step on the others'.
"""

from __future__ import annotations

import json

import pytest
import torch

import torchckpt

from .distributed import run_ranks
from .test_distributed import ok

pytestmark = pytest.mark.skipif(not torch.distributed.is_available(), reason="needs torch.distributed")


def holds_one_step(path: str, step: int) -> None:
    """Every element of every model tensor, and the plain ``step``, are this save's step."""
    reader = torchckpt.load_checkpoint(path)
    names = [n for n in reader.get_variable_to_shape_map() if n.startswith("model/") and "steps_seen" not in n]
    assert names
    for name in names:
        values = reader.get_tensor(name)
        assert torch.all(values == step), f"{path}: {name} holds {sorted(set(values.flatten().tolist()))}, not {step}"
    assert reader.get_state()["step"] == step


@pytest.mark.parametrize("mode", ["write", "save", "manager", "manager_async"])
def test_a_state_dict_raising_on_one_rank_fails_that_save_on_every_rank_and_the_next_pair_correctly(world2, mode):
    found = [r[mode] for r in ok(world2, "one_rank_fails_capture", 2)]
    for steps in found:
        first = steps[0]
        assert first["step"] == 1 and "error" in first, first
        assert first["error"].startswith("CheckpointError: Saving ")
        assert "failed on rank 1: data loader hiccup" in first["error"]
        assert first["ranks"] == [1]
        assert first["seconds"] < 10  # at once, not after the other rank's timeout
        assert [s.get("error") for s in steps[1:3]] == [None, None], steps
    assert found[0][0]["error"] == found[1][0]["error"]  # the same error on every rank
    paths = [[s["path"] for s in steps[1:3]] for steps in found]
    assert paths[0] == paths[1]  # the same checkpoints on every rank
    for step, path in zip((2, 3), paths[0]):
        holds_one_step(path, step)
    if mode.startswith("manager"):
        assert found[0][3] == found[1][3] == {"checkpoints": ["ckpt-1", "ckpt-2"]}  # the failed save took no number


def test_ranks_making_different_calls_are_refused_on_every_rank(world2):
    found = ok(world2, "mismatched_calls", 2)
    expected = {
        "path": "path: ",
        "async_save": "async_save: true on rank 0; false on rank 1",
        "max_shard_size": "max_shard_size: 2000000 on rank 0; 1048576 on rank 1",
        "save_counter": "save_counter: 0 on rank 0; 5 on rank 1",
        "restore": "path: ",
        "manager": "max_to_keep: 2 on rank 0; 3 on rank 1",
    }
    for name, fragment in expected.items():
        messages = [r[name] for r in found]
        assert messages[0] == messages[1], name  # the same error on every rank
        assert messages[0].startswith("CheckpointError: "), messages[0]
        assert "was refused on every rank: the ranks did not make the same call" in messages[0]
        assert fragment in messages[0], (name, messages[0])
        assert found[0][f"{name}_ranks"] == [1]
        assert all(r[f"{name}_seconds"] < 10 for r in found)
    assert all(r["good"] == "ok" for r in found)  # the next matching call pairs correctly
    assert found[0]["exists"] == ["good", "meanwhile", "notes"]  # nothing of the refused calls was written
    reader = torchckpt.load_checkpoint(str(world2 / "mismatch" / "good"))
    assert any(name.startswith("model/") for name in reader.get_variable_to_shape_map())


def test_a_write_on_several_ranks_never_replaces_a_folder_of_other_files(world2):
    found = ok(world2, "mismatched_calls", 2)
    refusals = [r["over_other_files"] for r in found]
    assert refusals[0] == refusals[1] and refusals[0].startswith("CheckpointWriteError: "), refusals
    assert "notes is a folder of other files (todo.txt), not a checkpoint, so this save did not replace it and " \
           "nothing was written: it replaces only a checkpoint. Move it away, or write to another path." in refusals[0]
    assert (world2 / "mismatch" / "notes" / "todo.txt").read_text() == "keep me"
    meanwhile = [r["appears_meanwhile"] for r in found]  # made at the path while the ranks wrote: checked again
    assert meanwhile[0] == meanwhile[1] and "meanwhile is a folder of other files (src, train.py)" in meanwhile[0]
    assert (world2 / "mismatch" / "meanwhile" / "train.py").read_text() == "precious"
    assert sorted(p.name for p in (world2 / "mismatch").iterdir()) == ["good", "meanwhile", "notes"]  # no temporary


def test_a_collective_restore_says_what_state_each_rank_is_left_in(world2):
    rank0, rank1 = ok(world2, "restore_failures", 2)
    # rank 1's load_state_dict raised: the object's mismatch, not damage; rank 0 had restored its part and says so
    assert rank1["fails_on_1"].startswith("CheckpointError: Restoring ")
    assert "failed on rank 1: " in rank1["fails_on_1"] and "cannot take this state" in rank1["fails_on_1"]
    assert "while 'extra' loaded its state" in rank1["fails_on_1"] and rank1["fails_on_1_key"] == "extra"
    assert rank0["fails_on_1"].startswith(rank1["fails_on_1"])
    assert rank0["fails_on_1"].endswith("so its objects are partly restored: restore again on every rank (or start "
                                        "from initial values) before training on.")
    assert "This rank had already restored its own part" not in rank1["fails_on_1"]
    # rank 1 came 4 s late to a restore with a 2 s timeout
    assert rank0["late"].startswith("RankTimeoutError: Rank 1 did not reach the call step of restoring ")
    assert "within 2 s" in rank0["late"] and "Nothing was restored." in rank0["late"]
    assert "Nothing was committed" not in rank0["late"]
    assert rank1["late"].startswith("CheckpointError: Restoring ")
    assert "was abandoned by the other ranks before this rank arrived (rank 0 gave up waiting" in rank1["late"]
    assert rank1["late_seconds"] < 4 + 2  # at once on arrival, not after its own timeout
    assert rank0["next"] == rank1["next"] == "ok"  # the next call pairs correctly
    assert rank0["restored"] and rank1["restored"]


def test_damage_seen_by_one_rank_makes_every_rank_fall_back_to_the_same_checkpoint(world2):
    found = ok(world2, "damaged_on_one_rank", 2)
    for r in found:
        assert r["restored"] == str(world2 / "damaged-one-rank" / "ckpt-2"), r
        assert r["step"] == 2 and r["values"] == [2.0]
        assert len(r["warnings"]) == 1 and "ckpt-3 is damaged, so it was not used: " in r["warnings"][0]
        assert "checksum" in r["warnings"][0] and "failed on rank 1" in r["warnings"][0]
        # A shard header only rank 1 reads disagrees with the index: found by rank 1 alone, before it read.
        assert r["header_restored"] == str(world2 / "damaged-one-rank" / "ckpt-1"), r
        assert r["header_step"] == 1 and r["header_values"] == [1.0]
        ckpt2 = [w for w in r["header_warnings"] if "ckpt-2 is damaged, so it was not used: " in w]
        assert len(ckpt2) == 1 and "failed on rank 1" in ckpt2[0] and "failed too" not in ckpt2[0], ckpt2
        assert "holds I32" in ckpt2[0], ckpt2
        assert r["left"] == r["header_left"] == {}  # the checkpoint fallen back to restored every key
        assert r["grown_restored"] == str(world2 / "grown-damaged" / "ckpt-1") and r["grown_left"] == {"ema": "ckpt-2"}
        assert r["header_read"].startswith("CorruptCheckpointError: ") and "holds I32" in r["header_read"], r
        assert "already restored its own part" not in r["header_read"] and r["header_read_untouched"], r


def test_calls_stay_paired_after_an_async_save_a_skipped_call_and_per_rank_order(world2):
    rank0, rank1 = ok(world2, "calls_stay_paired", 2)
    for r in (rank0, rank1):  # the restore waits for the background save before its exchanges: no deadlock
        assert r["async_then_restore"] == "ok" and r["async_then_restore_seconds"] < 10, r
    # rank 1 restored None while rank 0 restored a path: refused on both, and the next calls pair
    assert rank0["none_on_one_rank"] == rank1["none_on_one_rank"]
    assert "the ranks did not make the same call (path: " in rank0["none_on_one_rank"]
    assert "null on rank 1" in rank0["none_on_one_rank"]
    assert rank0["next"] == rank1["next"] == "ok" and rank0["after"] == rank1["after"] == "ok"
    # per-rank values tracked in another order on rank 1 come back to their own keys
    assert rank0["per_rank"] == [1, 2] and rank1["per_rank"] == [11, 12]
    # a strict resume that mismatches on rank 1 only raises RestoreMismatchError on both
    for r in (rank0, rank1):
        assert r["strict"].startswith("RestoreMismatchError: The restore of ") and r["strict_ranks"] == [1], r
        assert "did not match on rank 1 (strict=True)" in r["strict"]
    for r in (rank0, rank1):  # every rank's report lists rank 1's mismatches, and where they were found
        assert r["strict_report_mine"] and {tuple(v) for v in r["strict_report_ranks"].values()} == {(1,)}, r


@pytest.mark.parametrize("call", ["write", "skipped_save", "restore"])
def test_a_call_that_returned_on_rank_0_has_returned_on_every_rank_even_if_rank_0_then_exits(tmp_path, call):
    """Rank 0 serves the c10d store and ends its process as soon as its last call returns (a
    preempted run's exit): rank 1's same call still returns the same, instead of "Lost contact"."""
    codes = run_ranks(2, tmp_path, [call], timeout=120, module="tests.jobs.rank0_exits")
    outcome = json.loads((tmp_path / f"rank1-{call}.json").read_text())
    expected = {"write": str(tmp_path / "written"), "skipped_save": None, "restore": str(tmp_path / "run" / "ckpt-1")}
    assert outcome == {"returned": expected[call]}
    assert codes == [0, 0]
