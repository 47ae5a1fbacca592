"""Saving from every rank of a job into one checkpoint (format 2).

The steps, every rank in the same order:

1. **Capture** what this rank holds: a DTensor's local chunk (its global box), plain tensors
   (replicated: the same on every rank), and per-rank values (``PerRank``, ``RNGState``), whose
   tensors get a ``~r<rank>`` name.
2. **Exchange** one small record per rank (every tensor's name, dtype, shape and box, a digest of
   each small plain tensor and of the non-tensor tree). A plain value or small tensor that differs
   across ranks is refused on every rank, naming the key: nothing is silently collapsed to one
   rank's copy.
3. **Plan**, identically on every rank from the gathered records: each chunk is written by one of
   the ranks that hold it, replicated bytes spread over the ranks largest first onto the least
   loaded (big replicated tensors split into row blocks), files numbered globally.
4. **Write**: rank 0 opens the storage's stage and names it; every rank writes its own files
   into it in parallel, without sending any tensor to another rank.
5. **Commit**: rank 0 gathers every rank's file records and checksums, writes ``index.json`` last
   and commits (rename on a local filesystem, the index created last on an object store), then
   tells every rank the outcome. A failure anywhere, or a rank that never reports, discards the
   stage and is raised on every rank.
"""

from __future__ import annotations

import json
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Any

import torch
import xxhash

from torchckpt import _capture, _chunks, _dist, _format, _save, _tensorio, _tree
from torchckpt._backend import Storage, name_of
from torchckpt._chunks import Box
from torchckpt._dist import Coordinator
from torchckpt._format import INDEX_FILE
from torchckpt._progress import progress_bar
from torchckpt.errors import CheckpointError, CheckpointWriteError, UnsupportedStateError, format_keys

DIGEST_LIMIT = 2**20  # plain tensors up to this size are compared across ranks; larger ones are trusted
MIN_BLOCK_BYTES = 8 * 2**20  # a replicated tensor is split into row blocks of about this much or more


def localize(tensors: dict[str, Any]) -> dict[str, torch.Tensor]:
    """For a single process's save: each DTensor that this process holds whole (a mesh of one)
    becomes its local tensor; one sharded over several ranks is refused."""
    out = tensors
    for name, t in tensors.items():
        if _chunks.is_dtensor(t):
            if out is tensors:
                out = dict(tensors)
            box = _chunks.dtensor_box(t, name)
            if box is None or box[1] != tuple(t.shape):
                raise UnsupportedStateError(
                    f"Cannot save {name!r} from one process: it is a DTensor sharded over {t.device_mesh.size()} "
                    "ranks. Call write/save on every rank of the process group (a collective save).",
                    key=name,
                    value_type=type(t),
                )
            out[name] = _chunks.local_of(t)
    return out


# -- 1. capture --------------------------------------------------------------------------------


@dataclass
class Captured:
    """One rank's part of a save."""

    local: dict[str, torch.Tensor] = field(default_factory=dict)  # stored or logical name -> local bytes
    entries: list[list[Any]] = field(default_factory=list)  # [name, dtype, shape, offsets, sizes, digest]
    aliases: dict[str, str] = field(default_factory=dict)
    per_rank: list[list[Any]] = field(default_factory=list)  # [JSON path, encoded value]
    tree_digest: str = ""


