"""Checkpoints on object stores: every test on ``memory://`` and on moto's S3 server (a real S3 API).

The guarantees are those of a local disk: a reader never sees a partial checkpoint, a crashed save
leaves no visible checkpoint (and the next manager removes its leftovers), retention never leaves
a half-deleted one visible, a second writer is refused or detected, and every byte is checked.
"""

from __future__ import annotations

import errno
import http.server
import json
import os
import re
import subprocess
import sys
import threading
import time

import pytest
import torch

import torchckpt
from torchckpt import CheckpointManager
from torchckpt._format.spec import INDEX_FILE
from torchckpt._storage import lease as storage_lease
from torchckpt._tools.verify import verify
from torchckpt.cli import main

from .conftest import make_mlp, train_step
from .distributed import ROOT
from .doubles import remote_double

JOB = "tests.jobs.remote_writer"  # run as a module from the repository's root: it imports tests.doubles


def trained(seed: int = 0, steps: int = 2):
    model = make_mlp(seed)
    opt = torch.optim.Adam(model.parameters(), lr=0.01)
    for step in range(steps):
        train_step(model, opt, step)
    return model, opt


TAGGED = re.compile(r"model-(\d{5})-of-(\d{5})-[0-9a-f]{12}\.safetensors")  # a shard's name on an object store


def shards_of(remote, *parts: str) -> list[str]:
    """The shard objects directly under ``remote.url/parts``, by name."""
    return [n for n in remote.names(*parts) if n.endswith(".safetensors")]


def assert_same_state(a: torch.nn.Module, b: torch.nn.Module) -> None:
    for (name, x), (_, y) in zip(a.state_dict().items(), b.state_dict().items()):
        assert torch.equal(x, y), name


# -- round trips -------------------------------------------------------------------------------


def test_checkpoint_round_trip_keeps_the_callers_scheme(remote):
    model, opt = trained()
    ckpt = torchckpt.Checkpoint(model=model, opt=opt, epoch=3, note="run", big=torch.randn(300_000))
    path = ckpt.save(remote.at("ckpt"), storage_options=remote.options)
    assert path == remote.at("ckpt-1") and path.startswith(f"{remote.kind}://")
    assert torchckpt.latest_checkpoint(remote.url, storage_options=remote.options) == path
    fresh_model, _ = trained(seed=1, steps=0)
    fresh_opt = torch.optim.Adam(fresh_model.parameters(), lr=0.5)
    back = torchckpt.Checkpoint(model=fresh_model, opt=fresh_opt, epoch=0, note="", big=torch.zeros(300_000))
    status = back.restore(remote.url, storage_options=remote.options).assert_consumed()
    assert status.path == path and back.epoch == 3 and back.note == "run" and torch.equal(back.big, ckpt.big)
    assert_same_state(fresh_model, model)
    assert fresh_opt.state_dict()["param_groups"] == opt.state_dict()["param_groups"]
    train_step(model, opt, 5)
    train_step(fresh_model, fresh_opt, 5)
    assert_same_state(fresh_model, model)  # bit-exact resume: the next step is the same step
    assert ckpt.save_counter == back.save_counter == 1


def test_a_url_is_never_a_local_path(remote, tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)
    torchckpt.Checkpoint(w=torch.ones(2)).write(remote.at("c"), storage_options=remote.options)
    assert os.listdir(tmp_path) == []  # nothing like ./s3:/bucket/... was made
    assert "index.json" in remote.names("c")


def test_manager_retention_resumed_history_and_keep_best(remote):
    ckpt = torchckpt.Checkpoint(w=torch.zeros(3), step=0)
    mgr = CheckpointManager(ckpt, remote.url, max_to_keep=2, keep_best=1, best_metric="loss",
                            storage_options=remote.options)
    for step, loss in enumerate([3.0, 1.0, 2.0, 4.0, 5.0], 1):
        ckpt.w.fill_(step)
        ckpt.step = step
        mgr.save(metrics={"loss": loss})
    names = [p.rsplit("/", 1)[1] for p in mgr.checkpoints]
    assert names == ["ckpt-2", "ckpt-4", "ckpt-5"] and mgr.best_checkpoint == remote.at("ckpt-2")
    assert sorted(n for n in remote.names() if n.startswith("ckpt-")) == ["ckpt-2", "ckpt-4", "ckpt-5"]
    mgr.close()

    again = torchckpt.Checkpoint(w=torch.zeros(3), step=0)
    resumed = CheckpointManager(again, remote.url, max_to_keep=2, storage_options=remote.options)
    assert resumed.checkpoints == mgr.checkpoints and resumed.best_checkpoint == remote.at("ckpt-2")
    assert resumed.restore_or_initialize() == remote.at("ckpt-5")
    assert again.step == 5 and torch.equal(again.w, torch.full((3,), 5.0))
    assert resumed.save() == remote.at("ckpt-6")
    state = torchckpt.get_checkpoint_state(remote.url, storage_options=remote.options)
    assert state.latest == remote.at("ckpt-6") and state.best == remote.at("ckpt-2")
    assert state.metrics[remote.at("ckpt-2")] == {"loss": 1.0}
    resumed.close()


def test_retention_deletes_the_index_before_the_shards(remote):
    ckpt = torchckpt.Checkpoint(w=torch.zeros(3))
    mgr = CheckpointManager(ckpt, remote.url, max_to_keep=1, storage_options=remote.options)
    first = mgr.save()
    shard = shards_of(remote, "ckpt-1")
    before = len(remote.storage.calls)
    mgr.save()
    removed: list = []
    for point, args in remote.storage.calls[before:]:  # the store's own writes and deletions, in order
        if point == "put":
            removed.append(("put", args[0].rsplit("/", 2)[-2:]))
        elif point == "remove_quietly":
            removed.append(("file", args[0].rsplit("/", 2)[-2:]))
        elif point == "remove_names":
            removed.append(("names", args[0].rsplit("/", 1)[-1], sorted(args[1])))
    deletes = [r for r in removed if "ckpt-1" in str(r)]
    assert deletes == [("put", ["ckpt-1", ".torchckpt-deleting"]),  # marked, so that a kill is finished later
                       ("file", ["ckpt-1", "index.json"]),  # un-committed
                       ("names", "ckpt-1", shard),  # the files its index names
                       ("file", ["ckpt-1", ".torchckpt-deleting"])]
    assert not remote.names("ckpt-1") and first not in mgr.checkpoints
    mgr.close()


