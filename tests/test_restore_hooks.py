"""torch's restore semantics: a module with load_state_dict hooks, or a loader of its own, comes back
exactly as ``load_state_dict`` would give it (each test compares with a twin), and its hooks run;
plain modules (batch norms included) keep the in-place path."""

from __future__ import annotations

import gc
import hashlib
import os
import sys
import uuid
from collections import OrderedDict
from pathlib import Path
from typing import Any

import pytest
import torch
from torch.nn.utils import parametrize

import torchckpt
import torchckpt.cli
from torchckpt._format.chunks import ChunkedInfo
from torchckpt._format.dtypes import TensorInfo
from torchckpt._load import hooked, mapped

from .conftest import read_index, train_step, write_index


def assert_same_state(a: torch.nn.Module, b: torch.nn.Module) -> None:
    """Equal state dicts (keys in order, dtypes, bits), and equal parameter values as the model sees them."""
    sa, sb = a.state_dict(), b.state_dict()
    assert list(sa) == list(sb)
    for k in sa:
        assert sa[k].dtype == sb[k].dtype and sa[k].shape == sb[k].shape, k
        assert torch.equal(sa[k].reshape(-1).view(torch.uint8), sb[k].reshape(-1).view(torch.uint8)), k
    for (name, p), (_, q) in zip(a.named_parameters(), b.named_parameters()):
        assert torch.equal(p, q), name


def restore(target: torch.nn.Module, path: str) -> torchckpt.MismatchReport:
    return torchckpt.Checkpoint(model=target).read(path).expect_partial().report


# -- the modules ------------------------------------------------------------------------------------------


class Old(torch.nn.Module):
    """The model as an old checkpoint saved it: its layer was called ``old``."""

    def __init__(self, seed: int) -> None:
        super().__init__()
        torch.manual_seed(seed)
        self.old = torch.nn.Linear(4, 3)


class Renamed(torch.nn.Module):
    """The same model today (``old`` became ``new``), with a pre-hook that renames old keys."""

    def __init__(self, seed: int) -> None:
        super().__init__()
        torch.manual_seed(seed)
        self.new = torch.nn.Linear(4, 3)
        self.calls = 0
        self.register_load_state_dict_pre_hook(Renamed.rename)

    def rename(self, state_dict, prefix, *args) -> None:
        self.calls += 1
        for key in [k for k in state_dict if k.startswith(prefix + "old.")]:
            state_dict[prefix + "new." + key[len(prefix + "old."):]] = state_dict.pop(key)


class Recorded(torch.nn.Module):
    """A post-hook that records the incompatible keys it was called with."""

    def __init__(self, seed: int) -> None:
        super().__init__()
        torch.manual_seed(seed)
        self.layer = torch.nn.Linear(3, 2)
        self.seen: list[tuple[list[str], list[str]]] = []
        self.register_load_state_dict_post_hook(Recorded.record)

    def record(self, incompatible) -> None:
        self.seen.append((list(incompatible.missing_keys), list(incompatible.unexpected_keys)))


class Symmetric(torch.nn.Module):
    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return x.triu() + x.triu(1).transpose(-1, -2)


def symmetric_linear(seed: int) -> torch.nn.Module:
    torch.manual_seed(seed)
    layer = torch.nn.Linear(4, 4)
    parametrize.register_parametrization(layer, "weight", Symmetric())
    return layer


class Transposed(torch.nn.Linear):
    """A loader of its own: the checkpoint holds the weight transposed (as some converted models do)."""

    def _load_from_state_dict(self, state_dict, prefix, *args) -> None:
        key = prefix + "weight"
        if key in state_dict:
            state_dict[key] = state_dict[key].t()
        super()._load_from_state_dict(state_dict, prefix, *args)


def trained_batch_norm(seed: int, steps: int) -> torch.nn.Module:
    torch.manual_seed(seed)
    norm = torch.nn.BatchNorm1d(3)
    for _ in range(steps):
        norm(torch.randn(5, 3))
    return norm


# -- hooks run, and the result is load_state_dict's ----------------------------------------------------------


def test_a_pre_hook_renames_old_keys_as_load_state_dict_does(tmp_path):
    path = torchckpt.Checkpoint(model=Old(0)).write(tmp_path / "c")
    target, twin = Renamed(1), Renamed(1)
    twin.load_state_dict(Old(0).state_dict())
    report = restore(target, path)
    assert_same_state(target, twin)
    assert torch.equal(target.new.weight, Old(0).old.weight)
    assert target.calls == twin.calls == 1
    assert not report and sorted(report.restored_keys) == ["model/old.bias", "model/old.weight"]


def test_a_post_hook_runs_once_and_sees_what_load_state_dict_reports(tmp_path):
    source = Recorded(0)
    source.extra = torch.nn.Linear(1, 1)  # in the checkpoint, not in the target: unexpected
    path = torchckpt.Checkpoint(model=source).write(tmp_path / "c")
    target, twin = Recorded(1), Recorded(1)
    twin.load_state_dict(source.state_dict(), strict=False)
    report = restore(target, path)
    assert_same_state(target, twin)
    assert target.seen == twin.seen == [([], ["extra.weight", "extra.bias"])]
    assert report.unexpected_keys == ["model/extra.weight", "model/extra.bias"] and not report.missing_keys


def test_a_parametrized_module_restores_its_original_and_computed_weight(tmp_path):
    path = torchckpt.Checkpoint(model=symmetric_linear(0)).write(tmp_path / "c")
    target, twin = symmetric_linear(1), symmetric_linear(1)
    twin.load_state_dict(symmetric_linear(0).state_dict())
    report = restore(target, path)
    assert_same_state(target, twin)
    assert torch.equal(target.weight, symmetric_linear(0).weight) and torch.equal(target.weight, target.weight.T)
    assert "parametrizations.weight.original" in target.state_dict()
    assert not report


