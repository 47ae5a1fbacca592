"""``verify`` a checkpoint of 200 shards in a process whose hard limit on open files is below that
(so it holds a few shards open at a time), one shard deleted just before verify opens it again
to read its data. Prints one JSON line: the problems verify reported.

Usage: python open_file_limit_verify.py CHECKPOINT LIMIT
"""

from __future__ import annotations

import contextlib
import json
import os
import resource
import sys

import torchckpt
from tests.doubles import LocalDouble
from torchckpt._storage import registry
from torchckpt._tools.verify import verify

path, limit = sys.argv[1], int(sys.argv[2])
installed = contextlib.ExitStack()  # never closed: the double serves the directory until the process exits
disk = installed.enter_context(registry.installed(os.path.dirname(path), LocalDouble()))
opens: dict[str, int] = {}
victim = os.path.join(path, sorted(n for n in os.listdir(path) if n.endswith(".safetensors"))[7])


def delete_before_its_data_is_read(name: str, *args: object) -> None:
    opens[name] = opens.get(name, 0) + 1
    if name == victim and opens[name] == 3:  # its first try to open all, its header, its data
        os.unlink(victim)


disk.before("open", delete_before_its_data_is_read)
resource.setrlimit(resource.RLIMIT_NOFILE, (limit, limit))
print(json.dumps({"victim": victim, "problems": verify(torchckpt.load_checkpoint(path))}))
