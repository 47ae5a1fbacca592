"""Restoring a module the way ``load_state_dict`` would: its hooks run and custom loaders are honoured.

A restore normally reads each tensor straight into the parameter or buffer it belongs to, which
skips torch's loading machinery. Most modules do not notice; some do: a load_state_dict pre-hook
that renames old keys, a post-hook that re-ties or recomputes something, a class with its own
``_load_from_state_dict`` (quantized and Hugging Face modules, old-style ``spectral_norm``, lazy
modules). For a module with any of those anywhere in its tree (:func:`survey`), the restore walks
the tree exactly as ``Module.load_state_dict`` does (:class:`HookedLoad`), with two economies:

- a module outside any hooked subtree (no pre-hook and torch's own loader, on it and above it) has
  its tensors read in place as usual, since torch would only copy the saved bytes into them; its
  missing and unexpected keys are worked out by torch's rules, and its post-hooks run in turn;
- a hooked subtree (the module whose pre-hook or loader must see the saved values, and everything
  below it) gets its saved tensors, checked against their checksums, only when the walk reaches it,
  and they are dropped once that subtree is loaded. On a local file they are views of the mapped
  shard (``_load.mapped``), so the only copy is torch's, from the page cache into the parameters;
  elsewhere (an object store, a chunked tensor, a destination not in host memory, ``assign``) they
  are read into fresh tensors, and the extra memory is the largest hooked subtree's state.

``BatchNorm``'s own loader only fills a missing ``num_batches_tracked`` with the module's current
value, so plain batch norms keep the in-place path with that rule reproduced (:attr:`Survey.kept`).
Each module's loader sees the ``local_metadata`` ``load_state_dict`` would give it from the state
dict ``state_dict()`` made at the save: ``{"version": v}``, ``v`` the ``_version`` its class had then
(recorded in the index, ``_save.capture.module_versions``), so a class that migrates older
checkpoints by version migrates only those. A checkpoint written before the record existed gives no
``version``, as ``torch.load`` of a state dict that lost its ``_metadata`` does.
"""

from __future__ import annotations

import itertools
import json
import re
from collections import OrderedDict
from collections.abc import Callable, Iterator
from contextlib import AbstractContextManager
from dataclasses import dataclass, field
from typing import Any

import torch
from torch.nn.modules.batchnorm import _NormBase
from torch.nn.modules.module import _IncompatibleKeys

from torchckpt._dist import dtensor as dist_dtensor
from torchckpt._format import keypath
from torchckpt._format.chunks import ChunkedInfo
from torchckpt._format.dtypes import TensorInfo
from torchckpt._load import module_keys
from torchckpt._load.report import MismatchReport
from torchckpt.errors import CheckpointError

SAVED = (TensorInfo, ChunkedInfo)  # a saved tensor not read yet
EXTRA_STATE = "_extra_state"  # torch's key for get_extra_state() (torch.nn.modules.module._EXTRA_STATE_KEY_SUFFIX)
# Fetch(saved tensors, whether they may be views of the file): a context whose value is one CPU tensor
# per saved tensor, in order, checked against its checksum; valid until the context exits.
Fetch = Callable[[list[Any], bool], AbstractContextManager[list[torch.Tensor]]]

_DEFAULT_LOAD = torch.nn.Module._load_from_state_dict
_BATCH_NORM_LOAD = _NormBase._load_from_state_dict
_DEFAULT_SET_EXTRA = torch.nn.Module.set_extra_state
_FSDP = "torch.distributed.fsdp."  # FSDP2's hooks keep its sharded parameters current
_CHECKPOINT_WRAPPER = "torch.distributed.algorithms._checkpoint.checkpoint_wrapper"


# What torch's ``_load_from_state_dict`` reports for a tensor of another size (stable since torch 1.x)
_SIZE_MISMATCH = re.compile(r"size mismatch for (?P<key>.+?): copying a param with shape torch\.Size\((?P<saved>\[[^\]]*\])\) "
                            r"from checkpoint, the shape in current model is torch\.Size\((?P<current>\[[^\]]*\])\)\.")

