"""``TorchckptCallback``: the Hugging Face Trainer saves through a ``CheckpointManager``, bit for bit,
without pickle; a new Trainer resumes from it bit-exact through ``train(resume_from_checkpoint=
callback.resume_from())``; and a checkpoint exports to a folder ``from_pretrained`` loads exactly.

The resume tests stop a run between two saves (a callback, or SIGKILL in ``tests/jobs/hf_trainer_job.py``),
mid-epoch and at an epoch's end, and resume it in a new Trainer: weights, optimizer, scheduler, the
global generator and the log history end equal to an uninterrupted run's."""

from __future__ import annotations

import json
import logging
import os
import signal
import subprocess
import sys
import tempfile
from pathlib import Path

import pytest
import torch

import torchckpt
from torchckpt._storage.registry import storage_for
from torchckpt.cli import main

from .conftest import assert_same  # noqa: E402
from .distributed import ROOT, finish_session

transformers = pytest.importorskip("transformers")
from tests.jobs import hf_trainer_job  # noqa: E402
from tests.jobs.hf_trainer_job import RESUME_OPTIONS, RESUME_STEPS, SAVE_EVERY, trainer_for  # noqa: E402
from torchckpt.integrations.transformers import TorchckptCallback, TrainerResumeError  # noqa: E402

STEPS = 6


@pytest.fixture(scope="module", autouse=True)
def one_thread():
    """Every run here computes on one thread, as the SIGKILLed job's subprocess does. With two, MKL
    may choose how many threads a matrix product uses by the machine's load (``MKL_DYNAMIC``), and
    a product with a long inner dimension (the tied embedding's gradient) then sums in another
    order: one ulp apart between two processes that did the same work."""
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(threads)


@pytest.fixture
def config(monkeypatch):
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    return hf_trainer_job.gpt2_config()


def trained(tmp_path, config, max_steps: int, **callback_options):
    """A tiny GPT-2 (dropout on) trained ``max_steps`` steps by the Trainer with the callback; a
    constant learning rate, so runs of different lengths agree step for step."""
    callback = TorchckptCallback(tmp_path / "runs", **callback_options)
    trainer = trainer_for(tmp_path, config, max_steps, [callback])
    trainer.train()
    return trainer, callback


def test_each_save_the_trainer_decides_is_a_managed_checkpoint_and_nothing_is_pickled(tmp_path, config):
    trainer, callback = trained(tmp_path, config, STEPS, max_to_keep=2)
    assert [p.rsplit("/", 1)[1] for p in callback.manager.checkpoints] == ["ckpt-4", "ckpt-6"]
    hf = tmp_path / "hf"
    assert not hf.exists() or not any(p.name.startswith("checkpoint-") for p in hf.iterdir())  # no pickled folder
    state = torchckpt.load_state(tmp_path / "runs")
    assert list(state) == ["model", "optimizer", "lr_scheduler", "rng", "trainer_state"]
    assert state["trainer_state"]["global_step"] == STEPS and state["trainer_state"]["max_steps"] == STEPS


def test_the_trainers_save_total_limit_is_the_retention_unless_max_to_keep_is_given(tmp_path, config):
    callback = TorchckptCallback(tmp_path / "runs")
    trainer_for(tmp_path, config, 3 * SAVE_EVERY, [callback], save_total_limit=2).train()
    assert [p.rsplit("/", 1)[1] for p in callback.manager.checkpoints] == [f"ckpt-{2 * SAVE_EVERY}",
                                                                           f"ckpt-{3 * SAVE_EVERY}"]


