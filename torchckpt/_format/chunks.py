"""Format 2's stored names and box geometry: chunks of a logical tensor, and who reads what.

A tensor saved by several ranks is stored as chunks: boxes of the global tensor, each a plain
safetensors tensor named ``X~@o0,o1,...`` after its logical name ``X`` and global offsets. A value
saved per rank has ``~r<rank>`` after its key path. Escaped key parts turn every ``~`` into ``~0``
or ``~1`` (``keypath.escape_part``), so ``~@`` and ``~r`` never occur in a format-1 name: the
suffixes cannot collide with a user's key.

Reading a box out of a chunk is a set of byte runs: once the overlap spans the full extent of
both boxes in every later dimension, the rest is contiguous on both sides. FSDP's dim-0 shards
give one run per overlap; row-wise tensor parallel gives one run per row.
"""

from __future__ import annotations

import dataclasses
import itertools
import math
import re
from collections.abc import Callable, Iterator, Sequence
from typing import TYPE_CHECKING, Any, NamedTuple

from torchckpt._format.dtypes import (
    CACHED_KEY_CHARS,
    CACHED_KEYS,
    TensorInfo,
    check_dtype,
    parse_shape_key,
    size_of,
    str_to_dtype,
)
from torchckpt._format.spec import DTYPE_SEP, SHAPE_SEP
from torchckpt.errors import CorruptCheckpointError

if TYPE_CHECKING:
    import torch

CHUNK_MARK = "~@"
RANK_MARK = "~r"
MAX_CHUNKS = 2**20  # chunks per logical tensor; a hostile index listing more is refused unread
MAX_DIMS = 64  # dimensions of a chunked tensor: no model's tensor has more; a hostile index's 1,200 are refused
MAX_CORNERS = 2**24  # corners the tiling check counts: chunks x 2^(dimensions along which chunks differ)

Box = tuple[tuple[int, ...], tuple[int, ...]]  # (offsets, sizes)

_OFFSETS = re.compile(r"(?:0|[1-9][0-9]{0,18})(?:,(?:0|[1-9][0-9]{0,18}))*|")  # after the last CHUNK_MARK
_OFFSETS_OF: dict[str, tuple[int, ...]] = {}
_RANKED = re.compile(r"(.+)~r(0|[1-9][0-9]{0,8})\Z", re.DOTALL)


def chunk_name(logical: str, offsets: Sequence[int]) -> str:
    """The stored name of the chunk of ``logical`` at global ``offsets``."""
    return f"{logical}{CHUNK_MARK}{','.join(map(str, offsets))}"


def rank_name(path: str, rank: int) -> str:
    """The stored name of a per-rank tensor saved by ``rank``."""
    return f"{path}{RANK_MARK}{rank}"


def parse_chunk_name(name: str) -> tuple[str, tuple[int, ...]] | None:
    """``(logical name, offsets)`` of a chunk's stored name, or None for any other name.

    The offsets follow the last mark (a mark inside the logical name leaves digits and commas
    after it only where it is the last one). A checkpoint repeats a few offsets (a rank's row of
    every parameter), so each suffix is checked and parsed once."""
    logical, mark, suffix = name.rpartition(CHUNK_MARK)
    if not mark:
        return None
    offsets = _OFFSETS_OF.get(suffix)
    if offsets is None or not logical:
        if not logical or _OFFSETS.fullmatch(suffix) is None:
            raise CorruptCheckpointError(f"Stored tensor name {name[:200]!r} has a malformed chunk suffix.")
        offsets = tuple(int(o) for o in suffix.split(",")) if suffix else ()
        if len(_OFFSETS_OF) < CACHED_KEYS and len(suffix) <= CACHED_KEY_CHARS:  # a model's few, not a forger's
            _OFFSETS_OF[suffix] = offsets
    return logical, offsets


def parse_rank_name(name: str) -> tuple[str, int] | None:
    """``(key path, rank)`` of a per-rank tensor's stored name, or None for any other name."""
    if RANK_MARK not in name:
        return None
    match = _RANKED.match(name)
    return None if match is None else (match.group(1), int(match.group(2)))


