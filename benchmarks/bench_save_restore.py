"""Save and restore speed and memory: torchckpt against raw I/O, torch.save, safetensors, DCP and TensorFlow.

Every measurement runs in a fresh process. Rounds are interleaved (round 1 of every method, then
round 2, ...; each round starts with another method, and each method runs right after each other
one equally often, not always after the same one: ``_common.round_order``),
and the table reports medians with the fastest and slowest round, the ratio
to the raw write/read of the same bytes in the same run, and peak extra RSS over the state size.
Every save includes fsync of what it wrote; every restore reads into existing tensors from a
cold page cache, except the "right after its save" rows. Each process runs a full garbage
collection before its clock starts: importing torch leaves one due, and whichever method allocates
enough objects first would otherwise pay it (about 55 ms here). Collections a method causes
itself still count. Restores also report their CPU time: the whole process's, every reader thread
included, so it can exceed the wall time.

Restore rows, each method at its best on this machine:

- raw readinto: one stream of ``readinto`` straight into the tensors, the floor of a single reader;
- raw, 4 parallel readers: four threads, each with its own descriptor, ``readinto`` a contiguous
  quarter of the file; this disk serves parallel readers about twice as fast as one, so this is
  the floor any restore can reach here;
- torch.load(mmap=True) + copy_: the file mapped and each tensor copied into its destination
  (page-fault readahead keeps several reads in flight; no second copy of the state);
- safetensors: ``safe_open`` and one mapped tensor at a time, copied in;
- right after its save, in another process: one fresh process saves, the next restores at once,
  the page cache left as the save left it (the pattern of a validation job that loads each new
  checkpoint); for torchckpt and for torch.save then torch.load(mmap=True), and for torchckpt
  saving through ``CheckpointManager(warm_page_cache=True)``, whose save process stays until its
  background warm-up was asked of the kernel (a training run goes on after a save). The summary
  adds each save's own time to its restore: the whole "save, then restore elsewhere" sequence.

    python benchmarks/bench_save_restore.py [--rounds 3] [--workloads big,many,gpt2]
        [--ops save,restore] [--methods raw,torchckpt,...] [--tf-python PATH] [--device cpu|cuda]

Workloads: big = 1 GiB fp32 in 200 tensors; many = 100 MB in 20,000 tensors; gpt2 = a
GPT-2-small-shaped model (124M parameters) with AdamW state (about 1.5 GB).

TensorFlow's CheckpointManager is measured too when TensorFlow can be imported, by this
interpreter or by the one ``--tf-python`` names (TensorFlow and torch rarely share a virtual
environment happily: ``python -m venv tf && tf/bin/pip install torch==2.13.0 tensorflow-cpu``).

``--device cuda`` puts the state on the GPU: saves copy it to host memory first (raw: a
device-to-host copy, then the write), restores read into the GPU tensors. The report then adds
the measured device-to-host bandwidth and compares the time an async save blocks with the
state size divided by that bandwidth (the least any snapshot can take).
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
import warnings

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))

RAW_READERS = 4

from _common import (  # noqa: E402
    cached_share,
    drop_page_cache,
    import_torchckpt,
    machine,
    median,
    peak_rss_bytes,
    round_order,
    run_fresh,
)

SAVE_METHODS = ["raw", "torch", "safetensors", "dcp", "tf", "torchckpt", "torchckpt-async"]
RESTORE_METHODS = ["raw", "raw-parallel", "torch", "safetensors", "dcp", "tf", "torchckpt", "torch-after-save",
                   "torchckpt-after-save", "torchckpt-warm-after-save"]
LABELS = {"raw": "raw write / readinto", "raw-parallel": f"raw, {RAW_READERS} parallel readers",
          "torch": "torch.save / torch.load(mmap=True) + copy_", "safetensors": "safetensors",
          "dcp": "torch DCP", "tf": "TensorFlow CheckpointManager", "torchckpt": "torchckpt",
          "torchckpt-async": "torchckpt async (blocked)",
          "torch-after-save": "torch.load(mmap=True) + copy_, right after torch.save in another process",
          "torchckpt-after-save": "torchckpt, right after its save in another process",
          "torchckpt-warm-after-save": "torchckpt, right after its save with `warm_page_cache=True`, in another process"}
BASE = {"raw-parallel": "raw", "torch-after-save": "torch", "torchckpt-after-save": "torchckpt",  # how each writes
        "torchckpt-warm-after-save": "torchckpt-warm"}
AFTER_SAVE = {"torch-after-save", "torchckpt-after-save", "torchckpt-warm-after-save"}
PEERS = ["raw-parallel", "torch", "safetensors"]  # the best reads this machine offers, for the summary line


def make_state(workload: str, device: str = "cpu") -> dict[str, torch.Tensor]:  # noqa: F821
    state = _make_state(workload)
    if device != "cpu":
        state = {k: v.to(device) for k, v in state.items()}
    return state


def _make_state(workload: str) -> dict[str, torch.Tensor]:  # noqa: F821
    import torch

    if workload == "big":
        per = 2**30 // 4 // 200
        return {f"layer{i}.weight": torch.full((per,), float(i)) for i in range(200)}
    if workload == "many":
        per = 100 * 10**6 // 4 // 20_000
        return {f"blocks.{i // 20}.p{i % 20}": torch.full((per,), float(i % 7)) for i in range(20_000)}
    if workload == "gpt2":
        shapes = {"wte.weight": (50257, 768), "wpe.weight": (1024, 768)}
        for layer in range(12):
            p = f"h.{layer}."
            shapes.update({p + "ln_1.weight": (768,), p + "ln_1.bias": (768,), p + "attn.c_attn.weight": (768, 2304),
                           p + "attn.c_attn.bias": (2304,), p + "attn.c_proj.weight": (768, 768),
                           p + "attn.c_proj.bias": (768,), p + "ln_2.weight": (768,), p + "ln_2.bias": (768,),
                           p + "mlp.c_fc.weight": (768, 3072), p + "mlp.c_fc.bias": (3072,),
                           p + "mlp.c_proj.weight": (3072, 768), p + "mlp.c_proj.bias": (768,)})
        shapes.update({"ln_f.weight": (768,), "ln_f.bias": (768,)})
        state = {}
        for i, (name, shape) in enumerate(shapes.items()):  # parameters, then AdamW's state per parameter
            state[f"model.{name}"] = torch.full(shape, 0.01 * (i % 5))
            state[f"opt.{i}.exp_avg"] = torch.full(shape, 0.001)
            state[f"opt.{i}.exp_avg_sq"] = torch.full(shape, 0.0001)
            state[f"opt.{i}.step"] = torch.tensor(100.0)
        return state
    raise ValueError(workload)


def _fsync_tree(path: str) -> None:
    paths = [path] if os.path.isfile(path) else [os.path.join(d, f) for d, _, fs in os.walk(path) for f in fs]
    for p in paths:
        fd = os.open(p, os.O_RDONLY)
        os.fsync(fd)
        os.close(fd)


def _byte_view(t):  # type: ignore[no-untyped-def]
    from torchckpt._tensorio import byte_view

    return byte_view(t)


def _host(t):  # type: ignore[no-untyped-def]
    """``t`` in host memory: itself on the CPU, else a device-to-host copy."""
    return t if t.device.type == "cpu" else t.cpu()


def _sync(state: dict) -> None:  # type: ignore[type-arg]
    import torch

    if any(t.device.type == "cuda" for t in state.values()):
        torch.cuda.synchronize()


def save(method: str, state: dict, path: str) -> dict:  # type: ignore[type-arg]
    import torch

    start = time.perf_counter()
    blocked = None
    if method == "raw":
        with open(path, "wb") as f:
            for t in state.values():
                f.write(_byte_view(_host(t)))
            f.flush()
            os.fsync(f.fileno())
    elif method == "tf":
        import tensorflow as tf

        manager = tf.train.CheckpointManager(tf.train.Checkpoint(state=state), path, max_to_keep=1)
        manager.save()
        _fsync_tree(path)
    elif method == "torch":
        with open(path, "wb") as f:
            torch.save(state, f)
            f.flush()
            os.fsync(f.fileno())
    elif method == "safetensors":
        from safetensors.torch import save_file

        save_file(state, path)
        _fsync_tree(path)
    elif method == "dcp":
        import torch.distributed.checkpoint as dcp

        dcp.save(state, checkpoint_id=path)
        _fsync_tree(path)
    elif method == "torchckpt":
        import torchckpt

        torchckpt.Checkpoint(state=state).write(path, progress=False)
    elif method == "torchckpt-warm":  # a run a validation process follows on this machine
        import torchckpt
        from torchckpt._storage import warm

        torchckpt.CheckpointManager(torchckpt.Checkpoint(state=state), path, warm_page_cache=True, progress=False).save()
        seconds = time.perf_counter() - start
        warm.wait_for_warm_ups()  # the run would go on; this process stays for its warm-up
        return {"seconds": seconds, "blocked": blocked, "warm_asked": time.perf_counter() - start}
    elif method == "torchckpt-async":
        import torchckpt

        manager = torchckpt.CheckpointManager(torchckpt.Checkpoint(state=state), path, async_save=True, progress=False)
        start = time.perf_counter()
        manager.save()  # the first save allocates the reusable host buffers; training saves many times
        first_blocked = time.perf_counter() - start
        manager.wait_until_finished()
        for t in state.values():
            t.add_(1)  # a training step: every tensor changed, so the save writes every byte (an
            # incremental save would link the unchanged shards of the first and write nothing)
        start = time.perf_counter()
        manager.save()
        blocked = time.perf_counter() - start
        for t in state.values():
            t.add_(1)  # training goes on at once
        manager.wait_until_finished()
        return {"seconds": time.perf_counter() - start, "blocked": blocked, "first_blocked": first_blocked}
    return {"seconds": time.perf_counter() - start, "blocked": blocked}


def restore(method: str, dest: dict, path: str) -> None:  # type: ignore[type-arg]
    import torch

    if method == "raw":
        _read_run(path, 0, list(dest.values()))
        _sync(dest)
    elif method == "raw-parallel":
        _read_raw_parallel(dest, path, RAW_READERS)
        _sync(dest)
    elif method == "tf":
        import tensorflow as tf

        tf.train.Checkpoint(state=dest).restore(tf.train.latest_checkpoint(path)).assert_consumed()
    elif method == "torch":  # at its best for a large file: mapped, not read into a second copy
        loaded = torch.load(path, weights_only=True, mmap=True)
        for k, t in dest.items():
            t.copy_(loaded[k])
        _sync(dest)
    elif method == "safetensors":  # at its best: one mapped tensor at a time, not load_file's full copy
        from safetensors import safe_open

        with safe_open(path, framework="pt") as f:
            for k, t in dest.items():
                t.copy_(f.get_tensor(k))
        _sync(dest)
    elif method == "dcp":
        import torch.distributed.checkpoint as dcp

        dcp.load(dest, checkpoint_id=path)
    elif method == "torchckpt":
        import torchckpt

        torchckpt.Checkpoint(state=dest).read(path, progress=False).assert_consumed()
    elif method == "torchckpt-warm":  # the manager's directory: its latest checkpoint
        import torchckpt

        torchckpt.Checkpoint(state=dest).restore(path, progress=False).assert_consumed()


def _read_run(path: str, offset: int, tensors: list) -> None:  # type: ignore[type-arg]
    """``readinto`` each of ``tensors`` in turn from ``offset`` of the raw file (through pinned host
    memory for a device tensor)."""
    import torch

    with open(path, "rb", buffering=0) as f:
        f.seek(offset)
        for t in tensors:
            if t.device.type == "cpu":
                f.readinto(_byte_view(t))
            else:
                host = torch.empty(t.shape, dtype=t.dtype, pin_memory=True)
                f.readinto(_byte_view(host))
                t.copy_(host)


def _read_raw_parallel(dest: dict, path: str, readers: int) -> None:  # type: ignore[type-arg]
    """``readers`` threads, each with its own descriptor (its own readahead), read a contiguous run
    of the tensors (about 1/readers of the bytes) straight into them."""
    import threading

    import torch

    tensors = list(dest.values())
    total = sum(t.nbytes for t in tensors)
    groups: list[list[tuple[int, torch.Tensor]]] = [[]]
    offset = 0
    for t in tensors:
        if groups[-1] and offset >= total * len(groups) / readers and len(groups) < readers:
            groups.append([])
        groups[-1].append((offset, t))
        offset += t.nbytes

    threads = [threading.Thread(target=_read_run, args=(path, g[0][0], [t for _, t in g])) for g in groups]
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join()


def child(op: str, method: str, workload: str, path: str, device: str) -> None:
    warnings.simplefilter("ignore")
    os.environ.setdefault("TF_CPP_MIN_LOG_LEVEL", "3")
    import torch

    modules = {"safetensors": "safetensors.torch", "dcp": "torch.distributed.checkpoint", "torchckpt": "torchckpt",
               "torchckpt-async": "torchckpt", "torchckpt-warm": "torchckpt", "tf": "tensorflow"}
    if method in modules:  # imports are not part of what is measured, for any method
        __import__(modules[method])
        if modules[method] == "torchckpt":  # its public names load on first use: load them now
            import_torchckpt()
    state = make_state(workload, device)
    state_bytes = sum(t.numel() * t.element_size() for t in state.values())
    if method == "tf":  # TensorFlow saves its own variables: one at a time, so no second copy is ever held
        import tensorflow as tf

        state = {k: tf.Variable(state.pop(k).numpy()) for k in list(state)}
    if op in ("restore", "restore-warm"):
        for t in state.values():
            if method == "tf":
                t.assign(tf.zeros_like(t))
            else:
                t.zero_()
        if op == "restore":  # restore-warm: the page cache as the save in the process before left it
            drop_page_cache([path])
    if method != "tf":
        _sync(state)
    gc.collect()  # the collection the imports left due: not any method's work (see the docstring)
    cached = cached_share(path) if op == "restore-warm" else None  # what the save left in the page cache
    before = peak_rss_bytes()
    if op == "save":
        result = save(method, state, path)
    else:
        start, cpu = time.perf_counter(), time.process_time()
        restore(method, state, path)
        result = {"seconds": time.perf_counter() - start, "cpu_seconds": time.process_time() - cpu, "blocked": None}
    result.update({"extra_rss": peak_rss_bytes() - before, "state_bytes": state_bytes, "cached_at_start": cached})
    if op != "save":
        reference = make_state(workload)
        restored = {k: torch.as_tensor(v.numpy()) if method == "tf" else v.cpu() for k, v in state.items()}
        assert all(torch.equal(restored[k], reference[k]) for k in state), f"{method} restored wrong values"
    if op == "save" and device == "cuda":
        result["d2h_bytes_per_second"] = _device_to_host_bandwidth(state)
    print(json.dumps(result))


def _device_to_host_bandwidth(state: dict) -> float:  # type: ignore[type-arg]
    """Device-to-host copy speed into pinned memory, measured on the state's largest tensor."""
    import torch

    src = max(state.values(), key=lambda t: t.nbytes)
    dst = torch.empty(src.shape, dtype=src.dtype, pin_memory=True)
    times = []
    for _ in range(5):
        torch.cuda.synchronize()
        start = time.perf_counter()
        dst.copy_(src, non_blocking=True)
        torch.cuda.synchronize()
        times.append(time.perf_counter() - start)
    return src.nbytes / median(times)


