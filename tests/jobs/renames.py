"""The rename scenario of the shared 2-rank job (``tests/jobs/dist_job.py``, ``world2``), checked by
``tests/test_rename.py``: a collective restore with ``rename=``, a collision and differing renames.
Each failure is recorded, not raised, so it shows as a failed assertion rather than a hung group.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

import torch

import torchckpt

TIMEOUT = 20.0  # every collective call here waits at most this long for the other rank


def tower(trunk: str, seed: int) -> torch.nn.Module:
    torch.manual_seed(seed)
    model = torch.nn.Module()
    model.add_module(trunk, torch.nn.Sequential(torch.nn.Linear(4, 6)))
    model.head = torch.nn.Linear(6, 3)
    return model


def rename(d: Path, rank: int, world: int) -> dict[str, Any]:
    from tests.jobs.dist_job import record  # the shared job imports this module: late, not circular

    old = tower("encoder", 0)
    path = torchckpt.Checkpoint(net=old).write(d / "renamed-net", timeout_secs=TIMEOUT)
    new = tower("backbone", 5)
    status = torchckpt.Checkpoint(model=new).read(path, rename={"net": "model", "net/encoder": "model/backbone"},
                                                  timeout_secs=TIMEOUT)
    out: dict[str, Any] = {"renamed": status.report.renamed}
    record(out, "consumed", status.assert_consumed)
    out["equal"] = all(torch.equal(a, b) for a, b in zip(old.state_dict().values(), new.state_dict().values()))
    record(out, "collision", lambda: torchckpt.Checkpoint(model=tower("backbone", 5)).read(
        path, rename=lambda key: "model/w", timeout_secs=TIMEOUT))
    record(out, "differing", lambda: torchckpt.Checkpoint(model=tower("backbone", 5)).read(
        path, rename={"net": "model" if rank == 0 else "modle"}, timeout_secs=TIMEOUT))
    return out


SCENARIOS = {"rename": rename}
