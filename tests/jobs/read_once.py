"""The read-once scenario of the shared 2-rank job (``tests/jobs/dist_job.py``, ``world2``), checked by
``tests/test_read_once.py``: replicated (DDP) state restored with ``read_once`` True, False and None,
the bytes each rank read, a damaged tensor that only one rank reads, and ranks whose lists differ.
Each failure is recorded, not raised, so it shows as a failed assertion rather than a hung group.
"""

from __future__ import annotations

import json
import shutil
from pathlib import Path
from typing import Any

import torch
import torch.distributed as dist

import torchckpt

TIMEOUT = 20.0  # every collective call here waits at most this long for the other rank
SIZES = [(1100, 1000), (64, 64), (3, 5), (256, 300), (7,)]  # one above _load.spread.DIRECT_BYTES, the rest bucketed


def model_of(seed: int) -> torch.nn.Module:
    torch.manual_seed(seed)
    model = torch.nn.Module()
    for i, shape in enumerate(SIZES):
        model.register_parameter(f"p{i}", torch.nn.Parameter(torch.randn(shape)))
    model.register_buffer("count", torch.tensor(seed, dtype=torch.int64))
    model.register_buffer("flags", torch.tensor([True, False, bool(seed % 2)]))
    # gloo has no collectives for int16 or float8: broadcast as bytes, the large one in place
    model.register_buffer("codes", torch.randint(-(2**15), 2**15, (3 * 2**20,), dtype=torch.int16))
    model.register_buffer("scales", torch.randn(64).to(torch.float8_e4m3fn))
    return model


def stepped(seed: int) -> tuple[torch.nn.Module, torch.optim.Optimizer]:
    model = model_of(seed)
    opt = torch.optim.Adam(model.parameters())
    for p in model.parameters():
        p.grad = torch.full_like(p, 0.5)
    opt.step()
    return model, opt


def state(model: torch.nn.Module, opt: torch.optim.Optimizer) -> dict[str, torch.Tensor]:
    out = {f"model/{k}": v.clone() for k, v in model.state_dict().items()}
    for i, s in opt.state.items():
        out.update({f"opt/{i}/{k}": v.clone() for k, v in s.items()})
    return out


def rchar() -> int:
    with open("/proc/self/io") as f:
        return int(dict(line.split(": ") for line in f.read().splitlines())["rchar"])