def test_load_best_model_at_end_without_the_trainers_folders_is_refused_before_training(tmp_path, config):
    callback = TorchckptCallback(tmp_path / "runs")
    args = transformers.TrainingArguments(
        output_dir=str(tmp_path / "hf"), max_steps=SAVE_EVERY, per_device_train_batch_size=4, save_steps=SAVE_EVERY,
        eval_strategy="steps", eval_steps=SAVE_EVERY, load_best_model_at_end=True, metric_for_best_model="loss",
        report_to=[], use_cpu=True, disable_tqdm=True)
    trainer = transformers.Trainer(model=transformers.GPT2LMHeadModel(config), args=args,
                                   train_dataset=hf_trainer_job.Tokens(), eval_dataset=hf_trainer_job.Tokens(),
                                   callbacks=[callback])
    with pytest.raises(ValueError, match=r"load_best_model_at_end=True needs the Trainer's own checkpoint folders.*"
                                         r"Pass keep_hf_checkpoints=True"):
        trainer.train()
    assert not (tmp_path / "runs").exists() or not any((tmp_path / "runs").glob("ckpt-*"))


def test_keep_hf_checkpoints_lets_the_trainer_write_its_own_as_well(tmp_path, config):
    trained(tmp_path, config, SAVE_EVERY, keep_hf_checkpoints=True)
    assert (tmp_path / "hf" / f"checkpoint-{SAVE_EVERY}").is_dir()
    assert (tmp_path / "runs" / f"ckpt-{SAVE_EVERY}").is_dir()


def test_a_checkpoint_holds_the_run_at_its_step_bit_for_bit(tmp_path, config):
    """ckpt-4 of a 6-step run equals a 4-step run's end (same seed, same batches): the model restored
    into a fresh one, the optimizer and scheduler as ``load_state`` reads them; ckpt-6, the 6-step run's."""
    long_run, _ = trained(tmp_path / "long", config, STEPS)
    short_run, _ = trained(tmp_path / "short", config, 4)
    for trainer, name in ((short_run, "ckpt-4"), (long_run, f"ckpt-{STEPS}")):
        path = tmp_path / "long" / "runs" / name
        model = transformers.GPT2LMHeadModel(config)
        torchckpt.Checkpoint(model=model).restore(path).expect_partial()
        assert_same(model.state_dict(), trainer.model.state_dict(), exact_types=False)
        state = torchckpt.load_state(path)
        assert_same(state["optimizer"], trainer.optimizer.state_dict(), exact_types=False)
        assert state["lr_scheduler"] == trainer.lr_scheduler.state_dict()


def test_export_gives_a_folder_from_pretrained_loads_exactly(tmp_path, config):
    trainer, callback = trained(tmp_path, config, SAVE_EVERY)
    config.save_pretrained(tmp_path / "cfg")
    out = tmp_path / "exported"
    assert main(["export", callback.manager.latest_checkpoint, "--object", "model", str(out),
                 "--config", str(tmp_path / "cfg" / "config.json")]) == 0
    loaded = transformers.GPT2LMHeadModel.from_pretrained(out).eval()
    tokens = torch.tensor([[1, 5, 9, 42]])
    with torch.no_grad():
        assert torch.equal(loaded(tokens).logits, trainer.model.eval()(tokens).logits)


def evaluating_trainer(output, config, max_steps: int, callbacks: list, **options):
    """A Trainer as :func:`trainer_for`'s that evaluates every ``eval_steps`` on :class:`Tokens`."""
    torch.manual_seed(0)
    arguments = {"max_steps": max_steps, "per_device_train_batch_size": 4, "eval_strategy": "steps",
                 "report_to": [], "use_cpu": True, "disable_tqdm": True, "logging_strategy": "no", "seed": 0,
                 **options}
    args = transformers.TrainingArguments(output_dir=str(output / "hf"), **arguments)
    return transformers.Trainer(model=transformers.GPT2LMHeadModel(config), args=args,
                                train_dataset=hf_trainer_job.Tokens(), eval_dataset=hf_trainer_job.Tokens(),
                                callbacks=callbacks, compute_metrics=lambda _: {"acc": 0.5})  # never improves


