"""Launching a gloo job of several processes on 127.0.0.1 for a test, and never leaving one behind;
and the jobs the distributed tests share (session fixtures, imported by ``conftest.py``)."""

from __future__ import annotations

import contextlib
import json
import os
import signal
import socket
import subprocess
import sys
import time
from pathlib import Path

import pytest
import safetensors.torch
import torch

import torchckpt

ROOT = Path(__file__).resolve().parent.parent


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


def run_ranks(world: int, directory: Path, scenarios: list[str], timeout: float = 180,
              env: dict[str, str] | None = None, module: str = "tests.jobs.dist_job") -> list[int]:
    """Run ``python -m module DIRECTORY *scenarios`` on ``world`` ranks; returns their exit codes.

    Each rank runs in a session of its own, killed with its children (a loader's workers) at
    ``timeout``; its output goes to ``DIRECTORY/<first scenario or module>-w<world>-rank<r>.log``."""
    port = free_port()
    procs = []
    name = scenarios[0] if scenarios else module.rsplit(".", 1)[-1]
    for rank in range(world):
        rank_env = {**os.environ, **(env or {}), "RANK": str(rank), "WORLD_SIZE": str(world),
                    "LOCAL_RANK": str(rank), "MASTER_ADDR": "127.0.0.1", "MASTER_PORT": str(port),
                    "OMP_NUM_THREADS": "1", "PYTHONPATH": str(ROOT)}
        log = open(directory / f"{name}-w{world}-rank{rank}.log", "w")  # noqa: SIM115 - closed with the process below
        procs.append((subprocess.Popen([sys.executable, "-m", module, str(directory), *scenarios],
                                       env=rank_env, cwd=ROOT, stdout=log, stderr=subprocess.STDOUT,
                                       start_new_session=True), log))
    deadline = time.monotonic() + timeout
    try:
        for proc, _ in procs:
            proc.wait(timeout=max(1.0, deadline - time.monotonic()))
    except subprocess.TimeoutExpired:
        pass
    finally:
        for proc, log in procs:
            with contextlib.suppress(ProcessLookupError):
                os.killpg(proc.pid, signal.SIGKILL)  # the rank if still running, and anything it left behind
            proc.wait()
            log.close()
    return [proc.returncode for proc, _ in procs]


