"""How long inspecting shapes and dtypes takes: big vs tiny checkpoints, and 20,000 tensors.

Each measurement runs in a fresh process with a cold page cache and times
``load_checkpoint(path)`` plus ``get_variable_to_shape_map()`` and ``get_variable_to_dtype_map()``
(the import is not timed). Usage: python benchmarks/bench_inspect.py [--rounds 5]
"""

from __future__ import annotations

import argparse
import json
import os
import sys
import tempfile
import time

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))

from _common import drop_page_cache, machine, median, run_fresh  # noqa: E402


def inspect_once(path: str) -> tuple[float, int]:
    import torchckpt

    start = time.perf_counter()
    reader = torchckpt.load_checkpoint(path)
    shapes = reader.get_variable_to_shape_map()
    reader.get_variable_to_dtype_map()
    return time.perf_counter() - start, len(shapes)


def child(path: str, cold: bool) -> None:
    if cold:
        drop_page_cache([path])
    else:
        inspect_once(path)  # files in the page cache, code paths warm (as a long-lived process sees it)
    elapsed, count = inspect_once(path)
    print(json.dumps({"seconds": elapsed, "tensors": count}))


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__)
    parser.add_argument("--rounds", type=int, default=5)
    parser.add_argument("--child", default=None, help=argparse.SUPPRESS)
    parser.add_argument("--warm", action="store_true", help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args.child:
        child(args.child, cold=not args.warm)
        return
    import torch

    import torchckpt

    with tempfile.TemporaryDirectory(dir=os.environ.get("BENCH_DIR")) as tmp:
        big = torchckpt.Checkpoint(**{f"layer{i}": torch.ones(1_000_000) for i in range(384)}).write(
            os.path.join(tmp, "big"), max_shard_size="500MB")
        tiny = torchckpt.Checkpoint(**{f"layer{i}": torch.ones(2) for i in range(384)}).write(os.path.join(tmp, "tiny"))
        model = {f"blocks.{i // 10}.w{i % 10}": torch.ones(5, 2) for i in range(20_000)}
        many = torchckpt.Checkpoint(model=model).write(os.path.join(tmp, "many"))
        cases = {"1.5 GB, 384 tensors": big, "3 KB, 384 tensors": tiny, "800 KB, 20,000 tensors": many}
        cold: dict[str, list[float]] = {k: [] for k in cases}
        warm: dict[str, list[float]] = {k: [] for k in cases}
        for _ in range(args.rounds):  # interleaved rounds
            for label, path in cases.items():
                cold[label].append(run_fresh(__file__, ["--child", path])["seconds"])
                warm[label].append(run_fresh(__file__, ["--child", path, "--warm"])["seconds"])
    print(f"machine: {machine()}")
    print(f"load_checkpoint + shape and dtype maps, fresh process per measurement, median of {args.rounds} rounds:")
    print(f"  {'checkpoint':24s} {'cold page cache':>18s} {'warm':>18s}")
    for label in cases:
        print(f"  {label:24s} {1000 * median(cold[label]):15.2f} ms {1000 * median(warm[label]):15.2f} ms")


if __name__ == "__main__":
    main()
