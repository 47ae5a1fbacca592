"""``Checkpoint``: named modules, optimizers, schedulers, RNG state and plain values, saved as one.

Why nothing is pickled: ``torch.load`` of a pickle runs whatever code the file names, so loading a
checkpoint from a stranger can own the machine. A torchckpt checkpoint holds only safetensors
shards (raw tensor bytes) and JSON (see ``_tree``), and loading one never imports or calls
anything named by the file. A value that has no such representation is refused at save time,
with its full key path, before anything is written.
"""

from __future__ import annotations

import os
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any

import torch

from torchckpt._dist import coordinator as dist_coordinator
from torchckpt._format import index as format_index
from torchckpt._format import spec
from torchckpt._format import tree as format_tree
from torchckpt._history import state as history_state
from torchckpt._load import loaders
from torchckpt._load.plan import MISSING, Plan, execute, plan_module, plan_stateful, plan_tensor, plan_value
from torchckpt._load.report import MismatchReport
from torchckpt._save import capture as save_capture
from torchckpt._save import collective as save_collective
from torchckpt._save import write as save_write
from torchckpt._save.background import AsyncWriter  # imported with the package: its exit hook must be registered early
from torchckpt._storage.base import Storage, as_path, name_of, parent_of
from torchckpt._storage.registry import storage_for
from torchckpt._threads import gc_paused
from torchckpt.errors import RESTORED_ON_THIS_RANK, CorruptCheckpointError
from torchckpt.restore import RestoreStatus
from torchckpt.rng import RNGState

SAVE_COUNTER = "save_counter"
PathLike = str | os.PathLike[str]


def restore_call(process_group: Any, timeout_secs: float | None, save_path: PathLike | None, call: str,
                 **options: Any) -> dist_coordinator.Coordinator | None:
    """The collective call of a restore on several ranks (None for one process, or nothing to restore)."""
    coord = dist_coordinator.coordinator_for(process_group, timeout_secs)
    if coord is None:
        return None
    path = None if save_path is None else as_path(save_path)
    return coord.call(f"Restoring {path}", {"call": call, "path": path, **options})


def is_stateful(value: Any) -> bool:
    """Whether ``value`` has callable ``state_dict()`` and ``load_state_dict()`` (the Stateful protocol);
    a class (``nn.ReLU``) has them as plain functions, and is not."""
    return (not isinstance(value, type) and callable(getattr(value, "state_dict", None))
            and callable(getattr(value, "load_state_dict", None)))


