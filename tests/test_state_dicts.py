"""``save_state``/``load_state``: a dict in, the same dict out, as ``torch.save``/``torch.load``
would give it, with nothing pickled; and any checkpoint read back as a dict."""

from __future__ import annotations

import collections
import os

import pytest
import safetensors.torch
import torch

import torchckpt
from torchckpt._format import spec

from .conftest import assert_same, read_index, sealed_json


@pytest.fixture
def trained():
    torch.manual_seed(0)
    model = torch.nn.Sequential(torch.nn.Linear(4, 8), torch.nn.BatchNorm1d(8), torch.nn.Linear(8, 2))
    opt = torch.optim.AdamW(model.parameters(), lr=1e-3)
    sched = torch.optim.lr_scheduler.StepLR(opt, 2)
    model(torch.randn(5, 4)).square().mean().backward()
    opt.step()
    sched.step()
    return model, opt, sched


def test_a_dict_comes_back_as_torch_load_gives_it(trained, tmp_path):
    model, opt, sched = trained
    state = {
        "model": model.state_dict(), "optimizer": opt.state_dict(), "scheduler": sched.state_dict(),
        "epoch": 3, "best": float("inf"), "nan": float("nan"), "name": "run-7", "done": False, "none": None,
        "history": [0.5, 0.25, (1, "a")], "keys": {7: "int key", (1, 2): {"tuple key": True}, None: 0.5},
        "bf16": torch.arange(6, dtype=torch.bfloat16).reshape(2, 3), "empty": torch.empty(0, 3),
        "scalar": torch.tensor(2.5, dtype=torch.float64), "save_counter": 11,  # a user's key of this name stays
        "shape": torch.Size([2, 3]), "shaped": (torch.Size([1]), torch.ones(1)),  # a Size stays a Size
    }
    path = torchckpt.save_state(state, tmp_path / "c")
    assert path == str(tmp_path / "c")
    loaded = torchckpt.load_state(path)
    assert_same(loaded, state)
    assert_same(loaded, torch.load(_torch_saved(state, tmp_path), weights_only=True))
    assert not any(name.endswith((".pt", ".pkl")) for name in os.listdir(path))  # safetensors and JSON only


def _torch_saved(state, tmp_path) -> str:
    path = str(tmp_path / "state.pt")
    torch.save(state, path)
    return path


def test_per_rank_values_saved_by_one_process_come_back_as_their_values(tmp_path):
    t = torch.arange(3.0)
    state = {"n": torchckpt.PerRank(3), "t": torchckpt.PerRank(t), "nested": collections.OrderedDict(
        cursor=torchckpt.PerRank([1, 2]), pair=(torchckpt.PerRank(4), 5)), "plain": {"k": 1}}
    loaded = torchckpt.load_state(torchckpt.save_state(state, tmp_path / "s"))
    assert_same(loaded, {"n": 3, "t": t, "nested": collections.OrderedDict(cursor=[1, 2], pair=(4, 5)), "plain": {"k": 1}})
    assert type(state["n"]) is torchckpt.PerRank  # the caller's state is left as it was
    path = torchckpt.Checkpoint(x=(torchckpt.PerRank(3), 1, t), y={"a": [torchckpt.PerRank(t)]}).write(tmp_path / "c")
    assert_same(torchckpt.load_state(path), {"x": (3, 1, t), "y": {"a": [t]}})
    assert torchckpt.load_checkpoint(path).get_value("x") == (3, 1, torchckpt.TensorSpec("x/2", t.dtype, t.shape))
    linear = torch.nn.Linear(2, 2)  # an object in a tuple is tracked, as in a list: its state dict is saved
    pair = torchckpt.load_state(torchckpt.Checkpoint(pair=(linear, 1)).write(tmp_path / "m"))["pair"]
    assert type(pair) is tuple and pair[1] == 1 and torch.equal(pair[0]["weight"], linear.weight)


def test_tied_tensors_come_back_as_one_tensor(tmp_path):
    weight = torch.randn(4, 3)
    loaded = torchckpt.load_state(torchckpt.save_state({"embed": weight, "head": weight}, tmp_path / "c"))
    assert loaded["embed"] is loaded["head"] and torch.equal(loaded["head"], weight)
    empty, other = torch.empty(0, 4), torch.empty(0, 4)  # probe74 F5: an empty one, by object (no address)
    loaded = torchckpt.load_state(torchckpt.save_state({"a": empty, "b": empty, "c": other}, tmp_path / "empty"))
    assert loaded["a"] is loaded["b"] and loaded["c"] is not loaded["a"] and loaded["a"].shape == (0, 4)


