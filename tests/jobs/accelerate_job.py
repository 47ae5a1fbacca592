"""A tiny Accelerate training loop saved by a ``CheckpointManager``, killed and resumed
(``tests/test_accelerate.py``).

Run under the real launcher on 2 CPU processes (gloo on 127.0.0.1)::

    accelerate launch --multi_gpu --num_processes 2 --main_process_port PORT tests/jobs/accelerate_job.py DIR MODE

``--multi_gpu`` is what starts 2 processes (through torchrun); ``Accelerator(cpu=True)`` keeps them on
the CPU with gloo. ``accelerate launch --cpu --num_processes 2`` starts only one process without
``mpirun``. MODE is ``first``: each rank trains the uninterrupted run into ``DIR/whole``, then the
run to interrupt into ``DIR/run``, which SIGKILLs itself at step ``KILL_AT``, between two saves; or
``resume``: each rank resumes ``DIR/run`` from its latest checkpoint and trains to the end. Each run
writes what it ends with to ``DIR/<whole|resumed>-rank<r>.safetensors`` and ``.json``. A third
argument sets Accelerate's gradient accumulation (``accelerator.accumulate``); run as one process
(``python tests/jobs/accelerate_job.py DIR MODE 2``) it needs no launcher.
"""

from __future__ import annotations

import json
import os
import signal
import sys
from pathlib import Path
from typing import Any

import safetensors.torch
import torch
from accelerate import Accelerator
from accelerate.utils import DataLoaderConfiguration

import torchckpt

EPOCHS = 3
SAVE_EVERY = 3  # steps; the manager saves at steps 1, 4, 7 and 10 (4 steps an epoch on each of 2 ranks)
KILL_AT = 9  # 2 steps after the save at 7, which is 3 batches into the second epoch


def build(accelerator: Accelerator) -> tuple[Any, Any, Any, Any]:
    """The prepared model, optimizer, scheduler and loader, each built from fixed seeds."""
    torch.manual_seed(0)
    model = torch.nn.Sequential(torch.nn.Linear(4, 8), torch.nn.ReLU(), torch.nn.Dropout(0.2), torch.nn.Linear(8, 1))
    opt = torch.optim.AdamW(model.parameters(), lr=0.01)
    sched = torch.optim.lr_scheduler.StepLR(opt, step_size=2, gamma=0.9)
    g = torch.Generator().manual_seed(5)
    data = torch.utils.data.TensorDataset(torch.arange(24), torch.randn(24, 4, generator=g), torch.randn(24, 1, generator=g))
    # Its own generator: each new iterator (a resumed one too) draws its seed from it, not from the
    # global generator that dropout uses.
    loader = torch.utils.data.DataLoader(data, batch_size=3, shuffle=True, generator=torch.Generator().manual_seed(1))
    return accelerator.prepare(model, opt, sched, loader)


def train(accelerator: Accelerator, directory: Path, kill_at: int | None = None) -> dict[str, Any]:
    """Train ``EPOCHS`` epochs, resuming ``directory``'s latest checkpoint if it has one."""
    model, opt, sched, loader = build(accelerator)
    torch.manual_seed(100 + accelerator.process_index)  # what a resume must not depend on
    step = torch.tensor(0)
    ckpt = torchckpt.Checkpoint(model=model, opt=opt, sched=sched, rng=torchckpt.RNGState(), step=step)
    manager = torchckpt.CheckpointManager(ckpt, directory, max_to_keep=2, step_counter=step,
                                          checkpoint_interval=SAVE_EVERY, timeout_secs=60)
    manager.restore_or_initialize(strict=True)
    restored_step = int(step)
    seen: list[list[int]] = []
    epoch, done = divmod(int(step), len(loader))  # where the data stands
    accelerator.step = done  # the batches of this epoch seen: where gradient accumulation stands
    while epoch < EPOCHS:
        loader.set_epoch(epoch)  # the shuffle of each epoch depends on the epoch alone (seedable sampler)
        for index, x, y in accelerator.skip_first_batches(loader, done):
            with accelerator.accumulate(model):
                loss = torch.nn.functional.mse_loss(model(x), y)
                accelerator.backward(loss)
                opt.step()
                sched.step()
                opt.zero_grad()
            step += 1
            seen.append([int(step), *index.tolist()])
            if accelerator.sync_gradients:  # at the end of an accumulation window: no gradient held
                manager.save()
            if int(step) == kill_at:
                os.kill(os.getpid(), signal.SIGKILL)
        epoch, done = epoch + 1, 0
    manager.close()
    inner = accelerator.unwrap_model(model)
    tensors = {f"model/{k}": v.detach().clone().contiguous() for k, v in inner.state_dict().items()}
    for i, state in opt.state_dict()["state"].items():
        tensors.update({f"opt/{i}/{k}": torch.as_tensor(v).clone().contiguous() for k, v in state.items()})
    tensors["draw"] = torch.rand(4)  # the global generator after training
    return {"tensors": tensors, "seen": seen, "lr": sched.get_last_lr(), "step": int(step),
            "restored_step": restored_step}


def record(directory: Path, name: str, rank: int, result: dict[str, Any]) -> None:
    safetensors.torch.save_file(result.pop("tensors"), str(directory / f"{name}-rank{rank}.safetensors"))
    (directory / f"{name}-rank{rank}.json").write_text(json.dumps(result))


def main(directory: Path, mode: str, accumulation: int = 1) -> None:
    accelerator = Accelerator(cpu=True, gradient_accumulation_steps=accumulation,
                              dataloader_config=DataLoaderConfiguration(use_seedable_sampler=True, data_seed=7))
    rank = accelerator.process_index
    if mode == "first":
        record(directory, "whole", rank, train(accelerator, directory / "whole"))
        train(accelerator, directory / "run", kill_at=KILL_AT)
        raise AssertionError(f"rank {rank} was not killed at step {KILL_AT}")
    record(directory, "resumed", rank, train(accelerator, directory / "run"))
    accelerator.end_training()


if __name__ == "__main__":
    main(Path(sys.argv[1]), sys.argv[2], int(sys.argv[3]) if len(sys.argv) > 3 else 1)
