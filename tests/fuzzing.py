"""A seeded mutation fuzzer for checkpoint directories (used by test_fuzz.py).

Two kinds of case:

- raw: bytes of ``index.json``, a shard or ``checkpoints.json`` are flipped, inserted, deleted or
  truncated, as bit rot or a broken copy would. Every one must be refused: a restore that
  succeeds must give exactly the saved values.
- forged: the JSON of the index, a shard header, the state tree or the state file is rewritten
  with hostile values (deep nesting, huge numbers, wrong types, unhashable keys, lone surrogates,
  module names as dtypes, dangling aliases) and sealed again, as someone who wants to crash the
  reader would. Every one must end in a ``CheckpointError`` or succeed; nothing may raise
  anything else, hang or crash (the CLI's "a bug in torchckpt" counts as raising).

Two subjects: :data:`PLAIN`, a manager's run of single-process checkpoints (format 1), and
:data:`SHARDED`, whose latest checkpoint is format 2 as 2 ranks save it (chunk tables, ``~@``
chunks, ``~r`` per-rank tensors, ``@per_rank`` values; see ``tests/format2.py``), mutated with
format-2 names and values as well, and also exported and consolidated.
"""

from __future__ import annotations

import contextlib
import copy
import io
import json
import os
import random
import re
import shutil
import signal
import struct
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from typing import Any

import torch

import torchckpt
from torchckpt import cli
from torchckpt._history import state as history_state

from . import format2
from .conftest import TiedLM, sealed_json

CASE_SECONDS = 10  # a case that takes longer has hung


def build_target() -> torchckpt.Checkpoint:
    """Objects to restore into (fresh, deterministic values)."""
    torch.manual_seed(0)
    model = TiedLM(vocab=6, dim=3)
    opt = torch.optim.Adam(model.parameters(), lr=0.001)
    sched = torch.optim.lr_scheduler.StepLR(opt, step_size=2, gamma=0.5)
    return torchckpt.Checkpoint(model=model, opt=opt, sched=sched, rng=torchckpt.RNGState(), epoch=0,
                                cfg={"name": "", "widths": (0,), 7: None}, w=torch.zeros(3, dtype=torch.int64))


def build_source() -> torchckpt.Checkpoint:
    ckpt = build_target()
    model, opt = ckpt.model, ckpt.opt
    model.head(model.embed(torch.tensor([1, 2]))).sum().backward()
    opt.step()
    ckpt.sched.step()
    ckpt.epoch = 3
    ckpt.cfg = {"name": "run", "widths": (4, 8.5, float("inf")), 7: None}
    ckpt.w.copy_(torch.tensor([1, -2, 3]))
    return ckpt


def snapshot(ckpt: torchckpt.Checkpoint) -> dict[str, Any]:
    """Everything a restore sets, as comparable values."""
    return {
        "model": {k: v.clone() for k, v in ckpt.model.state_dict().items()},
        "opt": copy.deepcopy(ckpt.opt.state_dict()),
        "sched": copy.deepcopy(ckpt.sched.state_dict()),
        "rng": copy.deepcopy(ckpt.rng.state_dict()),
        "epoch": ckpt.epoch,
        "cfg": copy.deepcopy(ckpt.cfg),
        "w": ckpt.w.clone(),
        "save_counter": ckpt.save_counter,
    }


def same(a: Any, b: Any) -> bool:
    if isinstance(a, torch.Tensor) or isinstance(b, torch.Tensor):
        return (isinstance(a, torch.Tensor) and isinstance(b, torch.Tensor) and a.dtype == b.dtype
                and a.shape == b.shape and torch.equal(a, b))
    if type(a) is not type(b):
        return False
    if isinstance(a, dict):
        return a.keys() == b.keys() and all(same(a[k], b[k]) for k in a)
    if isinstance(a, (list, tuple)):
        return len(a) == len(b) and all(same(x, y) for x, y in zip(a, b))
    if isinstance(a, float) and a != a:
        return b != b
    return a == b


def make_run(root: str) -> tuple[str, dict[str, Any]]:
    """A manager directory with two checkpoints (the second in two shards); returns it and what
    the latest holds."""
    source = build_source()
    directory = os.path.join(root, "run")
    for max_shard_size, metrics in (("5GB", {"loss": 0.5}), (200, {"loss": float("nan"), "acc": 0.25})):
        mgr = torchckpt.CheckpointManager(source, directory, max_to_keep=3, keep_best=1, best_metric="loss",
                                          max_shard_size=max_shard_size)  # the second save in two shards
        mgr.save(metrics=metrics)
        mgr.close()
        source.epoch = 4
    return mgr.directory, snapshot(source)


