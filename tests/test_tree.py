"""The typed JSON tree: exact types, reversible names, refusal of what would need pickle."""

from __future__ import annotations

import json
import math
from collections import Counter, OrderedDict

import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st

from torchckpt import UnsupportedStateError
from torchckpt._format import tree as format_tree


def roundtrip(value):
    tensors: dict[str, torch.Tensor] = {}
    encoded = format_tree.encode(value, "", tensors)
    text = json.dumps(encoded, allow_nan=False)  # strict JSON: no NaN/Infinity literals
    trie = format_tree.build_trie(list(tensors))
    return format_tree.decode(json.loads(text), trie, tensors.__getitem__), tensors


def same(a, b):
    """Equality that also checks exact types and treats nan as equal to nan."""
    if type(a) is not type(b):
        return False
    if isinstance(a, float):
        return (math.isnan(a) and math.isnan(b)) or (a == b and math.copysign(1, a) == math.copysign(1, b))
    if isinstance(a, (list, tuple)):
        return len(a) == len(b) and all(same(x, y) for x, y in zip(a, b))
    if isinstance(a, dict):
        return list(a) == list(b) and all(same(a[k], b[k]) for k in a) and all(type(k) is type(j) for k, j in zip(a, b))
    if isinstance(a, torch.Tensor):
        return torch.equal(a, b)
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
        assert format_tree.unescape_part(format_tree.escape_part(p)) == p
        assert format_tree.SEP not in format_tree.escape_part(p)


def test_exact_types_survive():
    value = {
        "t": (1, 2.0, "3"), "l": [None, True, False], 7: "int key", (1, "a"): "tuple key", None: 0,
        "inf": float("inf"), "-inf": float("-inf"), "nan": float("nan"), "big": 2**200, "neg0": -0.0,
        "size": torch.Size([2, 3]), "dtype": torch.bfloat16, "device": torch.device("cpu"),
        "@looks_tagged": 1, "empty": {}, "empty_t": (),
        "ordered": OrderedDict([("b", 1), ("a", 2)]), "counter": Counter({3: 2, 7: 1}),
    }
    back, _ = roundtrip(value)
    assert same(back, value)
    assert type(back["size"]) is torch.Size


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


def test_key_collision_is_refused():
    with pytest.raises(UnsupportedStateError, match="same tensor name") as info:
        format_tree.encode({0: torch.ones(1), "0": torch.ones(1)}, "d", {})
    assert info.value.key == "d/0"


def test_leaves_flatten_to_names():
    assert format_tree.leaves({"a": {0: 1, "b": []}, "t": (1, 2)}, "p") == {"p/a/0": 1, "p/a/b": [], "p/t": (1, 2)}
