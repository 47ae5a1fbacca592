"""Incremental saves (#23): the bytes and time of saves after the first, when most of the state did not change.

A training run saves again and again; with a frozen backbone or LoRA most bytes of a checkpoint are
the bytes of the one before. An incremental save hard-links (local) or copies server-side (object
store) every shard that did not change, after comparing it by xxh3 and reading the placed file
back (unless this process wrote or read back that very file and its stamp is unchanged, see
``_save/reuse.py``: from the second save of a run on a local disk). This script measures what that saves, and what it costs when nothing could be reused.

Every method runs the whole sequence of saves of a workload in a fresh process (model built, one
training step so that Adam has its state, then save, step, save, ...) and reports per save the wall
time of the save call and the bytes it wrote (the ``write_bytes`` delta of ``/proc/self/io`` around
the call: what this process sent to the disk, direct I/O included). Rounds are interleaved (round 1
of every method, then round 2, ..., each round starting with another method, in an order of its own);
the table reports medians with the fastest and slowest round.

    python benchmarks/bench_incremental.py [--rounds 3] [--workloads frozen,lora,changing]
        [--methods raw,dcp,torchckpt-full,torchckpt] [--scale 1.0] [--dir DIR] [--remote] [--gap 0]

``--gap S`` waits S seconds after each training step before the next save, in every method: a run
does many steps between two saves, and a save right behind the previous one also measures the disk
still busy with it (here, reading 500 MB back 0.3 s after writing it took up to 1.5 s).

Workloads:
- frozen: a frozen 64 MiB backbone (16 x Linear(1024, 1024), requires_grad False) and a trainable
  Linear(1024, 10) head with Adam; three saves, a training step between them;
- lora: ``peft`` LoRA (r=8 on c_attn and c_proj) on a GPT-2 built from
  ``GPT2Config(n_layer=12, n_embd=768, n_head=12)`` (124M parameters, 500 MB fp32; the LM head is
  tied to the embedding), Adam on the LoRA parameters; two saves, a step between;
- changing: the same shapes as frozen, every parameter trainable, Adam; two saves, a step
  between: the second save finds every shard changed, so incremental reuses nothing and must
  cost no more than a full save.
``--scale`` shrinks every model (widths, layers and vocabulary times the factor) for a quick try.

Methods:
- raw: the state's tensors (each storage once) written back to back into one new file per save
  with ``open(..., "wb").write`` and fsync: the floor;
- dcp: ``torch.distributed.checkpoint.save({"model": model.state_dict(), "optim":
  optimizer.state_dict()}, storage_writer=FileSystemWriter(new directory))``, no process group,
  with the default FileSystemWriter (one file per rank, ``thread_count=1``, ``sync_files=True``:
  fsynced like every other method), a new directory per save (DCP has no incremental save);
- torchckpt-full: ``CheckpointManager(Checkpoint(model=..., optimizer=...), dir, max_to_keep=2,
  incremental=False)``, ``save()``;
- torchckpt: the same with ``incremental=True`` (the default);
- torchckpt-s3, torchckpt-s3-full (``--remote``, frozen workload only): the two managers on
  ``s3://`` served by moto's S3 server on loopback (started as ``bench_remote.py`` does). The
  MB column is then the bytes uploaded: an event hook on the botocore session s3fs uses sums the
  request bodies of every PUT and POST the client sends (``x-amz-decoded-content-length``, else
  ``Content-Length``), and counts the server-side copies (requests with ``x-amz-copy-source``)
  apart; moto keeps objects in memory, so the times are protocol overhead, not S3 bandwidth.

Where the hashing cost goes: an incremental save hashes each tensor of a shard it may reuse
(stopping at the first that differs), and after linking reads the placed file back and hashes it
where it cannot trust the file's stamp (a file another process wrote; an object store).
On ``changing`` every shard differs, so the torchckpt - torchckpt-full difference of the second
save is the price of a failed check. On ``frozen`` and ``lora`` the torchckpt process measures,
after its saves, the two parts of a successful check apart: xxh3 of the frozen parameters in
memory, and reading plus hashing the reused shard files from a cold and from a warm page cache.

Write to a real disk: on tmpfs ``write_bytes`` stays 0. The default directory is a temporary one
in the system's temporary directory, or under the repository's ``.bench/`` when that is tmpfs.
"""

