"""Train, checkpoint, crash, resume, and check that the resumed run matches an uninterrupted one.

    python examples/quickstart.py [--dir DIRECTORY]

The crash is simulated by raising mid-run and throwing away every object; the resumed run builds
fresh objects (with different random weights), restores the latest checkpoint, and continues.
"""

from __future__ import annotations

import argparse
import tempfile

import torch

import torchckpt

STEPS = 30
SAVE_EVERY = 5
CRASH_AT = 17


class Crash(Exception):
    pass


def build(seed: int):
    torch.manual_seed(seed)
    model = torch.nn.Sequential(torch.nn.Linear(8, 32), torch.nn.ReLU(), torch.nn.Linear(32, 1))
    opt = torch.optim.AdamW(model.parameters(), lr=1e-2)
    sched = torch.optim.lr_scheduler.CosineAnnealingLR(opt, T_max=STEPS)
    return model, opt, sched


def train(model, opt, sched, ckpt=None, directory=None, crash_at=None, start=0):
    for step in range(start, STEPS):
        if step == crash_at:
            raise Crash(f"simulated crash at step {step}")
        x = torch.randn(16, 8)  # drawn from torch's RNG, which the checkpoint restores
        y = x.sum(dim=1, keepdim=True)
        opt.zero_grad()
        loss = torch.nn.functional.mse_loss(model(x), y)
        loss.backward()
        opt.step()
        sched.step()
        if ckpt is not None and (step + 1) % SAVE_EVERY == 0:
            ckpt.step = step + 1
            path = ckpt.save(f"{directory}/ckpt")
            print(f"step {step + 1:2d}  loss {loss.item():.4f}  saved {path}")
    return model


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--dir", default=None, help="where to write checkpoints (default: a temporary directory)")
    directory = parser.parse_args().dir or tempfile.mkdtemp(prefix="torchckpt-quickstart-")

    reference = build(0)
    torch.manual_seed(1234)  # the data stream
    train(*reference)

    model, opt, sched = build(0)
    torch.manual_seed(1234)
    ckpt = torchckpt.Checkpoint(model=model, opt=opt, sched=sched, rng=torchckpt.RNGState(), step=0)
    try:
        train(model, opt, sched, ckpt, directory, crash_at=CRASH_AT)
    except Crash as e:
        print(f"!! {e}: every object is discarded")
    del model, opt, sched, ckpt

    model, opt, sched = build(seed=99)  # a fresh process would start from different weights
    ckpt = torchckpt.Checkpoint(model=model, opt=opt, sched=sched, rng=torchckpt.RNGState(), step=0)
    status = ckpt.restore(directory)  # the directory's latest checkpoint
    status.assert_consumed()
    print(f"restored {torchckpt.latest_checkpoint(directory)} at step {ckpt.step}: {status.report}")
    train(model, opt, sched, ckpt, directory, start=ckpt.step)

    same = all(torch.equal(a, b) for a, b in zip(reference[0].parameters(), model.parameters()))
    print(f"resumed run matches the uninterrupted run bit for bit: {same}")
    if not same:
        raise SystemExit(1)


if __name__ == "__main__":
    main()