def run_torchrun(nproc: int, args: list[str], timeout: float = 120) -> subprocess.CompletedProcess[str]:
    """``torchrun --standalone --nproc-per-node N ...`` in its own session: on a timeout the whole
    session (torchrun and its workers) is killed, never left behind."""
    command = [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc-per-node", str(nproc), *args]
    proc = subprocess.Popen(command, cwd=ROOT, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True,
                            start_new_session=True, env={**os.environ, "OMP_NUM_THREADS": "1"})
    code, out = finish_session(proc, timeout, f"torchrun {' '.join(args)}")
    return subprocess.CompletedProcess(command, code, out, "")


def finish_session(proc: subprocess.Popen[str], timeout: float = 60, what: str = "the job") -> tuple[int, str]:
    """The exit code and output of ``proc``, started with ``start_new_session=True``. On a timeout
    the whole session is killed and the test fails; either way no process of it is left behind."""
    try:
        out, _ = proc.communicate(timeout=timeout)
    except subprocess.TimeoutExpired:
        os.killpg(proc.pid, signal.SIGKILL)
        out, _ = proc.communicate()
        raise AssertionError(f"{what} did not finish in {timeout} s:\n{out[-3000:]}") from None
    finally:
        with contextlib.suppress(ProcessLookupError):
            os.killpg(proc.pid, signal.SIGKILL)  # any worker left behind
        proc.wait()
    return proc.returncode, out


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


# -- the jobs, shared by the distributed test modules (each spawn costs 6-9 s) -------------------


@pytest.fixture(scope="session")
def job_dir(tmp_path_factory) -> Path:
    return tmp_path_factory.mktemp("jobs")


@pytest.fixture(scope="session")
def s3_run(s3_endpoint) -> str:
    import s3fs

    s3fs.S3FileSystem(client_kwargs={"endpoint_url": s3_endpoint}).mkdir("distributed")
    return "s3://distributed/run"


@pytest.fixture(scope="session")
def world4(job_dir, s3_endpoint, s3_run) -> Path:
    scenarios = ["save_fsdp_4", "restore_from_4", "differing_value", "ddp", "tp_mesh", "write_fails_on_one_rank",
                 "s3_fsdp", "manager_s3", "async_loops", "tools_save", "strided_shards", "empty_dtensors"]
    run_ranks(4, job_dir, scenarios, env={"AWS_ENDPOINT_URL": s3_endpoint, "TORCHCKPT_TEST_S3": s3_run})
    return job_dir


@pytest.fixture(scope="session")
def world3(world2) -> Path:
    from tests.jobs import flips

    flips.write_old_formats(world2)
    run_ranks(3, world2, ["restore_from_4", "flips_from_2", "flips_format_2", "flips_format_1"])
    return world2


@pytest.fixture(scope="session")
def world2(world4) -> Path:
    from tests.jobs.dist_job import MLP, Cursor, OwnLoaderExtra, StrictOwnLoaderExtra, WithExtra

    model = MLP(21)  # a single-process checkpoint (format 1) for the plain -> FSDP2 restore
    torchckpt.Checkpoint(model=model).write(world4 / "plain-mlp")
    state = model.state_dict()  # as an older version of the model named it, and one without the head's bias
    torchckpt.Checkpoint(model={k.replace("head.", "old_head."): v for k, v in state.items()}).write(world4 / "renamed-mlp")
    torchckpt.Checkpoint(model={k: v for k, v in state.items() if k != "head.bias"}).write(world4 / "no-bias-mlp")
    torchckpt.Checkpoint(rng=torchckpt.RNGState(), cursor=torchckpt.PerRank(5), w=torch.ones(2)).write(
        world4 / "one-process-per-rank")
    torchckpt.Checkpoint(counter=Cursor(5), m=WithExtra(6)).write(world4 / "one-process-own-per-rank")
    torchckpt.Checkpoint(m=OwnLoaderExtra(6)).write(world4 / "one-process-own-loader")
    torchckpt.Checkpoint(m=StrictOwnLoaderExtra(6)).write(world4 / "one-process-strict-loader")
    safetensors.torch.save_file({f"model/{k}": v for k, v in model.state_dict().items()},
                                str(world4 / "plain-mlp-reference.safetensors"))
    (world4 / "held").mkdir()
    holder = torchckpt.CheckpointManager(torchckpt.Checkpoint(), world4 / "held")  # another job's claim
    try:
        run_ranks(2, world4, ["restore_from_4", "restore_tp", "plain_into_fsdp", "ddp", "save_fsdp_2", "manager_2",
                              "second_job", "async_loops", "async_failure", "after_commit_fails", "async_next_to_other_calls",
                              "interrupted_on_one_rank", "arguments_on_one_rank", "claim_after_a_rank_gave_up",
                              "one_rank_fails_capture",
                              "mismatched_calls", "restore_failures", "damaged_on_one_rank",
                              "calls_stay_paired", "save_flips_2", "incremental_fsdp", "damaged_then_saved", "opens_its_own_shards", "rename",
                              "read_once", "index_too_large", "hooked_and_tied"])
    finally:
        holder.close()
    return world4


@pytest.fixture(scope="session")
def world4_from_2(world2) -> Path:
    run_ranks(4, world2, ["restore_from_2", "manager_resume", "flips_from_2"])
    return world2


@pytest.fixture(scope="session")
def killed(job_dir) -> Path:
    run_ranks(2, job_dir, ["killed_mid_save"], timeout=90)
    return job_dir


@pytest.fixture(scope="session")
def killed_after_commit(job_dir) -> Path:
    run_ranks(2, job_dir, ["killed_after_commit"], timeout=90)
    return job_dir


@pytest.fixture(scope="session")
def killed_async(job_dir) -> Path:
    run_ranks(2, job_dir, ["killed_async"], timeout=90)
    return job_dir
