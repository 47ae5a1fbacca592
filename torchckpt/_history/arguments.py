"""What a manager's caller passes, checked before anything is touched: its options, checkpoint
numbers and metrics (recorded in the state file, so they must be plain JSON values).
"""

from __future__ import annotations

import json
import os
from collections.abc import Callable
from typing import Any

import torch

from torchckpt._format import spec
from torchckpt._history.retention import MetricFn, metric_failure
from torchckpt.errors import a_or_an, short_repr


def plain_metrics(metrics: Any) -> dict[str, Any] | None:
    """A ``save(metrics=...)`` as plain values (None for None), checked before anything is written:
    a bad value must not commit a checkpoint that the state file then cannot record."""
    if metrics is None:
        return None
    if not isinstance(metrics, dict):
        raise TypeError(f"metrics must be a dict, got {type(metrics).__name__}.")
    out: dict[str, Any] = {}
    for key, value in metrics.items():
        if not isinstance(key, str):
            raise TypeError(f"metrics keys must be strings, got {key!r} ({type(key).__name__}).")
        out[key] = plain_metric(key, value)
    try:
        size = len(json.dumps(out, ensure_ascii=False, default=repr).encode(errors="surrogatepass"))
    except ValueError:  # an int past JSON's digits: the state's encoder refuses it, naming its key
        size = 0
    if size > MAX_METRICS_BYTES:
        raise ValueError(
            f"metrics take {size:,} bytes as JSON; at most {MAX_METRICS_BYTES:,} are recorded per checkpoint (the state "
            "file lists every kept checkpoint's, and readers take at most 64 MiB of it). Keep metrics to numbers and "
            "short strings; save larger values in the checkpoint itself (ckpt.NAME = value)."
        )
    return out


# A save's metrics, as JSON: the state file lists every kept checkpoint's, and readers refuse one over
# ``spec.MAX_STATE_FILE_SIZE``; a hundred-metric dict takes a few KiB.
MAX_METRICS_BYTES = 64 * 2**10


def plain_metric(key: str, value: Any) -> Any:
    """One metric as a plain value: a 0-dim tensor or a NumPy scalar becomes a float."""
    if isinstance(value, torch.Tensor):
        if value.numel() != 1:
            raise ValueError(f"metrics[{key!r}] is a tensor of shape {list(value.shape)}; pass a number "
                             "(a 0-dim tensor is fine).")
        item = value.detach().cpu().item()
        return bool(item) if value.dtype == torch.bool else float(item)
    if value is None or isinstance(value, (bool, str)) or type(value) in (int, float):
        return value
    to_python = getattr(value, "item", None)
    if type(value).__module__ == "numpy" and callable(to_python):  # numpy.float32(0.5), numpy.int64(3)
        result = to_python()
        return float(result) if isinstance(result, (int, float)) and not isinstance(result, bool) else result
    if isinstance(value, (int, float)):  # int and float subclasses
        return float(value) if isinstance(value, float) else int(value)
    raise TypeError(f"metrics[{key!r}] is {a_or_an(type(value).__name__)}; metrics must be numbers, bools, strings "
                    "or None.")


def plain_number(value: Any) -> Any:
    """A NumPy scalar number (``numpy.int64(3)``, ``numpy.float32(0.5)``: from ``np.arange``, a
    config loaded with NumPy) as the Python number it holds, as TensorFlow's manager takes it;
    anything else as it is, for the checks to judge (a NumPy bool stays a bool: refused)."""
    if type(value).__module__ == "numpy" and getattr(value, "shape", None) == () and callable(getattr(value, "item", None)):
        item = value.item()
        return item if isinstance(item, (int, float)) else value
    return value


def comparable(value: Any, convert: Callable[[Any], Any] | None = None) -> Any:
    """An argument as JSON, to compare across ranks before it is checked (a bad one is refused
    inside the call, on every rank): ``convert(value)`` where given and it succeeds."""
    if convert is not None:
        try:
            value = convert(value)
        except Exception:  # noqa: BLE001 - refused inside the call
            return repr(value)[:200]
    if type(value) is float and value.is_integer():  # 5.0 where another rank passed 5: the same argument
        return int(value)
    return value if value is None or isinstance(value, (bool, int, float, str)) else repr(value)[:200]


def number_argument(value: Any) -> Any:
    """``checkpoint_number`` as JSON, to compare across ranks (a bad one is refused inside the call)."""
    return None if value is None else comparable(value, checkpoint_number)


def checkpoint_number(value: Any) -> int:
    """``checkpoint_number`` as an int: an int (a NumPy one too) or a 0-dim integer tensor, not negative."""
    value = plain_number(value)
    if isinstance(value, torch.Tensor):
        if value.dim() != 0 or value.dtype.is_floating_point or value.dtype.is_complex or value.dtype == torch.bool:
            raise ValueError(f"checkpoint_number must be an int or a 0-dim integer tensor, got {value!r}.")
        value = int(value.item())
    if isinstance(value, bool) or not isinstance(value, int):
        raise ValueError(f"checkpoint_number must be an int or a 0-dim integer tensor, got {value!r}.")
    if value < 0:
        raise ValueError(f"checkpoint_number must be non-negative, got {value}.")
    if value >= spec.MAX_CHECKPOINT_NUMBER:
        raise ValueError(f"checkpoint_number must be below 2**62 (the numbers after it must fit save_counter, an "
                         f"int64), got {value}.")
    return value


