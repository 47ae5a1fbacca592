"""The lazy inspector: index and headers only, any safetensors weights, hostile input refused."""

from __future__ import annotations

import json
import os
import struct
import time
from pathlib import Path

import pytest
import torch
from safetensors.torch import save_file

import torchckpt
from torchckpt import CorruptCheckpointError, VariableNotFoundError
from torchckpt._format import dtypes as format_dtypes

from .conftest import write_index


@pytest.fixture
def saved(tmp_path, mlp, stepped_optimizer):
    return torchckpt.Checkpoint(model=mlp, opt=stepped_optimizer, epoch=4, cfg={"depth": (2, 3)}).write(
        tmp_path / "c", max_shard_size=200
    )


def test_maps_tensors_and_state(saved, mlp):
    reader = torchckpt.load_checkpoint(saved)
    shapes = reader.get_variable_to_shape_map()
    assert shapes["model/0.weight"] == torch.Size([8, 4]) and isinstance(shapes["model/0.weight"], torch.Size)
    assert shapes["opt/state/0/step"] == torch.Size([])
    assert reader.get_variable_to_dtype_map()["model/2.bias"] == torch.float32
    assert torch.equal(reader.get_tensor("model/0.weight"), mlp.state_dict()["0.weight"])
    assert reader.has_tensor("model/0.weight") and not reader.has_tensor("model/9.weight")
    assert reader.names == sorted(shapes)
    assert reader.get_value("epoch") == 4 and reader.get_value("cfg/depth") == (2, 3)
    assert reader.get_value("opt/param_groups/0/lr") == 0.01
    spec = reader.get_value("opt/state/0/exp_avg")
    assert spec.shape == torch.Size([8, 4]) and spec.dtype == torch.float32
    meta = reader.metadata
    assert meta["format_version"] == 1 and meta["torch_version"] == torch.__version__
    assert meta["objects"] == {"model": "module", "opt": "optimizer", "epoch": "value", "cfg": "value"}
    assert meta["shards"] > 1


def test_get_value_tells_apart_keys_of_one_spelling_as_diff_shows_them(tmp_path):
    path = torchckpt.Checkpoint(cfg={1: "int", "1": "str", None: "none", "None": "word", "'q'": "quoted"}).write(
        tmp_path / "c")
    reader = torchckpt.load_checkpoint(path)
    assert reader.get_value("cfg/1") == "int" and reader.get_value("cfg/'1'") == "str"  # before: the first, for both
    assert reader.get_value("cfg/None") == "none" and reader.get_value("cfg/'None'") == "word"
    assert reader.get_value("cfg/'q'") == "quoted"  # a key spelled with quotes is its own part
    with pytest.raises(KeyError, match=r"'cfg/2' is not in the state of "):
        reader.get_value("cfg/2")


@pytest.mark.parametrize("cfg", [{1: "int", "1": "str", "'1'": "quoted"}, {"'1'": "quoted", 1: "int", "1": "str"}],
                         ids=["quoted-key-last", "quoted-key-first"])
def test_get_value_names_a_key_spelled_with_quotes_as_diff_does_whatever_the_order(tmp_path, cfg):
    """probe77 F2: beside ``1``, ``"1"`` is asked for as ``'1'``, the plain spelling of ``"'1'"``; which
    key it gave depended on the dict's order. A str key that starts with a quote is quoted there too."""
    reader = torchckpt.load_checkpoint(torchckpt.Checkpoint(cfg=cfg).write(tmp_path / "c"))
    assert [reader.get_value(k) for k in ("cfg/1", "cfg/'1'", "cfg/\"'1'\"")] == ["int", "str", "quoted"]


def test_module_functions(saved, mlp):
    pairs = torchckpt.list_variables(saved)
    assert pairs == sorted(pairs) and ("model/0.bias", torch.Size([8])) in pairs
    assert torch.equal(torchckpt.load_variable(saved, "model/0.bias:0"), mlp.state_dict()["0.bias"])


def test_unknown_name_suggests(saved):
    with pytest.raises(VariableNotFoundError, match=r"Did you mean 'model/0.weight'") as info:
        torchckpt.load_checkpoint(saved).get_tensor("model/0.weigth")
    assert info.value.name == "model/0.weigth" and "model/0.weight" in info.value.suggestions
    assert isinstance(info.value, KeyError)


