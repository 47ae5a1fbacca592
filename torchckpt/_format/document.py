"""``index.json`` and the state file as documents: how they are laid out, sealed and parsed.

Both are plain JSON that any tool can read, written in a layout people can read where they look
(the top sections one key per line) and fast where it is big (a table of 20,000 tensors on one
line, streamed in pieces). Both end with a seal, the xxh3-64 of every byte before it, so every
read checks every byte; and both are parsed with a bound on what the parse may cost, since the
bytes are untrusted. Everything here works on bytes and strings; the reading is elsewhere.
"""

from __future__ import annotations

import itertools
import json
import re
from collections.abc import Callable, Iterator
from typing import Any

import xxhash

from torchckpt._format.spec import (
    CHECKSUM_CHARS,
    LAYOUT_MAX_LINES,
    MAX_CONTAINERS_FLOOR,
    MAX_CONTAINERS_PER_BYTE,
    SEAL_KEY,
)
from torchckpt.errors import CorruptCheckpointError


class RawJSON:
    """A JSON value written as the text pieces ``pieces()`` yields, for values too large to build
    as Python objects first (the weight map and tensor table of 20,000 tensors)."""

    def __init__(self, pieces: Callable[[], Iterator[str]]) -> None:
        self.pieces = pieces


def _layout(node: Any, level: int, depth: int) -> Iterator[str]:
    """JSON with the top ``depth`` levels of objects one key per line, everything below compact,
    as text pieces to write one after another.

    Readable where people look (the index's sections) and fast where it is big: an object of more
    than ``LAYOUT_MAX_LINES`` keys is written on one line, and a :class:`RawJSON` value as its
    own pieces.
    """
    if isinstance(node, RawJSON):
        yield from node.pieces()
    elif isinstance(node, dict) and node and level < depth and len(node) <= LAYOUT_MAX_LINES:
        pad = " " * (level + 1)
        separator = "{\n"
        for k, v in node.items():
            yield f"{separator}{pad}{json.dumps(k, ensure_ascii=False)}: "
            yield from _layout(v, level + 1, depth)
            separator = ",\n"
        yield "\n" + " " * level + "}"
    else:
        yield json.dumps(node, ensure_ascii=False, allow_nan=False, separators=(", ", ": "))


_PLAIN_NAME = re.compile(r"[ !#-\[\]-~]*")  # printable ASCII without '"' and '\\': no JSON escaping needed


def json_string(text: str) -> str:
    """``json.dumps(text, ensure_ascii=False)``, without the call for plain names (most of them)."""
    return f'"{text}"' if _PLAIN_NAME.fullmatch(text) else json.dumps(text, ensure_ascii=False)


# -- sealed JSON files ------------------------------------------------------------------------

_SEAL = re.compile(rb',\n "' + SEAL_KEY.encode() + rb'": "([0-9a-f]{16})"\n}\n\Z')
SEAL_BYTES = len(f',\n "{SEAL_KEY}": "{"0" * CHECKSUM_CHARS}"\n}}\n')  # how many bytes the seal ends a file with


def seal_at_end(tail: bytes) -> str | None:
    """The seal a sealed file's last :data:`SEAL_BYTES` bytes (``tail``) hold, unchecked: to tell
    whether the file at a path is still the one read before, without reading it all; None when
    ``tail`` ends with no seal."""
    match = _SEAL.search(tail)
    return None if match is None else match.group(1).decode()


def sealed_pieces(value: dict[str, Any], depth: int = 2) -> Iterator[bytes]:
    """``value`` laid out (its top ``depth`` levels one key per line, see ``_layout``), encoded, with
    a last top-level key ``"checksum"``: the xxh3-64 of every byte before it.

    Why a seal: a flipped bit in a JSON number or string is still valid JSON, and an index whose
    Adam ``lr`` silently became 0.011 would restore "successfully". With the seal, every read
    checks every byte (:func:`unseal`), and the file stays plain JSON that any tool can read.
    """
    hasher = xxhash.xxh3_64()
    separator = "{\n"
    for key, child in value.items():
        for text in itertools.chain((f"{separator} {json.dumps(key, ensure_ascii=False)}: ",), _layout(child, 1, depth)):
            piece = text.encode()
            hasher.update(piece)
            yield piece
        separator = ",\n"
    yield f',\n "{SEAL_KEY}": "{hasher.hexdigest()}"\n}}\n'.encode()


def sealed_bytes(value: dict[str, Any], depth: int = 2) -> bytes:
    """:func:`sealed_pieces` joined."""
    return b"".join(sealed_pieces(value, depth))


