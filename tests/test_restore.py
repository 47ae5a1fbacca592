"""Partial restore: what matches is applied, everything else is reported, nothing silently."""

from __future__ import annotations

import copy
import gc
import random
import warnings

import pytest
import torch
from torch.optim.optimizer import register_optimizer_step_post_hook, register_optimizer_step_pre_hook

import torchckpt
from torchckpt import PartialRestoreWarning, RestoreMismatchError

from .conftest import make_mlp, train_step


class Wider(torch.nn.Module):
    """Shares '0.*' with make_mlp, differs in '2.*' (shape) and adds 'extra'."""

    def __init__(self) -> None:
        super().__init__()
        self.add_module("0", torch.nn.Linear(4, 8))
        self.add_module("2", torch.nn.Linear(8, 5))
        self.extra = torch.nn.Linear(2, 2)


@pytest.fixture
def saved(tmp_path, mlp, stepped_optimizer):
    return torchckpt.Checkpoint(model=mlp, opt=stepped_optimizer, epoch=4).write(tmp_path / "c")


def test_different_architecture_applies_what_matches_and_reports_the_rest(saved, mlp):
    target = Wider()
    before = {k: v.clone() for k, v in target.state_dict().items()}
    status = torchckpt.Checkpoint(model=target).read(saved)
    report = status.report
    assert torch.equal(target.state_dict()["0.weight"], mlp.state_dict()["0.weight"])
    assert torch.equal(target.state_dict()["2.weight"], before["2.weight"])  # mismatched: untouched
    assert torch.equal(target.state_dict()["extra.weight"], before["extra.weight"])
    assert report.shape_mismatches == {
        "model/2.weight": (torch.Size([3, 8]), torch.Size([5, 8])),
        "model/2.bias": (torch.Size([3]), torch.Size([5])),
    }
    assert sorted(report.missing_keys) == ["model/extra.bias", "model/extra.weight"]
    assert report.unexpected_keys and all(k.startswith(("opt/", "epoch")) for k in report.unexpected_keys)
    assert bool(report)
    assert "model/2.weight (checkpoint [3, 8] vs object [5, 8])" in str(report)
    with pytest.raises(RestoreMismatchError, match="model/extra.weight") as info:
        status.assert_consumed()
    assert info.value.report is report
    assert isinstance(info.value, AssertionError)
    with pytest.raises(RestoreMismatchError, match=r"model/2.bias \(checkpoint \[3\] vs object \[5\]\)"):
        status.assert_existing_objects_matched()
    assert status.assert_nontrivial_match() is status


def test_dtype_mismatch_is_reported_and_not_applied(saved):
    target = make_mlp(7).double()
    before = target.state_dict()["0.weight"].clone()
    report = torchckpt.Checkpoint(model=target).read(saved).expect_partial().report
    assert report.dtype_mismatches["model/0.weight"] == (torch.float32, torch.float64)
    assert torch.equal(target.state_dict()["0.weight"], before)


def test_extra_checkpoint_values_pass_existing_objects_matched(saved, mlp):
    target = make_mlp(9)
    status = torchckpt.Checkpoint(model=target).read(saved)
    status.assert_existing_objects_matched()
    with pytest.raises(RestoreMismatchError, match=r"unexpected in the checkpoint \(\d+\): epoch, opt/"):
        status.assert_consumed()


def test_nothing_matching_fails_nontrivial_match(saved, tmp_path):
    status = torchckpt.Checkpoint(other=torch.nn.Linear(2, 2)).read(saved)
    with pytest.raises(RestoreMismatchError, match="Nothing in .* matched"):
        status.assert_nontrivial_match()
    counted = torchckpt.Checkpoint(model=make_mlp(0)).save(tmp_path / "counted")  # a save_counter every one has
    status = torchckpt.Checkpoint(other=torch.nn.Linear(2, 2)).restore(counted)
    with pytest.raises(RestoreMismatchError, match="Nothing in .* matched"):
        status.assert_nontrivial_match()


def test_one_object_under_two_names_takes_the_last_and_reports_the_other_unused(tmp_path):
    # as tied weights inside one module: one memory holds one value, so the other name is unexpected
    path = torchckpt.Checkpoint(a=torch.ones(3), b=torch.full((3,), 2.0), gen=make_mlp(1), disc=make_mlp(2),
                                items=[torch.ones(2), torch.zeros(2)]).write(tmp_path / "c")
    shared, module, item = torch.zeros(3), make_mlp(0), torch.full((2,), 5.0)
    status = torchckpt.Checkpoint(a=shared, b=shared, gen=module, disc=module, items=[item, item]).read(path)
    report = status.expect_partial().report
    assert torch.equal(shared, torch.full((3,), 2.0)) and torch.equal(item, torch.zeros(2))
    assert torch.equal(module[0].weight, make_mlp(2)[0].weight)
    assert sorted(report.unexpected_keys) == ["a", "gen/0.bias", "gen/0.weight", "gen/2.bias", "gen/2.weight",
                                             "items/0"]
    assert not any(k.startswith("gen/") or k in ("a", "items/0") for k in report.restored_keys)
    with pytest.raises(RestoreMismatchError, match="unexpected in the checkpoint"):
        status.assert_consumed()
    same = torch.arange(3.0)  # saved as one (tied), restored as one: both names restored, nothing unused
    path = torchckpt.Checkpoint(a=same, b=same, m=module, n=module).write(tmp_path / "tied")
    again, twin = torch.zeros(3), make_mlp(5)
    torchckpt.Checkpoint(a=again, b=again, m=twin, n=twin).read(path).assert_consumed()
    assert torch.equal(again, same) and torch.equal(twin[0].weight, module[0].weight)


@pytest.mark.parametrize("how", ["hook-on-the-module", "hook-on-a-child", "own-loader"])
def test_a_module_loaded_through_torch_under_two_names_reports_the_name_taken_back_unused(tmp_path, how):
    """probe85 F9: a module whose load runs after the reads (load hooks, a loader of its own) reports
    its keys as its load runs; taken back, its load was dropped and its keys were reported nowhere:
    assert_consumed() passed."""
    path = torchckpt.Checkpoint(a=make_mlp(1), b=make_mlp(2)).write(tmp_path / "c")
    module = make_mlp(0)
    if how == "own-loader":
        module = OwnLoader(*module)
    else:
        _hooked(module if how == "hook-on-the-module" else module[2])
    status = torchckpt.Checkpoint(a=module, b=module).read(path)
    report = status.expect_partial().report
    assert torch.equal(module[0].weight, make_mlp(2)[0].weight) and torch.equal(module[2].bias, make_mlp(2)[2].bias)
    assert sorted(report.unexpected_keys) == ["a/0.bias", "a/0.weight", "a/2.bias", "a/2.weight"]
    assert sorted(report.restored_keys) == ["b/0.bias", "b/0.weight", "b/2.bias", "b/2.weight"]
    with pytest.raises(RestoreMismatchError, match="unexpected in the checkpoint"):
        status.assert_consumed()


def test_a_tensor_two_tracked_objects_share_takes_the_last_and_reports_the_other_unused(tmp_path):
    """probe78 F2: the tie was looked for inside one module only: a module and its own parameter
    tracked apart, or an embedding two tracked modules share, restored from an untied checkpoint,
    reported both keys restored while the tensor held one value; assert_consumed() passed."""
    torch.manual_seed(0)
    enc, dec, lin = torch.nn.Embedding(5, 3), torch.nn.Embedding(5, 3), torch.nn.Linear(3, 2)
    path = torchckpt.Checkpoint(m=lin, w=torch.full((2, 3), 7.0), enc=enc, dec=dec).write(tmp_path / "c")
    lin2, enc2 = torch.nn.Linear(3, 2), torch.nn.Embedding(5, 3)
    dec2 = torch.nn.Embedding(5, 3)
    dec2.weight = enc2.weight  # tied now, not when saved
    status = torchckpt.Checkpoint(m=lin2, w=lin2.weight, enc=enc2, dec=dec2).read(path)
    report = status.expect_partial().report
    assert torch.equal(lin2.weight, torch.full((2, 3), 7.0)) and torch.equal(lin2.bias, lin.bias)
    assert torch.equal(enc2.weight, dec.weight)  # the one planned last
    assert sorted(report.unexpected_keys) == ["enc/weight", "m/weight"]
    assert not {"enc/weight", "m/weight"} & set(report.restored_keys)
    with pytest.raises(RestoreMismatchError, match="unexpected in the checkpoint"):
        status.assert_consumed()
    same = torchckpt.Checkpoint(m=lin2, w=lin2.weight, enc=enc2, dec=dec2).write(tmp_path / "tied")  # one value each
    fresh, fresh_enc = torch.nn.Linear(3, 2), torch.nn.Embedding(5, 3)
    fresh_dec = torch.nn.Embedding(5, 3)
    fresh_dec.weight = fresh_enc.weight
    torchckpt.Checkpoint(m=fresh, w=fresh.weight, enc=fresh_enc, dec=fresh_dec).read(same).assert_consumed()
    assert torch.equal(fresh.weight, lin2.weight) and torch.equal(fresh_enc.weight, enc2.weight)


