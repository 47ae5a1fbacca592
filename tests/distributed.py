"""Launching a gloo job of several processes on 127.0.0.1 for a test, and never leaving one behind."""

from __future__ import annotations

import json
import os
import signal
import socket
import subprocess
import sys
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


def run_ranks(world: int, directory: Path, scenarios: list[str], timeout: float = 180,
              env: dict[str, str] | None = None) -> list[int]:
    """Run ``tests.jobs.dist_job`` on ``world`` ranks; returns their exit codes (killed at ``timeout``)."""
    port = free_port()
    procs = []
    for rank in range(world):
        rank_env = {**os.environ, **(env or {}), "RANK": str(rank), "WORLD_SIZE": str(world),
                    "LOCAL_RANK": str(rank), "MASTER_ADDR": "127.0.0.1", "MASTER_PORT": str(port),
                    "OMP_NUM_THREADS": "1", "PYTHONPATH": str(ROOT)}
        log = open(directory / f"{scenarios[0]}-w{world}-rank{rank}.log", "w")  # noqa: SIM115 - closed with the process below
        procs.append((subprocess.Popen([sys.executable, "-m", "tests.jobs.dist_job", str(directory), *scenarios],
                                       env=rank_env, cwd=ROOT, stdout=log, stderr=subprocess.STDOUT), log))
    deadline = time.monotonic() + timeout
    try:
        for proc, _ in procs:
            proc.wait(timeout=max(1.0, deadline - time.monotonic()))
    except subprocess.TimeoutExpired:
        pass
    finally:
        for proc, log in procs:
            if proc.poll() is None:
                proc.send_signal(signal.SIGKILL)
                proc.wait()
            log.close()
    return [proc.returncode for proc, _ in procs]


def results(directory: Path, scenario: str, world: int, ranks: list[int] | None = None) -> list[dict]:
    """Each rank's result of ``scenario`` (of ``ranks``, by default all); a missing one shows the logs."""
    out = []
    for rank in range(world) if ranks is None else ranks:
        path = directory / f"{scenario}-w{world}-rank{rank}.json"
        if not path.exists():
            log = "\n".join(p.read_text()[-3000:] for p in sorted(directory.glob(f"*-w{world}-rank{rank}.log")))
            raise AssertionError(f"rank {rank} has no result for {scenario}; its log ends:\n{log}")
        out.append(json.loads(path.read_text()))
    return out
