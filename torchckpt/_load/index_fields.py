"""The index's fields beyond the tensor table and the state tree's form: the save counter, the
user metadata, the modules' versions, and the per-rank values of ranks a restoring job lacks.

A restore and the reader check them as they use them; ``verify`` and ``consolidate`` check them
all (:func:`check_sections`), so that neither passes, or seals anew, an index a reader refuses.
"""

from __future__ import annotations

from typing import Any

from torchckpt._format import per_rank as format_per_rank
from torchckpt._format import tree as format_tree
from torchckpt._format.index import Index
from torchckpt._format.spec import (
    INDEX_FILE,
    ONE_PROCESS_PER_RANK_KEY,
    SAVE_COUNTER,
    SHARDED_FORMAT_VERSION,
    TORCHCKPT_KEY,
)
from torchckpt._paths import join
from torchckpt.errors import CorruptCheckpointError, short_repr


def save_counter_of(tree: dict[str, Any], directory: str) -> int | None:
    """The state tree's ``save_counter`` (None where it has none).

    Raises:
        CorruptCheckpointError: it is not a non-negative integer (a restore sets the counter from it).
    """
    if SAVE_COUNTER not in tree:
        return None
    counter = tree[SAVE_COUNTER]
    if not (type(counter) is int and 0 <= counter < 2**63):
        raise CorruptCheckpointError(f"{directory}: save_counter is {short_repr(counter)}, not a non-negative integer.",
                                     directory)
    return counter


def metadata_of(index: Index) -> Any:
    """The index's user metadata (metrics and the like), decoded from typed JSON.

    Raises:
        CorruptCheckpointError: it is not a tree the writer makes.
    """
    found = index.section.get("metadata")
    if not found:
        return {}
    try:
        return format_tree.decode(found, None, lambda n: None)
    except CorruptCheckpointError as e:
        raise CorruptCheckpointError(f"{join(index.directory, INDEX_FILE)}: its metadata is invalid: {e}",
                                     index.directory) from None


def check_sections(index: Index, tree: dict[str, Any]) -> None:
    """What a restore or the reader refuses beyond the state tree's form (``tree``, decoded): the
    modules' versions, the list of a single process's per-rank values, the save counter and the
    metadata. ``verify`` and ``consolidate`` check
    them too, so that neither passes an index that a reader then refuses.

    Raises:
        CorruptCheckpointError: naming the index and the field.
    """
    index.module_versions()
    one_process_per_rank(index)
    objects = index.section.get("objects")
    if not (isinstance(objects, dict) and SAVE_COUNTER in objects):  # else one of the state's own names (save_state)
        save_counter_of(tree, index.directory)
    metadata_of(index)


def per_rank_count(index: Index) -> int:
    """How many per-rank values the checkpoint's state tree holds (0 before format 2)."""
    if index.raw[TORCHCKPT_KEY]["format_version"] < SHARDED_FORMAT_VERSION:
        return 0
    return sum(1 for _ in format_per_rank.per_rank_paths(index.section.get("state", {})))


def one_process_per_rank(index: Index) -> list[str]:
    """The key paths of the per-rank values a single process's checkpoint holds as plain values
    (none where its index lists none: also one saved before they were listed).

    Raises:
        CorruptCheckpointError: the list is not a list of key paths.
    """
    found = index.section.get(ONE_PROCESS_PER_RANK_KEY, [])
    if not isinstance(found, list) or not all(type(path) is str for path in found):
        raise CorruptCheckpointError(f"{join(index.directory, INDEX_FILE)}: its {ONE_PROCESS_PER_RANK_KEY!r} is not a "
                                     "list of key paths.", index.directory)
    return found


def beyond_world(index: Index, world: int) -> list[str]:
    """The per-rank values no rank of a job of ``world`` ranks takes (a checkpoint of 4 ranks
    restored on 2, or read in one process): ``<key path>~r<rank>`` for each, in checkpoint terms,
    so that a report lists them unexpected instead of leaving them silently unused."""
    if index.raw[TORCHCKPT_KEY]["format_version"] < SHARDED_FORMAT_VERSION or index.world_size <= world:
        return []
    paths = list(format_per_rank.per_rank_paths(index.section.get("state", {})))
    return [f"{path}~r{rank}" for path in paths for rank in range(world, index.world_size)]
