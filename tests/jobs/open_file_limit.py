"""Resume a manager's run in a process whose hard limit on open files is below the number of
shards of its checkpoints, then verify the latest one with the command line. Prints one JSON line:
what ``restore_or_initialize`` returned or raised, the warnings it gave, whether ``init_fn`` ran,
whether every tensor came back, the state file's record of damaged checkpoints, whether the
inspector reads every tensor and the state, and the exit code of ``torchckpt verify``.

Usage: python open_file_limit.py DIRECTORY LIMIT
"""

from __future__ import annotations

import contextlib
import io
import json
import resource
import sys
import warnings

import torch

import torchckpt
from torchckpt.cli import main

directory, limit = sys.argv[1], int(sys.argv[2])
state = {f"t{i}": torch.zeros(256) for i in range(200)}
initialized = []
manager = torchckpt.CheckpointManager(torchckpt.Checkpoint(state=state), directory, max_to_keep=3,
                                      init_fn=lambda: initialized.append(True))
resource.setrlimit(resource.RLIMIT_NOFILE, (limit, limit))  # a hard limit too: it cannot be raised again
raised: dict[str, object] = {}
restored = None
with warnings.catch_warnings(record=True) as caught:
    warnings.simplefilter("always")
    try:
        restored = manager.restore_or_initialize()
    except Exception as e:  # noqa: BLE001 - reported to the test
        raised = {"type": type(e).__name__, "errno": getattr(e, "errno", None), "message": str(e),
                  "path": getattr(e, "path", None), "is_oserror": isinstance(e, OSError)}
manager.close()
reader = torchckpt.load_checkpoint(restored) if restored else None
inspected = reader is not None and all(torch.equal(reader.get_tensor(f"state/t{i}"), torch.full((256,), float(i)))
                                       for i in range(200)) and reader.get_state()["save_counter"] == 2
with contextlib.redirect_stdout(io.StringIO()), contextlib.redirect_stderr(io.StringIO()) as err:
    verified = main(["verify", directory])
print(json.dumps({"restored": restored, "raised": raised, "warnings": [type(w.message).__name__ for w in caught],
                  "initialized": bool(initialized),
                  "equal": all(torch.equal(state[f"t{i}"], torch.full((256,), float(i))) for i in range(200)),
                  "damaged": torchckpt.get_checkpoint_state(directory).damaged,
                  "inspected": inspected, "verify": verified, "verify_error": err.getvalue()}))