def test_save_strategy_best_is_refused_before_training_unless_the_trainer_keeps_its_folders(tmp_path, config):
    # the Trainer decides such a save after its evaluation and writes its folder at once: no hook between
    best = {"save_strategy": "best", "eval_steps": 2, "metric_for_best_model": "eval_loss", "learning_rate": 1e-2}
    trainer = evaluating_trainer(tmp_path, config, 6, [TorchckptCallback(tmp_path / "runs")], **best)
    with pytest.raises(ValueError, match=r"save_strategy='best' makes the Trainer decide a save after its "
                                         r"evaluation.*pass keep_hf_checkpoints=True"):
        trainer.train()
    assert not (tmp_path / "hf").exists() or not any((tmp_path / "hf").glob("checkpoint-*"))
    callback = TorchckptCallback(tmp_path / "kept" / "runs", keep_hf_checkpoints=True)
    trainer = evaluating_trainer(tmp_path / "kept", config, 6, [callback], **best)
    trainer.train()
    theirs = sorted(p.name.split("-")[1] for p in (tmp_path / "kept" / "hf").glob("checkpoint-*"))
    assert theirs and [os.path.basename(p).split("-")[1] for p in callback.manager.checkpoints] == theirs


def test_the_trainers_stateful_callbacks_are_saved_as_they_stand_and_a_resume_stops_early_as_the_whole_run(
        tmp_path, config):
    # EarlyStoppingCallback counts evaluations without improvement (every one after the first here):
    # with patience 5 the whole run stops at step 6. Stopped at 5, resumed from ckpt-4 (counter 3).
    options = {"eval_steps": 1, "metric_for_best_model": "acc", "save_strategy": "steps", "save_steps": 2,
               "restore_callback_states_from_checkpoint": True}

    def run(output, *callbacks):
        early = transformers.EarlyStoppingCallback(early_stopping_patience=5)
        trainer = evaluating_trainer(output, config, 12, [early, *callbacks], **options)
        return trainer, early

    whole, _ = run(tmp_path / "whole")
    whole.train()
    assert whole.state.global_step == 6
    first, early = run(tmp_path, TorchckptCallback(tmp_path / "runs"), StopAfter(5))
    first.train()
    assert early.early_stopping_patience_counter == 4
    saved = torchckpt.load_state(tmp_path / "runs" / "ckpt-4")["trainer_state"]["stateful_callbacks"]
    assert saved["EarlyStoppingCallback"]["attributes"] == {"early_stopping_patience_counter": 3}
    assert saved["TrainerControl"]["args"]["should_training_stop"] is False
    callback = TorchckptCallback(tmp_path / "runs")
    again, _ = run(tmp_path, callback)
    again.train(resume_from_checkpoint=callback.resume_from())
    assert again.state.global_step == whole.state.global_step


def test_a_trainer_that_passes_no_optimizer_is_refused_by_name(tmp_path):
    callback = TorchckptCallback(tmp_path / "runs")
    with pytest.raises(ValueError, match=r"passed no optimizer, lr_scheduler to on_train_begin") as caught:
        callback.on_train_begin(None, transformers.TrainerState(), transformers.TrainerControl(),
                                model=torch.nn.Linear(2, 2))
    assert "transformers' Trainer" in str(caught.value)
    assert callback.manager is None and not (tmp_path / "runs").exists()


# -- resuming -------------------------------------------------------------------------------


class StopAfter(transformers.TrainerCallback):
    """Stop the run after global step ``step``, between two saves, as a crash there would."""

    def __init__(self, step: int) -> None:
        self.step = step

    def on_step_end(self, args, state, control, **kwargs):
        if state.global_step == self.step:
            control.should_training_stop = True


def finished(trainer) -> dict:
    """What a run ends with: weights, optimizer, scheduler, the global generator (read right after
    ``train``) and the log of every step (loss, gradient norm, learning rate, epoch)."""
    return {"model": trainer.model.state_dict(), "optimizer": trainer.optimizer.state_dict(),
            "lr_scheduler": trainer.lr_scheduler.state_dict(), "rng": torch.get_rng_state(),
            "log": [entry for entry in trainer.state.log_history if "loss" in entry],
            "total_flos": trainer.state.total_flos}


