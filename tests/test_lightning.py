"""The Lightning plugin: every ``ModelCheckpoint`` feature with torchckpt checkpoint directories,
a resumed fit bit-equal to Lightning's default (also under DDP, saved on rank 0 alone),
hyperparameters that are not plain data, the ``last`` link, Lightning's ``AsyncCheckpointIO``,
``load_from_checkpoint`` on a directory, and ``RNGStateCallback``: a fit interrupted and resumed
bit-equal to an uninterrupted one."""

from __future__ import annotations

import argparse
import collections
import dataclasses
import enum
import json
import os
import pathlib
import random
import warnings

import numpy as np
import pytest
import safetensors.torch
import torch
from torch.utils.data import DataLoader, Subset, TensorDataset

import torchckpt
from torchckpt.integrations.lightning import (
    PlainFormWarning,
    RNGStateCallback,
    TorchckptCheckpointIO,
    load_from_checkpoint,
    plain_form,
)

from .conftest import assert_same
from .distributed import run_ranks

pl = pytest.importorskip("lightning.pytorch")
from lightning.pytorch.callbacks import ModelCheckpoint  # noqa: E402
from lightning.pytorch.plugins.io import AsyncCheckpointIO, TorchCheckpointIO  # noqa: E402
from lightning.pytorch.utilities import AttributeDict  # noqa: E402


class Mode(enum.Enum):
    FAST = "fast"
    SLOW = "slow"


@dataclasses.dataclass
class Schedule:
    warmup: int = 2
    decay: float = 0.5


class Regressor(pl.LightningModule):
    """Three inputs to one output, with Adam and a step schedule (optimizer and scheduler state)."""

    def __init__(self, hidden: int = 4, lr: float = 0.05, **extra: object) -> None:
        super().__init__()
        self.save_hyperparameters()
        self.net = torch.nn.Sequential(torch.nn.Linear(3, hidden), torch.nn.Tanh(), torch.nn.Linear(hidden, 1))

    def training_step(self, batch, batch_idx):
        x, y = batch
        return torch.nn.functional.mse_loss(self.net(x), y)

    def validation_step(self, batch, batch_idx):
        x, y = batch
        self.log("val_loss", torch.nn.functional.mse_loss(self.net(x), y))

    def configure_optimizers(self):
        opt = torch.optim.Adam(self.parameters(), lr=self.hparams.lr)
        return [opt], [torch.optim.lr_scheduler.StepLR(opt, step_size=3, gamma=0.5)]


class Points(pl.LightningDataModule):
    """16 shuffled training points in batches of 4, 8 validation points; keeps a counter as its state."""

    def __init__(self, seed: int = 0) -> None:
        super().__init__()
        self.save_hyperparameters()
        g = torch.Generator().manual_seed(seed)
        x = torch.randn(24, 3, generator=g)
        self.data = torch.utils.data.TensorDataset(x, x.sum(1, keepdim=True).sin())
        self.batches_seen = 0

    def train_dataloader(self):
        return torch.utils.data.DataLoader(torch.utils.data.Subset(self.data, range(16)), batch_size=4, shuffle=True)

    def val_dataloader(self):
        return torch.utils.data.DataLoader(torch.utils.data.Subset(self.data, range(16, 24)), batch_size=8)

    def state_dict(self):
        return {"batches_seen": self.batches_seen}

    def load_state_dict(self, state):
        self.batches_seen = state["batches_seen"]


def trainer(root, io, epochs: int, *callbacks) -> pl.Trainer:
    plugins = [io] if io is not None else []
    return pl.Trainer(default_root_dir=str(root), max_epochs=epochs, plugins=plugins, callbacks=list(callbacks),
                      logger=False, enable_progress_bar=False, enable_model_summary=False, deterministic=True,
                      accelerator="cpu", devices=1, num_sanity_val_steps=0)


def top2(root) -> ModelCheckpoint:
    return ModelCheckpoint(dirpath=str(root), save_top_k=2, monitor="val_loss", save_last=True)