def test_the_index_is_the_commit_and_is_written_last(remote):
    seen = {}

    def before_commit(sizes: dict[str, int]) -> None:
        seen["names"] = remote.names("ckpt-1")
        seen["latest"] = torchckpt.latest_checkpoint(remote.url, storage_options=remote.options)

    remote.storage.before("stage.commit", before_commit)
    ckpt = torchckpt.Checkpoint(w=torch.ones(4))
    ckpt.write(remote.at("ckpt-1"), max_shard_size=8, storage_options=remote.options)
    assert "index.json" not in seen["names"] and any(n.endswith(".safetensors") for n in seen["names"])
    assert seen["latest"] is None  # shards without an index are no checkpoint
    assert "index.json" in remote.names("ckpt-1") and ".torchckpt-pending" not in remote.names("ckpt-1")


def test_a_second_commit_of_one_number_is_refused(remote):
    path = remote.at("ckpt-1")
    mgr = CheckpointManager(torchckpt.Checkpoint(w=torch.zeros(2)), remote.url, storage_options=remote.options)

    def first_commit(final: str, replace: bool) -> None:  # another writer commits the number the manager took
        assert final == path and not replace  # a numbered save never replaces
        torchckpt.Checkpoint(w=torch.ones(2)).write(path, storage_options=remote.options)

    remote.storage.before("stage", first_commit, times=1)
    with pytest.raises(torchckpt.CheckpointError, match="appeared while it was being written"):
        mgr.save()
    w = torch.zeros(2)
    torchckpt.Checkpoint(w=w).read(path, storage_options=remote.options).assert_consumed()
    assert torch.equal(w, torch.ones(2))  # the committed one is untouched
    mgr.close()


def test_replacing_a_checkpoint_never_mixes_old_and_new_shards(remote):
    path = remote.at("c")
    torchckpt.Checkpoint(a=torch.ones(4), b=torch.ones(4)).write(path, max_shard_size=16,
                                                                storage_options=remote.options)
    old = set(remote.names("c"))
    torchckpt.Checkpoint(a=torch.full((8,), 2.0)).write(path, storage_options=remote.options)
    new = remote.names("c")
    assert len(new) == 2 and new[0] == "index.json" and TAGGED.fullmatch(new[1]) and new[1] not in old
    a = torch.zeros(8)
    torchckpt.Checkpoint(a=a).read(path, storage_options=remote.options).assert_consumed()
    assert torch.equal(a, torch.full((8,), 2.0))


def test_a_write_never_replaces_a_folder_of_other_objects(remote):
    remote.fs.pipe_file(remote.at("data", "part-0.csv"), b"id,label\n")
    with pytest.raises(torchckpt.CheckpointWriteError, match=r"data is a folder of other files \(part-0\.csv\), not a "
                       "checkpoint, so this save did not replace it") as info:
        torchckpt.save_state({"w": torch.ones(2)}, remote.at("data"), storage_options=remote.options)
    assert info.value.errno == errno.EEXIST
    assert remote.names("data") == ["part-0.csv"] and remote.names() == ["data"]


@pytest.mark.parametrize("when", ["before the upload", "during the upload"])
def test_a_file_put_at_the_path_meanwhile_is_never_deleted(remote, when):
    """probe72: a file someone put at the path after the save checked it was deleted, by the
    stage's clearing of an uncommitted prefix (before the upload) or by the discard that followed
    the commit's refusal (during it), though the save said it "did not replace it"."""
    def someone_puts_their_file(*args):
        remote.fs.pipe_file(remote.at("c", "notes.txt"), b"keep")

    remote.storage.before("stage", someone_puts_their_file, times=1) if when == "before the upload" else \
        remote.storage.after("output.finish", someone_puts_their_file, times=1)
    with pytest.raises(torchckpt.CheckpointWriteError, match=r"c is a folder of other files \(notes\.txt\)"):
        torchckpt.save_state({"w": torch.ones(4), "b": torch.ones(4)}, remote.at("c"), max_shard_size=16,
                             storage_options=remote.options)
    assert remote.names("c") == ["notes.txt"] and remote.fs.cat_file(remote.at("c", "notes.txt")) == b"keep"


def test_a_dead_writers_leftovers_are_removed_but_never_a_file_put_beside_them(remote):
    """probe73: the next manager removed every object of a dead writer's prefix, also a file
    someone had put there (which the writer's commit would have refused)."""
    with CheckpointManager(torchckpt.Checkpoint(w=torch.ones(2)), remote.url, storage_options=remote.options) as mgr:
        mgr.save()
    tag = "0123456789ab"  # a writer that died mid-upload of ckpt-2, long ago, outside any manager's lease
    remote.fs.pipe_file(remote.at("ckpt-2", f".torchckpt-pending-{tag}"),
                        json.dumps({"writer": "pid 1 on elsewhere", "time": 0, "session": None, "tag": tag}).encode())
    remote.fs.pipe_file(remote.at("ckpt-2", f"model-00001-of-00001-{tag}.safetensors"), b"part of an upload")
    remote.fs.pipe_file(remote.at("ckpt-2", "notes.txt"), b"keep")
    with CheckpointManager(torchckpt.Checkpoint(w=torch.ones(2)), remote.url, storage_options=remote.options):
        pass
    assert remote.names("ckpt-2") == ["notes.txt"]


def test_consolidate_never_commits_beside_a_file_put_at_its_path(remote, tmp_path):
    from torchckpt._tools.consolidate import consolidate

    from .format2 import write_two_rank

    source = torchckpt.load_checkpoint(write_two_rank(tmp_path / "c"))
    remote.storage.after("output.finish", lambda *args: remote.fs.pipe_file(remote.at("out", "notes.txt"), b"keep"),
                         times=1)
    with pytest.raises(torchckpt.CheckpointError, match="out appeared while it was being written; nothing was replaced"):
        consolidate(source, remote.at("out"), remote.storage)
    assert remote.names("out") == ["notes.txt"]


def test_a_write_replaces_what_an_interrupted_replacement_left(remote):
    """A replacement killed while it deleted the old checkpoint leaves its deleting marker and the
    old shards, without an index: the next write to the path replaces them (it is the package's own)."""
    path = torchckpt.save_state({"w": torch.ones(4)}, remote.at("c"), storage_options=remote.options)
    remote.fs.rm_file(remote.at("c", INDEX_FILE))
    remote.fs.pipe_file(remote.at("c", ".torchckpt-deleting"), b'{"objects": []}')
    torchckpt.save_state({"w": torch.full((4,), 3.0)}, path, storage_options=remote.options)
    assert torch.equal(torchckpt.load_state(path, storage_options=remote.options)["w"], torch.full((4,), 3.0))