@pytest.fixture(scope="module")
def uninterrupted(tmp_path_factory):
    """The run without interruption, and without the callback: the Trainer alone, saving nothing."""
    with pytest.MonkeyPatch.context() as patch:
        patch.setenv("HF_HUB_OFFLINE", "1")
        trainer = trainer_for(tmp_path_factory.mktemp("whole"), hf_trainer_job.gpt2_config(), RESUME_STEPS, [],
                              **{**RESUME_OPTIONS, "save_strategy": "no"})
        trainer.train()
        return finished(trainer)


class Records(logging.Handler):
    """The messages a logger emits."""

    def __init__(self) -> None:
        super().__init__()
        self.messages: list[str] = []

    def emit(self, record: logging.LogRecord) -> None:
        self.messages.append(record.getMessage())


def train_logged(trainer, folder: str | None) -> list[str]:
    """``trainer.train(resume_from_checkpoint=folder)``; returns what the Trainer's logger emitted."""
    records = Records()
    logging.getLogger("transformers.trainer").addHandler(records)
    try:
        trainer.train(resume_from_checkpoint=folder)
    finally:
        logging.getLogger("transformers.trainer").removeHandler(records)
    return records.messages


def resumed(tmp_path, config, expected_step: int):
    """A new Trainer and callback on ``tmp_path/runs``, resumed from its latest checkpoint and
    trained to the end; the Trainer warned of no missing key, and the resume folder is gone."""
    callback = TorchckptCallback(tmp_path / "runs")
    trainer = trainer_for(tmp_path, config, RESUME_STEPS, [callback], **RESUME_OPTIONS)
    folder = callback.resume_from()
    assert json.loads(Path(folder, "trainer_state.json").read_text())["global_step"] == expected_step
    assert not any("missing keys" in m for m in train_logged(trainer, folder))  # the empty index's warning, dropped
    assert not os.path.exists(folder)
    assert trainer.state.global_step == RESUME_STEPS
    return trainer


def assert_same_end(run: dict, whole: dict) -> None:
    assert_same(run["model"], whole["model"], exact_types=False)
    assert_same(run["optimizer"], whole["optimizer"], exact_types=False)
    assert run["lr_scheduler"] == whole["lr_scheduler"]
    assert torch.equal(run["rng"], whole["rng"])
    assert [e["step"] for e in run["log"]] == list(range(1, RESUME_STEPS + 1))
    assert run["log"] == whole["log"]  # every step's loss, gradient norm and learning rate, bit for bit
    assert run["total_flos"] == whole["total_flos"]


def test_the_flop_count_resumes_whole_when_no_log_ran_before_the_save(tmp_path, config, uninterrupted):
    """The Trainer folds the flops it counted since its last log into ``state.total_flos`` at a log
    or at its own save; with no log each step, the callback's save must do the same, or the resumed
    run reports fewer (``train_output.metrics["total_flos"]``)."""
    options = {**RESUME_OPTIONS, "logging_strategy": "no"}
    first = trainer_for(tmp_path, config, RESUME_STEPS, [TorchckptCallback(tmp_path / "runs"), StopAfter(7)],
                        **options)
    first.train()
    saved = torchckpt.load_state(tmp_path / "runs" / "ckpt-6")["trainer_state"]
    assert saved["total_flos"] == uninterrupted["total_flos"] * 6 / RESUME_STEPS
    callback = TorchckptCallback(tmp_path / "runs")
    trainer = trainer_for(tmp_path, config, RESUME_STEPS, [callback], **options)
    trainer.train(resume_from_checkpoint=callback.resume_from())
    assert trainer.state.total_flos == uninterrupted["total_flos"]


@pytest.mark.parametrize(("stop_after", "saved_at"), [pytest.param(7, 6, id="mid-epoch"),
                                                      pytest.param(9, 8, id="epoch-end")])