def capture(tensors: dict[str, Any], section: dict[str, Any], rank: int) -> Captured:
    """Classify every tensor of this rank's state and record what the other ranks must agree on."""
    out = Captured()
    _per_rank_nodes(section["state"], [], out.per_rank)
    plain: dict[str, torch.Tensor] = {}
    for name, t in tensors.items():
        if type(t) is _tree.PerRank:  # a tensor of a per-rank value (see _tree.encode)
            t = t.value
            _capture.check_tensor(name, t)
            ranked = _chunks.rank_name(name, rank)
            out.local[ranked] = t
            out.entries.append([ranked, _format.DTYPE_NAMES[t.dtype], list(t.shape), None, None, None])
        elif _chunks.is_dtensor(t):
            box = _chunks.dtensor_box(t, name)
            local = _chunks.local_of(t)
            _capture.check_tensor(name, local)
            if box is None:
                continue
            out.local[name] = local
            out.entries.append([name, _format.DTYPE_NAMES[t.dtype], list(t.shape), list(box[0]), list(box[1]), None])
        else:
            plain[name] = t
    stored, out.aliases = _capture.prepare_tensors(plain)
    for name, t in stored.items():
        digest = f"{_tensorio.digest_tensor(t):016x}" if t.nbytes <= DIGEST_LIMIT else None
        out.local[name] = t
        out.entries.append([name, _format.DTYPE_NAMES[t.dtype], list(t.shape), None, None, digest])
    shared = {k: v for k, v in section.items() if k != "state"}
    shared["state"] = _without_per_rank(section["state"])
    shared["aliases"] = out.aliases
    out.tree_digest = xxhash.xxh3_64_hexdigest(json.dumps(shared, sort_keys=True).encode())
    return out


def _per_rank_nodes(node: Any, path: list[Any], found: list[list[Any]]) -> None:
    """Collect ``[JSON path, value]`` of every ``@per_rank`` node of an encoded tree."""
    if isinstance(node, dict):
        if len(node) == 1 and _tree.PER_RANK_TAG in node:
            found.append([path, node[_tree.PER_RANK_TAG]])
            return
        for k, v in node.items():
            _per_rank_nodes(v, [*path, k], found)
    elif isinstance(node, list):
        for i, v in enumerate(node):
            _per_rank_nodes(v, [*path, i], found)


def _without_per_rank(node: Any) -> Any:
    if isinstance(node, dict):
        if len(node) == 1 and _tree.PER_RANK_TAG in node:
            return {_tree.PER_RANK_TAG: None}
        return {k: _without_per_rank(v) for k, v in node.items()}
    if isinstance(node, list):
        return [_without_per_rank(v) for v in node]
    return node


def _leaf_digests(node: Any, path: str, out: dict[str, str]) -> dict[str, str]:
    """A digest per leaf of an encoded tree (to name the values that differ across ranks)."""
    if isinstance(node, dict) and node and not (len(node) == 1 and next(iter(node)).startswith(_tree.TAG)):
        for k, v in node.items():
            _leaf_digests(v, _tree.join(path, _tree.escape_part(str(k))), out)
    elif isinstance(node, list) and node:
        for i, v in enumerate(node):
            _leaf_digests(v, _tree.join(path, str(i)), out)
    else:
        out[path or "(root)"] = xxhash.xxh3_64_hexdigest(json.dumps(node, sort_keys=True).encode())
    return out


# -- 2. agreement --------------------------------------------------------------------------


def differing_values(records: list[dict[str, Any]]) -> list[str]:
    """Keys of plain tensors whose dtype, shape or (small) contents differ across the ranks."""
    seen: dict[str, tuple[int, list[Any]]] = {}
    bad: dict[str, list[int]] = {}
    for rank, record in enumerate(records):
        for entry in record["entries"]:
            name = entry[0]
            first = seen.setdefault(name, (rank, entry))
            if first[0] != rank and _description(first[1]) != _description(entry):
                bad.setdefault(name, [first[0]]).append(rank)
    return [f"{_tree.display(k)} (ranks {', '.join(map(str, ranks))})" for k, ranks in bad.items()]


def _description(entry: list[Any]) -> tuple[Any, ...]:
    name, dtype, shape, offsets, _, digest = entry
    return (dtype, tuple(shape), offsets is None, digest if offsets is None else None)


def refusal(keys: list[str]) -> CheckpointError:
    error = CheckpointError(
        f"Values differ across ranks: {format_keys(keys, 8)}. A value saved once must be equal on every "
        "rank; wrap one that differs by rank in torchckpt.PerRank(...), or make it equal."
    )
    error.keys = keys  # type: ignore[attr-defined]
    return error


# -- 3. the global plan --------------------------------------------------------------------


