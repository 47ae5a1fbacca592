"""``CheckpointManager(warm_page_cache=True)``: once a save is committed, the kernel reads the new
checkpoint's files into the page cache, so that another process restoring it next (a validation
loop following the run) reads memory; without it, direct-I/O writes leave the files uncached.

Residency is read with ``mincore(2)`` on a mapping of each file (Linux).
"""

from __future__ import annotations

import ctypes
import ctypes.util
import mmap
import os
import sys
import time
from pathlib import Path

import pytest
import torch

import torchckpt
from tests.doubles import LocalDouble
from torchckpt._storage import warm as storage_warm

pytestmark = pytest.mark.skipif(not sys.platform.startswith("linux"), reason="mincore and fadvise are Linux's")

SHARD_BYTES = 8 * 2**20
# The kernel sometimes leaves the last, partial page of a file written a moment ago out of a
# warm-up (seen on ext4, 1 page of 1,025): the tests ask for all but 1% of the pages.


def resident_fraction(path: Path) -> float:
    """The fraction of ``path``'s pages in the page cache now."""
    libc = ctypes.CDLL(ctypes.util.find_library("c"), use_errno=True)
    libc.mincore.argtypes = [ctypes.c_void_p, ctypes.c_size_t, ctypes.POINTER(ctypes.c_ubyte)]
    size = path.stat().st_size
    pages = -(-size // mmap.PAGESIZE)
    vector = (ctypes.c_ubyte * pages)()
    with open(path, "rb") as f, mmap.mmap(f.fileno(), size, access=mmap.ACCESS_COPY) as mapped:
        address = ctypes.c_char.from_buffer(mapped)  # the mapping's address; no page is touched
        try:
            if libc.mincore(ctypes.addressof(address), size, vector) != 0:
                raise OSError(ctypes.get_errno(), "mincore failed")
        finally:
            del address
    return sum(b & 1 for b in bytes(vector)) / pages


def drop(path: Path) -> None:
    """Evict ``path`` from the page cache (a checkpoint's files are durable once committed)."""
    fd = os.open(path, os.O_RDONLY)
    try:
        os.posix_fadvise(fd, 0, 0, os.POSIX_FADV_DONTNEED)
    finally:
        os.close(fd)


def wait_resident(path: Path, at_least: float, timeout_secs: float = 20.0) -> float:
    deadline = time.monotonic() + timeout_secs
    while (fraction := resident_fraction(path)) < at_least and time.monotonic() < deadline:
        time.sleep(0.05)
    return fraction


def shards(path: str) -> list[Path]:
    return sorted(Path(path).glob("*.safetensors"))


@pytest.fixture
def direct_disk(tmp_path, install):
    """The local disk under ``tmp_path`` writing every shard with direct I/O, so that nothing a save
    writes is cached; skipped where the filesystem refuses direct I/O (the shard is then cached)."""
    storage = install(tmp_path, LocalDouble(direct_min_bytes=0))
    probe = torchckpt.Checkpoint(w=torch.ones(SHARD_BYTES // 4)).write(tmp_path / "probe", progress=False)
    if resident_fraction(shards(probe)[0]) > 0.5:
        pytest.skip("this filesystem caches what it writes (no direct I/O)")
    return storage


def _state() -> dict[str, torch.Tensor]:
    gen = torch.Generator().manual_seed(0)
    return {f"w{i}": torch.randn(SHARD_BYTES // 4 // 4, generator=gen) for i in range(4)}


def test_a_new_checkpoint_is_read_into_the_page_cache_once_committed(tmp_path, direct_disk):
    mgr = torchckpt.CheckpointManager(torchckpt.Checkpoint(model=_state()), tmp_path / "run", warm_page_cache=True,
                                      max_shard_size=SHARD_BYTES // 2, progress=False)
    path = mgr.save()
    files = shards(path)
    assert len(files) == 2
    storage_warm.wait_for_warm_ups()
    assert all(wait_resident(f, 0.99) >= 0.99 for f in files)  # all but the last page, at worst (above)
    restored = _state()
    for t in restored.values():
        t.zero_()
    torchckpt.Checkpoint(model=restored).restore(path).assert_consumed()
    assert all(torch.equal(restored[k], v) for k, v in _state().items())


def test_without_it_a_direct_io_save_leaves_the_files_uncached(tmp_path, direct_disk):
    mgr = torchckpt.CheckpointManager(torchckpt.Checkpoint(model=_state()), tmp_path / "run",
                                      max_shard_size=SHARD_BYTES // 2, incremental=False, progress=False)
    path = mgr.save()
    storage_warm.wait_for_warm_ups()
    time.sleep(0.2)
    assert all(resident_fraction(f) < 0.5 for f in shards(path))


@pytest.mark.parametrize("warm", [True, False], ids=["warmed", "control"])
def test_reused_files_are_warmed_too(tmp_path, direct_disk, warm):
    """An incremental save places unchanged shards by hard link: the reader reads them all the
    same. The placed files are evicted just before the save settles (its own check may have read
    them), so only the warm-up can bring them back; the control, without it, stays cold."""
    mgr = torchckpt.CheckpointManager(torchckpt.Checkpoint(model=_state()), tmp_path / "run", warm_page_cache=warm,
                                      max_shard_size=SHARD_BYTES // 2, progress=False)
    mgr.save()
    storage_warm.wait_for_warm_ups()
    final = tmp_path / "run" / "ckpt-2"
    direct_disk.before("stage.settle", lambda *args, **kwargs: [drop(f) for f in shards(str(final))], times=1)
    assert mgr.save() == str(final)  # nothing changed: every shard is placed from the first checkpoint
    assert len(direct_disk.called("stage.reuse")) == 2
    storage_warm.wait_for_warm_ups()
    if warm:
        assert all(wait_resident(f, 0.99) >= 0.99 for f in shards(str(final)))
    else:
        time.sleep(0.2)
        assert all(resident_fraction(f) < 0.5 for f in shards(str(final)))


def test_the_warm_up_stays_within_its_budget(tmp_path, direct_disk):
    path = torchckpt.Checkpoint(model=_state()).write(tmp_path / "c", progress=False)
    (shard,) = shards(path)
    drop(shard)
    storage_warm.warm_files([str(shard)], 4 * 2**20)
    wait_resident(shard, 0.45, timeout_secs=5.0)
    time.sleep(0.2)
    assert 0.45 <= resident_fraction(shard) <= 0.6  # 4 of 8 MiB asked (the kernel may round up a little)
