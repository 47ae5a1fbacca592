"""A small format-2 checkpoint, as a save by 2 ranks writes it, built in one process (no job to
start): a module whose weight is stored as two row chunks (one per rank, as FSDP2 saves it),
its bias whole, and a per-rank value holding a tensor (``~r0``, ``~r1``) and an int.

The shards and the index come from the library's own writer, so headers, checksums and the seal
are what a real save produces; tests then forge the index as a format-aware forger would
(``conftest.write_index`` reseals it).
"""

from __future__ import annotations

import os

import torch

import torchckpt
from torchckpt._format import spec
from torchckpt._save import write
from torchckpt._storage.registry import storage_for

WORLD = 2


def weights() -> tuple[torch.Tensor, torch.Tensor]:
    """The saved module's weight (6 x 4) and bias (6)."""
    weight = torch.arange(24, dtype=torch.float32).reshape(6, 4) / 8
    return weight, torch.arange(6, dtype=torch.float32) - 2


def seen(rank: int) -> torch.Tensor:
    """The tensor in rank ``rank``'s per-rank value."""
    return torch.tensor([10 * rank + 1, 10 * rank + 2])


def write_two_rank(path: str | os.PathLike[str], extra: dict[str, torch.Tensor] | None = None,
                   max_shard_size: int = 64, positions: tuple[int, int] = (3, 4), rank_1_pos: object = None) -> str:
    """Write the checkpoint at ``path`` (format 2, saved by 2 ranks); ``extra`` stored names are
    added to the tensor table as they are (for forgeries); ``positions``: each rank's per-rank
    ``cursor/pos``; ``rank_1_pos``: rank 1's instead, as encoded JSON (``{"@dict": [[1, 5]]}``).
    Returns the path."""
    weight, bias = weights()
    stored = {"model/weight~@0,0": weight[:3].clone(), "model/weight~@3,0": weight[3:].clone(), "model/bias": bias,
              "cursor/seen~r0": seen(0), "cursor/seen~r1": seen(1), **(extra or {})}
    section = {
        "format_version": spec.SHARDED_FORMAT_VERSION,
        "objects": {"model": "module", "cursor": "per_rank", "epoch": "value"},
        "state": {"model": {}, "cursor": {"@per_rank": [{"pos": positions[0]},
                                                              {"pos": positions[1] if rank_1_pos is None else rank_1_pos}]}, "epoch": 7, "save_counter": 1},
        "world_size": WORLD,
        "chunked": {"names": ["model/weight"], "dtypes": "F32", "shapes": "6,4"},
    }
    return write.write_checkpoint(storage_for(os.fspath(path)), os.fspath(path), stored, {}, section,
                                  max_shard_size=max_shard_size)


def target() -> torchckpt.Checkpoint:
    """Objects the checkpoint restores into (in one process: rank 0's per-rank value)."""
    return torchckpt.Checkpoint(model=torch.nn.Linear(4, 6), cursor=torchckpt.PerRank({"pos": 0, "seen": seen(5)}),
                                epoch=0)
