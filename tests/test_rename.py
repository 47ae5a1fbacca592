"""``restore(..., rename=...)``: a checkpoint whose names changed (a submodule, a tracked name)
restores bit for bit, collisions are refused before anything changes, and the report says what
was renamed."""

from __future__ import annotations

import collections
import gc
import warnings
from pathlib import Path

import pytest
import torch

import torchckpt
from torchckpt import RestoreMismatchError
from torchckpt._load.rename import Renamer, prefix_matches
from torchckpt.restore import RenameConflictError

from .conftest import train_step


class Tower(torch.nn.Module):
    """A small model whose first block is named by ``trunk`` (``encoder`` before a refactor, ``backbone`` after)."""

    def __init__(self, trunk: str, seed: int = 0, norm: bool = True) -> None:
        super().__init__()
        torch.manual_seed(seed)
        self.trunk = trunk
        layers = [torch.nn.Linear(4, 6)] + ([torch.nn.BatchNorm1d(6)] if norm else [])
        self.add_module(trunk, torch.nn.Sequential(*layers))
        self.head = torch.nn.Linear(6, 3)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.head(torch.relu(getattr(self, self.trunk)(x)))


def adam(model: torch.nn.Module) -> torch.optim.Optimizer:
    return torch.optim.Adam(model.parameters(), lr=0.01)


@pytest.fixture
def encoder_model() -> Tower:
    return Tower("encoder", seed=0)


@pytest.fixture
def stepped_adam(encoder_model) -> torch.optim.Optimizer:
    """Adam after one step(): its state is populated, so restoring it proves something."""
    opt = adam(encoder_model)
    train_step(encoder_model, opt, 0)
    return opt


@pytest.fixture
def saved(tmp_path, encoder_model, stepped_adam) -> str:
    """A checkpoint of the model before the refactor, tracked as ``net``, saved once."""
    return torchckpt.Checkpoint(net=encoder_model, opt=stepped_adam, epoch=7, cfg={"a": 1, "b": 2, "c": 3},
                                history=[0.5, 0.25]).save(tmp_path / "c")


def bits(t: torch.Tensor) -> torch.Tensor:
    return t.detach().reshape(-1).view(torch.uint8)


def assert_same_state(a: dict, b: dict) -> None:
    """Equal state dicts by position (their names differ), tensors bit for bit."""
    assert len(a) == len(b)
    for (ka, va), (kb, vb) in zip(a.items(), b.items()):
        assert va.dtype == vb.dtype and va.shape == vb.shape, (ka, kb)
        assert torch.equal(bits(va), bits(vb)), (ka, kb)


def assert_same_optimizer(a: torch.optim.Optimizer, b: torch.optim.Optimizer) -> None:
    sa, sb = a.state_dict(), b.state_dict()
    assert sa["param_groups"] == sb["param_groups"]
    assert sa["state"].keys() == sb["state"].keys() and sa["state"]
    for i in sa["state"]:
        for name, value in sa["state"][i].items():
            assert torch.equal(bits(value), bits(sb["state"][i][name])), (i, name)


BACKBONE = {"net": "model", "net/encoder": "model/backbone"}


def test_a_renamed_submodule_restores_bit_exact_and_trains_on_identically(saved, encoder_model, stepped_adam):
    model = Tower("backbone", seed=5)
    opt = adam(model)
    ckpt = torchckpt.Checkpoint(model=model, opt=opt, epoch=0, cfg={}, history=[])
    ckpt.restore(saved, rename=BACKBONE).assert_consumed()
    assert_same_state(encoder_model.state_dict(), model.state_dict())
    assert_same_optimizer(stepped_adam, opt)
    assert (ckpt.epoch, ckpt.cfg, ckpt.save_counter) == (7, {"a": 1, "b": 2, "c": 3}, 1)
    train_step(encoder_model, stepped_adam, 1)
    train_step(model, opt, 1)
    assert_same_state(encoder_model.state_dict(), model.state_dict())


