"""Reading ``index.json`` again, after the fact: to tell a checkpoint replaced while it was being
read from a damaged one, and to check the ``weight_map`` the lazy inspector left for later.

Why a second read: a reader plans from the index it read, and the shards it opens afterwards are
whatever is at the path by then. A save under the same number (an explicit ``checkpoint_number``)
commits another checkpoint there; its shards fail the old index's checks, yet neither checkpoint
is damaged, and a reader that called it damaged would send a user to ``verify`` a good checkpoint
(or a follower to skip it). The seal each index ends with tells the two indexes apart.
"""

from __future__ import annotations

import contextlib
from collections.abc import Iterator

from torchckpt._format import document as format_document
from torchckpt._format import index as format_index
from torchckpt._format.index import Index
from torchckpt._format.spec import INDEX_FILE, MAX_INDEX_SIZE
from torchckpt._history import members as history_members
from torchckpt._load.opened import deleted_meanwhile, distrusting, load_index
from torchckpt._paths import join
from torchckpt._storage.base import Storage
from torchckpt.errors import (
    PARTLY_RESTORED,
    CheckpointDeletedError,
    CheckpointError,
    CheckpointNotFoundError,
    CorruptCheckpointError,
)


def explain(error: CorruptCheckpointError, directory: str, seal: str, storage: Storage) -> CheckpointError:
    """What a shard of ``directory`` found damaged means: ``error`` itself, unless the checkpoint is
    no longer the one whose index (sealed ``seal``) the read was planned from; then a
    :class:`CheckpointDeletedError`, deleted or replaced, with ``error`` as its cause. Costs one
    read of ``index.json``, on the failure path only; never raises."""
    path = join(directory, INDEX_FILE)
    try:
        now = format_document.unseal(storage.read_file(path, MAX_INDEX_SIZE, "Index"), path, "checkpoint index")
    except FileNotFoundError:  # CheckpointDeletedError, from an object store, is one too
        found = deleted_meanwhile(directory)
    except Exception:  # the index cannot be read, or is damaged itself: the damage found stands
        return error
    else:
        if not seal or now == seal:
            return error
        found = replaced_meanwhile(directory, str(error))
    found.__cause__ = error
    return found


@contextlib.contextmanager
def noticing(directory: str, seal: str, storage: Storage) -> Iterator[None]:
    """A step of a read whose damaged shards mean what :func:`explain` says."""
    try:
        yield
    except CorruptCheckpointError as e:
        raise explain(e, directory, seal, storage)  # noqa: B904 (explain chains it)


@contextlib.contextmanager
def reading(directory: str, seal: str | None, storage: Storage, path: str | None) -> Iterator[None]:
    """A reader's read of tensor bytes from ``path`` (None: any shard): a file found damaged is no
    longer trusted by later saves (``opened.distrusting``), and, for a checkpoint whose index
    (sealed ``seal``; None: a plain safetensors file) was read before, one replaced since says so
    (:func:`noticing`) instead of failing a checksum."""
    with distrusting(storage, path):
        if seal is None:
            yield
            return
        with noticing(directory, seal, storage):
            yield


def confirm_unchanged(directory: str, seal: str, storage: Storage) -> None:
    """Once a read has opened the shards it reads (and checked their headers): the index at
    ``directory`` still ends with ``seal``, so the files opened are the ones of the index the read
    was planned from, not those of a checkpoint committed there since (a save under the same
    number replaces the whole directory at once). Without this, a restore with ``verify=False``
    of a checkpoint replaced by one of the same structure read the newer tensors under the older
    index. Reads the index's last bytes only. No index is no replacement: the checkpoint was
    deleted since, which a local read, holding its shards open, survives (and an object store's
    read reports); and a failure to read it is not this check's to report.

    Raises:
        CheckpointDeletedError: the checkpoint was replaced since its index was read.
    """
    if not seal:
        return
    found = history_members.index_seal(directory, storage)  # None: deleted, unreadable now, or damaged since,
    if found is not None and found != seal:  # which is not this check's to report (the reads' checks report damage)
        raise replaced_meanwhile(directory, "its index.json changed after its shards were opened")


def replaced_meanwhile(directory: str, found: str) -> CheckpointDeletedError:
    """The error for a checkpoint that another took the place of since its index was read; ``found``
    is how that showed (the check that failed)."""
    partly = found.endswith(PARTLY_RESTORED)
    found = found.removesuffix(PARTLY_RESTORED).removesuffix(".")
    return CheckpointDeletedError(
        f"Checkpoint {directory} was replaced while it was being read: a save under the same number (an explicit "
        f"checkpoint_number) committed another checkpoint there, which the index read before does not describe "
        f"({found}). Neither checkpoint is damaged; read it again"
        + ("; the objects may be partly restored until then." if partly else "."),
        directory,
    )


def check_weight_map(index: Index, storage: Storage) -> None:
    """Before a reader that deferred it (``load_index(..., defer_weight_map=True)``) first reads
    tensor bytes: the ``weight_map`` is the text the tensor table encodes to, or the index, read
    again in full, checks every entry.

    Raises:
        CorruptCheckpointError: the map does not map exactly the table's tensors to their shards.
        CheckpointDeletedError: the checkpoint was replaced or deleted since its index was read.
    """
    if format_index.weight_map_as_written(index):
        return
    try:
        again = load_index(index.directory, storage)  # every entry checked against the table
    except CheckpointDeletedError:
        raise
    except CheckpointNotFoundError:
        raise deleted_meanwhile(index.directory) from None
    if again.seal != index.seal:
        raise replaced_meanwhile(index.directory, "its index.json changed")
    index.weight_map_digest = None