def interrupted_run(root, make_io) -> tuple[Regressor, pl.Trainer]:
    """2 epochs, then a new Trainer (the process restarted) resumed with ckpt_path="last" to 4."""
    pl.seed_everything(0, verbose=False)
    trainer(root, make_io(), 2, top2(root)).fit(Regressor(), datamodule=Points())
    pl.seed_everything(1, verbose=False)
    model = Regressor()
    resumed = trainer(root, make_io(), 4, top2(root))
    resumed.fit(model, datamodule=Points(), ckpt_path="last")
    return model, resumed


@pytest.fixture(scope="module")
def plugin_run(tmp_path_factory):
    """The interrupted run written by the plugin: (its folder, the final model, its trainer)."""
    root = tmp_path_factory.mktemp("plugin")
    with warnings.catch_warnings():
        warnings.filterwarnings("ignore", ".*does not have many workers.*")
        model, resumed = interrupted_run(root, TorchckptCheckpointIO)
    return root, model, resumed


def test_a_resumed_fit_ends_bit_equal_to_lightnings_default(plugin_run, tmp_path):
    _, model, resumed = plugin_run
    with warnings.catch_warnings():
        warnings.filterwarnings("ignore", ".*does not have many workers.*")
        default_model, default = interrupted_run(tmp_path, TorchCheckpointIO)
    assert resumed.global_step == default.global_step == 16
    assert_same(dict(model.state_dict()), dict(default_model.state_dict()))
    assert_same(resumed.optimizers[0].state_dict(), default.optimizers[0].state_dict())
    assert_same(resumed.lr_scheduler_configs[0].scheduler.state_dict(),
                default.lr_scheduler_configs[0].scheduler.state_dict())


def test_the_folder_holds_the_top_two_and_last_as_checkpoint_directories(plugin_run):
    root, _, resumed = plugin_run
    callback = resumed.checkpoint_callback
    names = sorted(os.listdir(root))
    assert names == sorted([os.path.basename(p) for p in callback.best_k_models] + ["last.ckpt"])
    assert len(names) == 3
    for name in names:
        assert os.path.isdir(root / name) and not os.path.islink(root / name)
        assert torchckpt.load_checkpoint(str(root / name)).kind == "torchckpt"
    assert torchckpt.load_state(str(root / "last.ckpt"))["global_step"] == 16


def test_load_from_checkpoint_builds_the_best_module_with_its_weights(plugin_run):
    root, _, resumed = plugin_run
    best = resumed.checkpoint_callback.best_model_path
    with pytest.raises(IsADirectoryError):  # what the plugin's loader is for
        Regressor.load_from_checkpoint(best)
    model = load_from_checkpoint(Regressor, best)
    saved = torchckpt.load_state(best)
    assert type(model) is Regressor and model.hparams.hidden == 4
    assert_same(dict(model.state_dict()), dict(saved["state_dict"]))
    wider = load_from_checkpoint(Regressor, best, hidden=4, lr=0.5)  # keyword arguments override
    assert wider.hparams.lr == 0.5
    data = load_from_checkpoint(Points, best)
    assert type(data) is Points and data.hparams.seed == 0 and data.batches_seen == 0


def test_load_from_checkpoint_takes_only_lightning_classes(plugin_run):
    with pytest.raises(TypeError, match="LightningModule or LightningDataModule class, not <class 'dict'>"):
        load_from_checkpoint(dict, str(plugin_run[0] / "last.ckpt"))


class Recording(TorchckptCheckpointIO):
    """Keeps a copy of each dict it is asked to save, as it was then."""

    def __init__(self) -> None:
        super().__init__()
        self.saved: dict[str, dict] = {}

    def save_checkpoint(self, checkpoint, path, storage_options=None):
        self.saved[str(path)] = _cloned(checkpoint)
        super().save_checkpoint(checkpoint, path, storage_options)


def _cloned(value):
    if isinstance(value, torch.Tensor):
        return value.detach().clone()
    if isinstance(value, dict):
        out = type(value)()
        for k, v in value.items():
            out[k] = _cloned(v)
        return out
    if type(value) in (list, tuple):
        return type(value)(_cloned(v) for v in value)
    return value