def test_a_module_with_its_own_loader_is_loaded_by_it(tmp_path):
    torch.manual_seed(0)
    saved = {"weight": torch.randn(2, 3), "bias": torch.randn(3)}  # weight stored transposed
    path = torchckpt.save_state({"model": saved}, tmp_path / "c")
    target, twin = Transposed(2, 3), Transposed(2, 3)
    twin.load_state_dict(saved)
    report = restore(target, path)
    assert_same_state(target, twin)
    assert torch.equal(target.weight, saved["weight"].t())
    assert not report and hooked.survey(target).needs_load_semantics


class _OwnLoader(torch.nn.Linear):
    def load_state_dict(self, state_dict, strict=True, assign=False):  # type: ignore[no-untyped-def]
        return super().load_state_dict(state_dict, strict=strict, assign=assign)


@pytest.mark.parametrize("cls", [torch.nn.Linear, _OwnLoader], ids=["in-place", "its-own-loader"])
def test_a_key_of_another_dtype_is_a_dtype_mismatch_not_missing_too(tmp_path, cls):
    """probe78 F6: the override, never handed a key left out for its dtype, answered it missing."""
    path = torchckpt.Checkpoint(m=torch.nn.Linear(3, 2).double()).write(tmp_path / "c")
    report = torchckpt.Checkpoint(m=cls(3, 2)).read(path).expect_partial().report
    assert sorted(report.dtype_mismatches) == ["m/bias", "m/weight"] and report.missing_keys == []


def test_batch_norm_without_num_batches_tracked_keeps_its_count_and_reports_nothing_missing(tmp_path):
    old = {k: v for k, v in trained_batch_norm(0, 2).state_dict().items() if k != "num_batches_tracked"}
    path = torchckpt.save_state({"model": old}, tmp_path / "c")
    target, twin = trained_batch_norm(1, 3), trained_batch_norm(1, 3)
    twin.load_state_dict(old)
    report = restore(target, path)
    assert_same_state(target, twin)
    assert target.num_batches_tracked.item() == 3
    assert not report.missing_keys and not report
    found = hooked.survey(target)  # the in-place path
    assert not found.needs_load_semantics and found.kept == frozenset({"num_batches_tracked"})


def test_plain_models_keep_the_in_place_path(mlp):
    assert not hooked.survey(mlp).needs_load_semantics
    assert not hooked.survey(torch.nn.Sequential(torch.nn.Conv1d(2, 2, 1), torch.nn.BatchNorm1d(2))).needs_load_semantics


# -- inside a plain model, with an optimizer --------------------------------------------------------------


class Stack(torch.nn.Module):
    def __init__(self, inner: torch.nn.Module) -> None:
        super().__init__()
        self.embed = torch.nn.Linear(3, 3)
        self.inner = inner
        self.norm = torch.nn.BatchNorm1d(4)


def test_a_hooked_submodule_in_a_plain_model_with_an_optimizer(tmp_path):
    torch.manual_seed(0)
    source = Stack(Old(0))
    opt = torch.optim.Adam(source.parameters(), lr=0.1)
    train_step(source.inner.old, opt, 0)
    path = torchckpt.Checkpoint(model=source, opt=opt).write(tmp_path / "c")
    target, twin = Stack(Renamed(1)), Stack(Renamed(1))
    twin.load_state_dict(source.state_dict())
    target_opt = torch.optim.Adam(target.parameters(), lr=0.1)
    embed_weight = target.embed.weight
    report = torchckpt.Checkpoint(model=target, opt=target_opt).restore(path).assert_consumed().report
    assert_same_state(target, twin)
    assert target.embed.weight is embed_weight  # read in place: the optimizer's parameter is the same object
    assert target.inner.calls == 1 and "model/inner.old.weight" in report.restored_keys
    for mine, theirs in zip(target_opt.state_dict()["state"].values(), opt.state_dict()["state"].values()):
        assert all(torch.equal(mine[k], theirs[k]) for k in theirs)


class _WithExtraState(torch.nn.Linear):
    def get_extra_state(self) -> dict:
        return {"k": 41}

    def set_extra_state(self, state: dict) -> None:
        self.got = state


class _Scaled(torch.nn.Module):
    def __init__(self, a: torch.nn.Module, scale: str | None = None) -> None:
        super().__init__()
        self.a = a
        if scale == "parameter":
            self.scale = torch.nn.Parameter(torch.ones(2))
        elif scale == "module":
            self.scale = torch.nn.Linear(2, 2)
        self.b = torch.nn.Linear(2, 2)


@pytest.mark.parametrize(("saved", "now", "key"), [
    (lambda: _Scaled(_WithExtraState(2, 2)), lambda: _Scaled(torch.nn.Linear(2, 2)), "a._extra_state"),
    (lambda: _Scaled(torch.nn.Linear(2, 2), "parameter"), lambda: _Scaled(torch.nn.Linear(2, 2), "module"), "scale"),
], ids=["extra-state-nothing-takes", "a-one-part-key-naming-a-child"])
def test_keys_no_loader_takes_in_a_hooked_model_are_unexpected_as_load_state_dict_says(tmp_path, saved, now, key):
    """probe78 F4: a model with a load_state_dict hook anywhere is loaded by torch's rules, which
    torchckpt's copy of them bent: these keys were reported restored, and assert_consumed() passed."""
    old = saved()
    path = torchckpt.Checkpoint(m=old).write(tmp_path / "c")
    assert now().load_state_dict(old.state_dict(), strict=False).unexpected_keys == [key]  # torch's own answer
    model = now()
    model.b.register_load_state_dict_pre_hook(lambda *args: None)  # any hook: torch's semantics
    status = torchckpt.Checkpoint(m=model).read(path).expect_partial()
    assert status.report.unexpected_keys == [f"m/{key}"]
    assert f"m/{key}" not in status.report.restored_keys
    with pytest.raises(torchckpt.RestoreMismatchError, match=f"m/{key}"):
        status.assert_consumed()


def test_a_hooked_module_missing_a_key_reports_it_as_load_state_dict_does(tmp_path):
    path = torchckpt.save_state({"model": {"old.weight": torch.ones(3, 4)}}, tmp_path / "c")
    target, twin = Renamed(1), Renamed(1)
    result = twin.load_state_dict({"old.weight": torch.ones(3, 4)}, strict=False)
    report = restore(target, path)
    assert_same_state(target, twin)
    assert result.missing_keys == ["new.bias"] and report.missing_keys == ["model/new.bias"]


