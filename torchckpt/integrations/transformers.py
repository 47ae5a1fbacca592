"""The Hugging Face ``Trainer``'s checkpoints through a ``CheckpointManager``, and a bit-exact resume.

``Trainer(..., callbacks=[TorchckptCallback("runs/gpt2")])`` saves, at each step the Trainer would
save (``save_strategy``, ``save_steps``, and the last step), a numbered torchckpt checkpoint of the
model, the optimizer, the learning-rate scheduler, every random generator (``RNGState``) and the
Trainer's state (``global_step``, ``epoch``, the log history), written atomically, never pickled,
kept by the manager's retention. It clears ``control.should_save``, so the Trainer does not also
write its own pickled ``checkpoint-N`` folder.

Why resuming goes through a stub folder: only the Trainer can move its own data position, and it
does so from the ``trainer_state.json`` of the folder given to
``train(resume_from_checkpoint=...)``, before any callback runs (it skips the epochs trained, then
the batches trained in the current epoch). So :meth:`TorchckptCallback.resume_from` writes a
new temporary folder (never the Trainer's ``output_dir``) holding that JSON file, taken from the
torchckpt checkpoint, and an empty weight index (``model.safetensors.index.json`` naming no
tensor: the Trainer refuses a folder without a weights file, and loads nothing from this one; its
"missing keys" warning about it is dropped). The folder holds no weights and no optimizer,
scheduler or RNG file, nothing pickled, so the Trainer restores none of them (it logs that it found
no RNG file); it is removed once training begins. The callback then
restores the model, the optimizer, the scheduler and the random generators itself, from its own
checkpoint, through public hooks only: the objects at ``on_train_begin``, and the random
generators where the uninterrupted run stood when it saved (see :meth:`TorchckptCallback.on_epoch_begin`).

Where a save happens: the Trainer decides at ``on_step_end`` (or ``on_epoch_end``); the callback
writes at the next hook (the next step's ``on_step_begin``, the next epoch's ``on_epoch_begin``,
or the end of training), after the Trainer has logged and evaluated that step, as the Trainer's
own checkpoints are, so the saved log history includes the step's loss and the saved random
state is the one the next step draws from.

The Trainer's stateful callbacks (``EarlyStoppingCallback``'s patience counter, ``TrainerControl``)
are saved as the Trainer saves them, in ``trainer_state``'s ``stateful_callbacks``, taken when the
checkpoint is written; with ``restore_callback_states_from_checkpoint=True`` the resumed Trainer sets
them back from there, as from its own checkpoints (its default, False, starts them afresh).

``save_strategy="best"`` is refused unless the Trainer keeps its own folders
(``keep_hf_checkpoints=True``): the Trainer decides such a save after its evaluation and writes its
folder at once, with no hook in between where a callback could take the save over.

Not covered: an fp16 ``GradScaler`` (callbacks are not given it), DeepSpeed and FSDP (the Trainer
loads their states itself from the folder).

transformers is optional and imported here only (``pip install "torchckpt[transformers]"``).
"""

from __future__ import annotations

import dataclasses
import inspect
import json
import logging
import os
import tempfile
import warnings
import weakref
from typing import Any

from transformers import TrainerCallback, TrainerControl, TrainerState, TrainingArguments
from transformers.trainer import TRAINER_STATE_NAME, Trainer
from transformers.trainer_callback import CallbackHandler
from transformers.utils import SAFE_WEIGHTS_INDEX_NAME

from torchckpt._dist import coordinator as dist_coordinator
from torchckpt._paths import as_path, join
from torchckpt._storage.registry import storage_for
from torchckpt._tools import verify as verify_tool
from torchckpt.checkpoint import Checkpoint
from torchckpt.errors import CheckpointError, CheckpointNotFoundError, CorruptCheckpointError, DamagedCheckpointWarning
from torchckpt.manager import CheckpointManager
from torchckpt.reader import load_checkpoint
from torchckpt.rng import RNGState
from torchckpt.run_state import get_checkpoint_state, latest_checkpoint

