"""Checkpoint: tracking, write/save semantics, plain values, tensor kinds, ties, nesting, refusals."""

from __future__ import annotations

import errno
import json
import os
from collections import OrderedDict
from pathlib import Path

import pytest
import torch

import torchckpt
from torchckpt import CheckpointNotFoundError, RestoreMismatchError, UnsupportedStateError
from torchckpt._save import capture

from .conftest import TiedLM, make_mlp


def test_tracking_and_attribute_access(mlp):
    ckpt = torchckpt.Checkpoint(model=mlp, epoch=1)
    assert ckpt.model is mlp and ckpt.epoch == 1
    ckpt.lr = 0.5
    assert ckpt.lr == 0.5
    with pytest.raises(AttributeError, match="tracks: model, epoch, lr"):
        _ = ckpt.nothing
    with pytest.raises(ValueError, match="reserved"):
        ckpt.save = 1
    with pytest.raises(ValueError, match="reserved"):
        torchckpt.Checkpoint(save_counter=3)
    del ckpt.lr
    assert "lr" not in dir(ckpt) and "model" in dir(ckpt)
    assert repr(ckpt) == "Checkpoint(model=module, epoch=value)"


def test_save_numbers_and_never_deletes(tmp_path):
    ckpt = torchckpt.Checkpoint(w=torch.ones(2))
    paths = [ckpt.save(tmp_path / "ckpt") for _ in range(3)]
    assert paths == [os.path.join(tmp_path, f"ckpt-{i}") for i in (1, 2, 3)]
    assert all(isinstance(p, str) and os.path.isdir(p) for p in paths)
    assert ckpt.save_counter == 3
    assert torchckpt.latest_checkpoint(tmp_path) == paths[-1]


def test_a_new_checkpoint_never_saves_over_a_committed_one_but_a_rollback_does(tmp_path):
    """probe80 F2: a new Checkpoint (a script that forgot to restore) replaced the committed
    ckpt-1 of an earlier run in place. A restored one numbers on, and a rollback replaces what it
    abandoned, as TensorFlow's does."""
    run = torchckpt.Checkpoint(w=torch.ones(2), epoch=10)
    first, second = run.save(tmp_path / "ckpt"), run.save(tmp_path / "ckpt")
    fresh = torchckpt.Checkpoint(w=torch.zeros(2), epoch=0)
    with pytest.raises(torchckpt.CheckpointWriteError, match=r"ckpt-1: it exists, and this Checkpoint's save_counter "
                       r"was never restored.*Restore first") as info:
        fresh.save(tmp_path / "ckpt")
    assert info.value.errno == errno.EEXIST and fresh.save_counter == 0
    assert torchckpt.load_state(first)["epoch"] == 10 and sorted(os.listdir(tmp_path)) == [
        "checkpoints.json", "ckpt-1", "ckpt-2"]
    os.makedirs(tmp_path / "left" / "ckpt-1")  # what a killed first save may leave: no index, nothing to restore
    (tmp_path / "left" / "ckpt-1" / "model-00001-of-00001.safetensors").write_bytes(b"partial")
    assert torchckpt.Checkpoint(w=torch.ones(2)).save(tmp_path / "left" / "ckpt") == os.path.join(tmp_path, "left", "ckpt-1")
    (tmp_path / "mine-1").write_bytes(b"a user's file")  # probe82: a file is never replaced either
    with pytest.raises(torchckpt.CheckpointWriteError, match=r"mine-1: a file is there, not a checkpoint"):
        torchckpt.Checkpoint(w=torch.ones(2)).save(tmp_path / "mine")
    (tmp_path / "theirs-1").mkdir()  # nor a folder of someone's files, index.json or not: the saver's refusal
    (tmp_path / "theirs-1" / "index.json").write_text("{}")
    with pytest.raises(torchckpt.CheckpointWriteError, match=r"theirs-1 is a folder of other files \(index.json\)"):
        torchckpt.Checkpoint(w=torch.ones(2)).save(tmp_path / "theirs")
    assert (tmp_path / "mine-1").read_bytes() == b"a user's file" and os.listdir(tmp_path / "theirs-1") == ["index.json"]
    fresh.restore(first).assert_consumed()  # a rollback to ckpt-1: its next save replaces the abandoned ckpt-2
    fresh.epoch = 11
    assert fresh.save(tmp_path / "ckpt") == second and torchckpt.load_state(second)["epoch"] == 11