# -- failures ------------------------------------------------------------------------------------------


def test_a_damaged_shard_of_a_hooked_module_fails_its_checksum(tmp_path):
    path = torchckpt.Checkpoint(model=Old(0)).write(tmp_path / "c")
    shard = Path(path) / "model-00001-of-00001.safetensors"
    raw = bytearray(shard.read_bytes())
    raw[-5] ^= 0x01
    shard.write_bytes(bytes(raw))
    target = Renamed(1)
    before = target.new.weight.clone()
    with pytest.raises(torchckpt.CorruptCheckpointError, match="fails its checksum") as info:
        torchckpt.Checkpoint(model=target).read(path)
    assert info.value.path == str(shard)
    assert target.calls == 0 and torch.equal(target.new.weight, before)  # found before the hook ran
    assert not maps_of(path)


def test_a_size_mismatch_inside_a_hooked_module_is_a_reported_shape_mismatch_not_damage(tmp_path):
    path = torchckpt.save_state({"model": {"old.weight": torch.ones(5, 4), "old.bias": torch.ones(3)}}, tmp_path / "c")
    with pytest.raises(RuntimeError, match="size mismatch for new.weight"):  # what torch does
        Renamed(1).load_state_dict({"old.weight": torch.ones(5, 4), "old.bias": torch.ones(3)})
    model = Renamed(1)
    before = model.new.weight.clone()
    status = torchckpt.Checkpoint(model=model).read(path).expect_partial()
    # as on the in-place path: the tensor that does not fit is left as it is and reported
    assert status.report.shape_mismatches == {"model/new.weight": (torch.Size([5, 4]), torch.Size([3, 4]))}
    assert torch.equal(model.new.weight, before) and torch.equal(model.new.bias, torch.ones(3))
    with pytest.raises(torchckpt.RestoreMismatchError, match="model/new.weight"):
        status.assert_consumed()


class _Wrapper(torch.nn.Module):
    def __init__(self, module: torch.nn.Module) -> None:
        super().__init__()
        self.module = module


class _OwnFromStateDict(torch.nn.Linear):
    def _load_from_state_dict(self, *args: Any) -> None:
        super()._load_from_state_dict(*args)


def test_shape_mismatches_are_named_by_the_checkpoints_key_inside_a_hooked_module_too(tmp_path):
    """probe78 F7: a DDP-saved checkpoint's size mismatch inside a hooked module was named by the
    object's key (m/0.weight) where the in-place path names it by the checkpoint's (m/module.1.weight)."""
    saved = _Wrapper(torch.nn.Sequential(torch.nn.Linear(3, 4), torch.nn.Linear(4, 2)))
    path = torchckpt.Checkpoint(m=saved).write(tmp_path / "c")
    model = torch.nn.Sequential(_OwnFromStateDict(3, 5), torch.nn.Linear(5, 2))  # both layers 5 wide now
    report = torchckpt.Checkpoint(m=model).read(path).expect_partial().report
    assert sorted(report.shape_mismatches) == ["m/module.0.bias", "m/module.0.weight", "m/module.1.weight"]


def test_a_size_mismatch_inside_a_hooked_module_is_not_reported_restored(tmp_path):
    class OwnLoader(torch.nn.Linear):
        def _load_from_state_dict(self, *args) -> None:
            super()._load_from_state_dict(*args)

    path = torchckpt.Checkpoint(model=torch.nn.Sequential(OwnLoader(4, 4))).write(tmp_path / "c")
    target = torch.nn.Sequential(OwnLoader(4, 6))
    report = torchckpt.Checkpoint(model=target).read(path).expect_partial().report
    assert sorted(report.shape_mismatches) == ["model/0.bias", "model/0.weight"]
    assert report.restored_keys == []  # both left as they were, as on the in-place path


def test_a_model_that_no_longer_fits_never_marks_a_managers_checkpoints_damaged(tmp_path):
    saved = torch.nn.Sequential(torch.nn.Linear(4, 4))
    manager = torchckpt.CheckpointManager(torchckpt.Checkpoint(model=saved), tmp_path, max_to_keep=3)
    manager.save(), manager.save()
    manager.close()
    bigger = torch.nn.Sequential(torch.nn.Linear(4, 8))
    bigger.register_load_state_dict_pre_hook(lambda *args: None)  # a hooked model (as HF and quantized ones are)
    manager = torchckpt.CheckpointManager(torchckpt.Checkpoint(model=bigger), tmp_path, max_to_keep=3)
    try:
        with pytest.warns(torchckpt.PartialRestoreWarning, match="shape mismatches"):  # warned at once
            assert manager.restore_or_initialize() == str(tmp_path / "ckpt-2")  # the latest, not a fallback
        status = manager.last_restore
        assert set(status.report.shape_mismatches) == {"model/0.weight", "model/0.bias"}
    finally:
        manager.close()
    assert torchckpt.get_checkpoint_state(tmp_path).latest.endswith("ckpt-2")
    assert "damaged" not in (tmp_path / "checkpoints.json").read_text()


# -- the values a hook sees are views of the mapped shard: no second copy -----------------------------------

needs_proc_maps = pytest.mark.skipif(not os.path.exists("/proc/self/maps"), reason="needs /proc/self/maps (Linux)")


def maps_of(directory: str | os.PathLike[str]) -> list[tuple[int, int]]:
    """The address ranges this process maps from files under ``directory`` ([] where /proc is not there)."""
    if not os.path.exists("/proc/self/maps"):
        return []
    root = os.path.realpath(directory).rstrip(os.sep) + os.sep
    found = []
    with open("/proc/self/maps") as f:
        for line in f:
            fields = line.split(maxsplit=5)
            if len(fields) == 6 and fields[5].startswith(root):
                low, high = (int(x, 16) for x in fields[0].split("-"))
                found.append((low, high))
    return found


def file_digest(directory: str | os.PathLike[str]) -> str:
    h = hashlib.sha256()
    for path in sorted(Path(directory).iterdir()):
        h.update(path.read_bytes())
    return h.hexdigest()


