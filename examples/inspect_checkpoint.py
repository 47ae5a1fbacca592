"""Inspect a checkpoint without loading it: shapes, dtypes, state, metadata, and one tensor.

    python examples/inspect_checkpoint.py [PATH]

PATH can be a checkpoint directory, a directory a CheckpointManager writes into, a .safetensors
file or a Hugging Face sharded folder. Without PATH, a small checkpoint is made first.
"""

from __future__ import annotations

import sys
import tempfile

import torch

import torchckpt


def make_example() -> str:
    model = torch.nn.Sequential(torch.nn.Linear(16, 32), torch.nn.ReLU(), torch.nn.Linear(32, 4))
    opt = torch.optim.AdamW(model.parameters(), lr=3e-4)
    model(torch.randn(2, 16)).sum().backward()
    opt.step()
    ckpt = torchckpt.Checkpoint(model=model, opt=opt, epoch=7, config={"hidden": 32, "dropout": 0.1})
    manager = torchckpt.CheckpointManager(ckpt, tempfile.mkdtemp(prefix="torchckpt-inspect-"))
    manager.save(metrics={"val_loss": 0.42})
    return manager.directory


def main() -> None:
    path = sys.argv[1] if len(sys.argv) > 1 else make_example()
    reader = torchckpt.load_checkpoint(path)  # reads index.json (and headers), no tensor data
    print(f"{reader.path} ({reader.kind})")
    shapes, dtypes = reader.get_variable_to_shape_map(), reader.get_variable_to_dtype_map()
    for name in reader.names:
        print(f"  {name:40s} {str(dtypes[name]):16s} {list(shapes[name])}")
    if reader.kind == "torchckpt":
        meta = reader.metadata
        print(f"objects: {meta['objects']}\nmetrics: {meta['metrics']}")
        print(f"epoch: {reader.get_value('epoch')}, config: {reader.get_value('config')}")
        print(f"learning rate: {reader.get_value('opt/param_groups/0/lr')}")
    first = reader.names[0]
    print(f"{first} = {reader.get_tensor(first).flatten()[:4].tolist()} ... (only this tensor was read)")


if __name__ == "__main__":
    main()
