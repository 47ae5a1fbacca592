"""The on-disk format: golden bytes, safetensors compatibility, sharding, hostile input."""

from __future__ import annotations

import json
import os
import re
import struct
from pathlib import Path

import pytest
import torch
import xxhash
from safetensors import safe_open
from safetensors.torch import load_file, save_file

import torchckpt
from torchckpt import CorruptCheckpointError, _clock
from torchckpt._format import document as format_document
from torchckpt._format import dtypes as format_dtypes
from torchckpt._format import header as format_header
from torchckpt._format import spec
from torchckpt._save import options as save_options
from torchckpt._tools import verify as tools_verify

from .conftest import read_header_file, sealed_json, write_index

GOLDEN_HEADER = (
    b'\x88\x00\x00\x00\x00\x00\x00\x00{"__metadata__":{"format":"pt"},'
    b'"a":{"dtype":"F32","shape":[2],"data_offsets":[0,8]},'
    b'"b":{"dtype":"I8","shape":[],"data_offsets":[8,9]}}'
)

GOLDEN_INDEX = """{
 "metadata": {
  "total_size": 9
 },
 "weight_map": {
  "a": "model-00001-of-00001.safetensors",
  "b": "model-00001-of-00001.safetensors"
 },
 "torchckpt": {
  "format_version": 1,
  "created": 1700000000.5,
  "torch_version": "2.x",
  "torchckpt_version": "0.1.0",
  "checksum_algorithm": "xxh3-64",
  "objects": {"a": "tensor", "b": "tensor", "n": "value"},
  "state": {"a": {"@tensor": null}, "b": {"@tensor": null}, "n": {"@tuple": [1, {"@float": "inf"}]}, "save_counter": 0},
  "aliases": {},
  "shards": [{"file": "model-00001-of-00001.safetensors", "size": 153, "checksum": "%s", "header_checksum": "%s", "tensors": 2}],
  "tensors": {"names": ["a", "b"], "dtypes": "F32,I8", "shapes": "2;", "checksums": "%s%s"}
 }"""
SEAL = ',\n "checksum": "%s"\n}\n'  # the seal: the xxh3-64 of every byte before it


def test_golden_shard_header():
    header = b"".join(format_header.encode_header_pieces([("a", torch.float32, (2,), 8), ("b", torch.int8, (), 1)]))
    assert header == GOLDEN_HEADER
    assert (len(header)) % 8 == 0  # the data section starts 8-byte aligned


def test_golden_index(tmp_path, monkeypatch):
    import xxhash

    monkeypatch.setattr(torch, "__version__", "2.x")
    a, b = torch.tensor([1.0, 2.0]), torch.tensor(-3, dtype=torch.int8)
    with _clock.frozen(1700000000.5):
        torchckpt.Checkpoint(a=a, b=b, n=(1, float("inf"))).write(tmp_path / "c")
    da = xxhash.xxh3_64_intdigest(a.numpy().tobytes())
    db = xxhash.xxh3_64_intdigest(b.numpy().tobytes())
    shard = xxhash.xxh3_64(GOLDEN_HEADER)
    shard.update(da.to_bytes(8, "big"))
    shard.update(db.to_bytes(8, "big"))
    header_hash = xxhash.xxh3_64_hexdigest(GOLDEN_HEADER)
    body = GOLDEN_INDEX % (f"{shard.intdigest():016x}", header_hash, f"{da:016x}", f"{db:016x}")
    expected = body + SEAL % xxhash.xxh3_64_hexdigest(body.encode())
    assert (tmp_path / "c" / "index.json").read_text() == expected
    assert (tmp_path / "c" / "model-00001-of-00001.safetensors").read_bytes() == GOLDEN_HEADER + a.numpy().tobytes() + b.numpy().tobytes()