from __future__ import annotations

import argparse
import json
import os
import shutil
import sys
import tempfile
import time
import warnings
from collections.abc import Callable
from typing import Any

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))

from _common import drop_page_cache, import_torchckpt, machine, median, round_order, run_fresh  # noqa: E402

WORKLOADS = ["frozen", "lora", "changing"]
METHODS = ["raw", "dcp", "torchckpt-full", "torchckpt"]
REMOTE_METHODS = ["torchckpt-s3-full", "torchckpt-s3"]
SAVES = {"frozen": 3, "lora": 2, "changing": 2}
LABELS = {"raw": "raw write + fsync", "dcp": "torch DCP (FileSystemWriter defaults)",
          "torchckpt-full": "torchckpt incremental=False", "torchckpt": "torchckpt (incremental)",
          "torchckpt-s3-full": "torchckpt on moto S3, incremental=False",
          "torchckpt-s3": "torchckpt on moto S3 (incremental)"}
MB = 10**6


# -- the workloads ---------------------------------------------------------------------------------

def build(workload: str, scale: float) -> tuple[Any, Any, Callable[[], None], str]:
    """``(model, optimizer, step, description)``: the model, Adam on its trainable parameters, and
    one training step on random data."""
    import torch

    torch.manual_seed(0)
    if workload == "lora":
        return _lora(scale)
    width = max(8, round(1024 * scale))
    backbone = torch.nn.Sequential(*[torch.nn.Linear(width, width) for _ in range(16)])
    if workload == "frozen":
        backbone.requires_grad_(False)
    model = torch.nn.Sequential(backbone, torch.nn.Linear(width, 10))
    optimizer = torch.optim.Adam([p for p in model.parameters() if p.requires_grad], lr=1e-3)

    def step() -> None:
        loss = model(torch.randn(32, width)).square().mean()
        optimizer.zero_grad()
        loss.backward()
        optimizer.step()

    trainable = "head trainable" if workload == "frozen" else "all trainable"
    return model, optimizer, step, f"16 x Linear({width}, {width}) + Linear({width}, 10), {trainable}, Adam"


def _lora(scale: float) -> tuple[Any, Any, Callable[[], None], str]:
    import torch
    import transformers
    from peft import LoraConfig, get_peft_model

    heads = max(1, round(12 * scale))
    config = transformers.GPT2Config(n_layer=max(1, round(12 * scale)), n_embd=64 * heads, n_head=heads,
                                     vocab_size=max(256, round(50257 * scale)), n_positions=max(64, round(1024 * scale)))
    base = transformers.GPT2LMHeadModel(config)
    lora = LoraConfig(r=8, lora_alpha=16, lora_dropout=0.0, target_modules=["c_attn", "c_proj"], fan_in_fan_out=True)
    model = get_peft_model(base, lora)
    trainable = [p for p in model.parameters() if p.requires_grad]
    optimizer = torch.optim.Adam(trainable, lr=1e-3)
    ids = torch.randint(0, config.vocab_size, (1, 8), generator=torch.Generator().manual_seed(0))

    def step() -> None:
        loss = model(input_ids=ids, labels=ids).loss
        optimizer.zero_grad()
        loss.backward()
        optimizer.step()

    total = sum(p.numel() for p in model.parameters())
    share = sum(p.numel() for p in trainable) / total
    return model, optimizer, step, (f"GPT2Config(n_layer={config.n_layer}, n_embd={config.n_embd}, "
                                    f"n_head={config.n_head}, vocab_size={config.vocab_size}): {total / 1e6:.1f}M "
                                    f"parameters, LoRA r=8 on c_attn, c_proj ({100 * share:.2f}% trainable), Adam")