def test_a_store_root_is_a_path_like_any_other(remote):
    """``memory://`` (a store's root) used to be an untyped ValueError from its parent's name, and a
    write there replaced everything in the store."""
    if remote.kind != "memory":
        pytest.skip("the moto server's root lists every test's bucket")
    remote.fs.pipe_file(remote.at("keep.txt"), b"mine")
    for root in ("memory://", "memory:///"):
        with pytest.raises(torchckpt.CheckpointWriteError, match=f"{root} is a folder of other files"):
            torchckpt.save_state({"w": torch.ones(2)}, root)
        with pytest.raises(torchckpt.CheckpointNotFoundError, match=f"No committed checkpoint in {root}"):
            torchckpt.load_state(root)
        assert torchckpt.latest_checkpoint(root) is None
    assert remote.fs.cat_file(remote.at("keep.txt")) == b"mine"


# -- integrity -------------------------------------------------------------------------------------


def test_a_flipped_byte_in_a_shard_object_fails_verify_and_restore(remote):
    path = torchckpt.Checkpoint(w=torch.arange(1000.0)).write(remote.at("c"), storage_options=remote.options)
    shard = f"{path}/{shards_of(remote, 'c')[0]}"
    data = bytearray(remote.fs.cat_file(shard))
    data[-10] ^= 0x01
    remote.fs.pipe_file(shard, bytes(data))
    reader = torchckpt.load_checkpoint(path, storage_options=remote.options)
    problems = verify(reader)
    assert len(problems) == 2 and "fails its checksum" in problems[0] and "shard checksum" in problems[1]
    with pytest.raises(torchckpt.CorruptCheckpointError, match="fails its checksum") as info:
        torchckpt.Checkpoint(w=torch.zeros(1000)).read(path, storage_options=remote.options)
    assert info.value.path == shard
    with pytest.raises(torchckpt.CorruptCheckpointError, match="fails its checksum"):
        reader.get_tensor("w")


def test_a_shard_lost_after_its_upload_is_never_committed(remote):
    remote.storage.before("stage.commit", lambda sizes: remote.fs.rm_file(remote.at("c", next(iter(sizes)))))
    with pytest.raises(torchckpt.CheckpointWriteError, match="is not on the store after its upload") as info:
        torchckpt.Checkpoint(w=torch.ones(2)).write(remote.at("c"), storage_options=remote.options)
    assert info.value.path == remote.at("c") and remote.names("c") == []


def test_a_large_shard_goes_up_in_parts_and_comes_back_in_ranges(remote):
    remote.install(part_bytes=5 * 2**20, read_part_min=2**20, read_part_max=2**20)  # S3's smallest part
    big = torch.randn(4 * 2**20)  # 16 MiB: four parts, sixteen ranged reads
    path = torchckpt.Checkpoint(big=big, small=torch.arange(5)).write(remote.at("c"), storage_options=remote.options)
    back = torchckpt.Checkpoint(big=torch.zeros_like(big), small=torch.zeros(5, dtype=torch.int64))
    back.read(path, storage_options=remote.options).assert_consumed()
    assert torch.equal(back.big, big) and torch.equal(back.small, torch.arange(5))


def test_a_shard_that_would_need_more_parts_than_s3_takes_goes_up_in_larger_ones(remote):
    remote.install(part_bytes=5 * 2**20, max_parts=2)  # S3 takes 10,000 parts: 16 MiB parts stop at 156 GiB
    big = torch.randn(4 * 2**20)  # 16 MiB: two parts of 9 MiB, not four of 5 MiB
    path = torchckpt.Checkpoint(big=big).write(remote.at("c"), storage_options=remote.options)
    back = torchckpt.Checkpoint(big=torch.zeros_like(big))
    back.read(path, storage_options=remote.options).assert_consumed()
    assert torch.equal(back.big, big)
    if remote.kind == "s3":  # a multipart object's ETag ends with its number of parts
        shard = next(n for n in remote.names("c") if n.endswith(".safetensors"))
        assert remote.fs.info(remote.at("c", shard))["ETag"].strip('"').endswith("-2")


def test_no_credentials_or_no_endpoint_is_a_typed_error_that_says_what_to_set(monkeypatch, capsys):
    pytest.importorskip("s3fs")
    import socket

    for name in [k for k in os.environ if k.startswith("AWS_")]:
        monkeypatch.delenv(name)
    monkeypatch.setenv("AWS_EC2_METADATA_DISABLED", "true")  # no instance metadata to ask either
    monkeypatch.setenv("AWS_SHARED_CREDENTIALS_FILE", os.devnull)
    monkeypatch.setenv("AWS_CONFIG_FILE", os.devnull)
    with socket.socket() as s:  # a port nothing listens on
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    endpoint = {"client_kwargs": {"endpoint_url": f"http://127.0.0.1:{port}"}}
    with pytest.raises(torchckpt.CheckpointReadError, match=r"^No usable S3 credentials .* Set AWS_ACCESS_KEY_ID") as info:
        torchckpt.load_state("s3://bucket/run", storage_options=endpoint)
    assert info.value.errno == errno.EACCES  # the process's cause, not a missing or damaged checkpoint
    assert main(["ls", "s3://bucket/run", "--storage-options", json.dumps(endpoint)]) == 1
    assert capsys.readouterr().err.startswith("Error: No usable S3 credentials")
    unreachable = {**endpoint, "key": "k", "secret": "s", "config_kwargs": {"retries": {"max_attempts": 1}}}
    with pytest.raises(torchckpt.CheckpointReadError, match=r"^Cannot reach the object store .* Check the endpoint"):
        torchckpt.latest_checkpoint("s3://bucket/run", storage_options=unreachable)
    with pytest.raises(torchckpt.CheckpointWriteError, match=r"Cannot write checkpoint s3://bucket/c: Cannot reach"):
        torchckpt.Checkpoint(w=torch.ones(1)).write("s3://bucket/c", storage_options=unreachable)
    with pytest.raises(torchckpt.CheckpointReadError, match=r"^No usable S3 credentials"):  # its claim's upload too
        torchckpt.CheckpointManager(torchckpt.Checkpoint(w=torch.ones(1)), "s3://bucket/run", storage_options=endpoint)


class DenyingS3(http.server.BaseHTTPRequestHandler):
    """An S3 endpoint that answers every request 403, as for wrong credentials or a policy."""

    def _answer(self) -> None:
        self.close_connection = True  # a body the client sends is never read: each request on its own connection
        body = b"<Error><Code>AccessDenied</Code><Message>Access Denied</Message></Error>"
        self.send_response(403)
        self.send_header("Content-Length", str(0 if self.command == "HEAD" else len(body)))
        self.end_headers()
        if self.command != "HEAD":
            self.wfile.write(body)

    do_GET = do_HEAD = do_PUT = do_POST = do_DELETE = _answer

    def log_message(self, *args: object) -> None:
        pass