def test_large_index_is_streamed_as_the_same_json(tmp_path):
    """Over LAYOUT_MAX_LINES tensors the weight map and tensor table are written in pieces; the
    text is exactly what laying out the parsed index again gives, and the header what json.dumps gives."""
    count = spec.LAYOUT_MAX_LINES + 700
    odd = {'q"uote': torch.zeros(1), "back\\slash": torch.ones(2), "ünï": torch.zeros((), dtype=torch.int8)}
    many = {f"t{i}": torch.full((i % 3,), float(i), dtype=torch.float16 if i % 2 else torch.float32)
            for i in range(count)}
    torchckpt.Checkpoint(many=many, odd=odd).write(tmp_path / "c", max_shard_size=2000)
    text = (tmp_path / "c" / "index.json").read_text()
    index = json.loads(text)
    assert b"".join(format_document.sealed_pieces({k: v for k, v in index.items() if k != "checksum"})).decode() == text
    assert len(index["weight_map"]) == count + 3 and len(index["torchckpt"]["shards"]) > 2
    for shard in index["torchckpt"]["shards"]:
        with open(tmp_path / "c" / shard["file"], "rb") as f:
            (n,) = struct.unpack("<Q", f.read(8))
            raw = f.read(n)
        assert raw.rstrip(b" ") == json.dumps(json.loads(raw), separators=(",", ":"), ensure_ascii=False).encode()
    restored = torchckpt.Checkpoint(many={k: torch.empty_like(v) for k, v in many.items()},
                                    odd={k: torch.empty_like(v) for k, v in odd.items()})
    restored.read(tmp_path / "c").assert_consumed()
    assert all(torch.equal(restored.many[k], v) for k, v in many.items())
    assert torch.equal(restored.odd["back\\slash"], odd["back\\slash"])


def test_header_pieces_join_to_the_header():
    entries = [(f"n{i}", torch.float32, (i,), 4 * i) for i in range(3000)]
    pieces = format_header.encode_header_pieces(entries)
    header = b"".join(pieces)
    assert len(pieces) > 3
    (n,) = struct.unpack("<Q", header[:8])
    parsed = json.loads(header[8:])
    assert len(header) == 8 + n and len(header) % 8 == 0
    assert header[8:].rstrip() == json.dumps(parsed, separators=(",", ":")).encode()
    assert parsed["n2999"] == {"dtype": "F32", "shape": [2999], "data_offsets": [sum(4 * i for i in range(2999)),
                                                                                  sum(4 * i for i in range(3000))]}


ALL_DTYPES = sorted(format_dtypes.SUPPORTED_DTYPES, key=str)


@pytest.mark.parametrize("dtype", ALL_DTYPES, ids=lambda d: str(d).removeprefix("torch."))
def test_every_dtype_roundtrips_and_loads_with_safetensors(tmp_path, dtype):
    source = (torch.randn(3, 5) * 4).to(torch.float32)
    value = source.to(dtype) if dtype != torch.bool else source > 0
    if dtype.is_complex:
        value = torch.complex(source, -source).to(dtype)
    ckpt = torchckpt.Checkpoint(x=value, scalar=value[0, 0].clone(), empty=value[:0])
    path = ckpt.write(tmp_path / "c")
    loaded = load_file(os.path.join(path, "model-00001-of-00001.safetensors"))
    assert loaded["x"].dtype == dtype and torch.equal(as_bytes(loaded["x"]), as_bytes(value))
    target = torchckpt.Checkpoint(x=torch.zeros_like(value), scalar=torch.zeros_like(value[0, 0]), empty=value[:0].clone())
    target.read(path).assert_consumed()
    assert torch.equal(as_bytes(target.x), as_bytes(value))
    assert torch.equal(as_bytes(target.scalar), as_bytes(value[0, 0]))


@pytest.mark.parametrize("dtype", ALL_DTYPES, ids=lambda d: str(d).removeprefix("torch."))
def test_the_torch_free_dtype_tables_agree_with_torch(dtype):
    name = format_dtypes.dtype_to_str(dtype)
    assert format_dtypes.ITEMSIZES[name] == format_dtypes.itemsize(dtype) == torch.empty((), dtype=dtype).element_size()
    assert format_dtypes.str_to_dtype(name) is dtype
    assert format_dtypes.TORCH_NAMES[name] == str(dtype).removeprefix("torch.")


