"""Restore scenarios of the shared 2-rank job (``tests/jobs/dist_job.py``, ``world2``), checked by
``tests/test_distributed.py``: FSDP2 models whose restore runs torch's loaders (a module with a
loader of its own beside same-shaped parameters), tied weights under FSDP2, and a manager's typed
refusal on every rank. Each failure is recorded, not raised, so it shows as a failed assertion
rather than a hung group.
"""

from __future__ import annotations

import errno
from pathlib import Path
from typing import Any

import torch
from torch.distributed.fsdp import fully_shard

import torchckpt

TIMEOUT = 20.0  # every collective call here waits at most this long for the other rank


class OwnLoader(torch.nn.Module):
    """A module with a loader of its own and no tensors (a version migration, say): the whole
    model is restored through torch's loaders (``_load.hooked``)."""

    _version = 3

    def _load_from_state_dict(self, state_dict, prefix, local_metadata, *args):  # type: ignore[no-untyped-def]
        self.seen = local_metadata.get("version")
        super()._load_from_state_dict(state_dict, prefix, local_metadata, *args)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return x


def hooked_model(seed: int) -> torch.nn.Module:
    torch.manual_seed(seed)
    model = torch.nn.Sequential(torch.nn.Linear(6, 8), torch.nn.LayerNorm(8), OwnLoader(), torch.nn.Linear(8, 8))
    return fully_shard(model)  # two biases and the norm's weight and bias: same shape, dtype and stride


class Tower(torch.nn.Module):
    def __init__(self, seed: int, tie: bool) -> None:
        super().__init__()
        torch.manual_seed(seed)
        self.head = torch.nn.Linear(4, 6, bias=False)  # registered first: load_state_dict copies emb last
        self.emb = torch.nn.Embedding(6, 4)
        if tie:
            self.head.weight = self.emb.weight


def full(t: torch.Tensor) -> torch.Tensor:
    return t.full_tensor() if hasattr(t, "full_tensor") else t


def hooked_and_tied(d: Path, rank: int, world: int) -> dict[str, Any]:
    from tests.jobs.dist_job import record  # the shared job imports this module: late, not circular

    out: dict[str, Any] = {}
    saved = hooked_model(0)
    path = torchckpt.Checkpoint(model=saved).write(d / "hooked-fsdp", timeout_secs=TIMEOUT)
    fresh = hooked_model(1)
    record(out, "hooked", lambda: torchckpt.Checkpoint(model=fresh).read(path, timeout_secs=TIMEOUT).assert_consumed())
    out["hooked_equal"] = all(torch.equal(full(a), full(b)) for a, b in zip(saved.state_dict().values(),
                                                                           fresh.state_dict().values()))
    out["hooked_version"] = fresh[2].seen

    untied = fully_shard(Tower(0, tie=False))
    path = torchckpt.Checkpoint(model=untied).write(d / "untied-fsdp", timeout_secs=TIMEOUT)
    tied = fully_shard(Tower(1, tie=True))
    reports: list[Any] = []
    record(out, "tied", lambda: reports.append(torchckpt.Checkpoint(model=tied).read(
        path, timeout_secs=TIMEOUT).expect_partial().report))
    out["tied_unexpected"] = reports[0].unexpected_keys if reports else None
    out["tied_value"] = torch.equal(full(tied.emb.weight), full(untied.emb.weight)) and tied.head.weight is tied.emb.weight
    # probe81: a state-dict hook makes state_dict() hand out a new detached DTensor for each key:
    # the tie is the same local memory, not the same object
    hooked_tied = fully_shard(Tower(1, tie=True))
    hooked_tied._register_state_dict_hook(lambda module, state, prefix, metadata: None)
    reports.clear()
    record(out, "hooked_tied", lambda: reports.append(torchckpt.Checkpoint(model=hooked_tied).read(
        path, timeout_secs=TIMEOUT).expect_partial().report))
    out["hooked_tied_unexpected"] = reports[0].unexpected_keys if reports else None
    out["hooked_tied_value"] = torch.equal(full(hooked_tied.emb.weight), full(untied.emb.weight))

    # probe79 F5: a model and its head tracked apart, restored from where they differ; the head's
    # one row is all on rank 0, so rank 1's local part is empty (and reads nothing)
    def headed(seed: int) -> torch.nn.Module:
        torch.manual_seed(seed)
        model = torch.nn.Sequential(torch.nn.Linear(4, 6), torch.nn.Linear(6, 1))
        fully_shard(model[0])
        fully_shard(model[1])
        return fully_shard(model)

    model, other = headed(0), headed(5)
    path = torchckpt.Checkpoint(model=model, head=other[1]).write(d / "headed-fsdp", timeout_secs=TIMEOUT)
    fresh_headed = headed(2)
    shared: list[Any] = []
    record(out, "shared", lambda: shared.append(torchckpt.Checkpoint(model=fresh_headed, head=fresh_headed[1]).read(
        path, timeout_secs=TIMEOUT).expect_partial().report))
    out["shared_unexpected"] = shared[0].unexpected_keys if shared else None
    out["shared_ranks"] = dict(shared[0].ranks) if shared else None
    out["shared_restored"] = sorted({"model/1.weight", "model/1.bias"} & set(shared[0].restored_keys)) if shared else None
    out["shared_value"] = torch.equal(full(fresh_headed[1].weight), full(other[1].weight))

    (d / "not-a-checkpoint" / "ckpt-7").mkdir(parents=True, exist_ok=True)
    (d / "not-a-checkpoint" / "ckpt-7" / "notes.txt").write_text("keep")
    manager = torchckpt.CheckpointManager(torchckpt.Checkpoint(w=torch.ones(1)), d / "not-a-checkpoint",
                                          timeout_secs=TIMEOUT)
    try:
        manager.save(checkpoint_number=7)
        out["refused"] = None
    except torchckpt.CheckpointError as e:
        out["refused"] = [type(e).__name__, getattr(e, "errno", None) == errno.EEXIST]
    finally:
        manager.close()
    out["notes_kept"] = (d / "not-a-checkpoint" / "ckpt-7" / "notes.txt").read_text() == "keep"
    return out


SCENARIOS = {"hooked_and_tied": hooked_and_tied}
