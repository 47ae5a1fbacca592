"""Incremental saves (#23), as a user meets them: train, save, delete, restore, compare bit for bit.

What did not change since the previous checkpoint (a frozen backbone, a LoRA fine-tune's base
model) is hard-linked on a local disk or copied by the server on an object store, not written
again; every checkpoint stays standalone. Bytes written are measured with ``/proc/self/io``
(``write_bytes``: what this process sent to the disk) or counted at the storage seam through the
doubles of ``tests/doubles.py``; no test asserts a time.
"""

from __future__ import annotations

import contextlib
import hashlib
import json
import os
import shutil
import stat
import threading
import time
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import pytest
import torch

import torchckpt
from torchckpt import CheckpointManager
from torchckpt._dist import payloads as dist_payloads
from torchckpt._format import spec
from torchckpt._load import opened as load_opened
from torchckpt._save import reuse as save_reuse
from torchckpt._storage import trusted as storage_trusted
from torchckpt._storage.local import LocalStorage
from torchckpt.cli import main

from .conftest import read_index, write_index
from .damage import flip_byte, rot

PROC_IO = "/proc/self/io"


# -- a model with a frozen backbone, trained by Adam -----------------------------------------------


class Frozen(torch.nn.Module):
    """``layers`` frozen ``Linear(width, width)`` (the backbone) and a small trainable head."""

    def __init__(self, layers: int, width: int) -> None:
        super().__init__()
        self.backbone = torch.nn.Sequential(*[torch.nn.Linear(width, width) for _ in range(layers)])
        self.backbone.requires_grad_(False)
        self.head = torch.nn.Linear(width, 8)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.head(torch.relu(self.backbone(x)))


@dataclass
class Trainer:
    """A :class:`Frozen` model and an Adam optimizer over its trainable parameters."""

    model: torch.nn.Module
    opt: torch.optim.Optimizer
    steps: int = 0

    @classmethod
    def new(cls, layers: int, width: int, seed: int = 0, steps: int = 1) -> Trainer:
        torch.manual_seed(seed)
        model = Frozen(layers, width)
        trainer = cls(model, torch.optim.Adam([p for p in model.parameters() if p.requires_grad], lr=0.01))
        for _ in range(steps):
            trainer.step()
        return trainer

    def like(self) -> Trainer:
        """A model of the same shape with other values and an optimizer without state: what a
        restore must fill in full."""
        layers, width = len(self.model.backbone), self.model.head.in_features
        return Trainer.new(layers, width, seed=self.steps + 100, steps=0)

    def step(self) -> None:
        g = torch.Generator().manual_seed(1000 + self.steps)
        x = torch.randn(4, self.model.head.in_features, generator=g)
        self.opt.zero_grad()
        self.model(x).square().mean().backward()
        self.opt.step()
        self.steps += 1

    def checkpoint(self) -> torchckpt.Checkpoint:
        return torchckpt.Checkpoint(model=self.model, opt=self.opt)

    def state(self) -> dict[str, Any]:
        """A deep copy of what a checkpoint of this trainer must restore."""
        return clone({"model": self.model.state_dict(), "opt": self.opt.state_dict()})

    def restored(self, path: str, storage_options: dict[str, Any] | None = None) -> dict[str, Any]:
        """The state of a fresh trainer after restoring ``path`` (every value consumed)."""
        fresh = self.like()
        fresh.checkpoint().restore(path, storage_options=storage_options).assert_consumed()
        return fresh.state()


def clone(value: Any) -> Any:
    if isinstance(value, torch.Tensor):
        return value.detach().clone()
    if isinstance(value, dict):
        return {k: clone(v) for k, v in value.items()}
    if isinstance(value, (list, tuple)):
        return type(value)(clone(v) for v in value)
    return value


def assert_bit_exact(actual: Any, expected: Any, where: str = "") -> None:
    """The same tree, every tensor of the same dtype, shape and bytes (``torch.equal`` would let
    -0.0 pass for 0.0)."""
    if isinstance(expected, torch.Tensor):
        assert isinstance(actual, torch.Tensor), where
        assert (actual.dtype, actual.shape) == (expected.dtype, expected.shape), where
        assert torch.equal(actual.reshape(-1).view(torch.uint8), expected.reshape(-1).view(torch.uint8)), where
    elif isinstance(expected, dict):
        assert isinstance(actual, dict) and actual.keys() == expected.keys(), where
        for key in expected:
            assert_bit_exact(actual[key], expected[key], f"{where}/{key}")
    elif isinstance(expected, (list, tuple)):
        assert type(actual) is type(expected) and len(actual) == len(expected), where
        for i, (a, e) in enumerate(zip(actual, expected)):
            assert_bit_exact(a, e, f"{where}/{i}")
    else:
        assert actual == expected, where


@pytest.fixture
def backbone64() -> Trainer:
    """A frozen 64 MiB backbone (16 x Linear(1024, 1024)) and a small head, after one Adam step."""
    return Trainer.new(16, 1024)


@pytest.fixture
def backbone1() -> Trainer:
    """A frozen 1 MiB backbone (4 x Linear(256, 256)) and a small head, after one Adam step."""
    return Trainer.new(4, 256)


FROZEN = "model/backbone.0.weight"  # a tensor of the frozen backbone, to find its shard
HEAD = "model/head.weight"


# -- what a checkpoint directory holds -------------------------------------------------------------


def shard_of(path: str, tensor: str) -> str:
    return read_index(path)["weight_map"][tensor]


def reused(path: str) -> dict[str, Any] | None:
    """The index's record of the files an incremental save reused (None: it reused none)."""
    return read_index(path)[spec.TORCHCKPT_KEY].get(spec.REUSED_KEY)


def links(path: str, file: str) -> int:
    info = os.lstat(os.path.join(path, file))
    assert stat.S_ISREG(info.st_mode), f"{file} is not a regular file"
    return info.st_nlink