def test_a_parsed_header_holds_dtype_names_and_gives_torch_objects():
    raw = b'{"w":{"dtype":"BF16","shape":[2,3],"data_offsets":[0,12]}}'
    (info,), _ = format_header.parse_header(raw, "f.safetensors", "f.safetensors", 8 + len(raw) + 12)
    assert (info.dtype_name, info.dims, info.nbytes) == ("BF16", (2, 3), 12)
    assert (info.dtype, info.shape) == (torch.bfloat16, torch.Size([2, 3]))
    assert type(info.shape) is torch.Size


def test_an_unknown_dtype_name_is_a_corrupt_checkpoint():
    with pytest.raises(CorruptCheckpointError, match=r"Unknown dtype 'F128' in f\.safetensors\.") as e:
        format_dtypes.check_dtype("F128", " in f.safetensors", "f.safetensors")
    assert e.value.path == "f.safetensors"
    for value in ({}, [], 3, None):  # what a hostile header holds; a dict was a TypeError (unhashable) once
        with pytest.raises(CorruptCheckpointError, match="Unknown dtype"):
            format_dtypes.check_dtype(value, " in f.safetensors", "f.safetensors")


@pytest.mark.skipif(not hasattr(torch, "float4_e2m1fn_x2"), reason="needs torch.float4_e2m1fn_x2")
def test_a_packed_dtype_of_safetensors_is_named_as_one_not_as_unknown(tmp_path):
    """safetensors writes torch.float4_e2m1fn_x2 as F4 with twice the last dimension; the message
    said "Unknown dtype", as for a damaged file."""
    packed = torch.arange(12, dtype=torch.uint8).reshape(3, 4).view(torch.float4_e2m1fn_x2)
    save_file({"w": packed}, tmp_path / "mx.safetensors")
    for read in (torchckpt.load_state, torchckpt.load_checkpoint):
        with pytest.raises(CorruptCheckpointError, match=r"Dtype 'F4' for tensor 'w' in .*mx\.safetensors packs 4-bit "
                           r"floats \(torch\.float4_e2m1fn_x2\) into bytes, which torchckpt does not read .* Read it "
                           r"with safetensors\.torch\.load_file\.$") as e:
            read(tmp_path / "mx.safetensors")
        assert e.value.path == str(tmp_path / "mx.safetensors")


def as_bytes(t: torch.Tensor) -> torch.Tensor:
    return t.reshape(-1).view(torch.uint8)


def test_every_file_is_json_or_safetensors_and_agrees_with_weight_map(tmp_path, mlp, stepped_optimizer):
    ckpt = torchckpt.Checkpoint(model=mlp, opt=stepped_optimizer, rng=torchckpt.RNGState(), step=7)
    path = ckpt.write(tmp_path / "c", max_shard_size=300)
    index = json.loads((tmp_path / "c" / "index.json").read_text())
    files = sorted(os.listdir(path))
    shards = [f for f in files if f.endswith(".safetensors")]
    assert set(files) == {"index.json", *shards}
    assert len(shards) > 2
    assert set(index["weight_map"].values()) == set(shards)
    total = 0
    seen = set()
    for shard in shards:
        tensors = load_file(os.path.join(path, shard))
        with safe_open(os.path.join(path, shard), "pt") as f:
            assert f.metadata() == {"format": "pt"}
        shard_bytes = 0
        for name, t in tensors.items():
            assert index["weight_map"][name] == shard
            shard_bytes += t.numel() * t.element_size()
            seen.add(name)
        total += shard_bytes
        assert shard_bytes <= 300 or len(tensors) == 1  # max_shard_size bounds each shard's tensor bytes
    assert seen == set(index["weight_map"])
    assert index["metadata"]["total_size"] == total
    fresh = torchckpt.Checkpoint(model=torch.nn.Sequential(torch.nn.Linear(4, 8), torch.nn.ReLU(), torch.nn.Linear(8, 3)),
                                 opt=None, rng=torchckpt.RNGState(), step=0)
    fresh.opt = torch.optim.Adam(fresh.model.parameters(), lr=0.01)
    fresh.restore(path).assert_consumed()
    for a, b in zip(mlp.parameters(), fresh.model.parameters()):
        assert torch.equal(a, b)
    assert torch.equal(fresh.opt.state_dict()["state"][0]["exp_avg"], stepped_optimizer.state_dict()["state"][0]["exp_avg"])


