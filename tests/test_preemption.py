"""Preemption: a signal makes the next ``save()`` write a durable checkpoint and the loop stop.

Real subprocesses and real signals: one process (sync; async in the slow set), two gloo ranks with
the signal sent to one rank only (slow), and ``torchrun`` with the signal sent to its agent (slow).
Each interrupted run resumes and finishes bit-equal to an uninterrupted one.
"""

from __future__ import annotations

import json
import os
import re
import select
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest
import torch

import torchckpt

from .distributed import ROOT, finish_session, free_port

STEPS = 120
JOB = [sys.executable, "-m", "tests.jobs.preempt_job"]


def start(directory: Path, *args: str, env: dict[str, str] | None = None) -> subprocess.Popen[str]:
    return subprocess.Popen([*JOB, str(directory), "--steps", str(STEPS), *args], cwd=ROOT, text=True,
                            stdout=subprocess.PIPE, stderr=subprocess.STDOUT, start_new_session=True,
                            env={**os.environ, "OMP_NUM_THREADS": "1", "PYTHONPATH": str(ROOT), **(env or {})})


STEP_LINE = re.compile(rb"(?<![a-z] )step (\d+)$")  # "step 70", not "starting at step 50"


def wait_for_step(proc: subprocess.Popen[str], step: int, timeout: float = 60) -> None:
    """Read ``proc``'s output until it says ``step N`` for some N >= ``step``.

    Reads the pipe's bytes itself: with several workers on one pipe (torchrun), a worker's line
    may come in pieces between another's, and a text reader's buffer would hide lines from
    ``select``."""
    assert proc.stdout is not None
    fd, pending, seen = proc.stdout.fileno(), b"", []
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        ready, _, _ = select.select([fd], [], [], max(0.0, deadline - time.monotonic()))
        chunk = os.read(fd, 65536) if ready else b""
        if not chunk:
            break
        *lines, pending = (pending + chunk).split(b"\n")
        seen += lines
        if any(int(m.group(1)) >= step for line in lines if (m := STEP_LINE.search(line.strip()))):
            return
    tail = b"\n".join([*seen[-40:], pending]).decode(errors="replace")
    raise AssertionError(f"no line 'step N' with N >= {step} within {timeout} s; output:\n{tail}")


def result(directory: Path, rank: int = 0) -> dict:
    return json.loads((directory / f"result-rank{rank}.json").read_text())


def saved_step(path: str) -> int:
    return int(torchckpt.load_checkpoint(path).get_tensor("step"))


@pytest.fixture(scope="module")
def uninterrupted(tmp_path_factory) -> dict:
    directory = tmp_path_factory.mktemp("uninterrupted")
    code, out = finish_session(start(directory, "--sleep", "0"))
    assert code == 0, out[-3000:]
    found = result(directory)
    assert found["step"] == STEPS and not found["preempted"]
    return found["state"]


@pytest.mark.parametrize("mode", ["sync", pytest.param("async", marks=pytest.mark.slow)])
def test_sigterm_mid_interval_saves_that_step_exits_0_and_the_resume_is_bit_exact(tmp_path, uninterrupted, mode):
    extra = ["--async"] if mode == "async" else []
    proc = start(tmp_path, *extra)
    wait_for_step(proc, 70)  # between the saves at 50 and 100
    proc.send_signal(signal.SIGTERM)
    time.sleep(0.01)
    proc.send_signal(signal.SIGUSR1)  # a second signal, likely during the save: it must not interrupt it
    code, out = finish_session(proc)
    assert code == 0, out[-3000:]
    stopped = result(tmp_path)
    assert stopped["preempted"] and 70 < stopped["step"] < 100, stopped["step"]
    assert f"rank 0: preempted, saved step {stopped['step']}" in out
    assert stopped["latest"] == torchckpt.latest_checkpoint(tmp_path)
    assert saved_step(stopped["latest"]) == stopped["step"]  # exactly the step it stopped at, committed
    assert torchckpt.load_checkpoint(stopped["latest"]).get_variable_to_shape_map()
    assert stopped["handler_back"]  # close() put the default SIGTERM handler back
    code, out = finish_session(start(tmp_path, *extra, "--sleep", "0"))
    assert code == 0, out[-3000:]
    assert f"rank 0: starting at step {stopped['step']}" in out
    resumed = result(tmp_path)
    assert resumed["step"] == STEPS and resumed["state"] == uninterrupted  # bit for bit