def volume(sizes: Sequence[int]) -> int:
    return math.prod(sizes)


def overlap(a: Box, b: Box) -> Box | None:
    """The intersection of two boxes of the same tensor, or None when they share no element."""
    offsets, sizes = [], []
    for ao, asz, bo, bsz in zip(a[0], a[1], b[0], b[1]):
        lo, hi = max(ao, bo), min(ao + asz, bo + bsz)
        if hi <= lo:
            return None
        offsets.append(lo)
        sizes.append(hi - lo)
    return tuple(offsets), tuple(sizes)


def runs(inner: Box, src: Box, dst: Box) -> Iterator[tuple[int, int, int]]:
    """Element runs that copy box ``inner`` from row-major box ``src`` into row-major box ``dst``.

    Yields ``(element offset in src, element offset in dst, element count)`` in increasing source
    order. ``inner`` must lie inside both.
    """
    ndim = len(inner[1])
    if ndim == 0:
        yield 0, 0, 1
        return
    k = ndim - 1  # the outermost dimension from which everything inward is contiguous on both sides
    while k > 0 and inner[1][k] == src[1][k] == dst[1][k]:
        k -= 1
    run = math.prod(inner[1][k:])
    src_strides = _strides(src[1])
    dst_strides = _strides(dst[1])
    rel_src = [i - s for i, s in zip(inner[0], src[0])]
    rel_dst = [i - d for i, d in zip(inner[0], dst[0])]
    for index in _indices(inner[1][:k]):
        s = sum((rel_src[j] + index[j]) * src_strides[j] for j in range(k)) + rel_src[k] * src_strides[k]
        d = sum((rel_dst[j] + index[j]) * dst_strides[j] for j in range(k)) + rel_dst[k] * dst_strides[k]
        yield s, d, run


def _strides(sizes: Sequence[int]) -> list[int]:
    strides = [1] * len(sizes)
    for j in range(len(sizes) - 2, -1, -1):
        strides[j] = strides[j + 1] * sizes[j + 1]
    return strides


def _indices(sizes: Sequence[int]) -> Iterator[tuple[int, ...]]:
    """Every index of a box of ``sizes``, in row-major order (no recursion: any number of dimensions)."""
    return itertools.product(*(range(n) for n in sizes))


def check_tiling(name: str, shape: Sequence[int], boxes: list[Box], where: str) -> None:
    """The chunks of one logical tensor cover it exactly: each in bounds and non-empty, none
    overlapping another, none missing. O(n log n) in the chunks (see :func:`_check_cover`).

    Raises:
        CorruptCheckpointError: naming the tensor and what is wrong.
    """
    if len(boxes) > MAX_CHUNKS:
        raise CorruptCheckpointError(f"Tensor {name!r} {where} has {len(boxes)} chunks, more than {MAX_CHUNKS}.")
    if len(shape) > MAX_DIMS:
        raise CorruptCheckpointError(f"Tensor {name!r} {where} has {len(shape)} dimensions, more than {MAX_DIMS}.")
    total = 0
    for offsets, sizes in boxes:
        if len(offsets) != len(shape) or len(sizes) != len(shape):
            raise CorruptCheckpointError(
                f"A chunk of tensor {name!r} {where} has {len(sizes)} dimensions; the tensor has {len(shape)}.")
        if any(o + s > d for o, s, d in zip(offsets, sizes, shape)):
            raise CorruptCheckpointError(
                f"A chunk of tensor {name!r} {where} at offsets {list(offsets)} with shape {list(sizes)} lies "
                f"outside its shape {list(shape)}.")
        size = volume(sizes)
        if size == 0:
            raise CorruptCheckpointError(f"A chunk of tensor {name!r} {where} at offsets {list(offsets)} is empty.")
        total += size
    if not shape and len(boxes) > 1:
        raise CorruptCheckpointError(f"Tensor {name!r} {where} is a scalar stored as {len(boxes)} chunks.")
    _check_cover(name, shape, boxes, where, total)


