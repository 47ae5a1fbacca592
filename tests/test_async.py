"""async_save=True: save() returns after a memory copy; the write happens in the background."""

from __future__ import annotations

import os
import subprocess
import sys
import threading

import pytest
import torch

import torchckpt
from torchckpt import CheckpointManager, _storage


def test_committed_checkpoint_holds_values_as_of_save(tmp_path, monkeypatch):
    weights = torch.zeros(1000)
    model = torch.nn.Linear(4, 4)
    release = threading.Event()
    real = _storage.write_checkpoint

    def slow(*args, **kwargs):
        release.wait(10)
        return real(*args, **kwargs)

    monkeypatch.setattr(_storage, "write_checkpoint", slow)
    manager = CheckpointManager(torchckpt.Checkpoint(weights=weights, model=model, epoch=1), tmp_path, async_save=True)
    expected_model = {k: v.clone() for k, v in model.state_dict().items()}
    path = manager.save(metrics={"loss": 1.0})
    assert manager.latest_checkpoint is None  # bookkeeping happens after the background commit
    weights.fill_(99.0)  # training goes on and mutates everything right away
    with torch.no_grad():
        for p in model.parameters():
            p.add_(1.0)
    manager.checkpoint.epoch = 2
    release.set()
    manager.wait_until_finished()
    assert manager.latest_checkpoint == path and manager.checkpoints == [path]
    target_w, target_m = torch.ones(1000), torch.nn.Linear(4, 4)
    ckpt = torchckpt.Checkpoint(weights=target_w, model=target_m, epoch=0)
    ckpt.restore(path).assert_consumed()
    assert torch.all(target_w == 0.0) and ckpt.epoch == 1
    for k, v in target_m.state_dict().items():
        assert torch.equal(v, expected_model[k])


def test_background_failure_is_raised_by_the_next_call(tmp_path, monkeypatch):
    manager = CheckpointManager(torchckpt.Checkpoint(w=torch.zeros(2)), tmp_path, async_save=True)
    first = manager.save()
    manager.wait_until_finished()

    def failing(*args, **kwargs):
        raise OSError(28, "No space left on device")

    monkeypatch.setattr(_storage, "write_checkpoint", failing)
    manager.save()
    with pytest.raises(OSError, match="No space left"):
        manager.wait_until_finished()
    manager.wait_until_finished()  # raised once, then cleared
    manager.save()
    with pytest.raises(OSError, match="No space left"):
        manager.save()
    monkeypatch.undo()
    manager.wait_until_finished()
    assert manager.latest_checkpoint == first and manager.checkpoints == [first]


def test_at_most_one_save_in_flight(tmp_path, monkeypatch):
    active, peak = [0], [0]
    lock = threading.Lock()
    real = _storage.write_checkpoint

    def counting(*args, **kwargs):
        with lock:
            active[0] += 1
            peak[0] = max(peak[0], active[0])
        try:
            return real(*args, **kwargs)
        finally:
            with lock:
                active[0] -= 1

    monkeypatch.setattr(_storage, "write_checkpoint", counting)
    w = torch.zeros(100_000)
    manager = CheckpointManager(torchckpt.Checkpoint(w=w), tmp_path, max_to_keep=2, async_save=True)
    for i in range(6):
        w.fill_(i)
        manager.save()
    manager.wait_until_finished()
    assert peak[0] == 1
    assert [os.path.basename(p) for p in manager.checkpoints] == ["ckpt-5", "ckpt-6"]
    target = torch.zeros(100_000)
    torchckpt.Checkpoint(w=target).restore(manager.latest_checkpoint).assert_consumed()
    assert torch.all(target == 5)


def test_interpreter_exit_waits_for_the_last_save(tmp_path):
    code = (
        "import torch, torchckpt, sys\n"
        "m = torchckpt.CheckpointManager(torchckpt.Checkpoint(w=torch.full((4_000_000,), 3.0)), sys.argv[1], async_save=True)\n"
        "print(m.save())\n"
    )
    out = subprocess.run([sys.executable, "-c", code, str(tmp_path)], capture_output=True, text=True, check=True)
    path = out.stdout.strip()
    target = torch.zeros(4_000_000)
    torchckpt.Checkpoint(w=target).restore(path).assert_consumed()
    assert torch.all(target == 3.0)
    assert torchckpt.latest_checkpoint(tmp_path) == path


def test_checkpoint_write_and_save_async(tmp_path):
    w = torch.zeros(50_000)
    ckpt = torchckpt.Checkpoint(w=w, step=1)
    path = ckpt.write(tmp_path / "w", async_save=True)
    w.fill_(5.0)
    ckpt.step = 2
    ckpt.wait_until_finished()
    target = torch.ones(50_000)
    reader = torchckpt.Checkpoint(w=target, step=0)
    reader.read(path).assert_consumed()
    assert torch.all(target == 0.0) and reader.step == 1

    saved = ckpt.save(tmp_path / "ckpt", async_save=True)
    assert saved.endswith("ckpt-1") and ckpt.save_counter == 1
    w.fill_(9.0)
    ckpt.sync()
    assert torchckpt.latest_checkpoint(tmp_path) == saved
    fresh = torchckpt.Checkpoint(w=torch.zeros(50_000), step=0)
    fresh.restore(tmp_path).assert_consumed()
    assert torch.all(fresh.w == 5.0) and fresh.step == 2


def test_checkpoint_async_failure_surfaces_on_the_next_call(tmp_path, monkeypatch):
    ckpt = torchckpt.Checkpoint(w=torch.zeros(3))

    def failing(*args, **kwargs):
        raise OSError(5, "Input/output error")

    monkeypatch.setattr(_storage, "write_checkpoint", failing)
    ckpt.write(tmp_path / "a", async_save=True)
    with pytest.raises(OSError, match="Input/output error"):
        ckpt.write(tmp_path / "b")
    monkeypatch.undo()
    assert ckpt.write(tmp_path / "c") == str(tmp_path / "c")
