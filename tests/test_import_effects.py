"""What importing torchckpt registers, and in which order, checked in a fresh process.

The order matters: exit hooks run last-registered first, so the async writer's hook (which waits
for the saves in flight) must be registered after the lease's (which releases the directories'
leases), or a lease would be released while its last save is still writing. The fork handlers
reset, in a forked child, the claims, the leases, the helper threads and the async writer, which
exist only in the parent.
"""

from __future__ import annotations

import subprocess
import sys

PROBE = """
import atexit, os
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


def test_importing_torchckpt_registers_its_exit_and_fork_hooks_in_order():
    out = subprocess.run([sys.executable, "-c", PROBE], capture_output=True, text=True, timeout=120)
    assert out.returncode == 0, out.stderr
    assert out.stdout.split("\n")[:-1] == EXPECTED
