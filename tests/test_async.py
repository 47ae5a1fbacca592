"""async_save=True: save() returns after a memory copy; the write happens in the background."""

from __future__ import annotations

import gc
import json
import os
import shutil
import signal
import subprocess
import sys
import threading
import time

import pytest
import torch

import torchckpt
from torchckpt import CheckpointManager
from torchckpt._save import background as save_background


def test_committed_checkpoint_holds_values_as_of_save(tmp_path, disk):
    weights = torch.zeros(1000)
    model = torch.nn.Linear(4, 4)
    release = threading.Event()
    disk.before("stage", lambda final, replace: release.wait(10))  # a slow disk: the write starts once released
    manager = CheckpointManager(torchckpt.Checkpoint(weights=weights, model=model, epoch=1), tmp_path, async_save=True)
    expected_model = {k: v.clone() for k, v in model.state_dict().items()}
    path = manager.save(metrics={"loss": 1.0})
    assert manager.latest_checkpoint is None  # bookkeeping happens after the background commit
    weights.fill_(99.0)  # training goes on and mutates everything right away
    with torch.no_grad():
        for p in model.parameters():
            p.add_(1.0)
    manager.checkpoint.epoch = 2
    release.set()
    manager.wait_until_finished()
    assert manager.latest_checkpoint == path and manager.checkpoints == [path]
    target_w, target_m = torch.ones(1000), torch.nn.Linear(4, 4)
    ckpt = torchckpt.Checkpoint(weights=target_w, model=target_m, epoch=0)
    ckpt.restore(path).assert_consumed()
    assert torch.all(target_w == 0.0) and ckpt.epoch == 1
    for k, v in target_m.state_dict().items():
        assert torch.equal(v, expected_model[k])


def test_background_failure_is_raised_by_the_next_call(tmp_path, disk):
    manager = CheckpointManager(torchckpt.Checkpoint(w=torch.zeros(2)), tmp_path, async_save=True)
    first = manager.save()
    manager.wait_until_finished()
    disk.fail("stage", OSError(28, "No space left on device"))  # the disk is full
    manager.save()
    with pytest.raises(OSError, match="no space left on the device") as info:
        manager.wait_until_finished()
    assert info.value.errno == 28
    manager.wait_until_finished()  # raised once, then cleared
    manager.save()
    with pytest.raises(OSError, match="no space left on the device"):
        manager.save()
    disk.heal()
    manager.wait_until_finished()
    assert manager.latest_checkpoint == first and manager.checkpoints == [first]


def test_at_most_one_save_in_flight(tmp_path, disk):
    active, peak = [0], [0]
    lock = threading.Lock()

    def started(*args) -> None:
        with lock:
            active[0] += 1
            peak[0] = max(peak[0], active[0])

    def ended(*args) -> None:
        with lock:
            active[0] -= 1

    disk.before("stage", started)  # a save's write opens its stage first, and ends committed or discarded
    disk.after("stage.commit", ended)
    disk.after("stage.discard", ended)
    w = torch.zeros(100_000)
    manager = CheckpointManager(torchckpt.Checkpoint(w=w), tmp_path, max_to_keep=2, async_save=True)
    for i in range(6):
        w.fill_(i)
        manager.save()
    manager.wait_until_finished()
    assert peak[0] == 1 and len(disk.called("stage")) == 6
    assert [os.path.basename(p) for p in manager.checkpoints] == ["ckpt-5", "ckpt-6"]
    target = torch.zeros(100_000)
    torchckpt.Checkpoint(w=target).restore(manager.latest_checkpoint).assert_consumed()
    assert torch.all(target == 5)


def test_interpreter_exit_waits_for_the_last_save(tmp_path):
    code = (
        "import torch, torchckpt, sys\n"
        "m = torchckpt.CheckpointManager(torchckpt.Checkpoint(w=torch.full((4_000_000,), 3.0)), sys.argv[1], async_save=True)\n"
        "print(m.save())\n"
    )
    out = subprocess.run([sys.executable, "-c", code, str(tmp_path)], capture_output=True, text=True, check=True)
    path = out.stdout.strip()
    target = torch.zeros(4_000_000)
    torchckpt.Checkpoint(w=target).restore(path).assert_consumed()
    assert torch.all(target == 3.0)
    assert torchckpt.latest_checkpoint(tmp_path) == path


