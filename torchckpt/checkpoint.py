"""``Checkpoint``: named modules, optimizers, schedulers, RNG state and plain values, saved as one.

Why nothing is pickled: ``torch.load`` of a pickle runs whatever code the file names, so loading a
checkpoint from a stranger can own the machine. A torchckpt checkpoint holds only safetensors
shards (raw tensor bytes) and JSON (see ``_format.tree``), and loading one never imports or calls
anything named by the file. A value that has no such representation is refused at save time,
with its full key path, before anything is written.
"""

from __future__ import annotations

import os
from collections import OrderedDict
from collections.abc import Callable
from typing import Any

import torch

from torchckpt._dist import coordinator as dist_coordinator
from torchckpt._dist import dtensor as dist_dtensor
from torchckpt._dist.coordinator import AnyCoordinator
from torchckpt._format import keypath, spec
from torchckpt._format import tree as format_tree
from torchckpt._format.per_rank import without_per_rank
from torchckpt._history import members as history_members
from torchckpt._history import state as history_state
from torchckpt._load import loaders, restorer
from torchckpt._load.match import Tracking, is_stateful
from torchckpt._load.plan import Plan
from torchckpt._load.rename import Rename, Renamer, call_argument
from torchckpt._load.report import MismatchReport
from torchckpt._paths import as_directory, as_path, join, name_of, parent_of
from torchckpt._save import capture as save_capture
from torchckpt._save import saver
from torchckpt._save.background import AsyncWriter  # imported with the package: its exit hook must be registered early
from torchckpt._save.options import FailedAfterCommit, SaveHooks, SaveOptions, save_arguments
from torchckpt._storage.base import Storage
from torchckpt._storage.registry import storage_for
from torchckpt.errors import CheckpointNotFoundError
from torchckpt.restore import RestoreStatus
from torchckpt.rng import RNGState

__all__ = ["Checkpoint"]

PathLike = str | os.PathLike[str]


def restore_call(process_group: Any, timeout_secs: float | None, save_path: PathLike | None, call: str,
                 **options: Any) -> AnyCoordinator:
    """The call of a restore: begun on every rank (its arguments compared), or a single process's."""
    path = None if save_path is None else as_path(save_path)
    return dist_coordinator.coordinator_for(process_group, timeout_secs).call(
        f"Restoring {path}", {"call": call, "path": path, **options})


def _is_trackable(value: Any, depth: int = 0) -> bool:
    if isinstance(value, (torch.Tensor, Checkpoint, format_tree.PerRank)) or is_stateful(value) or loaders.is_data_state(value):
        return True
    if depth > format_tree.MAX_DEPTH:  # deeper (or a container holding itself): the encoder refuses it by name
        return False
    if isinstance(value, dict):
        return any(_is_trackable(v, depth + 1) for v in value.values())
    if isinstance(value, (list, tuple)):
        return any(_is_trackable(v, depth + 1) for v in value)
    return False


# The kinds of :func:`kind_of` whose state is each rank's own (``_state_of`` saves them per rank)
PER_RANK_KINDS = frozenset({"rng", "per_rank", "data_loader", "generator"})


def kind_of(value: Any) -> str:
    """A short name for what a tracked value is, recorded in the index for inspection."""
    if isinstance(value, torch.nn.Module):
        return "module"
    if isinstance(value, torch.optim.Optimizer):
        return "optimizer"
    if isinstance(value, (torch.optim.lr_scheduler.LRScheduler, torch.optim.lr_scheduler.ReduceLROnPlateau)):
        return "lr_scheduler"
    if isinstance(value, torch.amp.GradScaler):
        return "grad_scaler"
    if isinstance(value, RNGState):
        return "rng"
    if loaders.is_data_state(value):
        return loaders.kind_of(value)
    if isinstance(value, Checkpoint):
        return "checkpoint"
    if isinstance(value, format_tree.PerRank):
        return "per_rank"
    if isinstance(value, torch.Tensor):
        return "tensor"
    if is_stateful(value):
        return "stateful"
    if _is_trackable(value):
        return "container"
    return "value"