def test_a_save_whose_record_failed_after_its_commit_takes_its_number(tmp_path, disk):
    ckpt = torchckpt.Checkpoint(w=torch.ones(2))
    disk.fail("replace_file", OSError(errno.ENOSPC, "No space left on device"), times=1)
    with pytest.raises(torchckpt.CheckpointWriteError, match=r"ckpt-1 is committed, but the directory's state file"):
        ckpt.save(tmp_path / "ckpt")
    assert ckpt.save_counter == 1  # before: 0, and the next save wrote over the committed ckpt-1
    with torch.no_grad():
        ckpt.w.fill_(2.0)
    assert ckpt.save(tmp_path / "ckpt") == os.path.join(tmp_path, "ckpt-2")
    assert torch.equal(torchckpt.load_state(tmp_path / "ckpt-1")["w"], torch.ones(2))
    disk.fail("replace_file", KeyboardInterrupt(), times=1)  # interrupted while it records: committed all the same
    with pytest.raises(KeyboardInterrupt):
        ckpt.save(tmp_path / "ckpt")
    assert ckpt.save_counter == 3 and ckpt.save(tmp_path / "ckpt") == os.path.join(tmp_path, "ckpt-4")


def test_a_directory_to_write_may_end_with_a_separator(tmp_path):
    # "out/" names the directory out (before: its temporary sibling was looked for inside it, and
    # the write failed with "No such file or directory")
    w = torch.arange(4.0)
    torch.save({"w": w}, tmp_path / "src.pt")
    written = {
        "write": torchckpt.Checkpoint(w=w).write(f"{tmp_path}/a/"),
        "save_state": torchckpt.save_state({"w": w}, f"{tmp_path}/b//"),
        "convert": torchckpt.state_dicts.convert(tmp_path / "src.pt", f"{tmp_path}/c/"),
    }
    assert written == {"write": f"{tmp_path}/a", "save_state": f"{tmp_path}/b", "convert": f"{tmp_path}/c"}
    for path in written.values():
        assert torch.equal(torchckpt.load_state(path)["w"], w)
    assert sorted(p.name for p in tmp_path.iterdir()) == ["a", "b", "c", "src.pt"]


def test_write_leaves_save_counter_alone_and_read_does_not_expect_it(tmp_path):
    ckpt = torchckpt.Checkpoint(w=torch.arange(3.0))
    path = ckpt.write(str(tmp_path / "exact"))
    assert path == str(tmp_path / "exact") and ckpt.save_counter == 0
    torchckpt.Checkpoint(w=torch.zeros(3)).read(path).assert_consumed()


def test_restore_counts_on_save_counter(tmp_path):
    ckpt = torchckpt.Checkpoint(w=torch.ones(1))
    ckpt.save(tmp_path / "c")
    ckpt.save(tmp_path / "c")
    fresh = torchckpt.Checkpoint(w=torch.zeros(1))
    fresh.restore(tmp_path).assert_consumed()
    assert fresh.save_counter == 2
    assert fresh.save(tmp_path / "c").endswith("c-3")


def test_plain_values_come_back_with_exact_types(tmp_path):
    values = {
        "epoch": 3, "lr": 0.125, "flag": True, "name": "run-1", "nothing": None, "inf": float("inf"),
        "nan": float("nan"), "big": 2**80, "shape": (1, (2, 3)), "cfg": {"layers": [64, 64], 1: "one", (2, "b"): None},
    }
    path = torchckpt.Checkpoint(**values).write(tmp_path / "c")
    target = torchckpt.Checkpoint(**{k: 0 for k in values})
    target.read(path).assert_consumed()
    for k, v in values.items():
        got = getattr(target, k)
        assert type(got) is type(v), k
        assert got == v or (k == "nan" and got != got)
    assert type(target.shape[1]) is tuple and list(target.cfg) == ["layers", 1, (2, "b")]


