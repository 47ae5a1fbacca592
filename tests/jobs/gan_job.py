"""A small GAN training job that checkpoints every 2 steps and resumes from its latest checkpoint.

Usage: python gan_job.py DIRECTORY TOTAL_STEPS OUT_FILE [SLEEP_SECS]
It prints "saved <step>" after each checkpoint, and writes the final parameters to OUT_FILE
(a safetensors file) when it finishes.
"""

from __future__ import annotations

import random
import sys
import time

import numpy as np
import torch
from safetensors.torch import save_file

import torchckpt


def main() -> None:
    directory, total, out = sys.argv[1], int(sys.argv[2]), sys.argv[3]
    sleep = float(sys.argv[4]) if len(sys.argv) > 4 else 0.0
    torch.manual_seed(0)
    random.seed(0)
    np.random.seed(0)
    generator = torch.nn.Sequential(torch.nn.Linear(4, 16), torch.nn.ReLU(), torch.nn.Linear(16, 2))
    discriminator = torch.nn.Sequential(torch.nn.Linear(2, 16), torch.nn.LeakyReLU(0.2), torch.nn.Linear(16, 1))
    g_opt = torch.optim.Adam(generator.parameters(), lr=2e-3, betas=(0.5, 0.999))
    d_opt = torch.optim.Adam(discriminator.parameters(), lr=2e-3, betas=(0.5, 0.999))
    g_sched = torch.optim.lr_scheduler.ExponentialLR(g_opt, gamma=0.97)
    step = torch.tensor(0)
    ckpt = torchckpt.Checkpoint(generator=generator, discriminator=discriminator, g_opt=g_opt, d_opt=d_opt,
                                g_sched=g_sched, step=step, rng=torchckpt.RNGState())
    if torchckpt.latest_checkpoint(directory):
        ckpt.restore(directory).assert_consumed()
    bce = torch.nn.BCEWithLogitsLoss()
    while int(step) < total:
        real = torch.randn(16, 2) * 0.5 + torch.tensor([2.0, -1.0]) + float(np.random.rand()) * 0.01
        noise = torch.randn(16, 4) * (1.0 + random.random() * 0.01)
        fake = generator(noise)
        d_opt.zero_grad()
        d_loss = bce(discriminator(real), torch.ones(16, 1)) + bce(discriminator(fake.detach()), torch.zeros(16, 1))
        d_loss.backward()
        d_opt.step()
        g_opt.zero_grad()
        g_loss = bce(discriminator(fake), torch.ones(16, 1))
        g_loss.backward()
        g_opt.step()
        g_sched.step()
        step += 1
        if int(step) % 2 == 0:
            ckpt.save(f"{directory}/ckpt")
            print(f"saved {int(step)}", flush=True)
        time.sleep(sleep)
    final = {f"g.{k}": v for k, v in generator.state_dict().items()}
    final.update({f"d.{k}": v for k, v in discriminator.state_dict().items()})
    final["d_opt.exp_avg"] = d_opt.state_dict()["state"][0]["exp_avg"]
    save_file({k: v.contiguous() for k, v in final.items()}, out)


if __name__ == "__main__":
    main()