@dataclass
class Unit:
    """One stored tensor of the checkpoint: a whole tensor, or a chunk of one."""

    stored: str
    logical: str
    dtype: torch.dtype
    box: Box | None  # None: the whole tensor
    shape: tuple[int, ...]  # the stored tensor's own shape
    holders: list[int]
    owner: int = -1

    @property
    def nbytes(self) -> int:
        return _chunks.volume(self.shape) * _format.itemsize(self.dtype)


@dataclass
class GlobalPlan:
    units: list[Unit]
    chunked: dict[str, tuple[torch.dtype, tuple[int, ...]]]  # logical name -> (dtype, global shape)
    files: list[list[tuple[str, list[str]]]]  # per rank: (file name, stored names)


def global_plan(records: list[dict[str, Any]], max_shard_size: int) -> GlobalPlan:
    """Who writes what, and into which files: the same result on every rank."""
    world = len(records)
    units: dict[tuple[Any, ...], Unit] = {}
    logical: dict[str, tuple[torch.dtype, tuple[int, ...]]] = {}
    chunks_of: dict[str, list[Unit]] = {}
    for rank, record in enumerate(records):
        for name, dtype_name, shape, offsets, sizes, _ in record["entries"]:
            dtype = _format.str_to_dtype(dtype_name)
            shape = tuple(shape)
            if offsets is None:
                unit = units.setdefault((name,), Unit(name, name, dtype, None, shape, []))
            else:
                logical.setdefault(name, (dtype, shape))
                box = (tuple(offsets), tuple(sizes))
                if _chunks.volume(box[1]) == 0 and _chunks.volume(shape) != 0:
                    continue
                key = (name, box)
                if key not in units:
                    units[key] = Unit(_chunks.chunk_name(name, box[0]), name, dtype, box, box[1], [])
                    chunks_of.setdefault(name, []).append(units[key])
                unit = units[key]
            unit.holders.append(rank)
    for name, (_, shape) in logical.items():  # a chunk that is the whole tensor keeps the plain name
        parts = chunks_of.get(name, [])
        if len(parts) == 1 and (parts[0].box == (tuple(0 for _ in shape), shape) or _chunks.volume(shape) == 0):
            parts[0].stored, parts[0].box = name, None
    ordered = _split_replicated(list(units.values()), world, logical)
    chunked: dict[str, tuple[torch.dtype, tuple[int, ...]]] = {}
    for unit in ordered:
        if unit.box is not None:
            chunked.setdefault(unit.logical, logical[unit.logical])
    boxes: dict[str, list[Box]] = {}
    for unit in ordered:
        if unit.box is not None:
            boxes.setdefault(unit.logical, []).append(unit.box)
    for name, (_, shape) in chunked.items():
        _chunks.check_tiling(name, shape, boxes[name], "in this save (the DTensor layouts do not tile it)")
    _assign(ordered, world)
    return GlobalPlan(ordered, chunked, _files(ordered, world, max_shard_size))


