"""Saves N checkpoints through a manager, each internally consistent: python train_writer.py DIRECTORY N."""

import sys
import time

import torch

import torchckpt

step = torch.tensor(0)
weights = torch.zeros(64, 64)
ckpt = torchckpt.Checkpoint(step=step, weights=weights, model=torch.nn.Linear(8, 8), note="")
manager = torchckpt.CheckpointManager(ckpt, sys.argv[1], max_to_keep=None, step_counter=step)
for i in range(1, int(sys.argv[2]) + 1):
    step.fill_(i)
    weights.fill_(float(i))
    ckpt.note = f"step {i}"
    manager.save(metrics={"step": i})
    time.sleep(0.05)
print("done", flush=True)
