"""What one ``CheckpointManager.save()`` call costs on 2 ranks when it has little or nothing to write.

A training loop calls ``save()`` every step and lets ``checkpoint_interval`` skip most calls. On
several ranks even a skipped call is a collective call: the ranks compare its arguments, agree on
the interval and on preemption. This script times that call per rank, in fresh 2-rank gloo jobs
on 127.0.0.1, rounds interleaved, medians:

- ``skipped``: ``save()`` inside the interval (nothing written);
- ``tiny``: ``save(check_interval=False)`` of a 1 KiB state (written and committed).

Methods: ``signals`` (``preemption_signals=(SIGTERM, SIGUSR1)``), ``plain`` (none), and, with
``--before PATH`` (a checkout of an earlier torchckpt), ``before``: that code, no signals.

    python benchmarks/bench_save_call.py [--rounds 3] [--calls 300] [--before /tmp/old-checkout]
"""

from __future__ import annotations

import argparse
import datetime
import json
import os
import shutil
import signal
import sys
import tempfile
import time
from typing import Any

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))

from _common import import_torchckpt, leave, machine, median, round_order, run_ranks  # noqa: E402


def worker(args: argparse.Namespace) -> None:
    import torch
    import torch.distributed as dist

    torchckpt = import_torchckpt()

    dist.init_process_group("gloo", timeout=datetime.timedelta(seconds=600))
    step = torch.tensor(0)
    ckpt = torchckpt.Checkpoint(w=torch.zeros(256), step=step)
    options: dict[str, Any] = {}
    if args.method == "signals":
        options["preemption_signals"] = (signal.SIGTERM, signal.SIGUSR1)
    manager = torchckpt.CheckpointManager(ckpt, args.path, max_to_keep=2, step_counter=step,
                                          checkpoint_interval=10**9, progress=False, **options)
    manager.save()  # the first call always writes
    skipped, tiny = [], []
    for i in range(args.calls):
        step += 1
        start = time.perf_counter()
        assert manager.save() is None
        skipped.append(time.perf_counter() - start)
        if i % 10 == 0:
            start = time.perf_counter()
            manager.save(check_interval=False)
            tiny.append(time.perf_counter() - start)
    manager.close()
    gathered: list[Any] = [None] * dist.get_world_size()
    dist.all_gather_object(gathered, {"skipped": median(skipped), "tiny": median(tiny)})
    if dist.get_rank() == 0:
        print(json.dumps(gathered))
    dist.destroy_process_group()
    leave()


def job(method: str, path: str, calls: int, before: str | None) -> list[dict[str, float]]:
    root = before if method == "before" else os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
    command = [sys.executable, os.path.abspath(__file__), "--worker", "--method", method, "--path", path,
               "--calls", str(calls)]
    return run_ranks(2, command, method, timeout=600, env={"PYTHONPATH": str(root)}, cwd=root)  # type: ignore[no-any-return]


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--worker", action="store_true", help=argparse.SUPPRESS)
    parser.add_argument("--method")
    parser.add_argument("--path")
    parser.add_argument("--calls", type=int, default=300)
    parser.add_argument("--rounds", type=int, default=3)
    parser.add_argument("--before", default=None, help="a checkout of an earlier torchckpt to compare with")
    args = parser.parse_args()
    if args.worker:
        worker(args)
        return
    methods = ["signals", "plain", *(["before"] if args.before else [])]
    root = tempfile.mkdtemp(prefix="bench-save-call-")
    found: dict[str, list[dict[str, float]]] = {m: [] for m in methods}
    try:
        for r in range(args.rounds):
            for method in round_order(methods, r):
                path = os.path.join(root, method)
                shutil.rmtree(path, ignore_errors=True)
                ranks = job(method, path, args.calls, args.before)
                found[method].append({k: max(rank[k] for rank in ranks) for k in ("skipped", "tiny")})
                print(method, {k: round(v * 1000, 3) for k, v in found[method][-1].items()}, "ms", flush=True)
    finally:
        shutil.rmtree(root, ignore_errors=True)
    report = {"machine": machine(), "ms per call (slowest rank, median)": {
        m: {k: round(median([x[k] for x in rounds]) * 1000, 3) for k in ("skipped", "tiny")}
        for m, rounds in found.items()}}
    print(json.dumps(report, indent=1))


if __name__ == "__main__":
    main()
