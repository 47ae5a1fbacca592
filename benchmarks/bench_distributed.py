"""Saves by several ranks and resharding loads: torchckpt against DCP and raw per-rank I/O, on gloo.

Each measurement is a fresh job of WORLD processes on 127.0.0.1. Rounds are interleaved (each round
starts with another method, in an order of its own: ``_common.round_order``). Wall time runs from a
barrier before the call to a barrier after it (the slowest rank). Per-rank bytes come from each
process's I/O counters (``/proc/self/io``: ``write_bytes``, what reached storage, ``rchar``, what
the read calls returned, and ``read_bytes``, what the process made the storage deliver: on one host
the ranks share the page cache, and a byte two ranks read is fetched once), peak RSS from ``ru_maxrss``. Loads start from a cold page cache (the files are fsynced and dropped
with ``posix_fadvise(DONTNEED)``), into a fresh model and a never-stepped optimizer.

    python benchmarks/bench_distributed.py [--world 2,4] [--rounds 3] [--workloads big,many,ddp]

Workloads:
- big: FSDP2 over 8 x Linear(2048) + Adam after one step (384 MiB in all);
- many: FSDP2 over 500 x Linear(64) + Adam (about 24 MiB, 4,000 tensors per rank on 2 ranks);
- ddp: a GPT-2-small-shaped model (124 M parameters) + AdamW, replicated (DDP), 1.5 GB of state;
- reshard: big and many saved on 2 and loaded on 4, saved on 4 and loaded on 2.

Bytes read over bytes needed is reported twice: everything the ranks read, and the tensor data
alone (less the metadata every rank reads: DCP's ``.metadata``; torchckpt's ``index.json`` and
shard headers).

Methods:
- raw: each rank writes its local tensors' bytes with ``os.writev`` into one file and fsyncs it,
  and reads them back with ``os.preadv``: the floor for the same bytes (same world size only);
- raw-all: the same files, read back as a restore must place them: every byte the rank restores
  (for ddp every rank's file, the whole replicated state) into the model's parameters and a
  never-stepped optimizer's freshly allocated state. The floor of a restore in which every rank
  ends up holding the state, memory allocation included (with the garbage collector paused, as
  torchckpt's restores pause it);
- dcp: ``torch.distributed.checkpoint.save``/``load`` (``FileSystemWriter``, its defaults) of
  ``get_state_dict``, then ``set_state_dict`` on load;
- torchckpt: ``Checkpoint(model=..., opt=...).write`` / ``.read`` (its defaults: on one host each
  rank reads what it restores);
- torchckpt-once: the same save, and ``.read(..., read_once=True)``: each replicated tensor read by
  one rank and broadcast over the gloo group (``_load.spread``; the default across hosts).
"""

from __future__ import annotations

import argparse
import datetime
import gc
import json
import os
import shutil
import sys
import tempfile
import time
from typing import Any

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))

from _common import (  # noqa: E402
    drop_page_cache,
    import_torchckpt,
    leave,
    machine,
    median,
    peak_rss_bytes,
    round_order,
    run_ranks,
)

METHODS = ("raw", "raw-all", "dcp", "torchckpt", "torchckpt-once")


# -- the worker: one rank ------------------------------------------------------------------------


def build(workload: str, seed: int) -> tuple[Any, Any, Any]:
    """(model whose state is saved, optimizer, the module given to the checkpoint)."""
    import torch
    from torch.distributed.fsdp import fully_shard

    torch.manual_seed(seed)
    if workload == "ddp":
        model = gpt2_small_shaped()
        wrapped = torch.nn.parallel.DistributedDataParallel(model)
        opt = torch.optim.AdamW(wrapped.parameters(), lr=1e-4)
        return wrapped, opt, wrapped
    dim, layers = {"big": (2048, 8), "many": (64, 500)}[workload]
    model = torch.nn.Sequential(*[torch.nn.Linear(dim, dim) for _ in range(layers)])
    for layer in model:
        fully_shard(layer)
    fully_shard(model)
    opt = torch.optim.Adam(model.parameters(), lr=1e-3)
    return model, opt, model


def gpt2_small_shaped() -> Any:
    import torch

    class Block(torch.nn.Module):
        def __init__(self) -> None:
            super().__init__()
            self.ln_1, self.ln_2 = torch.nn.LayerNorm(768), torch.nn.LayerNorm(768)
            self.c_attn, self.attn_proj = torch.nn.Linear(768, 2304), torch.nn.Linear(768, 768)
            self.c_fc, self.mlp_proj = torch.nn.Linear(768, 3072), torch.nn.Linear(3072, 768)

    model = torch.nn.Module()
    model.wte, model.wpe = torch.nn.Embedding(50257, 768), torch.nn.Embedding(1024, 768)
    model.h = torch.nn.ModuleList(Block() for _ in range(12))
    model.ln_f = torch.nn.LayerNorm(768)
    return model


