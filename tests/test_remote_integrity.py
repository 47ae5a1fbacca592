"""Never silently wrong on object stores: late writers, readers racing retention, deletions cut short,
junk prefixes, damaged indexes. Every test runs on moto's S3 server (a real S3 API); those that need
no second process also on ``memory://``.
"""

from __future__ import annotations

import json
import os
import socket
import subprocess
import sys
import threading
import time
from pathlib import Path

import pytest
import torch

import torchckpt
from torchckpt import CheckpointManager
from torchckpt._tools.verify import verify
from torchckpt.cli import main

from .distributed import ROOT
from .test_remote import JOB, TAGGED, shards_of

SHORT_LEASE = 1.0  # the paused writer's lease term (seconds)


def job(remote, mode: str, path: str, arg: float = 0) -> subprocess.Popen[str]:
    """A writer process (tests/jobs/remote_writer.py) paused at its first upload: "PAUSED" is read."""
    proc = subprocess.Popen([sys.executable, "-m", JOB, mode, path, json.dumps(remote.options), str(arg)],
                            stdin=subprocess.PIPE, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True,
                            env={**os.environ}, cwd=ROOT)
    assert proc.stdout is not None
    lines = [proc.stdout.readline().strip()]
    if lines[0] != "PAUSED":
        proc.kill()
        pytest.fail(f"the writer did not pause: {lines} {proc.communicate(timeout=30)}")
    return proc


def resume(proc: subprocess.Popen[str]) -> str:
    """Let the paused writer go on; its last line (``RAISED <type> typed=<bool> <message>`` or ``COMMITTED``)."""
    try:
        out, err = proc.communicate("go\n", timeout=60)
    finally:
        if proc.poll() is None:
            proc.kill()
            proc.wait(timeout=30)
    lines = out.strip().splitlines()
    assert lines, err
    return lines[-1]


def assert_intact(remote, path: str, value: float) -> None:
    """``path`` verifies, restores ``value`` everywhere, and holds only its index and its own shard."""
    assert verify(torchckpt.load_checkpoint(path, storage_options=remote.options)) == []
    w = torch.zeros(1000)
    torchckpt.Checkpoint(w=w).read(path, storage_options=remote.options).assert_consumed()
    assert torch.equal(w, torch.full((1000,), value))
    names = remote.names(path.rsplit("/", 1)[1])
    assert len(names) == 2 and names[0] == "index.json" and TAGGED.fullmatch(names[1]), names


# -- item 2: a late writer never touches a committed checkpoint ---------------------------------------


def test_a_writer_that_loses_the_commit_race_touches_nothing_of_the_winner(remote):
    path = remote.at("c")
    winner: dict[str, str] = {}

    def meanwhile(sizes: dict[str, int]) -> None:  # this writer's shards are up, its index not yet: another one commits
        winner["path"] = torchckpt.Checkpoint(w=torch.full((1000,), 1.0)).write(path, storage_options=remote.options)

    remote.storage.before("stage.commit", meanwhile, times=1)
    with pytest.raises(torchckpt.CheckpointError, match="another writer committed a checkpoint there") as info:
        torchckpt.Checkpoint(w=torch.full((1000,), 7.0)).write(path, storage_options=remote.options)
    assert isinstance(info.value, FileExistsError) and info.value.path == path
    assert "Nothing of this save was committed" in str(info.value) and "stop the other job" in str(info.value)
    assert winner["path"] == path
    assert_intact(remote, path, 1.0)  # the loser's objects are gone too


def test_a_late_checkpoint_write_never_overwrites_the_committed_one(remote):
    if remote.kind == "memory":
        pytest.skip("memory:// belongs to one process")
    path = remote.at("c")
    proc = job(remote, "late", path)  # its stage is open, nothing uploaded yet
    try:
        torchckpt.Checkpoint(w=torch.full((1000,), 1.0)).write(path, storage_options=remote.options)
    finally:
        last = resume(proc)
    assert_intact(remote, path, 1.0)  # the committed checkpoint first: that is what must never change
    assert last.startswith("RAISED AlreadyCommitted typed=True Cannot commit"), last
    assert "another writer committed a checkpoint there" in last
    assert main(["verify", path, "--storage-options", json.dumps(remote.options)]) == 0