class _StoredTransposed(torch.nn.Linear):
    """Keeps its weight transposed in checkpoints: a state-dict hook hands out ``weight.t()``, and a
    load pre-hook turns it back."""

    def __init__(self, *args: int) -> None:
        super().__init__(*args)
        self._register_state_dict_hook(lambda module, state, prefix, local: state.update(
            {prefix + "weight": state[prefix + "weight"].t()}))
        self._register_load_state_dict_pre_hook(self._turn_back)

    @staticmethod
    def _turn_back(state: dict, prefix: str, *args: object) -> None:
        if prefix + "weight" in state:
            state[prefix + "weight"] = state[prefix + "weight"].t()


def test_a_weight_a_hook_hands_out_transposed_is_one_tensor_with_the_weight_tracked_apart(tmp_path):
    """probe83 F6: the module's read (into the transposed view it hands out) and the tracked weight's
    read were told apart by shape and strides, so both keys were reported restored while the weight
    held the module's value (its load runs after the reads)."""
    model = _StoredTransposed(3, 2)
    path = torchckpt.Checkpoint(m=model, w=torch.full((2, 3), 7.0)).write(tmp_path / "c")
    fresh = _StoredTransposed(3, 2)
    status = torchckpt.Checkpoint(m=fresh, w=fresh.weight).read(path)
    report = status.expect_partial().report
    assert torch.equal(fresh.weight, model.weight)
    assert report.unexpected_keys == ["w"] and sorted(report.restored_keys) == ["m/bias", "m/weight"]
    again = _StoredTransposed(3, 2)  # alone, the transposed weight restores as load_state_dict does
    torchckpt.Checkpoint(m=again).read(path).expect_partial()
    assert torch.equal(again.weight, model.weight)


def _one_memory(kind: str) -> torch.nn.Module:
    module = torch.nn.Module()
    if kind == "complex-and-its-real-view":
        module.c = torch.nn.Parameter(torch.zeros(3, dtype=torch.complex64))
        module.register_buffer("r", torch.view_as_real(module.c.detach()))
    else:
        module.w = torch.nn.Parameter(torch.zeros(4))
        module.register_buffer("raw", module.w.detach().view(torch.uint8))
    return module


@pytest.mark.parametrize("kind", ["complex-and-its-real-view", "float-and-its-bytes"])
def test_tensors_over_the_same_bytes_in_another_element_type_are_one(tmp_path, kind):
    """probe89 F5: counted in elements, a complex parameter and its real view (a weight and its
    bytes) were two tensors: both read in file order, both reported restored, and the memory kept
    the file's last, not what load_state_dict keeps (its state-dict order's last)."""
    generator = torch.Generator().manual_seed(0)
    saved = {k: torch.randn(v.shape, dtype=v.dtype, generator=generator) if v.is_floating_point() or v.is_complex()
             else torch.randint(0, 100, v.shape, generator=generator).to(v.dtype)
             for k, v in _one_memory(kind).state_dict().items()}
    path = torchckpt.save_state({"m": dict(reversed(list(saved.items())))}, tmp_path / "c")  # the view's key first
    reference, module = _one_memory(kind), _one_memory(kind)
    reference.load_state_dict(saved)
    report = torchckpt.Checkpoint(m=module).read(path).expect_partial().report
    assert all(torch.equal(a, b) for a, b in zip(reference.state_dict().values(), module.state_dict().values()))
    first = next(iter(saved))
    assert report.unexpected_keys == [f"m/{first}"] and f"m/{first}" not in report.restored_keys
    # from its own checkpoint, the two keys agree (the same bytes): both restored (probe90 F6)
    own = torchckpt.Checkpoint(m=reference).write(tmp_path / "own")
    fresh = _one_memory(kind)
    torchckpt.Checkpoint(m=fresh).read(own).assert_consumed()
    assert all(torch.equal(a, b) for a, b in zip(reference.state_dict().values(), fresh.state_dict().values()))


def _hooked(module: torch.nn.Module) -> torch.nn.Module:
    module._register_load_state_dict_pre_hook(lambda *args, **kwargs: None)
    return module


class OwnLoader(torch.nn.Sequential):
    def load_state_dict(self, state_dict, strict=True, assign=False):
        return super().load_state_dict(state_dict, strict=strict, assign=assign)


def _two_layers(where: str) -> torch.nn.Module:
    if where == "own-loader":
        return OwnLoader(torch.nn.Linear(3, 2), torch.nn.Linear(2, 2))
    model = torch.nn.Sequential(torch.nn.Linear(3, 2), torch.nn.Linear(2, 2))
    return _hooked(model) if where == "hook-on-the-module" else (_hooked(model[1]), model)[1]


@pytest.mark.parametrize("where", ["hook-on-the-module", "own-loader", "hook-on-another-child"])
@pytest.mark.parametrize("order", ["module-first", "tensor-first"])
def test_a_load_after_the_reads_keeps_a_tensor_it_fills_and_the_other_key_is_unused(tmp_path, where, order):
    """probe78 F4, probe83 F5: a module with a load hook or a loader of its own is loaded after
    every read, so its value replaced a tensor tracked apart (``Checkpoint(m=M, w=M[0].weight)``),
    while both keys were reported restored. Now the key whose value the tensor holds is restored and
    the other is unexpected: the module's, where its load fills the tensor; where the tensor is
    read in place (outside the hooked child), the object tracked last, as without hooks."""
    torch.manual_seed(0)
    model = _two_layers(where)
    path = torchckpt.Checkpoint(m=model, w=torch.full((2, 3), 7.0)).write(tmp_path / "c")
    fresh = _two_layers(where)
    tracked = {"m": fresh, "w": fresh[0].weight}
    status = torchckpt.Checkpoint(**(tracked if order == "module-first" else dict(reversed(tracked.items())))).read(path)
    report = status.expect_partial().report
    module_wins = where != "hook-on-another-child" or order == "tensor-first"
    winner, loser = ("m/0.weight", "w") if module_wins else ("w", "m/0.weight")
    assert torch.equal(fresh[0].weight, model[0].weight if module_wins else torch.full((2, 3), 7.0))
    assert torch.equal(fresh[1].weight, model[1].weight)
    assert report.unexpected_keys == [loser] and loser not in report.restored_keys and winner in report.restored_keys
    with pytest.raises(RestoreMismatchError, match="unexpected in the checkpoint"):
        status.assert_consumed()
    same = torchckpt.Checkpoint(m=model, w=model[0].weight).write(tmp_path / "tied")  # one value: both keys restored
    fresh = _two_layers(where)
    torchckpt.Checkpoint(m=fresh, w=fresh[0].weight).read(same).assert_consumed()
    assert torch.equal(fresh[0].weight, model[0].weight)


def test_a_later_load_that_does_not_fill_the_tensor_leaves_the_other_read_restored(tmp_path):
    """probe83 F1, F2: the module's load replaced the tensor (assign=True), or a pre-hook took its
    key out: the tensor tracked apart keeps its own saved value, restored (a first version dropped
    its read, and the tensor kept neither value)."""
    model = _hooked(torch.nn.Sequential(torch.nn.Linear(3, 2)))
    path = torchckpt.Checkpoint(m=model, w=torch.full((2, 3), 7.0)).write(tmp_path / "c")
    fresh = _hooked(torch.nn.Sequential(torch.nn.Linear(3, 2)))
    w = fresh[0].weight
    torchckpt.Checkpoint(m=fresh, w=w).read(path, assign=True).assert_consumed()
    assert torch.equal(w, torch.full((2, 3), 7.0)) and torch.equal(fresh[0].weight, model[0].weight)

    def drop_weight(state, prefix, *args):
        state.pop(prefix + "0.weight", None)

    fresh = torch.nn.Sequential(torch.nn.Linear(3, 2))
    fresh._register_load_state_dict_pre_hook(drop_weight)
    report = torchckpt.Checkpoint(m=fresh, w=fresh[0].weight).read(path).expect_partial().report
    assert torch.equal(fresh[0].weight, torch.full((2, 3), 7.0))
    assert "w" in report.restored_keys and "m/0.weight" not in report.restored_keys
    assert report.missing_keys == ["m/0.weight"] and not report.unexpected_keys


class EncDec(torch.nn.Module):
    def __init__(self, dec_first: bool, tie: bool) -> None:
        super().__init__()
        for name in ("dec", "enc") if dec_first else ("enc", "dec"):
            setattr(self, name, torch.nn.Embedding(4, 2))
        if tie:
            self.dec.weight = self.enc.weight


@pytest.mark.parametrize("dec_first", [True, False], ids=["saved-dec-first", "saved-enc-first"])
@pytest.mark.parametrize("alone", [True, False], ids=["model-alone", "beside-another-object"])
@pytest.mark.parametrize("hooked", ["model", "enc", "dec"], ids=["hook-on-model", "hook-on-enc", "hook-on-dec"])
def test_tied_weights_under_a_load_hook_keep_the_key_torch_loads_last(tmp_path, dec_first, alone, hooked):
    """probe85 F1, F2: the key kept was decided by the checkpoint's order, not by torch's walk of the
    model (enc, then dec: dec's value stays), and only when another object was tracked too. probe86
    F3: with the hook on one of the two submodules, the other's key was filled by torch's walk
    unrecorded, and both keys were reported restored."""
    saved = EncDec(dec_first, tie=False)
    path = torchckpt.Checkpoint(m=saved, **({} if alone else {"x": torch.nn.Linear(1, 1)})).write(tmp_path / "c")
    model = EncDec(False, tie=True)
    _hooked(model if hooked == "model" else getattr(model, hooked))
    report = torchckpt.Checkpoint(m=model, **({} if alone else {"x": torch.nn.Linear(1, 1)})).read(
        path).expect_partial().report
    assert torch.equal(model.enc.weight, saved.dec.weight)
    assert report.unexpected_keys == ["m/enc.weight"] and "m/dec.weight" in report.restored_keys


