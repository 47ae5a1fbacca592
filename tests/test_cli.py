"""The torchckpt command: exit codes, JSON output, errors without tracebacks, verify, export."""

from __future__ import annotations

import json
import os
import shutil
import subprocess
import sys
import types
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file

import torchckpt
from torchckpt._paths import join
from torchckpt.cli import main

from . import damage
from .conftest import TiedLM, make_mlp, read_index, write_index


def run(*args: str) -> subprocess.CompletedProcess[str]:
    return subprocess.run([sys.executable, "-m", "torchckpt", *args], capture_output=True, text=True)


@pytest.fixture
def run_dir(tmp_path):
    model = make_mlp(0)
    opt = torch.optim.Adam(model.parameters())
    manager = torchckpt.CheckpointManager(torchckpt.Checkpoint(model=model, opt=opt, epoch=0), tmp_path / "run",
                                          max_to_keep=2, keep_best=1, best_metric="val_loss")
    for epoch, loss in enumerate([0.5, 0.2, 0.4, 0.3]):
        manager.checkpoint.epoch = epoch
        with torch.no_grad():
            model[0].weight.add_(0.1)
        manager.save(metrics={"val_loss": loss})
    return manager


def test_inspect_table_and_json(run_dir, capsys):
    assert main(["inspect", run_dir.directory]) == 0
    out = capsys.readouterr().out
    assert "model/0.weight" in out and "[8, 4]" in out and "float32" in out
    assert out.splitlines()[0] == f"checkpoint: {run_dir.latest_checkpoint}"  # the one the directory resolved to
    assert "tensors," in out and "metrics: {\"val_loss\": 0.3}" in out
    assert main(["inspect", run_dir.latest_checkpoint, "--json", "--filter", "model/*"]) == 0
    data = json.loads(capsys.readouterr().out)
    assert {t["name"] for t in data["tensors"]} == {"model/0.weight", "model/0.bias", "model/2.weight", "model/2.bias"}
    assert data["total_bytes"] == sum(t["bytes"] for t in data["tensors"])
    assert data["tensors"][0]["shard"].endswith(".safetensors")


def test_ls_marks_latest_kept_preserved_best(run_dir, capsys):
    assert main(["ls", run_dir.directory, "--json"]) == 0
    rows = {r["name"]: r for r in json.loads(capsys.readouterr().out)["checkpoints"]}
    assert set(rows) == {"ckpt-2", "ckpt-3", "ckpt-4"}
    assert rows["ckpt-2"]["marks"] == ["kept", "best"] and rows["ckpt-4"]["marks"] == ["latest", "kept"]
    assert rows["ckpt-3"]["metrics"] == {"val_loss": 0.4}
    assert main(["ls", run_dir.directory]) == 0
    assert "latest,kept" in capsys.readouterr().out


def test_diff_structure_state_and_values(tmp_path, capsys):
    a = torchckpt.Checkpoint(w=torch.zeros(3), gone=torch.ones(1), s=torch.ones(2), epoch=1).write(tmp_path / "a")
    b = torchckpt.Checkpoint(w=torch.tensor([0.0, 0.5, -2.0]), new=torch.ones(1), s=torch.ones(3), epoch=2).write(tmp_path / "b")
    assert main(["diff", a, b, "--values"]) == 0
    out = capsys.readouterr().out
    assert "+ new" in out and "- gone" in out and "~ s  shape [2] -> [3]" in out and "~ epoch  1 -> 2" in out
    assert "max |a-b| = 2" in out
    assert main(["diff", a, b, "--values", "--json"]) == 0
    data = json.loads(capsys.readouterr().out)
    assert data["max_abs_diff"] == {"w": 2.0} and data["state_changed"]["epoch"] == [1, 2]


def test_diff_values_streams_in_bounded_chunks(tmp_path, capsys):
    big = torch.arange(1000, dtype=torch.float32)
    other = big.clone()
    other[777] += 3.0
    a = torchckpt.Checkpoint(w=big).write(tmp_path / "a")
    b = torchckpt.Checkpoint(w=other).write(tmp_path / "b")
    reader = torchckpt.load_checkpoint(a)
    assert max(c.numel() for c in reader.iter_chunks("w", 64)) == 16
    assert main(["diff", a, b, "--values", "--json"]) == 0
    assert json.loads(capsys.readouterr().out)["max_abs_diff"] == {"w": 3.0}


