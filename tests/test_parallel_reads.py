"""Several reader threads per shard on restore (``_load.reads.read_many``): the same tensors, the same
errors and the same overlap rule as one reader in file order, and no thread left behind.

Each test runs against a local storage whose sources read in batches of a few KiB, so that a
small checkpoint makes many batches; ``readers=1`` is the in-order path the parallel one must match.
"""

from __future__ import annotations

import os
import shutil
import tempfile
import threading
from collections.abc import Callable

import pytest
import torch

import torchckpt
from torchckpt._storage import warm
from torchckpt._storage.local import LocalSource, LocalStorage
from torchckpt.errors import CorruptCheckpointError

from .damage import flip_byte, tensor_span

BATCH_BYTES = 4096


class _SmallBatchSource(LocalSource):
    """A local shard read in batches of ``BATCH_BYTES``, remembering which threads read it."""

    batch_bytes = BATCH_BYTES

    def __init__(self, path: str, fd: int, readers: int) -> None:
        super().__init__(path, fd)
        self.readers = readers
        self.threads: set[str] = set()
        self.descriptors: dict[str, set[tuple[int, int]]] = {}  # thread name -> (descriptor, inode) it read through
        self.opened = fd  # the shared descriptor (``fd`` is -1 once closed)

    def readv(self, views: list[memoryview], offset: int) -> None:
        name = threading.current_thread().name
        self.threads.add(name)
        fd = self.descriptor()
        self.descriptors.setdefault(name, set()).add((fd, os.fstat(fd).st_ino))
        super().readv(views, offset)


class SmallBatches(LocalStorage):
    """The local disk, its shards opened as ``_SmallBatchSource``; ``after_open(path)`` runs once a
    shard is open (to change the file under an open reader)."""

    def __init__(self, readers: int, after_open: Callable[[str], None] | None = None) -> None:
        super().__init__()
        self.readers = readers
        self.after_open = after_open
        self.sources: list[_SmallBatchSource] = []

    def open(self, path: str, what: str) -> LocalSource:
        inner = super().open(path, what)
        if what != "Shard":  # the index's seal, read again once the shards are open
            return inner
        source = _SmallBatchSource(inner.path, inner.fd, self.readers)  # takes the descriptor over
        self.sources.append(source)
        if self.after_open is not None:
            self.after_open(path)
        return source

    def threads(self) -> set[str]:
        return set().union(*(s.threads for s in self.sources))


def _state() -> dict[str, torch.Tensor]:
    """60 tensors of 1 to 3 batches each, plus tiny ones between them: about 140 batches in one shard."""
    gen = torch.Generator().manual_seed(0)
    state = {}
    for i in range(60):
        state[f"w{i:02d}"] = torch.randn(1024 * (1 + i % 3), generator=gen)
        state[f"b{i:02d}"] = torch.randn(3, generator=gen)
    return state