def test_shard_size_bounds_every_shard_but_a_single_big_tensor(tmp_path):
    tensors = {f"t{i}": torch.full((25,), float(i)) for i in range(8)}  # 100 bytes each
    tensors["big"] = torch.zeros(100)  # 400 bytes, over the limit: a shard of its own
    path = torchckpt.Checkpoint(**tensors).write(tmp_path / "c", max_shard_size="250B")
    index = json.loads(Path(os.path.join(path, "index.json")).read_text())
    for record in index["torchckpt"]["shards"]:
        data_bytes = sum(
            t.numel() * t.element_size() for t in load_file(os.path.join(path, record["file"])).values()
        )
        assert data_bytes <= 250 or record["tensors"] == 1
    assert len(index["torchckpt"]["shards"]) == 5


@pytest.mark.parametrize(("text", "expected"), [("2GB", 2 * 10**9), ("1.5MB", 1_500_000), ("3GiB", 3 * 2**30), (12, 12), ("7", 7)])
def test_parse_size(text, expected):
    assert save_options.parse_size(text) == expected


@pytest.mark.parametrize("bad", ["", "2XB", "GB", "-1", 0])
def test_parse_size_rejects(bad):
    with pytest.raises(ValueError, match="size"):
        save_options.parse_size(bad)


def _write_raw(path, header: dict | bytes, data: bytes = b"", length: int | None = None) -> None:
    body = header if isinstance(header, bytes) else json.dumps(header).encode()
    with open(path, "wb") as f:
        f.write(struct.pack("<Q", len(body) if length is None else length) + body + data)


@pytest.mark.parametrize(
    ("header", "data", "length", "match"),
    [
        ({"a": {"dtype": "F32", "shape": [1], "data_offsets": [0, 4]}}, b"", None, "truncated"),
        ({"a": {"dtype": "F32", "shape": [1], "data_offsets": [0, 4]}}, b"12345", None, "trailing"),
        ({}, b"", 2**40, "over the"),
        ({}, b"", 50, "truncated"),
        (b"not json", b"", None, "not valid JSON"),
        ({"a": {"dtype": "F99", "shape": [1], "data_offsets": [0, 4]}}, b"1234", None, "Unknown dtype"),
        ({"a": {"dtype": "F32", "shape": [2], "data_offsets": [0, 4]}}, b"1234", None, "need 8 bytes"),
        ({"a": {"dtype": "F32", "shape": [1], "data_offsets": [0, 4]},
          "b": {"dtype": "F32", "shape": [1], "data_offsets": [0, 4]}}, b"1234", None, "overlapping"),
        ({"a": {"dtype": "F32", "shape": [-1], "data_offsets": [0, 4]}}, b"1234", None, "Malformed shape"),
    ],
    ids=["short", "trailing", "huge-header", "header-past-eof", "not-json", "dtype", "size", "overlap", "neg-shape"],
)
def test_hostile_headers_are_refused(tmp_path, header, data, length, match):
    path = tmp_path / "x.safetensors"
    _write_raw(path, header, data, length)
    with pytest.raises(CorruptCheckpointError, match=match) as info:
        read_header_file(path, "x.safetensors")
    assert info.value.path == str(path)


def test_tiny_file_is_refused(tmp_path):
    (tmp_path / "x.safetensors").write_bytes(b"abc")
    with pytest.raises(CorruptCheckpointError, match="shorter than the 8-byte"):
        read_header_file(tmp_path / "x.safetensors", "x.safetensors")


@pytest.mark.parametrize("name", ["../evil.safetensors", "/etc/passwd.safetensors", "a/b.safetensors", "..", "x.bin", "c\\d.safetensors"])
def test_index_cannot_point_outside_the_checkpoint(tmp_path, name):
    path = torchckpt.Checkpoint(w=torch.ones(2)).write(tmp_path / "c")
    index = json.loads(Path(os.path.join(path, "index.json")).read_text())
    index["torchckpt"]["shards"][0]["file"] = name
    write_index(tmp_path / "c", index)
    with pytest.raises(CorruptCheckpointError, match="refusing to follow|not a .safetensors file"):
        torchckpt.Checkpoint(w=torch.zeros(2)).restore(path)


