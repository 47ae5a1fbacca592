"""Data safety: nothing lost, nothing overwritten, nothing followed outside the directory."""

from __future__ import annotations

import errno
import json
import os
import signal
import subprocess
import sys
import time
import warnings
from pathlib import Path

import pytest
import torch

import torchckpt
from torchckpt import CheckpointManager
from torchckpt._format import spec
from torchckpt._history import members as history_members
from torchckpt._history import state as history_state
from torchckpt._load import opened as load_opened
from torchckpt._storage import atomic, lock
from torchckpt._storage.local import LOCAL

from . import damage
from .conftest import make_mlp, train_step
from .distributed import ROOT
from .doubles import Killed


def small_checkpoint(rng: bool = True) -> torchckpt.Checkpoint:
    """Adam's lr, StepLR's gamma, an epoch, a config and (optionally) RNG state: values a flipped
    bit used to change silently."""
    model = torch.nn.Linear(2, 2)
    opt = torch.optim.Adam(model.parameters(), lr=0.001)
    model(torch.ones(1, 2)).sum().backward()
    opt.step()
    sched = torch.optim.lr_scheduler.StepLR(opt, step_size=3, gamma=0.5)
    extra = {"rng": torchckpt.RNGState()} if rng else {}
    return torchckpt.Checkpoint(model=model, opt=opt, sched=sched, epoch=7, cfg={"width": 2, "name": "x"}, **extra)


# -- A1, A2: tensors that are not plain memory ------------------------------------------------


def test_fsdp2_state_of_a_world_of_one_saves_as_format_1_and_restores_in_place(tmp_path, gloo_world_of_one):
    from torch.distributed.fsdp import fully_shard

    model = torch.nn.Sequential(torch.nn.Linear(4, 4), torch.nn.Linear(4, 2))
    fully_shard(model)
    opt = torch.optim.Adam(model.parameters())
    model(torch.randn(2, 4)).sum().backward()
    opt.step()
    reference = {k: v.full_tensor().clone() for k, v in model.state_dict().items()}
    for async_save in (False, True):
        ckpt = torchckpt.Checkpoint(model=model, opt=opt)
        path = ckpt.write(tmp_path / f"c{async_save}", async_save=async_save)
        ckpt.wait_until_finished()
        assert load_opened.load_index(path, LOCAL).section["format_version"] == 1
        plain = torch.nn.Sequential(torch.nn.Linear(4, 4), torch.nn.Linear(4, 2))
        torchckpt.Checkpoint(model=plain).read(path).expect_partial()
        assert all(torch.equal(plain.state_dict()[k], v) for k, v in reference.items())
    with torch.no_grad():
        for p in model.parameters():
            p.to_local().zero_()
    torchckpt.Checkpoint(model=model, opt=opt).read(tmp_path / "cFalse").assert_consumed()
    assert all(torch.equal(model.state_dict()[k].full_tensor(), v) for k, v in reference.items())


def test_a_partial_dtensor_is_refused_with_its_key_before_anything_changes(tmp_path, gloo_world_of_one):
    from torch.distributed.device_mesh import init_device_mesh
    from torch.distributed.tensor import DTensor, Partial

    mesh = init_device_mesh("cpu", (1,))
    pending = DTensor.from_local(torch.ones(3), mesh, [Partial()])
    with pytest.raises(torchckpt.UnsupportedStateError, match="Partial placement") as info:
        torchckpt.Checkpoint(w=pending).write(tmp_path / "c")
    assert info.value.key == "w" and os.listdir(tmp_path) == []
    path = torchckpt.Checkpoint(w=torch.zeros(3)).write(tmp_path / "plain")
    with pytest.raises(torchckpt.UnsupportedStateError, match="Partial placement"):
        torchckpt.Checkpoint(w=pending).restore(path)
    assert torch.equal(pending.to_local(), torch.ones(3))


def test_meta_and_fake_tensors_are_refused_on_save(tmp_path):
    from torch._subclasses.fake_tensor import FakeTensorMode

    with pytest.raises(torchckpt.UnsupportedStateError, match="meta device") as info:
        torchckpt.Checkpoint(w=torch.empty(3, device="meta")).write(tmp_path / "m")
    assert info.value.key == "w"
    with FakeTensorMode():
        fake = torch.empty(3)
    with pytest.raises(torchckpt.UnsupportedStateError, match="fake tensor") as info:
        torchckpt.Checkpoint(w=fake).write(tmp_path / "f")
    assert info.value.key == "w" and os.listdir(tmp_path) == []


def test_a_meta_model_is_reported_missing_or_materialised_with_assign(tmp_path):
    source = make_mlp(3)
    path = torchckpt.Checkpoint(model=source).write(tmp_path / "c")
    with torch.device("meta"):
        target = make_mlp(0)
    status = torchckpt.Checkpoint(model=target).read(path)
    assert set(status.report.missing_keys) == {f"model/{k}" for k in source.state_dict()}
    assert "assign=True" in str(status.report)
    with pytest.raises(torchckpt.RestoreMismatchError, match="on the meta device"):
        status.assert_existing_objects_matched()
    torchckpt.Checkpoint(model=target).read(path, assign=True).assert_consumed()
    for key, value in source.state_dict().items():
        assert not target.state_dict()[key].is_meta and torch.equal(target.state_dict()[key], value)


