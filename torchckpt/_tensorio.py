"""Moving tensor bytes between memory and files without intermediate copies.

Writes hand views of the tensors' own memory to the file (``_storage.local_output``: many small tensors per
write), while a helper thread computes the checksums of the same batch (xxhash and the writes
both release the GIL, so hashing costs no save time); reads go straight from the file into the
destination tensor's memory (``preadv``), a large shard from several threads at once (one stream of
reads left the disk half idle). Only tensors that are not contiguous in host memory
(strided views, CUDA tensors) pass through a staging buffer, one bounded chunk at a time, so
extra memory never grows with the state.
"""

from __future__ import annotations

import array
import contextlib
import ctypes
import queue
import threading
from collections.abc import Callable, Iterator
from typing import TYPE_CHECKING, Any

import torch
import xxhash

from torchckpt import _threads
from torchckpt._format import blocks as format_blocks
from torchckpt._storage.base import IOV_MAX

if TYPE_CHECKING:
    from torchckpt._storage.base import Output, Source

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
    """A writable memoryview of a contiguous CPU tensor's bytes (the tensor must outlive it)."""
    n = t.numel() * t.element_size()
    if n == 0:
        return memoryview(b"")
    return memoryview((ctypes.c_ubyte * n).from_address(t.data_ptr())).cast("B")


def _is_host_contiguous(t: torch.Tensor) -> bool:
    return t.is_cpu and t.is_contiguous() and not t.is_conj() and not t.is_neg()  # is_cpu: 5x faster than .device


