"""torchckpt: PyTorch checkpoints as safetensors shards plus a JSON index.

Atomic, never pickled, bit-exact on resume, with partial restore and mismatch reporting.

The public names are imported when first used (PEP 562), not with the package: ``import
torchckpt`` and the ``torchckpt`` command then cost milliseconds, not the second and a half of
importing torch, which only the names that build or hold tensors need. The errors and the version
are light and imported at once.
"""

from __future__ import annotations

import importlib
from typing import TYPE_CHECKING, Any

# First, and in this order: the exit hook of the leases must be registered before the async writer's
# (exit hooks run last-registered first), and the fork handlers run in the order of the imports here.
# Both are torch-free; the async writer's hooks come with the first save path imported.
from torchckpt._storage import lease, lock  # noqa: F401

# isort: split
from torchckpt._version import __version__
from torchckpt.errors import (
    CheckpointDeletedError,
    CheckpointError,
    CheckpointNotFoundError,
    CheckpointReadError,
    CheckpointTooLargeError,
    CheckpointWriteError,
    CorruptCheckpointError,
    DamagedCheckpointWarning,
    RankTimeoutError,
    RenameConflictError,
    RestoreMismatchError,
    UnsafePickleError,
    UnsupportedFormatError,
    UnsupportedStateError,
    VariableNotFoundError,
)

if TYPE_CHECKING:
    from torchckpt._dist.preemption import IgnoreSignals
    from torchckpt._format.tree import PerRank
    from torchckpt.checkpoint import Checkpoint
    from torchckpt.manager import CheckpointManager
    from torchckpt.reader import CheckpointReader, TensorSpec, list_variables, load_checkpoint, load_variable
    from torchckpt.restore import MismatchReport, PartialRestoreWarning, RestoreStatus
    from torchckpt.rng import RNGState
    from torchckpt.run_state import (
        CheckpointState,
        checkpoints_iterator,
        get_checkpoint_state,
        latest_checkpoint,
        wait_for_new_checkpoint,
    )
    from torchckpt.state_dicts import convert, load_state, save_state

__all__ = [
    "Checkpoint",
    "CheckpointDeletedError",
    "CheckpointError",
    "CheckpointManager",
    "CheckpointNotFoundError",
    "CheckpointReader",
    "CheckpointReadError",
    "CheckpointState",
    "CheckpointTooLargeError",
    "CheckpointWriteError",
    "CorruptCheckpointError",
    "DamagedCheckpointWarning",
    "IgnoreSignals",
    "MismatchReport",
    "PartialRestoreWarning",
    "PerRank",
    "RNGState",
    "RankTimeoutError",
    "RenameConflictError",
    "RestoreMismatchError",
    "RestoreStatus",
    "TensorSpec",
    "UnsafePickleError",
    "UnsupportedFormatError",
    "UnsupportedStateError",
    "VariableNotFoundError",
    "__version__",
    "checkpoints_iterator",
    "convert",
    "get_checkpoint_state",
    "latest_checkpoint",
    "list_variables",
    "load_checkpoint",
    "load_state",
    "load_variable",
    "save_state",
    "wait_for_new_checkpoint",
]

# Each lazily imported public name -> the module that defines it.
_LAZY = {
    "PerRank": "torchckpt._format.tree",
    "IgnoreSignals": "torchckpt._dist.preemption",
    "Checkpoint": "torchckpt.checkpoint",
    "CheckpointManager": "torchckpt.manager",
    **dict.fromkeys(["CheckpointReader", "TensorSpec", "list_variables", "load_checkpoint", "load_variable"],
                    "torchckpt.reader"),
    **dict.fromkeys(["MismatchReport", "PartialRestoreWarning", "RestoreStatus"], "torchckpt.restore"),
    "RNGState": "torchckpt.rng",
    **dict.fromkeys(["CheckpointState", "checkpoints_iterator", "get_checkpoint_state", "latest_checkpoint",
                     "wait_for_new_checkpoint"], "torchckpt.run_state"),
    **dict.fromkeys(["convert", "load_state", "save_state"], "torchckpt.state_dicts"),
}


# The public modules, reachable as attributes as when the package imported them all (``torchckpt.rng``).
_MODULES = frozenset({"checkpoint", "cli", "integrations", "manager", "reader", "restore", "rng", "run_state",
                      "state_dicts"})


def __getattr__(name: str) -> Any:
    """Import a public name's module on first use, then keep the name here (later uses are plain lookups)."""
    if name in _MODULES:
        return importlib.import_module(f"torchckpt.{name}")  # the import binds it here too
    module = _LAZY.get(name)
    if module is None:
        raise AttributeError(f"module 'torchckpt' has no attribute {name!r}")
    value = getattr(importlib.import_module(module), name)
    globals()[name] = value
    return value


def __dir__() -> list[str]:
    return sorted(set(globals()) | set(__all__))