def test_load_checkpoint_returns_the_dict_lightning_saved_exactly(tmp_path):
    io = Recording()
    pl.seed_everything(0, verbose=False)
    fit = trainer(tmp_path, io, 1, ModelCheckpoint(dirpath=str(tmp_path), save_last=True))
    fit.fit(Regressor(), datamodule=Points())
    assert set(io.saved) == {str(tmp_path / "epoch=0-step=4.ckpt"), str(tmp_path / "last.ckpt")}
    for path, checkpoint in io.saved.items():
        assert_same(io.load_checkpoint(path), checkpoint)
        assert_same(io.load_checkpoint(pathlib.Path(path), map_location=lambda s, loc: s), checkpoint)
    with pytest.raises(TypeError, match="map_location as a device .* not dict"):
        io.load_checkpoint(str(tmp_path / "last.ckpt"), map_location={"cuda:0": "cpu"})


def test_hyperparameters_that_are_not_plain_data_do_not_stop_training(tmp_path):
    extra = {"mode": Mode.SLOW, "schedule": Schedule(), "root": pathlib.Path("/data/run"), "scale": np.float32(0.5),
             "kind": torch.optim.Adam, "args": argparse.Namespace(depth=2)}
    pl.seed_everything(0, verbose=False)
    with pytest.warns(PlainFormWarning) as caught:
        trainer(tmp_path, TorchckptCheckpointIO(), 2, top2(tmp_path)).fit(Regressor(**extra), datamodule=Points())
    ours = [w.message for w in caught if isinstance(w.message, PlainFormWarning)]
    assert len(ours) == 1  # one warning, however many saves
    assert {"hyper_parameters/mode", "hyper_parameters/schedule", "hyper_parameters/kind"} <= set(ours[0].keys)
    assert "'hyper_parameters/mode' (the Mode member -> its value)" in str(ours[0])
    model = load_from_checkpoint(Regressor, str(tmp_path / "last.ckpt"))
    assert model.hparams.mode == "slow" and model.hparams.schedule == {"warmup": 2, "decay": 0.5}
    assert model.hparams.kind == "torch.optim.adam.Adam" and str(model.hparams.root) == "/data/run"
    assert float(model.hparams.scale) == 0.5 and dict(model.hparams.args) == {"depth": 2}
    assert load_from_checkpoint(Regressor, str(tmp_path / "last.ckpt"), mode=Mode.FAST).hparams.mode is Mode.FAST


def test_save_last_link_resumes_through_the_link_and_removal_never_follows_it(tmp_path):
    run = tmp_path / "run"
    link = ModelCheckpoint(dirpath=str(run), save_top_k=1, monitor="val_loss", save_last="link")
    pl.seed_everything(0, verbose=False)
    trainer(run, TorchckptCheckpointIO(), 2, link).fit(Regressor(), datamodule=Points())
    last = run / "last.ckpt"
    assert os.path.islink(last) and os.readlink(last) == os.path.basename(link.best_model_path)
    again = ModelCheckpoint(dirpath=str(run), save_top_k=1, monitor="val_loss", save_last="link")
    resumed = trainer(run, TorchckptCheckpointIO(), 3, again)
    resumed.fit(Regressor(), datamodule=Points(), ckpt_path="last")  # read through the link
    assert resumed.global_step == 12 and sorted(os.listdir(run)) == ["epoch=2-step=12.ckpt", "last.ckpt"]
    assert os.readlink(last) == "epoch=2-step=12.ckpt"
    target = run / os.readlink(last)
    TorchckptCheckpointIO().remove_checkpoint(last)
    assert not os.path.lexists(last) and torchckpt.load_state(str(target))["global_step"] == 12


def test_every_n_train_steps_and_ckpt_path_best(tmp_path):
    steps = ModelCheckpoint(dirpath=str(tmp_path), every_n_train_steps=3, save_top_k=-1, filename="{step}")
    best = ModelCheckpoint(dirpath=str(tmp_path / "best"), monitor="val_loss", save_top_k=1)
    fit = trainer(tmp_path, TorchckptCheckpointIO(), 2, best, steps)  # "best" is the first callback's
    pl.seed_everything(0, verbose=False)
    fit.fit(Regressor(), datamodule=Points())
    assert sorted(n for n in os.listdir(tmp_path) if n.startswith("step")) == ["step=3.ckpt", "step=6.ckpt"]
    assert torchckpt.load_state(str(tmp_path / "step=6.ckpt"))["global_step"] == 6
    scores = fit.validate(datamodule=Points(), ckpt_path="best", verbose=False)
    assert scores[0]["val_loss"] == pytest.approx(float(best.best_model_score))


