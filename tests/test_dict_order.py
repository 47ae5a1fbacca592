"""A dict comes back in the order it was saved, whatever order the shards store its tensors in.

A shard stores its widest elements first, frozen tensors get shards of their own, and tied tensors
are stored once: each of these puts a dict's tensors in another order on disk than in the dict.
Code that pairs entries by position (an EMA that zips its shadow with ``state_dict().items()``)
was silently wrong when a dict came back in the disk's order.
"""

from __future__ import annotations

import io
import json
import shutil
import tempfile
from pathlib import Path

import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st

import torchckpt
from torchckpt._format import tree as format_tree
from torchckpt._format.dict_order import keep_dict_order

from .conftest import read_index


class EMA:
    """A user's EMA whose loader pairs the saved shadow with the model's keys by position."""

    def __init__(self, model: torch.nn.Module) -> None:
        self.model = model
        self.shadow = {k: v.detach().clone() for k, v in model.state_dict().items()}

    def state_dict(self) -> dict:
        return {"shadow": self.shadow}

    def load_state_dict(self, state: dict) -> None:
        for (key, _), value in zip(self.model.state_dict().items(), state["shadow"].values()):
            self.shadow[key] = value.clone()


def bn_net(seed: int, dtype: torch.dtype = torch.float32) -> torch.nn.Module:
    torch.manual_seed(seed)
    return torch.nn.Sequential(torch.nn.Linear(3, 2), torch.nn.BatchNorm1d(2)).to(dtype)  # int64 num_batches_tracked


def stepped_adam(model: torch.nn.Module) -> torch.optim.Adam:
    opt = torch.optim.Adam(model.parameters())
    model(torch.randn(4, 3, dtype=next(model.parameters()).dtype)).sum().backward()
    opt.step()
    return opt


def orders(value):
    """Every dict's keys, in order, by where the dict sits."""
    out = {}

    def walk(v, path):
        if isinstance(v, dict):
            out[path] = list(v)
            for k, child in v.items():
                walk(child, f"{path}/{k!r}")
        elif isinstance(v, (list, tuple)):
            for i, child in enumerate(v):
                walk(child, f"{path}/{i}")

    walk(value, "")
    return out


def torch_load_of(value):
    buffer = io.BytesIO()
    torch.save(value, buffer)
    buffer.seek(0)
    return torch.load(buffer)


def test_a_resumed_run_gets_every_dict_back_in_its_order(tmp_path):
    model = bn_net(0, torch.float64)  # Adam's float64 moments are stored before its float32 step
    opt = stepped_adam(model)
    stats = {"loss_sum": torch.tensor(1.5), "count": torch.tensor(7)}
    ema = EMA(bn_net(1))
    path = torchckpt.Checkpoint(model=model, opt=opt, stats=stats, ema=ema).write(tmp_path / "c")

    model2 = bn_net(2, torch.float64)
    opt2 = torch.optim.Adam(model2.parameters())
    ema2 = EMA(bn_net(3))
    ckpt = torchckpt.Checkpoint(model=model2, opt=opt2, stats={}, ema=ema2)
    ckpt.restore(path).assert_consumed()

    assert list(opt2.state_dict()["state"][0]) == ["step", "exp_avg", "exp_avg_sq"]
    assert list(ckpt.stats) == ["loss_sum", "count"]
    assert list(ema2.shadow) == list(ema.shadow)
    assert all(torch.equal(ema.shadow[k], ema2.shadow[k]) and ema.shadow[k].dtype == ema2.shadow[k].dtype
               for k in ema.shadow)  # each value under its own key, not its neighbour's
    loaded = torchckpt.load_state(path)
    reference = torch_load_of({"model": model.state_dict(), "opt": opt.state_dict(), "stats": stats})
    for name in ("model", "opt", "stats"):
        assert orders(loaded[name]) == orders(reference[name])


def frozen_first_layer() -> dict:
    net = torch.nn.Sequential(torch.nn.Linear(2, 2), torch.nn.Linear(2, 2))
    net[1].weight.requires_grad_(False)  # frozen parameters get shards of their own, stored first
    return {"net": net}


