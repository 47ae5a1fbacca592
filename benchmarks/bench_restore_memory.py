"""Peak extra RSS of restoring a 1 GiB state into existing tensors, as a fraction of the state.

Each round restores in a fresh process with a cold page cache; the destination tensors are
allocated and touched before the measurement starts, so what is measured is what restore itself
adds. Usage: python benchmarks/bench_restore_memory.py [--gib 1.0] [--rounds 3]
"""

from __future__ import annotations

import argparse
import json
import os
import sys
import tempfile
import time

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))

from _common import drop_page_cache, import_torchckpt, machine, median, peak_rss_bytes, run_fresh  # noqa: E402


def make_state(gib: float, count: int = 200) -> dict[str, torch.Tensor]:  # noqa: F821
    import torch

    per = int(gib * 2**30) // 4 // count
    return {f"layer{i}": torch.full((per,), float(i + 1)) for i in range(count)}  # none zero: a read shows


def child(path: str, gib: float) -> None:
    import torch

    torchckpt = import_torchckpt()

    dest = {k: torch.empty_like(v) for k, v in make_state(gib).items()}
    for t in dest.values():
        t.zero_()  # touch every page before measuring
    state_bytes = sum(t.numel() * t.element_size() for t in dest.values())
    drop_page_cache([path])
    before = peak_rss_bytes()
    start = time.perf_counter()
    torchckpt.Checkpoint(**dest).read(path, progress=False).assert_consumed()
    elapsed = time.perf_counter() - start
    extra = peak_rss_bytes() - before
    assert all(torch.all(t == i + 1) for i, t in enumerate(dest.values()))
    print(json.dumps({"seconds": elapsed, "extra_rss": extra, "state_bytes": state_bytes}))


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__)
    parser.add_argument("--gib", type=float, default=1.0)
    parser.add_argument("--rounds", type=int, default=3)
    parser.add_argument("--child", default=None, help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args.child:
        child(args.child, args.gib)
        return
    torchckpt = import_torchckpt()

    with tempfile.TemporaryDirectory(dir=os.environ.get("BENCH_DIR")) as tmp:
        path = torchckpt.Checkpoint(**make_state(args.gib)).write(os.path.join(tmp, "ckpt"))
        results = [run_fresh(__file__, ["--gib", str(args.gib), "--child", path]) for _ in range(args.rounds)]
    state = results[0]["state_bytes"]
    extra = median([r["extra_rss"] for r in results])
    secs = median([r["seconds"] for r in results])
    print(f"machine: {machine()}")
    print(f"restore {state / 2**30:.2f} GiB in 200 tensors, cold cache, {args.rounds} fresh processes (medians)")
    print(f"  time {secs:.3f} s, peak extra RSS {extra / 2**20:.1f} MiB = {100 * extra / state:.2f}% of the state")


if __name__ == "__main__":
    main()
