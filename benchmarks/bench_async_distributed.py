"""How long an async save blocks training on 2 ranks, against one process saving the same bytes.

Each measurement is a fresh job. In a job the state is saved ``--saves`` times in a row with
``async_save=True`` (the first lays out the reusable host buffers; the others reuse them, as a
training run does), waiting for each save to be durable before the next, every parameter changed
between two saves (outside the timed part), so that no save can reuse the one before's shards
(incremental saves, the manager's default, would hard-link them instead). Reported per method:
the time ``save()`` blocked (the slowest rank, median of the saves after the first, and the
first on its own) and the time until the save was durable. Rounds are interleaved; the table
gives medians over rounds.

    python benchmarks/bench_async_distributed.py [--rounds 3] [--saves 6]

Methods (192 MiB of parameters and Adam state per process in every case):
- ``torchckpt-2``: FSDP2 over 8 x Linear(2048) + Adam on 2 gloo ranks, ``CheckpointManager(...,
  async_save=True).save()`` on every rank;
- ``dcp-2``: the same job with ``torch.distributed.checkpoint.async_save`` (its defaults, the
  default gloo group), DCP's own async save; blocked time is the call, durable is its future;
- ``torchckpt-1``: one process holding 8 x Linear(2048 -> 1024) + Adam, the same bytes as one
  rank holds, with the same manager;
- ``copy-1``: one process copying those bytes into preallocated host memory (``copy_``): the floor
  for a snapshot of them.
"""

from __future__ import annotations

import argparse
import datetime
import json
import os
import shutil
import sys
import tempfile
import time
from typing import Any

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))

from _common import import_torchckpt, leave, machine, median, round_order, run_ranks  # noqa: E402

METHODS = ("torchckpt-2", "dcp-2", "torchckpt-1", "copy-1")


def worker(args: argparse.Namespace) -> None:
    import torch

    torchckpt = import_torchckpt()

    world = int(os.environ.get("WORLD_SIZE", "1"))
    distributed = world > 1
    if distributed:
        import torch.distributed as dist
        from torch.distributed.fsdp import fully_shard

        dist.init_process_group("gloo", timeout=datetime.timedelta(seconds=600))
        model = torch.nn.Sequential(*[torch.nn.Linear(2048, 2048) for _ in range(8)])
        for layer in model:
            fully_shard(layer)
        fully_shard(model)
    else:
        model = torch.nn.Sequential(*[torch.nn.Linear(2048, 1024) for _ in range(8)])
    opt = torch.optim.Adam(model.parameters(), lr=1e-3)
    for p in model.parameters():
        p.grad = torch.ones_like(p) * 1e-3
    opt.step()
    blocked, durable = [], []

    def step(model: Any) -> None:  # every weight changes between saves, as training changes them
        with torch.no_grad():
            for p in model.parameters():
                p.add_(1e-3)

    if args.method == "copy-1":
        tensors = [*model.parameters(), *(v for s in opt.state.values() for v in s.values() if v.dim())]
        copies = [torch.empty_like(t) for t in tensors]
        for _ in range(args.saves):
            start = time.perf_counter()
            with torch.no_grad():
                for c, t in zip(copies, tensors):
                    c.copy_(t)
            blocked.append(time.perf_counter() - start)
            durable.append(blocked[-1])
    elif args.method == "dcp-2":
        import torch.distributed.checkpoint as dcp
        from torch.distributed.checkpoint.state_dict import get_state_dict

        for i in range(args.saves):
            step(model)
            model_sd, optim_sd = get_state_dict(model, opt)
            dist.barrier()
            start = time.perf_counter()
            future = dcp.async_save({"model": model_sd, "optim": optim_sd},
                                    checkpoint_id=os.path.join(args.path, f"ckpt-{i}"))
            blocked.append(time.perf_counter() - start)
            future.result()
            durable.append(time.perf_counter() - start)
    else:
        manager = torchckpt.CheckpointManager(torchckpt.Checkpoint(model=model, opt=opt), args.path, max_to_keep=2,
                                              async_save=True, progress=False)
        for _ in range(args.saves):
            step(model)
            if distributed:
                dist.barrier()
            start = time.perf_counter()
            manager.save()
            blocked.append(time.perf_counter() - start)
            manager.wait_until_finished()
            durable.append(time.perf_counter() - start)
        manager.close()
    result = {"blocked": blocked, "durable": durable,
              "bytes": sum(t.numel() * t.element_size() for t in
                           [*(getattr(p, "_local_tensor", p) for p in model.parameters()),
                            *(getattr(v, "_local_tensor", v) for s in opt.state.values() for v in s.values())])}
    if distributed:
        gathered: list[Any] = [None] * world
        dist.all_gather_object(gathered, result)
        dist.destroy_process_group()
        if dist_rank() == 0:
            print(json.dumps(gathered))
        leave()
    else:
        print(json.dumps([result]))


def dist_rank() -> int:
    return int(os.environ.get("RANK", "0"))


def job(method: str, path: str, saves: int) -> list[dict[str, Any]]:
    world = 2 if method.endswith("-2") else 1
    command = [sys.executable, __file__, "--worker", "--method", method, "--path", path, "--saves", str(saves)]
    return run_ranks(world, command, method)  # type: ignore[no-any-return]


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--worker", action="store_true", help=argparse.SUPPRESS)
    parser.add_argument("--method", choices=METHODS)
    parser.add_argument("--path")
    parser.add_argument("--saves", type=int, default=6)
    parser.add_argument("--rounds", type=int, default=3)
    parser.add_argument("--dir", default=None, help="where checkpoints are written (default: a temporary folder)")
    args = parser.parse_args()
    if args.worker:
        worker(args)
        return
    root = tempfile.mkdtemp(prefix="bench-async-distributed-", dir=args.dir)
    found: dict[str, list[dict[str, float]]] = {m: [] for m in METHODS}
    try:
        for r in range(args.rounds):
            for method in round_order(METHODS, r):
                path = os.path.join(root, method)
                shutil.rmtree(path, ignore_errors=True)
                ranks = job(method, path, args.saves)
                slowest = [max(rank["blocked"][i] for rank in ranks) for i in range(args.saves)]
                durable = [max(rank["durable"][i] for rank in ranks) for i in range(args.saves)]
                found[method].append({"first": slowest[0], "steady": median(slowest[1:]),
                                      "durable": median(durable[1:]), "mib": ranks[0]["bytes"] / 2**20})
                print(method, {k: round(v, 4) for k, v in found[method][-1].items()}, flush=True)
    finally:
        shutil.rmtree(root, ignore_errors=True)
    report: dict[str, Any] = {"machine": machine(), "rows": {}}
    for method, rounds in found.items():
        report["rows"][method] = {k: round(median([x[k] for x in rounds]), 4) for k in rounds[0]}
        report["rows"][method]["steady_range"] = [round(min(x["steady"] for x in rounds), 4),
                                                  round(max(x["steady"] for x in rounds), 4)]
    print(json.dumps(report, indent=1))


if __name__ == "__main__":
    main()
