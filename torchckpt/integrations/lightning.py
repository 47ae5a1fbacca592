"""Lightning checkpoints as torchckpt checkpoints: a ``CheckpointIO`` plugin, a loader, and a callback.

``Trainer(plugins=[TorchckptCheckpointIO()])`` makes every checkpoint Lightning writes (those of
``ModelCheckpoint``, ``Trainer.save_checkpoint``, ``OnExceptionCheckpoint``) a torchckpt checkpoint
directory at the path Lightning chooses: ``epoch=3-step=40.ckpt`` is then a directory of
safetensors shards and a JSON index, written atomically and never pickled, and it is read back
as the very dict Lightning saved (same keys in the same order, same types and dtypes).

Why a plugin and not a callback: ``CheckpointIO`` is the one seam Lightning routes every save,
load and removal through, so top-k retention, ``save_last``, ``every_n_train_steps`` and
``fit(ckpt_path="last"/"best")`` keep working unchanged, with Lightning deciding the names.

Three things differ from Lightning's default, each on purpose:

- Values that would need their code to load (an ``Enum`` member, a dataclass instance, a named
  tuple, a class), which ``save_state`` refuses, are saved in their plain form (the member's
  value, ``dataclasses.asdict``, ``_asdict()``, the class's qualified name) with one :class:`PlainFormWarning` naming their keys, so training
  never stops at a save over a hyperparameter. They come back in that form.
- ``save_last="link"``: Lightning makes ``last.ckpt`` a symbolic link to the newest checkpoint.
  torchckpt never follows links inside a checkpoint; this plugin reads Lightning's link itself,
  and follows it only to a sibling checkpoint directory of the same folder (the only kind
  Lightning makes); any other link is refused. Removing a checkpoint never follows a link.
- ``LightningModule.load_from_checkpoint`` opens the path as a file, and fails with
  ``IsADirectoryError`` on a directory: :func:`load_from_checkpoint` here does the same job.

Under DDP Lightning saves and removes on global rank 0 alone, so the plugin's saves are of that
process alone (no exchange with ranks that do not call it). :class:`RNGStateCallback` carries
the random state Lightning does not keep, so that a resumed fit is bit-equal to an
uninterrupted one.

Lightning's link lives in Lightning's folder, made by ``ModelCheckpoint`` with ``os.symlink``; so
this module reads and removes that link (and nothing else) itself, the only file calls outside
``torchckpt._storage`` (``tests/test_layering.py`` names them).
"""

from __future__ import annotations

import argparse
import dataclasses
import enum
import inspect
import os
import warnings
from collections import Counter, OrderedDict
from typing import Any, TypeVar

import lightning.pytorch as pl
import torch
from lightning.fabric.plugins.io.checkpoint_io import CheckpointIO

from torchckpt._format import keypath, spec
from torchckpt._history import members as history_members
from torchckpt._paths import as_path, is_url, join, name_of, parent_of
from torchckpt._storage.registry import storage_for
from torchckpt.errors import CheckpointNotFoundError, CheckpointWriteError
from torchckpt.rng import RNGState
from torchckpt.state_dicts import load_state, save_state

__all__ = ["PlainFormWarning", "RNGStateCallback", "TorchckptCheckpointIO", "load_from_checkpoint"]

_Loadable = TypeVar("_Loadable", pl.LightningModule, pl.LightningDataModule)
# Keys Lightning's CLI puts into hyperparameters to name a function that builds the module: never run.
_INSTANTIATOR_KEYS = ("_instantiator", "_class_path")


class PlainFormWarning(UserWarning):
    """Values were saved in their plain form, as loading their own type would need its code.

    Attributes:
        keys: the ``/``-joined key paths of the converted values (``hyper_parameters/mode``).
    """

    def __init__(self, message: str, keys: list[str]) -> None:
        super().__init__(message)
        self.keys = keys


