"""The typed JSON tree: exact types, reversible names, refusal of what would need pickle."""

from __future__ import annotations

import argparse
import collections
import json
import pathlib
import struct
from collections import Counter, OrderedDict

import numpy as np
import pytest
import torch
from hypothesis import example, given, settings
from hypothesis import strategies as st
from hypothesis.extra import numpy as npst

from torchckpt import CorruptCheckpointError, UnsupportedStateError
from torchckpt._format import keypath
from torchckpt._format import per_rank as format_per_rank
from torchckpt._format import tree as format_tree


def roundtrip(value):
    tensors: dict[str, torch.Tensor] = {}
    encoded = format_tree.encode(value, "", tensors)
    text = json.dumps(encoded, allow_nan=False)  # strict JSON: no NaN/Infinity literals
    trie = format_tree.build_trie(list(tensors))
    return format_tree.decode(json.loads(text), trie, tensors.__getitem__), tensors


def same(a, b):
    """Equality that also checks exact types and compares floats bit for bit (a NaN's sign and
    payload, the sign of zero)."""
    if type(a) is not type(b):
        return False
    if isinstance(a, float):
        return struct.pack("<d", a) == struct.pack("<d", b)
    if isinstance(a, (list, tuple)):
        return len(a) == len(b) and all(same(x, y) for x, y in zip(a, b))
    if isinstance(a, dict):
        return list(a) == list(b) and all(same(a[k], b[k]) for k in a) and all(type(k) is type(j) for k, j in zip(a, b))
    if isinstance(a, torch.Tensor):  # of one dtype and shape, bit for bit
        return a.dtype == b.dtype and a.shape == b.shape and (a.numel() == 0 or torch.equal(
            a.contiguous().reshape(-1).view(torch.uint8), b.contiguous().reshape(-1).view(torch.uint8)))
    return a == b


scalars = st.one_of(
    st.none(), st.booleans(), st.integers(min_value=-(2**100), max_value=2**100),
    st.floats(allow_nan=True, allow_infinity=True), st.text(max_size=8),
)
keys = st.one_of(st.none(), st.booleans(), st.integers(-5, 5), st.text(max_size=6),
                 st.tuples(st.integers(0, 3), st.text(max_size=3)))
trees = st.recursive(
    scalars,
    lambda children: st.one_of(
        st.lists(children, max_size=4),
        st.lists(children, max_size=4).map(tuple),
        st.dictionaries(keys, children, max_size=4),
    ),
    max_leaves=20,
)


@given(trees)
@settings(max_examples=300, deadline=None)
def test_typed_tree_roundtrip(value):
    back, tensors = roundtrip(value)
    assert tensors == {}
    assert same(back, value)


@given(st.lists(st.sampled_from(["a", "b/c", "~", "x~1y", "", "/", "~0"]), min_size=1, max_size=4))
def test_escape_is_reversible(parts):
    for p in parts:
        assert keypath.unescape_part(keypath.escape_part(p)) == p
        assert keypath.SEP not in keypath.escape_part(p)


def test_exact_types_survive():
    value = {
        "t": (1, 2.0, "3"), "l": [None, True, False], 7: "int key", (1, "a"): "tuple key", None: 0,
        "inf": float("inf"), "-inf": float("-inf"), "nan": float("nan"), "big": 2**200, "neg0": -0.0,
        "size": torch.Size([2, 3]), "dtype": torch.bfloat16, "device": torch.device("cpu"),
        "@looks_tagged": 1, "empty": {}, "empty_t": (),
        "ordered": OrderedDict([("b", 1), ("a", 2)]), "counter": Counter({3: 2, 7: 1}),
        "counter_inf": Counter({"a": float("inf"), "b": -0.5, "c": True}),
    }
    back, _ = roundtrip(value)
    assert same(back, value)
    assert type(back["size"]) is torch.Size


def _bits(hex_digits: str) -> float:
    return struct.unpack(">d", bytes.fromhex(hex_digits))[0]


