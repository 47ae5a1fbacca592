"""Saving from every rank of a job into one checkpoint (format 2).

The steps, every rank in the same order:

1. **Capture** what this rank holds: a DTensor's local chunk (its global box), plain tensors
   (replicated: the same on every rank), and per-rank values (``PerRank``, ``RNGState``), whose
   tensors get a ``~r<rank>`` name.
2. **Exchange** one small record per rank (every tensor's name, dtype, shape and box, a digest of
   each plain tensor, whole up to ``DIGEST_LIMIT`` and of a sample of its bytes beyond, and of the
   non-tensor tree). A plain value or tensor that differs across ranks is refused on every rank,
   naming the key: nothing is silently collapsed to one rank's copy, or to rows of several.
3. **Plan** (``_save.plan``), identically on every rank from the gathered records: each chunk
   is written by one of the ranks that hold it, replicated bytes spread over the ranks largest
   first onto the least loaded (big replicated tensors split into row blocks), files numbered
   globally.
4. **Write**: rank 0 opens the storage's stage and names it; every rank writes its own files
   into it in parallel, without sending any tensor to another rank.
5. **Commit**: rank 0 gathers every rank's file records and checksums, writes ``index.json`` last
   and commits (rename on a local filesystem, the index created last on an object store), then
   tells every rank the outcome. A failure anywhere, or a rank that never reports, discards the
   stage and is raised on every rank.
"""

from __future__ import annotations

import array
import contextlib
import itertools
import json
from collections.abc import Callable, Mapping
from dataclasses import dataclass, field
from typing import Any

import torch
import xxhash

from torchckpt import _tensorio
from torchckpt._dist import dtensor as dist_dtensor
from torchckpt._dist import payloads as dist_payloads
from torchckpt._dist.coordinator import Coordinator
from torchckpt._dist.dtensor import Layout
from torchckpt._format import blocks as format_blocks
from torchckpt._format import chunks, keypath
from torchckpt._format import dtypes as format_dtypes
from torchckpt._format import index as format_index
from torchckpt._format import spec as format_spec
from torchckpt._format import tree as format_tree
from torchckpt._format.dict_order import keep_dict_order
from torchckpt._format.spec import INDEX_FILE, WEIGHT_MAP_KEY
from torchckpt._paths import name_of
from torchckpt._progress import progress_bar
from torchckpt._save import capture as save_capture
from torchckpt._save import layouts as save_layouts
from torchckpt._save import plan as save_plan
from torchckpt._save import reuse as save_reuse
from torchckpt._save import write as save_write
from torchckpt._save.options import FailedAfterCommit, SaveHooks
from torchckpt._save.plan import RankPlan, global_plan, local_bytes, rank_plan
from torchckpt._storage.base import Storage
from torchckpt.errors import CheckpointError, CheckpointWriteError, UnsupportedStateError, format_keys

DIGEST_LIMIT = 2**20  # plain tensors up to this size are compared across ranks whole; larger ones by a sample


# -- 1. capture --------------------------------------------------------------------------------


@dataclass
class Captured:
    """One rank's part of a save."""

    local: dict[str, torch.Tensor] = field(default_factory=dict)  # stored or logical name -> local bytes
    entries: list[list[Any]] = field(default_factory=list)  # [name, dtype, shape, offsets, sizes, digest, group]
    aliases: dict[str, str] = field(default_factory=dict)
    per_rank: list[list[Any]] = field(default_factory=list)  # [JSON path, encoded value]
    tree_digest: str = ""
    layouts: dict[str, Layout | None] = field(default_factory=dict)  # DTensor name -> its layout (or None)
    ranked: set[str] = field(default_factory=set)  # names of per-rank tensors
    order: list[str] = field(default_factory=list)  # every tensor name in the tree's order (``_format.dict_order``)


