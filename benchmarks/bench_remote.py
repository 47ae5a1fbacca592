"""Save and restore on an object store: torchckpt against raw s3fs and DCP's fsspec storage, on moto's S3 server.

A moto S3 server runs in its own process on 127.0.0.1 (a free port). Every measurement runs in a
fresh process, rounds are interleaved (each round starts with another method, in an order of its own:
``_common.round_order``), and the table reports medians with the fastest and slowest round, the
ratio to raw s3fs on the same bytes in the same run, and a restore's peak extra RSS over the state
size.

    python benchmarks/bench_remote.py [--rounds 3] [--workloads big,many] [--methods raw,dcp,torchckpt]

Workloads: big = 1 GiB fp32 in 200 tensors; many = 100 MB in 20,000 tensors. Before a restore
is timed, the process has made one request (so loading the S3 client's libraries, about 40 MB, is
in no method's time or memory).

Methods:
- raw: ``s3fs`` ``pipe_file`` of the state's bytes as one object (multipart, 10 parts in flight),
  and ``cat_file`` of it back (the bytes are joined before the clock starts, and not copied into
  tensors after it stops): the protocol's floor for the same bytes;
- dcp: ``torch.distributed.checkpoint`` with ``FsspecWriter(thread_count=4, sync_files=False)``
  (``sync_files=True`` adds an ``os.sync()`` of the whole machine per file) and ``FsspecReader``,
  reading into the existing tensors;
- torchckpt: ``Checkpoint.write`` and ``Checkpoint.read`` into the existing tensors.

moto keeps objects in memory and serves them from Python on loopback: the figures measure each
library's protocol overhead (requests, copies, parallelism), not a real S3 bandwidth.
"""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import time

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))

from _common import free_port, import_torchckpt, machine, median, round_order, rss_bytes, run_fresh  # noqa: E402

METHODS = ["raw", "dcp", "torchckpt"]
LABELS = {"raw": "raw s3fs pipe_file / cat_file", "dcp": "torch DCP FsspecWriter / FsspecReader",
          "torchckpt": "torchckpt"}
ENV = {"AWS_ACCESS_KEY_ID": "bench", "AWS_SECRET_ACCESS_KEY": "bench", "AWS_EC2_METADATA_DISABLED": "true",
       "AWS_DEFAULT_REGION": "us-east-1"}
BUCKET = "bench"


def make_state(workload: str) -> dict:  # type: ignore[type-arg]
    import torch

    g = torch.Generator().manual_seed(0)
    if workload == "big":
        per = 2**30 // 4 // 200
        return {f"layer{i}.weight": torch.randn(per, generator=g) for i in range(200)}
    if workload == "many":
        per = 100 * 10**6 // 4 // 20_000
        return {f"block{i // 10}.param{i % 10}": torch.randn(per, generator=g) for i in range(20_000)}
    raise ValueError(workload)


def options(endpoint: str) -> dict:  # type: ignore[type-arg]
    return {"client_kwargs": {"endpoint_url": endpoint}}


def filesystem(endpoint: str):  # type: ignore[no-untyped-def]
    import s3fs

    return s3fs.S3FileSystem(**options(endpoint))


def save(method: str, state: dict, url: str, endpoint: str) -> float:  # type: ignore[type-arg]
    if method == "raw":
        fs = filesystem(endpoint)
        data = b"".join(t.numpy().tobytes() for t in state.values())
        start = time.perf_counter()
        fs.pipe_file(url + "/raw.bin", data)
        return time.perf_counter() - start
    if method == "dcp":
        import torch.distributed.checkpoint as dcp
        from torch.distributed.checkpoint._fsspec_filesystem import FsspecWriter

        start = time.perf_counter()
        dcp.save(state, storage_writer=FsspecWriter(url, thread_count=4, sync_files=False, **options(endpoint)),
                 no_dist=True)
        return time.perf_counter() - start
    torchckpt = import_torchckpt()

    start = time.perf_counter()
    torchckpt.Checkpoint(**state).write(url, storage_options=options(endpoint))
    return time.perf_counter() - start


def restore(method: str, dest: dict, url: str, endpoint: str) -> float:  # type: ignore[type-arg]
    if method == "raw":
        fs = filesystem(endpoint)
        start = time.perf_counter()
        data = fs.cat_file(url + "/raw.bin")
        elapsed = time.perf_counter() - start
        assert len(data) == sum(t.nbytes for t in dest.values())
        return elapsed
    if method == "dcp":
        import torch.distributed.checkpoint as dcp
        from torch.distributed.checkpoint._fsspec_filesystem import FsspecReader

        start = time.perf_counter()
        dcp.load(dest, storage_reader=FsspecReader(url, **options(endpoint)), no_dist=True)
        return time.perf_counter() - start
    torchckpt = import_torchckpt()

    start = time.perf_counter()
    torchckpt.Checkpoint(**dest).read(url, storage_options=options(endpoint)).assert_consumed()
    return time.perf_counter() - start