def test_of_two_later_loads_that_share_a_tensor_the_last_keeps_it(tmp_path):
    """probe83 F4: two tracked modules with load hooks tie one embedding; both keys were restored."""
    enc, dec = _hooked(torch.nn.Embedding(4, 2)), _hooked(torch.nn.Embedding(4, 2))
    path = torchckpt.Checkpoint(enc=enc, dec=dec).write(tmp_path / "c")
    enc2, dec2 = _hooked(torch.nn.Embedding(4, 2)), _hooked(torch.nn.Embedding(4, 2))
    dec2.weight = enc2.weight
    report = torchckpt.Checkpoint(enc=enc2, dec=dec2).read(path).expect_partial().report
    assert torch.equal(enc2.weight, dec.weight)
    assert report.unexpected_keys == ["enc/weight"] and report.restored_keys == ["dec/weight"]


class Count:
    """A stateful object of plain state (no tensor below it)."""

    def __init__(self, n: int) -> None:
        self.n = n

    def state_dict(self) -> dict:
        return {"n": self.n}

    def load_state_dict(self, state: dict) -> None:
        self.n = state["n"]


def test_a_tracked_dict_whose_keys_differ_only_in_type_restores_each_by_key_and_type(tmp_path):
    path = torchckpt.Checkpoint(d={0: Count(1), "0": Count(2)}, e={None: 5, "None": Count(111)}).write(tmp_path / "c")
    d, e = {0: Count(0), "0": Count(0)}, {None: 0, "None": Count(0)}
    ckpt = torchckpt.Checkpoint(d=d, e=e)
    ckpt.read(path).assert_consumed()
    assert (d[0].n, d["0"].n) == (1, 2) and ckpt.e[None] == 5 and ckpt.e["None"].n == 111
    fewer = {0: Count(0)}  # the saved "0" is no key of the same type: unexpected, not given to 0
    report = torchckpt.Checkpoint(d=fewer, e={None: 0, "None": Count(0)}).read(path).expect_partial().report
    assert fewer[0].n == 1 and report.unexpected_keys == ["d/0/n"] and not report.missing_keys


def test_unacknowledged_mismatch_warns_naming_keys(saved):
    with pytest.warns(PartialRestoreWarning, match="model/extra.weight.*expect_partial"):
        torchckpt.Checkpoint(model=Wider()).read(saved)
        gc.collect()


@pytest.mark.parametrize("acknowledge", ["expect_partial", "assert_nontrivial_match"])
def test_acknowledged_mismatch_does_not_warn(saved, acknowledge):
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        status = torchckpt.Checkpoint(model=Wider()).read(saved)
        getattr(status, acknowledge)()
        del status
        gc.collect()


def test_full_match_does_not_warn(saved):
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        opt_model = make_mlp(3)
        opt = torch.optim.Adam(opt_model.parameters(), lr=0.01)
        torchckpt.Checkpoint(model=opt_model, opt=opt, epoch=0).read(saved)
        gc.collect()


def test_ddp_and_compile_prefixes_match_transparently(tmp_path, mlp):
    class Wrapper(torch.nn.Module):  # what DistributedDataParallel looks like to state_dict
        def __init__(self, module: torch.nn.Module) -> None:
            super().__init__()
            self.module = module

    path = torchckpt.Checkpoint(model=Wrapper(mlp)).write(tmp_path / "ddp")
    plain = make_mlp(5)
    status = torchckpt.Checkpoint(model=plain).read(path).assert_consumed()
    assert status.report.remapped_keys["model/module.0.weight"] == "model/0.weight"
    assert "matched through a DDP 'module.'" in str(status.report)
    assert torch.equal(plain.state_dict()["0.weight"], mlp.state_dict()["0.weight"])

    compiled_like = torch.nn.Module()
    compiled_like._orig_mod = make_mlp(6)  # what torch.compile's OptimizedModule exposes
    path = torchckpt.Checkpoint(model=compiled_like).write(tmp_path / "compiled")
    target = Wrapper(make_mlp(8))
    status = torchckpt.Checkpoint(model=target).read(path).assert_consumed()
    assert status.report.remapped_keys["model/_orig_mod.2.bias"] == "model/module.2.bias"
    assert torch.equal(target.module.state_dict()["2.bias"], compiled_like._orig_mod.state_dict()["2.bias"])


def test_optimizer_with_different_groups_is_left_untouched(saved):
    model = torch.nn.Linear(4, 3)
    opt = torch.optim.Adam(model.parameters(), lr=0.5)
    train_step(torch.nn.Sequential(model), opt, 3)  # not the same shapes: state exists but differs
    before = opt.state_dict()
    status = torchckpt.Checkpoint(opt=opt).read(saved)
    assert "parameter groups have sizes [4], this optimizer's have [2]" in status.report.skipped_objects["opt"]
    assert opt.param_groups[0]["lr"] == 0.5
    assert torch.equal(opt.state_dict()["state"][0]["exp_avg"], before["state"][0]["exp_avg"])
    with pytest.raises(RestoreMismatchError, match="objects left untouched"):
        status.assert_existing_objects_matched()


def _saved_run(tmp_path, optimizer: str) -> str:
    model = make_mlp(0)
    opt = getattr(torch.optim, optimizer)(model.parameters(), lr=0.01, **({"momentum": 0.9} if optimizer == "SGD" else {}))
    train_step(model, opt, 0)
    return torchckpt.Checkpoint(model=model, opt=opt).write(tmp_path / optimizer)


@pytest.mark.parametrize(("saved_by", "restored_into", "reason"), [
    ("Adam", lambda params: torch.optim.Adam(params[::-1], lr=0.01),
     "the checkpoint's 'exp_avg' of its parameter 0 has shape [8, 4], where this optimizer's parameter there, of "
     "shape [3], needs [3] (its parameters are listed in another order, or belong to another model)"),
    ("Adam", lambda params: torch.optim.SGD(params, lr=0.01, momentum=0.9),
     "the checkpoint's parameter group 0 lacks 'momentum', which this SGD steps with: it was saved from another kind "
     "of optimizer"),
    ("SGD", lambda params: torch.optim.Adam(params, lr=0.01), "state of its parameter 0 lacks 'step', which this Adam"),
    ("Adam", lambda params: torch.optim.RMSprop(params, lr=0.01), "lacks 'square_avg', which this RMSprop steps with"),
    ("Adam", lambda params: torch.optim.Adamax(params, lr=0.01),  # probe41 F5: the groups look alike
     "the checkpoint's state of its parameter 0 lacks 'exp_inf', which this Adamax steps with"),
    ("Adamax", lambda params: torch.optim.Adam(params, lr=0.01), "lacks 'exp_avg_sq', which this Adam steps with"),
], ids=["params-in-another-order", "adam-into-sgd", "sgd-into-adam", "adam-into-rmsprop", "adam-into-adamax",
        "adamax-into-adam"])
def test_a_never_stepped_optimizer_is_left_untouched_by_state_that_cannot_be_its_own(tmp_path, saved_by,
                                                                                     restored_into, reason):
    # probe39 F2: it reported "everything matched" or a few missing keys, and its next step() failed;
    # SGD's state into Adam raised after the model was restored
    path = _saved_run(tmp_path, saved_by)
    model = make_mlp(1)
    opt = restored_into(list(model.parameters()))
    before = opt.state_dict()
    status = torchckpt.Checkpoint(model=model, opt=opt).read(path).expect_partial()
    assert reason in status.report.skipped_objects["opt"]
    assert opt.state_dict() == before  # the model is restored all the same
    assert torch.equal(model[0].weight.detach(), torchckpt.load_state(path)["model"]["0.weight"])
    train_step(model, opt, 1)  # untouched: it steps as a fresh optimizer


@pytest.mark.parametrize("change", ["named-parameters", "scheduler-made-since", "users-group-key"])
def test_an_optimizer_whose_groups_gained_keys_it_does_not_step_with_is_restored(tmp_path, change):
    # probe40 F1: refused as "saved from another kind of optimizer"; torch's load_state_dict takes it
    path = _saved_run(tmp_path, "Adam")
    model = make_mlp(1)
    opt = torch.optim.Adam(model.named_parameters() if change == "named-parameters" else model.parameters(), lr=0.01)
    if change == "scheduler-made-since":
        torch.optim.lr_scheduler.StepLR(opt, 2)
    if change == "users-group-key":
        opt.param_groups[0]["lr_scale"] = 0.5
    status = torchckpt.Checkpoint(model=model, opt=opt).read(path).expect_partial()
    assert not status.report.skipped_objects and len(opt.state_dict()["state"]) == 4
    train_step(model, opt, 1)


