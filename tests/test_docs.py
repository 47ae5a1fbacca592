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


def test_quickstart_runs_and_matches(tmp_path):
    out = subprocess.run([sys.executable, os.path.join(ROOT, "examples", "quickstart.py"), "--dir", str(tmp_path)],
                         capture_output=True, text=True, check=True).stdout
    assert "resumed run matches the uninterrupted run bit for bit: True" in out


def test_public_names_are_curated():
    assert sorted(torchckpt.__all__) == sorted([
        "Checkpoint", "CheckpointError", "CheckpointManager", "checkpoints_iterator", "wait_for_new_checkpoint", "CheckpointNotFoundError", "CorruptCheckpointError",
        "MismatchReport", "PartialRestoreWarning", "RNGState", "RestoreMismatchError", "RestoreStatus",
        "UnsupportedStateError", "__version__", "latest_checkpoint",
    ])
    for name in torchckpt.__all__:
        assert hasattr(torchckpt, name)


def test_error_hierarchy():
    assert issubclass(torchckpt.CheckpointNotFoundError, (torchckpt.CheckpointError, FileNotFoundError))
    assert issubclass(torchckpt.CorruptCheckpointError, ValueError)
    assert issubclass(torchckpt.UnsupportedStateError, TypeError)
    assert issubclass(torchckpt.RestoreMismatchError, AssertionError)


def test_cli_entry_point_prints_help():
    out = subprocess.run([sys.executable, "-m", "torchckpt"], capture_output=True, text=True)
    assert out.returncode == 0 and "usage: torchckpt" in out.stdout