def _target(method: str, tmp: str, workload: str, op: str) -> str:
    name = f"{workload}-{method}-{op}"
    method = BASE.get(method, method)
    return os.path.join(tmp, name + (".pt" if method == "torch" else ".safetensors" if method == "safetensors" else
                                     ".bin" if method == "raw" else ""))


def _clear(path: str) -> None:
    """Remove ``path`` and wait for the filesystem to finish with it: deleting a GiB costs the disk
    a moment (ext4 mounted with ``discard`` trims it at the next commit), which must not be billed
    to whichever method runs next."""
    if os.path.isdir(path):
        shutil.rmtree(path)
    elif os.path.exists(path):
        os.remove(path)
    os.sync()


def run_workload(workload: str, rounds: int, tmp: str, methods: list[str], device: str,
                 tf_python: str | None, ops: list[str]) -> dict[str, dict[str, list[dict]]]:  # type: ignore[type-arg]
    save_methods = [m for m in SAVE_METHODS if m in methods] if "save" in ops else []
    restore_methods = [m for m in RESTORE_METHODS if m in methods] if "restore" in ops else []
    results: dict[str, dict[str, list[dict]]] = {"save": {m: [] for m in save_methods},  # type: ignore[type-arg]
                                                 "restore": {m: [] for m in restore_methods}}

    def fresh(op: str, method: str, target: str) -> dict:  # type: ignore[type-arg]
        python = tf_python if method == "tf" and tf_python else sys.executable
        return run_fresh(__file__, ["--child", op, method, workload, target, device], python=python)

    sources = {}
    for method in restore_methods:  # files to restore from, written once by each method itself
        if method not in AFTER_SAVE:
            sources[method] = _target(method, tmp, workload, "source")
            fresh("save", BASE.get(method, method), sources[method])
    for r in range(rounds):  # interleaved, in an order of its own each round (``round_order``)
        for method in round_order(save_methods, r):
            target = _target(method, tmp, workload, "save")
            _clear(target)
            results["save"][method].append(fresh("save", method, target))
            _clear(target)
        for method in round_order(restore_methods, r):
            if method in AFTER_SAVE:  # a fresh save, then at once a restore in the next process
                target = _target(method, tmp, workload, "save")
                _clear(target)
                saved = fresh("save", BASE[method], target)
                restored = fresh("restore-warm", BASE[method], target)
                restored["save_seconds"] = saved["seconds"]
                results["restore"][method].append(restored)
                _clear(target)
            else:
                results["restore"][method].append(fresh("restore", method, sources[method]))
    for path in sources.values():
        _clear(path)
    return results


