"""Checkpoints of more shards than a process may hold open at once (one saved by 1,024 ranks has a
shard per rank or more): a restore holds every shard open, so it raises the process's soft limit
on open files toward its hard limit; where the hard limit is too low, it holds a few at a time.
Any other error of the process is a ``CheckpointReadError``, which says nothing about the
checkpoint, and a resume does not fall back past it."""

from __future__ import annotations

import errno
import json
import os
import subprocess
import sys

import pytest
import torch

import torchckpt

resource = pytest.importorskip("resource")

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
JOBS = os.path.join(ROOT, "tests", "jobs")


@pytest.fixture
def soft_limit():
    """``set(n)`` lowers the soft limit on open files to ``n`` (the hard limit stays); the original
    limits are put back after the test."""
    before = resource.getrlimit(resource.RLIMIT_NOFILE)
    if before[1] != resource.RLIM_INFINITY and before[1] < 2048:
        pytest.skip(f"the hard limit on open files is {before[1]}: too low to raise a soft limit past 1,024")
    yield lambda n: resource.setrlimit(resource.RLIMIT_NOFILE, (n, before[1]))
    resource.setrlimit(resource.RLIMIT_NOFILE, before)


def _many_shards(count: int) -> dict[str, torch.Tensor]:
    return {f"t{i}": torch.full((1024,), float(i)) for i in range(count)}  # 4 KiB each: a shard each below


def test_a_checkpoint_of_more_shards_than_the_soft_limit_restores_bit_exact(tmp_path, soft_limit):
    state = _many_shards(600)
    path = torchckpt.Checkpoint(state=state).write(tmp_path / "c", max_shard_size=4096, progress=False)
    assert len([n for n in os.listdir(path) if n.endswith(".safetensors")]) == 600
    soft_limit(256)
    dest = {k: torch.zeros_like(v) for k, v in state.items()}
    torchckpt.Checkpoint(state=dest).read(path, progress=False).assert_consumed()
    assert all(torch.equal(dest[k], state[k]) for k in state)
    assert resource.getrlimit(resource.RLIMIT_NOFILE)[0] >= 600  # raised, toward the hard limit
    reader = torchckpt.load_checkpoint(path)
    assert torch.equal(reader.get_tensor("state/t599"), state["t599"])


def test_within_the_limit_the_soft_limit_is_left_alone(tmp_path, soft_limit):
    state = _many_shards(20)
    path = torchckpt.Checkpoint(state=state).write(tmp_path / "c", max_shard_size=4096, progress=False)
    soft_limit(256)
    torchckpt.Checkpoint(state={k: torch.zeros_like(v) for k, v in state.items()}).read(path).assert_consumed()
    assert resource.getrlimit(resource.RLIMIT_NOFILE)[0] == 256


def test_past_the_hard_limit_a_resume_holds_a_few_shards_open_at_a_time_and_restores_bit_exact(tmp_path):
    """Every checkpoint of the run has more shards than the process may hold open. Before, the
    restore raised ``CheckpointReadError`` (and before that, each checkpoint was treated as damaged
    and the resume fell back from one to the next); now it holds a third as many shards open as it
    could, opening each again when it reads it; the inspector and `torchckpt verify` read it too."""
    state = {f"t{i}": torch.full((256,), float(i)) for i in range(200)}
    manager = torchckpt.CheckpointManager(torchckpt.Checkpoint(state=state), tmp_path / "run", max_to_keep=3,
                                          max_shard_size=1024)
    manager.save()
    latest = manager.save()
    manager.close()
    assert len([n for n in os.listdir(latest) if n.endswith(".safetensors")]) == 200
    out = subprocess.run([sys.executable, os.path.join(JOBS, "open_file_limit.py"), str(tmp_path / "run"), "64"],
                         capture_output=True, text=True, timeout=120)
    assert out.returncode == 0, out.stderr[-3000:]
    found = json.loads(out.stdout.strip().splitlines()[-1])
    assert found["raised"] == {} and found["restored"] == latest and found["equal"], found
    assert found["warnings"] == [] and not found["initialized"] and found["damaged"] == {}
    assert found["inspected"] and found["verify"] == 0, found["verify_error"]


@pytest.mark.parametrize(("at", "nth"), [(2, 1), (3, 1), (3, 5)],
                         ids=["while-checking-headers", "while-reading", "after-reading-four-shards"])
def test_past_the_hard_limit_a_checkpoint_replaced_during_the_restore_is_a_deletion_not_two_checkpoints(tmp_path, at,
                                                                                                        nth):
    """Replaced while the headers are checked, the index no longer ends with the seal read before
    (``recheck.confirm_unchanged``); replaced afterwards, a shard opened again is another file than
    the one first opened (``Source.identity``). Without either check, a restore with
    ``verify=False`` read the newer tensors under the older index and returned normally."""
    state = {f"t{i}": torch.full((256,), float(i)) for i in range(200)}
    path = torchckpt.Checkpoint(state=state).write(tmp_path / "c", max_shard_size=1024, progress=False)
    other = torchckpt.Checkpoint(state={k: torch.full_like(v, -1.0) for k, v in state.items()}).write(
        tmp_path / "other", max_shard_size=1024, progress=False)
    assert sorted(os.listdir(path)) == sorted(os.listdir(other))  # the same shard names and sizes
    out = subprocess.run([sys.executable, os.path.join(JOBS, "open_file_limit_replaced.py"), path, other, "64",
                          str(at), str(nth)],
                         capture_output=True, text=True, timeout=120, cwd=ROOT, env={**os.environ, "PYTHONPATH": ROOT})
    assert out.returncode == 0, out.stderr[-3000:]
    found = json.loads(out.stdout.strip().splitlines()[-1])
    assert found["replaced"] and not found["mixed"], found
    assert found["raised"]["type"] == "CheckpointDeletedError", found
    message = found["raised"]["message"]
    assert "was replaced while it was being read" in message
    assert ("partly restored" in message) == (nth > 1), message  # four shards' bytes were in place