class Probe(torch.nn.Module):
    """Two layers under a pre-hook on the model that records, for each value it is handed, whether its
    memory lies in a map of a file under ``checkpoint`` (by default: of any file); with ``double``, it
    also doubles each weight in place."""

    def __init__(self, seed: int, checkpoint: str | os.PathLike[str] = "/", double: bool = False) -> None:
        super().__init__()
        torch.manual_seed(seed)
        self.a, self.b = torch.nn.Linear(4, 8), torch.nn.Linear(8, 2)
        self.checkpoint, self.double = checkpoint, double
        self.mapped: list[bool] = []
        self.register_load_state_dict_pre_hook(Probe.look)

    def look(self, state_dict, prefix, *args) -> None:
        regions = maps_of(self.checkpoint)
        self.mapped = [any(low <= t.data_ptr() < high for low, high in regions) for t in state_dict.values()]
        if self.double:
            for key in [k for k in state_dict if k.endswith("weight")]:
                state_dict[key].mul_(2)


@needs_proc_maps
def test_a_hook_is_handed_views_of_the_mapped_shard_and_no_map_outlives_the_restore(tmp_path):
    source = Probe(0)
    path = torchckpt.Checkpoint(model=source).write(tmp_path / "c")
    for seed in (1, 2):  # twice: the second restore maps again, and closes again
        target, twin = Probe(seed, path), Probe(seed)
        twin.load_state_dict(source.state_dict())
        report = restore(target, path)
        assert_same_state(target, twin)
        assert target.mapped == [True] * 4  # the page cache itself, not a copy of it
        assert not maps_of(path) and not report


@needs_proc_maps
def test_a_hook_that_writes_into_its_values_changes_neither_the_file_nor_the_next_restore(tmp_path):
    source = Probe(0)
    path = torchckpt.Checkpoint(model=source).write(tmp_path / "c")
    before = file_digest(path)
    for _ in range(2):
        target, twin = Probe(1, path, double=True), Probe(1, double=True)
        twin.load_state_dict({k: v.clone() for k, v in source.state_dict().items()})
        restore(target, path)
        assert_same_state(target, twin)
        assert torch.equal(target.a.weight, 2 * source.a.weight) and target.mapped == [True] * 4
    assert file_digest(path) == before  # a write into a view copies its page: the shard never changes
    assert not maps_of(path)


class Keeper(torch.nn.Linear):
    """A loader of its own that keeps the value it was handed (as some converted modules do)."""

    def _load_from_state_dict(self, state_dict, prefix, *args) -> None:
        self.kept = state_dict[prefix + "weight"]
        super()._load_from_state_dict(state_dict, prefix, *args)


@needs_proc_maps
def test_a_loader_that_keeps_a_value_keeps_its_map_until_it_drops_it(tmp_path):
    torch.manual_seed(0)
    source = torch.nn.Linear(3, 2)
    path = torchckpt.Checkpoint(model=source).write(tmp_path / "c")
    target = Keeper(3, 2)
    restore(target, path)
    assert maps_of(path)  # closing the map under the kept view would leave it pointing at nothing
    assert torch.equal(target.kept, source.weight) and torch.equal(target.weight, source.weight)
    del target.kept
    gc.collect()
    assert not maps_of(path)


@pytest.fixture
def memory_dir():
    """A fresh ``memory://`` directory (fsspec's in-process store), removed after the test."""
    fsspec = pytest.importorskip("fsspec")
    url = f"memory://hooks-{uuid.uuid4().hex[:12]}"
    yield url
    fs = fsspec.filesystem("memory")
    if fs.exists(url):
        fs.rm(url, recursive=True)


def on_object_store(tmp_path, memory_dir):
    return memory_dir + "/c", Probe(1), {}


def onto_meta_with_assign(tmp_path, memory_dir):
    with torch.device("meta"):
        target = Probe(1)
    return str(tmp_path / "c"), target, {"assign": True}


@needs_proc_maps
@pytest.mark.parametrize("where", [on_object_store, onto_meta_with_assign], ids=["object store", "assign onto meta"])
def test_where_a_view_cannot_serve_the_hook_gets_fresh_checked_tensors(tmp_path, memory_dir, where):
    source = Probe(0)
    path, target, options = where(tmp_path, memory_dir)
    path = torchckpt.Checkpoint(model=source).write(path)
    twin = Probe(1)
    twin.load_state_dict(source.state_dict())
    torchckpt.Checkpoint(model=target).read(path, **options).assert_consumed()
    assert_same_state(target, twin)
    assert target.mapped == [False] * 4 and not maps_of(tmp_path)


@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA device")
def test_a_hooked_module_on_cuda_gets_fresh_tensors_and_restores_as_load_state_dict_does(tmp_path):
    source = Probe(0)
    path = torchckpt.Checkpoint(model=source).write(tmp_path / "c")
    target, twin = Probe(1).cuda(), Probe(1).cuda()
    twin.load_state_dict(source.state_dict())
    restore(target, path)
    assert_same_state(target, twin)
    assert target.mapped == [False] * 4 and not maps_of(path)


def info(start: int, dtype: torch.dtype = torch.float32, shape: tuple[int, ...] = (2,)) -> TensorInfo:
    size = torch.Size(shape)
    return TensorInfo("t", "f", dtype, size, start, size.numel() * dtype.itemsize, 0)


@pytest.mark.parametrize(("saved", "expected"), [
    (info(64), True),
    (info(66), False),  # not aligned to its element size
    (info(66, torch.bfloat16), True),
    (info(64, shape=(0,)), False),  # empty: nothing to map
    (ChunkedInfo("t", torch.float32, torch.Size([2]), ()), False),  # format 2's chunks: assembled by the reads
], ids=["aligned", "misaligned", "aligned bf16", "empty", "chunked"])
def test_which_saved_tensors_can_be_views(saved, expected):
    assert mapped.viewable(saved) is (expected and sys.byteorder == "little")


# -- what the report says is what happened (found by a probe of unusual modules) -----------------