def test_unsupported_value_is_refused_before_anything_is_written(tmp_path):
    ckpt = torchckpt.Checkpoint(model=make_mlp(), cfg={"inner": {"fn": lambda x: x}})
    with pytest.raises(UnsupportedStateError, match="'cfg/inner/fn'") as info:
        ckpt.save(tmp_path / "ckpt")
    assert info.value.key == "cfg/inner/fn"
    assert os.listdir(tmp_path) == []
    assert ckpt.save_counter == 0


def test_unsupported_dtype_is_refused(tmp_path):
    with pytest.raises(UnsupportedStateError, match="complex128") as info:
        torchckpt.Checkpoint(z=torch.zeros(2, dtype=torch.complex128)).write(tmp_path / "c")
    assert info.value.key == "z"
    assert os.listdir(tmp_path) == []


@pytest.mark.parametrize("make, says", [
    (lambda: torch.zeros(2).to_sparse(), r"torch\.sparse_coo tensor.*`\.to_dense\(\)`"),
    (lambda: torch.quantize_per_tensor(torch.ones(2), 0.1, 0, torch.qint8), r"quantized tensor.*`\.dequantize\(\)`"),
    (lambda: torch.nested.nested_tensor([torch.ones(2), torch.ones(3)]), r"nested tensor.*`\.to_padded_tensor\(0\)`"),
    (lambda: torch.empty(2, device="meta"), r"on the meta device \(it has no data\)\. Materialise it first"),
], ids=["sparse", "quantized", "nested", "meta"])
def test_a_tensor_safetensors_cannot_store_is_refused_saying_what_it_is_and_how_to_convert_it(tmp_path, make, says):
    with pytest.raises(UnsupportedStateError, match=r"^Cannot save tensor 'w': it is (a )?" + says) as info:
        torchckpt.Checkpoint(w=make()).write(tmp_path / "c")
    assert info.value.key == "w" and not os.listdir(tmp_path)


def test_tensor_kinds_zero_dim_empty_noncontiguous_views(tmp_path):
    base = torch.arange(24, dtype=torch.float32).reshape(4, 6)
    values = {
        "scalar": torch.tensor(3.5), "empty": torch.zeros(0, 5), "transposed": base.t(),
        "strided": base[:, ::2], "view": base[1:3], "expanded": torch.ones(3, 1).expand(3, 4),
        "conj": torch.tensor([1 + 2j], dtype=torch.complex64).conj(),
    }
    path = torchckpt.Checkpoint(**values).write(tmp_path / "c")
    target = {k: torch.zeros_like(v.contiguous()) for k, v in values.items()}
    ckpt = torchckpt.Checkpoint(**target)
    ckpt.read(path).assert_consumed()
    for k, v in values.items():
        assert torch.equal(getattr(ckpt, k), v.resolve_conj()), k
    strided_dest = torch.zeros(4, 6).t()  # a non-contiguous destination is filled in place too
    torchckpt.Checkpoint(transposed=strided_dest).read(path).expect_partial()
    assert torch.equal(strided_dest, base.t())


def test_tied_weights_are_stored_once_and_stay_tied(tmp_path):
    model = TiedLM(10, 4)
    path = torchckpt.Checkpoint(model=model).write(tmp_path / "c")
    index = json.loads(Path(os.path.join(path, "index.json")).read_text())
    assert sorted(index["weight_map"]) == ["model/embed.weight", "model/norm.bias", "model/norm.weight"]
    assert index["torchckpt"]["aliases"] == {"model/head.weight": "model/embed.weight"}
    assert index["metadata"]["total_size"] == (10 * 4 + 4 + 4) * 4
    torch.manual_seed(5)
    fresh = TiedLM(10, 4)
    torchckpt.Checkpoint(model=fresh).read(path).assert_consumed()
    assert torch.equal(fresh.embed.weight, model.embed.weight)
    assert fresh.head.weight.data_ptr() == fresh.embed.weight.data_ptr()