def state_tensors(model: Any, optimizer: Any) -> list[Any]:
    """The tensors of the model's and the optimizer's state, each storage once (a tied weight too)."""
    import torch

    seen: set[tuple[int, int]] = set()
    out = []
    values = [*model.state_dict().values(), *(v for s in optimizer.state_dict()["state"].values() for v in s.values())]
    for t in values:
        if isinstance(t, torch.Tensor) and (t.data_ptr(), t.nbytes) not in seen:
            seen.add((t.data_ptr(), t.nbytes))
            out.append(t.detach())
    return out


def _bytes_of(t: Any) -> Any:
    """The tensor's bytes as a buffer (no copy for a contiguous CPU tensor)."""
    import torch

    return t.contiguous().reshape(-1).view(torch.uint8).numpy()


# -- one process: the whole sequence of saves of one method --------------------------------------

def written_bytes() -> int:
    """What this process (all its threads) has sent to the storage layer so far."""
    with open("/proc/self/io") as f:
        for line in f:
            if line.startswith("write_bytes:"):
                return int(line.split()[1])
    raise RuntimeError("no write_bytes in /proc/self/io")


class UploadCounter:
    """Counts what an s3fs filesystem sends: an event hook on the botocore session it is built with."""

    def __init__(self) -> None:
        from aiobotocore.session import AioSession

        self.uploaded = 0
        self.downloaded = 0
        self.copies = 0
        self.session = AioSession()
        self.session.register("before-send.s3", self._on_send)
        self.session.register("after-call.s3.GetObject", self._on_get)

    def _on_get(self, parsed: dict[str, Any], **kwargs: Any) -> None:
        self.downloaded += int(parsed.get("ContentLength") or 0)

    def _on_send(self, request: Any, **kwargs: Any) -> None:
        if request.method not in ("PUT", "POST"):
            return
        headers = {k.lower(): v for k, v in request.headers.items()}
        if "x-amz-copy-source" in headers:
            self.copies += 1
            return
        size = headers.get("x-amz-decoded-content-length") or headers.get("content-length")
        body = request.body
        self.uploaded += int(size) if size is not None else len(body) if isinstance(body, (bytes, bytearray)) else 0


def saver(method: str, model: Any, optimizer: Any, directory: str, endpoint: str,
          counter: UploadCounter | None) -> tuple[Callable[[int], str], Callable[[str], bytes] | None]:
    """``(save, read_index)``: ``save(i)`` makes the i-th save and returns where it went;
    ``read_index(path)`` the index of a torchckpt checkpoint (None for the other methods)."""
    if method == "raw":
        def save_raw(i: int) -> str:
            path = os.path.join(directory, f"raw-{i}.bin")
            with open(path, "wb") as f:
                for t in state_tensors(model, optimizer):
                    f.write(_bytes_of(t))
                f.flush()
                os.fsync(f.fileno())
            return path
        return save_raw, None
    if method == "dcp":
        import torch.distributed.checkpoint as dcp
        from torch.distributed.checkpoint import FileSystemWriter

        def save_dcp(i: int) -> str:
            path = os.path.join(directory, f"dcp-{i}")
            dcp.save({"model": model.state_dict(), "optim": optimizer.state_dict()},
                     storage_writer=FileSystemWriter(path), no_dist=True)
            return path
        return save_dcp, None
    torchckpt = import_torchckpt()

    options = None
    if counter is not None:
        import fsspec

        options = {"client_kwargs": {"endpoint_url": endpoint}, "session": counter.session}
        fs = fsspec.filesystem("s3", **options)
        directory = directory.rstrip("/")
    manager = torchckpt.CheckpointManager(torchckpt.Checkpoint(model=model, optimizer=optimizer), directory,
                                          max_to_keep=2, incremental=not method.endswith("-full"), progress=False,
                                          storage_options=options)

    def save_torchckpt(i: int) -> str:
        path = manager.save()
        assert path is not None
        return path

    def read_index(path: str) -> bytes:
        if counter is not None:
            return fs.cat_file(path + "/index.json")  # type: ignore[no-any-return]
        with open(os.path.join(path, "index.json"), "rb") as f:
            return f.read()

    return save_torchckpt, read_index