def report(workload: str, results: dict, rounds: int) -> list[str]:  # type: ignore[type-arg]
    lines = []
    state = next(iter(results["save"].values() or results["restore"].values()))[0]["state_bytes"]
    titles = {"big": "1 GiB fp32 in 200 tensors", "many": "100 MB in 20,000 tensors",
              "gpt2": "GPT-2 small + AdamW state"}
    for op in ("save", "restore"):
        if not results[op]:
            continue
        raw = median([r["seconds"] for r in results[op]["raw"]])
        lines.append(f"\n{op} {titles[workload]} ({state / 2**20:.0f} MiB), median of {rounds} rounds"
                     + (", cold page cache" if op == "restore" else ", fsync included"))
        lines.append("| method | seconds | fastest-slowest round | vs raw | peak extra RSS |")
        lines.append("|---|---|---|---|---|")
        for method, runs in results[op].items():
            times = [r["blocked"] if r["blocked"] is not None else r["seconds"] for r in runs]
            secs = median(times)
            rss = median([r["extra_rss"] for r in runs]) / state
            label = LABELS[method]
            extra = ""
            if method == "torchckpt-async":
                total = median([r["seconds"] for r in runs])
                sync = median([r["seconds"] for r in results[op]["torchckpt"]])
                first = median([r["first_blocked"] for r in runs])
                extra = (f" (until durable {total:.3f} s; blocked = {100 * secs / sync:.0f}% of a sync save; the "
                         f"first save, which lays out the host buffers, blocks {first:.3f} s = "
                         f"{100 * first / sync:.0f}% of a sync save)")
            lines.append(f"| {label} | {secs:.3f}{extra} | {min(times):.3f}-{max(times):.3f} | {secs / raw:.2f}x "
                         f"| {100 * rss:.1f}% |")
        if op == "restore":
            lines += _restore_summary(results[op])
        bandwidths = [r["d2h_bytes_per_second"] for r in results[op].get("torchckpt-async", [])
                      if "d2h_bytes_per_second" in r]
        if bandwidths:
            bw = median(bandwidths)
            blocked = median([r["blocked"] for r in results[op]["torchckpt-async"]])
            floor = state / bw
            lines.append(f"\ndevice-to-host bandwidth (pinned) {bw / 1e9:.1f} GB/s: copying the state takes at least "
                         f"{floor:.3f} s; an async save blocks {blocked:.3f} s = {blocked / floor:.2f}x that")
    return lines


