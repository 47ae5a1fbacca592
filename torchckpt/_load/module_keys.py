"""Pairing a checkpoint's module keys with a model's: as they are, or through the wrappers that rename them.

``torch.compile`` puts ``_orig_mod.`` into every key of the module it wraps, and DDP a leading
``module.``; a checkpoint saved with either restores into a model without it, and the other way
round. A child that happens to be named ``module`` is no wrapper, so DDP's prefix is taken off only
where one side really is one (:func:`pair`).
"""

from __future__ import annotations

from collections.abc import Iterable

from torchckpt._format import keypath


def wrappers(saved_keys: list[str], object_keys: list[str]) -> tuple[bool, bool]:
    """Whether the checkpoint's keys, and the model's, are a DDP wrapper's against the other side's."""
    return _ddp_wrapped(saved_keys, object_keys), _ddp_wrapped(object_keys, saved_keys)


def prefix_unwrapped(prefix: str, ddp: bool) -> str:
    """A module's state-dict prefix (``"module.0.bn"``, no trailing dot) without ``torch.compile``'s
    ``_orig_mod`` parts and (``ddp``) the wrapper's ``module``: the wrapped model itself is ``""``."""
    prefix = keypath.canonical_module_key(prefix, ddp=False)
    if not ddp or not (prefix == "module" or prefix.startswith("module.")):
        return prefix
    return prefix[len("module."):]


def pair(saved_keys: Iterable[str], object_keys: Iterable[str], wrapping: tuple[bool, bool] | None = None,
         ) -> dict[str, str]:
    """Pair checkpoint keys with object keys: exactly, or through ``torch.compile``'s ``_orig_mod.``
    parts and, where one side is DDP-wrapped and the other is not, DDP's leading ``module.`` (a
    child named ``module`` is no wrapper: its keys pair only as they are). Once one side is a
    wrapper, every key pairs through the unwrapping, also one that names a key of the other side
    as it is (the wrapper's ``module.weight`` is the model's ``weight``, not its child ``module``'s).
    ``wrapping``: :func:`wrappers` of the same keys, where the caller has it."""
    saved_keys, object_keys = list(saved_keys), list(object_keys)
    saved_ddp, object_ddp = wrapping if wrapping is not None else wrappers(saved_keys, object_keys)
    known = set() if saved_ddp or object_ddp else set(object_keys)
    pairs = {k: k for k in saved_keys if k in known}
    left_saved = [k for k in saved_keys if k not in pairs]
    taken = set(pairs.values())
    left_object = [k for k in object_keys if k not in taken]
    by_canon: dict[str, list[str]] = {}
    for k in left_object:
        by_canon.setdefault(_unwrapped(k, object_ddp), []).append(k)
    saved_canon: dict[str, list[str]] = {}
    for k in left_saved:
        saved_canon.setdefault(_unwrapped(k, saved_ddp), []).append(k)
    for canon, keys in saved_canon.items():
        candidates = by_canon.get(canon, [])
        if len(keys) == 1 and len(candidates) == 1:
            pairs[keys[0]] = candidates[0]
    return pairs


def _unwrapped(key: str, ddp: bool) -> str:
    """``key`` without ``torch.compile``'s ``_orig_mod.`` parts and (``ddp``) one leading ``module.``."""
    key = keypath.canonical_module_key(key, ddp=False)
    return key[len("module."):] if ddp and key.startswith("module.") else key


def _ddp_wrapped(keys: list[str], other: list[str]) -> bool:
    """Whether ``keys`` are a DDP wrapper's against ``other``: every one under a leading ``module.``,
    and more of them name an ``other`` key without it than with it (a child named ``module`` is no
    wrapper: its keys already name the other side's as they are)."""
    keys = [keypath.canonical_module_key(k, ddp=False) for k in keys]
    if not keys or not all(k.startswith("module.") for k in keys):
        return False
    known = {keypath.canonical_module_key(k, ddp=False) for k in other}
    return sum(k[len("module."):] in known for k in keys) > sum(k in known for k in keys)