def assert_no_leftovers(run: str, *checkpoints: str) -> None:
    """Each checkpoint holds its index and the shards it names, nothing else; nothing in the run's
    directory is being written or removed."""
    for path in checkpoints:
        files = set(read_index(path)["weight_map"].values())
        assert set(os.listdir(path)) == {spec.INDEX_FILE, *files}, path
    assert not [n for n in os.listdir(run) if spec.TMP_MARKER in n or spec.OLD_MARKER in n]


def assert_written_afresh(run: str, path: str, trainer: Trainer, expected: Any, capsys: pytest.CaptureFixture[str]) -> None:
    """The checkpoint ``path`` wrote its frozen shard anew (a file of its own, nothing recorded as
    reused), left nothing behind, restores ``expected`` bit for bit and passes ``torchckpt verify``."""
    assert links(path, shard_of(path, FROZEN)) == 1 and reused(path) is None
    assert_no_leftovers(run, path)
    assert_bit_exact(trainer.restored(path), expected)
    assert verified(path, capsys)


def verified(path: str, capsys: pytest.CaptureFixture[str], *options: str) -> bool:
    """Whether ``torchckpt verify`` passes on ``path``."""
    capsys.readouterr()
    code = main(["verify", path, *options])
    out = capsys.readouterr().out
    return code == 0 and out.startswith(f"OK: {path}")


def tree_state(directory: str) -> dict[str, tuple[int, int, int, int, str]]:
    """What is under ``directory``, links not followed: each entry's mode, links, size, mtime and
    content hash (for regular files)."""
    found = {}
    for root, dirs, files in os.walk(directory):
        for name in dirs + files:
            full = os.path.join(root, name)
            info = os.lstat(full)
            digest = ""
            if stat.S_ISREG(info.st_mode):
                with open(full, "rb") as f:
                    digest = hashlib.sha256(f.read()).hexdigest()
            found[os.path.relpath(full, directory)] = (info.st_mode, info.st_nlink, info.st_size, info.st_mtime_ns,
                                                       digest)
    return found


# -- bytes written ---------------------------------------------------------------------------------


def write_bytes() -> int:
    """The bytes this process has sent to storage (``write_bytes`` of /proc/self/io): a hard link
    writes none, a file written through the page cache counts when its pages are dirtied."""
    with open(PROC_IO) as f:
        for line in f:
            if line.startswith("write_bytes:"):
                return int(line.split()[1])
    raise AssertionError(f"no write_bytes in {PROC_IO}")


@pytest.fixture
def written() -> Callable[[Callable[[], Any]], tuple[Any, int]]:
    """``written(action)``: the action's result and the bytes it wrote (skipped without /proc/self/io)."""
    if not os.path.exists(PROC_IO):
        pytest.skip(f"{PROC_IO} is needed to count the bytes written")

    def measure(action: Callable[[], Any]) -> tuple[Any, int]:
        before = write_bytes()
        result = action()
        return result, write_bytes() - before

    return measure


def skip_unless_counted(first: int, expected: int) -> None:
    """A filesystem without a block device (tmpfs) counts no ``write_bytes``: nothing to compare."""
    if first < expected // 2:
        pytest.skip(f"the filesystem of the test directory counted {first} bytes written for {expected}")


def created_bytes(storage: Any, since: int = 0) -> int:
    """The bytes of the shard files a storage double created after its call ``since``."""
    return sum(args[1] for point, args in storage.calls[since:] if point == "stage.create")


def created_names(storage: Any, since: int = 0) -> set[str]:
    return {args[0] for point, args in storage.calls[since:] if point == "stage.create"}


# -- the acceptance round trip ---------------------------------------------------------------------


def test_a_frozen_backbone_is_written_once_and_every_checkpoint_stays_standalone(backbone64, written, tmp_path,
                                                                                   capsys):
    run = str(tmp_path / "run")
    mgr = CheckpointManager(backbone64.checkpoint(), run, max_to_keep=2)
    first, bytes1 = written(mgr.save)
    skip_unless_counted(bytes1, 64 * 2**20)
    backbone64.step()
    second, bytes2 = written(mgr.save)
    backbone64.step()
    third, bytes3 = written(mgr.save)
    expected = backbone64.state()
    assert bytes2 <= bytes1 // 10 and bytes3 <= bytes1 // 10, (bytes1, bytes2, bytes3)

    # The planner keeps the backbone in a shard of its own, under the same name save after save.
    frozen = shard_of(third, FROZEN)
    assert shard_of(second, FROZEN) == frozen and shard_of(third, HEAD) != frozen
    weight_map = read_index(third)["weight_map"]
    assert {n for n, f in weight_map.items() if f == frozen} == {
        f"model/backbone.{i}.{kind}" for i in range(16) for kind in ("weight", "bias")}
    assert reused(second) == {"base": "ckpt-1", "files": {frozen: frozen}}
    assert reused(third) == {"base": "ckpt-2", "files": {frozen: frozen}}

    # Retention removed ckpt-1: the backbone's file lives on in ckpt-2 and ckpt-3 (two links).
    assert not os.path.exists(first) and mgr.checkpoints == [second, third]
    assert links(third, frozen) == 2 and links(third, shard_of(third, HEAD)) == 1
    shutil.rmtree(second)  # by hand
    assert links(third, frozen) == 1
    assert_no_leftovers(run, third)

    assert_bit_exact(backbone64.restored(third), expected)
    assert verified(third, capsys)
    mgr.close()


