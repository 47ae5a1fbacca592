"""Several processes on one directory: one writer at a time, readers see only committed checkpoints."""

from __future__ import annotations

import os
import signal
import subprocess
import sys

import pytest
import torch

import torchckpt
from torchckpt import CheckpointError, CheckpointManager

JOBS = os.path.join(os.path.dirname(__file__), "jobs")


def test_second_process_is_refused_while_the_first_lives(tmp_path):
    holder = subprocess.Popen([sys.executable, os.path.join(JOBS, "hold_manager.py"), str(tmp_path)],
                              stdout=subprocess.PIPE, text=True)
    try:
        assert holder.stdout is not None and holder.stdout.readline().strip() == "ready"
        with pytest.raises(CheckpointError, match=rf"managed by another live process \(pid {holder.pid} on"):
            CheckpointManager(torchckpt.Checkpoint(v=torch.zeros(1)), tmp_path)
    finally:
        holder.send_signal(signal.SIGKILL)
        holder.wait()
    manager = CheckpointManager(torchckpt.Checkpoint(v=torch.zeros(1)), tmp_path)
    assert manager.save() is not None
    manager.close()


def test_reader_follows_a_writer_and_every_checkpoint_is_consistent(tmp_path):
    total = 25
    writer = subprocess.Popen([sys.executable, os.path.join(JOBS, "train_writer.py"), str(tmp_path), str(total)],
                              stdout=subprocess.PIPE, text=True)
    seen = []

    def finished() -> bool:
        return writer.poll() is not None and torchckpt.latest_checkpoint(tmp_path) in seen

    try:
        for path in torchckpt.checkpoints_iterator(tmp_path, timeout=0.2, timeout_fn=finished, poll_interval_secs=0.01):
            step, weights = torch.tensor(0), torch.zeros(64, 64)
            ckpt = torchckpt.Checkpoint(step=step, weights=weights, model=torch.nn.Linear(8, 8), note="")
            ckpt.restore(path).assert_consumed()
            i = int(step)
            assert torch.all(weights == float(i)) and ckpt.note == f"step {i}"
            assert os.path.basename(path) == f"ckpt-{i}"
            seen.append(path)
    finally:
        writer.wait(timeout=60)
    assert writer.returncode == 0
    steps = [int(os.path.basename(p).split("-")[1]) for p in seen]
    assert steps == sorted(steps) and steps[-1] == total and len(steps) >= 3
