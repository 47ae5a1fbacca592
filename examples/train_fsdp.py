"""FSDP2 training on several CPU ranks (gloo) with a CheckpointManager: killed, then resumed on another world size.

    torchrun --standalone --nproc-per-node 2 examples/train_fsdp.py --dir runs/fsdp --crash-at 27
    torchrun --standalone --nproc-per-node 1 examples/train_fsdp.py --dir runs/fsdp

The first run saves every 5 steps (steps 1, 6, ..., 26) in the background (``async_save=True``)
and is SIGKILLed at step 27; the second resumes from the last committed checkpoint (step 26) on
one rank, resharding the 2-rank checkpoint as it reads it, and trains to the end. Every rank makes the same manager
calls; rank 0 alone numbers the checkpoints and deletes old ones.

The global batch of each step is drawn from the step number, and each rank trains on its slice
of it, so a run on any world size sees the same data.
"""

from __future__ import annotations

import argparse
import os
import signal

import torch
import torch.distributed as dist
from torch.distributed.fsdp import fully_shard

import torchckpt

GLOBAL_BATCH = 16


def build_model() -> torch.nn.Module:
    torch.manual_seed(0)
    model = torch.nn.Sequential(torch.nn.Linear(32, 64), torch.nn.GELU(), torch.nn.Linear(64, 64), torch.nn.GELU(),
                                torch.nn.Linear(64, 1))
    for layer in model:
        if isinstance(layer, torch.nn.Linear):
            fully_shard(layer)
    fully_shard(model)
    return model


def batch(step: int, rank: int, world: int) -> tuple[torch.Tensor, torch.Tensor]:
    """This rank's slice of the step's global batch (the same data whatever the world size)."""
    gen = torch.Generator().manual_seed(step)
    x = torch.randn(GLOBAL_BATCH, 32, generator=gen)
    y = x[:, :4].sum(dim=1, keepdim=True).sin()
    per = GLOBAL_BATCH // world
    return x[rank * per : (rank + 1) * per], y[rank * per : (rank + 1) * per]


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--dir", required=True, help="the checkpoint directory (shared by every rank)")
    parser.add_argument("--steps", type=int, default=40)
    parser.add_argument("--save-every", type=int, default=5)
    parser.add_argument("--crash-at", type=int, default=None, help="SIGKILL every rank at this step")
    args = parser.parse_args()

    dist.init_process_group("gloo")
    rank, world = dist.get_rank(), dist.get_world_size()
    model = build_model()
    opt = torch.optim.AdamW(model.parameters(), lr=3e-3)
    sched = torch.optim.lr_scheduler.CosineAnnealingLR(opt, T_max=args.steps)
    step = torch.tensor(0)
    ckpt = torchckpt.Checkpoint(model=model, opt=opt, sched=sched, step=step, rng=torchckpt.RNGState())
    manager = torchckpt.CheckpointManager(ckpt, args.dir, max_to_keep=3, step_counter=step,
                                          checkpoint_interval=args.save_every, async_save=True, timeout_secs=120)
    restored = manager.restore_or_initialize()
    if rank == 0:
        print(f"world size {world}: " + (f"resumed from {restored} at step {int(step)}" if restored else "fresh start"),
              flush=True)
    while int(step) < args.steps:
        if args.crash_at is not None and int(step) == args.crash_at:
            print(f"rank {rank}: killed at step {int(step)}", flush=True)
            os.kill(os.getpid(), signal.SIGKILL)
        x, y = batch(int(step), rank, world)
        loss = torch.nn.functional.mse_loss(model(x), y)
        loss.backward()
        opt.step()
        opt.zero_grad()
        sched.step()
        step += 1
        loss = loss.detach()
        dist.all_reduce(loss)
        path = manager.save(metrics={"loss": loss.item() / world})
        if path and rank == 0:
            print(f"step {int(step):3d}  loss {loss.item() / world:.5f}  saving {path}", flush=True)
    manager.close()  # waits for the last background save
    if rank == 0:
        print(f"done at step {int(step)}; kept {[os.path.basename(p) for p in manager.checkpoints]}", flush=True)
    dist.destroy_process_group()


if __name__ == "__main__":
    main()