def _restore_summary(runs: dict) -> list[str]:  # type: ignore[type-arg]
    """torchckpt against the fastest read this machine offers, cold and right after a save (what #24 accepts)."""
    secs = {method: median([r["seconds"] for r in rs]) for method, rs in runs.items()}
    lines = []
    peers = [m for m in PEERS if m in secs]
    if "torchckpt" in secs and peers:
        best = min(peers, key=secs.__getitem__)
        lines.append(f"\ntorchckpt cold: {secs['torchckpt'] / secs[best]:.2f}x the fastest peer ({LABELS[best]}, "
                     f"{secs[best]:.3f} s)")
    if "torch-after-save" in secs:
        torch_restore = secs["torch-after-save"]
        torch_both = median([r["save_seconds"] + r["seconds"] for r in runs["torch-after-save"]])
        for method in ("torchckpt-after-save", "torchckpt-warm-after-save"):
            if method in secs:
                both = median([r["save_seconds"] + r["seconds"] for r in runs[method]])
                lines.append(f"{LABELS[method]}: the restore {secs[method] / torch_restore:.2f}x torch.load(mmap=True) "
                             f"right after torch.save; save + restore {both:.3f} s against torch.save + torch.load "
                             f"{torch_both:.3f} s ({both / torch_both:.2f}x)")
        for method in ("torch-after-save", "torchckpt-after-save", "torchckpt-warm-after-save"):
            rounds = [r for r in runs.get(method, []) if r.get("cached_at_start") is not None]
            if rounds:
                lines.append(f"{LABELS[method]}: in the page cache as the restore began (and the restore), by round: "
                             + ", ".join(f"{r['cached_at_start']:.0%} ({r['seconds']:.3f} s, CPU of all threads {r['cpu_seconds']:.3f} s)"
                                        for r in rounds))
        lines.append("(the \"right after\" rows read what the save left in the page cache; their \"vs raw\" is "
                     "against the cold raw read)")
    return lines


