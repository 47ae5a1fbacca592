"""The package's floors (``docs/architecture.md``), enforced by walking every module's imports.

One rule per folder says which floors it may import; imports only go down, and the graph has no
cycle. Only ``_storage/`` calls the operating system's file APIs or imports fsspec, and no module
reaches into another module's private names.
"""

from __future__ import annotations

import ast
from pathlib import Path

import pytest

PACKAGE = Path(__file__).resolve().parent.parent / "torchckpt"

FACES = {"__init__", "__main__", "checkpoint", "manager", "reader", "restore", "run_state", "state_dicts", "cli",
         "integrations"}  # integrations/: faces over a framework, which nothing in the package imports
LEAVES = {"errors", "rng", "_paths", "_version", "_threads", "_progress", "_clock"}
FOLDERS = {"_format", "_storage", "_dist", "_history", "_save", "_load", "_tools"}

# What each floor may import besides itself and the leaves. A module named with a dot is one module
# of a folder; the rest of that folder stays out of reach.
# ``_storage.trusted``: the stamps of the files this process may trust, which saves add to and a
# restore that finds damage drops (no I/O of its own).
ENGINE = {"_history", "_dist", "_format", "_storage.base", "_storage.trusted", "_tensorio"}
MAY_IMPORT = {
    "_format": set(),
    "_storage": {"_format"},
    "_dist": {"_format"},
    "_tensorio": {"_format", "_storage.base"},
    "_history": {"_format", "_storage.base"},
    "_save": ENGINE,
    "_load": ENGINE,
    "_tools": ENGINE | {"_save", "_load", "reader"},
}


# File-system calls: only storage modules make them. (Pure path-string helpers such as
# os.path.join and os.fspath are fine anywhere.)
OS_FILE_CALLS = {"open", "close", "read", "write", "pread", "preadv", "pwrite", "pwritev", "writev", "fsync",
                 "fdatasync", "rename", "replace", "renames", "unlink", "remove", "rmdir", "mkdir", "makedirs",
                 "listdir", "scandir", "stat", "lstat", "fstat", "ftruncate", "truncate", "lseek", "link",
                 "symlink", "readlink", "utime", "chmod", "posix_fadvise", "copy_file_range", "sendfile", "sync"}
OS_PATH_CALLS = {"exists", "lexists", "isdir", "isfile", "islink", "getsize", "getmtime", "realpath", "abspath",
                 "samefile"}
STORAGE_ONLY_IMPORTS = {"fsspec", "s3fs", "gcsfs", "adlfs", "fcntl", "shutil", "mmap"}
# The one exception: Lightning's ModelCheckpoint makes its ``last`` link itself (os.symlink), so the
# Lightning plugin reads and removes that link, and nothing else, itself.
FRAMEWORK_FILE_CALLS = {"integrations.lightning": ["os.path.islink", "os.readlink", "os.unlink"],
                        # not a checkpoint's bytes: /proc/<pid>/status, whether a data worker ignores SIGTERM
                        "_dist.preemption": ["open()"]}


def module_name(path: Path) -> str:
    """``_save.write`` for ``torchckpt/_save/write.py``; ``_save`` for its ``__init__.py``."""
    parts = path.relative_to(PACKAGE).with_suffix("").parts
    return ".".join(parts[:-1]) if parts[-1] == "__init__" and len(parts) > 1 else ".".join(parts)


def modules() -> dict[str, ast.Module]:
    return {module_name(path): ast.parse(path.read_text(), str(path)) for path in sorted(PACKAGE.rglob("*.py"))}


def floor_of(module: str) -> str:
    return module.split(".")[0]


def imports_of(module: str, tree: ast.Module) -> set[str]:
    """The torchckpt modules a module imports anywhere (top level, functions, TYPE_CHECKING)."""
    known = set(modules_cache())
    found = set()
    for node in ast.walk(tree):
        if isinstance(node, ast.ImportFrom) and node.module and node.level == 0:
            if node.module == "torchckpt" or node.module.startswith("torchckpt."):
                base = node.module[len("torchckpt."):] if node.module != "torchckpt" else ""
                for alias in node.names:
                    candidate = f"{base}.{alias.name}" if base else alias.name
                    found.add(candidate if candidate in known else base)
        elif isinstance(node, ast.Import):
            found.update(a.name[len("torchckpt."):] for a in node.names if a.name.startswith("torchckpt."))
        elif isinstance(node, ast.ImportFrom) and node.level:
            raise AssertionError(f"{module}: relative import; name the module (from torchckpt.x import y)")
    return {m for m in found if m} - {module}