def _check_cover(name: str, shape: Sequence[int], boxes: list[Box], where: str, total: int) -> None:
    """In-bounds, non-empty chunks cover the tensor exactly once, in O(n log n) whatever their layout.

    Only the dimensions along which some chunk does not span the whole tensor matter. Along one
    (dim-0 shards, column shards): sorted by offset, each chunk starts where the one before ends.
    Along k of them: a chunk's indicator has a mixed difference of +-1 at its 2^k corners (-1 per
    upper corner), and its prefix sums give the indicator back. So the chunks' indicators sum to
    the tensor's, each element held exactly once, when their corner charges sum to the tensor's:
    counted in a dict, in time linear in the chunks, with no pairwise comparison.
    """
    if not boxes:  # no chunk at all: only a tensor without elements is covered
        if volume(shape):
            raise _gap(name, where, shape, 0, [0] * len(shape))
        return
    varying = [j for j, d in enumerate(shape) if any(o[j] or s[j] != d for o, s in boxes)]
    if not varying:  # every chunk is the whole tensor
        if len(boxes) > 1:
            raise _overlap(name, where, boxes[0], boxes[1])
        return
    if len(varying) == 1:
        j, end = varying[0], 0
        ordered = sorted(boxes, key=lambda b: b[0][j])
        for i, box in enumerate(ordered):
            if box[0][j] < end:
                raise _overlap(name, where, ordered[i - 1], box)
            if box[0][j] > end:
                break
            end += box[1][j]
        if end < shape[j]:
            raise _gap(name, where, shape, total, [end if i == j else 0 for i in range(len(shape))])
        return
    if len(boxes) << len(varying) > MAX_CORNERS:
        raise CorruptCheckpointError(
            f"Tensor {name!r} {where} is split into {len(boxes)} chunks along {len(varying)} dimensions, more "
            f"than torchckpt checks ({MAX_CORNERS} chunk corners: chunks x 2^dimensions).")
    strides = [math.prod(shape[j] + 1 for j in varying[i + 1:]) for i in range(len(varying))]
    charges: dict[int, int] = {}

    def add(offsets: Sequence[int], sizes: Sequence[int], weight: int) -> None:
        keys, signs = [0], [weight]
        for j, stride in zip(varying, strides):
            lo, hi = offsets[j] * stride, (offsets[j] + sizes[j]) * stride
            keys = [k + lo for k in keys] + [k + hi for k in keys]
            signs = signs + [-x for x in signs]
        for key, sign in zip(keys, signs):
            charges[key] = charges.get(key, 0) + sign

    for offsets, sizes in boxes:
        add(offsets, sizes, 1)
    add([0] * len(shape), shape, -1)
    bad = [k for k, v in charges.items() if v]
    if not bad:
        return
    # At the first such corner in row-major order no other one lies below it in every dimension,
    # so the prefix sum there is its own charge: the element there is held twice or more, or never.
    point, rest = [0] * len(shape), min(bad)
    for j, stride in zip(varying, strides):
        point[j], rest = divmod(rest, stride)
    holders = [b for b in boxes if all(o <= p < o + n for o, n, p in zip(b[0], b[1], point))]
    if len(holders) > 1:
        raise _overlap(name, where, holders[0], holders[1])
    raise _gap(name, where, shape, total, point)


def _overlap(name: str, where: str, a: Box, b: Box) -> CorruptCheckpointError:
    return CorruptCheckpointError(
        f"Two chunks of tensor {name!r} {where} overlap: at offsets {list(a[0])} and {list(b[0])}.")


def _gap(name: str, where: str, shape: Sequence[int], total: int, point: list[int]) -> CorruptCheckpointError:
    return CorruptCheckpointError(
        f"The chunks of tensor {name!r} {where} cover {total} of its {volume(shape)} elements, and none holds "
        f"the element at offsets {point}: some part of it was not saved.")