def _tensorflow_python(requested: str | None) -> str | None:
    """The interpreter that runs the TensorFlow measurements, or None when none can import it."""
    for python in ([requested] if requested else [sys.executable]):
        probe = subprocess.run([python, "-c", "import tensorflow, torch"], capture_output=True)
        if probe.returncode == 0:
            return python
    return None


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__)
    parser.add_argument("--rounds", type=int, default=3)
    parser.add_argument("--workloads", default="big,many,gpt2")
    parser.add_argument("--methods", default=",".join(dict.fromkeys(SAVE_METHODS + RESTORE_METHODS)),
                        help="comma-separated subset to run")
    parser.add_argument("--ops", default="save,restore", help="save, restore or both")
    parser.add_argument("--tf-python", default=None, help="an interpreter that imports tensorflow and torch")
    parser.add_argument("--device", default="cpu", choices=["cpu", "cuda"], help="where the state lives")
    parser.add_argument("--child", nargs=5, default=None, help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args.child:
        child(*args.child)
        return
    lines = [f"machine: {machine()}"]
    import torch

    lines.append(f"torch {torch.__version__}")
    methods = args.methods.split(",")
    if "raw" not in methods:  # every ratio is against it
        methods.insert(0, "raw")
    if args.device == "cuda":
        lines.append(f"device: {torch.cuda.get_device_name()}")
        methods = [m for m in methods if m != "tf"]  # TensorFlow's variables would live on the CPU: no comparison
    tf_python = _tensorflow_python(args.tf_python) if "tf" in methods else None
    if tf_python is None and "tf" in methods:
        methods.remove("tf")
        lines.append("TensorFlow is not importable here (see --tf-python): its rows are left out")
    elif tf_python is not None:
        version = subprocess.run([tf_python, "-c", "import tensorflow as tf; print(tf.__version__)"],
                                 capture_output=True, text=True, env={**os.environ, "TF_CPP_MIN_LOG_LEVEL": "3"})
        lines.append(f"TensorFlow {version.stdout.strip()} ({tf_python})")
    with tempfile.TemporaryDirectory(dir=os.environ.get("BENCH_DIR")) as tmp:
        for workload in args.workloads.split(","):
            results = run_workload(workload, args.rounds, tmp, methods, args.device, tf_python, args.ops.split(","))
            lines += report(workload, results, args.rounds)
            print("\n".join(lines), flush=True)
            lines = []


if __name__ == "__main__":
    main()