def _is_trackable(value: Any) -> bool:
    if isinstance(value, (torch.Tensor, Checkpoint, format_tree.PerRank)) or is_stateful(value) or loaders.is_data_state(value):
        return True
    if isinstance(value, dict):
        return any(_is_trackable(v) for v in value.values())
    if isinstance(value, (list, tuple)):
        return any(_is_trackable(v) for v in value)
    return False


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
        if format_tree.SEP in name:
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

    def _state(self, distributed: bool = False) -> dict[str, Any]:
        return {name: _state_of(value, distributed) for name, value in self._tracked.items()}

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

        Returns:
            ``path`` as a str.

        Raises:
            UnsupportedStateError: a value cannot be stored without pickle; nothing is written.
            CheckpointError: on several ranks, any rank's failure (the same error on every rank),
                a value that differs across ranks without ``PerRank``, or a rank that never arrived.
            Any failure of a previous asynchronous write.
        """
        path = as_path(path)
        coord = dist_coordinator.coordinator_for(process_group, timeout_secs)
        if coord is not None:  # every rank must make this same call: its arguments are compared first
            coord = coord.call("Saving " + path, {"call": "Checkpoint.write", "path": path,
                                                  **dist_coordinator.save_arguments(max_shard_size, async_save)})
        with dist_coordinator.failures_shared(coord):
            self._commit(storage_for(path, storage_options), path, max_shard_size, progress, metadata, async_save,
                         coordinator=coord)
        return path

    def _commit(
        self,
        storage: Storage,
        path: str,
        max_shard_size: int | str,
        progress: bool | None,
        metadata: dict[str, Any] | None,
        async_save: bool,
        after: Callable[[], Any] | None = None,
        before_commit: Callable[[str], None] | None = None,
        replace: bool = True,
        coordinator: dist_coordinator.Coordinator | None = None,
        adopt: Callable[[Any], object] | None = None,
    ) -> None:
        """The one write path: capture the state now, then write it here or in the background.

        ``after`` runs once the checkpoint is committed (``save`` records the latest checkpoint,
        the manager applies retention), on the background thread for an asynchronous write; on
        several ranks it runs on rank 0, and ``adopt`` gets what it returned on every other rank.
        Without ``replace``, a checkpoint already at ``path`` raises ``AlreadyCommitted``.
        ``coordinator`` is the collective call (``Coordinator.call``) every rank makes.
        """
        if coordinator is not None:
            self._commit_collective(coordinator, storage, path, max_shard_size, progress, metadata,
                                    async_save, after, adopt, before_commit, replace)
            return
        self.wait_until_finished()  # one write in flight; raises a previous background failure
        spec.parse_size(max_shard_size)  # a bad size is an error before any work

        def run() -> None:
            with gc_paused():
                job.run(storage, path, max_shard_size, progress, before_commit, replace)
            if after is not None:
                after()

        # One pause over capture and write: re-enabling the collector in between would make it
        # sweep the tens of thousands of small objects the capture has just made.
        with gc_paused():
            job = capture(self, metadata, prepare=not async_save)
            if not async_save:
                run()
                return
            if self._writer is None:
                object.__setattr__(self, "_writer", AsyncWriter())
            job.stored, job.aliases = self._writer.snapshot(save_collective.localize(job.stored))
        self._writer.submit(run, path)

    def _commit_collective(self, coord: dist_coordinator.Coordinator, storage: Storage, path: str, max_shard_size: int | str,
                           progress: bool | None, metadata: dict[str, Any] | None, async_save: bool,
                           after: Callable[[], Any] | None, adopt: Callable[[Any], object] | None,
                           before_commit: Callable[[str], None] | None, replace: bool) -> None:
        """A save by every rank. The capture, the exchange of what each rank holds and, for an
        asynchronous save, the copy into host memory run here, in program order on every rank; the
        writes, the commit and the outcome then run on the background thread, coordinating through
        keys of their own in the c10d Store, never through collectives on the training group.

        Everything that may fail on one rank alone (a previous background failure, a bad shard
        size, a ``state_dict()`` that raises, a value that cannot be stored) runs inside the first
        exchange, so that it fails this call on every rank instead of leaving the others waiting
        to pair with the next call."""

        def state() -> tuple[dict[str, torch.Tensor], dict[str, Any]]:
            self.wait_until_finished()  # one write in flight; raises a previous background failure
            job = capture(self, metadata, prepare=False, distributed=True)
            return job.stored, job.section

        with gc_paused():
            prepared = save_collective.prepare(coord, path, state, max_shard_size)
            scope = coord.scope() if async_save else coord
            if async_save:  # a copy that fails on one rank (out of memory) fails the save on every rank, now
                dist_coordinator.agree(coord, "Saving " + path, lambda: self._snapshot(prepared))

        def run() -> None:
            with gc_paused():
                result = save_collective.finish(scope, storage, prepared, False if async_save else progress,
                                              before_commit, replace, after)
            if adopt is not None and coord.rank != 0:
                adopt(result)

        if not async_save:
            run()
            return
        assert self._writer is not None
        self._writer.submit(run, path)

    def _snapshot(self, prepared: save_collective.Prepared) -> None:
        """Copy this rank's tensors of a save by several ranks into the async writer's host memory."""
        if self._writer is None:
            object.__setattr__(self, "_writer", AsyncWriter())
        views, aliases = self._writer.snapshot(prepared.captured.local)
        prepared.captured.local = {n: views[aliases.get(n, n)] for n in prepared.captured.local}

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

        Nothing is ever deleted. The options are those of :meth:`write`; on several ranks, rank 0
        records the latest checkpoint.
        """
        prefix = as_path(file_prefix)
        coord = dist_coordinator.coordinator_for(process_group, timeout_secs)
        if coord is not None:  # every rank must make this same call, from the same count: compared first
            coord = coord.call(f"Saving {prefix}-{self._save_counter + 1}", {
                "call": "Checkpoint.save", "prefix": prefix, "save_counter": self._save_counter,
                **dist_coordinator.save_arguments(max_shard_size, async_save)})
        with dist_coordinator.failures_shared(coord):
            storage = storage_for(prefix, storage_options)
            if coord is None:
                self.wait_until_finished()
            object.__setattr__(self, "_save_counter", self._save_counter + 1)
            path = f"{prefix}-{self._save_counter}"

            def record() -> None:
                history_state.record_latest(storage.real_path(parent_of(path)), name_of(path), storage)

            try:
                self._commit(storage, path, max_shard_size, progress, metadata, async_save, after=record,
                             coordinator=coord)
            except BaseException:
                object.__setattr__(self, "_save_counter", self._save_counter - 1)
                raise
        return path

    # -- restoring -----------------------------------------------------------------------

    def restore(self, save_path: PathLike | None, *, verify: bool = True, progress: bool | None = None,
                cast: bool = False, assign: bool = False, storage_options: dict[str, Any] | None = None,
                process_group: Any = None, timeout_secs: float | None = None) -> RestoreStatus:
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
            assign: a module's tensors on the meta device (a model built under
                ``torch.device("meta")``) are replaced by the restored ones (as
                ``load_state_dict(assign=True)``); without it they are reported missing.
            storage_options: passed to fsspec when ``save_path`` is a URL.
            process_group: with torch.distributed initialised on more than one rank, the restore
                is collective over this group (the default group when None): rank 0 picks the
                checkpoint, every rank reads only the bytes its own shards need (a checkpoint
                saved on N ranks restores on M, or into a plain model), and a failure on any rank
                is raised on every rank.
            timeout_secs: how long a collective restore waits for the other ranks (default 1800).

        Raises:
            CheckpointNotFoundError: no committed checkpoint at ``save_path``.
            UnsupportedStateError: a destination cannot be written as plain memory (a tensor
                subclass other than DTensor, an FSDP1 flat parameter, a Partial DTensor); nothing changed.
            CorruptCheckpointError: the checkpoint is malformed; detected before any object
                changes (except a checksum mismatch in tensor bytes, found as they are read).
        """
        return self._restore(save_path, verify, progress, Plan(cast=cast, assign=assign), True, storage_options,
                             coordinator=restore_call(process_group, timeout_secs, save_path, "Checkpoint.restore",
                                                      verify=verify, cast=cast, assign=assign))

    def read(self, save_path: PathLike, *, verify: bool = True, progress: bool | None = None,
             cast: bool = False, assign: bool = False, storage_options: dict[str, Any] | None = None,
             process_group: Any = None, timeout_secs: float | None = None) -> RestoreStatus:
        """As :meth:`restore`, but ``save_counter`` is neither expected nor restored (pairs with ``write``)."""
        return self._restore(save_path, verify, progress, Plan(cast=cast, assign=assign), False, storage_options,
                             coordinator=restore_call(process_group, timeout_secs, save_path, "Checkpoint.read",
                                                      verify=verify, cast=cast, assign=assign))

    def _restore(self, save_path: PathLike | None, verify: bool, progress: bool | None, plan: Plan,
                 expect_counter: bool, storage_options: dict[str, Any] | None,
                 storage: Storage | None = None, coordinator: dist_coordinator.Coordinator | None = None) -> RestoreStatus:
        if coordinator is not None:
            with coordinator.failures_shared():
                # Before any exchange: a background save in flight uses the Store too (one operation
                # at a time per process), so waiting inside an exchange would deadlock it.
                self.wait_until_finished()
                if save_path is None:
                    coordinator.check_call()
                    return RestoreStatus(MismatchReport(), None)
                path = as_path(save_path)
                return self._restore_collective(coordinator, storage or storage_for(path, storage_options), path,
                                                verify, progress, plan, expect_counter)
        if save_path is None:
            return RestoreStatus(MismatchReport(), None)
        path = as_path(save_path)
        storage = storage or storage_for(path, storage_options)
        self.wait_until_finished()  # never read a checkpoint this object is still writing
        with gc_paused():
            directory = history_state.resolve_checkpoint(path, storage)
            return self._restore_from(storage, directory, verify, progress, plan, expect_counter)

    def _restore_collective(self, coord: dist_coordinator.Coordinator, storage: Storage, path: str, verify: bool,
                            progress: bool | None, plan: Plan, expect_counter: bool) -> RestoreStatus:
        """Rank 0 picks the checkpoint (the latest of a directory, once, for everyone); each rank
        restores its own part; any rank's failure is raised on every rank. A rank that had restored
        its part when another failed says that its objects are partly restored."""
        plan.rank = coord.rank
        coord.consequence = "Nothing was restored."

        def choose() -> str:
            return history_state.resolve_checkpoint(path, storage)

        def restore(directory: str) -> RestoreStatus:
            with gc_paused():
                return self._restore_from(storage, directory, verify, progress if coord.rank == 0 else False, plan,
                                          expect_counter)

        return dist_coordinator.run_collectively(coord, f"Restoring {path}", choose, restore, RESTORED_ON_THIS_RANK)

    def _restore_from(self, storage: Storage, directory: str, verify: bool, progress: bool | None, plan: Plan,
                      expect_counter: bool) -> RestoreStatus:
        index = format_index.load_index(directory, storage)
        with format_index.OpenShards(index) as shards:  # opened together: a deletion from here on cannot touch the read
            self._plan_restore(index, shards, plan, expect_counter)
            del index  # only the plan stays in memory while tensors are read
            execute(plan, shards, verify, progress)
        return RestoreStatus(plan.report, directory)

    def _plan_restore(self, index: format_index.Index, shards: format_index.OpenShards, plan: Plan, expect_counter: bool) -> None:
        """Match the checkpoint against the tracked objects into ``plan``. The state tree is dropped
        on return, before any tensor is read: only the plan stays in memory."""
        infos = format_index.read_shard_headers(index, shards)
        saved = format_index.state_tree(index, infos.__getitem__, plan.rank)
        del infos
        self._plan(saved, "", plan)
        if expect_counter:
            counter = saved.get(SAVE_COUNTER, MISSING)
            if counter is not MISSING and not (type(counter) is int and 0 <= counter < 2**63):
                raise CorruptCheckpointError(
                    f"{index.directory}: save_counter is {counter!r}, not a non-negative integer.", index.directory
                )
            plan_value(SAVE_COUNTER, counter, lambda v: object.__setattr__(self, "_save_counter", int(v)), plan)

    def _plan(self, saved: dict[str, Any], prefix: str, plan: Plan) -> None:
        for name, value in self._tracked.items():
            key = format_tree.join(prefix, format_tree.escape_part(name))
            _plan_value(key, value, saved.get(name, MISSING), plan, _attr_setter(self, name))
        for name, value in saved.items():
            if name not in self._tracked and not (name == SAVE_COUNTER and not prefix):
                plan.report.unexpected_keys.extend(format_tree.leaves(value, format_tree.join(prefix, format_tree.key_part(name))))


def _attr_setter(ckpt: Checkpoint, name: str) -> Callable[[Any], None]:
    return lambda v: ckpt._tracked.__setitem__(name, v)


def _item_setter(container: Any, key: Any) -> Callable[[Any], None]:
    return lambda v: container.__setitem__(key, v)


def _plan_value(key: str, value: Any, saved: Any, plan: Plan, assign: Callable[[Any], None]) -> None:
    if isinstance(saved, format_tree.MissingPerRank):  # restoring on more ranks than saved
        plan.report.missing_keys.append(key)
        plan.report.skipped_objects[key] = saved.reason
        return
    if isinstance(value, format_tree.PerRank):
        _plan_value(key, value.value, saved, plan, lambda v: setattr(value, "value", v))
    elif isinstance(value, Checkpoint):
        if saved is MISSING or not isinstance(saved, dict):
            _plan_missing_checkpoint(key, value, saved, plan)
            return
        value._plan(saved, key, plan)
    elif isinstance(value, torch.nn.Module):
        plan_module(key, value, saved, plan)
    elif isinstance(value, torch.Tensor):
        plan_tensor(key, value, saved, plan)
    elif loaders.is_data_state(value):
        loaders.plan_restore(key, value, saved, plan)
    elif is_stateful(value):
        plan_stateful(key, value, saved, plan)
    elif _is_trackable(value) and isinstance(value, (dict, list)):
        _plan_container(key, value, saved, plan)
    else:
        plan_value(key, saved, assign, plan)


def _plan_missing_checkpoint(key: str, value: Checkpoint, saved: Any, plan: Plan) -> None:
    """A nested Checkpoint with nothing (or no dict) to restore from: all of it is missing."""
    plan.report.missing_keys.extend(format_tree.leaves(_tree_state_names(value), key))
    if saved is not MISSING:
        plan.report.unexpected_keys.extend(format_tree.leaves(saved, key))


def _tree_state_names(ckpt: Checkpoint) -> dict[str, Any]:
    return {name: _state_of(v) for name, v in ckpt._tracked.items()}


def _plan_container(key: str, value: dict[Any, Any] | list[Any], saved: Any, plan: Plan) -> None:
    """Match a dict or list item by item, by key part (so an int key matches its saved digits)."""
    is_dict = isinstance(value, dict)
    saved_items: dict[str, Any] = {}
    if isinstance(saved, dict):
        saved_items = saved if all(map(_is_plain_part, saved)) else {format_tree.key_part(k): v for k, v in saved.items()}
    elif isinstance(saved, (list, tuple)):
        saved_items = {str(i): v for i, v in enumerate(saved)}
    elif saved is not MISSING:
        plan.report.unexpected_keys.extend(format_tree.leaves(saved, key))
    matched = 0
    items = value.items() if isinstance(value, dict) else enumerate(value)
    for k, v in items:
        part = format_tree.key_part(k)
        found = saved_items.get(part, MISSING)
        matched += found is not MISSING
        if isinstance(v, torch.Tensor):  # the common leaf, planned without building a setter
            plan_tensor(format_tree.join(key, part), v, found, plan)
        else:
            _plan_value(format_tree.join(key, part), v, found, plan, _item_setter(value, k))
    # Distinct items have distinct parts unless a dict mixes key types ({0: .., "0": ..}).
    distinct = not is_dict or all(type(k) is str for k in value)
    if matched < len(saved_items) or not distinct:
        used = {format_tree.key_part(k) for k in (value if is_dict else range(len(value)))}
        for part, v in saved_items.items():
            if part not in used:
                plan.report.unexpected_keys.extend(format_tree.leaves(v, format_tree.join(key, part)))


def _is_plain_part(key: Any) -> bool:
    """Whether a saved dict key is its own key part (a str that needs no escaping)."""
    return type(key) is str and "~" not in key and format_tree.SEP not in key


def _state_of(value: Any, distributed: bool = False) -> Any:
    """What is saved for a tracked value. In a save by several ranks, per-rank values (``PerRank``,
    ``RNGState``) are marked as such; a single process saves them as they are."""
    if isinstance(value, format_tree.PerRank):
        inner = _state_of(value.value, distributed)
        return format_tree.PerRank(inner) if distributed and not isinstance(inner, format_tree.PerRank) else inner
    if distributed and isinstance(value, RNGState):
        return format_tree.PerRank(value.state_dict())
    if loaders.is_data_state(value):  # per rank, as RNGState: each rank draws and reads its own
        return format_tree.PerRank(loaders.state_of(value)) if distributed else loaders.state_of(value)
    if isinstance(value, Checkpoint):
        return value._state(distributed)
    if isinstance(value, torch.nn.Module):
        return dict(value.state_dict())
    if isinstance(value, torch.Tensor):
        return value  # bytes are read through data_ptr(): autograd is not involved
    if is_stateful(value):
        return value.state_dict()
    if isinstance(value, dict) and _is_trackable(value):
        return {k: _state_of(v, distributed) for k, v in value.items()}
    if isinstance(value, list) and _is_trackable(value):
        return [_state_of(v, distributed) for v in value]
    return value


@dataclass
class WriteJob:
    """Everything a write needs, captured at call time: the tensors and the encoded rest."""

    stored: dict[str, torch.Tensor]
    aliases: dict[str, str]
    section: dict[str, Any]

    def run(self, storage: Storage, path: str, max_shard_size: int | str, progress: bool | None,
            before_commit: Callable[[str], None] | None = None, replace: bool = True) -> str:
        return save_write.write_checkpoint(path, self.stored, self.aliases, self.section, max_shard_size, progress,
                                      before_commit, replace, storage=storage)


def capture(ckpt: Checkpoint, metadata: dict[str, Any] | None, prepare: bool = True,
            distributed: bool = False) -> WriteJob:
    """Encode the checkpoint's state now; refuses unsupported values before anything is written.

    With ``prepare=False`` the job's ``stored`` holds every tensor and ``aliases`` is empty: the
    asynchronous snapshot checks the tensors and finds the aliases itself.
    """
    state = ckpt._state(distributed)
    state[SAVE_COUNTER] = ckpt.save_counter
    tensors: dict[str, torch.Tensor] = {}
    tree = format_tree.encode(state, "", tensors)
    section: dict[str, Any] = {"objects": ckpt._objects(), "state": tree}
    if metadata:
        section["metadata"] = format_tree.encode(metadata, "metadata", {})
    if not prepare or distributed:
        return WriteJob(tensors, {}, section)
    stored, aliases = save_capture.prepare_tensors(save_collective.localize(tensors))
    return WriteJob(stored, aliases, section)


def set_save_counter(ckpt: Checkpoint, value: int) -> None:
    """Set ``ckpt.save_counter`` (a manager numbers its checkpoints with it)."""
    object.__setattr__(ckpt, "_save_counter", int(value))


def commit(
    ckpt: Checkpoint,
    storage: Storage,
    path: str,
    *,
    max_shard_size: int | str = spec.DEFAULT_MAX_SHARD_SIZE,
    progress: bool | None = None,
    metadata: dict[str, Any] | None = None,
    async_save: bool = False,
    after: Callable[[], Any] | None = None,
    before_commit: Callable[[str], None] | None = None,
    replace: bool = True,
    coordinator: dist_coordinator.Coordinator | None = None,
    adopt: Callable[[Any], object] | None = None,
) -> None:
    """The write a manager (or a test) makes: :meth:`Checkpoint.write` with a hook ``after`` the
    commit, one ``before_commit`` (tests inject faults with it), ``replace=False`` to refuse a
    checkpoint already at ``path`` (``AlreadyCommitted``), and the ranks' ``coordinator`` for a
    save by several ranks (``after`` and ``before_commit`` then run on rank 0, and ``adopt`` gets
    what ``after`` returned on every other rank)."""
    ckpt._commit(storage, path, max_shard_size, progress, metadata, async_save, after, before_commit, replace,
                 coordinator, adopt)


def restore_from(ckpt: Checkpoint, storage: Storage, path: str,
                 coordinator: dist_coordinator.Coordinator | None = None) -> RestoreStatus:
    """:meth:`Checkpoint.restore` of ``path`` on ``storage`` (a manager's own), collective with a
    ``coordinator``."""
    return ckpt._restore(path, True, None, Plan(), True, None, storage, coordinator)


def _write(
    ckpt: Checkpoint,
    path: str,
    max_shard_size: int | str,
    progress: bool | None,
    metadata: dict[str, Any] | None,
    before_commit: Callable[[str], None] | None,
) -> str:
    """A synchronous write with a hook before the commit (tests inject faults with it)."""
    commit(ckpt, storage_for(path), path, max_shard_size=max_shard_size, progress=progress, metadata=metadata,
           before_commit=before_commit)
    return path


def resolve_checkpoint(path: PathLike, storage_options: dict[str, Any] | None = None) -> str:
    """A checkpoint directory for ``path``: itself, or the latest checkpoint of a directory of them.

    Raises:
        CheckpointNotFoundError: nothing committed is there.
    """
    p = as_path(path)
    return history_state.resolve_checkpoint(p, storage_for(p, storage_options))
