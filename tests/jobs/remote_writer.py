"""A process that writes to an object store for the remote tests.

    python remote_writer.py hold URL OPTIONS SECONDS   # a manager holding URL, then exit
    python remote_writer.py crash URL OPTIONS LEASE    # save 64 MB, then start a second save and
                                                       # hang in its upload until killed

    python remote_writer.py late URL OPTIONS 0         # Checkpoint.write to URL, paused once its stage is
                                                       # open until a line on stdin, then finished
    python remote_writer.py pause URL OPTIONS LEASE    # a manager saves ckpt-1, then its second save
                                                       # freezes (no lease renewal either) until a line
                                                       # on stdin, as a VM paused past its lease

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
from torchckpt._storage import fsspec, upload
from torchckpt._storage import lease as storage_lease

mode, url, options, arg = sys.argv[1], sys.argv[2], json.loads(sys.argv[3]), float(sys.argv[4])

if mode == "hold":
    manager = torchckpt.CheckpointManager(torchckpt.Checkpoint(w=torch.zeros(1)), url, storage_options=options)
    print("HOLDING", flush=True)
    time.sleep(arg)
    sys.exit(0)



def paused_at_first_upload(freeze_lease: bool) -> None:
    """Stop this process at its next save's first upload (its stage is open) until stdin says go;
    with ``freeze_lease``, its lease stops being renewed from then on, as in a frozen VM."""
    real_create = fsspec.RemoteStage.create
    state = {"paused": False}

    def create(self, name, size):
        if not state["paused"]:
            state["paused"] = True
            if freeze_lease:
                for lease in list(storage_lease._leases.values()):
                    lease.stop.set()
            print("PAUSED", flush=True)
            sys.stdin.readline()
        return real_create(self, name, size)

    fsspec.RemoteStage.create = create  # type: ignore[method-assign]


def outcome(save) -> None:
    try:
        path = save()
    except Exception as e:  # noqa: BLE001 - reported to the test
        typed = isinstance(e, torchckpt.CheckpointError)
        print(f"RAISED {type(e).__name__} typed={typed} {' '.join(str(e).split())}", flush=True)
    else:
        print(f"COMMITTED {path}", flush=True)


if mode == "late":
    paused_at_first_upload(freeze_lease=False)
    outcome(lambda: torchckpt.Checkpoint(w=torch.full((1000,), 7.0)).write(url, storage_options=options))
    sys.exit(0)

storage_lease.LEASE_SECS = arg
if mode == "pause":
    state = torchckpt.Checkpoint(w=torch.full((1000,), 1.0))
    manager = torchckpt.CheckpointManager(state, url, storage_options=options)
    manager.save()
    paused_at_first_upload(freeze_lease=True)
    state.w.fill_(7.0)
    outcome(manager.save)
    sys.exit(0)
g = torch.Generator().manual_seed(7)
ckpt = torchckpt.Checkpoint(tensors={"a": torch.randn(8 * 2**20, generator=g), "b": torch.randn(8 * 2**20, generator=g)},
                            step=1)
manager = torchckpt.CheckpointManager(ckpt, url, storage_options=options)
manager.save()
print("SAVED", flush=True)
real = upload.S3Upload._upload_part
parts = {"n": 0}
hang = threading.Event()


def upload_part(self: upload.S3Upload, number: int, data: bytes) -> str:
    parts["n"] += 1
    if parts["n"] == 2:  # one part of the second save is up: hang here until killed
        print("UPLOADING", flush=True)
        hang.wait()
    return real(self, number, data)


upload.S3Upload._upload_part = upload_part  # type: ignore[method-assign]
ckpt.step = 2
ckpt.tensors["a"].add_(1)
manager.save()
print("UNREACHABLE", flush=True)
