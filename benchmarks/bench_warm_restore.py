"""Where a restore from a warm page cache spends its time: copying, and checking the checksums.

Right after a save with ``warm_page_cache=True`` a restore in another process reads memory, not the
disk, and is bound by the CPU. This splits that restore into its parts, each in a fresh process
with the checkpoint's files wholly in the page cache (read once before), into existing tensors:

- torchckpt: ``Checkpoint.read`` (every byte copied and hashed, as always);
- torchckpt, ``verify=False``: the same read without the checksums;
- preadv, N threads: the tensors' bytes copied out of the page cache by N threads, each with its
  own descriptor and a contiguous part of the file (the copy alone);
- xxh3, N threads: hashing the state's bytes in memory (the checks alone; an estimate: a restore
  hashes each batch right after copying it, this hashes memory no copy touched just before);
- torch.load(mmap=True) + copy_: the peer, from its own file, also wholly in the page cache.

Each process runs a full garbage collection before its clock starts (importing torch leaves one
due). Rounds are interleaved (``_common.round_order``); medians. Usage:
python benchmarks/bench_warm_restore.py [--rounds 5] [--gib 1.0]
"""

from __future__ import annotations

import argparse
import gc
import json
import os
import sys
import tempfile
import threading
import time
from typing import Any

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))

from _common import import_torchckpt, machine, median, round_order, run_fresh  # noqa: E402
from bench_restore_memory import make_state  # noqa: E402  (every tensor a non-zero value: a read shows)

METHODS = {"torchckpt": "torchckpt", "torchckpt-noverify": "torchckpt, verify=False",
           "preadv-1": "preadv, 1 thread (the copy alone)", "preadv-2": "preadv, 2 threads (the copy alone)",
           "xxh3-1": "xxh3, 1 thread (the checks alone)", "xxh3-2": "xxh3, 2 threads (the checks alone)",
           "torch": "torch.load(mmap=True) + copy_"}


def read_into_cache(path: str) -> None:
    for name in [path] if os.path.isfile(path) else [os.path.join(path, n) for n in os.listdir(path)]:
        with open(name, "rb", buffering=0) as f:
            while f.read(2**24):
                pass


def in_threads(work: Any, parts: list[Any]) -> None:
    threads = [threading.Thread(target=work, args=part) for part in parts]
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join()


def child(method: str, checkpoint: str, pt_file: str, gib: float) -> None:
    import torch
    import xxhash

    torchckpt = import_torchckpt()
    dest = make_state(gib)
    for t in dest.values():
        t.zero_()  # resident before the measurement
    views = [memoryview(t.numpy()).cast("B") for t in dest.values()]
    read_into_cache(pt_file if method == "torch" else checkpoint)
    shard = next(os.path.join(checkpoint, n) for n in os.listdir(checkpoint) if n.endswith(".safetensors"))
    data_start = os.path.getsize(shard) - sum(len(v) for v in views)  # one shard: the header, then the data
    threads = int(method.rsplit("-", 1)[1]) if method[-1].isdigit() else 1
    per = -(-len(views) // threads)
    groups = [views[i:i + per] for i in range(0, len(views), per)]
    offsets = [data_start + sum(len(v) for g in groups[:k] for v in g) for k in range(len(groups))]

    def copy(group: list[memoryview], offset: int) -> None:
        fd = os.open(shard, os.O_RDONLY)
        try:
            for view in group:
                if os.preadv(fd, [view], offset) != len(view):
                    raise EOFError(f"{shard} ended before offset {offset + len(view)}")
                offset += len(view)
        finally:
            os.close(fd)

    def check(group: list[memoryview]) -> None:
        for view in group:
            xxhash.xxh3_64_intdigest(view)

    gc.collect()  # the collection the imports left due: no method's work (as in bench_save_restore.py)
    start = time.perf_counter()
    if method == "torchckpt":
        torchckpt.Checkpoint(**dest).read(checkpoint, progress=False).assert_consumed()
    elif method == "torchckpt-noverify":
        torchckpt.Checkpoint(**dest).read(checkpoint, progress=False, verify=False).assert_consumed()
    elif method.startswith("preadv"):
        in_threads(copy, list(zip(groups, offsets)))
    elif method.startswith("xxh3"):
        in_threads(check, [(g,) for g in groups])
    elif method == "torch":
        loaded = torch.load(pt_file, weights_only=True, mmap=True)
        for k, t in dest.items():
            t.copy_(loaded[k])
    seconds = time.perf_counter() - start
    if not method.startswith("xxh3"):
        assert all(torch.all(t == i + 1) for i, t in enumerate(dest.values())), f"{method} read wrong values"
    print(json.dumps({"seconds": seconds}))


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--rounds", type=int, default=5)
    parser.add_argument("--gib", type=float, default=1.0)
    parser.add_argument("--child", nargs=3, default=None, help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args.child:
        child(*args.child, gib=args.gib)
        return
    import torch

    torchckpt = import_torchckpt()
    with tempfile.TemporaryDirectory(dir=os.environ.get("BENCH_DIR")) as tmp:
        state = make_state(args.gib)
        checkpoint = torchckpt.Checkpoint(**state).write(os.path.join(tmp, "ckpt"))
        shards = [n for n in os.listdir(checkpoint) if n.endswith(".safetensors")]
        assert len(shards) == 1, f"one shard expected (the raw reads take its data as one run): {shards}"
        pt_file = os.path.join(tmp, "state.pt")
        torch.save(state, pt_file)
        del state
        times: dict[str, list[float]] = {m: [] for m in METHODS}
        for r in range(args.rounds):
            for method in round_order(list(METHODS), r):
                found = run_fresh(__file__, ["--gib", str(args.gib), "--child", method, checkpoint, pt_file])
                times[method].append(found["seconds"])
    print(machine())
    print(f"restore {args.gib:g} GiB in 200 tensors from a warm page cache, fresh process per measurement, "
          f"median of {args.rounds} interleaved rounds:")
    print("| method | seconds | fastest-slowest round |\n|---|---|---|")
    for method, label in METHODS.items():
        found = times[method]
        print(f"| {label} | {median(found):.3f} | {min(found):.3f}-{max(found):.3f} |")


if __name__ == "__main__":
    main()