def test_sigterm_to_the_whole_process_group_with_data_workers_still_saves_and_stops(tmp_path, uninterrupted):
    # torchrun's agent and SLURM signal every process: workers given torchckpt.IgnoreSignals do not
    # die of it, so the training process reaches its preempted save (unshielded, PyTorch raises
    # "DataLoader worker ... is killed by signal: Terminated" mid-step, and nothing is saved)
    proc = start(tmp_path, "--workers", "2")
    wait_for_step(proc, 70)
    os.killpg(proc.pid, signal.SIGTERM)  # the training process and its two workers
    code, out = finish_session(proc)
    assert code == 0, out[-3000:]
    stopped = result(tmp_path)
    assert stopped["preempted"] and 70 < stopped["step"] < 100, stopped["step"]
    assert saved_step(stopped["latest"]) == stopped["step"]
    assert repr(torchckpt.IgnoreSignals(signal.SIGTERM)) == "IgnoreSignals(SIGTERM)"


LEFT_LOOP = """
import multiprocessing, os, signal, subprocess, sys, torch, torchckpt
from torchdata.stateful_dataloader import StatefulDataLoader

HELD = []


def train(shield=None):
    signal.signal(signal.SIGTERM, lambda signum, frame: print("notice", flush=True))  # a manager's handler does more
    loader = StatefulDataLoader(list(range(400)), batch_size=4, num_workers=2, persistent_workers=True,
                                worker_init_fn=shield or torchckpt.IgnoreSignals(signal.SIGTERM))
    HELD.append(loader)  # alive at exit, as in a loop an exception left (its traceback holds the frame)
    for i, batch in enumerate(loader):
        if i == 0 and sys.argv[1] == "group":  # a scheduler's notice to every process (sent by another): workers go on
            assert os.getpgid(0) == (os.getpid() if sys.argv[2] == "main" else os.getppid())  # this test's own group
            notice = f"import os, signal; os.killpg({os.getpgid(0)}, signal.SIGTERM)"
            subprocess.run([sys.executable, "-c", notice], check=False)  # it ends by its own notice
        if i == 5:
            break  # the workers stay alive: Python's multiprocessing SIGTERMs and joins them as it exits
    print("left the loop", flush=True)

if sys.argv[2] != "main":  # the training process started by multiprocessing (torch.multiprocessing.spawn does)
    signal.signal(signal.SIGTERM, signal.SIG_IGN)  # the launcher lets its child handle the notice
    shield = torchckpt.IgnoreSignals(signal.SIGTERM) if sys.argv[2] == "child-given" else None  # made before the fork
    child = multiprocessing.get_context("fork").Process(target=train, args=(shield,))
    child.start()
    child.join()
    sys.exit(child.exitcode)
train()
"""


@pytest.mark.parametrize("process", ["main", "child", "child-given"])
@pytest.mark.parametrize("notice", ["none", "group"])
def test_a_process_whose_shielded_workers_are_alive_at_exit_still_exits(tmp_path, notice, process):
    # probe42 F1: its workers ignored the SIGTERM Python's exit sends them, and it hung forever;
    # probe45 F1: also in a training process started by multiprocessing, which runs no atexit hook;
    # probe46 F1: one given the launcher's IgnoreSignals (the hook is the launcher's, not inherited)
    proc = subprocess.Popen([sys.executable, "-c", LEFT_LOOP, notice, process], cwd=ROOT, stdout=subprocess.PIPE,
                            stderr=subprocess.STDOUT, text=True, start_new_session=True,
                            env={**os.environ, "PYTHONPATH": str(ROOT)})
    code, out = finish_session(proc, timeout=60, what="the process")
    assert code == 0 and "left the loop" in out, out[-3000:]
    assert ("notice" in out) == (notice == "group")