def test_optimizer_states_torchs_own_step_takes_are_restored(tmp_path):
    # probe43 F1, F2: an older SparseAdam's groups without 'maximize' (read with a default); an SGD
    # whose momentum was switched on after a warm-up, its state holding a value of the user's own
    embedding = torch.nn.Embedding(10, 4, sparse=True)
    sparse = torch.optim.SparseAdam(embedding.parameters())
    embedding(torch.tensor([1, 2])).sum().backward()
    sparse.step()
    model = make_mlp(0)
    sgd = torch.optim.SGD(model.parameters(), lr=0.1, momentum=0.0)
    train_step(model, sgd, 0)
    for p in model.parameters():
        sgd.state[p]["grad_norm"] = p.grad.norm()
    sgd.param_groups[0]["momentum"] = 0.9
    state = {"sparse": sparse.state_dict(), "sgd": sgd.state_dict()}
    del state["sparse"]["param_groups"][0]["maximize"]  # as an older torch wrote it
    path = torchckpt.save_state(state, tmp_path / "c")
    sparse_again = torch.optim.SparseAdam(torch.nn.Embedding(10, 4, sparse=True).parameters())
    sgd_again = torch.optim.SGD(make_mlp(1).parameters(), lr=0.1, momentum=0.9)
    status = torchckpt.Checkpoint(sparse=sparse_again, sgd=sgd_again).read(path).expect_partial()
    assert not status.report.skipped_objects and len(sgd_again.state_dict()["state"]) == 4


def test_the_optimizer_checks_run_no_step_hook(tmp_path):
    # probe43 F3: the scratch optimizer's step ran the user's global step hooks
    path = _saved_run(tmp_path, "Adam")
    calls = []
    pre = register_optimizer_step_pre_hook(lambda *args: calls.append("pre"))
    post = register_optimizer_step_post_hook(lambda *args: calls.append("post"))
    try:
        model = make_mlp(1)
        torchckpt.Checkpoint(model=model, opt=torch.optim.Adamax(model.parameters())).read(path).expect_partial()
        torchckpt.Checkpoint(model=model, opt=torch.optim.Adam(model.parameters())).read(path).assert_consumed()
    finally:
        pre.remove()
        post.remove()
    assert calls == []


def test_state_named_as_another_optimizers_or_of_complex_parameters_is_restored(tmp_path):
    # probe44 F1, F2: an LBFGS over complex parameters keeps twice their elements; a user's own
    # per-parameter "variance" in an Adam is not Adafactor's
    complex_param = torch.nn.Parameter(torch.randn(3, dtype=torch.complex64))
    lbfgs = torch.optim.LBFGS([complex_param])

    def closure():
        lbfgs.zero_grad()
        loss = complex_param.abs().sum()
        loss.backward()
        return loss

    lbfgs.step(closure)
    model = make_mlp(0)
    adam = torch.optim.Adam(model.parameters())
    train_step(model, adam, 0)
    for p in model.parameters():
        adam.state[p]["variance"] = torch.tensor(1.0)
    path = torchckpt.Checkpoint(lbfgs=lbfgs, adam=adam).write(tmp_path / "c")
    lbfgs_again = torch.optim.LBFGS([torch.nn.Parameter(torch.zeros(3, dtype=torch.complex64))])
    adam_again = torch.optim.Adam(make_mlp(1).parameters())
    torchckpt.Checkpoint(lbfgs=lbfgs_again, adam=adam_again).read(path).assert_consumed()


@pytest.mark.parametrize("optimizer", ["Adafactor", "LBFGS", "Muon"])
def test_state_of_other_shapes_is_refused_for_optimizers_that_keep_it_otherwise(tmp_path, optimizer):
    # probe43 F4: Adafactor's factored state of a matrix, LBFGS's flat state over every parameter;
    # probe45 F3: Muon's momentum (of matrices only)
    model = make_mlp(0)
    if optimizer == "Muon":
        model = torch.nn.Sequential(torch.nn.Linear(4, 8, bias=False), torch.nn.ReLU(), torch.nn.Linear(8, 3, bias=False))
    opt = getattr(torch.optim, optimizer)(model.parameters())
    if optimizer == "LBFGS":
        def closure():
            opt.zero_grad()
            loss = model(torch.ones(2, 4)).sum()
            loss.backward()
            return loss
        opt.step(closure)
    else:
        train_step(model, opt, 0)
    path = torchckpt.Checkpoint(opt=opt).write(tmp_path / "c")
    other = torch.nn.Sequential(torch.nn.Linear(4, 5, bias=optimizer != "Muon"), torch.nn.ReLU(),
                                torch.nn.Linear(5, 3, bias=optimizer != "Muon"))
    params = list(other.parameters())
    again = getattr(torch.optim, optimizer)(params if optimizer == "LBFGS" else params[::-1])
    status = torchckpt.Checkpoint(opt=again).read(path).expect_partial()
    assert "(its parameters are listed in another order, or belong to another model)" in status.report.skipped_objects["opt"]


@pytest.mark.parametrize("optimizer", ["SGD", "Adam", "AdamW", "RMSprop", "Adagrad", "Adadelta", "Adamax", "NAdam",
                                       "RAdam", "ASGD", "Rprop", "Adafactor"])
def test_a_never_stepped_optimizer_takes_its_own_kinds_state(tmp_path, optimizer):
    path = _saved_run(tmp_path, optimizer)
    model = make_mlp(1)
    opt = getattr(torch.optim, optimizer)(model.parameters(), lr=0.01, **({"momentum": 0.9} if optimizer == "SGD" else {}))
    torchckpt.Checkpoint(model=model, opt=opt).read(path).assert_consumed()
    assert opt.state_dict()["state"].keys() == {0, 1, 2, 3}


def test_a_disabled_scalers_restore_reports_the_saved_scale_unused(tmp_path):
    # probe39 F3: its loader returns at once; the report said everything matched
    scaler = torch.amp.GradScaler("cpu", init_scale=512.0)
    path = torchckpt.Checkpoint(scaler=scaler).write(tmp_path / "c")
    off = torch.amp.GradScaler("cpu", enabled=False)
    status = torchckpt.Checkpoint(scaler=off).read(path).expect_partial()
    assert status.report.unexpected_keys == [f"scaler/{k}" for k in scaler.state_dict()]
    assert off.state_dict() == {} and not off.is_enabled()


class _Warmup:
    def __init__(self, steps: int) -> None:
        self.steps = steps

    def __call__(self, epoch: int) -> float:
        return min(1.0, (epoch + 1) / self.steps)


def test_a_lambda_objects_saved_attributes_are_not_set_on_a_function(tmp_path):
    # probe39 F3: LambdaLR saves a callable object's __dict__; restored where the lambda is now a
    # function, it set them on the function and reported everything matched
    opt = torch.optim.SGD([torch.nn.Parameter(torch.zeros(2))], lr=0.1)
    path = torchckpt.Checkpoint(sched=torch.optim.lr_scheduler.LambdaLR(opt, _Warmup(5))).write(tmp_path / "c")
    function = lambda epoch: 0.9 ** epoch  # noqa: E731
    opt = torch.optim.SGD([torch.nn.Parameter(torch.zeros(2))], lr=0.1)
    sched = torch.optim.lr_scheduler.LambdaLR(opt, function)
    status = torchckpt.Checkpoint(sched=sched).read(path).expect_partial()
    assert status.report.unexpected_keys == ["sched/lr_lambdas/0/steps"] and vars(function) == {}
    assert sched.lr_lambdas == [function]


def test_a_lambda_scheduler_of_more_saved_lambdas_than_groups_is_left_untouched(tmp_path):
    # probe41 F3: the extra lambda was cut off silently (torch's loader raises IndexError)
    params = [torch.nn.Parameter(torch.zeros(2)) for _ in range(3)]
    opt = torch.optim.SGD([{"params": [p]} for p in params], lr=0.1)
    path = torchckpt.Checkpoint(sched=torch.optim.lr_scheduler.LambdaLR(opt, [_Warmup(5)] * 3)).write(tmp_path / "c")
    opt = torch.optim.SGD([{"params": [p]} for p in params[:2]], lr=0.1)
    sched = torch.optim.lr_scheduler.LambdaLR(opt, [_Warmup(5)] * 2)
    status = torchckpt.Checkpoint(sched=sched).read(path).expect_partial()
    assert "'lr_lambdas' are a list of 3 items, where this LambdaLR has 2" in status.report.skipped_objects["sched"]
    assert len(sched.base_lrs) == 2


@pytest.mark.parametrize(("saved_groups", "groups"), [(1, 2), (2, 1)])
@pytest.mark.parametrize("kind", ["CosineAnnealingWarmRestarts", "StepLR", "ReduceLROnPlateau", "CyclicLR",
                                  "SequentialLR"])
def test_a_scheduler_saved_for_another_number_of_groups_is_left_untouched(tmp_path, kind, saved_groups, groups):
    """probe78 F1: only LambdaLR's lambdas were counted: the per-group lists of the others were
    loaded whatever their length (reported missing though dropped, or nothing reported at all), and
    the scheduler's next step() raised."""
    L = torch.optim.lr_scheduler

    def build(n: int):
        opt = torch.optim.SGD([{"params": [torch.nn.Parameter(torch.zeros(2))]} for _ in range(n)], lr=1.0,
                              momentum=0.9)
        make = {"CosineAnnealingWarmRestarts": lambda: L.CosineAnnealingWarmRestarts(opt, 3),
                "StepLR": lambda: L.StepLR(opt, 2), "ReduceLROnPlateau": lambda: L.ReduceLROnPlateau(opt),
                "CyclicLR": lambda: L.CyclicLR(opt, 0.1, 1.0),
                "SequentialLR": lambda: L.SequentialLR(opt, [L.ConstantLR(opt), L.StepLR(opt, 2)], [2])}[kind]
        return opt, make()

    opt, sched = build(saved_groups)
    for _ in range(2):
        opt.step()
        sched.step(*([1.0] if kind == "ReduceLROnPlateau" else []))
    path = torchckpt.Checkpoint(sched=sched).write(tmp_path / "c")
    opt, sched = build(groups)
    before = copy.deepcopy(sched.state_dict())
    status = torchckpt.Checkpoint(sched=sched).read(path).expect_partial()
    assert "one for each parameter group of the optimizer it was saved with" in status.report.skipped_objects["sched"]
    assert sched.state_dict().keys() == before.keys()
    assert all(repr(sched.state_dict()[k]) == repr(v) for k, v in before.items()), "left untouched"
    with pytest.raises(torchckpt.RestoreMismatchError, match="objects left untouched"):
        status.assert_existing_objects_matched()
    opt.step()
    sched.step(*([1.0] if kind == "ReduceLROnPlateau" else []))  # still steps