def test_a_manager_paused_past_its_lease_never_touches_what_the_next_one_committed(remote):
    if remote.kind == "memory":
        pytest.skip("memory:// belongs to one process")
    proc = job(remote, "pause", remote.url, SHORT_LEASE)  # saved ckpt-1; frozen in the save of ckpt-2
    try:
        time.sleep(SHORT_LEASE + 0.5)  # its lease expires unrenewed
        ckpt = torchckpt.Checkpoint(w=torch.full((1000,), 1.0))
        mgr = CheckpointManager(ckpt, remote.url, storage_options=remote.options)  # takes the lease over
        assert mgr.save() == remote.at("ckpt-2")
    finally:
        last = resume(proc)
    assert_intact(remote, remote.at("ckpt-2"), 1.0)
    assert last.startswith("RAISED CheckpointError typed=True"), last
    assert "lost its claim" in last
    assert mgr.save() == remote.at("ckpt-3")  # the new holder goes on
    mgr.close()


def test_a_killed_losers_objects_in_a_committed_checkpoint_are_removed_by_the_next_manager(remote):
    ckpt = torchckpt.Checkpoint(w=torch.full((1000,), 1.0))
    mgr = CheckpointManager(ckpt, remote.url, storage_options=remote.options)
    path = mgr.save()
    mgr.close()
    tag = "0123456789ab"  # what a writer that lost the commit race and was killed before its clean-up leaves
    marker = {"writer": "pid 1 on elsewhere", "time": time.time(), "session": "a manager long gone", "tag": tag}
    remote.fs.pipe_file(remote.at("ckpt-1", f".torchckpt-pending-{tag}"), json.dumps(marker).encode())
    remote.fs.pipe_file(remote.at("ckpt-1", f"model-00001-of-00001-{tag}.safetensors"), b"its upload")
    again = CheckpointManager(ckpt, remote.url, storage_options=remote.options)
    assert_intact(remote, path, 1.0)  # its objects are gone; the checkpoint is untouched
    assert again.checkpoints == [path]
    again.close()


def test_an_export_onto_an_earlier_one_leaves_only_its_own_files(remote, capsys):
    from .conftest import make_mlp

    path = torchckpt.Checkpoint(model=make_mlp()).write(remote.at("c"), storage_options=remote.options)
    options = ["--storage-options", json.dumps(remote.options)] if remote.options else []
    assert main(["export", path, "--object", "model", remote.at("hf"), "--max-shard-size", "200", *options]) == 0
    assert len(shards_of(remote, "hf")) > 1
    assert main(["export", path, "--object", "model", remote.at("hf"), *options]) == 0  # no writer's marker there
    assert remote.names("hf") == ["model.safetensors"]


def test_an_export_never_commits_beside_a_file_put_in_its_folder(remote, capsys):
    from .conftest import make_mlp

    path = torchckpt.Checkpoint(model=make_mlp()).write(remote.at("c"), storage_options=remote.options)
    options = ["--storage-options", json.dumps(remote.options)] if remote.options else []
    remote.storage.after("output.finish", lambda *args: remote.fs.pipe_file(remote.at("hf", "notes.txt"), b"keep"),
                         times=1)
    assert main(["export", path, "--object", "model", remote.at("hf"), *options]) == 1
    assert "It appeared while the export was being written; nothing was replaced." in capsys.readouterr().err
    assert remote.names("hf") == ["notes.txt"]
    assert remote.fs.cat_file(remote.at("hf", "notes.txt")) == b"keep"


# -- item 6: readers racing retention ----------------------------------------------------------------