def test_async_checkpoint_io_writes_the_same_checkpoints(tmp_path):
    pl.seed_everything(0, verbose=False)
    model = Regressor()
    fit = trainer(tmp_path, AsyncCheckpointIO(TorchckptCheckpointIO()), 3, top2(tmp_path))
    fit.fit(model, datamodule=Points())  # teardown waits for the saves in flight
    kept = {os.path.basename(p) for p in fit.checkpoint_callback.best_k_models} | {"last.ckpt"}
    # Not ==: AsyncCheckpointIO removes on the training thread without waiting for the saves it has
    # queued, so a save still queued when top-k removes it lands afterwards (with any CheckpointIO).
    assert len(kept) == 3 and kept <= set(os.listdir(tmp_path))
    for name in os.listdir(tmp_path):
        assert torchckpt.load_checkpoint(str(tmp_path / name)).kind == "torchckpt"
    last = torchckpt.load_state(str(tmp_path / "last.ckpt"))
    assert last["global_step"] == 12
    assert_same(dict(last["state_dict"]), dict(model.state_dict()))


# -- DDP: Lightning saves and removes on rank 0 alone -----------------------------------------


@pytest.mark.slow  # 2 processes, each 4 fits under DDP: ~10 s on 2 cores
def test_ddp_saves_on_rank_zero_alone_and_resumes_bit_equal_to_lightnings_default(tmp_path):
    """``tests/jobs/lightning_ddp.py`` on 2 gloo ranks: 2 epochs, then resumed from ``last`` to 3,
    with the plugin and with Lightning's default. A save that waited for rank 1 would hang to the timeout."""
    codes = run_ranks(2, tmp_path, [], timeout=120, module="tests.jobs.lightning_ddp")
    logs = "\n".join(p.read_text()[-3000:] for p in sorted(tmp_path.glob("*.txt")) + sorted(tmp_path.glob("*.log")))
    assert codes == [0, 0], logs
    for rank in range(2):
        ours = safetensors.torch.load_file(str(tmp_path / f"torchckpt-rank{rank}.safetensors"))
        default = safetensors.torch.load_file(str(tmp_path / f"default-rank{rank}.safetensors"))
        assert ours.keys() == default.keys() and any(k.startswith("opt/") for k in ours)
        for key in ours:  # weights and optimizer state
            assert torch.equal(ours[key], default[key]), (rank, key)
        info, default_info = (json.loads((tmp_path / f"{p}-rank{rank}.json").read_text()) for p in ("torchckpt", "default"))
        assert set(info["kinds"].values()) == {"directory"} and set(default_info["kinds"].values()) == {"file"}
        del info["kinds"], default_info["kinds"]
        assert info == default_info
        assert info["global_step"] == 6 and len(info["after_two_epochs"]) == 3  # top 2 and last, after each fit
        assert info["after_resume"] == sorted(info["best_k"] + ["last.ckpt"])
    last = torchckpt.load_state(str(tmp_path / "torchckpt" / "last.ckpt"))
    assert last["global_step"] == 6


# -- the plugin's own calls ------------------------------------------------------------------


@pytest.fixture
def folder(tmp_path):
    """A ModelCheckpoint folder: a checkpoint, Lightning's link to it, and things that are not checkpoints."""
    torchckpt.save_state({"epoch": 1, "w": torch.ones(2)}, tmp_path / "epoch=1.ckpt")
    os.symlink("epoch=1.ckpt", tmp_path / "last.ckpt")
    (tmp_path / "old.ckpt").write_bytes(b"a torch.save pickle")
    (tmp_path / "half.ckpt").mkdir()
    (tmp_path / "site.ckpt").mkdir()
    (tmp_path / "site.ckpt" / "index.json").write_text('{"pages": ["home"]}')  # someone's own index.json
    (tmp_path / "outside").mkdir()
    torchckpt.save_state({"epoch": 9}, tmp_path / "outside" / "c.ckpt")
    os.symlink(os.path.join("outside", "c.ckpt"), tmp_path / "away.ckpt")
    os.symlink("gone.ckpt", tmp_path / "dangling.ckpt")
    return tmp_path