def test_diff_values_of_a_damaged_tensor_is_an_error_not_a_number(tmp_path, capsys):
    a = torchckpt.Checkpoint(w=torch.arange(1000, dtype=torch.float32)).write(tmp_path / "a")
    b = torchckpt.Checkpoint(w=torch.arange(1000, dtype=torch.float32)).write(tmp_path / "b")
    shard = next(os.path.join(b, n) for n in os.listdir(b) if n.endswith(".safetensors"))
    start, end = damage.tensor_span(shard, "w")
    damage.flip_byte(shard, end - 2, 0x40)  # an exponent bit of w[999]: a large difference, were it believed
    with pytest.raises(torchckpt.CorruptCheckpointError, match="checksum"):
        list(torchckpt.load_checkpoint(b).iter_chunks("w", 64))
    assert main(["diff", a, b, "--values", "--json"]) == 1
    assert "checksum" in capsys.readouterr().err


def test_diff_values_pairs_two_streams_cut_differently_and_runs_both_to_their_end():
    # A chunked tensor streams in blocks of rows, a whole one in pieces of a size: the pieces are
    # paired by elements, and each stream reaches its end, where a reader checks its checksum.
    from torchckpt._tools import diff as tool_diff

    class Stream:
        def __init__(self, pieces):
            self.pieces, self.finished = pieces, False

        def iter_chunks(self, name):
            yield from self.pieces
            self.finished = True

    whole = torch.arange(10.0)
    other = whole.clone()
    other[7] += 2.5
    a, b = Stream(list(whole.split(4))), Stream(list(other.split(3)))  # 4+4+2 against 3+3+3+1
    assert tool_diff.value_diff(a, b, "w", types.SimpleNamespace(update=lambda n: None)) == tool_diff.ValueDiff(1, 2.5)
    assert a.finished and b.finished
    with pytest.raises(ValueError, match="different numbers of elements"):
        tool_diff.value_diff(Stream([whole]), Stream([whole[:9]]), "w", types.SimpleNamespace(update=lambda n: None))


def test_diff_values_finds_every_element_whose_bits_differ(tmp_path, capsys):
    nan = float("nan")
    a = torchckpt.save_state({
        "f64": torch.tensor([1.0, 2.0], dtype=torch.float64), "nan": torch.tensor([1.0, 2.0]),
        "zero": torch.tensor([0.0]), "i64": torch.tensor([2**60]), "u64": torch.tensor([2**64 - 1], dtype=torch.uint64),
        "c64": torch.tensor([1 + 1j], dtype=torch.complex64), "same": torch.tensor([nan, 1.0]),
        "bf16": torch.tensor([1.0], dtype=torch.bfloat16),
    }, tmp_path / "a")
    b = torchckpt.save_state({
        "f64": torch.tensor([1.0 + 1e-12, 2.0], dtype=torch.float64), "nan": torch.tensor([nan, 2.5]),
        "zero": torch.tensor([-0.0]), "i64": torch.tensor([2**60 + 3]), "u64": torch.tensor([2**64 - 3], dtype=torch.uint64),
        "c64": torch.tensor([1 + (1 + 1e-6) * 1j], dtype=torch.complex64), "same": torch.tensor([nan, 1.0]),
        "bf16": torch.tensor([1.0], dtype=torch.bfloat16),
    }, tmp_path / "b")
    assert main(["diff", a, b, "--values", "--json", "--exit-code"]) == 1
    data = json.loads(capsys.readouterr().out)  # strict JSON: no NaN in it
    assert data["differing_elements"] == {"f64": 1, "nan": 2, "zero": 1, "i64": 1, "u64": 1, "c64": 1, "same": 0,
                                          "bf16": 0}
    found = data["max_abs_diff"]
    assert found["f64"] == pytest.approx(1e-12, rel=1e-3) and found["nan"] == 0.5 and found["zero"] == 0.0
    assert found["i64"] == 3.0 and found["u64"] == 2.0 and found["c64"] == 2.0**-20  # float32(1 + 1e-6) - 1
    assert main(["diff", a, b, "--values"]) == 0
    out = capsys.readouterr().out
    assert "≠ nan  2 elements differ, max |a-b| = 0.5" in out and "≠ zero  1 element differs, max |a-b| = 0" in out
    assert "6 of 8 comparable tensors differ in value" in out