def test_the_tools_read_an_incremental_checkpoint_whose_base_is_gone_as_any_other(backbone1, tmp_path, capsys):
    mgr = CheckpointManager(backbone1.checkpoint(), tmp_path / "run")
    first = mgr.save()
    backbone1.step()
    second = mgr.save()
    full = mgr.checkpoint.write(tmp_path / "full")  # the same state, every byte written
    assert reused(second) is not None and reused(full) is None
    shutil.rmtree(first)

    assert main(["diff", second, full, "--values", "--exit-code"]) == 0
    assert main(["export", second, "--object", "model", str(tmp_path / "hf")]) == 0
    from safetensors.torch import load_file

    exported = load_file(tmp_path / "hf" / "model.safetensors")
    assert_bit_exact(exported, clone(backbone1.model.state_dict()))
    reader = torchckpt.load_checkpoint(second)
    assert_bit_exact(reader.get_tensor(FROZEN), backbone1.model.backbone[0].weight.detach())
    assert verified(second, capsys)
    mgr.close()


# -- incremental=False -----------------------------------------------------------------------------


def test_without_incremental_every_save_writes_every_byte(written, tmp_path):
    trainer = Trainer.new(4, 512)  # a 4 MiB backbone
    mgr = CheckpointManager(trainer.checkpoint(), tmp_path / "run", incremental=False)
    first, bytes1 = written(mgr.save)
    skip_unless_counted(bytes1, 4 * 2**20)
    trainer.step()
    second, bytes2 = written(mgr.save)
    assert abs(bytes2 - bytes1) <= max(16 * 2**10, bytes1 // 100), (bytes1, bytes2)  # the process's other writes
    assert reused(second) is None
    for path in (first, second):
        assert all(links(path, f) == 1 for f in set(read_index(path)["weight_map"].values()))
    mgr.close()


# -- a damaged shard of the base is written afresh -------------------------------------------------


def truncate(file: str) -> None:
    os.truncate(file, os.path.getsize(file) - 4096)


def flip(file: str) -> None:
    flip_byte(file, os.path.getsize(file) // 2)  # in the data: a weight of the backbone


@pytest.mark.parametrize("damage", [flip, truncate], ids=["flipped-byte", "truncated"])
def test_a_damaged_shard_of_the_base_is_written_afresh(backbone1, damage, tmp_path, capsys):
    run = str(tmp_path / "run")
    mgr = CheckpointManager(backbone1.checkpoint(), run)
    first = mgr.save()
    damage(os.path.join(first, shard_of(first, FROZEN)))
    assert not verified(first, capsys)  # the damage is real
    backbone1.step()
    second = mgr.save()
    expected = backbone1.state()

    assert_written_afresh(run, second, backbone1, expected, capsys)
    mgr.close()


# -- a base whose files are not what they should be ------------------------------------------------


@contextlib.contextmanager
def unblocked(fifo: str) -> Iterator[list[bool]]:
    """A save that opened the FIFO ``fifo`` to read would wait for a writer forever: after 30 s its
    write end is opened and closed, so that the test fails instead of hanging (nothing is done to
    anything but a FIFO). Yields [whether it had to]."""
    fired = [False]

    def unblock() -> None:
        with contextlib.suppress(OSError):  # ENXIO: nobody has it open to read
            if stat.S_ISFIFO(os.lstat(fifo).st_mode):
                os.close(os.open(fifo, os.O_WRONLY | os.O_NONBLOCK))
                fired[0] = True

    timer = threading.Timer(30.0, unblock)
    timer.start()
    try:
        yield fired
    finally:
        timer.cancel()


def shard_symlink(base: str, shard: str, outside: str) -> None:
    """The base's shard replaced by a link to an intact copy of it, outside the run's directory."""
    copy = os.path.join(outside, shard)
    shutil.copyfile(os.path.join(base, shard), copy)
    os.replace(os.path.join(base, shard), copy + ".moved")
    os.symlink(copy, os.path.join(base, shard))


def checkpoint_symlink(base: str, shard: str, outside: str) -> None:
    """The base checkpoint's directory replaced by a link to an intact copy of it, outside."""
    copy = os.path.join(outside, os.path.basename(base))
    shutil.copytree(base, copy)
    shutil.rmtree(base)
    os.symlink(copy, base)


def fifo(base: str, shard: str, outside: str) -> None:
    os.unlink(os.path.join(base, shard))
    os.mkfifo(os.path.join(base, shard))


def directory(base: str, shard: str, outside: str) -> None:
    os.unlink(os.path.join(base, shard))
    os.mkdir(os.path.join(base, shard))
    with open(os.path.join(base, shard, "x"), "wb") as f:
        f.write(b"x")


def index_names_outside(base: str, shard: str, outside: str) -> None:
    """A forged index (sealed anew) that names an intact copy of the shard outside the run's directory."""
    copy = os.path.join(outside, shard)
    shutil.copyfile(os.path.join(base, shard), copy)
    forged = os.path.relpath(copy, base)
    index = read_index(base)
    for record in index[spec.TORCHCKPT_KEY]["shards"]:
        if record["file"] == shard:
            record["file"] = forged
    index["weight_map"] = {name: forged if file == shard else file for name, file in index["weight_map"].items()}
    write_index(base, index)


@pytest.mark.parametrize("replace", [shard_symlink, checkpoint_symlink, fifo, directory, index_names_outside],
                         ids=["shard-symlink", "checkpoint-symlink", "fifo", "directory", "index-names-outside"])
def test_a_base_file_that_is_not_a_regular_file_of_the_run_is_never_used(backbone1, replace, tmp_path, capsys):
    if replace is fifo and not hasattr(os, "mkfifo"):
        pytest.skip("no FIFOs here")
    run, outside = str(tmp_path / "run"), str(tmp_path / "outside")
    os.mkdir(outside)
    mgr = CheckpointManager(backbone1.checkpoint(), run, max_to_keep=None)
    first = mgr.save()
    shard = shard_of(first, FROZEN)
    replace(first, shard, outside)
    before = tree_state(outside)
    base_entry = os.lstat(os.path.join(first, shard)).st_mode
    backbone1.step()
    with unblocked(os.path.join(first, shard)) as fired:
        second = mgr.save()
    expected = backbone1.state()

    assert not fired[0], "the save opened the FIFO"
    assert links(second, shard_of(second, FROZEN)) == 1 and reused(second) is None
    assert tree_state(outside) == before  # no link made to a file there, nothing written there
    assert os.lstat(os.path.join(first, shard)).st_mode == base_entry  # the base is left as it was
    assert_no_leftovers(run, second)
    assert_bit_exact(backbone1.restored(second), expected)
    assert verified(second, capsys)
    mgr.close()


# -- what the planner keeps apart ------------------------------------------------------------------


def test_a_frozen_tensor_changed_by_surprise_rewrites_only_its_shard(backbone1, disk, tmp_path, capsys):
    layer_bytes = 256 * 256 * 4 + 256 * 4  # one Linear(256, 256): weight and bias
    mgr = CheckpointManager(backbone1.checkpoint(), tmp_path / "run", max_shard_size=layer_bytes)
    first = mgr.save()
    frozen = [shard_of(first, f"model/backbone.{i}.weight") for i in range(4)]
    assert len(set(frozen)) == 4 and all(shard_of(first, f"model/backbone.{i}.bias") == frozen[i] for i in range(4))
    with torch.no_grad():
        backbone1.model.backbone[2].weight[3, 5] += 1.0  # frozen, and changed all the same
    backbone1.step()
    since = len(disk.calls)
    second = mgr.save()
    expected = backbone1.state()

    assert [shard_of(second, f"model/backbone.{i}.weight") for i in range(4)] == frozen
    trainable = {f for n, f in read_index(second)["weight_map"].items() if not n.startswith("model/backbone.")}
    assert created_names(disk, since) == {frozen[2], *trainable}
    assert reused(second) == {"base": "ckpt-1", "files": {f: f for i, f in enumerate(frozen) if i != 2}}
    assert [links(second, f) for f in frozen] == [2, 2, 1, 2]
    assert_bit_exact(backbone1.restored(second), expected)
    assert verified(second, capsys)
    mgr.close()


@pytest.mark.parametrize("backbone_mode", ["eval", "train"])
def test_buffers_of_a_frozen_submodule_get_a_shard_of_their_own(tmp_path, backbone_mode):
    """A frozen BatchNorm's running statistics stay put in eval mode and move in training mode:
    either way they are kept apart from the frozen weights (which are reused), and from the trained
    head (whose buffers change with every step)."""
    torch.manual_seed(0)
    model = torch.nn.ModuleDict({
        "backbone": torch.nn.Sequential(torch.nn.Linear(64, 64), torch.nn.BatchNorm1d(64)).requires_grad_(False),
        "head": torch.nn.Sequential(torch.nn.Linear(64, 8), torch.nn.BatchNorm1d(8))})
    model["backbone"].train(backbone_mode == "train")
    opt = torch.optim.Adam(model["head"].parameters())

    def step(seed: int) -> None:
        x = torch.randn(4, 64, generator=torch.Generator().manual_seed(seed))
        opt.zero_grad()
        model["head"](model["backbone"](x)).square().mean().backward()
        opt.step()

    step(0)
    ckpt = torchckpt.Checkpoint(model=model, opt=opt)
    a = ckpt.write(tmp_path / "a")
    step(1)
    b = ckpt.write(tmp_path / "b", base=a)
    weight_map = read_index(b)["weight_map"]
    frozen, buffers = weight_map["model/backbone.0.weight"], weight_map["model/backbone.1.running_mean"]
    assert {n for n, f in weight_map.items() if f == frozen} == {
        "model/backbone.0.weight", "model/backbone.0.bias", "model/backbone.1.weight", "model/backbone.1.bias"}
    assert {n for n, f in weight_map.items() if f == buffers} == {
        "model/backbone.1.running_mean", "model/backbone.1.running_var", "model/backbone.1.num_batches_tracked"}
    expected = {frozen: frozen} if backbone_mode == "train" else {frozen: frozen, buffers: buffers}
    assert reused(b) == {"base": "a", "files": expected}


# -- Checkpoint.write(path, base=...) --------------------------------------------------------------


def test_write_with_an_explicit_base_reuses_its_shards(backbone64, written, tmp_path, capsys):
    ckpt = backbone64.checkpoint()
    a, bytes_a = written(lambda: ckpt.write(tmp_path / "a"))
    skip_unless_counted(bytes_a, 64 * 2**20)
    backbone64.step()
    b, bytes_b = written(lambda: ckpt.write(tmp_path / "b", base=tmp_path / "a"))
    expected = backbone64.state()
    assert bytes_b <= bytes_a // 10, (bytes_a, bytes_b)
    frozen = shard_of(b, FROZEN)
    assert reused(b) == {"base": "a", "files": {frozen: frozen}}  # a sibling, by name

    elsewhere = ckpt.write(tmp_path / "elsewhere" / "c", base=a)
    assert reused(elsewhere) == {"base": a, "files": {frozen: frozen}}  # not a sibling: its path
    shutil.rmtree(a)
    assert links(b, frozen) == 2  # b and c
    assert_bit_exact(backbone64.restored(b), expected)
    assert verified(b, capsys)


def missing(path) -> None:
    pass


def empty_directory(path) -> None:
    path.mkdir()


def uncommitted(path) -> None:
    """A checkpoint's files without its index: never committed."""
    path.mkdir()
    (path / "model-00001-of-00001.safetensors").write_bytes(b"\0" * 16)


@pytest.mark.parametrize("make", [missing, empty_directory, uncommitted],
                         ids=["missing", "empty-directory", "no-index"])
def test_a_base_that_is_not_a_checkpoint_is_refused_and_nothing_is_written(make, tmp_path):
    base = tmp_path / "base"
    make(base)
    before = sorted(os.listdir(tmp_path))
    with pytest.raises(torchckpt.CheckpointNotFoundError, match=r"No committed checkpoint at base=.*leave base out") \
            as info:
        torchckpt.Checkpoint(w=torch.ones(3)).write(tmp_path / "new", base=base)
    assert info.value.path == str(base)
    assert sorted(os.listdir(tmp_path)) == before


def test_a_base_on_another_storage_is_refused_and_nothing_is_written(tmp_path):
    pytest.importorskip("fsspec")
    with pytest.raises(ValueError, match=r"base='memory://elsewhere/ckpt-1' must be on the same storage"):
        torchckpt.Checkpoint(w=torch.ones(3)).write(tmp_path / "new", base="memory://elsewhere/ckpt-1")
    assert os.listdir(tmp_path) == []


# -- async saves -----------------------------------------------------------------------------------


def test_async_saves_reuse_the_frozen_backbone(backbone64, written, tmp_path, capsys):
    run = str(tmp_path / "run")
    mgr = CheckpointManager(backbone64.checkpoint(), run, max_to_keep=2, async_save=True)

    def save_then_train() -> tuple[str, dict[str, Any]]:
        path = mgr.save()
        state = backbone64.state()
        backbone64.step()  # training goes on while the checkpoint is written
        mgr.wait_until_finished()
        return path, state

    (first, _), bytes1 = written(save_then_train)
    skip_unless_counted(bytes1, 64 * 2**20)
    (second, _), bytes2 = written(save_then_train)
    (third, expected), bytes3 = written(save_then_train)
    assert bytes2 <= bytes1 // 10 and bytes3 <= bytes1 // 10, (bytes1, bytes2, bytes3)
    frozen = shard_of(third, FROZEN)
    assert reused(third) == {"base": "ckpt-2", "files": {frozen: frozen}}
    shutil.rmtree(second)
    assert not os.path.exists(first) and links(third, frozen) == 1
    assert_bit_exact(backbone64.restored(third), expected)
    assert verified(third, capsys)
    mgr.close()


# -- where a link cannot be made, or what it placed fails its check --------------------------------


def test_a_storage_that_cannot_link_writes_every_byte(backbone1, disk, tmp_path, capsys):
    disk.instead("stage.reuse", lambda name, source: None)  # no hard links on this filesystem
    run = str(tmp_path / "run")
    mgr = CheckpointManager(backbone1.checkpoint(), run)
    first = mgr.save()
    bytes1 = created_bytes(disk)
    backbone1.step()
    since = len(disk.calls)
    second = mgr.save()
    expected = backbone1.state()

    frozen = shard_of(second, FROZEN)
    assert disk.called("stage.reuse") == [(frozen, os.path.join(first, frozen))]  # tried, refused
    assert created_bytes(disk, since) == bytes1
    assert_written_afresh(run, second, backbone1, expected, capsys)
    mgr.close()


def test_a_placed_file_that_fails_its_read_back_is_dropped_and_written_afresh(backbone1, disk, tmp_path, capsys):
    run = str(tmp_path / "run")
    mgr = CheckpointManager(backbone1.checkpoint(), run)
    first = mgr.save()
    frozen = shard_of(first, FROZEN)
    # Damage the file once it is linked: the link and the base's file are one inode, both see it.
    disk.after("stage.reuse", lambda name, source: flip(source), times=1)
    backbone1.step()
    since = len(disk.calls)
    second = mgr.save()
    expected = backbone1.state()

    assert disk.called("stage.drop") == [(frozen,)] and frozen in created_names(disk, since)
    assert not verified(first, capsys)  # the damage was real, and stayed in the base
    assert_written_afresh(run, second, backbone1, expected, capsys)
    mgr.close()


# -- files this process wrote are not read back again -----------------------------------------------


def shard_reads(storage: Any, since: int) -> list[str]:
    """The shard files a storage double opened to read after its call ``since`` (a read-back)."""
    return [args[0] for point, args in storage.calls[since:] if point == "open" and args[1] == "Shard"]


def test_a_file_this_process_wrote_or_checked_is_trusted_by_its_stamp_until_it_changes(backbone1, disk, tmp_path,
                                                                                        capsys):
    run = str(tmp_path / "run")
    mgr = CheckpointManager(backbone1.checkpoint(), run, max_to_keep=5)
    first = mgr.save()
    frozen = shard_of(first, FROZEN)
    time.sleep(0.05)  # the filesystem's clock ticks between a file's last write and the next index
    for _ in range(2):
        backbone1.step()
        since = len(disk.calls)
        latest = mgr.save()
        assert reused(latest)["files"] == {frozen: frozen}
    assert shard_reads(disk, since) == []  # the third save read nothing back: it knew the file

    flip(os.path.join(latest, frozen))  # after the save: the time moves, the stamp no longer matches
    backbone1.step()
    since = len(disk.calls)
    damaged_base, fourth = latest, mgr.save()
    expected = backbone1.state()
    assert [os.path.basename(p) for p in shard_reads(disk, since)] == [frozen]  # read back, found damaged
    assert disk.called("stage.drop")[-1] == (frozen,)
    assert not verified(damaged_base, capsys)
    assert_written_afresh(run, fourth, backbone1, expected, capsys)
    mgr.close()


def found_by_restore(trainer: Trainer, path: str, capsys: pytest.CaptureFixture[str]) -> None:
    with pytest.raises(torchckpt.CorruptCheckpointError, match="fails its checksum") as caught:
        trainer.like().checkpoint().restore(path)  # a fresh trainer: the damaged bytes land in it, not in the run
    assert caught.value.path == os.path.join(path, shard_of(path, FROZEN))


def found_by_verify(trainer: Trainer, path: str, capsys: pytest.CaptureFixture[str]) -> None:
    assert not verified(path, capsys)


def found_by_reader(trainer: Trainer, path: str, capsys: pytest.CaptureFixture[str]) -> None:
    reader = torchckpt.load_checkpoint(path)
    with pytest.raises(torchckpt.CorruptCheckpointError, match="fails its checksum") as caught:
        for name in reader.get_variable_to_shape_map():  # the one rotten
            reader.get_tensor(name)
    assert caught.value.path == os.path.join(path, shard_of(path, FROZEN))


def trusted_frozen_shard(trainer: Trainer, disk: Any, run: str) -> tuple[CheckpointManager, str, str]:
    """A manager whose second save linked the frozen shard without reading it back, trusting it by
    its stamp: (the manager, that checkpoint, the shard's file name)."""
    mgr = CheckpointManager(trainer.checkpoint(), run, max_to_keep=5)
    frozen = shard_of(mgr.save(), FROZEN)
    time.sleep(0.05)  # the filesystem's clock ticks between a file's last write and the next index
    trainer.step()
    since = len(disk.calls)
    latest = mgr.save()
    assert reused(latest)["files"] == {frozen: frozen} and shard_reads(disk, since) == []
    return mgr, latest, frozen


def assert_next_save_reads_it_back_and_writes_it_afresh(mgr: CheckpointManager, trainer: Trainer, disk: Any,
                                                         frozen: str, capsys: pytest.CaptureFixture[str]) -> None:
    trainer.step()
    since = len(disk.calls)
    third = mgr.save()
    expected = trainer.state()
    assert [os.path.basename(p) for p in shard_reads(disk, since)] == [frozen]  # read back, found changed
    assert disk.called("stage.drop")[-1] == (frozen,)
    assert_written_afresh(mgr.directory, third, trainer, expected, capsys)


@pytest.mark.parametrize("find", [found_by_restore, found_by_verify, found_by_reader],
                         ids=["restore", "verify", "reader"])
def test_a_file_found_damaged_is_read_back_by_the_next_save_and_written_afresh(backbone1, disk, tmp_path, capsys,
                                                                                  find):
    mgr, latest, frozen = trusted_frozen_shard(backbone1, disk, str(tmp_path / "run"))
    rot(os.path.join(latest, frozen), disk=disk)  # under the filesystem: no stamp moves, only the drop tells
    find(backbone1, latest, capsys)
    assert_next_save_reads_it_back_and_writes_it_afresh(mgr, backbone1, disk, frozen, capsys)
    mgr.close()


def test_each_rank_distrusts_the_damage_it_found_and_the_damage_any_rank_reports(tmp_path):
    """On several ranks every rank raises one error, the first failing rank's, chained to its own,
    and naming every file any rank found damaged: all are distrusted, and only those."""
    storage = LocalStorage()
    files = {}
    for name in "abcd":
        (tmp_path / name).write_bytes(name.encode() * 10)
        files[name] = (str(tmp_path / name), storage.stamp(str(tmp_path / name)))
    storage_trusted.remember((stamp, "h", (1,), storage_trusted.now()) for _, stamp in files.values())
    failures = {1: {"type": "CorruptCheckpointError", "message": "rank 1's damage", "path": files["b"][0]},
                2: {"type": "CheckpointError", "message": "something else"},
                3: {"type": "CorruptCheckpointError", "message": "rank 3's damage", "path": files["c"][0]}}
    try:
        try:
            raise torchckpt.CorruptCheckpointError("this rank's damage", files["a"][0])
        except torchckpt.CorruptCheckpointError as mine:
            raise dist_payloads.collective_error(failures, "Restoring") from mine
    except torchckpt.CorruptCheckpointError as every:
        assert every.path == files["b"][0] and every.ranks == [1, 2, 3]
        load_opened.distrust_damaged(storage, every, {path for path, _ in files.values()})
    assert [storage_trusted.vouches(stamp, "h", (1,)) for _, stamp in files.values()] == [False, False, False, True]
    load_opened.distrust_damaged(storage, torchckpt.CorruptCheckpointError("elsewhere", files["d"][0]), set())
    assert storage_trusted.vouches(files["d"][1], "h", (1,))  # not among the paths given


def test_a_header_changed_after_its_save_is_read_back_even_where_a_restore_accepts_it(backbone1, disk, tmp_path,
                                                                                        capsys):
    mgr, latest, frozen = trusted_frozen_shard(backbone1, disk, str(tmp_path / "run"))
    shard = os.path.join(latest, frozen)
    data = Path(shard).read_bytes()
    assert data.count(b'"format":"pt"') == 1
    rot(shard, data.index(b'"format":"pt"') + len(b'"format":"'), disk=disk)  # in the header's metadata: "Pt"
    assert_bit_exact(backbone1.restored(latest), backbone1.state())  # the full parse accepts the header
    assert_next_save_reads_it_back_and_writes_it_afresh(mgr, backbone1, disk, frozen, capsys)
    mgr.close()


def test_damage_found_while_a_save_checks_a_file_keeps_that_save_from_trusting_it(tmp_path):
    """An async save adds what it checked once it commits, in the background: damage found in
    between wins. A check made after the damage was found (a read-back that passed) counts."""
    storage, checkpoint, stamp = stamped_shard(tmp_path)
    os.utime(checkpoint / spec.INDEX_FILE, ns=(stamp[3] + 1, stamp[3] + 1))

    checked = save_reuse.Checked()
    checked.add("model.safetensors", stamp, "h", (1,), storage_trusted.now())
    storage_trusted.forget(stamp)  # found damaged while that save was still committing
    assert checked.keep(storage, str(checkpoint)) == set()
    assert not storage_trusted.vouches(stamp, "h", (1,))

    checked.add("model.safetensors", stamp, "h", (1,), storage_trusted.now())  # read back since, intact
    assert checked.keep(storage, str(checkpoint)) == {"model.safetensors"}
    assert storage_trusted.vouches(stamp, "h", (1,))


def test_a_file_whose_damage_went_unseen_is_still_trusted_by_its_stamp(backbone1, disk, tmp_path, capsys):
    """The control for the tests above: the same damage, unseen, is linked again (what the drop prevents)."""
    mgr, latest, frozen = trusted_frozen_shard(backbone1, disk, str(tmp_path / "run"))
    rot(os.path.join(latest, frozen), disk=disk)
    backbone1.step()
    since = len(disk.calls)
    third = mgr.save()
    assert shard_reads(disk, since) == [] and reused(third)["files"] == {frozen: frozen}
    assert not verified(third, capsys)  # a restore would report it; the drop above spares the new checkpoint
    mgr.close()


def test_a_file_rewritten_with_its_time_put_back_is_read_back_before_it_is_reused(backbone1, disk, tmp_path, capsys):
    """A tool that rewrites a file and puts its modification time back (``rsync --inplace -t``,
    ``touch -r``; ``cp -p`` of a damaged backup onto a freed inode number): size, inode and time
    are as this process saw them, but the change time moved, so the file is read back, found
    damaged and written afresh, instead of being linked into every later checkpoint."""
    mgr, latest, frozen = trusted_frozen_shard(backbone1, disk, str(tmp_path / "run"))
    rot(os.path.join(latest, frozen))  # no double: the change time moves, as it does for such a tool
    assert_next_save_reads_it_back_and_writes_it_afresh(mgr, backbone1, disk, frozen, capsys)
    mgr.close()


@pytest.mark.parametrize("async_save", [False, True], ids=["sync", "async"])
def test_retention_and_the_saves_own_links_keep_a_frozen_file_trusted(backbone1, disk, tmp_path, capsys, async_save):
    """Each save links the frozen shard again and retention deletes the oldest link: both move the
    file's change time, and neither makes the next save read the file back."""
    mgr = CheckpointManager(backbone1.checkpoint(), str(tmp_path / "run"), max_to_keep=1, async_save=async_save)
    first = mgr.save()
    mgr.wait_until_finished()
    frozen = shard_of(first, FROZEN)
    for _ in range(3):
        time.sleep(0.05)  # the filesystem's clock ticks between a file's last write and the next index
        backbone1.step()
        since = len(disk.calls)
        latest = mgr.save()
        mgr.wait_until_finished()
        assert reused(latest)["files"] == {frozen: frozen} and shard_reads(disk, since) == []
        assert len(mgr.checkpoints) == 1 and os.stat(os.path.join(latest, frozen)).st_nlink == 1
    assert verified(latest, capsys)
    mgr.close()


def test_an_identical_copy_of_a_known_file_is_read_back_before_it_is_reused(backbone1, disk, tmp_path, capsys):
    run = str(tmp_path / "run")
    mgr = CheckpointManager(backbone1.checkpoint(), run)
    first = mgr.save()
    frozen = shard_of(first, FROZEN)
    time.sleep(0.05)
    backbone1.step()
    second = mgr.save()
    # The same bytes in a new inode, keeping the time: another file than the one this process knows.
    shard = os.path.join(second, frozen)
    shutil.copy2(shard, shard + ".copy")
    os.replace(shard + ".copy", shard)
    backbone1.step()
    since = len(disk.calls)
    third = mgr.save()
    assert [os.path.basename(p) for p in shard_reads(disk, since)] == [frozen]
    assert reused(third)["files"] == {frozen: frozen}  # it read back intact, so it was reused
    assert verified(third, capsys)
    mgr.close()


def stamped_shard(tmp_path: Path) -> tuple[LocalStorage, Path, Any]:
    """A checkpoint folder holding a 100-byte ``model.safetensors`` and an index: (the storage, the
    folder, the shard's stamp)."""
    storage = LocalStorage()
    checkpoint = tmp_path / "ckpt"
    checkpoint.mkdir()
    (checkpoint / "model.safetensors").write_bytes(b"x" * 100)
    (checkpoint / spec.INDEX_FILE).write_bytes(b"{}")
    stamp = storage.stamp(str(checkpoint / "model.safetensors"))
    assert stamp is not None and stamp[2] == 100
    return storage, checkpoint, stamp


def test_a_stamp_as_late_as_the_index_is_not_trusted(tmp_path):
    storage, checkpoint, stamp = stamped_shard(tmp_path)
    index = checkpoint / spec.INDEX_FILE

    def kept(index_mtime_ns: int) -> bool:
        os.utime(index, ns=(index_mtime_ns, index_mtime_ns))
        checked = save_reuse.Checked()
        checked.add("model.safetensors", stamp, "h", (1, 2))
        kept = checked.keep(storage, str(checkpoint))
        assert kept == ({"model.safetensors"} if storage_trusted.vouches(stamp, "h", (1, 2)) else set())
        return bool(kept)

    # The same tick: a change made right after the stamp could have left the time as it was.
    assert not kept(stamp[3])
    assert kept(stamp[3] + 1)
    assert not storage_trusted.vouches(stamp, "h", (1, 3)) and not storage_trusted.vouches(stamp, "other", (1, 2))
    assert not storage_trusted.vouches(None, "h", (1, 2))
    assert storage.stamp(str(checkpoint)) is None and storage.stamp(str(tmp_path / "missing")) is None


def test_a_save_of_more_files_than_a_process_remembers_names_only_those_it_kept(tmp_path):
    storage = LocalStorage()
    checkpoint = tmp_path / "ckpt"
    checkpoint.mkdir()
    checked = save_reuse.Checked()
    stamps = []
    for i in range(storage_trusted.KNOWN_FILES + 1):  # one file more than a process remembers: the oldest is forgotten
        (checkpoint / f"f{i}").write_bytes(b"x" * 8)
        os.utime(checkpoint / f"f{i}", ns=(1, 1))  # long before the index
        stamps.append(storage.stamp(str(checkpoint / f"f{i}")))
        checked.add(f"f{i}", stamps[-1], "h", (i,))
    (checkpoint / spec.INDEX_FILE).write_bytes(b"{}")
    kept = checked.keep(storage, str(checkpoint))
    assert kept == {f"f{i}" for i in range(1, storage_trusted.KNOWN_FILES + 1)}
    assert not storage_trusted.vouches(stamps[0], "h", (0,))
    assert storage_trusted.vouches(stamps[1], "h", (1,))


# -- object stores: the server copies what did not change ------------------------------------------


def uploaded(storage: Any, since: int) -> int:
    """The bytes a remote double sent into shard objects after its call ``since``."""
    return sum(v.nbytes for point, args in storage.calls[since:] if point == "output.write" for v in args[0])


def remote_index(remote: Any, path: str) -> dict[str, Any]:
    return json.loads(remote.fs.cat_file(f"{path}/{spec.INDEX_FILE}"))


def test_on_an_object_store_unchanged_shards_are_copied_by_the_server(remote, capsys):
    trainer = Trainer.new(8, 512)  # an 8 MiB backbone
    mgr = CheckpointManager(trainer.checkpoint(), remote.url, max_to_keep=2, storage_options=remote.options)
    store = remote.storage
    paths, sent, copies, frozen = [], [], [], []
    for _ in range(3):
        trainer.step()
        since = len(store.calls)
        paths.append(mgr.save())
        sent.append(uploaded(store, since))
        copies.append([args for point, args in store.calls[since:] if point == "copy"])
        frozen.append(remote_index(remote, paths[-1])["weight_map"][FROZEN])
    expected = trainer.state()
    first, second, third = paths
    assert sent[0] >= 8 * 2**20 and sent[1] <= sent[0] // 10 and sent[2] <= sent[0] // 10, sent
    assert copies[0] == []
    for i in (1, 2):  # each save had the store copy the previous checkpoint's backbone object
        [(source, target)] = copies[i]
        assert source == f"{paths[i - 1]}/{frozen[i - 1]}" and target == f"{paths[i]}/{frozen[i]}"
    record = remote_index(remote, third)[spec.TORCHCKPT_KEY][spec.REUSED_KEY]
    assert record == {"base": "ckpt-2", "files": {frozen[2]: frozen[1]}}

    assert remote.names("ckpt-1") == []  # retention
    remote.fs.rm(second, recursive=True)  # by hand
    remote.fs.invalidate_cache()
    assert_bit_exact(trainer.restored(third, remote.options), expected)
    options = ["--storage-options", json.dumps(remote.options)] if remote.options else []
    assert verified(third, capsys, *options)
    mgr.close()


# -- a LoRA fine-tune ------------------------------------------------------------------------------


@dataclass
class Lora:
    """A GPT-2 built from a small config (nothing downloaded) with LoRA (r=8) on ``c_attn``, and
    Adam over what trains (under 1% of its parameters)."""

    model: torch.nn.Module
    opt: torch.optim.Optimizer

    def step(self, seed: int) -> None:
        tokens = torch.randint(0, 1000, (2, 16), generator=torch.Generator().manual_seed(seed))
        self.opt.zero_grad()
        self.model(input_ids=tokens, labels=tokens).loss.backward()
        self.opt.step()

    def checkpoint(self) -> torchckpt.Checkpoint:
        return torchckpt.Checkpoint(model=self.model, opt=self.opt)

    def state(self) -> dict[str, Any]:
        return clone({"model": self.model.state_dict(), "opt": self.opt.state_dict()})


@pytest.fixture
def make_lora() -> Callable[[int], Lora]:
    transformers = pytest.importorskip("transformers")
    peft = pytest.importorskip("peft")

    def make(seed: int) -> Lora:
        torch.manual_seed(seed)
        config = transformers.GPT2Config(n_layer=2, n_embd=256, n_head=4, n_positions=64, vocab_size=1000,
                                         bos_token_id=0, eos_token_id=0)
        lora = peft.LoraConfig(r=8, target_modules=["c_attn"], fan_in_fan_out=True, lora_dropout=0.0)
        model = peft.get_peft_model(transformers.GPT2LMHeadModel(config), lora)
        return Lora(model, torch.optim.Adam([p for p in model.parameters() if p.requires_grad], lr=0.01))

    return make


def test_a_lora_fine_tune_writes_only_its_adapters(make_lora, written, tmp_path):
    run = make_lora(0)
    params = list(run.model.parameters())
    assert sum(p.numel() for p in params if p.requires_grad) <= 0.02 * sum(p.numel() for p in params)
    run.step(0)
    mgr = CheckpointManager(run.checkpoint(), tmp_path / "run")
    first, bytes1 = written(mgr.save)
    skip_unless_counted(bytes1, 4 * 2**20)
    run.step(1)
    second, bytes2 = written(mgr.save)
    expected = run.state()
    assert bytes2 <= bytes1 * 5 // 100, (bytes1, bytes2)

    record = reused(second)
    assert record is not None and record["base"] == "ckpt-1" and record["files"]
    weight_map = read_index(second)["weight_map"]
    assert all("lora_" not in n for n, f in weight_map.items() if f in record["files"])  # the adapters are new
    assert any("base_layer" in n for n, f in weight_map.items() if f in record["files"])  # the frozen c_attn
    shutil.rmtree(first)
    fresh = make_lora(1)
    fresh.checkpoint().restore(second).assert_consumed()
    assert_bit_exact(fresh.state(), expected)
    mgr.close()
