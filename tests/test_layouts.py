"""Each rank plans its part of a save alone (``_save.layouts``), and the parts add up to the general plan.

The ranks are simulated: each one's record (entries and DTensor layouts) is built here the way
``_save.collective.capture`` builds it, with each chunk's box from torch's own ``Shard`` rule, so
no process group is needed and many ranks cost nothing.
"""

from __future__ import annotations

import itertools
import math

import pytest
import torch
from torch.distributed.tensor.placement_types import Shard, _StridedShard

from torchckpt._dist import dtensor as dist_dtensor
from torchckpt._format import spec
from torchckpt._save import layouts, plan

F32 = "F32"


def box_of(shape: tuple[int, ...], mesh: tuple[int, ...], placements: tuple[str, ...],
           coordinate: tuple[int, ...]) -> tuple[list[int], list[int]]:
    """This coordinate's chunk, by torch's rule for ``Shard`` (each placement on its own dimension);
    a strided shard (``"S0/2"``) or a dimension sharded twice by torch's own split of its indices."""
    sharded = [p for p in placements if p != "R"]
    if any("/" in p for p in sharded) or len(set(sharded)) < len(sharded):
        return split_box(shape, mesh, placements, coordinate)
    offsets, sizes = [0] * len(shape), list(shape)
    for size, placement, c in zip(mesh, placements, coordinate):
        if placement != "R":
            d = int(placement[1:])
            sizes[d], start = Shard.local_shard_size_and_offset(shape[d], size, c)
            offsets[d] = start if sizes[d] else 0
    return offsets, sizes


def split_box(shape: tuple[int, ...], mesh: tuple[int, ...], placements: tuple[str, ...],
              coordinate: tuple[int, ...]) -> tuple[list[int], list[int]]:
    """The chunk ``distribute_tensor`` gives this coordinate: each dimension's indices split by the
    placements in mesh order (``_split_tensor``), as FSDP2 over tensor parallelism lays them out."""
    offsets, sizes = [], []
    for dim, n in enumerate(shape):
        held = torch.arange(n).reshape([n if d == dim else 1 for d in range(len(shape))])
        for size, placement, c in zip(mesh, placements, coordinate):
            at, _, factor = placement[1:].partition("/")
            if placement == "R" or int(at) != dim:
                continue
            split = _StridedShard(dim, split_factor=int(factor)) if factor else Shard(dim)
            parts, _ = split._split_tensor(held, size, with_padding=False, contiguous=True)
            held = parts[c] if c < len(parts) else held[:0]
        held = held.reshape(-1)
        assert torch.equal(held, torch.arange(int(held[0]), int(held[0]) + len(held))) if len(held) else True
        offsets.append(int(held[0]) if len(held) else 0)
        sizes.append(len(held))
    return offsets, sizes


def records(mesh: tuple[int, ...], tensors: list[tuple[str, tuple[int, ...], tuple[str, ...] | None]],
            ) -> list[tuple[list[list], dict]]:
    """Every rank's (entries, layouts): ``placements`` None for a plain (replicated) tensor."""
    out = []
    for coordinate in itertools.product(*(range(n) for n in mesh)):
        entries, found = [], {}
        for name, shape, placements in tensors:
            if placements is None:
                entries.append([name, F32, list(shape), None, None, "00", 0])
            else:
                offsets, sizes = box_of(shape, mesh, placements, coordinate)
                entries.append([name, F32, list(shape), offsets, sizes, None, 0])
                found[name] = (mesh, placements, coordinate)
        out.append((entries, found))
    return out


def drafts(mesh: tuple[int, ...], tensors: list, max_shard_size: int = 10**6) -> list[plan.RankPlan]:
    world = math.prod(mesh)
    made = [layouts.draft(entries, found, set(), rank, world, max_shard_size)
            for rank, (entries, found) in enumerate(records(mesh, tensors))]
    assert all(d is not None for d in made)
    assert len({d.structure for d in made}) == 1  # every rank sends the same digest
    counts = [len(d.shards) for d in made]
    return [layouts.numbered(d, counts, rank) for rank, d in enumerate(made)]