# -- mutations -------------------------------------------------------------------------------


HOSTILE: list[Any] = [
    None, True, 0, -1, 2**63, -(2**63) - 1, 10**30, 1e300, -0.0, 1.5, "", "x", "\ud800", "a/b", "../x",
    "/etc/passwd", "model-00001-of-00001.safetensors", "index.json", "_dynamo", "onnx", "float32", "cuda:99",
    [], [[]], {}, {"@tensor": None}, {"@float": "nan"}, {"@float": "1e999"}, {"@dtype": "_dynamo"},
    {"@dtype": "onnx"}, {"@size": [10**30]}, {"@size": [-1, "x"]}, {"@device": "nope:1"}, {"@dict": [[[1], 2]]},
    {"@dict": [[{"@tuple": [[1]]}, 2]]}, {"@dict": [[1, 2, 3]]}, {"@counter": [["a", "b"]]}, {"@tuple": 5},
    {"@ordered_dict": [[None, {"@tensor": None}]]}, {"@unknown": 1}, {"@tensor": None, "x": 1}, [0] * 50,
    {"@dict": [[1, 2], [None, 3], [{"@tuple": [1, "a"]}, {}]]}, {"@tuple": [{"@float": "nan"}, 2**70]},
    {"@float": "nan:fff8000000000000"}, {"@float": "nan:3ff0000000000000"}, {"@float": "nan:7ff8 0000 000001"},
    "F32", "I64", "BOGUS", "1,2,3", "99999999999999999999", "-1", ";;", "0123456789abcdef", "zz",
]


DEEP = "\x00deep:"  # a placeholder, written as that many nested arrays (json.dumps itself would recurse)


def deep(depth: int) -> str:
    return f"{DEEP}{depth}"


def _expand_deep(text: bytes) -> bytes:
    def nest(match: re.Match[bytes]) -> bytes:
        n = int(match.group(1))
        return b"[" * n + b"0" + b"]" * n

    return re.sub(rb'"\\u0000deep:(\d+)"', nest, text)


def _paths(node: Any, prefix: tuple[Any, ...] = ()) -> Iterator[tuple[Any, ...]]:
    yield prefix
    if len(prefix) > 30:  # not into the deep nests an earlier edit planted
        return
    if isinstance(node, dict):
        for k, v in node.items():
            yield from _paths(v, (*prefix, k))
    elif isinstance(node, list):
        for i, v in enumerate(node[:20]):
            yield from _paths(v, (*prefix, i))


def _get(node: Any, path: tuple[Any, ...]) -> Any:
    for part in path:
        node = node[part]
    return node


def mutate_json(rng: random.Random, value: Any, focus: tuple[Any, ...] = (), hostile: list[Any] = HOSTILE) -> Any:
    """A copy of ``value`` with one to three hostile edits below ``focus``, drawn from ``hostile``."""
    value = copy.deepcopy(value)
    for _ in range(rng.randint(1, 3)):
        candidates = [p for p in _paths(_get(value, focus), focus)] if _exists(value, focus) else [()]
        path = rng.choice(candidates)
        replacement = copy.deepcopy(rng.choice(hostile + [deep(rng.choice((50, 150, 500, 1200, 5000)))]))
        action = rng.random()
        if not path:
            value = replacement if action < 0.1 else value
            continue
        parent, key = _get(value, path[:-1]), path[-1]
        if action < 0.55:
            parent[key] = replacement
        elif action < 0.7 and isinstance(parent, dict):
            del parent[key]
        elif action < 0.8 and isinstance(parent, list):
            parent.append(copy.deepcopy(parent[key]))
        elif action < 0.9 and isinstance(parent, dict):
            parent[rng.choice(["@dtype", "@tensor", "x", "0", "\ud800", "a/b"])] = replacement
        else:
            node = parent[key]
            if isinstance(node, str) and node:
                parent[key] = node[: rng.randrange(len(node))] + rng.choice(["", ",", ";", "0", "9", "-", "\x00"])
            elif type(node) is int:
                parent[key] = node + rng.choice((-1, 1, 7, -(2**40), 2**62))
            else:
                parent[key] = replacement
    return value


def _exists(value: Any, path: tuple[Any, ...]) -> bool:
    try:
        _get(value, path)
        return True
    except (KeyError, IndexError, TypeError):
        return False