@pytest.mark.parametrize(("method", "vanishing", "calls"), [
    ("cat_file", "index.json", 1),  # the index was there at its HEAD, gone at its GET
    ("cat_file", ".safetensors", 1),  # a shard was there when it was opened, gone at the header read
    ("info", "index.json", 2),  # the index was there when the path was resolved, gone at its HEAD
    ("info", "index.json", 1),  # the checkpoint was there, its deletion finished before its index was looked for
], ids=["index-get", "shard-read", "index-head", "while-resolved"])
def test_a_reader_racing_retention_gets_checkpoint_deleted_error(remote, monkeypatch, method, vanishing, calls):
    ckpt = torchckpt.Checkpoint(w=torch.full((1000,), 1.0))
    mgr = CheckpointManager(ckpt, remote.url, max_to_keep=1, storage_options=remote.options)
    first = mgr.save()
    fs = remote.fs  # the filesystem instance torchckpt uses (fsspec caches one per options)
    real = getattr(fs, method)
    seen: list[str] = []

    def racing(path, *args, **kwargs):  # retention deletes ckpt-1 just before this request
        if str(path).endswith(vanishing) and "ckpt-1" in str(path) and len(seen) < calls:
            seen.append(str(path))
            if len(seen) == calls:
                ckpt.w.fill_(2.0)
                mgr.save()
        return real(path, *args, **kwargs)

    monkeypatch.setattr(fs, method, racing)
    with pytest.raises(torchckpt.CheckpointDeletedError, match="was deleted while it was being read") as info:
        torchckpt.Checkpoint(w=torch.zeros(1000)).read(first, storage_options=remote.options)
    assert len(seen) == calls and info.value.path == first
    assert "read a newer checkpoint" in str(info.value)
    mgr.close()


# -- item 7: a deletion cut short is finished by the next manager ------------------------------------


def test_a_retention_killed_between_the_index_and_the_shards_is_finished_at_the_next_open(remote, monkeypatch):
    ckpt = torchckpt.Checkpoint(w=torch.full((1000,), 1.0))
    mgr = CheckpointManager(ckpt, remote.url, max_to_keep=1, storage_options=remote.options)
    mgr.save()
    fs = remote.fs
    real = fs.rm

    def killed(path, *args, **kwargs):  # the process dies when it deletes ckpt-1's shards
        paths = [path] if isinstance(path, str) else list(path)
        if any("ckpt-1" in p and not p.endswith(("index.json", ".torchckpt-deleting")) for p in paths):
            raise KeyboardInterrupt
        return real(path, *args, **kwargs)

    monkeypatch.setattr(fs, "rm", killed)
    ckpt.w.fill_(2.0)
    with pytest.raises(KeyboardInterrupt):
        mgr.save()
    monkeypatch.undo()
    left = remote.names("ckpt-1")
    assert "index.json" not in left and shards_of(remote, "ckpt-1")  # no longer committed, shards left
    assert torchckpt.latest_checkpoint(remote.url, storage_options=remote.options) == remote.at("ckpt-2")
    mgr.close()
    again = CheckpointManager(ckpt, remote.url, max_to_keep=1, storage_options=remote.options)
    assert remote.names("ckpt-1") == []  # finished
    assert again.checkpoints == [remote.at("ckpt-2")]
    assert_intact(remote, remote.at("ckpt-2"), 2.0)
    again.close()


# -- item 9: junk prefixes cost no requests per name ----------------------------------------------