def test_module_renames_leave_the_optimizer_state_alone(saved, encoder_model, stepped_adam):
    """Optimizer state is keyed by parameter index: a module rename does not touch it, and the step
    after the restore is the same."""
    model = Tower("backbone", seed=5)
    opt = adam(model)
    status = torchckpt.Checkpoint(net=model, opt=opt).read(saved, rename={"net/encoder": "net/backbone"})
    status.assert_existing_objects_matched()
    assert all(k.startswith("net/encoder.") for k in status.report.renamed)
    assert sorted(status.report.unexpected_keys) == ["cfg/a", "cfg/b", "cfg/c", "epoch", "history/0", "history/1"]
    assert_same_optimizer(stepped_adam, opt)
    train_step(encoder_model, stepped_adam, 1)
    train_step(model, opt, 1)
    assert_same_state(encoder_model.state_dict(), model.state_dict())


def test_optimizer_state_renamed_to_a_parameter_the_optimizer_lacks_is_unexpected_not_kept(saved):
    model = Tower("encoder", seed=5)
    opt = adam(model)
    count = sum(len(g["params"]) for g in opt.param_groups)
    status = torchckpt.Checkpoint(net=model, opt=opt).read(saved, rename={"opt/state/0": f"opt/state/{count + 5}"})
    assert sorted(k for k in status.report.unexpected_keys if k.startswith("opt/")) == [
        "opt/state/0/exp_avg", "opt/state/0/exp_avg_sq", "opt/state/0/step"]  # named as the checkpoint names them
    assert all(isinstance(k, torch.Tensor) for k in opt.state)  # nothing kept under a key no parameter has
    assert opt.param_groups[0]["params"][0] not in opt.state and len(opt.state) == count - 1
    with pytest.raises(RestoreMismatchError, match=r"unexpected in the checkpoint \(\d+\): .*opt/state/0/exp_avg"):
        status.assert_consumed()


def test_the_function_form_gets_every_key_but_the_save_counter(saved, encoder_model):
    seen = []

    def rename(key: str) -> str:
        seen.append(key)
        return key.replace("net/encoder.", "model/backbone.").replace("net/", "model/")

    model = Tower("backbone", seed=5)
    ckpt = torchckpt.Checkpoint(model=model, opt=adam(model), epoch=0, cfg={}, history=[])
    status = ckpt.restore(saved, rename=rename).assert_consumed()
    assert_same_state(encoder_model.state_dict(), model.state_dict())
    assert {"net/encoder.0.weight", "net/encoder.1.num_batches_tracked", "opt/state/0/exp_avg",
            "opt/param_groups/0/lr", "epoch", "cfg/b"} <= set(seen)
    assert "save_counter" not in seen and len(seen) == len(set(seen))
    assert status.report.renamed["net/head.bias"] == "model/head.bias"
    assert not any(k.startswith(("opt/", "epoch", "cfg/")) for k in status.report.renamed)


def test_a_function_returning_none_leaves_the_key_unused_and_reported(saved):
    ckpt = torchckpt.Checkpoint(net=Tower("encoder", seed=5), epoch=0)
    status = ckpt.read(saved, rename=lambda k: None if k.startswith(("opt/", "cfg/", "history/")) else k)
    assert ckpt.epoch == 7
    assert {"cfg/a", "opt/state/0/exp_avg", "opt/param_groups/0/lr"} <= set(status.report.unexpected_keys)
    assert status.report.renamed == {}
    status.assert_existing_objects_matched()
    with pytest.raises(RestoreMismatchError, match=r"unexpected in the checkpoint \(\d+\): cfg/a, cfg/b, cfg/c, history/0, history/1, opt/") as info:
        status.assert_consumed()
    assert info.value.report is status.report
    dropped = ckpt.read(saved, rename=lambda k: None if k == "epoch" else k).expect_partial().report
    assert ckpt.epoch == 7 and "epoch" in dropped.missing_keys and "epoch" in dropped.unexpected_keys


def test_the_tracked_name_and_plain_values_are_renamed_whole_keeping_their_types(tmp_path, encoder_model):
    meta = {1: "one", (2, 3): [4.5, "six"]}  # int and tuple keys: a tree moved whole keeps them
    path = torchckpt.Checkpoint(net=encoder_model, meta=meta, epoch=7).write(tmp_path / "c")
    model = Tower("encoder", seed=5)
    ckpt = torchckpt.Checkpoint(model=model, info={}, step=0)
    ckpt.read(path, rename={"net": "model", "meta": "info", "epoch": "step"}).assert_consumed()
    assert_same_state(encoder_model.state_dict(), model.state_dict())
    assert ckpt.step == 7
    assert ckpt.info == meta and list(ckpt.info) == [1, (2, 3)]