class TorchckptCheckpointIO(CheckpointIO):
    """Lightning's checkpoints written and read by torchckpt: ``Trainer(plugins=[TorchckptCheckpointIO()])``.

    Each checkpoint is a torchckpt checkpoint directory at the path Lightning chooses, written
    atomically (a checkpoint replaced in place, ``last.ckpt``, is replaced in one step); loading
    gives back the dict Lightning saved, exactly. It also works under Lightning's
    ``AsyncCheckpointIO(TorchckptCheckpointIO())``.

    Under DDP (any strategy that gathers the whole state on one rank) Lightning calls
    ``save_checkpoint`` and ``remove_checkpoint`` on global rank 0 alone, then holds every rank at a
    barrier; so the plugin saves from the calling process alone (``save_state(...,
    process_group=False)``), never waiting for ranks that do not call it. ``load_checkpoint`` runs
    on every rank at a resume, and reads without any exchange between them.

    Args:
        max_shard_size: bytes per shard, or a string such as ``"2GB"`` (see ``save_state``).

    Example:
        >>> import lightning.pytorch as pl
        >>> from torchckpt.integrations.lightning import TorchckptCheckpointIO
        >>> trainer = pl.Trainer(plugins=[TorchckptCheckpointIO()], logger=False, enable_progress_bar=False)
    """

    def __init__(self, *, max_shard_size: int | str = spec.DEFAULT_MAX_SHARD_SIZE) -> None:
        self.max_shard_size = max_shard_size
        self._warned: set[tuple[str, ...]] = set()

    def save_checkpoint(self, checkpoint: dict[str, Any], path: str | os.PathLike[str],
                        storage_options: Any | None = None) -> None:
        """Write Lightning's ``checkpoint`` dict as a torchckpt checkpoint directory at ``path``.

        Args:
            checkpoint: what ``Trainer`` dumped (model, optimizers, loops, callbacks, hyperparameters).
            path: the checkpoint's path; its parent directory is created if missing.
            storage_options: fsspec options when ``path`` is a URL.

        Raises:
            UnsupportedStateError: a value with neither a stored nor a plain form (an ``nn.Module``
                in the hyperparameters, say); its key is named and nothing is written.
        """
        path = as_path(path)
        state, converted = plain_form(checkpoint)
        if converted:
            self._warn_once(converted)
        if _is_link(path):  # Lightning's ``last`` link, now saved for real: the link goes, never its target
            os.unlink(path)
        # Lightning calls this on global rank 0 alone (the other ranks wait at its barrier): a save of
        # this process alone, where a save under torch.distributed would wait for every rank.
        save_state(state, path, max_shard_size=self.max_shard_size, storage_options=storage_options,
                   process_group=False)

    def load_checkpoint(self, path: str | os.PathLike[str], map_location: Any | None = None,
                        weights_only: bool | None = None) -> dict[str, Any]:
        """The dict :meth:`save_checkpoint` wrote at ``path``, as Lightning saved it.

        Args:
            path: a checkpoint directory, or Lightning's ``last`` link to a sibling one.
            map_location: a device (``"cpu"``, ``"cuda:0"``, ``torch.device``) to put the tensors
                on; None or a function (Lightning's default) leaves them on the CPU, and Lightning
                moves the state to the model's device as it restores it.
            weights_only: accepted for Lightning's signature; a torchckpt checkpoint holds only
                tensors and plain values, so loading never runs code either way.

        Raises:
            CheckpointNotFoundError: nothing readable at ``path``, or a link that is not Lightning's.
            TypeError: ``map_location`` is a dict (a device remapping), which is not supported.
        """
        return load_state(resolve_link(as_path(path)), map_location=_device(map_location))

    def remove_checkpoint(self, path: str | os.PathLike[str]) -> None:
        """Remove the checkpoint directory ``path``; a link is removed itself, never its target.

        Nothing there is not an error (as with Lightning's default).

        Raises:
            CheckpointNotFoundError: ``path`` holds something that is not a torchckpt checkpoint
                (a file, an unfinished directory, a link that Lightning did not make), left as it is.
            CheckpointWriteError: ``path`` cannot be listed (its ``errno``), left as it is.
        """
        path = as_path(path)
        if _is_link(path):
            resolve_link(path, must_exist=False)  # refuses a link that is not Lightning's
            os.unlink(path)
            return
        storage = storage_for(path)
        if not storage.exists(path):
            return
        try:
            ours = storage.is_dir(path) and storage.is_file(join(path, spec.INDEX_FILE)) \
                and not history_members.foreign_files(path, storage)  # not someone's folder with an index.json
        except OSError as e:  # a folder it may not list
            raise CheckpointWriteError(f"Cannot remove {path}: {e.strerror or e}.", path, e) from e
        if not ours:
            raise CheckpointNotFoundError(
                f"Refusing to remove {path}: it is not a torchckpt checkpoint (no directory holding the "
                f"{spec.INDEX_FILE} torchckpt writes), so TorchckptCheckpointIO did not write it. Remove it yourself if it should go, "
                "or point ModelCheckpoint(dirpath=...) at a folder of its own.", path)
        storage.delete_checkpoint(path)

    def _warn_once(self, converted: dict[str, str]) -> None:
        keys = tuple(converted)
        if keys in self._warned:
            return
        self._warned.add(keys)
        listed = ", ".join(f"{k!r} ({how})" for k, how in converted.items())
        warnings.warn(PlainFormWarning(
            f"TorchckptCheckpointIO saved {len(keys)} value(s) in their plain form, as loading their own type would "
            f"need its code, which a checkpoint never runs: {listed}. They load back in that form: load_from_checkpoint passes them to __init__ "
            "as such, so rebuild them there (Mode(mode)) or pass the object itself as a keyword "
            "(load_from_checkpoint(cls, path, mode=Mode.FAST)).", list(keys)), stacklevel=2)