@dataclass(frozen=True)
class Survey:
    """What a module's tree asks of a restore.

    Attributes:
        needs_load_semantics: some module has a load_state_dict hook or its own loader that the
            in-place path would skip.
        kept: keys ``load_state_dict`` does not report missing when absent (a batch norm's
            ``num_batches_tracked``: its loader keeps the current value).
        own: the keys of the parameters and persistent buffers, the only ones torch's default
            loader copies into; any other key of ``state_dict()`` (``_extra_state``, one a
            state-dict hook adds) goes through ``load_state_dict``, even where its tensor is a view
            of a parameter's memory.
    """

    needs_load_semantics: bool
    kept: frozenset[str]
    own: frozenset[str] = frozenset()


@dataclass(frozen=True)
class Versions:
    """A module's saved ``_version``s (where not 1), as its loaders are handed them.

    Attributes:
        saved: by state-dict prefix without DDP's and ``torch.compile``'s parts (``""``: the module).
        wrapped: the destination is a DDP wrapper of the model that was saved (or of one whose
            checkpoint was saved by a wrapper), so its prefixes lose their leading ``module``.
    """

    saved: dict[str, int | None]
    wrapped: bool = False

    def at(self, prefix: str) -> int | None:
        """The saved version of the destination's module at ``prefix`` (``"0.bn."``, ``""``)."""
        return self.saved.get(module_keys.prefix_unwrapped(prefix[:-1], self.wrapped), 1)


def survey(module: torch.nn.Module, versions: Versions | None = None) -> Survey:
    """Whether ``module`` must be restored with load_state_dict semantics, and what the in-place path
    must reproduce when it is not (``versions``: as saved, None where not recorded)."""
    needs = False
    kept: list[str] = []
    own: list[str] = []
    for prefix, m in _walk(module, ""):
        needs = needs or _skipped_by_in_place(m)
        own.extend(prefix + k for k in _own_tensors(m))
        if type(m)._load_from_state_dict is _BATCH_NORM_LOAD and _tracks_batches(m):
            version = _version_at(versions, prefix)
            if version is None or version < 2:  # _NormBase fills it in for checkpoints before its version 2
                kept.append(prefix + "num_batches_tracked")
    return Survey(needs, frozenset(kept), frozenset(own))


def _version_at(versions: Versions | None, prefix: str) -> int | None:
    """The saved ``_version`` of the module at ``prefix`` (``"0.bn."``); None where not recorded."""
    return None if versions is None else versions.at(prefix)


def local_metadata(versions: Versions | None, prefix: str) -> dict[str, Any]:
    """What ``load_state_dict`` hands the loader of the module at ``prefix`` from the saved state
    dict's ``_metadata``: its saved version, where the checkpoint recorded versions."""
    return {} if versions is None else {"version": _version_at(versions, prefix)}


def versioned(state: dict[str, Any], module: torch.nn.Module, versions: Versions | None) -> dict[str, Any]:
    """``state`` as ``load_state_dict(state)`` of ``module`` should see it: with the ``_metadata``
    of the saved state dict, where the checkpoint recorded versions."""
    if versions is None:
        return state
    out: OrderedDict[str, Any] = OrderedDict(state)
    out._metadata = {prefix[:-1]: local_metadata(versions, prefix)  # type: ignore[attr-defined]
                     for prefix, _ in _walk(module, "")}
    return out


def _walk(module: torch.nn.Module, prefix: str) -> Iterator[tuple[str, torch.nn.Module]]:
    """Every (prefix, module) that ``load_state_dict`` visits, in its order (a shared module once per prefix)."""
    yield prefix, module
    for name, child in module._modules.items():
        if child is not None:
            yield from _walk(child, prefix + name + ".")


def _hook_module(hook: Any) -> str:
    function = getattr(hook, "hook", hook)  # torch wraps pre-hooks registered with the module in _WrappedHook
    return str(getattr(function, "__module__", "") or "")


def _tracks_batches(m: torch.nn.Module) -> bool:
    count = getattr(m, "num_batches_tracked", None)
    return bool(getattr(m, "track_running_stats", False)) and isinstance(count, torch.Tensor) and not count.is_meta


