"""What importing torchckpt registers, and in which order, checked in a fresh process.

The order matters: exit hooks run last-registered first, so the async writer's hook (which waits
for the saves in flight) must be registered after the lease's (which releases the directories'
leases), or a lease would be released while its last save is still writing. The fork handlers
reset, in a forked child, the claims, the leases, the helper threads and the async writer, which
exist only in the parent.

The package imports its public names on first use (so that the command line need not import
torch): the lease and lock hooks come with ``import torchckpt``, the others with the first public
name of a save path, in the same order.
"""

from __future__ import annotations

import subprocess
import sys

import pytest

PROBE = """
import atexit, os, sys
seen = []
real_register, real_at_fork = atexit.register, os.register_at_fork

def register(fn, *args, **kwargs):
    seen.append(f"atexit {fn.__module__}.{fn.__qualname__}")
    return real_register(fn, *args, **kwargs)

def at_fork(**hooks):
    seen.extend(f"fork:{when} {fn.__module__}.{fn.__qualname__}" for when, fn in hooks.items())
    return real_at_fork(**hooks)

atexit.register, os.register_at_fork = register, at_fork
import torchckpt
THEN
print("torch" in sys.modules)
print("\\n".join(s for s in seen if " torchckpt." in s))
"""

EXPECTED = [
    "atexit torchckpt._storage.lease._release_all",
    "fork:after_in_child torchckpt._storage.lease._forget_after_fork",
    "fork:after_in_child torchckpt._storage.lock._forget_after_fork",
    "fork:after_in_child torchckpt._threads._forget_threads",
    "fork:after_in_child torchckpt._save.background._after_fork_in_child",
    "atexit torchckpt._save.background._wait_for_all",
]


def probe(then: str) -> list[str]:
    """Whether torch got imported, then the hooks registered, by ``import torchckpt`` and ``then``."""
    out = subprocess.run([sys.executable, "-c", PROBE.replace("THEN", then)], capture_output=True, text=True,
                         timeout=120)
    assert out.returncode == 0, out.stderr
    return out.stdout.split("\n")[:-1]


@pytest.mark.parametrize("name", ["Checkpoint", "CheckpointManager", "save_state"])
def test_a_save_path_registers_its_exit_and_fork_hooks_in_order(name):
    assert probe(f"torchckpt.{name}") == ["True", *EXPECTED]


def test_importing_torchckpt_registers_the_lease_hooks_and_does_not_import_torch():
    assert probe("") == ["False", *EXPECTED[:3]]


@pytest.mark.parametrize("module", ["checkpoint", "manager", "reader", "restore", "rng", "run_state", "state_dicts",
                                    "cli", "integrations"])
def test_the_public_modules_are_attributes_of_the_package_as_before(module):
    code = f"import torchckpt; print(torchckpt.{module}.__name__)"
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=120)
    assert out.returncode == 0, out.stderr
    assert out.stdout.strip() == f"torchckpt.{module}"


def test_an_unknown_attribute_is_an_attribute_error():
    import torchckpt

    with pytest.raises(AttributeError, match="module 'torchckpt' has no attribute 'Chekpoint'"):
        torchckpt.Chekpoint  # noqa: B018
