"""torchckpt: PyTorch checkpoints as safetensors shards plus a JSON index.

Atomic, never pickled, bit-exact on resume, with partial restore and mismatch reporting.
"""

from __future__ import annotations

# First, and in this order: the exit hook of the leases must be registered before the async writer's
# (exit hooks run last-registered first), and the fork handlers run in the order of the imports here.
from torchckpt._storage import lease, lock  # noqa: F401

# isort: split
from torchckpt._format.tree import PerRank
from torchckpt._version import __version__
from torchckpt.checkpoint import Checkpoint
from torchckpt.errors import (
    CheckpointDeletedError,
    CheckpointError,
    CheckpointNotFoundError,
    CheckpointWriteError,
    CorruptCheckpointError,
    DamagedCheckpointWarning,
    RankTimeoutError,
    RenameConflictError,
    RestoreMismatchError,
    UnsafePickleError,
    UnsupportedStateError,
    VariableNotFoundError,
)
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
    "CheckpointState",
    "CheckpointWriteError",
    "CorruptCheckpointError",
    "DamagedCheckpointWarning",
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
