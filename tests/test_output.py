"""Writing shard files: direct I/O through aligned buffers, its fallbacks, and its failures."""

from __future__ import annotations

import errno
import fcntl
import gc
import os
import signal
import threading
import time

import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st

import torchckpt
from torchckpt._storage import local_output
from torchckpt._storage.local import LocalStorage
from torchckpt._tensorio import byte_view
from torchckpt._tools.verify import verify

O_DIRECT = getattr(os, "O_DIRECT", 0)
pytestmark = pytest.mark.skipif(not O_DIRECT, reason="no O_DIRECT on this platform")


def supports_direct_io(directory: str) -> bool:
    probe = os.path.join(directory, ".direct-probe")
    try:
        os.close(os.open(probe, os.O_WRONLY | os.O_CREAT | O_DIRECT, 0o644))
        return True
    except OSError:
        return False
    finally:
        if os.path.exists(probe):
            os.remove(probe)


@pytest.fixture
def direct_dir(tmp_path):
    if not supports_direct_io(str(tmp_path)):
        pytest.skip("the test directory's filesystem refuses O_DIRECT")
    return tmp_path


@pytest.fixture
def always_direct(direct_dir, install) -> LocalStorage:
    """Direct I/O for files of any size under ``direct_dir``, so that small tests take the same
    path as large saves."""
    return install(direct_dir, LocalStorage(direct_min_bytes=0))


