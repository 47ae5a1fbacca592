"""One benchmark run alternately on an earlier checkout and on this one: is a change free?

Each round runs the benchmark script of the earlier checkout with that checkout's package first on
``PYTHONPATH``, then this checkout's script with this package (the order alternates from round to
round, so neither always runs second), and prints each run's output under a header. The benchmark
itself runs every measurement in fresh processes and reports its own medians; compare the
``torchckpt`` rows of the two sides.

    python benchmarks/before_after.py --before /tmp/old-checkout [--rounds 2] -- \\
        bench_save_restore.py --workloads many --methods raw,torchckpt --rounds 3

Make the earlier checkout with ``git worktree add /tmp/old-checkout <commit>``.
"""

from __future__ import annotations

import argparse
import os
import subprocess
import sys

HERE = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


def run(tree: str, script: str, args: list[str]) -> str:
    env = {**os.environ, "PYTHONPATH": tree + os.pathsep + os.environ.get("PYTHONPATH", "")}
    out = subprocess.run([sys.executable, os.path.join(tree, "benchmarks", script), *args], env=env, cwd=tree,
                         capture_output=True, text=True)
    if out.returncode:
        raise SystemExit(f"{script} on {tree} failed:\n{out.stderr[-3000:]}")
    return out.stdout


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--before", required=True, help="a checkout of the earlier code")
    parser.add_argument("--rounds", type=int, default=2)
    parser.add_argument("benchmark", nargs=argparse.REMAINDER, help="-- SCRIPT [ARGS...] in benchmarks/")
    args = parser.parse_args()
    script, *bench_args = [a for a in args.benchmark if a != "--"] or [""]
    if not script:
        parser.error("name the benchmark script after --")
    trees = {"before": os.path.abspath(args.before), "after": HERE}
    for r in range(args.rounds):
        for side in (["before", "after"] if r % 2 == 0 else ["after", "before"]):
            print(f"==== round {r + 1}, {side} ({trees[side]})", flush=True)
            print(run(trees[side], script, bench_args), flush=True)


if __name__ == "__main__":
    main()
