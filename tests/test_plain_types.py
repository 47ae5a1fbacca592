"""Plain types beyond JSON's: stored as the nearest type the tree has, or refused by name at save.

A path, a NumPy scalar or array, an ``argparse.Namespace`` or a dict subclass comes back as
``str``, a Python number, a CPU tensor or a ``dict``, through ``save_state``/``load_state`` and
through a ``Checkpoint``'s plain values alike; what would need its code to be loaded (an ``Enum``
member, a dataclass, a class, a function...) is refused with its key path, and nothing is written.
"""

from __future__ import annotations

import argparse
import collections
import dataclasses
import enum
import os
import pathlib
import types
import typing

import numpy as np
import pytest
import torch

import torchckpt
from torchckpt import UnsupportedStateError

from .conftest import assert_same


class AttrDict(dict):
    """A dict with attribute access, the shape of Lightning's ``AttributeDict`` and many configs'."""

    def __getattr__(self, name):
        try:
            return self[name]
        except KeyError:
            raise AttributeError(name) from None


class OrderedConfig(collections.OrderedDict):
    pass


def _read_only(array: np.ndarray) -> np.ndarray:
    array.flags.writeable = False
    return array


# value saved -> value loaded, exact type included
ACCEPTED = [
    (pathlib.Path("runs/exp1/out"), "runs/exp1/out"),
    (pathlib.PurePosixPath("/data/train"), "/data/train"),
    (pathlib.PureWindowsPath("C:/data/train"), "C:\\data\\train"),
    (np.bool_(True), True),
    (np.int8(-7), -7),
    (np.int64(-(2**63)), -(2**63)),
    (np.uint64(2**64 - 1), 2**64 - 1),
    (np.float16(1.5), 1.5),
    (np.float32(0.1), 0.10000000149011612),  # the float32's exact value, as a Python float
    (np.float64("nan"), float("nan")),
    (np.float64("-inf"), float("-inf")),
    (np.str_("adam"), "adam"),
    (np.arange(6, dtype=np.float32).reshape(2, 3), torch.arange(6, dtype=torch.float32).reshape(2, 3)),
    (np.array(2.5), torch.tensor(2.5, dtype=torch.float64)),  # 0-d
    (np.zeros((0, 3), dtype=np.int16), torch.zeros(0, 3, dtype=torch.int16)),
    (np.arange(4, dtype=">i4"), torch.arange(4, dtype=torch.int32)),  # big-endian: swapped to native
    (np.arange(4.0)[::-1], torch.tensor([3.0, 2.0, 1.0, 0.0], dtype=torch.float64)),  # negative strides
    (np.arange(6, dtype=np.uint8).reshape(2, 3).T, torch.arange(6, dtype=torch.uint8).reshape(2, 3).T),
    (_read_only(np.ones(3, dtype=np.bool_)), torch.ones(3, dtype=torch.bool)),
    (argparse.Namespace(lr=0.1, out=pathlib.Path("out"), opt=argparse.Namespace(name="adam", betas=(0.9, 0.99))),
     {"lr": 0.1, "out": "out", "opt": {"name": "adam", "betas": (0.9, 0.99)}}),
    (collections.defaultdict(list, b=[np.int64(1)], a=[]), {"b": [1], "a": []}),
    (AttrDict(lr=0.1, dirs=[pathlib.Path("a")]), {"lr": 0.1, "dirs": ["a"]}),
    (OrderedConfig(z=1, a=2), {"z": 1, "a": 2}),
    (collections.OrderedDict(z=np.float32(0.5), a=2), collections.OrderedDict(z=0.5, a=2)),  # kept as itself
    (collections.Counter({"x": np.int64(2), "y": float("inf")}), collections.Counter({"x": 2, "y": float("inf")})),
    ({pathlib.Path("a"): 1, np.int64(2): "two", (np.int8(3), pathlib.Path("b")): 3}, {"a": 1, 2: "two", (3, "b"): 3}),
    ({np.str_("w"): np.ones(2, dtype=np.float32)}, {"w": torch.ones(2)}),  # a tensor under a converted key
    (np.dtype("float32"), "float32"),  # a hyperparameter's dtype, by its name
    (np.dtype([("x", "<i4"), ("y", "<f8")]), "[('x', '<i4'), ('y', '<f8')]"),
]
ACCEPTED_IDS = [
    "path", "pure-posix-path", "pure-windows-path", "np-bool", "np-int8", "np-int64-min", "np-uint64-max",
    "np-float16", "np-float32", "np-float64-nan", "np-float64-inf", "np-str", "array-float32", "array-0d",
    "array-empty", "array-big-endian", "array-negative-strides", "array-transposed", "array-read-only",
    "namespace", "defaultdict", "attribute-dict", "ordered-dict-subclass", "ordered-dict", "counter",
    "converted-keys", "array-under-converted-key", "np-dtype", "np-structured-dtype",
]