def test_a_value_moved_into_a_dict_takes_that_dicts_key_type_and_the_dict_keeps_its_own_type(tmp_path):
    path = torchckpt.Checkpoint(extra=5, d={0: 1, 1: 2}).write(tmp_path / "a")
    ckpt = torchckpt.Checkpoint(d={0: 0, 1: 0, 2: 0})
    ckpt.read(path, rename={"extra": "d/2"}).assert_consumed()
    assert ckpt.d == {0: 1, 1: 2, 2: 5} and all(type(k) is int for k in ckpt.d)  # not a str key '2'

    path = torchckpt.Checkpoint(a={"q": 3}, d=collections.Counter(x=1)).write(tmp_path / "b")
    ckpt = torchckpt.Checkpoint(d=collections.Counter())
    ckpt.read(path, rename={"a": "d"}).assert_consumed()
    assert type(ckpt.d) is collections.Counter and ckpt.d == {"x": 1, "q": 3}

    path = torchckpt.Checkpoint(extra=5, d={True: "yes"}).write(tmp_path / "c")
    ckpt = torchckpt.Checkpoint(d={})
    ckpt.read(path, rename={"extra": "d/1"}).expect_partial()
    assert ckpt.d == {True: "yes", "1": 5} and list(map(type, ckpt.d)) == [bool, str]  # not merged into True


def test_a_key_renamed_within_its_dict_keeps_its_place(saved):
    ckpt = torchckpt.Checkpoint(cfg={})
    ckpt.read(saved, rename={"cfg/b": "cfg/beta"}).expect_partial()
    assert list(ckpt.cfg.items()) == [("a", 1), ("beta", 2), ("c", 3)]


def test_nested_checkpoints_are_renamed_by_their_full_keys(tmp_path, encoder_model, stepped_adam):
    path = torchckpt.Checkpoint(inner=torchckpt.Checkpoint(net=encoder_model, opt=stepped_adam), step=3).save(
        tmp_path / "nested")
    model = Tower("backbone", seed=5)
    opt = adam(model)
    ckpt = torchckpt.Checkpoint(inner=torchckpt.Checkpoint(model=model, opt=opt), step=0)
    status = ckpt.restore(path, rename={"inner/net": "inner/model", "inner/net/encoder": "inner/model/backbone"})
    status.assert_consumed()
    assert_same_state(encoder_model.state_dict(), model.state_dict())
    assert_same_optimizer(stepped_adam, opt)
    assert ckpt.step == 3
    assert status.report.renamed["inner/net/encoder.0.weight"] == "inner/model/backbone.0.weight"


def test_verify_checks_renamed_tensors_and_names_them_as_the_checkpoint_does(saved):
    shard = sorted(Path(saved).glob("*.safetensors"))[0]
    data = bytearray(shard.read_bytes())
    data[-1] ^= 0xFF  # the last tensor's last byte
    shard.write_bytes(bytes(data))
    model = Tower("backbone", seed=5)
    with pytest.raises(torchckpt.CorruptCheckpointError, match=r"Tensor '(net|opt)/.*' in .* fails its checksum") as info:
        torchckpt.Checkpoint(model=model, opt=adam(model)).read(saved, rename=BACKBONE, verify=True)
    assert info.value.path == str(shard)
    torchckpt.Checkpoint(model=model, opt=adam(model)).read(saved, rename=BACKBONE, verify=False).expect_partial()


# -- the report ---------------------------------------------------------------------------------


def test_the_report_lists_what_was_renamed_and_str_shows_it_sorted_and_capped(saved):
    model = Tower("backbone", seed=5, norm=False)  # no BatchNorm: its renamed values go unused
    model.extra = torch.nn.Linear(1, 1)
    status = torchckpt.Checkpoint(model=model).read(saved, rename=BACKBONE)
    report = status.expect_partial().report
    assert report.renamed == {
        "net/encoder.0.weight": "model/backbone.0.weight", "net/encoder.0.bias": "model/backbone.0.bias",
        "net/encoder.1.weight": "model/backbone.1.weight", "net/encoder.1.bias": "model/backbone.1.bias",
        "net/encoder.1.running_mean": "model/backbone.1.running_mean",
        "net/encoder.1.running_var": "model/backbone.1.running_var",
        "net/encoder.1.num_batches_tracked": "model/backbone.1.num_batches_tracked",
        "net/head.weight": "model/head.weight", "net/head.bias": "model/head.bias",
    }
    # missing: object keys; unexpected: checkpoint keys (as list_variables names them)
    assert sorted(report.missing_keys) == ["model/extra.bias", "model/extra.weight"]
    assert {"net/encoder.1.running_mean", "net/encoder.1.num_batches_tracked", "epoch"} <= set(report.unexpected_keys)
    assert not any(k.startswith("model/") for k in report.unexpected_keys)
    text = str(report)
    assert ("renamed (9): net/encoder.0.bias -> model/backbone.0.bias, net/encoder.0.weight -> model/backbone.0.weight, "
            "net/encoder.1.bias -> model/backbone.1.bias") in text
    assert text.endswith("net/head.bias -> model/head.bias, net/head.weight -> model/head.weight")
    many = torchckpt.MismatchReport(renamed={f"a/{i:02}": f"b/{i:02}" for i in range(25)})
    assert str(many).endswith("a/09 -> b/09 ... and 15 more")