class ChunkedInfo(NamedTuple):
    """A logical tensor of a format-2 checkpoint stored as chunks: its global shape and dtype, and
    each chunk's box with the stored tensor that holds it."""

    name: str
    dtype: torch.dtype
    shape: torch.Size
    pieces: tuple[tuple[Box, TensorInfo], ...]

    @property
    def nbytes(self) -> int:
        return sum(info.nbytes for _, info in self.pieces)

    @property
    def checksum(self) -> None:
        return None


# -- reading format 2 -----------------------------------------------------------------------


@dataclasses.dataclass
class Layout:
    """What a format-2 index says beyond format 1, parsed and checked (empty for format 1)."""

    world_size: int = 1
    chunked: dict[str, tuple[str, str]] = dataclasses.field(default_factory=dict)  # name -> (dtype, shape key)
    pieces: dict[str, list[tuple[Box, str]]] = dataclasses.field(default_factory=dict)  # name -> [(box, stored)]
    ranked: dict[str, tuple[str, int]] = dataclasses.field(default_factory=dict)  # stored -> (key path, rank)
    where: str = ""

    @property
    def chunk_names(self) -> set[str]:
        """The stored names of every chunk."""
        return {name for parts in self.pieces.values() for _, name in parts}

    def rank_names(self, names: list[str], rank: int) -> dict[str, str]:
        """The tensor names rank ``rank`` sees, each -> the name it is known by in the index (a
        chunked tensor by its logical name, its own per-rank tensors by their ``~r`` names; chunks
        and other ranks' tensors left out), in index order."""
        chunks = self.chunk_names
        out = {n: n for n in names if n not in chunks and n not in self.ranked}
        out.update((path, name) for name, (path, r) in self.ranked.items() if r == rank)
        out.update((n, n) for n in self.chunked)
        return out

    def chunked_info(self, name: str, resolve: Callable[[str], Any]) -> ChunkedInfo:
        """The chunked tensor ``name``: its global shape and dtype, each chunk by ``resolve``
        (builds torch objects: a restore's and a reader's, not an inspector's)."""
        dtype, shape = self.chunked[name]  # both checked by parse_layout (_check_stored_once)
        return ChunkedInfo(name, str_to_dtype(dtype), size_of(shape),
                           tuple((box, resolve(n)) for box, n in self.pieces[name]))

    def view(self, names: list[str], aliases: dict[str, str], rank: int, resolve: Callable[[str], Any],
             chunked: Callable[[str], Any] | None = None) -> tuple[list[str], Callable[[str], Any]]:
        """The tensor names rank ``rank`` sees (see :meth:`rank_names`, and the aliases), and a
        resolver for them: a chunked tensor resolves to a :class:`ChunkedInfo` of its chunks (each
        by ``resolve``), or to ``chunked(name)`` when given (a tool that wants only the tree's
        other values, without torch)."""
        known = self.rank_names(names, rank)

        def resolved(name: str) -> Any:
            name = aliases.get(name, name)
            if name in self.chunked:
                return self.chunked_info(name, resolve) if chunked is None else chunked(name)
            return resolve(known.get(name, name))

        return [*known, *aliases], resolved


def parse_layout(section: dict[str, Any], names: list[str], dtypes: list[str], shapes: list[str], directory: str,
                 index_path: str) -> Layout:
    """Check and parse format 2's additions: the world size, the chunked table, and that each
    chunked tensor's chunks tile it.

    Raises:
        CorruptCheckpointError: naming the index; ``.path`` is ``directory``.
    """
    def corrupt(what: str) -> CorruptCheckpointError:
        return CorruptCheckpointError(f"{index_path} is invalid: {what}.", directory)

    layout = _chunked_table(section, index_path, corrupt)
    try:
        plain = _place_names(layout, names, dtypes, shapes, corrupt)
        _check_stored_once(layout, plain, directory, corrupt)
    except CorruptCheckpointError as e:
        if e.path is None:
            e.path = directory
        raise
    return layout


