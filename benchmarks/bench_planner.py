"""How long a rank takes to plan its part of a save by many ranks: the planner alone, no processes.

A job of WORLD ranks is simulated: each rank's record (entries and DTensor layouts, as
``_save.collective.capture`` builds them) is made here, with each chunk's box from torch's own
``Shard`` rule, and the planner is timed on it. The record's making is not timed (a real save
captures its state anyway); the planning is, from the record to this rank's numbered files:
``_save.layouts.draft`` (the structure's digest and this rank's plan) and ``numbered``.

Workloads (TENSORS tensors per rank, shapes cycling through a transformer's):
- fsdp: every tensor a DTensor sharded on dim 0 over a 1-D mesh of WORLD ranks;
- hsdp: a 2-D mesh (8, WORLD / 8), replicated along the first dimension, sharded along the second;
- ddp: every tensor plain (replicated): spread over the ranks largest first;
- fsdp-tp: FSDP2 over tensor parallelism on a (WORLD / 8, 8) mesh: column-parallel weights and
  their biases are strided shards (``_StridedShard``), row-parallel ones ``Shard(0), Shard(1)``.

Rows: the first plan of a structure (``cold``) and the next save of the same structure (``cached``),
for the first, a middle and the last rank (the slowest is reported), each in a fresh process. For
comparison, the general plan (``_save.plan.global_plan``, every rank's full list on every rank), the
route a save takes when the ranks' structures differ, at smaller sizes.

    python benchmarks/bench_planner.py [--world 1024] [--tensors 20000] [--rounds 3]
"""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import time
from typing import Any

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))

from _common import machine, median  # noqa: E402

SHAPES = [(4096, 1024), (1024,), (1024, 4096), (4096,), (1024, 1024), (1024,)]


# FSDP2 over tensor parallelism on a (world / 8, 8) mesh, for each shape of SHAPES in turn: a
# column-parallel weight (strided: FSDP shards rows that TP sharded first), a vector replicated
# over TP, a row-parallel weight, a vector, a column-parallel weight, a vector
TP_PLACEMENTS = [("S0/8", "S0"), ("S0", "R"), ("S0", "S1"), ("S0", "R"), ("S0/8", "S0"), ("S0", "R")]