def in_places(value):
    """``value`` where each kind of container holds it: a str-keyed dict, a list, a tuple and a
    dict with int keys (each encodes its children its own way)."""
    return {"v": value, "list": [value], "tuple": (0, value), "int_keys": {7: value}}


@pytest.mark.parametrize(("value", "expected"), ACCEPTED, ids=ACCEPTED_IDS)
def test_save_state_gives_back_the_nearest_type(value, expected, tmp_path):
    loaded = torchckpt.load_state(torchckpt.save_state(in_places(value), tmp_path / "c"))
    assert_same(loaded, in_places(expected))


@pytest.mark.parametrize(("value", "expected"), ACCEPTED, ids=ACCEPTED_IDS)
def test_a_checkpoint_reassigns_its_plain_values_as_load_state_gives_them(value, expected, tmp_path):
    path = torchckpt.Checkpoint(value=value, nested=in_places(value), w=torch.ones(2)).write(tmp_path / "c")
    target = torchckpt.Checkpoint(value=value, nested=in_places(value), w=torch.zeros(2))  # the same config again
    target.read(path).assert_consumed()
    assert_same(target.value, expected)  # re-assigned: a path is a str now, an array a tensor
    assert_same(target.nested, in_places(expected))
    assert_same(torchckpt.load_state(path)["value"], expected)
    assert torch.equal(target.w, torch.ones(2))


@pytest.mark.parametrize("dtype", ["bool", "int8", "uint8", "int16", "uint16", "int32", "uint32", "int64", "uint64",
                                   "float16", "float32", "float64", "complex64"])
def test_numpy_arrays_come_back_as_tensors_of_their_dtype(dtype, tmp_path):
    array = (np.arange(-3, 9) % 2 if dtype == "bool" else np.arange(12) * 7).astype(dtype).reshape(3, 4)
    loaded = torchckpt.load_state(torchckpt.save_state({"a": array}, tmp_path / "c"))["a"]
    assert loaded.dtype == torch.from_numpy(array).dtype and loaded.shape == (3, 4)
    assert np.array_equal(loaded.numpy(), array)


def test_an_array_is_captured_when_saved(tmp_path):
    array = np.zeros(3, dtype=np.float32)
    ckpt = torchckpt.Checkpoint(stats=array)
    path = ckpt.write(tmp_path / "c", async_save=True)
    array[:] = 5  # changed while the background write may still run: the checkpoint keeps what was saved
    ckpt.wait_until_finished()
    assert torch.equal(torchckpt.load_state(path)["stats"], torch.zeros(3))


def test_lightning_attribute_dict_comes_back_as_a_dict(tmp_path):
    data = pytest.importorskip("lightning.fabric.utilities.data")
    hparams = data.AttributeDict(lr=np.float32(0.5), root=pathlib.Path("/data"), layers=[64, 64])
    loaded = torchckpt.load_state(torchckpt.save_state({"hyper_parameters": hparams}, tmp_path / "c"))
    assert_same(loaded["hyper_parameters"], {"lr": 0.5, "root": "/data", "layers": [64, 64]})


