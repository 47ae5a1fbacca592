"""The ``torchckpt`` command: inspect, ls, diff, verify, export, consolidate, convert.

``main(argv) -> int`` returns 0 on success, 1 on an error (one ``Error: ...`` line on stderr,
never a traceback) and 2 on a usage error.

Why no torch here: importing it takes over a second, and ``inspect``, ``ls``, ``verify`` and
``diff`` read only JSON, headers and bytes. They use dtype names and shapes as tuples; the
commands that build tensors (``diff --values``, ``export``, ``consolidate``, ``convert``) import
torch through the tools they run, when they run.
"""

from __future__ import annotations

import argparse
import datetime
import functools
import json
import math
import sys
from collections.abc import Sequence
from typing import Any

from torchckpt._format import dtypes as format_dtypes
from torchckpt._format import spec
from torchckpt._history import members as history_members
from torchckpt._history import state as history_state
from torchckpt._load import recheck
from torchckpt._paths import is_url, join, name_of
from torchckpt._progress import progress_bar
from torchckpt._storage.base import Storage
from torchckpt._storage.registry import storage_for
from torchckpt._tools import diff as tool_diff
from torchckpt._tools import sharing as tool_sharing
from torchckpt._tools.diff import ABSENT
from torchckpt._tools.verify import verify
from torchckpt._version import __version__
from torchckpt.errors import CheckpointDeletedError, CheckpointError, UnsupportedFormatError, plural, printable
from torchckpt.reader import CheckpointReader, load_checkpoint


def human_bytes(n: float) -> str:
    """``1536`` -> ``"1.5 KiB"``."""
    for unit in ("B", "KiB", "MiB", "GiB"):
        if abs(n) < 1024:
            return f"{n:.0f} {unit}" if unit == "B" else f"{n:.1f} {unit}"
        n /= 1024
    return f"{n:.1f} TiB"


def _json(value: Any) -> str:
    """``--json`` output: strict JSON, so a NaN or infinite metric is the string ``"NaN"``,
    ``"Infinity"`` or ``"-Infinity"`` (Python writes them bare, which ``jq`` and other parsers refuse)."""
    return json.dumps(_finite(value), indent=1, default=str, allow_nan=False)


def _finite(value: Any) -> Any:
    if isinstance(value, float) and not math.isfinite(value):
        return "NaN" if math.isnan(value) else "Infinity" if value > 0 else "-Infinity"
    if isinstance(value, (list, tuple, dict)):
        return {k: _finite(v) for k, v in value.items()} if isinstance(value, dict) else [_finite(v) for v in value]
    return value


def _dtype(name: str) -> str:
    """How the command line shows a dtype: ``"F32"`` as ``float32``, torch's name for it."""
    return format_dtypes.TORCH_NAMES[name]


def _table(rows: list[list[str]], header: list[str], right: set[int]) -> str:
    rows = [[printable(str(c)) for c in row] for row in [header, *rows]]  # names from the files: one line each
    widths = [max(len(r[i]) for r in rows) for i in range(len(header))]
    lines = ["  ".join(c.rjust(w) if i in right else c.ljust(w) for i, (c, w) in enumerate(zip(row, widths))).rstrip()
             for row in rows]
    lines.insert(1, "  ".join("-" * w for w in widths))
    return "\n".join(lines)


# -- inspect -----------------------------------------------------------------------------------


def _options(args: argparse.Namespace, path: str) -> dict[str, Any] | None:
    """``--storage-options`` for a URL (a local path takes none)."""
    return args.storage_options if is_url(path) else None


def _load(args: argparse.Namespace, path: str) -> CheckpointReader:
    return load_checkpoint(path, storage_options=_options(args, path))


def _storage(args: argparse.Namespace, path: str) -> Storage:
    """The storage that holds ``path``, resolved once here: the tools receive it."""
    return storage_for(path, _options(args, path))


def _json_options(text: str) -> dict[str, Any]:
    try:
        value = json.loads(text)
    except (ValueError, RecursionError) as e:
        raise argparse.ArgumentTypeError(f"not JSON ({e or 'nested too deeply'})") from None
    if not isinstance(value, dict):
        raise argparse.ArgumentTypeError("must be a JSON object, such as '{\"anon\": true}'")
    return value