def _zeros_like(state: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    return {k: torch.zeros_like(v) for k, v in state.items()}


def _shard(path: str) -> str:
    (name,) = [n for n in os.listdir(path) if n.endswith(".safetensors")]
    return os.path.join(path, name)


def _read_error(tmp_path, install, readers: int, after_open: Callable[[str], None] | None = None) -> str:
    """The message restoring the written checkpoint fails with, read by ``readers`` threads."""
    storage = install(tmp_path, SmallBatches(readers, after_open))
    with pytest.raises(CorruptCheckpointError) as caught:
        torchckpt.Checkpoint(state=_zeros_like(_state())).read(tmp_path / "c", progress=False)
    assert caught.value.path == _shard(str(tmp_path / "c"))
    if readers > 1:
        assert len(storage.threads()) > 1
    return str(caught.value)


@pytest.fixture
def written(tmp_path):
    path = torchckpt.Checkpoint(state=_state()).write(tmp_path / "c", progress=False)
    return str(path)


@pytest.fixture
def no_thread_left():
    before = set(threading.enumerate())
    yield
    left = [t for t in threading.enumerate() if t not in before and t.name.startswith("torchckpt-read")]
    assert not left


@pytest.mark.parametrize("readers", [1, 2, 4], ids=["in-order", "two", "four"])
def test_restores_bit_exact(tmp_path, install, written, no_thread_left, readers):
    storage = install(tmp_path, SmallBatches(readers))
    dest = _zeros_like(_state())
    torchckpt.Checkpoint(state=dest).read(written, progress=False).assert_consumed()
    expected = _state()
    assert all(torch.equal(dest[k].view(torch.int32), expected[k].view(torch.int32)) for k in expected)
    assert len(storage.threads()) == min(readers, 4)  # the caller and readers - 1 helpers


def _open_descriptors() -> set[str]:
    return set(os.listdir("/proc/self/fd"))


@pytest.mark.skipif(not os.path.isdir("/proc/self/fd"), reason="descriptors are reopened through /proc/self/fd")
def test_each_reader_thread_reads_through_its_own_descriptor_of_the_same_file(tmp_path, install, written,
                                                                              no_thread_left):
    """Reads from several threads through one descriptor share its readahead (see ``LocalSource``):
    each helper gets a descriptor of its own, onto the same inode, closed once it is done."""
    storage = install(tmp_path, SmallBatches(4))
    warm.wait_for_warm_ups()  # an earlier test's warm-up opens descriptors while it runs
    before = _open_descriptors()
    dest = _zeros_like(_state())
    torchckpt.Checkpoint(state=dest).read(written, progress=False).assert_consumed()
    assert _open_descriptors() == before
    (source,) = storage.sources
    per_thread = source.descriptors
    inode = os.stat(_shard(written)).st_ino
    assert len(per_thread) == 4 and all(len(seen) == 1 for seen in per_thread.values())
    caller = per_thread.pop(threading.current_thread().name)
    assert caller == {(source.opened, inode)}
    # Each helper through a descriptor of its own onto the same file (a closed one's number may be
    # reused by a helper that starts later, so the numbers need not all differ).
    assert all(fd != source.opened and ino == inode for seen in per_thread.values() for fd, ino in seen)
    expected = _state()
    assert all(torch.equal(dest[k], expected[k]) for k in expected)


def test_reopen_gives_the_open_file_even_after_its_path_was_replaced(tmp_path):
    from torchckpt._storage import files as storage_files

    path = tmp_path / "f"
    path.write_bytes(b"original")
    fd = os.open(path, os.O_RDONLY)
    try:
        (tmp_path / "g").write_bytes(b"replacement")
        os.replace(tmp_path / "g", path)
        again = storage_files.reopen(fd)
        if again is None:
            pytest.skip("no /proc/self/fd here")
        try:
            assert os.pread(again, 64, 0) == b"original"
            assert os.fstat(again).st_ino == os.fstat(fd).st_ino
        finally:
            os.close(again)
    finally:
        os.close(fd)
    assert storage_files.reopen(10**6) is None  # no such descriptor


def test_a_flipped_byte_mid_shard_raises_the_in_order_error(tmp_path, install, written, no_thread_left):
    shard = _shard(written)
    flip_byte(shard, os.path.getsize(shard) // 2, 0x40)
    in_order = _read_error(tmp_path, install, 1)
    assert "fails its checksum" in in_order
    assert _read_error(tmp_path, install, 4) == in_order


def test_two_corrupt_tensors_report_the_first_in_the_file(tmp_path, install, written, no_thread_left):
    """The reader of a later part finds its corruption first (near the start of its part, the other
    near the end of the first part); the error still names the earlier one."""
    shard = _shard(written)
    size = os.path.getsize(shard)
    for at in (size * 22 // 100, size * 80 // 100):
        flip_byte(shard, at, 0x01)
    in_order = _read_error(tmp_path, install, 1)
    assert _read_error(tmp_path, install, 4) == in_order


def test_a_shard_truncated_under_the_reader_raises_the_in_order_error(tmp_path, install, written, no_thread_left):
    """The file shrinks after it was opened (and its size checked): the reader past the end meets EOF
    on a helper thread, and the caller raises what reading in order raises."""
    def truncate(path: str) -> None:
        if path.endswith(".safetensors"):
            os.truncate(path, os.path.getsize(path) * 3 // 4)

    shard = _shard(written)
    with open(shard, "rb") as f:
        original = f.read()
    in_order = _read_error(tmp_path, install, 1, truncate)
    assert "is truncated" in in_order
    with open(shard, "wb") as f:
        f.write(original)
    assert _read_error(tmp_path, install, 4, truncate) == in_order


def test_an_error_on_a_helper_thread_ends_every_thread(tmp_path, install, written, no_thread_left):
    class Failing(SmallBatches):
        def open(self, path: str, what: str) -> LocalSource:
            source = super().open(path, what)
            source.readv = self._fail_late(source.readv, source.size)  # type: ignore[method-assign]
            return source

        @staticmethod
        def _fail_late(readv, size):  # type: ignore[no-untyped-def]
            def readv_or_fail(views: list[memoryview], offset: int) -> None:
                if offset > size // 2:
                    raise OSError(5, "Input/output error")
                readv(views, offset)
            return readv_or_fail

    install(tmp_path, Failing(4))
    with pytest.raises(CorruptCheckpointError, match="Input/output error"):
        torchckpt.Checkpoint(state=_zeros_like(_state())).read(written, progress=False)


@pytest.mark.parametrize("readers", [1, 4], ids=["in-order", "four"])
def test_overlapping_destinations_land_in_file_order(tmp_path, install, no_thread_left, readers):
    """Destinations that share memory are read in file order (the later bytes win), as ever."""
    state = {f"t{i:02d}": torch.full((2048,), float(i)) for i in range(16)}
    path = torchckpt.Checkpoint(state=state).write(tmp_path / "c", progress=False)
    install(tmp_path, SmallBatches(readers))
    base = torch.zeros(2048 * 16)
    dest = {k: torch.zeros(2048) for k in state}
    dest["t03"], dest["t09"] = base[:2048], base[1024:3072]  # t09 is stored after t03: it overwrites half
    torchckpt.Checkpoint(state=dest).read(path, progress=False).assert_consumed()
    assert torch.equal(base[:1024], torch.full((1024,), 3.0))
    assert torch.equal(base[1024:3072], torch.full((2048,), 9.0))
    assert all(torch.equal(dest[k], state[k]) for k in state if k not in ("t03", "t09"))


def test_tied_names_are_read_once(tmp_path, install, no_thread_left):
    shared = torch.arange(4096.0)
    state = {"a": torch.ones(4096), "tied.x": shared, "tied.y": shared, "z": torch.full((4096,), 2.0)}
    path = torchckpt.Checkpoint(state=state).write(tmp_path / "c", progress=False)
    storage = install(tmp_path, SmallBatches(4))
    dest_shared = torch.zeros(4096)
    dest = {"a": torch.zeros(4096), "tied.x": dest_shared, "tied.y": dest_shared, "z": torch.zeros(4096)}
    torchckpt.Checkpoint(state=dest).read(path, progress=False).assert_consumed()
    assert torch.equal(dest_shared, shared) and torch.equal(dest["z"], state["z"])
    assert len(storage.threads()) > 1



class _SmallPieces(_SmallBatchSource):
    """Checked reads land ``checked_bytes`` at a time (``LocalSource``'s is 4 MiB); records each readv's size."""

    checked_bytes = 1000  # smaller than the large tensors below, larger than the small ones together
    cached_bytes = 0  # every byte read as from the disk (the test's files are in the page cache)

    def __init__(self, path: str, fd: int, readers: int) -> None:
        super().__init__(path, fd, readers)
        self.sizes: list[int] = []

    def readv(self, views: list[memoryview], offset: int) -> None:
        self.sizes.append(sum(len(v) for v in views))
        super().readv(views, offset)


class SmallPieces(SmallBatches):
    def open(self, path: str, what: str) -> LocalSource:
        source = super().open(path, what)
        if what != "Shard":
            return source
        pieces = _SmallPieces(source.path, source.fd, self.readers)  # takes the descriptor over
        self.sources[-1] = pieces
        return pieces


@pytest.mark.parametrize("readers", [1, 4], ids=["in-order", "four"])
def test_a_checked_read_lands_and_hashes_a_piece_at_a_time(tmp_path, install, no_thread_left, readers):
    """A tensor larger than ``checked_bytes`` is read in parts and hashed as one; small tensors next
    to each other are read together; the values are exact, and a flipped byte in a large tensor's
    last part is found and named."""
    state = {f"w{i}": torch.randn(1000 + 37 * i) for i in range(8)}  # 4,000 to 5,036 bytes
    state.update({f"b{i}": torch.randn(3) for i in range(40)})  # 12 bytes each, 480 together
    state.update({f"t{i}": torch.randn(8000) for i in range(4)})  # t0 in the small ones' batch
    path = torchckpt.Checkpoint(state=state).write(tmp_path / "c", progress=False)
    storage = install(tmp_path, SmallPieces(readers))
    dest = _zeros_like(state)
    torchckpt.Checkpoint(state=dest).read(path, progress=False).assert_consumed()
    assert all(torch.equal(dest[k].view(torch.int32), state[k].view(torch.int32)) for k in state)
    expected = [480]
    for size in [t.nbytes for k, t in state.items() if not k.startswith("b")]:
        expected += [1000] * (size // 1000) + ([size % 1000] if size % 1000 else [])
    (source,) = storage.sources
    assert sorted(source.sizes) == sorted(expected)
    if readers == 1:  # in file order: w0..w7 in parts, the small ones together, then t0..t3 in parts
        assert source.sizes == expected[1:-128] + [480] + expected[-128:]
    assert len(storage.threads()) == readers  # 4: several batches read at once

    shard = _shard(path)
    name = "state/w5"
    flip_byte(shard, tensor_span(shard, name)[1] - 3, 0x10)  # in its last part
    with pytest.raises(CorruptCheckpointError, match="fails its checksum") as caught:
        torchckpt.Checkpoint(state=_zeros_like(state)).read(path, progress=False)
    assert repr(name) in str(caught.value) and caught.value.path == shard


class _CachedPieces(_SmallPieces):
    """Checked reads try the page cache first, ``cached_bytes`` at a time; records each such read's
    size and offset. ``cold_from``: the file offset from which the cache holds nothing."""

    cached_bytes = 300

    def __init__(self, path: str, fd: int, readers: int, cold_from: int | None) -> None:
        super().__init__(path, fd, readers)
        self.cold_from = cold_from
        self.cached: list[tuple[int, int]] = []

    def read_cached(self, view: memoryview, offset: int) -> int:
        if self.cold_from is not None:
            view = view[: max(0, self.cold_from - offset)]
        n = super().read_cached(view, offset) if len(view) else 0
        self.cached.append((offset, n))
        return n


class CachedPieces(SmallBatches):
    def __init__(self, readers: int, cold_from: int | None = None) -> None:
        super().__init__(readers)
        self.cold_from = cold_from

    def open(self, path: str, what: str) -> LocalSource:
        source = super().open(path, what)
        if what != "Shard":
            return source
        pieces = _CachedPieces(source.path, source.fd, self.readers, self.cold_from)  # takes the descriptor over
        if self.cold_from is not None:
            pieces.batch_bytes = 2**20  # the whole shard in one batch
        self.sources[-1] = pieces
        return pieces


def _warm(path: str) -> None:
    """Every page of ``path`` in the page cache."""
    with open(path, "rb") as f:
        f.read()


def _nowait_refused(directory: str) -> str | None:
    """Why a file in ``directory`` cannot be read with ``RWF_NOWAIT`` (a file just written, so in
    the page cache), or None when it can."""
    if not hasattr(os, "RWF_NOWAIT"):
        return "no preadv2 RWF_NOWAIT on this platform"
    probe = os.path.join(directory, "probe")
    with open(probe, "wb") as f:
        f.write(b"x" * 4096)
    fd = os.open(probe, os.O_RDONLY)
    try:
        if os.preadv(fd, [bytearray(4096)], 0, os.RWF_NOWAIT) != 4096:
            return "the page cache did not hold a file just written"
    except OSError as e:
        return f"{directory}'s file system refuses RWF_NOWAIT reads ({e})"
    finally:
        os.close(fd)
        os.unlink(probe)
    return None


@pytest.fixture
def nowait(tmp_path):
    """Skip where reads that never wait for the disk are refused (tmpfs, some network file
    systems): there ``LocalSource.read_cached`` reads nothing."""
    refused = _nowait_refused(str(tmp_path))
    if refused is not None:
        pytest.skip(refused)


def _large_and_small() -> dict[str, torch.Tensor]:
    gen = torch.Generator().manual_seed(1)
    state = {f"w{i}": torch.randn(1000 + 37 * i, generator=gen) for i in range(8)}  # 4,000 to 5,036 bytes
    state.update({f"b{i}": torch.randn(3, generator=gen) for i in range(10)})
    return state


@pytest.mark.parametrize("readers", [1, 4], ids=["in-order", "four"])
def test_bytes_in_the_page_cache_are_read_and_hashed_in_small_pieces(tmp_path, install, no_thread_left, nowait,
                                                                     readers):
    """A large tensor's bytes that the page cache holds are copied ``cached_bytes`` at a time and
    hashed as they land, and nothing is read from the disk for them; the values are exact, and a
    flipped byte read that way is found and named."""
    state = _large_and_small()
    path = torchckpt.Checkpoint(state=state).write(tmp_path / "c", progress=False)
    shard = _shard(path)
    _warm(shard)
    storage = install(tmp_path, CachedPieces(readers))
    dest = _zeros_like(state)
    torchckpt.Checkpoint(state=dest).read(path, progress=False).assert_consumed()
    assert all(torch.equal(dest[k].view(torch.int32), state[k].view(torch.int32)) for k in state)
    (source,) = storage.sources
    large = sum(t.nbytes for k, t in state.items() if k.startswith("w"))
    assert sum(n for _, n in source.cached) == large
    assert max(n for _, n in source.cached) == 300
    assert sum(source.sizes) == sum(t.nbytes for k, t in state.items() if k.startswith("b"))  # the small ones only

    name = "state/w6"
    start = tensor_span(shard, name)[0]
    flip_byte(shard, start + 700, 0x10)  # in its third piece of 300 bytes
    _warm(shard)
    with pytest.raises(CorruptCheckpointError, match="fails its checksum") as caught:
        torchckpt.Checkpoint(state=_zeros_like(state)).read(path, progress=False)
    assert repr(name) in str(caught.value) and caught.value.path == shard
    assert (start + 600, 300) in storage.sources[-1].cached  # the flipped byte came through the cache


def test_a_read_that_leaves_the_page_cache_reads_the_rest_from_the_disk_in_large_requests(
        tmp_path, install, no_thread_left, nowait):
    """Where the page cache stops holding the file (a cold file, or one half read in), the rest of
    the batch (here the whole shard) is read in ``checked_bytes`` requests, without asking the
    cache again: values exact."""
    state = _large_and_small()
    path = torchckpt.Checkpoint(state=state).write(tmp_path / "c", progress=False)
    shard = _shard(path)
    _warm(shard)
    start = tensor_span(shard, "state/w3")[0]
    cold_from = start + 650  # within w3's first part
    storage = install(tmp_path, CachedPieces(1, cold_from))
    dest = _zeros_like(state)
    torchckpt.Checkpoint(state=dest).read(path, progress=False).assert_consumed()
    assert all(torch.equal(dest[k].view(torch.int32), state[k].view(torch.int32)) for k in state)
    (source,) = storage.sources
    assert source.cached[-2:] == [(start + 600, 50), (cold_from, 0)]  # then none asked
    assert 1000 - 650 in source.sizes and max(source.sizes) == 1000  # the rest of w3's part, then whole parts


def test_a_file_system_that_refuses_reads_that_never_wait_is_read_as_before(install, no_thread_left):
    """On tmpfs (``EOPNOTSUPP`` for ``RWF_NOWAIT`` on recent kernels) the first refusal turns the
    cache reads off for that file: one try, then every byte read as before, the values exact."""
    if not hasattr(os, "RWF_NOWAIT") or not os.path.isdir("/dev/shm"):
        pytest.skip("needs RWF_NOWAIT and a tmpfs at /dev/shm")
    directory = tempfile.mkdtemp(dir="/dev/shm")  # not tmp_path: the test needs a file system that refuses the flag
    try:
        if _nowait_refused(directory) is None:
            pytest.skip("this kernel's tmpfs accepts RWF_NOWAIT")
        state = _large_and_small()
        path = torchckpt.Checkpoint(state=state).write(os.path.join(directory, "c"), progress=False)
        storage = install(directory, CachedPieces(1))
        dest = _zeros_like(state)
        torchckpt.Checkpoint(state=dest).read(path, progress=False).assert_consumed()
        assert all(torch.equal(dest[k].view(torch.int32), state[k].view(torch.int32)) for k in state)
        (source,) = storage.sources
        assert source.cached == [(tensor_span(_shard(path), "state/w0")[0], 0)] and source.cached_bytes == 0
    finally:
        shutil.rmtree(directory, ignore_errors=True)