@pytest.fixture
def denying_s3(monkeypatch):
    """``storage_options`` for a :class:`DenyingS3` on a free port, stopped afterwards."""
    pytest.importorskip("s3fs")
    for name, value in {"AWS_ACCESS_KEY_ID": "k", "AWS_SECRET_ACCESS_KEY": "s", "AWS_EC2_METADATA_DISABLED": "true",
                        "AWS_DEFAULT_REGION": "us-east-1"}.items():
        monkeypatch.setenv(name, value)
    server = http.server.ThreadingHTTPServer(("127.0.0.1", 0), DenyingS3)
    thread = threading.Thread(target=server.serve_forever, daemon=True)
    thread.start()
    try:
        yield {"client_kwargs": {"endpoint_url": f"http://127.0.0.1:{server.server_address[1]}"},
               "config_kwargs": {"retries": {"max_attempts": 1}}, "skip_instance_cache": True}
    finally:
        server.shutdown()
        server.server_close()
        thread.join(timeout=10)


def test_a_store_that_refuses_access_is_never_taken_for_no_checkpoint(denying_s3):
    # wrong credentials (403): a caller that starts afresh on CheckpointNotFoundError must not
    options = denying_s3
    message = r"^The object store refused access to s3://bucket/run.*: the credentials in use may not read or write it"
    for attempt in (lambda: torchckpt.latest_checkpoint("s3://bucket/run", storage_options=options),
                    lambda: torchckpt.Checkpoint(w=torch.zeros(1)).restore("s3://bucket/run", storage_options=options),
                    lambda: torchckpt.load_checkpoint("s3://bucket/run/ckpt-1", storage_options=options),
                    lambda: torchckpt.CheckpointManager(torchckpt.Checkpoint(w=torch.zeros(1)), "s3://bucket/run",
                                                        storage_options=options)):
        with pytest.raises(torchckpt.CheckpointReadError, match=message) as info:
            attempt()
        assert info.value.errno == errno.EACCES and not isinstance(info.value, torchckpt.CheckpointNotFoundError)


def _sdk_error(module: str, names: list[str], *args: object) -> Exception:
    """An error of a cloud SDK that is not installed here: classes of its names (the first derived
    from the next), in its module, as torchckpt recognises them."""
    base: type = Exception
    for name in reversed(names):
        base = type(name, (base,), {"__module__": module})
    return base(*args)


def _gcsfs_http_error(code: int) -> Exception:
    error = _sdk_error("gcsfs.retry", ["HttpError"], f"Service Unavailable, {code}")
    error.code = code  # type: ignore[attr-defined]
    return error


def _aiohttp_lost() -> Exception:
    import aiohttp

    return aiohttp.ServerDisconnectedError()


_CLOUD_ERRORS = {
    "gcs-no-credentials": (lambda: _sdk_error("google.auth.exceptions", ["DefaultCredentialsError", "GoogleAuthError"],
                                              "Your default credentials were not found."),
                           r"^No usable Google Cloud credentials .*GOOGLE_APPLICATION_CREDENTIALS", errno.EACCES),
    "gcs-forbidden": (lambda: OSError("Forbidden: https://storage.googleapis.com/b/bucket/o/run\nAccess denied."),
                      r"^The object store refused access to .*\(Forbidden: .*\): the credentials in use", errno.EACCES),
    "gcs-401": (lambda: _gcsfs_http_error(401), r"^The object store refused access", errno.EACCES),
    "gcs-503": (lambda: _gcsfs_http_error(503), r"^The object store failed the request .*HTTP 503.*nothing here is "
                                                r"damaged", errno.EIO),
    "azure-auth": (lambda: _sdk_error("azure.core.exceptions", ["ClientAuthenticationError", "HttpResponseError",
                                                                "AzureError"], "Server failed to authenticate"),
                   r"^The object store refused access .*AZURE_STORAGE_CONNECTION_STRING", errno.EACCES),
    "azure-unreachable": (lambda: _sdk_error("azure.core.exceptions", ["ServiceRequestError", "AzureError"],
                                             "Failed to establish a new connection"),
                          r"^Cannot reach the object store \(Failed to establish", errno.ECONNREFUSED),
    "aiohttp-disconnected": (_aiohttp_lost, r"^Cannot reach the object store", errno.ECONNREFUSED),
}


@pytest.mark.parametrize("case", list(_CLOUD_ERRORS))
def test_google_and_azure_sdk_errors_are_typed_and_never_taken_for_no_checkpoint(monkeypatch, case):
    """gcsfs raises a 403 as a plain OSError, which the storage's existence checks took for "no such
    object" (a restore_or_initialize would start afresh); its other errors, google-auth's and
    azure-core's, came out untyped."""
    pytest.importorskip("fsspec")
    from fsspec.implementations.memory import MemoryFileSystem

    make, message, code = _CLOUD_ERRORS[case]

    class FailingStore(MemoryFileSystem):
        protocol = ("gs", "gcs")
        store: dict = {}
        pseudo_dirs = [""]

        def info(self, path, **kwargs):
            raise make()

        def ls(self, path, detail=True, **kwargs):
            raise make()

    registry = sys.modules["fsspec.registry"]  # the module (fsspec.registry is its read-only view)
    monkeypatch.setitem(registry._registry, "gs", FailingStore)  # undone when the test ends
    for attempt in (lambda: torchckpt.latest_checkpoint("gs://bucket/run"),
                    lambda: torchckpt.Checkpoint(w=torch.zeros(1)).restore("gs://bucket/run"),
                    lambda: torchckpt.load_checkpoint("gs://bucket/run/ckpt-1"),
                    lambda: CheckpointManager(torchckpt.Checkpoint(w=torch.zeros(1)), "gs://bucket/run")):
        with pytest.raises(torchckpt.CheckpointReadError, match=message) as info:
            attempt()
        assert info.value.errno == code and not isinstance(info.value, torchckpt.CheckpointNotFoundError)