OWN_DAEMON = """
import multiprocessing, signal, sys, time, torchckpt

def writer(queue, path, ready):
    signal.signal(signal.SIGTERM, signal.SIG_IGN)  # outlives a preemption notice, as the data workers do
    ready.set()
    with open(path, "w") as f:
        while (item := queue.get()) is not None:
            time.sleep(0.002)
            f.write(f"{item}\\n")
        f.write("END\\n")

if __name__ == "__main__":
    shield = torchckpt.IgnoreSignals(signal.SIGTERM)  # the run's loader's (its hook is registered)
    queue, ready = multiprocessing.Queue(), multiprocessing.Event()
    multiprocessing.Process(target=writer, args=(queue, sys.argv[1], ready), daemon=True).start()
    assert ready.wait(60)  # it ignores SIGTERM from now on
    for i in range(200):
        queue.put(i)
    queue.put(None)  # the writer ends on its own; the script ends without joining it
"""


def test_a_daemon_of_the_users_own_that_ignores_sigterm_is_left_to_finish(tmp_path):
    # probe45 F4: the exit hook killed every daemonic child that ignores SIGTERM, not only a loader's
    script, log = tmp_path / "train.py", tmp_path / "log.txt"
    script.write_text(OWN_DAEMON)
    proc = subprocess.Popen([sys.executable, str(script), str(log)], cwd=ROOT, stdout=subprocess.PIPE,
                            stderr=subprocess.STDOUT, text=True, start_new_session=True,
                            env={**os.environ, "PYTHONPATH": str(ROOT)})
    code, out = finish_session(proc, timeout=60, what="the process")
    assert code == 0 and log.read_text().splitlines()[-1] == "END", out[-3000:]


def test_handlers_are_installed_and_put_back_on_close(tmp_path):
    def mine(signum, frame):
        pass

    previous = signal.signal(signal.SIGUSR2, mine)
    try:
        manager = torchckpt.CheckpointManager(torchckpt.Checkpoint(w=torch.zeros(2)), tmp_path,
                                              preemption_signals=(signal.SIGUSR2,))
        assert signal.getsignal(signal.SIGUSR2) is not mine
        assert not manager.preempted
        os.kill(os.getpid(), signal.SIGUSR2)  # only sets the flag: this process goes on
        assert not manager.preempted  # until the next save sees it
        path = manager.save()
        assert manager.preempted and path.endswith("ckpt-1")
        manager.close()
        assert signal.getsignal(signal.SIGUSR2) is mine
    finally:
        signal.signal(signal.SIGUSR2, previous)


def test_preemption_signals_from_another_thread_are_refused(tmp_path):
    import threading

    errors = []

    def make() -> None:
        try:
            torchckpt.CheckpointManager(torchckpt.Checkpoint(), tmp_path, preemption_signals=(signal.SIGUSR2,))
        except ValueError as e:
            errors.append(e)

    thread = threading.Thread(target=make)
    thread.start()
    thread.join(30)
    assert len(errors) == 1 and "main thread" in str(errors[0])
    torchckpt.CheckpointManager(torchckpt.Checkpoint(), tmp_path).close()  # the failed one released its claim


def test_a_preempted_save_is_written_whatever_the_interval(tmp_path):
    step = torch.tensor(0)
    manager = torchckpt.CheckpointManager(torchckpt.Checkpoint(step=step), tmp_path, step_counter=step,
                                          checkpoint_interval=100, preemption_signals=(signal.SIGUSR2,))
    try:
        assert manager.save().endswith("ckpt-1")
        step.fill_(3)
        assert manager.save() is None  # within the interval
        os.kill(os.getpid(), signal.SIGUSR2)
        step.fill_(4)
        assert manager.save().endswith("ckpt-2") and manager.preempted
        assert saved_step(manager.latest_checkpoint) == 4
    finally:
        manager.close()