def test_diff_values_of_a_tensor_saved_by_two_ranks_against_it_saved_whole(tmp_path, capsys):
    # Over 64 MiB a chunked tensor streams in blocks of whole rows (12-byte rows: not a divisor of
    # 64 MiB) and a whole one in 64 MiB pieces: compared piece by piece they did not line up.
    from torchckpt._format import spec
    from torchckpt._save import write
    from torchckpt._storage.registry import storage_for

    rows = 5_600_000  # 67.2 MB of float32, 3 per row
    weight = (torch.arange(rows * 3) % 1000).to(torch.float32).reshape(rows, 3)  # exact in float32, +1.5 too
    half = rows // 2
    chunked = str(tmp_path / "two-ranks")
    section = {"format_version": spec.SHARDED_FORMAT_VERSION, "objects": {"model": "module"},
               "state": {"model": {}, "save_counter": 0}, "world_size": 2,
               "chunked": {"names": ["model/weight"], "dtypes": "F32", "shapes": f"{rows},3"}}
    write.write_checkpoint(storage_for(chunked), chunked, {"model/weight~@0,0": weight[:half].clone(),
                                                           f"model/weight~@{half},0": weight[half:].clone()},
                           {}, section, max_shard_size=2**40)
    changed = weight.clone()
    changed[rows - 1, 2] += 1.5
    whole = torchckpt.Checkpoint(model={"weight": changed}).write(tmp_path / "whole")
    del weight, changed
    assert main(["diff", chunked, whole, "--values", "--json"]) == 0
    assert json.loads(capsys.readouterr().out)["max_abs_diff"] == {"model/weight": 1.5}