def _chunked_table(section: dict[str, Any], index_path: str, corrupt: Callable[[str], CorruptCheckpointError]) -> Layout:
    """An empty :class:`Layout` of the world size and the 'chunked' table (each logical tensor's
    dtype and shape), checked for types and duplicates."""
    world = section.get("world_size")
    if type(world) is not int or not 1 <= world <= 2**31:
        raise corrupt(f"bad world_size {str(world)[:40]!r}")
    table = section.get("chunked", {})
    logical = table.get("names") if isinstance(table, dict) else None
    if not isinstance(logical, list) or not all(type(n) is str for n in logical) or not all(
            isinstance(table.get(k), str) for k in ("dtypes", "shapes")):
        raise corrupt("the 'chunked' table needs a 'names' list and 'dtypes', 'shapes' strings")
    ldtypes = table["dtypes"].split(DTYPE_SEP) if logical else []
    lshapes = table["shapes"].split(SHAPE_SEP) if logical else []
    if len(ldtypes) != len(logical) or len(lshapes) != len(logical) or len(set(logical)) != len(logical):
        raise corrupt("the 'chunked' table's columns do not describe its names once each")
    return Layout(world, dict(zip(logical, zip(ldtypes, lshapes))), {n: [] for n in logical}, {},
                  f"in {index_path}")


def _place_names(layout: Layout, names: list[str], dtypes: list[str], shapes: list[str],
                 corrupt: Callable[[str], CorruptCheckpointError]) -> set[str]:
    """Each stored tensor put where its name says: a chunk into its logical tensor's pieces, a
    per-rank tensor into ``ranked``. Returns the names stored whole (per-rank ones included)."""
    world = layout.world_size
    plain = set()
    parsed: dict[str, tuple[int, ...]] = {}
    for name, dtype, shape in zip(names, dtypes, shapes):
        chunk = parse_chunk_name(name)
        if chunk is None:
            per_rank = parse_rank_name(name)
            if per_rank is not None:
                if per_rank[1] >= world:
                    raise corrupt(f"tensor {name!r} belongs to a rank beyond the world size {world}")
                layout.ranked[name] = per_rank
            plain.add(name)
            continue
        base, offsets = chunk
        if base not in layout.chunked:
            raise corrupt(f"chunk {name!r} belongs to no tensor of the 'chunked' table")
        if layout.chunked[base][0] != dtype:
            raise corrupt(f"chunk {name!r} is {dtype}, its tensor {layout.chunked[base][0]}")
        sizes = parsed.get(shape)
        if sizes is None:
            sizes = parsed[shape] = parse_shape_key(shape, layout.where)
        layout.pieces[base].append(((offsets, sizes), name))
    return plain


def _check_stored_once(layout: Layout, plain: set[str], directory: str, corrupt: Callable[[str], CorruptCheckpointError]) -> None:
    """Each chunked tensor tiled by its chunks, and every key stored one way only (whole, as
    chunks, or per rank): else tools would disagree about what it holds."""
    for dtype in dict.fromkeys(dtype for dtype, _ in layout.chunked.values()):  # in table order: the same error everywhere
        check_dtype(dtype, f" {layout.where}", directory)
    tiled: set[tuple[str, tuple[Box, ...]]] = set()  # (shape, chunks) found to tile: a model repeats a few
    for base, (_, shape) in layout.chunked.items():
        if base in plain:
            raise corrupt(f"tensor {base!r} is stored both whole and as chunks")
        boxes = tuple(b for b, _ in layout.pieces[base])
        if (shape, boxes) not in tiled:
            check_tiling(base, parse_shape_key(shape, layout.where), list(boxes), layout.where)
            tiled.add((shape, boxes))
    for path, _ in layout.ranked.values():
        if path in layout.chunked:
            raise corrupt(f"tensor {path!r} is stored both as chunks and per rank")
        if path in plain:
            raise corrupt(f"tensor {path!r} is stored both whole and per rank")