def test_a_connection_lost_while_a_file_object_uploads_is_a_typed_write_error():
    # small objects (the index, a claim) go up through the filesystem's own file objects: their
    # close() raises the SDK's error, which must come out typed like the filesystem's own calls
    botocore = pytest.importorskip("botocore.exceptions")
    fsspec = pytest.importorskip("fsspec")
    from fsspec.implementations.memory import MemoryFile, MemoryFileSystem

    class DroppedFile(MemoryFile):
        def close(self) -> None:
            raise botocore.ConnectionClosedError(endpoint_url=f"http://127.0.0.1/{self.path}")

    class DroppingFileSystem(MemoryFileSystem):
        protocol = "droptest"
        store: dict = {}
        pseudo_dirs = [""]

        def _open(self, path, mode="rb", **kwargs):
            if "b" in mode and mode[0] in "wx":
                return DroppedFile(self, path)
            return super()._open(path, mode, **kwargs)

    fsspec.register_implementation("droptest", DroppingFileSystem, clobber=True)
    with pytest.raises(torchckpt.CheckpointWriteError, match=r"^Cannot write checkpoint droptest://run/c: Cannot reach "
                                                              r"the object store .*Check the endpoint"):
        torchckpt.Checkpoint(w=torch.ones(1)).write("droptest://run/c")
    with pytest.raises(torchckpt.CheckpointWriteError, match=r"Cannot reach the object store"):
        torchckpt.CheckpointManager(torchckpt.Checkpoint(w=torch.ones(1)), "droptest://run/m")


# -- two writers ----------------------------------------------------------------------------------


def holder(remote, seconds: float) -> subprocess.Popen[str]:
    """Another process holding a manager on ``remote.url`` for ``seconds``."""
    proc = subprocess.Popen([sys.executable, "-m", JOB, "hold", remote.url, json.dumps(remote.options), str(seconds)],
                            stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True, env={**os.environ}, cwd=ROOT)
    assert proc.stdout is not None and proc.stdout.readline().strip() == "HOLDING", proc.stderr.read()
    return proc


def test_a_second_process_is_refused_while_the_lease_lives(remote):
    if remote.kind == "memory":
        pytest.skip("memory:// belongs to one process")
    proc = holder(remote, 30)
    try:
        with pytest.raises(torchckpt.CheckpointError, match="managed by another live process") as info:
            CheckpointManager(torchckpt.Checkpoint(w=torch.zeros(1)), remote.url, storage_options=remote.options)
        assert f"pid {proc.pid}" in str(info.value)
    finally:
        proc.kill()
        proc.wait(timeout=30)


def test_a_clean_exit_releases_the_lease_for_the_next_run(remote):
    if remote.kind == "memory":
        pytest.skip("memory:// belongs to one process")
    proc = holder(remote, 0)  # exits at once, without closing its manager
    assert proc.wait(timeout=60) == 0
    mgr = CheckpointManager(torchckpt.Checkpoint(w=torch.zeros(1)), remote.url, storage_options=remote.options)
    assert mgr.save() == remote.at("ckpt-1")  # no wait for the lease to expire
    mgr.close()
    assert storage_lease.LEASE_FILE not in remote.names()


def test_a_manager_that_lost_its_lease_is_stopped_at_its_next_save(remote):
    remote.install(lease_secs=0.6)  # renewed every 0.2 s
    mgr = CheckpointManager(torchckpt.Checkpoint(w=torch.zeros(1)), remote.url, storage_options=remote.options)
    mgr.save()
    thief = {"holder": "pid 1 on elsewhere", "session": "other", "expires": time.time() + 3600}
    remote.fs.pipe_file(remote.at(storage_lease.LEASE_FILE), json.dumps(thief).encode())  # another process took it over
    time.sleep(1.0)
    with pytest.raises(torchckpt.CheckpointError, match="lost its claim"):
        mgr.save()
    assert [n for n in remote.names() if n.startswith("ckpt-")] == ["ckpt-1"]


@pytest.mark.parametrize("removed", [True, False], ids=["its-upload-removed", "its-upload-left"])
def test_a_writer_paused_past_its_lease_while_committing_takes_its_index_back(remote, removed):
    # paused between its commit's checks and the index's creation; meanwhile the next job took the
    # lease over (and removed the upload as a crashed writer's leftovers): it must not commit, nor delete
    storage = remote.install(lease_secs=0.6)
    mgr = CheckpointManager(torchckpt.Checkpoint(w=torch.ones(2)), remote.url, max_to_keep=1,
                            storage_options=remote.options)
    mgr.save()

    def taken_over(path, data):
        if not path.endswith("ckpt-2/" + INDEX_FILE):
            return
        thief = {"holder": "pid 1 on elsewhere", "session": "other", "expires": time.time() + 3600}
        remote.fs.pipe_file(remote.at(storage_lease.LEASE_FILE), json.dumps(thief).encode())
        if removed:
            remote.fs.rm([remote.at("ckpt-2", n) for n in remote.names("ckpt-2") if n.endswith(".safetensors")])
        time.sleep(1.0)  # past the lease's term

    storage.before("create_new", taken_over)
    with pytest.raises(torchckpt.CheckpointWriteError, match=r"Cannot commit .*ckpt-2: this writer was paused past "
                                                             r"its lease while committing.*nothing was committed") as info:
        mgr.save()
    assert info.value.path == remote.at("ckpt-2")
    assert [n for n in remote.names() if n.startswith("ckpt-")] == ["ckpt-1"]  # retention deleted nothing
    assert torchckpt.latest_checkpoint(remote.url, storage_options=remote.options) == remote.at("ckpt-1")
    w = torch.zeros(2)
    torchckpt.Checkpoint(w=w).read(remote.at("ckpt-1"), storage_options=remote.options).assert_consumed()
    assert torch.equal(w, torch.ones(2))


def test_a_listing_that_fails_after_the_index_is_created_leaves_the_commit_standing(remote):
    # the check after the commit cannot tell (a 503): the checkpoint it committed stays whole
    storage = remote.install()
    mgr = CheckpointManager(torchckpt.Checkpoint(w=torch.ones(2)), remote.url, max_to_keep=1,
                            storage_options=remote.options)
    mgr.save()
    storage.fail("sizes", OSError(5, "Service Unavailable"), skip=1, times=1)  # the second listing of the commit
    listed = len(storage.called("sizes"))
    assert mgr.save() == remote.at("ckpt-2")
    assert len(storage.called("sizes")) == listed + 2  # the check before the index, and the failed one after it
    w = torch.zeros(2)
    torchckpt.Checkpoint(w=w).read(remote.at("ckpt-2"), storage_options=remote.options).assert_consumed()
    assert torch.equal(w, torch.ones(2)) and [n for n in remote.names() if n.startswith("ckpt-")] == ["ckpt-2"]
    mgr.close()