def test_a_checkpoint_and_a_lightning_link_load_and_are_removed(folder):
    io = TorchckptCheckpointIO()
    assert io.load_checkpoint(folder / "last.ckpt")["epoch"] == 1
    io.remove_checkpoint(folder / "last.ckpt")  # the link goes, never its target
    assert not os.path.lexists(folder / "last.ckpt") and os.path.isdir(folder / "epoch=1.ckpt")
    io.remove_checkpoint(folder / "epoch=1.ckpt")
    assert not os.path.lexists(folder / "epoch=1.ckpt")
    io.remove_checkpoint(folder / "nothing.ckpt")  # nothing there: nothing to do, as Lightning's default
    io.remove_checkpoint(folder / "dangling.ckpt")  # Lightning's link to a checkpoint top-k removed
    assert not os.path.lexists(folder / "dangling.ckpt")


def test_a_checkpoint_whose_index_lost_its_end_is_removed(folder):
    index = folder / "epoch=1.ckpt" / "index.json"
    index.write_bytes(index.read_bytes()[:-40])  # a copy cut short: still this package's, and top-k rotates it out
    TorchckptCheckpointIO().remove_checkpoint(folder / "epoch=1.ckpt")
    assert not os.path.lexists(folder / "epoch=1.ckpt")


@pytest.mark.parametrize(("name", "message"), [
    ("old.ckpt", "Refusing to remove .*old.ckpt: it is not a torchckpt checkpoint"),
    ("half.ckpt", "Refusing to remove .*half.ckpt: it is not a torchckpt checkpoint"),
    ("site.ckpt", "Refusing to remove .*site.ckpt: it is not a torchckpt checkpoint"),
    ("away.ckpt", "away.ckpt is a link to 'outside/c.ckpt', not to a sibling checkpoint"),
], ids=["a-pickle-file", "an-unfinished-directory", "a-folder-with-its-own-index", "a-link-elsewhere"])
def test_remove_refuses_anything_but_a_checkpoint_and_leaves_it(folder, name, message):
    with pytest.raises(torchckpt.CheckpointNotFoundError, match=message) as caught:
        TorchckptCheckpointIO().remove_checkpoint(str(folder / name))
    assert caught.value.path == str(folder / name)
    assert os.path.lexists(folder / name) and os.path.isdir(folder / "outside" / "c.ckpt")


@pytest.mark.parametrize(("name", "message", "where"), [
    ("away.ckpt", "is a link to 'outside/c.ckpt', not to a sibling checkpoint of its folder", "away.ckpt"),
    ("dangling.ckpt", "links to gone.ckpt, which is not a checkpoint directory", "gone.ckpt"),
], ids=["a-link-elsewhere", "a-dangling-link"])
def test_load_follows_only_lightnings_link_to_a_sibling_checkpoint(folder, name, message, where):
    with pytest.raises(torchckpt.CheckpointNotFoundError, match=message) as caught:
        TorchckptCheckpointIO().load_checkpoint(str(folder / name))
    assert caught.value.path == str(folder / where)


def test_saving_over_lightnings_link_replaces_the_link_not_its_target(folder):
    TorchckptCheckpointIO().save_checkpoint({"epoch": 2}, folder / "last.ckpt")
    assert not os.path.islink(folder / "last.ckpt") and torchckpt.load_state(str(folder / "last.ckpt")) == {"epoch": 2}
    assert torchckpt.load_state(str(folder / "epoch=1.ckpt"))["epoch"] == 1
    assert not [n for n in os.listdir(folder) if "torchckpt" in n]  # no leftover of the link


Pair = collections.namedtuple("Pair", ["low", "high"])