def test_junk_prefixes_cost_no_requests_per_name_at_open_and_ls(remote, capsys):
    if remote.kind == "memory":
        pytest.skip("counts S3 requests")
    ckpt = torchckpt.Checkpoint(w=torch.ones(10))
    mgr = CheckpointManager(ckpt, remote.url, storage_options=remote.options)
    mgr.save()
    mgr.close()
    fs = remote.fs
    for i in range(60):  # numbered prefixes without an index, not written by torchckpt
        fs.pipe_file(remote.at(f"ckpt-{100 + i}", "model-00001-of-00001.safetensors"), b"x")
    sent: list[str] = []

    def count(**kwargs) -> None:
        sent.append(kwargs.get("event_name", ""))

    fs.call_s3("list_buckets")  # the client exists
    fs.s3.meta.events.register("before-send.s3", count)
    try:
        mgr = CheckpointManager(ckpt, remote.url, storage_options=remote.options)
        opened = len(sent)
        assert mgr.checkpoints == [remote.at("ckpt-1")] and mgr.save() == remote.at("ckpt-160")
        mgr.close()
        sent.clear()
        assert main(["ls", remote.url, "--json", "--storage-options", json.dumps(remote.options)]) == 0
        listed = len(sent)
    finally:
        fs.s3.meta.events.unregister("before-send.s3", count)
    assert opened < 30 and listed < 30, (opened, listed)  # were 660 and 190: 2-11 requests for each junk name
    assert [c["name"] for c in json.loads(capsys.readouterr().out)["checkpoints"]] == ["ckpt-1", "ckpt-160"]


# -- item 13c: one damaged index does not hide the others from ls -------------------------------------


def test_ls_shows_a_checkpoint_with_an_empty_index_as_damaged_and_lists_the_others(remote, capsys):
    ckpt = torchckpt.Checkpoint(w=torch.ones(3))
    mgr = CheckpointManager(ckpt, remote.url, storage_options=remote.options)
    mgr.save()
    mgr.save()
    mgr.close()
    remote.fs.pipe_file(remote.at("ckpt-1", "index.json"), b"")
    options = ["--storage-options", json.dumps(remote.options)] if remote.options else []
    capsys.readouterr()
    assert main(["ls", remote.url, "--json", *options]) == 0
    captured = capsys.readouterr()
    listed = json.loads(captured.out)["checkpoints"]
    assert [c["name"] for c in listed] == ["ckpt-1", "ckpt-2"]
    assert listed[0]["marks"] == ["kept", "damaged"] and "index.json" in listed[0]["problem"]
    assert listed[1]["marks"] == ["latest", "kept"] and "problem" not in listed[1]
    assert "warning: ckpt-1 is damaged" in captured.err
    assert main(["ls", remote.url, *options]) == 0
    assert "damaged" in capsys.readouterr().out


# -- a job restarted on the same host claims the directory at once -----------------------------------


def lines_of(proc: subprocess.Popen[str], count: int, timeout: float = 120) -> list[str]:
    """The next ``count`` lines the process prints, waiting at most ``timeout`` seconds for them."""
    lines: list[str] = []

    def read() -> None:
        assert proc.stdout is not None
        lines.extend(proc.stdout.readline().strip() for _ in range(count))

    reader = threading.Thread(target=read, daemon=True)
    reader.start()
    reader.join(timeout)
    return lines


def test_a_job_restarted_on_this_host_after_a_kill_claims_the_directory_at_once(remote):
    if remote.kind == "memory":
        pytest.skip("memory:// belongs to one process")
    lease_secs = 60  # the default term: a wait for it to expire would show
    proc = subprocess.Popen([sys.executable, "-m", JOB, "crash", remote.url, json.dumps(remote.options), str(lease_secs)],
                            stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True, env={**os.environ}, cwd=ROOT)
    try:
        lines = lines_of(proc, 2)
        assert lines == ["SAVED", "UPLOADING"], lines
    finally:
        proc.kill()  # SIGKILL in the middle of the second save's upload (its lease still runs for about 60 s)
        _, err = proc.communicate(timeout=30)
    assert remote.names("ckpt-2") and "index.json" not in remote.names("ckpt-2"), err  # its leftovers
    state = torchckpt.Checkpoint(tensors={"a": torch.zeros(8 * 2**20), "b": torch.zeros(8 * 2**20)}, step=0)
    started = time.monotonic()
    mgr = CheckpointManager(state, remote.url, storage_options=remote.options)  # no retry: at once or not at all
    waited = time.monotonic() - started
    assert waited < 10, waited  # was: refused for the rest of the dead writer's 60 s lease
    lease = json.loads(remote.fs.cat_file(remote.at(".torchckpt.lock")))
    assert lease["pid"] == os.getpid() and lease["host"] == socket.gethostname()
    assert remote.names("ckpt-2") == []  # the killed writer's leftovers are gone
    state.restore(remote.url, storage_options=remote.options).assert_consumed()
    assert state.step == 1
    assert mgr.save() == remote.at("ckpt-2")
    mgr.close()
    committed = torchckpt.get_checkpoint_state(remote.url, storage_options=remote.options).all
    assert committed == [remote.at("ckpt-1"), remote.at("ckpt-2")]
    for path in committed:
        assert verify(torchckpt.load_checkpoint(path, storage_options=remote.options)) == [], path


