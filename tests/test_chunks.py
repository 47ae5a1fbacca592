"""Format 2's geometry and planning, without processes: names, overlaps, byte runs, tiling, the
global plan's balance, and a sharded save of a world of one on ``memory://``."""

from __future__ import annotations

import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st

import torchckpt
from torchckpt._format import chunks as format_chunks
from torchckpt._format import spec
from torchckpt._save import plan as save_plan


def test_stored_names_round_trip_and_never_collide_with_escaped_keys():
    assert format_chunks.chunk_name("model/w", (18, 0)) == "model/w~@18,0"
    assert format_chunks.parse_chunk_name("model/w~@18,0") == ("model/w", (18, 0))
    assert format_chunks.parse_chunk_name("model/scalar~@") == ("model/scalar", ())
    assert format_chunks.parse_rank_name("rng/torch~r3") == ("rng/torch", 3)
    assert format_chunks.parse_chunk_name("a~0@b") is None and format_chunks.parse_rank_name("a~0r1") is None
    with pytest.raises(torchckpt.CorruptCheckpointError, match="malformed chunk suffix"):
        format_chunks.parse_chunk_name("model/w~@01,x")


@st.composite
def two_boxes(draw):
    """A tensor shape and two boxes inside it."""
    shape = draw(st.lists(st.integers(1, 6), min_size=1, max_size=4))

    def box():
        offsets = [draw(st.integers(0, d - 1)) for d in shape]
        return tuple(offsets), tuple(draw(st.integers(1, d - o)) for o, d in zip(offsets, shape))

    return shape, box(), box()


@settings(max_examples=200, deadline=None)
@given(two_boxes())
def test_byte_runs_copy_exactly_the_overlap(case):
    """Copying the runs element by element gives what slicing the overlap gives."""
    shape, src_box, dst_box = case
    full = torch.arange(torch.Size(shape).numel()).reshape(shape)
    source = full[tuple(slice(o, o + n) for o, n in zip(*src_box))].contiguous().reshape(-1)
    dest = torch.full((torch.Size(dst_box[1]).numel(),), -1, dtype=full.dtype)
    inner = format_chunks.overlap(src_box, dst_box)
    if inner is None:
        assert any(a0 + an <= b0 or b0 + bn <= a0 for a0, an, b0, bn in zip(*src_box, *dst_box))
        return
    runs = list(format_chunks.runs(inner, src_box, dst_box))
    assert [s for s, _, _ in runs] == sorted(s for s, _, _ in runs)
    for s, d, n in runs:
        dest[d : d + n] = source[s : s + n]
    expected = torch.full(dst_box[1], -1, dtype=full.dtype)
    region = tuple(slice(i - d, i - d + n) for i, d, n in zip(inner[0], dst_box[0], inner[1]))
    expected[region] = full[tuple(slice(i, i + n) for i, n in zip(*inner))]
    assert torch.equal(dest.reshape(dst_box[1]), expected)


def test_a_dim_0_shard_is_one_run_and_a_row_wise_box_one_run_per_row():
    assert len(list(format_chunks.runs(((2, 0), (3, 8)), ((0, 0), (5, 8)), ((2, 0), (4, 8))))) == 1
    assert len(list(format_chunks.runs(((0, 0), (4, 2)), ((0, 0), (4, 4)), ((0, 0), (4, 2))))) == 4


@pytest.mark.parametrize("case, boxes, message", [
    ("tiles", [((0, 0), (2, 4)), ((2, 0), (3, 4))], None),
    ("overlap", [((0, 0), (3, 4)), ((2, 0), (3, 4))], "overlap"),
    ("gap", [((0, 0), (2, 4)), ((3, 0), (2, 4))], "cover 16 of its 20"),
    ("out of bounds", [((0, 0), (2, 4)), ((2, 0), (4, 4))], "outside its shape"),
    ("empty chunk", [((0, 0), (5, 4)), ((5, 0), (0, 4))], "outside its shape|is empty"),
    ("wrong rank", [((0,), (5,))], "dimensions"),
    ("2-D blocks", [((0, 0), (5, 2)), ((0, 2), (5, 2))], None),
    # probe77: a tensor listed without any chunk passed ("every chunk is the whole tensor"): verify
    # said OK, a read gave uninitialised memory and a restore left the tensor as it was, unreported
    ("no chunk", [], r"cover 0 of its 20 elements, and none holds the element at offsets \[0, 0\]"),
], ids=lambda v: v if isinstance(v, str) else "")
def test_tiling(case, boxes, message):
    if message is None:
        format_chunks.check_tiling("w", (5, 4), boxes, "here")
    else:
        with pytest.raises(torchckpt.CorruptCheckpointError, match=message):
            format_chunks.check_tiling("w", (5, 4), boxes, "here")