def pieces_of(lengths: list[int], readonly_every: int = 3) -> list[memoryview]:
    """Views of distinct bytes: every ``readonly_every``-th one read-only (like header pieces)."""
    views = []
    for i, n in enumerate(lengths):
        data = bytes((i * 7 + j) % 251 for j in range(min(n, 4096))) * (n // 4096 + 1)
        data = data[:n]
        views.append(memoryview(data) if i % readonly_every == 0 else memoryview(bytearray(data)))
    return views


def write_file(path: str, views: list[memoryview], size_hint: int | None = None, direct_min_bytes: int = 0) -> type:
    """Write ``views`` into the new file ``path`` (directly, whatever its size, unless
    ``direct_min_bytes`` says otherwise); returns the kind of output that wrote it."""
    size = sum(map(len, views)) if size_hint is None else size_hint
    with local_output.create(path, size, direct_min_bytes=direct_min_bytes) as out:
        kind = type(out)
        out.write(views)
        out.finish()
    return kind


@pytest.mark.parametrize("lengths", [
    [], [1], [4095], [4096], [4097], [4096 * 3 + 5, 17, 0, 70_000],
    [200_000] * 5, [1] * 5000, [65_536, 65_535, 65_537],
], ids=["empty", "one-byte", "block-minus-1", "block", "block-plus-1", "mixed", "large", "many-tiny", "copy-threshold"])
def test_direct_output_writes_exactly_the_bytes_given(direct_dir, lengths):
    path = str(direct_dir / "f.bin")
    views = pieces_of(lengths)
    assert write_file(path, views) is local_output._DirectOutput
    with open(path, "rb") as f:
        assert f.read() == b"".join(bytes(v) for v in views)


@settings(max_examples=40, deadline=None)
@given(st.lists(st.integers(min_value=0, max_value=40_000), max_size=30), st.integers(min_value=0, max_value=2**22))
def test_direct_output_round_trips_any_sequence_of_writes(tmp_path_factory, lengths, size_hint):
    directory = tmp_path_factory.mktemp("direct")
    if not supports_direct_io(str(directory)):
        pytest.skip("the test directory's filesystem refuses O_DIRECT")
    path = str(directory / "f.bin")
    views = pieces_of(lengths, readonly_every=2)
    with local_output.create(path, size_hint, direct_min_bytes=0) as out:  # the size is a hint for buffer sizes only
        for i in range(0, len(views), 4):
            out.write(views[i : i + 4])
        out.finish()
    with open(path, "rb") as f:
        assert f.read() == b"".join(bytes(v) for v in views)


def test_direct_output_opens_the_file_with_o_direct(direct_dir):
    with local_output.create(str(direct_dir / "f.bin"), 10, direct_min_bytes=0) as out:
        assert fcntl.fcntl(out.fd, fcntl.F_GETFL) & O_DIRECT


def test_small_files_use_the_page_cache(direct_dir):
    assert write_file(str(direct_dir / "f.bin"), pieces_of([100]),
                      direct_min_bytes=local_output.DIRECT_MIN_BYTES) is local_output._CachedOutput


def test_a_filesystem_that_refuses_o_direct_gets_ordinary_writes(tmp_path, monkeypatch):
    real_open = os.open

    def refusing_open(path, flags, mode=0o777):
        fd = real_open(path, flags & ~O_DIRECT, mode)  # like the kernel: the file exists, then EINVAL
        if flags & O_DIRECT:
            os.close(fd)
            raise OSError(errno.EINVAL, "Invalid argument")
        return fd

    monkeypatch.setattr(os, "open", refusing_open)
    path = str(tmp_path / "f.bin")
    views = pieces_of([5000, 300_000])
    assert write_file(path, views) is local_output._CachedOutput
    with open(path, "rb") as f:
        assert f.read() == b"".join(bytes(v) for v in views)


def test_a_device_that_wants_more_alignment_gets_ordinary_writes(direct_dir, monkeypatch):
    real_pwrite = os.pwrite
    refused = []

    def picky_pwrite(fd, data, offset):
        if fcntl.fcntl(fd, fcntl.F_GETFL) & O_DIRECT:
            refused.append(offset)
            raise OSError(errno.EINVAL, "Invalid argument")
        return real_pwrite(fd, data, offset)

    monkeypatch.setattr(os, "pwrite", picky_pwrite)
    path = str(direct_dir / "f.bin")
    views = pieces_of([70_000, 3, 200_000])
    with local_output.create(path, 10, direct_min_bytes=0) as out:
        out.write(views)
        out.finish()
        assert not fcntl.fcntl(out.fd, fcntl.F_GETFL) & O_DIRECT
    assert refused == [0]
    with open(path, "rb") as f:
        assert f.read() == b"".join(bytes(v) for v in views)


def test_a_failed_write_is_raised_with_the_path_and_nothing_hangs(direct_dir, monkeypatch):
    def full_disk(fd, data, offset):
        raise OSError(errno.ENOSPC, "No space left on device")

    monkeypatch.setattr(os, "pwrite", full_disk)
    path = str(direct_dir / "f.bin")
    out = local_output.create(path, 10, direct_min_bytes=0)  # 4 KiB buffers: the failure surfaces while the caller still writes
    with pytest.raises(OSError, match="No space left") as caught, out:
        out.write(pieces_of([4096] * 50))
        out.finish()
    assert caught.value.errno == errno.ENOSPC
    assert caught.value.filename == path
    assert out.closed


def test_a_checkpoint_written_directly_restores_bit_for_bit(direct_dir, always_direct):
    torch.manual_seed(0)
    state = {
        "big": torch.randn(300_000),  # copied without the GIL
        "small": torch.randn(7),
        "half": torch.randn(5, 3).half(),
        "strided": torch.randn(64, 64).t(),  # staged in chunks
        "empty": torch.empty(0),
        "scalar": torch.tensor(3, dtype=torch.int64),
    }
    path = torchckpt.Checkpoint(**state).write(direct_dir / "ckpt", max_shard_size=600_000)
    dest = {k: torch.zeros_like(v) for k, v in state.items()}
    torchckpt.Checkpoint(**dest).read(path).assert_consumed()
    for k, v in state.items():
        assert torch.equal(dest[k], v), k
    assert verify(torchckpt.load_checkpoint(path)) == []  # every shard and tensor checksum matches


def test_a_forked_child_saves_with_its_own_threads(direct_dir, always_direct):
    # Small tensors: torch's own OpenMP pool does not survive a fork, whatever the library does.
    torchckpt.Checkpoint(w=torch.ones(1000)).write(direct_dir / "parent")  # starts the helper threads
    pid = os.fork()
    if pid == 0:  # the child: the parent's threads do not exist here
        code = 1
        try:
            torchckpt.Checkpoint(w=torch.full((1000,), 2.0)).write(direct_dir / "child")
            code = 0
        finally:
            os._exit(code)
    deadline = time.monotonic() + 60
    while True:
        done, status = os.waitpid(pid, os.WNOHANG)
        if done:
            break
        if time.monotonic() > deadline:
            os.kill(pid, signal.SIGKILL)
            os.waitpid(pid, 0)
            pytest.fail("a save in a forked child hung")
        time.sleep(0.05)
    assert os.waitstatus_to_exitcode(status) == 0
    w = torch.zeros(1000)
    torchckpt.Checkpoint(w=w).read(direct_dir / "child").assert_consumed()
    assert torch.equal(w, torch.full((1000,), 2.0))


def test_byte_views_of_tensors_are_copied_without_changes(direct_dir):
    t = torch.arange(50_000, dtype=torch.int32)
    path = str(direct_dir / "f.bin")
    write_file(path, [memoryview(b"head"), byte_view(t)])
    with open(path, "rb") as f:
        assert f.read() == b"head" + t.numpy().tobytes()


def test_a_byte_view_keeps_its_tensor_alive(direct_dir):
    # A view handed to a writer or hashing thread must not outlive the memory it points at: once
    # the caller drops its tensor, the allocator would hand that memory to the next tensor.
    view = byte_view(torch.full((1 << 16,), 7, dtype=torch.uint8))[100:]
    gc.collect()
    others = [torch.full((1 << 16,), 9, dtype=torch.uint8) for _ in range(64)]
    assert bytes(view) == b"\x07" * ((1 << 16) - 100)
    path = str(direct_dir / "f.bin")
    write_file(path, [view])
    with open(path, "rb") as f:
        assert f.read() == b"\x07" * ((1 << 16) - 100)
    assert all(int(o[0]) == 9 for o in others)


def test_an_unexpected_error_in_the_disk_thread_reaches_the_caller(direct_dir, monkeypatch):
    def broken(fd, data, offset):
        raise ValueError("bad buffer")

    monkeypatch.setattr(os, "pwrite", broken)
    with pytest.raises(ValueError, match="bad buffer"), \
            local_output.create(str(direct_dir / "f.bin"), 10, direct_min_bytes=0) as out:
        out.write(pieces_of([10_000]))
        out.finish()


def test_a_worker_thread_survives_a_job_that_raises(capsys):
    from torchckpt import _threads

    worker = _threads.Worker("torchckpt-test")
    ran = []

    def bad() -> None:
        raise RuntimeError("a bug in a job")

    done = threading.Event()
    worker.submit(bad)
    worker.submit(lambda: (ran.append(1), done.set()))
    assert done.wait(10)
    assert ran == [1]
    assert "a bug in a job" in capsys.readouterr().err


def test_partial_writes_complete_and_leave_the_callers_list_alone(tmp_path, monkeypatch):
    real_writev = os.writev

    def short_writev(fd, buffers):
        return real_writev(fd, [memoryview(b)[:1000] for b in buffers[:1]])  # at most 1,000 bytes a call

    monkeypatch.setattr(os, "writev", short_writev)
    views = pieces_of([5000, 3, 2500])
    before = [bytes(v) for v in views]
    path = str(tmp_path / "f.bin")
    assert write_file(path, views, direct_min_bytes=local_output.DIRECT_MIN_BYTES) is local_output._CachedOutput
    assert [bytes(v) for v in views] == before  # the checksum thread reads this same list
    with open(path, "rb") as f:
        assert f.read() == b"".join(before)


def test_cached_writes_hand_each_written_range_to_the_disk(tmp_path, monkeypatch):
    """Early writeback asks for ranges already written: a range asked for before its bytes are
    there starts nothing, and those bytes then wait for the final fsync."""
    real_fadvise = os.posix_fadvise
    asked = []

    def record(fd, offset, length, advice):
        asked.append((offset, length, os.fstat(fd).st_size))
        return real_fadvise(fd, offset, length, advice)

    monkeypatch.setattr(os, "posix_fadvise", record)
    views = pieces_of([6000] * 10)
    path = str(tmp_path / "f.bin")
    with local_output.create(path, 60_000, flush_bytes=10_000) as out:
        assert type(out) is local_output._CachedOutput
        for view in views:
            out.write([view])
        out.finish()
    assert [(offset, length) for offset, length, _ in asked] == [(0, 12_000), (12_000, 12_000), (24_000, 12_000),
                                                                 (36_000, 12_000), (48_000, 12_000)]
    assert all(offset + length <= size for offset, length, size in asked)
