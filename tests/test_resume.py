"""Bit-exact resume: every optimizer and every LR scheduler, 5 steps + restore + 6 == 11 steps."""

from __future__ import annotations

from collections.abc import Callable

import pytest
import torch
from torch.optim import lr_scheduler as lrs

import torchckpt

from .conftest import make_mlp

OPTIMIZERS: dict[str, Callable[[list[torch.nn.Parameter]], torch.optim.Optimizer]] = {
    "sgd-momentum-nesterov": lambda p: torch.optim.SGD(p, lr=0.05, momentum=0.9, nesterov=True),
    "adam": lambda p: torch.optim.Adam(p, lr=0.01),
    "adam-amsgrad": lambda p: torch.optim.Adam(p, lr=0.01, amsgrad=True),
    "adamw": lambda p: torch.optim.AdamW(p, lr=0.01),
    "adamax": lambda p: torch.optim.Adamax(p, lr=0.01),
    "nadam": lambda p: torch.optim.NAdam(p, lr=0.01),
    "radam": lambda p: torch.optim.RAdam(p, lr=0.01),
    "adagrad": lambda p: torch.optim.Adagrad(p, lr=0.05),
    "adadelta": lambda p: torch.optim.Adadelta(p, lr=1.0),
    "rmsprop-centered": lambda p: torch.optim.RMSprop(p, lr=0.01, centered=True, momentum=0.5),
    "rprop": lambda p: torch.optim.Rprop(p, lr=0.01),
    "asgd": lambda p: torch.optim.ASGD(p, lr=0.01, t0=2),
    "lbfgs": lambda p: torch.optim.LBFGS(p, lr=0.5, max_iter=3, history_size=4),
    "adafactor": lambda p: torch.optim.Adafactor(p, lr=0.01),
}

SCHEDULERS: dict[str, Callable[[torch.optim.Optimizer], object]] = {
    "LambdaLR": lambda o: lrs.LambdaLR(o, lambda e: 0.9**e),
    "MultiplicativeLR": lambda o: lrs.MultiplicativeLR(o, lambda e: 0.95),
    "StepLR": lambda o: lrs.StepLR(o, step_size=3, gamma=0.5),
    "MultiStepLR": lambda o: lrs.MultiStepLR(o, milestones=[2, 6, 9], gamma=0.5),
    "ConstantLR": lambda o: lrs.ConstantLR(o, factor=0.5, total_iters=7),
    "LinearLR": lambda o: lrs.LinearLR(o, start_factor=0.2, total_iters=8),
    "ExponentialLR": lambda o: lrs.ExponentialLR(o, gamma=0.9),
    "PolynomialLR": lambda o: lrs.PolynomialLR(o, total_iters=12, power=2.0),
    "CosineAnnealingLR": lambda o: lrs.CosineAnnealingLR(o, T_max=5),
    "CosineAnnealingWarmRestarts": lambda o: lrs.CosineAnnealingWarmRestarts(o, T_0=3, T_mult=2),
    "CyclicLR": lambda o: lrs.CyclicLR(o, base_lr=0.001, max_lr=0.05, step_size_up=3),
    "OneCycleLR": lambda o: lrs.OneCycleLR(o, max_lr=0.05, total_steps=20),
    "ReduceLROnPlateau": lambda o: lrs.ReduceLROnPlateau(o, patience=0, factor=0.5),
    "SequentialLR": lambda o: lrs.SequentialLR(
        o, [lrs.LinearLR(o, start_factor=0.1, total_iters=4), lrs.ExponentialLR(o, gamma=0.9)], milestones=[4]
    ),
    "ChainedScheduler": lambda o: lrs.ChainedScheduler(
        [lrs.ConstantLR(o, factor=0.5, total_iters=6), lrs.ExponentialLR(o, gamma=0.9)]
    ),
}


def batch(step: int) -> tuple[torch.Tensor, torch.Tensor]:
    g = torch.Generator().manual_seed(step)
    return torch.randn(8, 4, generator=g), torch.randn(8, 3, generator=g)


def run_steps(model, opt, sched, steps: range) -> None:
    for step in steps:
        x, y = batch(step)

        def closure(x=x, y=y):
            opt.zero_grad()
            loss = torch.nn.functional.mse_loss(model(x), y)
            loss.backward()
            return loss

        loss = opt.step(closure)
        if sched is None:
            continue
        if isinstance(sched, lrs.ReduceLROnPlateau):
            sched.step(float(loss.detach()) + (step % 3))  # a noisy metric so that the plateau logic fires
        else:
            sched.step()


def build(seed: int, make_opt, make_sched):
    model = make_mlp(seed)
    opt = make_opt(list(model.parameters()))
    sched = make_sched(opt) if make_sched else None
    return model, opt, sched


def lrs_of(opt):
    return [g["lr"] for g in opt.param_groups]


def check_resume(tmp_path, make_opt, make_sched) -> None:
    reference = build(0, make_opt, make_sched)
    run_steps(*reference, range(11))

    first = build(0, make_opt, make_sched)
    run_steps(*first, range(5))
    model, opt, sched = first
    objects = {"model": model, "opt": opt}
    if sched is not None:
        objects["sched"] = sched
    path = torchckpt.Checkpoint(**objects, step=5).save(tmp_path / "ckpt")

    resumed = build(123, make_opt, make_sched)  # different initial weights
    model, opt, sched = resumed
    assert not torch.equal(next(model.parameters()), next(reference[0].parameters()))
    objects = {"model": model, "opt": opt}
    if sched is not None:
        objects["sched"] = sched
    ckpt = torchckpt.Checkpoint(**objects, step=0)
    ckpt.restore(path).assert_consumed()
    assert ckpt.step == 5
    run_steps(*resumed, range(5, 11))

    for (name, a), b in zip(reference[0].named_parameters(), resumed[0].parameters()):
        assert torch.equal(a, b), f"{name} differs after resume"
    assert lrs_of(reference[1]) == lrs_of(resumed[1])
    if make_sched is not None:
        assert reference[2].state_dict().keys() == resumed[2].state_dict().keys()


@pytest.mark.parametrize("name", list(OPTIMIZERS))
def test_every_optimizer_resumes_bit_exact(tmp_path, name):
    check_resume(tmp_path, OPTIMIZERS[name], SCHEDULERS["StepLR"])


@pytest.mark.parametrize("name", list(SCHEDULERS))
def test_every_scheduler_resumes_bit_exact(tmp_path, name):
    make_opt = OPTIMIZERS["sgd-momentum-nesterov"] if name == "CyclicLR" else OPTIMIZERS["adam"]
    check_resume(tmp_path, make_opt, SCHEDULERS[name])


def test_grad_scaler_resumes(tmp_path):
    scaler = torch.amp.GradScaler("cpu", init_scale=1024.0, growth_interval=3)
    scaler._lazy_init_scale_growth_tracker(torch.device("cpu")) if hasattr(scaler, "_lazy_init_scale_growth_tracker") else None
    scaler.update(512.0)
    path = torchckpt.Checkpoint(scaler=scaler).save(tmp_path / "ckpt")
    fresh = torch.amp.GradScaler("cpu", init_scale=2.0, growth_interval=100)
    torchckpt.Checkpoint(scaler=fresh).restore(path).assert_consumed()
    assert fresh.state_dict() == scaler.state_dict()