def first_step(model: Any, opt: Any) -> None:
    import torch

    for p in model.parameters():
        p.grad = torch.ones_like(p) * 1e-3  # a step's worth of state, the same on every rank
    opt.step()
    opt.zero_grad()


def local_tensors(model: Any, opt: Any) -> list[Any]:
    import torch

    out = []
    for value in [*model.state_dict().values(), *(v for s in opt.state.values() for v in s.values())]:
        if isinstance(value, torch.Tensor):
            out.append(value._local_tensor if hasattr(value, "_local_tensor") else value)  # DTensor: no autograd call
    return out


def share(tensors: list[Any], workload: str, rank: int, world: int) -> list[memoryview]:
    """This rank's bytes: its local shards, or (replicated DDP state) an equal 1/world of the bytes."""
    from torchckpt import _tensorio

    views = [_tensorio.byte_view(t) for t in tensors]
    if workload != "ddp":
        return views
    total = sum(len(v) for v in views)
    start, end = total * rank // world, total * (rank + 1) // world
    out, offset = [], 0
    for v in views:
        lo, hi = max(start, offset), min(end, offset + len(v))
        if lo < hi:
            out.append(v[lo - offset : hi - offset])
        offset += len(v)
    return out


def raw_save(path: str, views: list[memoryview]) -> None:
    fd = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_TRUNC, 0o644)
    try:
        for i in range(0, len(views), 512):
            os.writev(fd, views[i : i + 512])
        os.fsync(fd)
    finally:
        os.close(fd)


def raw_load(path: str, views: list[memoryview]) -> None:
    fd = os.open(path, os.O_RDONLY)
    try:
        offset = 0
        for i in range(0, len(views), 512):
            batch = views[i : i + 512]
            os.preadv(fd, batch, offset)
            offset += sum(len(v) for v in batch)
    finally:
        os.close(fd)


def fresh_adam_state(opt: Any) -> None:
    """The state Adam's first step creates (``step``, ``exp_avg``, ``exp_avg_sq``, in its order),
    allocated and never touched, as a restore into a never-stepped optimizer must allocate it."""
    import torch
    from torch.distributed.tensor import DTensor

    def like(p: Any) -> Any:  # a DTensor through its constructor, as torchckpt makes one: no checks
        if isinstance(p, DTensor):
            return DTensor(torch.empty_like(p._local_tensor), p._spec, requires_grad=False)
        return torch.empty_like(p)

    for group in opt.param_groups:
        for p in group["params"]:
            opt.state[p] = {"step": torch.tensor(0.0), "exp_avg": like(p), "exp_avg_sq": like(p)}


def raw_load_all(directory: str, tensors: list[Any], workload: str, rank: int, world: int) -> None:
    """Every byte this rank restores: its own file, or for replicated (ddp) state every rank's."""
    for r in range(world) if workload == "ddp" else [rank]:
        raw_load(os.path.join(directory, f"rank{r}.bin"), share(tensors, workload, r, world))


def dcp_state(model: Any, opt: Any) -> dict[str, Any]:
    from torch.distributed.checkpoint.state_dict import get_state_dict

    model_sd, optim_sd = get_state_dict(model, opt)
    return {"model": model_sd, "optim": optim_sd}


def metadata_bytes(path: str, method: str) -> int:
    """What every rank of a load reads besides tensor data: DCP's ``.metadata``; torchckpt's
    ``index.json`` and each shard's 8-byte length and header (every rank validates them all)."""
    if method == "dcp":
        return os.path.getsize(os.path.join(path, ".metadata"))
    if not method.startswith("torchckpt"):
        return 0
    total = os.path.getsize(os.path.join(path, "index.json"))
    for name in os.listdir(path):
        if name.endswith(".safetensors"):
            with open(os.path.join(path, name), "rb") as f:
                total += 8 + int.from_bytes(f.read(8), "little")
    return total


def io_counters() -> tuple[int, int, int]:
    """(bytes written to storage, bytes read by read calls, bytes fetched from storage). ``write_bytes``
    leaves out socket traffic (rank 0 hosts the c10d Store); ``rchar`` counts reads however the page
    cache served them; ``read_bytes`` only what the storage delivered for this process."""
    with open("/proc/self/io") as f:
        fields = dict(line.split(": ") for line in f.read().splitlines())
    return int(fields["write_bytes"]), int(fields["rchar"]), int(fields["read_bytes"])


