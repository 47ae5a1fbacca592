"""Restore a checkpoint of 200 shards with ``verify=False`` in a process whose hard limit on open
files is below that (so the restore holds a few shards open at a time), while another checkpoint
of the same structure, other values, replaces it just before the restore opens a shard for the
AT-th time (2: while it checks the headers, after its first try to open every shard; 3: while it
reads, after the headers were checked), the NTH shard to be opened that often. Prints one JSON
line: what the restore raised, and whether any tensor took a value of the replacement.

Usage: python open_file_limit_replaced.py CHECKPOINT REPLACEMENT LIMIT AT NTH
"""

from __future__ import annotations

import contextlib
import json
import os
import resource
import sys

import torch

import torchckpt
from tests.doubles import LocalDouble
from torchckpt._storage import registry

path, replacement, limit, at, nth = sys.argv[1], sys.argv[2], int(sys.argv[3]), int(sys.argv[4]), int(sys.argv[5])
state = {f"t{i}": torch.zeros(256) for i in range(200)}
installed = contextlib.ExitStack()  # never closed: the double serves the directory until the process exits
disk = installed.enter_context(registry.installed(os.path.dirname(path), LocalDouble()))
opens: dict[str, int] = {}
replaced: list[bool] = []


def replace_on_an_open(name: str, *args: object) -> None:
    if name.endswith(".safetensors"):
        opens[name] = opens.get(name, 0) + 1
        if opens[name] == at and sum(count >= at for count in opens.values()) == nth and not replaced:
            os.rename(path, path + ".old")
            os.rename(replacement, path)
            replaced.append(True)


disk.before("open", replace_on_an_open)
resource.setrlimit(resource.RLIMIT_NOFILE, (limit, limit))
try:
    torchckpt.Checkpoint(state=state).read(path, verify=False)
    raised: dict[str, object] = {}
except Exception as e:  # noqa: BLE001 - reported to the test
    raised = {"type": type(e).__name__, "message": str(e)}
print(json.dumps({"raised": raised, "replaced": bool(replaced),
                  "mixed": any(bool((t == -1).any()) for t in state.values())}))
