"""Any fsspec URL as a :class:`~torchckpt._storage.base.Storage`: object stores (S3, GCS, Azure), ``memory://``, ``file://``.

Why the commit is the index written last, with create-if-absent: an object store has no rename
(``mv`` is a copy and a delete, object by object) but makes each object visible atomically once
its upload completes, and lists consistently. So a checkpoint's shards are uploaded straight
into its final prefix, under names tagged with this save's own id (so that no other writer's
upload can land on them: see ``_storage.remote_commit``, the protocol's stage, deletion and clean-up),
their sizes are checked in one listing, and ``index.json`` is created
last, with ``If-None-Match: *`` where the store has it: a directory without its index is never a
checkpoint, and two writers can never both commit one name. Replacing a checkpoint deletes its
index first (the old checkpoint stops being committed), then its shards, then writes the new
one: a reader sees the old checkpoint, none, or the new one, never a mix. Retention marks the
deletion (``.torchckpt-deleting``), deletes the index, then the shards the index named.

A crashed upload leaves shards and a ``.torchckpt-pending-<tag>`` marker without an index:
readers ignore it, and the next manager removes it, judging the whole directory from one
recursive listing (see :meth:`FsspecStorage.remove_leftovers`).

Uploads stream through bounded buffers (on S3, multipart uploads with parts in parallel), reads
are ranged and parallel (``remote_read``), and nothing calls ``os.sync()`` (DCP's
``FsspecWriter`` does, machine wide, for every file).
"""

from __future__ import annotations

import contextlib
import threading
import warnings
from collections.abc import Iterable
from typing import Any

import xxhash

from torchckpt._format.spec import DELETING_FILE, INDEX_FILE
from torchckpt._paths import join, name_of, parent_of
from torchckpt._storage import lease as storage_lease
from torchckpt._storage import remote_commit as storage_remote_commit
from torchckpt._storage import sdk_errors, upload
from torchckpt._storage.base import ABSENT, ConflictError, LinkTarget, Output, oversize_file
from torchckpt._storage.remote_commit import RemoteStage
from torchckpt._storage.remote_read import READ_PART_MAX, READ_PART_MIN, RemoteSource, S3Source
from torchckpt.errors import CheckpointDeletedError, CheckpointError, CheckpointReadError, CorruptCheckpointError

_OBJECT_STORES = {"s3", "s3a", "gs", "gcs", "az", "abfs", "abfss", "adl"}
_memory_guard = threading.Lock()  # memory:// is per process: its compare-and-write is atomic under this
_warned: set[str] = set()


def fsspec_storage(url: str, storage_options: dict[str, Any] | None, install: str) -> FsspecStorage:
    """The storage for ``url``, its filesystem made by fsspec with ``storage_options``.

    Args:
        install: what to install when fsspec or the scheme's package is missing (the registry's
            table says it: ``pip install "torchckpt[s3]"``).

    Raises:
        CheckpointError: fsspec or the scheme's filesystem package is not installed, or the
            options are not ones the filesystem takes.
    """
    protocol = url.split("://", 1)[0].lower()
    try:
        import fsspec
    except ImportError:
        raise CheckpointError(f"{url} is a URL, and URLs need fsspec: {install}.") from None
    try:
        fs = fsspec.filesystem(protocol, **(storage_options or {}))
    except ImportError as e:
        raise CheckpointError(f"Cannot open {url}: its filesystem package is not installed ({e}). {install}.") from e
    except ValueError as e:
        raise CheckpointError(f"Cannot open {url}: {e}.") from e
    except TypeError as e:
        raise CheckpointError(f"Cannot open {url}: bad storage_options ({e}).") from e
    return FsspecStorage(fs, protocol)


def _token_of(data: bytes) -> str:
    return "xxh3:" + xxhash.xxh3_64_hexdigest(data)