@pytest.mark.parametrize("async_save", [True, False])
@pytest.mark.parametrize("registered", ["after import", "before import"])
def test_a_save_from_an_atexit_handler_completes(tmp_path, async_save, registered):
    """A final save registered with atexit runs after Python has shut down its thread pools; the
    snapshot copy (64 MiB: split across the copy threads) and the direct write must still work,
    and an asynchronous one must land before the process ends, whichever exit hook runs first."""
    register = "atexit.register(lambda: print(m.save(), flush=True))\n"
    code = (
        "import atexit, sys\n"
        + (register if registered == "before import" else "")
        + "import torch, torchckpt\n"
        "state = {f't{i}': torch.full((2**20,), float(i)) for i in range(16)}\n"
        f"m = torchckpt.CheckpointManager(torchckpt.Checkpoint(**state), sys.argv[1], async_save={async_save})\n"
        + (register if registered == "after import" else "")
    )
    out = subprocess.run([sys.executable, "-c", code, str(tmp_path)], capture_output=True, text=True)
    assert out.returncode == 0 and not out.stderr, out.stderr
    path = out.stdout.strip()
    assert torchckpt.latest_checkpoint(tmp_path) == path
    target = {f"t{i}": torch.zeros(2**20) for i in range(16)}
    torchckpt.Checkpoint(**target).restore(path).assert_consumed()
    assert all(torch.all(t == float(i)) for i, t in enumerate(target.values()))


def test_saves_work_where_no_thread_can_be_started(tmp_path, monkeypatch):
    """Python 3.12.0-3.12.3 refuse new threads during interpreter exit: every helper job then runs
    on the caller, and a save (direct write, checksums, async snapshot copy) still lands intact."""
    from torchckpt import _tensorio, _threads
    from torchckpt._storage import local_output

    refused = []

    def refuse(self):
        refused.append(self.name)
        raise RuntimeError("can't create new thread at interpreter shutdown")

    for worker in [local_output._disk, _tensorio._hasher, *save_background._COPIERS]:
        worker.close()  # their threads end; the next job would start a new one
    monkeypatch.setattr(threading.Thread, "start", refuse)
    state = {f"t{i}": torch.full((2**20,), float(i)) for i in range(24)}
    ckpt = torchckpt.Checkpoint(**state)
    written = [ckpt.write(tmp_path / "sync"), ckpt.write(tmp_path / "async", async_save=True)]
    ckpt.wait_until_finished()
    assert {"torchckpt-write", "torchckpt-hash", "torchckpt-copy", "torchckpt-async-save"} <= set(refused)
    for path in written:
        target = {k: torch.zeros_like(v) for k, v in state.items()}
        torchckpt.Checkpoint(**target).read(path).assert_consumed()
        assert all(torch.equal(target[k], v) for k, v in state.items())
    assert _threads.Worker("torchckpt-test").call(lambda a, b: a + b, 2, 3).result() == 5


def test_checkpoint_write_and_save_async(tmp_path):
    w = torch.zeros(50_000)
    ckpt = torchckpt.Checkpoint(w=w, step=1)
    path = ckpt.write(tmp_path / "w", async_save=True)
    w.fill_(5.0)
    ckpt.step = 2
    ckpt.wait_until_finished()
    target = torch.ones(50_000)
    reader = torchckpt.Checkpoint(w=target, step=0)
    reader.read(path).assert_consumed()
    assert torch.all(target == 0.0) and reader.step == 1

    saved = ckpt.save(tmp_path / "ckpt", async_save=True)
    assert saved.endswith("ckpt-1") and ckpt.save_counter == 1
    w.fill_(9.0)
    ckpt.sync()
    assert torchckpt.latest_checkpoint(tmp_path) == saved
    fresh = torchckpt.Checkpoint(w=torch.zeros(50_000), step=0)
    fresh.restore(tmp_path).assert_consumed()
    assert torch.all(fresh.w == 5.0) and fresh.step == 2