def test_a_stopped_run_resumed_in_a_new_trainer_ends_as_the_uninterrupted_one(tmp_path, config, uninterrupted,
                                                                              stop_after, saved_at):
    """4 steps an epoch: ckpt-6 is 2 batches into the second epoch (the Trainer skips them), ckpt-8
    its end; the run went one step past it. Dropout, shuffled data and a moving schedule."""
    first = trainer_for(tmp_path, config, RESUME_STEPS, [TorchckptCallback(tmp_path / "runs"), StopAfter(stop_after)],
                        **RESUME_OPTIONS)
    first.train()
    assert first.state.global_step == stop_after
    trainer = resumed(tmp_path, config, saved_at)
    assert_same_end(finished(trainer), uninterrupted)
    written = [p.name for p in (tmp_path / "hf").rglob("*")]
    assert not any(name.startswith("checkpoint-") or name.endswith((".pt", ".pth", ".bin")) for name in written)


def test_resume_from_passes_a_damaged_latest_checkpoint_for_the_one_before_it(tmp_path, config, uninterrupted):
    first = trainer_for(tmp_path, config, RESUME_STEPS, [TorchckptCallback(tmp_path / "runs"), StopAfter(9)],
                        **RESUME_OPTIONS)
    first.train()
    shard = sorted((tmp_path / "runs" / "ckpt-8").glob("*.safetensors"))[-1]
    with open(shard, "r+b") as f:  # one bit flips in the latest checkpoint's data
        f.seek(-1, os.SEEK_END)
        byte = f.read(1)[0]
        f.seek(-1, os.SEEK_END)
        f.write(bytes([byte ^ 1]))
    with pytest.warns(torchckpt.DamagedCheckpointWarning, match=r"ckpt-8 is damaged.*Restoring .*ckpt-6 instead") as w:
        trainer = resumed(tmp_path, config, 6)
    assert w[0].message.path.endswith("ckpt-8")
    assert_same_end(finished(trainer), uninterrupted)


@pytest.mark.slow  # a subprocess imports transformers and trains: 6-9 s on 2 cores
def test_a_run_killed_with_sigkill_resumes_bit_exact_in_a_new_trainer(tmp_path, config, uninterrupted):
    """The job SIGKILLs itself after step 7 (ckpt-6 written, its claim on the directory left)."""
    proc = subprocess.Popen([sys.executable, str(ROOT / "tests" / "jobs" / "hf_trainer_job.py"), str(tmp_path), "7",
                             "1"], cwd=ROOT, stdout=subprocess.PIPE,
                            stderr=subprocess.STDOUT, text=True, start_new_session=True,
                            env={**os.environ, "PYTHONPATH": str(ROOT), "HF_HUB_OFFLINE": "1"})
    code, out = finish_session(proc, 120, "the HF Trainer job")
    assert code == -signal.SIGKILL, out[-3000:]
    assert_same_end(finished(resumed(tmp_path, config, 6)), uninterrupted)


def test_resume_from_an_empty_directory_is_none_and_the_trainer_starts_afresh(tmp_path, config):
    callback = TorchckptCallback(tmp_path / "runs")
    assert callback.resume_from() is None
    trainer = trainer_for(tmp_path, config, SAVE_EVERY, [callback])
    trainer.train(resume_from_checkpoint=callback.resume_from())
    assert [p.rsplit("/", 1)[1] for p in callback.manager.checkpoints] == [f"ckpt-{SAVE_EVERY}"]