@pytest.mark.parametrize(
    ("edit", "match"),
    [
        (lambda i: i["weight_map"].update(a="model-00002-of-00002.safetensors"), "weight_map puts 'a' in"),
        (lambda i: i["weight_map"].pop("b"), "weight_map has no entry for 'b'"),
        (lambda i: i["weight_map"].update(ghost="model-00001-of-00001.safetensors"), "no shard holds: ghost"),
        (lambda i: i.pop("weight_map"), "'weight_map' is missing"),
        (lambda i: i["torchckpt"]["tensors"].update(checksums="zz" * 16), "checksums are malformed"),
        (lambda i: i["torchckpt"]["tensors"].update(names=["a", "a"]), "table lists it twice"),
    ],
    ids=["wrong-shard", "missing-name", "extra-name", "no-map", "bad-checksums", "repeated-name"],
)
def test_index_that_disagrees_with_itself_is_refused(tmp_path, edit, match):
    path = torchckpt.Checkpoint(a=torch.ones(2), b=torch.zeros(3)).write(tmp_path / "c")
    index = json.loads(Path(path, "index.json").read_text())
    edit(index)
    write_index(path, index)
    with pytest.raises(CorruptCheckpointError, match=match) as info:
        torchckpt.Checkpoint(a=torch.zeros(2), b=torch.ones(3)).restore(path)
    assert info.value.path == path


@pytest.mark.parametrize(
    ("edit", "match"),
    [
        (lambda i: i["weight_map"].update(a="model-00002-of-00002.safetensors"), "weight_map puts 'a' in"),
        (lambda i: i["weight_map"].pop("b"), "weight_map has no entry for 'b'"),
        (lambda i: i["weight_map"].update(ghost="model-00001-of-00001.safetensors"), "no shard holds: ghost"),
    ],
    ids=["wrong-shard", "missing-name", "extra-name"],
)
def test_the_inspector_checks_the_weight_map_once_it_reads_tensor_bytes(tmp_path, edit, match):
    # The weight_map is for other tools (Hugging Face's loaders): the inspector answers shapes and
    # dtypes from the tensor table without parsing it (half of a big index), and checks it, as a
    # restore and verify do, before it first reads a tensor.
    path = torchckpt.Checkpoint(a=torch.ones(2), b=torch.zeros(3)).write(tmp_path / "c")
    index = json.loads(Path(path, "index.json").read_text())
    edit(index)
    write_index(path, index)
    reader = torchckpt.load_checkpoint(path)
    assert reader.get_variable_to_shape_map() == {"a": torch.Size([2]), "b": torch.Size([3])}
    assert reader.get_variable_to_dtype_map() == {"a": torch.float32, "b": torch.float32}
    for read in (reader.get_tensor, torchckpt.load_checkpoint(path).locate,
                 lambda name: torchckpt.load_state(path)):
        with pytest.raises(CorruptCheckpointError, match=match):
            read("a")
    with pytest.raises(CorruptCheckpointError, match=match):
        torchckpt.Checkpoint(a=torch.zeros(2), b=torch.ones(3)).restore(path)
    assert any(re.search(match, problem) for problem in tools_verify.verify(reader))


def test_a_writers_weight_map_is_checked_without_reading_the_index_again(tmp_path, disk):
    # Over 1,000 tensors the writer puts the map on one line: the inspector skips it, then checks
    # its digest against the text the table encodes to. Another text is read again in full.
    path = torchckpt.Checkpoint(**{f"t{i}": torch.full((2,), float(i)) for i in range(1500)}).write(tmp_path / "c")
    index_reads = lambda: [a for point, a in disk.calls if point == "read_file" and a[0].endswith("index.json")]  # noqa: E731
    reader = torchckpt.load_checkpoint(path)
    assert torch.equal(reader.get_tensor("t7"), torch.full((2,), 7.0)) and len(index_reads()) == 1
    index = json.loads(Path(path, "index.json").read_text())
    Path(path, "index.json").write_bytes(sealed_json(index, lambda text: text.replace(b'"t0": ', b'"t0":  ')))
    reader = torchckpt.load_checkpoint(path)  # the same map in another layout: right, but not as written
    assert torch.equal(reader.get_tensor("t7"), torch.full((2,), 7.0)) and len(index_reads()) == 3