_CACHE: dict[str, ast.Module] = {}


def modules_cache() -> dict[str, ast.Module]:
    if not _CACHE:
        _CACHE.update(modules())
    return _CACHE


def allowed(module: str, dep: str) -> bool:
    floor, dep_floor = floor_of(module), floor_of(dep)
    if floor in FACES:
        return True
    if dep_floor == floor or dep in LEAVES:
        return dep != "__init__" and (dep not in FACES or floor in FACES)
    if floor in LEAVES:
        return dep == "errors"
    rule = MAY_IMPORT.get(floor)
    assert rule is not None, f"{module} has no floor: add it to FACES, LEAVES or a folder of MAY_IMPORT"
    return dep_floor in rule or dep in rule


def test_every_module_has_a_floor():
    unplaced = [m for m in modules_cache() if floor_of(m) not in FACES | LEAVES | set(MAY_IMPORT)]
    assert unplaced == []
    assert set(MAY_IMPORT) >= FOLDERS


@pytest.mark.parametrize("floor", sorted(FOLDERS | {"_tensorio", "leaves"}))
def test_each_floor_imports_only_what_its_rule_allows(floor):
    members = LEAVES if floor == "leaves" else {floor}
    wrong = sorted(f"{m} imports {dep}" for m, tree in modules_cache().items() if floor_of(m) in members
                   for dep in imports_of(m, tree) if not allowed(m, dep))
    assert wrong == []


def test_nothing_imports_the_integrations():
    """Each integration imports its framework: importing torchckpt (or any face) must not import one."""
    users = sorted(f"{m} imports {dep}" for m, tree in modules_cache().items() if floor_of(m) != "integrations"
                   for dep in imports_of(m, tree) if floor_of(dep) == "integrations")
    assert users == []


def test_errors_imports_nothing_of_ours():
    assert imports_of("errors", modules_cache()["errors"]) == set()


def test_there_is_no_import_cycle():
    graph = {m: imports_of(m, tree) for m, tree in modules_cache().items()}
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


def test_only_storage_touches_files_or_fsspec():
    trees = modules_cache()
    outside = {m: calls for m, tree in trees.items() if floor_of(m) != "_storage"
               and (calls := sorted(set(file_calls(tree)) - set(FRAMEWORK_FILE_CALLS.get(m, []))))}
    assert outside == {}
    for m, calls in FRAMEWORK_FILE_CALLS.items():  # the exceptions are still needed, and only these calls
        assert sorted(set(file_calls(trees[m]))) == sorted(calls), m
    assert file_calls(trees["_storage.local"]) and file_calls(trees["_storage.fsspec"])  # the check sees them


def test_no_module_reaches_into_another_modules_private_names():
    trees = modules_cache()
    reach_ins = []
    for m, tree in trees.items():
        aliases = {}  # local name -> torchckpt module
        for node in ast.walk(tree):
            if isinstance(node, ast.ImportFrom) and node.module and node.module.startswith("torchckpt"):
                base = node.module[len("torchckpt."):] if node.module != "torchckpt" else ""
                for a in node.names:
                    candidate = f"{base}.{a.name}" if base else a.name
                    if candidate in trees:
                        aliases[a.asname or a.name] = candidate
                    elif a.name.startswith("_") and not a.name.startswith("__"):
                        reach_ins.append(f"{m}: from {node.module} import {a.name}")
        for node in ast.walk(tree):
            if isinstance(node, ast.Attribute) and isinstance(node.value, ast.Name) and node.value.id in aliases \
                    and node.attr.startswith("_") and not node.attr.startswith("__"):
                reach_ins.append(f"{m}: {node.value.id}.{node.attr}")
    assert reach_ins == []


@pytest.mark.parametrize("private", ["_save_counter", "_set_save_counter", "_commit", "_tracked"])
def test_checkpoint_privates_stay_in_checkpoint(private):
    users = [m for m, tree in modules_cache().items() if m != "checkpoint" for node in ast.walk(tree)
             if isinstance(node, ast.Attribute) and node.attr == private]
    assert users == []


@pytest.mark.parametrize("literal", ["index.json", "checkpoints.json", ".torchckpt.lock", "5GB"])
def test_on_disk_names_and_defaults_are_written_once(literal):
    uses = [m for m, tree in modules_cache().items() for node in ast.walk(tree)
            if isinstance(node, ast.Constant) and node.value == literal]
    assert len(uses) <= 1, uses
