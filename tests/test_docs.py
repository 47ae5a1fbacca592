"""The README cannot rot: its Python blocks run, and its commands are the ones CI runs."""

from __future__ import annotations

import os
import re
import subprocess
import sys
from pathlib import Path

import pytest

import torchckpt

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
README = Path(os.path.join(ROOT, "README.md")).read_text()


def python_blocks() -> list[str]:
    blocks = re.findall(r"```python\n(.*?)```", README, flags=re.S)
    runnable = [b for b in (re.sub(r"(?m)^  ", "", b) for b in blocks) if re.search(r"^import .*torchckpt", b, re.M)]
    assert runnable, "the README should have runnable examples"
    return runnable


@pytest.mark.parametrize("index", range(len(python_blocks())))
def test_readme_python_blocks_run(index, tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)
    exec(compile(python_blocks()[index], f"README block {index}", "exec"), {})


def test_readme_commands_are_what_ci_runs():
    ci = Path(os.path.join(ROOT, ".ci", "run")).read_text()
    assert 'pip install -e ".[dev]"' in README and 'pip install -q -e ".[dev]"' in ci
    assert "python -m pytest -q" in README and "python -m pytest -q" in ci
    assert "python examples/quickstart.py" in README
    # what test_distributed_manager.py::test_the_fsdp_example_is_killed_on_2_ranks_and_resumes_on_1 runs
    assert "torchrun --standalone --nproc-per-node 2 examples/train_fsdp.py --dir runs/fsdp --crash-at 27" in README
    assert "torchrun --standalone --nproc-per-node 1 examples/train_fsdp.py --dir runs/fsdp" in README


def test_quickstart_runs_and_matches(tmp_path):
    out = subprocess.run([sys.executable, os.path.join(ROOT, "examples", "quickstart.py"), "--dir", str(tmp_path)],
                         capture_output=True, text=True, check=True).stdout
    assert "resumed run matches the uninterrupted run bit for bit: True" in out


def test_public_names_are_curated():
    assert sorted(torchckpt.__all__) == sorted([
        "Checkpoint", "CheckpointError", "CheckpointManager", "checkpoints_iterator", "wait_for_new_checkpoint",
        "CheckpointDeletedError", "CheckpointWriteError", "CheckpointState", "get_checkpoint_state",
        "CheckpointReader", "VariableNotFoundError", "list_variables", "load_checkpoint", "load_variable", "CheckpointNotFoundError", "CorruptCheckpointError",
        "MismatchReport", "PartialRestoreWarning", "RNGState", "RestoreMismatchError", "RestoreStatus",
        "UnsupportedStateError", "__version__", "latest_checkpoint", "PerRank", "RankTimeoutError",
        "DamagedCheckpointWarning", "TensorSpec", "save_state", "load_state",
    ])
    for name in torchckpt.__all__:
        assert hasattr(torchckpt, name)


def test_error_hierarchy():
    assert issubclass(torchckpt.CheckpointNotFoundError, (torchckpt.CheckpointError, FileNotFoundError))
    assert issubclass(torchckpt.CorruptCheckpointError, ValueError)
    assert issubclass(torchckpt.UnsupportedStateError, TypeError)
    assert issubclass(torchckpt.RestoreMismatchError, AssertionError)
    assert issubclass(torchckpt.CheckpointDeletedError, torchckpt.CheckpointNotFoundError)
    assert issubclass(torchckpt.CheckpointWriteError, (torchckpt.CheckpointError, OSError))


def test_cli_entry_point_prints_help():
    out = subprocess.run([sys.executable, "-m", "torchckpt"], capture_output=True, text=True)
    assert out.returncode == 0 and "usage: torchckpt" in out.stdout


@pytest.mark.slow  # 11 s: the GAN example twice and its watcher; CI runs it with the slow set
def test_gan_example_resumes_and_the_watcher_validates(tmp_path):
    examples = os.path.join(ROOT, "examples")
    run = str(tmp_path / "gan")
    first = subprocess.run([sys.executable, os.path.join(examples, "train_gan.py"), "--dir", run, "--steps", "60",
                            "--save-every", "20"], capture_output=True, text=True, check=True).stdout
    assert "starting from scratch" in first and "ckpt-3" in first
    second = subprocess.run([sys.executable, os.path.join(examples, "train_gan.py"), "--dir", run, "--steps", "100",
                             "--save-every", "20"], capture_output=True, text=True, check=True).stdout
    assert "resumed from" in second and "at step 60" in second and "ckpt-5" in second
    watch = subprocess.run([sys.executable, os.path.join(examples, "validate_watch.py"), "--dir", run, "--timeout", "0.5"],
                           capture_output=True, text=True, check=True, cwd=examples).stdout
    assert "ckpt-5: step  100" in watch and "validated 1 checkpoints" in watch


@pytest.mark.slow  # 7 s; CI runs it with the slow set
def test_gan_example_interrupted_with_ctrl_c_saves_and_resumes(tmp_path):
    import signal
    import time

    run = str(tmp_path / "gan")
    script = os.path.join(ROOT, "examples", "train_gan.py")
    # SIGINT back to its default in the child: a job started in the background by a non-interactive
    # shell inherits it ignored, and Python then never turns it into KeyboardInterrupt.
    proc = subprocess.Popen([sys.executable, script, "--dir", run, "--steps", "100000", "--save-every", "50"],
                            stdout=subprocess.PIPE, text=True,
                            preexec_fn=lambda: signal.signal(signal.SIGINT, signal.SIG_DFL))
    assert proc.stdout is not None
    while "saved" not in proc.stdout.readline():
        pass
    time.sleep(0.2)
    proc.send_signal(signal.SIGINT)
    out, _ = proc.communicate(timeout=60)
    assert "interrupted at step" in out
    step = int(out.split("interrupted at step ")[1].split(";")[0])
    again = subprocess.run([sys.executable, script, "--dir", run, "--steps", str(step + 10), "--save-every", "50"],
                           capture_output=True, text=True, check=True).stdout
    assert f"at step {step}" in again


def test_inspect_example_runs():
    out = subprocess.run([sys.executable, os.path.join(ROOT, "examples", "inspect_checkpoint.py")],
                         capture_output=True, text=True, check=True).stdout
    assert "model/0.weight" in out and "epoch: 7" in out and "only this tensor was read" in out