def _own_loader(m: torch.nn.Module) -> bool:
    """Whether ``m``'s class loads differently from torch's default (a plain batch norm does not)."""
    load = type(m)._load_from_state_dict
    if load is _BATCH_NORM_LOAD:
        count = getattr(m, "num_batches_tracked", None)
        return isinstance(count, torch.Tensor) and count.is_meta and bool(getattr(m, "track_running_stats", False))
    return load is not _DEFAULT_LOAD


def _skipped_by_in_place(m: torch.nn.Module) -> bool:
    """Whether the in-place path would skip something of ``m``'s. FSDP2's hooks and the activation
    checkpoint wrapper's are not: the keys they map are the ``state_dict()`` keys the in-place path uses."""
    if _own_loader(m) or any(not _hook_module(h).startswith(_FSDP) for h in m._load_state_dict_post_hooks.values()):
        return True
    return any(not _hook_module(h).startswith((_FSDP, _CHECKPOINT_WRAPPER)) for h in m._load_state_dict_pre_hooks.values())


def _transforms(m: torch.nn.Module) -> bool:
    """Whether ``m`` must see the saved values before they are loaded: a pre-hook (other than FSDP2's,
    which only reshards) or a loader of its own."""
    return _own_loader(m) or any(not _hook_module(h).startswith(_FSDP) for h in m._load_state_dict_pre_hooks.values())


def _own_tensors(m: torch.nn.Module) -> dict[str, torch.Tensor]:
    """The parameters and persistent buffers torch's default loader copies into, by name."""
    own: dict[str, torch.Tensor] = {k: v for k, v in m._parameters.items() if v is not None}
    own.update((k, v) for k, v in m._buffers.items() if v is not None and k not in m._non_persistent_buffers_set)
    return own


def _has_extra_state(m: torch.nn.Module) -> bool:
    return getattr(type(m), "set_extra_state", _DEFAULT_SET_EXTRA) is not _DEFAULT_SET_EXTRA