def cmd_inspect(args: argparse.Namespace) -> int:
    reader = _load(args, args.path)
    shapes, dtypes = reader.get_variable_to_dims_map(), reader.get_variable_to_dtype_name_map()
    names = reader.filter(args.filter)
    sharded = reader.world_size > 1
    rows: list[dict[str, Any]] = []
    total, counted, aliases = 0, set(), reader.aliases
    for name in names:
        nbytes = math.prod(shapes[name]) * format_dtypes.itemsize(dtypes[name])
        stored = aliases.get(name, name)
        if stored not in counted:  # tied names (one stored tensor) are counted once, as they are stored
            counted.add(stored)
            total += nbytes
        row: dict[str, Any] = {"name": name, "dtype": _dtype(dtypes[name]), "shape": list(shapes[name]),
                               "bytes": nbytes}
        if sharded:  # a tensor of a job is shown whole (its global shape), with the chunks that tile it
            row["chunks"] = len(reader.chunks_of(name))
            row["shards"] = reader.shards_of(name)
            row["shard"] = row["shards"][0] if len(row["shards"]) == 1 else f"{len(row['shards'])} shards"
        else:
            row["shard"] = reader.shard_of(name)
        rows.append(row)
    sharing = tool_sharing.sharing_of(reader)
    if args.json:
        out = {"path": reader.path, "format": reader.kind, "world_size": reader.world_size,
               "metadata": reader.metadata, "tensors": rows, "total_tensors": len(rows), "total_bytes": total,
               **(sharing.as_json() if sharing else {})}
        print(_json(out))
        return 0
    if reader.storage.real_path(reader.path) != reader.storage.real_path(args.path):
        print(f"checkpoint: {printable(reader.path)}\n")  # a manager's directory: say which of its checkpoints this is
    if sharded:
        table = [[r["name"], r["dtype"], str(r["shape"]), human_bytes(r["bytes"]), str(r["chunks"]), r["shard"]]
                 for r in rows]
        print(_table(table, ["name", "dtype", "global shape", "size", "chunks", "shard"], {3, 4}))
    else:
        table = [[r["name"], r["dtype"], str(r["shape"]), human_bytes(r["bytes"]), r["shard"]] for r in rows]
        print(_table(table, ["name", "dtype", "shape", "size", "shard"], {3}))
    meta = reader.metadata
    shards = len({s for r in rows for s in r.get("shards", [r["shard"]])})
    print(f"\n{plural(len(rows), 'tensor')}, {human_bytes(total)} in {plural(shards, 'shard')}"
          + (f" (filter {args.filter!r})" if args.filter else ""))
    if sharded:
        chunked = sum(1 for r in rows if r["chunks"] > 1)
        print(f"saved by {reader.world_size} ranks: {plural(chunked, 'tensor')} in "
              f"{plural(sum(r['chunks'] for r in rows if r['chunks'] > 1), 'chunk')}")
    for line in sharing.report(human_bytes) if sharing else []:
        print(line)
    if meta.get("format") == "torchckpt":
        created = datetime.datetime.fromtimestamp(meta["created"]).isoformat(" ", "seconds") if meta.get("created") else "?"
        print(f"format {meta['format_version']}, written {created} by torchckpt {meta['torchckpt_version']}, "
              f"torch {meta['torch_version']}")
        objects = printable(", ".join(f"{k} ({v})" for k, v in meta.get("objects", {}).items()))
        if objects:
            print(f"objects: {objects}")
        if meta.get("metrics"):
            print(f"metrics: {json.dumps(meta['metrics'], default=str)}")
    return 0


# -- ls ----------------------------------------------------------------------------------------


