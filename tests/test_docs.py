"""The README and docs/ cannot rot: their Python blocks run, their links into docs/ land on a
heading, and the README's commands are the ones CI runs."""

from __future__ import annotations

import os
import re
import subprocess
import sys
import tempfile
from pathlib import Path

import pytest

import torchckpt

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
README = Path(os.path.join(ROOT, "README.md")).read_text()
DOCUMENTS = ["README.md", *sorted(f"docs/{p.name}" for p in Path(ROOT, "docs").glob("*.md"))]


def python_blocks(document: str) -> list[str]:
    """The runnable Python blocks of ``document``: those that import torchckpt (the others are
    fragments), taken out of a list item's indentation."""
    blocks = re.findall(r"```python\n(.*?)```", Path(ROOT, document).read_text(), flags=re.S)
    return [b for b in (re.sub(r"(?m)^  ", "", b) for b in blocks) if re.search(r"^import .*torchckpt", b, re.M)]


BLOCKS = [(document, i, block) for document in DOCUMENTS for i, block in enumerate(python_blocks(document))]


def test_the_readme_and_the_frameworks_page_have_runnable_examples():
    assert {document for document, _, _ in BLOCKS} >= {"README.md", "docs/frameworks.md"}


@pytest.mark.parametrize(("document", "index", "block"), [pytest.param(*b, id=f"{b[0]}-block{b[1]}") for b in BLOCKS])
def test_python_blocks_run(document, index, block, tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)
    monkeypatch.setattr(tempfile, "tempdir", str(tmp_path))  # the blocks' tempfile.mkdtemp() folders, cleaned up
    exec(compile(block, f"{document} block {index}", "exec"), {})


def slug(heading: str) -> str:
    """A heading's anchor as GitHub makes it: lower case, punctuation but ``-`` and ``_`` dropped, spaces to ``-``."""
    return re.sub(r"[^\w\- ]", "", heading.strip().lower()).replace(" ", "-")


@pytest.mark.parametrize("document", DOCUMENTS)
def test_links_into_docs_land_on_a_heading(document):
    text = Path(ROOT, document).read_text()
    here = os.path.dirname(document)
    for target, anchor in re.findall(r"\]\(((?:docs/)?[\w.-]+\.md)?(?:#([\w-]+))?\)", text):
        if not target and not anchor:
            continue
        path = os.path.normpath(os.path.join(here, target)) if target else document
        assert os.path.isfile(os.path.join(ROOT, path)), f"{document} links to {path}, which does not exist"
        if anchor:
            headings = re.findall(r"(?m)^#+ (.*)$", re.sub(r"```.*?```", "", Path(ROOT, path).read_text(), flags=re.S))
            assert anchor in {slug(h) for h in headings}, f"{document} links to {path}#{anchor}, which no heading makes"


def test_readme_commands_are_what_ci_runs():
    ci = Path(os.path.join(ROOT, ".ci", "run")).read_text()
    assert 'pip install -e ".[dev]"' in README and 'pip install -q -e ".[dev]"' in ci
    command = "python -m pytest -q -n 2 --dist loadfile"  # the README's test command, as CI runs it
    assert f"```bash\n{command}\n```" in README and f"\n{command}\n" in ci
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
        "CheckpointDeletedError", "CheckpointReadError", "CheckpointWriteError", "CheckpointState",
        "get_checkpoint_state",
        "CheckpointReader", "VariableNotFoundError", "list_variables", "load_checkpoint", "load_variable", "CheckpointNotFoundError", "CorruptCheckpointError",
        "MismatchReport", "PartialRestoreWarning", "RNGState", "RestoreMismatchError", "RestoreStatus",
        "UnsupportedStateError", "__version__", "latest_checkpoint", "PerRank", "RankTimeoutError",
        "DamagedCheckpointWarning", "TensorSpec", "save_state", "load_state", "convert", "RenameConflictError",
        "UnsafePickleError", "CheckpointTooLargeError", "IgnoreSignals", "UnsupportedFormatError",
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
    assert issubclass(torchckpt.CheckpointTooLargeError, (torchckpt.CheckpointError, ValueError))


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