def capture(tensors: dict[str, Any], section: dict[str, Any], rank: int, groups: Mapping[str, int] | None = None,
            ) -> Captured:
    """Classify every tensor of this rank's state and record what the other ranks must agree on
    (``groups``: how likely each tensor changes before the next save, see ``_save.plan.plan_shards``)."""
    groups = groups or {}
    out = Captured(order=list(tensors))
    _per_rank_nodes(section["state"], [], out.per_rank)
    plain: dict[str, torch.Tensor] = {}
    for name, t in tensors.items():
        if type(t) is format_tree.PerRank:  # a tensor of a per-rank value (see format_tree.encode)
            t = t.value
            if dist_dtensor.is_dtensor(t):
                raise UnsupportedStateError(
                    f"Cannot save tensor {name!r}: it is a DTensor inside a per-rank value (PerRank), which holds "
                    "this rank's own plain tensors. Pass this rank's chunk (`.to_local()`) or the whole tensor "
                    "(`.full_tensor()`) to PerRank, or track the DTensor itself, outside PerRank (saved once, "
                    "sharded).", key=name, value_type=type(t))
            save_capture.check_tensor(name, t)
            ranked = chunks.rank_name(name, rank)
            out.local[ranked] = t
            out.ranked.add(ranked)
            out.entries.append([ranked, format_dtypes.DTYPE_NAMES[t.dtype], list(t.shape), None, None, None, 0])
        elif dist_dtensor.is_dtensor(t):
            box = dist_dtensor.dtensor_box(t, name)
            local = dist_dtensor.local_of(t)
            save_capture.check_tensor(name, local)
            save_capture.check_shape(name, t)  # the global shape, which the index records
            if box is None:
                continue
            dist_dtensor.check_local_shape(t, local, box, name)
            out.local[name] = local
            out.layouts[name] = dist_dtensor.mesh_layout(t)
            out.entries.append([name, format_dtypes.DTYPE_NAMES[t.dtype], list(t.shape), list(box[0]), list(box[1]), None,
                                groups.get(name, 0)])
        else:
            plain[name] = t
    stored, out.aliases = save_capture.prepare_tensors(plain)
    for name, t in stored.items():
        whole = t.nbytes <= DIGEST_LIMIT
        digest = f"{_tensorio.digest_tensor(t) if whole else _tensorio.sampled_digest(t):016x}"
        out.local[name] = t
        out.entries.append([name, format_dtypes.DTYPE_NAMES[t.dtype], list(t.shape), None, None, digest,
                            groups.get(name, 0)])
    shared = {k: v for k, v in section.items() if k != "state"}
    shared["state"] = _without_per_rank(section["state"])
    shared["aliases"] = out.aliases
    out.tree_digest = xxhash.xxh3_64_hexdigest(json.dumps(shared, sort_keys=True).encode())
    return out


def _per_rank_nodes(node: Any, path: list[Any], found: list[list[Any]]) -> None:
    """Collect ``[JSON path, value]`` of every ``@per_rank`` node of an encoded tree."""
    if isinstance(node, dict):
        if len(node) == 1 and format_tree.PER_RANK_TAG in node:
            found.append([path, node[format_tree.PER_RANK_TAG]])
            return
        for k, v in node.items():
            _per_rank_nodes(v, [*path, k], found)
    elif isinstance(node, list):
        for i, v in enumerate(node):
            _per_rank_nodes(v, [*path, i], found)


def _without_per_rank(node: Any) -> Any:
    if isinstance(node, dict):
        if len(node) == 1 and format_tree.PER_RANK_TAG in node:
            return {format_tree.PER_RANK_TAG: None}
        return {k: _without_per_rank(v) for k, v in node.items()}
    if isinstance(node, list):
        return [_without_per_rank(v) for v in node]
    return node


def _leaf_digests(node: Any, path: str, out: dict[str, str]) -> dict[str, str]:
    """A digest per leaf of an encoded tree (to name the values that differ across ranks)."""
    if isinstance(node, dict) and node and not (len(node) == 1 and next(iter(node)).startswith(format_tree.TAG)):
        for k, v in node.items():
            _leaf_digests(v, keypath.join(path, keypath.escape_part(str(k))), out)
    elif isinstance(node, list) and node:
        for i, v in enumerate(node):
            _leaf_digests(v, keypath.join(path, str(i)), out)
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
    return [f"{keypath.display(k)} (ranks {', '.join(map(str, ranks))})" for k, ranks in bad.items()]


def _description(entry: list[Any]) -> tuple[Any, ...]:
    name, dtype, shape, offsets, _, digest, _ = entry
    return (dtype, tuple(shape), offsets is None, digest if offsets is None else None)