@dataclass
class HookedLoad:
    """One module's restore through load_state_dict semantics: planned, then run once.

    Planning (``_load.plan``) fills :attr:`entries` with the state dict torch will see, in the
    checkpoint's order: for a key of :attr:`own_keys` the destination itself (already read in place)
    or a tensor the module's own loader assigns later (:meth:`later`), for any other key the saved
    tensor not read yet. :attr:`consumed` names, per state-dict key, the checkpoint key it came from.
    """

    module: torch.nn.Module
    assign: bool = False
    versions: Versions | None = None  # the saved ``_version``s (``survey``); None: not recorded
    entries: dict[str, Any] = field(default_factory=dict)
    consumed: dict[str, str] = field(default_factory=dict)
    own_keys: dict[str, tuple[str, torch.Tensor | None]] = field(default_factory=dict)
    # restore(cast=True, assign=True): by state-dict key, (saved dtype, the model's dtype) of a saved
    # tensor under a hooked module, cast once its loader has assigned it as it was handed (:meth:`_cast_assigned`)
    casts: dict[str, tuple[torch.dtype, torch.dtype]] = field(default_factory=dict)
    _later: dict[str, dict[str, Any]] = field(default_factory=dict)
    _kept: frozenset[str] = frozenset()

    def __post_init__(self) -> None:
        self._kept = survey(self.module, self.versions).kept
        self.own_keys = dict(self._plain_region(self.module, ""))

    def _plain_region(self, m: torch.nn.Module, prefix: str) -> Iterator[tuple[str, tuple[str, torch.Tensor | None]]]:
        """Keys outside every hooked subtree: key -> (its module's prefix, its tensor; None for extra state)."""
        if _transforms(m):
            return
        for name, t in _own_tensors(m).items():
            yield prefix + name, (prefix, t)
        if _has_extra_state(m):
            yield prefix + EXTRA_STATE, (prefix, None)
        for name, child in m._modules.items():
            if child is not None:
                yield from self._plain_region(child, prefix + name + ".")

    def later(self, prefix: str, key: str, value: Any) -> None:
        """Have the module at ``prefix`` load ``key`` with torch's default loader when the walk reaches
        it (extra state, a meta tensor materialised with ``assign``)."""
        self._later.setdefault(prefix, {})[key] = value
        self.entries[key] = value

    def finish(self, fetch: Fetch, name: str, report: MismatchReport) -> None:
        """Walk the module as ``load_state_dict`` does, then put what it found into ``report``.

        A size mismatch torch's loaders report (they leave that tensor as it is, and
        ``load_state_dict`` would then raise) is a shape mismatch of the report, as on the in-place
        path: the model does not fit the checkpoint, which is not damage.

        Raises:
            CheckpointError: a module's own loader reported another error; the checkpoint is not
                called damaged (a manager does not fall back past it).
        """
        entries, self.entries = self.entries, {}
        missing: list[str] = []
        unexpected: list[str] = []
        errors: list[str] = []
        self._load(self.module, entries, "", (missing, unexpected, errors), fetch)
        del entries
        self._cast_assigned(name, report)
        other = []
        mismatched: set[str] = set()
        for error in errors:
            found = _SIZE_MISMATCH.match(error)
            if found is None:
                other.append(error)
                continue
            mismatched.add(found["key"])
            saved, current = (torch.Size(json.loads(found[g])) for g in ("saved", "current"))
            key = self.consumed.get(found["key"]) or keypath.join(name, keypath.escape_part(found["key"]))
            report.shape_mismatches[key] = (saved, current)  # by the checkpoint's key, as on the in-place path
        if other:
            raise CheckpointError(f"load_state_dict of {name!r} reported: {' '.join(other)} The checkpoint does not "
                                  "fit this model's loaders; nothing in it is damaged.")
        # A loader that copied into a meta tensor (no assign) wrote nothing: torch only warns. Such a
        # key is missing, as on the in-place path, and on the meta device.
        on_meta = {prefix + k for prefix, m in _walk(self.module, "") for k, t in _own_tensors(m).items() if t.is_meta}
        empty = [k for k in self.consumed if k in on_meta and k not in missing]
        report.meta_keys.extend(keypath.join(name, keypath.escape_part(k)) for k in empty)
        report.missing_keys.extend(keypath.join(name, keypath.escape_part(k)) for k in [*missing, *empty])
        report.unexpected_keys.extend(keypath.join(name, keypath.escape_part(k)) for k in unexpected)
        # a size mismatch was left as it is, and a key a pre-hook took out was not loaded: neither is restored
        unused = set(unexpected) | set(empty) | mismatched | set(missing)
        report.restored_keys.extend(full for key, full in self.consumed.items() if key not in unused)

    def _cast_assigned(self, name: str, report: MismatchReport) -> None:
        """``restore(assign=True, cast=True)``: a tensor a loader assigned as it was handed (still of
        the saved dtype, where the model's was another) is cast to the model's dtype, as the in-place
        path casts. A loader hands torch's ``assign`` what it is given, so the cast comes after it:
        one that made the tensor into something else (a quantizing loader's int8) made its choice,
        and is left as it is."""
        for key, (saved_dtype, dtype) in self.casts.items():
            prefix, _, attr = key.rpartition(".")
            try:
                owner = self.module.get_submodule(prefix) if prefix else self.module
            except AttributeError:  # a key a state-dict hook made: no tensor of the module's own
                continue
            params, buffers = owner._parameters, owner._buffers
            t = params.get(attr) if attr in params else buffers.get(attr)
            if t is None or t.is_meta or t.dtype != saved_dtype:
                continue
            cast = t.detach().to(dtype)
            if attr in params:
                params[attr] = torch.nn.Parameter(cast, requires_grad=t.requires_grad)
            else:
                buffers[attr] = cast
            report.cast_keys[keypath.join(name, keypath.escape_part(key))] = (saved_dtype, dtype)

    def _metadata(self, prefix: str) -> dict[str, Any]:
        metadata = local_metadata(self.versions, prefix)
        if self.assign:
            metadata["assign_to_params_buffers"] = True
        return metadata

    def _load(self, m: torch.nn.Module, local: dict[str, Any], prefix: str,
              out: tuple[list[str], list[str], list[str]], fetch: Fetch) -> None:
        """torch's ``load`` for a module outside any hooked subtree; a hooked one is handed to :meth:`_torch_load`."""
        if _transforms(m):
            with fetch([v for v in local.values() if isinstance(v, SAVED)], self._may_view(m)) as tensors:
                self._torch_load(m, filled(local, tensors), prefix, out)
            return
        missing, unexpected, errors = out
        late = self._later.get(prefix)
        if late:
            m._load_from_state_dict(late, prefix, self._metadata(prefix), True, [], [], errors)
        own = _own_tensors(m)
        missing.extend(prefix + k for k in own if prefix + k not in local and prefix + k not in self._kept)
        extra = prefix + EXTRA_STATE
        if _has_extra_state(m) and extra not in local:
            missing.append(extra)
        elif not _has_extra_state(m) and extra in local:  # as torch's: no set_extra_state to take it
            unexpected.append(extra)
        for key in local:
            if key.startswith(prefix) and key != extra:  # torch's rule: a dotted key names a child, else its own
                parts = key[len(prefix):].split(".", 1)
                if (parts[0] not in m._modules) if len(parts) > 1 else (parts[0] not in own):
                    unexpected.append(key)
        for name, child in m._modules.items():
            if child is not None:
                child_prefix = prefix + name + "."
                self._load(child, {k: v for k, v in local.items() if k.startswith(child_prefix)}, child_prefix, out,
                           fetch)
        _post_hooks(m, missing, unexpected)

    def _may_view(self, m: torch.nn.Module) -> bool:
        """Whether ``m``'s loaders may be handed views of the mapped file: not where they would keep
        them (``assign``, a meta tensor to materialise), nor for a destination outside host memory."""
        if self.assign:
            return False
        return all(t.device.type == "cpu" and not t.is_meta for t in itertools.chain(m.parameters(), m.buffers()))

    def _torch_load(self, m: torch.nn.Module, local: dict[str, Any], prefix: str,
                    out: tuple[list[str], list[str], list[str]]) -> None:
        """``Module.load_state_dict``'s inner ``load``, line for line."""
        missing, unexpected, errors = out
        distributed = {k: t for k, t in _own_tensors(m).items() if dist_dtensor.is_dtensor(t) and not t.is_meta}
        handle = m._register_load_state_dict_pre_hook(_parts_for(distributed)) if distributed else None  # type: ignore[no-untyped-call]
        try:
            m._load_from_state_dict(local, prefix, self._metadata(prefix), True, missing, unexpected, errors)
        finally:
            if handle is not None:
                handle.remove()
        for name, child in m._modules.items():
            if child is not None:
                child_prefix = prefix + name + "."
                self._torch_load(child, {k: v for k, v in local.items() if k.startswith(child_prefix)}, child_prefix,
                                 out)
        _post_hooks(m, missing, unexpected)