def reused_files(index: bytes) -> dict[str, int]:
    """The files an incremental save reused, with their sizes, as its index records them."""
    section = json.loads(index)["torchckpt"]
    sizes = {s["file"]: s["size"] for s in section["shards"]}
    return {name: sizes[name] for name in (section.get("reused") or {}).get("files", {})}


def reuse_check_cost(model: Any, path: str, files: list[str]) -> dict[str, float]:
    """The two parts of a successful reuse check, timed apart: xxh3 of the frozen parameters in
    memory, and reading plus hashing the reused files of the checkpoint ``path`` (cold, then warm)."""
    import xxhash

    frozen = list({id(p): p for p in model.parameters() if not p.requires_grad}.values())
    start = time.perf_counter()
    for p in frozen:
        xxhash.xxh3_64(_bytes_of(p.detach())).intdigest()
    out = {"frozen_bytes": float(sum(p.nbytes for p in frozen)), "compare_s": time.perf_counter() - start}
    paths = [os.path.join(path, f) for f in files]
    drop_page_cache(paths)
    for key in ("readback_cold_s", "readback_warm_s"):
        start = time.perf_counter()
        for p in paths:
            _hash_file(p)
        out[key] = time.perf_counter() - start
    return out


def _hash_file(path: str) -> int:
    import xxhash

    hasher = xxhash.xxh3_64()
    buf = bytearray(8 * 2**20)
    view = memoryview(buf)
    with open(path, "rb", buffering=0) as f:
        while n := f.readinto(buf):
            hasher.update(view[:n])
    return hasher.intdigest()


def child(method: str, workload: str, directory: str, scale: float, endpoint: str, gap: float) -> None:
    warnings.simplefilter("ignore")
    import torch
    import torch.distributed.checkpoint  # noqa: F401  imports are in no method's time

    import_torchckpt()  # its public names load on first use: in no method's time either

    model, optimizer, train_step, description = build(workload, scale)

    def step() -> None:  # one thread: faster on a small machine shared by others, and no save is timed here
        threads = torch.get_num_threads()
        torch.set_num_threads(1)
        try:
            train_step()
        finally:
            torch.set_num_threads(threads)

    step()  # Adam has its state, as in a run in progress
    counter = UploadCounter() if method.startswith("torchckpt-s3") else None
    save, read_index = saver(method, model, optimizer, directory, endpoint, counter)
    saves = []
    for i in range(SAVES[workload]):
        if i:
            step()
            time.sleep(gap)  # the rest of a training run between two saves (--gap)
        written, uploaded = written_bytes(), counter.uploaded if counter else 0
        downloaded, copies = (counter.downloaded, counter.copies) if counter else (0, 0)
        start = time.perf_counter()
        path = save(i)
        record: dict[str, Any] = {"seconds": time.perf_counter() - start, "written": written_bytes() - written}
        if counter is not None:
            record["written"] = counter.uploaded - uploaded
            record["copies"] = counter.copies - copies
            record["downloaded"] = counter.downloaded - downloaded
        if read_index is not None:
            record["reused"] = sum(reused_files(read_index(path)).values())
        saves.append(record)
    result: dict[str, Any] = {"saves": saves, "description": description,
                              "state_bytes": sum(t.nbytes for t in state_tensors(model, optimizer))}
    if method == "torchckpt" and workload != "changing" and read_index is not None:
        result["check"] = reuse_check_cost(model, path, list(reused_files(read_index(path))))
    print(json.dumps(result))


# -- the parent: rounds, servers, the table ---------------------------------------------------------

def run_workload(workload: str, rounds: int, root: str, methods: list[str], scale: float,
                 endpoint: str, gap: float) -> dict[str, list[dict[str, Any]]]:
    results: dict[str, list[dict[str, Any]]] = {m: [] for m in methods}
    script = os.path.abspath(__file__)
    for r in range(rounds):
        order = round_order(methods, r)
        for method in order:
            remote = method.startswith("torchckpt-s3")
            target = f"s3://bench/{workload}-{method}-{r}" if remote else os.path.join(root, f"{workload}-{method}")
            if not remote:
                os.makedirs(target)
            try:
                results[method].append(run_fresh(script, ["--child", method, workload, target, str(scale), endpoint,
                                                                 str(gap)]))
            finally:
                _clear(target, endpoint)
    return results