def test_aliases_at_several_addresses_are_each_found():
    x, y = torch.arange(6.0), torch.arange(4.0)
    tensors = {"x": x, "x_again": x.view(6), "x_head": x[:2], "y": y, "y_again": y[:], "other": torch.zeros(3)}
    stored, aliases = capture.prepare_tensors(tensors)
    assert aliases == {"x_again": "x", "y_again": "y"}  # x[:2] starts where x does but is another view
    assert list(stored) == ["x", "x_head", "y", "other"]
    plain = {"a": torch.ones(2), "b": torch.ones(2)}
    assert capture.prepare_tensors(plain) == (plain, {})


def test_a_conjugate_or_negative_view_is_no_alias_of_its_tensor(tmp_path):
    c = torch.tensor([1 + 2j, 3 - 4j], dtype=torch.complex64)
    x = torch.tensor([1.0, -2.0])
    views = {"c": c, "cc": c.conj(), "x": x, "nx": torch._neg_view(x)}  # each view: its tensor's memory and strides
    assert capture.prepare_tensors(views)[1] == {}
    back = torchckpt.load_state(torchckpt.save_state(views, tmp_path / "s"))
    for name, t in views.items():
        assert torch.equal(back[name], t.resolve_conj().resolve_neg()), name
    path = torchckpt.Checkpoint(c=c, cc=c.conj()).write(tmp_path / "c")
    assert torch.equal(torchckpt.load_checkpoint(path).get_tensor("cc"), c.conj().resolve_conj())
    into = torch.zeros(2, dtype=torch.complex64)
    torchckpt.Checkpoint(cc=into).read(path).expect_partial()
    assert torch.equal(into, c.conj().resolve_conj())


def test_shared_tensors_in_plain_containers_are_retied(tmp_path):
    t = torch.arange(4.0)
    path = torchckpt.Checkpoint(pair={"a": [t, t]}).write(tmp_path / "c")
    # Restoring into a plain value (not a tracked tensor) builds new tensors; aliases share one.
    target = torchckpt.Checkpoint(pair=None)
    target.read(path).assert_consumed()
    a, b = target.pair["a"]
    assert torch.equal(a, t) and torch.equal(b, t)


def test_a_nested_checkpoint_absent_from_the_file_reports_its_per_rank_members_by_their_keys(tmp_path):
    """probe88 F4: its RNG state and PerRank values were reported as one key each (``absent/rng``),
    where a nested checkpoint present but lacking them reports their keys (``inner/rng/torch``)."""
    path = torchckpt.Checkpoint(w=torch.ones(1), inner=torchckpt.Checkpoint()).write(tmp_path / "c")
    members = {"rng": torchckpt.RNGState(), "pr": torchckpt.PerRank({"a": 1, "b": 2})}
    absent = torchckpt.Checkpoint(w=torch.ones(1), absent=torchckpt.Checkpoint(**members))
    present = torchckpt.Checkpoint(w=torch.ones(1), inner=torchckpt.Checkpoint(**members))
    missing = [sorted(ckpt.read(path).expect_partial().report.missing_keys) for ckpt in (absent, present)]
    rng = [[k.split("/", 1)[1] for k in keys if "/rng/" in k] for keys in missing]
    assert rng[0] == rng[1] and "rng/torch" in rng[0]
    assert {"absent/pr/a", "absent/pr/b"} <= set(missing[0])  # the plain value's keys, as before per-rank marks


def test_nested_checkpoints_dicts_and_lists(tmp_path):
    inner = torchckpt.Checkpoint(w=torch.ones(2), n=4)
    outer = torchckpt.Checkpoint(inner=inner, models={"a": make_mlp(1), "b": [make_mlp(2), 7]})
    path = outer.write(tmp_path / "c")
    names = json.loads(Path(os.path.join(path, "index.json")).read_text())["weight_map"]
    assert "inner/w" in names and "models/a/0.weight" in names and "models/b/0/2.bias" in names
    fresh_inner = torchckpt.Checkpoint(w=torch.zeros(2), n=0)
    fresh = torchckpt.Checkpoint(inner=fresh_inner, models={"a": make_mlp(3), "b": [make_mlp(4), 0]})
    fresh.read(path).assert_consumed()
    assert fresh_inner.n == 4 and torch.equal(fresh_inner.w, torch.ones(2))
    assert fresh.models["b"][1] == 7
    for x, y in zip(outer.models["b"][0].parameters(), fresh.models["b"][0].parameters()):
        assert torch.equal(x, y)


