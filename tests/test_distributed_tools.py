"""The reader and the CLI on a checkpoint saved by 4 FSDP2 ranks: global shapes, tiling, export, consolidate.

The checkpoint (``tools_save`` in ``tests/jobs/dist_job.py``, run by the session's 4-rank job) holds
an FSDP2 MLP with Adam, sharded int64 and bool tensors, a 64 MiB sharded tensor, RNG state and a
per-rank cursor.
"""

from __future__ import annotations

import json
import shutil
import subprocess
import sys
from pathlib import Path

import pytest
import safetensors
import safetensors.torch
import torch

import torchckpt
from torchckpt import cli
from torchckpt.reader import TensorSpec

from .conftest import read_index, write_index
from .distributed import ROOT
from .test_distributed import ok, rename

pytestmark = pytest.mark.skipif(not torch.distributed.is_available(), reason="needs torch.distributed")

BIG = 4096 * 4096 * 4  # the largest tensor's bytes


@pytest.fixture(scope="module")
def tools(world4) -> Path:
    ok(world4, "tools_save", 4)
    return world4 / "tools" / "ckpt-1"


@pytest.fixture(scope="module")
def reference(world4) -> dict[str, torch.Tensor]:
    return safetensors.torch.load_file(str(world4 / "tools-reference.safetensors"))


def test_the_reader_shows_each_sharded_tensor_whole_with_its_global_shape(tools, reference):
    reader = torchckpt.load_checkpoint(tools)
    shapes, dtypes = reader.get_variable_to_shape_map(), reader.get_variable_to_dtype_map()
    assert shapes["model/head.weight"] == torch.Size([5, 36]) and shapes["big"] == torch.Size([4096, 4096])
    assert dtypes["table"] == torch.int64 and dtypes["mask"] == torch.bool
    assert not [n for n in reader.names if "~@" in n]  # no chunk names: the tensors the job saw
    assert [c[:2] for c in reader.chunks_of("model/head.weight")] == [((0, 0), (2, 36)), ((2, 0), (2, 36)),
                                                                      ((4, 0), (1, 36))]  # 5 rows: 2/2/1/0
    assert len(reader.shards_of("big")) == 4 and reader.world_size == 4
    for name in ("big", "table", "mask", "model/head.weight"):
        assert torch.equal(reader.get_tensor(name), reference[name]), name
        joined = b"".join(reader.iter_bytes(name, 3 * 2**20))  # blocks of rows, smaller than the tensor
        assert joined == reference[name].numpy().tobytes(), name
    with pytest.raises(torchckpt.CheckpointError, match="stored as 4 chunks"):
        reader.locate("big")
    spec = reader.get_state()["big"]
    assert spec == TensorSpec("big", torch.float32, torch.Size([4096, 4096]))


def test_inspect_shows_global_shapes_and_chunk_counts(tools, capsys):
    assert cli.main(["inspect", str(tools), "--json"]) == 0
    rows = {r["name"]: r for r in json.loads(capsys.readouterr().out)["tensors"]}
    assert rows["big"]["shape"] == [4096, 4096] and rows["big"]["chunks"] == 4 and rows["big"]["bytes"] == BIG
    assert rows["model/head.weight"]["chunks"] == 3 and rows["table"]["dtype"] == "int64"
    assert rows["mask"]["chunks"] == 4 and rows["mask"]["dtype"] == "bool"
    assert rows["rng/torch~r3"]["chunks"] == 1  # a per-rank value, one per rank
    assert cli.main(["inspect", str(tools), "--filter", "model/head.*"]) == 0
    out = capsys.readouterr().out
    assert "global shape" in out and "[5, 36]" in out and "saved by 4 ranks: 2 tensors in 6 chunks" in out


@pytest.mark.parametrize("case, edit, message", [
    ("missing chunk", lambda i: rename(i, "big~@3072,0", "stray"), "cover 12582912 of its 16777216 elements"),
    ("overlap", lambda i: rename(i, "big~@3072,0", "big~@3000,0"), "overlap"),
], ids=lambda v: v if isinstance(v, str) else "")
def test_verify_catches_chunks_that_do_not_tile(tools, tmp_path, capsys, case, edit, message):
    assert cli.main(["verify", str(tools)]) == 0
    assert "saved by 4 ranks tile them verified" in capsys.readouterr().out
    bad = tmp_path / "bad"
    shutil.copytree(tools, bad)
    index = read_index(bad)
    edit(index)
    write_index(bad, index)
    assert cli.main(["verify", str(bad)]) == 1
    assert message in capsys.readouterr().err