def cmd_ls(args: argparse.Namespace) -> int:
    directory = args.directory
    storage = _storage(args, directory)
    if not storage.follows_to_dir(directory):
        raise CheckpointError(f"{directory} is not a directory.")
    try:
        state = history_state.read_state(directory, storage) or history_state.State()
    except history_state.StateFileError as e:
        print(f"warning: {printable(str(e))}; listing the checkpoints on disk", file=sys.stderr)
        state = history_state.State()
    members = history_members.committed_members(directory, None, storage)
    kept = {e.name: e for e in state.checkpoints}
    preserved = {e.name: e for e in state.preserved}
    latest = history_members.latest_in(directory, storage)
    latest_name = name_of(latest) if latest else None
    on_disk = set(members)  # a checkpoint deleted by hand is no longer best
    best = _best_name([e for e in state.checkpoints if e.name in on_disk],
                      [e for e in state.preserved if e.name in on_disk],
                      args.metric or state.best_metric, args.mode or state.best_mode, state.damaged)
    rows, records = [], []
    for name in members:
        entry = kept.get(name) or preserved.get(name)
        problem, newer = None, False
        try:
            reader = _load(args, join(directory, name))
            if reader.index is not None:  # what opening deferred: a listing marks a wrong weight_map damaged
                recheck.check_weight_map(reader.index, reader.storage)
            meta = reader.metadata
            sharing = tool_sharing.sharing_of(reader)
            own = sharing.own_bytes if sharing else None
        except CheckpointDeletedError:
            continue  # deleted since the listing (a run's retention): no longer there to list
        except UnsupportedFormatError as e:  # nothing wrong with it: shown as a newer torchckpt's, not damaged
            meta, own, problem, newer = {}, None, None, True
            print(f"warning: {printable(name)} needs a newer torchckpt: {printable(str(e))}", file=sys.stderr)
        except CheckpointError as e:  # one damaged checkpoint is shown as such; the others are still listed
            meta, own, problem = {}, None, str(e)
            print(f"warning: {printable(name)} is damaged: {printable(problem)}", file=sys.stderr)
        else:
            problem = state.damaged.get(name)  # found damaged by a manager's restore (its data, not its index)
        ts = entry.timestamp if entry and entry.timestamp is not None else meta.get("created")
        metrics = (entry.metrics if entry else None) or meta.get("metrics") or {}
        marks = [m for m, on in (("latest", name == latest_name), ("kept", name in kept),
                                 ("preserved", name in preserved), ("best", name == best),
                                 ("damaged", problem is not None), ("newer-format", newer)) if on]
        number = history_members.number_of(name)
        when = datetime.datetime.fromtimestamp(ts).isoformat(" ", "seconds") if ts else "?"
        rows.append([str(number), name, when, human_bytes(meta.get("total_size") or 0) if meta else "?",
                     human_bytes(own) if own is not None else "?",
                     " ".join(f"{k}={_short(v)}" for k, v in metrics.items()), ",".join(marks)])
        records.append({"number": number, "name": name, "timestamp": ts, "total_size": meta.get("total_size"),
                        "own_size": own, "metrics": metrics, "marks": marks, **({"problem": problem} if problem else {})})
    if args.json:
        print(_json({"directory": directory, "checkpoints": records}))
        return 0
    if not rows:
        print(f"no committed checkpoints in {directory}")
        return 0
    print(_table(rows, ["#", "name", "time", "size", "own", "metrics", "marks"], {0, 3, 4}))
    return 0


def _short(v: Any) -> str:
    return f"{v:.4g}" if isinstance(v, float) else str(v)


def _best_name(kept: list[history_state.Entry], preserved: list[history_state.Entry], metric: str | None, mode: str,
               damaged: dict[str, str]) -> str | None:
    from torchckpt._history.retention import ranked_history

    if metric is None:
        keys = {k for e in [*kept, *preserved] if e.metrics for k in e.metrics}
        metric = next(iter(sorted(keys)), None) if len(keys) == 1 else None
    ranked = ranked_history(kept, preserved, metric, mode, damaged) if metric else []
    return ranked[0].name if ranked else None


# -- diff --------------------------------------------------------------------------------------