def test_meta_tensors_tracked_bare_or_in_a_dict_are_materialised_with_assign(tmp_path):
    path = torchckpt.Checkpoint(a=torch.arange(3.0), d={"x": torch.ones(2, 2), "n": 4}).write(tmp_path / "c")
    meta = {"x": torch.empty(2, 2, device="meta"), "n": 0}
    ckpt = torchckpt.Checkpoint(a=torch.empty(3, device="meta"), d=meta)
    status = ckpt.read(path)  # no memory to restore into: reported, left as they are
    assert sorted(status.report.missing_keys) == ["a", "d/x"] and ckpt.a.is_meta and meta["x"].is_meta
    assert "assign=True" in str(status.report)
    ckpt.read(path, assign=True).assert_consumed()
    assert torch.equal(ckpt.a, torch.arange(3.0)) and torch.equal(meta["x"], torch.ones(2, 2)) and meta["n"] == 4
    weight = torchckpt.Checkpoint(a=torch.nn.Parameter(torch.empty(3, device="meta")))
    weight.read(path, assign=True).expect_partial()
    assert type(weight.a) is torch.nn.Parameter and weight.a.requires_grad and torch.equal(weight.a, torch.arange(3.0))
    half = torchckpt.Checkpoint(a=torch.empty(3, device="meta", dtype=torch.float16))
    with pytest.raises(torchckpt.RestoreMismatchError, match="dtype"):  # a mismatch is still one
        half.read(path, assign=True).assert_existing_objects_matched()
    assert half.a.is_meta


# -- C22: casting ------------------------------------------------------------------------------


def test_dtype_mismatches_are_reported_by_default_and_cast_on_request(tmp_path):
    source = make_mlp(1)
    opt = torch.optim.Adam(source.parameters())
    train_step(source, opt, 0)
    path = torchckpt.Checkpoint(model=source, opt=opt, w=torch.arange(4.0)).write(tmp_path / "c")
    target, w = make_mlp(2).double(), torch.zeros(4, dtype=torch.float16)
    target_opt = torch.optim.Adam(target.parameters())
    for p in target.parameters():
        p.grad = torch.ones_like(p)
    target_opt.step()
    status = torchckpt.Checkpoint(model=target, opt=target_opt, w=w).read(path)
    assert "model/0.weight" in status.report.dtype_mismatches and "cast=True" in str(status.report)
    status.expect_partial()
    torchckpt.Checkpoint(model=target, opt=target_opt, w=w).read(path, cast=True).assert_consumed()
    assert torch.equal(w, torch.arange(4.0, dtype=torch.float16))
    for key, value in source.state_dict().items():
        assert target.state_dict()[key].dtype == torch.float64 and torch.equal(target.state_dict()[key], value.double())
    assert target_opt.state_dict()["state"][0]["exp_avg"].dtype == torch.float64


@pytest.mark.filterwarnings("ignore:ComplexHalf support is experimental")
@pytest.mark.parametrize("dtype", [torch.complex128, torch.complex32], ids=["complex128", "complex32"])
def test_cast_fills_a_destination_of_a_dtype_no_checkpoint_holds(tmp_path, dtype):
    # probe33 F3: only dtypes a checkpoint can hold were cast targets, and the report said to pass cast=True
    path = torchckpt.Checkpoint(w=torch.tensor([1.5, -2.0, 0.25])).write(tmp_path / "c")
    w = torch.zeros(3, dtype=dtype)
    torchckpt.Checkpoint(w=w).read(path, cast=True).assert_consumed()
    assert w.dtype == dtype and torch.equal(w.to(torch.complex128), torch.tensor([1.5, -2.0, 0.25], dtype=torch.complex128))


@pytest.mark.filterwarnings("ignore:torch.quantize_per_tensor")
def test_a_quantized_destination_is_reported_not_cast(tmp_path):
    path = torchckpt.Checkpoint(w=torch.ones(2, dtype=torch.float16)).write(tmp_path / "c")
    w = torch.quantize_per_tensor(torch.zeros(2), 0.1, 0, torch.quint8)
    status = torchckpt.Checkpoint(w=w).read(path, cast=True).expect_partial()
    assert status.report.dtype_mismatches == {"w": (torch.float16, torch.quint8)}
    assert "into any dtype but a quantized one" in str(status.report)


# -- A3, B13: links --------------------------------------------------------------------------


def plant_link(tmp_path: Path, name: str) -> tuple[Path, Path]:
    """A run directory whose ``name`` is a link to a precious file outside it."""
    target = tmp_path / "precious"
    target.write_text("precious\n")
    run = tmp_path / "run"
    run.mkdir()
    (run / name).symlink_to(target)
    return run, target


def test_a_planted_lock_link_is_refused_and_its_target_untouched(tmp_path):
    run, target = plant_link(tmp_path, lock.LOCK_FILE)
    with pytest.raises(torchckpt.CorruptCheckpointError, match="symbolic link"):
        CheckpointManager(torchckpt.Checkpoint(w=torch.zeros(1)), run)
    assert target.read_text() == "precious\n"


def test_a_planted_state_file_link_is_replaced_not_followed(tmp_path):
    run, target = plant_link(tmp_path, history_state.STATE_FILE)
    with pytest.warns(UserWarning, match="damaged"):
        mgr = CheckpointManager(torchckpt.Checkpoint(w=torch.zeros(1)), run)
    mgr.save()
    assert target.read_text() == "precious\n"
    assert not (run / history_state.STATE_FILE).is_symlink()