def mutate_bytes(rng: random.Random, data: bytes) -> bytes:
    data = bytearray(data)
    for _ in range(rng.randint(1, 4)):
        if not data:
            data += b"{"
            continue
        i = rng.randrange(len(data))
        action = rng.random()
        if action < 0.5:
            data[i] ^= 1 << rng.randrange(8)
        elif action < 0.65:
            data[i] = rng.randrange(256)
        elif action < 0.75:
            del data[i : i + rng.randint(1, 16)]
        elif action < 0.85:
            data[i:i] = bytes(rng.randrange(256) for _ in range(rng.randint(1, 8)))
        else:
            del data[i:]
    return bytes(data)


def _read_json(path: str) -> Any:
    with open(path, "rb") as f:
        return json.loads(f.read())


def _write_sealed(path: str, value: Any) -> None:
    """Write ``value`` as the library lays out a sealed file, with a valid seal, as a forger would."""
    if isinstance(value, dict) and value:
        data = sealed_json(value, _expand_deep)
    else:
        data = _expand_deep(json.dumps(value).encode())
    with open(path, "wb") as f:
        f.write(data)


def _shard_paths(checkpoint: str) -> list[str]:
    return sorted(os.path.join(checkpoint, n) for n in os.listdir(checkpoint) if n.endswith(".safetensors"))


def _rewrite_header(path: str, edit: Callable[[Any], Any]) -> None:
    with open(path, "rb") as f:
        raw = f.read()
    (n,) = struct.unpack("<Q", raw[:8])
    header = edit(json.loads(raw[8 : 8 + n]))
    body = _expand_deep(json.dumps(header).encode())
    body += b" " * (-(len(body) + 8) % 8)
    with open(path, "wb") as f:
        f.write(struct.pack("<Q", len(body)) + body + raw[8 + n :])


def apply_case(rng: random.Random, run: str, kind: str, subject: Subject | None = None) -> str:
    """Mutate the run directory in place; returns a description of the case."""
    subject = subject or PLAIN
    latest = os.path.join(run, "ckpt-2")
    index_path = os.path.join(latest, "index.json")
    state_path = os.path.join(run, history_state.STATE_FILE)
    target = rng.choice(["index", "shard", "state", "tree"])
    if kind == "raw":
        path = {"index": index_path, "tree": index_path, "state": state_path}.get(target) or rng.choice(_shard_paths(latest))
        if target == "shard" and rng.random() < 0.7:  # mostly the header, where parsing happens
            with open(path, "rb") as f:
                data = f.read()
            (n,) = struct.unpack("<Q", data[:8])
            head = mutate_bytes(rng, data[: 8 + n])
            data = head + data[8 + n :]
        else:
            with open(path, "rb") as f:
                data = mutate_bytes(rng, f.read())
        with open(path, "wb") as f:
            f.write(data)
        return f"raw {target}"
    if target == "index":
        index = _read_json(index_path)
        if subject.records and rng.random() < 0.2:  # a format-aware forger: records point at other bytes
            _swap_records(rng, index)
            target = "records"
        else:
            focus = rng.choice(subject.index_foci)
            index = mutate_json(rng, index, focus, subject.hostile)
        _write_sealed(index_path, index)
    elif target == "tree":
        index = _read_json(index_path)
        _write_sealed(index_path, mutate_json(rng, index, rng.choice(subject.tree_foci), subject.hostile))
    elif target == "state":
        _write_sealed(state_path, mutate_json(rng, _read_json(state_path)))
    else:
        shard = rng.choice(_shard_paths(latest))
        _rewrite_header(shard, lambda h: mutate_json(rng, h, (), subject.hostile))
    return f"forged {target}"


def _swap_records(rng: random.Random, index: dict[str, Any]) -> None:
    """Two stored names of the tensor table trade places, and their weight_map entries their files:
    each record now points at the other tensor's bytes, and the checksums still match them."""
    names = index["torchckpt"]["tensors"]["names"]
    i, j = rng.sample(range(len(names)), 2)
    names[i], names[j] = names[j], names[i]
    files = index["weight_map"]
    files[names[i]], files[names[j]] = files[names[j]], files[names[i]]


# -- subjects --------------------------------------------------------------------------------


@dataclass(frozen=True)
class Subject:
    """What a fuzz run mutates: its run directory (the latest checkpoint is ``ckpt-2``), the objects
    to restore into and their comparable values, where to aim JSON edits, and the values to plant."""

    make_run: Callable[[str], tuple[str, dict[str, Any]]]
    build_target: Callable[[], torchckpt.Checkpoint]
    snapshot: Callable[[torchckpt.Checkpoint], dict[str, Any]]
    index_foci: list[tuple[Any, ...]]
    tree_foci: list[tuple[Any, ...]]
    hostile: list[Any]
    records: bool = False  # also swap tensor records
    tools: bool = False  # also export and consolidate the latest checkpoint