class ExportsCalibration(torch.nn.Module):
    """A state-dict hook adds a key no parameter holds and no loader reads."""

    def __init__(self) -> None:
        super().__init__()
        self.lin = torch.nn.Linear(2, 2)
        self.calib = torch.zeros(2)
        self._register_state_dict_hook(ExportsCalibration.export)

    @staticmethod
    def export(module, state, prefix, local_metadata):
        state[prefix + "calib"] = module.calib.clone()


def test_a_key_a_state_dict_hook_adds_that_no_loader_takes_is_unexpected_not_restored(tmp_path):
    saved = ExportsCalibration()
    saved.calib = torch.tensor([3.0, 4.0])
    path = torchckpt.Checkpoint(model=saved).write(tmp_path / "c")
    target, twin = ExportsCalibration(), ExportsCalibration()
    report = restore(target, path)
    assert twin.load_state_dict(torchckpt.load_state(path)["model"], strict=False).unexpected_keys == ["calib"]
    assert report.unexpected_keys == ["model/calib"] and "model/calib" not in report.restored_keys
    assert sorted(report.restored_keys) == ["model/lin.bias", "model/lin.weight"]


def test_a_meta_module_with_its_own_loader_restored_without_assign_is_reported_missing(tmp_path):
    # a batch norm's loader copies into meta tensors without a word (torch only warns): not restored
    path = torchckpt.Checkpoint(model=torch.nn.BatchNorm1d(3)).write(tmp_path / "c")
    with torch.device("meta"):
        target = torch.nn.BatchNorm1d(3)
    status = torchckpt.Checkpoint(model=target).read(path).expect_partial()
    keys = ["model/bias", "model/num_batches_tracked", "model/running_mean", "model/running_var", "model/weight"]
    assert sorted(status.report.meta_keys) == keys and sorted(status.report.missing_keys) == keys
    assert status.report.restored_keys == []
    with pytest.raises(torchckpt.RestoreMismatchError, match="on the meta device"):
        status.assert_consumed()
    with torch.device("meta"):
        assigned = torch.nn.BatchNorm1d(3)
    torchckpt.Checkpoint(model=assigned).read(path, assign=True).assert_consumed()
    assert not assigned.weight.is_meta


@pytest.mark.parametrize("assign", [True, False], ids=["assign onto meta", "in place"])
def test_cast_gives_a_hooked_module_the_models_dtype_as_the_plain_modules_get_it(tmp_path, assign):
    # a batch norm has a loader of its own: restored through load_state_dict, whose assign keeps the
    # saved dtype, where cast=True promises the model's (the plain Linear beside it gets bfloat16)
    torch.manual_seed(0)
    saved = torch.nn.Sequential(torch.nn.Linear(3, 3), torch.nn.BatchNorm1d(3))
    saved[1].running_mean.normal_()
    path = torchckpt.Checkpoint(model=saved).write(tmp_path / "c")
    with torch.device("meta" if assign else "cpu"):
        target = torch.nn.Sequential(torch.nn.Linear(3, 3), torch.nn.BatchNorm1d(3)).to(torch.bfloat16)
    report = torchckpt.Checkpoint(model=target).read(path, assign=assign, cast=True).assert_consumed().report
    expected = saved.to(torch.bfloat16).state_dict()
    for key, value in target.state_dict().items():
        assert not value.is_meta and value.dtype == expected[key].dtype, key
        assert torch.equal(value, expected[key]), key
    floating = sorted(f"model/{k}" for k, v in expected.items() if v.is_floating_point())
    assert sorted(report.cast_keys) == floating
    if assign:
        assert report.cast_keys["model/1.running_mean"] == (torch.float32, torch.bfloat16)
        assert target[1].weight.requires_grad and isinstance(target[1].weight, torch.nn.Parameter)


class QuantizingLinear(torch.nn.Module):
    """int8 weights at a fixed scale, whose loader quantizes a float checkpoint's weight."""

    def __init__(self) -> None:
        super().__init__()
        self.register_buffer("weight", torch.zeros(4, 4, dtype=torch.int8))

    def _load_from_state_dict(self, state_dict, prefix, *args) -> None:
        w = state_dict.get(prefix + "weight")
        if w is not None and w.is_floating_point():
            state_dict[prefix + "weight"] = torch.round(w.clamp(-1, 1) * 127).to(torch.int8)
        super()._load_from_state_dict(state_dict, prefix, *args)


@pytest.mark.parametrize("assign", [True, False], ids=["assign", "in place"])
def test_cast_leaves_a_loader_that_converts_its_tensors_what_it_made(tmp_path, assign):
    # cast=True must not hand a module's own loader the model's dtype: it quantizes the float it is
    # given, and a float32 weight cast to int8 first truncates every value below 1 to 0
    torch.manual_seed(0)
    saved = torch.nn.Sequential(torch.nn.Linear(4, 4, bias=False))
    path = torchckpt.Checkpoint(model=saved).write(tmp_path / "c")
    twin = torch.nn.Sequential(QuantizingLinear())
    twin.load_state_dict(saved.state_dict(), assign=assign)
    target = torch.nn.Sequential(QuantizingLinear())
    report = torchckpt.Checkpoint(model=target).read(path, assign=assign, cast=True).assert_consumed().report
    assert torch.equal(target[0].weight, twin[0].weight) and target[0].weight.abs().sum() > 0
    assert report.cast_keys == {}  # its loader converted it: nothing was cast


def test_a_child_named_module_is_not_taken_for_a_ddp_wrapper(tmp_path):
    class Saved(torch.nn.Module):
        def __init__(self) -> None:
            super().__init__()
            self.module = torch.nn.Linear(3, 3)

    class Target(torch.nn.Module):
        def __init__(self) -> None:
            super().__init__()
            self.module = torch.nn.Linear(3, 3, bias=False)
            self.bias = torch.nn.Parameter(torch.zeros(3))  # its own offset, not the Linear's bias

    path = torchckpt.Checkpoint(model=Saved()).write(tmp_path / "c")
    target = Target()
    report = restore(target, path)
    assert report.missing_keys == ["model/bias"] and report.unexpected_keys == ["model/module.bias"]
    assert not report.remapped_keys and torch.equal(target.bias, torch.zeros(3))
    wrapped = torch.nn.Sequential()  # a real wrapper's keys still pair: every key under module.
    wrapped.module = Target()
    assert not restore(Target(), torchckpt.Checkpoint(model=wrapped).write(tmp_path / "ddp"))