def test_verify_catches_a_single_flipped_byte(run_dir):
    path = run_dir.latest_checkpoint
    ok = run("verify", path)
    assert ok.returncode == 0 and ok.stdout.startswith("OK:")
    shard = Path(path, "model-00001-of-00001.safetensors")
    raw = bytearray(shard.read_bytes())
    raw[len(raw) // 2 + 40] ^= 0x10
    shard.write_bytes(bytes(raw))
    bad = run("verify", path)
    assert bad.returncode == 1
    assert bad.stderr.startswith("Error:") and "fails its checksum" in bad.stderr and "Traceback" not in bad.stderr


def test_verify_catches_a_flipped_header_byte(run_dir):
    path = run_dir.latest_checkpoint
    shard = Path(path, "model-00001-of-00001.safetensors")
    raw = bytearray(shard.read_bytes())
    at = raw.index(b'"shape":[8,4]') + 9
    raw[at] = ord("9")  # [8,4] -> [9,4]: the header now disagrees with the data size
    shard.write_bytes(bytes(raw))
    bad = run("verify", path)
    assert bad.returncode == 1 and "Error:" in bad.stderr and "Traceback" not in bad.stderr


def test_export_loads_strictly_into_a_fresh_module(run_dir, tmp_path):
    out = tmp_path / "export"
    result = run("export", run_dir.latest_checkpoint, "--object", "model", str(out))
    assert result.returncode == 0, result.stderr
    assert os.listdir(out) == ["model.safetensors"]
    fresh = make_mlp(9)
    fresh.load_state_dict(load_file(out / "model.safetensors"), strict=True)
    for a, b in zip(run_dir.checkpoint.model.parameters(), fresh.parameters()):
        assert torch.equal(a, b)


def test_export_sharded_with_tied_weights(tmp_path):
    model = TiedLM(50, 8)
    path = torchckpt.Checkpoint(model=model).write(tmp_path / "c")
    out = tmp_path / "export"
    assert main(["export", path, "--object", "model", str(out), "--max-shard-size", "1KB"]) == 0
    index = json.loads((out / "model.safetensors.index.json").read_text())
    assert set(index["weight_map"]) == {"embed.weight", "norm.weight", "norm.bias"}  # tied: once, as save_pretrained
    state = {}
    for file in set(index["weight_map"].values()):
        state.update(load_file(out / file))
    fresh = TiedLM(50, 8)
    missing, unexpected = fresh.load_state_dict(state, strict=False)
    assert missing == ["head.weight"] and unexpected == []  # the tied name, which the model ties again
    assert torch.equal(fresh.embed.weight, model.embed.weight) and fresh.head.weight is fresh.embed.weight


@pytest.mark.parametrize(
    ("args", "code", "message"),
    [
        (["inspect", "/definitely/not/here"], 1, "Error: No checkpoint at /definitely/not/here"),
        (["export", "{ckpt}", "--object", "nope", "{tmp}/o"], 1, "Error: {ckpt} has no object 'nope'; it has: model, opt, epoch"),
        (["export", "{ckpt}", "--object", "opt", "{tmp}/o"], 1, "is an optimizer, not a module or a dict of tensors"),
        (["ls", "/definitely/not/here"], 1, "Error: /definitely/not/here is not a directory."),
        (["inspect"], 2, "usage: torchckpt inspect"),
        (["frobnicate"], 2, "invalid choice"),
        (["convert", "{ckpt}/index.json", "memory://out"], 2, "OUT memory://out is in this process's memory, which "
                                                               "is gone when the command exits"),
        (["consolidate", "{ckpt}", "memory://out"], 2, "write to a path or a storage URL"),
    ],
    ids=["missing", "export-unknown", "export-not-module", "ls-missing", "usage", "unknown-command", "convert-to-memory",
         "consolidate-to-memory"],
)
def test_errors_are_one_line_without_traceback(run_dir, tmp_path, args, code, message):
    ckpt = run_dir.latest_checkpoint
    result = run(*(a.format(ckpt=ckpt, tmp=tmp_path) for a in args))
    assert result.returncode == code
    assert message.format(ckpt=ckpt) in result.stderr
    assert "Traceback" not in result.stderr


def test_corrupt_index_is_a_clean_error(run_dir):
    Path(run_dir.latest_checkpoint, "index.json").write_text("{not json")
    result = run("inspect", run_dir.latest_checkpoint)
    assert result.returncode == 1 and result.stderr.count("\n") == 1 and "damaged or not a checkpoint index" in result.stderr


def test_help_and_version():
    assert run("--help").returncode == 0
    version = run("--version")
    assert version.returncode == 0 and torchckpt.__version__ in version.stdout


def test_inspect_counts_tied_tensors_once_in_its_total(tmp_path, capsys):
    """probe77: the total added each name's bytes, a tied weight's twice ("500.0 KiB" for 250)."""
    model = torch.nn.Sequential(torch.nn.Embedding(100, 64), torch.nn.Linear(64, 100, bias=False))
    model[1].weight = model[0].weight
    path = torchckpt.Checkpoint(model=model).write(tmp_path / "c")
    assert main(["inspect", path]) == 0
    out = capsys.readouterr().out
    assert "model/0.weight" in out and "model/1.weight" in out  # both names listed
    assert "2 tensors, 25.0 KiB in 1 shard" in out
    assert main(["inspect", path, "--json"]) == 0
    assert json.loads(capsys.readouterr().out)["total_bytes"] == 100 * 64 * 4


def test_diff_compares_every_ranks_per_rank_values(tmp_path, capsys):
    """probe77: diff decoded rank 0's view of the state alone: checkpoints that differed only in
    rank 1's per-rank value (a data cursor, its RNG state) were "0 state values changed"."""
    from .format2 import write_two_rank

    a = write_two_rank(tmp_path / "a")
    assert main(["diff", a, write_two_rank(tmp_path / "same"), "--exit-code"]) == 0
    assert capsys.readouterr().out.endswith("0 state values changed\n")
    assert main(["diff", a, write_two_rank(tmp_path / "b", positions=(3, 5)), "--exit-code"]) == 1
    out = capsys.readouterr().out
    assert "~ cursor/pos~r1  4 -> 5\n" in out and out.endswith("1 state value changed\n")
    assert main(["diff", a, write_two_rank(tmp_path / "c", positions=(2, 4)), "--exit-code"]) == 1
    out = capsys.readouterr().out  # rank 0's, named as before
    assert "~ cursor/pos  3 -> 2\n" in out and "~r1" not in out

    # probe83 F7: which keys to quote was decided from rank 0's values alone; on rank 1, 1 and "1"
    # with their values (and order) swapped were both spelled by position, and compared equal
    mixed = write_two_rank(tmp_path / "mixed", rank_1_pos={"@dict": [[1, 5], ["1", 7]]})
    swapped = write_two_rank(tmp_path / "swapped", rank_1_pos={"@dict": [["1", 5], [1, 7]]})
    assert main(["diff", mixed, swapped, "--exit-code"]) == 1
    out = capsys.readouterr().out
    assert "~ cursor/pos/1~r1  5 -> 7\n" in out and "~ cursor/pos/'1'~r1  7 -> 5\n" in out, out


def test_diff_exit_code_and_shortened_values(tmp_path, capsys):
    import random

    random.seed(1)
    a = torchckpt.Checkpoint(w=torch.ones(2), rng=torchckpt.RNGState()).write(tmp_path / "a")
    random.random()
    b = torchckpt.Checkpoint(w=torch.ones(2), rng=torchckpt.RNGState()).write(tmp_path / "b")
    assert main(["diff", a, a, "--exit-code"]) == 0
    capsys.readouterr()
    assert main(["diff", a, b, "--exit-code"]) == 1 and main(["diff", a, b]) == 0
    out = capsys.readouterr().out
    line = next(x for x in out.splitlines() if x.startswith("~ rng/python"))
    assert len(line) < 400 and "characters)" in line  # a 625-int Mersenne Twister state, shortened
    assert "1 state value changed" in out or "state values changed" in out


def test_every_argument_has_help_and_every_command_an_example():
    from torchckpt.cli import build_parser

    parser = build_parser()
    subparsers = next(a for a in parser._actions if a.dest == "command").choices
    for name, sub in subparsers.items():
        assert sub.epilog and "example:" in sub.epilog and f"torchckpt {name}" in sub.epilog, name
        for action in sub._actions:
            assert action.help, f"{name} {action.dest}"


def test_plurals_and_articles(tmp_path, capsys):
    path = torchckpt.Checkpoint(w=torch.ones(2)).write(tmp_path / "c")
    assert main(["inspect", path]) == 0 and "1 tensor, 8 B in 1 shard" in capsys.readouterr().out
    status = torchckpt.Checkpoint(w=torch.zeros(2)).read(path)
    assert str(status.report).startswith("restored 1 value;")


# -- incremental saves: own bytes (ls) and reused shards (inspect) ---------------------------------

BACKBONE_BYTES = (512 * 512 + 512) * 4  # the frozen Linear(512, 512): 1.0 MiB, its shard's data


def table_rows(text: str) -> list[dict[str, str]]:
    """The rows of a table the CLI prints, by column name (columns located by the dashes under the header)."""
    lines = text.splitlines()
    at = next(i for i, line in enumerate(lines) if line.startswith("-"))
    spans, start = [], 0
    for dashes in lines[at].split("  "):
        spans.append((start, start + len(dashes)))
        start += len(dashes) + 2
    names = [lines[at - 1][a:b].strip() for a, b in spans]
    return [{n: line[a:b].strip() for n, (a, b) in zip(names, spans)} for line in lines[at + 1:] if line.strip()]


@pytest.fixture
def frozen_run(tmp_path):
    """A manager's run of a frozen 1 MiB backbone and a small head trained with Adam, saved twice
    with a training step before each save: the second save reuses the backbone's shard."""
    torch.manual_seed(0)
    model = torch.nn.Sequential(torch.nn.Linear(512, 512), torch.nn.Linear(512, 4))
    model[0].requires_grad_(False)
    opt = torch.optim.Adam(p for p in model.parameters() if p.requires_grad)
    manager = torchckpt.CheckpointManager(torchckpt.Checkpoint(model=model, opt=opt), tmp_path / "run", max_to_keep=3)
    for _ in range(2):
        model(torch.randn(2, 512)).square().sum().backward()
        opt.step()
        manager.save()
    yield manager
    manager.close()


def backbone_shard(checkpoint: str) -> str:
    return torchckpt.load_checkpoint(checkpoint).shard_of("model/0.weight")


def strict(text: str):
    """``text`` parsed as strict JSON: a bare NaN or Infinity is an error, as for ``jq``."""
    def refuse(constant):
        raise ValueError(f"not JSON: {constant}")

    return json.loads(text, parse_constant=refuse)


def test_json_output_is_strict_with_nan_and_infinite_metrics(tmp_path, capsys):
    mgr = torchckpt.CheckpointManager(torchckpt.Checkpoint(w=torch.ones(2)), tmp_path, keep_best=1, best_metric="loss")
    mgr.save(metrics={"loss": float("nan"), "acc": float("inf"), "gap": float("-inf"), "lr": 0.5})
    mgr.close()
    assert main(["ls", str(tmp_path), "--json"]) == 0
    assert strict(capsys.readouterr().out)["checkpoints"][0]["metrics"] == {
        "loss": "NaN", "acc": "Infinity", "gap": "-Infinity", "lr": 0.5}
    assert main(["inspect", str(tmp_path / "ckpt-1"), "--json"]) == 0
    assert strict(capsys.readouterr().out)["metadata"]["metrics"]["loss"] == "NaN"
    other = torchckpt.Checkpoint(w=torch.tensor([1.0, float("inf")])).write(tmp_path / "other")
    assert main(["diff", str(tmp_path / "ckpt-1"), other, "--values", "--json"]) == 0
    assert strict(capsys.readouterr().out)["max_abs_diff"] == {"w": "Infinity"}


def test_ls_shows_own_bytes_until_the_checkpoint_sharing_them_is_deleted(frozen_run, capsys):
    directory = frozen_run.directory
    assert main(["ls", directory, "--json"]) == 0
    listed = {r["name"]: r for r in json.loads(capsys.readouterr().out)["checkpoints"]}
    for name in ("ckpt-1", "ckpt-2"):  # both hold the one backbone file: deleting either frees only its head
        assert listed[name]["own_size"] == listed[name]["total_size"] - BACKBONE_BYTES > 0
    assert main(["ls", directory]) == 0
    out, err = capsys.readouterr()
    rows = table_rows(out)
    assert list(rows[0]) == ["#", "name", "time", "size", "own", "metrics", "marks"] and err == ""
    assert [(r["name"], r["size"], r["own"]) for r in rows] == [("ckpt-1", "1.0 MiB", "24.1 KiB"),
                                                                 ("ckpt-2", "1.0 MiB", "24.1 KiB")]
    shutil.rmtree(Path(directory, "ckpt-1"))  # by hand: ckpt-2 keeps its link, now the file's only one
    assert main(["ls", directory, "--json"]) == 0
    listed = json.loads(capsys.readouterr().out)["checkpoints"]
    assert [(r["name"], r["own_size"]) for r in listed] == [("ckpt-2", listed[0]["total_size"])]
    assert main(["inspect", join(directory, "ckpt-2")]) == 0
    out = capsys.readouterr().out
    assert "reused from ckpt-1:" in out and "own:" not in out  # where it came from stays recorded


def test_inspect_names_the_base_and_the_reused_shard(frozen_run, capsys):
    first, second = (join(frozen_run.directory, n) for n in ("ckpt-1", "ckpt-2"))
    shard = backbone_shard(second)
    assert main(["inspect", second]) == 0
    out, err = capsys.readouterr()
    assert f"\nreused from ckpt-1: {shard} (1.0 MiB)\nown: 24.1 KiB of 1.0 MiB" in out and err == ""
    assert main(["inspect", first]) == 0  # the base records nothing: the file system says it is shared
    out = capsys.readouterr().out
    assert f"\nshared with another checkpoint: {shard} (1.0 MiB)\n" in out and "reused" not in out
    assert main(["inspect", second, "--json"]) == 0
    data = json.loads(capsys.readouterr().out)
    assert data["reused"] == {"base": "ckpt-1", "files": {shard: shard}} and data["shared_files"] == [shard]
    assert data["own_bytes"] == data["total_bytes"] - BACKBONE_BYTES


def test_inspect_names_a_base_in_another_directory_by_its_path(tmp_path, capsys):
    torch.manual_seed(0)
    model = torch.nn.Sequential(torch.nn.Linear(256, 256), torch.nn.Linear(256, 2))
    model[0].requires_grad_(False)
    base = torchckpt.Checkpoint(model=model).write(tmp_path / "a" / "base")
    path = torchckpt.Checkpoint(model=model).write(tmp_path / "b" / "next", base=base)
    assert main(["inspect", path]) == 0
    assert f"reused from {base}: {backbone_shard(path)} (257.0 KiB)" in capsys.readouterr().out


HOSTILE_RECORDS = {
    "a-string": lambda shard: "ckpt-1",
    "base-a-number": lambda shard: {"base": 7, "files": {shard: shard}},
    "files-a-list": lambda shard: {"base": "ckpt-1", "files": [shard]},
    "file-not-a-string": lambda shard: {"base": "ckpt-1", "files": {shard: 7}},
    "files-missing": lambda shard: {"base": "ckpt-1"},
    "no-shard-of-its-own": lambda shard: {"base": "ckpt-1", "files": {"../../etc/passwd": shard}},
}


@pytest.mark.parametrize("record", HOSTILE_RECORDS.values(), ids=HOSTILE_RECORDS.keys())
def test_a_malformed_reused_record_is_ignored(frozen_run, capsys, record):
    path = join(frozen_run.directory, "ckpt-2")
    shard = backbone_shard(path)
    index = read_index(path)
    index["torchckpt"]["reused"] = record(shard)
    write_index(path, index)
    assert main(["inspect", path]) == 0
    out, err = capsys.readouterr()
    assert "reused" not in out and f"shared with another checkpoint: {shard}" in out and err == ""
    assert main(["inspect", path, "--json"]) == 0 and json.loads(capsys.readouterr().out)["reused"] is None
    assert main(["ls", frozen_run.directory]) == 0
    out, err = capsys.readouterr()
    assert [r["own"] for r in table_rows(out)] == ["24.1 KiB", "24.1 KiB"] and err == ""


def test_a_base_name_with_control_characters_is_shown_escaped(frozen_run, capsys):
    path = join(frozen_run.directory, "ckpt-2")
    index = read_index(path)
    index["torchckpt"]["reused"]["base"] = "\x1b[2Jckpt-1"  # would clear the terminal
    write_index(path, index)
    assert main(["inspect", path]) == 0
    out = capsys.readouterr().out
    assert "reused from '\\x1b[2Jckpt-1':" in out and "\x1b" not in out


def test_ls_lists_a_damaged_checkpoint_without_its_own_bytes(frozen_run, capsys):
    Path(frozen_run.directory, "ckpt-1", "index.json").write_text("{not json")
    assert main(["ls", frozen_run.directory, "--json"]) == 0
    out, err = capsys.readouterr()
    assert err.startswith("warning: ckpt-1 is damaged") and err.count("\n") == 1
    listed = {r["name"]: r for r in json.loads(out)["checkpoints"]}
    assert listed["ckpt-1"]["own_size"] is None and "problem" in listed["ckpt-1"]
    assert listed["ckpt-2"]["own_size"] == listed["ckpt-2"]["total_size"] - BACKBONE_BYTES  # its link is still shared


def test_ls_marks_a_checkpoint_whose_weight_map_is_wrong_damaged(tmp_path, capsys):
    # Over 1,000 tensors the map is one line, which opening a checkpoint skips; ls checks it.
    manager = torchckpt.CheckpointManager(torchckpt.Checkpoint(**{f"t{i}": torch.ones(1) for i in range(1100)}),
                                          tmp_path / "run")
    first = manager.save()
    manager.save()
    manager.close()
    index = read_index(first)
    index["weight_map"]["t5"] = "model-00002-of-00002.safetensors"
    write_index(first, index)
    assert main(["ls", str(tmp_path / "run"), "--json"]) == 0
    out, err = capsys.readouterr()
    assert err.startswith("warning: ckpt-1 is damaged") and "weight_map puts 't5' in" in err
    listed = {r["name"]: r for r in json.loads(out)["checkpoints"]}
    assert "problem" in listed["ckpt-1"] and "problem" not in listed["ckpt-2"], listed


def test_ls_marks_a_newer_torchckpts_checkpoint_as_such_not_damaged(tmp_path, capsys):
    manager = torchckpt.CheckpointManager(torchckpt.Checkpoint(w=torch.ones(1)), tmp_path / "run")
    first = manager.save()
    manager.save()
    manager.close()
    index = read_index(first)
    index["torchckpt"]["format_version"] = 99
    write_index(first, index)
    assert main(["ls", str(tmp_path / "run"), "--json"]) == 0
    out, err = capsys.readouterr()
    assert err.startswith("warning: ckpt-1 needs a newer torchckpt: ") and "damaged" not in err
    listed = {r["name"]: r for r in json.loads(out)["checkpoints"]}
    assert listed["ckpt-1"]["marks"] == ["kept", "newer-format"] and "problem" not in listed["ckpt-1"], listed
    assert main(["verify", first]) == 1
    assert capsys.readouterr().err.startswith("Error: ")


@pytest.mark.parametrize("remote", ["memory"], indirect=True)
def test_on_an_object_store_a_reused_shard_is_a_copy_of_its_own(remote, capsys):
    torch.manual_seed(0)
    model = torch.nn.Sequential(torch.nn.Linear(256, 256), torch.nn.Linear(256, 2))
    model[0].requires_grad_(False)
    manager = torchckpt.CheckpointManager(torchckpt.Checkpoint(model=model), remote.url)
    manager.save()
    with torch.no_grad():
        model[1].weight.add_(1.0)
    second = manager.save()
    manager.close()
    assert main(["ls", remote.url, "--json"]) == 0
    listed = json.loads(capsys.readouterr().out)["checkpoints"]
    assert [r["own_size"] for r in listed] == [r["total_size"] for r in listed]  # deleting either frees all of it
    assert main(["inspect", second, "--json"]) == 0
    data = json.loads(capsys.readouterr().out)
    assert data["reused"]["base"] == "ckpt-1" and list(data["reused"]["files"]) == [backbone_shard(second)]
    assert data["shared_files"] == [] and data["own_bytes"] == data["total_bytes"]
    shard, copied = next(iter(data["reused"]["files"].items()))
    assert shard != copied  # each save's objects carry its own tag
    assert main(["inspect", second]) == 0
    assert f"reused from ckpt-1: {shard} (257.0 KiB, copied from {copied})\n" in capsys.readouterr().out


def test_own_bytes_of_a_checkpoint_saved_by_two_ranks_count_stored_tensors(tmp_path, capsys):
    from .format2 import write_two_rank

    first = write_two_rank(tmp_path / "run" / "ckpt-1")
    second = tmp_path / "run" / "ckpt-2"
    shutil.copytree(first, second)
    shard = torchckpt.load_checkpoint(first).shard_of("model/bias")  # with both ranks' int64 ~r tensors
    os.unlink(second / shard)
    os.link(Path(first, shard), second / shard)  # as an incremental save places it
    linked = 6 * 4 + 2 * (2 * 8)  # the float32 bias and the two ranks' int64 tensors: data, not headers
    assert main(["ls", str(tmp_path / "run"), "--json"]) == 0
    listed = json.loads(capsys.readouterr().out)["checkpoints"]
    assert [(r["total_size"], r["own_size"]) for r in listed] == [(152, 152 - linked)] * 2
    assert main(["inspect", str(second)]) == 0
    assert f"shared with another checkpoint: {shard} (56 B)\n" in capsys.readouterr().out
