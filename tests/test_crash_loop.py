"""The crash loop: a writer SIGKILLed again and again, at random moments and at every named point of
the commit protocol, on one directory. After each kill: no acknowledged save is lost, the latest
checkpoint restores consistently, and the next manager leaves no orphaned checkpoint and no
temporary behind."""

from __future__ import annotations

import os
import random
import signal
import subprocess
import sys
import threading
import time

import pytest
import torch

import torchckpt
from torchckpt._format import spec
from torchckpt._history import members as history_members
from torchckpt._history.recover import read_disk, recover
from torchckpt._storage.local import LOCAL

from .distributed import ROOT

JOB = "tests.jobs.crash_writer"  # run as a module from the repository's root: it imports tests.doubles
POINTS = ["before-commit", "after-commit", "after-state", "after-retention-state", "mid-delete", "state-temporary"]


def run_until_killed(directory: str, mode: str, megabytes: int, point: str, delay: float) -> int:
    """Run the writer until it dies (itself, or killed after ``delay`` seconds of saving); the last
    acknowledged step (0: none)."""
    proc = subprocess.Popen([sys.executable, "-m", JOB, directory, mode, str(megabytes), point], stdout=subprocess.PIPE,
                            stderr=subprocess.PIPE, text=True, cwd=ROOT)
    acked = {"last": 0, "started": threading.Event()}

    def follow() -> None:
        assert proc.stdout is not None
        for line in proc.stdout:
            if line.startswith("started"):
                acked["started"].set()
            elif line.startswith("acked"):
                acked["last"] = int(line.split()[1])

    reader = threading.Thread(target=follow, daemon=True)
    reader.start()
    try:
        if point == "random":
            assert acked["started"].wait(120), "the writer did not start"
            time.sleep(delay)
            proc.send_signal(signal.SIGKILL)
        proc.wait(timeout=180)
    finally:
        if proc.poll() is None:
            proc.kill()
            proc.wait()
    reader.join(10)
    assert proc.returncode == -signal.SIGKILL, f"the writer ended with {proc.returncode}: {proc.stderr.read()[-2000:]}"
    return int(acked["last"])


def check_after_crash(directory: str, last_acked: int, megabytes: int) -> dict[str, int]:
    """What the next manager finds: the figures counted by the loop."""
    count = max(1, megabytes * 2**20 // 4 // 4)
    target = torchckpt.Checkpoint(**{f"t{i}": torch.empty(count) for i in range(4)}, step=torch.zeros((), dtype=torch.int64))
    mgr = torchckpt.CheckpointManager(target, directory, max_to_keep=2, keep_best=1, best_metric="loss")
    try:
        found = {"lost": 0, "inconsistent": 0, "orphans": 0, "temporaries": 0}
        found["temporaries"] = len([n for n in os.listdir(directory) if spec.is_temporary_name(n)])
        history = recover(read_disk(directory, LOCAL, "ckpt")[0], time.time(), "ckpt", 1, "loss")  # as the manager sees it
        accounted = {os.path.basename(p) for p in mgr.checkpoints} | {e.name for e in history.preserved}
        found["orphans"] = len(set(history_members.committed_members(directory, "ckpt", LOCAL)) - accounted)
        latest = mgr.latest_checkpoint
        if latest is None:
            found["lost"] += last_acked > 0
            return found
        target.restore(latest).assert_consumed()
        value = int(target.step)
        if value < last_acked:
            found["lost"] += 1
        tensors = [getattr(target, f"t{i}") for i in range(4)]
        if value <= 0 or not all(bool(torch.all(t == value)) for t in tensors):
            found["inconsistent"] += 1
        return found
    finally:
        mgr.close()


@pytest.mark.slow
def test_crash_loop(tmp_path):
    kills = int(os.environ.get("TORCHCKPT_CRASH_KILLS", "100"))
    rng = random.Random(0)
    trials = [(mode, 1, point) for point in POINTS for mode in ("sync", "async")]
    trials += [("sync", 200, "random"), ("async", 200, "random")]  # at least one large state of each kind
    while len(trials) < kills:
        trials.append((rng.choice(["sync", "async"]), 200 if rng.random() < 0.2 else 1, "random"))
    rng.shuffle(trials)
    totals = {"kills": 0, "acked": 0, "lost": 0, "inconsistent": 0, "orphans": 0, "temporaries": 0}
    for mode, size in [(m, s) for m in ("sync", "async") for s in (1, 200)]:  # each directory killed over and over
        directory = str(tmp_path / f"{mode}-{size}")
        for trial_mode, megabytes, point in [t for t in trials if t[:2] == (mode, size)]:
            delay = rng.uniform(0.05, 2.5 if megabytes > 1 else 1.0)
            acked = run_until_killed(directory, trial_mode, megabytes, point, delay)
            found = check_after_crash(directory, acked, megabytes)
            totals["kills"] += 1
            totals["acked"] += acked > 0
            for key, value in found.items():
                totals[key] += value
            assert found == {"lost": 0, "inconsistent": 0, "orphans": 0, "temporaries": 0}, (trial_mode, megabytes, point, found)
    print(f"crash loop: {totals}")
    assert totals["kills"] >= kills