def test_a_lazy_module_restores_from_a_materialised_checkpoint_and_an_unmaterialised_one_is_refused(tmp_path):
    torch.manual_seed(0)
    trained = torch.nn.LazyLinear(3)
    trained(torch.ones(1, 4))
    path = torchckpt.Checkpoint(model=trained).write(tmp_path / "c")
    fresh = torch.nn.LazyLinear(3)
    torchckpt.Checkpoint(model=fresh).read(path).assert_consumed()
    assert_same_state(fresh, trained)
    with pytest.raises(torchckpt.UnsupportedStateError, match=r"'model/weight': it is an uninitialized parameter of a "
                                                              r"lazy module .* run one forward pass first\.$") as info:
        torchckpt.Checkpoint(model=torch.nn.LazyLinear(3)).write(tmp_path / "lazy")
    assert info.value.key == "model/weight"
    alone = torch.nn.LazyLinear(3)  # its parameter tracked without the module: nothing would make it (before: an
    with pytest.raises(torchckpt.UnsupportedStateError, match=r"'w' on its own: it is a lazy module's uninitialized "
                       r"parameter, .* Track only its module") as info:  # untyped RuntimeError from torch, at planning)
        torchckpt.Checkpoint(w=alone.weight).read(torchckpt.Checkpoint(w=trained.weight).write(tmp_path / "w"))
    assert info.value.key == "w" and torch.nn.parameter.is_lazy(alone.weight)
    # probe83 F3: a checkpoint without a tensor for it has nothing to read into it: missing, as before
    report = torchckpt.Checkpoint(w=alone.weight, x=torch.zeros(1)).read(
        torchckpt.Checkpoint(x=torch.ones(1)).write(tmp_path / "x")).expect_partial().report
    assert report.missing_keys == ["w"] and report.restored_keys == ["x"]


# -- module versions: a loader that migrates old checkpoints by ``_version`` ---------------------------------


class MigratesByVersion(torch.nn.Linear):
    """A layer whose version 1 stored ``weight`` transposed; its loader migrates such checkpoints, as
    torch's own versioned modules do (``local_metadata["version"]``, from ``state_dict()``'s ``_metadata``)."""

    _version = 2

    def _load_from_state_dict(self, state_dict, prefix, local_metadata, *args):
        self.seen = local_metadata.get("version")
        if self.seen is None or self.seen < 2:
            state_dict[prefix + "weight"] = state_dict[prefix + "weight"].t()
        super()._load_from_state_dict(state_dict, prefix, local_metadata, *args)


def versioned_model(seed: int) -> torch.nn.Module:
    torch.manual_seed(seed)
    return torch.nn.Sequential(MigratesByVersion(3, 3), torch.nn.BatchNorm1d(3))


def test_a_versioned_loader_sees_the_version_the_checkpoint_was_saved_with(tmp_path):
    saved = versioned_model(0)
    path = torchckpt.Checkpoint(model=saved).write(tmp_path / "c")
    assert read_index(path)["torchckpt"]["module_versions"] == {"model": {"0": 2, "1": 2}}
    target, twin = versioned_model(1), versioned_model(1)
    twin.load_state_dict(saved.state_dict())  # torch: the state dict's _metadata says version 2, nothing migrates
    torchckpt.Checkpoint(model=target).read(path).assert_consumed()
    assert target[0].seen == twin[0].seen == 2
    assert_same_state(target, saved) and assert_same_state(twin, saved)


def test_versions_follow_a_rename_and_a_ddp_prefix(tmp_path):
    wrapped = torch.nn.Sequential()
    wrapped.module = versioned_model(0)  # saved as DDP saves: module.0.weight
    path = torchckpt.Checkpoint(net=wrapped).write(tmp_path / "c")
    target = versioned_model(1)
    status = torchckpt.Checkpoint(model=target).read(path, rename={"net": "model"})
    status.assert_consumed()
    assert target[0].seen == 2
    assert_same_state(target, wrapped.module)


def test_the_version_of_a_model_a_ddp_wrapper_held_reaches_its_root_loader_both_ways(tmp_path):
    saved = MigratesByVersion(3, 3)  # the model itself is versioned: under a wrapper its prefix is "module"
    wrapper = torch.nn.Module()
    wrapper.module = saved
    target = MigratesByVersion(3, 3)
    torchckpt.Checkpoint(model=target).read(torchckpt.Checkpoint(model=wrapper).write(tmp_path / "a")).assert_consumed()
    assert target.seen == 2 and torch.equal(target.weight, saved.weight)
    into = torch.nn.Module()
    into.module = MigratesByVersion(3, 3)
    torchckpt.Checkpoint(model=into).read(torchckpt.Checkpoint(model=saved).write(tmp_path / "b")).assert_consumed()
    assert into.module.seen == 2 and torch.equal(into.module.weight, saved.weight)


def test_a_checkpoint_without_versions_hands_loaders_none_as_a_state_dict_without_metadata(tmp_path):
    saved = versioned_model(0)
    path = torchckpt.Checkpoint(model=saved).write(tmp_path / "c")
    index = read_index(path)
    del index["torchckpt"]["module_versions"]  # as torchckpt 0.1.0 wrote it
    write_index(path, index)
    target = versioned_model(1)
    torchckpt.Checkpoint(model=target).read(path).assert_consumed()
    assert target[0].seen is None and torch.equal(target[0].weight, saved[0].weight.t())  # migrated, as torch would


