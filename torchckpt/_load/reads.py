"""Reading stored tensors straight into their destinations: one tensor, or a shard's many at once.

Reads go from the file into the destination tensor's memory (``preadv``), a run of many small
tensors in one scatter read, a large shard from several threads at once (one stream of reads left
the disk half idle), each tensor's checksum computed as its bytes land. Only destinations that are
not contiguous in host memory (strided views, CUDA tensors) pass through a staging buffer, one
bounded chunk at a time, so extra memory never grows with the state.
"""

from __future__ import annotations

import contextlib
import queue
import threading
from collections.abc import Callable, Iterator
from typing import TYPE_CHECKING, Any

import torch
import xxhash

from torchckpt._tensorio import CHUNK_BYTES, byte_view, is_host_contiguous, row_regions

if TYPE_CHECKING:
    from torchckpt._storage.base import Source


def read_into(source: Source, offset: int, dest: torch.Tensor, verify: bool) -> int | None:
    """Read ``dest``'s bytes from ``offset`` straight into its memory; return the digest if ``verify``.

    CUDA and non-contiguous destinations are filled through a bounded (pinned, for CUDA)
    staging buffer.
    """
    if is_host_contiguous(dest):
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
    for region in row_regions(dest, limit):
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
            if not is_host_contiguous(nxt):
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

    The bytes are hashed as they land, ``source.checked_bytes`` at a time (what the page cache
    already holds, ``source.cached_bytes`` at a time: :func:`_read_cached`), while they are still in
    the CPU's cache: reading a whole 64 MiB batch first and hashing it after read it all from
    memory again. From the page cache, 1 GiB in 5 MiB tensors took 0.078 s this way on two
    threads, against 0.090 s batch by batch (the copy alone: 0.064 s); a cold read took as long.
    """
    piece = source.checked_bytes
    intdigest = xxhash.xxh3_64_intdigest
    digests: list[int] = []
    waiting: list[memoryview] = []  # small views read together, in one call
    waiting_bytes = 0
    cached = source.cached_bytes > 0  # until the first byte that is not in memory
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
            landed = _read_cached(source, part, offset, hasher) if cached else 0
            if landed < len(part):
                cached = False  # on the disk: the rest of the batch is read in large requests
                source.readv([part[landed:]], offset + landed)
                hasher.update(part[landed:])
            offset += len(part)
        digests.append(hasher.intdigest())
    if waiting:
        source.readv(waiting, offset)
        digests.extend(map(intdigest, waiting))
    return digests


def _read_cached(source: Source, part: memoryview, offset: int, hasher: Any) -> int:
    """Fill ``part`` from what ``source`` already holds in memory, ``source.cached_bytes`` at a
    time, each piece hashed into ``hasher`` at once; the bytes filled, up to the first that are not
    there. From the page cache, 1 MiB pieces stay in a core's L2 between the copy and the hash: a
    warm 1 GiB restore took 0.135 s against 0.145 s with 4 MiB pieces here, run after run in one
    process, and 0.153 s against 0.158 s in fresh processes (medians of 12). Bytes still on the disk
    are read by the caller, ``checked_bytes`` at a time, and the caller asks the cache no more in
    that batch: trying it again after every miss, in a cold file where readahead had brought some
    pages in, made cold restores slower in a first measurement; with this rule a cold 1 GiB restore
    took 0.617 s against 0.620 s without any cache reads (medians of 10)."""
    small, landed = source.cached_bytes, 0
    while small and landed < len(part):
        n = source.read_cached(part[landed : landed + small], offset + landed)
        if n <= 0:
            break
        hasher.update(part[landed : landed + n])
        landed += n
    return landed


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
        if not is_host_contiguous(dest):
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
            if nxt_saved.start != end or not is_host_contiguous(nxt):
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
