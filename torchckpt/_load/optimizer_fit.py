"""Whether a saved optimizer state can be one of torch's own optimizers' (``torch.optim``).

A resumed process's optimizer has never stepped: it has no state to compare the checkpoint's
with, and ``load_state_dict`` takes almost anything of the right group sizes, so that a state of
another kind fails only at the next ``step()`` (a ``KeyError``, a shape error), or in
``load_state_dict`` after other objects were restored. These checks find it while planning, from
what torch's own code says the optimizer needs: its ``__setstate__`` completes older groups, and
one step of a scratch optimizer on a one-element parameter names the state its step keeps.
"""

from __future__ import annotations

import warnings
from typing import Any

import torch

from torchckpt._load.plan import is_saved

# Per-parameter state that torch's optimizers keep element by element: of the parameter's shape
_ELEMENTWISE = frozenset({"exp_avg", "exp_avg_sq", "max_exp_avg_sq", "momentum_buffer", "square_avg", "acc_delta",
                          "grad_avg", "sum", "exp_inf", "ax", "prev", "step_size"})


def problem(obj: torch.optim.Optimizer, current: dict[str, Any], saved: dict[str, Any]) -> str | None:
    """Why one of torch's own optimizers cannot take ``saved`` (groups of its sizes), or None. A
    never-stepped optimizer has no state to compare, so: each parameter's element-wise state must
    have the parameter's shape (parameters listed in another order), and the groups, as the
    optimizer's own ``__setstate__`` completes them on load, must hold every hyperparameter its
    groups have (an Adam's state into an SGD lacks ``momentum``: its next ``step()`` would fail),
    and each parameter's state every key its step reads (``_lacking_state``)."""
    state = saved.get("state")
    if isinstance(state, dict):
        param_of = {pid: p for group, mine in zip(saved["param_groups"], obj.param_groups)
                    for pid, p in zip(group["params"], mine["params"]) if type(pid) in (int, str)}
        for pid, entry in state.items():
            param = param_of.get(pid)
            if param is None or not isinstance(entry, dict):
                continue
            for key, value in entry.items():
                if key in _ELEMENTWISE and is_saved(value) and tuple(value.shape) != tuple(param.shape):
                    return (f"the checkpoint's {key!r} of its parameter {pid} has shape {list(value.shape)}, where "
                            f"this optimizer's parameter there has shape {list(param.shape)} (its parameters are "
                            "listed in another order, or belong to another model)")
    scratch = object.__new__(type(obj))
    groups = [{**{k: v for k, v in g.items() if k != "params"}, "params": []} for g in saved["param_groups"]]
    try:  # torch's own completion of older groups (flags added since), on a scratch optimizer: nothing changes
        type(obj).__setstate__(scratch, {"defaults": dict(obj.defaults), "state": {}, "param_groups": groups})
    except Exception:  # noqa: BLE001 - a form this check cannot judge: load_state_dict will
        return None
    for i, (mine, theirs) in enumerate(zip(current["param_groups"], groups)):  # its hyperparameters: not a
        lacking = [k for k in mine if k in obj.defaults and k not in theirs]  # scheduler's, a user's, param_names
        if lacking:
            return (f"the checkpoint's parameter group {i} lacks {', '.join(map(repr, lacking))}, which this "
                    f"{type(obj).__name__} steps with: it was saved from another kind of optimizer")
    return _lacking_state(obj, saved)


def _lacking_state(obj: torch.optim.Optimizer, saved: dict[str, Any]) -> str | None:
    """Why a parameter's saved state lacks what ``obj``'s step reads (an Adam's state into an
    Adamax lacks ``exp_inf``), or None: compared with the state one step of a scratch optimizer
    of its class keeps, with the saved group's hyperparameters, for a parameter of as many
    dimensions (Adafactor factors matrices)."""
    state = saved.get("state")
    if not isinstance(state, dict) or not state:
        return None
    ids = [(group, pid, p) for group, mine in zip(saved["param_groups"], obj.param_groups)
           for pid, p in zip(group["params"], mine["params"])]
    expected: dict[tuple[int, int], frozenset[str] | None] = {}
    for group, pid, param in ids:
        entry = state.get(pid) if type(pid) in (int, str) else None
        if not isinstance(entry, dict) or not entry:
            continue
        kind = (id(group), param.dim())
        if kind not in expected:
            expected[kind] = _kept_by_step(obj, group, param.dim())
        lacking = sorted((expected[kind] or frozenset()) - entry.keys())
        if lacking:
            return (f"the checkpoint's state of its parameter {pid} lacks {', '.join(map(repr, lacking))}, which this "
                    f"{type(obj).__name__} steps with: it was saved from another kind of optimizer")
    return None


_FLAGS = frozenset({"foreach", "fused", "capturable", "differentiable"})  # how it computes, not what it keeps


def _kept_by_step(obj: torch.optim.Optimizer, group: dict[str, Any], ndim: int) -> frozenset[str] | None:
    """The state keys one step of ``obj``'s class keeps for a parameter of ``ndim`` dimensions, with
    ``group``'s hyperparameters; None where a scratch step cannot tell (LBFGS needs a closure,
    SparseAdam sparse gradients, a hyperparameter held as a tensor)."""
    hyper = {k: v for k, v in group.items() if k in obj.defaults and k not in _FLAGS}
    if any(is_saved(v) for v in hyper.values()):
        return None
    param = torch.nn.Parameter(torch.zeros((1,) * ndim))
    param.grad = torch.zeros_like(param)
    try:
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")
            scratch = type(obj)([param], **hyper)
            scratch.step()
    except Exception:  # noqa: BLE001 - any refusal: this check cannot judge, load_state_dict will
        return None
    return frozenset(scratch.state[param])
