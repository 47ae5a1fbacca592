"""Where a forged or third-party index places its tensors: names and keys a writer never stores.

Each forged index is sealed again (``test_hostile.forge``), so what is tested is the decoder: before,
each case below lost a tensor, put one tensor under two keys, or read a bad marker, and a restore
said "everything matched". Now a reader refuses it, naming the key path. Last, ``torchckpt diff``
tells apart plain values under keys that share a name part (``1`` and ``"1"``).
"""

from __future__ import annotations

import math
from collections import OrderedDict

import pytest
import torch

import torchckpt
from torchckpt import CorruptCheckpointError
from torchckpt.cli import main

from .test_hostile import forge, state

MARK = {"@tensor": None}


def ones(n: float) -> torch.Tensor:
    return torch.full((2,), float(n))


def zeros_like(value: object) -> object:
    """A target of the state ``value``: each tensor zeros, each dict and plain value as it is."""
    if isinstance(value, torch.Tensor):
        return torch.zeros_like(value)
    if isinstance(value, dict):
        return {k: zeros_like(v) for k, v in value.items()}
    return value


def assert_refused(path: str, saved: dict, match: str) -> None:
    """``load_state`` and ``Checkpoint.read`` into the state as saved both refuse the index."""
    with pytest.raises(CorruptCheckpointError, match=match) as info:
        torchckpt.load_state(path)
    assert info.value.path == path
    target = torchckpt.Checkpoint(**{name: zeros_like(value) for name, value in saved.items()})
    with pytest.raises(CorruptCheckpointError, match=match):
        target.read(path)


def add_alias(alias: str, target: str):
    """An edit of the index: ``alias`` made a name of the stored tensor ``target``."""
    return lambda index: index["torchckpt"]["aliases"].update({alias: target})


# -- F1: a name part spelled otherwise than its key's escape ------------------------------------

# (the state saved, the alias added, the key path refused): before, the alias's tensor was dropped
MISSPELLED = {
    "tilde-unescaped": ({"d": {"~": ones(1), "x": ones(2)}}, ("d/~", "d/x"), "d/~"),
    "tilde-two": ({"d": {"~2": ones(1), "x": ones(2)}}, ("d/~2", "d/x"), "d/~2"),
    "inner-part": ({"d": {"~": {"y": ones(1)}, "x": ones(2)}}, ("d/~/y", "d/x"), "d/~"),
    "beside-a-plain-value": ({"d": {"~": 5, "x": ones(2)}}, ("d/~", "d/x"), "d/~"),
}


@pytest.mark.parametrize("case", list(MISSPELLED), ids=list(MISSPELLED))
def test_a_name_part_not_spelled_as_its_keys_escape_is_refused(tmp_path, case):
    saved, (alias, target), where = MISSPELLED[case]
    path = torchckpt.Checkpoint(**saved).write(tmp_path / "ckpt")
    forge(path, add_alias(alias, target))
    key = where.rpartition("/")[2]
    assert_refused(path, saved, f"Invalid state tree at '{where}': the tensor name '{alias}' spells the key "
                                f"'{key}' as '{key}', where a writer spells it '{key.replace('~', '~0')}'")


# -- F7: a name that is also a prefix, listed after the names below it -------------------------


@pytest.mark.parametrize("saved,alias", [({"a": {"b": ones(1)}}, ("d/a", "d/a/b")),
                                         ({"a": ones(1)}, ("d/a/b", "d/a"))], ids=["leaf-after", "leaf-before"])
def test_a_name_used_as_a_prefix_is_named_so_in_either_order(tmp_path, saved, alias):
    """Before, with ``d/a/b`` listed first, the message said ``d/a`` "is listed twice"."""
    path = torchckpt.Checkpoint(d=saved).write(tmp_path / "ckpt")
    forge(path, add_alias(*alias))
    assert_refused(path, {"d": saved}, "Tensor name 'd/a' is also used as a prefix of 'd/a/b'")


# -- F4: pairs-encoded dicts whose keys a writer refuses -------------------------------------

NAN = {"@float": "nan"}


def retag(old: object, new: object):
    """An edit of the index: the ``p`` pair of key ``old`` given the key ``new``."""
    def edit(index: dict) -> None:
        pairs = state(index)["p"]["@dict"]
        next(pair for pair in pairs if pair[0] == old)[0] = new
    return edit


def append_pair(key: object):
    """An edit of the index: a pair ``[key, {"@tensor": null}]`` added to ``p``."""
    return lambda index: state(index)["p"]["@dict"].append([key, MARK])