@pytest.mark.parametrize("value", [
    float("inf") - float("inf"),  # x86's default NaN: the sign bit set
    -float("nan"), _bits("7ff8000000000123"), _bits("7ff0000000000001"), _bits("fff4000000abcdef"),
], ids=["inf-minus-inf", "negative", "quiet-payload", "signalling", "negative-signalling-payload"])
def test_a_nan_comes_back_bit_for_bit(value):
    back, _ = roundtrip({"metric": value, "pair": (value, 1)})
    assert struct.pack("<d", back["metric"]) == struct.pack("<d", value)
    assert same(back, {"metric": value, "pair": (value, 1)})


def test_tensors_leave_the_json_and_come_back_in_place():
    t1, t2, t3 = torch.ones(2), torch.zeros(3), torch.arange(4)
    value = {"a": t1, "nested": {"b/c": t2}, "lst": [1, t3], 0: {"x": t1}}
    tensors: dict[str, torch.Tensor] = {}
    encoded = format_tree.encode(value, "root", tensors)
    assert set(tensors) == {"root/a", "root/nested/b~1c", "root/lst/1", "root/0/x"}
    assert "a" not in encoded  # plain-dict tensors are left out of the JSON entirely
    back = format_tree.decode(encoded, format_tree.build_trie(list(tensors))["root"], tensors.__getitem__, "root")
    assert back["nested"]["b/c"] is t2 and back["lst"][1] is t3 and back[0]["x"] is t1


@pytest.mark.parametrize(
    ("value", "key"),
    [
        ({"cfg": {"inner": {"fn": lambda x: x}}}, "cfg/inner/fn"),
        ({"obj": object()}, "obj"),
        ({"lst": [1, {1, 2}]}, "lst/1"),
        ({"np": {"a/b": bytearray(b"x")}}, "np/a~1b"),
    ],
    ids=["lambda", "object", "set", "bytearray"],
)
def test_unsupported_values_name_their_key_path(value, key):
    with pytest.raises(UnsupportedStateError, match="no representation without pickle") as info:
        format_tree.encode(value, "", {})
    assert info.value.key == key
    assert key in str(info.value)


@pytest.mark.parametrize(("count", "message"), [
    ("many", r"at 'c': a Counter's values must be numbers"),
    ([1], r"at 'c': a Counter's values must be numbers"),
    ({"@tensor": None}, r"at 'c/a': the state tree expects a tensor here but no tensor has this name"),
    ({"@float": "1.0"}, r"at 'c/a': bad @float '1.0'"),
    ({"@float": "nan:3ff0000000000000"}, r"at 'c/a': bad @float 'nan:3ff0000000000000'"),  # 1.0's bits
    ({"@float": "nan:7ff00000000000zz"}, r"at 'c/a': bad @float 'nan:7ff00000000000zz'"),
    ({"@float": "nan:7ff8"}, r"at 'c/a': bad @float 'nan:7ff8'"),
    ({"@float": "nan:7ff8 0000 000001"}, r"at 'c/a': bad @float 'nan:7ff8 0000 000001'"),  # 7 bytes, spaced
    ({"@float": "nan:7FF8000000000001"}, r"at 'c/a': bad @float 'nan:7FF8000000000001'"),  # one spelling only
], ids=["str", "list", "tensor", "bad-float", "nan-bits-of-a-number", "nan-bits-not-hex", "nan-bits-short",
        "nan-bits-spaced", "nan-bits-upper-case"])
def test_a_counter_of_other_than_numbers_is_corrupt(count, message):
    with pytest.raises(CorruptCheckpointError, match=f"^Invalid state tree {message}"):
        format_tree.decode({"c": {"@counter": [["a", count]]}}, None, lambda name: None)


@pytest.mark.parametrize("key", [torch.ones(1), (1, torch.ones(1))], ids=["tensor", "tuple-holding-a-tensor"])
def test_a_tensor_in_a_dict_key_is_refused(key):
    with pytest.raises(UnsupportedStateError, match=r"^Cannot save 'd/.*': a tensor used as \(or inside\) a dict key "
                                                    r"cannot be stored; use an int or str key instead") as info:
        format_tree.encode({"d": {key: 1}}, "", {})
    assert info.value.key.startswith("d/") and info.value.value_type is type(key)


