"""How long opening a CheckpointManager and ``torchckpt ls`` take on S3 with junk prefixes.

    python benchmarks/bench_remote_open.py [JUNK]     # JUNK numbered prefixes without an index (300)

Runs against moto's S3 server on loopback (started here), so the times are request counts times
loopback latency: the request count is the figure that carries over to real S3 (where each
request is ~10-30 ms). Prints seconds and S3 requests for each, with and without the junk.
"""

from __future__ import annotations

import contextlib
import io
import json
import os
import socket
import sys
import time

os.environ.update({"AWS_ACCESS_KEY_ID": "testing", "AWS_SECRET_ACCESS_KEY": "testing",
                   "AWS_EC2_METADATA_DISABLED": "true", "AWS_DEFAULT_REGION": "us-east-1"})

import logging  # noqa: E402

import fsspec  # noqa: E402
import torch  # noqa: E402
from moto.server import ThreadedMotoServer  # noqa: E402

import torchckpt  # noqa: E402

logging.getLogger("werkzeug").setLevel(logging.ERROR)
from torchckpt.cli import main  # noqa: E402

requests = {"n": 0}


def count_requests(**kwargs: object) -> None:
    requests["n"] += 1


def measure(what: str, fn) -> None:
    requests["n"] = 0
    start = time.perf_counter()
    with contextlib.redirect_stdout(io.StringIO()):
        fn()
    print(f"{what}: {time.perf_counter() - start:.2f} s, {requests['n']} S3 requests")


def run() -> None:
    junk = int(sys.argv[1]) if len(sys.argv) > 1 else 300
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    server = ThreadedMotoServer(ip_address="127.0.0.1", port=port, verbose=False)
    server.start()
    try:
        options = {"client_kwargs": {"endpoint_url": f"http://127.0.0.1:{port}"}}
        fs = fsspec.filesystem("s3", **options)
        fs.mkdir("bench")
        fs.call_s3("list_buckets")  # the client exists: register the counter on it
        fs.s3.meta.events.register("before-send.s3", count_requests)
        url = "s3://bench/run"
        ckpt = torchckpt.Checkpoint(w=torch.ones(10))
        mgr = torchckpt.CheckpointManager(ckpt, url, max_to_keep=3, storage_options=options)
        for _ in range(3):
            mgr.save()
        mgr.close()

        def open_manager() -> None:
            torchckpt.CheckpointManager(ckpt, url, max_to_keep=3, storage_options=options).close()

        def ls() -> None:
            assert main(["ls", url, "--storage-options", json.dumps(options)]) == 0

        measure("manager open, no junk", open_manager)
        measure("torchckpt ls, no junk", ls)
        for i in range(junk):  # numbered prefixes without an index (not a torchckpt leftover: no marker)
            fs.pipe_file(f"bench/run/ckpt-{100 + i}/model-00001-of-00001.safetensors", b"x")
        measure(f"manager open, {junk} junk prefixes", open_manager)
        measure(f"torchckpt ls, {junk} junk prefixes", ls)
    finally:
        server.stop()


if __name__ == "__main__":
    run()
