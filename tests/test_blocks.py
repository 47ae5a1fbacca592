"""Block checksums (format 3): the reads of part of a tensor, widened to whole blocks and checked.

The distributed tests flip bits in real resharding restores (``test_distributed.py``); these check
the block arithmetic on bytes in memory: which bytes are read, that each block is checked, that a
whole-tensor check of a large tensor is streamed through bounded scratch memory.
"""

from __future__ import annotations

import random

import pytest
import torch
import xxhash

from torchckpt._format import blocks as format_blocks
from torchckpt._format import spec as format_spec
from torchckpt._format.dtypes import TensorInfo
from torchckpt.errors import CorruptCheckpointError

START = 96  # the tensor's first byte in the "file"


class BytesSource:
    """A shard in memory that records every byte range read."""

    def __init__(self, data: bytes) -> None:
        self.data = bytearray(data)
        self.reads: list[tuple[int, int]] = []

    def readv(self, views: list[memoryview], offset: int) -> None:
        for view in views:
            view[:] = self.data[offset : offset + len(view)]
            self.reads.append((offset, offset + len(view)))
            offset += len(view)


def stored(nbytes: int, size: int, seed: int = 0) -> tuple[BytesSource, TensorInfo, format_blocks.BlockSums]:
    """A tensor of ``nbytes`` random bytes at START, with its block checksums of ``size`` bytes."""
    data = random.Random(seed).randbytes(nbytes)
    info = TensorInfo("w~@0,0", "f", torch.uint8, torch.Size([nbytes]), START, nbytes, xxhash.xxh3_64_intdigest(data))
    sums = [xxhash.xxh3_64_intdigest(data[i : i + size]) for i in range(0, nbytes, size)] if nbytes > size else []
    table = format_blocks.BlockSums(size, "".join(f"{s:016x}" for s in sums), {info.name: 0} if sums else {})
    return BytesSource(bytes(START) + data), info, table


def read_part(source: BytesSource, info: TensorInfo, table: format_blocks.BlockSums | None,
              parts: list[tuple[int, int]], scratch_bytes: int = format_blocks.SCRATCH_BYTES,
              ) -> tuple[bytearray, format_blocks.Mismatch | None]:
    """Read the tensor bytes ``[lo, hi)`` of each part into a destination, checked by blocks."""
    dest = bytearray(sum(hi - lo for lo, hi in parts))
    view, views, at = memoryview(dest), [], 0
    for lo, hi in parts:
        views.append((START + lo, view[at : at + hi - lo]))
        at += hi - lo
    wide = format_blocks.covering(info, views, table)
    assert wide is not None

    def read(runs: list[tuple[int, memoryview]]) -> None:
        for offset, v in runs:
            source.readv([v], offset)

    return dest, format_blocks.read_blocked([wide], read, scratch_bytes)


@pytest.mark.parametrize("parts, blocks_read", [
    ([(0, 10)], [(0, 1000)]),  # the first block only
    ([(1500, 2500)], [(1000, 3000)]),  # across a boundary: both blocks
    ([(3000, 4000)], [(3000, 4000)]),  # exactly one block: nothing more
    ([(100, 200), (5100, 5200)], [(0, 1000), (5000, 6000)]),  # two spans
    ([(100, 200), (300, 400), (1100, 1200)], [(0, 2000)]),  # row-wise runs in adjacent blocks
    ([(9990, 10500)], [(9000, 10500)]),  # the last block is short
], ids=["head", "straddle", "aligned", "two spans", "runs", "short tail"])
def test_a_part_is_read_in_the_whole_blocks_that_cover_it(parts, blocks_read):
    source, info, table = stored(10_500, 1000)
    dest, bad = read_part(source, info, table, parts)
    assert bad is None
    assert bytes(dest) == b"".join(source.data[START + lo : START + hi] for lo, hi in parts)
    covered = sorted(source.reads)
    merged: list[tuple[int, int]] = []
    for lo, hi in covered:  # the runs read, merged: exactly the covering blocks
        if merged and merged[-1][1] == lo:
            merged[-1] = (merged[-1][0], hi)
        else:
            merged.append((lo, hi))
    assert merged == [(START + lo, START + hi) for lo, hi in blocks_read]


