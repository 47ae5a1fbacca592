"""A validation process that follows a training directory and evaluates each new checkpoint.

    python examples/validate_watch.py --dir runs/gan --timeout 30

It only ever sees completely written checkpoints, restores just the generator from each
(`expect_partial()`: the rest of the training state is not needed here), and stops after
`--timeout` seconds without a new checkpoint.
"""

from __future__ import annotations

import argparse
import os

import torch
from train_gan import build, sample_quality

import torchckpt


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--dir", default="runs/gan")
    parser.add_argument("--timeout", type=float, default=30.0)
    args = parser.parse_args()

    generator, _ = build()
    step = torch.tensor(0)
    ckpt = torchckpt.Checkpoint(generator=generator, step=step)
    count = 0
    for path in torchckpt.checkpoints_iterator(args.dir, timeout=args.timeout, poll_interval_secs=0.2):
        try:
            status = ckpt.read(path)
        except torchckpt.CheckpointNotFoundError:  # deleted by max_to_keep before we got to it
            continue
        status.assert_existing_objects_matched().expect_partial()
        count += 1
        print(f"{os.path.basename(path)}: step {int(step):4d}  quality {sample_quality(generator):.3f}", flush=True)
    print(f"no new checkpoint for {args.timeout:g}s; validated {count} checkpoints")


if __name__ == "__main__":
    main()