def checkpoint_bytes(path: str) -> int:
    """The size of every file under ``path``: what a load fetches at least once from storage."""
    return sum(os.path.getsize(os.path.join(d, f)) for d, _, fs in os.walk(path) for f in fs)


def worker(args: argparse.Namespace) -> None:
    import safetensors.torch
    import torch
    import torch.distributed as dist

    torchckpt = import_torchckpt()  # its public names load on first use: not part of what is measured
    rank, world = int(os.environ["RANK"]), int(os.environ["WORLD_SIZE"])
    dist.init_process_group("gloo", timeout=datetime.timedelta(seconds=600))
    model, opt, module = build(args.workload, 0)
    result: dict[str, Any] = {}
    if args.mode == "save":
        first_step(module, opt)
        state = dcp_state(module, opt) if args.method == "dcp" else None
        tensors = local_tensors(module, opt)
        os.makedirs(args.path, exist_ok=True)
        dist.barrier()
        w0, r0, _ = io_counters()
        t0 = time.perf_counter()
        if args.method in ("raw", "raw-all"):
            raw_save(os.path.join(args.path, f"rank{rank}.bin"), share(tensors, args.workload, rank, world))
        elif args.method == "dcp":
            import torch.distributed.checkpoint as dcp

            dcp.save(state, checkpoint_id=args.path)
        else:
            torchckpt.Checkpoint(model=module, opt=opt).write(args.path)
        dist.barrier()
        seconds = time.perf_counter() - t0
        w1, _, _ = io_counters()
        result = {"seconds": seconds, "written": w1 - w0,
                  "needed": sum(len(v) for v in share(tensors, args.workload, rank, world))}
    else:
        if args.method == "raw":
            first_step(module, opt)  # raw reads into existing state of the same layout
        tensors = local_tensors(module, opt) if args.method == "raw" else []
        needed = sum(len(v) for v in share(tensors, args.workload, rank, world)) if args.method == "raw" else None
        if rank == 0:
            drop_page_cache([args.path])
        dist.barrier()
        _, r0, f0 = io_counters()
        t0 = time.perf_counter()
        if args.method == "raw":
            raw_load(os.path.join(args.path, f"rank{rank}.bin"), share(tensors, args.workload, rank, world))
        elif args.method == "raw-all":
            was_enabled = gc.isenabled()
            gc.disable()  # thousands of new objects: no collection in between, as torchckpt's restore does
            try:
                fresh_adam_state(opt)
                raw_load_all(args.path, local_tensors(module, opt), args.workload, rank, world)
            finally:
                if was_enabled:
                    gc.enable()
        elif args.method == "dcp":
            import torch.distributed.checkpoint as dcp
            from torch.distributed.checkpoint.state_dict import set_state_dict

            state = dcp_state(module, opt)
            dcp.load(state, checkpoint_id=args.path)
            set_state_dict(module, opt, model_state_dict=state["model"], optim_state_dict=state["optim"])
        else:
            torchckpt.Checkpoint(model=module, opt=opt).read(
                args.path, read_once=True if args.method == "torchckpt-once" else None).assert_consumed()
        dist.barrier()
        seconds = time.perf_counter() - t0
        _, r1, f1 = io_counters()
        if needed is None:
            needed = sum(t.nbytes for t in local_tensors(module, opt))
        result = {"seconds": seconds, "read": r1 - r0, "needed": needed, "fetched": f1 - f0,
                  "size": checkpoint_bytes(args.path),
                  "data_read": r1 - r0 - metadata_bytes(args.path, args.method)}
        if args.check:  # every parameter equal to the saved job's, gathered
            ref = safetensors.torch.load_file(args.check)
            full = {k: (v.full_tensor() if hasattr(v, "full_tensor") else v) for k, v in module.state_dict().items()}
            result["equal"] = all(torch.equal(full[k], v) for k, v in ref.items())
    result["peak_rss"] = peak_rss_bytes()
    gathered: list[Any] = [None] * world
    dist.all_gather_object(gathered, result)
    if args.mode == "save" and args.reference:  # the parameters, for the loads to compare against
        full = {k: (v.full_tensor() if hasattr(v, "full_tensor") else v).clone()
                for k, v in module.state_dict().items()}
        if rank == 0:
            safetensors.torch.save_file(full, args.reference)
    dist.barrier()
    dist.destroy_process_group()
    if rank == 0:
        print(json.dumps(gathered))
    leave()


# -- the driver ----------------------------------------------------------------------------------


def job(world: int, args: list[str]) -> list[dict[str, Any]]:
    return run_ranks(world, [sys.executable, __file__, "--worker", *args], f"job {args}")  # type: ignore[no-any-return]