@pytest.mark.parametrize(("value", "plain"), [
    (Mode.FAST, "fast"),
    (Schedule(3, 0.1), {"warmup": 3, "decay": 0.1}),
    (Pair(Mode.SLOW, 2), {"low": "slow", "high": 2}),
    ({"nested": [Mode.SLOW, (Mode.FAST, 1)]}, {"nested": ["slow", ("fast", 1)]}),
    (torch.optim.SGD, "torch.optim.sgd.SGD"),
    (argparse.Namespace(a=Mode.FAST), {"a": "fast"}),
    (AttributeDict(mode=Mode.FAST), {"mode": "fast"}),
    (collections.OrderedDict(mode=Mode.FAST), collections.OrderedDict(mode="fast")),
], ids=["enum", "dataclass", "named-tuple", "nested-enums", "class", "namespace-holding-one", "attribute-dict-holding-one",
        "ordered-dict-holding-one"])
def test_plain_forms(value, plain):
    state, converted = plain_form({"hyper_parameters": {"x": value}})
    assert_same(state["hyper_parameters"]["x"], plain)
    assert converted and all(k.startswith("hyper_parameters/x") for k in converted)  # named by their key paths


def test_what_the_tree_stores_is_kept_as_it_is_without_a_copy():
    weights = {"w": torch.ones(2)}
    hparams = AttributeDict(root=pathlib.Path("/data"), scale=np.float32(0.5), args=argparse.Namespace(depth=2))
    checkpoint = {"state_dict": weights, "loops": [1, (2.5, "a")], "dtype": torch.float16, "hyper_parameters": hparams}
    state, converted = plain_form(checkpoint)
    assert state is checkpoint and state["state_dict"] is weights and state["hyper_parameters"] is hparams
    assert converted == {}


# -- a resume bit-equal to an uninterrupted run: RNGStateCallback -------------------------------


class Interrupted(Exception):
    """What ``StopAt`` raises: the run ends as a killed one would, after its last checkpoint."""


class StopAt(pl.Callback):
    def __init__(self, step: int) -> None:
        self.step = step

    def on_train_batch_end(self, trainer, *args) -> None:
        if trainer.global_step == self.step:
            raise Interrupted(f"stopped after step {self.step}")


class Noisy(pl.LightningModule):
    """Dropout, and a loss scaled by Python's and NumPy's generators, so that every global generator
    changes the weights; records the indices of the points of each batch it trains on."""

    def __init__(self) -> None:
        super().__init__()
        self.net = torch.nn.Sequential(torch.nn.Linear(3, 8), torch.nn.Dropout(0.3), torch.nn.Linear(8, 1))
        self.seen: list[list[int]] = []

    def training_step(self, batch, batch_idx):
        x, y, index = batch
        self.seen.append(index.tolist())
        return (1 + random.random() + float(np.random.rand())) * torch.nn.functional.mse_loss(self.net(x), y)

    def validation_step(self, batch, batch_idx):
        x, y, _ = batch
        self.log("val_loss", torch.nn.functional.mse_loss(self.net(x), y))

    def configure_optimizers(self):
        return torch.optim.Adam(self.parameters(), lr=0.05)


def shuffled_fit(root, model, *callbacks, ckpt_path=None, rng=True) -> tuple[pl.Trainer, torch.Generator]:
    """3 epochs over 16 points in 4 batches, shuffled by a ``StatefulDataLoader`` with its own
    generator, validated on 8 points; with an ``RNGStateCallback`` over that generator if ``rng``."""
    stateful = pytest.importorskip("torchdata.stateful_dataloader")
    x = torch.randn(24, 3, generator=torch.Generator().manual_seed(0))
    data = TensorDataset(x, x.sum(1, keepdim=True).sin(), torch.arange(24))
    generator = torch.Generator().manual_seed(7)
    train = stateful.StatefulDataLoader(Subset(data, range(16)), batch_size=4, shuffle=True, generator=generator)
    fit = trainer(root, TorchckptCheckpointIO(), 3, *callbacks, *([RNGStateCallback(generator)] if rng else []))
    with warnings.catch_warnings():
        warnings.filterwarnings("ignore", ".*(does not have many workers|callbacks used to create the checkpoint).*")
        fit.fit(model, train, DataLoader(Subset(data, range(16, 24)), batch_size=8), ckpt_path=ckpt_path)
    return fit, generator