def host_chunks(t: torch.Tensor, limit: int = CHUNK_BYTES) -> Iterator[torch.Tensor]:
    """Contiguous CPU tensors that cover ``t``'s elements in row-major order.

    A contiguous CPU tensor is yielded as itself (no copy); anything else is copied in chunks
    of at most about ``limit`` bytes.
    """
    if _is_host_contiguous(t):
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
    if t.dim() == 0 or t.numel() * t.element_size() <= limit:
        yield t.contiguous().cpu()
        return
    row = t[0].numel() * t.element_size()
    if row > limit and t.dim() > 1:
        for r in range(t.shape[0]):
            yield from host_chunks(t[r], limit)
        return
    step = max(1, limit // max(1, row))
    for i in range(0, t.shape[0], step):
        yield t[i : i + step].contiguous().cpu()


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
        if _is_host_contiguous(t):
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


def read_into(source: Source, offset: int, dest: torch.Tensor, verify: bool) -> int | None:
    """Read ``dest``'s bytes from ``offset`` straight into its memory; return the digest if ``verify``.

    CUDA and non-contiguous destinations are filled through a bounded (pinned, for CUDA)
    staging buffer.
    """
    if _is_host_contiguous(dest):
        view = byte_view(dest)
        if verify:
            return _read_digesting(source, offset, [view])[0]
        source.readv([view], offset)
        return None
    hasher = xxhash.xxh3_64() if verify else None
    with torch.no_grad():
        if dest.is_contiguous():
            flat = dest.view(-1)
            per = max(1, CHUNK_BYTES // max(1, dest.element_size()))
            staging = torch.empty(min(per, max(1, flat.numel())), dtype=dest.dtype,
                                  pin_memory=dest.device.type == "cuda")
            for i in range(0, flat.numel(), per):
                part = staging[: min(per, flat.numel() - i)]
                view = byte_view(part)
                source.readv([view], offset)
                offset += len(view)
                if hasher:
                    hasher.update(view)
                flat[i : i + part.numel()].copy_(part)
            if dest.device.type == "cuda":
                torch.cuda.current_stream(dest.device).synchronize()
        else:
            for region, chunk in _strided_regions(dest):
                view = byte_view(chunk)
                source.readv([view], offset)
                offset += len(view)
                if hasher:
                    hasher.update(view)
                region.copy_(chunk)
    return hasher.intdigest() if hasher else None


def _strided_regions(dest: torch.Tensor, limit: int = CHUNK_BYTES) -> Iterator[tuple[torch.Tensor, torch.Tensor]]:
    """(region of ``dest``, empty contiguous CPU buffer of its shape) pairs in row-major order."""
    if dest.dim() == 0 or dest.numel() * dest.element_size() <= limit:
        yield dest, torch.empty(dest.shape, dtype=dest.dtype)
        return
    row = dest[0].numel() * dest.element_size()
    if row > limit and dest.dim() > 1:
        for r in range(dest.shape[0]):
            yield from _strided_regions(dest[r], limit)
        return
    step = max(1, limit // max(1, row))
    for i in range(0, dest.shape[0], step):
        region = dest[i : i + step]
        yield region, torch.empty(region.shape, dtype=dest.dtype)


def read_many(source: Source, reads: list[tuple[torch.Tensor, Any]], verify: bool,
              on_bytes: Callable[[int], None]) -> tuple[Any, int] | None:
    """Read each ``(destination, saved)`` pair (``saved`` has ``start``, ``end``, ``nbytes`` and an int
    ``checksum``).

    ``reads`` must be in file order. Runs of host-contiguous destinations whose bytes follow each
    other in the file are read with one scatter ``preadv`` (up to ``IOV_MAX`` buffers), so many
    small tensors cost few system calls. A repeat of the previous read (tied names: the same
    stored bytes into the same memory) is skipped. When destinations overlap in memory, a later
    buffer of a batch overwrites an earlier one before it is checked; so a batch that fails its
    checksums is read again one tensor at a time, which gives the same result as reading in order
    and tells real corruption from overlap.

    At least two full batches into host memory that does not overlap are read by several threads at
    once (``source.readers``, each a contiguous part of the file; see :func:`_read_parallel`): one
    stream of reads left this disk half idle. The outcome is the one reading in order gives. Less
    than that (20,000 tiny tensors: 100 MB) is read in order, a batch at a time: threads and the
    views of every tensor held at once made it slower there (0.24 s against 0.21 s).

    Returns:
        None, or the first ``(saved, digest read)`` whose checksum does not match.
    """
    readers = source.readers
    if readers < 2 or sum(saved.nbytes for _, saved in reads) < 2 * source.batch_bytes:
        return _read_in_order(source, reads, verify, on_bytes)
    plan = _plan_batches(source, reads)
    if plan is None:  # a strided or device destination: read one run at a time, in order
        return _read_in_order(source, reads, verify, on_bytes)
    batches, tied, spans = plan
    if tied:
        on_bytes(tied)
    if min(readers, len(batches)) > 1 and not _overlapping(spans):
        return _read_parallel(source, batches, verify, on_bytes, min(readers, len(batches)))
    for offset, batch in batches:
        bad = _read_batch(source, offset, batch, verify)
        if bad is not None:
            return bad
        on_bytes(sum(len(view) for view, _ in batch))
    return None


_Batch = tuple[int, list[tuple[memoryview, Any]]]  # a file offset, and the (view, saved) pairs read from it


def _plan_batches(source: Source, reads: list[tuple[torch.Tensor, Any]]) -> tuple[
        list[_Batch], int, list[tuple[int, int]]] | None:
    """The scatter reads of ``reads`` (batches of up to ``source.batch_bytes`` bytes and
    ``source.batch_views`` buffers), the bytes of the tied names skipped, and the (address, size)
    of every destination; None at the first destination that is not contiguous host memory."""
    batches: list[_Batch] = []
    spans: list[tuple[int, int]] = []
    tied = 0
    i, count = 0, len(reads)
    last_start, last_address = -1, -1
    while i < count:
        dest, saved = reads[i]
        if saved.start == last_start and dest.data_ptr() == last_address:
            tied += saved.nbytes  # a tied name: already read
            i += 1
            continue
        batch: list[tuple[memoryview, Any]] = []
        end, total, j = saved.start, 0, i
        while j < count and j - i < source.batch_views and (j == i or total < source.batch_bytes):
            nxt, nxt_saved = reads[j]
            if not _is_host_contiguous(nxt):
                return None
            if nxt_saved.start != end:
                break
            view = byte_view(nxt)
            batch.append((view, nxt_saved))
            if len(view):
                spans.append((nxt.data_ptr(), len(view)))
            end = nxt_saved.end
            total += nxt_saved.nbytes
            j += 1
        batches.append((saved.start, batch))
        last_start, last_address = batch[-1][1].start, reads[j - 1][0].data_ptr()
        i = j
    return batches, tied, spans


def _overlapping(spans: list[tuple[int, int]]) -> bool:
    """Whether any two (address, size) spans share a byte: then reads must land in file order."""
    spans.sort()
    end = 0
    for address, size in spans:
        if address < end:
            return True
        end = max(end, address + size)
    return False


def _read_batch(source: Source, offset: int, batch: list[tuple[memoryview, Any]],
                verify: bool) -> tuple[Any, int] | None:
    """Read one batch; with ``verify``, the first ``(saved, digest read)`` that does not match, or None."""
    if not verify:
        source.readv([view for view, _ in batch], offset)
        return None
    digests = _read_digesting(source, offset, [view for view, _ in batch])
    if any(digest != item.checksum for digest, (_, item) in zip(digests, batch)):
        intdigest = xxhash.xxh3_64_intdigest
        for view, item in batch:  # overlapping destinations, or corruption: one at a time
            source.readv([view], item.start)
            digest = intdigest(view)
            if digest != item.checksum:
                return item, digest
    return None


def _read_digesting(source: Source, offset: int, views: list[memoryview]) -> list[int]:
    """Fill ``views`` from ``offset`` on, back to back, and return the xxh3-64 of each.

    The bytes are hashed as they land, ``source.checked_bytes`` at a time, while they are still in
    the CPU's cache: reading a whole 64 MiB batch first and hashing it after read it all from
    memory again. From the page cache, 1 GiB in 5 MiB tensors took 0.078 s this way on two
    threads, against 0.090 s batch by batch (the copy alone: 0.064 s); a cold read took as long.
    """
    piece = source.checked_bytes
    intdigest = xxhash.xxh3_64_intdigest
    digests: list[int] = []
    waiting: list[memoryview] = []  # small views read together, in one call
    waiting_bytes = 0
    for view in views:
        size = len(view)
        if waiting and waiting_bytes + size > piece:
            source.readv(waiting, offset)
            offset += waiting_bytes
            digests.extend(map(intdigest, waiting))
            waiting, waiting_bytes = [], 0
        if size <= piece:
            waiting.append(view)
            waiting_bytes += size
            continue
        hasher = xxhash.xxh3_64()
        for start in range(0, size, piece):
            part = view[start : start + piece]
            source.readv([part], offset)
            offset += len(part)
            hasher.update(part)
        digests.append(hasher.intdigest())
    if waiting:
        source.readv(waiting, offset)
        digests.extend(map(intdigest, waiting))
    return digests


def _read_parallel(source: Source, batches: list[_Batch], verify: bool, on_bytes: Callable[[int], None],
                   readers: int) -> tuple[Any, int] | None:
    """Read ``batches`` as ``readers`` contiguous groups at once (the caller reads the first, a
    thread each the others), every batch checked as it lands.

    A group stops at its first failure (a mismatch, or an error such as ``EOFError``), and so does
    every group after it, while the groups before it finish: the outcome is the first failure in
    file order, what reading in order returns or raises. Every thread has ended by the time this
    returns or raises; only the caller reports progress.
    """
    groups = _split(batches, readers)
    outcomes: list[Any] = [None] * len(groups)  # per group: None, a mismatch, or what it raised
    first_failed = [len(groups)]
    lock = threading.Lock()
    finished: queue.SimpleQueue[int | None] = queue.SimpleQueue()  # bytes read, None when a helper ends

    def run(g: int, report: Callable[[int], None], helper: bool = False) -> None:
        try:
            with source.stream() if helper else contextlib.nullcontext():  # a descriptor (readahead) per thread
                for offset, batch in groups[g]:
                    if first_failed[0] < g:  # an earlier group failed: its failure is the outcome
                        break
                    outcomes[g] = _read_batch(source, offset, batch, verify)
                    if outcomes[g] is not None:
                        break
                    report(sum(len(view) for view, _ in batch))
        except BaseException as e:  # noqa: BLE001 - raised again below, on the caller's thread
            outcomes[g] = e
        finally:
            if helper:
                finished.put(None)
        if outcomes[g] is not None:
            with lock:
                first_failed[0] = min(first_failed[0], g)

    threads = [threading.Thread(target=run, args=(g, finished.put, True), name=f"torchckpt-read-{g}", daemon=True)
               for g in range(1, len(groups))]
    started = running = 0
    try:
        with contextlib.suppress(RuntimeError):  # no new threads at interpreter exit: the caller reads their part
            for thread in threads:
                thread.start()
                started += 1
                running += 1
        for g in [0, *range(started + 1, len(groups))]:
            run(g, on_bytes)
        while running:
            if (n := finished.get()) is None:
                running -= 1
            else:
                on_bytes(n)
    finally:
        if running:  # interrupted: whatever still reads stops after its batch
            first_failed[0] = -1
        for thread in threads[:started]:
            thread.join()
    for outcome in outcomes:
        if isinstance(outcome, BaseException):
            raise outcome
        if outcome is not None:
            return outcome  # type: ignore[no-any-return]
    return None


def _split(batches: list[_Batch], parts: int) -> list[list[_Batch]]:
    """``batches`` in ``parts`` runs of consecutive batches with about the same bytes each."""
    sizes = [sum(len(view) for view, _ in batch) for _, batch in batches]
    total = sum(sizes)
    groups: list[list[_Batch]] = [[]]
    done = 0
    for batch, size in zip(batches, sizes):
        if groups[-1] and done >= total * len(groups) / parts and len(groups) < parts:
            groups.append([])
        groups[-1].append(batch)
        done += size
    return groups


def _read_in_order(source: Source, reads: list[tuple[torch.Tensor, Any]], verify: bool,
                   on_bytes: Callable[[int], None]) -> tuple[Any, int] | None:
    """``read_many`` one run at a time, for reads with a strided or device destination among them."""
    i, count = 0, len(reads)
    last_start, last_address = -1, -1
    while i < count:
        dest, saved = reads[i]
        if saved.start == last_start and dest.data_ptr() == last_address:
            on_bytes(saved.nbytes)  # a tied name: already read
            i += 1
            continue
        last_start, last_address = saved.start, dest.data_ptr()
        if not _is_host_contiguous(dest):
            digest = read_into(source, saved.start, dest, verify)
            if verify and digest != saved.checksum:
                return saved, digest  # type: ignore[return-value]
            on_bytes(saved.nbytes)
            i += 1
            continue
        batch = [(byte_view(dest), saved)]
        end = saved.end
        total = saved.nbytes
        j = i + 1
        while j < count and j - i < source.batch_views and total < source.batch_bytes:
            nxt, nxt_saved = reads[j]
            if nxt_saved.start != end or not _is_host_contiguous(nxt):
                break
            batch.append((byte_view(nxt), nxt_saved))
            end = nxt_saved.end
            total += nxt_saved.nbytes
            j += 1
        bad = _read_batch(source, saved.start, batch, verify)
        if bad is not None:
            return bad
        last_start, last_address = batch[-1][1].start, reads[j - 1][0].data_ptr()
        on_bytes(total)
        i = j
    return None


def digest_tensor(t: torch.Tensor) -> int:
    """xxh3-64 of a tensor's bytes in row-major order, wherever it lives."""
    hasher = xxhash.xxh3_64()
    for chunk in host_chunks(t):
        hasher.update(byte_view(chunk))
    return hasher.intdigest()