def load_from_checkpoint(cls: type[_Loadable], path: str | os.PathLike[str], *,
                         map_location: str | torch.device | None = None, strict: bool | None = None,
                         **kwargs: Any) -> _Loadable:
    """Build ``cls`` from a checkpoint :class:`TorchckptCheckpointIO` wrote, as
    ``cls.load_from_checkpoint`` does from a file (which fails on a directory).

    A ``LightningModule`` is built from the checkpoint's ``hyper_parameters`` (``kwargs`` override
    them), gets its ``on_load_checkpoint`` hook and its ``state_dict``; a ``LightningDataModule``
    from its ``datamodule_hyper_parameters`` and its own state. Values that were saved in their
    plain form (:class:`PlainFormWarning`) come to ``__init__`` in that form. A function the
    hyperparameters name to build the module (Lightning CLI's ``_instantiator``) is never
    imported: ``cls`` itself is called.

    Args:
        cls: the ``LightningModule`` or ``LightningDataModule`` class.
        path: a checkpoint directory, or Lightning's ``last`` link to one.
        map_location: the device for the weights (None: the CPU).
        strict: as for ``load_state_dict`` (None: the module's ``strict_loading``, else True).
        **kwargs: ``__init__`` arguments that replace the saved hyperparameters.

    Raises:
        CheckpointNotFoundError: nothing readable at ``path``.
        TypeError: ``cls`` is neither a ``LightningModule`` nor a ``LightningDataModule`` class.

    Example:
        >>> model = load_from_checkpoint(MyModule, "checkpoints/epoch=3-step=40.ckpt")  # doctest: +SKIP
    """
    if not (isinstance(cls, type) and issubclass(cls, (pl.LightningModule, pl.LightningDataModule))):
        raise TypeError(f"load_from_checkpoint builds a LightningModule or LightningDataModule class, not {cls!r}.")
    checkpoint = load_state(resolve_link(as_path(path)), map_location=map_location)
    obj = cls(**_init_arguments(cls, checkpoint, kwargs))
    if isinstance(obj, pl.LightningDataModule):
        if type(obj).__qualname__ in checkpoint:
            obj.load_state_dict(checkpoint[type(obj).__qualname__])
        return obj
    if strict is None:
        strict = True if obj.strict_loading is None else obj.strict_loading
    if type(obj).configure_model is not pl.LightningModule.configure_model:
        obj.configure_model()
    obj.on_load_checkpoint(checkpoint)
    obj.load_state_dict(checkpoint["state_dict"], strict=strict)
    return obj if map_location is None else obj.to(map_location)


def _init_arguments(cls: type[Any], checkpoint: dict[str, Any], overrides: dict[str, Any]) -> dict[str, Any]:
    """The keyword arguments ``cls.__init__`` is called with: the saved hyperparameters (under the
    one argument that took them whole, where ``save_hyperparameters`` recorded one), then ``overrides``,
    kept to the arguments ``__init__`` takes unless it takes ``**kwargs``."""
    saved = dict(checkpoint.get(cls.CHECKPOINT_HYPER_PARAMS_KEY) or {})
    for key in _INSTANTIATOR_KEYS:
        saved.pop(key, None)
    parameters = inspect.signature(cls.__init__).parameters
    named = [n for i, (n, p) in enumerate(parameters.items())
             if i and p.kind not in (inspect.Parameter.VAR_POSITIONAL, inspect.Parameter.VAR_KEYWORD)]
    whole = checkpoint.get(cls.CHECKPOINT_HYPER_PARAMS_NAME)
    arguments: dict[str, Any] = {whole: saved} if whole in named else saved
    arguments.update(overrides)
    if any(p.kind is inspect.Parameter.VAR_KEYWORD for p in parameters.values()):
        return arguments
    return {k: v for k, v in arguments.items() if k in named}