def read_once(d: Path, rank: int, world: int) -> dict[str, Any]:
    from tests.jobs.dist_job import record  # the shared job imports this module: late, not circular

    model, opt = stepped(0)
    saved = state(model, opt)
    path = torchckpt.Checkpoint(model=model, opt=opt, rng=torchckpt.RNGState()).write(
        d / "read-once", timeout_secs=TIMEOUT)
    out: dict[str, Any] = {}
    for mode in (True, False, None):
        fresh = model_of(1)
        fresh_opt = torch.optim.Adam(fresh.parameters())
        versions = [t._version for t in [*fresh.parameters(), *fresh.buffers()]]
        before = rchar()
        status = torchckpt.Checkpoint(model=fresh, opt=fresh_opt, rng=torchckpt.RNGState()).read(
            path, read_once=mode, timeout_secs=TIMEOUT)
        out[f"read {mode}"] = rchar() - before
        # written behind autograd's back (read, or broadcast by the rank that read it): the counters move
        out[f"versions moved {mode}"] = all(t._version > v for t, v in zip([*fresh.parameters(), *fresh.buffers()],
                                                                          versions))
        record(out, f"consumed {mode}", status.assert_consumed)
        got = state(fresh, fresh_opt)
        out[f"equal {mode}"] = sorted(got) == sorted(saved) and all(torch.equal(got[k], v) for k, v in saved.items())
    # Ranks whose lists differ (rank 1 restores no optimizer): no spreading, each reads its own.
    other = model_of(2)
    tracked: dict[str, Any] = {"model": other}
    if rank == 0:
        tracked["opt"] = torch.optim.Adam(other.parameters())
    before = rchar()
    torchckpt.Checkpoint(**tracked).read(path, read_once=True, timeout_secs=TIMEOUT).expect_partial()
    out["read differing"] = rchar() - before
    out["equal differing"] = all(torch.equal(v, saved[f"model/{k}"]) for k, v in other.state_dict().items())
    # One destination read twice (two names tracking one tensor), the split falling between the two
    # reads: one rank reads both, in order, as a rank alone would.
    twice = torchckpt.Checkpoint(a=torch.randn(2**18), b=torch.randn(2**18)).write(d / "read-twice",
                                                                                    timeout_secs=TIMEOUT)
    restored = {}
    for mode in (True, False):
        u = torch.zeros(2**18)
        torchckpt.Checkpoint(a=u, b=u).read(twice, read_once=mode, timeout_secs=TIMEOUT)
        restored[mode] = u
    out["twice equal"] = torch.equal(restored[True], restored[False]) and bool(restored[False].abs().sum() > 0)
    # Two tracked tensors over one memory (a buffer and a view of it): the same, by memory, not by object.
    saved_a, saved_b = torch.randn(2**18), torch.randn(2**9, 2**9)
    shaped = torchckpt.Checkpoint(a=saved_a, b=saved_b).write(d / "read-views", timeout_secs=TIMEOUT)
    views = {}
    for mode in (True, False):
        u = torch.zeros(2**18)
        torchckpt.Checkpoint(a=u, b=u.view(2**9, 2**9)).read(shaped, read_once=mode, timeout_secs=TIMEOUT)
        views[mode] = u
    out["views equal"] = torch.equal(views[True], views[False]) and bool(views[False].abs().sum() > 0)
    # Aliasing that differs by rank (rank 0 tracks a buffer and a view of it, rank 1 two tensors):
    # no spreading (the ranks would cut the reads into other runs and wait on each other), each reads its own.
    u = torch.zeros(2**18)
    aliased = (u, u.view(2**9, 2**9)) if rank == 0 else (torch.zeros(2**18), torch.zeros(2**9, 2**9))
    torchckpt.Checkpoint(a=aliased[0], b=aliased[1]).read(shaped, read_once=True, timeout_secs=TIMEOUT)
    # each rank as a single process would restore it: on rank 0 the later key, b, fills the buffer
    expected = (saved_b.reshape(-1), saved_b) if rank == 0 else (saved_a, saved_b)
    out["aliasing differs"] = all(torch.equal(t, e) for t, e in zip(aliased, expected))
    # Parameters that are views of one flat buffer, not overlapping (Megatron's, apex's): spread as any.
    flat = torch.randn(8 * 2**17, generator=torch.Generator().manual_seed(5))
    pieces = {f"p{i}": flat[i * 2**17:(i + 1) * 2**17] for i in range(8)}
    flat_path = torchckpt.Checkpoint(**pieces).write(d / "read-flat", timeout_secs=TIMEOUT)
    for mode in (True, False):
        into = torch.zeros(8 * 2**17)
        before = rchar()
        torchckpt.Checkpoint(**{f"p{i}": into[i * 2**17:(i + 1) * 2**17] for i in range(8)}).read(
            flat_path, read_once=mode, timeout_secs=TIMEOUT)
        out[f"flat read {mode}"] = rchar() - before
        out[f"flat equal {mode}"] = torch.equal(into, flat)
    # A flipped byte in the tensor the last rank reads: every rank raises, none hangs.
    damaged = d / "read-once-damaged"
    if rank == 0:
        shutil.copytree(path, damaged)
        flip_last_replicated(damaged)
    dist.barrier()
    for mode in (True, False):
        target = model_of(3)
        record(out, f"damaged {mode}", lambda mode=mode, target=target: torchckpt.Checkpoint(
            model=target, opt=torch.optim.Adam(target.parameters())).read(str(damaged), read_once=mode,
                                                                           timeout_secs=TIMEOUT))
    return out


def flip_last_replicated(checkpoint: Path) -> None:
    """Flip a bit in the replicated tensor that comes last in file order (the last rank's run)."""
    from tests.jobs.dist_job import flip_tensor_byte

    index = json.loads((checkpoint / "index.json").read_text())
    last: tuple[str, int, str] | None = None
    for file in sorted({f for f in index["weight_map"].values()}):
        data = (checkpoint / file).read_bytes()
        header = json.loads(data[8 : 8 + int.from_bytes(data[:8], "little")])
        for name, entry in header.items():
            start, end = entry["data_offsets"] if name != "__metadata__" and "~r" not in name else (0, 0)
            if end > start and (last is None or (file, start) > (last[0], last[1])):
                last = (file, start, name)
    assert last is not None
    (checkpoint / "damaged-name").write_text(last[2])
    flip_tensor_byte(checkpoint, last[2])


SCENARIOS = {"read_once": read_once}