def test_tuples_of_tensors_and_modules_are_restored_in_place_as_lists_are(tmp_path):
    ema = (torch.ones(2), torch.nn.Parameter(torch.full((1,), 2.0)))  # e.g. EMA shadows the training code also holds
    path = torchckpt.Checkpoint(ema=ema, pair=(make_mlp(1), 7), nested={"t": (torch.ones(1), "a")}).write(tmp_path / "c")
    w, p, model, t = torch.zeros(2), torch.nn.Parameter(torch.zeros(1)), make_mlp(2), torch.zeros(1)
    fresh = torchckpt.Checkpoint(ema=(w, p), pair=(model, 0), nested={"t": (t, "b")})
    fresh.read(path).assert_consumed()
    assert fresh.ema[0] is w and fresh.ema[1] is p and type(fresh.ema) is tuple
    assert torch.equal(w, ema[0]) and torch.equal(p, ema[1]) and p.requires_grad
    assert fresh.pair[0] is model and fresh.pair[1] == 7 and type(fresh.pair) is tuple  # the plain item: a new tuple
    assert fresh.nested["t"][0] is t and torch.equal(t, torch.ones(1)) and fresh.nested["t"][1] == "a"
    for x, y in zip(make_mlp(1).parameters(), model.parameters()):
        assert torch.equal(x, y)
    on_meta = (torch.empty(2, device="meta"), torch.zeros(1))
    fresh = torchckpt.Checkpoint(ema=on_meta)
    fresh.read(path, assign=True).expect_partial()
    assert torch.equal(fresh.ema[0], ema[0]) and fresh.ema[1] is on_meta[1] and torch.equal(on_meta[1], ema[1])


def test_an_ordered_dict_holding_tensors_comes_back_an_ordered_dict_in_its_order(tmp_path):
    cfg = OrderedDict(a=1, w=torch.ones(2), b=2)
    path = torchckpt.Checkpoint(cfg=cfg).write(tmp_path / "c")
    fresh = torchckpt.Checkpoint(cfg=None)
    fresh.read(path).expect_partial()
    assert type(fresh.cfg) is OrderedDict and list(fresh.cfg) == ["a", "w", "b"] and torch.equal(fresh.cfg["w"], cfg["w"])
    loaded = torchckpt.load_state(path)["cfg"]
    assert type(loaded) is OrderedDict and list(loaded) == ["a", "w", "b"]


def test_optimizer_names_follow_the_contract(tmp_path, mlp, stepped_optimizer):
    path = torchckpt.Checkpoint(generator=mlp, g_opt=stepped_optimizer).write(tmp_path / "c")
    names = set(json.loads(Path(os.path.join(path, "index.json")).read_text())["weight_map"])
    assert {"generator/0.weight", "g_opt/state/0/exp_avg", "g_opt/state/0/step"} <= names


def test_slash_in_a_key_is_escaped_reversibly(tmp_path):
    class Odd:
        def __init__(self) -> None:
            self.state = {"a/b": torch.ones(2), "c~d": 1}

        def state_dict(self):
            return self.state

        def load_state_dict(self, state):
            self.state = state

    path = torchckpt.Checkpoint(odd=Odd()).write(tmp_path / "c")
    assert "odd/a~1b" in json.loads(Path(os.path.join(path, "index.json")).read_text())["weight_map"]
    target = Odd()
    target.state = {"a/b": torch.zeros(2), "c~d": 0}
    torchckpt.Checkpoint(odd=target).read(path).assert_consumed()
    assert torch.equal(target.state["a/b"], torch.ones(2)) and target.state["c~d"] == 1