MAX_NAME_BYTES = 160  # a checkpoint's name, numbered, then a writer's temporary name for it, within 255 bytes


def _not_plain(name: Any) -> str:
    """Why ``name`` cannot name a manager's checkpoints (``{name}-{n}``, one directory each, named
    in the state file), or "" when it can."""
    if not isinstance(name, str) or not name:
        return "a non-empty str is needed"
    separator = next((c for c in name if c in (os.sep, "/", "\\")), None)
    if separator is not None:
        return f"it holds the path separator {separator!r} (pass the directory as the manager's directory)"
    unprintable = next((c for c in name if not spec.is_name_char(c)), None)
    if unprintable is not None:  # names a person reads in listings and messages: none that hides or reorders text
        return (f"it holds {unprintable!r} ({spec.char_description(unprintable)}), which names may not hold: a "
                "control, a line break, a private-use or unassigned code point, or a character that reorders or "
                "hides text")
    if name.startswith("."):
        return "a name that starts with '.' is hidden"
    if spec.is_temporary_name(f"{name}-1"):
        return "it ends in the mark of a writer's temporary names"
    if len(name.encode()) > MAX_NAME_BYTES:
        return f"it is {len(name.encode())} bytes long, past {MAX_NAME_BYTES}"
    return ""


def check_arguments(max_to_keep: Any, checkpoint_name: Any, step_counter: Any, checkpoint_interval: Any,
                    keep_best: Any, best_metric: Any, best_mode: Any, keep_checkpoint_every_n_hours: Any = None) -> None:
    """A manager's options checked before anything is touched (a bad one found at the first
    retention would fail every save after its commit)."""
    if max_to_keep is not None and (isinstance(max_to_keep, bool) or not isinstance(max_to_keep, int) or max_to_keep <= 0):
        raise ValueError(f"Expected a positive integer or `None` for `max_to_keep`, got {max_to_keep!r}.")
    if checkpoint_interval is not None and step_counter is None:
        raise ValueError("`step_counter` should be passed if `checkpoint_interval` is not None.")
    if checkpoint_interval is not None and not _is_number(checkpoint_interval, 0):
        raise ValueError(f"checkpoint_interval must be a number of steps, not negative, or None; got "
                         f"{checkpoint_interval!r}.")
    if keep_checkpoint_every_n_hours is not None and not _is_number(keep_checkpoint_every_n_hours, 0):
        raise ValueError(f"keep_checkpoint_every_n_hours must be a number of hours, not negative, or None; got "
                         f"{keep_checkpoint_every_n_hours!r}.")
    if keep_best is not None and (isinstance(keep_best, bool) or not isinstance(keep_best, int) or keep_best <= 0):
        raise ValueError(f"keep_best must be a positive integer or None, got {keep_best!r}.")
    if keep_best and best_metric is None:
        raise ValueError("keep_best needs best_metric: a key of the metrics passed to save(), or a callable.")
    if best_mode not in (None, "min", "max"):
        raise ValueError(f"best_mode must be 'min' or 'max', got {best_mode!r}.")
    why = _not_plain(checkpoint_name)
    if why:
        raise ValueError(f"checkpoint_name must be a plain name, got {checkpoint_name!r}: {why}.")


def _is_number(value: Any, minimum: float) -> bool:
    """Whether ``value`` is a real number (not a bool, not NaN) of at least ``minimum``."""
    return not isinstance(value, bool) and isinstance(value, (int, float)) and value >= minimum


def differing_metrics(by_rank: list[dict[str, Any] | None]) -> str | None:
    """Why the ``metrics`` the ranks passed to one ``save()`` (in rank order) are not all recorded
    (a warning's text): rank 0's are the checkpoint's; None where every rank that passed some passed
    rank 0's (passing them on rank 0 alone is fine)."""
    mine = json.dumps(by_rank[0], sort_keys=True, default=repr)
    others = [r for r, m in enumerate(by_rank) if m is not None and json.dumps(m, sort_keys=True, default=repr) != mine]
    if not others:
        return None
    shown = ", ".join(f"{short_repr(by_rank[r], 60)} on rank {r}" for r in [0, *others[:3]])
    return (f"The ranks passed different metrics to save() ({shown}{', ...' if len(others) > 3 else ''}): the "
            "checkpoint records rank 0's, and keep_best ranks by them. Reduce them over the ranks first "
            "(torch.distributed.all_reduce), or pass them on rank 0 alone.")


def unranked_metrics(best_metric: str | MetricFn | None, metrics: dict[str, Any]) -> str | None:
    """Why ``best_metric`` cannot rank the ``metrics`` a save was given (a warning's text), or None."""
    if callable(best_metric) and (failure := metric_failure(best_metric, metrics)):
        return (f"best_metric cannot rank the metrics passed to save() ({failure}); a checkpoint whose metrics it "
                "cannot rank never counts as best.")
    if isinstance(best_metric, str) and best_metric not in metrics:
        return (f"best_metric {best_metric!r} is not among the metrics passed to save() "
                f"({', '.join(sorted(metrics)) or 'none'}); checkpoints without it never count as best.")
    return None
