"""Replicated state read once by the job (``_load.spread``): on real 2-rank gloo jobs (the ``read_once``
scenario of the shared ``world2`` job, ``tests/jobs/read_once.py``), and the split itself."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch

pytestmark = pytest.mark.skipif(not torch.distributed.is_available(), reason="needs torch.distributed")


def found(world2: Path) -> list[dict]:
    out = [json.loads((world2 / f"read_once-w2-rank{r}.json").read_text()) for r in range(2)]
    for rank, result in enumerate(out):
        assert "error" not in result, f"rank {rank}: {result['error']}\n{result.get('traceback')}"
    return out


@pytest.mark.parametrize("mode", [True, False, None], ids=["read_once", "every rank reads", "default"])
def test_replicated_state_restores_bit_for_bit_whoever_reads_it(world2: Path, mode: bool | None) -> None:
    for result in found(world2):
        assert result[f"consumed {mode}"] == "ok"
        assert result[f"equal {mode}"] is True
        assert result[f"versions moved {mode}"] is True  # a graph built before refuses backward() on every rank


def test_with_read_once_each_rank_reads_about_half_and_the_job_reads_it_once(world2: Path) -> None:
    ranks = found(world2)
    alone = [r["read False"] for r in ranks]  # each rank reads all it restores
    spread = [r["read True"] for r in ranks]
    assert all(s < 0.65 * a for s, a in zip(spread, alone))
    assert sum(spread) < 1.15 * max(alone)


def test_a_destination_read_twice_ends_as_without_spreading(world2: Path) -> None:
    assert all(r["twice equal"] is True for r in found(world2))
    assert all(r["views equal"] is True for r in found(world2))  # two tracked views of one buffer
    assert all(r["aliasing differs"] is True for r in found(world2))  # no hang, and each rank's sequential result


def test_views_of_one_flat_buffer_are_spread_as_any_tensors(world2: Path) -> None:
    for r in found(world2):
        assert r["flat equal True"] and r["flat equal False"]
        assert r["flat read True"] < 0.75 * r["flat read False"]  # about half each, not one rank reading it all


def test_on_one_host_the_default_reads_as_every_rank_would(world2: Path) -> None:
    for r in found(world2):  # ranks of one host share its page cache: spreading would only add broadcasts
        assert r["read None"] > 0.9 * r["read False"]


def test_ranks_restoring_different_lists_each_read_their_own(world2: Path) -> None:
    ranks = found(world2)
    assert all(r["equal differing"] is True for r in ranks)
    assert ranks[0]["read differing"] > 0.9 * ranks[0]["read False"]  # all it restores, itself
    assert 0 < ranks[1]["read differing"] < 0.6 * ranks[1]["read False"]  # its model: no optimizer state


def test_a_damaged_tensor_only_the_last_rank_reads_fails_the_restore_on_every_rank(world2: Path) -> None:
    name = (world2 / "read-once-damaged" / "damaged-name").read_text()
    for r in found(world2):
        assert r["damaged True"].startswith("CorruptCheckpointError: Restoring "), r["damaged True"]
        assert "failed on rank 1" in r["damaged True"] and name in r["damaged True"]
        assert r["damaged True_ranks"] == [1]
        assert r["damaged False"].startswith("CorruptCheckpointError: ")  # every rank reads it: each finds it


# -- the split, without processes ------------------------------------------------------------------


def planned(sizes: list[int], file_of=lambda i: "a.safetensors") -> tuple[object, list[torch.Tensor]]:
    """A restore plan reading float32 tensors of ``sizes`` elements, laid out in order."""
    from torchckpt._format.dtypes import TensorInfo
    from torchckpt._load.plan import Plan

    plan = Plan(read_once=True)
    dests, start = [], 0
    for i, n in enumerate(sizes):
        dest = torch.empty(n)
        plan.reads.append((dest, TensorInfo(f"t{i}", file_of(i), "F32", (n,), start, 4 * n)))
        dests.append(dest)
        start += 4 * n
    return plan, dests


class Rank:
    def __init__(self, rank: int) -> None:
        self.rank, self.group = rank, None


def test_the_split_gives_each_rank_a_contiguous_run_of_about_equal_bytes() -> None:
    from torchckpt._load import spread

    runs = []
    for rank in range(3):
        plan, dests = planned([100, 100, 100, 100, 100, 100, 300, 10, 10])
        found = spread.assign(plan, spread.replicated(plan), [["d", "h"]] * 3, Rank(rank))
        assert found is not None
        ids = {id(t): i for i, t in enumerate(dests)}
        runs.append([[ids[id(t)] for t in run] for run in found.runs])
        assert [ids[id(d)] for d, _ in plan.reads] == runs[-1][rank]  # the plan keeps this rank's run only
    assert runs[0] == runs[1] == runs[2] == [[0, 1, 2], [3, 4, 5], [6, 7, 8]]


def test_runs_follow_the_files_order_not_the_plans() -> None:
    from torchckpt._load import spread

    plan, dests = planned([5, 5, 5, 5], file_of=lambda i: "b.safetensors" if i < 2 else "a.safetensors")
    found = spread.assign(plan, spread.replicated(plan), [["d", "h"]] * 2, Rank(0))
    assert found is not None and found.runs[0] == [dests[2], dests[3]] and found.runs[1] == [dests[0], dests[1]]


@pytest.mark.parametrize(("read_once", "described"), [
    (True, [["d", "h"], ["e", "h"]]),  # the ranks' lists differ
    (True, [["d", "h"], None]),  # a rank does not spread (no CPU collectives there)
    (None, [["d", "h"], ["d", "h"]]),  # one host: its page cache serves the other ranks' reads
], ids=["lists differ", "a rank opts out", "one host"])
def test_no_spreading_unless_every_rank_agrees_and_it_pays(read_once: bool | None, described: list) -> None:
    from torchckpt._load import spread

    plan, _ = planned([10, 10])
    plan.read_once = read_once
    assert spread.assign(plan, spread.replicated(plan), described, Rank(0)) is None and len(plan.reads) == 2


def test_the_default_spreads_over_several_hosts() -> None:
    from torchckpt._load import spread

    plan, _ = planned([10, 10])
    plan.read_once = None
    found = spread.assign(plan, spread.replicated(plan), [["d", "host-a"], ["d", "host-b"]], Rank(1))
    assert found is not None and len(plan.reads) == 1
