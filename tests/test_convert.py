"""``torchckpt convert`` and ``convert()``: a ``torch.save`` file, a Lightning ``.ckpt``, a
``.safetensors`` file or a Hugging Face folder in; a checkpoint out whose ``load_state`` equals what
``torch.load(weights_only=True)`` (or ``load_file``) gives. A pickle that needs anything else is
refused by name: its payload never runs and nothing is written."""

from __future__ import annotations

import argparse
import builtins
import collections
import contextlib
import enum
import hashlib
import json
import os
import pathlib
import shutil
import signal
import subprocess
import sys
from collections.abc import Iterator

import numpy as np
import pytest
import safetensors.torch
import torch

import torchckpt
from torchckpt import UnsafePickleError
from torchckpt.cli import main
from torchckpt.errors import CheckpointError, CheckpointNotFoundError, CorruptCheckpointError, UnsupportedStateError
from torchckpt.state_dicts import convert, load_state

from .conftest import TiedLM
from .test_state_dicts import assert_same

# -- sources -----------------------------------------------------------------------------------


@pytest.fixture
def nested_state(stepped_optimizer, mlp):
    """What a training script torch.saves: state_dicts, several dtypes, a tied tensor, plain values."""
    tied = TiedLM()
    return {
        "model": mlp.state_dict(), "optimizer": stepped_optimizer.state_dict(), "lm": tied.state_dict(),
        "epoch": 3, "best": 0.25, "name": "run-7", "done": False, "none": None, "history": [0.5, (1, "a")],
        "keys": {7: "int key", "nested": {"deep": torch.arange(3, dtype=torch.int16)}},
        "bf16": torch.arange(6, dtype=torch.bfloat16).reshape(2, 3), "bool": torch.tensor([True, False]),
        "f64": torch.tensor(2.5, dtype=torch.float64), "empty": torch.empty(0, 3),
    }


class Payload:
    """A pickle whose ``__reduce__`` calls ``fn(arg)`` when unpickled (os.system, exec, ...)."""

    def __init__(self, fn, arg: str) -> None:
        self.fn, self.arg = fn, arg

    def __reduce__(self):
        return (self.fn, (self.arg,))


def payloads(marker: pathlib.Path) -> dict[str, Payload]:
    return {"os.system": Payload(os.system, f"touch {marker}"),
            "builtins.exec": Payload(builtins.exec, f"open({str(marker)!r}, 'w').close()")}


class Color(enum.Enum):
    RED = 1


# -- round trips ---------------------------------------------------------------------------------


@pytest.mark.parametrize(("name", "legacy"), [("model.pt", False), ("model.pth", False), ("model.ckpt", False),
                                              ("legacy.pt", True), ("no-suffix", False)],
                         ids=["pt", "pth", "ckpt", "legacy-format", "no-suffix"])
def test_a_torch_save_dict_comes_back_as_torch_load_gives_it(nested_state, tmp_path, name, legacy):
    src = tmp_path / name
    torch.save(nested_state, src, _use_new_zipfile_serialization=not legacy)
    assert convert(src, tmp_path / "out") == str(tmp_path / "out")
    got, expected = load_state(tmp_path / "out"), torch.load(src, weights_only=True)
    assert_same(got, expected)  # same key order, types, dtypes and bits, nested OrderedDicts too
    assert got["lm"]["embed.weight"] is got["lm"]["head.weight"]  # tied when saved: one tensor again


@pytest.mark.parametrize("top", [collections.OrderedDict, dict, collections.Counter])
def test_counters_and_a_top_level_ordered_dict_come_back_as_torch_load_gives_them(tmp_path, top):
    """probe74: a Counter's own update() counted each (key, count) pair as a new key (silently,
    nested; a misleading refusal at the top), and a top-level OrderedDict came back a dict."""
    counts = collections.Counter({"a": 3, "b": 1, "c": 0})
    state = top({"b": 2, "a": 5}) if top is collections.Counter else top(
        [("w", torch.ones(2)), ("counts", counts), ("nested", {"c": collections.Counter(x=-1)})])
    torch.save(state, tmp_path / "s.pt")
    got = load_state(convert(tmp_path / "s.pt", tmp_path / "out"))
    expected = torch.load(tmp_path / "s.pt", weights_only=True)
    assert_same(got, expected)
    assert type(got) is top  # assert_same: keys in order, every nested type too


def test_the_command_writes_and_summarises(nested_state, tmp_path, capsys):
    torch.save(nested_state, tmp_path / "model.pt")
    assert main(["convert", str(tmp_path / "model.pt"), str(tmp_path / "out"), "--max-shard-size", "1KB"]) == 0
    out = capsys.readouterr().out
    assert out.startswith(f"wrote {tmp_path / 'out'}: ") and f"from {tmp_path / 'model.pt'}" in out
    assert torchckpt.load_checkpoint(tmp_path / "out").metadata["shards"] > 1
    assert_same(load_state(tmp_path / "out"), torch.load(tmp_path / "model.pt", weights_only=True))


def test_a_safetensors_file_comes_back_as_load_file_gives_it(tmp_path):
    tensors = {"b": torch.ones(2, dtype=torch.float16), "a": torch.arange(4).reshape(2, 2), "c": torch.zeros(0)}
    safetensors.torch.save_file(tensors, tmp_path / "w.safetensors", metadata={"format": "pt"})
    convert(tmp_path / "w.safetensors", tmp_path / "out")
    assert_same(load_state(tmp_path / "out"), safetensors.torch.load_file(tmp_path / "w.safetensors"))