@pytest.mark.parametrize("kind", ["StepLR", "ReduceLROnPlateau"])
def test_a_scheduler_whose_optimizer_gained_a_group_after_it_was_built_resumes_exactly(tmp_path, kind):
    """probe79 F2: progressive unfreezing, a group added to the optimizer after the scheduler was
    built: its per-group lists are as long as the groups then or now, and torch's load restores it."""
    L = torch.optim.lr_scheduler

    def build():
        torch.manual_seed(0)
        a, b = torch.nn.Linear(2, 2), torch.nn.Linear(2, 2)
        opt = torch.optim.SGD(a.parameters(), lr=0.1)
        sched = L.StepLR(opt, step_size=1, gamma=0.5) if kind == "StepLR" else L.ReduceLROnPlateau(opt, patience=0)
        opt.add_param_group({"params": b.parameters(), "lr": 0.05})  # unfrozen later
        return opt, sched

    opt, sched = build()
    for loss in (3.0, 4.0, 5.0):
        opt.step()
        sched.step(*([loss] if kind == "ReduceLROnPlateau" else []))
    path = torchckpt.Checkpoint(opt=opt, sched=sched).write(tmp_path / "c")
    opt2, sched2 = build()
    torchckpt.Checkpoint(opt=opt2, sched=sched2).read(path).assert_consumed()
    assert repr(sched2.state_dict()) == repr(sched.state_dict())


@pytest.mark.parametrize("kind", ["NAdam", "ASGD"])
def test_a_never_stepped_optimizer_takes_its_float32_scalars_for_a_bfloat16_model(tmp_path, kind):
    """probe79 F3: NAdam's mu_product and ASGD's eta and mu stay float32 whatever the parameters
    (as a stepped optimizer keeps them): they are no dtype mismatch."""
    model = torch.nn.Linear(4, 3).to(torch.bfloat16)
    opt = getattr(torch.optim, kind)(model.parameters(), lr=0.01)
    model(torch.ones(2, 4, dtype=torch.bfloat16)).sum().backward()
    opt.step()
    path = torchckpt.Checkpoint(opt=opt).write(tmp_path / "c")
    fresh = torch.nn.Linear(4, 3).to(torch.bfloat16)
    fresh_opt = getattr(torch.optim, kind)(fresh.parameters(), lr=0.01)
    status = torchckpt.Checkpoint(opt=fresh_opt).read(path)
    status.assert_consumed()
    assert not status.report.dtype_mismatches


class _MyAdam(torch.optim.Adam):
    pass


class _Float32Moments(torch.optim.Adam):
    """A step of its own that keeps its moments in float32 for bfloat16 parameters."""

    @torch.no_grad()
    def step(self, closure=None):  # type: ignore[no-untyped-def,override]
        for group in self.param_groups:
            for p in group["params"]:
                state = self.state[p]
                if not state:
                    state["step"] = torch.tensor(0.0)
                    state["exp_avg"] = torch.zeros(p.shape, dtype=torch.float32)
                state["step"] += 1
                state["exp_avg"].mul_(0.9).add_(p.grad.float(), alpha=0.1)
                p.sub_((group["lr"] * state["exp_avg"]).to(p.dtype))


def test_an_optimizer_with_a_step_of_its_own_is_not_compared_by_torchs_dtypes(tmp_path):
    """probe82: an optimizer keeping float32 state for bfloat16 parameters was skipped as a dtype
    mismatch when never stepped, and restored when stepped."""
    model = torch.nn.Linear(4, 3).to(torch.bfloat16)
    opt = _Float32Moments(model.parameters(), lr=0.1)
    model(torch.ones(2, 4, dtype=torch.bfloat16)).sum().backward()
    opt.step()
    path = torchckpt.Checkpoint(opt=opt).write(tmp_path / "c")
    fresh = _Float32Moments(torch.nn.Linear(4, 3).to(torch.bfloat16).parameters(), lr=0.1)
    status = torchckpt.Checkpoint(opt=fresh).read(path)
    status.assert_consumed()  # loaded as torch.load + load_state_dict would load it (torch casts it then)
    assert not status.report.dtype_mismatches


@pytest.mark.parametrize("stepped", [False, True], ids=["never-stepped", "stepped"])
def test_optimizer_state_of_another_dtype_is_a_dtype_mismatch_whether_or_not_the_optimizer_stepped(tmp_path, stepped):
    """probe78 F3: a never-stepped optimizer took float32 moments into a bfloat16 model, cast by
    torch's load_state_dict, with nothing reported; a stepped one reported the mismatch."""

    def adam(dtype: torch.dtype):
        torch.manual_seed(0)
        model = torch.nn.Linear(4, 3).to(dtype)
        opt = (torch.optim.Adam if dtype == torch.float32 else _MyAdam)(model.parameters(), lr=0.1)
        return model, opt  # restored into a subclass of Adam: known by its base (probe81)

    model, opt = adam(torch.float32)
    model(torch.ones(2, 4)).sum().backward()
    opt.step()
    path = torchckpt.Checkpoint(opt=opt).write(tmp_path / "c")
    saved = {k: v.clone() for k, v in opt.state[model.weight].items()}
    model, opt = adam(torch.bfloat16)
    if stepped:
        model(torch.ones(2, 4, dtype=torch.bfloat16)).sum().backward()
        opt.step()
    before = copy.deepcopy(opt.state_dict())
    status = torchckpt.Checkpoint(opt=opt).read(path).expect_partial()
    assert status.report.dtype_mismatches["opt/state/0/exp_avg"] == (torch.float32, torch.bfloat16)
    assert set(status.report.dtype_mismatches) == {f"opt/state/{i}/{k}" for i in (0, 1) for k in ("exp_avg", "exp_avg_sq")}
    assert "opt" in status.report.skipped_objects
    assert repr(opt.state_dict()) == repr(before)  # left untouched
    status = torchckpt.Checkpoint(opt=opt).read(path, cast=True)
    status.assert_consumed()
    assert status.report.cast_keys["opt/state/0/exp_avg"] == (torch.float32, torch.bfloat16)
    assert torch.equal(opt.state[model.weight]["exp_avg"], saved["exp_avg"].to(torch.bfloat16))
    assert opt.state[model.weight]["exp_avg"].dtype == torch.bfloat16


def test_rng_states_of_devices_this_process_lacks_are_reported_unexpected(tmp_path):
    """probe78 F5: RNGState sets the CUDA states of the devices it has, and the report called every
    saved one restored; assert_consumed() passed."""
    available = torch.cuda.device_count() if torch.cuda.is_available() else 0
    state = torchckpt.RNGState().state_dict()  # as saved on a machine of two devices more
    one = torch.cuda.get_rng_state(0) if available else torch.zeros(16, dtype=torch.uint8)
    state["cuda"] = [one.clone() for _ in range(available + 2)]
    path = torchckpt.Checkpoint(rng=state).write(tmp_path / "c")
    with warnings.catch_warnings():
        warnings.simplefilter("error")  # the report says it: no warning of RNGState's own
        status = torchckpt.Checkpoint(rng=torchckpt.RNGState()).read(path).expect_partial()
    lacking = [f"rng/cuda/{i}" for i in range(available, available + 2)]
    assert status.report.unexpected_keys == lacking
    assert not set(lacking) & set(status.report.restored_keys)
    with pytest.raises(torchckpt.RestoreMismatchError, match="rng/cuda/"):
        status.assert_consumed()
    status.assert_existing_objects_matched()  # this process's generators were all set


def test_a_chained_lambdas_saved_attributes_are_not_set_on_a_function(tmp_path):
    # probe41 F4: the LambdaLR inside a ChainedScheduler was not checked
    def chain(lr_lambda):
        opt = torch.optim.SGD([torch.nn.Parameter(torch.zeros(2))], lr=0.1)
        return torch.optim.lr_scheduler.ChainedScheduler([torch.optim.lr_scheduler.LambdaLR(opt, lr_lambda),
                                                          torch.optim.lr_scheduler.StepLR(opt, 2)])

    path = torchckpt.Checkpoint(sched=chain(_Warmup(5))).write(tmp_path / "c")
    function = lambda epoch: 0.9 ** epoch  # noqa: E731
    status = torchckpt.Checkpoint(sched=chain(function)).read(path).expect_partial()
    assert status.report.unexpected_keys == ["sched/_schedulers/0/lr_lambdas/0/steps"] and vars(function) == {}


class _Counter:  # a user's Stateful
    def __init__(self, v: int = 0) -> None:
        self.v = v

    def state_dict(self) -> dict:
        return {"v": self.v}

    def load_state_dict(self, state: dict) -> None:
        self.v = state["v"]


