"""``restore_or_initialize`` restores the newest intact checkpoint, loudly, and can be strict.

Each kind of damage on the latest of three checkpoints gives a ``DamagedCheckpointWarning`` and
the previous checkpoint's exact values; ``fallback=False`` raises; all damaged raises without
calling ``init_fn``; ``strict=True`` raises on a mismatch. The 2-rank case (damage seen by one
rank only) is ``test_distributed_calls.py``.
"""

from __future__ import annotations

import contextlib
import json
import os
from pathlib import Path

import pytest
import torch

import torchckpt
from torchckpt import cli

from .conftest import read_index, write_index
from .jobs.dist_job import flip_tensor_byte


def make_run(directory: Path) -> None:
    """Three checkpoints; in checkpoint i every value is i."""
    weights, model = torch.zeros(4096), torch.nn.Linear(8, 8)
    ckpt = torchckpt.Checkpoint(weights=weights, model=model, step=0)
    manager = torchckpt.CheckpointManager(ckpt, directory, max_to_keep=5)
    for i in (1, 2, 3):
        weights.fill_(float(i))
        with torch.no_grad():
            for p in model.parameters():
                p.fill_(float(i))
        ckpt.step = i
        manager.save()
    manager.close()


def shard_of(checkpoint: Path) -> Path:
    index = json.loads((checkpoint / "index.json").read_text())
    return checkpoint / index["weight_map"]["weights"]


def flip_data_byte(checkpoint: Path) -> None:
    flip_tensor_byte(checkpoint, "weights")


def truncate_shard(checkpoint: Path) -> None:
    shard = shard_of(checkpoint)
    os.truncate(shard, shard.stat().st_size - 100)


def remove_shard(checkpoint: Path) -> None:
    shard_of(checkpoint).unlink()