def summarize(rows: list[list[dict[str, Any]]], key: str) -> dict[str, Any]:
    seconds = [max(r["seconds"] for r in ranks) for ranks in rows]
    per_rank = [r[key] for r in rows[-1]]
    needed = [r["needed"] for r in rows[-1]]
    data = [r.get("data_read", r[key]) for r in rows[-1]]
    return {"median": median(seconds), "min": min(seconds), "max": max(seconds),
            "data_ratio_to_needed": round(sum(data) / max(1, sum(needed)), 3),
            f"{key}_mib": [round(b / 2**20, 1) for b in per_rank],
            "needed_mib": [round(b / 2**20, 1) for b in needed],
            "ratio_to_needed": round(sum(per_rank) / max(1, sum(needed)), 3),
            "max_over_mean": round(max(per_rank) / (sum(per_rank) / len(per_rank)), 3),
            "peak_rss_mib": round(max(r["peak_rss"] for r in rows[-1]) / 2**20),
            **({"fetched_over_size": [round(sum(r["fetched"] for r in ranks) / max(1, ranks[0]["size"]), 3)
                                      for ranks in rows]} if "fetched" in rows[-1][0] else {}),
            "equal": all(r.get("equal", True) for ranks in rows for r in ranks)}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--worker", action="store_true", help=argparse.SUPPRESS)
    parser.add_argument("--mode", choices=["save", "load"])
    parser.add_argument("--method", choices=METHODS)
    parser.add_argument("--workload")
    parser.add_argument("--path")
    parser.add_argument("--check")
    parser.add_argument("--reference")
    parser.add_argument("--world", default="2,4")
    parser.add_argument("--rounds", type=int, default=3)
    parser.add_argument("--workloads", default="big,many,ddp")
    parser.add_argument("--methods", default=",".join(METHODS), help="comma-separated subset")
    parser.add_argument("--dir", default=None, help="where checkpoints are written (default: a temporary folder)")
    args = parser.parse_args()
    if args.worker:
        worker(args)
        return
    worlds = [int(w) for w in args.world.split(",")]
    methods = tuple(m for m in METHODS if m in args.methods.split(","))
    root = tempfile.mkdtemp(prefix="bench-distributed-", dir=args.dir)
    report: dict[str, Any] = {"machine": machine(), "rows": {}}
    try:
        for workload in args.workloads.split(","):
            for world in worlds:
                saves: dict[str, list[Any]] = {m: [] for m in methods}
                loads: dict[str, list[Any]] = {m: [] for m in methods}
                for r in range(args.rounds):
                    order = round_order(methods, r)
                    for method in order:
                        path = os.path.join(root, f"{workload}-{world}-{method}")
                        shutil.rmtree(path, ignore_errors=True)
                        reference = os.path.join(root, f"{workload}-{world}.ref")
                        saves[method].append(job(world, ["--mode", "save", "--method", method, "--workload", workload,
                                                         "--path", path, "--reference", reference]))
                        loads[method].append(job(world, ["--mode", "load", "--method", method, "--workload",
                                                         workload, "--path", path, "--check", reference]))
                        print(workload, world, method, "save", round(max(x["seconds"] for x in saves[method][-1]), 3),
                              "load", round(max(x["seconds"] for x in loads[method][-1]), 3), flush=True)
                for method in methods:
                    report["rows"][f"{workload} save world {world} {method}"] = summarize(saves[method], "written")
                    report["rows"][f"{workload} load world {world} {method}"] = summarize(loads[method], "read")
            if workload in ("big", "many") and len(worlds) > 1:
                for saved, loaded in ((worlds[0], worlds[-1]), (worlds[-1], worlds[0])):
                    resharded = [m for m in ("dcp", "torchckpt") if m in methods]  # what this run saved
                    rows: dict[str, list[Any]] = {m: [] for m in resharded}
                    for r in range(args.rounds):
                        for method in (resharded if r % 2 == 0 else resharded[::-1]):
                            path = os.path.join(root, f"{workload}-{saved}-{method}")
                            rows[method].append(job(loaded, [
                                "--mode", "load", "--method", method, "--workload", workload, "--path", path,
                                "--check", os.path.join(root, f"{workload}-{saved}.ref")]))
                            print(workload, f"{saved}->{loaded}", method,
                                  round(max(x["seconds"] for x in rows[method][-1]), 3), flush=True)
                    for method, found in rows.items():
                        report["rows"][f"{workload} reshard {saved}->{loaded} {method}"] = summarize(found, "read")
    finally:
        shutil.rmtree(root, ignore_errors=True)
    print(json.dumps(report, indent=1))


if __name__ == "__main__":
    main()
