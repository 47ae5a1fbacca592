"""A seeded mutation fuzzer for checkpoint directories (used by test_fuzz.py).

Two kinds of case:

- raw: bytes of ``index.json``, a shard or ``checkpoints.json`` are flipped, inserted, deleted or
  truncated, as bit rot or a broken copy would. Every one must be refused: a restore that
  succeeds must give exactly the saved values.
- forged: the JSON of the index, a shard header, the state tree or the state file is rewritten
  with hostile values (deep nesting, huge numbers, wrong types, unhashable keys, lone surrogates,
  module names as dtypes, dangling aliases) and sealed again, as someone who wants to crash the
  reader would. Every one must end in a ``CheckpointError`` or succeed; nothing may raise
  anything else, hang or crash.
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
from typing import Any

import torch

import torchckpt
from torchckpt import _directory, cli

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
    mgr = torchckpt.CheckpointManager(source, os.path.join(root, "run"), max_to_keep=3, keep_best=1,
                                      best_metric="loss")
    mgr.save(metrics={"loss": 0.5})
    source.epoch = 4
    mgr._max_shard_size = 200
    mgr.save(metrics={"loss": float("nan"), "acc": 0.25})
    mgr.close()
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


def mutate_json(rng: random.Random, value: Any, focus: tuple[Any, ...] = ()) -> Any:
    """A copy of ``value`` with one to three hostile edits below ``focus``."""
    value = copy.deepcopy(value)
    for _ in range(rng.randint(1, 3)):
        candidates = [p for p in _paths(_get(value, focus), focus)] if _exists(value, focus) else [()]
        path = rng.choice(candidates)
        replacement = copy.deepcopy(rng.choice(HOSTILE + [deep(rng.choice((50, 150, 1200, 5000)))]))
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


def apply_case(rng: random.Random, run: str, kind: str) -> str:
    """Mutate the run directory in place; returns a description of the case."""
    latest = os.path.join(run, "ckpt-2")
    index_path = os.path.join(latest, "index.json")
    state_path = os.path.join(run, _directory.STATE_FILE)
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
        focus = rng.choice([(), ("torchckpt",), ("torchckpt", "tensors"), ("torchckpt", "shards"), ("weight_map",),
                            ("torchckpt", "aliases"), ("metadata",)])
        _write_sealed(index_path, mutate_json(rng, index, focus))
    elif target == "tree":
        index = _read_json(index_path)
        focus = rng.choice([("torchckpt", "state"), ("torchckpt", "state", "opt"), ("torchckpt", "state", "rng"),
                            ("torchckpt", "state", "cfg"), ("torchckpt", "metadata"), ("torchckpt", "objects")])
        _write_sealed(index_path, mutate_json(rng, index, focus))
    elif target == "state":
        _write_sealed(state_path, mutate_json(rng, _read_json(state_path)))
    else:
        shard = rng.choice(_shard_paths(latest))
        _rewrite_header(shard, lambda h: mutate_json(rng, h))
    return f"forged {target}"


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


def exercise(run: str, expected: dict[str, Any], strict_values: bool) -> list[str]:
    """Every reader of the library on the mutated run; returns the problems found."""
    import warnings

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

    target = build_target()

    def restore() -> None:
        status = target.restore(run)
        status.expect_partial()
        outcomes.append("restored")
        if strict_values and status.path == latest:
            got = snapshot(target)
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
            mgr = torchckpt.CheckpointManager(build_target(), run, max_to_keep=3)
        try:
            _ = mgr.checkpoints, mgr.latest_checkpoint, mgr.best_checkpoint
        finally:
            mgr.close()

    library("manager", manager)
    for argv in (["inspect", latest], ["inspect", run, "--json"], ["ls", run], ["ls", run, "--json"], ["verify", latest],
                 ["diff", os.path.join(run, "ckpt-1"), latest, "--values"]):
        out, err = io.StringIO(), io.StringIO()
        try:
            with contextlib.redirect_stdout(out), contextlib.redirect_stderr(err):
                code = cli.main(argv)
            if code not in (0, 1):
                problems.append(f"cli {argv[0]}: exit {code}")
            if "Traceback" in err.getvalue():
                problems.append(f"cli {argv[0]}: traceback")
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


def fuzz(root: str, cases: int, seed: int = 0) -> dict[str, Any]:
    """Run ``cases`` cases; returns counts and the first findings."""
    pristine = os.path.join(root, "pristine")
    os.makedirs(pristine)
    run, expected = make_run(pristine)
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
        description = apply_case(rng, mutated, kind)
        try:
            with time_limit(CASE_SECONDS):
                problems = exercise(mutated, expected, strict_values=kind == "raw")
        except Hang as e:
            counts["hangs"] += 1
            problems = [f"hang: {e}"]
        if problems:
            counts["findings"] += 1
            if len(findings) < 20:
                findings.append(f"case {case} ({description}): " + "; ".join(problems))
    return {**counts, "cases": cases, "restored": outcomes.count("restored"), "first": findings}