def cmd_diff(args: argparse.Namespace) -> int:
    a, b = _load(args, args.a), _load(args, args.b)
    sa, sb = a.get_variable_to_dims_map(), b.get_variable_to_dims_map()
    da, db = a.get_variable_to_dtype_name_map(), b.get_variable_to_dtype_name_map()
    added = sorted(set(sb) - set(sa))
    removed = sorted(set(sa) - set(sb))
    common = sorted(set(sa) & set(sb))
    reshaped = [n for n in common if sa[n] != sb[n]]
    retyped = [n for n in common if da[n] != db[n]]
    va, vb = tool_diff.plain_values(a, b)
    changed = sorted(k for k in set(va) | set(vb) if not tool_diff.same(va.get(k, ABSENT), vb.get(k, ABSENT)))
    values: dict[str, tool_diff.ValueDiff] = {}
    if args.values:
        comparable = [n for n in common if n not in reshaped and n not in retyped]
        total = sum(a.nbytes(n) for n in comparable) * 2
        with progress_bar(total, "diff", args.progress) as bar:
            for name in comparable:
                values[name] = tool_diff.value_diff(a, b, name, bar)
    differ = bool(added or removed or reshaped or retyped or changed or any(v.elements for v in values.values()))
    if args.json:
        print(_json({
            "added": added, "removed": removed,
            "reshaped": {n: [list(sa[n]), list(sb[n])] for n in reshaped},
            "retyped": {n: [_dtype(da[n]), _dtype(db[n])] for n in retyped},
            "state_changed": {k: [tool_diff.jsonable(va.get(k, ABSENT)), tool_diff.jsonable(vb.get(k, ABSENT))] for k in changed},
            "max_abs_diff": {n: v.max_abs for n, v in values.items()} if args.values else None,
            "differing_elements": {n: v.elements for n, v in values.items()} if args.values else None,
        }))
        return 1 if args.exit_code and differ else 0
    for name in added:
        print(f"+ {printable(name)}  {_dtype(db[name])} {list(sb[name])}")
    for name in removed:
        print(f"- {printable(name)}  {_dtype(da[name])} {list(sa[name])}")
    for name in reshaped:
        print(f"~ {printable(name)}  shape {list(sa[name])} -> {list(sb[name])}")
    for name in retyped:
        print(f"~ {printable(name)}  dtype {_dtype(da[name])} -> {_dtype(db[name])}")
    for key in changed:
        print(f"~ {printable(key)}  {tool_diff.render(va.get(key, ABSENT))} -> {tool_diff.render(vb.get(key, ABSENT))}")
    if args.values:
        differing = {n: v for n, v in values.items() if v.elements}
        for name, value in sorted(differing.items()):
            print(f"≠ {printable(name)}  {plural(value.elements, 'element')} {'differs' if value.elements == 1 else 'differ'}, "
                  f"max |a-b| = {value.max_abs:.6g}")
        print(f"{len(differing)} of {plural(len(values), 'comparable tensor')} differ in value")
    print(f"{len(added)} added, {len(removed)} removed, {len(reshaped)} reshaped, {len(retyped)} retyped, "
          f"{plural(len(changed), 'state value')} changed")
    return 1 if args.exit_code and differ else 0


# -- verify ------------------------------------------------------------------------------------


def cmd_verify(args: argparse.Namespace) -> int:
    reader = _load(args, args.path)
    problems = verify(reader, args.progress)
    if problems:
        for problem in problems[:20]:
            print(f"Error: {printable(problem)}", file=sys.stderr)
        if len(problems) > 20:
            print(f"Error: ... and {len(problems) - 20} more problems", file=sys.stderr)
        return 1
    what = "sizes and checksums" if reader.kind == "torchckpt" else "headers (no checksums in this format)"
    if reader.world_size > 1:  # the index was refused on load unless every tensor's chunks tile it
        chunks = [len(reader.chunks_of(n)) for n in reader.names if n not in reader.aliases]
        what += (f", and the {plural(sum(c for c in chunks if c > 1), 'chunk')} of "
                 f"{plural(sum(1 for c in chunks if c > 1), 'tensor')} saved by {reader.world_size} ranks tile them")
    print(f"OK: {reader.path}: {plural(len(reader.names), 'tensor')}, {what} verified")
    return 0


# -- export ------------------------------------------------------------------------------------


def cmd_export(args: argparse.Namespace) -> int:
    from torchckpt._tools import export

    def read_config(limit: int) -> bytes:  # called by the tool once the export is known to be possible
        return storage_for(args.config).read_file(args.config, limit, "Config file")

    reader = _load(args, args.path)
    files = export.export_module(reader, args.object, args.out, _storage(args, args.out), args.max_shard_size,
                                 args.progress, read_config if args.config is not None else None)
    print(f"wrote {', '.join(files)} to {args.out}")
    return 0


# -- consolidate -------------------------------------------------------------------------------


def cmd_consolidate(args: argparse.Namespace) -> int:
    from torchckpt._tools.consolidate import consolidate

    reader = _load(args, args.path)
    done = consolidate(reader, args.out, _storage(args, args.out), rank=args.rank,
                       max_shard_size=args.max_shard_size, progress=args.progress)
    kept = (f"; {plural(done['per_rank_values'], 'per-rank value')} as rank {done['rank']} saved them"
            if done["per_rank_values"] else "")
    print(f"wrote {done['out']}: {plural(done['tensors'], 'tensor')}, {human_bytes(done['bytes'])} in "
          f"{plural(done['shards'], 'shard')}, from {done['path']} (saved by {plural(done['world_size'], 'rank')}){kept}")
    return 0


# -- convert -----------------------------------------------------------------------------------


def cmd_convert(args: argparse.Namespace) -> int:
    from torchckpt.state_dicts import convert

    out = convert(args.src, args.out, max_shard_size=args.max_shard_size, progress=args.progress,
                  storage_options=args.storage_options)
    meta = _load(args, out).metadata
    print(f"wrote {out}: {plural(meta['tensors'], 'tensor')}, {human_bytes(meta.get('total_size') or 0)} in "
          f"{plural(meta['shards'], 'shard')}, from {args.src}")
    return 0