def test_a_flip_anywhere_in_a_block_read_is_caught_and_named_and_outside_it_is_never_read():
    source, info, table = stored(10_500, 1000)
    original = bytes(source.data)
    rng = random.Random(1)
    for _ in range(200):
        lo = rng.randrange(0, 10_000)
        part = (lo, lo + rng.randrange(1, 400))
        first, last = part[0] // 1000, (part[1] - 1) // 1000
        position = rng.randrange(10_500)
        source.data[START + position] ^= 1 << rng.randrange(8)
        _, bad = read_part(source, info, table, [part])
        if first <= position // 1000 <= last:  # in a block the read covers: caught, that block named
            assert bad is not None and bad.block == position // 1000
            message = bad.message("shard.safetensors")
            assert f"fails the checksum of its block {bad.block} (bytes {bad.block * 1000} to " in message
            assert "'w~@0,0' in shard.safetensors" in message and f"recorded {bad.recorded:016x}" in message
        else:  # a block it does not need: not read at all
            assert bad is None
            assert all(not lo <= START + position < hi for lo, hi in source.reads)
        source.data[:] = original
        source.reads.clear()


def test_without_block_checksums_a_part_reads_and_checks_the_whole_tensor():
    source, info, _ = stored(5000, 1000)
    source.data[START + 4999] ^= 0x80  # far from the part read
    _, bad = read_part(source, info, None, [(10, 20)])
    assert bad is not None and bad.block == -1 and bad.recorded == info.checksum
    assert bad.message("s") == (f"Tensor 'w~@0,0' in s fails its checksum (recorded {info.checksum:016x}, read "
                                f"{bad.digest:016x}): the shard is corrupt.")
    assert sorted(source.reads)[0][0] == START and max(hi for _, hi in source.reads) == START + 5000


def test_a_tensor_of_one_block_is_checked_by_its_own_checksum():
    source, info, table = stored(800, 1000)
    assert table.of(info) is None
    source.data[START + 700] ^= 1
    _, bad = read_part(source, info, table, [(0, 8)])
    assert bad is not None and bad.block == -1


def test_a_whole_tensor_check_streams_through_bounded_scratch_memory():
    source, info, _ = stored(5000, 1000)
    dest, bad = read_part(source, info, None, [(2000, 2100)], scratch_bytes=300)
    assert bad is None and bytes(dest) == bytes(source.data[START + 2000 : START + 2100])
    assert max(hi - lo for lo, hi in source.reads) <= 300  # the unneeded bytes, 300 at a time
    source.data[START + 4900] ^= 4
    assert read_part(source, info, None, [(2000, 2100)], scratch_bytes=300)[1] is not None


@pytest.mark.parametrize("nbytes", [0, 1, 999, 1000, 1001, 2000, 4321])
def test_the_streaming_hasher_gives_the_checksums_a_save_writes(nbytes):
    data = random.Random(nbytes).randbytes(nbytes)
    hasher = format_blocks.Hasher(1000)
    rng = random.Random(2)
    at = 0
    while at < nbytes:
        step = rng.randrange(1, 700)
        hasher.update(memoryview(data)[at : at + step])
        at += step
    assert hasher.result() == (xxhash.xxh3_64_intdigest(data), format_blocks.digests(memoryview(data), 1000))
    assert len(format_blocks.digests(memoryview(data), 1000)) == (0 if nbytes <= 1000 else -(-nbytes // 1000))


def entry(size, checksums):
    return {"blocks": {"size": size, "checksums": checksums}}


@pytest.mark.parametrize("section, message", [
    ({}, "format 3 needs a 'blocks' entry"),
    (entry(0, ""), "integer 'size' of at least 1"),
    (entry(1000.0, ""), "integer 'size'"),
    (entry(1000, "0" * 16), r"holds 1 block checksums, but its tensors of more than 1000 bytes have 2 blocks"),
    (entry(1000, "g" * 32), "block checksums are malformed"),
], ids=["missing", "zero size", "float size", "count", "not hex"])
def test_a_malformed_block_table_is_a_corrupt_index(section, message):
    with pytest.raises(CorruptCheckpointError, match=message):
        format_blocks.parse(section, ["a", "b"], ["F32", "F32"], ["500", "100"], "c/index.json")


def test_the_block_table_lists_the_blocks_of_each_tensor_over_one_block_in_table_order():
    sums = format_blocks.parse(entry(1000, "".join(f"{i:016x}" for i in range(4))), ["a", "small", "b"],
                         ["F32", "U8", "F32"], ["500", "1000", "300"], "c/index.json")
    info = TensorInfo("b", "f", torch.float32, torch.Size([300]), 0, 1200, 0)
    assert sums.of(info) == (1000, (2, 3))
    assert sums.of(info._replace(name="small", nbytes=1000)) is None
    assert format_spec.FORMAT_VERSION == format_spec.BLOCKS_FORMAT_VERSION == 3
