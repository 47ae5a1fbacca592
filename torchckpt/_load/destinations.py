"""What a restore may read into: a destination is checked before anything changes.

A restore writes saved bytes into existing tensors (parameters, buffers, optimizer state) as plain
memory. Tensors that cannot be written that way (an expanded view whose elements share memory, a
non-contiguous inference tensor, a tensor subclass other than DTensor, FSDP1's flat parameters)
are refused here, by key, with how to restore them instead.
"""

from __future__ import annotations

import torch

from torchckpt import _tensorio
from torchckpt._dist import dtensor as dist_dtensor
from torchckpt.errors import UnsupportedStateError


def _overlaps(shape: tuple[int, ...], strides: tuple[int, ...]) -> bool:
    """Whether two elements of a view of ``shape`` and ``strides`` may share memory: taken by
    stride, each dimension of size over 1 must step past everything the smaller ones reach. (A
    layout whose strides interleave without sharing, rare as it is, is refused with them.)"""
    reach = 0
    for stride, size in sorted((st, n) for n, st in zip(shape, strides) if n > 1):
        if stride <= reach:
            return True
        reach += stride * (size - 1)
    return False


def check_destination(key: str, dest: torch.Tensor) -> None:
    """Refuse, before anything changes, a destination the library cannot write as plain memory. A
    lazy module's uninitialized parameter is no destination: its load hook makes one of the saved
    tensor (the module is restored as ``load_state_dict`` does, ``_load.hooked``)."""
    if torch.nn.parameter.is_lazy(dest):
        return
    if dist_dtensor.is_dtensor(dest):
        dist_dtensor.dtensor_box(dest, key)  # refuses a Partial placement
        _tensorio_check(key, dist_dtensor.local_of(dest))
        return
    _tensorio_check(key, dest)


def _tensorio_check(key: str, dest: torch.Tensor) -> None:
    reason = _tensorio.unsupported_reason(dest, allow_meta=True)
    if reason is None and not dest.is_contiguous() and _overlaps(dest.shape, dest.stride()):
        expanded = any(stride == 0 and size > 1 for size, stride in zip(dest.shape, dest.stride()))
        raise UnsupportedStateError(
            f"Cannot restore into {key!r}: it is "
            + ("an expanded view (stride 0 along a dimension of size over 1)" if expanded else
               f"a view whose strides {list(dest.stride())} make elements of shape {list(dest.shape)} overlap")
            + ", whose elements share memory, so no value can be written into it element by element. Restore into "
            "a tensor of its own (clone() it), and make the view of that.",
            key=key,
            value_type=type(dest),
        )
    if reason is None and dest.is_inference() and not dest.is_contiguous():
        raise UnsupportedStateError(  # filled through torch copies, perhaps in a reading thread, where torch refuses
            f"Cannot restore into {key!r}: it is an inference tensor (made under torch.inference_mode()) that is not "
            "contiguous, which torch lets no one write in place outside that mode. Build the model outside "
            "torch.inference_mode() (under torch.no_grad() if you like), restore, then run it in inference mode.",
            key=key,
            value_type=type(dest),
        )
    if reason is not None:
        raise UnsupportedStateError(
            f"Cannot restore into {key!r}: it is {reason}. DTensors (FSDP2, tensor parallel) are restored in "
            "place; other tensor subclasses and FSDP1 flat parameters are not supported: restore into a plain "
            "model, then wrap it.",
            key=key,
            value_type=type(dest),
        )