def _parts_for(distributed: dict[str, Any]) -> Callable[..., None]:
    """A load pre-hook that runs after the module's own: each plain tensor its hooks left under the
    key of a DTensor parameter or buffer (``distributed``) of the same global shape (a renamed key,
    one a hook added) becomes a DTensor laid out as it, which torch's loader copies from (it cannot
    copy a plain tensor into a DTensor)."""

    def hook(state: dict[str, Any], prefix: str, *args: Any) -> None:
        for name, t in distributed.items():
            value = state.get(prefix + name)
            if isinstance(value, torch.Tensor) and not dist_dtensor.is_dtensor(value) and value.shape == t.shape:
                state[prefix + name] = dist_dtensor.part_of(value, t, prefix + name)

    return hook


def _post_hooks(m: torch.nn.Module, missing: list[str], unexpected: list[str]) -> None:
    incompatible = _IncompatibleKeys(missing, unexpected)  # hooks may change the lists in place
    for hook in m._load_state_dict_post_hooks.values():
        if hook(m, incompatible) is not None:
            raise ValueError(f"A load_state_dict post-hook of {type(m).__name__} returned a value; torch requires "
                             "post-hooks to return None and change incompatible_keys in place.")


def filled(local: dict[str, Any], tensors: list[torch.Tensor]) -> dict[str, Any]:
    """``local`` with its saved tensors replaced, in order, by ``tensors`` (what the fetch gave)."""
    fetched = iter(tensors)
    return {k: next(fetched) if isinstance(v, SAVED) else v for k, v in local.items()}