def _sequential(second, **arguments) -> torch.optim.lr_scheduler.SequentialLR:
    opt = torch.optim.SGD(torch.nn.Linear(2, 2).parameters(), lr=0.1)
    schedulers = [torch.optim.lr_scheduler.StepLR(opt, 2), second(opt, **arguments)]
    return torch.optim.lr_scheduler.SequentialLR(opt, schedulers, [2])


def _step_lr() -> torch.optim.lr_scheduler.StepLR:
    return torch.optim.lr_scheduler.StepLR(torch.optim.SGD(torch.nn.Linear(2, 2).parameters(), lr=0.1), 3)


@pytest.mark.parametrize(("saved_as", "tracked_as", "reason"), [
    (lambda: torch.Generator().manual_seed(3), torchckpt.RNGState, "a uint8 tensor of shape (5056,) under this name"),
    (lambda: torch.nn.Linear(2, 2), torchckpt.RNGState, "('weight', 'bias') shares no key with this RNGState's"),
    (lambda: torch.nn.Linear(2, 2), _step_lr, "shares no key with this StepLR's"),
    (lambda: 7, lambda: torch.amp.GradScaler("cpu"), "the value 7 under this name, not a state dict for GradScaler"),
    (lambda: torch.amp.GradScaler("cpu", enabled=False), lambda: torch.amp.GradScaler("cpu"),
     "is empty, where this GradScaler's has keys (saved by an object with nothing to save, such as a disabled"),
    (lambda: _sequential(torch.optim.lr_scheduler.StepLR, step_size=3),
     lambda: _sequential(torch.optim.lr_scheduler.LambdaLR, lr_lambda=lambda e: 1.0),
     "its scheduler 1 (LambdaLR): the checkpoint's state lacks 'lr_lambdas'"),
    (lambda: {"scale": 2.0}, lambda: torch.amp.GradScaler("cpu"),
     "lacks 'growth_factor', 'backoff_factor', 'growth_interval', '_growth_tracker', which GradScaler"),
    (lambda: {"python": (3, (1, 2), None), "torch": 0}, torchckpt.RNGState, "its Python random state cannot be set"),
    (_Counter, torchckpt.RNGState, "('v') shares no key with this RNGState's"),
    (_step_lr, lambda: torch.optim.lr_scheduler.LambdaLR(torch.optim.SGD([torch.zeros(1)]), lambda e: 1.0),
     "lacks 'lr_lambdas', which LambdaLR.load_state_dict reads"),
    (lambda: {"_schedulers": []}, lambda: torch.optim.lr_scheduler.ChainedScheduler([_step_lr()]),
     "'_schedulers' are a list of 0 items, where this ChainedScheduler chains 1"),
])
def test_a_stateful_saved_as_another_kind_is_refused_before_anything_changes(tmp_path, saved_as, tracked_as, reason):
    """Found while planning: before, ``load_state_dict`` failed after the reads (the model already
    overwritten, "Objects may be partly restored"), or a scheduler took a module's tensors as its
    attributes and the report listed them restored."""
    path = torchckpt.Checkpoint(model=torch.nn.Linear(2, 2), x=saved_as()).write(tmp_path / "c")
    model = torch.nn.Linear(2, 2)
    before = copy.deepcopy(model.state_dict())
    obj = tracked_as()
    state = obj.state_dict()
    status = torchckpt.Checkpoint(model=model, x=obj).read(path)
    assert reason in status.report.skipped_objects["x"]
    assert "x/weight" not in status.report.restored_keys
    with pytest.raises(RestoreMismatchError, match="objects left untouched"):
        status.assert_existing_objects_matched()
    assert not torch.equal(model.weight, before["weight"])  # the rest was restored, as with a skipped optimizer
    assert str(obj.state_dict()) == str(state)  # this one untouched
    same = torchckpt.Checkpoint(x=tracked_as()).write(tmp_path / "same")  # the same kind still restores
    assert not torchckpt.Checkpoint(x=tracked_as()).read(same).report.skipped_objects


def test_a_users_stateful_object_is_handed_any_state_dict_and_a_subclass_loader_its_own(tmp_path):
    """A user's class may read a key its state no longer has (a renamed one, for older checkpoints),
    or hold a placeholder until it loads: only torch's and torchckpt's own loaders are checked."""
    class Renamed(_Counter):
        def state_dict(self) -> dict:
            return {"value": self.v}

        def load_state_dict(self, state: dict) -> None:
            self.v = state["value"] if "value" in state else state["v"]  # an older checkpoint's name

    class Scaler(torch.amp.GradScaler):  # an extra key, defaulted when absent
        def state_dict(self) -> dict:
            return {**super().state_dict(), "extra": 1}

    path = torchckpt.Checkpoint(c=_Counter(7), s=torch.amp.GradScaler("cpu", init_scale=8.0)).write(tmp_path / "c")
    c, scaler = Renamed(), Scaler("cpu")
    status = torchckpt.Checkpoint(c=c, s=scaler).read(path)
    assert c.v == 7 and scaler.get_scale() == 8.0 and not status.report.skipped_objects
    assert status.report.missing_keys == ["c/value", "s/extra"]  # reported, as for any object


def test_rng_state_of_the_same_kind_restores_and_a_malformed_one_is_refused(tmp_path):
    rng = torchckpt.RNGState()
    torch.manual_seed(5)
    path = torchckpt.Checkpoint(rng=rng).write(tmp_path / "ok")
    expected = torch.rand(3)
    torchckpt.Checkpoint(rng=torchckpt.RNGState()).read(path).assert_consumed()
    assert torch.equal(torch.rand(3), expected)
    bad = torchckpt.Checkpoint(rng={"python": random.getstate(), "torch": torch.zeros(7, dtype=torch.uint8)})
    path = bad.write(tmp_path / "bad")
    torch.manual_seed(6)
    status = torchckpt.Checkpoint(rng=torchckpt.RNGState()).read(path)
    assert ("its torch random state is a uint8 tensor of shape (7,), where this process's is a uint8 tensor of shape "
            "(5056,)") in status.report.skipped_objects["rng"]
    after = torch.rand(3)  # the process's generator was left as it was
    torch.manual_seed(6)
    assert torch.equal(after, torch.rand(3))


def test_module_extra_state_and_non_aliasing_entries_go_through_load_state_dict(tmp_path):
    class WithExtra(torch.nn.Module):
        def __init__(self, tag: str) -> None:
            super().__init__()
            self.lin = torch.nn.Linear(2, 2)
            self.tag = tag

        def get_extra_state(self):
            return {"tag": self.tag, "scale": torch.tensor([2.0])}

        def set_extra_state(self, state):
            self.tag = state["tag"]
            self.scale = state["scale"]

    path = torchckpt.Checkpoint(m=WithExtra("saved")).write(tmp_path / "c")
    target = WithExtra("fresh")
    torchckpt.Checkpoint(m=target).read(path).assert_consumed()
    assert target.tag == "saved" and torch.equal(target.scale, torch.tensor([2.0]))


def test_tracked_tensor_restores_in_place(tmp_path):
    path = torchckpt.Checkpoint(step=torch.tensor(41)).write(tmp_path / "c")
    step = torch.tensor(0)
    ptr = step.data_ptr()
    torchckpt.Checkpoint(step=step).read(path).assert_consumed()
    assert step.item() == 41 and step.data_ptr() == ptr


def test_an_expanded_destination_is_refused_before_anything_changes(tmp_path):
    path = torchckpt.Checkpoint(a=torch.ones(3), b=torch.full((2, 3), 2.0), m=make_mlp(1)).write(tmp_path / "c")
    a, b = torch.zeros(3), torch.zeros(1, 3).expand(2, 3)  # stride 0: both rows are one memory
    with pytest.raises(torchckpt.UnsupportedStateError, match=r"Cannot restore into 'b': it is an expanded view .* "
                                                              r"Restore into a tensor of its own \(clone\(\) it\)") as info:
        torchckpt.Checkpoint(a=a, b=b).read(path)
    assert info.value.key == "b" and a.tolist() == [0.0, 0.0, 0.0]  # a, planned first, was not written either
    module = make_mlp(2)
    module.register_buffer("rows", torch.zeros(1, 3).expand(2, 3))
    with pytest.raises(torchckpt.UnsupportedStateError, match=r"Cannot restore into 'm/rows': it is an expanded view"):
        torchckpt.Checkpoint(m=module).read(path)
    ones = torch.zeros(1, 3).expand(1, 3)  # stride 0 along a dimension of size 1 shares nothing
    torchckpt.Checkpoint(b=ones).read(torchckpt.Checkpoint(b=torch.full((1, 3), 5.0)).write(tmp_path / "d"))
    assert ones.tolist() == [[5.0, 5.0, 5.0]]