def test_a_shard_or_index_that_is_a_link_is_refused(tmp_path):
    outside = torchckpt.Checkpoint(w=torch.full((3,), 9.0)).write(tmp_path / "outside")
    path = torchckpt.Checkpoint(w=torch.ones(3)).write(tmp_path / "c")
    shard = Path(path, "model-00001-of-00001.safetensors")
    shard.unlink()
    shard.symlink_to(Path(outside, "model-00001-of-00001.safetensors"))
    with pytest.raises(torchckpt.CorruptCheckpointError, match="symbolic link"):
        torchckpt.Checkpoint(w=torch.zeros(3)).read(path)
    with pytest.raises(torchckpt.CorruptCheckpointError, match="symbolic link"):
        torchckpt.load_checkpoint(path).get_tensor("w")
    index = Path(path, "index.json")
    index.unlink()
    index.symlink_to(Path(outside, "index.json"))
    with pytest.raises(torchckpt.CheckpointError):
        torchckpt.Checkpoint(w=torch.zeros(3)).read(path)


def test_a_latest_checkpoint_that_is_a_link_is_never_followed(tmp_path):
    elsewhere = torchckpt.Checkpoint(w=torch.full((2,), 5.0)).write(tmp_path / "elsewhere")
    run = tmp_path / "run"
    mgr = CheckpointManager(torchckpt.Checkpoint(w=torch.ones(2)), run)
    real = mgr.save()
    (run / "ckpt-9").symlink_to(elsewhere)
    assert torchckpt.latest_checkpoint(run) == real
    assert history_members.committed_members(str(run), None, LOCAL) == ["ckpt-1"]
    w = torch.zeros(2)
    torchckpt.Checkpoint(w=w).read(run).expect_partial()
    assert torch.equal(w, torch.ones(2))


# -- A4: forks and collisions ------------------------------------------------------------------


def test_a_forked_child_cannot_write_into_its_parents_directory(tmp_path):
    ckpt = torchckpt.Checkpoint(w=torch.zeros(4))
    mgr = CheckpointManager(ckpt, tmp_path, max_to_keep=None)
    mgr.save()
    read, write = os.pipe()
    pid = os.fork()
    if pid == 0:  # the child: both its inherited manager and a new one are refused
        outcome = []
        for attempt in (mgr.save, lambda: CheckpointManager(torchckpt.Checkpoint(w=torch.ones(4)), tmp_path)):
            try:
                attempt()
                outcome.append("saved")
            except torchckpt.CheckpointError as e:
                outcome.append("refused" if "another live process" in str(e) else f"other: {e}")
            except BaseException as e:  # noqa: BLE001 - reported to the parent
                outcome.append(f"{type(e).__name__}: {e}")
        os.write(write, json.dumps(outcome).encode())
        os._exit(0)
    os.close(write)
    saved = [mgr.save() for _ in range(3)]  # the parent goes on saving meanwhile
    deadline = time.time() + 30
    while (done := os.waitpid(pid, os.WNOHANG)) == (0, 0) and time.time() < deadline:
        time.sleep(0.05)
    if done == (0, 0):
        os.kill(pid, signal.SIGKILL)
        os.waitpid(pid, 0)
        pytest.fail("the forked child did not finish")
    outcome = json.loads(os.read(read, 65536))
    os.close(read)
    assert outcome == ["refused", "refused"]
    assert [os.path.basename(p) for p in mgr.checkpoints] == ["ckpt-1", "ckpt-2", "ckpt-3", "ckpt-4"]
    for path in saved:
        torchckpt.Checkpoint(w=torch.empty(4)).restore(path).assert_consumed()


def test_a_new_number_never_replaces_a_checkpoint_that_appears_meanwhile(tmp_path, disk):
    mgr = CheckpointManager(torchckpt.Checkpoint(w=torch.zeros(2)), tmp_path)
    first = mgr.save()
    foreign = torchckpt.Checkpoint(w=torch.full((2,), 7.0))
    # Another writer without the claim commits ckpt-2 between the numbering and the commit.
    disk.before("stage", lambda final, replace: foreign.write(final), times=1)
    with pytest.raises(torchckpt.CheckpointError, match="appeared while it was being written"):
        mgr.save()
    w = torch.zeros(2)
    torchckpt.Checkpoint(w=w).read(tmp_path / "ckpt-2").assert_consumed()
    assert torch.equal(w, torch.full((2,), 7.0))  # the committed checkpoint is untouched
    assert mgr.latest_checkpoint == first and mgr.checkpoint.save_counter == 1
    assert [n for n in os.listdir(tmp_path) if spec.is_temporary_name(n)] == []
    ckpt_2 = str(tmp_path / "ckpt-2")
    assert disk.called("stage")[-2:] == [(ckpt_2, False), (ckpt_2, True)]  # the save's stage, and the write meanwhile


def test_commit_without_replace_refuses_an_existing_directory(tmp_path):
    for src in ("a", "b"):
        (tmp_path / src).mkdir()
        (tmp_path / src / "index.json").write_text(src)
    with pytest.raises(atomic.AlreadyThere):
        atomic.commit_directory(str(tmp_path / "b"), str(tmp_path / "a"), replace=False)
    assert (tmp_path / "a" / "index.json").read_text() == "a"