@pytest.fixture(scope="module")
def uninterrupted(tmp_path_factory) -> tuple[Noisy, pl.Trainer, torch.Generator]:
    pl.seed_everything(0, verbose=False)
    model = Noisy()
    fit, generator = shuffled_fit(tmp_path_factory.mktemp("uninterrupted"), model)
    assert fit.global_step == 12
    return model, fit, generator


def interrupted(root, saving: ModelCheckpoint, stop_at: int) -> Noisy:
    """The run of ``uninterrupted``, stopped by an exception after step ``stop_at``."""
    pl.seed_everything(0, verbose=False)
    model = Noisy()
    with pytest.raises(Interrupted):
        shuffled_fit(root, model, saving, StopAt(stop_at))
    return model


SAVES = {  # when the checkpoint is taken: (ModelCheckpoint arguments, its file, the steps it holds)
    "mid-epoch": ({"every_n_train_steps": 3, "filename": "{step}"}, "step=6.ckpt", 6),
    "validation-end": ({"filename": "{epoch}"}, "epoch=0.ckpt", 4),
    "train-epoch-end": ({"filename": "{epoch}", "save_on_train_epoch_end": True}, "epoch=0.ckpt", 4),
}


@pytest.mark.parametrize("when", list(SAVES))
def test_an_interrupted_fit_resumes_bit_equal_to_an_uninterrupted_one(uninterrupted, tmp_path, when):
    """The loader resumes mid-epoch at its position (Lightning's own state), and the callback puts
    back the global generators and the loader's generator, so later epochs shuffle alike."""
    whole, whole_fit, whole_generator = uninterrupted
    arguments, name, steps = SAVES[when]
    first = interrupted(tmp_path, ModelCheckpoint(dirpath=str(tmp_path), save_top_k=-1, **arguments), steps + 1)
    pl.seed_everything(123, verbose=False)  # a new process: what the resume must not depend on
    model = Noisy()
    fit, generator = shuffled_fit(tmp_path / "resumed", model, ckpt_path=str(tmp_path / name))
    assert first.seen[:steps] + model.seen == whole.seen and fit.global_step == 12
    assert_same(dict(model.state_dict()), dict(whole.state_dict()))
    assert_same(fit.optimizers[0].state_dict(), whole_fit.optimizers[0].state_dict())
    assert torch.equal(generator.get_state(), whole_generator.get_state())


def test_without_the_callback_lightning_resumes_the_epoch_but_not_the_generator(uninterrupted, tmp_path):
    """Why the callback: torchdata rebuilds the epoch's order from the generator's state at the
    epoch's start, and leaves it one draw short of the uninterrupted run's, so the next epoch differs."""
    whole, _, whole_generator = uninterrupted
    interrupted(tmp_path, ModelCheckpoint(dirpath=str(tmp_path), every_n_train_steps=3, save_top_k=-1,
                                          filename="{step}"), 7)
    pl.seed_everything(0, verbose=False)
    model = Noisy()
    fit, generator = shuffled_fit(tmp_path / "resumed", model, ckpt_path=str(tmp_path / "step=6.ckpt"), rng=False)
    assert model.seen[:2] == whole.seen[6:8]  # the rest of the epoch, from Lightning's loader state
    assert model.seen[2:] != whole.seen[8:] and fit.global_step == 12  # the next epoch shuffled otherwise
    assert not torch.equal(generator.get_state(), whole_generator.get_state())


def test_rng_state_callback_takes_generators_only():
    with pytest.raises(TypeError, match="takes the training loaders' torch.Generator objects, not int") as caught:
        RNGStateCallback(torch.Generator(), 7)
    assert "StatefulDataLoader(..., generator=generator)" in str(caught.value)


def test_rng_state_callback_refuses_a_checkpoint_of_other_generators():
    saved = RNGStateCallback(torch.Generator(), torch.Generator()).state_dict()
    one = torch.Generator().manual_seed(3)
    with pytest.raises(ValueError, match=r"holds the state of 2 loader generator\(s\), and this RNGStateCallback was "
                                         r"given 1: pass the same generators"):
        RNGStateCallback(one).load_state_dict(saved)
    assert torch.equal(one.get_state(), torch.Generator().manual_seed(3).get_state())  # left as it was