def test_metadata_takes_numpy_scalars_and_refuses_arrays(tmp_path):
    ckpt = torchckpt.Checkpoint(w=torch.ones(1))
    path = ckpt.write(tmp_path / "ok", metadata={"metrics": {"loss": np.float32(0.25), "dir": pathlib.Path("runs")}})
    assert_same(torchckpt.load_checkpoint(path).metadata["metrics"], {"loss": 0.25, "dir": "runs"})
    with pytest.raises(UnsupportedStateError, match=r"'metadata/hist': metadata holds JSON values, not tensors or "
                                                    r"arrays; store t\.tolist\(\)") as info:
        ckpt.write(tmp_path / "bad", metadata={"hist": np.ones(3)})
    assert info.value.key == "metadata/hist" and info.value.value_type is torch.Tensor
    assert not (tmp_path / "bad").exists()
    # probe87 F2: a PerRank in metadata was written as a per-rank mark no reader takes: a saved checkpoint
    # that nothing could read
    with pytest.raises(UnsupportedStateError, match=r"'metadata/pos': metadata is the checkpoint's, one value for "
                                                    r"every rank, and holds no per-rank values") as info:
        ckpt.write(tmp_path / "per-rank", metadata={"pos": torchckpt.PerRank(3)})
    assert info.value.key == "metadata/pos" and info.value.value_type is torchckpt.PerRank
    assert not (tmp_path / "per-rank").exists()


# -- refusals -------------------------------------------------------------------------------


class Color(enum.Enum):
    RED = "red"


class Mode(str, enum.Enum):
    TRAIN = "train"


class Level(enum.IntEnum):
    HIGH = 3


@dataclasses.dataclass
class OptimConfig:
    lr: float = 0.1


class Pair(typing.NamedTuple):
    a: int
    b: int


class Tokenizer:
    def encode(self, text: str) -> list[int]:
        return [ord(c) for c in text]


def _deep(levels: int) -> list:
    value: list = []
    for _ in range(levels):
        value = [value]
    return value


def _same_key_twice() -> dict:
    return {"a": 1, pathlib.Path("a"): 2}