# -- A5: every bit of the index and the state file ---------------------------------------------


def _flips(data: bytes):
    for i in range(len(data)):
        for bit in range(8):
            flipped = bytearray(data)
            flipped[i] ^= 1 << bit
            yield bytes(flipped)


def test_every_single_bit_flip_of_an_index_is_caught(tmp_path):
    path = small_checkpoint(rng=False).write(tmp_path / "c")  # without RNG state: 8 times fewer bytes to flip
    index_path = Path(path, "index.json")
    data = index_path.read_bytes()
    caught = 0
    for flipped in _flips(data):
        index_path.write_bytes(flipped)
        try:
            load_opened.load_index(path, LOCAL)
        except torchckpt.CorruptCheckpointError:
            caught += 1
    assert caught == 8 * len(data)
    index_path.write_bytes(data)
    small_checkpoint(rng=False).read(path).assert_consumed()


def test_bit_flips_never_change_a_restore_silently(tmp_path):
    """A sample of the flips through the whole restore: each is an error, none a different value."""
    path = small_checkpoint().write(tmp_path / "c")
    index_path = Path(path, "index.json")
    data = index_path.read_bytes()
    for position in range(0, len(data), max(1, len(data) // 150)):
        flipped = bytearray(data)
        flipped[position] ^= 0x04
        index_path.write_bytes(bytes(flipped))
        with pytest.raises(torchckpt.CorruptCheckpointError):
            small_checkpoint().read(path)


def test_every_single_bit_flip_of_the_state_file_is_caught(tmp_path):
    mgr = CheckpointManager(torchckpt.Checkpoint(w=torch.zeros(1)), tmp_path, max_to_keep=2, keep_best=1,
                            best_metric="loss")
    for loss in (0.5, 0.25, float("nan")):
        mgr.save(metrics={"loss": loss, "acc": 0.9})
    state_path = tmp_path / history_state.STATE_FILE
    data = state_path.read_bytes()
    for flipped in _flips(data):
        state_path.write_bytes(flipped)
        with pytest.raises(history_state.StateFileError):
            history_state.read_state(str(tmp_path), LOCAL)


# -- A6: a failed final asynchronous save ------------------------------------------------------


def test_a_failed_final_async_save_is_reported_and_the_previous_one_kept(tmp_path):
    script = f"""
import contextlib
import torch, torchckpt
from torchckpt._storage import registry
from tests.doubles import LocalDouble
installed = contextlib.ExitStack()  # never closed: the double serves the directory until the process exits
disk = installed.enter_context(registry.installed({str(tmp_path)!r}, LocalDouble()))
ckpt = torchckpt.Checkpoint(w=torch.ones(8))
mgr = torchckpt.CheckpointManager(ckpt, {str(tmp_path)!r}, async_save=True)
mgr.save(); mgr.wait_until_finished()
disk.fail("stage", OSError(28, "No space left on device"))
mgr.save()  # the process ends with this save in flight
"""
    result = subprocess.run([sys.executable, "-c", script], capture_output=True, text=True, timeout=120, cwd=ROOT)
    assert result.returncode == 0, result.stderr
    assert "background save of" in result.stderr and "ckpt-2" in result.stderr
    assert "no space left on the device" in result.stderr
    assert torchckpt.latest_checkpoint(tmp_path) == str(tmp_path / "ckpt-1")
    torchckpt.Checkpoint(w=torch.zeros(8)).restore(tmp_path).assert_consumed()


# -- A7: metrics -------------------------------------------------------------------------------


def test_tensor_numpy_and_nan_metrics_are_recorded_and_never_best(tmp_path):
    import numpy as np

    mgr = CheckpointManager(torchckpt.Checkpoint(w=torch.zeros(1)), tmp_path, max_to_keep=2, keep_best=1,
                            best_metric="val_loss")
    mgr.save(metrics={"val_loss": torch.tensor(0.5)})
    mgr.save(metrics={"val_loss": float("nan")})
    mgr.save(metrics={"val_loss": np.float32(0.75), "steps": np.int64(3)})
    mgr.save(metrics={"val_loss": float("inf")})
    mgr.save(metrics={"val_loss": torch.tensor(float("nan"))})
    names = [os.path.basename(p) for p in mgr.checkpoints]
    assert names == ["ckpt-1", "ckpt-4", "ckpt-5"] and mgr.best_checkpoint.endswith("ckpt-1")
    fresh = CheckpointManager(torchckpt.Checkpoint(w=torch.zeros(1)), tmp_path, max_to_keep=2)
    assert fresh.metrics_of(fresh.checkpoints[-1])["val_loss"] != fresh.metrics_of(fresh.checkpoints[-1])["val_loss"]
    assert fresh.metrics_of(str(tmp_path / "ckpt-1")) == {"val_loss": 0.5}
    assert type(fresh.metrics_of(str(tmp_path / "ckpt-1"))["val_loss"]) is float


def test_infinities_never_rank_best_in_either_mode(tmp_path):
    for mode, values in (("max", (0.5, float("inf"))), ("min", (0.5, float("-inf")))):
        mgr = CheckpointManager(torchckpt.Checkpoint(w=torch.zeros(1)), tmp_path / mode, max_to_keep=1, keep_best=1,
                                best_metric="m", best_mode=mode)
        for value in values:
            mgr.save(metrics={"m": value})
        assert mgr.best_checkpoint.endswith("ckpt-1"), mode


@pytest.mark.parametrize("metrics", [{"m": torch.ones(3)}, {"m": object()}, {3: 1.0}, {"m": "a" * 70_000},
                                     {"m": 10**5000}], ids=["vector", "object", "int-key", "over-64-kib", "huge-int"])
def test_bad_metrics_are_refused_before_anything_is_written(tmp_path, metrics):
    mgr = CheckpointManager(torchckpt.Checkpoint(w=torch.zeros(1)), tmp_path, max_to_keep=1)
    mgr.save()
    with pytest.raises((TypeError, ValueError), match="metrics"):
        mgr.save(metrics=metrics)
    assert [n for n in os.listdir(tmp_path) if n.startswith("ckpt-")] == ["ckpt-1"]
    assert mgr.checkpoint.save_counter == 1
    mgr.save()
    assert [os.path.basename(p) for p in mgr.checkpoints] == ["ckpt-2"] and not (tmp_path / "ckpt-1").exists()


def test_metrics_over_64_kib_are_refused_so_the_state_file_stays_readable(tmp_path):
    mgr = CheckpointManager(torchckpt.Checkpoint(w=torch.zeros(1)), tmp_path, max_to_keep=None)
    with pytest.raises(ValueError, match=r"metrics take 70,012 bytes as JSON; at most 65,536 are recorded per "
                                         r"checkpoint .* save larger values in the checkpoint itself"):
        mgr.save(metrics={"note": "a" * 70_000})
    for _ in range(3):
        mgr.save(metrics={"note": "a" * 65_000, "loss": 0.5})  # just under: recorded in full
    mgr.close()
    state = torchckpt.get_checkpoint_state(tmp_path)  # a new reader of the state file
    assert [os.path.basename(p) for p in state.kept] == ["ckpt-1", "ckpt-2", "ckpt-3"]
    assert state.metrics[state.latest] == {"note": "a" * 65_000, "loss": 0.5}


def test_a_failed_state_write_is_mended_by_the_next_save(tmp_path, disk):
    mgr = CheckpointManager(torchckpt.Checkpoint(w=torch.zeros(1)), tmp_path, max_to_keep=2)
    mgr.save()
    state_file = str(tmp_path / history_state.STATE_FILE)
    disk.fail("replace_file", OSError(errno.ENOSPC, "No space left on device", state_file), times=1)
    with pytest.raises(OSError):
        mgr.save()
    assert disk.called("replace_file")[-1][0] == state_file
    mgr.save()
    mgr.save()
    assert [os.path.basename(p) for p in mgr.checkpoints] == ["ckpt-3", "ckpt-4"]
    assert sorted(n for n in os.listdir(tmp_path) if n.startswith("ckpt-")) == ["ckpt-3", "ckpt-4"]
    assert history_state.read_state(str(tmp_path), LOCAL).latest == "ckpt-4"


def test_a_warning_when_best_metric_is_never_passed(tmp_path):
    mgr = CheckpointManager(torchckpt.Checkpoint(w=torch.zeros(1)), tmp_path, keep_best=1, best_metric="val_loss")
    with pytest.warns(UserWarning, match="best_metric 'val_loss' is not among the metrics") as caught:
        mgr.save(metrics={"loss": 1.0})
    assert caught[0].filename == __file__  # at the caller's line, not inside torchckpt
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        mgr.save(metrics={"loss": 2.0})  # once
    ranked_by_fn = CheckpointManager(torchckpt.Checkpoint(w=torch.zeros(1)), tmp_path / "fn", keep_best=1,
                                     best_metric=lambda m: m["val_loss"])
    with pytest.warns(UserWarning, match="best_metric cannot rank the metrics passed to save") as caught:
        ranked_by_fn.save(metrics={"loss": 1.0})
    assert caught[0].filename == __file__


# -- A8: orphans ---------------------------------------------------------------------------------


def test_a_checkpoint_committed_but_never_recorded_is_adopted_and_retired(tmp_path, disk):
    mgr = CheckpointManager(torchckpt.Checkpoint(w=torch.zeros(1)), tmp_path, max_to_keep=2)
    mgr.save()
    mgr.save()
    manual = torchckpt.Checkpoint(w=torch.ones(1)).write(tmp_path / "ckpt-0")  # not the manager's: never deleted
    disk.fail("replace_file", Killed(), times=2)  # each save dies once committed, before its state is written
    for _ in range(2):
        with pytest.raises(Killed):
            mgr.save()
    disk.heal()
    assert not disk.called("delete_checkpoint")
    assert history_state.read_state(str(tmp_path), LOCAL).latest == "ckpt-2"  # the state file never heard of 3 and 4
    fresh = CheckpointManager(torchckpt.Checkpoint(w=torch.zeros(1)), tmp_path, max_to_keep=2)
    assert [os.path.basename(p) for p in fresh.checkpoints] == ["ckpt-1", "ckpt-2", "ckpt-3", "ckpt-4"]
    assert fresh.latest_checkpoint == str(tmp_path / "ckpt-4")
    fresh.save()
    assert sorted(n for n in os.listdir(tmp_path) if n.startswith("ckpt-")) == ["ckpt-0", "ckpt-4", "ckpt-5"]
    assert os.path.exists(manual)


def test_stale_state_file_temporaries_are_removed(tmp_path):
    dead = subprocess.run([sys.executable, "-c", "import os; print(os.getpid())"], capture_output=True, text=True)
    leftover = tmp_path / f"{history_state.STATE_FILE}{spec.TMP_MARKER}{int(dead.stdout)}-abc"
    leftover.write_text("{}")
    CheckpointManager(torchckpt.Checkpoint(w=torch.zeros(1)), tmp_path)
    assert not leftover.exists()


# -- A9: readers racing retention --------------------------------------------------------------


def test_a_checkpoint_deleted_before_it_is_opened_is_checkpoint_not_found(tmp_path):
    path = torchckpt.Checkpoint(w=torch.ones(3)).write(tmp_path / "c")
    index = load_opened.load_index(path, LOCAL)
    for name in os.listdir(path):
        os.unlink(os.path.join(path, name))
    with pytest.raises(torchckpt.CheckpointDeletedError, match="deleted while it was being read") as info:
        load_opened.OpenShards(index, LOCAL)
    assert isinstance(info.value, torchckpt.CheckpointNotFoundError) and info.value.path == path


def test_a_restore_that_has_opened_its_shards_survives_the_deletion(tmp_path, disk):
    mgr = CheckpointManager(torchckpt.Checkpoint(w=torch.arange(5.0)), tmp_path, max_to_keep=1)
    first = mgr.save()

    def delete_meanwhile(path: str, what: str) -> None:
        assert path.startswith(first) and path.endswith(".safetensors")  # its one shard is open
        mgr.checkpoint.w.add_(1)
        mgr.save()  # retention deletes the checkpoint being read
        assert not os.path.exists(first)

    disk.after("open", delete_meanwhile, times=1)
    w = torch.zeros(5)
    torchckpt.Checkpoint(w=w).read(first).assert_consumed()
    assert torch.equal(w, torch.arange(5.0))  # the bytes of the checkpoint it opened, not a mix


@pytest.mark.parametrize("new_value", [torch.arange(5.0) + 1, torch.arange(6.0)], ids=["same-shape", "other-shape"])
def test_a_checkpoint_replaced_before_its_shards_open_is_not_called_damaged(tmp_path, disk, new_value):
    # A save under the same number replaces ckpt-1 between the read of its index and the open of its
    # shard: the new shard fails the old index's checks (its checksum, or its header), yet neither
    # checkpoint is damaged. The reader (a follower, which holds no claim) is told to read it again.
    mgr = CheckpointManager(torchckpt.Checkpoint(w=torch.arange(5.0)), tmp_path, incremental=False)
    first = mgr.save()

    def replace_meanwhile(path: str, what: str) -> None:
        assert what == "Shard" and path.startswith(first)
        mgr.checkpoint.w = new_value
        assert mgr.save(checkpoint_number=1) == first

    disk.before("open", replace_meanwhile, times=1)
    with pytest.raises(torchckpt.CheckpointDeletedError, match="was replaced while it was being read") as info:
        torchckpt.Checkpoint(w=torch.zeros(5)).read(first)
    assert info.value.path == first and "Neither checkpoint is damaged" in str(info.value)
    if len(new_value) == 5:  # the header is the old index's: the index's seal tells, once the shard is open
        assert info.value.__cause__ is None and "index.json changed after its shards were opened" in str(info.value)
    else:  # the header is not
        assert isinstance(info.value.__cause__, torchckpt.CorruptCheckpointError)
    w = torch.zeros(len(new_value))
    torchckpt.Checkpoint(w=w).read(first).assert_consumed()  # read again: the new one
    assert torch.equal(w, new_value)


def test_without_checksums_a_checkpoint_replaced_before_its_shards_open_is_not_read_as_the_old_one(tmp_path, disk):
    # The same replacement with verify=False: no checksum fails, and the shard's header is the old
    # index's. The restore used to return normally with the new bytes under the old index; once
    # its shards are open it checks that the index is still the one it planned from.
    mgr = CheckpointManager(torchckpt.Checkpoint(w=torch.arange(5.0), step=1), tmp_path, incremental=False)
    first = mgr.save()

    def replace_meanwhile(path: str, what: str) -> None:
        mgr.checkpoint.w, mgr.checkpoint.step = torch.arange(5.0) + 1, 2
        assert mgr.save(checkpoint_number=1) == first

    disk.before("open", replace_meanwhile, times=1)
    w = torch.zeros(5)
    with pytest.raises(torchckpt.CheckpointDeletedError, match=r"was replaced while it was being read: .*\(its "
                       r"index.json changed after its shards were opened\)\. Neither checkpoint is damaged") as info:
        torchckpt.Checkpoint(w=w, step=0).read(first, verify=False)
    assert info.value.path == first and torch.equal(w, torch.zeros(5))  # nothing was read
    again = torchckpt.Checkpoint(w=w, step=0)
    again.read(first, verify=False).assert_consumed()
    assert torch.equal(w, torch.arange(5.0) + 1) and again.step == 2


def test_a_checkpoint_replaced_by_one_of_other_shards_before_they_open_is_not_called_damaged(tmp_path, disk):
    # The new checkpoint has two shards where the old one had one: the old index's shard is gone.
    path = torchckpt.Checkpoint(a=torch.ones(1000), b=torch.ones(1000)).write(tmp_path / "c")
    replace = lambda file, what: torchckpt.Checkpoint(a=torch.zeros(1000), b=torch.zeros(1000)).write(  # noqa: E731
        path, max_shard_size=4096)
    disk.before("open", replace, times=1)
    with pytest.raises(torchckpt.CheckpointDeletedError, match="was replaced while it was being read") as info:
        torchckpt.Checkpoint(a=torch.ones(1000), b=torch.ones(1000)).read(path)
    assert "is missing" in str(info.value) and info.value.path == path
    assert len([n for n in os.listdir(path) if n.endswith(".safetensors")]) == 2


def test_an_inspector_that_read_a_tensor_says_a_later_replacement_is_one(tmp_path):
    path = torchckpt.Checkpoint(a=torch.ones(4), b=torch.ones(4)).write(tmp_path / "c")
    reader = torchckpt.load_checkpoint(path)
    assert torch.equal(reader.get_tensor("a"), torch.ones(4))  # its headers checked, its locations known
    torchckpt.Checkpoint(a=torch.zeros(4), b=torch.zeros(4)).write(path)  # the same layout, other bytes
    for read in (reader.get_tensor, lambda name: list(reader.iter_bytes(name)), lambda name: list(reader.iter_chunks(name))):
        with pytest.raises(torchckpt.CheckpointDeletedError, match="was replaced while it was being read") as info:
            read("b")
        assert isinstance(info.value.__cause__, torchckpt.CorruptCheckpointError)
    assert torch.equal(torchckpt.load_checkpoint(path).get_tensor("b"), torch.zeros(4))  # read again: the new one


def test_a_shard_damaged_while_its_index_stays_is_still_damage(tmp_path, disk):
    path = torchckpt.Checkpoint(w=torch.arange(5.0)).write(tmp_path / "c")
    shard = next(os.path.join(path, n) for n in os.listdir(path) if n.endswith(".safetensors"))
    disk.before("open", lambda file, what: damage.rot(shard, os.path.getsize(shard) - 1), times=1)
    with pytest.raises(torchckpt.CorruptCheckpointError, match="checksum") as info:
        torchckpt.Checkpoint(w=torch.zeros(5)).read(path)
    assert not isinstance(info.value, torchckpt.CheckpointNotFoundError) and info.value.path == shard


# -- A10, C20: failed and read-only managers --------------------------------------------------


def test_a_failed_construction_releases_the_directory(tmp_path, disk):
    disk.fail("remove_leftovers", OSError(errno.ENOSPC, "No space left on device"))  # after the claim
    with pytest.raises(OSError):
        CheckpointManager(torchckpt.Checkpoint(w=torch.zeros(1)), tmp_path)
    assert disk.called("claim") and not LOCAL.holds(str(tmp_path))
    disk.heal()
    code = f"import torch, torchckpt; torchckpt.CheckpointManager(torchckpt.Checkpoint(w=torch.zeros(1)), {str(tmp_path)!r}).save()"
    subprocess.run([sys.executable, "-c", code], check=True, timeout=60)  # another process may claim it


def test_a_read_only_directory_opens_for_reading_only(tmp_path, disk):
    mgr = CheckpointManager(torchckpt.Checkpoint(w=torch.arange(3.0)), tmp_path, max_to_keep=2)
    paths = [mgr.save(metrics={"loss": 1.0}) for _ in range(3)]
    mgr.close()
    disk.fail("claim", OSError(errno.EROFS, "Read-only file system", str(tmp_path / spec.LOCK_FILE)))
    before = sorted(os.listdir(tmp_path))
    w = torch.zeros(3)
    reader = CheckpointManager(torchckpt.Checkpoint(w=w), tmp_path, max_to_keep=1)
    assert reader.read_only and reader.latest_checkpoint == paths[-1] and reader.checkpoints == paths[1:]
    assert reader.restore_or_initialize() == paths[-1] and torch.equal(w, torch.arange(3.0))
    with pytest.raises(torchckpt.CheckpointError, match="read-only"):
        reader.save()
    assert sorted(os.listdir(tmp_path)) == before


def test_get_checkpoint_state_is_a_read_only_view(tmp_path):
    assert torchckpt.get_checkpoint_state(tmp_path) is None
    mgr = CheckpointManager(torchckpt.Checkpoint(w=torch.zeros(1)), tmp_path, max_to_keep=2, keep_best=1,
                            best_metric="loss")
    for loss in (0.1, 0.5, 0.7, 0.9):
        mgr.save(metrics={"loss": loss})
    torchckpt.Checkpoint(w=torch.zeros(1)).write(tmp_path / "ckpt-99")  # not the manager's
    state = torchckpt.get_checkpoint_state(tmp_path)
    names = lambda ps: [os.path.basename(p) for p in ps]  # noqa: E731
    assert names(state.kept) == ["ckpt-1", "ckpt-3", "ckpt-4"] and state.best.endswith("ckpt-1")
    assert names(state.all) == ["ckpt-1", "ckpt-3", "ckpt-4", "ckpt-99"]
    assert state.latest.endswith("ckpt-4") and state.metrics[str(tmp_path / "ckpt-3")] == {"loss": 0.7}
    mgr.close()
    assert torchckpt.get_checkpoint_state(tmp_path) == state and not LOCAL.holds(str(tmp_path))  # takes no claim


# -- C19: the ranking is the directory's -------------------------------------------------------


def test_keep_best_is_taken_from_the_directory_when_not_passed(tmp_path):
    mgr = CheckpointManager(torchckpt.Checkpoint(w=torch.zeros(1)), tmp_path, max_to_keep=1, keep_best=1,
                            best_metric="acc", best_mode="max")
    for acc in (0.9, 0.2, 0.3):
        mgr.save(metrics={"acc": acc})
    mgr.close()
    resumed = CheckpointManager(torchckpt.Checkpoint(w=torch.zeros(1)), tmp_path, max_to_keep=1)
    assert resumed.best_checkpoint.endswith("ckpt-1")
    resumed.save(metrics={"acc": 0.1})
    assert os.path.exists(tmp_path / "ckpt-1")  # the best survives a resume that did not repeat keep_best


# -- B16, C21: paths and write errors --------------------------------------------------------


def test_write_errors_name_the_file_and_stay_oserrors(tmp_path, monkeypatch):
    def full(fd, views):
        raise OSError(errno.ENOSPC, "No space left on device")

    monkeypatch.setattr(os, "writev", full)  # a small shard is written with writev
    with pytest.raises(OSError) as info:
        torchckpt.Checkpoint(w=torch.ones(4)).write(tmp_path / "c")
    assert info.value.errno == errno.ENOSPC and info.value.filename.endswith(".safetensors")
    assert isinstance(info.value, torchckpt.CheckpointWriteError) and info.value.path == str(tmp_path / "c")
    assert "no space left on the device" in str(info.value) and os.listdir(tmp_path) == []


def test_a_parent_that_is_a_file_is_named(tmp_path):
    (tmp_path / "runs").write_text("not a directory")
    with pytest.raises(torchckpt.CheckpointWriteError, match="runs is a file, not a directory") as info:
        torchckpt.Checkpoint(w=torch.ones(1)).save(tmp_path / "runs" / "gan" / "ckpt")
    assert info.value.path == str(tmp_path / "runs" / "gan" / "ckpt-1") and isinstance(info.value, OSError)


def test_a_name_too_long_for_its_temporary_says_how_long_it_may_be(tmp_path):
    longest = os.pathconf(tmp_path, "PC_NAME_MAX")
    name = "a" * (longest - 15)  # a name the file system takes; its temporary (about 43 bytes more) it does not
    with pytest.raises(torchckpt.CheckpointWriteError, match=r"the file name is too long: a checkpoint is first written "
                       r"under a temporary name [0-9]+ bytes longer than its own, so its name may hold at most [0-9]+ "
                       rf"bytes here, not {longest - 15}\. Choose a shorter name") as info:
        torchckpt.Checkpoint(w=torch.ones(1)).write(tmp_path / name)
    assert info.value.errno == errno.ENAMETOOLONG and info.value.path == str(tmp_path / name)
    assert os.listdir(tmp_path) == []
    short = longest - 60  # what the message allows, with room for a longer pid
    path = torchckpt.Checkpoint(w=torch.ones(1)).write(tmp_path / ("a" * short))
    assert torchckpt.load_checkpoint(path).has_tensor("w")


def test_save_takes_write_options_and_refuses_unknown_ones(tmp_path):
    ckpt = torchckpt.Checkpoint(a=torch.ones(100), b=torch.ones(100))
    with pytest.raises(TypeError, match="asyncsave"):
        ckpt.save(tmp_path / "ckpt", asyncsave=True)
    path = ckpt.save(tmp_path / "ckpt", max_shard_size=400, async_save=True)
    ckpt.wait_until_finished()
    assert len(load_opened.load_index(path, LOCAL).shards) == 2


def test_bytes_paths_are_decoded(tmp_path):
    path = torchckpt.Checkpoint(w=torch.ones(1)).save(os.fsencode(tmp_path / "ckpt"))
    assert path == str(tmp_path / "ckpt-1") and sorted(os.listdir(tmp_path)) == ["checkpoints.json", "ckpt-1"]
    assert torchckpt.latest_checkpoint(tmp_path) == path
    with pytest.raises(TypeError, match="must be a str"):
        torchckpt.Checkpoint(w=torch.ones(1)).write(42)  # type: ignore[arg-type]


def test_the_format_seal_is_the_last_key(tmp_path):
    path = torchckpt.Checkpoint(w=torch.ones(1)).write(tmp_path / "c")
    raw = json.loads(Path(path, "index.json").read_text())
    assert list(raw)[-1] == spec.SEAL_KEY


def test_a_read_only_file_system_is_named_with_what_to_do(tmp_path, monkeypatch):
    def read_only(path, mode=0o777):
        raise OSError(errno.EROFS, "Read-only file system", path)

    monkeypatch.setattr(os, "mkdir", read_only)
    with pytest.raises(torchckpt.CheckpointWriteError, match="the file system is read-only. Write checkpoints") as info:
        torchckpt.Checkpoint(w=torch.ones(1)).write(tmp_path / "c")
    assert info.value.errno == errno.EROFS and info.value.path == str(tmp_path / "c")
    assert str(tmp_path / "c") in str(info.value)