class Checkpoint:
    """Modules, optimizers, schedulers, grad scalers, tensors, RNG state and plain values, by name.

    Example:
        >>> import tempfile, torch, torchckpt
        >>> model = torch.nn.Linear(2, 2)
        >>> opt = torch.optim.SGD(model.parameters(), lr=0.1)
        >>> ckpt = torchckpt.Checkpoint(model=model, opt=opt, epoch=3)
        >>> path = ckpt.save(tempfile.mkdtemp() + "/ckpt")
        >>> path.endswith("ckpt-1"), ckpt.save_counter
        (True, 1)
        >>> ckpt.epoch = 0
        >>> ckpt.restore(path).assert_consumed().report.missing_keys
        []
        >>> ckpt.epoch
        3
    """

    def __init__(self, **objects: Any) -> None:
        object.__setattr__(self, "_tracked", {})
        object.__setattr__(self, "_save_counter", 0)
        object.__setattr__(self, "_counted_on", False)  # save_counter was restored (or set by a manager)
        object.__setattr__(self, "_writer", None)
        for name, value in objects.items():
            setattr(self, name, value)

    # -- tracking ------------------------------------------------------------------------

    @property
    def save_counter(self) -> int:
        """How many times ``save()`` was called; saved and restored with the checkpoint."""
        return int(self._save_counter)

    def __getattr__(self, name: str) -> Any:
        tracked = object.__getattribute__(self, "_tracked")
        try:
            return tracked[name]
        except KeyError:
            raise AttributeError(
                f"Checkpoint has no object named {name!r}; it tracks: {', '.join(tracked) or 'nothing'}."
            ) from None

    def __setattr__(self, name: str, value: Any) -> None:
        if name.startswith("_") or hasattr(type(self), name):
            raise ValueError(
                f"Cannot track an object named {name!r}: names starting with '_' and the Checkpoint's own "
                "attributes (save, write, restore, read, save_counter, wait_until_finished, sync) are reserved."
            )
        if keypath.SEP in name:
            raise ValueError(f"Cannot track an object named {name!r}: names may not contain '/'.")
        self._tracked[name] = value

    def __delattr__(self, name: str) -> None:
        try:
            del self._tracked[name]
        except KeyError:
            raise AttributeError(name) from None

    def __dir__(self) -> list[str]:
        return sorted(set(super().__dir__()) | set(self._tracked))

    def __repr__(self) -> str:
        inner = ", ".join(f"{k}={kind_of(v)}" for k, v in self._tracked.items())
        return f"Checkpoint({inner})"

    # -- saving --------------------------------------------------------------------------

    def _state(self, depth: int = 0) -> dict[str, Any]:
        return {name: _state_of(value, depth + 1) for name, value in self._tracked.items()}

    def _objects(self) -> dict[str, str]:
        return {name: kind_of(value) for name, value in self._tracked.items()}

    def write(
        self,
        path: PathLike,
        *,
        max_shard_size: int | str = spec.DEFAULT_MAX_SHARD_SIZE,
        progress: bool | None = None,
        metadata: dict[str, Any] | None = None,
        async_save: bool = False,
        storage_options: dict[str, Any] | None = None,
        process_group: Any = None,
        timeout_secs: float | None = None,
        base: PathLike | None = None,
    ) -> str:
        """Write the checkpoint to the directory ``path``, atomically; ``save_counter`` is untouched.

        Args:
            path: the checkpoint directory (a local path, or a URL such as ``s3://bucket/run/c``);
                an existing checkpoint there is replaced (atomically on a local filesystem; on an
                object store its index is deleted first, see ``docs/format.md``).
            max_shard_size: bytes per shard as an int, or a string such as ``"2GB"`` (decimal
                units, as Hugging Face) or ``"2GiB"``. Only a single larger tensor exceeds it.
            progress: show a progress bar (None: on a terminal, for saves over 256 MiB).
            metadata: JSON values stored with the checkpoint (the manager stores metrics here).
            async_save: return once the state is copied into reusable host buffers; the write
                happens in the background (see :meth:`wait_until_finished`). On several ranks
                the exchange of what each rank holds and the copy happen in the call, on every
                rank; the writes, the commit and the outcome in the background, coordinated
                through the c10d Store (never the training group's collectives), and a failure
                on any rank is raised on every rank by the next save or ``wait_until_finished``.
            storage_options: passed to fsspec when ``path`` is a URL (credentials, endpoint).
            process_group: with torch.distributed initialised on more than one rank, the write is
                collective over this group (the default group when None): every rank calls it,
                writes its own shards, and rank 0 commits (see ``docs/format.md``, format 2).
            timeout_secs: how long a collective write waits for the other ranks before raising
                (default 1800); a dead rank fails the call on every other rank after this long.
            base: a committed checkpoint on the same storage (a previous one of this run):
                every shard this write would write exactly as ``base`` holds it is hard-linked
                (local) or copied by the server (object stores) instead of written, after
                reading it back to check it. The new checkpoint stays standalone: deleting
                ``base`` later never changes it. On several ranks, only a ``base`` saved by as
                many ranks is used (each rank reuses its own files).

        Returns:
            ``path`` as a str.

        Raises:
            UnsupportedStateError: a value cannot be stored without pickle; nothing is written.
            CheckpointNotFoundError: ``base`` is not a committed checkpoint; nothing is written.
            CheckpointError: on several ranks, any rank's failure (the same error on every rank),
                a value that differs across ranks without ``PerRank``, or a rank that never arrived.
            Any failure of a previous asynchronous write.
        """
        path = as_directory(path)
        base_path = as_path(base) if base is not None else None
        coord = dist_coordinator.coordinator_for(process_group, timeout_secs).call(
            "Saving " + path,  # every rank must make this same call: its arguments are compared first
            {"call": "Checkpoint.write", "path": path, "base": base_path, **save_arguments(max_shard_size, async_save)})
        with coord.failures_shared():
            storage = storage_for(path, storage_options)
            if base_path is not None:
                base_path = _checked_base(storage, base_path, path)
            self.wait_until_finished()  # one write in flight; raises a previous background failure
            options = SaveOptions.checked(self.save_counter, max_shard_size, progress, metadata, async_save,
                                          base=base_path)
            saver.save(self._source(), storage, path, coord, options)
        return path

    def _source(self) -> saver.Source:
        return saver.Source(lambda distributed: self._state(), self._objects, self._async_writer, self.wait_until_finished,
                            lambda: save_capture.frozen_groups(self._tracked, _nested),
                            lambda: save_capture.module_versions(save_capture.modules_in(self._tracked, _nested)))

    def _async_writer(self) -> AsyncWriter:
        writer: AsyncWriter | None = self._writer
        if writer is None:
            writer = AsyncWriter()
            object.__setattr__(self, "_writer", writer)
        return writer

    def wait_until_finished(self) -> None:
        """Block until an asynchronous write is durable; raise its failure, if any."""
        if self._writer is not None:
            self._writer.wait()

    def sync(self) -> None:
        """Alias of :meth:`wait_until_finished` (TensorFlow's name)."""
        self.wait_until_finished()

    def save(
        self,
        file_prefix: PathLike,
        *,
        max_shard_size: int | str = spec.DEFAULT_MAX_SHARD_SIZE,
        progress: bool | None = None,
        metadata: dict[str, Any] | None = None,
        async_save: bool = False,
        storage_options: dict[str, Any] | None = None,
        process_group: Any = None,
        timeout_secs: float | None = None,
    ) -> str:
        """Increment ``save_counter``, write ``f"{file_prefix}-{save_counter}"`` and record it as latest.

        Nothing is deleted. A Checkpoint whose ``save_counter`` was never restored (a new one,
        counting from 0) does not replace a checkpoint already at its number: it raises
        :class:`CheckpointWriteError` (``errno.EEXIST``) before writing anything. After
        :meth:`restore`, it numbers on from the restored count, and a rollback (restoring an older
        checkpoint, then saving) replaces the checkpoints it abandoned, as TensorFlow's does. The
        options are those of :meth:`write`; on several ranks, rank 0 records the latest checkpoint.
        """
        prefix = as_path(file_prefix)
        number = self._save_counter + 1
        path = f"{prefix}-{number}"
        coord = dist_coordinator.coordinator_for(process_group, timeout_secs).call(
            "Saving " + path,  # every rank must make this same call, from the same count: compared first
            {"call": "Checkpoint.save", "prefix": prefix, "save_counter": self._save_counter,
             **save_arguments(max_shard_size, async_save)})
        with coord.failures_shared():
            storage = storage_for(prefix, storage_options)
            self.wait_until_finished()  # one write in flight; raises a previous background failure
            if not self._counted_on:  # a committed checkpoint there is another run's; what a killed writer left is
                history_members.refuse_taken_number(storage, path, self._save_counter)  # replaced, as before
            options = SaveOptions.checked(number, max_shard_size, progress, metadata, async_save)

            committed: list[bool] = []  # the write was committed (its record may fail): the number is taken

            def record() -> bool:
                committed.append(True)  # also for an interrupt after it, once the other ranks took the number
                try:
                    history_state.record_latest(storage.real_path(parent_of(path)), name_of(path), storage)
                except BaseException as e:  # an interrupt too: the write is committed all the same
                    if coord.is_collective:  # every rank learns it (``adopt``); rank 0 raises an interrupt again
                        raise FailedAfterCommit(e, True) from e
                    raise
                return True

            try:
                saver.save(self._source(), storage, path, coord, options, SaveHooks(after=record, adopt=committed.append))
            except BaseException:
                if committed:  # a retry must not write over the committed one
                    object.__setattr__(self, "_save_counter", number)
                raise
        object.__setattr__(self, "_save_counter", number)  # the write was accepted
        return path

    # -- restoring -----------------------------------------------------------------------

    def restore(self, save_path: PathLike | None, *, verify: bool = True, progress: bool | None = None,
                cast: bool = False, assign: bool = False, rename: Rename | None = None,
                storage_options: dict[str, Any] | None = None, process_group: Any = None,
                timeout_secs: float | None = None, read_once: bool | None = None) -> RestoreStatus:
        """Restore from a checkpoint directory, or from the latest checkpoint of a manager's directory.

        Matching values are applied (tensors read straight into the existing ones); mismatches
        are skipped and reported in the returned status. ``save_counter`` is restored too.

        Args:
            save_path: a checkpoint directory, a directory of checkpoints (its latest is used),
                or None (nothing is restored; every assertion of the status raises).
            verify: check each tensor's bytes against its recorded checksum as it is read.
            progress: show a progress bar (None: on a terminal, for restores over 256 MiB).
            cast: a tensor whose dtype differs from its destination's is cast to it (as
                ``load_state_dict`` does) instead of being skipped and reported.
            assign: tensors on the meta device (a model built under ``torch.device("meta")``,
                a tracked tensor or one in a tracked dict or list) are replaced by the restored
                ones (as ``load_state_dict(assign=True)``); without it they are reported missing.
            rename: the checkpoint's keys mapped to the objects' keys before anything is matched
                (a module whose ``encoder`` became ``backbone``, a checkpoint saved as
                ``Checkpoint(net=...)`` restored into ``Checkpoint(model=...)``). Keys are full names
                as ``torchckpt.list_variables`` and the report show them (``model/encoder.0.weight``,
                ``opt/state/0/exp_avg``, ``epoch``), for tensors and plain values alike. Either a
                mapping ``{checkpoint prefix: object prefix}``, where a prefix matches a key equal to
                it or starting with it at a name-part boundary (``model/encoder`` matches
                ``model/encoder``, ``model/encoder.0.weight`` and ``model/encoder/...``, never
                ``model/encoder2.weight``; a prefix ending in ``.`` or ``/`` matches any key that
                starts with it), the longest matching prefix wins, and the rest of the key is kept;
                or a function from a checkpoint key to its object key (None: the key is left unused
                and reported in ``unexpected_keys``). Each key is renamed once (a rename is not
                applied again to its result), and the save counter never. ``status.report.renamed``
                lists what changed; ``unexpected_keys`` then names checkpoint keys, the other lists
                object keys. On several ranks every rank must pass the same rename.
            storage_options: passed to fsspec when ``save_path`` is a URL.
            process_group: with torch.distributed initialised on more than one rank, the restore
                is collective over this group (the default group when None): rank 0 picks the
                checkpoint, every rank reads only the bytes its own shards need (a checkpoint
                saved on N ranks restores on M, or into a plain model), and a failure on any rank
                is raised on every rank.
            timeout_secs: how long a collective restore waits for the other ranks (default 1800).
            read_once: in a collective restore, a tensor every rank restores whole into a CPU tensor
                (DDP state) is read from storage by one rank and broadcast over the group (gloo), each
                rank reading an equal part. None: when the ranks run on several hosts (ranks of one
                host share its page cache, which is faster than a broadcast); False: never.

        Raises:
            CheckpointNotFoundError: no committed checkpoint at ``save_path``.
            UnsupportedStateError: a destination cannot be written as plain memory (a tensor
                subclass other than DTensor, an FSDP1 flat parameter, a Partial DTensor); nothing changed.
            CorruptCheckpointError: the checkpoint is malformed; detected before any object
                changes (except a checksum mismatch in tensor bytes, found as they are read).
            RenameConflictError: (a ``ValueError``) the rename gives two checkpoint keys one object
                key, or moves a value where it cannot go; ``.key`` and ``.checkpoint_keys`` say
                which. Raised before any object changes.
            TypeError: ``rename`` is neither a mapping of str to str nor a function.

        Example:
            >>> import tempfile, torch, torchckpt
            >>> old = torch.nn.Sequential()
            >>> old.encoder = torch.nn.Linear(2, 2)
            >>> path = torchckpt.Checkpoint(net=old).write(tempfile.mkdtemp() + "/c")
            >>> new = torch.nn.Sequential()
            >>> new.backbone = torch.nn.Linear(2, 2)
            >>> status = torchckpt.Checkpoint(model=new).read(path, rename={"net/encoder": "model/backbone"})
            >>> status.assert_consumed().report.renamed["net/encoder.weight"]
            'model/backbone.weight'
        """
        coord = restore_call(process_group, timeout_secs, save_path, "Checkpoint.restore", verify=verify, cast=cast,
                             assign=assign, read_once=read_once, **call_argument(rename))
        return self._restore(save_path, storage_options, coord, Plan(cast=cast, assign=assign, read_once=read_once),
                             verify, progress, self._set_save_counter, rename)

    def read(self, save_path: PathLike, *, verify: bool = True, progress: bool | None = None,
             cast: bool = False, assign: bool = False, rename: Rename | None = None,
             storage_options: dict[str, Any] | None = None, process_group: Any = None,
             timeout_secs: float | None = None, read_once: bool | None = None) -> RestoreStatus:
        """As :meth:`restore`, but ``save_counter`` is neither expected nor restored (pairs with ``write``)."""
        coord = restore_call(process_group, timeout_secs, save_path, "Checkpoint.read", verify=verify, cast=cast,
                             assign=assign, read_once=read_once, **call_argument(rename))
        return self._restore(save_path, storage_options, coord, Plan(cast=cast, assign=assign, read_once=read_once),
                             verify, progress, None, rename)

    def _restore(self, save_path: PathLike | None, storage_options: dict[str, Any] | None, coord: AnyCoordinator,
                 plan: Plan, verify: bool, progress: bool | None,
                 set_counter: Callable[[int], None] | None, rename: Rename | None) -> RestoreStatus:
        with coord.failures_shared():
            renamer = Renamer.of(rename)  # checked on every rank, before the call's first exchange
            if coord.is_collective:  # before any exchange: a background save in flight uses the Store
                self.wait_until_finished()  # too (one operation at a time per process), so waiting inside one would deadlock
            if save_path is None:
                coord.check_call()
                return RestoreStatus(MismatchReport(), None)
            path = as_path(save_path)
            storage = storage_for(path, storage_options)
            self.wait_until_finished()  # never read a checkpoint this object is still writing
            return self._restore_from(storage, path, coord, plan, verify, progress, set_counter, renamer)

    def _restore_from(self, storage: Storage, path: str, coord: AnyCoordinator, plan: Plan, verify: bool,
                      progress: bool | None, set_counter: Callable[[int], None] | None,
                      renamer: Renamer | None = None) -> RestoreStatus:
        target = restorer.Target(self._tracked, TRACKING, set_counter, renamer)
        restored = restorer.restore(target, storage, path, coord, plan, verify, progress)
        return RestoreStatus(restored.report, restored.directory)

    def _set_save_counter(self, value: int) -> None:
        object.__setattr__(self, "_save_counter", int(value))
        object.__setattr__(self, "_counted_on", True)