@pytest.mark.parametrize("strides", [(1, 1), (2, 1), (1, 3)])  # element (1, 0) is element (0, 1), (0, 2), (0, 1)
def test_a_destination_whose_elements_overlap_is_refused_before_anything_changes(tmp_path, strides):
    """probe33 F1: only stride 0 was refused; these restored with a clean report and wrong values."""
    path = torchckpt.Checkpoint(a=torch.ones(3), b=torch.arange(12.0).view(4, 3)).write(tmp_path / "c")
    a, b = torch.zeros(3), torch.zeros(64).as_strided((4, 3), strides)
    with pytest.raises(torchckpt.UnsupportedStateError, match=rf"'b': it is a view whose strides \[{strides[0]}, "
                                                              rf"{strides[1]}\] make elements of shape \[4, 3\] overlap"):
        torchckpt.Checkpoint(a=a, b=b).read(path)
    assert a.tolist() == [0.0, 0.0, 0.0]
    for view in (torch.zeros(12).as_strided((4, 3), (3, 1)), torch.zeros(64).as_strided((4, 3), (1, 4)),
                 torch.zeros(64).as_strided((4, 3), (6, 2)), torch.zeros(8, 6)[::2, ::2]):  # no two elements share
        torchckpt.Checkpoint(a=torch.zeros(3), b=view).read(path).assert_consumed()
        assert torch.equal(view, torch.arange(12.0).view(4, 3))


def test_an_inference_tensor_that_torch_copies_would_fill_is_refused_before_anything_changes(tmp_path):
    """probe33 F2: a non-contiguous one (or one cast) failed with torch's bare RuntimeError during
    the reads or the casts, other tensors already written. A contiguous one is read into as plain
    memory, as before, and under inference mode a cast is made too (probe34 F1)."""
    path = torchckpt.Checkpoint(a=torch.ones(3), b=torch.ones(2, 2)).write(tmp_path / "c")
    with torch.inference_mode():
        made = torch.zeros(2, 2)
        wide = torch.zeros(2, 2, dtype=torch.float64)
    a = torch.zeros(3)
    with pytest.raises(torchckpt.UnsupportedStateError, match="'b': it is an inference tensor .* that is not contiguous"):
        torchckpt.Checkpoint(a=a, b=made.t()).read(path)
    with pytest.raises(torchckpt.UnsupportedStateError, match="'b' with a cast: its destination is an inference tensor"):
        torchckpt.Checkpoint(a=a, b=wide).read(path, cast=True)
    assert a.tolist() == [0.0, 0.0, 0.0] and made.tolist() == [[0.0, 0.0], [0.0, 0.0]] and not wide.any()
    torchckpt.Checkpoint(a=a, b=made).read(path).assert_consumed()
    with torch.inference_mode():
        torchckpt.Checkpoint(a=a, b=wide, rng=torchckpt.RNGState()).read(path, cast=True).expect_partial()
    assert made.tolist() == wide.tolist() == [[1.0, 1.0], [1.0, 1.0]] and a.tolist() == [1.0, 1.0, 1.0]


def test_a_users_loader_takes_what_an_older_version_saved(tmp_path):
    """probe34 F2: an object whose older version saved a list (or an int) and whose loader reads it."""
    class Ema:
        def __init__(self) -> None:
            self.v = [0.0]

        def state_dict(self) -> dict:
            return {"values": self.v}

        def load_state_dict(self, state) -> None:
            self.v = list(state) if isinstance(state, list) else state["values"]

    path = torchckpt.Checkpoint(e=[5.0, 6.0]).write(tmp_path / "c")
    ema = Ema()
    status = torchckpt.Checkpoint(e=ema).read(path)
    assert ema.v == [5.0, 6.0] and not status.report.skipped_objects


def test_an_object_that_refuses_the_saved_state_is_named_and_no_checkpoint_is_called_damaged(tmp_path):
    class Stepper:  # a user's object whose loader reads a key its older version did not save
        def __init__(self, needs_step: bool) -> None:
            self.needs_step = needs_step

        def state_dict(self) -> dict:
            return {"lr": 0.1, **({"step": 3} if self.needs_step else {})}

        def load_state_dict(self, state: dict) -> None:
            if self.needs_step:
                self.step = state["step"]

    model = make_mlp(1)
    mgr = torchckpt.CheckpointManager(torchckpt.Checkpoint(model=model, opt=Stepper(False)), tmp_path, max_to_keep=3)
    mgr.save()
    mgr.save()
    mgr.close()
    fresh = make_mlp(2)
    called = []  # (torch's own optimizers are checked while planning: test_a_never_stepped_optimizer_is_left_untouched...)
    mgr = torchckpt.CheckpointManager(torchckpt.Checkpoint(model=fresh, opt=Stepper(True)), tmp_path, max_to_keep=3,
                                      init_fn=lambda: called.append(1))
    with warnings.catch_warnings():
        warnings.simplefilter("error")  # no DamagedCheckpointWarning: nothing falls back
        with pytest.raises(torchckpt.CheckpointError, match=r"ckpt-2 failed while 'opt' loaded its state \(KeyError: "
                                                            r"'step'\): the checkpoint's state for it does not fit this "
                                                            r"object .* Objects may be partly restored") as info:
            mgr.restore_or_initialize()
    assert not isinstance(info.value, torchckpt.CorruptCheckpointError) and info.value.key == "opt"
    assert info.value.path == str(tmp_path / "ckpt-2")
    assert called == [] and torchckpt.get_checkpoint_state(tmp_path).damaged == {}
    mgr.close()
    mgr = torchckpt.CheckpointManager(torchckpt.Checkpoint(model=make_mlp(3), opt=Stepper(False)), tmp_path,
                                      max_to_keep=3)
    assert mgr.restore_or_initialize().endswith("ckpt-2")  # the right objects restore the newest one
    mgr.close()


def test_missing_object_is_reported(tmp_path):
    path = torchckpt.Checkpoint(a=torch.ones(1)).write(tmp_path / "c")
    status = torchckpt.Checkpoint(a=torch.zeros(1), b=torch.zeros(2), n=3).read(path)
    assert sorted(status.report.missing_keys) == ["b", "n"]
    with pytest.raises(RestoreMismatchError, match="missing from the checkpoint \\(2\\): b, n"):
        status.assert_existing_objects_matched()


def test_an_optimizer_of_many_parameters_gets_its_state_through_load_state_dict_with_set_lookups(tmp_path):
    """torch's ``Optimizer.load_state_dict`` looks each state tensor's parameter up in its group's
    ``params`` list (quadratic in the parameters): a restore hands it lists with set lookups, equal
    to the saved ones, and the optimizer ends up with its own lists and the saved state, exactly."""
    from torchckpt._load.optimizer import ParamIds

    params = [torch.nn.Parameter(torch.randn(3)) for _ in range(300)]
    opt = torch.optim.Adam([{"params": params[:100]}, {"params": params[100:], "lr": 0.1}])
    for p in params:
        p.grad = torch.randn(3)
    opt.step()
    path = torchckpt.Checkpoint(opt=opt).write(tmp_path / "c")

    fresh = [torch.nn.Parameter(torch.zeros(3)) for _ in range(300)]
    restored = torch.optim.Adam([{"params": fresh[:100]}, {"params": fresh[100:], "lr": 0.5}])
    seen: list[list[int]] = []
    restored.register_load_state_dict_pre_hook(
        lambda _, state: seen.extend(g["params"] for g in state["param_groups"]))
    torchckpt.Checkpoint(opt=restored).read(path).assert_consumed()
    assert [type(ids) for ids in seen] == [ParamIds, ParamIds]
    assert seen == [list(range(100)), list(range(100, 300))]
    assert all(i in seen[1] for i in range(100, 300)) and 0 not in seen[1] and 99 not in seen[1]  # as torch asks them
    assert [g["params"] for g in restored.param_groups] == [fresh[:100], fresh[100:]]
    assert all(type(g["params"]) is list for g in restored.param_groups)
    assert restored.param_groups[1]["lr"] == 0.1
    for old, new in zip(params, fresh):
        for key in ("step", "exp_avg", "exp_avg_sq"):
            assert torch.equal(opt.state[old][key], restored.state[new][key])


@pytest.mark.parametrize("change", [
    pytest.param(lambda ids: ids.append(7), id="append"),
    pytest.param(lambda ids: ids.extend([7]), id="extend"),
    pytest.param(lambda ids: ids.insert(0, 7), id="insert"),
    pytest.param(lambda ids: ids.__setitem__(0, 7), id="setitem"),
    pytest.param(lambda ids: ids.__setitem__(slice(0, 1), [7]), id="slice"),
    pytest.param(lambda ids: ids.__iadd__([7]), id="iadd"),
    pytest.param(lambda ids: (ids.remove(1), ids.append(7)), id="remove"),
    pytest.param(lambda ids: (ids.pop(0), ids.append(7)), id="pop"),
    pytest.param(lambda ids: (ids.__delitem__(0), ids.append(7)), id="delitem"),
    pytest.param(lambda ids: (ids.clear(), ids.extend([7, 2, 3])), id="clear"),
])
def test_param_ids_answer_in_as_a_list_does_after_any_change(change):
    from torchckpt._load.optimizer import ParamIds

    ids = ParamIds([1, 2, 3])
    assert 1 in ids and 7 not in ids  # the set is built here
    expected = [1, 2, 3]
    change(expected)
    change(ids)
    assert ids == expected
    for item in range(10):
        assert (item in ids) == (item in expected), item
    assert [1] not in ids and type(copy.deepcopy(ids)) is list


def test_param_ids_with_an_unhashable_element_scan_as_a_list():
    from torchckpt._load.optimizer import ParamIds

    ids = ParamIds([1, [2]])
    assert [2] in ids and 1 in ids and 3 not in ids


