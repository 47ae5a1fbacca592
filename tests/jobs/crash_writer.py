"""A training loop that saves until it is killed: by the test at a random moment, or by itself at a
named point of the commit protocol.

    python -m tests.jobs.crash_writer DIRECTORY sync|async MEGABYTES POINT   # from the repository's root

Every tensor of step ``k`` holds ``k``. "acked K" is printed once save K is acknowledged: when
``save()`` returned (sync), or ``wait_until_finished()`` did (async). With async saves the tensors
are overwritten with -1 right after ``save()`` returns, so a snapshot that is not one shows.

Beside them a frozen module (``requires_grad=False``, a fixed pattern: :func:`frozen_module`) never
changes, so that every save with a previous checkpoint reuses its shard (the manager saves
incrementally by default): the loop kills incremental saves too.

POINT is ``random`` (save until killed) or where a save of this process, from the second on, dies:
``before-commit`` (shards and index written, not renamed), ``after-commit`` (renamed, state file
not written), ``after-state`` (the state file written, naming the new checkpoint and no longer
the ones retention drops, nothing deleted yet), ``mid-delete`` (an old checkpoint moved aside, not
removed), ``state-temporary`` (a state file temporary written, not renamed), ``before-reuse`` (the
frozen shard about to be linked from the previous checkpoint), ``after-reuse`` (linked into the
stage, not yet read back), ``after-drop`` (the linked file failed its read-back and was removed
from the stage, not yet written afresh: the placed file is damaged for this point, never the
previous checkpoint's). The directory is served by a storage double (tests/doubles.py) that kills
the process at the named point.
"""

from __future__ import annotations

import contextlib
import glob
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

FROZEN_COLUMNS = 256


def frozen_module(megabytes: int) -> torch.nn.Linear:
    """The frozen part: a quarter as many bytes as the trained tensors, every value fixed by its
    position (a restore that mixes up or damages any of them shows)."""
    rows = max(1, megabytes * 2**20 // 4 // 4 // FROZEN_COLUMNS)
    module = torch.nn.Linear(FROZEN_COLUMNS, rows, device="meta").to_empty(device="cpu")  # no random init to pay
    module.requires_grad_(False)
    module.weight.copy_(torch.arange(rows * FROZEN_COLUMNS, dtype=torch.float32).remainder(251).sub(125)
                        .reshape(rows, FROZEN_COLUMNS))
    module.bias.copy_(torch.arange(rows, dtype=torch.float32).remainder(7))
    return module


def trained_tensors(megabytes: int) -> dict[str, torch.Tensor]:
    """The tensors every step changes: ``megabytes`` in all."""
    count = max(1, megabytes * 2**20 // 4 // 4)
    return {f"t{i}": torch.zeros(count) for i in range(4)}


class Writer:
    """The killing points of one writer process: armed from its second save on."""

    def __init__(self, directory: str, point: str) -> None:
        self.directory = directory
        self.point = point
        self.saves = 0
        self.state_writes = 0

    def die(self) -> None:
        os.kill(os.getpid(), signal.SIGKILL)

    def armed(self) -> bool:
        return self.saves >= 2

    def dies_at(self, name: str):
        """An action that kills this process where ``point`` is ``name``, from the second save on."""

        def action(*args: object) -> None:
            if self.armed() and self.point == name:
                self.die()

        return action

    def state_written(self, path: str, data: bytes, token: object) -> None:  # the state file: the one file replaced
        if self.armed():
            self.state_writes += 1
            if self.point == "after-state" and self.state_writes == 1:
                self.die()

    def damage_placed(self, name: str, source: str) -> None:
        """For ``after-drop``: the file just linked into the stage becomes a copy of ``source`` with
        its last byte flipped, as if the previous checkpoint's shard had rotted on disk; the
        previous checkpoint itself keeps its own good link."""
        if not (self.armed() and self.point == "after-drop"):
            return
        placed = glob.glob(os.path.join(glob.escape(self.directory), f"*{spec.TMP_MARKER}*", name))
        assert len(placed) == 1, placed  # one save at a time: one stage
        with open(source, "rb") as f:
            data = bytearray(f.read())
        data[-1] ^= 0x10
        os.unlink(placed[0])
        with open(placed[0], "wb") as f:
            f.write(data)


def arm(disk: LocalDouble, writer: Writer) -> None:
    """Every named point: on the storage double, or on the ``os``/``shutil`` calls retention makes."""
    disk.before("stage.commit", writer.dies_at("before-commit"))
    disk.after("stage.commit", writer.dies_at("after-commit"))
    disk.before("stage.reuse", writer.dies_at("before-reuse"))
    disk.after("stage.reuse", writer.dies_at("after-reuse"))
    disk.after("stage.reuse", writer.damage_placed)
    disk.after("stage.drop", writer.dies_at("after-drop"))
    disk.after("replace_file", writer.state_written)
    real_replace = os.replace

    def replace(src: str, dst: str) -> None:
        if writer.armed() and writer.point == "state-temporary" and dst.endswith(history_state.STATE_FILE):
            writer.die()
        real_replace(src, dst)

    os.replace = replace
    real_rmtree = shutil.rmtree

    def rmtree(path: str, ignore_errors: bool = False) -> None:
        """Dies once an old checkpoint was moved aside (renamed with the old marker), before it is removed."""
        if writer.armed() and writer.point == "mid-delete" and spec.OLD_MARKER in os.path.basename(path):
            writer.die()
        real_rmtree(path, ignore_errors=ignore_errors)

    shutil.rmtree = rmtree


def main() -> None:
    directory, mode, megabytes, point = sys.argv[1], sys.argv[2], int(sys.argv[3]), sys.argv[4]
    disk = LocalDouble()
    installed = contextlib.ExitStack()  # never closed: the double serves the directory until this process dies
    installed.enter_context(registry.installed(directory, disk))
    writer = Writer(directory, point)
    arm(disk, writer)
    tensors = trained_tensors(megabytes)
    step = torch.zeros((), dtype=torch.int64)
    ckpt = torchckpt.Checkpoint(**tensors, step=step, frozen=frozen_module(megabytes))
    mgr = torchckpt.CheckpointManager(ckpt, directory, max_to_keep=2, keep_best=1, best_metric="loss",
                                      async_save=mode == "async")
    mgr.restore_or_initialize()
    start = int(step)
    print(f"started {start}", flush=True)
    for k in range(start + 1, start + 100_000):
        step.fill_(k)
        for t in tensors.values():
            t.fill_(k)
        writer.saves += 1
        writer.state_writes = 0
        mgr.save(metrics={"loss": (k * 7919) % 13 / 13})
        if mode == "async":
            step.fill_(-1)
            for t in tensors.values():
                t.fill_(-1)
            mgr.wait_until_finished()
        print(f"acked {k}", flush=True)
        if point != "random" and writer.saves > 6:
            print("the kill point was never reached", flush=True)
            sys.exit(3)


if __name__ == "__main__":
    main()
