"""Resume a manager's run in a process whose hard limit on open files is below what a restore of
its checkpoints holds open. Prints one JSON line: what ``restore_or_initialize`` raised, the
warnings it gave, whether ``init_fn`` ran, and the state file's record of damaged checkpoints.

Usage: python open_file_limit.py DIRECTORY LIMIT
"""

from __future__ import annotations

import json
import resource
import sys
import warnings

import torch

import torchckpt

directory, limit = sys.argv[1], int(sys.argv[2])
state = {f"t{i}": torch.zeros(256) for i in range(200)}
initialized = []
manager = torchckpt.CheckpointManager(torchckpt.Checkpoint(state=state), directory, max_to_keep=3,
                                      init_fn=lambda: initialized.append(True))
resource.setrlimit(resource.RLIMIT_NOFILE, (limit, limit))  # a hard limit too: it cannot be raised again
with warnings.catch_warnings(record=True) as caught:
    warnings.simplefilter("always")
    try:
        manager.restore_or_initialize()
        raised: dict[str, object] = {}
    except Exception as e:  # noqa: BLE001 - reported to the test
        raised = {"type": type(e).__name__, "errno": getattr(e, "errno", None), "message": str(e),
                  "path": getattr(e, "path", None), "is_oserror": isinstance(e, OSError)}
manager.close()
print(json.dumps({"raised": raised, "warnings": [type(w.message).__name__ for w in caught],
                  "initialized": bool(initialized), "damaged": torchckpt.get_checkpoint_state(directory).damaged}))