@pytest.mark.parametrize("make", [
    lambda p: torch.optim.AdamW(p, lr=0.01, fused=True),
    lambda p: torch.optim.SGD(p, lr=0.01, momentum=0.9, fused=True),
    lambda p: torch.optim.Adam(p, lr=0.01, foreach=True),
], ids=["adamw-fused", "sgd-fused", "adam-foreach"])
def test_a_channels_last_model_resumes_bit_exact_into_a_fresh_optimizer(tmp_path, make):
    """Fused kernels read a parameter and its state as flat buffers of one layout: the state of a
    channels_last weight, which the optimizer never made (it never stepped), must be channels_last."""
    def build(seed):
        torch.manual_seed(seed)
        model = torch.nn.Conv2d(3, 4, 3).to(memory_format=torch.channels_last)
        return model, make(model.parameters())

    def step(model, opt, i):
        x = torch.randn(2, 3, 6, 6, generator=torch.Generator().manual_seed(i)).to(memory_format=torch.channels_last)
        opt.zero_grad()
        (model(x) ** 2).mean().backward()
        opt.step()

    model, opt = build(0)
    for i in range(3):
        step(model, opt, i)
    path = torchckpt.Checkpoint(model=model, opt=opt).write(tmp_path / "c")
    fresh, fresh_opt = build(1)
    torchckpt.Checkpoint(model=fresh, opt=fresh_opt).read(path).assert_consumed()
    assert all(v.stride() == fresh.weight.stride() for v in fresh_opt.state[fresh.weight].values() if v.dim() == 4)
    for i in range(3, 6):
        step(model, opt, i)
        step(fresh, fresh_opt, i)
    for a, b in zip(model.parameters(), fresh.parameters()):
        assert torch.equal(a, b)


def test_an_optimizer_that_stepped_restored_from_one_that_did_not_is_exact_and_reports_nothing_missing(tmp_path):
    """``load_state_dict`` replaces an optimizer's state whole: after the restore it has state for
    exactly the parameters the checkpoint has state for, as torch's own round trip gives."""
    model = make_mlp(0)
    never_stepped = torch.optim.Adam(model.parameters())
    path = torchckpt.Checkpoint(opt=never_stepped).write(tmp_path / "c")
    stepped = torch.optim.Adam(make_mlp(1).parameters())
    stepped.param_groups[0]["params"][0].grad = torch.ones_like(stepped.param_groups[0]["params"][0])
    stepped.step()
    status = torchckpt.Checkpoint(opt=stepped).read(path).assert_consumed()
    assert not status.report.missing_keys and not stepped.state


class _Untied(torch.nn.Module):
    def __init__(self, seed: int, tie: bool = False, own_loader: bool = False) -> None:
        super().__init__()
        torch.manual_seed(seed)
        self.head = (_OwnLoader if own_loader else torch.nn.Linear)(4, 5, bias=False)  # registered first
        self.emb = torch.nn.Embedding(5, 4)
        if tie:
            self.head.weight = self.emb.weight


class _OwnLoader(torch.nn.Linear):
    def _load_from_state_dict(self, *args):  # restored through load_state_dict semantics (_load.hooked)
        super()._load_from_state_dict(*args)


@pytest.mark.parametrize("own_loader", [False, True], ids=["in-place", "hooked"])
def test_an_untied_checkpoint_into_tied_weights_keeps_the_value_load_state_dict_keeps(tmp_path, own_loader):
    saved = _Untied(0, own_loader=own_loader)
    path = torchckpt.Checkpoint(model=saved).write(tmp_path / "c")
    target, twin = _Untied(1, tie=True, own_loader=own_loader), _Untied(1, tie=True, own_loader=own_loader)
    twin.load_state_dict(torchckpt.load_state(path)["model"])  # copies head.weight, then emb.weight: emb's wins
    report = torchckpt.Checkpoint(model=target).read(path).expect_partial().report
    assert torch.equal(target.emb.weight, saved.emb.weight) and torch.equal(target.emb.weight, twin.emb.weight)
    assert target.head.weight is target.emb.weight
    if not own_loader:  # the value that was not used is reported (load_state_dict's own semantics say nothing)
        assert report.unexpected_keys == ["model/head.weight"] and report.restored_keys == ["model/emb.weight"]


def test_tied_weights_from_a_tied_checkpoint_and_parameters_of_one_buffer_restore_every_key(tmp_path):
    saved = _Untied(0, tie=True)
    path = torchckpt.Checkpoint(model=saved).write(tmp_path / "c")
    target = _Untied(1, tie=True)
    torchckpt.Checkpoint(model=target).read(path).assert_consumed()
    assert torch.equal(target.emb.weight, saved.emb.weight) and target.head.weight is target.emb.weight
    flat = torch.arange(8.0)
    layer = torch.nn.Module()
    layer.a, layer.b = torch.nn.Parameter(flat[:4]), torch.nn.Parameter(flat[4:])  # one storage, two tensors
    path = torchckpt.Checkpoint(model=layer).write(tmp_path / "flat")
    buffer = torch.zeros(8)
    fresh = torch.nn.Module()
    fresh.a, fresh.b = torch.nn.Parameter(buffer[:4]), torch.nn.Parameter(buffer[4:])
    torchckpt.Checkpoint(model=fresh).read(path).assert_consumed()
    assert torch.equal(buffer, flat)


@pytest.mark.parametrize("own_loader", [False, True], ids=["in-place", "hooked"])
@pytest.mark.parametrize("tied_checkpoint", [True, False], ids=["tied", "untied"])
def test_assign_into_a_tied_meta_model_shares_memory_as_torch_load_does(tmp_path, own_loader, tied_checkpoint):
    """``load_state_dict(torch.load(f), assign=True)`` into a model built on the meta device: the
    keys of one saved tensor (tied weights) get parameters over one memory, so the weights stay
    tied for the training that follows; an untied checkpoint gives each key its own value."""
    saved = _Untied(0, tie=tied_checkpoint, own_loader=own_loader)
    path = torchckpt.Checkpoint(model=saved).write(tmp_path / "c")
    torch.save(saved.state_dict(), tmp_path / "c.pt")
    with torch.device("meta"):
        target, twin = (_Untied(1, tie=True, own_loader=own_loader) for _ in range(2))
    twin.load_state_dict(torch.load(tmp_path / "c.pt"), assign=True)
    torchckpt.Checkpoint(model=target).read(path, assign=True).assert_consumed()
    for model in (target, twin):
        assert torch.equal(model.emb.weight, saved.emb.weight) and torch.equal(model.head.weight, saved.head.weight)
    shared = twin.head.weight.data_ptr() == twin.emb.weight.data_ptr()
    assert shared is tied_checkpoint
    assert (target.head.weight.data_ptr() == target.emb.weight.data_ptr()) is shared


@pytest.mark.parametrize("hook", ["own-loader", "post-hook"])
def test_assign_into_a_tied_model_with_a_loader_of_its_own_keeps_the_tie_as_torch_load_does(tmp_path, hook):
    """Not on the meta device, a model with any load hook goes through load_state_dict's semantics,
    where assign replaces the parameters: the two keys of one saved tensor get one memory."""
    saved = _Untied(0, tie=True, own_loader=hook == "own-loader")
    path = torchckpt.Checkpoint(model=saved).write(tmp_path / "c")
    torch.save(saved.state_dict(), tmp_path / "c.pt")
    target, twin = (_Untied(1, tie=True, own_loader=hook == "own-loader") for _ in range(2))
    if hook == "post-hook":
        for model in (target, twin):
            model.register_load_state_dict_post_hook(lambda module, incompatible: None)
    twin.load_state_dict(torch.load(tmp_path / "c.pt"), assign=True)
    torchckpt.Checkpoint(model=target).read(path, assign=True).assert_consumed()
    for model in (target, twin):
        assert torch.equal(model.emb.weight, saved.emb.weight)
        assert model.head.weight.data_ptr() == model.emb.weight.data_ptr()


def test_a_restore_moves_the_version_counters_as_load_state_dict_does(tmp_path):
    """Read in place behind autograd's back, a graph built before the restore would back-propagate
    the restored weights through the old activations; load_state_dict's copy_ makes backward() raise."""
    path = torchckpt.Checkpoint(model=make_mlp(0), t=torch.ones(3)).write(tmp_path / "c")
    model, tracked = make_mlp(1), torch.zeros(3, requires_grad=True)
    loss = model(torch.randn(2, 4)).pow(2).sum() + (tracked * tracked).sum()
    versions = [p._version for p in model.parameters()]
    torchckpt.Checkpoint(model=model, t=tracked).read(path).assert_consumed()
    assert all(p._version > v for p, v in zip(model.parameters(), versions)) and tracked._version > 0
    with pytest.raises(RuntimeError, match="modified by an inplace operation"):
        loss.backward()


def test_tracked_meta_tensors_saved_as_one_come_back_as_one_memory_with_assign(tmp_path):
    shared = torch.arange(4.0)
    path = torchckpt.Checkpoint(a=shared, b=shared, c=torch.arange(4.0)).write(tmp_path / "c")
    meta = [torch.empty(4, device="meta") for _ in range(3)]
    ckpt = torchckpt.Checkpoint(a=meta[0], b=meta[1], c=meta[2])
    ckpt.read(path, assign=True).assert_consumed()
    assert ckpt.a.data_ptr() == ckpt.b.data_ptr() != ckpt.c.data_ptr()
    assert all(torch.equal(t, torch.arange(4.0)) for t in (ckpt.a, ckpt.b, ckpt.c))