def test_a_file_is_told_by_its_bytes_not_its_suffix(tmp_path):
    safetensors.torch.save_file({"w": torch.ones(2)}, tmp_path / "really-safetensors.pt")
    torch.save({"w": torch.ones(3)}, tmp_path / "really-torch.safetensors")
    assert_same(load_state(convert(tmp_path / "really-safetensors.pt", tmp_path / "a")), {"w": torch.ones(2)})
    assert_same(load_state(convert(tmp_path / "really-torch.safetensors", tmp_path / "b")), {"w": torch.ones(3)})


@pytest.mark.parametrize("remote", ["memory"], indirect=True)
def test_a_source_on_an_object_store(remote, nested_state, tmp_path):
    torch.save(nested_state, tmp_path / "model.pt")
    safetensors.torch.save_file({"w": torch.ones(2)}, tmp_path / "w.safetensors")
    remote.fs.pipe_file(remote.at("model.pt"), (tmp_path / "model.pt").read_bytes())
    remote.fs.pipe_file(remote.at("w.safetensors"), (tmp_path / "w.safetensors").read_bytes())
    assert_same(load_state(convert(remote.at("model.pt"), tmp_path / "a")), torch.load(tmp_path / "model.pt"))
    assert_same(load_state(convert(remote.at("w.safetensors"), tmp_path / "b")), {"w": torch.ones(2)})


@pytest.mark.parametrize("remote", ["memory"], indirect=True)
def test_a_sharded_hugging_face_folder_on_an_object_store(remote, gpt2, tmp_path):
    root = gpt2[1] / "sharded"
    for file in root.iterdir():
        remote.fs.pipe_file(remote.at("hf", file.name), file.read_bytes())
    assert_same(load_state(convert(remote.at("hf"), tmp_path / "a")), load_state(convert(root, tmp_path / "b")))


# -- Lightning -----------------------------------------------------------------------------------


def test_a_lightning_shaped_checkpoint_keeps_its_plain_hyperparameters(tmp_path):
    """Without Lightning: what Lightning puts into hyper_parameters that weights_only alone refuses."""
    hparams = {"lr": 0.1, "data": pathlib.Path("/data/train"), "win": pathlib.PureWindowsPath("C:/runs"),
               "dropout": np.float32(0.5), "steps": np.int64(7), "flag": np.bool_(True),
               "mean": np.arange(3, dtype=np.float32), "args": argparse.Namespace(seed=1, tags=["a"]),
               "dtype": np.dtype("float16")}
    torch.save({"epoch": 1, "pytorch-lightning_version": "2.6.6", "state_dict": collections.OrderedDict(w=torch.ones(2)),
                "hyper_parameters": hparams}, tmp_path / "last.ckpt")
    got = load_state(convert(tmp_path / "last.ckpt", tmp_path / "out"))["hyper_parameters"]
    assert_same({k: v for k, v in got.items() if k != "mean"},
                {"lr": 0.1, "data": "/data/train", "win": "C:\\runs", "dropout": 0.5, "steps": 7, "flag": True,
                 "args": {"seed": 1, "tags": ["a"]}, "dtype": "float16"})
    assert_same(got["mean"], torch.arange(3, dtype=torch.float32))


NUMPY_VALUES = {  # hyperparameters and callback state as Lightning pickles them: NumPy's own reduce
    "f16": np.float16(1.5), "neg_zero": np.float64(-0.0), "i8": np.int8(-3), "u64": np.uint64(2**64 - 1),
    "flag": np.bool_(False), "big_endian": np.array([1, 2, 515], dtype=">u2"),
    "fortran": np.arange(6.0).reshape(2, 3).T, "empty": np.zeros((0, 3), np.float32), "zero_dim": np.array(5),
    "nan_payload": np.array([0x7FF8_0000_0000_0ABC], np.int64).view(np.float64), "halves": np.arange(4, dtype="<f2"),
    "bools": np.array([[True], [False]]), "in_tuple": (np.int32(1), [np.float32(2.0)]),
    "dtypes": [np.dtype("float16"), np.dtype(">i4"), np.dtype("U5"), np.dtype("M8[D]"), np.dtype("m8[10ms]")],
    "empty_text": [np.str_(""), np.str_("run")], "by_dtype": {np.dtype("float32"): 1.0},
}


def test_numpy_values_are_rebuilt_from_their_bytes_as_save_state_stores_them(tmp_path):
    torch.save({"pytorch-lightning_version": "2.6.6", "hyper_parameters": NUMPY_VALUES}, tmp_path / "last.ckpt")
    got = load_state(convert(tmp_path / "last.ckpt", tmp_path / "out"))
    expected = load_state(torchckpt.save_state({"hyper_parameters": NUMPY_VALUES}, tmp_path / "direct"))
    assert_same(got["hyper_parameters"], expected["hyper_parameters"])
    assert got["hyper_parameters"]["dtypes"] == ["float16", ">i4", "<U5", "datetime64[D]", "timedelta64[10ms]"]
    assert got["hyper_parameters"]["by_dtype"] == {"float32": 1.0}  # a dtype as a key, not its stand-in


def test_a_numpy_duration_keeps_its_unit_and_is_refused_as_save_state_refuses_it(tmp_path):
    # ten hours are not the int 10: NumPy pickles the unit apart from the dtype's code
    torch.save({"hyper_parameters": {"timeout": np.timedelta64(10, "h")}}, tmp_path / "t.pt")
    with pytest.raises(UnsupportedStateError, match=r"'hyper_parameters/timeout': the NumPy scalar "
                       r"numpy\.timedelta64 has no Python number type it converts to exactly"):
        convert(tmp_path / "t.pt", tmp_path / "out")
    assert not (tmp_path / "out").exists()