def test_checkpoint_async_failure_surfaces_on_the_next_call(tmp_path, disk):
    ckpt = torchckpt.Checkpoint(w=torch.zeros(3))
    disk.fail("stage", OSError(5, "Input/output error"))
    ckpt.write(tmp_path / "a", async_save=True)
    with pytest.raises(OSError, match="Input/output error"):
        ckpt.write(tmp_path / "b")
    disk.heal()
    assert ckpt.write(tmp_path / "c") == str(tmp_path / "c")


def _mixed_state() -> dict[str, object]:
    """Tensors of every kind the snapshot groups differently: many small ones of one shape, 0-dim
    scalars, other dtypes, a strided view, a conjugate view, an empty tensor, and a tied pair."""
    torch.manual_seed(0)
    base = torch.randn(6, 4)
    complex_base = torch.complex(torch.randn(3), torch.randn(3))
    tied = torch.randn(5)
    return {
        "small": [torch.randn(7) for _ in range(300)],
        "scalars": [torch.tensor(float(i)) for i in range(20)] + [torch.tensor(3, dtype=torch.int64)],
        "halves": torch.randn(2, 3).half(),
        "flags": torch.tensor([True, False, True]),
        "strided": base.t(),
        "conj": complex_base.conj(),
        "empty": torch.zeros(0, 4),
        "tied": tied,
        "tied_again": tied.view(5),
    }


def _values(state: dict[str, object]) -> dict[str, torch.Tensor]:
    flat: dict[str, torch.Tensor] = {}
    torchckpt._format.tree.encode(state, "state", flat)
    return {k: v.resolve_conj().clone() for k, v in flat.items()}


def _mutate(state: dict[str, object]) -> None:
    with torch.no_grad():
        for t in state["small"] + state["scalars"]:  # type: ignore[operator]
            t.add_(100)
        for key in ("halves", "strided", "tied"):
            state[key].add_(1)  # type: ignore[union-attr]
        state["flags"].logical_not_()  # type: ignore[union-attr]
        state["conj"].mul_(2)  # type: ignore[union-attr]


@pytest.mark.parametrize("saves", [1, 3])
def test_snapshot_of_mixed_tensors_holds_values_as_of_each_save(tmp_path, saves):
    """Every tensor kind is captured exactly as of save(), on the first save (new layout) and on
    later saves that reuse the layout (see the next test), though training mutates everything right after."""
    state = _mixed_state()
    ckpt = torchckpt.Checkpoint(state=state)
    expected = []
    paths = []
    for i in range(saves):
        expected.append(_values(state))
        paths.append(ckpt.write(tmp_path / f"c{i}", async_save=True))
        _mutate(state)
        ckpt.wait_until_finished()
    index = json.loads((tmp_path / "c0" / "index.json").read_text())
    assert index["torchckpt"]["aliases"] == {"state/tied_again": "state/tied"}
    for path, values in zip(paths, expected):
        reader = torchckpt.load_checkpoint(path)
        for name, value in values.items():
            assert torch.equal(reader.get_tensor(name), value), (path, name)


def test_later_snapshots_of_mixed_tensors_copy_into_the_first_layout():
    """What the saves above snapshot (the state's tensors as ``Checkpoint`` captures them) fits its
    first layout again after training changed every value: later snapshots reuse that host memory."""
    state = _mixed_state()
    flat: dict[str, torch.Tensor] = {}
    torchckpt._format.tree.encode(state, "state", flat)
    writer = save_background.AsyncWriter()
    first, _ = writer.snapshot(flat)
    for _ in range(2):
        _mutate(state)
        views, _ = writer.snapshot(flat)
        assert views is first  # the same views: laid out once
        assert all(torch.equal(v, flat[k].resolve_conj()) for k, v in views.items())  # copied as of now


