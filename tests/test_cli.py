"""The torchckpt command: exit codes, JSON output, errors without tracebacks, verify, export."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file

import torchckpt
from torchckpt.cli import main

from .conftest import TiedLM, make_mlp


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
        (["export", "{ckpt}", "--object", "opt", "{tmp}/o"], 1, "is an optimizer, not a module"),
        (["ls", "/definitely/not/here"], 1, "Error: /definitely/not/here is not a directory."),
        (["inspect"], 2, "usage: torchckpt inspect"),
        (["frobnicate"], 2, "invalid choice"),
    ],
    ids=["missing", "export-unknown", "export-not-module", "ls-missing", "usage", "unknown-command"],
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
