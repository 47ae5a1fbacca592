"""A GAN training loop with a CheckpointManager: keeps the last N and the best by a metric, resumes.

    python examples/train_gan.py --dir runs/gan --steps 300

Stop it at any time (Ctrl-C, or kill it): run the same command again and it resumes from its
latest checkpoint, bit for bit as if it had not stopped. Ctrl-C also writes a final checkpoint.
"""

from __future__ import annotations

import argparse

import torch

import torchckpt

REAL_MEAN = torch.tensor([2.0, -1.0])


def build():
    generator = torch.nn.Sequential(torch.nn.Linear(4, 32), torch.nn.ReLU(), torch.nn.Linear(32, 2))
    discriminator = torch.nn.Sequential(torch.nn.Linear(2, 32), torch.nn.LeakyReLU(0.2), torch.nn.Linear(32, 1))
    return generator, discriminator


def sample_quality(generator: torch.nn.Module) -> float:
    """Distance between the generated and the real mean (lower is better); uses its own RNG."""
    with torch.no_grad():
        noise = torch.randn(512, 4, generator=torch.Generator().manual_seed(0))
        return float((generator(noise).mean(0) - REAL_MEAN).norm())


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--dir", default="runs/gan")
    parser.add_argument("--steps", type=int, default=300)
    parser.add_argument("--save-every", type=int, default=25)
    parser.add_argument("--max-to-keep", type=int, default=3)
    parser.add_argument("--keep-best", type=int, default=2)
    args = parser.parse_args()

    torch.manual_seed(0)
    generator, discriminator = build()
    g_opt = torch.optim.Adam(generator.parameters(), lr=2e-3, betas=(0.5, 0.999))
    d_opt = torch.optim.Adam(discriminator.parameters(), lr=2e-3, betas=(0.5, 0.999))
    g_sched = torch.optim.lr_scheduler.StepLR(g_opt, step_size=100, gamma=0.5)
    step = torch.tensor(0)
    ckpt = torchckpt.Checkpoint(generator=generator, discriminator=discriminator, g_opt=g_opt, d_opt=d_opt,
                                g_sched=g_sched, step=step, rng=torchckpt.RNGState())
    manager = torchckpt.CheckpointManager(
        ckpt, args.dir, max_to_keep=args.max_to_keep, step_counter=step, checkpoint_interval=args.save_every,
        keep_best=args.keep_best, best_metric="quality", best_mode="min",
    )
    restored = manager.restore_or_initialize()
    print(f"resumed from {restored} at step {int(step)}" if restored else "starting from scratch")

    bce = torch.nn.BCEWithLogitsLoss()
    try:
        while int(step) < args.steps:
            real = torch.randn(64, 2) * 0.5 + REAL_MEAN
            fake = generator(torch.randn(64, 4))
            d_opt.zero_grad()
            d_loss = bce(discriminator(real), torch.ones(64, 1)) + bce(discriminator(fake.detach()), torch.zeros(64, 1))
            d_loss.backward()
            d_opt.step()
            g_opt.zero_grad()
            g_loss = bce(discriminator(fake), torch.ones(64, 1))
            g_loss.backward()
            g_opt.step()
            g_sched.step()
            step += 1
            if int(step) % args.save_every == 0:
                quality = sample_quality(generator)
                path = manager.save(metrics={"quality": quality, "d_loss": d_loss.item(), "g_loss": g_loss.item()})
                if path:
                    print(f"step {int(step):4d}  quality {quality:.3f}  saved {path}", flush=True)
    except KeyboardInterrupt:
        path = manager.save(check_interval=False, metrics={"quality": sample_quality(generator)})
        print(f"interrupted at step {int(step)}; saved {path}")
        return
    print(f"done: latest {manager.latest_checkpoint}, best {manager.best_checkpoint}")


if __name__ == "__main__":
    main()
