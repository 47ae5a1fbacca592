"""How long inspecting shapes and dtypes takes: big vs tiny checkpoints, and 20,000 tensors.

Each measurement runs in a fresh process with a cold page cache and times
``load_checkpoint(path)`` plus ``get_variable_to_shape_map()`` and ``get_variable_to_dtype_map()``
(the import is not timed, nor the garbage collection the imports leave due). Usage: python benchmarks/bench_inspect.py [--rounds 5]

``--baseline DIR`` also measures the package of another source tree (a checkout of the previous
commit) in the same interleaved rounds, for a before/after table. ``--cases many`` measures only
the listed checkpoints (big, tiny, many, varied; default all).

``--cli`` times the command line instead, as a user sees it: the wall time of a fresh ``python -m
torchckpt inspect`` of 20,000 tensors, ``ls`` of a manager's directory of four checkpoints,
``verify`` and ``diff`` (imports included, as ``/usr/bin/time -f %e`` reports it), interleaved
rounds, medians; with ``--baseline DIR``, the same commands from that tree in the same rounds.
"""

from __future__ import annotations

import argparse
import gc
import json
import os
import shutil
import subprocess
import sys
import tempfile
import time

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))

from _common import drop_page_cache, import_torchckpt, machine, median, run_fresh  # noqa: E402


def inspect_once(path: str) -> tuple[float, int]:
    import torch  # noqa: F401  (the maps return torch objects: a caller of them has torch; its import is not timed)

    torchckpt = import_torchckpt()  # the public names load on first use: not timed either
    # The imports leave a full collection of their ~170,000 objects due, and whichever code next
    # allocates enough pays it (about 60 ms here, more than the inspection): pay it before the timer,
    # so that a collection inside the timed call is one the inspection itself caused.
    gc.collect()
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


def cli_seconds(source: str, argv: list[str]) -> float:
    """Wall time of ``python -m torchckpt ARGV`` run from the source tree ``source``, in a fresh
    process (by ``/usr/bin/time -f %e`` where there is one, which is what a user measures)."""
    command = [sys.executable, "-m", "torchckpt", *argv]
    timer = shutil.which("time") or ("/usr/bin/time" if os.path.exists("/usr/bin/time") else None)
    start = time.perf_counter()
    out = subprocess.run([timer, "-f", "%e", *command] if timer else command, cwd=source, capture_output=True,
                         text=True)
    elapsed = time.perf_counter() - start
    if out.returncode:
        raise RuntimeError(f"torchckpt {' '.join(argv)} failed in {source}:\n{out.stderr[-3000:]}")
    return float(out.stderr.strip().splitlines()[-1]) if timer else elapsed


