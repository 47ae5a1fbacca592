"""A training loop that saves until it is killed: by the test at a random moment, or by itself at a
named point of the commit protocol.

    python -m tests.jobs.crash_writer DIRECTORY sync|async MEGABYTES POINT   # from the repository's root

Every tensor of step ``k`` holds ``k``. "acked K" is printed once save K is acknowledged: when
``save()`` returned (sync), or ``wait_until_finished()`` did (async). With async saves the tensors
are overwritten with -1 right after ``save()`` returns, so a snapshot that is not one shows.

POINT is ``random`` (save until killed) or where a save of this process, from the second on, dies:
``before-commit`` (shards and index written, not renamed), ``after-commit`` (renamed, state file
not written), ``after-state`` (state written, retention not applied), ``after-retention-state``
(retention's state written, nothing deleted), ``mid-delete`` (an old checkpoint moved aside, not
removed), ``state-temporary`` (a state file temporary written, not renamed). The directory is served
by a storage double (tests/doubles.py) that kills the process at the named point.
"""

from __future__ import annotations

import contextlib
import os
import shutil
import signal
import sys

import torch

import torchckpt
from tests.doubles import LocalDouble
from torchckpt._format import spec
from torchckpt._history import state as history_state
from torchckpt._storage import registry

directory, mode, megabytes, point = sys.argv[1], sys.argv[2], int(sys.argv[3]), sys.argv[4]
saves = {"n": 0}
disk = LocalDouble()
installed = contextlib.ExitStack()  # never closed: the double serves the directory until this process dies
installed.enter_context(registry.installed(directory, disk))


def die() -> None:
    os.kill(os.getpid(), signal.SIGKILL)


def armed() -> bool:
    return saves["n"] >= 2


def dies_at(name: str):
    """An action that kills this process where ``point`` is ``name``, from the second save on."""

    def action(*args: object) -> None:
        if armed() and point == name:
            die()

    return action


disk.before("stage.commit", dies_at("before-commit"))
disk.after("stage.commit", dies_at("after-commit"))
state_writes = {"n": 0}


def state_written(path: str, data: bytes, token: object) -> None:  # the state file: the one file replaced here
    if armed():
        state_writes["n"] += 1
        if (point, state_writes["n"]) in (("after-state", 1), ("after-retention-state", 2)):
            die()


disk.after("replace_file", state_written)
real_replace = os.replace


def replace(src: str, dst: str) -> None:
    if armed() and point == "state-temporary" and dst.endswith(history_state.STATE_FILE):
        die()
    real_replace(src, dst)


os.replace = replace
real_rmtree = shutil.rmtree


def rmtree(path: str, ignore_errors: bool = False) -> None:
    """Dies once an old checkpoint was moved aside (renamed with the old marker), before it is removed."""
    if armed() and point == "mid-delete" and spec.OLD_MARKER in os.path.basename(path):
        die()
    real_rmtree(path, ignore_errors=ignore_errors)


shutil.rmtree = rmtree

count = max(1, megabytes * 2**20 // 4 // 4)
tensors = {f"t{i}": torch.zeros(count) for i in range(4)}
step = torch.zeros((), dtype=torch.int64)
ckpt = torchckpt.Checkpoint(**tensors, step=step)
mgr = torchckpt.CheckpointManager(ckpt, directory, max_to_keep=2, keep_best=1, best_metric="loss",
                                  async_save=mode == "async")
mgr.restore_or_initialize()
start = int(step)
print(f"started {start}", flush=True)
for k in range(start + 1, start + 100_000):
    step.fill_(k)
    for t in tensors.values():
        t.fill_(k)
    saves["n"] += 1
    state_writes["n"] = 0
    mgr.save(metrics={"loss": (k * 7919) % 13 / 13})
    if mode == "async":
        step.fill_(-1)
        for t in tensors.values():
            t.fill_(-1)
        mgr.wait_until_finished()
    print(f"acked {k}", flush=True)
    if point != "random" and saves["n"] > 6:
        print("the kill point was never reached", flush=True)
        sys.exit(3)