def tied_in_the_middle() -> dict:
    weight = torch.ones(3)
    return {"tied": {"a": weight, "b": weight, "c": torch.zeros(2)}}  # "b" is stored as an alias, listed last


def widths() -> dict:
    return {"mixed": {"int8": torch.ones(3, dtype=torch.int8), "half": torch.ones(3, dtype=torch.float16),
                      "double": torch.ones(3, dtype=torch.float64)}}


def values_then_tensors() -> dict:
    return {"mixed": {"epoch": 3, "name": "x", "small": torch.ones(2, dtype=torch.int16), "big": torch.ones(2)}}


def escaped_keys() -> dict:
    return {"mixed": {"a/b": torch.ones(2, dtype=torch.int8), "~c": torch.ones(2, dtype=torch.int64)}}


def inside_containers() -> dict:
    inner = {"lo": torch.ones(1, dtype=torch.uint8), "hi": torch.ones(1, dtype=torch.float64)}
    return {"nested": {7: dict(inner), "list": [dict(inner)], "tuple": (dict(inner), 1)}}


def at_the_root() -> dict:
    return {"small": torch.ones(2, dtype=torch.int8), "big": torch.ones(2, dtype=torch.float64)}


CASES = [frozen_first_layer, tied_in_the_middle, widths, values_then_tensors, escaped_keys, inside_containers,
         at_the_root]


@pytest.mark.parametrize("async_save", [False, True], ids=["sync", "async"])
@pytest.mark.parametrize("make", CASES, ids=lambda f: f.__name__)
def test_the_order_survives_what_the_layout_reorders(tmp_path, make, async_save):
    state = make()
    ckpt = torchckpt.Checkpoint(**state)
    mgr = torchckpt.CheckpointManager(ckpt, tmp_path, async_save=async_save)
    path = mgr.save()
    mgr.close()
    loaded = torchckpt.load_state(path)
    expected = torch_load_of({k: v.state_dict() if isinstance(v, torch.nn.Module) else v for k, v in state.items()})
    assert {p: o for p, o in orders(loaded).items() if p} == {p: o for p, o in orders(expected).items() if p}
    assert list(loaded)[: len(state)] == list(state)


def test_only_the_dicts_the_layout_reorders_are_marked_in_the_index(tmp_path):
    model = torch.nn.Sequential(*[torch.nn.Linear(4, 4) for _ in range(20)])  # one dtype: stored in its order
    mixed = {"loss_sum": torch.tensor(1.5), "count": torch.tensor(7)}
    path = torchckpt.Checkpoint(model=model, stats=mixed).write(tmp_path / "c")
    state = read_index(Path(path))["torchckpt"]["state"]
    assert "model" not in state or state["model"] == {}  # the model's 40 tensors: no mark, a small index
    assert state["stats"] == {"loss_sum": {"@tensor": None}}  # the first placed; "count" follows as stored


def test_a_consolidated_or_a_rewritten_tree_keeps_the_marks_it_has():
    tensors: dict[str, torch.Tensor] = {}
    tree = format_tree.encode({"d": {"a": torch.ones(1), "b": torch.ones(1)}, "e": {"x": torch.ones(1)}}, "", tensors)
    before = json.loads(json.dumps(tree))
    keep_dict_order(tree, list(tensors), list(tensors))  # stored in the tree's order: nothing to mark
    assert tree == before
    keep_dict_order(tree, list(tensors), ["e/x", "d/b", "d/a"])
    assert tree == {"d": {"a": {"@tensor": None}}, "e": {}}  # "a" placed first, "b" after it; "e": one tensor
    keep_dict_order(tree, list(tensors), ["d/b", "d/a", "e/x"])  # marked already: unchanged
    assert tree == {"d": {"a": {"@tensor": None}}, "e": {}}
    three: dict[str, torch.Tensor] = {}
    tree = format_tree.encode({"d": {"a": torch.ones(1), "b": torch.ones(1), "c": torch.ones(1)}}, "", three)
    keep_dict_order(tree, list(three), ["d/b", "d/c", "d/a"])
    assert tree == {"d": {"a": {"@tensor": None}}}  # the shortest run from the first that leaves the rest in order
    tree = format_tree.encode({"d": {"a": torch.ones(1), "b": torch.ones(1), "c": torch.ones(1)}}, "", {})
    keep_dict_order(tree, list(three), ["d/a", "d/c", "d/b"])
    assert tree == {"d": {"a": {"@tensor": None}, "b": {"@tensor": None}}}