KEY = "cfg/inner/0"  # where each refused value is put: {"cfg": {"inner": [value]}}
REFUSED = [
    (Color.RED, Color, r"the Enum member .*Color\.RED would need its class imported to be loaded, so it has no "
                       r"representation without pickle\. Store its \.value \('red'\) or its \.name \('RED'\)"),
    (Mode.TRAIN, Mode, r"the Enum member .*Mode\.TRAIN .* Store its \.value \('train'\) or its \.name \('TRAIN'\)"),
    (Level.HIGH, Level, r"the Enum member .*Level\.HIGH .* Store its \.value \(3\) or its \.name \('HIGH'\)"),
    (OptimConfig(), OptimConfig, r"the dataclass instance of .*OptimConfig would need its class imported.*"
                                 r"Store dataclasses\.asdict\(x\) \(a dict\) and rebuild it with OptimConfig\(\*\*d\)"),
    (Pair(1, 2), Pair, r"the named tuple .*Pair would need its class imported.*Store x\._asdict\(\) \(a dict\)"),
    (OptimConfig, type, r"the class .*OptimConfig is code.*Store its name instead \(for example 'OptimConfig'\)"),
    (torch.nn.Linear, type, r"the class torch\.nn\.modules\.linear\.Linear is code"),
    (lambda x: x, types.FunctionType, r"a lambda is code.*Store what it computes"),
    (_deep, types.FunctionType, r"the function tests\.test_plain_types\._deep is code.*Store what it computes"),
    (len, types.BuiltinFunctionType, r"the function builtins\.len is code"),
    (Tokenizer().encode, types.MethodType, r"the function tests\.test_plain_types\.Tokenizer\.encode is code"),
    (object().__init__, types.MethodWrapperType, r"the function object\.__init__ is code"),
    (os, types.ModuleType, r"the module os is code.*Store its name \('os'\) and import it when restoring"),
    ({1, 2}, set, r"a builtins\.set has no fixed order.*Store sorted\(x\) \(a list\)"),
    (frozenset({"a"}), frozenset, r"a builtins\.frozenset has no fixed order.*Store sorted\(x\)"),
    (b"\x00\x01", bytes, r"a builtins\.bytes, so.*Store x\.decode\(\) if it is text, or the bytes as a uint8 tensor"),
    (1 + 2j, complex, r"a builtins\.complex, so.*Store \(z\.real, z\.imag\)"),
    (types.MappingProxyType({"a": 1}), types.MappingProxyType, r"a builtins\.mappingproxy, so.*Store dict\(x\)"),
    (collections.UserList([1]), collections.UserList, r"a collections\.UserList, so.*Store list\(x\)"),
    (Tokenizer(), Tokenizer, r"a tests\.test_plain_types\.Tokenizer, so it has no representation without pickle\. "
                             r"Store the plain values it holds instead \(for an object with attributes, a dict such "
                             r"as vars\(x\)\), or give its class state_dict\(\) and load_state_dict\(\)"),
    (np.array(["a", "b"]), np.ndarray, r"a NumPy array of dtype <U1 .*has no tensor form.*Store x\.tolist\(\)"),
    (np.array([{}], dtype=object), np.ndarray, r"a NumPy array of dtype object"),
    (np.array(["2024-01-01"], dtype="datetime64[D]"), np.ndarray, r"a NumPy array of dtype datetime64\[D\].*x\.astype\('int64'\)"),
    (np.ones(2, dtype=np.longdouble), np.ndarray, r"a NumPy array of dtype float128 has no tensor dtype.*"
                                                  r"Store x\.astype\(numpy\.float64\)"),
    (np.ma.masked_array([1, 2], mask=[0, 1]), np.ma.MaskedArray, r"a numpy\.ma\.MaskedArray \(a NumPy array "
                                                                 r"subclass\).*Store numpy\.asarray\(x\)"),
    (np.complex64(1j), np.complex64, r"the NumPy scalar numpy\.complex64 has no Python number type.*"
                                     r"Store \(z\.real, z\.imag\), or a complex64 tensor"),
    (np.longdouble(1), np.longdouble, r"the NumPy scalar numpy\.longdouble has no Python number type.*"
                                      r"Store float\(x\) \(a float64\), str\(x\)"),
    (np.datetime64("2024-01-01"), np.datetime64, r"the NumPy scalar numpy\.datetime64"),
]
REFUSED_IDS = [
    "enum", "str-enum", "int-enum", "dataclass", "named-tuple", "class", "torch-module-class", "lambda", "function",
    "builtin-function", "method", "method-wrapper", "module", "set", "frozenset", "bytes", "complex", "mapping-proxy",
    "user-list", "object", "array-of-str", "array-of-objects", "array-of-datetimes", "array-of-longdouble",
    "masked-array", "np-complex", "np-longdouble", "np-datetime",
]


def save_with(how: str, state: dict, tmp_path) -> None:
    if how == "save_state":
        torchckpt.save_state(state, tmp_path / "c")
    else:
        torchckpt.Checkpoint(**state).save(tmp_path / "c")


@pytest.mark.parametrize("how", ["save_state", "Checkpoint"])
@pytest.mark.parametrize(("value", "value_type", "message"), REFUSED, ids=REFUSED_IDS)
def test_what_needs_code_to_load_is_refused_by_key_and_type(how, value, value_type, message, tmp_path):
    with pytest.raises(UnsupportedStateError, match=f"^Cannot save '{KEY}': {message}") as info:
        save_with(how, {"w": torch.ones(2), "cfg": {"inner": [value]}}, tmp_path)
    assert info.value.key == KEY and info.value.value_type is value_type
    assert os.listdir(tmp_path) == []  # nothing written: not the checkpoint, nor a staging directory