def _checked_base(storage: Storage, base: str, path: str) -> str:
    """``base`` as a committed checkpoint on the storage of ``path``, or the error that says why not."""
    if _scheme(base) != _scheme(path):
        raise ValueError(f"base={base!r} must be on the same storage as the checkpoint written ({path}): shards are "
                         "reused by a hard link or a server-side copy, which cannot cross storages.")
    if not storage.is_file(join(base, spec.INDEX_FILE)):
        raise CheckpointNotFoundError(f"No committed checkpoint at base={base!r} (no {spec.INDEX_FILE} there); pass a "
                                      "checkpoint directory written before, or leave base out to write every byte.", base)
    return base


def _scheme(path: str) -> str:
    return path.split("://", 1)[0] if "://" in path else ""


def _state_of(value: Any, depth: int = 0) -> Any:
    """What is saved for a tracked value. Per-rank values (``PerRank``, ``RNGState``, data
    positions) are marked as such: a save by several ranks gathers every rank's, a single process
    stores them as they are (``_format.tree.encode``). Containers nested deeper than a checkpoint
    stores (one that holds itself) are left as they are, for the encoder to refuse by key."""
    if depth > format_tree.MAX_DEPTH or isinstance(value, torch.Tensor):
        return value  # bytes are read through data_ptr(): autograd is not involved
    if isinstance(value, format_tree.PerRank):
        inner = _state_of(value.value, depth)
        return inner if isinstance(inner, format_tree.PerRank) else format_tree.PerRank(inner)
    if isinstance(value, RNGState):  # each rank draws its own
        return format_tree.PerRank(value.state_dict())
    if loaders.is_data_state(value):  # and reads its own
        return format_tree.PerRank(loaders.state_of(value))
    if isinstance(value, Checkpoint):
        return value._state(depth)
    if isinstance(value, torch.nn.Module):
        return dict(dist_dtensor.module_state(value))
    if is_stateful(value):
        return value.state_dict()
    if isinstance(value, dict) and _is_trackable(value):
        pairs = ((k, _state_of(v, depth + 1)) for k, v in value.items())
        return OrderedDict(pairs) if type(value) is OrderedDict else dict(pairs)
    if (isinstance(value, list) or type(value) is tuple) and _is_trackable(value):
        items = [_state_of(v, depth + 1) for v in value]
        return items if isinstance(value, list) else tuple(items)
    return value


