"""Holds a CheckpointManager on DIRECTORY until killed: python hold_manager.py DIRECTORY."""

import sys
import time

import torch

import torchckpt

manager = torchckpt.CheckpointManager(torchckpt.Checkpoint(v=torch.zeros(1)), sys.argv[1])
print("ready", flush=True)
time.sleep(600)