def _clear(target: str, endpoint: str) -> None:
    """Remove what a run wrote, and let the disk finish with it (ext4 with ``discard`` trims at
    the next commit) before the next method is timed; moto holds objects in memory."""
    if target.startswith("s3://"):
        import s3fs

        fs = s3fs.S3FileSystem(client_kwargs={"endpoint_url": endpoint})
        if fs.exists(target):
            fs.rm(target, recursive=True)
        return
    shutil.rmtree(target, ignore_errors=True)
    os.sync()


def _spread(values: list[float]) -> str:
    return f"{median(values):.3f} ({min(values):.3f}-{max(values):.3f})"


def _row(method: str, runs: list[dict[str, Any]]) -> tuple[str, dict[str, float]]:
    """One method's table row, and its medians (first and later saves: seconds and bytes)."""
    first_s = [r["saves"][0]["seconds"] for r in runs]
    later_s = [s["seconds"] for r in runs for s in r["saves"][1:]]
    later = [s for r in runs for s in r["saves"][1:]]
    m = {"first_s": median(first_s), "later_s": median(later_s), "first_b": median([r["saves"][0]["written"] for r in runs]),
         "later_b": median([s["written"] for s in later])}
    reused = [s["reused"] for s in later if "reused" in s]
    unit, extra = "", ""
    if method in REMOTE_METHODS:
        unit = " uploaded"
        extra = (f", {median([s['copies'] for s in later]):.0f} server-side copies, "
                 f"{median([s['downloaded'] for s in later]) / MB:.2f} MB downloaded")
    row = (f"| {LABELS[method]} | {_spread(first_s)} | {m['first_b'] / MB:.2f}{unit} | {_spread(later_s)} "
           f"| {m['later_b'] / MB:.2f}{unit}{extra} | {f'{median(reused) / MB:.1f}' if reused else '-'} "
           f"| {m['later_s'] / m['first_s']:.2f} | {m['later_b'] / m['first_b'] if m['first_b'] else 0:.3f} |")
    return row, m


def report(workload: str, results: dict[str, list[dict[str, Any]]], rounds: int, gap: float) -> list[str]:
    first_run = next(iter(results.values()))[0]
    between = f"a training step and {gap:g} s" if gap else "a training step"
    lines = [f"\n### {workload}: {first_run['description']}; state {first_run['state_bytes'] / MB:.1f} MB; "
             f"{SAVES[workload]} saves, {between} between them; {rounds} rounds, medians (fastest-slowest)\n",
             "| method | first save s | first MB written | later saves s | later MB written | later reused MB "
             "| later/first time | later/first bytes |",
             "|---|---|---|---|---|---|---|---|"]
    m: dict[str, dict[str, float]] = {}
    for method, runs in results.items():
        row, m[method] = _row(method, runs)
        lines.append(row)
    if any(not v["first_b"] for k, v in m.items() if k not in REMOTE_METHODS):
        lines.append("\nnote: a save wrote 0 bytes by /proc/self/io: this filesystem (tmpfs?) does not count "
                     "them; pass --dir on a real disk")
    inc = m.get("torchckpt")
    for other in ("torchckpt-full", "dcp"):
        if inc and other in m and workload != "changing":
            o = m[other]
            lines.append(f"\nlater save, torchckpt against {other}: {inc['later_b'] / MB:.2f} MB against "
                         f"{o['later_b'] / MB:.2f} MB written ({inc['later_b'] / o['later_b']:.3f}), "
                         f"{inc['later_s']:.3f} s against {o['later_s']:.3f} s ({inc['later_s'] / o['later_s']:.2f}); "
                         f"first save {inc['first_s']:.3f} s against {o['first_s']:.3f} s")
    if workload == "changing" and inc and "torchckpt-full" in m:
        full = m["torchckpt-full"]["later_s"]
        lines.append(f"\nsecond save, every shard changed: torchckpt / torchckpt-full = {inc['later_s'] / full:.2f} "
                     f"({inc['later_s']:.3f} s against {full:.3f} s: the failed reuse check, "
                     f"{inc['later_s'] - full:+.3f} s, with the noise)")
    checks = [r["check"] for r in results.get("torchckpt", []) if "check" in r]
    if checks and inc:
        c = {k: median([x[k] for x in checks]) for k in checks[0]}
        lines.append(f"\nreuse check of a later incremental save ({inc['later_s']:.3f} s in all), its parts timed "
                     f"apart: xxh3 of the {c['frozen_bytes'] / MB:.1f} MB of frozen parameters in memory "
                     f"{c['compare_s']:.3f} s; reading back (a copying read; the save maps the file) and hashing the "
                     f"reused shards {c['readback_cold_s']:.3f} s from a cold page cache, "
                     f"{c['readback_warm_s']:.3f} s from a warm one")
    return lines