def test_a_checkpoints_tracked_names_hold_their_state_dicts(trained, tmp_path):
    model, opt, sched = trained
    ckpt = torchckpt.Checkpoint(model=model, optimizer=opt, scheduler=sched, epoch=4, rng=torchckpt.RNGState())
    path = ckpt.save(str(tmp_path / "ckpt"))
    loaded = torchckpt.load_state(path)
    assert list(loaded) == ["model", "optimizer", "scheduler", "epoch", "rng"]  # no save_counter: the checkpoint's own
    # A Checkpoint stores a module's tensors by name, in file order: the same dict, in another order.
    assert sorted(loaded["model"]) == sorted(model.state_dict())
    assert_same(dict(sorted(loaded["model"].items())), dict(sorted(model.state_dict().items())))
    fresh = torch.nn.Sequential(torch.nn.Linear(4, 8), torch.nn.BatchNorm1d(8), torch.nn.Linear(8, 2))
    fresh.load_state_dict(loaded["model"])  # what users do with it
    assert_same(dict(fresh.state_dict()), dict(model.state_dict()))
    assert_same(loaded["optimizer"], opt.state_dict())
    assert_same(loaded["scheduler"], sched.state_dict())
    assert loaded["epoch"] == 4
    assert set(loaded["rng"]) >= {"python", "torch"}
    mgr = torchckpt.CheckpointManager(ckpt, tmp_path / "run")
    mgr.save()
    latest = torchckpt.load_state(tmp_path / "run")["model"]  # a manager's directory: its latest
    assert_same(dict(sorted(latest.items())), dict(sorted(model.state_dict().items())))
    mgr.close()


def test_safetensors_files_and_folders_load_as_name_to_tensor(tmp_path):
    tensors = {"b": torch.ones(2), "a": torch.arange(3), "c": torch.zeros(2, dtype=torch.float64)}
    file = str(tmp_path / "model.safetensors")
    safetensors.torch.save_file(tensors, file)
    loaded = torchckpt.load_state(file)
    assert set(loaded) == {"a", "b", "c"} and all(torch.equal(loaded[k], v) for k, v in tensors.items())
    # in the file's order, as load_file gives them and as convert keeps them (probe74: sorted by name)
    assert list(loaded) == list(safetensors.torch.load_file(file)) == ["a", "c", "b"]
    assert list(torchckpt.load_state(torchckpt.convert(file, tmp_path / "out"))) == list(loaded)


def test_map_location_and_a_written_checkpoint_that_load_checkpoint_and_restore_read(tmp_path):
    path = torchckpt.save_state({"w": torch.ones(2, 2), "step": 5}, tmp_path / "c")
    assert torchckpt.load_state(path, map_location=torch.device("cpu"))["w"].device.type == "cpu"
    assert torchckpt.load_state(path, map_location=None)["step"] == 5
    assert read_index(path)[spec.TORCHCKPT_KEY]["objects"] == {"w": "tensor", "step": "value"}
    reader = torchckpt.load_checkpoint(path)
    assert reader.get_value("step") == 5 and torch.equal(reader.get_tensor("w"), torch.ones(2, 2))
    target = torchckpt.Checkpoint(w=torch.zeros(2, 2), step=0)
    target.read(path).assert_consumed()
    assert target.step == 5 and torch.equal(target.w, torch.ones(2, 2))


def test_a_value_that_needs_pickle_is_refused_by_its_key_and_nothing_is_written(tmp_path):
    with pytest.raises(torchckpt.UnsupportedStateError, match="lambda|function") as caught:
        torchckpt.save_state({"ok": 1, "cfg": {"fn": lambda: 0}}, tmp_path / "c")
    assert "cfg/fn" in str(caught.value) and caught.value.key == "cfg/fn"
    assert not os.path.exists(tmp_path / "c")


@pytest.mark.parametrize(("state", "message"), [
    ([torch.ones(1)], "save_state takes a dict"), (torch.ones(1), "save_state takes a dict"),
    ({1: torch.ones(1)}, "top-level keys are the checkpoint's names and must be str; got 1 \\(int\\)"),
], ids=["list", "tensor", "int-key"])
def test_only_a_dict_of_names_is_saved(state, message, tmp_path):
    with pytest.raises(TypeError, match=message):
        torchckpt.save_state(state, tmp_path / "c")
    assert not os.path.exists(tmp_path / "c")