def test_save_state_and_load_state_keep_a_state_dicts_versions(tmp_path):
    saved = versioned_model(0)
    for i, state in enumerate([{"model": saved.state_dict(), "step": 3}, saved.state_dict()]):
        loaded = torchckpt.load_state(torchckpt.save_state(state, tmp_path / str(i)))
        model_state = loaded.get("model", loaded)
        assert model_state._metadata == {"": {"version": 1}, "0": {"version": 2}, "1": {"version": 2}}
        target = versioned_model(1)
        target.load_state_dict(model_state)
        assert target[0].seen == 2
        assert_same_state(target, saved)
    loaded = torchckpt.load_state(torchckpt.Checkpoint(model=saved).write(tmp_path / "ckpt"))
    assert type(loaded["model"]) is OrderedDict and loaded["model"]._metadata["0"] == {"version": 2}
    pair = torchckpt.load_state(torchckpt.Checkpoint(pair=(saved, versioned_model(2))).write(tmp_path / "tuple"))["pair"]
    assert type(pair) is tuple and all(m._metadata["0"] == {"version": 2} for m in pair)
    pair = torchckpt.load_state(torchckpt.save_state({"pair": (saved.state_dict(), 1)}, tmp_path / "plain"))["pair"]
    assert pair[0]._metadata["1"] == {"version": 2} and pair[1] == 1


def test_a_consolidated_checkpoint_keeps_the_versions_its_loaders_migrate_by(tmp_path):
    saved = versioned_model(0)
    path = torchckpt.Checkpoint(model=saved).write(tmp_path / "c")
    assert torchckpt.cli.main(["consolidate", path, str(tmp_path / "one")]) == 0
    assert read_index(tmp_path / "one")["torchckpt"]["module_versions"] == {"model": {"0": 2, "1": 2}}
    target = versioned_model(1)
    torchckpt.Checkpoint(model=target).read(tmp_path / "one").assert_consumed()
    assert target[0].seen == 2  # not migrated again: before, the weight came back transposed
    assert_same_state(target, saved)
    assert torchckpt.load_state(tmp_path / "one")["model"]._metadata["0"] == {"version": 2}


def test_a_batch_norm_saved_at_version_2_without_its_count_reports_it_missing_as_torch(tmp_path):
    saved = torch.nn.Sequential(torch.nn.BatchNorm1d(3))
    state = saved.state_dict()
    del state["0.num_batches_tracked"]  # the OrderedDict keeps its _metadata: version 2
    path = torchckpt.save_state({"model": state}, tmp_path / "c")
    twin = torch.nn.Sequential(torch.nn.BatchNorm1d(3))
    expected = twin.load_state_dict(state, strict=False)
    report = restore(torch.nn.Sequential(torch.nn.BatchNorm1d(3)), path)
    assert expected.missing_keys == ["0.num_batches_tracked"] and report.missing_keys == ["model/0.num_batches_tracked"]


def test_a_ddp_wrapped_checkpoint_of_a_model_with_a_child_named_module_pairs_every_key_unwrapped(tmp_path):
    class Model(torch.nn.Module):  # a parameter beside a child named ``module`` (as AveragedModel has)
        def __init__(self, seed: int) -> None:
            super().__init__()
            torch.manual_seed(seed)
            self.weight = torch.nn.Parameter(torch.randn(3, 3))
            self.module = torch.nn.Linear(3, 3)

    saved = Model(0)
    wrapper = torch.nn.Sequential()
    wrapper.module = saved  # as DDP wraps it: module.weight, module.module.weight, module.module.bias
    target = Model(1)
    report = torchckpt.Checkpoint(model=target).read(torchckpt.Checkpoint(model=wrapper).write(tmp_path / "c"))\
        .assert_consumed().report
    assert_same_state(target, saved)
    assert report.remapped_keys["model/module.weight"] == "model/weight"


class _ScaledByExtraState(torch.nn.Module):
    """Extra state that is a tensor over the module's own (non-persistent) buffer, from which
    ``set_extra_state`` derives another value: fp8 scaling keeps its amax this way."""

    def __init__(self) -> None:
        super().__init__()
        self.register_buffer("amax", torch.ones(4), persistent=False)
        self.scale = 1.0

    def get_extra_state(self) -> torch.Tensor:
        return self.amax

    def set_extra_state(self, state: torch.Tensor) -> None:
        self.amax.copy_(state)
        self.scale = float(448.0 / state.max())


class _AddsATransposedView(torch.nn.Module):
    """A state-dict hook adds a view of a parameter under a key of its own; no loader takes it."""

    def __init__(self, fill: float) -> None:
        super().__init__()
        self.w = torch.nn.Parameter(torch.full((2, 3), fill))
        self._register_state_dict_hook(lambda m, state, prefix, local: state.__setitem__(prefix + "w_t", m.w.detach().T))


def test_extra_state_over_a_buffers_memory_is_handed_to_set_extra_state(tmp_path):
    saved = _ScaledByExtraState()
    saved.amax.fill_(8.0)
    path = torchckpt.Checkpoint(model=saved).write(tmp_path / "c")
    target, twin = _ScaledByExtraState(), _ScaledByExtraState()
    twin.load_state_dict(saved.state_dict())
    torchckpt.Checkpoint(model=target).read(path).assert_consumed()
    assert target.scale == twin.scale == 56.0 and torch.equal(target.amax, twin.amax)


def test_a_key_a_state_dict_hook_adds_over_a_parameter_is_not_read_into_it(tmp_path):
    saved = _AddsATransposedView(7.0)
    state = saved.state_dict()
    state["w"] = torch.ones(2, 3)  # w_t, over w's memory in the model, now says something else
    path = torchckpt.save_state({"model": state}, tmp_path / "c")
    target, twin = _AddsATransposedView(0.0), _AddsATransposedView(0.0)
    result = twin.load_state_dict(state, strict=False)
    report = torchckpt.Checkpoint(model=target).read(path).expect_partial().report
    assert torch.equal(target.w, twin.w) and torch.equal(target.w, torch.ones(2, 3))
    assert result.unexpected_keys == ["w_t"] and report.unexpected_keys == ["model/w_t"]


class _OwnStateDict(torch.nn.Linear):
    """A ``state_dict`` override without ``keep_vars``, and a hook that calls ``.numpy()``."""

    def __init__(self) -> None:
        super().__init__(3, 2)
        self.seen: list[Any] = []
        self._register_state_dict_hook(lambda m, state, prefix, local: m.seen.append(state[prefix + "weight"].numpy()))

    def state_dict(self):  # type: ignore[override]
        return super().state_dict()


