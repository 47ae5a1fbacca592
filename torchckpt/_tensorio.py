"""Moving tensor bytes between memory and files without intermediate copies.

Writes hand views of the tensors' own memory to the file (``_storage.local_output``: many small tensors per
write), while a helper thread computes the checksums of the same batch (xxhash and the writes
both release the GIL, so hashing costs no save time). Only tensors that are not contiguous in
host memory (strided views, CUDA tensors) pass through a staging buffer, one bounded chunk at a
time, so extra memory never grows with the state. The views and chunks here serve the reads too
(``_load.reads``).
"""

from __future__ import annotations

import array
import ctypes
from collections.abc import Callable, Iterator
from typing import TYPE_CHECKING, Any

import torch
import xxhash

from torchckpt import _threads
from torchckpt._format import blocks as format_blocks
from torchckpt._storage.base import IOV_MAX

if TYPE_CHECKING:
    from torchckpt._storage.base import Output

CHUNK_BYTES = 64 * 2**20
_WRITEV_BYTES = 16 * 2**20


_PLAIN_TYPES = (torch.Tensor, torch.nn.Parameter)
_STRIDED = torch.strided


def unsupported_reason(t: torch.Tensor, allow_meta: bool = False) -> str | None:
    """Why the bytes of ``t`` cannot be read or written as plain host or CUDA memory, or None.

    A tensor subclass that wraps other tensors (DTensor, FSDP2's sharded parameters, functional or
    fake tensors), an FSDP1 flat parameter, a tensor without storage: reading ``data_ptr()`` of
    one gives an address that holds nothing (DTensor's is 0) or raises.
    """
    plain = type(t) is torch.Tensor or type(t) is torch.nn.Parameter and not getattr(t, "_is_flat_param", False)
    if not plain and torch.nn.parameter.is_lazy(t):  # most methods raise on one
        return ("an uninitialized parameter of a lazy module (nn.LazyLinear and the like), with no shape or data "
                "yet: run one forward pass first")
    if plain and t.layout is _STRIDED and not t.is_meta:  # the common case, in a few calls
        try:
            if t.data_ptr() or not t.numel():
                return None
        except RuntimeError as e:  # "Cannot access data pointer of Tensor that doesn't have storage"
            return f"a tensor whose memory cannot be reached ({e})"
        return "a tensor without memory"
    if getattr(t, "_is_flat_param", False):  # FSDP1's FlatParameter is a Parameter with this flag
        return "an FSDP flat parameter (FSDP1's sharded storage)"
    if type(t) not in _PLAIN_TYPES:
        from torch.utils._python_dispatch import is_traceable_wrapper_subclass

        if is_traceable_wrapper_subclass(t):
            return f"a {type(t).__name__}, a tensor subclass that wraps other tensors (such as DTensor from FSDP2)"
        if type(t).__name__ == "FakeTensor" or getattr(t, "fake_mode", None) is not None:
            return "a fake tensor (it has no data)"
        dispatch = getattr(type(t), "__torch_dispatch__", None)
        if dispatch is not None and getattr(dispatch, "__func__", dispatch) is not getattr(
                torch.Tensor.__torch_dispatch__, "__func__", torch.Tensor.__torch_dispatch__):
            return f"a {type(t).__name__}, a tensor subclass with its own dispatch"
    if t.is_meta:
        return None if allow_meta else "on the meta device (it has no data)"
    try:
        if t.layout == torch.strided and t.numel() and not t.is_nested and t.data_ptr() == 0:
            return "a tensor without memory"
    except RuntimeError as e:  # "Cannot access data pointer of Tensor that doesn't have storage"
        return f"a tensor whose memory cannot be reached ({e})"
    return None


def byte_view(t: torch.Tensor) -> memoryview:
    """A writable memoryview of a contiguous CPU tensor's bytes.

    The view holds a reference to ``t``, so its memory cannot be freed (and reused) while the view
    or a slice of it is still read or written, say by a thread that hashes or writes it: a view of
    a raw address alone would read or write whatever the allocator put there next. This costs
    about 0.1 us a view.
    """
    n = t.numel() * t.element_size()
    if n == 0:
        return memoryview(b"")
    block = (ctypes.c_ubyte * n).from_address(t.data_ptr())
    block.tensor = t  # type: ignore[attr-defined]  # kept alive by every view of ``block``
    return memoryview(block).cast("B")


def is_host_contiguous(t: torch.Tensor) -> bool:
    """Whether ``t``'s bytes are one run of host memory, in row-major order, as they are stored."""
    return t.is_cpu and t.is_contiguous() and not t.is_conj() and not t.is_neg()  # is_cpu: 5x faster than .device