def flip_index_byte(checkpoint: Path) -> None:
    index = checkpoint / "index.json"
    data = bytearray(index.read_bytes())
    data[len(data) // 2] ^= 0x01
    index.write_bytes(bytes(data))


def forge_metadata(checkpoint: Path) -> None:
    """Metadata no writer makes, sealed anew (a forger, another tool): what ``verify`` and ``ls``
    call damaged is not restored either."""
    index = read_index(checkpoint)
    index["torchckpt"]["metadata"]["note"] = {"@float": "bogus"}
    write_index(checkpoint, index)


DAMAGE = {"flipped data byte": flip_data_byte, "truncated shard": truncate_shard, "missing shard": remove_shard,
          "flipped index byte": flip_index_byte, "forged metadata": forge_metadata}


class Fresh:
    """New objects, as a restarted job builds them (values unlike any checkpoint's)."""

    def __init__(self, directory: Path, **options) -> None:
        self.weights, self.model = torch.full((4096,), -1.0), torch.nn.Linear(8, 8)
        self.ckpt = torchckpt.Checkpoint(weights=self.weights, model=self.model, step=0)
        self.initialized = False
        self.manager = torchckpt.CheckpointManager(self.ckpt, directory, init_fn=self.init, **options)

    def init(self) -> None:
        self.initialized = True

    def holds(self, value: float) -> bool:
        tensors = [self.weights, *self.model.parameters()]
        return self.ckpt.step == value and all(torch.equal(t, torch.full_like(t, value)) for t in tensors)


@pytest.mark.parametrize("damage", DAMAGE.values(), ids=DAMAGE.keys())
def test_a_damaged_latest_checkpoint_warns_and_restores_the_one_before(tmp_path, damage):
    make_run(tmp_path)
    damage(tmp_path / "ckpt-3")
    fresh = Fresh(tmp_path)
    with pytest.warns(torchckpt.DamagedCheckpointWarning, match=r"ckpt-3 is damaged, so it was not used: ") as caught:
        restored = fresh.manager.restore_or_initialize()
    assert restored == str(tmp_path / "ckpt-2")
    assert fresh.holds(2.0) and not fresh.initialized  # every value the failed attempt may have written is overwritten
    assert fresh.manager.last_restore.report.left_from_damaged == {}
    warning = caught[0].message
    assert warning.path == str(tmp_path / "ckpt-3") and warning.fallback == str(tmp_path / "ckpt-2")
    assert warning.reason and warning.reason in str(warning) and ".." not in str(warning)  # (a reason ending in one)
    assert fresh.manager.last_restore.path == restored
    assert fresh.manager.save().endswith("ckpt-4")  # never reuses the damaged one's number
    fresh.manager.close()
    state = torchckpt.get_checkpoint_state(tmp_path)
    assert list(state.damaged) == [str(tmp_path / "ckpt-3")]
    assert cli.main(["ls", str(tmp_path), "--json"]) == 0


def run_that_grew(directory: Path) -> tuple[torch.Tensor, torch.Tensor]:
    """ckpt-1 holds ``weights``; an ``ema`` tracked after it is in ckpt-2 too."""
    weights = torch.zeros(4096)
    ckpt = torchckpt.Checkpoint(weights=weights)
    with torchckpt.CheckpointManager(ckpt, directory) as manager:
        manager.save()
        ckpt.ema = torch.full((4096,), 5.0)
        weights.add_(1)
        manager.save()
    return torch.zeros(4096), torch.zeros(4096)


def test_a_value_the_damaged_checkpoint_wrote_and_the_older_one_lacks_is_reported(tmp_path):
    # probe38 F1: its restore reads ema in place, then finds its checksum wrong; ckpt-1 has no ema,
    # so ema held ckpt-2's damaged bytes while the report only called it missing
    weights, ema = run_that_grew(tmp_path)
    flip_tensor_byte(tmp_path / "ckpt-2", "ema")
    manager = torchckpt.CheckpointManager(torchckpt.Checkpoint(weights=weights, ema=ema), tmp_path)
    with pytest.warns(torchckpt.DamagedCheckpointWarning), \
            pytest.warns(torchckpt.PartialRestoreWarning, match=r"written from a damaged checkpoint before its damage "
                         r"was found, and not restored from this one \(1\): ema \(ckpt-2\); they may hold"):
        assert manager.restore_or_initialize() == str(tmp_path / "ckpt-1")
    report = manager.last_restore.report
    assert report.left_from_damaged == {"ema": "ckpt-2"} and report.missing_keys == ["ema"]
    assert torch.equal(weights, torch.zeros(4096)) and not torch.equal(ema, torch.zeros(4096))  # as reported
    with pytest.warns(torchckpt.DamagedCheckpointWarning), \
            pytest.raises(torchckpt.RestoreMismatchError, match=r"ema \(ckpt-2\)") as caught:
        manager.restore_or_initialize(strict=True)
    assert caught.value.report.left_from_damaged == {"ema": "ckpt-2"}
    with pytest.raises(torchckpt.RestoreMismatchError, match="written from a damaged checkpoint"):
        manager.last_restore.assert_existing_objects_matched()
    manager.close()


def test_damage_found_before_any_byte_is_read_leaves_nothing_to_report(tmp_path):
    weights, ema = run_that_grew(tmp_path)
    flip_index_byte(tmp_path / "ckpt-2")
    manager = torchckpt.CheckpointManager(torchckpt.Checkpoint(weights=weights, ema=ema), tmp_path)
    with pytest.warns(torchckpt.DamagedCheckpointWarning), pytest.warns(torchckpt.PartialRestoreWarning):
        assert manager.restore_or_initialize() == str(tmp_path / "ckpt-1")
    assert manager.last_restore.report.left_from_damaged == {} and torch.equal(ema, torch.zeros(4096))
    manager.close()


class _DDPLike(torch.nn.Module):  # DistributedDataParallel's keys: "module.*"
    def __init__(self, module: torch.nn.Module) -> None:
        super().__init__()
        self.module = module


def test_a_damaged_checkpoint_of_a_wrapped_model_leaves_nothing_the_older_one_restores(tmp_path):
    # probe40 F2: the two checkpoints name each parameter differently ("module." prefix): every key
    # was reported left although the older checkpoint restored every one
    with torchckpt.CheckpointManager(torchckpt.Checkpoint(model=torch.nn.Linear(64, 64)), tmp_path) as manager:
        manager.save()
    with torchckpt.CheckpointManager(torchckpt.Checkpoint(model=_DDPLike(torch.nn.Linear(64, 64))), tmp_path) as manager:
        manager.save()
    flip_tensor_byte(tmp_path / "ckpt-2", "model/module.weight")
    with torchckpt.CheckpointManager(torchckpt.Checkpoint(model=torch.nn.Linear(64, 64)), tmp_path) as manager, \
            pytest.warns(torchckpt.DamagedCheckpointWarning):
        assert manager.restore_or_initialize(strict=True) == str(tmp_path / "ckpt-1")
        assert manager.last_restore.report.left_from_damaged == {}


def test_an_objects_own_tensors_a_damaged_checkpoint_wrote_are_reported(tmp_path):
    # probe40 F3: an optimizer that stepped is read into in place too (a roll-back mid-run)
    model = torch.nn.Linear(4, 4)
    ckpt = torchckpt.Checkpoint(model=model)
    with torchckpt.CheckpointManager(ckpt, tmp_path) as manager:
        manager.save()
        ckpt.opt = torch.optim.Adam(model.parameters())
        model(torch.ones(2, 4)).sum().backward()
        ckpt.opt.step()
        manager.save()
        flip_tensor_byte(tmp_path / "ckpt-2", "opt/state/0/exp_avg")
        with pytest.warns(torchckpt.DamagedCheckpointWarning), pytest.warns(torchckpt.PartialRestoreWarning):
            assert manager.restore_or_initialize() == str(tmp_path / "ckpt-1")
        assert set(manager.last_restore.report.left_from_damaged) >= {"opt/state/0/exp_avg", "opt/state/1/exp_avg"}


def test_optimizer_state_the_older_checkpoint_replaces_whole_is_not_reported_left(tmp_path):
    # probe41 F1: a roll-back mid-run; ckpt-1 has no Adam state for a layer frozen then, and
    # load_state_dict replaces the state whole, so nothing the damaged ckpt-2 wrote stays
    model = torch.nn.Sequential(torch.nn.Linear(8, 8), torch.nn.Linear(8, 8))
    opt = torch.optim.Adam(model.parameters(), lr=0.01)

    def train() -> None:
        opt.zero_grad()
        model(torch.ones(4, 8)).sum().backward()
        opt.step()

    with torchckpt.CheckpointManager(torchckpt.Checkpoint(model=model, opt=opt), tmp_path) as manager:
        model[1].requires_grad_(False)
        train()
        manager.save()
        model[1].requires_grad_(True)
        train()
        manager.save()
        flip_tensor_byte(tmp_path / "ckpt-2", "opt/state/3/exp_avg_sq")
        train()
        with pytest.warns(torchckpt.DamagedCheckpointWarning):
            assert manager.restore_or_initialize(strict=True) == str(tmp_path / "ckpt-1")
        assert manager.last_restore.report.left_from_damaged == {} and sorted(opt.state_dict()["state"]) == [0, 1]


def test_a_renamed_restore_across_a_wrapper_prefix_leaves_nothing_reported(tmp_path):
    # probe41 F2: rename= and a "module." prefix that differs between the two checkpoints; the
    # damage is in the tensor read last, so the renamed ones were read in place first
    def net(value: float, encoder: str) -> torch.nn.Module:
        model = torch.nn.Module()
        setattr(model, encoder, torch.nn.Linear(16, 16))
        model.head = torch.nn.Linear(16, 16)
        for p in model.parameters():
            torch.nn.init.constant_(p, value)
        return model

    with torchckpt.CheckpointManager(torchckpt.Checkpoint(model=net(1.0, "enc")), tmp_path) as manager:
        manager.save()
    with torchckpt.CheckpointManager(torchckpt.Checkpoint(model=_DDPLike(net(2.0, "enc"))), tmp_path) as manager:
        manager.save()
    flip_tensor_byte(tmp_path / "ckpt-2", "model/module.head.bias")
    renamed = net(0.0, "encoder")
    with torchckpt.CheckpointManager(torchckpt.Checkpoint(model=renamed), tmp_path) as manager, \
            pytest.warns(torchckpt.DamagedCheckpointWarning):
        assert manager.restore_or_initialize(strict=True, rename={"model/enc": "model/encoder",
                                                                  "model/module.enc": "model/module.encoder"})
        assert manager.last_restore.report.left_from_damaged == {}
        assert all(bool((p == 1.0).all()) for p in renamed.parameters())


def test_after_a_fallback_retention_keeps_the_intact_checkpoint_it_resumed_from(tmp_path):
    # the last max_to_keep are the last intact ones: the save after the fallback must not delete
    # ckpt-2 (what the run resumed from) and keep the damaged ckpt-3 in its place
    make_run(tmp_path)
    flip_data_byte(tmp_path / "ckpt-3")
    fresh = Fresh(tmp_path, max_to_keep=2)
    with pytest.warns(torchckpt.DamagedCheckpointWarning):
        assert fresh.manager.restore_or_initialize() == str(tmp_path / "ckpt-2")
    fresh.manager.save()
    assert fresh.manager.checkpoints == [str(tmp_path / f"ckpt-{i}") for i in (2, 3, 4)]  # ckpt-3 left for a look
    fresh.manager.save()
    assert fresh.manager.checkpoints == [str(tmp_path / f"ckpt-{i}") for i in (4, 5)]  # then it goes, oldest first
    assert sorted(p.name for p in tmp_path.glob("ckpt-*")) == ["ckpt-4", "ckpt-5"]
    fresh.manager.close()


def test_a_damaged_checkpoint_is_never_best(tmp_path):
    options = dict(max_to_keep=2, keep_best=1, best_metric="loss")
    weights = torch.zeros(4096)
    manager = torchckpt.CheckpointManager(torchckpt.Checkpoint(weights=weights), tmp_path, **options)
    for loss in (0.5, 0.9, 0.1):
        weights.fill_(loss)  # other bytes each time: no shard shared by an incremental save
        manager.save(metrics={"loss": loss})
    assert manager.best_checkpoint == str(tmp_path / "ckpt-3")
    manager.close()
    flip_data_byte(tmp_path / "ckpt-3")
    fresh = torchckpt.CheckpointManager(torchckpt.Checkpoint(weights=torch.zeros(4096)), tmp_path, **options)
    with pytest.warns(torchckpt.DamagedCheckpointWarning):
        assert fresh.restore_or_initialize() == str(tmp_path / "ckpt-2")
    assert fresh.best_checkpoint == torchckpt.get_checkpoint_state(tmp_path).best == str(tmp_path / "ckpt-2")
    fresh.close()


def test_ls_marks_a_checkpoint_found_damaged(tmp_path, capsys):
    make_run(tmp_path)
    flip_data_byte(tmp_path / "ckpt-3")
    fresh = Fresh(tmp_path)
    with pytest.warns(torchckpt.DamagedCheckpointWarning):
        fresh.manager.restore_or_initialize()
    fresh.manager.close()
    capsys.readouterr()
    assert cli.main(["ls", str(tmp_path), "--json"]) == 0
    marks = {c["name"]: c["marks"] for c in json.loads(capsys.readouterr().out)["checkpoints"]}
    assert "damaged" in marks["ckpt-3"] and "damaged" not in marks["ckpt-2"]


def test_without_fallback_the_damage_is_raised(tmp_path):
    make_run(tmp_path)
    flip_data_byte(tmp_path / "ckpt-3")
    fresh = Fresh(tmp_path)
    with pytest.raises(torchckpt.CorruptCheckpointError, match="checksum") as caught:
        fresh.manager.restore_or_initialize(fallback=False)
    assert "ckpt-3" in str(caught.value)
    fresh.manager.close()


def test_when_every_checkpoint_is_damaged_it_raises_without_calling_init_fn(tmp_path):
    make_run(tmp_path)
    for i, damage in zip((1, 2, 3), (flip_data_byte, truncate_shard, remove_shard)):
        damage(tmp_path / f"ckpt-{i}")
    fresh = Fresh(tmp_path)
    with pytest.warns(torchckpt.DamagedCheckpointWarning) as caught, \
            pytest.raises(torchckpt.CorruptCheckpointError, match="Every checkpoint of .* is damaged") as error:
        fresh.manager.restore_or_initialize()
    assert "init_fn was not called" in str(error.value) and error.value.path == str(tmp_path)
    assert not fresh.initialized
    assert [w.message.path for w in caught] == [str(tmp_path / f"ckpt-{i}") for i in (3, 2, 1)]
    fresh.manager.close()


def test_a_strict_resume_raises_on_a_mismatch_and_keeps_the_status(tmp_path):
    make_run(tmp_path)
    weights, model = torch.zeros(4096), torch.nn.Linear(8, 16)  # the model changed shape
    manager = torchckpt.CheckpointManager(torchckpt.Checkpoint(weights=weights, model=model, step=0), tmp_path)
    with pytest.raises(torchckpt.RestoreMismatchError, match="model/weight") as caught:
        manager.restore_or_initialize(strict=True)
    assert manager.last_restore is not None and manager.last_restore.report is caught.value.report
    assert "model/weight" in manager.last_restore.report.shape_mismatches
    manager.close()


def test_last_restore_is_none_before_a_restore(tmp_path):
    manager = torchckpt.CheckpointManager(torchckpt.Checkpoint(w=torch.zeros(1)), tmp_path)
    assert manager.last_restore is None
    assert manager.restore_or_initialize() is None and manager.last_restore is None
    manager.close()


# -- the pure parts, as tables -----------------------------------------------------------------------

from torchckpt._history.state import Entry  # noqa: E402
from torchckpt._load.resume import restore_newest_intact, restore_order  # noqa: E402


@pytest.mark.parametrize(("latest", "entries", "order"), [
    (None, [], []),
    ("ckpt-3", [Entry("ckpt-1", 10.0), Entry("ckpt-2", 20.0), Entry("ckpt-3", 30.0)], ["ckpt-3", "ckpt-2", "ckpt-1"]),
    ("ckpt-2", [Entry("ckpt-2", 50.0), Entry("ckpt-3", 30.0)], ["ckpt-2", "ckpt-3"]),  # replaced by number: newest
    ("ckpt-9", [Entry("ckpt-1"), Entry("ckpt-4"), Entry("ckpt-2", 5.0)], ["ckpt-9", "ckpt-2", "ckpt-4", "ckpt-1"]),
], ids=["nothing", "by-time", "latest-first", "untimed-by-number"])
def test_restore_order(latest, entries, order):
    assert restore_order(latest, entries) == order


@pytest.mark.parametrize(("damage", "fallback", "restored", "passed"), [
    ({}, True, "d/c3", []),
    ({"d/c3": "corrupt"}, True, "d/c2", ["d/c3"]),
    ({"d/c3": "gone", "d/c2": "corrupt"}, True, "d/c1", ["d/c3", "d/c2"]),
    ({"d/c3": "corrupt", "d/c2": "corrupt", "d/c1": "corrupt"}, True, None, ["d/c3", "d/c2", "d/c1"]),
    ({"d/c3": "corrupt"}, False, None, []),
], ids=["intact", "latest-damaged", "two-damaged", "all-damaged", "no-fallback"])
def test_restore_newest_intact(damage, fallback, restored, passed):
    tried, reported = [], []

    def restore(path):
        tried.append(path)
        if damage.get(path) == "gone":
            raise torchckpt.CheckpointNotFoundError(f"{path} is gone", path)
        if path in damage:
            raise torchckpt.CorruptCheckpointError(f"{path} fails its checksum", path)
        return f"status of {path}"

    paths = ["d/c3", "d/c2", "d/c1"]
    with pytest.warns(torchckpt.DamagedCheckpointWarning) if passed else contextlib.nullcontext():
        if restored is None:
            with pytest.raises(torchckpt.CorruptCheckpointError, match="fails its checksum|Every checkpoint of d"):
                restore_newest_intact(paths, restore, fallback, "d", lambda p, why: reported.append((p, why)))
        else:
            assert restore_newest_intact(paths, restore, fallback, "d", lambda p, why: reported.append((p, why))) \
                == (restored, f"status of {restored}")
    assert [p for p, _ in reported] == passed
    assert all(why == ("it is gone" if damage[p] == "gone" else f"{p} fails its checksum") for p, why in reported)
    assert tried == (passed + [restored] if restored else passed or paths[:1])