def test_manager_directory_means_its_latest(tmp_path):
    manager = torchckpt.CheckpointManager(torchckpt.Checkpoint(w=torch.ones(1)), tmp_path)
    manager.save()
    last = manager.save()
    assert torchckpt.load_checkpoint(tmp_path).path == last


def test_aliases_are_listed_and_readable(tmp_path):
    t = torch.arange(6.0)
    path = torchckpt.Checkpoint(a=t, b=t).write(tmp_path / "c")
    reader = torchckpt.load_checkpoint(path)
    assert reader.get_variable_to_shape_map() == {"a": torch.Size([6]), "b": torch.Size([6])}
    assert torch.equal(reader.get_tensor("b"), t)


def test_dims_and_dtype_names_agree_with_the_torch_maps(tmp_path):
    t = torch.arange(6.0).reshape(2, 3)
    path = torchckpt.Checkpoint(a=t, b=t, c=torch.zeros((), dtype=torch.bfloat16)).write(tmp_path / "c")
    save_file({"w": torch.ones(4, 1, dtype=torch.int64)}, tmp_path / "single.safetensors")
    for reader in (torchckpt.load_checkpoint(path), torchckpt.load_checkpoint(tmp_path / "single.safetensors")):
        dims, names = reader.get_variable_to_dims_map(), reader.get_variable_to_dtype_name_map()
        assert dims == {n: tuple(s) for n, s in reader.get_variable_to_shape_map().items()}
        assert {n: format_dtypes.str_to_dtype(d) for n, d in names.items()} == reader.get_variable_to_dtype_map()
    assert (dims, names) == ({"w": (4, 1)}, {"w": "I64"})
    assert torchckpt.load_checkpoint(path).get_variable_to_dtype_name_map() == {"a": "F32", "b": "F32", "c": "BF16"}


def test_plain_safetensors_file_and_huggingface_folder(tmp_path):
    a, b, c = torch.ones(2, 3), torch.arange(4, dtype=torch.int64), torch.zeros(5, dtype=torch.bfloat16)
    save_file({"a": a, "b": b}, tmp_path / "single.safetensors", metadata={"format": "pt"})
    reader = torchckpt.load_checkpoint(tmp_path / "single.safetensors")
    assert reader.get_variable_to_shape_map() == {"a": torch.Size([2, 3]), "b": torch.Size([4])}
    assert torch.equal(reader.get_tensor("b"), b)
    hf = tmp_path / "hf"
    hf.mkdir()
    save_file({"a": a, "b": b}, hf / "model-00001-of-00002.safetensors")
    save_file({"c": c}, hf / "model-00002-of-00002.safetensors")
    index = {"metadata": {"total_size": 48}, "weight_map": {"a": "model-00001-of-00002.safetensors",
             "b": "model-00001-of-00002.safetensors", "c": "model-00002-of-00002.safetensors"}}
    (hf / "model.safetensors.index.json").write_text(json.dumps(index))
    for path in (hf, hf / "model.safetensors.index.json"):
        reader = torchckpt.load_checkpoint(path)
        assert reader.get_variable_to_dtype_map() == {"a": torch.float32, "b": torch.int64, "c": torch.bfloat16}
        assert torch.equal(reader.get_tensor("c"), c)


def _corrupt_index(path: str, edit) -> None:
    index_path = Path(path, "index.json")
    index = json.loads(index_path.read_text())
    edit(index)
    write_index(path, index)


@pytest.mark.parametrize("name", ["../../etc/passwd.safetensors", "/abs.safetensors", "index.json", "x.pickle"])
def test_index_pointing_outside_or_at_non_safetensors_is_refused(saved, name):
    def edit(index):
        index["torchckpt"]["shards"][0]["file"] = name

    _corrupt_index(saved, edit)
    with pytest.raises(CorruptCheckpointError, match="refusing to follow|not a .safetensors file"):
        torchckpt.load_checkpoint(saved)


