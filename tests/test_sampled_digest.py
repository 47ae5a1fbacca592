"""What ranks compare of a large plain tensor: a digest of runs spread over its bytes."""

from __future__ import annotations

import pytest
import torch

from torchckpt._format.dtypes import DTYPE_NAMES
from torchckpt._tensorio import digest_tensor, sampled_digest

LARGE = 300_000  # elements: more than 16 runs of 4 KiB in every dtype


@pytest.mark.parametrize("dtype", list(DTYPE_NAMES), ids=[str(d).removeprefix("torch.") for d in DTYPE_NAMES])
def test_every_stored_dtype_is_sampled_and_a_change_in_a_run_shows(dtype):
    base = torch.arange(LARGE, dtype=torch.float64) % 7
    t = base.to(dtype) if dtype.is_floating_point or dtype.is_complex else base.to(torch.int64).to(dtype)
    same = t.clone()
    assert sampled_digest(t) == sampled_digest(same)
    last = t.clone()
    last[-1] = 1 if dtype != torch.bool else not bool(last[-1])  # the last byte is in the last run
    assert sampled_digest(last) != sampled_digest(t)


def test_views_are_sampled_in_row_major_order_without_copying_them_whole():
    t = torch.arange(2 * LARGE, dtype=torch.float32).reshape(1000, -1)
    view = t.t()  # not contiguous: sampled in its own row-major order, as a contiguous copy would be
    assert sampled_digest(view) == sampled_digest(view.contiguous())
    assert sampled_digest(view) != sampled_digest(t)


def test_a_small_tensor_is_digested_whole():
    t = torch.arange(1000, dtype=torch.float32)
    assert sampled_digest(t) == digest_tensor(t)
