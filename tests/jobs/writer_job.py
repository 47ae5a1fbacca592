"""Writes large checkpoints in a loop until killed: python writer_job.py DIRECTORY."""

from __future__ import annotations

import sys

import torch

import torchckpt

directory = sys.argv[1]
ckpt = torchckpt.Checkpoint(**{f"t{i}": torch.full((1_000_000,), float(i)) for i in range(16)}, n=0)
while True:
    ckpt.n += 1
    for i in range(16):
        getattr(ckpt, f"t{i}").fill_(ckpt.n)
    ckpt.save(f"{directory}/ckpt", max_shard_size="16MB")
    print(f"saved {ckpt.n}", flush=True)
