"""Bit flips in chunk data, restored onto another number of ranks (scenarios of ``dist_job``).

A resharding restore reads most chunks only in part: each flip must still fail the restore with a
``CorruptCheckpointError`` on every rank, never restore silently. Rank 0 flips one bit of a shard
on disk, every rank restores, rank 0 flips it back; the flips (chunk, byte, bit) come from a seeded
generator, the same on every rank. ``tests/test_distributed.py`` checks the counts.
"""

from __future__ import annotations

import json
import os
import random
import time
from pathlib import Path

import safetensors.torch
import torch
import torch.distributed as dist
from torch.distributed.fsdp import fully_shard

import torchckpt

TIMEOUT = 20.0
FLIPS = 12  # per restoring world size in the default run; the slow test makes 100
FULL_FLIPS = 100
SAVED = "flips2"  # the checkpoint save_flips_2 writes (format 3, 2 ranks)


def flip_model(seed: int) -> torch.nn.Module:
    """FSDP2 over Linear(768, 1200) and Linear(1200, 10): the first weight is 3.7 MB, so each of its
    chunks saved on 2 ranks spans two 1 MiB blocks; the other tensors are one block each."""
    torch.manual_seed(seed)
    model = torch.nn.Sequential(torch.nn.Linear(768, 1200), torch.nn.Linear(1200, 10))
    for layer in model:
        fully_shard(layer)
    fully_shard(model)
    return model


def full_state(model: torch.nn.Module, opt: torch.optim.Optimizer) -> dict[str, torch.Tensor]:
    def full(t: torch.Tensor) -> torch.Tensor:
        return (t.full_tensor() if hasattr(t, "full_tensor") else t).detach().clone()

    out = {f"model/{k}": full(v) for k, v in model.state_dict().items()}
    for index, fields in opt.state_dict()["state"].items():
        out.update({f"opt/{index}/{k}": full(v) for k, v in fields.items()})
    return out


def save_flips_2(d: Path, rank: int, world: int) -> dict:
    """FSDP2 + Adam after one step, saved on 2 ranks: the checkpoint the flips corrupt."""
    model = flip_model(0)
    opt = torch.optim.Adam(model.parameters(), lr=0.01)
    torch.manual_seed(rank)
    model(torch.randn(4, 768)).pow(2).mean().backward()
    opt.step()
    path = torchckpt.Checkpoint(model=model, opt=opt).write(str(d / SAVED), timeout_secs=TIMEOUT)
    reference = full_state(model, opt)  # collective
    if rank == 0:
        safetensors.torch.save_file(reference, str(d / f"{SAVED}-reference.safetensors"))
    return {"path": path}


def tensor_ranges(path: Path, chunks_only: bool = True) -> list[tuple[str, str, int, int]]:
    """(stored name, shard file, first byte, end) in the file of every chunk (``~@``; with
    ``chunks_only=False``, of every tensor), from the shard headers as any safetensors reader sees them."""
    out = []
    for file in sorted(os.listdir(path)):
        if file.endswith(".safetensors"):
            with open(path / file, "rb") as f:
                n = int.from_bytes(f.read(8), "little")
                header = json.loads(f.read(n))
            for name, entry in header.items():
                if name != "__metadata__" and ("~@" in name or not chunks_only):
                    begin, end = entry["data_offsets"]
                    out.append((name, file, 8 + n + begin, 8 + n + end))
    return sorted(out)


def flip_bit(file: Path, offset: int, bit: int) -> None:
    with open(file, "r+b") as f:
        f.seek(offset)
        byte = f.read(1)[0]
        f.seek(offset)
        f.write(bytes([byte ^ (1 << bit)]))