def unseal(data: bytes, path: str, what: str) -> str:
    """Check the seal :func:`sealed_pieces` wrote at the end of ``data``, and return it.

    Raises:
        CorruptCheckpointError: there is no seal, or the bytes before it do not hash to it.
    """
    match = _SEAL.search(data, max(0, len(data) - SEAL_BYTES))
    if match is None:
        raise CorruptCheckpointError(
            f"{path} is damaged or not a {what} written by torchckpt: it does not end with its "
            f'"{SEAL_KEY}" entry, so its content cannot be verified.',
            path,
        )
    recorded = match.group(1).decode()
    actual = xxhash.xxh3_64_hexdigest(memoryview(data)[: match.start()])
    if actual != recorded:
        raise CorruptCheckpointError(
            f"{path} fails its checksum (recorded {recorded}, computed {actual}): the {what} is corrupt. "
            "Restore another checkpoint" + (", or delete the state file to have it rebuilt from the checkpoints "
                                            "on disk." if what == "state file" else "."),
            path,
        )
    return recorded


def cut_member_value(data: bytes, key: str, placeholder: bytes) -> tuple[bytes, int | None]:
    """``data`` with the value of its top-level member ``key`` replaced by ``placeholder``, and the
    xxh3-64 of that value's bytes, where it is an object on one line, as :func:`sealed_pieces` lays
    out a big one; else ``(data, None)``.

    For a reader that needs the member later or not at all (the lazy inspector and the Hugging
    Face ``weight_map``: half of a big index's bytes and most of its parsing): it then costs a
    search, not a parse. The marker, a line break then one space then the key, starts a line of
    the layout (a JSON string holds no raw line break), but forged bytes can put it elsewhere (a
    nested key at a line's start, the key twice): the caller parses the rest, and trusts the cut
    only where the parsed top-level ``key`` is exactly its ``placeholder`` (an object of a random
    key, which no forger can write in advance). The digest tells later whether the value was the
    text a writer would encode, without keeping a copy of it.
    """
    marker = b'\n "' + key.encode() + b'": {'
    start = data.find(marker)
    if start < 0:
        return data, None
    start += len(marker) - 1
    end = data.find(b"\n", start)
    if end < 0:
        return data, None
    end -= data[end - 1 : end] == b","
    if end - start < 2 or data[end - 1 : end] != b"}" or not _one_flat_object(data, start, end):
        return data, None
    view = memoryview(data)  # slices of a view: the rest is copied once, by the join
    return b"".join((view[:start], placeholder, view[end:])), xxhash.xxh3_64_intdigest(view[start:end])


def _one_flat_object(data: bytes, start: int, end: int) -> bool:
    """Whether ``data[start:end]`` can only be one object whose values hold no object or array:
    its one ``{`` and one ``}`` are its ends, and there is no ``[``, ``]`` or backslash (so no
    escape in a string, and no ``}`` that a string hides). Then nothing on the line outside the
    member's value is cut with it: a forged line such as ``"weight_map": {...}, "torchckpt": {...}``
    is read in full. A writer's map of plain names always passes; names with braces, brackets or
    escapes only cost a full parse."""
    inside = start + 1, end - 1  # searches (memchr), not counts: a 20,000-name map is a megabyte
    return all(data.find(c, *inside) < 0 for c in (b"{", b"}", b"[", b"]", b"\\"))


def parse_json(data: bytes, path: str, what: str) -> Any:
    """Decode JSON from bytes, every failure a :class:`CorruptCheckpointError` naming ``path``.

    Refuses, before parsing, a file whose brackets would cost more memory than
    :data:`~torchckpt._format.spec.MAX_CONTAINERS_PER_BYTE` allows (see docs/format.md, "Limits"),
    and any nesting deeper than the recursion limit.
    """
    containers = data.count(b"{") + data.count(b"[")
    if containers > MAX_CONTAINERS_PER_BYTE * len(data) + MAX_CONTAINERS_FLOOR:
        raise CorruptCheckpointError(
            f"{path} holds {containers} JSON objects and arrays in {len(data)} bytes, far more than any {what} "
            "torchckpt writes; refusing to parse it (it would take many times its size in memory).",
            path,
        )
    try:
        return json.loads(data)
    except RecursionError:
        raise CorruptCheckpointError(f"{path} nests JSON too deeply to be a {what} torchckpt wrote.", path) from None
    except (UnicodeDecodeError, ValueError) as e:  # JSONDecodeError, and ints over Python's digit limit
        raise CorruptCheckpointError(f"{path} is not valid JSON, so not a {what} torchckpt wrote: {e}.", path) from e
    except MemoryError:
        raise CorruptCheckpointError(f"{path} is too large to parse as a {what}.", path) from None