def _nested(value: Any) -> dict[str, Any] | None:
    return value._tracked if isinstance(value, Checkpoint) else None


TRACKING = Tracking(nested=_nested, state_of=lambda value: without_per_rank(_state_of(value)), is_trackable=_is_trackable)


# -- the manager's door --------------------------------------------------------------------------


def commit(ckpt: Checkpoint, storage: Storage, path: str, coord: AnyCoordinator, options: SaveOptions,
           hooks: SaveHooks) -> None:
    """The write a manager makes: numbered ``options.save_counter``, which ``ckpt`` takes once the
    write is accepted, with the manager's ``hooks`` (``after`` records the checkpoint and applies
    retention; ``replace=False`` refuses a checkpoint already at ``path`` with ``AlreadyCommitted``)."""
    assert options.save_counter is not None  # a manager always numbers its checkpoints
    recorded: list[bool] = []

    def after() -> Any:
        result = hooks.after() if hooks.after is not None else None
        recorded.append(True)
        return result

    try:
        saver.save(ckpt._source(), storage, path, coord, options, SaveHooks(after=after, adopt=hooks.adopt))
    except BaseException:
        if recorded:  # an interrupt once the save was done (the other ranks returned): the number is taken
            ckpt._set_save_counter(options.save_counter)
        raise
    ckpt._set_save_counter(options.save_counter)


def restore_from(ckpt: Checkpoint, storage: Storage, path: str, coord: AnyCoordinator, rename: Rename | None = None,
                 read_once: bool | None = None, earlier: dict[str, str] | None = None) -> RestoreStatus:
    """:meth:`Checkpoint.restore` of ``path`` on ``storage`` (a manager's own), within the manager's call.
    ``earlier``: one dict for every candidate a resume tries (``Plan.earlier_writes``)."""
    plan = Plan(read_once=read_once, earlier_writes={} if earlier is None else earlier)
    return ckpt._restore_from(storage, path, coord, plan, True, None, ckpt._set_save_counter, Renamer.of(rename))