CASES = {
    "fsdp even": ((4,), [("w", (8, 3), ("S0",)), ("b", (8,), ("S0",)), ("step", (), None)]),
    "fsdp uneven and empty": ((4,), [("w", (5, 3), ("S0",)), ("tiny", (1, 2), ("S0",)), ("b", (3,), ("S0",))]),
    "hsdp": ((2, 3), [("w", (7, 4), ("R", "S0")), ("v", (6,), ("R", "S0")), ("u", (2, 2), ("R", "R"))]),
    "2-d distinct dims": ((2, 2), [("w", (4, 6), ("S0", "S1")), ("n", (4,), ("R", "S0"))]),
    "replicated dtensors": ((3,), [(f"r{i}", (4,), ("R",)) for i in range(7)]),
    "plain, one split": ((2,), [("emb", (4096, 2048), None), ("x", (3,), None), ("w", (4, 2), ("S0",))]),
    # FSDP2 over tensor parallelism: a column-parallel weight is strided, a row-parallel one is not
    # (these took the general plan, every rank's full list on every rank, at every save)
    "fsdp over tp": ((2, 2), [("colwise", (8, 3), ("S0/2", "S0")), ("bias", (6,), ("S0/2", "S0")),
                              ("rowwise", (4, 6), ("S0", "S1")), ("odd", (5, 2), ("S0/2", "S0")),
                              ("one row", (1, 4), ("S0/2", "S0"))]),
    "fsdp over tp, 2 x 4": ((2, 4), [("w", (8, 2), ("S0/4", "S0")), ("three", (3,), ("S0/4", "S0")),
                                     ("six", (6, 2), ("S0/4", "S0"))]),
    "hsdp over tp": ((2, 2, 2), [("w", (8, 4), ("R", "S0/2", "S0")), ("v", (7,), ("R", "S0/2", "S0"))]),
    "a dimension sharded twice": ((2, 2), [("w", (5, 2), ("S0", "S0")), ("v", (2,), ("S0", "S0"))]),
    "strided columns": ((2, 2), [("w", (3, 8), ("S1/2", "S1")), ("u", (2, 5, 6), ("S2/2", "S2"))]),
}


@pytest.mark.parametrize("case", ["fsdp over tp", "fsdp over tp, 2 x 4", "hsdp over tp", "a dimension sharded twice",
                                  "strided columns"])
def test_every_rank_counts_the_chunks_and_finds_its_own_as_torch_splits_the_tensor(case: str) -> None:
    mesh, tensors = CASES[case]
    for _, shape, placements in tensors:
        boxes = {coordinate: split_box(shape, mesh, placements, coordinate)
                 for coordinate in itertools.product(*(range(n) for n in mesh))}
        for coordinate, (offsets, sizes) in boxes.items():
            assert dist_dtensor.box_at(shape, mesh, placements, coordinate) == (tuple(offsets), tuple(sizes))
        non_empty = {(tuple(o), tuple(z)) for o, z in boxes.values() if math.prod(z)}
        assert dist_dtensor.chunk_count(shape, mesh, placements) == len(non_empty)


def stored_units(p: plan.RankPlan) -> set[tuple]:
    return {(u.stored, u.logical, u.box) for u in p.units.values()}


@pytest.mark.parametrize("case", list(CASES), ids=list(CASES))
def test_the_ranks_parts_are_the_general_plans_units_each_written_once(case: str) -> None:
    mesh, tensors = CASES[case]
    parts = drafts(mesh, tensors)
    general = plan.global_plan([{"entries": e} for e, _ in records(mesh, tensors)], 10**6)
    written = [stored_units(p) for p in parts]
    assert sum(map(len, written)) == len(set().union(*written))  # no unit written twice
    assert set().union(*written) == {(u.stored, u.logical, u.box) for u in general.units}
    assert all(p.chunked == general.chunked for p in parts)
    files = [f for p in parts for f, _ in p.files]
    assert files == [spec.shard_name(i + 1, len(files)) for i in range(len(files))]  # numbered in rank order
    for p in parts:  # a rank's files hold exactly its units
        assert sorted(n for _, names in p.files for n in names) == sorted(p.units)


def test_replicated_chunks_are_spread_over_their_holders() -> None:
    parts = drafts((3,), CASES["replicated dtensors"][1])
    assert [len(p.units) for p in parts] == [3, 2, 2]


def test_a_save_that_stores_nothing_writes_one_empty_shard_on_rank_0() -> None:
    parts = drafts((2,), [])
    assert [p.files for p in parts] == [[(spec.shard_name(1, 1), [])], []]