def run_flips(d: Path, rank: int, world: int, name: str, count: int, seed: int, optimizer: bool = True) -> dict:
    """``count`` flips, alternately in a model chunk and an optimizer chunk (in any model tensor
    without ``optimizer``: a single process's checkpoint, no chunks), each restored once into
    FSDP2 on this job's ``world`` ranks; then the intact checkpoint restores exactly."""
    path = d / name
    chunks = tensor_ranges(path, chunks_only=optimizer)
    by_kind = [[c for c in chunks if c[0].startswith(kind)] for kind in (("model/", "opt/") if optimizer else ("model/",))]
    rng = random.Random(seed)
    model = flip_model(1)
    opt = torch.optim.Adam(model.parameters(), lr=0.01)
    ckpt = torchckpt.Checkpoint(model=model, opt=opt) if optimizer else torchckpt.Checkpoint(model=model)
    caught, ranks_agree, silent, other, messages = 0, True, [], [], []
    began = time.monotonic()
    for i in range(count):
        chunk, file, start, end = rng.choice(by_kind[i % len(by_kind)])
        offset, bit = rng.randrange(start, end), rng.randrange(8)
        if rank == 0:
            flip_bit(path / file, offset, bit)
        dist.barrier()
        try:
            ckpt.read(str(path), timeout_secs=TIMEOUT)
            silent.append([chunk, offset - start, bit])
        except torchckpt.CorruptCheckpointError as e:
            caught += 1
            ranks_agree &= str(e.path).endswith(file)
            if len(messages) < 4:
                messages.append(str(e))
        except Exception as e:
            other.append(f"{type(e).__name__}: {e}")
        dist.barrier()
        if rank == 0:
            flip_bit(path / file, offset, bit)  # put it back
        dist.barrier()
    ckpt.read(str(path), timeout_secs=TIMEOUT).assert_consumed()
    reference = safetensors.torch.load_file(str(d / f"{SAVED}-reference.safetensors"))
    found = full_state(model, opt)
    if not optimizer:
        reference = {k: v for k, v in reference.items() if k.startswith("model/")}
    differences = sorted(k for k in set(found) | set(reference)
                         if k not in found or k not in reference or not torch.equal(found[k], reference[k]))
    return {"flips": count, "caught": caught, "silent": silent, "other": other, "messages": messages,
            "paths_name_the_shard": ranks_agree, "differences": differences,
            "seconds": round(time.monotonic() - began, 2),
            "kinds": [sum(1 for i in range(count) if i % len(by_kind) == k) for k in range(len(by_kind))]}


def flips_from_2(d: Path, rank: int, world: int) -> dict:
    """FLIPS flips in the format-3 checkpoint saved on 2 ranks, restored on this job's ranks."""
    return run_flips(d, rank, world, SAVED, FLIPS, world)


def flips_from_2_full(d: Path, rank: int, world: int) -> dict:
    """The acceptance run: 100 flips."""
    return run_flips(d, rank, world, SAVED, FULL_FLIPS, 100 + world)


def flips_format_2(d: Path, rank: int, world: int) -> dict:
    """The same checkpoint as format 2 (no block checksums; the test rewrote its index): a chunk
    read in part is read and checked whole."""
    return run_flips(d, rank, world, SAVED + "-format2", 6, 200 + world)


def flips_format_1(d: Path, rank: int, world: int) -> dict:
    """The saved model as a single process's checkpoint (format 1, written by the test): each rank
    reads part of whole tensors, and reads and checks them whole."""
    return run_flips(d, rank, world, SAVED + "-format1", 6, 300 + world, optimizer=False)


def write_old_formats(d: Path) -> None:
    """In the test process, once save_flips_2 ran: the checkpoint as format 2 (its index without
    block checksums, resealed as a format-aware forger would) and the model as a format-1 checkpoint."""
    import shutil

    from tests.conftest import read_index, write_index

    old = d / f"{SAVED}-format2"
    shutil.copytree(d / SAVED, old)
    index = read_index(old)
    index["torchckpt"]["format_version"] = 2
    del index["torchckpt"]["blocks"]
    write_index(old, index)
    reference = safetensors.torch.load_file(str(d / f"{SAVED}-reference.safetensors"))
    plain = torch.nn.Sequential(torch.nn.Linear(768, 1200), torch.nn.Linear(1200, 10))
    plain.load_state_dict({k.removeprefix("model/"): v for k, v in reference.items() if k.startswith("model/")})
    torchckpt.Checkpoint(model=plain).write(d / f"{SAVED}-format1")


SCENARIOS = {f.__name__: f for f in (save_flips_2, flips_from_2, flips_from_2_full, flips_format_2, flips_format_1)}
