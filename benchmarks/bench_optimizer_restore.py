"""Restoring a model and its Adam state when the model has many parameters.

torch's ``Optimizer.load_state_dict`` looks up each state tensor's parameter group with a scan of
the group's parameter list, so its time grows with the square of the parameter count; torchckpt
hands it lists with set lookups (``_load.optimizer``). Each measurement runs in a fresh process,
with the files in the page cache (the part measured is the CPU's), into a model and an optimizer
that never stepped, as a resumed run builds them:

- raw: the same bytes, from one file of them back to back, ``preadv`` into the parameters and
  into the state Adam's first step allocates (allocated here, as a restore must): the floor;
- torch: ``torch.load(mmap=True)`` of a ``torch.save`` of both state dicts, then
  ``model.load_state_dict`` and ``optimizer.load_state_dict``;
- torchckpt: ``Checkpoint(model=..., opt=...).read``.

No memory column: the states here (at most about 40 MiB with Adam's) are smaller than what the
process held at its peak before the restore (importing torch), so the growth of its peak resident
memory shows nothing.

Rounds are interleaved (``_common.round_order``); medians. Usage:
python benchmarks/bench_optimizer_restore.py [--rounds 5] [--params 1000,10000]
"""

from __future__ import annotations

import argparse
import gc
import json
import os
import sys
import tempfile
import time
from typing import Any

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))

from _common import import_torchckpt, machine, median, round_order, run_fresh  # noqa: E402
from bench_distributed import raw_load  # noqa: E402  (preadv in batches of 512 views)

METHODS = {"raw": "raw preadv into the parameters and fresh Adam state", "torch": "torch.load(mmap=True) + load_state_dict",
           "torchckpt": "torchckpt"}


def build(params: int, stepped: bool) -> tuple[Any, Any]:
    """A model of ``params`` parameters (``params // 2`` Linear(16, 16) layers) and its Adam, after
    one step when ``stepped`` (always the same values)."""
    import torch

    torch.manual_seed(0)
    model = torch.nn.Sequential(*[torch.nn.Linear(16, 16) for _ in range(params // 2)])
    opt = torch.optim.Adam(model.parameters(), lr=1e-3)
    if stepped:
        for p in model.parameters():
            p.grad = torch.full_like(p, 1e-3)
        opt.step()
    return model, opt


def tensors_in_order(model: Any, opt: Any) -> list[Any]:
    """The parameters, then each parameter's Adam state (``step``, ``exp_avg``, ``exp_avg_sq``)."""
    return [*model.parameters(), *(opt.state[p][k] for p in model.parameters() for k in ("step", "exp_avg", "exp_avg_sq"))]


def raw_restore(model: Any, opt: Any, raw_file: str) -> None:
    """With the garbage collector paused, as torchckpt pauses it: tens of thousands of new objects
    otherwise trigger collections that grow with the heap."""
    import torch

    from torchckpt import _tensorio

    gc.disable()
    try:
        for p in model.parameters():  # what Adam's first step allocates, allocated as a restore must
            opt.state[p] = {"step": torch.tensor(0.0), "exp_avg": torch.empty_like(p), "exp_avg_sq": torch.empty_like(p)}
        raw_load(raw_file, [_tensorio.byte_view(t) for t in tensors_in_order(model, opt)])
    finally:
        gc.enable()


def read_into_cache(path: str) -> None:
    """Through a 1 MiB buffer: a larger one would set the process's peak RSS before the restore."""
    for name in [path] if os.path.isfile(path) else [os.path.join(path, n) for n in os.listdir(path)]:
        with open(name, "rb", buffering=0) as f:
            while f.read(2**20):
                pass


def child(method: str, params: int, checkpoint: str, pt_file: str) -> None:
    import torch

    torchckpt = import_torchckpt()
    model, opt = build(params, stepped=False)
    with torch.no_grad():
        for p in model.parameters():
            p.zero_()
    raw_file = pt_file + ".raw"
    read_into_cache({"torch": pt_file, "raw": raw_file}.get(method, checkpoint))
    start = time.perf_counter()
    if method == "raw":
        raw_restore(model, opt, raw_file)
    elif method == "torch":
        loaded = torch.load(pt_file, weights_only=True, mmap=True)
        model.load_state_dict(loaded["model"])
        opt.load_state_dict(loaded["opt"])
    else:
        torchckpt.Checkpoint(model=model, opt=opt).read(checkpoint, progress=False).assert_consumed()
    seconds = time.perf_counter() - start
    ref_model, ref_opt = build(params, stepped=True)
    assert all(torch.equal(a, b) for a, b in zip(model.parameters(), ref_model.parameters())), method
    for p, q in zip(model.parameters(), ref_model.parameters()):
        assert all(torch.equal(opt.state[p][k], ref_opt.state[q][k]) for k in ("step", "exp_avg", "exp_avg_sq")), method
    print(json.dumps({"seconds": seconds}))


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--rounds", type=int, default=5)
    parser.add_argument("--params", default="1000,10000")
    parser.add_argument("--child", nargs=4, default=None, help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args.child:
        method, params, checkpoint, pt_file = args.child
        child(method, int(params), checkpoint, pt_file)
        return
    import torch

    torchckpt = import_torchckpt()
    counts = [int(n) for n in args.params.split(",")]
    times: dict[tuple[int, str], list[float]] = {(n, m): [] for n in counts for m in METHODS}
    with tempfile.TemporaryDirectory(dir=os.environ.get("BENCH_DIR")) as tmp:
        files = {}
        for n in counts:
            model, opt = build(n, stepped=True)
            checkpoint = torchckpt.Checkpoint(model=model, opt=opt).write(os.path.join(tmp, f"ckpt-{n}"),
                                                                        progress=False)
            pt_file = os.path.join(tmp, f"state-{n}.pt")
            torch.save({"model": model.state_dict(), "opt": opt.state_dict()}, pt_file)
            with open(pt_file + ".raw", "wb") as f:
                for t in tensors_in_order(model, opt):
                    f.write(memoryview(t.detach().numpy()).cast("B"))
            files[n] = (checkpoint, pt_file)
        for r in range(args.rounds):
            for n in counts:
                for method in round_order(list(METHODS), r):
                    found = run_fresh(__file__, ["--child", method, str(n), *files[n]])
                    times[(n, method)].append(found["seconds"])
    print(machine())
    print(f"restore a model and its stepped Adam state into fresh ones, files in the page cache, fresh process "
          f"per measurement, median of {args.rounds} interleaved rounds:")
    print("| parameters | tensors | method | seconds | fastest-slowest round | vs raw |\n|---|---|---|---|---|---|")
    for n in counts:
        raw = median(times[(n, "raw")])
        for method, label in METHODS.items():
            found = times[(n, method)]
            print(f"| {n:,} | {4 * n:,} | {label} | {median(found):.3f} | {min(found):.3f}-{max(found):.3f} | "
                  f"{median(found) / raw:.2f}x |")


if __name__ == "__main__":
    main()