__all__ = ["TorchckptCallback", "TrainerResumeError"]

try:  # transformers 4.41 and later: callbacks whose state the Trainer saves
    from transformers.trainer_callback import ExportableState

    _EXPORTABLE: tuple[type, ...] = (ExportableState,)
except ImportError:  # pragma: no cover - earlier versions save no callback state
    _EXPORTABLE = ()

TRAINER_STATE = "trainer_state"  # the checkpoint's entry holding the Trainer's state as plain values
STUB_PREFIX = "torchckpt-hf-resume-"  # the resume folder's name starts with this (a temporary folder)
# The Trainer's warning when a folder's weight index lacks the model's keys (this one names none, on purpose)
MISSING_KEYS_WARNING = "There were missing keys in the checkpoint model loaded"
STUB_NOTE = ("Not a model checkpoint: a torchckpt resume folder for Trainer.train(resume_from_checkpoint=...). "
             "It names no tensor; TorchckptCallback restores the weights from {checkpoint}.")


class TrainerResumeError(CheckpointError, ValueError):
    """A resume the callback prepared cannot go on as the checkpoint says.

    Attributes:
        path: the torchckpt checkpoint the resume is from.
        checkpoint_step: the checkpoint's ``global_step`` (None when it has no Trainer state).
        trainer_step: the ``global_step`` the Trainer started at (None when it did not start).
    """

    def __init__(self, message: str, path: str, checkpoint_step: int | None = None,
                 trainer_step: int | None = None) -> None:
        super().__init__(message)
        self.path = path
        self.checkpoint_step = checkpoint_step
        self.trainer_step = trainer_step


class _QuietStubLoad(logging.Filter):
    """Drops the Trainer's "missing keys" warning while it loads the resume folder's empty index:
    every key is missing there by design, and the callback restores them all at ``on_train_begin``.
    Only once the callback that prepared the folder is in a Trainer: given to a Trainer without it,
    the folder would resume from fresh weights, and the Trainer's warning is all that says so."""

    def __init__(self, callback: TorchckptCallback) -> None:
        super().__init__()
        self.callback = weakref.ref(callback)  # the logger outlives it

    def filter(self, record: logging.LogRecord) -> bool:
        callback = self.callback()
        in_trainer = callback is not None and callback._in_trainer
        return not (in_trainer and record.getMessage().startswith(MISSING_KEYS_WARNING))


_TRAINER_LOGGER = logging.getLogger("transformers.trainer")  # the logger Trainer._load_from_checkpoint warns on
# A callback -> the resume it prepared, until its training begins (or it is gone).
_PREPARED: weakref.WeakKeyDictionary[TorchckptCallback, _Resume] = weakref.WeakKeyDictionary()


@dataclasses.dataclass
class _Resume:
    """A resume prepared by ``resume_from``: from which checkpoint, through which stub folder."""

    checkpoint: str
    folder: str
    global_step: int
    rng: dict[str, Any] | None = None  # the saved random state, held until the hook it is set back at
    mid_epoch: bool = False  # the Trainer skips batches, so the state is set back at the first step