# -- plumbing ----------------------------------------------------------------------------------


def _command(sub: argparse._SubParsersAction[argparse.ArgumentParser], name: str, help: str, example: str,
             parents: list[argparse.ArgumentParser] | None = None) -> argparse.ArgumentParser:
    return sub.add_parser(name, help=help, description=help[0].upper() + help[1:] + ".", parents=parents or [],
                          epilog=f"example:\n  {example}", formatter_class=argparse.RawDescriptionHelpFormatter)


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="torchckpt", description="Inspect, compare, verify, export, consolidate and convert checkpoints.",
        epilog="examples:\n  torchckpt inspect runs/gan\n  torchckpt ls runs/gan\n  torchckpt verify runs/gan/ckpt-7\n"
               "  torchckpt consolidate runs/fsdp/ckpt-7 single-ckpt-7\n  torchckpt convert model.pt model-ckpt\n"
               "run 'torchckpt COMMAND --help' for a command's options",
        formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--version", action="version", version=f"torchckpt {__version__}")
    sub = parser.add_subparsers(dest="command", metavar="COMMAND")
    progress = argparse.ArgumentParser(add_help=False)
    group = progress.add_mutually_exclusive_group()
    group.add_argument("--progress", dest="progress", action="store_true", default=None, help="always show progress bars")
    group.add_argument("--no-progress", dest="progress", action="store_false", help="never show progress bars")
    remote = argparse.ArgumentParser(add_help=False)
    remote.add_argument("--storage-options", type=_json_options, default=None, metavar="JSON",
                        help="fsspec options for URL paths, as a JSON object (for example "
                             "'{\"client_kwargs\": {\"endpoint_url\": \"http://127.0.0.1:9000\"}}'); credentials "
                             "also come from the usual environment (AWS_ENDPOINT_URL, AWS_ACCESS_KEY_ID, ...)")
    _add_reading_commands(sub, progress, remote)
    _add_writing_commands(sub, progress, remote)
    return parser


def _add_reading_commands(sub: argparse._SubParsersAction[argparse.ArgumentParser], progress: argparse.ArgumentParser,
                          remote: argparse.ArgumentParser) -> None:
    """The commands that only read: inspect, ls, diff, verify."""
    p = _command(sub, "inspect", "list a checkpoint's tensors (reads only the index and headers)",
                 "torchckpt inspect runs/gan --filter 'generator/*'", [remote])
    p.add_argument("path", help="checkpoint directory, manager directory (its latest checkpoint), .safetensors file "
                   "or Hugging Face folder")
    p.add_argument("--json", action="store_true", help="machine-readable output")
    p.add_argument("--filter", metavar="GLOB", help="only names matching this shell-style pattern")
    p.set_defaults(handler=cmd_inspect)

    p = _command(sub, "ls", "a manager directory's checkpoints: size, own bytes (what deleting one frees), metrics "
                 "and marks", "torchckpt ls s3://bucket/gan", [remote])
    p.add_argument("directory", help="the directory a CheckpointManager (or Checkpoint.save) writes into")
    p.add_argument("--json", action="store_true", help="machine-readable output")
    p.add_argument("--metric", help="the metric that decides 'best' (default: the manager's best_metric, or the "
                   "only metric recorded)")
    p.add_argument("--mode", choices=("min", "max"), default=None, help="whether lower or higher is better "
                   "(default: the manager's best_mode)")
    p.set_defaults(handler=cmd_ls)

    p = _command(sub, "diff", "tensors and state that differ between two checkpoints",
                 "torchckpt diff runs/gan/ckpt-6 runs/gan/ckpt-7 --values --exit-code", [progress, remote])
    p.add_argument("a", help="the first checkpoint (any path inspect takes)")
    p.add_argument("b", help="the second checkpoint")
    p.add_argument("--values", action="store_true", help="also compare values: per tensor, the elements whose bits differ and the largest |a-b|")
    p.add_argument("--json", action="store_true", help="machine-readable output")
    p.add_argument("--exit-code", action="store_true", help="exit with 1 when the checkpoints differ (as git diff)")
    p.set_defaults(handler=cmd_diff)

    p = _command(sub, "verify", "check every shard against its recorded sizes and checksums",
                 "torchckpt verify runs/gan/ckpt-7", [progress, remote])
    p.add_argument("path", help="the checkpoint to check (any path inspect takes); exit 1 on any problem")
    p.set_defaults(handler=cmd_verify)