class Reduce:
    """Pickles as ``fn(*args)`` (then ``__setstate__(state)``): a forged NumPy value."""

    def __init__(self, fn, args, state=None) -> None:
        self.fn, self.args, self.state = fn, args, state

    def __reduce__(self):
        return (self.fn, self.args) if self.state is None else (self.fn, self.args, self.state)


def _forged_ckpt(path: pathlib.Path, value) -> pathlib.Path:
    """A real torch.save archive whose pickle holds ``value`` (protocol 2, as torch writes it)."""
    import pickle
    import zipfile

    torch.save({"x": 1}, path)
    with zipfile.ZipFile(path) as archive:
        entries = {n: archive.read(n) for n in archive.namelist()}
    pickled = next(n for n in entries if n.endswith("data.pkl"))
    entries[pickled] = pickle.dumps({"pytorch-lightning_version": "2.6", "hyper_parameters": {"x": value}}, protocol=2)
    with zipfile.ZipFile(path, "w", zipfile.ZIP_STORED) as archive:
        for name, data in entries.items():
            archive.writestr(name, data)
    return path


def _array(dtype, data, shape=(1,)):
    from numpy._core import multiarray

    return Reduce(multiarray._reconstruct, (np.ndarray, (0,), b"b"), (1, shape, dtype, False, data))


# a dtype of raw bytes that NumPy reads as an object pointer (its REFCOUNT flag): freeing such an
# array dereferenced an address the file chose (a crash, from convert of a downloaded file)
POINTER_DTYPE = Reduce(np.dtype, ("V8", False, True), (3, "|", None, ("f",), {"f": (np.dtype("O"), 0)}, 8, 1, 1))


@pytest.mark.parametrize(("value", "what"), [
    pytest.param(_array(np.dtype("O"), [1, 2], (2,)), r"a NumPy dtype object \(an object", id="object-array"),
    pytest.param(np.zeros(2, dtype=[("a", "<i4")]), r"a NumPy dtype \|V4 \(an object, record or void", id="record-array"),
    pytest.param(_array(np.dtype("f4"), b"\0" * 8, (4,)), r"of shape \[4\] and dtype float32 stored in 8 bytes",
                 id="bytes-short"),
    pytest.param(Reduce(np.dtype, ("O", False, True), (3, "|", None, None, None, -1, -1, 63)),
                 r"a NumPy dtype object", id="object-dtype"),
])
def test_a_forged_numpy_value_is_refused_and_nothing_is_written(tmp_path, value, what):
    source = _forged_ckpt(tmp_path / "evil.ckpt", value)
    with pytest.raises(UnsafePickleError, match=what) as info:
        convert(source, tmp_path / "out")
    assert "rebuilds NumPy values of plain dtypes only" in str(info.value) and "nothing was written" in str(info.value)
    assert info.value.path == str(source) and info.value.global_name is None
    assert not (tmp_path / "out").exists()


def _shared(levels: int) -> tuple:
    """Tuples nested ``levels`` deep, each holding the one below twice: a few bytes a level in a
    pickle (its memo shares them), 2**levels leaves once expanded."""
    value: tuple = (1,)
    for _ in range(levels):
        value = (value, value)
    return value


@pytest.mark.parametrize(("value", "error", "match"), [
    pytest.param(_shared(40), UnsupportedStateError, r"holds shared containers that a checkpoint would store once "
                 r"per use: [\d,]+ values or more, from \d+ in the file", id="as-a-value"),
    pytest.param(Reduce(np.dtype, (_shared(40), False, True)), UnsafePickleError,
                 r"holds a NumPy dtype made from \(\(\(", id="in-a-refusal"),
])
def test_a_small_file_of_shared_values_is_refused_in_time_of_its_size(tmp_path, value, error, match):
    # before: the encoder (or the error message's repr) walked all 2**40 leaves, which never ends
    source = _forged_ckpt(tmp_path / "dag.ckpt", value)
    assert source.stat().st_size < 10_000
    with pytest.raises(error, match=match) as info:
        convert(source, tmp_path / "out")
    assert len(str(info.value)) < 1000 and not (tmp_path / "out").exists()


def test_a_numpy_array_whose_dtype_points_at_memory_the_file_chose_is_refused(tmp_path):
    source = _forged_ckpt(tmp_path / "evil.ckpt", _array(POINTER_DTYPE, (0x4141414141414141).to_bytes(8, "little")))
    done = subprocess.run([sys.executable, "-m", "torchckpt", "convert", str(source), str(tmp_path / "out")],
                          capture_output=True, text=True, timeout=120)
    assert done.returncode == 1, done.stderr[-2000:]  # before: killed by SIGSEGV (-11)
    assert done.stderr.startswith(f"Error: {source} holds a NumPy dtype |V8 (an object, record or void dtype): ")
    assert not (tmp_path / "out").exists()


@pytest.fixture(scope="module")
def lightning_ckpt(tmp_path_factory):
    """A real Lightning checkpoint: a tiny module fitted one epoch, hyperparameters with a Path and a
    NumPy scalar, and ModelCheckpoint's state (Trainer.save_checkpoint)."""
    L = pytest.importorskip("lightning")

    class Tiny(L.LightningModule):
        def __init__(self, lr: float = 0.1, data: pathlib.Path | None = None, dropout=None) -> None:
            super().__init__()
            self.save_hyperparameters()
            self.layer = torch.nn.Linear(2, 1)

        def training_step(self, batch, _):
            loss = self.layer(batch[0]).square().mean()
            self.log("loss", loss)
            return loss

        def configure_optimizers(self):
            return torch.optim.Adam(self.parameters(), lr=self.hparams.lr)

    root = tmp_path_factory.mktemp("lightning")
    torch.manual_seed(0)
    data = torch.utils.data.DataLoader(torch.utils.data.TensorDataset(torch.randn(4, 2)), batch_size=2)
    trainer = L.Trainer(max_epochs=1, default_root_dir=root, logger=False, enable_progress_bar=False,
                        enable_model_summary=False, callbacks=[L.pytorch.callbacks.ModelCheckpoint(dirpath=root)])
    trainer.fit(Tiny(data=pathlib.Path("/data"), dropout=np.float32(0.5)), data)
    trainer.save_checkpoint(root / "last.ckpt")
    return root / "last.ckpt", Tiny


