"""A training loop that stops when preempted: ``python -m tests.jobs.preempt_job DIR [--steps N] [--async]``.

One process, or every rank of a job (``RANK``/``WORLD_SIZE`` set: gloo on 127.0.0.1, DDP-style
replicated weights). The loop saves every ``--interval`` steps through a manager that handles
SIGTERM and SIGUSR1; a signal makes the next ``save()`` write whatever the interval, and the loop
breaks. It resumes from the directory, prints ``step N`` after each step (flushing), and at the
end writes ``DIR/result-rank<r>.json``: where it stopped, and the model and optimizer state.
"""

from __future__ import annotations

import argparse
import datetime
import json
import os
import signal
import time

import torch
import torch.distributed as dist

import torchckpt


def batch(step: int) -> tuple[torch.Tensor, torch.Tensor]:
    """The data of one step, from the step number alone: the same on any resume."""
    g = torch.Generator().manual_seed(1000 + step)
    return torch.randn(16, 8, generator=g), torch.randn(16, 1, generator=g)


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("directory")
    parser.add_argument("--steps", type=int, default=400)
    parser.add_argument("--interval", type=int, default=50)
    parser.add_argument("--async", dest="async_save", action="store_true")
    parser.add_argument("--sleep", type=float, default=0.02)
    parser.add_argument("--workers", type=int, default=0, help="DataLoader worker processes that run along")
    parser.add_argument("--unshielded", action="store_true", help="workers without torchckpt.IgnoreSignals")
    args = parser.parse_args()
    world = int(os.environ.get("WORLD_SIZE", "1"))
    if world > 1 and not dist.is_initialized():
        dist.init_process_group("gloo", timeout=datetime.timedelta(seconds=60))
    rank = dist.get_rank() if dist.is_initialized() else 0
    torch.manual_seed(0)
    model = torch.nn.Sequential(torch.nn.Linear(8, 32), torch.nn.Tanh(), torch.nn.Linear(32, 1))
    opt = torch.optim.Adam(model.parameters(), lr=1e-2)
    step = torch.zeros((), dtype=torch.int64)
    ckpt = torchckpt.Checkpoint(model=model, opt=opt, step=step)
    manager = torchckpt.CheckpointManager(ckpt, args.directory, max_to_keep=3, step_counter=step,
                                          checkpoint_interval=args.interval, async_save=args.async_save,
                                          preemption_signals=(signal.SIGTERM, signal.SIGUSR1), timeout_secs=30)
    manager.restore_or_initialize()
    print(f"rank {rank}: starting at step {int(step)}", flush=True)
    shield = None if args.unshielded else torchckpt.IgnoreSignals(signal.SIGTERM, signal.SIGUSR1)
    loader = torch.utils.data.DataLoader(range(10**6), num_workers=args.workers, worker_init_fn=shield)
    fed = iter(loader)  # workers that live through the run, as a training loop's do
    while int(step) < args.steps:
        next(fed)
        x, y = batch(int(step))
        loss = torch.nn.functional.mse_loss(model(x), y)
        opt.zero_grad()
        loss.backward()
        if world > 1:
            for p in model.parameters():
                dist.all_reduce(p.grad)
                p.grad /= world
        opt.step()
        step += 1
        manager.save()
        if manager.preempted:
            print(f"rank {rank}: preempted, saved step {int(step)}", flush=True)
            break
        print(f"step {int(step)}", flush=True)
        time.sleep(args.sleep)
    manager.close()
    state = {f"model/{k}": v.tolist() for k, v in model.state_dict().items()}
    state.update({f"opt/{i}/{f}": (v.tolist() if isinstance(v, torch.Tensor) else v)
                  for i, fields in opt.state_dict()["state"].items() for f, v in fields.items()})
    result = {"step": int(step), "preempted": manager.preempted, "latest": manager.latest_checkpoint,
              "handler_back": signal.getsignal(signal.SIGTERM) == signal.SIG_DFL, "state": state}
    with open(os.path.join(args.directory, f"result-rank{rank}.json"), "w") as f:
        json.dump(result, f)
    if dist.is_initialized():
        dist.destroy_process_group()


if __name__ == "__main__":
    main()