def test_verify_decodes_every_ranks_per_rank_values_as_that_ranks_restore_does(tools, tmp_path, capsys):
    bad = tmp_path / "bad"
    shutil.copytree(tools, bad)
    index = read_index(bad)
    assert index["torchckpt"]["state"]["cursor"] == {"@per_rank": [100, 101, 102, 103]}
    index["torchckpt"]["state"]["cursor"]["@per_rank"][2] = {"@float": "bogus"}  # rank 2's alone
    write_index(bad, index)
    assert cli.main(["verify", str(bad)]) == 1  # before: verified, where rank 2's restore refused it
    assert "Invalid state tree at 'cursor'" in capsys.readouterr().err


def test_export_of_a_4_rank_fsdp2_checkpoint_loads_into_a_plain_model_strictly(tools, reference, tmp_path, capsys):
    from tests.jobs.dist_job import MLP

    assert cli.main(["export", str(tools), "--object", "model", str(tmp_path / "hf")]) == 0
    weights = safetensors.torch.load_file(str(tmp_path / "hf" / "model.safetensors"))
    model = MLP(3)
    model.load_state_dict(weights, strict=True)
    for key, value in model.state_dict().items():
        assert torch.equal(value, reference[f"model/{key}"]), key
    assert weights["steps_seen"].dtype == torch.int64


def test_consolidate_writes_a_single_process_checkpoint_that_restores_with_assert_consumed(tools, reference, tmp_path,
                                                                                             capsys):
    from tests.jobs.dist_job import MLP, differences

    out = tmp_path / "single"
    assert cli.main(["consolidate", str(tools), str(out)]) == 0
    assert "saved by 4 ranks" in capsys.readouterr().out
    assert read_index(out)["torchckpt"]["format_version"] == 1
    with safetensors.safe_open(str(next(out.glob("*.safetensors"))), "pt") as f:
        assert f.get_slice("big").get_shape() == [4096, 4096]
    model = MLP(9)
    opt = torch.optim.Adam(model.parameters(), lr=0.01)
    tensors = {"table": torch.zeros(8, 4, dtype=torch.int64), "mask": torch.zeros(8, 3, dtype=torch.bool),
               "big": torch.zeros(4096, 4096)}
    ckpt = torchckpt.Checkpoint(model=model, opt=opt, rng=torchckpt.RNGState(), cursor=-1, **tensors)
    ckpt.read(out).assert_consumed()
    found = {f"model/{k}": v for k, v in model.state_dict().items()}
    for index, fields in opt.state_dict()["state"].items():
        found.update({f"opt/{index}/{f}": v for f, v in fields.items()})
    found.update(tensors)
    assert differences(found, reference) == []
    assert ckpt.cursor == 100  # rank 0's
    for written in (tools, out):  # sharded parameters, a plain buffer: every dict in its order, also consolidated
        state = torchckpt.load_state(written)
        assert list(state["model"]) == list(MLP(0).state_dict())
        assert [list(s) for s in state["opt"]["state"].values()] == [["step", "exp_avg", "exp_avg_sq"]] * 6
    assert cli.main(["consolidate", str(tools), str(tmp_path / "rank2"), "--rank", "2"]) == 0
    assert torchckpt.load_checkpoint(tmp_path / "rank2").get_value("cursor") == 102
    assert cli.main(["consolidate", str(tools), str(out)]) == 1
    assert "already exists; consolidate into a new path" in capsys.readouterr().err
    assert cli.main(["consolidate", str(tools), str(tmp_path / "r9"), "--rank", "9"]) == 1
    assert "one of the 4 ranks" in capsys.readouterr().err


MEASURE = """
import sys
from torchckpt import load_checkpoint
from torchckpt._storage.registry import storage_for
from torchckpt._tools.consolidate import consolidate

def status(field):  # VmHWM, not ru_maxrss: after fork and exec that can still report the parent's peak
    with open("/proc/self/status") as f:
        return next(int(line.split()[1]) for line in f if line.startswith(field)) * 1024

base = status("VmRSS")
consolidate(load_checkpoint(sys.argv[1]), sys.argv[2], storage_for(sys.argv[2]))
print(status("VmHWM") - base)
"""


def test_consolidate_peak_memory_stays_under_1_2x_the_largest_tensor_plus_a_fixed_buffer(tools, tmp_path):
    done = subprocess.run([sys.executable, "-c", MEASURE, str(tools), str(tmp_path / "single")], cwd=ROOT,
                          capture_output=True, text=True, timeout=120)
    assert done.returncode == 0, done.stderr
    grown = int(done.stdout.split()[-1])
    assert grown < 1.2 * BIG + 32 * 2**20, f"peak RSS grew by {grown / 2**20:.1f} MiB for a 64 MiB tensor"