def test_a_lightning_checkpoint_converts(lightning_ckpt, tmp_path):
    path, module_class = lightning_ckpt
    got = load_state(convert(path, tmp_path / "out"))
    trusted = torch.load(path, weights_only=False)  # the test's own file: the reference, as Lightning reads it
    assert list(got) == list(trusted)
    for key in ("state_dict", "optimizer_states", "loops", "callbacks", "epoch", "global_step", "lr_schedulers"):
        assert_same(got[key], trusted[key])
    assert got["hyper_parameters"] == {"lr": 0.1, "data": "/data", "dropout": 0.5}  # nearest plain types
    fresh = module_class()
    fresh.load_state_dict(got["state_dict"])
    assert torch.equal(fresh.layer.weight, trusted["state_dict"]["layer.weight"])


def test_an_enum_hyperparameter_is_refused_by_name(tmp_path):
    torch.save({"pytorch-lightning_version": "2.6.6", "hyper_parameters": {"color": Color.RED}}, tmp_path / "c.ckpt")
    with pytest.raises(UnsafePickleError, match=r"needs tests\.test_convert\.Color to be unpickled") as info:
        convert(tmp_path / "c.ckpt", tmp_path / "out")
    assert info.value.global_name == "tests.test_convert.Color" and info.value.path == str(tmp_path / "c.ckpt")
    assert not (tmp_path / "out").exists()


# -- Hugging Face folders ------------------------------------------------------------------------


@pytest.fixture(scope="module")
def gpt2(tmp_path_factory):
    """A tiny GPT-2 built from a config (tied head), and its save_pretrained folders: one file, and shards."""
    transformers = pytest.importorskip("transformers")
    torch.manual_seed(0)
    config = transformers.GPT2Config(n_layer=1, n_embd=8, n_head=2, vocab_size=16, n_positions=8,
                                     bos_token_id=0, eos_token_id=0)
    model = transformers.GPT2LMHeadModel(config).eval()
    root = tmp_path_factory.mktemp("hf")
    model.save_pretrained(root / "single")
    model.save_pretrained(root / "sharded", max_shard_size="1KB")
    return model, root


def test_a_hugging_face_folder_converts(gpt2, tmp_path):
    model, root = gpt2
    got = load_state(convert(root / "single", tmp_path / "out"))
    assert_same(got, safetensors.torch.load_file(root / "single" / "model.safetensors"))
    fresh = type(model)(model.config).eval()
    missing, unexpected = fresh.load_state_dict(got, strict=False)
    assert missing == ["lm_head.weight"] and unexpected == []  # the tied head, which the model ties again
    ids = torch.tensor([[1, 2, 3]])
    assert torch.equal(fresh(ids).logits, model(ids).logits)


def test_a_sharded_hugging_face_folder_converts(gpt2, tmp_path):
    model, root = gpt2
    assert (root / "sharded" / "model.safetensors.index.json").exists()
    got = load_state(convert(root / "sharded", tmp_path / "out"))
    shards = {}
    for f in sorted((root / "sharded").glob("*.safetensors")):
        shards.update(safetensors.torch.load_file(f))
    assert_same(got, shards)  # shard by shard, each in its file's order


def test_model_safetensors_beside_an_index_is_what_from_pretrained_reads(tmp_path):
    folder = tmp_path / "both"
    folder.mkdir()
    safetensors.torch.save_file({"w": torch.ones(2)}, folder / "model.safetensors")  # from_pretrained reads this one
    safetensors.torch.save_file({"w": torch.zeros(2)}, folder / "model-00001-of-00001.safetensors")
    (folder / "model.safetensors.index.json").write_text(json.dumps(
        {"metadata": {}, "weight_map": {"w": "model-00001-of-00001.safetensors"}}))
    for got in (load_state(convert(folder, tmp_path / "out")), load_state(folder),
                {"w": torchckpt.load_checkpoint(folder).get_tensor("w")}):
        assert torch.equal(got["w"], torch.ones(2))
    run = tmp_path / "run"  # a manager's directory that also holds a model.safetensors: still a run
    torchckpt.CheckpointManager(torchckpt.Checkpoint(w=torch.full((2,), 7.0)), run).save()
    safetensors.torch.save_file({"w": torch.ones(2)}, run / "model.safetensors")
    assert torch.equal(load_state(run)["w"], torch.full((2,), 7.0))