class TorchckptCallback(TrainerCallback):
    """Save the Trainer's model, optimizer, scheduler, RNG and state through a :class:`CheckpointManager`,
    and resume from them bit-exact.

    Checkpoints are ``{directory}/ckpt-{global_step}``; each holds ``model``, ``optimizer``,
    ``lr_scheduler``, ``rng`` (:class:`RNGState`) and ``trainer_state`` (the Trainer's
    ``TrainerState`` as the plain dict of its JSON form). On several ranks every rank saves its
    part, as the Trainer's callbacks run on every rank.

    To resume, give a new Trainer a new callback on the same directory and pass
    :meth:`resume_from` to ``train``: it returns None when there is nothing to resume, and the
    Trainer then starts from scratch.

    Args:
        directory: the manager's directory (a local path or an fsspec URL).
        keep_hf_checkpoints: also let the Trainer write its own ``checkpoint-N`` folders.
        **manager_options: passed to :class:`CheckpointManager` (``max_to_keep``, ``async_save``,
            ``keep_checkpoint_every_n_hours``, ``storage_options``, ``timeout_secs``...). Without
            ``max_to_keep``, the Trainer's ``save_total_limit`` applies (None: every checkpoint kept).

    Example:
        >>> callback = TorchckptCallback("runs/gpt2", max_to_keep=3)  # doctest: +SKIP
        >>> trainer = Trainer(model=model, args=args, train_dataset=data, callbacks=[callback])  # doctest: +SKIP
        >>> trainer.train(resume_from_checkpoint=callback.resume_from())  # doctest: +SKIP
    """

    def __init__(self, directory: str | os.PathLike[str], *, keep_hf_checkpoints: bool = False,
                 **manager_options: Any) -> None:
        self.directory = directory
        self.keep_hf_checkpoints = keep_hf_checkpoints
        self._options = manager_options
        self.manager: CheckpointManager | None = None  # built at on_train_begin, when the optimizer exists
        self._resume: _Resume | None = None
        self._in_trainer = False  # a Trainer was built with this callback (on_init_end)
        self._quiet = _QuietStubLoad(self)  # on the Trainer's logger from resume_from() to on_train_begin
        weakref.finalize(self, _TRAINER_LOGGER.removeFilter, self._quiet)  # a resume prepared and never used
        self._pending: int | None = None  # the global step the Trainer decided to save and the callback has not
        self._written: int | None = None  # the global step last saved
        self._handler: CallbackHandler | None = None  # the Trainer's, calling this callback: its stateful callbacks
        self._trainer: weakref.ref[Any] | None = None  # the Trainer calling the handler: its pending flop count

    # -- resuming ------------------------------------------------------------------------

    def resume_from(self, checkpoint: str | os.PathLike[str] | None = None, *, verify: bool = True) -> str | None:
        """A folder for ``Trainer.train(resume_from_checkpoint=...)`` that resumes from a checkpoint.

        The folder is a new temporary one (removed when training begins), holding the
        checkpoint's ``trainer_state.json`` and an empty ``model.safetensors.index.json``: no
        weights, nothing pickled; it names the checkpoint it stands for in its index's metadata.
        The Trainer reads its position from it; this callback, when training begins, restores
        everything else from the checkpoint. Pass the folder to the Trainer this callback is in.

        Without ``checkpoint``, the newest intact checkpoint of ``directory``, as the manager's
        ``restore_or_initialize`` picks it: the Trainer takes its position from the folder before
        the callback restores anything, so the checkpoint is checked here, every byte against its
        checksums (one more read of it; the restore then mostly finds it in the page cache), and
        a damaged one is passed with a :class:`~torchckpt.DamagedCheckpointWarning`.

        Args:
            checkpoint: a checkpoint this callback saved; None: the newest intact one in ``directory``.
            verify: check the checkpoint chosen without ``checkpoint`` (False: take the latest
                unchecked; a damaged one then fails the restore when training begins).

        Returns:
            The folder, or None when ``directory`` holds no checkpoint (a first run).

        Raises:
            CheckpointNotFoundError: ``checkpoint`` is not a committed checkpoint.
            CorruptCheckpointError: every checkpoint of ``directory`` is damaged.
            TrainerResumeError: the checkpoint holds no Trainer state (another writer saved it).
        """
        storage_options = self._options.get("storage_options")
        if checkpoint is not None:
            path: str | None = as_path(checkpoint)
        elif verify:
            path = self._newest_intact(storage_options)
        else:
            path = latest_checkpoint(self.directory, storage_options=storage_options)
        if path is None:
            return None
        if self._resume is not None:  # prepared twice: the first folder is not needed
            self._forget_folder()
            self._resume = None
        try:
            state = load_checkpoint(path, storage_options=storage_options).get_value(TRAINER_STATE)
        except KeyError:
            raise TrainerResumeError(
                f"{path} holds no {TRAINER_STATE!r}: it was not saved by TorchckptCallback, so it does not say where "
                "the Trainer's run stood. Resume from a checkpoint of the callback's directory, or restore this one "
                "with torchckpt.Checkpoint(...).restore.", path) from None
        folder = tempfile.mkdtemp(prefix=STUB_PREFIX)  # this process's own: ranks never share one
        storage = storage_for(folder)
        storage.replace_file(join(folder, TRAINER_STATE_NAME),
                             (json.dumps(state, indent=2, sort_keys=True) + "\n").encode(), None)
        index = {"metadata": {"torchckpt": STUB_NOTE.format(checkpoint=path)}, "weight_map": {}}
        storage.replace_file(join(folder, SAFE_WEIGHTS_INDEX_NAME), json.dumps(index, indent=2).encode(), None)
        self._resume = _PREPARED[self] = _Resume(path, folder, int(state["global_step"]))
        _TRAINER_LOGGER.addFilter(self._quiet)
        return folder

    def _forget_folder(self) -> None:
        """Remove the prepared folder (the Trainer has read it) and stop quieting the Trainer's logger."""
        assert self._resume is not None
        _TRAINER_LOGGER.removeFilter(self._quiet)
        _PREPARED.pop(self, None)
        storage_for(self._resume.folder).delete_checkpoint(self._resume.folder)

    def _refuse_anothers_resume(self, state: TrainerState) -> None:
        """A Trainer that resumed from a folder another callback prepared would train on from the
        weights it was built with: the folder holds none, and only the callback that prepared it
        restores them. Refused before anything is restored or saved into the directory."""
        theirs = [r for owner, r in _PREPARED.items() if owner is not self and r.global_step == state.global_step]
        if theirs:
            raise TrainerResumeError(
                f"This Trainer resumed at global step {state.global_step} from a folder another TorchckptCallback "
                f"prepared ({theirs[0].folder}, for {theirs[0].checkpoint}): only the callback whose resume_from() "
                "made the folder restores the model, optimizer, scheduler and random state, so this run would go on "
                "from fresh weights. Give the Trainer that same callback: cb = TorchckptCallback(dir); "
                "Trainer(..., callbacks=[cb]).train(resume_from_checkpoint=cb.resume_from()).",
                theirs[0].checkpoint, theirs[0].global_step, state.global_step)

    def on_init_end(self, args: TrainingArguments, state: TrainerState, control: TrainerControl,
                    **kwargs: Any) -> None:
        """A Trainer holds this callback: its load of a folder :meth:`resume_from` prepared is quiet."""
        self._in_trainer = True

    def _check_position(self, state: TrainerState) -> None:
        """The Trainer starts where the prepared checkpoint stood, or the resume is refused."""
        resume = self._resume
        assert resume is not None
        self._forget_folder()
        if state.global_step != resume.global_step:
            self._resume = None
            raise TrainerResumeError(
                f"TorchckptCallback.resume_from() prepared a resume from {resume.checkpoint} (global step "
                f"{resume.global_step}), but the Trainer started at global step {state.global_step}: pass the "
                "folder resume_from() returned to this Trainer's train(resume_from_checkpoint=...).",
                resume.checkpoint, resume.global_step, state.global_step)

    def _restore(self, args: TrainingArguments, state: TrainerState, train_dataloader: Any) -> None:
        """Set the model, optimizer, scheduler and random state back from the prepared checkpoint."""
        resume = self._resume
        assert resume is not None and self.manager is not None
        _without_rng_of_other_ranks(self.manager.checkpoint.restore(resume.checkpoint)).assert_consumed()
        resume.rng = RNGState().state_dict()  # as restored: set back again where the saving run stood
        resume.mid_epoch = _skips_batches(args, state, train_dataloader)

    # -- the Trainer's hooks --------------------------------------------------------------

    def _newest_intact(self, storage_options: dict[str, Any] | None) -> str | None:
        """The latest checkpoint of ``directory``, or the newest before it whose every byte checks."""
        found = get_checkpoint_state(self.directory, storage_options=storage_options)
        if found is None or found.latest is None:
            return None
        candidates = list(dict.fromkeys([found.latest, *reversed(found.all)]))
        for i, path in enumerate(candidates):
            try:
                problems = verify_tool.verify(load_checkpoint(path, storage_options=storage_options))
            except (CheckpointNotFoundError, CorruptCheckpointError) as e:
                problems = [str(e)]
            if not problems:
                return path
            warnings.warn(DamagedCheckpointWarning(path, problems[0], candidates[i + 1] if i + 1 < len(candidates)
                                                   else None), stacklevel=3)
        raise CorruptCheckpointError(f"Every checkpoint of {self.directory} is damaged ({', '.join(candidates)}), so "
                                     "there is nothing to resume from: see the warnings for what is wrong with each; "
                                     "restore an older copy, or move them away to start afresh.", self.directory)

    def on_train_begin(self, args: TrainingArguments, state: TrainerState, control: TrainerControl,
                       **kwargs: Any) -> None:
        """Track the objects the Trainer trains (they exist from here on), open the manager, and
        restore them when :meth:`resume_from` prepared a resume.

        Raises:
            TrainerResumeError: a resume was prepared, and the Trainer starts at another step.
            RestoreMismatchError: the checkpoint's objects do not match the Trainer's (another model).
        """
        missing = [name for name in ("model", "optimizer", "lr_scheduler") if kwargs.get(name) is None]
        if missing:
            raise ValueError(f"TorchckptCallback: the Trainer passed no {', '.join(missing)} to on_train_begin; this "
                             "callback needs transformers' Trainer (or a subclass that passes them to its callbacks).")
        if args.load_best_model_at_end and not self.keep_hf_checkpoints:  # the Trainer finds it among its own folders
            raise ValueError(
                "TorchckptCallback: load_best_model_at_end=True needs the Trainer's own checkpoint folders, which this "
                "callback replaces: the Trainer would end with the last weights and say nothing. Pass "
                "keep_hf_checkpoints=True (the Trainer then writes its folders too), or set "
                "load_best_model_at_end=False.")
        if args.save_strategy == "best" and not self.keep_hf_checkpoints:
            raise ValueError(
                "TorchckptCallback: save_strategy='best' makes the Trainer decide a save after its evaluation and write "
                "its own (pickled) checkpoint-N folder at once, with no hook in between where this callback could take "
                "the save over: the run would save nothing here. Use save_strategy='steps' or 'epoch', or pass "
                "keep_hf_checkpoints=True (the Trainer writes its folders, and this callback saves at each of them too).")
        self._handler, trainer = _calling_handler(self)
        self._trainer = weakref.ref(trainer) if trainer is not None else None
        others = sorted(set(_recorded_callbacks(state)) - {"TrainerControl"})
        if self._handler is None and others:
            warnings.warn(
                "TorchckptCallback was not called by transformers' CallbackHandler, so it cannot reach the Trainer's "
                f"stateful callbacks ({', '.join(others)}): their state is saved as it was when training began.",
                stacklevel=2)
        if self._resume is not None:
            self._check_position(state)
        elif state.global_step:
            self._refuse_anothers_resume(state)
        ckpt = Checkpoint(model=kwargs["model"], optimizer=kwargs["optimizer"], lr_scheduler=kwargs["lr_scheduler"],
                          rng=RNGState(), trainer_state=_plain_state(state))
        options = dict(self._options)
        options.setdefault("max_to_keep", args.save_total_limit)  # the Trainer's own retention, unless told otherwise
        self.manager = CheckpointManager(ckpt, self.directory, **options)
        if self._resume is not None:
            try:
                self._restore(args, state, kwargs.get("train_dataloader"))
            except BaseException:
                self.manager.close()  # the directory is free for the next attempt
                self.manager, self._resume = None, None
                raise

    def on_epoch_begin(self, args: TrainingArguments, state: TrainerState, control: TrainerControl,
                       **kwargs: Any) -> None:
        """Write a save due from the last epoch; on a resume, set the random state back.

        Here, before the epoch's loader draws its seed from the global generator, is where an
        uninterrupted run saved at an epoch's end stands. A run saved mid-epoch stood after that
        draw: the Trainer skips to it, and the state is set back again at the first step.
        """
        self._write_pending(state, control)
        resume = self._resume
        if resume is not None and resume.rng is not None:
            RNGState().load_state_dict(resume.rng)
            if not resume.mid_epoch:
                self._resume = None

    def on_step_begin(self, args: TrainingArguments, state: TrainerState, control: TrainerControl,
                      **kwargs: Any) -> None:
        """Write a save due from the last step; on a mid-epoch resume, set the random state back
        (the batches are skipped and the next one fetched: the saving run stood here)."""
        self._write_pending(state, control)
        resume = self._resume
        if resume is not None and resume.rng is not None:
            RNGState().load_state_dict(resume.rng)
            self._resume = None

    def on_step_end(self, args: TrainingArguments, state: TrainerState, control: TrainerControl,
                    **kwargs: Any) -> TrainerControl:
        return self._take_save(state, control)

    def on_epoch_end(self, args: TrainingArguments, state: TrainerState, control: TrainerControl,
                     **kwargs: Any) -> TrainerControl:
        if control.should_training_stop:  # no step follows: the step's log and evaluation are done
            self._write_pending(state, control)
        return self._take_save(state, control)

    def on_save(self, args: TrainingArguments, state: TrainerState, control: TrainerControl,
                **kwargs: Any) -> None:
        """The Trainer saved its own folder (``keep_hf_checkpoints=True``): a save decided after its
        evaluation (``save_strategy="best"``) is taken here, and written at the next hook."""
        if self.keep_hf_checkpoints and self.manager is not None and self._pending is None \
                and state.global_step != self._written:
            self._pending = state.global_step

    def on_train_end(self, args: TrainingArguments, state: TrainerState, control: TrainerControl,
                     **kwargs: Any) -> None:
        """Write a save still due, wait for a background save, and release the directory."""
        if self.manager is not None:
            self._write_pending(state, control)
            self.manager.wait_until_finished()
            self.manager.close()

    def _take_save(self, state: TrainerState, control: TrainerControl) -> TrainerControl:
        """Take over a save the Trainer decided (``DefaultFlowCallback`` ran first and set ``should_save``)."""
        if not control.should_save or self.manager is None:
            return control
        if self._pending is None and state.global_step != self._written:  # not twice for one step
            self._pending = state.global_step
        if not self.keep_hf_checkpoints:
            control.should_save = False
        return control

    def _write_pending(self, state: TrainerState, control: TrainerControl) -> None:
        if self._pending is None or self.manager is None:
            return
        self._pending, self._written = None, state.global_step
        trainer = self._trainer() if self._trainer is not None else None
        if trainer is not None:  # the Trainer's own save folds the flops counted since its last log in, as here
            trainer.store_flos()
        self.manager.checkpoint.trainer_state = _plain_state(state, _callback_states(self._handler, control, state))
        self.manager.save(checkpoint_number=state.global_step, check_interval=False)