def _split_replicated(units: list[Unit], world: int,
                      logical: dict[str, tuple[torch.dtype, tuple[int, ...]]]) -> list[Unit]:
    """Replicated whole tensors larger than a fair block become row blocks, each a chunk (their
    global shapes are added to ``logical``)."""
    replicated = sum(u.nbytes for u in units if len(u.holders) > 1)
    block = max(MIN_BLOCK_BYTES, -(-replicated // (world * 8)))
    out: list[Unit] = []
    for unit in units:
        if len(unit.holders) < 2 or unit.box is not None or unit.nbytes <= block or len(unit.shape) == 0:
            out.append(unit)
            continue
        rows = unit.shape[0]
        row_bytes = unit.nbytes // max(1, rows)
        step = max(1, block // max(1, row_bytes))
        if step >= rows:
            out.append(unit)
            continue
        logical[unit.logical] = (unit.dtype, unit.shape)
        for start in range(0, rows, step):
            n = min(step, rows - start)
            offsets = (start,) + (0,) * (len(unit.shape) - 1)
            sizes = (n, *unit.shape[1:])
            out.append(Unit(_chunks.chunk_name(unit.logical, offsets), unit.logical, unit.dtype, (offsets, sizes),
                            sizes, list(unit.holders)))
    return out


def _assign(units: list[Unit], world: int) -> None:
    """Largest first onto the least-loaded holder, after every rank's own (single-holder) bytes."""
    load = [0] * world
    for unit in units:
        if len(unit.holders) == 1:
            unit.owner = unit.holders[0]
            load[unit.owner] += unit.nbytes
    shared = sorted((u for u in units if len(u.holders) > 1), key=lambda u: -u.nbytes)  # stable: plan order
    for unit in shared:
        unit.owner = min(unit.holders, key=lambda r: (load[r], r))
        load[unit.owner] += unit.nbytes


def _files(units: list[Unit], world: int, max_shard_size: int) -> list[list[tuple[str, list[str]]]]:
    per_rank: list[list[list[str]]] = []
    for rank in range(world):
        mine = {u.stored: torch.empty(u.shape, dtype=u.dtype, device="meta") for u in units if u.owner == rank}
        per_rank.append([s.names for s in _save.plan_shards(mine, max_shard_size)] if mine else [])
    if not any(per_rank):
        per_rank[0] = [[]]  # nothing to store: one empty shard, as a single process writes
    total = sum(map(len, per_rank))
    out: list[list[tuple[str, list[str]]]] = []
    number = 1
    for shards in per_rank:
        out.append([])
        for names in shards:
            out[-1].append((_format.shard_name(number, total), names))
            number += 1
    return out


def local_bytes(unit: Unit, local: dict[str, torch.Tensor]) -> torch.Tensor:
    """What this rank writes for ``unit``: its tensor, its DTensor chunk, or a row block."""
    if unit.stored in local:
        return local[unit.stored]
    t = local[unit.logical]
    if unit.box is None or _chunks.is_dtensor(t) or tuple(t.shape) == unit.shape:
        return t
    start, n = unit.box[0][0], unit.box[1][0]
    return t[start : start + n]


# -- 4. and 5. write and commit ---------------------------------------------------------------


@dataclass
class Prepared:
    """A save after the exchange that every rank makes in program order: what this rank writes
    and the plan every rank agreed on. The rest (:func:`finish`) may run on another thread."""

    path: str
    captured: Captured
    section: dict[str, Any]
    plan: GlobalPlan


def prepare(coord: Coordinator, path: str, tensors: dict[str, torch.Tensor], section: dict[str, Any],
            max_shard_size: int) -> Prepared:
    """Steps 1 to 3: capture, exchange, plan. A value that differs across ranks, or any rank's
    failure, is raised on every rank."""
    captured: Captured | None = None
    failed: Exception | None = None
    try:
        captured = capture(tensors, section, coord.rank)
        mine: dict[str, Any] = {"entries": captured.entries, "tree": captured.tree_digest}
    except Exception as e:
        mine = {"error": _dist.failure_payload(e)}
        failed = e
    records = [_dist.decode(r) for r in coord.all_gather("plan", _dist.encode(mine))]
    _raise_failures(records, "Saving " + path, failed)
    assert captured is not None
    if len({r["tree"] for r in records}) > 1:
        keys = _differing_leaves(coord, section)
        raise refusal(keys)
    differing = differing_values(records)
    if differing:
        raise refusal(differing)
    return Prepared(path, captured, section, global_plan(records, max_shard_size))


def save(coord: Coordinator, storage: Storage, path: str, tensors: dict[str, torch.Tensor], section: dict[str, Any],
         max_shard_size: int, progress: bool | None, before_commit: Callable[[str], None] | None, replace: bool,
         after: Callable[[], Any] | None) -> Any:
    """Write one checkpoint from every rank of ``coord``; every rank returns what ``after`` returned
    on rank 0 (see :func:`finish`) or raises the same error."""
    prepared = prepare(coord, path, tensors, section, max_shard_size)
    return finish(coord, storage, prepared, progress, before_commit, replace, after)


def finish(coord: Coordinator, storage: Storage, prepared: Prepared, progress: bool | None,
           before_commit: Callable[[str], None] | None, replace: bool, after: Callable[[], Any] | None) -> Any:
    """Steps 4 and 5: write every rank's files and commit on rank 0. ``after`` runs on rank 0 once
    the checkpoint is committed; what it returns (JSON) is returned on every rank."""
    path, plan, captured = prepared.path, prepared.plan, prepared.captured
    stage, stage_error = None, None
    if coord.rank == 0:
        try:
            stage = storage.stage(path, replace)
            opened: dict[str, Any] = {"stage": stage.path}
        except Exception as e:
            opened, stage_error = {"error": _dist.failure_payload(e)}, e
        coord.broadcast("stage", _dist.encode(opened))
    else:
        opened = _dist.decode(coord.broadcast("stage", None, coord.outcome_timeout_secs))
    if "error" in opened:
        raise _dist.collective_error({0: opened["error"]}, "Saving " + path) from stage_error
    report, write_error = _write_mine(coord, storage, path, opened["stage"], plan, captured, progress)
    reports = _gather_reports(coord, report)
    if coord.rank == 0:
        assert stage is not None
        outcome = _commit(coord, stage, path, plan, prepared.section, captured, reports, before_commit, after)
        coord.broadcast("outcome", _dist.encode(outcome))
    else:
        outcome = _dist.decode(coord.broadcast("outcome", None, coord.outcome_timeout_secs))
    if "failures" in outcome:
        failures = {int(r): f for r, f in outcome["failures"].items()}
        raise _dist.collective_error(failures, "Saving " + path) from write_error
    return outcome.get("after")


def _gather_reports(coord: Coordinator, report: dict[str, Any]) -> list[dict[str, Any]] | Exception:
    """Every rank's write report on rank 0; a rank that never reports is a failure, not a hang."""
    try:
        gathered = coord.gather("report", _dist.encode(report))
    except CheckpointError as e:
        return e
    return [] if gathered is None else [_dist.decode(g) for g in gathered]


def _write_mine(coord: Coordinator, storage: Storage, path: str, stage_path: str, plan: GlobalPlan,
                captured: Captured, progress: bool | None) -> tuple[dict[str, Any], Exception | None]:
    """Write this rank's files into the stage; returns its report (or its failure)."""
    try:
        files = plan.files[coord.rank]
        by_name = {u.stored: u for u in plan.units}
        stored = {n: local_bytes(by_name[n], captured.local) for _, names in files for n in names}
        shards = [_save.Shard(names, sum(by_name[n].nbytes for n in names)) for _, names in files]
        stage = storage.join_stage(path, stage_path)
        total = sum(s.nbytes for s in shards)
        try:
            with progress_bar(total, f"save {name_of(path)}", progress if coord.rank == 0 else False) as bar:
                records, digests = _save.write_shards(stage, shards, [f for f, _ in files], stored, bar.update)
        except OSError as e:
            if isinstance(e, CheckpointWriteError):
                raise
            raise CheckpointWriteError(storage.describe_write_failure(path, e), path, e) from e
        rows = [[n for s in shards for n in s.names],
                [_format.DTYPE_NAMES[by_name[n].dtype] for s in shards for n in s.names],
                [_format.shape_key(by_name[n].shape) for s in shards for n in s.names],
                "".join(_save.big_endian(d).hex() for d in digests)]
        for record in records:
            record["rank"] = coord.rank
        return {"records": records, "rows": rows, "per_rank": captured.per_rank}, None
    except Exception as e:
        return {"error": _dist.failure_payload(e)}, e


def _commit(coord: Coordinator, stage: Any, path: str, plan: GlobalPlan, section: dict[str, Any], captured: Captured,
            reports: list[dict[str, Any]] | Exception, before_commit: Callable[[str], None] | None,
            after: Callable[[], Any] | None) -> dict[str, Any]:
    """Rank 0: write the index and commit once every rank has reported success; else discard."""
    try:
        if isinstance(reports, Exception):
            raise reports
        failures = {r: rep["error"] for r, rep in enumerate(reports) if "error" in rep}
        if failures:
            stage.discard()
            return {"failures": failures}
        index = _index_document(plan, section, captured, reports, coord.world)
        stage.write_index(INDEX_FILE, _format.sealed_pieces(index))
        if before_commit is not None:
            before_commit(stage.path)
        stage.commit({rec["file"]: rec["size"] for rep in reports for rec in rep["records"]})
    except Exception as e:
        stage.discard()
        return {"failures": {0: _dist.failure_payload(e)}}
    try:
        result = after() if after is not None else None
    except Exception as e:
        return {"failures": {0: _dist.failure_payload(e)}}
    return {"ok": path, "after": result}


def _index_document(plan: GlobalPlan, section: dict[str, Any], captured: Captured, reports: list[dict[str, Any]],
                    world: int) -> dict[str, Any]:
    names: list[str] = []
    dtypes: list[str] = []
    shapes: list[str] = []
    checksums: list[str] = []
    records: list[dict[str, Any]] = []
    weight_map: dict[str, str] = {}
    for report in reports:
        rep_names, rep_dtypes, rep_shapes, rep_checksums = report["rows"]
        position = 0
        for record in report["records"]:
            for n in rep_names[position : position + record["tensors"]]:
                weight_map[n] = record["file"]
            position += record["tensors"]
        names += rep_names
        dtypes += rep_dtypes
        shapes += rep_shapes
        checksums.append(rep_checksums)
        records += report["records"]
    state = _with_per_rank(section["state"], [rep["per_rank"] for rep in reports])
    body = {**section, "state": state, "world_size": world, "chunked": {
        "names": list(plan.chunked),
        "dtypes": _format.DTYPE_SEP.join(_format.DTYPE_NAMES[d] for d, _ in plan.chunked.values()),
        "shapes": _format.SHAPE_SEP.join(_format.shape_key(s) for _, s in plan.chunked.values()),
    }}
    table = {"names": names, "dtypes": _format.DTYPE_SEP.join(dtypes), "shapes": _format.SHAPE_SEP.join(shapes),
             "checksums": "".join(checksums)}
    total = sum(u.nbytes for u in plan.units)
    return _save.index_document(total, weight_map, _format.SHARDED_FORMAT_VERSION, body, captured.aliases, records,
                                table)


def _with_per_rank(state: Any, per_rank: list[list[list[Any]]]) -> Any:
    """Rank 0's state tree with each ``@per_rank`` node holding every rank's value, in rank order."""
    state = json.loads(json.dumps(state))
    for i, (path, _) in enumerate(per_rank[0]):
        node = state
        for part in path:
            node = node[part]
        node[_tree.PER_RANK_TAG] = [values[i][1] for values in per_rank]
    return state


def _differing_leaves(coord: Coordinator, section: dict[str, Any]) -> list[str]:
    """Second exchange, only when the non-tensor state differs: which keys, on which ranks."""
    shared = {"state": _without_per_rank(section["state"]),
              **{k: v for k, v in section.items() if k not in ("state",)}}
    mine = _leaf_digests(shared, "", {})
    theirs = [_dist.decode(r) for r in coord.all_gather("values", _dist.encode(mine))]
    keys: dict[str, list[int]] = {}
    for rank, digests in enumerate(theirs):
        for key in set(digests) | set(theirs[0]):
            if digests.get(key) != theirs[0].get(key):
                keys.setdefault(key, [0]).append(rank)
    found = [f"{k.removeprefix('state/')} (ranks {', '.join(map(str, r))})" for k, r in sorted(keys.items())]
    return found or ["the non-tensor state (ranks disagree)"]


def _raise_failures(records: list[dict[str, Any]], what: str, mine: BaseException | None) -> None:
    failures = {r: rec["error"] for r, rec in enumerate(records) if "error" in rec}
    if failures:
        raise _dist.collective_error(failures, what) from mine