@pytest.mark.parametrize("layout", [None, ((4,), ("S0",), (0,))], ids=["outside the mesh or another placement", "mesh of another size"])
def test_a_layout_the_rank_cannot_plan_alone_asks_for_the_general_plan(layout: tuple | None) -> None:
    entries = [["w", F32, [8], [0], [4], None, 0]]
    assert layouts.draft(entries, {"w": layout}, set(), 0, 2, 10**6) is None


def test_the_structure_covers_what_the_ranks_must_agree_on() -> None:
    def structure(entries: list[list]) -> str:
        made = layouts.draft(entries, {"w": ((2,), ("S0",), (0,))}, set(), 0, 2, 10**6)
        assert made is not None
        return made.structure

    base = [["w", F32, [4], [0], [2], None, 0], ["step", F32, [], None, None, "aa", 0]]
    assert structure(base) == structure([list(e) for e in base])
    other_value = [base[0], ["step", F32, [], None, None, "bb", 0]]
    other_dtype = [["w", "BF16", [4], [0], [2], None, 0], base[1]]
    other_group = [["w", F32, [4], [0], [2], None, 1], base[1]]
    assert len({structure(base), structure(other_value), structure(other_dtype), structure(other_group)}) == 4


def test_per_rank_tensors_are_the_ranks_own_and_outside_the_structure() -> None:
    w = [["w", F32, [4], [0], [2], None, 0]]
    mine = layouts.draft([*w, ["rng~r0", "U8", [16], None, None, None, 0]], {"w": ((2,), ("S0",), (0,))},
                         {"rng~r0"}, 0, 2, 10**6)
    theirs = layouts.draft([["w", F32, [4], [2], [2], None, 0], ["rng~r1", "U8", [8], None, None, None, 0]],
                           {"w": ((2,), ("S0",), (1,))}, {"rng~r1"}, 1, 2, 10**6)
    assert mine is not None and theirs is not None and mine.structure == theirs.structure
    assert "rng~r0" in mine.units and "rng~r1" in theirs.units


def test_the_plan_of_a_structure_is_kept_for_the_next_save() -> None:
    entries, found = records((2,), CASES["fsdp even"][1])[1]
    first = layouts.draft(entries, found, set(), 1, 2, 10**6)
    assert first is not None
    assert layouts.draft([list(e) for e in entries], dict(found), set(), 1, 2, 10**6) is first
    assert layouts.draft(entries, found, set(), 1, 2, 10**5) is not first  # another limit: another plan
    stepped = [e if e[0] != "step" else [*e[:5], "01", e[6]] for e in entries]  # Adam's step moved on
    again = layouts.draft(stepped, found, set(), 1, 2, 10**6)
    assert again is not None and again.units is first.units  # the same plan...
    assert again.structure != first.structure  # ...under the digest the ranks compare, with the new value



def test_a_save_right_after_another_gets_the_plan_of_its_own_chunks_rank_and_limit() -> None:
    # the digests of the last save's lists are taken again where the lists are equal: whatever
    # save came just before, each gets the plan it gets after a save of another structure (a guard:
    # it held before the digests were kept; one kept by the structure alone fails it)
    def summary(offsets: int, coordinate: int, rank: int, limit: int) -> tuple:
        entries = [["w", F32, [4, 256], [offsets, 0], [2, 256], None, 0], ["p", F32, [512], None, None, "aa", 0]]
        made = layouts.draft(entries, {"w": ((2,), ("S0",), (coordinate,))}, set(), rank, 2, limit)
        assert made is not None
        return made.structure, made.shards, sorted((u.stored, u.box) for u in made.units.values())

    cases = [(0, 0, 0, 10**6), (2, 1, 0, 10**6), (0, 0, 1, 10**6), (0, 0, 0, 3000)]
    expected = {}
    for case in cases:
        layouts.draft([["other", F32, [1], None, None, "bb", 0]], {}, set(), 0, 1, 10**6)  # nothing kept for it
        expected[case] = summary(*case)
    assert len({str(v) for v in expected.values()}) == len(cases)  # each a plan of its own
    for before, case in itertools.product(cases, cases):
        summary(*before)
        assert summary(*case) == expected[case], (before, case)
