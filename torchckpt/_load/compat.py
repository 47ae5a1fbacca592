"""Whether a saved tensor can go into a destination: the same shape, and the same dtype or, with
``restore(..., cast=True)``, one torch copies into (as ``load_state_dict`` casts)."""

from __future__ import annotations

import functools
import warnings
from typing import Any

import torch

from torchckpt._format.chunks import ChunkedInfo
from torchckpt._format.dtypes import TensorInfo as SavedTensor
from torchckpt._load.report import MismatchReport


def compatible(key: str, saved: SavedTensor, dest: torch.Tensor, report: MismatchReport, cast: bool = False) -> bool:
    """Whether ``saved`` can go into ``dest``; records the mismatch (or, with ``cast``, the cast)."""
    if saved.shape != dest.shape:
        report.shape_mismatches[key] = (saved.shape, dest.shape)
        return False
    if saved.dtype != dest.dtype:
        if cast and can_cast(saved.dtype, dest.dtype):
            report.cast_keys[key] = (saved.dtype, dest.dtype)
            return True
        report.dtype_mismatches[key] = (saved.dtype, dest.dtype)
        return False
    return True


def casts_to(dest: Any, saved: SavedTensor | ChunkedInfo) -> bool:
    """Whether ``restore(cast=True)`` casts ``saved`` to ``dest``'s dtype."""
    return isinstance(dest, torch.Tensor) and dest.dtype != saved.dtype and can_cast(saved.dtype, dest.dtype)


@functools.cache
def can_cast(saved: torch.dtype, dest: torch.dtype) -> bool:
    """Whether torch copies ``saved``'s dtype into ``dest``'s, as ``load_state_dict`` does, tried once per pair.
    ``dest`` need not be a dtype a checkpoint holds (``complex128``); a quantized one is never filled by a copy."""
    try:
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")  # complex into real, the experimental complex32: copied all the same
            torch.empty(1, dtype=dest).copy_(torch.zeros(1, dtype=saved))
    except (RuntimeError, TypeError, NotImplementedError):
        return False
    return True