@pytest.mark.parametrize(("state", "key", "message"), [
    ({"cfg": {"inner": _same_key_twice()}}, "cfg/inner/a",
     r"'cfg/inner': its keys 'a' and PosixPath\('a'\) are both stored as 'a'.*Rename one of the keys"),
    ({"cfg": {"counts": collections.Counter({"a": "many"})}}, "cfg/counts/a",
     r"'cfg/counts/a': a Counter's counts must be numbers, and this one is str\. Store dict\(counter\)"),
    ({"cfg": _deep(100)}, "cfg" + "/0" * 99, r"containers are nested more than 100 deep"),
    ({"cfg": {"seed": 10**4300}}, "cfg/seed", r"'cfg/seed': an int of 14,285 bits has more than the 4,300 decimal "
                                              r"digits a JSON reader parses\. Store hex\(x\) instead"),
    ({"cfg": [-(10**5000)]}, "cfg/0", r"'cfg/0': an int of 16,610 bits has more than the 4,300"),
    ({"cfg": {10**4300: "id"}}, "cfg", r"'cfg': an int of 14,285 bits"),
    ({"cfg": {1: {"a": torch.ones(2)}, "1": {"b": torch.zeros(2)}}}, "cfg/1",
     r"'cfg': its keys 1 and '1' both name the tensors below them 'cfg/1'/\.\.\., so a restore could not tell them "
     r"apart\. Rename one of the keys"),
    ({"cfg": {"None": {"a": torch.ones(2)}, None: [torch.zeros(2)]}}, "cfg/None", r"its keys 'None' and None"),
    ({"cfg": {1: torch.ones(2), "1": {"b": torch.zeros(2)}}}, "cfg/1", r"its keys 1 and '1'"),
    ({"": {"x": torch.ones(2)}, "x": 1}, "", r"the top-level key '': the tensors below it would be named as if they "
                                             r"were at the top level"),
    # probe74 F2: a key beginning with "@" beside it encodes the root as pairs, where it was not checked:
    # committed (replacing the checkpoint there), then refused by every reader as corrupt
    ({"@meta": 1, "": {"w": torch.ones(2)}}, "", r"the top-level key '': the tensors below it would be named"),
    # probe33 F4, F5: committed before, then every reader refused the checkpoint as corrupt
    ({"cfg": {"shape": torch.Size([2**63])}}, "cfg/shape",
     r"'cfg/shape': the torch\.Size \(9223372036854775808,\) has a dimension outside 64 bits"),
    ({"t": torch.empty(0, 2**59, dtype=torch.uint8)}, "t",
     r"Cannot save tensor 't': its shape \[0, 576460752303423488\] is larger than readers accept"),
    # probe88 F5: a per-rank value as (or inside) a dict key was written as a mark no reader takes, and the save
    # failed with CorruptCheckpointError and no key
    ({"cfg": {torchckpt.PerRank(1): "a"}}, "cfg/PerRank(1)", r"'cfg/PerRank\(1\)': a dict key cannot be per rank"),
    ({"cfg": {(1, torchckpt.PerRank(2)): "a"}}, "cfg/(1, PerRank(2))", r"a dict key cannot be per rank \(PerRank\)"),
], ids=["path-key-equal-to-str-key", "counter-of-str", "nested-too-deep", "int-of-4301-digits", "negative-int",
        "int-key", "int-and-str-keys-over-tensors", "none-and-str-keys-over-tensors", "tensor-and-dict-of-one-name",
        "empty-top-level-key", "empty-top-level-key-beside-a-tagged-one", "size-beyond-64-bits", "empty-tensor-of-a-shape-readers-refuse",
        "per-rank-key", "per-rank-inside-a-key"])