# -- random state, for a resume bit-exact against an uninterrupted run ---------------------------


class RNGStateCallback(pl.Callback):
    """Carries the random state through Lightning's checkpoints, so a resumed fit draws what an
    uninterrupted one would: ``Trainer(callbacks=[RNGStateCallback(generator)])``.

    Lightning saves neither the global generators (Python, NumPy, torch, CUDA: dropout,
    augmentation) nor a loader's generator as it is now. It does save a torchdata
    ``StatefulDataLoader``'s position (``loader.state_dict()``, in its fit loop's state), and
    torchdata resumes the epoch from it; but it rebuilds the epoch's permutation from the state the
    generator had when the epoch began, so the generator ends one draw short of an uninterrupted
    run's (the iterator's ``_base_seed`` draw is not replayed), and every later epoch shuffles
    differently. This callback saves a :class:`~torchckpt.RNGState` and each generator's state
    with the checkpoint (as its Lightning ``state_dict``), and sets them back where each matters:

    - the generators at once on load: a fit resumed from an epoch's end builds the next epoch's
      iterator from them before any hook runs;
    - the global generators at ``on_train_start``, the last hook before the first batch, and the
      loader generators again there when Lightning resumed mid-epoch (its resumed iterator has
      drawn from them by then).

    A loader resumes its position mid-epoch only as a ``StatefulDataLoader`` (a plain
    ``DataLoader`` finishes the epoch in a new order), and only with a generator of its own
    (without one, each iterator draws its seed from the global generator, set back later).
    One process: under DDP Lightning saves rank 0's callback states alone, while each rank has
    random states of its own.

    Args:
        *generators: the ``torch.Generator`` of each training loader (``StatefulDataLoader(...,
            generator=g)``), the same objects, in the same order, at the save and at the resume.

    Raises:
        TypeError: an argument is not a ``torch.Generator``.

    Example:
        >>> import torch
        >>> from torchckpt.integrations.lightning import RNGStateCallback
        >>> generator = torch.Generator().manual_seed(0)  # StatefulDataLoader(..., shuffle=True, generator=generator)
        >>> callback = RNGStateCallback(generator)        # pl.Trainer(callbacks=[callback], ...)
    """

    def __init__(self, *generators: torch.Generator) -> None:
        wrong = [type(g).__name__ for g in generators if not isinstance(g, torch.Generator)]
        if wrong:
            raise TypeError(f"RNGStateCallback takes the training loaders' torch.Generator objects, not {wrong[0]}: "
                            "RNGStateCallback(generator) with StatefulDataLoader(..., generator=generator).")
        self.generators = generators
        self._rng = RNGState()
        self._to_restore: dict[str, Any] | None = None

    def state_dict(self) -> dict[str, Any]:
        # Lightning asks for it after its loops' state (loader.state_dict() may draw to build an iterator).
        return {"rng": self._rng.state_dict(), "generators": [g.get_state() for g in self.generators]}

    def load_state_dict(self, state_dict: dict[str, Any]) -> None:
        """Set the generators back now, and keep the rest for ``on_train_start``.

        Raises:
            ValueError: the checkpoint holds another number of generators than this callback has.
        """
        saved = state_dict["generators"]
        if len(saved) != len(self.generators):
            raise ValueError(
                f"The checkpoint holds the state of {len(saved)} loader generator(s), and this RNGStateCallback was "
                f"given {len(self.generators)}: pass the same generators, in the same order, as the run that saved it.")
        for generator, generator_state in zip(self.generators, saved):
            generator.set_state(generator_state)
        self._to_restore = state_dict

    def on_train_start(self, trainer: pl.Trainer, pl_module: pl.LightningModule) -> None:
        if self._to_restore is None:
            return
        state, self._to_restore = self._to_restore, None
        self._rng.load_state_dict(state["rng"])
        if trainer.fit_loop.restarting:  # mid-epoch: Lightning resumed the loaders' positions, drawing from them
            for generator, generator_state in zip(self.generators, state["generators"]):
                generator.set_state(generator_state)


