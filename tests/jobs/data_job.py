"""A tiny training loop over a ``StatefulDataLoader``, interrupted mid-epoch and resumed
(``tests/test_data_position.py``).

Imported by the single-process tests; run as one rank of a gloo job on 127.0.0.1 with
``python -m tests.jobs.data_job DIR`` (``RANK``, ``WORLD_SIZE``, ``MASTER_ADDR``, ``MASTER_PORT``
set): every rank runs the uninterrupted loop, the interrupted one and the resume, with
``num_workers`` 0 and 2, over a ``DistributedSampler``, and writes what it found to
``DIR/rank<r>.json`` (an error is recorded there, not left as a hung group).
"""

from __future__ import annotations

import datetime
import json
import os
import sys
import traceback
from pathlib import Path
from typing import Any

import torch
import torch.distributed as dist
from torch.utils.data import Dataset, DistributedSampler
from torchdata.stateful_dataloader import StatefulDataLoader

import torchckpt

EPOCHS = 4
DIST_STOP_AT = 8  # on 2 ranks, 3 batches an epoch: in the middle of the third epoch
TIMEOUT = 30.0


class Points(Dataset[tuple[int, torch.Tensor, torch.Tensor]]):
    """Twelve fixed points, each returned with its index (the batches seen are compared)."""

    def __init__(self) -> None:
        g = torch.Generator().manual_seed(5)
        self.x = torch.randn(12, 4, generator=g)
        self.y = torch.randn(12, 1, generator=g)

    def __len__(self) -> int:
        return len(self.x)

    def __getitem__(self, i: int) -> tuple[int, torch.Tensor, torch.Tensor]:
        x = self.x[i]
        info = torch.utils.data.get_worker_info()
        if info is not None:  # in a worker: noise from its seed (the loader's base seed, new each epoch) and i
            x = x + 0.1 * torch.randn(4, generator=torch.Generator().manual_seed(info.seed + i))
        return i, x, self.y[i]


def build(num_workers: int, distributed: bool = False) -> tuple[torch.nn.Module, torch.optim.Optimizer,
                                                                 StatefulDataLoader[Any]]:
    """A fresh model, optimizer and loader, built from the global generator as it is now."""
    model: torch.nn.Module = torch.nn.Linear(4, 1)
    if distributed:
        model = torch.nn.parallel.DistributedDataParallel(model)
    opt = torch.optim.SGD(model.parameters(), lr=0.05, momentum=0.9)
    dataset = Points()
    generator = torch.Generator().manual_seed(1234)
    if distributed:
        sampler = DistributedSampler(dataset, shuffle=True, seed=7)
        loader = StatefulDataLoader(dataset, batch_size=2, sampler=sampler, generator=generator,
                                    num_workers=num_workers)
    else:
        loader = StatefulDataLoader(dataset, batch_size=3, shuffle=True, generator=generator, num_workers=num_workers)
    return model, opt, loader


def train(path: Path, num_workers: int, *, stop_at: int | None = None, resume: bool = False,
          distributed: bool = False) -> dict[str, Any]:
    """Train for ``EPOCHS`` epochs (from ``path`` when ``resume``); with ``stop_at``, save to
    ``path`` after that many steps and stop. Returns the batches seen and the final weights."""
    model, opt, loader = build(num_workers, distributed)
    ckpt = torchckpt.Checkpoint(model=model, opt=opt, loader=loader, rng=torchckpt.RNGState(),
                                progress={"epoch": 0, "step": 0})
    options: dict[str, Any] = {"timeout_secs": TIMEOUT} if distributed else {}
    if resume:
        ckpt.restore(path, **options).assert_consumed()
    seen: list[list[int]] = []
    while ckpt.progress["epoch"] < EPOCHS:
        epoch, step = ckpt.progress["epoch"], ckpt.progress["step"]
        if distributed:
            loader.sampler.set_epoch(epoch)  # type: ignore[union-attr]
        for index, x, y in loader:
            seen.append(index.tolist())
            noisy = x + 0.1 * torch.randn_like(x)  # augmentation: draws from the global generator
            loss = torch.nn.functional.mse_loss(model(noisy), y)
            opt.zero_grad()
            loss.backward()
            opt.step()
            step += 1
            ckpt.progress = {"epoch": epoch, "step": step}
            if step == stop_at:
                ckpt.write(path, **options)
                return {"seen": seen, "weights": None}
        ckpt.progress = {"epoch": epoch + 1, "step": step}
    return {"seen": seen, "weights": [p.detach().clone() for p in model.parameters()],
            "draw": torch.rand(4)}  # the global generator after training


def interrupted_and_resumed(path: Path, num_workers: int, stop_at: int, distributed: bool = False) -> dict[str, Any]:
    """Train until step ``stop_at``, then resume into fresh objects built under another global seed."""
    torch.manual_seed(0)
    first = train(path, num_workers, stop_at=stop_at, distributed=distributed)
    torch.manual_seed(999)
    rest = train(path, num_workers, resume=True, distributed=distributed)
    return {**rest, "seen": first["seen"] + rest["seen"]}


def uninterrupted(path: Path, num_workers: int, distributed: bool = False) -> dict[str, Any]:
    torch.manual_seed(0)
    return train(path, num_workers, distributed=distributed)


def same_run(a: dict[str, Any], b: dict[str, Any]) -> bool:
    """Bit-equal batches, weights and global generator afterwards."""
    return (a["seen"] == b["seen"] and all(torch.equal(p, q) for p, q in zip(a["weights"], b["weights"]))
            and torch.equal(a["draw"], b["draw"]))


def main() -> None:
    directory = Path(sys.argv[1])
    rank = int(os.environ["RANK"])
    dist.init_process_group("gloo", timeout=datetime.timedelta(seconds=TIMEOUT))
    found: dict[str, Any] = {}
    try:
        for workers in (0, 2):
            whole = uninterrupted(directory / f"unused-{workers}", workers, distributed=True)
            resumed = interrupted_and_resumed(directory / f"ckpt-{workers}", workers, DIST_STOP_AT, distributed=True)
            found[f"workers{workers}"] = {"same": same_run(whole, resumed), "seen": whole["seen"],
                                          "resumed_seen": resumed["seen"]}
    except BaseException:
        found["error"] = traceback.format_exc()
    (directory / f"rank{rank}.json").write_text(json.dumps(found))
    dist.destroy_process_group()


if __name__ == "__main__":
    main()