def host_chunks(t: torch.Tensor, limit: int = CHUNK_BYTES) -> Iterator[torch.Tensor]:
    """Contiguous CPU tensors that cover ``t``'s elements in row-major order.

    A contiguous CPU tensor is yielded as itself (no copy); anything else is copied in chunks
    of at most about ``limit`` bytes.
    """
    if is_host_contiguous(t):
        yield t
        return
    t = t.resolve_conj().resolve_neg()
    if t.device.type != "cpu" and t.is_contiguous():
        flat = t.reshape(-1)
        per = max(1, limit // max(1, t.element_size()))
        staging = torch.empty(min(per, flat.numel()), dtype=t.dtype, pin_memory=torch.cuda.is_available())
        for i in range(0, flat.numel(), per):
            part = flat[i : i + per]
            out = staging[: part.numel()]
            out.copy_(part)
            yield out
        return
    for region in row_regions(t, limit):
        yield region.contiguous().cpu()


def row_regions(t: torch.Tensor, limit: int = CHUNK_BYTES) -> Iterator[torch.Tensor]:
    """Views of ``t`` that cover its elements in row-major order, each of at most about ``limit``
    bytes (a row larger than that is split along its own rows)."""
    if t.dim() == 0 or t.numel() * t.element_size() <= limit:
        yield t
        return
    row = t[0].numel() * t.element_size()
    if row > limit and t.dim() > 1:
        for r in range(t.shape[0]):
            yield from row_regions(t[r], limit)
        return
    step = max(1, limit // max(1, row))
    for i in range(0, t.shape[0], step):
        yield t[i : i + step]


def write_tensors(out: Output, tensors: list[torch.Tensor], on_bytes: Callable[[int], None] | None = None,
                  blocks: array.array[int] | None = None) -> array.array[int]:
    """Write each tensor's bytes back to back at the file's position; return their xxh3-64 digests
    (an ``array`` of unsigned 64-bit ints: 8 bytes a tensor, not a Python int each).

    Host-contiguous tensors are handed to ``out`` as views of their memory, many at a time;
    others (strided views, CUDA tensors) go through bounded staged chunks, each written at once.

    Args:
        out: the file, written up to where the first tensor goes.
        tensors: what to write, in order.
        on_bytes: optional callable taking a byte count, for progress.
        blocks: when given, each tensor's block checksums (``_format.blocks``: blocks of
            ``_format.blocks.BLOCK_BYTES``, none for a tensor of one block) are appended to it, in order.
    """
    block_bytes = format_blocks.BLOCK_BYTES if blocks is not None else 0
    digests = array.array("Q")
    pending: list[memoryview] = []  # views of tensors in ``tensors``, which keeps them alive
    pending_bytes = 0
    hashing: _threads.Pending[tuple[list[int], list[int]]] | None = None  # the digests of the batch being written

    def collect() -> None:
        nonlocal hashing
        if hashing is not None:
            found, found_blocks = hashing.result()
            digests.extend(found)
            if blocks is not None:
                blocks.extend(found_blocks)
            hashing = None

    def write_batch() -> None:
        """Write the pending views while the hash thread digests them (xxhash and the writes both
        release the GIL, so the two overlap)."""
        nonlocal pending, pending_bytes, hashing
        collect()
        if pending:
            hashing = _hasher.call(_digest_all, pending, block_bytes)
            out.write(pending)
        pending, pending_bytes = [], 0

    for t in tensors:
        if is_host_contiguous(t):
            view = byte_view(t)
            pending.append(view)
            pending_bytes += len(view)
            if pending_bytes >= _WRITEV_BYTES or len(pending) >= IOV_MAX:
                write_batch()
            if on_bytes is not None:
                on_bytes(len(view))
            continue
        write_batch()
        collect()
        digests.append(_write_staged(out, t, on_bytes, blocks))
    write_batch()
    collect()
    return digests


def _write_staged(out: Output, t: torch.Tensor, on_bytes: Callable[[int], None] | None,
                  blocks: array.array[int] | None) -> int:
    """Write a tensor that is not contiguous in host memory (a strided view, a CUDA tensor) through
    bounded staged chunks, each written before its buffer is reused; return its digest (and append
    its block checksums to ``blocks``)."""
    hasher: Any = format_blocks.Hasher(format_blocks.BLOCK_BYTES) if blocks is not None else xxhash.xxh3_64()
    for chunk in host_chunks(t):
        view = byte_view(chunk)
        hasher.update(view)
        out.write([view])
        if on_bytes is not None:
            on_bytes(len(view))
    if blocks is None:
        return int(hasher.intdigest())
    digest, found_blocks = hasher.result()
    blocks.extend(found_blocks)
    return int(digest)


def _digest_all(views: list[memoryview], block_bytes: int) -> tuple[list[int], list[int]]:
    """Each view's digest, and (with ``block_bytes``) the block checksums of those over one block."""
    intdigest = xxhash.xxh3_64_intdigest
    blocks: list[int] = []
    if block_bytes:
        for v in views:
            if len(v) > block_bytes:
                blocks += format_blocks.digests(v, block_bytes)
    return [intdigest(v) for v in views], blocks


_hasher = _threads.Worker("torchckpt-hash")


def digest_tensor(t: torch.Tensor) -> int:
    """xxh3-64 of a tensor's bytes in row-major order, wherever it lives."""
    hasher = xxhash.xxh3_64()
    for chunk in host_chunks(t):
        hasher.update(byte_view(chunk))
    return hasher.intdigest()


_SAME_SIZE_INTS = {1: torch.uint8, 2: torch.int16, 4: torch.int32, 8: torch.int64}


def sampled_digest(t: torch.Tensor, pieces: int = 16, piece_bytes: int = 4096) -> int:
    """xxh3-64 of ``pieces`` runs of about ``piece_bytes`` spread evenly over a tensor's elements in
    row-major order (its first and last bytes among them); :func:`digest_tensor` of a smaller one.

    What ranks compare of a large tensor they should all hold alike: a few small reads wherever
    it lives (gathered on its device, then one copy), not a pass over all of it. A difference
    outside the runs goes unseen; a tensor that differs by rank throughout (a rank's own buffer,
    its own random draws) does not.
    """
    per = max(1, piece_bytes // max(1, t.element_size()))
    n = t.numel()
    if n <= pieces * per:
        return digest_tensor(t)
    starts = torch.linspace(0, n - per, pieces, dtype=torch.float64).round().long()
    index = (starts[:, None] + torch.arange(per)).reshape(-1).to(t.device)
    kind = _SAME_SIZE_INTS.get(t.element_size())  # take() has no kernel for some dtypes (float8, uint16)
    flat = t.detach().resolve_conj().resolve_neg() if t.is_conj() or t.is_neg() else t.detach()
    return digest_tensor(torch.take(flat.view(kind) if kind is not None else flat, index))
