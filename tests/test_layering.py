"""The package's three floors (``../shared/STYLE.md``), enforced by walking every module's imports.

- faces may import engines and foundations; engines only foundations; foundations only each
  other, downward (the import graph has no cycle), and ``errors`` nothing of ours;
- only the storage modules call the operating system's file APIs or import fsspec;
- no module reaches into another module's private names.
"""

from __future__ import annotations

import ast
from pathlib import Path

import pytest

PACKAGE = Path(__file__).resolve().parent.parent / "torchckpt"

FACES = {"__init__", "__main__", "checkpoint", "manager", "reader", "restore", "rng", "run_state", "cli", "_export",
         "_consolidate"}
ENGINES = {"_save", "_capture", "_async", "_load", "_index", "_directory", "_retention", "_recover", "_report",
           "_dist", "_sharded_save", "_global_plan", "_reshard", "_loaders", "_resume"}
STORAGE = {"_backend", "_files", "_atomic", "_output", "_lock", "_local", "_lease", "_fsspec", "_upload",
           "_storage", "_remote_commit"}
FOUNDATIONS = STORAGE | {"errors", "_format", "_tree", "_tensorio", "_threads", "_progress", "_version", "_preemption", "_blocks",
                          "_chunks"}
FLOOR = {**{m: 2 for m in FACES}, **{m: 1 for m in ENGINES}, **{m: 0 for m in FOUNDATIONS}}

# File-system calls: only storage modules make them. (Pure path-string helpers such as
# os.path.join and os.fspath are fine anywhere.)
OS_FILE_CALLS = {"open", "close", "read", "write", "pread", "preadv", "pwrite", "pwritev", "writev", "fsync",
                 "fdatasync", "rename", "replace", "renames", "unlink", "remove", "rmdir", "mkdir", "makedirs",
                 "listdir", "scandir", "stat", "lstat", "fstat", "ftruncate", "truncate", "lseek", "link",
                 "symlink", "readlink", "utime", "chmod", "posix_fadvise", "copy_file_range", "sendfile", "sync"}
OS_PATH_CALLS = {"exists", "lexists", "isdir", "isfile", "islink", "getsize", "getmtime", "realpath", "abspath",
                 "samefile"}
STORAGE_ONLY_IMPORTS = {"fsspec", "s3fs", "gcsfs", "adlfs", "fcntl", "shutil", "mmap"}


def modules() -> dict[str, ast.Module]:
    return {path.stem: ast.parse(path.read_text(), str(path)) for path in sorted(PACKAGE.glob("*.py"))}


def imports_of(tree: ast.Module) -> set[str]:
    """The torchckpt modules a module imports anywhere (top level, functions, TYPE_CHECKING)."""
    found = set()
    for node in ast.walk(tree):
        if isinstance(node, ast.ImportFrom) and node.module:
            if node.module == "torchckpt":
                found.update(a.name for a in node.names if a.name in FLOOR)
            elif node.module.startswith("torchckpt."):
                found.add(node.module.split(".")[1])
        elif isinstance(node, ast.Import):
            found.update(a.name.split(".")[1] for a in node.names if a.name.startswith("torchckpt."))
    return found


def test_every_module_has_a_floor():
    assert set(modules()) == set(FLOOR), set(modules()) ^ set(FLOOR)


def test_imports_only_go_down():
    upward = [(m, dep) for m, tree in modules().items() for dep in imports_of(tree)
              if dep in FLOOR and FLOOR[dep] > FLOOR[m]]
    assert upward == []
    assert imports_of(modules()["errors"]) == set()


def test_there_is_no_import_cycle():
    graph = {m: imports_of(tree) - {m} for m, tree in modules().items()}
    state: dict[str, int] = {}

    def visit(m: str, trail: list[str]) -> None:
        if state.get(m) == 1:
            pytest.fail("import cycle: " + " -> ".join([*trail[trail.index(m):], m]))
        if state.get(m) == 2:
            return
        state[m] = 1
        for dep in sorted(graph.get(m, ())):
            visit(dep, [*trail, m])
        state[m] = 2

    for m in sorted(graph):
        visit(m, [])


def file_calls(tree: ast.Module) -> list[str]:
    calls = []
    for node in ast.walk(tree):
        if isinstance(node, ast.Call):
            f = node.func
            if isinstance(f, ast.Name) and f.id == "open":
                calls.append("open()")
            elif isinstance(f, ast.Attribute) and isinstance(f.value, ast.Name) and f.value.id == "os" \
                    and f.attr in OS_FILE_CALLS:
                calls.append(f"os.{f.attr}")
            elif isinstance(f, ast.Attribute) and isinstance(f.value, ast.Attribute) \
                    and isinstance(f.value.value, ast.Name) and f.value.value.id == "os" and f.value.attr == "path" \
                    and f.attr in OS_PATH_CALLS:
                calls.append(f"os.path.{f.attr}")
            elif isinstance(f, ast.Attribute) and isinstance(f.value, ast.Name) and f.value.id == "io" \
                    and f.attr in ("FileIO", "open"):
                calls.append(f"io.{f.attr}")
        elif isinstance(node, (ast.Import, ast.ImportFrom)):
            names = [a.name for a in node.names] if isinstance(node, ast.Import) else [node.module or ""]
            calls.extend(f"import {n}" for n in names if n.split(".")[0] in STORAGE_ONLY_IMPORTS)
    return calls


def test_only_storage_modules_touch_files_or_fsspec():
    outside = {m: calls for m, tree in modules().items() if m not in STORAGE and (calls := file_calls(tree))}
    assert outside == {}
    assert file_calls(modules()["_local"]) and file_calls(modules()["_fsspec"])  # the check sees them


def test_no_module_reaches_into_another_modules_private_names():
    trees = modules()
    reach_ins = []
    for m, tree in trees.items():
        aliases = {}  # local name -> torchckpt module
        for node in ast.walk(tree):
            if isinstance(node, ast.ImportFrom) and node.module == "torchckpt":
                aliases.update({a.asname or a.name: a.name for a in node.names if a.name in FLOOR})
            if isinstance(node, ast.ImportFrom) and node.module and node.module.startswith("torchckpt."):
                reach_ins += [f"{m}: from {node.module} import {a.name}" for a in node.names
                              if a.name.startswith("_") and not a.name.startswith("__")]
        for node in ast.walk(tree):
            if isinstance(node, ast.Attribute) and isinstance(node.value, ast.Name) and node.value.id in aliases \
                    and node.attr.startswith("_") and not node.attr.startswith("__"):
                reach_ins.append(f"{m}: {node.value.id}.{node.attr}")
    assert reach_ins == []


@pytest.mark.parametrize("private", ["_save_counter", "_set_save_counter", "_commit", "_tracked"])
def test_checkpoint_privates_stay_in_checkpoint(private):
    users = [m for m, tree in modules().items() if m != "checkpoint" for node in ast.walk(tree)
             if isinstance(node, ast.Attribute) and node.attr == private]
    assert users == []


@pytest.mark.parametrize("literal", ["index.json", "checkpoints.json", ".torchckpt.lock", "5GB"])
def test_on_disk_names_and_defaults_are_written_once(literal):
    uses = [m for m, tree in modules().items() for node in ast.walk(tree)
            if isinstance(node, ast.Constant) and node.value == literal]
    assert len(uses) <= 1, uses