# -- plain forms ------------------------------------------------------------------------------


def plain_form(checkpoint: dict[str, Any]) -> tuple[dict[str, Any], dict[str, str]]:
    """``checkpoint`` with every value that would need its code to load replaced by its plain form,
    and what was replaced (key path -> how). Containers are copied only where something inside changed.

    Plain forms: an ``Enum`` member -> its value; a dataclass instance -> ``dataclasses.asdict``;
    a named tuple -> ``_asdict()``; a class -> its qualified name (``"pkg.mod.Name"``). What the
    tree stores as its nearest type (a path, a NumPy value, an ``argparse.Namespace``, a dict
    subclass) is left to it; anything else (a module, a function) is left for the save to refuse
    by its key.
    """
    converted: dict[str, str] = {}
    return _plain(checkpoint, "", converted), converted


def _plain(value: Any, path: str, converted: dict[str, str]) -> Any:
    if isinstance(value, torch.Tensor) or value is None or type(value) in (bool, int, float, str):
        return value
    form = _plain_leaf(value)
    if form is not None:
        how, plain = form
        converted[path] = how
        return _plain(plain, path, converted)
    if isinstance(value, (dict, argparse.Namespace)):
        items = value if isinstance(value, dict) else vars(value)
        out = {k: _plain(v, keypath.join(path, keypath.key_part(k)), converted) for k, v in items.items()}
        if all(out[k] is v for k, v in items.items()):
            return value
        copy = type(value)() if type(value) in (dict, OrderedDict, Counter) else {}  # the tree's own types
        copy.update(out)
        return copy
    if type(value) in (list, tuple):
        plain_items = [_plain(v, keypath.join(path, str(i)), converted) for i, v in enumerate(value)]
        if all(a is b for a, b in zip(plain_items, value)):
            return value
        return type(value)(plain_items)
    return value


def _plain_leaf(value: Any) -> tuple[str, Any] | None:
    """(how, plain form) of a value that would need its code to load, or None to keep it."""
    if isinstance(value, enum.Enum):
        return f"the {type(value).__qualname__} member -> its value", value.value
    if isinstance(value, type):
        return "a class -> its qualified name", f"{value.__module__}.{value.__qualname__}"
    if dataclasses.is_dataclass(value) and not isinstance(value, type):
        return f"a {type(value).__qualname__} dataclass -> a dict", dataclasses.asdict(value)
    if isinstance(value, tuple) and hasattr(value, "_asdict"):
        return f"a {type(value).__qualname__} named tuple -> a dict", value._asdict()
    return None


# -- paths ------------------------------------------------------------------------------------


def _is_link(path: str) -> bool:
    return not is_url(path) and os.path.islink(path)


def resolve_link(path: str, *, must_exist: bool = True) -> str:
    """``path``, or where Lightning's link at ``path`` points: a sibling checkpoint directory.

    ``ModelCheckpoint(save_last="link")`` makes ``last.ckpt`` a relative link to the newest
    checkpoint of the same folder; torchckpt follows such a link (one that names a sibling by its
    plain name), and refuses any other, so a link can never lead a load or a removal elsewhere.

    Raises:
        CheckpointNotFoundError: a link that is not Lightning's, or (with ``must_exist``) one whose
            checkpoint is gone or is not a real directory.
    """
    if not _is_link(path):
        return path
    target = os.readlink(path)
    if not target or target in (os.curdir, os.pardir) or os.sep in target or (os.altsep and os.altsep in target):
        raise CheckpointNotFoundError(
            f"{path} is a link to {target!r}, not to a sibling checkpoint of its folder; the Lightning plugin follows "
            "only the links ModelCheckpoint(save_last='link') makes. Pass the checkpoint's own path instead.", path)
    sibling = join(parent_of(path), target)
    if must_exist and not storage_for(sibling).is_dir(sibling):
        raise CheckpointNotFoundError(
            f"{path} links to {name_of(sibling)}, which is not a checkpoint directory (removed by top-k retention "
            "since, or replaced). Resume from another checkpoint of the folder.", sibling)
    return sibling


def _device(map_location: Any) -> str | torch.device | None:
    if map_location is None or callable(map_location):
        return None
    if isinstance(map_location, (str, torch.device)):
        return map_location
    raise TypeError(f"TorchckptCheckpointIO takes map_location as a device (str or torch.device), a function or None, "
                    f"not {type(map_location).__name__}; load on one device and move the tensors.")