# (the state saved, the edit, what is refused): before, a tensor was dropped or placed twice
PAIRS = {
    "1-and-True": ({1: ones(1), "True": ones(2)}, retag("True", True), "its keys 1 and True are equal in Python"),
    "1-and-1.0": ({1: ones(1), "1.0": ones(2)}, retag("1.0", 1.0), "its keys 1 and 1.0 are equal in Python"),
    "1-twice": ({1: ones(1)}, append_pair(1), "its keys 1 and 1 are equal in Python"),
    "two-NaNs": ({math.nan: ones(1)}, append_pair(NAN),
                 r"its keys nan and nan both name the tensors below them 'p/nan'/\.\.\."),
    "tuple-and-its-repr": ({(1,): ones(1)}, append_pair("(1,)"),
                           r"its keys \(1,\) and '\(1,\)' both name the tensors below them 'p/\(1,\)'/\.\.\."),
}


@pytest.mark.parametrize("case", list(PAIRS), ids=list(PAIRS))
def test_a_pairs_encoded_dict_with_keys_a_writer_refuses_is_refused(tmp_path, case):
    saved, edit, message = PAIRS[case]
    path = torchckpt.Checkpoint(p=saved).write(tmp_path / "ckpt")
    forge(path, edit)
    assert_refused(path, {"p": saved}, f"Invalid state tree at 'p': {message}")


def test_keys_sharing_a_name_part_with_no_tensor_below_still_load(tmp_path):
    """The writer stores these (no tensor names clash), so the reader takes them, as before."""
    saved = {1: "a", "1": "b", None: 0, "None": 1, math.nan: 2, -math.nan: 3, (1,): 4, "(1,)": 5}
    path = torchckpt.Checkpoint(p=saved, w=ones(1)).write(tmp_path / "ckpt")
    loaded = torchckpt.load_state(path)["p"]
    assert [(type(k), v) for k, v in loaded.items()] == [(type(k), v) for k, v in saved.items()]


# -- F5: the tensor marker holds null ---------------------------------------------------------


@pytest.mark.parametrize("payload", [1, "x", [1, 2], {"k": None}], ids=["int", "str", "list", "dict"])
def test_a_tensor_marker_holding_anything_but_null_is_refused(tmp_path, payload):
    saved = {"extra": {"a": ones(1), "b": ones(2)}}
    path = torchckpt.Checkpoint(**saved).write(tmp_path / "ckpt")
    forge(path, lambda index: state(index)["extra"].update(a={"@tensor": payload}))
    assert_refused(path, saved, "Invalid state tree at 'extra/a': a tensor's marker is "
                                r'\{"@tensor": null\}, and this one holds ')


# -- F2: diff compares values under keys that share a name part -------------------------------

# (cfg saved in a, cfg saved in b, the lines diff prints for them)
KEY_PARTS = {
    "int-changed": ({1: "old", "1": "same"}, {1: "NEW", "1": "same"}, ["~ cfg/1  'old' -> 'NEW'"]),
    "str-changed": ({1: "same", "1": "old"}, {1: "same", "1": "NEW"}, ["~ cfg/'1'  'old' -> 'NEW'"]),
    "None": ({None: 0, "None": 1}, {None: 5, "None": 1}, ["~ cfg/None  0 -> 5"]),
    "True": ({True: 0, "True": 1}, {True: 0, "True": 5}, ["~ cfg/'True'  1 -> 5"]),
    "key-type-changed": ({"1": "x"}, {1: "x"}, ["~ cfg/'1'  'x' -> (absent)", "~ cfg/1  (absent) -> 'x'"]),
    # probe77 F2: '1' quoted is "'1'"'s plain spelling; before, a swap of both keys' values and order was no change
    # probe83 F8: the str key "nan#2" was spelled as the second NaN is, and hid its change
    "nan-suffix": ({float("nan"): 1, float("nan"): 2, "nan#2": 3}, {float("nan"): 1, float("nan"): 99, "nan#2": 3},
                   ["~ cfg/nan#2  2 -> 99"]),
    "quote-in-key": ({1: "x", "1": "y", "'1'": "z"}, {1: "x", "'1'": "y", "1": "z"},
                     ["~ cfg/'1'  'y' -> 'z'", "~ cfg/\"'1'\"  'z' -> 'y'"]),
}