def refusal(keys: list[str]) -> CheckpointError:
    error = CheckpointError(
        f"Values differ across ranks: {format_keys(keys, 8)}. A value saved once must be equal, and tracked, on "
        "every rank; wrap one that differs by rank in torchckpt.PerRank(...), or make it equal."
    )
    error.keys = keys  # type: ignore[attr-defined]
    return error


# -- 4. and 5. write and commit ---------------------------------------------------------------


@dataclass
class Prepared:
    """A save after the exchange that every rank makes in program order: what this rank writes
    and the plan every rank agreed on. The rest (:func:`finish`) may run on another thread."""

    path: str
    captured: Captured
    section: dict[str, Any]
    plan: RankPlan
    base: str | None = None  # the checkpoint whose identical shards each rank reuses (``_save.reuse``)
    incremental: bool = False  # a later save compares with this one (see ``_save.write.write_shards``)


def prepare(coord: Coordinator, path: str,
            state: Callable[[], tuple[dict[str, torch.Tensor], dict[str, Any], dict[str, int]]],
            max_shard_size: int, base: str | None = None, incremental: bool = False) -> Prepared:
    """Steps 1 to 3: capture, exchange, plan. ``state()`` returns this rank's tensors, encoded
    tree and the planning group of its tensors (see ``_save.plan.plan_shards``); it runs inside the
    exchange (the call's first, which also compares the ranks' arguments), so that its failure on
    one rank fails the call on every rank. A value that differs across ranks, or any rank's failure,
    is raised on every rank.

    Each rank first plans alone (``_save.layouts``) and sends the digest of its structure; only when
    the digests differ, or a layout needs it, do the ranks exchange their full lists of tensors for
    the general plan (``_save.plan.global_plan``), which also names what differs."""
    captured: Captured | None = None
    failed: Exception | None = None
    section: dict[str, Any] = {}
    drafted: save_layouts.Draft | None = None
    try:
        tensors, section, groups = state()
        captured = capture(tensors, section, coord.rank, groups)
        del tensors
        drafted = save_layouts.draft(captured.entries, captured.layouts, captured.ranked, coord.rank, coord.world,
                                     max_shard_size)
        mine: dict[str, Any] = {"tree": captured.tree_digest}
        if drafted is None:
            mine["entries"] = captured.entries
        else:
            mine.update(structure=drafted.structure, files=len(drafted.shards))
    except Exception as e:
        mine = {"error": dist_payloads.failure_payload(e)}
        failed = e
    records = [dist_payloads.decode(r) for r in coord.all_gather("plan", dist_payloads.encode(mine))]
    _raise_failures(records, "Saving " + path, failed)
    assert captured is not None
    if len({r["tree"] for r in records}) > 1:
        keys = _differing_leaves(coord, section)
        raise refusal(keys)
    structures = {r.get("structure") for r in records}
    if drafted is not None and len(structures) == 1 and None not in structures:
        plan = save_layouts.numbered(drafted, [r["files"] for r in records], coord.rank)
        return Prepared(path, captured, section, plan, base, incremental)
    if any("entries" not in r for r in records):  # every rank sends its full list, as the general plan needs
        full = dist_payloads.encode({"entries": captured.entries})
        records = [dist_payloads.decode(r) for r in coord.all_gather("entries", full)]
    differing = differing_values(records)
    if differing:
        raise refusal(differing)
    plan = rank_plan(global_plan(records, max_shard_size), coord.rank)
    return Prepared(path, captured, section, plan, base, incremental)