def record(workload: str, world: int, tensors: int, rank: int) -> tuple[list[list[Any]], dict[str, Any]]:
    from torch.distributed.tensor.placement_types import Shard

    from torchckpt._dist.dtensor import box_at

    mesh = (8, world // 8) if workload == "hsdp" else (world // 8, 8) if workload == "fsdp-tp" else (world,)
    placements = ("R", "S0") if workload == "hsdp" else ("S0",)
    coordinate = tuple(divmod(rank, mesh[1])) if len(mesh) == 2 else (rank,)
    entries: list[list[Any]] = []
    layouts: dict[str, Any] = {}
    boxes: dict[tuple[Any, ...], tuple[list[int], list[int]]] = {}
    for i in range(tensors):
        shape = SHAPES[i % len(SHAPES)]
        name = f"model/layers.{i // len(SHAPES)}.p{i % len(SHAPES)}"
        if workload == "ddp":
            entries.append([name, "F32", list(shape), None, None, None, 0])
            continue
        if workload == "fsdp-tp":
            tp = TP_PLACEMENTS[i % len(SHAPES)]
            key = (shape, tp)
            if key not in boxes:
                boxes[key] = box_at(shape, mesh, tp, coordinate)
            offsets, sizes = boxes[key]
            entries.append([name, "F32", list(shape), list(offsets), list(sizes), None, 0])
            layouts[name] = (mesh, tp, coordinate)
            continue
        offsets, sizes = [0] * len(shape), list(shape)
        for size, placement, c in zip(mesh, placements, coordinate):
            if placement != "R":
                sizes[0], offsets[0] = Shard.local_shard_size_and_offset(shape[0], size, c)
        entries.append([name, "F32", list(shape), offsets, sizes, None, 0])
        layouts[name] = (mesh, placements, coordinate)
    return entries, layouts


def child(workload: str, world: int, tensors: int, rank: int) -> dict[str, float]:
    from torchckpt._save import layouts as save_layouts
    from torchckpt._threads import gc_paused

    entries, layouts = record(workload, world, tensors, rank)
    times = []
    for _ in range(2):  # the first save of the structure, then the next one
        with gc_paused():  # as a save plans (``_save.saver``)
            start = time.perf_counter()
            draft = save_layouts.draft(entries, layouts, set(), rank, world, 5 * 2**30)
            assert draft is not None
            plan = save_layouts.numbered(draft, [len(draft.shards)] * world, rank)
            times.append(time.perf_counter() - start)
    return {"cold": times[0], "cached": times[1], "files": len(plan.files), "units": len(plan.units)}


def general_child(world: int, tensors: int) -> dict[str, float]:
    from torchckpt._save import plan as save_plan
    from torchckpt._threads import gc_paused

    records = [{"entries": record("fsdp", world, tensors, r)[0]} for r in range(world)]
    with gc_paused():
        start = time.perf_counter()
        save_plan.global_plan(records, 5 * 2**30)
        return {"cold": time.perf_counter() - start}


def fresh(args: list[str]) -> dict[str, Any]:
    out = subprocess.run([sys.executable, __file__, "--child", *args], capture_output=True, text=True, timeout=600,
                         check=True)
    return json.loads(out.stdout.strip().splitlines()[-1])  # type: ignore[no-any-return]


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--world", type=int, default=1024)
    parser.add_argument("--tensors", type=int, default=20000)
    parser.add_argument("--rounds", type=int, default=3)
    parser.add_argument("--workloads", default="fsdp,hsdp,ddp,fsdp-tp,general",
                        help="which rows: fsdp, hsdp, ddp, fsdp-tp (FSDP2 over tensor parallelism), general")
    parser.add_argument("--child", nargs="+", help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args.child:
        if args.child[0] == "general":
            print(json.dumps(general_child(int(args.child[1]), int(args.child[2]))))
        else:
            workload, world, tensors, rank = args.child
            print(json.dumps(child(workload, int(world), int(tensors), int(rank))))
        return
    world, tensors = args.world, args.tensors
    rows: dict[str, Any] = {}
    ranks = [0, world // 2 + 1, world - 1]
    chosen = args.workloads.split(",")
    for workload in [w for w in ("fsdp", "hsdp", "ddp", "fsdp-tp") if w in chosen]:
        found: dict[str, list[float]] = {"cold": [], "cached": []}
        for _ in range(args.rounds):
            runs = [fresh([workload, str(world), str(tensors), str(r)]) for r in ranks]
            for key in found:
                found[key].append(max(run[key] for run in runs))
        rows[f"{workload} {world} ranks x {tensors} tensors"] = {k: round(median(v), 4) for k, v in found.items()}
        print(workload, rows[f"{workload} {world} ranks x {tensors} tensors"], flush=True)
    if "general" not in chosen:
        print(json.dumps({"machine": machine(), "rows": rows}, indent=1))
        return
    for small_world, small_tensors in ((8, 2000), (32, 2000), (128, 2000)):
        seconds = median([fresh(["general", str(small_world), str(small_tensors)])["cold"]
                          for _ in range(args.rounds)])
        rows[f"general plan, {small_world} ranks x {small_tensors} tensors"] = {"cold": round(seconds, 4)}
        print("general", small_world, small_tensors, round(seconds, 4), flush=True)
    per_entry = rows[f"general plan, 128 ranks x {2000} tensors"]["cold"] / (128 * 2000)
    rows["general plan, extrapolated to the job above"] = {"cold": round(per_entry * world * tensors, 1)}
    print(json.dumps({"machine": machine(), "rows": rows}, indent=1))


if __name__ == "__main__":
    main()