def test_a_prefix_that_renames_nothing_is_reported_with_the_mismatches_it_explains(saved):
    model = Tower("backbone", seed=5)
    status = torchckpt.Checkpoint(model=model).read(saved, rename={"net": "model", "net/encodr": "model/backbone"})
    assert status.report.unused_renames == ["net/encodr"]
    assert "rename prefixes that renamed no checkpoint key (1): net/encodr" in str(status.report)
    with pytest.raises(RestoreMismatchError, match=r"missing from the checkpoint.*model/backbone.0.weight.*"
                                                   r"rename prefixes that renamed no checkpoint key \(1\): net/encodr"):
        status.assert_existing_objects_matched()


def test_an_unused_prefix_alone_is_no_mismatch(saved):
    model = Tower("encoder", seed=5)
    ckpt = torchckpt.Checkpoint(net=model, opt=adam(model), epoch=0, cfg={}, history=[])
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        status = ckpt.read(saved, rename={"net/decoder": "net/backbone"})
        assert not status.report and status.report.unused_renames == ["net/decoder"]
        status.assert_consumed()
        del status
        gc.collect()


def test_no_rename_behaves_as_before(saved):
    def restore(**rename):
        model = Tower("backbone", seed=5)
        status = torchckpt.Checkpoint(net=model, epoch=0).read(saved, **rename).expect_partial()
        return status.report, model.state_dict()

    plain, state = restore()
    assert plain.renamed == {} and plain.unused_renames == []
    assert "renamed" not in str(plain) and "rename" not in "; ".join(plain.lines())
    for rename in ({"rename": None}, {"rename": {}}):
        report, other = restore(**rename)
        assert report == plain
        assert_same_state(state, other)


# -- prefixes -----------------------------------------------------------------------------------


@pytest.mark.parametrize(("prefix", "key", "matches"), [
    ("model/encoder", "model/encoder", True),
    ("model/encoder", "model/encoder.0.weight", True),
    ("model/encoder", "model/encoder/0", True),
    ("model/encoder", "model/encoder2.weight", False),
    ("model/encoder.", "model/encoder.0.weight", True),
    ("model/encoder.0", "model/encoder.0.weight", True),
    ("model/encoder.0", "model/encoder.01.weight", False),
    ("model/", "model/anything", True),
    ("model", "model2/x", False),
    ("net", "model/net.weight", False),
], ids=["equal", "dot", "slash", "longer-part", "ends-with-dot", "deeper", "not-a-boundary", "ends-with-slash",
        "another-name", "not-at-the-start"])
def test_a_prefix_matches_at_a_name_part_boundary(prefix, key, matches):
    assert prefix_matches(prefix, key) is matches


def test_the_longest_matching_prefix_wins_and_the_rest_is_kept():
    renamer = Renamer.of({"model": "a", "model/encoder": "b/backbone", "model/encoder.0": "c"})
    assert renamer is not None
    assert renamer.match("model/encoder.0.weight") == ("c.weight", "model/encoder.0")
    assert renamer.match("model/encoder.1.weight") == ("b/backbone.1.weight", "model/encoder")
    assert renamer.match("model/head.weight") == ("a/head.weight", "model")
    assert renamer.match("epoch") == ("epoch", None)


# -- refusals -----------------------------------------------------------------------------------