def _default_root() -> str:
    """The system's temporary directory, or ``.bench/`` in the repository where that is tmpfs
    (written bytes would not be counted there)."""
    tmp = tempfile.gettempdir()
    if _filesystem_of(tmp) in ("tmpfs", "ramfs"):
        tmp = os.path.join(os.path.dirname(os.path.dirname(os.path.abspath(__file__))), ".bench")
        os.makedirs(tmp, exist_ok=True)
    return tmp


def _filesystem_of(path: str) -> str:
    """The type of the filesystem mounted at the longest mount point above ``path``."""
    path, best, kind = os.path.realpath(path), "", "unknown"
    with open("/proc/mounts") as f:
        for line in f:
            point, fstype = line.split()[1:3]
            if (path == point or path.startswith(point.rstrip("/") + "/")) and len(point) > len(best):
                best, kind = point, fstype
    return kind


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--rounds", type=int, default=3)
    parser.add_argument("--workloads", default=",".join(WORKLOADS))
    parser.add_argument("--methods", default=",".join(METHODS), help="comma-separated subset to run")
    parser.add_argument("--scale", type=float, default=1.0, help="shrink every model by this factor (try 0.25)")
    parser.add_argument("--dir", default=None, help="where to write (a real disk, not tmpfs)")
    parser.add_argument("--remote", action="store_true", help="add the torchckpt-s3 methods (frozen only)")
    parser.add_argument("--gap", type=float, default=0.0,
                        help="seconds between saves besides the training step (a run does more than one step)")
    parser.add_argument("--child", nargs=6, default=None, help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args.child:
        method, workload, directory, scale, endpoint, gap = args.child
        child(method, workload, directory, float(scale), endpoint, float(gap))
        return
    methods = [m for m in args.methods.split(",") if m]
    if args.remote:
        methods += [m for m in REMOTE_METHODS if m not in methods]
    server, endpoint = None, "-"
    if any(m in REMOTE_METHODS for m in methods):
        import bench_remote

        os.environ.update(bench_remote.ENV)
        server, endpoint = bench_remote.start_server()
    import torch

    root = tempfile.mkdtemp(prefix="bench-incremental-", dir=args.dir or _default_root())
    try:
        print(f"machine: {machine()}\ntorch {torch.__version__}; writing to {root} ({_filesystem_of(root)})"
              + (f"; moto S3 server on loopback ({endpoint})" if server else ""), flush=True)
        for workload in args.workloads.split(","):
            chosen = [m for m in methods if m not in REMOTE_METHODS or workload == "frozen"]
            results = run_workload(workload, args.rounds, root, chosen, args.scale, endpoint, args.gap)
            print("\n".join(report(workload, results, args.rounds, args.gap)), flush=True)
    finally:
        shutil.rmtree(root, ignore_errors=True)
        if server is not None:
            server.kill()
            server.wait()


if __name__ == "__main__":
    main()