@pytest.mark.parametrize("case", list(KEY_PARTS), ids=list(KEY_PARTS))
def test_diff_reports_a_change_under_one_of_two_keys_that_share_a_name_part(tmp_path, capsys, case):
    """Before, ``1`` and ``"1"`` were flattened to one path, and the change under one was lost."""
    cfg_a, cfg_b, lines = KEY_PARTS[case]
    a = torchckpt.Checkpoint(cfg=cfg_a, epoch=3, w=ones(1)).write(tmp_path / "a")
    b = torchckpt.Checkpoint(cfg=cfg_b, epoch=4, w=ones(1)).write(tmp_path / "b")
    assert main(["diff", a, b, "--exit-code"]) == 1
    out = capsys.readouterr().out.splitlines()
    assert sorted(line for line in out if line.startswith("~ cfg")) == sorted(lines)
    assert "~ epoch  3 -> 4" in out  # an ordinary key is written as before
    assert out[-1].endswith(f"{len(lines) + 1} state values changed")


def test_diff_writes_keys_that_look_like_numbers_as_before_where_nothing_shares_their_spelling(tmp_path, capsys):
    cfg = {"0": 1, "1e-3": 2, "nan": 3, "steps": {"100": 0.1}}
    a = torchckpt.Checkpoint(cfg=cfg, w=ones(1)).write(tmp_path / "a")
    b = torchckpt.Checkpoint(cfg={**cfg, "0": 5, "steps": {"100": 0.2}}, w=ones(1)).write(tmp_path / "b")
    assert main(["diff", a, b]) == 0
    assert capsys.readouterr().out.splitlines()[:2] == ["~ cfg/0  1 -> 5", "~ cfg/steps/100  0.1 -> 0.2"]


@pytest.mark.parametrize(("before", "after", "changed"), [
    pytest.param((float("nan"), 1), (float("nan"), 1), False, id="nan-in-a-tuple-unchanged"),
    pytest.param(0.0, -0.0, True, id="zero-changes-sign"),
    pytest.param((0.0, 1), (-0.0, 1), True, id="zero-changes-sign-in-a-tuple"),
    pytest.param(1, True, True, id="int-to-bool"),
])
def test_diff_compares_plain_values_as_tensors_are_compared(tmp_path, capsys, before, after, changed):
    """Before, an unchanged tuple holding a NaN was reported changed, and 0.0 -> -0.0 was not."""
    a = torchckpt.Checkpoint(v=before, w=ones(1)).write(tmp_path / "a")
    b = torchckpt.Checkpoint(v=after, w=ones(1)).write(tmp_path / "b")
    assert main(["diff", a, b, "--exit-code"]) == int(changed)
    assert capsys.readouterr().out.splitlines()[-1].endswith("1 state value changed" if changed else
                                                             "0 state values changed")


@pytest.mark.parametrize(("before", "after", "lines"), [
    pytest.param([[1], [2]], ([1], [2]), ["~ v  (list) -> (tuple)"], id="list-to-tuple"),
    pytest.param({"a": 1}, OrderedDict(a=1), ["~ v  (dict) -> (OrderedDict)"], id="dict-to-ordered-dict"),
    pytest.param([5, 6], {0: 5, 1: 6}, ["~ v  (list) -> (dict)"], id="list-to-int-keyed-dict"),
    pytest.param({1: {"w": ones(1)}}, {"1": {"w": ones(1)}}, ["~ v/1  (dict) -> (absent)", "~ v/'1'  (absent) -> (dict)",
                                                     "~ v/'1'/w  (absent) -> (tensor)"],
                 id="key-type-with-tensors-below"),
    pytest.param({1: ones(1)}, {"1": ones(1)}, ["~ v/'1'  (absent) -> (tensor)"], id="key-type-of-a-tensor"),
    pytest.param({}, OrderedDict(), ["~ v  {} -> OrderedDict()"], id="empty-dict-to-empty-ordered-dict"),
    pytest.param([], {}, ["~ v  [] -> {}"], id="empty-list-to-empty-dict"),
    pytest.param({}, None, ["~ v  {} -> None"], id="empty-dict-to-none"),
    # an empty container that filled up keeps its kind: only its new items (before: also "{} -> (dict)")
    pytest.param({}, {"a": 1}, ["~ v/a  (absent) -> 1"], id="empty-dict-filled"),
    pytest.param([3], [], ["~ v/0  3 -> (absent)"], id="list-emptied"),
])
def test_diff_reports_a_container_by_its_kind_and_its_items(tmp_path, capsys, before, after, lines):
    """A kind that changed with the same items is a change (before: "0 state values changed", as
    items are compared by path, and the paths are the same); an empty one that filled up is not."""
    a = torchckpt.Checkpoint(v=before, w=ones(1)).write(tmp_path / "a")
    b = torchckpt.Checkpoint(v=after, w=ones(1)).write(tmp_path / "b")
    assert main(["diff", a, b, "--exit-code"]) == 1
    out = capsys.readouterr().out.splitlines()
    assert sorted(out[:-1]) == sorted(lines)