def test_only_a_tensor_without_elements_may_have_no_chunk():
    format_chunks.check_tiling("w", (0, 4), [], "here")
    for shape in ((), (1,), (3, 1)):
        with pytest.raises(torchckpt.CorruptCheckpointError, match="cover 0 of its"):
            format_chunks.check_tiling("w", shape, [], "here")


def ddp_records(world: int, sizes: list[int], extra: tuple = ()) -> list[dict]:
    """What each rank of a DDP job reports: the same square weights (and ``extra`` entries)."""
    entries = [[f"model/{i}.weight", "F32", [s, s], None, None, None, 0] for i, s in enumerate(sizes)]
    return [{"entries": [list(e) for e in [*entries, *extra]]} for _ in range(world)]


@pytest.mark.parametrize("world", [2, 3, 4, 8])
def test_replicated_bytes_are_spread_within_1_15x_of_the_mean(world):
    # GPT-2 small's shapes: one 154 MB embedding and many 2-9 MB matrices
    sizes = [768] * 2 + [2304] + [1024]
    records = ddp_records(world, [*sizes, *[768] * 24, *[3072] * 12],
                          (["model/wte", "F32", [50257, 768], None, None, None, 0],))
    plan = save_plan.global_plan(records, spec.DEFAULT_MAX_SHARD_SIZE)
    load = [sum(u.nbytes for u in plan.units if u.owner == r) for r in range(world)]
    assert max(load) / (sum(load) / world) <= 1.15, load
    assert "model/wte" in plan.chunked  # split into row blocks, which tile it (checked by the plan)
    assert all(len(u.holders) == world for u in plan.units)
    files = [f for rank in plan.files for f, _ in rank]
    assert files == [spec.shard_name(i, len(files)) for i in range(1, len(files) + 1)]


@pytest.mark.parametrize("rank_1, message", [
    (([0, 0], [8, 2]), "overlap"),  # rank 1 holds it replicated, rank 0 its Shard(0) half
    (([5, 0], [3, 2]), "cover 14 of its 16"),  # rows 4 to 5 held by no rank
])
def test_ranks_whose_layouts_of_one_dtensor_disagree_are_refused_naming_them_not_as_damage(rank_1, message):
    """probe30 F2: the reader's tiling check raised CorruptCheckpointError at save, which means a
    damaged checkpoint on disk, and named neither the ranks nor their chunks."""
    offsets, sizes = rank_1
    records = [{"entries": [["g", "F32", [8, 2], [0, 0], [4, 2], None, 0]]},
               {"entries": [["g", "F32", [8, 2], offsets, sizes, None, 0]]}]
    with pytest.raises(torchckpt.CheckpointError, match=message) as info:
        save_plan.global_plan(records, 10**6)
    assert not isinstance(info.value, torchckpt.CorruptCheckpointError)
    assert f"layouts that do not fit together (rank 0: [0:4, 0:2]; rank 1: [{offsets[0]}:{offsets[0] + sizes[0]}, 0:2])" \
        in str(info.value)
    assert "same mesh and placements" in str(info.value)


def test_the_plan_is_the_same_whatever_the_rank_and_each_unit_written_once():
    records = ddp_records(4, [512, 256, 1024, 128, 768, 64, 384, 896])
    first = save_plan.global_plan(records, 10**6)
    again = save_plan.global_plan([dict(r) for r in records], 10**6)
    assert [(u.stored, u.owner) for u in first.units] == [(u.stored, u.owner) for u in again.units]
    stored = [n for rank in first.files for _, names in rank for n in names]
    assert sorted(stored) == sorted(u.stored for u in first.units) and len(stored) == len(set(stored))


def test_fsdp2_on_memory_url_round_trips(gloo_world_of_one):
    """memory:// belongs to one process, so on it FSDP2 runs as a world of one (the multi-rank
    object-store run is on moto's S3 server, in test_distributed.py)."""
    pytest.importorskip("fsspec")
    from torch.distributed.fsdp import fully_shard

    model = torch.nn.Sequential(torch.nn.Linear(4, 6), torch.nn.Linear(6, 5))
    fully_shard(model)
    opt = torch.optim.Adam(model.parameters())
    model(torch.randn(3, 4)).sum().backward()
    opt.step()
    path = torchckpt.Checkpoint(model=model, opt=opt).save("memory://chunks-fsdp/ckpt")
    fresh = torch.nn.Sequential(torch.nn.Linear(4, 6), torch.nn.Linear(6, 5))
    fully_shard(fresh)
    fresh_opt = torch.optim.Adam(fresh.parameters())
    torchckpt.Checkpoint(model=fresh, opt=fresh_opt).restore("memory://chunks-fsdp").assert_consumed()
    assert path == "memory://chunks-fsdp/ckpt-1"
    for a, b in zip(model.state_dict().values(), fresh.state_dict().values()):
        assert torch.equal(a.full_tensor(), b.full_tensor())
    for a, b in zip(opt.state.values(), fresh_opt.state.values()):
        assert torch.equal(a["exp_avg"].full_tensor(), b["exp_avg"].full_tensor())