def start_ranks(directory: Path, *args: str, world: int = 2) -> list[subprocess.Popen[str]]:
    port = str(free_port())
    return [start(directory, *args, env={"RANK": str(r), "WORLD_SIZE": str(world), "LOCAL_RANK": str(r),
                                  "MASTER_ADDR": "127.0.0.1", "MASTER_PORT": port}) for r in range(world)]


@pytest.mark.slow
def test_on_2_ranks_a_signal_to_one_rank_stops_both_at_the_same_step(tmp_path, uninterrupted):
    procs = start_ranks(tmp_path)
    try:
        wait_for_step(procs[1], 70)
        procs[1].send_signal(signal.SIGTERM)  # rank 1 only
        start_time = time.monotonic()
        outcomes = [finish_session(p) for p in procs]
    finally:
        for p in procs:
            if p.poll() is None:
                os.killpg(p.pid, signal.SIGKILL)
                p.wait()
    assert all(code == 0 for code, _ in outcomes), [out[-2000:] for _, out in outcomes]
    assert time.monotonic() - start_time < 20  # no timeout
    stopped = [result(tmp_path, r) for r in (0, 1)]
    assert stopped[0]["preempted"] and stopped[1]["preempted"]
    assert stopped[0]["step"] == stopped[1]["step"] and 70 < stopped[0]["step"] < 100
    assert saved_step(torchckpt.latest_checkpoint(tmp_path)) == stopped[0]["step"]
    procs = start_ranks(tmp_path, "--sleep", "0")
    outcomes = [finish_session(p) for p in procs]
    assert all(code == 0 for code, _ in outcomes), [out[-2000:] for _, out in outcomes]
    for r in (0, 1):  # DDP's averaged gradients of equal data are those of one process: bit for bit
        assert result(tmp_path, r)["state"] == uninterrupted


@pytest.mark.slow
def test_under_torchrun_a_sigterm_to_the_agent_stops_every_worker_at_one_step(tmp_path):
    command = [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc-per-node", "2",
               "-m", "tests.jobs.preempt_job", str(tmp_path), "--steps", str(STEPS)]
    proc = subprocess.Popen(command, cwd=ROOT, text=True, stdout=subprocess.PIPE, stderr=subprocess.STDOUT,
                            start_new_session=True, env={**os.environ, "OMP_NUM_THREADS": "1", "PYTHONPATH": str(ROOT)})
    try:
        wait_for_step(proc, 70, timeout=90)
        proc.send_signal(signal.SIGTERM)  # to the agent, which forwards it to its workers
        _, out = finish_session(proc, timeout=90)
    finally:
        if proc.poll() is None:
            os.killpg(proc.pid, signal.SIGKILL)
            proc.wait()
    stopped = [result(tmp_path, r) for r in (0, 1)]
    assert stopped[0]["preempted"] and stopped[1]["preempted"], out[-3000:]
    assert stopped[0]["step"] == stopped[1]["step"]
    assert saved_step(torchckpt.latest_checkpoint(tmp_path)) == stopped[0]["step"]


def test_closing_one_manager_keeps_anothers_handler_and_the_chain_ends_at_the_original(tmp_path):
    calls = []

    def mine(signum, frame):
        calls.append(signum)

    previous = signal.signal(signal.SIGUSR2, mine)
    try:
        first = torchckpt.CheckpointManager(torchckpt.Checkpoint(w=torch.zeros(1)), tmp_path / "a",
                                            preemption_signals=(signal.SIGUSR2,))
        second = torchckpt.CheckpointManager(torchckpt.Checkpoint(w=torch.zeros(1)), tmp_path / "b",
                                             preemption_signals=(signal.SIGUSR2,))
        first.close()  # the second one's handler stays installed
        os.kill(os.getpid(), signal.SIGUSR2)
        second.save()
        assert second.preempted and not first.preempted and calls == []
        second.close()  # the first one's (closed) handler is back: it hands the signal to `mine` and steps aside
        os.kill(os.getpid(), signal.SIGUSR2)
        assert calls == [signal.SIGUSR2]
        assert signal.getsignal(signal.SIGUSR2) is mine
    finally:
        signal.signal(signal.SIGUSR2, previous)