def dead_pid() -> int:
    """The pid of a process that has exited (and been reaped)."""
    done = subprocess.run([sys.executable, "-c", "import os; print(os.getpid())"], capture_output=True, text=True,
                          timeout=60, check=True)
    return int(done.stdout)


def this_process(remote) -> dict:
    """The holder fields of a lease this process writes (its manager on another directory)."""
    if not os.path.exists("/proc/self/stat"):
        pytest.skip("no /proc: a holder's pid cannot be probed here")
    mine = CheckpointManager(torchckpt.Checkpoint(w=torch.zeros(1)), remote.at("mine"), storage_options=remote.options)
    lease = json.loads(remote.fs.cat_file(remote.at("mine", ".torchckpt.lock")))
    mine.close()
    return {"pid": os.getpid(), "host": socket.gethostname(), "pids": lease.get("pids"), "started": lease.get("started")}


def plant_lease(remote, fields: dict) -> None:
    """A live lease on ``remote.url`` (60 s left) of the holder ``fields`` describe."""
    note = {"holder": "pid 4242 on a crashed run", "session": "theirs", "expires": time.time() + 60, **fields}
    remote.fs.pipe_file(remote.at(".torchckpt.lock"), json.dumps(note).encode())


HOLDERS = {  # a lease held by ...: (the note's fields beyond holder/session/expires, taken over at once?)
    "a-dead-pid-here": (lambda here: {**here, "pid": dead_pid()}, True),
    "a-reused-pid-here": (lambda here: {**here, "started": (here["started"] or 0) - 1}, True),  # our pid, earlier
    "a-live-pid-here": (lambda here: here, False),
    "another-host": (lambda here: {**here, "pid": dead_pid(), "host": "elsewhere.example"}, False),
    "another-pid-namespace": (lambda here: {**here, "pid": dead_pid(), "pids": "another-container"}, False),
    "an-older-torchckpt": (lambda here: {}, False),  # no pid fields: cannot be probed
}


@pytest.mark.parametrize(("fields", "taken_at_once"), HOLDERS.values(), ids=HOLDERS.keys())
def test_a_live_lease_is_taken_over_at_once_only_from_a_dead_process_of_this_host(remote, fields, taken_at_once):
    here = this_process(remote)
    extra = fields(here)
    plant_lease(remote, extra)
    if not taken_at_once:
        with pytest.raises(torchckpt.CheckpointError, match="managed by another live process") as info:
            CheckpointManager(torchckpt.Checkpoint(w=torch.zeros(1)), remote.url, storage_options=remote.options)
        assert "pid 4242 on a crashed run" in str(info.value) and "more seconds" in str(info.value)
        fix = "running on this host" if extra == here else "expires on its own"
        assert fix in str(info.value)
        assert json.loads(remote.fs.cat_file(remote.at(".torchckpt.lock")))["session"] == "theirs"  # untouched
        return
    mgr = CheckpointManager(torchckpt.Checkpoint(w=torch.zeros(1)), remote.url, storage_options=remote.options)
    assert json.loads(remote.fs.cat_file(remote.at(".torchckpt.lock")))["session"] != "theirs"
    assert mgr.save() == remote.at("ckpt-1")
    mgr.close()


