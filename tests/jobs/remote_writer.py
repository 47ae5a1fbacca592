"""A process that writes to an object store for the remote tests.

    python remote_writer.py hold URL OPTIONS SECONDS   # a manager holding URL, then exit
    python remote_writer.py crash URL OPTIONS LEASE    # save 64 MB, then start a second save and
                                                       # hang in its upload until killed

OPTIONS is the storage_options as JSON. "HOLDING", "SAVED" and "UPLOADING" are printed when each
state is reached; the test kills the process with SIGKILL after "UPLOADING". LEASE is the lease
term in seconds, short so that the test can wait out a dead writer's lease.
"""

from __future__ import annotations

import json
import sys
import threading
import time

import torch

import torchckpt
from torchckpt import _lease, _upload

mode, url, options, arg = sys.argv[1], sys.argv[2], json.loads(sys.argv[3]), float(sys.argv[4])

if mode == "hold":
    manager = torchckpt.CheckpointManager(torchckpt.Checkpoint(w=torch.zeros(1)), url, storage_options=options)
    print("HOLDING", flush=True)
    time.sleep(arg)
    sys.exit(0)

_lease.LEASE_SECS = arg
g = torch.Generator().manual_seed(7)
ckpt = torchckpt.Checkpoint(tensors={"a": torch.randn(8 * 2**20, generator=g), "b": torch.randn(8 * 2**20, generator=g)},
                            step=1)
manager = torchckpt.CheckpointManager(ckpt, url, storage_options=options)
manager.save()
print("SAVED", flush=True)
real = _upload.S3Upload._upload_part
parts = {"n": 0}
hang = threading.Event()


def upload_part(self: _upload.S3Upload, number: int, data: bytes) -> str:
    parts["n"] += 1
    if parts["n"] == 2:  # one part of the second save is up: hang here until killed
        print("UPLOADING", flush=True)
        hang.wait()
    return real(self, number, data)


_upload.S3Upload._upload_part = upload_part  # type: ignore[method-assign]
ckpt.step = 2
ckpt.tensors["a"].add_(1)
manager.save()
print("UNREACHABLE", flush=True)
