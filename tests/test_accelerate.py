"""Accelerate: a prepared model, optimizer, scheduler and loader saved by a ``CheckpointManager``
under ``accelerate launch`` on 2 CPU processes, SIGKILLed between two saves and resumed, ends
bit-equal to an uninterrupted run (``tests/jobs/accelerate_job.py``, the README's recipe)."""

from __future__ import annotations

import json
import os
import subprocess
import sys

import pytest
import safetensors.torch
import torch

import torchckpt

from .distributed import ROOT, finish_session, free_port

pytest.importorskip("accelerate")
from tests.jobs import accelerate_job  # noqa: E402

WORLD = 2


def launch(directory, mode: str) -> tuple[int, str]:
    """``accelerate launch`` of the job on 2 CPU processes, in a session of its own: at the timeout
    the launcher and its workers are killed, and none is left behind either way."""
    command = [sys.executable, "-m", "accelerate.commands.launch", "--multi_gpu", "--num_processes", str(WORLD),
               "--num_machines", "1", "--mixed_precision", "no", "--dynamo_backend", "no",
               "--main_process_ip", "127.0.0.1", "--main_process_port", str(free_port()),
               str(ROOT / "tests" / "jobs" / "accelerate_job.py"), str(directory), mode]
    proc = subprocess.Popen(command, cwd=ROOT, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True,
                            start_new_session=True,
                            env={**os.environ, "OMP_NUM_THREADS": "1", "PYTHONPATH": str(ROOT)})
    return finish_session(proc, 120, f"accelerate launch {mode}")


def result(directory, name: str, rank: int) -> tuple[dict, dict]:
    tensors = safetensors.torch.load_file(str(directory / f"{name}-rank{rank}.safetensors"))
    return tensors, json.loads((directory / f"{name}-rank{rank}.json").read_text())


@pytest.mark.slow  # 2 launches of 2 processes: 10-18 s on 2 cores; CI runs it with the slow set
def test_a_run_killed_under_accelerate_launch_resumes_bit_exact(tmp_path):
    code, out = launch(tmp_path, "first")
    assert code != 0 and "SIGKILL" in out, out[-3000:]  # the run was killed, not finished
    code, out = launch(tmp_path, "resume")
    assert code == 0, out[-3000:]
    for rank in range(WORLD):
        whole, whole_info = result(tmp_path, "whole", rank)
        resumed, resumed_info = result(tmp_path, "resumed", rank)
        assert resumed_info["restored_step"] == accelerate_job.KILL_AT - 2  # the last save before the kill
        assert whole.keys() == resumed.keys() and any(k.startswith("opt/") for k in whole)
        for key in whole:  # weights, optimizer state and the global generator after training
            assert torch.equal(whole[key], resumed[key]), (rank, key)
        tail = whole_info["seen"][resumed_info["restored_step"]:]
        assert resumed_info["seen"] == tail  # the same batches, from mid-epoch on
        assert resumed_info["lr"] == whole_info["lr"] and resumed_info["step"] == whole_info["step"]
    assert result(tmp_path, "whole", 0)[1]["seen"] != result(tmp_path, "whole", 1)[1]["seen"]  # each rank its share


@pytest.mark.slow  # 2 processes of 4-6 s; CI runs it with the slow set
def test_a_run_with_gradient_accumulation_resumes_bit_exact(tmp_path):
    def run(mode: str) -> subprocess.CompletedProcess[str]:
        return subprocess.run([sys.executable, str(ROOT / "tests" / "jobs" / "accelerate_job.py"), str(tmp_path), mode,
                               "2"], cwd=ROOT, capture_output=True, text=True, timeout=120,
                              env={**os.environ, "OMP_NUM_THREADS": "1", "PYTHONPATH": str(ROOT)})

    first = run("first")
    assert first.returncode == -9, first.stderr[-3000:]  # killed at step 9, between two saves
    resumed = run("resume")
    assert resumed.returncode == 0, resumed.stderr[-3000:]
    whole, whole_info = result(tmp_path, "whole", 0)
    back, back_info = result(tmp_path, "resumed", 0)
    assert back_info["restored_step"] == 6  # saves only where a window of 2 batches ends: 2, 6 (interval 3)
    assert whole.keys() == back.keys() and any(k.startswith("opt/") for k in whole)
    for key in whole:
        assert torch.equal(whole[key], back[key]), key
    assert back_info["seen"] == whole_info["seen"][6:] and back_info["lr"] == whole_info["lr"]



def test_a_prepared_plain_dataloader_is_refused_by_key_and_a_prepared_stateful_one_saves(tmp_path):
    """``accelerator.prepare(DataLoader(...))`` has ``state_dict()`` methods that need a
    ``StatefulDataLoader`` underneath: refused with the fix, not an AttributeError from inside."""
    pytest.importorskip("torchdata.stateful_dataloader")
    from accelerate import Accelerator
    from accelerate.utils import DataLoaderConfiguration

    data = torch.utils.data.TensorDataset(torch.arange(24.0))
    plain = Accelerator(cpu=True).prepare(torch.utils.data.DataLoader(data, batch_size=4))
    with pytest.raises(torchckpt.UnsupportedStateError, match=r"'loader'.*use_stateful_dataloader=True") as info:
        torchckpt.Checkpoint(loader=plain).write(tmp_path / "plain")
    assert info.value.key == "loader" and not (tmp_path / "plain").exists()
    stateful = Accelerator(cpu=True, dataloader_config=DataLoaderConfiguration(use_stateful_dataloader=True)).prepare(
        torch.utils.data.DataLoader(data, batch_size=4))
    it = iter(stateful)
    next(it)
    path = torchckpt.Checkpoint(loader=stateful).write(tmp_path / "stateful")
    rest = [b[0].tolist() for b in it]
    fresh = Accelerator(cpu=True, dataloader_config=DataLoaderConfiguration(use_stateful_dataloader=True)).prepare(
        torch.utils.data.DataLoader(data, batch_size=4))
    torchckpt.Checkpoint(loader=fresh).read(path).assert_consumed()
    assert [b[0].tolist() for b in fresh] == rest