def finish(coord: Coordinator, storage: Storage, prepared: Prepared, progress: bool | None,
           replace: bool, hooks: SaveHooks, warm_page_cache: bool = False) -> None:
    """Steps 4 and 5: write every rank's files and commit on rank 0. ``hooks.after`` runs on rank 0
    once the checkpoint is committed; what it returns (JSON) goes to ``hooks.adopt`` on every other
    rank, before the save's failure is raised where ``after`` failed with ``FailedAfterCommit``."""
    path, plan, captured = prepared.path, prepared.plan, prepared.captured
    stage, stage_error = None, None
    if coord.rank == 0:
        try:
            stage = storage.stage(path, replace)  # what is at ``path`` was checked in the first exchange (``_save.saver``)
            opened: dict[str, Any] = {"stage": stage.path}
        except Exception as e:
            opened, stage_error = {"error": dist_payloads.failure_payload(e)}, e
        coord.broadcast("stage", dist_payloads.encode(opened))
    else:
        opened = dist_payloads.decode(coord.broadcast("stage", None, coord.outcome_timeout_secs))
    if "error" in opened:
        raise dist_payloads.collective_error({0: opened["error"]}, "Saving " + path) from stage_error
    checked = save_reuse.Checked() if prepared.incremental else None
    try:
        report, write_error = _write_mine(coord, storage, prepared, opened["stage"], progress, checked)
        reports = _gather_reports(coord, report)
    except BaseException:  # interrupted before the commit: rank 0 removes what it can now, not a later manager
        if stage is not None:
            _clean_up(stage.abandon)
            coord.stop_consequence = "Rank 0 stopped before the commit: nothing was committed."
        raise
    if coord.rank == 0:
        assert stage is not None
        outcome, stop = _commit(coord, stage, path, plan, prepared.section, captured, reports, hooks.after,
                                warm_page_cache, lambda: save_write.refuse_replacing_other(storage, path, replace))
        coord.broadcast("outcome", dist_payloads.encode(outcome))
        if stop is not None:  # interrupted once committed: the others hold what it holds, then it stops
            raise stop
    else:  # rank 0 commits meanwhile: lost now, the checkpoint may be committed or not
        coord.consequence = (f"Rank 0 was committing {path} when it was lost, so it may be committed or not: "
                             "latest_checkpoint() (or whether its index.json exists) says which.")
        outcome = dist_payloads.decode(coord.broadcast("outcome", None, coord.outcome_timeout_secs))
    if coord.rank != 0 and hooks.adopt is not None and outcome.get("after") is not None:
        hooks.adopt(outcome["after"])
    if "failures" in outcome:
        failures = {int(r): f for r, f in outcome["failures"].items()}
        raise dist_payloads.collective_error(failures, "Saving " + path) from write_error
    if checked is not None:
        with contextlib.suppress(OSError):  # a file not remembered is read back next time: never this save's outcome
            checked.keep(storage, path)


def _gather_reports(coord: Coordinator, report: dict[str, Any]) -> list[dict[str, Any]] | Exception:
    """Every rank's write report on rank 0; a rank that never reports is a failure, not a hang."""
    try:
        gathered = coord.gather("report", dist_payloads.encode(report))
    except CheckpointError as e:
        return e
    return [] if gathered is None else [dist_payloads.decode(g) for g in gathered]


def _write_mine(coord: Coordinator, storage: Storage, prepared: Prepared, stage_path: str,
                progress: bool | None, checked: save_reuse.Checked | None) -> tuple[dict[str, Any], Exception | None]:
    """Write this rank's files into the stage (reusing the base's identical files, each rank its
    own); returns its report (or its failure). ``checked`` collects the stamps of its files."""
    path, plan, captured = prepared.path, prepared.plan, prepared.captured
    try:
        base = save_reuse.open_base(storage, prepared.base, coord.world) if prepared.base is not None else None
        files, by_name = plan.files, plan.units
        stored = {n: local_bytes(by_name[n], captured.local) for _, names in files for n in names}
        shards = [save_plan.Shard(names, sum(by_name[n].nbytes for n in names)) for _, names in files]
        stage = storage.join_stage(path, stage_path)
        total = sum(s.nbytes for s in shards)
        try:
            with progress_bar(total, f"save {name_of(path)}", progress if coord.rank == 0 else False) as bar:
                blocks = array.array("Q")
                records, digests = save_write.write_shards(stage, shards, [stage.member(f) for f, _ in files], stored,
                                                           bar.update, blocks, base, prepared.incremental, checked)
        except OSError as e:
            if isinstance(e, CheckpointWriteError):
                raise
            raise CheckpointWriteError(storage.describe_write_failure(path, e), path, e) from e
        rows = [[n for s in shards for n in s.names],
                [format_dtypes.DTYPE_NAMES[by_name[n].dtype] for s in shards for n in s.names],
                [format_dtypes.shape_key(by_name[n].shape) for s in shards for n in s.names],
                "".join(format_index.big_endian(d).hex() for d in digests)]
        for record in records:
            record["rank"] = coord.rank
        if captured.ranked:  # this rank's per-rank values: only it stores their tensors, in its order
            mark = chunks.rank_name("", coord.rank)
            mine = [n[: -len(mark)] for n in rows[0] if n in captured.ranked]
            keep_dict_order(prepared.section["state"], captured.order, mine, per_rank=True)
        reused = base.section(path) if base is not None else None
        return {"records": records, "rows": rows, "nbytes": total, "blocks": format_index.big_endian(blocks).hex(),
                "per_rank": captured.per_rank, "reused": reused}, None
    except Exception as e:
        return {"error": dist_payloads.failure_payload(e)}, e


