"""The crash loop: a writer SIGKILLed again and again, at random moments and at every named point of
the commit protocol (an incremental save's too), on one directory. After each kill: no acknowledged
save is lost, the latest checkpoint restores consistently (its frozen part, reused from save to
save, exactly), every checkpoint still holds every file its index names, and the next manager
leaves no orphaned checkpoint and no temporary behind."""

from __future__ import annotations

import json
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
from torchckpt._tools.verify import verify

from .distributed import ROOT
from .jobs.crash_writer import frozen_module, trained_tensors

JOB = "tests.jobs.crash_writer"  # run as a module from the repository's root: it imports tests.doubles
POINTS = ["before-commit", "after-commit", "after-state", "mid-delete", "state-temporary",
          "before-reuse", "after-reuse", "after-drop"]
CLEAN = {"lost": 0, "inconsistent": 0, "frozen_changed": 0, "orphans": 0, "temporaries": 0, "missing_files": 0,
         "damaged": 0, "not_reused": 0}


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
    frozen = frozen_module(megabytes)
    target_frozen = torch.nn.Linear(frozen.in_features, frozen.out_features)  # other values, for the restore to replace
    target = torchckpt.Checkpoint(**{n: torch.empty_like(t) for n, t in trained_tensors(megabytes).items()},
                                  step=torch.zeros((), dtype=torch.int64), frozen=target_frozen)
    mgr = torchckpt.CheckpointManager(target, directory, max_to_keep=2, keep_best=1, best_metric="loss")
    try:
        found = dict.fromkeys(CLEAN, 0)
        found["temporaries"] = len([n for n in os.listdir(directory) if spec.is_temporary_name(n)])
        history = recover(read_disk(directory, LOCAL, "ckpt")[0], time.time(), "ckpt", 1, "loss")  # as the manager sees it
        accounted = {os.path.basename(p) for p in mgr.checkpoints} | {e.name for e in history.preserved}
        committed = history_members.committed_members(directory, "ckpt", LOCAL)
        found["orphans"] = len(set(committed) - accounted)
        for name in committed:  # every checkpoint kept, the previous ones too, holds every byte its index records
            checkpoint = os.path.join(directory, name)
            missing = missing_files(checkpoint)
            found["missing_files"] += len(missing)
            found["damaged"] += bool(not missing and verify(torchckpt.load_checkpoint(checkpoint), progress=False))
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
        found["frozen_changed"] = int(not all(torch.equal(a, b) for a, b in zip(target_frozen.parameters(),
                                                                                 frozen.parameters())))
        if os.path.basename(latest) != "ckpt-1":  # saved with a previous checkpoint: its frozen shard was reused
            found["not_reused"] = int(not reuses_frozen_shard(latest))
        return found
    finally:
        mgr.close()


def missing_files(checkpoint: str) -> list[str]:
    """The shards the index of ``checkpoint`` names that are not there as regular files of their recorded size."""
    with open(os.path.join(checkpoint, spec.INDEX_FILE)) as f:
        section = json.load(f)[spec.TORCHCKPT_KEY]
    missing = []
    for shard in section["shards"]:
        path = os.path.join(checkpoint, shard["file"])
        if not os.path.isfile(path) or os.path.islink(path) or os.path.getsize(path) != shard["size"]:
            missing.append(shard["file"])
    return missing


def reuses_frozen_shard(checkpoint: str) -> bool:
    """Whether the index of ``checkpoint`` records its frozen shard as reused from its base."""
    with open(os.path.join(checkpoint, spec.INDEX_FILE)) as f:
        index = json.load(f)
    file = index["weight_map"]["frozen/weight"]
    reused = index[spec.TORCHCKPT_KEY].get(spec.REUSED_KEY, {}).get("files", {})
    return file in reused


@pytest.mark.slow
def test_crash_loop(tmp_path):
    kills = int(os.environ.get("TORCHCKPT_CRASH_KILLS", "100"))
    rng = random.Random(0)
    trials = [(mode, 1, point) for point in POINTS for mode in ("sync", "async")]
    trials += [("sync", 200, "random"), ("async", 200, "random")]  # at least one large state of each kind
    while len(trials) < kills:
        trials.append((rng.choice(["sync", "async"]), 200 if rng.random() < 0.2 else 1, "random"))
    rng.shuffle(trials)
    totals = {"kills": 0, "acked": 0, **CLEAN}
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
            assert found == CLEAN, (trial_mode, megabytes, point, found)
    print(f"crash loop: {totals}")
    assert totals["kills"] >= kills
