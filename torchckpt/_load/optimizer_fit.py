"""Whether a saved optimizer state can be one of torch's own optimizers' (``torch.optim``).

A resumed process's optimizer has never stepped: it has no state to compare the checkpoint's
with, and ``load_state_dict`` takes almost anything of the right group sizes, so that a state of
another kind fails only at the next ``step()`` (a ``KeyError``, a shape error), or in
``load_state_dict`` after other objects were restored. These checks find it while planning, from
what torch's own code says the optimizer needs: one step of a scratch optimizer of its class, on
a one-element parameter, given the saved groups (completed by the class's ``__setstate__``, as a
load completes them) and state, fails with the ``KeyError`` the real one would.
"""

from __future__ import annotations

import collections
import warnings
from typing import Any

import torch

from torchckpt._format import keypath
from torchckpt._load.plan import is_saved

# The per-parameter state each of torch's optimizers keeps element by element, of its parameter's shape
# (a key of another's, in this one's state, is the user's own: of any shape)
_ELEMENTWISE = {
    "SGD": {"momentum_buffer"}, "Adam": {"exp_avg", "exp_avg_sq", "max_exp_avg_sq"},
    "AdamW": {"exp_avg", "exp_avg_sq", "max_exp_avg_sq"}, "NAdam": {"exp_avg", "exp_avg_sq"},
    "RAdam": {"exp_avg", "exp_avg_sq"}, "Adamax": {"exp_avg", "exp_inf"}, "SparseAdam": {"exp_avg", "exp_avg_sq"},
    "RMSprop": {"square_avg", "momentum_buffer", "grad_avg"}, "Adagrad": {"sum"}, "Adadelta": {"square_avg", "acc_delta"},
    "ASGD": {"ax"}, "Rprop": {"prev", "step_size"}, "Adafactor": {"variance"}, "Muon": {"momentum_buffer"},
}


def problem(obj: torch.optim.Optimizer, current: dict[str, Any], saved: dict[str, Any]) -> str | None:
    """Why one of torch's own optimizers cannot take ``saved`` (groups of its sizes), or None. A
    never-stepped optimizer has no state to compare, so: each parameter's element-wise state must
    have the parameter's shape (parameters listed in another order), and the groups, as the
    optimizer's own ``__setstate__`` completes them on load, must hold every hyperparameter its
    groups have (an Adam's state into an SGD lacks ``momentum``: its next ``step()`` would fail),
    and each parameter's state every key its step reads (``_step_problem``)."""
    state = saved.get("state")
    if isinstance(state, dict):
        param_of = _params_by_id(obj, saved)
        for pid, entry in state.items():
            param = param_of.get(pid)
            if param is None or not isinstance(entry, dict):
                continue
            for key, value in entry.items():
                expected = _expected_shape(type(obj).__name__, key, tuple(param.shape)) \
                    if not isinstance(obj, torch.optim.LBFGS) else _lbfgs_shape(key, obj)
                if expected is not None and is_saved(value) and tuple(value.shape) != expected:
                    return (f"the checkpoint's {key!r} of its parameter {pid} has shape {list(value.shape)}, where "
                            f"this optimizer's parameter there, of shape {list(param.shape)}, needs {list(expected)} "
                            "(its parameters are listed in another order, or belong to another model)")
    return _step_problem(obj, saved)


def cast_dtypes(obj: torch.optim.Optimizer, saved: dict[str, Any], name: str) -> dict[str, torch.dtype]:
    """The saved per-parameter state ``load_state_dict`` would cast to another dtype, by key: the
    state each of torch's optimizers keeps element by element (``_ELEMENTWISE``, LBFGS's flat
    directions) of a floating-point parameter, to the parameter's dtype (torch's
    ``_process_value_according_to_param_policy``). A stepped optimizer's state has that dtype
    already, and a saved tensor of another is a dtype mismatch; this says the same of a
    never-stepped one, whose load would cast it silently (float32 moments into a bfloat16 model).
    Scalars kept in float32 whatever the parameter (NAdam's ``mu_product``, ASGD's ``eta``) are
    not compared, as a stepped optimizer's are not. A subclass of one of torch's optimizers that
    keeps its step is known by it; another optimizer (a step of its own) is not compared: its
    state may be of any dtype once it stepped too."""
    state = saved.get("state")
    if not isinstance(state, dict):
        return {}
    param_of = _params_by_id(obj, saved)
    base = next((c for c in type(obj).__mro__  # a subclass that steps as one of torch's does
                 if c.__module__.startswith("torch.optim") and (c.__name__ in _ELEMENTWISE or c is torch.optim.LBFGS)), None)
    if base is None or type(obj).step is not getattr(base, "step", None):  # a step of its own: any dtype
        return {}
    kind = base.__name__
    found: dict[str, torch.dtype] = {}
    prefix = keypath.join(name, "state")
    for pid, entry in state.items():
        param = param_of.get(pid)
        if param is None or not isinstance(entry, dict) or not param.is_floating_point():
            continue
        dtype, shape = param.dtype, tuple(param.shape)
        for key, value in entry.items():  # the state kept element by element, in the parameter's dtype once stepped;
            if type(key) is str and is_saved(value) and value.dtype != dtype and (  # not NAdam's float32 mu_product
                    _lbfgs_shape(key, obj) if kind == "LBFGS" else _expected_shape(kind, key, shape)) is not None:
                found[keypath.join(keypath.join(prefix, keypath.key_part(pid)), keypath.key_part(key))] = dtype
    return found


