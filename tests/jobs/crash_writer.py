"""A training loop that saves until it is killed: by the test at a random moment, or by itself at a
named point of the commit protocol.

    python crash_writer.py DIRECTORY sync|async MEGABYTES POINT

Every tensor of step ``k`` holds ``k``. "acked K" is printed once save K is acknowledged: when
``save()`` returned (sync), or ``wait_until_finished()`` did (async). With async saves the tensors
are overwritten with -1 right after ``save()`` returns, so a snapshot that is not one shows.

POINT is ``random`` (save until killed) or where a save of this process, from the second on, dies:
``before-commit`` (shards and index written, not renamed), ``after-commit`` (renamed, state file
not written), ``after-state`` (state written, retention not applied), ``after-retention-state``
(retention's state written, nothing deleted), ``mid-delete`` (an old checkpoint moved aside, not
removed), ``state-temporary`` (a state file temporary written, not renamed).
"""

from __future__ import annotations

import os
import signal
import sys

import torch

import torchckpt
from torchckpt._history import state as history_state
from torchckpt._storage import atomic
from torchckpt._storage import local as storage_local

directory, mode, megabytes, point = sys.argv[1], sys.argv[2], int(sys.argv[3]), sys.argv[4]
saves = {"n": 0}


def die() -> None:
    os.kill(os.getpid(), signal.SIGKILL)


def armed() -> bool:
    return saves["n"] >= 2


real_commit = atomic.commit_directory


def commit(tmp: str, final: str, replace: bool = True) -> None:
    if armed() and point == "before-commit":
        die()
    real_commit(tmp, final, replace)
    if armed() and point == "after-commit":
        die()


atomic.commit_directory = commit
real_write_state = history_state.write_state
state_writes = {"n": 0}


def write_state(path: str, state: history_state.State, *args: object) -> object:
    token = real_write_state(path, state, *args)
    if armed():
        state_writes["n"] += 1
        if point == "after-state" and state_writes["n"] == 1 or point == "after-retention-state" and state_writes["n"] == 2:
            die()
    return token


history_state.write_state = write_state
real_replace = os.replace


def replace(src: str, dst: str) -> None:
    if armed() and point == "state-temporary" and dst.endswith(history_state.STATE_FILE):
        die()
    real_replace(src, dst)


os.replace = replace


class Shutil:
    """The local storage's shutil, whose rmtree dies after an old checkpoint was moved aside."""

    def __getattr__(self, name: str) -> object:
        import shutil

        return getattr(shutil, name)

    def rmtree(self, path: str, ignore_errors: bool = False) -> None:
        import shutil

        if armed() and point == "mid-delete":
            die()
        shutil.rmtree(path, ignore_errors=ignore_errors)


storage_local.shutil = Shutil()  # type: ignore[assignment]

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