def test_snapshot_follows_layout_and_alias_changes(tmp_path):
    w = torch.arange(4.0)
    ckpt = torchckpt.Checkpoint(a=w, b=torch.ones(2))
    ckpt.write(tmp_path / "1", async_save=True)
    ckpt.b = w  # now an alias of a
    ckpt.write(tmp_path / "2", async_save=True)
    ckpt.b = torch.zeros(3, 2)  # a new shape
    ckpt.write(tmp_path / "3", async_save=True)
    ckpt.a = w.double()  # a new dtype at a new address
    ckpt.write(tmp_path / "4", async_save=True)
    ckpt.wait_until_finished()
    assert json.loads((tmp_path / "2" / "index.json").read_text())["torchckpt"]["aliases"] == {"b": "a"}
    assert torchckpt.load_checkpoint(tmp_path / "3").get_variable_to_shape_map() == {"a": (4,), "b": (3, 2)}
    fourth = torchckpt.load_checkpoint(tmp_path / "4")
    assert fourth.get_variable_to_dtype_map() == {"a": torch.float64, "b": torch.float32}
    assert torch.equal(fourth.get_tensor("a"), torch.arange(4.0, dtype=torch.float64))


def test_async_save_refuses_an_unsupported_tensor_before_writing(tmp_path):
    ckpt = torchckpt.Checkpoint(w=torch.zeros(2))
    ckpt.write(tmp_path / "ok", async_save=True)
    ckpt.w = torch.zeros(2).to_sparse()
    with pytest.raises(torchckpt.UnsupportedStateError, match="'w'") as info:
        ckpt.write(tmp_path / "bad", async_save=True)
    assert info.value.key == "w"
    ckpt.wait_until_finished()
    assert not (tmp_path / "bad").exists() and (tmp_path / "ok").exists()


def test_a_forked_child_saves_asynchronously_with_its_own_threads(tmp_path):
    # The parent has a save worker and a copy pool (12 MiB of one dtype is copied on two threads).
    state = {f"w{i}": torch.full((2**20,), float(i)) for i in range(3)}
    ckpt = torchckpt.Checkpoint(**state)
    ckpt.write(tmp_path / "parent", async_save=True)
    ckpt.wait_until_finished()
    pid = os.fork()
    if pid == 0:  # the child: none of the parent's threads exist here
        code = 1
        try:
            torch.set_num_threads(1)  # torch's own OpenMP pool does not survive a fork either
            for t in state.values():
                t.add_(10)
            ckpt.write(tmp_path / "child", async_save=True)
            ckpt.wait_until_finished()
            code = 0
        finally:
            os._exit(code)
    deadline = time.monotonic() + 60
    while not (done := os.waitpid(pid, os.WNOHANG))[0]:
        if time.monotonic() > deadline:
            os.kill(pid, signal.SIGKILL)
            os.waitpid(pid, 0)
            pytest.fail("an asynchronous save in a forked child hung")
        time.sleep(0.05)
    assert os.waitstatus_to_exitcode(done[1]) == 0
    restored = {k: torch.zeros_like(v) for k, v in state.items()}
    torchckpt.Checkpoint(**restored).read(tmp_path / "child").assert_consumed()
    for i, t in enumerate(restored.values()):
        assert torch.equal(t, torch.full((2**20,), float(i) + 10))


def test_a_writers_thread_ends_with_the_writer(tmp_path):
    # Writers left by earlier tests may end at any moment (whenever the collector runs), so follow
    # this writer's own thread rather than counting every save thread alive.
    def save_threads() -> set[threading.Thread]:
        return {t for t in threading.enumerate() if t.name == "torchckpt-async-save"}

    before = save_threads()
    ckpt = torchckpt.Checkpoint(w=torch.ones(10))
    ckpt.write(tmp_path / "c", async_save=True)
    ckpt.wait_until_finished()
    (thread,) = save_threads() - before
    assert thread.is_alive()
    del ckpt
    gc.collect()
    thread.join(timeout=10)
    assert not thread.is_alive()