@pytest.mark.parametrize("sharded", [False, True], ids=["pytorch_model.bin", "pytorch_model.bin.index.json"])
def test_a_pytorch_model_bin_folder_converts_with_its_tied_weights(gpt2, tmp_path, sharded):
    model, _ = gpt2
    state = model.state_dict()  # lm_head.weight and transformer.wte.weight: one storage
    folder = tmp_path / "bin"
    folder.mkdir()
    (folder / "config.json").write_text(model.config.to_json_string())
    if sharded:
        names = list(state)
        halves = {"pytorch_model-00001-of-00002.bin": names[: len(names) // 2],
                  "pytorch_model-00002-of-00002.bin": names[len(names) // 2:]}
        for file, keys in halves.items():
            torch.save({k: state[k] for k in keys}, folder / file)
        weight_map = {k: file for file, keys in halves.items() for k in keys}
        (folder / "pytorch_model.bin.index.json").write_text(json.dumps({"weight_map": weight_map}))
    else:
        torch.save(state, folder / "pytorch_model.bin")
    got = load_state(convert(folder, tmp_path / "out"))
    assert list(got) == list(state)
    assert all(torch.equal(got[k], state[k]) for k in state)
    if not sharded:  # tied weights in one file stay one tensor
        assert got["lm_head.weight"] is got["transformer.wte.weight"]


# -- refusals --------------------------------------------------------------------------------------


@pytest.mark.parametrize("legacy", [False, True], ids=["zip", "legacy-format"])
@pytest.mark.parametrize("payload", ["os.system", "builtins.exec"])
def test_a_pickle_with_a_payload_is_refused_and_never_runs(tmp_path, payload, legacy):
    marker = tmp_path / "marker"
    torch.save({"w": torch.ones(2), "x": payloads(marker)[payload]}, tmp_path / "evil.pt",
               _use_new_zipfile_serialization=not legacy)
    with pytest.raises(UnsafePickleError, match="torchckpt never unpickles arbitrary code") as info:
        convert(tmp_path / "evil.pt", tmp_path / "out")
    assert info.value.global_name in {"posix.system", "nt.system", "exec"}  # torch names a builtin bare
    assert info.value.path == str(tmp_path / "evil.pt")
    assert not marker.exists() and not (tmp_path / "out").exists()


@pytest.mark.filterwarnings("ignore:Detected pickle protocol 4")
def test_a_pickle_torch_cannot_read_weights_only_is_refused_with_torchs_reason(tmp_path):
    torch.save({"w": torch.ones(2)}, tmp_path / "p4.pt", pickle_protocol=4)  # an opcode torch's reader lacks
    with pytest.raises(UnsafePickleError, match=r"p4\.pt was refused by torch\.load\(weights_only=True\) "
                       r"\(Unsupported operand 149\): torchckpt never unpickles") as info:  # before: "()"
        convert(tmp_path / "p4.pt", tmp_path / "out")
    assert info.value.global_name is None and not (tmp_path / "out").exists()


def test_the_command_refuses_a_payload_in_one_line(tmp_path):
    marker = tmp_path / "marker"
    torch.save({"w": torch.ones(2), "x": payloads(marker)["os.system"]}, tmp_path / "evil.pt")
    result = subprocess.run([sys.executable, "-m", "torchckpt", "convert", str(tmp_path / "evil.pt"),
                             str(tmp_path / "out")], capture_output=True, text=True, timeout=120)
    assert result.returncode == 1 and result.stdout == ""
    assert result.stderr.count("\n") == 1 and result.stderr.startswith("Error: ")
    assert "system to be unpickled" in result.stderr and "never unpickles arbitrary code" in result.stderr
    assert not marker.exists() and not (tmp_path / "out").exists()


def _make(tmp_path, what: str) -> pathlib.Path:
    """A source of one kind convert refuses."""
    src = tmp_path / "src.pt"
    if what == "truncated":
        torch.save({"w": torch.ones(100)}, src)
        src.write_bytes(src.read_bytes()[:300])
    elif what == "cut-short":  # the archive's last byte missing
        torch.save({"w": torch.ones(100)}, src)
        src.write_bytes(src.read_bytes()[:-1])
    elif what == "bit-flipped":  # one bit of a tensor's bytes: torch.load reads it as 10.000001 without a word
        torch.save({"w": torch.arange(100, dtype=torch.float32)}, src)
        raw = bytearray(src.read_bytes())
        at = raw.index(torch.tensor([10.0, 11.0]).numpy().tobytes())
        raw[at] ^= 1
        src.write_bytes(bytes(raw))
    elif what == "junk":
        src.write_bytes(b"hello world, not a checkpoint")
    elif what == "empty":
        src.write_bytes(b"")
    elif what == "folder":
        src = tmp_path / "folder"
        src.mkdir()
        (src / "config.json").write_text("{}")
    elif what == "checkpoint":
        src = pathlib.Path(torchckpt.save_state({"w": torch.ones(1)}, tmp_path / "ckpt"))
    elif what == "tensor":
        torch.save(torch.ones(2), src)
    elif what == "int-keys":
        torch.save({0: torch.ones(2)}, src)
    elif what == "set":
        torch.save({"ok": 1, "cfg": {"tags": {"a", "b"}}}, src)
    return src


REFUSALS = [  # what, error type, message, attributes
    ("missing", CheckpointNotFoundError, r"No file or folder at .*missing\.pt; convert reads", {}),
    ("folder", CheckpointNotFoundError, r"is a folder but not a Hugging Face folder.*it holds config\.json", {}),
    ("checkpoint", CheckpointError, r"is a torchckpt checkpoint already", {}),
    ("truncated", CorruptCheckpointError, r"is damaged: its zip archive does not check \(BadZipFile: .*truncated or "
     r"damaged .*nothing was written", {}),
    ("cut-short", CorruptCheckpointError, r"is damaged: its zip archive does not check \(BadZipFile", {}),
    ("bit-flipped", CorruptCheckpointError, r"does not check \(BadZipFile: Bad CRC-32 for file '.*data/0'\)", {}),
    ("junk", CorruptCheckpointError, r"it starts with b'hello wo', which is neither a torch\.save file", {}),
    ("empty", CorruptCheckpointError, r"not a file convert reads: it is empty", {}),
    ("tensor", UnsupportedStateError, r"holds torch\.Tensor, not a dict", {"key": ""}),
    ("int-keys", UnsupportedStateError, r"key 0 \(int\) is not a str", {"key": "0", "value_type": int}),
    ("set", UnsupportedStateError, r"Cannot convert .*src\.pt: Cannot save 'cfg/tags'", {"key": "cfg/tags"}),
]


@pytest.mark.parametrize(("what", "error", "match", "attrs"), REFUSALS, ids=[row[0] for row in REFUSALS])
def test_what_convert_refuses(tmp_path, what, error, match, attrs):
    src = tmp_path / "missing.pt" if what == "missing" else _make(tmp_path, what)
    with pytest.raises(error, match=match) as info:
        convert(src, tmp_path / "out")
    for name, value in attrs.items():
        assert getattr(info.value, name) == value
    if isinstance(info.value, (CheckpointNotFoundError, CorruptCheckpointError)):
        assert info.value.path == str(src)
    assert not (tmp_path / "out").exists()


def test_a_file_saved_without_crc32s_converts(tmp_path):
    # torch.serialization.set_crc32_options(False) records 0: nothing to check, as torch.load checks nothing
    torch.serialization.set_crc32_options(False)
    try:
        torch.save({"w": torch.arange(6.0)}, tmp_path / "m.pt")
    finally:
        torch.serialization.set_crc32_options(True)
    torchckpt.convert(tmp_path / "m.pt", tmp_path / "out")
    assert torch.equal(torchckpt.load_state(tmp_path / "out")["w"], torch.arange(6.0))


def test_an_out_that_appears_while_converting_is_left_alone(nested_state, tmp_path, disk):
    """OUT is checked before reading; one that appears between that check and the commit (another
    conversion, a user's folder) is never replaced."""
    torch.save(nested_state, tmp_path / "model.pt")
    out = tmp_path / "out"

    def appear(final: str, replace: bool) -> None:
        out.mkdir()
        (out / "keep.txt").write_text("mine")

    disk.before("stage", appear, times=1)
    with pytest.raises(CheckpointError, match=r"out appeared while it was being written; nothing was replaced") as info:
        convert(tmp_path / "model.pt", out)
    assert not isinstance(info.value, FileExistsError)  # the message, not the storage's internal error
    assert disk.called("stage") == [(str(out), False)]
    assert sorted(p.name for p in out.iterdir()) == ["keep.txt"]
    assert sorted(p.name for p in tmp_path.iterdir()) == ["model.pt", "out"]  # no stage left


def test_an_existing_out_is_refused_and_left_alone(nested_state, tmp_path, capsys):
    torch.save(nested_state, tmp_path / "model.pt")
    out = tmp_path / "out"
    out.mkdir()
    (out / "keep.txt").write_text("mine")
    with pytest.raises(CheckpointError, match=r"out already exists; convert into a new path"):
        convert(tmp_path / "model.pt", out)
    assert main(["convert", str(tmp_path / "model.pt"), str(out)]) == 1
    assert capsys.readouterr().err == f"Error: {out} already exists; convert into a new path.\n"
    assert sorted(p.name for p in out.iterdir()) == ["keep.txt"]


@pytest.mark.parametrize("what", ["missing", "folder", "truncated", "junk", "set"])
def test_the_command_prints_one_error_line(tmp_path, capsys, what):
    src = tmp_path / "missing.pt" if what == "missing" else _make(tmp_path, what)
    assert main(["convert", str(src), str(tmp_path / "out")]) == 1
    captured = capsys.readouterr()
    assert captured.out == "" and captured.err.startswith("Error: ") and captured.err.count("\n") == 1
    assert "unexpected" not in captured.err  # a typed error, not a bug's
    assert not (tmp_path / "out").exists()


# -- symbolic links: a Hugging Face cache snapshot, a SRC that is a link, and links to anything else ----


def hub_snapshot(folder: pathlib.Path, cache: pathlib.Path) -> pathlib.Path:
    """``folder`` as the Hugging Face hub caches it: each file a blob named by its sha256 under
    ``models--tiny/blobs/``, and ``snapshots/<hash>/`` a folder of relative links ``../../blobs/<sha>``."""
    repo = cache / "models--tiny"
    (repo / "blobs").mkdir(parents=True)
    snapshot = repo / "snapshots" / "0123abcd"
    snapshot.mkdir(parents=True)
    for file in sorted(folder.iterdir()):
        data = file.read_bytes()
        sha = hashlib.sha256(data).hexdigest()
        (repo / "blobs" / sha).write_bytes(data)
        (snapshot / file.name).symlink_to(f"../../blobs/{sha}")
    return snapshot


@pytest.fixture(scope="module")
def gpt2_bin(gpt2):
    """The tiny GPT-2 as a ``pytorch_model.bin`` folder (what older save_pretrained wrote)."""
    model, root = gpt2
    (root / "bin").mkdir()
    (root / "bin" / "config.json").write_text(model.config.to_json_string())
    torch.save(model.state_dict(), root / "bin" / "pytorch_model.bin")
    return root / "bin"


@pytest.mark.parametrize("folder", ["single", "sharded", "bin"])
def test_a_hugging_face_cache_snapshot_converts(gpt2, gpt2_bin, tmp_path, folder):
    """Every file of the snapshot is a link to a blob: each is followed, and the result is the
    folder's own conversion, with the model's weights."""
    model, root = gpt2
    snapshot = hub_snapshot(root / folder, tmp_path / "hub")
    assert all(f.is_symlink() for f in snapshot.iterdir()) and len(list(snapshot.iterdir())) >= 2
    got = load_state(convert(snapshot, tmp_path / "out"))
    assert_same(got, load_state(convert(root / folder, tmp_path / "plain")))
    weights = model.state_dict()
    assert set(got) == set(weights) - ({"lm_head.weight"} if folder != "bin" else set())
    assert all(torch.equal(got[k], weights[k]) for k in got)


@pytest.mark.parametrize("kind", ["torch.save", "safetensors", "folder"])
def test_a_src_that_is_a_link_is_followed(gpt2, nested_state, tmp_path, kind):
    blob = tmp_path / "blobs" / "0f3e"
    blob.parent.mkdir()
    if kind == "torch.save":
        torch.save(nested_state, blob)
        expected = torch.load(blob, weights_only=True)
    elif kind == "safetensors":
        safetensors.torch.save_file({"b": torch.ones(2), "a": torch.arange(3)}, blob)
        expected = safetensors.torch.load_file(blob)
    else:  # a link to a cache snapshot, whose own files are links
        blob = hub_snapshot(gpt2[1] / "single", tmp_path / "hub")
        expected = load_state(convert(gpt2[1] / "single", tmp_path / "plain"))
    src = tmp_path / "model.pt"
    src.symlink_to(os.path.relpath(blob, tmp_path))
    assert_same(load_state(convert(src, tmp_path / "out")), expected)


@contextlib.contextmanager
def unblocked(fifo: pathlib.Path, after: float = 30.0) -> Iterator[subprocess.Popen]:
    """A reader that opened ``fifo`` would wait for a writer forever (in safetensors' Rust code, too,
    where neither a signal nor a thread of this process can stop it): after ``after`` s a shell opens
    its write end, so that the test fails instead of hanging. The shell's group is killed after."""
    shell = subprocess.Popen(["sh", "-c", 'sleep "$1" && : > "$2"', "sh", str(after), str(fifo)],
                             start_new_session=True)
    try:
        yield shell  # shell.poll() is None: nothing opened the FIFO
    finally:
        with contextlib.suppress(ProcessLookupError):
            os.killpg(shell.pid, signal.SIGKILL)
        shell.wait(timeout=10)


def _target(tmp_path: pathlib.Path, target: str) -> pathlib.Path:
    """What a hostile link points to."""
    blobs = tmp_path / "hub" / "blobs"
    blobs.mkdir(parents=True, exist_ok=True)
    if target == "directory":
        (blobs / "d").mkdir()
        (blobs / "d" / "x").write_bytes(b"x")
        return blobs / "d"
    if target == "fifo":
        os.mkfifo(blobs / "f")
        return blobs / "f"
    if target == "dev-zero":
        return pathlib.Path("/dev/zero")
    return blobs / "gone"  # dangling


def _plant(gpt2_root: pathlib.Path, tmp_path: pathlib.Path, where: str, target: str) -> tuple[pathlib.Path, pathlib.Path]:
    """A source with one hostile link (or, for ``plain-fifo``, a FIFO that is no link) at ``where``:
    the source to convert, and the file the error must name."""
    if where == "src":
        src = tmp_path / "model.pt"
        link = src
    elif where in ("shard", "index"):
        src = tmp_path / "snapshot"
        shutil.copytree(gpt2_root / "sharded", src)
        name = "model.safetensors.index.json" if where == "index" else sorted(src.glob("*.safetensors"))[-1].name
        link = src / name
        link.unlink()
    else:  # the one weights file of a snapshot
        src = tmp_path / "snapshot"
        src.mkdir()
        (src / "config.json").write_text("{}")
        link = src / "model.safetensors"
    if target == "loop":
        link.symlink_to(link.name)
    elif target == "plain-fifo":
        os.mkfifo(link)
    else:
        goal = _target(tmp_path, target)
        link.symlink_to(goal if goal.is_absolute() and target == "dev-zero" else os.path.relpath(goal, link.parent))
    return src, link


FOLLOWS = r"convert follows a symbolic link only as SRC itself \(to a regular file or a folder\)"
HOSTILE_LINKS = [  # where, target, error, message
    ("weights", "directory", CorruptCheckpointError, r"model\.safetensors is a symbolic link to .*/blobs/d, which is a "
     r"directory, not a regular file\. " + FOLLOWS),
    ("weights", "fifo", CorruptCheckpointError, r"model\.safetensors is a symbolic link to .*/blobs/f, which is a FIFO, "
     r"not a regular file\. " + FOLLOWS),
    ("weights", "dangling", CorruptCheckpointError, r"model\.safetensors is a symbolic link to .*/blobs/gone, where "
     r"nothing is \(a dangling link.*" + FOLLOWS + r".*Download the file again"),
    ("weights", "dev-zero", CorruptCheckpointError, r"model\.safetensors is a symbolic link to /dev/zero, which is a "
     r"character device, not a regular file\. " + FOLLOWS),
    ("weights", "loop", CorruptCheckpointError, r"model\.safetensors is a symbolic link to .*, which cannot be followed "
     r"\(.*\)\. " + FOLLOWS),
    ("weights", "plain-fifo", CorruptCheckpointError, r"model\.safetensors is a FIFO, not a regular file; refusing"),
    ("shard", "fifo", CorruptCheckpointError, r"/model-\d+-of-\d+\.safetensors is a symbolic link to .*/blobs/f, which "
     r"is a FIFO"),
    ("index", "dev-zero", CorruptCheckpointError, r"model\.safetensors\.index\.json is a symbolic link to /dev/zero, "
     r"which is a character device"),
    ("src", "fifo", CorruptCheckpointError, r"model\.pt is a symbolic link to .*/blobs/f, which is a FIFO, not a "
     r"regular file\. " + FOLLOWS),
    ("src", "dangling", CheckpointNotFoundError, r"model\.pt is a symbolic link to .*/blobs/gone, where nothing is "
     r".*Pass the file itself"),
]


@pytest.mark.parametrize(("where", "target", "error", "match"), HOSTILE_LINKS,
                         ids=[f"{row[0]}-{row[1]}" for row in HOSTILE_LINKS])
def test_a_link_to_anything_but_a_regular_file_is_refused(gpt2, tmp_path, where, target, error, match):
    src, link = _plant(gpt2[1], tmp_path, where, target)
    fifo = link if target == "plain-fifo" else tmp_path / "hub" / "blobs" / "f"
    with unblocked(fifo) if "fifo" in target else contextlib.nullcontext() as shell:
        with pytest.raises(error, match=match) as info:
            convert(src, tmp_path / "out")
        assert shell is None or shell.poll() is None  # nothing opened the FIFO: it was refused before
    assert info.value.path == str(link)
    assert not (tmp_path / "out").exists()


@pytest.mark.parametrize(("where", "target"), [("weights", "dev-zero"), ("src", "dangling")])
def test_the_command_refuses_a_hostile_link_in_one_line(gpt2, tmp_path, capsys, where, target):
    src, link = _plant(gpt2[1], tmp_path, where, target)
    assert main(["convert", str(src), str(tmp_path / "out")]) == 1
    captured = capsys.readouterr()
    assert captured.out == "" and captured.err.startswith(f"Error: {link} is a symbolic link to ")
    assert captured.err.count("\n") == 1 and "convert follows a symbolic link only as SRC itself" in captured.err
    assert not (tmp_path / "out").exists()


def _damaged_folder(tmp_path: pathlib.Path, damage: str) -> pathlib.Path:
    """A sharded folder (``a`` in s1, ``b`` in s2) with one kind of damage."""
    folder = tmp_path / "hf"
    folder.mkdir()
    weight_map = {"a": "s1.safetensors", "b": "s2.safetensors"} | ({"c": "s1.safetensors"} if damage == "unheld" else {})
    weight_map = {} if damage == "empty-map" else weight_map  # from_pretrained would load nothing
    weight_map = {"a": "s2.safetensors", "b": "s1.safetensors"} if damage == "swapped" else weight_map
    (folder / "model.safetensors.index.json").write_text(
        "[" * 100_000 + "]" * 100_000 if damage == "deep-index" else json.dumps({"weight_map": weight_map}))
    safetensors.torch.save_file({"a": torch.ones(1)} | ({"x": torch.ones(3)} if damage == "unlisted" else {}),
                                folder / "s1.safetensors")
    s2 = {"a": torch.zeros(1), "b": torch.ones(2)} if damage == "twice" else {"b": torch.ones(2)}
    if damage == "wrong-kind":
        torch.save(s2, folder / "s2.safetensors")
    elif damage != "missing":
        safetensors.torch.save_file(s2, folder / "s2.safetensors")
    return folder


DAMAGED = [  # damage, message, the file named
    ("missing", r"index\.json names shards that are not in .*/hf: s2\.safetensors\. Download", "model.safetensors.index.json"),
    ("unheld", r"index\.json disagrees with its shards: it lists tensors its shards do not hold: c\. The folder is "
     r"damaged or was put together from different saves; download or save it again\.$", "model.safetensors.index.json"),
    ("unlisted", r"index\.json disagrees with its shards: it does not list tensors its shards hold: x\.",
     "model.safetensors.index.json"),  # was converted, x included
    ("swapped", r"index\.json disagrees with its shards: it names another shard than the one holding a \(listed in "
     r"s2\.safetensors, held by s1\.safetensors\), b \(listed in s1\.safetensors, held by s2\.safetensors\)\.",
     "model.safetensors.index.json"),  # was converted
    ("twice", r"s2\.safetensors holds a, which another shard of .*/hf holds too", "s2.safetensors"),
    ("wrong-kind", r"s2\.safetensors is a torch\.save file, not a \.safetensors file as its name", "s2.safetensors"),
    ("empty-map", r"index\.json names no tensor \(its 'weight_map' is empty\), so from_pretrained would load nothing",
     "model.safetensors.index.json"),
    ("deep-index", r"index\.json nests JSON too deeply to be a Hugging Face index\.$",  # was a bare RecursionError
     "model.safetensors.index.json"),
]


@pytest.mark.parametrize(("damage", "match", "named"), DAMAGED, ids=[row[0] for row in DAMAGED])
def test_a_hugging_face_folder_whose_shards_disagree_with_its_index_is_refused(tmp_path, damage, match, named):
    folder = _damaged_folder(tmp_path, damage)
    with pytest.raises(CorruptCheckpointError, match=match) as info:
        convert(folder, tmp_path / "out")
    assert info.value.path == str(folder / named)
    assert not (tmp_path / "out").exists()


@pytest.mark.parametrize("damage", ["unheld", "unlisted", "swapped"])
def test_readers_refuse_a_hugging_face_index_that_disagrees_with_its_shards(tmp_path, damage):
    folder = _damaged_folder(tmp_path, damage)
    match = next(row[1] for row in DAMAGED if row[0] == damage)
    for read in (torchckpt.load_checkpoint, torchckpt.load_state, torchckpt.list_variables):
        with pytest.raises(CorruptCheckpointError, match=match) as info:
            read(folder)
        assert info.value.path == str(folder / "model.safetensors.index.json")
