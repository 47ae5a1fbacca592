"""The suite's own rules: no test patches a module or a class of the package.

Fault injection and test doubles go through the seams the package offers (a storage installed for
a prefix: ``tests/doubles.py``; the clock: ``torchckpt._clock.frozen``; constructor arguments such
as ``LocalStorage(direct_min_bytes=0)``), so that moving a name inside the package never touches a
test, and a test never depends on where a name lives. Patching what is not the package's (``os``,
``torch``, an fsspec filesystem instance, ``threading.Thread``) stays allowed.
"""

from __future__ import annotations

import ast
import contextlib
from pathlib import Path

import pytest

TESTS = Path(__file__).resolve().parent
PATCHERS = {"setattr", "delattr"}  # monkeypatch.setattr, setattr, ... with the target first
PATCH_FORMS = {"object", "multiple"}  # mock.patch.object(target, ...), mock.patch.multiple(target, ...)


def _bound_names(tree: ast.AST) -> set[str]:
    """The names that refer to the package: its modules and what is imported from them, and an
    object reached through another's private attribute (``storage = manager._storage``)."""
    names = set()
    for node in ast.walk(tree):
        if isinstance(node, ast.Import):
            names.update((a.asname or a.name.split(".")[0]) for a in node.names
                         if a.name == "torchckpt" or a.name.startswith("torchckpt."))
        elif isinstance(node, ast.ImportFrom) and node.level == 0 and node.module \
                and (node.module == "torchckpt" or node.module.startswith("torchckpt.")):
            names.update(a.asname or a.name for a in node.names)
        elif isinstance(node, ast.Assign) and isinstance(node.value, ast.Attribute) \
                and node.value.attr.startswith("_") and not node.value.attr.startswith("__") \
                and not (isinstance(node.value.value, ast.Name) and node.value.value.id in ("self", "cls")):
            names.update(t.id for t in node.targets if isinstance(t, ast.Name))
    return names


def _is_package(node: ast.AST, names: set[str]) -> bool:
    """Whether ``node`` names a module, class or object of the package (``save_write``,
    ``storage_fsspec.FsspecStorage``, ``atomic.os``)."""
    while isinstance(node, ast.Attribute):
        node = node.value
    return isinstance(node, ast.Name) and node.id in names


def _names_package(node: ast.AST) -> bool:
    return isinstance(node, ast.Constant) and isinstance(node.value, str) and node.value.startswith("torchckpt")


def _callee(node: ast.Call) -> tuple[str, str]:
    """(the called name, the name it is an attribute of): ``("object", "patch")`` for ``mock.patch.object``."""
    func = node.func
    if isinstance(func, ast.Name):
        return func.id, ""
    if isinstance(func, ast.Attribute):
        owner = func.value
        return func.attr, owner.attr if isinstance(owner, ast.Attribute) else getattr(owner, "id", "")
    return "", ""


def _patches(node: ast.AST, names: set[str]) -> bool:
    if isinstance(node, ast.Call) and node.args:
        called, owner = _callee(node)
        first = node.args[0]
        if called in PATCHERS or called in PATCH_FORMS and owner == "patch":
            return _is_package(first, names) or _names_package(first)
        return called == "patch" and _names_package(first)
    if isinstance(node, (ast.Assign, ast.AugAssign, ast.AnnAssign, ast.Delete)):
        targets = node.targets if isinstance(node, (ast.Assign, ast.Delete)) else [node.target]
        return any(isinstance(t, ast.Attribute) and isinstance(t.ctx, (ast.Store, ast.Del))
                   and _is_package(t.value, names) for target in targets for t in ast.walk(target))
    return False


def _embedded_code(node: ast.AST) -> str | None:
    """The text of a string literal that may be a script (``python -c`` code), placeholders of an
    f-string made names."""
    if isinstance(node, ast.Constant) and isinstance(node.value, str):
        text = node.value
    elif isinstance(node, ast.JoinedStr):
        text = "".join(v.value if isinstance(v, ast.Constant) else "_" for v in node.values)
    else:
        return None
    return text if "torchckpt" in text else None


