"""Helpers shared by the benchmark scripts: fresh processes, RSS, cold page cache, medians."""

from __future__ import annotations

import json
import os
import platform
import resource
import socket
import statistics
import subprocess
import sys
from typing import Any


def import_torchckpt() -> Any:
    """``torchckpt`` with every public name loaded: they load on first use (PEP 562), and a
    benchmark times checkpoint work, not imports (torch's, or the package's)."""
    import torchckpt

    for name in torchckpt.__all__:
        getattr(torchckpt, name)
    return torchckpt


def round_order(methods: list[str], r: int) -> list[str]:
    """The order in which round ``r`` runs ``methods``: row ``r`` of a balanced Latin square
    (Williams' design). Each round starts with another method, each method takes each position
    once in ``len(methods)`` rounds, and over those rounds (twice as many for an odd count) each
    method runs right after each other one equally often. A plain rotation keeps every method
    right behind the same other one in every round, and on this VM a process that just freed
    gigabytes (an async save's host buffers) slows the next process's page-cache writes by 2-4x:
    the method behind it paid for it every time.
    """
    n = len(methods)
    if n == 0:
        return []
    base, low, high = [0], 1, n - 1  # 0, 1, n-1, 2, n-2, ...: every difference between neighbours once
    while len(base) < n:
        base.append(low if len(base) % 2 else high)
        if len(base) % 2 == 0:
            low += 1
        else:
            high -= 1
    row = [methods[(i + r) % n] for i in base]
    return row[::-1] if n % 2 and (r // n) % 2 else row  # an odd count: the mirrored rows complete the balance


def rss_bytes() -> int:
    """Current resident set size."""
    with open("/proc/self/statm") as f:
        return int(f.read().split()[1]) * os.sysconf("SC_PAGE_SIZE")


def peak_rss_bytes() -> int:
    """Peak resident set size of this process so far (Linux reports KiB)."""
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024


def drop_page_cache(paths: list[str]) -> None:
    """Evict files from the page cache (fadvise DONTNEED after fsync), for cold-cache reads."""
    for root in paths:
        files = [root] if os.path.isfile(root) else [os.path.join(d, f) for d, _, fs in os.walk(root) for f in fs]
        for path in files:
            fd = os.open(path, os.O_RDONLY)
            try:
                os.fsync(fd)
                os.posix_fadvise(fd, 0, 0, os.POSIX_FADV_DONTNEED)
            finally:
                os.close(fd)


def cached_share(root: str) -> float | None:
    """The share of the bytes of ``root`` (a file, or every file under a directory) that the page
    cache holds now (``mincore`` of a read-only map); None where that cannot be asked."""
    import ctypes
    import mmap

    try:
        libc = ctypes.CDLL(None, use_errno=True)
        libc.mmap.restype = ctypes.c_void_p
        libc.mmap.argtypes = [ctypes.c_void_p, ctypes.c_size_t, ctypes.c_int, ctypes.c_int, ctypes.c_int, ctypes.c_long]
        libc.munmap.argtypes = [ctypes.c_void_p, ctypes.c_size_t]
        libc.mincore.argtypes = [ctypes.c_void_p, ctypes.c_size_t, ctypes.c_char_p]
    except (OSError, AttributeError):
        return None
    files = [root] if os.path.isfile(root) else [os.path.join(d, f) for d, _, fs in os.walk(root) for f in fs]
    page, held, total = mmap.PAGESIZE, 0, 0
    for path in files:
        size = os.path.getsize(path)
        if not size:
            continue
        pages = (size + page - 1) // page
        vector = ctypes.create_string_buffer(pages)
        try:
            fd = os.open(path, os.O_RDONLY)
        except OSError:
            return None
        try:
            address = libc.mmap(None, size, mmap.PROT_READ, mmap.MAP_SHARED, fd, 0)
            if address in (None, ctypes.c_void_p(-1).value):
                return None
            try:
                if libc.mincore(address, size, vector) != 0:
                    return None
            finally:
                libc.munmap(address, size)
        finally:
            os.close(fd)
        held += sum(b & 1 for b in vector.raw) * page
        total += pages * page
    return held / total if total else None


def run_fresh(script: str, args: list[str], python: str | None = None) -> dict[str, Any]:
    """Run ``script`` in a fresh interpreter (this one, or ``python``); it prints one JSON object as its last line."""
    out = subprocess.run([python or sys.executable, script, *args], capture_output=True, text=True)
    if out.returncode:
        raise RuntimeError(f"{script} {' '.join(args)} failed:\n{out.stderr[-3000:]}")
    return json.loads(out.stdout.strip().splitlines()[-1])  # type: ignore[no-any-return]


def free_port() -> int:
    """A TCP port free on 127.0.0.1 now (for a gloo job's store, or a local server)."""
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return int(sock.getsockname()[1])


def leave() -> None:
    """End a rank's process once its results are printed, without the interpreter's teardown:
    after an FSDP2 job, torch's teardown at exit sometimes aborts the process ("terminate called
    without an active exception"; 1 job in 15 here, without torchckpt doing anything in it), and a
    measured job would then count as failed."""
    sys.stdout.flush()
    sys.stderr.flush()
    os._exit(0)


def run_ranks(world: int, command: list[str], what: str, timeout: float = 1200,
              env: dict[str, str] | None = None, cwd: str | None = None) -> Any:
    """Run ``command`` as ``world`` gloo ranks on 127.0.0.1 (``RANK``, ``WORLD_SIZE``, a free
    ``MASTER_PORT``); returns the JSON object rank 0 prints as its last line."""
    port = free_port()
    procs = []
    for rank in range(world):
        rank_env = {**os.environ, **(env or {}), "RANK": str(rank), "WORLD_SIZE": str(world),
                    "LOCAL_RANK": str(rank), "MASTER_ADDR": "127.0.0.1", "MASTER_PORT": str(port),
                    "OMP_NUM_THREADS": "1"}
        procs.append(subprocess.Popen(command, env=rank_env, cwd=cwd, stdout=subprocess.PIPE,
                                      stderr=subprocess.PIPE, text=True))
    outs = [p.communicate(timeout=timeout) for p in procs]
    if any(p.returncode for p in procs):
        raise RuntimeError(f"{what} failed:\n" + "\n".join(err[-2000:] for _, err in outs))
    return json.loads(outs[0][0].strip().splitlines()[-1])


def median(values: list[float]) -> float:
    return statistics.median(values)


def machine() -> str:
    cpu = "unknown CPU"
    try:
        with open("/proc/cpuinfo") as f:
            for line in f:
                if line.startswith("model name"):
                    cpu = line.split(":", 1)[1].strip()
                    break
    except OSError:
        pass
    mem = os.sysconf("SC_PAGE_SIZE") * os.sysconf("SC_PHYS_PAGES") / 2**30
    return f"{platform.system()} {platform.machine()}, {os.cpu_count()} cores ({cpu}), {mem:.0f} GiB RAM, Python {platform.python_version()}"