def test_a_per_rank_value_in_one_process_keeps_its_order(tmp_path):
    cursor = torchckpt.PerRank({"small": torch.ones(1, dtype=torch.int8), "big": torch.ones(1, dtype=torch.float64)})
    path = torchckpt.Checkpoint(cursor=cursor).write(tmp_path / "c")
    assert list(torchckpt.load_state(path)["cursor"]) == ["small", "big"]


DTYPES = [torch.bool, torch.int8, torch.float16, torch.bfloat16, torch.int32, torch.float32, torch.int64, torch.float64]
tensors_st = st.builds(lambda dtype, n: torch.zeros(n, dtype=dtype), st.sampled_from(DTYPES), st.integers(0, 3))
leaves = st.one_of(tensors_st, st.integers(-3, 3), st.text(max_size=3))
nested = st.recursive(
    leaves,
    lambda children: st.one_of(
        st.dictionaries(st.text(alphabet="ab/~0", min_size=1, max_size=3), children, max_size=5),
        st.dictionaries(st.integers(0, 5), children, max_size=3),
        st.lists(children, max_size=3),
    ),
    max_leaves=14,
)


@given(state=st.dictionaries(st.sampled_from(["p", "q", "r"]), nested, min_size=1, max_size=3),
       shard=st.sampled_from([8, 64, 2**20]))
@settings(max_examples=80, deadline=None)
def test_any_nested_state_comes_back_in_its_order(state, shard):
    directory = Path(tempfile.mkdtemp(prefix="dict-order-"))
    try:
        path = torchckpt.save_state(state, directory / "s", max_shard_size=shard)  # every tensor placed: a control
        assert orders(torchckpt.load_state(path)) == orders(state)
        path = torchckpt.Checkpoint(**state).write(directory / "c", max_shard_size=shard)
        loaded = torchckpt.load_state(path)
        assert {k: orders(loaded[k]) for k in state} == {k: orders(v) for k, v in state.items()}
    finally:
        shutil.rmtree(directory, ignore_errors=True)


def test_a_model_whose_tensors_align_in_save_order_is_stored_in_it_and_needs_no_marks(tmp_path):
    model = bn_net(0)  # float32 weights of even sizes and an int64 counter: aligned in save order
    path = torchckpt.Checkpoint(model=model).write(tmp_path / "c")
    index = read_index(Path(path))
    assert index["torchckpt"]["tensors"]["names"] == [f"model/{k}" for k in model.state_dict()]
    assert "@tensor" not in json.dumps(index["torchckpt"]["state"])


def test_a_save_order_that_would_misalign_a_tensor_is_stored_widest_first_every_tensor_aligned(tmp_path):
    from .damage import tensor_span

    state = {"odd": torch.ones(3, dtype=torch.int8), "half": torch.ones(3, dtype=torch.float16),
             "wide": torch.ones(2, dtype=torch.float64), "word": torch.ones(1, dtype=torch.int32)}
    path = torchckpt.Checkpoint(d=state).write(tmp_path / "c")
    shard = str(next(Path(path).glob("*.safetensors")))
    starts = {name: tensor_span(shard, f"d/{name}")[0] for name in state}
    assert all(starts[name] % t.element_size() == 0 for name, t in state.items())  # the data starts 8-aligned
    assert sorted(starts, key=starts.get) == ["wide", "word", "half", "odd"]
    assert list(torchckpt.load_state(path)["d"]) == list(state)