def _params_by_id(obj: torch.optim.Optimizer, saved: dict[str, Any]) -> dict[Any, torch.Tensor]:
    """Each saved parameter id -> the optimizer's parameter at its place (groups of equal sizes)."""
    return {pid: p for group, mine in zip(saved["param_groups"], obj.param_groups)
            for pid, p in zip(group["params"], mine["params"]) if type(pid) in (int, str)}


def _expected_shape(kind: str, key: str, shape: tuple[int, ...]) -> tuple[int, ...] | None:
    """The shape torch's optimizer ``kind`` (its class name) keeps ``key`` in for a parameter of
    ``shape``; None where it keeps no such state (the user's own key)."""
    if key in _ELEMENTWISE.get(kind, ()):
        return shape
    if kind == "Adafactor" and key in ("row_var", "col_var") and len(shape) >= 2:  # the factors of a matrix
        return (*shape[:-1], 1) if key == "row_var" else (*shape[:-2], 1, shape[-1])
    return None


def _lbfgs_shape(key: str, obj: torch.optim.Optimizer) -> tuple[int, ...] | None:
    """LBFGS keeps its directions flat, over every parameter of its one group (a complex one as
    twice as many reals)."""
    if key in ("d", "prev_flat_grad"):
        return (sum(p.numel() * (2 if p.is_complex() else 1) for p in obj.param_groups[0]["params"]),)
    return None


def _step_problem(obj: torch.optim.Optimizer, saved: dict[str, Any]) -> str | None:
    """Why ``obj``'s step would fail on the saved groups and state (a ``KeyError``: a hyperparameter
    or a state its step reads and the checkpoint lacks), or None: one step of a scratch optimizer
    of its class, given each saved group (completed by the class's own ``__setstate__``, as
    ``load_state_dict`` does) and a parameter's saved state, on a one-element parameter of as
    many dimensions. Without the optimizers' step hooks: nothing of the user's runs. Any other
    failure is one this check cannot judge (LBFGS needs a closure): ``load_state_dict`` will."""
    step = getattr(type(obj).step, "__wrapped__", None)  # the step without torch's hooks and profiling
    if step is None:
        return None
    raw = saved.get("state")
    state: dict[Any, Any] = raw if isinstance(raw, dict) else {}
    tried: set[tuple[int, int, frozenset[str]]] = set()
    for i, (group, mine) in enumerate(zip(saved["param_groups"], obj.param_groups)):
        for pid, param in [*zip(group["params"], mine["params"])][:64] or [(None, None)]:
            entry = state.get(pid) if type(pid) in (int, str) else None
            entry = entry if isinstance(entry, dict) else {}
            ndim = param.dim() if param is not None else 1
            kind = (i, ndim, frozenset(entry))
            if kind in tried:
                continue
            tried.add(kind)
            missing = _scratch_step(obj, step, group, entry, ndim)
            if missing is not None:
                where = f"parameter group {i}" if missing in obj.defaults else f"state of its parameter {pid}"
                return (f"the checkpoint's {where} lacks {missing!r}, which this {type(obj).__name__} steps with: it "
                        "was saved from another kind of optimizer")
    return None


def _scratch_step(obj: torch.optim.Optimizer, step: Any, group: dict[str, Any], entry: dict[str, Any],
                  ndim: int) -> str | None:
    """The key one step of a scratch optimizer of ``obj``'s class misses, given ``group`` and the
    state ``entry`` (tensors in place of the saved ones, of a one-element parameter's shapes), or None."""
    param = torch.nn.Parameter(torch.zeros((1,) * ndim))
    param.grad = torch.zeros_like(param)
    scratch = object.__new__(type(obj))
    hyper = {k: v for k, v in group.items() if k != "params"}
    if any(is_saved(v) for v in hyper.values()):
        return None  # a hyperparameter held as a tensor (a capturable lr): not judged here
    values = {k: torch.zeros((1,) * len(v.shape) if len(v.shape) else (), dtype=v.dtype) if is_saved(v) else v
              for k, v in entry.items()}
    try:
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")
            state: collections.defaultdict[Any, dict[str, Any]] = collections.defaultdict(dict)  # an optimizer's own
            if values:
                state[param] = values
            type(obj).__setstate__(scratch, {"defaults": dict(obj.defaults), "state": state,
                                             "param_groups": [{**hyper, "params": [param]}]})
            step(scratch)
    except KeyError as e:
        return str(e.args[0]) if e.args else "a key"
    except Exception:  # noqa: BLE001 - a failure this check cannot judge: load_state_dict will
        return None
    return None