def test_a_missing_checkpoint_is_not_found(tmp_path):
    with pytest.raises(torchckpt.CheckpointNotFoundError):
        torchckpt.load_state(tmp_path / "nothing")


def test_an_ordered_dict_of_state_comes_back_ordered(tmp_path):
    state = collections.OrderedDict([("z", torch.zeros(1)), ("a", 1)])
    loaded = torchckpt.load_state(torchckpt.save_state({"sd": state}, tmp_path / "c"))
    assert list(loaded["sd"]) == ["z", "a"]


@pytest.mark.parametrize("kind", ["link to a checkpoint", "file"])
def test_saving_over_a_link_or_a_file_replaces_the_entry_never_what_a_link_points_to(kind, tmp_path):
    target = torchckpt.save_state({"w": torch.ones(2)}, tmp_path / "a.ckpt")
    last = tmp_path / "last.ckpt"
    if kind == "file":
        last.write_bytes(b"not a checkpoint")
    else:
        last.symlink_to("a.ckpt")
    torchckpt.save_state({"w": torch.zeros(3)}, last)
    assert last.is_dir() and not last.is_symlink()
    assert torch.equal(torchckpt.load_state(last)["w"], torch.zeros(3))
    assert torch.equal(torchckpt.load_state(target)["w"], torch.ones(2))  # the link's target is untouched
    assert sorted(os.listdir(tmp_path)) == ["a.ckpt", "last.ckpt"]  # no temporary left behind


def test_a_list_that_holds_itself_is_refused_by_name(tmp_path):
    looped: list = []
    looped.append(looped)
    with pytest.raises(torchckpt.UnsupportedStateError, match="Cannot save 'a/0/0") as info:
        torchckpt.save_state({"a": looped}, tmp_path / "c")
    assert info.value.key.startswith("a/0/0")
    assert not (tmp_path / "c").exists()


def test_a_dict_whose_attribute_lookup_raises_is_a_plain_dict(tmp_path):
    class KeyedAttributes(dict):  # as some attribute-dicts: a missing attribute raises KeyError
        def __getattr__(self, name):
            raise KeyError(name)

    path = torchckpt.save_state({"hparams": KeyedAttributes(lr=0.1)}, tmp_path / "c")
    loaded = torchckpt.load_state(path)
    assert loaded == {"hparams": {"lr": 0.1}} and type(loaded["hparams"]) is dict


def test_load_state_gives_the_per_rank_values_of_the_rank_asked_for(tmp_path):
    """probe84 F2: load_state gave rank 0's per-rank values whatever the rank (on every rank of a
    job, too: the default is the caller's rank there, tested in test_distributed.py)."""
    from .format2 import seen, write_two_rank

    path = write_two_rank(tmp_path / "c")
    assert torchckpt.load_state(path)["cursor"]["pos"] == 3  # no process group: rank 0's
    one = torchckpt.load_state(path, rank=1)["cursor"]
    assert one["pos"] == 4 and torch.equal(one["seen"], seen(1))
    for rank, message in ((2, r"saved by 2 ranks and holds per-rank values .* none of them rank 2's\. Pass rank= one "
                              r"of 0\.\.1"), (-1, r"rank=-1 must be an int of at least 0")):
        with pytest.raises(ValueError, match=message):
            torchckpt.load_state(path, rank=rank)
    single = torchckpt.save_state({"w": torch.ones(2)}, tmp_path / "single")  # no per-rank values: any rank
    assert torch.equal(torchckpt.load_state(single, rank=3)["w"], torch.ones(2))
    # probe85 F5: a single process's RNG state is rank 0's: rank 1 asked for is refused, not given rank 0's
    one = torchckpt.Checkpoint(rng=torchckpt.RNGState(), w=torch.ones(2)).write(tmp_path / "one")
    with pytest.raises(ValueError, match=r"saved by 1 rank and holds per-rank values .* none of them rank 1's"):
        torchckpt.load_state(one, rank=1)
    assert set(torchckpt.load_state(one, rank=0)) == {"rng", "w"}
    from torchckpt.checkpoint import PER_RANK_KINDS, kind_of  # the kinds it goes by are what a save records

    assert {kind_of(torchckpt.RNGState()), kind_of(torchckpt.PerRank(1)), kind_of(torch.Generator())} <= PER_RANK_KINDS
    gen = torchckpt.Checkpoint(g=torch.Generator(), w=torch.ones(2)).write(tmp_path / "generator")
    with pytest.raises(ValueError, match="none of them rank 1's"):
        torchckpt.load_state(gen, rank=1)