@pytest.mark.parametrize("how", ["save_state", "Checkpoint"])
def test_a_tree_that_would_not_load_back_is_refused(how, state, key, message, tmp_path):
    with pytest.raises(UnsupportedStateError, match=message) as info:
        save_with(how, state, tmp_path)
    assert info.value.key == key
    assert os.listdir(tmp_path) == []


@pytest.mark.parametrize("how", ["save_state", "Checkpoint"])
def test_a_per_rank_tensor_under_the_empty_top_level_key_is_a_tensor_there(how, tmp_path):
    """probe88 F3: a single process's PerRank of a tensor was refused at the key '', where the tensor
    itself is taken."""
    state = {"": torchckpt.PerRank(torch.ones(2)), "n": torchckpt.PerRank(3)}
    path = torchckpt.save_state(state, tmp_path / "c") if how == "save_state" else \
        torchckpt.Checkpoint(**state).write(tmp_path / "c")
    loaded = torchckpt.load_state(path)
    assert_same(loaded[""], torch.ones(2))
    assert loaded["n"] == 3


def test_keys_of_one_name_without_tensors_below_them_save_and_load(tmp_path):
    state = {"cfg": {1: {"a": 1}, "1": {"a": 2}, None: [3], "None": "x"}, "": {"y": 4}, "t": torch.ones(2)}
    assert_same(torchckpt.load_state(torchckpt.save_state(state, tmp_path / "c")), state)


def test_the_longest_int_that_saves_also_loads(tmp_path):
    state = {"cfg": {"big": 10**4300 - 1, "small": -(10**4300) + 1, 10**4300 - 1: "key"}}  # 4,300 digits each
    assert torchckpt.load_state(torchckpt.save_state(state, tmp_path / "c")) == state


def test_the_deepest_tree_that_saves_also_loads(tmp_path):
    state = {"cfg": _deep(99)}  # its innermost list is at 100 parts: cfg/0/.../0
    assert torchckpt.load_state(torchckpt.save_state(state, tmp_path / "c")) == state


def test_a_container_or_checkpoint_that_holds_itself_beside_a_tensor_is_refused_by_key(tmp_path):
    """probe80 F4: a cycle of plain values was refused, but one that also held a tensor (or a
    Checkpoint tracking itself) ran into RecursionError while the state was gathered."""
    looped = {"w": torch.ones(1)}
    looped["again"] = looped
    itself = torchckpt.Checkpoint(w=torch.ones(1))
    itself.me = itself
    for checkpoint, start in ((torchckpt.Checkpoint(d=looped), "d/again/again"), (itself, "me/me/me")):
        with pytest.raises(UnsupportedStateError, match="containers are nested more than 100 deep") as info:
            checkpoint.write(tmp_path / "c")
        assert info.value.key.startswith(start)
        assert os.listdir(tmp_path) == []


def _empty_keys(levels: int, leaf: object) -> dict:
    value: object = leaf
    for _ in range(levels):
        value = {"": value}
    return value  # type: ignore[return-value]


@pytest.mark.parametrize("how", ["save_state", "Checkpoint"])
def test_depth_is_counted_through_empty_keys_at_the_root(how, tmp_path):
    """probe76 F1: the depth was read off the key path, and the key "" at the root adds no part to
    it: 101 such dicts saved (replacing the checkpoint at the path) and no reader loaded them."""
    deepest = _empty_keys(100, 1)  # the innermost value at 100 levels, as the decoder counts
    assert torchckpt.load_state(torchckpt.save_state(deepest, tmp_path / "ok")) == deepest
    good = torchckpt.save_state({"w": torch.ones(2)}, tmp_path / "c")
    for state in (_empty_keys(101, 1), _empty_keys(60, {"a": _deep(45)})):
        with pytest.raises(UnsupportedStateError, match="containers are nested more than 100 deep"):
            save_with(how, state, tmp_path)
    assert torch.equal(torchckpt.load_state(good)["w"], torch.ones(2))  # the checkpoint there is kept