def _commit(coord: Coordinator, stage: Any, path: str, plan: RankPlan, section: dict[str, Any], captured: Captured,
            reports: list[dict[str, Any]] | Exception,
            after: Callable[[], Any] | None, warm_page_cache: bool, recheck: Callable[[], None],
            ) -> tuple[dict[str, Any], BaseException | None]:
    """Rank 0: write the index and commit once every rank has reported success (else discard;
    ``recheck`` may refuse the commit too), then run ``after``. Returns the outcome for every rank,
    and the interrupt (``KeyboardInterrupt``, ``SystemExit``) that stopped rank 0 on the way, for it
    to raise once the others have the outcome: wherever it stopped, they learn what it left
    (nothing, a checkpoint that may be committed, or one committed and recorded as far as its
    history says)."""
    step = "writing"
    if isinstance(reports, Exception):  # a rank never reported: it may still be writing into the stage
        _clean_up(stage.abandon)
        return {"failures": {0: dist_payloads.failure_payload(reports)}}, None
    try:
        failures = {r: rep["error"] for r, rep in enumerate(reports) if "error" in rep}
        if failures:
            _clean_up(stage.discard)
            return {"failures": failures}, None
        index = _index_document(plan, section, captured, reports, coord.world)
        stage.write_index(INDEX_FILE, format_index.sealed_index(index, path, len(index[WEIGHT_MAP_KEY])))
        recheck()
        step = "committing"
        stage.commit({rec["file"]: rec["size"] for rep in reports for rec in rep["records"]})
        step = "committed"
        outcome, stop = {"ok": path, "after": after() if after is not None else None}, None
    except FailedAfterCommit as e:  # committed: the other ranks take what rank 0 now holds all the same
        stop = None if isinstance(e.cause, Exception) else e.cause
        outcome = {"failures": {0: _interrupted(e.cause, path, "recording") if stop else
                                dist_payloads.failure_payload(e.cause)}, "after": e.result}
    except BaseException as e:
        stop = None if isinstance(e, Exception) else e
        if step == "writing" or step == "committing" and stop is None:  # an interrupted commit may have been made
            _clean_up(stage.discard)
        outcome = {"failures": {0: _interrupted(e, path, step) if stop else dist_payloads.failure_payload(e)}}
        if step != "committed":
            return outcome, stop
    try:  # background work for the next save: never this one's outcome
        stage.settle(every_file=warm_page_cache)  # rank 0: every rank's files, into its host's page cache
    except Exception:  # noqa: BLE001
        pass
    except BaseException as e:  # the outcome stands: sent, then raised
        stop = stop or e
    return outcome, stop


_STOPPED_WHILE = {
    "writing": "before it committed {path}: nothing was committed.",
    "committing": "as it committed {path}, which may be committed or not: latest_checkpoint() (or whether its "
                  "index.json exists) says which.",
    "committed": "once {path} was committed, before it recorded it: a new manager on the directory adopts it.",
    "recording": "once {path} was committed, while it recorded it in the directory's history. Every rank holds the "
                 "history as rank 0 held it then: latest_checkpoint() says whether it names the new checkpoint (a new "
                 "manager on the directory adopts one it does not).",
}


def _interrupted(stop: BaseException, path: str, step: str) -> dict[str, Any]:
    """What the other ranks raise where rank 0 was interrupted at ``step`` (see ``_STOPPED_WHILE``)."""
    return {"type": "CheckpointError",
            "message": f"it was interrupted ({type(stop).__name__}) " + _STOPPED_WHILE[step].format(path=path)}