def test_a_store_that_cannot_answer_once_never_costs_the_best_checkpoint(remote):
    """probe61: a failed read of the best's index (a store that did not answer) recorded it damaged,
    and retention deleted it in the same save."""
    options = dict(max_to_keep=1, keep_best=1, best_metric="loss", storage_options=remote.options)
    with CheckpointManager(torchckpt.Checkpoint(w=torch.ones(1)), remote.url, **options) as mgr:
        for loss in (0.1, 0.5, 0.6):
            mgr.save(metrics={"loss": loss})
    storage = remote.install()
    failed = []

    def unavailable(path: str, *args: object) -> None:
        if path.endswith("ckpt-1/" + INDEX_FILE) and not failed:
            failed.append(path)
            raise OSError(errno.EIO, "Service Unavailable")

    storage.before("read_file", unavailable)
    with CheckpointManager(torchckpt.Checkpoint(w=torch.ones(1)), remote.url, **options) as mgr:
        mgr.save(metrics={"loss": 0.7})
        assert failed and mgr.best_checkpoint == remote.at("ckpt-1")
        assert [os.path.basename(p) for p in mgr.checkpoints] == ["ckpt-1", "ckpt-4"]
    assert remote.fs.exists(remote.at("ckpt-1", INDEX_FILE))


def test_an_interrupt_in_an_upload_to_a_file_url_stays_an_interrupt(tmp_path, install):
    """Before, fsspec's local file refused to discard the object being written (it commits as it
    writes), and that refusal replaced the KeyboardInterrupt: Ctrl-C became a CheckpointError."""
    url = f"file://{tmp_path}/run"
    storage = install(url, remote_double(url, {"auto_mkdir": True}, warned=set()))

    def interrupt(*args: object) -> None:
        raise KeyboardInterrupt

    storage.before("output.finish", interrupt, times=1)
    with pytest.raises(KeyboardInterrupt):
        torchckpt.Checkpoint(w=torch.ones(4)).write(f"{url}/c")
    assert torchckpt.latest_checkpoint(url) is None and not os.path.exists(tmp_path / "run" / "c" / INDEX_FILE)
    assert torchckpt.Checkpoint(w=torch.ones(4)).write(f"{url}/c") == f"{url}/c"


@pytest.mark.parametrize("age", [10.0, 7200.0, -86400.0], ids=["in-flight", "crashed-long-ago", "from-the-future"])
def test_a_follower_is_not_sent_back_by_a_replacement_in_flight_or_crashed(remote, age):
    """ckpt-2, which the follower had, is the latest the state file records: ckpt-1 is older, not
    new, whether the replacement is in flight or crashed (before probe58 R5, a crashed one sent the
    follower back to ckpt-1). The run's next checkpoint is new (below)."""
    mgr = CheckpointManager(torchckpt.Checkpoint(w=torch.ones(1)), remote.url, max_to_keep=None,
                            storage_options=remote.options)
    mgr.save(), mgr.save()
    mgr.close()
    remote.fs.rm(remote.at("ckpt-2", INDEX_FILE))  # its replacement's upload: a marker, no index
    marker = {"writer": "pid 1 on elsewhere", "time": time.time() - age, "session": "other", "tag": "0" * 12}
    remote.fs.pipe_file(remote.at("ckpt-2", ".torchckpt-pending-" + "0" * 12), json.dumps(marker).encode())
    found = torchckpt.wait_for_new_checkpoint(remote.url, remote.at("ckpt-2"), seconds_to_sleep=0.05, timeout=0.3,
                                              storage_options=remote.options)
    assert found is None
    with pytest.warns(UserWarning, match="names ckpt-2 as the latest checkpoint, but it is not a committed"):
        mgr = CheckpointManager(torchckpt.Checkpoint(w=torch.ones(1)), remote.url, max_to_keep=None,
                                storage_options=remote.options)
    if not 0 <= age < 3600:  # a crashed replacement: the next manager takes the one before it, and numbers on
        assert mgr.latest_checkpoint == remote.at("ckpt-1") and mgr.save() == remote.at("ckpt-3")
        assert torchckpt.wait_for_new_checkpoint(remote.url, remote.at("ckpt-2"), timeout=0,
                                                 storage_options=remote.options) == remote.at("ckpt-3")
    mgr.close()


def test_a_follower_is_not_sent_back_to_an_older_checkpoint_while_its_last_is_replaced(remote):
    # between the old index's deletion and the new one's creation, ckpt-2 is the latest for a moment
    storage = remote.install()
    mgr = CheckpointManager(torchckpt.Checkpoint(w=torch.ones(1)), remote.url, max_to_keep=None,
                            storage_options=remote.options)
    mgr.save(), mgr.save(), mgr.save()
    seen = []

    def follower_looks(path, data):
        if path.endswith("ckpt-3/" + INDEX_FILE):
            assert torchckpt.latest_checkpoint(remote.url, storage_options=remote.options) == remote.at("ckpt-2")
            seen.append(torchckpt.wait_for_new_checkpoint(remote.url, remote.at("ckpt-3"), seconds_to_sleep=0.05,
                                                          timeout=0.2, storage_options=remote.options))

    storage.before("create_new", follower_looks)
    mgr.save(checkpoint_number=3)
    assert seen == [None]  # it waited for the replacement, not for ckpt-2
    nxt = torchckpt.wait_for_new_checkpoint(remote.url, remote.at("ckpt-2"), timeout=5, storage_options=remote.options)
    assert nxt == remote.at("ckpt-3")  # an older last: what is newer is handed over as before
    mgr.close()


def test_a_state_file_replaced_by_another_writer_is_detected_not_overwritten(remote):
    ckpt = torchckpt.Checkpoint(w=torch.zeros(1))
    mgr = CheckpointManager(ckpt, remote.url, max_to_keep=1, storage_options=remote.options)
    mgr.save()
    torchckpt.Checkpoint(w=torch.ones(1)).save(remote.at("other"), storage_options=remote.options)  # its state write
    with pytest.raises(torchckpt.CheckpointError, match="replaced by another writer") as info:
        mgr.save()
    # probe84 F3: it did not say that this save's checkpoint is committed (a retry would think nothing was saved)
    assert str(info.value).startswith(f"Checkpoint {remote.at('ckpt-2')} is committed, but ")
    assert "it does not name that checkpoint yet" in str(info.value)
    state = torchckpt.get_checkpoint_state(remote.url, storage_options=remote.options)
    assert state.latest == remote.at("other-1")  # the other writer's history was not overwritten
    assert "ckpt-1" in remote.names()  # and nothing was deleted
    mgr.close()


