"""A process that writes to an object store for the remote tests (run from the repository's root).

    python -m tests.jobs.remote_writer hold URL OPTIONS SECONDS   # a manager holding URL, then exit
    python -m tests.jobs.remote_writer crash URL OPTIONS LEASE    # save 64 MB, then start a second save
                                                                  # and hang in its upload until killed
    python -m tests.jobs.remote_writer late URL OPTIONS 0         # Checkpoint.write to URL, paused once its
                                                                  # stage is open until a line on stdin,
                                                                  # then finished
    python -m tests.jobs.remote_writer pause URL OPTIONS LEASE    # a manager saves ckpt-1, then its second
                                                                  # save freezes (no lease renewal either)
                                                                  # until a line on stdin, as a VM paused
                                                                  # past its lease

OPTIONS is the storage_options as JSON. "HOLDING", "SAVED" and "UPLOADING" are printed when each
state is reached; the test kills the process with SIGKILL after "UPLOADING". LEASE is the lease
term in seconds, short so that the test can wait out a dead writer's lease. URL is served by a
storage double (tests/doubles.py) that pauses or hangs the process where it should.
"""

from __future__ import annotations

import contextlib
import json
import sys
import threading
import time

import torch

import torchckpt
from tests.doubles import remote_double
from torchckpt._storage import registry

mode, url, options, arg = sys.argv[1], sys.argv[2], json.loads(sys.argv[3]), float(sys.argv[4])
storage = remote_double(url, options, **({"lease_secs": arg} if mode in ("crash", "pause") else {}))
installed = contextlib.ExitStack()  # never closed: the double serves URL until this process ends
installed.enter_context(registry.installed(url, storage))

if mode == "hold":
    manager = torchckpt.CheckpointManager(torchckpt.Checkpoint(w=torch.zeros(1)), url, storage_options=options)
    print("HOLDING", flush=True)
    time.sleep(arg)
    sys.exit(0)


def paused_at_first_upload(freeze_lease: bool) -> None:
    """Stop this process at its next save's first upload (its stage is open) until stdin says go;
    with ``freeze_lease``, its lease is not renewed from then on either, as in a frozen VM."""
    thawed = threading.Event()

    def pause(name: str, size: int, *_: object) -> None:
        if freeze_lease:
            storage.before("replace_file", lambda path, data, token: thawed.wait())  # the lease renewals
        print("PAUSED", flush=True)
        sys.stdin.readline()
        thawed.set()

    storage.before("stage.create", pause, times=1)


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
written = {"bytes": 0}


def hang_mid_upload(views: list[memoryview]) -> None:
    """Once two parts of the second save are handed to the upload (the first is up or on its way):
    hang here until killed."""
    written["bytes"] += sum(map(len, views))
    if written["bytes"] > 2 * storage.part_bytes:
        print("UPLOADING", flush=True)
        threading.Event().wait()


storage.after("output.write", hang_mid_upload)
ckpt.step = 2
ckpt.tensors["a"].add_(1)
manager.save()
print("UNREACHABLE", flush=True)