def test_a_key_stored_as_another_type_names_its_tensors_by_the_key_loaded():
    value = {"d": {pathlib.Path("a/b"): torch.ones(1), (np.int64(1), pathlib.Path("c")): [torch.zeros(1)]}}
    back, tensors = roundtrip(value)
    assert set(tensors) == {"d/a~1b", "d/(1, 'c')/0"}
    assert same(back, {"d": {"a/b": torch.ones(1), (1, "c"): [torch.zeros(1)]}})


def test_key_collision_is_refused():
    with pytest.raises(UnsupportedStateError, match="same tensor name") as info:
        format_tree.encode({0: torch.ones(1), "0": torch.ones(1)}, "d", {})
    assert info.value.key == "d/0"


# Types the tree has no tag for, each stored as the nearest one it has (see ``_format.plain``).
array_dtypes = st.sampled_from(["bool", "int8", "uint16", "<i4", ">i8", "uint64", "float16", ">f4", "float64",
                                "complex64"])
foreign_leaves = st.one_of(
    st.text(max_size=6).map(pathlib.PurePosixPath),
    st.booleans().map(np.bool_),
    st.integers(-(2**63), 2**63 - 1).map(np.int64),
    st.integers(0, 255).map(np.uint8),
    st.floats(width=32).map(np.float32),
    st.floats().map(np.float64),
    st.text(max_size=4).map(np.str_),
    npst.arrays(array_dtypes, npst.array_shapes(min_dims=0, max_dims=2, min_side=0, max_side=3)),
)
identifiers = st.text("abcxyz_", min_size=1, max_size=4)
foreign_trees = st.recursive(
    st.one_of(scalars, foreign_leaves),
    lambda children: st.one_of(
        st.lists(children, max_size=3),
        st.lists(children, max_size=3).map(tuple),
        st.dictionaries(keys, children, max_size=3),
        st.dictionaries(identifiers, children, max_size=3).map(lambda d: argparse.Namespace(**d)),
        st.dictionaries(identifiers, children, max_size=3).map(lambda d: collections.defaultdict(list, d)),
    ),
    max_leaves=12,
)


def nearest(value):
    """What the tree gives back for ``value``, written out independently of ``_format.plain``."""
    if isinstance(value, pathlib.PurePath):
        return str(value)
    if isinstance(value, np.ndarray):
        return torch.from_numpy(np.array(value, dtype=value.dtype.newbyteorder("="), order="C"))
    if isinstance(value, np.str_):
        return "".join(value)  # its characters: str() of one drops trailing NULs (np.str_("\x00") prints "")
    if isinstance(value, np.generic):
        return value.item()
    if isinstance(value, argparse.Namespace):
        value = vars(value)
    if isinstance(value, dict):
        return {k: nearest(v) for k, v in value.items()}
    if isinstance(value, (list, tuple)):
        return type(value)(map(nearest, value))
    return value


@given(foreign_trees)
@example(np.str_("\x00"))  # found by a random run: its characters, not what str() prints
@settings(max_examples=150, deadline=None)
def test_foreign_types_come_back_as_the_nearest_type(value):
    back, _ = roundtrip({"v": value})  # a tensor is always below the root (saved state is a dict of names)
    assert same(back, {"v": nearest(value)})


def test_leaves_flatten_to_names():
    assert keypath.leaves({"a": {0: 1, "b": []}, "t": (1, 2)}, "p") == {"p/a/0": 1, "p/a/b": [], "p/t": (1, 2)}


