"""The size-limit scenario of the shared 2-rank job (``tests/jobs/dist_job.py``, ``world2``), checked
by ``tests/test_limits.py``: a manager's save whose index would be bigger than every reader accepts
fails on every rank with the same typed error, commits nothing and keeps the checkpoint before it,
and the next save of a smaller state works. Each failure is recorded, not raised.
"""

from __future__ import annotations

import os
import time
from pathlib import Path

import torch

import torchckpt

TIMEOUT = 60.0  # rank 0 encodes a 280 MB index before it fails: seconds, not the default 20
LONG_NAMES = 1400  # tensors with 100 KB names: each name twice in the index, 280 MB in all
NAME_CHARS = 100_000


def long_named_state() -> dict[str, torch.Tensor]:
    """Small tensors under very long names (the same on every rank: plain tensors are replicated)."""
    return {f"{i:04d}" + "n" * NAME_CHARS: torch.full((4,), float(i)) for i in range(LONG_NAMES)}


def index_too_large(d: Path, rank: int, world: int) -> dict:
    ckpt = torchckpt.Checkpoint(model={"w": torch.ones(3)})
    mgr = torchckpt.CheckpointManager(ckpt, str(d / "too_large"), max_to_keep=1, max_shard_size=16 * 300,
                                      timeout_secs=TIMEOUT)
    out: dict = {"first": os.path.basename(mgr.save() or "")}
    ckpt.model = long_named_state()
    start = time.perf_counter()
    try:
        mgr.save()
        out["too_large"] = "saved"
    except torchckpt.CheckpointError as e:
        out["too_large"] = {"type": type(e).__name__, "message": str(e), "ranks": getattr(e, "ranks", None),
                            "what": getattr(e, "what", None), "size": getattr(e, "size", None),
                            "limit": getattr(e, "limit", None), "path": getattr(e, "path", None)}
    out["seconds"] = time.perf_counter() - start
    out["kept"] = [os.path.basename(p) for p in mgr.checkpoints]
    out["entries"] = sorted(os.listdir(d / "too_large")) if rank == 0 else None
    ckpt.model = {"w": torch.full((3,), 2.0)}
    out["next"] = os.path.basename(mgr.save() or "")
    ckpt.model = {"w": torch.zeros(3)}
    mgr.restore_or_initialize(strict=True)
    out["restored"] = ckpt.model["w"].tolist()
    mgr.close()
    return out


SCENARIOS = {"index_too_large": index_too_large}