def test_the_inspector_still_needs_a_weight_map(tmp_path):
    path = torchckpt.Checkpoint(a=torch.ones(2)).write(tmp_path / "c")
    index = json.loads(Path(path, "index.json").read_text())
    index.pop("weight_map")
    write_index(path, index)
    with pytest.raises(CorruptCheckpointError, match="'weight_map' is missing") as info:
        torchckpt.load_checkpoint(path)
    assert info.value.path == path


@pytest.mark.parametrize(
    ("data", "expected"),
    [
        (b'{\n "a": 1,\n "weight_map": {"x": "y", "z": "w"},\n "b": 2\n}', b'{\n "a": 1,\n "weight_map": {},\n "b": 2\n}'),
        (b'{\n "weight_map": {"x": "y"}\n}', b'{\n "weight_map": {}\n}'),  # the last member: no comma
        (b'{\n "weight_map": {\n  "x": "y"\n }\n}', None),  # laid out over lines (a small map): parsed
        (b'{\n "weight_map": {"x": "y"', None),  # no line end
        (b'{\n "weight_map": "x",\n "b": 2}', None),  # not an object
        (b'{"a": "\\n \\"weight_map\\": {}"}', None),  # inside a string, escaped: no raw line break there
        (b'{\n "weight_map": {"x": 1} ,\n "b": 2}', None),  # not as the writer lays it out
        (b'{\n "weight_map": {"x": "y"}, "b": {"c": 1},\n "d": 2}', None),  # another member on its line
        (b'{\n "weight_map": {"x\\"}": "y"},\n "b": 2}', None),  # an escape: a brace a string may hide
        (b'{\n "weight_map": {"x": "y"}, "b": [1],\n "d": 2}', None),
    ],
    ids=["middle", "last", "multi-line", "unterminated", "not-an-object", "in-a-string", "other-layout",
         "a-member-after-it", "an-escape", "a-list-after-it"],
)
def test_the_weight_map_is_cut_only_where_the_layout_is_the_writers(data, expected):
    cut, value = format_document.cut_member_value(data, "weight_map", b"{}")
    assert cut == (data if expected is None else expected)
    if expected is None:
        assert value is None
    else:
        assert json.loads(cut) == {**json.loads(data), "weight_map": {}}
        text = json.dumps(json.loads(data)["weight_map"]).encode()
        assert value == xxhash.xxh3_64_intdigest(text) and text in data  # the digest of the value's text


def _nested_map(index: dict, top_level: dict | None) -> bytes:
    """The index with its right map nested in "metadata" at a line's start, and ``top_level`` (None:
    no top-level map) as the top-level one: a forged layout."""
    files = index.pop("weight_map")
    index["metadata"] = {"weight_map": files, **index["metadata"]}  # first: the line it starts is "weight_map"'s
    if top_level is not None:
        index["weight_map"] = top_level
    return sealed_json(index, lambda text: text.replace(b'"metadata": {', b'"metadata": {\n '))


@pytest.mark.parametrize(
    ("forge", "match"),
    [
        (lambda i: _nested_map(i, None), "'weight_map' is missing"),
        (lambda i: _nested_map(i, {}), "weight_map has no entry for 'a'"),  # the cut one is right, the real one empty
        (lambda i: sealed_json(i, lambda text: text + b',\n "weight_map": {}'), "weight_map has no entry for 'a'"),
        (lambda i: sealed_json({**i, "torchckpt": {**i["torchckpt"], "tensors": {
            **i["torchckpt"]["tensors"], "names": ["a", "a"]}}}), "lists it twice"),
    ],
    ids=["nested-only", "nested-and-empty", "a-second-empty-map", "a-name-twice"],
)
def test_a_forged_weight_map_layout_is_refused_by_the_inspector_as_by_a_restore(tmp_path, forge, match):
    # The inspector's cut of the map is trusted only where what it cut was the one top-level map
    # (parsed back as its random placeholder) and names are unique; else it reads the index in full.
    path = torchckpt.Checkpoint(a=torch.ones(2), b=torch.ones(2)).write(tmp_path / "c")
    index = json.loads(Path(path, "index.json").read_text())
    Path(path, "index.json").write_bytes(forge(index))
    for read in (torchckpt.load_checkpoint, lambda p: torchckpt.Checkpoint(a=torch.zeros(2), b=torch.zeros(2)).restore(p)):
        with pytest.raises(CorruptCheckpointError, match=match):
            read(path)