def cli_main(rounds: int, baseline: str | None) -> None:
    """The command line's wall times (see the module docstring)."""
    import torch

    import torchckpt

    here = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
    sources = {"this tree": here, **({"baseline": os.path.abspath(baseline)} if baseline else {})}
    with tempfile.TemporaryDirectory(dir=os.environ.get("BENCH_DIR")) as tmp:
        model = {f"blocks.{i // 10}.w{i % 10}": torch.ones(5, 2) for i in range(20_000)}
        many = torchckpt.Checkpoint(model=model).write(os.path.join(tmp, "many"))
        run = os.path.join(tmp, "run")
        manager = torchckpt.CheckpointManager(torchckpt.Checkpoint(w=torch.ones(1000), step=torch.tensor(0)), run,
                                              max_to_keep=4)
        for step in range(4):
            manager.save(metrics={"loss": 1.0 / (step + 1)})
        commands = {"inspect (20,000 tensors)": ["inspect", many], "ls (4 checkpoints)": ["ls", run],
                    "verify (20,000 tensors)": ["verify", many], "diff (20,000 tensors)": ["diff", many, many]}
        times: dict[tuple[str, str], list[float]] = {(c, s): [] for c in commands for s in sources}
        for _ in range(rounds):  # interleaved: every command from every tree in each round
            for label, argv in commands.items():
                for source, root in sources.items():
                    times[label, source].append(cli_seconds(root, argv))
    print(f"machine: {machine()}")
    print(f"torchckpt command line, wall time of a fresh process, median of {rounds} interleaved rounds:")
    print(f"  {'command':26s}" + "".join(f"{s:>14s}" for s in sources))
    for label in commands:
        print(f"  {label:26s}" + "".join(f"{median(times[label, s]):12.2f} s" for s in sources))


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__)
    parser.add_argument("--rounds", type=int, default=5)
    parser.add_argument("--cli", action="store_true", help="time the command line (see above)")
    parser.add_argument("--baseline", metavar="DIR", help="also time the source tree DIR (a checkout of an earlier "
                                                          "commit), interleaved")
    parser.add_argument("--cases", default="big,tiny,many,varied", help="the checkpoints to measure (default all)")
    parser.add_argument("--child", default=None, help=argparse.SUPPRESS)
    parser.add_argument("--warm", action="store_true", help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args.child:
        child(args.child, cold=not args.warm)
        return
    if args.cli:
        cli_main(args.rounds, args.baseline)
        return
    import torch

    import torchckpt

    with tempfile.TemporaryDirectory(dir=os.environ.get("BENCH_DIR")) as tmp:
        big = torchckpt.Checkpoint(**{f"layer{i}": torch.ones(1_000_000) for i in range(384)}).write(
            os.path.join(tmp, "big"), max_shard_size="500MB")
        tiny = torchckpt.Checkpoint(**{f"layer{i}": torch.ones(2) for i in range(384)}).write(os.path.join(tmp, "tiny"))
        model = {f"blocks.{i // 10}.w{i % 10}": torch.ones(5, 2) for i in range(20_000)}
        many = torchckpt.Checkpoint(model=model).write(os.path.join(tmp, "many"))
        # the same count with what a model has: many shapes (1,000 here) and two dtypes
        mixed = {f"blocks.{i // 10}.w{i % 10}": torch.ones(i % 1000 + 1, dtype=torch.float32 if i % 3 else torch.bfloat16)
                 for i in range(20_000)}
        varied = torchckpt.Checkpoint(model=mixed).write(os.path.join(tmp, "varied"))
        cases = {"1.5 GB, 384 tensors": big, "3 KB, 384 tensors": tiny, "800 KB, 20,000 tensors": many,
                 "20,000 tensors, 1,000 shapes, 2 dtypes": varied}
        wanted = args.cases.split(",")
        cases = {label: path for (label, path), key in zip(cases.items(), ("big", "tiny", "many", "varied"))
                 if key in wanted}
        trees = {"": None, **({" (baseline)": os.path.abspath(args.baseline)} if args.baseline else {})}
        cold: dict[str, list[float]] = {k + t: [] for k in cases for t in trees}
        warm: dict[str, list[float]] = {k + t: [] for k in cases for t in trees}
        for _ in range(args.rounds):  # interleaved rounds
            for label, path in cases.items():
                for tree, root in trees.items():
                    cold[label + tree].append(_fresh(["--child", path], root)["seconds"])
                    warm[label + tree].append(_fresh(["--child", path, "--warm"], root)["seconds"])
    print(f"machine: {machine()}")
    print(f"load_checkpoint + shape and dtype maps, fresh process per measurement, median of {args.rounds} rounds:")
    print(f"  {'checkpoint':50s} {'cold page cache':>18s} {'warm':>18s}")
    for label in cold:
        print(f"  {label:50s} {1000 * median(cold[label]):15.2f} ms {1000 * median(warm[label]):15.2f} ms")


def _fresh(args: list[str], root: str | None) -> dict[str, float]:
    """A child measurement in a fresh process, importing the package from the source tree ``root``
    (None: the one installed)."""
    if root is None:
        return run_fresh(__file__, args)
    env = {**os.environ, "PYTHONPATH": root}
    out = subprocess.run([sys.executable, __file__, *args], capture_output=True, text=True, env=env, check=True)
    return json.loads(out.stdout.strip().splitlines()[-1])  # type: ignore[no-any-return]


if __name__ == "__main__":
    main()