def violations(source: str, where: str) -> list[str]:
    """Every place of ``source`` (a test module) that patches the package, as ``where:line: code``;
    the scripts it holds in strings are read too."""
    tree = ast.parse(source)
    names = _bound_names(tree)
    found = [f"{where}:{node.lineno}: {ast.unparse(node)[:120]}" for node in ast.walk(tree) if _patches(node, names)]
    for node in ast.walk(tree):
        code = _embedded_code(node)
        if code is not None:
            with contextlib.suppress(SyntaxError):  # prose, not code
                found += violations(code, f"{where}:{node.lineno} (a script)")
    return found


def test_no_test_patches_a_module_or_a_class_of_the_package():
    found = [v for path in sorted(TESTS.rglob("*.py")) if path != Path(__file__).resolve()
             for v in violations(path.read_text(), str(path.relative_to(TESTS.parent)))]
    advice = "use a storage double (tests/doubles.py), the clock (torchckpt._clock) or a constructor argument"
    assert found == [], advice + ":\n" + "\n".join(found)


CAUGHT = {
    "a tuning constant": "from torchckpt._storage import local_output as o\nmonkeypatch.setattr(o, 'FLUSH_BYTES', 1)",
    "a method of a class": "from torchckpt._storage import fsspec as f\nmonkeypatch.setattr(f.FsspecStorage, 'put', g)",
    "a public class": "from torchckpt import CheckpointManager as M\nmonkeypatch.setattr(M, '_next_number', f)",
    "os through a module": "from torchckpt._storage import atomic\nmonkeypatch.setattr(atomic.os, 'mkdir', f)",
    "a dotted string": "monkeypatch.setattr('torchckpt._tensorio.CHUNK_BYTES', 64)",
    "mock.patch": "from unittest import mock\nwith mock.patch('torchckpt._save.write.write_checkpoint'):\n    pass",
    "patch.object": "from unittest.mock import patch\nfrom torchckpt import manager\npatch.object(manager, 'time')",
    "the setattr builtin": "import torchckpt._storage.lease as lease\nsetattr(lease, 'LEASE_SECS', 0.5)",
    "an assignment": "from torchckpt._storage import local_output\nlocal_output.DIRECT_MIN_BYTES = 0",
    "an assignment to a class": "from torchckpt._storage import upload\nupload.S3Upload._upload_part = upload_part",
    "through the package": "import torchckpt\ntorchckpt._storage.lease.LEASE_SECS = 2.0",
    "an object reached into": "storage = mgr._storage\nstorage.delete_checkpoint = delete",
    "a script in a string": 'script = f"""\nfrom torchckpt._save import write\nwrite._write_checkpoint = {full}\n"""',
}
ALLOWED = {
    "os": "import os\nmonkeypatch.setattr(os, 'pwrite', broken)",
    "torch": "import torch\nmonkeypatch.setattr(torch, '__version__', '2.x')",
    "a filesystem instance": "monkeypatch.setattr(fs, 'rm', killed)",
    "threading": "import threading\nmonkeypatch.setattr(threading.Thread, 'start', refuse)",
    "a tracked value": "import torchckpt\nckpt = torchckpt.Checkpoint()\nckpt.step = 2",
    "the standard library": "import os, shutil\nos.replace = replace\nshutil.rmtree = rmtree",
    "a storage double": "from tests.doubles import LocalDouble\ndisk = LocalDouble()\ndisk.fail('stage', error)",
}


@pytest.mark.parametrize("code", CAUGHT.values(), ids=CAUGHT.keys())
def test_the_rule_catches_each_way_of_patching(code):
    assert violations(code, "example")


@pytest.mark.parametrize("code", ALLOWED.values(), ids=ALLOWED.keys())
def test_the_rule_lets_the_rest_pass(code):
    assert violations(code, "example") == []