@pytest.mark.parametrize("file", ["../x.safetensors", "\ud800.safetensors"])  # a lone surrogate: no file system has it
def test_hf_index_pointing_outside_is_refused(tmp_path, file):
    hf = tmp_path / "hf"
    hf.mkdir()
    (hf / "model.safetensors.index.json").write_text(json.dumps({"weight_map": {"a": file}}))
    with pytest.raises(CorruptCheckpointError, match="refusing to follow") as info:
        torchckpt.load_checkpoint(hf)
    assert "hf/model.safetensors.index.json names shard" in str(info.value)


def test_an_hf_shard_named_in_latin_1_on_disk_is_read(tmp_path):
    """A name that is bytes, not UTF-8 (Python's U+DCxx escapes), names a file; only other lone
    surrogates are refused (probe32 F7)."""
    hf = tmp_path / "hf"
    hf.mkdir()
    name = "mod\udce9le.safetensors"
    save_file({"a": torch.ones(2)}, os.fsdecode(os.fsencode(hf) + b"/" + os.fsencode(name)))
    (hf / "model.safetensors.index.json").write_text(json.dumps({"weight_map": {"a": name}}))
    assert torch.equal(torchckpt.load_checkpoint(hf).get_tensor("a"), torch.ones(2))


def test_oversized_header_length_is_refused(tmp_path):
    path = tmp_path / "evil.safetensors"
    path.write_bytes(struct.pack("<Q", 2**62) + b"{}")
    with pytest.raises(CorruptCheckpointError, match="header, over the"):
        torchckpt.load_checkpoint(path)


def test_offsets_past_the_end_of_the_file_are_refused(tmp_path):
    header = json.dumps({"a": {"dtype": "F32", "shape": [1000], "data_offsets": [0, 4000]}}).encode()
    path = tmp_path / "short.safetensors"
    path.write_bytes(struct.pack("<Q", len(header)) + header + b"\0" * 16)
    with pytest.raises(CorruptCheckpointError, match="truncated"):
        torchckpt.load_checkpoint(path)


def test_shard_swapped_after_indexing_is_caught_on_read(saved):
    reader = torchckpt.load_checkpoint(saved)
    shard = os.path.join(saved, reader.shard_of("model/0.weight"))
    save_file({"model/0.weight": torch.zeros(2)}, shard)
    with pytest.raises(CorruptCheckpointError, match="88 bytes but index.json records 344; it was truncated or replaced"):
        reader.get_tensor("model/0.weight")


def _drop_cache(path: str) -> None:
    for root, _, files in os.walk(path):
        for f in files:
            fd = os.open(os.path.join(root, f), os.O_RDONLY)
            os.posix_fadvise(fd, 0, 0, os.POSIX_FADV_DONTNEED)
            os.close(fd)


@pytest.mark.slow
def test_inspecting_a_big_checkpoint_costs_the_same_as_a_tiny_one(tmp_path):
    big = {f"layer{i}": torch.empty(1_000_000, dtype=torch.float32) for i in range(384)}  # 1.5 GB
    tiny = {f"layer{i}": torch.zeros(2) for i in range(384)}
    big_path = torchckpt.Checkpoint(**big).write(tmp_path / "big", max_shard_size="500MB")
    del big
    tiny_path = torchckpt.Checkpoint(**tiny).write(tmp_path / "tiny")

    def timed(path: str) -> float:
        best = float("inf")
        for _ in range(3):
            _drop_cache(path)
            start = time.perf_counter()
            reader = torchckpt.load_checkpoint(path)
            reader.get_variable_to_shape_map()
            reader.get_variable_to_dtype_map()
            best = min(best, time.perf_counter() - start)
        return best

    big_t, tiny_t = timed(big_path), timed(tiny_path)
    assert big_t < max(5 * tiny_t, tiny_t + 0.05), (big_t, tiny_t)


def test_inspecting_twenty_thousand_tensors_is_fast(tmp_path):
    path = torchckpt.Checkpoint(**{f"t{i}": torch.zeros(5, 2) for i in range(20_000)}).write(tmp_path / "c")
    best = float("inf")
    for _ in range(5):
        start = time.perf_counter()
        shapes = torchckpt.load_checkpoint(path).get_variable_to_shape_map()
        best = min(best, time.perf_counter() - start)
    assert len(shapes) == 20_000
    assert best < 0.3  # generous: benchmarks/bench_inspect.py reports the real figure (target 30 ms)