def test_the_resume_folder_is_json_naming_no_tensor_and_a_trainer_not_given_it_is_refused(tmp_path, config):
    trained(tmp_path, config, SAVE_EVERY)
    callback = TorchckptCallback(tmp_path / "runs")
    folder = callback.resume_from()
    checkpoint = str(tmp_path / "runs" / f"ckpt-{SAVE_EVERY}")
    # a temporary folder of its own: never the callback's directory nor the Trainer's output_dir
    assert Path(folder).parent == Path(tempfile.gettempdir()) and Path(folder).name.startswith("torchckpt-hf-resume-")
    assert sorted(os.listdir(folder)) == ["model.safetensors.index.json", "trainer_state.json"]
    index = json.loads(Path(folder, "model.safetensors.index.json").read_text())
    assert index["weight_map"] == {} and checkpoint in index["metadata"]["torchckpt"]
    assert transformers.TrainerState.load_from_json(os.path.join(folder, "trainer_state.json")).global_step == 2
    trainer = trainer_for(tmp_path / "new", config, STEPS, [callback])
    with pytest.raises(TrainerResumeError, match=r"prepared a resume from .*ckpt-2 \(global step 2\), but the "
                       r"Trainer started at global step 0: pass the folder resume_from\(\) returned") as caught:
        trainer.train()  # resume_from_checkpoint forgotten
    assert (caught.value.path, caught.value.checkpoint_step, caught.value.trainer_step) == (checkpoint, 2, 0)
    assert isinstance(caught.value, ValueError) and not os.path.exists(folder) and callback.manager is None


def test_a_checkpoint_without_trainer_state_is_refused_by_name(tmp_path):
    path = torchckpt.Checkpoint(w=torch.ones(2)).save(tmp_path / "runs" / "ckpt")
    with pytest.raises(TrainerResumeError, match=r"ckpt-1 holds no 'trainer_state': it was not saved by "
                       r"TorchckptCallback") as caught:
        TorchckptCallback(tmp_path / "runs").resume_from()
    assert (caught.value.path, caught.value.checkpoint_step, caught.value.trainer_step) == (path, None, None)


def test_resume_from_a_checkpoint_that_does_not_exist_is_refused(tmp_path):
    with pytest.raises(torchckpt.CheckpointNotFoundError) as caught:
        TorchckptCallback(tmp_path / "runs").resume_from(tmp_path / "runs" / "ckpt-9")
    assert caught.value.path is not None and caught.value.path.endswith("ckpt-9")


def test_a_checkpoint_of_another_model_is_refused_and_the_directory_left_free(tmp_path, config):
    trained(tmp_path, config, SAVE_EVERY)
    callback = TorchckptCallback(tmp_path / "runs")
    deeper = hf_trainer_job.gpt2_config()
    deeper.n_layer = 2
    trainer = trainer_for(tmp_path, deeper, STEPS, [callback])
    with pytest.raises(torchckpt.RestoreMismatchError, match=r"Not all values matched when restoring .*ckpt-2") \
            as caught:
        trainer.train(resume_from_checkpoint=callback.resume_from())
    assert "model/transformer.h.1.attn.c_attn.weight" in caught.value.report.missing_keys
    runs = str(tmp_path / "runs")
    assert callback.manager is None and not storage_for(runs).holds(runs)  # the manager closed: nothing claimed


def test_a_resume_folder_given_to_a_trainer_without_the_callback_that_made_it_is_refused_or_heard(tmp_path, config):
    """Only the callback whose resume_from() made the folder restores the weights: another callback
    on the directory refuses the run before it trains (and saves) from fresh weights, and a Trainer
    with no callback at all gets the Trainer's own warning that every key is missing."""
    trained(tmp_path, config, SAVE_EVERY)
    before = sorted(os.listdir(tmp_path / "runs"))
    preparing = TorchckptCallback(tmp_path / "runs")
    folder = preparing.resume_from()
    other = TorchckptCallback(tmp_path / "runs")
    trainer = trainer_for(tmp_path / "other", config, STEPS, [other])
    with pytest.raises(TrainerResumeError, match=r"resumed at global step 2 from a folder another TorchckptCallback "
                       r"prepared .*Give the Trainer that same callback") as caught:
        trainer.train(resume_from_checkpoint=folder)
    assert (caught.value.checkpoint_step, caught.value.trainer_step) == (SAVE_EVERY, SAVE_EVERY)
    assert sorted(os.listdir(tmp_path / "runs")) == before and other.manager is None  # nothing saved from it
    bare = trainer_for(tmp_path / "bare", config, SAVE_EVERY + 1, [])
    heard = train_logged(bare, folder)
    assert any(m.startswith("There were missing keys in the checkpoint model loaded") for m in heard)