def test_per_rank_paths_are_spelled_as_the_decoder_names_the_values():
    """The key paths a restore on fewer ranks reports unexpected (``<path>~r<rank>``): escaped parts,
    a pairs-encoded dict's keys by their parts and list positions, not the raw JSON's keys and tags."""
    per_rank = {"@per_rank": [1, 2]}
    tree = {"nested": {"~r0": per_rank, "a/b": per_rank}, "p": {"@dict": [[1, per_rank], [{"@tuple": [2]}, per_rank]]},
            "l": [per_rank, per_rank], "t": {"@tuple": [0, per_rank]}}
    assert list(format_per_rank.per_rank_paths(tree)) == ["nested/~0r0", "nested/a~1b", "p/1", "p/(2,)", "l/0", "l/1", "t/1"]


def test_per_rank_paths_tell_apart_keys_of_one_spelling():
    """An int key and a str key of one spelling (and two NaN keys) in one dict get one path each,
    as ``diff`` spells them (before: ``v/1`` twice)."""
    per_rank = {"@per_rank": [1, 2]}
    nan = {"@float": "nan"}
    tree = {"v": {"@dict": [[1, per_rank], ["1", per_rank], [nan, per_rank], [nan, per_rank], ["x", per_rank]]}}
    assert list(format_per_rank.per_rank_paths(tree)) == ["v/1", "v/'1'", "v/nan", "v/nan#2", "v/x"]
    quoted_first = {"v": {"@dict": [["'1'", per_rank], [1, per_rank], ["1", per_rank]]}}  # probe77 F2
    assert list(format_per_rank.per_rank_paths(quoted_first)) == ["v/\"'1'\"", "v/1", "v/'1'"]
    suffix = {"v": {"@dict": [[nan, per_rank], [nan, per_rank], ["nan#2", per_rank]]}}  # probe83 F8
    assert list(format_per_rank.per_rank_paths(suffix)) == ["v/nan", "v/nan#2", "v/'nan#2'"]


def _nested_lists(levels: int) -> list:
    value: list = []
    for _ in range(levels):
        value = [value]
    return value


def test_a_per_rank_value_may_be_as_deep_as_a_plain_one():
    """probe79 F1: the encoder counted a PerRank wrapper as a level, which a reader takes off
    (``select_rank``) before it decodes: a tree the reader accepts was refused on several ranks."""
    deepest, too_deep = _nested_lists(99), _nested_lists(100)  # innermost list at 100 and at 101 levels
    node = format_tree.encode({"cfg": format_tree.PerRank(deepest)}, "", {})
    chosen = {"cfg": node["cfg"][format_tree.PER_RANK_TAG]}  # what select_rank hands the decoder, in one process
    assert format_tree.decode(json.loads(json.dumps(chosen)), {}, lambda name: None) == {"cfg": deepest}
    with pytest.raises(UnsupportedStateError, match="nested more than 100 deep"):
        format_tree.encode({"cfg": format_tree.PerRank(too_deep)}, "", {})


def _nested_int_keys(levels: int) -> dict:
    value: object = 0
    for _ in range(levels):
        value = {1: value}
    return value  # type: ignore[return-value]


def test_the_raw_walks_of_a_job_tree_take_every_tree_the_decoder_takes():
    """probe79 F6, F7: the walks over a job's raw JSON allowed two raw levels for each of the
    decoder's, but a dict of int keys takes three: a 2-rank save of such dicts 68 deep committed
    and no reader took it; and a dict's keys were decoded at the raw depth, refusing a legal tree."""
    deep = format_tree.encode(_nested_int_keys(99), "cfg", {})  # its innermost value at 100 levels
    state = {"cfg": {format_tree.PER_RANK_TAG: [deep, deep]}}
    assert format_tree.decode(format_per_rank.select_rank(state, 1, 2), {}, lambda n: None) == {
        "cfg": _nested_int_keys(99)}
    assert list(format_per_rank.per_rank_paths(state)) == ["cfg"]
    tupled: object = {1: 0}
    for _ in range(55):
        tupled = (tupled,)
    shared = {"cfg": format_tree.encode(tupled, "cfg", {}), "r": {format_tree.PER_RANK_TAG: [1, 2]}}
    assert list(format_per_rank.per_rank_paths(shared)) == ["r"]