class _Cursor:
    """A stateful object whose position differs by rank, declared in its own state_dict()."""

    def __init__(self, pos: int) -> None:
        self.pos = pos

    def state_dict(self) -> dict:
        return {"pos": torchckpt.PerRank(self.pos)}

    def load_state_dict(self, state: dict) -> None:
        self.pos = state["pos"]


class _WithExtra(torch.nn.Linear):
    def get_extra_state(self) -> dict:
        return {"pos": torchckpt.PerRank(3)}

    def set_extra_state(self, state: dict) -> None:
        self.extra = state


@pytest.mark.parametrize("how", ["nested-checkpoint", "dict", "plain-tuple", "save_state", "consolidated",
                                 "in-a-state-dict", "in-extra-state", "consolidated-one-process"])
def test_a_single_processs_per_rank_values_anywhere_are_no_other_ranks(tmp_path, how):
    """probe86 F4: load_state(rank=1) of a single process's checkpoint was refused only for per-rank
    objects tracked at the top level; nested ones came back as rank 1's values without a word.
    probe87 F2: a PerRank in an object's state_dict() (or a module's extra state) was written as a
    per-rank mark in a single process's index, which every reader refused: a checkpoint nothing
    could read. F1: consolidating a single process's checkpoint dropped the record."""
    from torchckpt.cli import main

    path = tmp_path / "c"
    if how == "in-a-state-dict":
        torchckpt.Checkpoint(s=_Cursor(7)).write(path)
        cursor = _Cursor(0)
        torchckpt.Checkpoint(s=cursor).read(path).assert_consumed()
        assert cursor.pos == 7 and torchckpt.load_state(path)["s"] == {"pos": 7}
    elif how == "in-extra-state":
        torchckpt.Checkpoint(m=_WithExtra(1, 1)).write(path)
        module = _WithExtra(1, 1)
        torchckpt.Checkpoint(m=module).read(path).assert_consumed()
        assert module.extra == {"pos": 3}
    elif how == "consolidated-one-process":
        one = torchckpt.Checkpoint(inner=torchckpt.Checkpoint(rng=torchckpt.RNGState())).write(tmp_path / "one")
        assert main(["consolidate", one, str(path)]) == 0
    elif how == "nested-checkpoint":
        torchckpt.Checkpoint(inner=torchckpt.Checkpoint(rng=torchckpt.RNGState()), w=torch.ones(2)).write(path)
    elif how == "dict":
        torchckpt.Checkpoint(c={"pos": torchckpt.PerRank(5), "w": torch.ones(2)}).write(path)
    elif how == "plain-tuple":
        torchckpt.Checkpoint(c=(1, torchckpt.PerRank(5))).write(path)
    elif how == "save_state":
        torchckpt.save_state({"c": {"pos": torchckpt.PerRank(5)}}, path)
    else:
        from .format2 import write_two_rank

        assert main(["consolidate", str(write_two_rank(tmp_path / "ranks")), str(path)]) == 0
    with pytest.raises(ValueError, match=r"saved by 1 rank and holds per-rank values .* none of them rank 1's"):
        torchckpt.load_state(path, rank=1)
    assert torchckpt.load_state(path, rank=0)  # rank 0's are its own
    listed = {"nested-checkpoint": ["inner/rng"], "dict": ["c/pos"], "plain-tuple": ["c/1"], "save_state": ["c/pos"],
              "consolidated": ["cursor"], "in-a-state-dict": ["s/pos"], "in-extra-state": ["m/_extra_state/pos"],
              "consolidated-one-process": ["inner/rng"]}[how]
    assert read_index(path)["torchckpt"]["per_rank_values"] == listed
    # the reader gives another rank a placeholder for each, as a checkpoint of several ranks does
    other = torchckpt.load_checkpoint(path).get_state(rank=1)
    for key in listed:
        node = other
        for part in key.split("/"):
            node = node[int(part)] if isinstance(node, (list, tuple)) else node[part]
        assert type(node).__name__ == "MissingPerRank"
    plain = torchckpt.Checkpoint(inner=torchckpt.Checkpoint(w=torch.ones(2)), c={"n": 1}).write(tmp_path / "plain")
    assert torch.equal(torchckpt.load_state(plain, rank=1)["inner"]["w"], torch.ones(2))  # nothing per rank in it
    assert "per_rank_values" not in read_index(plain)["torchckpt"]