def test_a_second_section_on_the_maps_line_is_read_as_a_restore_reads_it(tmp_path):
    # A forged line '"weight_map": {...}, "torchckpt": A' after a decoy section B: a full parse keeps
    # the last "torchckpt" (A). Cutting to the line's end would have hidden A and shown B's table.
    path = torchckpt.Checkpoint(a=torch.ones(2)).write(tmp_path / "c")
    index = json.loads(Path(path, "index.json").read_text())
    real = index.pop("torchckpt")
    decoy = {**real, "tensors": {**real["tensors"], "shapes": "1,2"}}  # the same bytes, another shape
    files = index.pop("weight_map")
    forged = {**index, "torchckpt": decoy, "weight_map": files}
    line = b'"weight_map": ' + json.dumps(files).encode()
    data = sealed_json(forged, lambda text: text.replace(line, line + b', "torchckpt": ' + json.dumps(real).encode()))
    Path(path, "index.json").write_bytes(data)
    assert torchckpt.load_checkpoint(path).get_variable_to_shape_map() == {"a": torch.Size([2])}  # A's, as restored
    torchckpt.Checkpoint(a=torch.zeros(2)).restore(path).assert_consumed()


def test_a_nested_weight_map_key_before_the_real_one_is_read_as_a_restore_reads_it(tmp_path):
    path = torchckpt.Checkpoint(a=torch.ones(2)).write(tmp_path / "c")
    index = json.loads(Path(path, "index.json").read_text())
    Path(path, "index.json").write_bytes(_nested_map(index, dict(index["weight_map"])))
    on_disk = json.loads(Path(path, "index.json").read_text())["metadata"]  # the nested map, then total_size
    reader = torchckpt.load_checkpoint(path)
    assert reader.get_variable_to_shape_map() == {"a": torch.Size([2])}
    assert reader.index.raw["metadata"] == on_disk  # nothing of it was cut: the index was read in full
    assert torch.equal(reader.get_tensor("a"), torch.ones(2))
    torchckpt.Checkpoint(a=torch.zeros(2)).restore(path).assert_consumed()


@pytest.mark.parametrize("dtypes", [",F32F32", "F32", "F32,F32,F32", "F32F32,"], ids=["empty-first", "one-short",
                                                                                     "one-over", "empty-last"])
def test_a_dtype_column_that_does_not_split_into_its_tensors_is_refused(tmp_path, dtypes):
    path = torchckpt.Checkpoint(a=torch.ones(2), b=torch.ones(2)).write(tmp_path / "c")
    index = json.loads(Path(path, "index.json").read_text())
    index["torchckpt"]["tensors"]["dtypes"] = dtypes
    write_index(path, index)
    for read in (torchckpt.load_checkpoint, lambda p: torchckpt.Checkpoint(a=torch.zeros(2), b=torch.zeros(2)).restore(p)):
        with pytest.raises(CorruptCheckpointError, match="do not all describe 2 tensors|dtype"):
            read(path)


@pytest.mark.parametrize(("change", "found", "message"), [
    (dict(format_version=99), 99, r"uses format version 99, newer than this torchckpt understands \(3\); upgrade"),
    (dict(features=["zstd", "sparse"]), ["sparse", "zstd"], r"uses format features this torchckpt does not know "
                                                            r"\('sparse', 'zstd'\): it was written by a newer"),
], ids=["version", "features"])
def test_a_newer_format_says_upgrade_and_is_not_called_damaged(tmp_path, change, found, message):
    path = torchckpt.Checkpoint(w=torch.ones(2)).write(tmp_path / "c")
    index = json.loads(Path(os.path.join(path, "index.json")).read_text())
    index["torchckpt"].update(change)
    write_index(tmp_path / "c", index)
    for read in (lambda: torchckpt.Checkpoint(w=torch.zeros(2)).restore(path), lambda: torchckpt.load_checkpoint(path)):
        with pytest.raises(torchckpt.UnsupportedFormatError, match=message) as info:
            read()
        assert not isinstance(info.value, CorruptCheckpointError)  # nothing is wrong with it
        assert info.value.found == found and info.value.path == os.path.join(path, "index.json")