_INDEX_FOCI = [(), ("torchckpt",), ("torchckpt", "tensors"), ("torchckpt", "shards"), ("weight_map",),
               ("torchckpt", "aliases"), ("metadata",)]

PLAIN = Subject(make_run, build_target, snapshot, _INDEX_FOCI,
                [("torchckpt", "state"), ("torchckpt", "state", "opt"), ("torchckpt", "state", "rng"),
                 ("torchckpt", "state", "cfg"), ("torchckpt", "metadata"), ("torchckpt", "objects")], HOSTILE)


def make_sharded_run(root: str) -> tuple[str, dict[str, Any]]:
    """A manager directory whose latest checkpoint, ``ckpt-2``, is format 2 as 2 ranks save it
    (``ckpt-1`` is the same objects saved by one process); returns it and what ``ckpt-2`` holds."""
    directory = os.path.join(root, "run")
    mgr = torchckpt.CheckpointManager(format2.target(), directory, max_to_keep=3)
    mgr.save()
    mgr.save()
    mgr.close()
    shutil.rmtree(os.path.join(directory, "ckpt-2"))
    latest = format2.write_two_rank(os.path.join(directory, "ckpt-2"))
    restored = format2.target()
    assert restored.restore(latest).assert_existing_objects_matched().report.unexpected_keys == ["cursor~r1"]
    return directory, sharded_snapshot(restored)


def sharded_snapshot(ckpt: torchckpt.Checkpoint) -> dict[str, Any]:
    return {"model": {k: v.clone() for k, v in ckpt.model.state_dict().items()},
            "cursor": copy.deepcopy(ckpt.cursor.value), "epoch": ckpt.epoch, "save_counter": ckpt.save_counter}


SHARDED_HOSTILE: list[Any] = [
    "model/weight~@0,0", "model/weight~@3,0", "model/weight~@2,0", "model/weight~@0,1", "model/weight~@",
    "model/weight~@0,0,0", "model/bias~@0", "model/bias", "model/weight", "model/weight~r0", "cursor/seen~r0",
    "cursor/seen~r1", "cursor/seen~r2", "cursor/seen", "x~@0", "~r1", "~@", "6,4", "3,4", "6,4,1", "0,4",
    ",".join(["1"] * 1200), {"@per_rank": []}, {"@per_rank": [1, 2]}, {"@per_rank": [{"@tensor": None}] * 2},
    {"@per_rank": [{"@per_rank": [1, 2]}, 3]}, {"@per_rank": [{"seen": 1}, {"pos": 1}]}, 2, 3, 2**31, 2**31 + 1,
    {"names": ["model/weight"], "dtypes": "F32", "shapes": "6,4"}, {"names": [], "dtypes": "", "shapes": ""},
    {"names": ["model/weight", "model/weight"], "dtypes": "F32,F32", "shapes": "6,4;6,4"},
]

SHARDED = Subject(
    make_sharded_run, format2.target, sharded_snapshot,
    [*_INDEX_FOCI, ("torchckpt", "chunked"), ("torchckpt", "chunked", "names"), ("torchckpt", "tensors", "names"),
     ("torchckpt", "world_size")],
    [("torchckpt", "state"), ("torchckpt", "state", "cursor"), ("torchckpt", "state", "cursor", "@per_rank"),
     ("torchckpt", "state", "model"), ("torchckpt", "objects")],
    HOSTILE + SHARDED_HOSTILE * 3, records=True, tools=True)


# -- running one case ------------------------------------------------------------------------


class Hang(Exception):
    pass


@contextlib.contextmanager
def time_limit(seconds: int) -> Iterator[None]:
    def alarm(signum: int, frame: Any) -> None:
        raise Hang(f"took over {seconds} s")

    old = signal.signal(signal.SIGALRM, alarm)
    signal.alarm(seconds)
    try:
        yield
    finally:
        signal.alarm(0)
        signal.signal(signal.SIGALRM, old)


outcomes: list[str] = []


