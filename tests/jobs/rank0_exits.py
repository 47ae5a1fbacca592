"""A 2-rank job whose rank 0 ends its process the moment its last collective call returns, as a
preempted run's script does after its final save: ``python -m tests.jobs.rank0_exits DIR CALL``.

Rank 0 serves the c10d store here (``MASTER_ADDR``, as with ``mp.spawn``). Both ranks share one
CPU and rank 1 runs at idle priority, so rank 1 runs only while rank 0 waits: without the end of
call it read rank 0's last exchange after rank 0 had gone, every time. Rank 1 writes what its call
returned (or raised) to ``DIR/rank1-CALL.json``.
"""

from __future__ import annotations

import datetime
import json
import os
import sys
from pathlib import Path

import torch
import torch.distributed as dist

import torchckpt

TIMEOUT = 30.0


def last_call(directory: Path, call: str) -> object:
    """Every rank: some calls, then ``call`` as the last; returns what it returned."""
    torch.manual_seed(0)
    step = torch.zeros((), dtype=torch.int64)
    ckpt = torchckpt.Checkpoint(model=torch.nn.Linear(32, 32), step=step)
    if call == "write":
        return ckpt.write(str(directory / "written"), timeout_secs=TIMEOUT)
    mgr = torchckpt.CheckpointManager(ckpt, str(directory / "run"), step_counter=step, checkpoint_interval=2,
                                      timeout_secs=TIMEOUT)
    step += 1
    mgr.save()  # written: the first save
    step += 1
    if call == "skipped_save":
        return mgr.save()  # skipped by the interval: rank 0's decision is the call's last exchange
    assert call == "restore", call
    return mgr.restore_or_initialize()


def main() -> None:
    directory, call = Path(sys.argv[1]), sys.argv[2]
    rank = int(os.environ["RANK"])
    os.sched_setaffinity(0, {min(os.sched_getaffinity(0))})
    if rank == 1:
        os.sched_setscheduler(0, os.SCHED_IDLE, os.sched_param(0))
    dist.init_process_group("gloo", timeout=datetime.timedelta(seconds=TIMEOUT))
    try:
        outcome = {"returned": last_call(directory, call)}
    except Exception as e:  # recorded: the test names it
        outcome = {"raised": f"{type(e).__name__}: {e}"}
    if rank == 0:
        os._exit(0)  # at once: no close(), no destroy_process_group()
    (directory / f"rank1-{call}.json").write_text(json.dumps(outcome))
    os._exit(0)


if __name__ == "__main__":
    main()