def _skips_batches(args: TrainingArguments, state: TrainerState, train_dataloader: Any) -> bool:
    """Whether the Trainer resumes inside an epoch, skipping its first batches (as ``Trainer``
    computes it: the global step modulo the optimizer steps per epoch)."""
    if args.ignore_data_skip:
        return False
    try:
        batches = len(train_dataloader)
    except TypeError:  # no length (an iterable dataset): the Trainer counts max_steps steps per epoch
        return state.global_step % max(state.max_steps, 1) != 0
    accumulation = args.gradient_accumulation_steps
    per_epoch = max(batches // accumulation + int(batches % accumulation > 0), 1)
    return state.global_step % per_epoch != 0


def _plain_state(state: TrainerState, callbacks: dict[str, Any] | None = None) -> dict[str, Any]:
    """The Trainer's state as plain values: the JSON ``TrainerState.save_to_json`` writes, parsed;
    ``callbacks``: the stateful callbacks' state as of now, in place of ``stateful_callbacks``."""
    fields = dataclasses.asdict(state)
    if callbacks is not None:
        fields["stateful_callbacks"] = callbacks
    plain: dict[str, Any] = json.loads(json.dumps(fields))
    return plain


def _is_exportable(callback: Any) -> bool:
    """Whether the Trainer saves ``callback``'s state (``ExportableState``: ``EarlyStoppingCallback``, ``TrainerControl``)."""
    return isinstance(callback, _EXPORTABLE)


def _recorded_callbacks(state: TrainerState) -> dict[str, Any]:
    """``state.stateful_callbacks``: a dict once the state is built (its annotation says list)."""
    recorded: Any = state.stateful_callbacks
    return recorded if isinstance(recorded, dict) else {}


def _calling_handler(callback: TrainerCallback) -> tuple[CallbackHandler | None, Any]:
    """The Trainer's ``CallbackHandler`` calling ``callback``'s hook now (a frame or two up), and the
    ``Trainer`` calling that handler (a frame or two further up); None for either not found.

    The Trainer hands its callbacks neither itself nor the other callbacks, and it refreshes the
    stateful ones' state (``ExportableState``) and folds its pending flop count into
    ``state.total_flos`` only inside its own save, which this callback replaces: the handler and
    the Trainer are where they are."""
    frame = inspect.currentframe()
    handler: CallbackHandler | None = None
    try:
        caller = frame.f_back.f_back if frame is not None and frame.f_back is not None else None
        for _ in range(8):  # call_event and the Trainer's loop, under a subclass's wrapper or two
            if caller is None:
                break
            owner = caller.f_locals.get("self")
            if handler is None and isinstance(owner, CallbackHandler) and any(cb is callback for cb in owner.callbacks):
                handler = owner
            elif handler is not None and isinstance(owner, Trainer) and owner.callback_handler is handler:
                return handler, owner
            caller = caller.f_back
        return handler, None
    finally:
        del frame


def _callback_states(handler: CallbackHandler | None, control: TrainerControl, state: TrainerState) -> dict[str, Any]:
    """The stateful callbacks' state now, as ``TrainerState`` records it (a list for several of one
    class); without the handler, ``TrainerControl``'s now and the others' as the state holds them."""
    out: dict[str, Any] = {} if handler is not None else dict(_recorded_callbacks(state))
    if handler is not None:
        callbacks: list[Any] = [*handler.callbacks, control]
        for cb in callbacks:
            if _is_exportable(cb):
                name, now = type(cb).__name__, cb.state()
                out[name] = [*(out[name] if isinstance(out[name], list) else [out[name]]), now] if name in out else now
    elif hasattr(control, "state"):
        out["TrainerControl"] = control.state()
    return out


def _without_rng_of_other_ranks(status: Any) -> Any:
    """``status`` without the random state a rank has none of (a run of fewer processes resumed on
    more): it keeps its own, with a warning, as the Trainer's own resume does."""
    reason = status.report.skipped_objects.get("rng", "")
    if "has no saved value" in reason:
        ranks = status.report.ranks.get("rng", [])
        if not ranks or dist_coordinator.default_rank() in ranks:
            warnings.warn(f"{status.path}: {reason}; this process keeps its own random state, so the run is not "
                          "reproducible from here exactly.", stacklevel=3)
        del status.report.skipped_objects["rng"]
        status.report.missing_keys[:] = [k for k in status.report.missing_keys if k != "rng"]
    return status