def test_a_state_dict_override_and_a_hook_that_needs_plain_tensors_save_and_restore(tmp_path):
    """What ``state_dict()`` hands them is what they get: no ``keep_vars`` argument, tensors that
    do not require grad."""
    torch.manual_seed(0)
    saved = _OwnStateDict()
    path = torchckpt.Checkpoint(model=saved).write(tmp_path / "c")
    target = _OwnStateDict()
    torchckpt.Checkpoint(model=target).read(path).assert_consumed()
    assert torch.equal(target.weight, saved.weight) and torch.equal(target.bias, saved.bias)
    assert saved.seen and target.seen


class _ChildReadsNumpy(torch.nn.Linear):
    """A submodule's ``state_dict`` override that reads what it is handed as NumPy arrays."""

    def state_dict(self, *args: Any, **kwargs: Any) -> Any:  # type: ignore[override]
        state = super().state_dict(*args, **kwargs)
        for value in state.values():
            if isinstance(value, torch.Tensor):
                value.numpy()
        return state


def test_a_submodules_state_dict_override_gets_what_state_dict_hands_it(tmp_path):
    torch.manual_seed(0)
    saved = torch.nn.Sequential(_ChildReadsNumpy(3, 2), torch.nn.ReLU())
    path = torchckpt.Checkpoint(model=saved).write(tmp_path / "c")
    target = torch.nn.Sequential(_ChildReadsNumpy(3, 2), torch.nn.ReLU())
    torchckpt.Checkpoint(model=target).read(path).assert_consumed()
    assert torch.equal(target[0].weight, saved[0].weight)


class Migrating(torch.nn.Module):
    """A model whose own ``load_state_dict`` migrates checkpoints of its first layout (``proj``
    became ``lin``, and the bias was stored doubled): ``model.load_state_dict(torch.load(f))``
    runs it, and so must a restore."""

    def __init__(self, old: bool = False) -> None:
        super().__init__()
        torch.manual_seed(7)
        self.lin = torch.nn.Linear(4, 3)
        self.old = old
        self.calls = 0

    def state_dict(self, *args: Any, **kwargs: Any) -> Any:
        state = super().state_dict(*args, **kwargs)
        if self.old:  # the first layout
            state = OrderedDict((k.replace("lin.", "proj."), v * 2.0 if k.endswith("bias") else v)
                                for k, v in state.items())
        return state

    def load_state_dict(self, state_dict: Any, strict: bool = True, assign: bool = False) -> Any:
        self.calls += 1
        state = OrderedDict((k.replace("proj.", "lin."), v / 2.0 if k.startswith("proj.") and k.endswith("bias") else v)
                            for k, v in state_dict.items())
        return super().load_state_dict(state, strict=strict, assign=assign)


@pytest.mark.parametrize("old", [False, True], ids=["current-layout", "first-layout"])
def test_a_module_with_a_load_state_dict_of_its_own_is_restored_through_it(tmp_path, old):
    saved = Migrating(old)
    with torch.no_grad():
        saved.lin.weight.mul_(3.0)
    path = torchckpt.Checkpoint(model=saved).write(tmp_path / "c")
    target, twin = Migrating(), Migrating()
    with torch.no_grad():
        target.lin.bias.fill_(9.0), twin.lin.bias.fill_(9.0)
    twin.load_state_dict(torchckpt.load_state(path)["model"])
    status = torchckpt.Checkpoint(model=target).read(path).assert_consumed()
    assert target.calls == 1
    assert_same_state(target, twin)
    assert torch.equal(target.lin.bias, Migrating().lin.bias) and torch.equal(target.lin.weight, saved.lin.weight)
    prefix = "model/proj." if old else "model/lin."
    assert sorted(status.report.restored_keys) == [prefix + "bias", prefix + "weight"]


def test_a_module_with_a_load_state_dict_of_its_own_reports_what_it_answers(tmp_path):
    saved = torch.nn.Module()
    saved.lin = torch.nn.Linear(4, 3)
    saved.extra = torch.nn.Parameter(torch.ones(2))
    path = torchckpt.Checkpoint(model=saved).write(tmp_path / "c")
    target = Migrating()
    double = Migrating().to(torch.float64)
    report = torchckpt.Checkpoint(model=target).read(path).expect_partial().report
    assert report.unexpected_keys == ["model/extra"] and report.missing_keys == []
    assert sorted(report.restored_keys) == ["model/lin.bias", "model/lin.weight"]
    assert torch.equal(target.lin.weight, saved.lin.weight)
    report = torchckpt.Checkpoint(model=double).read(path).expect_partial().report  # another dtype: not cast
    assert set(report.dtype_mismatches) == {"model/lin.bias", "model/lin.weight"}
    assert report.missing_keys == [] and double.calls == 1  # mismatched, as in place: not missing too (probe78 F6)


class Plain(torch.nn.Module):
    """A model whose own ``load_state_dict`` takes the state dict only (no ``strict``)."""

    def __init__(self) -> None:
        super().__init__()
        self.lin = torch.nn.Linear(4, 3)

    def load_state_dict(self, state_dict: Any) -> Any:  # type: ignore[override]
        return super().load_state_dict(state_dict)


def test_a_module_with_a_load_state_dict_of_its_own_pairs_wrapper_prefixes_and_its_signature(tmp_path):
    wrapper = torch.nn.Module()
    wrapper.module = Migrating()  # a DDP wrapper's keys: module.lin.weight
    with torch.no_grad():
        wrapper.module.lin.weight.mul_(3.0)
    path = torchckpt.Checkpoint(model=wrapper).write(tmp_path / "c")
    target = Migrating()
    status = torchckpt.Checkpoint(model=target).read(path).assert_consumed()
    assert target.calls == 1 and torch.equal(target.lin.weight, wrapper.module.lin.weight)
    assert sorted(status.report.restored_keys) == ["model/module.lin.bias", "model/module.lin.weight"]
    saved = Plain()
    path = torchckpt.Checkpoint(model=saved).write(tmp_path / "plain")
    torch.manual_seed(3)
    target = Plain()
    torchckpt.Checkpoint(model=target).read(path).assert_consumed()
    assert_same_state(target, saved)