def child(op: str, method: str, workload: str, url: str, endpoint: str) -> None:
    import torch

    state = make_state(workload)
    nbytes = sum(t.nbytes for t in state.values())
    if op == "save":
        seconds = save(method, state, url, endpoint)
        print(json.dumps({"seconds": seconds, "bytes": nbytes}))
        return
    expected = {k: v.clone() for k, v in list(state.items())[:3]}
    for t in state.values():
        t.zero_()
    filesystem(endpoint).exists(url)  # the S3 client and its libraries loaded: not part of any restore
    reset_peak_rss()  # the peak from here on, not the one of building the state
    base = rss_bytes()
    seconds = restore(method, state, url, endpoint)
    extra = max(0, peak_rss_bytes() - base)
    if method != "raw":
        for k, v in expected.items():
            assert torch.equal(state[k], v), (method, k)
    print(json.dumps({"seconds": seconds, "bytes": nbytes, "extra_rss": extra}))



def reset_peak_rss() -> None:
    """Restart the kernel's peak-RSS count (``VmHWM``) of this process at its current RSS."""
    with open("/proc/self/clear_refs", "w") as f:
        f.write("5")


def peak_rss_bytes() -> int:
    """The peak RSS since the last :func:`reset_peak_rss` (``VmHWM``)."""
    with open("/proc/self/status") as f:
        for line in f:
            if line.startswith("VmHWM:"):
                return int(line.split()[1]) * 1024
    raise RuntimeError("no VmHWM in /proc/self/status")


def start_server() -> tuple[subprocess.Popen[bytes], str]:
    port = free_port()
    code = ("import logging, time; logging.getLogger('werkzeug').setLevel(logging.ERROR)\n"
            "from moto.server import ThreadedMotoServer\n"
            f"s = ThreadedMotoServer(ip_address='127.0.0.1', port={port}, verbose=False); s.start()\n"
            "print('up', flush=True)\ntime.sleep(10**6)\n")
    proc = subprocess.Popen([sys.executable, "-c", code], stdout=subprocess.PIPE, stderr=subprocess.DEVNULL,
                            env={**os.environ, **ENV})
    assert proc.stdout is not None and proc.stdout.readline().strip() == b"up"
    endpoint = f"http://127.0.0.1:{port}"
    fs = filesystem(endpoint)
    fs.mkdir(BUCKET)
    return proc, endpoint


def run_workload(workload: str, rounds: int, methods: list[str], endpoint: str) -> dict:  # type: ignore[type-arg]
    fs = filesystem(endpoint)
    results: dict[str, dict[str, list[dict]]] = {m: {"save": [], "restore": []} for m in methods}  # type: ignore[type-arg]
    script = os.path.abspath(__file__)
    for r in range(rounds):
        order = round_order(methods, r)
        for method in order:
            url = f"s3://{BUCKET}/{workload}-{method}-{r}"
            for op in ("save", "restore"):
                out = run_fresh(script, ["--child", op, method, workload, url, endpoint])
                results[method][op].append(out)
            fs.rm(url, recursive=True)  # moto holds objects in memory
            fs.invalidate_cache()
    return results


def report(workload: str, results: dict, rounds: int) -> list[str]:  # type: ignore[type-arg]
    lines = [f"\n### {workload} ({next(iter(results.values()))['save'][0]['bytes'] / 2**20:.0f} MiB), "
             f"{rounds} rounds, medians (fastest-slowest)\n",
             "| method | save s | save / raw | restore s | restore / raw | restore extra RSS |",
             "|---|---|---|---|---|---|"]
    raw = {op: median([x["seconds"] for x in results["raw"][op]]) if "raw" in results else None
           for op in ("save", "restore")}
    for method, ops in results.items():
        cells = []
        for op in ("save", "restore"):
            secs = [x["seconds"] for x in ops[op]]
            cells.append(f"{median(secs):.2f} ({min(secs):.2f}-{max(secs):.2f})")
            cells.append(f"{median(secs) / raw[op]:.2f}x" if raw[op] else "-")
        extra = median([x["extra_rss"] for x in ops["restore"]]) / ops["restore"][0]["bytes"]
        lines.append(f"| {LABELS[method]} | {cells[0]} | {cells[1]} | {cells[2]} | {cells[3]} | {extra:.0%} |")
    return lines


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--rounds", type=int, default=3)
    parser.add_argument("--workloads", default="big,many")
    parser.add_argument("--methods", default=",".join(METHODS))
    parser.add_argument("--child", nargs=5, default=None, help=argparse.SUPPRESS)
    args = parser.parse_args()
    os.environ.update(ENV)
    if args.child:
        child(*args.child)
        return
    methods = [m for m in args.methods.split(",") if m]
    server, endpoint = start_server()
    try:
        print(f"machine: {machine()}; moto S3 server on loopback ({endpoint})")
        for workload in args.workloads.split(","):
            print("\n".join(report(workload, run_workload(workload, args.rounds, methods, endpoint), args.rounds)),
                  flush=True)
    finally:
        server.kill()
        server.wait()


if __name__ == "__main__":
    main()