def test_a_commit_the_state_file_never_recorded_is_adopted_by_the_next_manager_on_an_object_store(remote):
    """As on a disk (``test_manager``): the state file put back as before the last two saves, as
    after a crash between commit and state write; the next manager adopts the newest."""
    mgr = CheckpointManager(torchckpt.Checkpoint(w=torch.zeros(1)), remote.url, max_to_keep=None,
                            storage_options=remote.options)
    first = mgr.save()
    lagging = remote.fs.cat_file(remote.at("checkpoints.json"))
    mgr.save()
    last = mgr.save()
    mgr.close()
    remote.fs.pipe_file(remote.at("checkpoints.json"), lagging)
    remote.fs.pipe_file(remote.at("ckpt-9", "notes.txt"), b"not a checkpoint")  # no index.json: never the latest
    assert torchckpt.latest_checkpoint(remote.url, storage_options=remote.options) == first
    again = CheckpointManager(torchckpt.Checkpoint(w=torch.zeros(1)), remote.url, storage_options=remote.options)
    assert again.latest_checkpoint == last
    again.close()


# -- crashes ---------------------------------------------------------------------------------------


def test_a_writer_killed_mid_upload_leaves_the_last_checkpoint_and_the_next_manager_cleans_up(remote):
    if remote.kind == "memory":
        pytest.skip("memory:// belongs to one process; see the in-process crash test")
    proc = subprocess.Popen([sys.executable, "-m", JOB, "crash", remote.url, json.dumps(remote.options), "2"],
                            stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True, env={**os.environ}, cwd=ROOT)
    try:
        assert proc.stdout is not None
        lines = [proc.stdout.readline().strip() for _ in range(2)]
        assert lines == ["SAVED", "UPLOADING"], proc.stderr.read() if proc.poll() is not None else lines
        proc.kill()  # SIGKILL in the middle of the second save's 64 MB upload
    finally:
        proc.wait(timeout=30)
    assert torchckpt.latest_checkpoint(remote.url, storage_options=remote.options) == remote.at("ckpt-1")
    assert "index.json" not in remote.names("ckpt-2") and remote.names("ckpt-2")  # shards, no index
    check_after_crash(remote, lease_secs=2)


def test_a_save_that_dies_in_process_leaves_no_visible_checkpoint(remote):
    storage = remote.install(lease_secs=2.0)
    ckpt = job_checkpoint(0)
    mgr = CheckpointManager(ckpt, remote.url, storage_options=remote.options)
    mgr.save()
    storage.instead("stage.discard", lambda: None)  # a dead process cleans nothing up
    storage.fail("stage.commit", KeyboardInterrupt())
    ckpt.tensors["a"].add_(1)
    with pytest.raises(KeyboardInterrupt):
        mgr.save()
    storage.heal()
    storage.instead("remove_quietly", lambda path: None, times=1)  # the process "dies": its lease stays there,
    storage.release(remote.url)  # no longer renewed, and forgotten here
    check_after_crash(remote, lease_secs=2)


@pytest.mark.parametrize("failure", ["upload", "commit"])
def test_a_save_replacing_a_number_that_fails_keeps_the_checkpoint_it_was_replacing(remote, failure):
    """An object store has no rename: the replaced checkpoint stays whole until the new one's objects
    are all uploaded (it was deleted when the save began, so any failure or kill during the upload
    lost it, and a resume started over)."""
    storage = remote.install()
    ckpt = torchckpt.Checkpoint(w=torch.ones(4), step=1)
    manager = CheckpointManager(ckpt, remote.url, storage_options=remote.options, max_to_keep=1)
    manager.save()
    ckpt.step, ckpt.w = 2, torch.full((4,), 2.0)
    second = manager.save()
    ckpt.step, ckpt.w = 3, torch.full((4,), 3.0)
    if failure == "upload":
        storage.fail("stage.create", OSError(errno.ECONNRESET, "Connection reset by peer"))
    else:
        storage.fail("stage.commit", RuntimeError("killed"))
    with pytest.raises((torchckpt.CheckpointWriteError, RuntimeError)):
        manager.save(checkpoint_number=2)
    storage.heal()
    manager.close()
    assert torchckpt.latest_checkpoint(remote.url, storage_options=remote.options) == second
    back = torchckpt.Checkpoint(w=torch.zeros(4), step=0)
    resumed = CheckpointManager(back, remote.url, storage_options=remote.options, max_to_keep=1)
    assert resumed.restore_or_initialize() == second
    assert back.step == 2 and torch.equal(back.w, torch.full((4,), 2.0))
    resumed.close()


def test_a_replacement_leaves_only_the_new_checkpoints_objects(remote):
    manager = CheckpointManager(torchckpt.Checkpoint(w=torch.ones(4)), remote.url, storage_options=remote.options)
    manager.save()
    remote.fs.pipe(remote.at("ckpt-1", "model-00001-of-00001.safetensors"), b"a crashed writer's")  # a stray
    manager.save(checkpoint_number=1)
    manager.close()
    names = remote.names("ckpt-1")
    assert "model-00001-of-00001.safetensors" not in names and "index.json" in names
    index = json.loads(remote.fs.cat(remote.at("ckpt-1", "index.json")))
    assert sorted(n for n in names if n != "index.json") == sorted({s["file"] for s in index["torchckpt"]["shards"]})


def job_checkpoint(shift: int) -> torchckpt.Checkpoint:
    """The job's state: 64 MB in two tensors plus a step (tests/jobs/remote_writer.py builds the same)."""
    g = torch.Generator().manual_seed(7)
    return torchckpt.Checkpoint(tensors={"a": torch.randn(8 * 2**20, generator=g) + shift,
                                         "b": torch.randn(8 * 2**20, generator=g)}, step=1)


def check_after_crash(remote, lease_secs: float) -> None:
    """The committed checkpoint restores exactly; the next manager waits out the dead writer's lease,
    removes its leftovers, and saves."""
    back = torchckpt.Checkpoint(tensors={"a": torch.zeros(8 * 2**20), "b": torch.zeros(8 * 2**20)}, step=0)
    back.restore(remote.url, storage_options=remote.options).assert_consumed()
    expected = job_checkpoint(0)
    assert back.step == 1 and torch.equal(back.tensors["a"], expected.tensors["a"])
    assert torch.equal(back.tensors["b"], expected.tensors["b"])
    deadline = time.time() + lease_secs + 10
    while True:
        try:
            mgr = CheckpointManager(back, remote.url, storage_options=remote.options)
            break
        except torchckpt.CheckpointError as e:  # the dead writer's lease, until it expires
            assert "managed by another live process" in str(e)
            assert time.time() < deadline, "the dead writer's lease never expired"
            time.sleep(0.5)
    assert remote.names("ckpt-2") == []  # the leftover is gone
    assert mgr.save() == remote.at("ckpt-2")
    again = torchckpt.Checkpoint(tensors={"a": torch.zeros(8 * 2**20), "b": torch.zeros(8 * 2**20)}, step=0)
    again.restore(remote.url, storage_options=remote.options).assert_consumed()
    mgr.close()