@pytest.mark.parametrize(("state", "listed", "where", "other_key"), [
    ({"c": {1: 7, "1": torchckpt.PerRank(5)}}, ["c/'1'"], ["c", "1"], 1),  # probe89 F3: the placeholder went to 1
    ({"c": {(1, 2): 7, "(1, 2)": torchckpt.PerRank(5)}}, ["c/'(1, 2)'"], ["c", "(1, 2)"], (1, 2)),  # probe90 F3
    ({"c": {"\0": torchckpt.PerRank(5), "lr": 7}}, ["c/\0"], ["c", "\0"], "lr"),  # probe90 F1: the whole dict
    ({"c": {str(i): torchckpt.PerRank(i) for i in range(3000)}}, [f"c/{i}" for i in range(3000)], ["c", "2999"], None),
    ({"c": {i: torchckpt.PerRank(i) for i in range(3000)}}, [f"c/{i}" for i in range(3000)], ["c", 2999], None),
], ids=["beside-a-key-of-one-spelling", "beside-a-tuple-key-of-one-spelling", "under-a-nul-key", "thousands-in-one-dict",
        "thousands-under-int-keys"])
def test_a_single_processs_per_rank_values_are_listed_by_names_that_find_them(tmp_path, state, listed, where,
                                                                                other_key):
    """Each listed path leads back to its value: another rank gets a placeholder there and nowhere
    else, as diff and get_value spell the keys (probe89 F4: thousands of them in one dict were found
    one scan of the dict at a time; probe90 F4: with int keys the save spelled them so)."""
    path = torchckpt.Checkpoint(**state).write(tmp_path / "c")
    assert read_index(path)["torchckpt"]["per_rank_values"] == listed
    other = torchckpt.load_checkpoint(path).get_state(rank=1)
    node = other
    for part in where:
        node = node[part]
    assert type(node).__name__ == "MissingPerRank"
    if other_key is not None:
        assert other["c"][other_key] == 7  # the other key keeps its value
    mine = torchckpt.load_checkpoint(path).get_state(rank=0)
    assert {k: v for k, v in mine.items() if k != "save_counter"} == torchckpt.load_state(path)  # rank 0: its values


@pytest.mark.parametrize("below", [{"pos": torchckpt.PerRank(5)}, {"": torchckpt.PerRank(5), "lr": 2}, _Cursor(5)],
                         ids=["dict", "empty-key-within", "stateful"])
def test_per_rank_values_below_the_top_level_key_empty_are_refused_as_tensors_there_are(tmp_path, below):
    """probe89 F2, probe90 F2, F7: their key paths named them as if at the top level ("pos", ""),
    so another rank got rank 0's values, or lost the whole value; the key itself may be one."""
    with pytest.raises(torchckpt.UnsupportedStateError, match=r"the top-level key '': the per-rank values .* below "
                                                              r"it would be named as if they were at the top") as info:
        torchckpt.Checkpoint(**{"": below}).write(tmp_path / "c")
    assert info.value.key == "" and not (tmp_path / "c").exists()
    path = torchckpt.Checkpoint(**{"": torchckpt.PerRank(5)}).write(tmp_path / "itself")
    assert read_index(path)["torchckpt"]["per_rank_values"] == [""]
    assert type(torchckpt.load_checkpoint(path).get_state(rank=1)[""]).__name__ == "MissingPerRank"


@pytest.mark.parametrize("listed", [True, "s/pos", [1], {"s": "pos"}])
def test_a_list_of_per_rank_values_that_is_not_one_is_damage(tmp_path, listed):
    path = torchckpt.Checkpoint(s=_Cursor(7)).write(tmp_path / "c")
    index = read_index(path)
    index["torchckpt"]["per_rank_values"] = listed
    (path_index := tmp_path / "c" / "index.json").write_bytes(sealed_json(index))
    with pytest.raises(torchckpt.CorruptCheckpointError, match="'per_rank_values' is not a list of key paths") as info:
        torchckpt.load_state(path, rank=1)
    assert str(path_index.parent) in str(info.value)
    assert torchckpt.load_state(path, rank=0)["s"] == {"pos": 7}  # rank 0 does not need it
    from torchckpt.cli import main

    assert main(["verify", str(path)]) == 1  # probe89 F6: verify passed it, and a 2-rank restore fell back past it