def _add_writing_commands(sub: argparse._SubParsersAction[argparse.ArgumentParser], progress: argparse.ArgumentParser,
                          remote: argparse.ArgumentParser) -> None:
    """The commands that write a new folder or checkpoint from one: export, consolidate, convert."""
    p = _command(sub, "export", "write one module's weights as a Hugging Face safetensors folder",
                 "torchckpt export runs/gan --object generator exported/ --config config.json", [progress, remote])
    p.add_argument("path", help="the checkpoint to export from (any path inspect takes)")
    p.add_argument("--object", metavar="NAME", help="the tracked module (or dict of tensors) to export; without "
                                                    "it, every tensor (a checkpoint of a state dict: convert's)")
    p.add_argument("out", help="output folder, a path or a URL (replaced as a whole; atomically on a local disk)")
    _add_max_shard_size(p)
    p.add_argument("--config", metavar="FILE", help="a config.json to copy into the folder (for from_pretrained)")
    p.set_defaults(handler=cmd_export)

    p = _command(sub, "consolidate", "write a checkpoint saved by several ranks as a single-process one (format 1)",
                 "torchckpt consolidate runs/fsdp/ckpt-7 runs/fsdp-ckpt-7-single", [progress, remote])
    p.add_argument("path", help="the checkpoint (any path inspect takes)")
    p.add_argument("out", help="the new checkpoint directory, a path or a URL; it must not exist")
    p.add_argument("--rank", type=int, default=0, help="whose per-rank values (RNG state, PerRank) to keep "
                   "(default 0, as a single process restoring the checkpoint would)")
    _add_max_shard_size(p)
    p.set_defaults(handler=cmd_consolidate)

    p = _command(sub, "convert", "write a torch.save file (.pt, .pth, a Lightning .ckpt), a .safetensors file or a "
                 "Hugging Face folder as a torchckpt checkpoint; a pickle is read with torch.load(weights_only=True), "
                 "so no code in it runs", "torchckpt convert lightning_logs/version_0/checkpoints/last.ckpt runs/last",
                 [progress, remote])
    p.add_argument("src", help="the file or folder to convert, a path or a URL (its kind is told from its bytes)")
    p.add_argument("out", help="the new checkpoint directory, a path or a URL; it must not exist")
    _add_max_shard_size(p)
    p.set_defaults(handler=cmd_convert)


def _add_max_shard_size(p: argparse.ArgumentParser) -> None:
    p.add_argument("--max-shard-size", default=spec.DEFAULT_MAX_SHARD_SIZE,
                   help="bytes per shard, e.g. 500MiB or 2GB (default: 5GB)")


@functools.lru_cache(maxsize=1)
def _parser() -> argparse.ArgumentParser:
    """The parser, built once per process (building it costs more than most commands)."""
    return build_parser()


def main(argv: Sequence[str] | None = None) -> int:
    """Run the command line; returns the exit code (0 ok, 1 error, 2 usage)."""
    for stream in (sys.stdout, sys.stderr):  # names from a hostile file may not encode: never a traceback
        reconfigure = getattr(stream, "reconfigure", None)
        if reconfigure is not None:
            reconfigure(errors="backslashreplace")
    parser = _parser()
    try:
        args = parser.parse_args(argv)
        if argv is None and str(getattr(args, "out", "")).startswith("memory://"):  # a program's memory: gone at exit
            parser.error(f"OUT {args.out} is in this process's memory, which is gone when the command exits; write "
                         "to a path or a storage URL (s3://, gs://, az://)")
    except SystemExit as e:
        return int(e.code or 0)
    handler = getattr(args, "handler", None)
    if handler is None:
        parser.print_help()
        return 0
    try:
        return int(handler(args))
    except BrokenPipeError:  # e.g. piped into head
        return 0
    except (CheckpointError, OSError, ValueError) as e:
        print(f"Error: {printable(str(e))}", file=sys.stderr)
        return 1
    except KeyboardInterrupt:
        print("Error: interrupted", file=sys.stderr)
        return 1
    except Exception as e:  # noqa: BLE001 - a bug of ours: still one line, and how to report it
        print(f"Error: unexpected {type(e).__name__}: {e} (a bug in torchckpt {__version__}; please report it "
              "with the command that caused it)", file=sys.stderr)
        return 1


def entry_point() -> None:
    sys.exit(main())