# -- a reader following a writer ------------------------------------------------------------------


def test_a_reader_following_a_writer_never_sees_a_partial_or_half_deleted_checkpoint(remote):
    ckpt = torchckpt.Checkpoint(w=torch.zeros(50_000), step=0)
    mgr = CheckpointManager(ckpt, remote.url, max_to_keep=1, storage_options=remote.options)
    mgr.save()
    done = threading.Event()
    seen: list[tuple[str, int]] = []
    errors: list[BaseException] = []

    def follow() -> None:
        try:
            for path in torchckpt.checkpoints_iterator(remote.url, timeout=5, timeout_fn=done.is_set,
                                                       poll_interval_secs=0.01, storage_options=remote.options):
                probe = torchckpt.Checkpoint(w=torch.zeros(50_000), step=-1)
                try:
                    probe.read(path, storage_options=remote.options).assert_consumed()
                except (torchckpt.CheckpointDeletedError, torchckpt.CheckpointNotFoundError):
                    continue  # retention deleted it after it was seen: never a corrupt or partial one
                assert torch.equal(probe.w, torch.full((50_000,), float(probe.step)))
                seen.append((path, probe.step))
                if done.is_set():
                    return
        except BaseException as e:  # noqa: BLE001 - reported by the test's thread
            errors.append(e)

    reader = threading.Thread(target=follow)
    reader.start()
    for step in range(1, 9):
        ckpt.step = step
        ckpt.w.fill_(step)
        mgr.save()
    done.set()
    reader.join(timeout=60)
    assert not reader.is_alive() and not errors, errors
    assert seen and all(path.endswith(f"ckpt-{step + 1}") for path, step in seen)
    mgr.close()


# -- the command line -------------------------------------------------------------------------------


def test_the_cli_commands_work_on_urls(remote, tmp_path, capsys):
    ckpt = torchckpt.Checkpoint(model=make_mlp(), epoch=1)
    mgr = CheckpointManager(ckpt, remote.url, storage_options=remote.options)
    first = mgr.save(metrics={"loss": 0.5})
    ckpt.epoch = 2
    second = mgr.save(metrics={"loss": 0.25})
    mgr.close()
    options = ["--storage-options", json.dumps(remote.options)] if remote.options else []
    capsys.readouterr()
    assert main(["inspect", remote.url, *options]) == 0
    out = capsys.readouterr().out
    assert f"checkpoint: {second}" in out and "model/0.weight" in out
    assert main(["ls", remote.url, "--json", *options]) == 0
    listed = json.loads(capsys.readouterr().out)
    assert [c["name"] for c in listed["checkpoints"]] == ["ckpt-1", "ckpt-2"]
    assert listed["checkpoints"][1]["marks"] == ["latest", "kept", "best"]
    assert main(["diff", first, second, "--values", "--exit-code", *options]) == 1
    assert "~ epoch  1 -> 2" in capsys.readouterr().out
    assert main(["verify", second, *options]) == 0
    assert capsys.readouterr().out.startswith(f"OK: {second}")
    assert main(["export", second, "--object", "model", str(tmp_path / "hf"), *options]) == 0
    from safetensors.torch import load_file

    exported = load_file(tmp_path / "hf" / "model.safetensors")
    assert torch.equal(exported["0.weight"], ckpt.model.state_dict()["0.weight"])
    assert main(["export", second, "--object", "model", remote.at("hf"), *options]) == 0
    assert remote.names("hf") == ["model.safetensors"]
    capsys.readouterr()
    assert main(["inspect", remote.at("hf"), *options]) == 0
    assert "0.weight" in capsys.readouterr().out


def test_the_cli_takes_the_s3_endpoint_from_the_environment(remote, monkeypatch, capsys):
    if remote.kind == "memory":
        pytest.skip("an S3 setting")
    path = torchckpt.Checkpoint(w=torch.ones(3)).write(remote.at("c"), storage_options=remote.options)
    monkeypatch.setenv("AWS_ENDPOINT_URL", remote.options["client_kwargs"]["endpoint_url"])
    import fsspec

    fsspec.filesystem("s3").clear_instance_cache()
    assert main(["verify", path]) == 0, capsys.readouterr().err
    assert capsys.readouterr().out.startswith(f"OK: {path}")


def test_errors_on_urls_are_one_line_and_say_what_to_do(remote, capsys):
    options = ["--storage-options", json.dumps(remote.options)] if remote.options else []
    assert main(["inspect", remote.at("nothing"), *options]) == 1
    err = capsys.readouterr().err
    assert err.startswith(f"Error: No checkpoint at {remote.at('nothing')}") and "Traceback" not in err
    assert main(["inspect", remote.url, "--storage-options", "[1]"]) == 2
    assert "must be a JSON object" in capsys.readouterr().err


def test_an_unknown_scheme_or_missing_package_names_the_fix(tmp_path):
    with pytest.raises(torchckpt.CheckpointError, match="Cannot open nosuch://x"):
        torchckpt.load_checkpoint("nosuch://x/y")
    with pytest.raises(torchckpt.CheckpointError, match="storage_options apply to URLs"):
        torchckpt.Checkpoint(w=torch.ones(1)).write(tmp_path / "c", storage_options={"anon": True})
    assert not (tmp_path / "c").exists()


def test_file_urls_take_the_generic_path(tmp_path, install):
    url = f"file://{tmp_path}/run"
    install(url, remote_double(url, warned=set()))  # the warning is given once per process: not yet, here
    ckpt = torchckpt.Checkpoint(w=torch.arange(4.0))
    with pytest.warns(UserWarning, match="cannot create or replace a file conditionally"):
        mgr = CheckpointManager(ckpt, url, max_to_keep=1)
        first = mgr.save()
        assert first == f"{url}/ckpt-1"
        mgr.save()
    assert sorted(os.listdir(tmp_path / "run")) == [".torchckpt.lock", "checkpoints.json", "ckpt-2"]
    index, shard = sorted(os.listdir(tmp_path / "run" / "ckpt-2"))
    assert index == "index.json" and TAGGED.fullmatch(shard)
    w = torch.zeros(4)
    torchckpt.Checkpoint(w=w).restore(url).assert_consumed()
    assert torch.equal(w, torch.arange(4.0))
    mgr.close()
    assert torchckpt.load_checkpoint(str(tmp_path / "run")).path == str(tmp_path / "run" / "ckpt-2")  # a plain path too