@pytest.mark.parametrize("second", ["transposed", "a-column", "conjugated"])
def test_an_alias_that_becomes_another_view_of_the_same_memory_is_stored_as_that_view(tmp_path, second):
    # the snapshot layout is reused only where strides and conj flags are the same too: w.t() at
    # w's address is no alias of w (found by a probe: the second save stored w under "proj")
    w = torch.arange(9.0).reshape(3, 3) if second != "conjugated" else torch.arange(9.0).reshape(3, 3) * (1 + 1j)
    views = {"transposed": lambda: w.t(), "a-column": lambda: w[:, 0], "conjugated": lambda: w.conj()}
    state = {"w": w, "proj": w if second != "a-column" else w[0]}
    ckpt = torchckpt.Checkpoint(state=state)
    ckpt.write(tmp_path / "first", async_save=True)
    ckpt.wait_until_finished()
    state["proj"] = views[second]()
    ckpt.write(tmp_path / "second", async_save=True)
    ckpt.wait_until_finished()
    stored = torchckpt.load_state(tmp_path / "second")["state"]
    assert torch.equal(stored["proj"], views[second]().resolve_conj()) and torch.equal(stored["w"], w)


@pytest.mark.parametrize("where", ["a function that returned", "an atexit handler, torchckpt first used there",
                                   "a manager local to main"])
def test_an_async_save_whose_checkpoint_was_dropped_still_lands_before_exit(tmp_path, where):
    code = {
        "a function that returned": (
            "import sys, torch, torchckpt\n"
            "def main():\n"
            "    torchckpt.Checkpoint(w=torch.full((2_000_000,), 3.0)).write(sys.argv[1] + '/c', async_save=True)\n"
            "main()\n"),
        "an atexit handler, torchckpt first used there": (
            "import atexit, sys, torch\n"
            "def last():\n"
            "    import torchckpt\n"
            "    torchckpt.Checkpoint(w=torch.full((2_000_000,), 3.0)).write(sys.argv[1] + '/c', async_save=True)\n"
            "atexit.register(last)\n"),
        "a manager local to main": (
            "import sys, torch, torchckpt\n"
            "def main():\n"
            "    m = torchckpt.CheckpointManager(torchckpt.Checkpoint(w=torch.full((2_000_000,), 3.0)), sys.argv[1],\n"
            "                                    async_save=True, checkpoint_name='c')\n"
            "    m.save(checkpoint_number=0)\n"
            "main()\n"),
    }[where]
    for _ in range(2):  # a crash at exit was intermittent
        out = subprocess.run([sys.executable, "-c", code, str(tmp_path)], capture_output=True, text=True, timeout=120)
        assert out.returncode == 0 and not out.stderr, (out.returncode, out.stderr)
        path = tmp_path / ("c-0" if where == "a manager local to main" else "c")
        target = torch.zeros(2_000_000)
        torchckpt.Checkpoint(w=target).read(path).assert_consumed()
        assert torch.all(target == 3.0)
        shutil.rmtree(path)
        (tmp_path / "checkpoints.json").unlink(missing_ok=True)  # a clean directory again, history and all


def test_an_async_save_in_a_multiprocessing_child_lands_before_the_child_exits(tmp_path):
    # a fork-context child ends with os._exit once its target returns: no atexit hook runs there
    code = (
        "import multiprocessing, sys, torch, torchckpt\n"
        "def target(directory):\n"
        "    m = torchckpt.CheckpointManager(torchckpt.Checkpoint(w=torch.full((2_000_000,), 3.0)), directory,\n"
        "                                    async_save=True)\n"
        "    m.save()\n"
        "if __name__ == '__main__':\n"
        "    child = multiprocessing.get_context('fork').Process(target=target, args=(sys.argv[1],))\n"
        "    child.start()\n"
        "    child.join(100)\n"
        "    sys.exit(child.exitcode)\n"
    )
    out = subprocess.run([sys.executable, "-c", code, str(tmp_path)], capture_output=True, text=True, timeout=120)
    assert out.returncode == 0 and not out.stderr, (out.returncode, out.stderr)
    target = torch.zeros(2_000_000)
    torchckpt.Checkpoint(w=target).restore(torchckpt.latest_checkpoint(tmp_path)).assert_consumed()
    assert torch.all(target == 3.0)