def _clean_up(action: Callable[[], object]) -> None:
    """Remove (``stage.discard``) or leave marked (``stage.abandon``) a stage that will not be
    committed, best effort: the outcome must reach every rank even when the storage that failed
    the save fails the clean-up too (the next manager removes what is left)."""
    with contextlib.suppress(Exception):
        action()


def _index_document(plan: RankPlan, section: dict[str, Any], captured: Captured, reports: list[dict[str, Any]],
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
    keep_dict_order(section["state"], captured.order, itertools.chain(names, plan.chunked, captured.aliases))
    state = _with_per_rank(section["state"], [rep["per_rank"] for rep in reports])
    body = {**section, "state": state, "world_size": world, "chunked": {
        "names": list(plan.chunked),
        "dtypes": format_spec.DTYPE_SEP.join(format_dtypes.DTYPE_NAMES[d] for d, _ in plan.chunked.values()),
        "shapes": format_spec.SHAPE_SEP.join(format_dtypes.shape_key(s) for _, s in plan.chunked.values()),
    }, format_blocks.KEY: {"size": format_blocks.BLOCK_BYTES, "checksums": "".join(rep["blocks"] for rep in reports)}}
    reused = [rep["reused"] for rep in reports if rep.get("reused")]
    if reused:  # every rank compared with the same base
        body[format_spec.REUSED_KEY] = {"base": reused[0]["base"],
                                        "files": dict(sorted(kv for r in reused for kv in r["files"].items()))}
    table = {"names": names, "dtypes": format_spec.DTYPE_SEP.join(dtypes), "shapes": format_spec.SHAPE_SEP.join(shapes),
             "checksums": "".join(checksums)}
    total = sum(rep["nbytes"] for rep in reports)
    return format_index.index_document(total, weight_map, format_spec.BLOCKS_FORMAT_VERSION, body, captured.aliases, records,
                                table)


def _with_per_rank(state: Any, per_rank: list[list[list[Any]]]) -> Any:
    """Rank 0's state tree with each ``@per_rank`` node holding every rank's value, in rank order."""
    state = json.loads(json.dumps(state))
    # By path, not by position: ranks may hold the same keys inserted in another order.
    by_rank = [{json.dumps(path): value for path, value in values} for values in per_rank]
    for path, _ in per_rank[0]:
        node = state
        for part in path:
            node = node[part]
        key = json.dumps(path)
        missing = [rank for rank, values in enumerate(by_rank) if key not in values]
        if missing:
            raise CheckpointError(f"The per-rank value at {'/'.join(map(str, path))} is missing on rank "
                                  f"{', '.join(map(str, missing))}: every rank must track the same per-rank values.")
        node[format_tree.PER_RANK_TAG] = [values[key] for values in by_rank]
    return state


def _differing_leaves(coord: Coordinator, section: dict[str, Any]) -> list[str]:
    """Second exchange, only when the non-tensor state differs: which keys, on which ranks."""
    shared = {"state": _without_per_rank(section["state"]),
              **{k: v for k, v in section.items() if k not in ("state",)}}
    mine = _leaf_digests(shared, "", {})
    theirs = [dist_payloads.decode(r) for r in coord.all_gather("values", dist_payloads.encode(mine))]
    keys: dict[str, list[int]] = {}
    for rank, digests in enumerate(theirs):
        for key in set(digests) | set(theirs[0]):
            if digests.get(key) != theirs[0].get(key):
                keys.setdefault(key, [0]).append(rank)
    if any(k.startswith("state/") for k in keys):  # the other sections (which objects are tracked) follow from it
        keys = {k: r for k, r in keys.items() if k.startswith("state/")}
    found = []
    for key, ranks in sorted(keys.items()):
        holding = [rank for rank, digests in enumerate(theirs) if key in digests]
        where = (f"ranks {', '.join(map(str, ranks))}" if len(holding) == len(theirs) else
                 f"only on rank{'s' if len(holding) != 1 else ''} {', '.join(map(str, holding))}" if holding else "")
        found.append(f"{key.removeprefix('state/')} ({where})")
    return found or ["the non-tensor state (ranks disagree)"]


def _raise_failures(records: list[dict[str, Any]], what: str, mine: BaseException | None) -> None:
    failures = {r: rec["error"] for r, rec in enumerate(records) if "error" in rec}
    if failures:
        raise dist_payloads.collective_error(failures, what) from mine