@pytest.mark.parametrize(("rename", "key", "checkpoint_keys", "message"), [
    ({"net/encoder.0.weight": "net/head.weight"}, "net/head.weight", ["net/encoder.0.weight", "net/head.weight"],
     r"maps two checkpoint keys to the object key 'net/head.weight': net/encoder.0.weight, net/head.weight"),
    (lambda k: "net/w" if k.startswith("net/head.") else k, "net/w", ["net/head.bias", "net/head.weight"],
     r"maps two checkpoint keys to the object key 'net/w': net/head.bias, net/head.weight"),
    ({"epoch": "cfg/a/deeper"}, "cfg/a/deeper", ["epoch"],
     r"cannot move checkpoint key 'epoch' to 'cfg/a/deeper': the value at 'cfg/a' is not a dict of names"),
    ({"opt/param_groups/0": "opt/first_group"}, "opt/first_group", ["opt/param_groups/0"],
     r"moves \(to 'opt/first_group'\) checkpoint key 'opt/param_groups/0', an item of the list at "
     r"'opt/param_groups': list items are matched by position"),
    (lambda k: None if k == "history/0" else k, "history/0", ["history/0"],
     r"drops checkpoint key 'history/0', an item of the list at 'history'"),
    ({"epoch": "cfg"}, "cfg", ["cfg", "epoch"],
     r"cannot move checkpoint key 'epoch' to 'cfg': the checkpoint has its own value there, which stays"),
], ids=["renamed-onto-a-kept-key", "two-keys-onto-one", "under-a-plain-value", "out-of-a-list", "dropped-from-a-list",
        "a-value-onto-a-kept-one"])
def test_a_conflicting_rename_is_refused_before_anything_changes(saved, rename, key, checkpoint_keys, message):
    model = Tower("encoder", seed=5)
    before = {k: v.clone() for k, v in model.state_dict().items()}
    ckpt = torchckpt.Checkpoint(net=model, opt=adam(model), epoch=0, cfg={})
    with pytest.raises(RenameConflictError, match=message) as info:
        ckpt.read(saved, rename=rename)
    assert isinstance(info.value, ValueError) and isinstance(info.value, torchckpt.CheckpointError)
    assert info.value.key == key
    assert info.value.checkpoint_keys == checkpoint_keys
    assert_same_state(before, model.state_dict())
    assert ckpt.epoch == 0 and ckpt.cfg == {} and not ckpt.opt.state


@pytest.mark.parametrize(("rename", "error", "message"), [
    (42, TypeError, r"rename takes a mapping \{checkpoint prefix: object prefix\} or a function .* not int"),
    ({"net": 3}, TypeError, r"maps checkpoint prefixes \(str\) to object prefixes \(str\); got 'net': 3"),
    ({"": "model"}, ValueError, r"empty checkpoint prefix ''"),
    (lambda k: 3, TypeError, r"returned 3 for checkpoint key '.*'; it must return the object key \(a str\) or None"),
    (lambda k: "model//" + k, ValueError, r"gives checkpoint key '.*' the object key 'model//.*', which has an empty "
                                          r"name part"),
], ids=["not-a-mapping", "not-a-str", "empty-prefix", "function-returns-int", "empty-part"])
def test_a_malformed_rename_is_refused(saved, rename, error, message):
    model = Tower("encoder", seed=5)
    before = {k: v.clone() for k, v in model.state_dict().items()}
    with pytest.raises(error, match=message):
        torchckpt.Checkpoint(net=model).read(saved, rename=rename)
    assert_same_state(before, model.state_dict())


# -- several ranks ------------------------------------------------------------------------------


@pytest.mark.skipif(not torch.distributed.is_available(), reason="needs torch.distributed")
def test_a_collective_restore_renames_alike_on_every_rank(world2):
    import json

    found = [json.loads((world2 / f"rename-w2-rank{r}.json").read_text()) for r in range(2)]
    for rank, result in enumerate(found):
        assert "error" not in result, f"rank {rank}: {result['error']}\n{result.get('traceback')}"
        assert result["consumed"] == "ok" and result["equal"] is True
        assert result["renamed"] == {"net/encoder.0.weight": "model/backbone.0.weight",
                                     "net/encoder.0.bias": "model/backbone.0.bias",
                                     "net/head.weight": "model/head.weight", "net/head.bias": "model/head.bias"}
        assert result["collision"].startswith("RenameConflictError: Restoring ")  # the type travels across ranks
        assert "maps two checkpoint keys to the object key 'model/w'" in result["collision"]
        assert "the ranks did not make the same call (rename: " in result["differing"]
