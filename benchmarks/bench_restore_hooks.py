"""Peak extra RSS and time of restoring a ~100 MB model with load_state_dict hooks, against a plain one.

Methods, each in a fresh process per round, after one restore of a one-layer model (warm page
cache and code paths: what is compared is the memory and work restore itself adds):
- plain: 25 ``Linear(1024, 1024)`` layers, restored in place;
- layer_hooks: the same with a load_state_dict pre-hook on every layer: each layer is a hooked
  subtree, read into fresh tensors when its turn comes and dropped after;
- root_hook: one pre-hook on the model itself: the whole state is handed to its hook at once;
- torch: ``torchckpt.load_state`` then ``model.load_state_dict`` (what a user would write without the hooked path).

Two memory figures per method: the peak extra RSS (``ru_maxrss``), which also counts the page-cache
pages of a shard mapped while a hooked subtree loads (file-backed: they are the page cache itself,
shared, and dropped with the map), and the peak extra anonymous RSS (``RssAnon`` of
``/proc/self/status``, sampled every millisecond by a thread): the memory restore itself allocates.

On a busy machine, torch's intra-op threads make every copy wait for a core (a 100 MiB copy measured
0.02 to 0.3 s on 2 shared cores); ``--threads 1`` measures the work itself.

Usage: python benchmarks/bench_restore_hooks.py [--layers 25] [--rounds 3] [--threads N]
"""

from __future__ import annotations

import argparse
import json
import os
import sys
import tempfile
import threading
import time

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))

from _common import import_torchckpt, machine, median, peak_rss_bytes, run_fresh  # noqa: E402

METHODS = ("plain", "layer_hooks", "root_hook", "torch")


def make_model(layers: int, method: str):  # type: ignore[no-untyped-def]
    import torch

    torch.manual_seed(0)
    model = torch.nn.Sequential(*[torch.nn.Linear(1024, 1024) for _ in range(layers)])
    calls = []
    if method == "layer_hooks":
        for layer in model:
            layer.register_load_state_dict_pre_hook(lambda *args: calls.append(1))
    if method == "root_hook":
        model.register_load_state_dict_pre_hook(lambda *args: calls.append(1))
    return model, calls


def restore(model, path: str, method: str) -> None:  # type: ignore[no-untyped-def]
    torchckpt = import_torchckpt()

    if method == "torch":
        model.load_state_dict(torchckpt.load_state(path)["model"])
    else:
        torchckpt.Checkpoint(model=model).read(path, progress=False).assert_consumed()


def anon_rss_bytes() -> int:
    """This process's anonymous resident memory now (``RssAnon``): not page-cache pages it maps."""
    with open("/proc/self/status") as f:
        for line in f:
            if line.startswith("RssAnon:"):
                return int(line.split()[1]) * 1024
    return 0


class AnonPeak:
    """The highest ``RssAnon`` seen while it runs, sampled every millisecond on a thread."""

    def __init__(self) -> None:
        self.peak = anon_rss_bytes()
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._sample, daemon=True)

    def _sample(self) -> None:
        while not self._stop.wait(0.001):
            self.peak = max(self.peak, anon_rss_bytes())

    def __enter__(self) -> AnonPeak:
        self._thread.start()
        return self

    def __exit__(self, *exc: object) -> None:
        self._stop.set()
        self._thread.join(timeout=5)
        self.peak = max(self.peak, anon_rss_bytes())


def child(path: str, layers: int, method: str, threads: int | None) -> None:
    import torch

    if threads:
        torch.set_num_threads(threads)

    restore(make_model(1, method)[0], path + "-small", method)  # code paths warm: their pages are not counted
    model, calls = make_model(layers, method)
    with torch.no_grad():
        for p in model.parameters():
            p.zero_()  # touched, and different from the checkpoint
    state_bytes = sum(p.numel() * p.element_size() for p in model.parameters())
    before, anon_before = peak_rss_bytes(), anon_rss_bytes()
    with AnonPeak() as anon:
        start = time.perf_counter()
        restore(model, path, method)
        elapsed = time.perf_counter() - start
    extra = peak_rss_bytes() - before
    assert all(p.abs().sum() > 0 for p in model.parameters())
    assert len(calls) == {"layer_hooks": layers, "root_hook": 1}.get(method, 0)
    print(json.dumps({"seconds": elapsed, "extra_rss": extra, "extra_anon": anon.peak - anon_before,
                      "state_bytes": state_bytes}))


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--layers", type=int, default=25)
    parser.add_argument("--rounds", type=int, default=3)
    parser.add_argument("--threads", type=int, default=None, help="torch's intra-op threads (default: torch's)")
    parser.add_argument("--child", nargs=2, default=None, help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args.child:
        child(args.child[0], args.layers, args.child[1], args.threads)
        return
    torchckpt = import_torchckpt()

    with tempfile.TemporaryDirectory(dir=os.environ.get("BENCH_DIR")) as tmp:
        path = torchckpt.Checkpoint(model=make_model(args.layers, "plain")[0]).write(os.path.join(tmp, "ckpt"))
        torchckpt.Checkpoint(model=make_model(1, "plain")[0]).write(path + "-small")
        results: dict[str, list[dict[str, float]]] = {m: [] for m in METHODS}
        for _ in range(args.rounds):  # interleaved rounds
            for method in METHODS:
                threads = ["--threads", str(args.threads)] if args.threads else []
                results[method].append(run_fresh(__file__, ["--layers", str(args.layers), *threads, "--child", path,
                                                             method]))
    state = results["plain"][0]["state_bytes"]
    print(f"machine: {machine()}")
    print(f"restore {state / 2**20:.0f} MiB in {args.layers} Linear layers, warm cache, {args.rounds} fresh "
          f"processes (medians), torch threads: {args.threads or 'default'}")
    for method in METHODS:
        extra = median([r["extra_rss"] for r in results[method]])
        anon = median([r["extra_anon"] for r in results[method]])
        secs = median([r["seconds"] for r in results[method]])
        print(f"  {method:<12} {secs:.3f} s, peak extra RSS {extra / 2**20:6.1f} MiB = {100 * extra / state:5.1f}% "
              f"of the state, anonymous {anon / 2**20:6.1f} MiB = {100 * anon / state:5.1f}%")


if __name__ == "__main__":
    main()