def test_a_killed_holder_its_parent_has_not_reaped_yet_is_gone(remote):
    here = this_process(remote)
    child = subprocess.Popen([sys.executable, "-c", "pass"])  # exits at once; reaped only at the end
    try:
        deadline = time.monotonic() + 60
        while Path(f"/proc/{child.pid}/stat").read_text().rsplit(")", 1)[1].split()[0] != "Z":  # a zombie
            assert time.monotonic() < deadline, "the child never exited"
            time.sleep(0.05)
        plant_lease(remote, {**here, "pid": child.pid, "started": None})
        mgr = CheckpointManager(torchckpt.Checkpoint(w=torch.zeros(1)), remote.url, storage_options=remote.options)
        assert json.loads(remote.fs.cat_file(remote.at(".torchckpt.lock")))["pid"] == os.getpid()
        mgr.close()
    finally:
        child.wait(timeout=30)


# -- a reader never reads a prefix being written or deleted as a plain safetensors file --------------


def single_shard(tag: str) -> dict[str, bytes]:
    from safetensors.torch import save

    return {f"model-00001-of-00001-{tag}.safetensors": save({"w": torch.ones(3)})}


UNFINISHED = {  # what a prefix holds (besides its shards), how many shards, the error
    "being-written": (".torchckpt-pending-0123456789ab", 1, torchckpt.CheckpointNotFoundError, "being written"),
    "being-written-untagged": (".torchckpt-pending", 1, torchckpt.CheckpointNotFoundError, "being written"),
    "being-deleted": (".torchckpt-deleting", 1, torchckpt.CheckpointDeletedError, "being deleted"),
    "being-deleted-two-shards": (".torchckpt-deleting", 2, torchckpt.CheckpointDeletedError, "being deleted"),
}


@pytest.mark.parametrize(("marker", "shards", "error", "says"), UNFINISHED.values(), ids=UNFINISHED.keys())
def test_a_prefix_being_written_or_deleted_is_no_checkpoint_nor_a_safetensors_file(remote, marker, shards, error,
                                                                                     says):
    path = remote.at("ckpt-5")
    remote.fs.pipe_file(remote.at("ckpt-5", marker), b"{}")
    for n in range(shards):
        for name, data in single_shard(f"{n:012x}").items():
            remote.fs.pipe_file(remote.at("ckpt-5", name), data)
    for read in (lambda: torchckpt.load_checkpoint(path, storage_options=remote.options),
                 lambda: torchckpt.Checkpoint(w=torch.zeros(3)).read(path, storage_options=remote.options)):
        with pytest.raises(error, match=says) as info:
            read()
        assert type(info.value) is error and info.value.path == path
        assert "leaves nothing behind" not in str(info.value)
    assert torchckpt.latest_checkpoint(remote.url, storage_options=remote.options) is None


@pytest.mark.parametrize(("marker", "error", "says"), [
    (".torchckpt-tmp-", torchckpt.CheckpointNotFoundError, "being written"),
    (".torchckpt-old-", torchckpt.CheckpointDeletedError, "being deleted"),
], ids=["temporary", "superseded"])
def test_a_local_temporary_is_no_checkpoint_nor_a_safetensors_file(tmp_path, marker, error, says):
    path = tmp_path / f"ckpt-5{marker}{dead_pid()}-h0badcafe-0123456789ab"
    path.mkdir()
    (path / "model-00001-of-00001.safetensors").write_bytes(next(iter(single_shard("x").values())))
    with pytest.raises(error, match=says) as info:
        torchckpt.load_checkpoint(path)
    assert type(info.value) is error and info.value.path == str(path)