class FsspecStorage:
    """An fsspec filesystem; paths are the caller's URLs (``s3://bucket/run/ckpt-3``).

    Args:
        fs: the filesystem, made by fsspec for ``protocol``.
        protocol: the URL scheme (``s3``, ``memory``, ...).
        part_bytes: the size of one part of an S3 multipart upload (S3's smallest is 5 MiB); an
            object that would need more than ``max_parts`` of them goes up in larger parts.
        max_parts: the most parts of one multipart upload (S3's limit, 10,000).
        read_part_min, read_part_max: the bounds of one ranged read (see ``remote_read``).
        lease_secs: how long this storage's claim on a directory lives unrenewed (see ``lease``).
        warned: the schemes already warned about for their unconditional writes (by default the
            process's own: the warning is given once per process).
    """


    def __init__(self, fs: Any, protocol: str, *, part_bytes: int = upload.PART_BYTES, max_parts: int = upload.MAX_PARTS,
                 read_part_min: int = READ_PART_MIN, read_part_max: int = READ_PART_MAX,
                 lease_secs: float = storage_lease.LEASE_SECS, warned: set[str] | None = None) -> None:
        self.protocol = protocol
        # missing credentials, an unreachable endpoint, a refused request: OSErrors, never "absent"
        self.fs = sdk_errors.Translating(fs, object_store=protocol in _OBJECT_STORES)
        self.part_bytes = part_bytes
        self.max_parts = max_parts
        self.read_part_min, self.read_part_max = read_part_min, read_part_max
        self.lease_secs = lease_secs
        self.warned = _warned if warned is None else warned
        self.is_s3 = callable(getattr(fs, "call_s3", None)) and callable(getattr(fs, "split_path", None))
        self.is_memory = protocol == "memory"
        self.is_object_store = protocol in _OBJECT_STORES

    # -- reading ---------------------------------------------------------------------------

    def _info(self, path: str) -> dict[str, Any]:
        self.fs.invalidate_cache(path)
        info: dict[str, Any] = self.fs.info(path)
        return info

    def _file_info(self, path: str, what: str) -> dict[str, Any]:
        info = self._info(path)  # FileNotFoundError when absent
        if info.get("type") != "file":
            raise CorruptCheckpointError(f"{what} {path} is {info.get('type') or 'not a file'}, not a file; "
                                         "refusing to read it.", path)
        return info

    def read_file(self, path: str, limit: int, what: str) -> bytes:
        return self.read_versioned(path, limit, what)[0]

    def read_versioned(self, path: str, limit: int, what: str) -> tuple[bytes, Any]:
        try:
            info = self._file_info(path, what)
        except FileNotFoundError:
            if name_of(path) == INDEX_FILE:
                left = self.list_names(parent_of(path))
                if DELETING_FILE in left or not left:  # being deleted now, or deleted since it was found
                    raise self.vanished(path) from None
            raise
        size = int(info.get("size") or 0)
        if size > limit:
            raise oversize_file(what, path, size, limit)
        try:
            data = bytes(self.fs.cat_file(path)) if size else b""
        except FileNotFoundError:
            raise self.vanished(path) from None  # there at the HEAD, gone at the GET: deleted meanwhile
        if len(data) > limit:
            raise CorruptCheckpointError(f"{what} {path} grew past the {limit}-byte limit while it was read.", path)
        etag = info.get("ETag") or info.get("etag")
        return data, (etag if self.is_s3 and etag and len(data) == size else _token_of(data))

    def open(self, path: str, what: str) -> RemoteSource:
        size = int(self._file_info(path, what).get("size") or 0)
        if self.is_s3 and callable(getattr(self.fs, "_call_s3", None)):
            return S3Source(self.fs, path, size, self, part_min=self.read_part_min, part_max=self.read_part_max)
        return RemoteSource(self.fs, path, size, self, part_min=self.read_part_min, part_max=self.read_part_max)

    def is_file(self, path: str) -> bool:
        try:
            return self._info(path).get("type") == "file"
        except CheckpointReadError:  # no credentials, no connection: not an answer
            raise
        except (OSError, ValueError):
            return False

    def is_dir(self, path: str) -> bool:
        self.fs.invalidate_cache(path)
        try:
            return bool(self.fs.isdir(path))
        except CheckpointReadError:
            raise
        except (OSError, ValueError):
            return False

    follows_to_dir = is_dir

    def link_target(self, path: str) -> LinkTarget | None:
        return None  # an object store has no links

    def exists(self, path: str) -> bool:
        try:
            self._info(path)
            return True
        except CheckpointReadError:
            raise
        except (OSError, ValueError):
            return False

    def mtime(self, path: str) -> float:
        try:
            info = self._info(path)
        except CheckpointReadError:
            raise
        except (OSError, ValueError):
            return -1.0
        for key in ("LastModified", "mtime", "created", "updated", "last_modified"):
            value = info.get(key)
            stamp = getattr(value, "timestamp", None)
            if callable(stamp):
                return float(stamp())
            if isinstance(value, (int, float)):
                return float(value)
        return -1.0

    def list_names(self, directory: str) -> list[str]:
        self.fs.invalidate_cache(directory)
        try:
            entries = self.fs.ls(directory, detail=False)
        except (FileNotFoundError, NotADirectoryError):
            return []
        own = self.fs._strip_protocol(directory).rstrip("/")
        return [name_of(str(e)) for e in entries if self.fs._strip_protocol(str(e)).rstrip("/") != own]

    def list_entries(self, directory: str) -> dict[str, bool]:
        self.fs.invalidate_cache(directory)
        try:
            entries = self.fs.ls(directory, detail=True)
        except (FileNotFoundError, NotADirectoryError):
            return {}
        own = self.fs._strip_protocol(directory).rstrip("/")
        return {name_of(str(e["name"])): e.get("type") == "file" for e in entries
                if self.fs._strip_protocol(str(e["name"])).rstrip("/") != own}

    def committed_names(self, directory: str) -> list[str]:
        return sorted(name for name, files in self.tree(directory).items() if INDEX_FILE in files)

    def tree(self, directory: str) -> dict[str, set[str]]:
        """Each prefix directly inside ``directory`` -> the names of the files directly inside it,
        from one recursive listing (on S3, one paginated ``ListObjectsV2`` without a delimiter,
        instead of requests for every name: junk prefixes cost nothing per name)."""
        self.fs.invalidate_cache(directory)
        try:
            found = self.fs.find(directory, detail=True)
        except (FileNotFoundError, NotADirectoryError):
            return {}
        base = self.fs._strip_protocol(directory).rstrip("/") + "/"
        tree: dict[str, set[str]] = {}
        for full, info in found.items():
            full = self.fs._strip_protocol(str(full))
            if not full.startswith(base):
                continue
            parts = full[len(base):].split("/")
            if len(parts) < 2 or not parts[0]:
                continue
            files = tree.setdefault(parts[0], set())
            if len(parts) == 2 and info.get("type", "file") == "file":
                files.add(parts[1])
        return tree

    def sizes(self, directory: str) -> dict[str, int]:
        """Every file directly in ``directory`` -> its size, from one listing."""
        self.fs.invalidate_cache(directory)
        try:
            entries = self.fs.ls(directory, detail=True)
        except FileNotFoundError:
            return {}
        return {name_of(str(e["name"])): int(e.get("size") or 0) for e in entries if e.get("type") == "file"}

    def real_path(self, path: str) -> str:
        return path

    def describe_write_failure(self, path: str, error: OSError) -> str:
        where = f" ({error.filename})" if error.filename and error.filename != path else ""
        return f"Cannot write checkpoint {path}{where}: {error.strerror or error}."

    # -- writing ---------------------------------------------------------------------------

    def join_stage(self, final: str, stage_path: str) -> RemoteStage:
        return RemoteStage(self, stage_path, False, joined=True)

    def stage(self, final: str, replace: bool) -> RemoteStage:
        return RemoteStage(self, final, replace)  # the object-store commit protocol: see ``_storage.remote_commit``

    def output(self, path: str, size: int) -> Output:
        if self.is_s3 and size > self.part_bytes:
            return upload.S3Upload(self.fs, path, upload.part_bytes_for(size, self.part_bytes, self.max_parts))
        return upload.StreamOutput(self.fs, path)

    def copy(self, source: str, target: str) -> bool:
        """Copy the object ``source`` to ``target`` on the store itself (no byte passes through this
        process where the store can copy); False, with nothing at ``target``, when it cannot."""
        try:
            self.fs.copy(source, target)
        except (OSError, ValueError, NotImplementedError):  # gone, refused, or no copy here
            self.remove_quietly(target)
            return False
        finally:
            self.fs.invalidate_cache(target)
        return True

    def stamp(self, path: str) -> None:
        del path  # a reused shard is a new object each save, and its ETag depends on how it was copied
        return None

    def is_shared(self, path: str) -> bool:
        del path  # a reused shard is the store's copy, an object of its own
        return False

    def put(self, path: str, data: bytes) -> None:
        self.fs.pipe_file(path, data)
        self.fs.invalidate_cache(path)

    def create_new(self, path: str, data: bytes) -> None:
        """Create ``path`` holding ``data``; FileExistsError when it exists (atomically where the
        store can: S3's ``If-None-Match``, ``memory://``, a local file's ``O_EXCL``)."""
        try:
            with self.fs.open(path, "xb") as f:
                f.write(data)
        except (ValueError, NotImplementedError, TypeError):  # no exclusive mode: check, then write
            self._warn_unconditional()
            if self.exists(path):
                raise FileExistsError(17, "File exists", path) from None
            self.put(path, data)
        self.fs.invalidate_cache(path)

    def make_dirs(self, path: str) -> None:
        if not self.is_object_store:  # object stores have no directories; a bucket is made by its owner
            self.fs.makedirs(path, exist_ok=True)

    def replace_file(self, path: str, data: bytes, token: Any) -> Any:
        if token is ABSENT:
            try:
                self.create_new(path, data)
            except FileExistsError:
                raise ConflictError(f"{path} was created by another writer meanwhile.") from None
            return self._token_after_write(path, data)
        if self.is_s3 and isinstance(token, str) and not token.startswith("xxh3:"):
            bucket, key, _ = self.fs.split_path(path)
            try:
                out = self.fs.call_s3("put_object", Bucket=bucket, Key=key, Body=data, IfMatch=token)
            except (OSError, FileNotFoundError) as e:
                if "pre-condition" in str(e) or "precondition" in str(e).lower() or isinstance(e, FileNotFoundError):
                    raise ConflictError(f"{path} was replaced by another writer meanwhile.") from None
                raise
            self.fs.invalidate_cache(path)
            return out.get("ETag") or _token_of(data)
        with _memory_guard if self.is_memory else _NO_GUARD:
            if token is not None:
                if not self.is_memory:
                    self._warn_unconditional()
                try:
                    current = self.read_versioned(path, 2**31, "File")[1]
                except FileNotFoundError:
                    current = None
                if current != token:
                    raise ConflictError(f"{path} was replaced by another writer meanwhile.")
            self.put(path, data)
        return _token_of(data)

    def _token_after_write(self, path: str, data: bytes) -> Any:
        """The token of the file just written with ``data``: its ETag on S3 (one HEAD, not a read
        of the bytes back), else their digest."""
        if self.is_s3:
            etag = self._info(path).get("ETag")
            if etag:
                return etag
        return _token_of(data)

    def _warn_unconditional(self) -> None:
        if self.protocol not in self.warned:
            self.warned.add(self.protocol)
            warnings.warn(
                f"{self.protocol}:// cannot create or replace a file conditionally through fsspec here, so a "
                "second writer to one directory is detected only between its reads and writes, not atomically.",
                stacklevel=4,
            )

    def remove_quietly(self, path: str) -> None:
        with contextlib.suppress(FileNotFoundError):
            self.fs.rm_file(path)
        self.fs.invalidate_cache(path)

    def remove_names(self, directory: str, names: Iterable[str]) -> None:
        """Delete the files ``names`` directly inside ``directory`` (in batches; absent ones are fine)."""
        paths = sorted({join(directory, n) for n in names})
        if paths:
            try:
                self.fs.rm(paths)
            except FileNotFoundError:  # one was gone: some filesystems stop at it, so the rest one by one
                for path in paths:
                    with contextlib.suppress(FileNotFoundError):
                        self.fs.rm(path)
        self.fs.invalidate_cache(directory)

    def vanished(self, path: str) -> CheckpointError | FileNotFoundError:
        """The error for an object of a checkpoint that was there a moment ago and is gone now:
        the checkpoint was deleted meanwhile (a manager's retention, usually), unless it is still
        committed and not being deleted (then a shard is missing from it: it is corrupt)."""
        directory = parent_of(path)
        if name_of(path) != INDEX_FILE and self.exists(join(directory, INDEX_FILE)) \
                and not self.exists(join(directory, DELETING_FILE)):
            return CorruptCheckpointError(
                f"Shard {path} vanished while it was being read, yet {directory} is still committed: the checkpoint "
                "is damaged (something other than torchckpt deleted it). Run `torchckpt verify` on it.", path)
        return CheckpointDeletedError(
            f"Checkpoint {directory} was deleted while it was being read (a manager's max_to_keep, usually; "
            f"{name_of(path)} went away between two requests); read a newer checkpoint.", directory)

    def delete_checkpoint(self, path: str) -> None:
        storage_remote_commit.delete_checkpoint(self, path)

    def drop_if_empty(self, path: str) -> None:
        """Remove the directory ``path`` once nothing is in it (object stores have no directories)."""
        if not self.is_object_store and not self.list_names(path):
            with contextlib.suppress(OSError):
                self.fs.rmdir(path)
            self.fs.invalidate_cache(path)

    def remove_leftovers(self, directory: str, prefix: str) -> list[str]:
        return storage_remote_commit.remove_leftovers(self, directory, prefix)

    # -- the claim: a lease object ----------------------------------------------------------

    def session_of(self, path: str) -> str | None:
        return storage_lease.session_for(self, parent_of(path))

    def fence(self, path: str) -> None:
        """Raise before writing ``path`` if this process's lease on its directory was lost, or
        its term ran out unrenewed (a process paused past it) and it cannot be renewed."""
        storage_lease.fence(self, parent_of(path))

    def claim(self, directory: str) -> None:
        storage_lease.claim(self, directory)

    def holds(self, directory: str) -> bool:
        return storage_lease.holds(self, directory)

    def release(self, directory: str) -> None:
        storage_lease.release(self, directory)

    def key(self, path: str) -> str:
        """A canonical name of ``path`` for this process's bookkeeping."""
        return f"{self.protocol}://{self.fs._strip_protocol(path).rstrip('/')}"


class _NoGuard:
    def __enter__(self) -> None:
        return None

    def __exit__(self, *exc: object) -> None:
        return None


_NO_GUARD = _NoGuard()