def exercise(run: str, expected: dict[str, Any], strict_values: bool, subject: Subject | None = None) -> list[str]:
    """Every reader of the library on the mutated run; returns the problems found."""
    import warnings

    subject = subject or PLAIN

    problems: list[str] = []
    latest = os.path.join(run, "ckpt-2")
    warnings.simplefilter("ignore")  # a hostile RNG state warns about CUDA devices, a damaged state file warns

    def library(what: str, fn: Callable[[], Any]) -> Any:
        try:
            return fn()
        except torchckpt.CheckpointError:
            return None
        except Hang:
            raise
        except BaseException as e:  # noqa: BLE001 - the finding
            problems.append(f"{what}: {type(e).__name__}: {str(e)[:300]} at {_where(e)}")
            return None

    target = subject.build_target()

    def restore() -> None:
        status = target.restore(run)
        status.expect_partial()
        outcomes.append("restored")
        if strict_values and status.path == latest:
            got = subject.snapshot(target)
            if not same(got, expected):
                diff = [k for k in expected if not same(got[k], expected[k])]
                problems.append(f"restore succeeded with different values in {diff}")

    library("restore", restore)

    def read_all() -> None:
        reader = torchckpt.load_checkpoint(latest)
        reader.get_variable_to_shape_map()
        reader.get_variable_to_dtype_map()
        _ = reader.metadata, reader.names, repr(reader)
        reader.get_state()
        for name in reader.names:
            reader.get_tensor(name)
        torchckpt.list_variables(latest)

    library("reader", read_all)
    library("state", lambda: torchckpt.get_checkpoint_state(run))
    library("latest", lambda: torchckpt.latest_checkpoint(run))

    def manager() -> None:
        import warnings

        with warnings.catch_warnings():
            warnings.simplefilter("ignore")
            mgr = torchckpt.CheckpointManager(subject.build_target(), run, max_to_keep=3)
        try:
            _ = mgr.checkpoints, mgr.latest_checkpoint, mgr.best_checkpoint
        finally:
            mgr.close()

    library("manager", manager)
    commands = [["inspect", latest], ["inspect", run, "--json"], ["ls", run], ["ls", run, "--json"], ["verify", latest],
                ["diff", os.path.join(run, "ckpt-1"), latest, "--values"]]
    if subject.tools:  # outputs beside the run, removed with it before the next case
        commands += [["export", latest, "--object", "model", os.path.join(os.path.dirname(run), "exported")],
                     ["consolidate", latest, os.path.join(os.path.dirname(run), "consolidated")]]
    for argv in commands:
        out, err = io.StringIO(), io.StringIO()
        try:
            with contextlib.redirect_stdout(out), contextlib.redirect_stderr(err):
                code = cli.main(argv)
            if code not in (0, 1):
                problems.append(f"cli {argv[0]}: exit {code}")
            if "Traceback" in err.getvalue():
                problems.append(f"cli {argv[0]}: traceback")
            if "a bug in torchckpt" in err.getvalue():  # an exception other than a CheckpointError, OSError or ValueError
                problems.append(f"cli {argv[0]}: {err.getvalue().strip()[:300]}")
        except Hang:
            raise
        except BaseException as e:  # noqa: BLE001 - the finding
            problems.append(f"cli {argv[0]}: {type(e).__name__}: {str(e)[:300]} at {_where(e)}")
    return problems


def _where(error: BaseException) -> str:
    """The innermost frames of the library's own code that the error passed through."""
    import traceback

    frames = [f for f in traceback.extract_tb(error.__traceback__) if "torchckpt" in f.filename and "tests" not in f.filename]
    return " < ".join(f"{os.path.basename(f.filename)}:{f.lineno}" for f in frames[::-1][:3]) or "?"


def fuzz(root: str, cases: int, seed: int = 0, subject: Subject | None = None) -> dict[str, Any]:
    """Run ``cases`` cases on ``subject`` (by default :data:`PLAIN`); returns counts and the first findings."""
    subject = subject or PLAIN
    pristine = os.path.join(root, "pristine")
    os.makedirs(pristine)
    run, expected = subject.make_run(pristine)
    restored = outcomes.count("restored")
    work = os.path.join(root, "work")
    rng = random.Random(seed)
    findings: list[str] = []
    counts = {"raw": 0, "forged": 0, "hangs": 0, "findings": 0}
    for case in range(cases):
        if os.path.exists(work):
            shutil.rmtree(work)
        shutil.copytree(os.path.dirname(run), work, symlinks=True)
        mutated = os.path.join(work, "run")
        kind = "raw" if case % 2 else "forged"
        counts[kind] += 1
        description = apply_case(rng, mutated, kind, subject)
        try:
            with time_limit(CASE_SECONDS):
                # bytes damaged, or records pointing at other records' bytes: a restore that succeeds gives the saved values
                problems = exercise(mutated, expected, kind == "raw" or description == "forged records", subject)
        except Hang as e:
            counts["hangs"] += 1
            problems = [f"hang: {e}"]
        if problems:
            counts["findings"] += 1
            if len(findings) < 20:
                findings.append(f"case {case} ({description}): " + "; ".join(problems))
    return {**counts, "cases": cases, "restored": outcomes.count("restored") - restored, "first": findings}