@pytest.mark.parametrize("features", ["zstd", [1], {"a": 1}], ids=["str", "list-of-int", "object"])
def test_a_features_list_of_another_type_is_corrupt(tmp_path, features):
    path = torchckpt.Checkpoint(w=torch.ones(2)).write(tmp_path / "c")
    index = json.loads(Path(os.path.join(path, "index.json")).read_text())
    index["torchckpt"]["features"] = features
    write_index(tmp_path / "c", index)
    with pytest.raises(CorruptCheckpointError, match="is invalid: bad features"):
        torchckpt.load_checkpoint(path)


def test_truncated_shard_is_caught_before_any_object_changes(tmp_path, mlp):
    path = torchckpt.Checkpoint(model=mlp, epoch=5).write(tmp_path / "c")
    shard = os.path.join(path, "model-00001-of-00001.safetensors")
    with open(shard, "r+b") as f:
        f.truncate(os.path.getsize(shard) - 4)
    target = torchckpt.Checkpoint(model=torch.nn.Sequential(torch.nn.Linear(4, 8), torch.nn.ReLU(), torch.nn.Linear(8, 3)), epoch=0)
    before = [p.clone() for p in target.model.parameters()]
    with pytest.raises(CorruptCheckpointError, match="truncated") as info:
        target.restore(path)
    assert info.value.path == shard
    assert target.epoch == 0 and all(torch.equal(a, b) for a, b in zip(before, target.model.parameters()))


def test_flipped_byte_fails_the_checksum(tmp_path):
    path = torchckpt.Checkpoint(w=torch.arange(100, dtype=torch.float32)).write(tmp_path / "c")
    shard = os.path.join(path, "model-00001-of-00001.safetensors")
    raw = bytearray(Path(shard).read_bytes())
    raw[-5] ^= 0x01
    Path(shard).write_bytes(bytes(raw))
    with pytest.raises(CorruptCheckpointError, match="fails its checksum"):
        torchckpt.Checkpoint(w=torch.zeros(100)).restore(path)


def test_a_header_from_another_writer_is_validated_in_full_and_restores(tmp_path):
    """The fast path needs the recorded header checksum; any other header is parsed and checked."""
    values = {"a": torch.arange(6.0).reshape(2, 3), "b": torch.tensor([7], dtype=torch.int64)}
    path = torchckpt.Checkpoint(**values).write(tmp_path / "c")
    shard = Path(path, "model-00001-of-00001.safetensors")
    raw = shard.read_bytes()
    n = struct.unpack("<Q", raw[:8])[0]
    header = json.loads(raw[8 : 8 + n])
    data = raw[8 + n :]
    # the same header re-serialized with other spacing, as another tool would: same offsets, new bytes
    body = json.dumps(header, indent=2).encode()
    body += b" " * (-(len(body) + 8) % 8)
    shard.write_bytes(struct.pack("<Q", len(body)) + body + data)
    index = json.loads(Path(path, "index.json").read_text())
    index["torchckpt"]["shards"][0]["size"] = shard.stat().st_size
    write_index(path, index)
    target = {k: torch.zeros_like(v) for k, v in values.items()}
    torchckpt.Checkpoint(**target).read(path).assert_consumed()
    assert all(torch.equal(target[k], v) for k, v in values.items())


def test_an_index_without_header_checksums_still_restores(tmp_path):
    path = torchckpt.Checkpoint(w=torch.arange(3.0)).write(tmp_path / "c")
    index = json.loads(Path(path, "index.json").read_text())
    del index["torchckpt"]["shards"][0]["header_checksum"]
    write_index(path, index)
    w = torch.zeros(3)
    torchckpt.Checkpoint(w=w).read(path).assert_consumed()
    assert torch.equal(w, torch.arange(3.0))