def test_restore_none_returns_a_status_whose_assertions_raise():
    status = torchckpt.Checkpoint(w=torch.zeros(1)).restore(None)
    for assertion in (status.assert_consumed, status.assert_existing_objects_matched, status.assert_nontrivial_match):
        with pytest.raises(RestoreMismatchError, match="No checkpoint specified"):
            assertion()
    assert status.expect_partial() is status


def test_missing_checkpoint_errors(tmp_path):
    with pytest.raises(CheckpointNotFoundError, match="does not exist") as info:
        torchckpt.Checkpoint().restore(tmp_path / "nope")
    assert info.value.path == str(tmp_path / "nope")
    assert isinstance(info.value, FileNotFoundError)
    torchckpt.Checkpoint(w=torch.ones(1)).save(tmp_path / "ckpt")
    with pytest.raises(CheckpointNotFoundError, match="Did you mean"):
        torchckpt.Checkpoint().restore(tmp_path / "ckpt-2")
    (tmp_path / "empty").mkdir()
    with pytest.raises(CheckpointNotFoundError, match="No committed checkpoint"):
        torchckpt.Checkpoint().restore(tmp_path / "empty")


def test_restore_accepts_the_index_file_and_pathlike(tmp_path):
    path = torchckpt.Checkpoint(w=torch.ones(2)).write(tmp_path / "c")
    w = torch.zeros(2)
    torchckpt.Checkpoint(w=w).read(os.path.join(path, "index.json")).assert_consumed()
    assert torch.equal(w, torch.ones(2))


def test_rng_state_roundtrip(tmp_path):
    import random

    import numpy as np

    rng = torchckpt.RNGState()
    torch.manual_seed(1)
    random.seed(2)
    np.random.seed(3)
    path = torchckpt.Checkpoint(rng=rng).write(tmp_path / "c")
    expected = (torch.rand(3), random.random(), np.random.rand())
    torch.manual_seed(9)
    random.seed(9)
    np.random.seed(9)
    torchckpt.Checkpoint(rng=torchckpt.RNGState()).read(path).assert_consumed()
    assert torch.equal(torch.rand(3), expected[0])
    assert random.random() == expected[1] and np.random.rand() == expected[2]


@pytest.mark.parametrize(("progress", "shown"), [(True, True), (False, False), (None, False)])
def test_progress_bars_in_bytes(tmp_path, capsys, progress, shown):
    ckpt = torchckpt.Checkpoint(w=torch.zeros(300_000))
    path = ckpt.write(tmp_path / "c", progress=progress)
    ckpt.read(path, progress=progress).assert_consumed()
    err = capsys.readouterr().err
    assert ("save c" in err and "restore c" in err and "B/s" in err) == shown


def test_distinct_tensors_sharing_a_start_address_are_each_restored(tmp_path):
    """Only true aliases (same memory, same stored bytes) are read once; overlapping views are not."""
    path = torchckpt.Checkpoint(a=torch.arange(4.0), b=torch.full((2,), 9.0)).write(tmp_path / "c")
    base = torch.zeros(4)
    a, b = base, base[:2]  # b starts where a starts, but it is a different tensor in the checkpoint
    status = torchckpt.Checkpoint(a=a, b=b).read(path).assert_consumed()
    assert sorted(status.report.restored_keys) == ["a", "b"]
    assert torch.equal(b, torch.full((2,), 9.0))  # b is stored after a, so its bytes land last
    assert torch.equal(base, torch.tensor([9.0, 9.0, 2.0, 3.0]))


def test_a_state_with_a_value_after_a_tensor_comes_back_in_its_key_order(tmp_path):
    class Extra(torch.nn.Linear):
        def get_extra_state(self):
            return {"t": torch.ones(2), "n": 3}

        def set_extra_state(self, state):
            self.received = list(state)

    path = torchckpt.Checkpoint(model=Extra(2, 2), w=torch.zeros(1), epoch=4).write(tmp_path / "c")
    target = Extra(2, 2)
    torchckpt.Checkpoint(model=target, w=torch.zeros(1), epoch=0).read(path).assert_consumed()
    assert target.received == ["t", "n"]  # as torch.load gives the state dict to load_state_dict
    assert list(torchckpt.load_state(path)) == ["model", "w", "epoch"]