def test_past_the_hard_limit_verify_reports_a_shard_deleted_meanwhile_and_checks_the_rest(tmp_path):
    """A shard gone when verify opens it again is one problem; the shards after it are checked with
    their own tensors (verify had stopped advancing through the table at such a shard, and reported
    every later shard against the wrong tensors)."""
    state = {f"t{i}": torch.full((256,), float(i)) for i in range(200)}
    path = torchckpt.Checkpoint(state=state).write(tmp_path / "c", max_shard_size=1024, progress=False)
    out = subprocess.run([sys.executable, os.path.join(JOBS, "open_file_limit_verify.py"), path, "64"],
                         capture_output=True, text=True, timeout=120, cwd=ROOT, env={**os.environ, "PYTHONPATH": ROOT})
    assert out.returncode == 0, out.stderr[-3000:]
    found = json.loads(out.stdout.strip().splitlines()[-1])
    assert len(found["problems"]) == 1, found["problems"][:3]
    assert os.path.basename(found["victim"]) in found["problems"][0] and "missing" in found["problems"][0]


@pytest.mark.parametrize(("code", "kind"), [
    (errno.EMFILE, torchckpt.CheckpointReadError),
    (errno.EACCES, torchckpt.CheckpointReadError),
    (errno.ENOMEM, torchckpt.CheckpointReadError),
    (errno.ETIMEDOUT, torchckpt.CheckpointReadError),
    (errno.ESTALE, torchckpt.CheckpointReadError),  # NFS: deleted or replaced by another client, not damaged
    (errno.EIO, torchckpt.CorruptCheckpointError),
], ids=["emfile", "eacces", "enomem", "etimedout", "estale", "eio"])
def test_an_error_of_the_process_is_a_read_error_and_one_of_the_disk_is_damage(tmp_path, disk, code, kind):
    """A shard the system will not read: out of a resource, no permission or a network that failed
    is the process's or the machine's (CheckpointReadError, an OSError with the errno); an I/O
    error of the disk is this copy's damage (CorruptCheckpointError)."""
    state = {"w": torch.randn(64)}
    path = torchckpt.Checkpoint(state=state).write(tmp_path / "c", progress=False)
    disk.fail("open", OSError(code, os.strerror(code)))
    with pytest.raises(kind, match=os.strerror(code)) as caught:
        torchckpt.Checkpoint(state={"w": torch.zeros(64)}).read(path, progress=False)
    assert caught.value.path.endswith(".safetensors")
    if kind is torchckpt.CheckpointReadError:
        assert caught.value.errno == code and "not treated as damaged" in str(caught.value)
    if code == errno.ESTALE:
        assert "deleted or replaced on the server" in str(caught.value)


class _DataReadsFail:
    """A shard whose data reads (``readv``) fail with ``error``; its header reads work."""

    def __init__(self, source, error: OSError) -> None:
        self._source, self._error = source, error

    def __getattr__(self, name: str):
        return getattr(self._source, name)

    def readv(self, views, offset) -> None:
        raise self._error


@pytest.mark.parametrize(("code", "process_error"), [(errno.EACCES, True), (errno.EIO, False)], ids=["eacces", "eio"])
def test_verify_raises_a_process_error_and_reports_a_disk_error(tmp_path, disk, capsys, code, process_error):
    """``torchckpt verify``: a shard the disk cannot read is a problem of the checkpoint (listed);
    one this process may not read says so, and lists no problem of the checkpoint."""
    from torchckpt._storage.local import LOCAL
    from torchckpt.cli import main

    path = torchckpt.Checkpoint(state={"w": torch.randn(4096)}).write(tmp_path / "c", progress=False)
    disk.instead("open", lambda file, what: _DataReadsFail(LOCAL.open(file, what), OSError(code, os.strerror(code))))
    assert main(["verify", path]) == 1
    err = capsys.readouterr().err
    assert err.count("Error:") == 1 and os.strerror(code) in err
    if process_error:
        assert "Cannot read shard" in err and "not treated as damaged" in err and "cannot read it to the end" not in err
    else:
        assert "cannot read it to the end" in err and "not treated as damaged" not in err


def test_a_read_error_survives_pickling_with_its_message_path_and_errno():
    """As a multiprocessing worker or a launcher hands it back: OSError's own pickling would put
    the path where the errno goes."""
    import pickle

    error = torchckpt.CheckpointReadError("Cannot open shard /c/s.safetensors: Too many open files.",
                                          "/c/s.safetensors", errno.EMFILE)
    again = pickle.loads(pickle.dumps(error))
    assert type(again) is torchckpt.CheckpointReadError
    assert (str(again), again.path, again.errno, again.filename) == (str(error), "/c/s.safetensors", errno.EMFILE,
                                                                     "/c/s.safetensors")
