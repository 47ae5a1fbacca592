"""The reading commands do not import torch: each runs in a fresh process, which then reports
whether ``torch`` is in ``sys.modules``.

Importing torch takes over a second, a hundred times what ``inspect`` of 20,000 tensors does, so a
``import torch`` at the top of any module on the path of ``inspect``, ``ls``, ``verify`` or ``diff``
fails here (not a timing test). The commands that build tensors (``diff --values``) import it when
they run, which the control case checks, so a probe that cannot see torch would fail too.
"""

from __future__ import annotations

import json
import subprocess
import sys

import pytest
import torch

import torchckpt

# Runs the command line as the console script does, then reports on the last line of stdout.
PROBE = """
import json, runpy, sys
sys.argv = ["torchckpt", *sys.argv[1:]]
try:
    runpy.run_module("torchckpt", run_name="__main__")
except SystemExit as e:
    code = e.code
print(json.dumps({"code": code, "torch": "torch" in sys.modules}))
"""

def run_cli(*argv: str) -> tuple[int, bool, str]:
    """The exit code of ``torchckpt ARGV`` in a fresh process, whether it imported torch, and its output."""
    out = subprocess.run([sys.executable, "-c", PROBE, *argv], capture_output=True, text=True, timeout=120)
    *lines, last = out.stdout.splitlines()
    report = json.loads(last)
    return report["code"], report["torch"], "\n".join(lines) + out.stderr


@pytest.fixture
def trained(tmp_path):
    """A checkpoint of a module, an optimizer after one step, and plain values (a ``torch.Size``,
    ``torch.dtype`` or ``torch.device`` value in the state would need torch to be decoded)."""
    model = torch.nn.Linear(3, 2)
    optimizer = torch.optim.Adam(model.parameters())
    model(torch.ones(1, 3)).sum().backward()
    optimizer.step()
    extra = {"epoch": 4, "loss": float("nan"), "rng": (3, 1.5), "tags": {"run": "a"}}
    return torchckpt.Checkpoint(model=model, optimizer=optimizer, extra=extra).write(str(tmp_path / "a"))


@pytest.fixture
def retrained(tmp_path):
    """Another checkpoint: other tensors, another dtype, another epoch."""
    state = {"w": torch.ones(2, dtype=torch.float16), "new": torch.zeros(1), "epoch": 5}
    return torchckpt.Checkpoint(**state).write(str(tmp_path / "b"))


@pytest.fixture
def run_dir(tmp_path):
    """A manager's directory of three checkpoints with metrics."""
    manager = torchckpt.CheckpointManager(torchckpt.Checkpoint(w=torch.ones(4)), str(tmp_path / "run"), max_to_keep=2)
    for step in range(3):
        manager.save(metrics={"loss": 1.0 / (step + 1)})
    return str(tmp_path / "run")


@pytest.fixture
def safetensors_file(tmp_path):
    from safetensors.torch import save_file

    path = str(tmp_path / "model.safetensors")
    save_file({"w": torch.ones(2, 2), "b": torch.zeros(2, dtype=torch.bfloat16)}, path)
    return path


@pytest.mark.parametrize("argv", [
    pytest.param(["inspect", "{trained}"], id="inspect"),
    pytest.param(["inspect", "--json", "{trained}"], id="inspect-json"),
    pytest.param(["inspect", "{safetensors_file}"], id="inspect-safetensors"),
    pytest.param(["ls", "{run_dir}"], id="ls"),
    pytest.param(["ls", "--json", "{run_dir}"], id="ls-json"),
    pytest.param(["verify", "{trained}"], id="verify"),
    pytest.param(["diff", "{trained}", "{retrained}"], id="diff"),
    pytest.param(["--version"], id="version"),
])
def test_a_reading_command_does_not_import_torch(argv, trained, retrained, run_dir, safetensors_file):
    paths = {"trained": trained, "retrained": retrained, "run_dir": run_dir, "safetensors_file": safetensors_file}
    code, imported, output = run_cli(*(a.format(**paths) for a in argv))
    assert code == 0, output
    assert not imported, f"torchckpt {' '.join(argv)} imported torch"


def test_diff_values_imports_torch_when_it_runs(trained):
    code, imported, output = run_cli("diff", "--values", trained, trained)
    assert code == 0, output
    assert imported
    assert "0 of 8 comparable tensors differ in value" in output
