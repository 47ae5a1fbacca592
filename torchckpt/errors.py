"""The exception hierarchy of torchckpt.

Every error a user can meet derives from :class:`CheckpointError` and also from the built-in
exception a caller would naturally catch (``FileNotFoundError``, ``ValueError``, ``TypeError``,
``AssertionError``), so ``except FileNotFoundError`` keeps working for code written against
``torch.load``. Each error carries the data it talks about as attributes (``.path``, ``.key``,
``.report``) so programs need not parse messages.
"""

from __future__ import annotations

import errno
import os
import reprlib
from typing import Any

__all__ = [
    "CheckpointError",
    "CheckpointDeletedError",
    "CheckpointNotFoundError",
    "CheckpointReadError",
    "CheckpointTooLargeError",
    "CheckpointWriteError",
    "CorruptCheckpointError",
    "UnsupportedFormatError",
    "UnsupportedStateError",
    "RankTimeoutError",
    "RenameConflictError",
    "RestoreMismatchError",
    "UnsafePickleError",
    "VariableNotFoundError",
]


class CheckpointError(Exception):
    """Base class of every torchckpt error.

    Example:
        >>> try:
        ...     raise CheckpointError("boom")
        ... except CheckpointError as e:
        ...     str(e)
        'boom'
    """


class CheckpointNotFoundError(CheckpointError, FileNotFoundError):
    """No committed checkpoint exists where one was asked for.

    Attributes:
        path: the path that was looked at.
    """

    def __init__(self, message: str, path: str | os.PathLike[str] | None = None) -> None:
        super().__init__(message)
        self.path = os.fspath(path) if path is not None else None

    def __str__(self) -> str:
        return str(self.args[0])


class CheckpointDeletedError(CheckpointNotFoundError):
    """The checkpoint was deleted (usually by a manager's retention) while it was being opened.

    A reader that follows a training run (``checkpoints_iterator``) can meet this when the run's
    ``max_to_keep`` deletes the checkpoint it is about to read: read the newer one instead. Once a
    restore has opened the shards it reads, a deletion no longer affects it: one process opens
    every shard at once, right after the index; a rank of a collective restore opens each shard it
    reads at the end of its planning.

    A restore, and a :class:`CheckpointReader`'s reads of tensors, also raise it when a save under
    the same number (an explicit ``checkpoint_number``) replaced the checkpoint after its index was
    read: the shards opened then belong to the new checkpoint, and neither is damaged. Read it again.

    Attributes:
        path: the checkpoint directory.
    """


class CorruptCheckpointError(CheckpointError, ValueError):
    """A checkpoint's files are malformed, truncated, tampered with or inconsistent.

    Attributes:
        path: the file or directory at fault.
    """

    def __init__(self, message: str, path: str | os.PathLike[str] | None = None) -> None:
        super().__init__(message)
        self.path = os.fspath(path) if path is not None else None


class UnsupportedFormatError(CheckpointError, ValueError):
    """A checkpoint's index or a directory's state file was written by a newer torchckpt, in a
    format version (or with a format feature) this version does not read. Nothing is wrong with
    the file, so it is never called damaged: a manager neither falls back past such a checkpoint
    nor marks it damaged, nor rebuilds and overwrites such a state file. Upgrade torchckpt.

    Attributes:
        path: the file at fault.
        found: the version (an int) or the features (a list of str) the file declares that this
            version does not know.
    """

    def __init__(self, message: str, path: str | os.PathLike[str], found: Any) -> None:
        super().__init__(message)
        self.path = os.fspath(path)
        self.found = found


class CheckpointWriteError(CheckpointError, OSError):
    """A checkpoint could not be written: a read-only file system, a full disk, a parent path that
    is a file. Nothing was committed, and the previous checkpoints are intact; except when only the
    directory's state file could not be written once the checkpoint was committed: the message
    then says that the checkpoint is committed (the next save, or a new manager, records it).

    It is an ``OSError`` too, with ``errno`` and ``filename`` (the file the system refused), so
    ``except OSError`` and ``e.errno == errno.ENOSPC`` keep working.

    Attributes:
        path: the checkpoint path the caller gave.
    """

    def __init__(self, message: str, path: str, error: OSError) -> None:
        OSError.__init__(self, error.errno, error.strerror or message, error.filename or path)
        self.message = message
        self.path = path

    def __str__(self) -> str:
        return self.message


class CheckpointReadError(CheckpointError, OSError):
    """A checkpoint's file could not be opened or read for a reason that lies with this process or
    machine, not with the checkpoint: too many open files, out of memory, no permission, a network
    file system that timed out. The checkpoint is not treated as damaged (a manager's
    ``restore_or_initialize`` raises this instead of falling back to an older checkpoint, and
    records nothing): remove the cause and restore again.

    It is an ``OSError`` too, with ``errno`` and ``filename`` (the file the system refused).

    Attributes:
        path: that file.
    """

    def __init__(self, message: str, path: str | None, code: int | None = None) -> None:
        OSError.__init__(self, code, message, path)
        self.message = message
        self.path = path

    def __str__(self) -> str:
        return self.message

    def __reduce__(self) -> tuple[Any, ...]:  # OSError's own would pass (errno, strerror, filename) back in
        return type(self), (self.message, self.path, self.errno)


class UnsupportedStateError(CheckpointError, TypeError):
    """A value cannot be stored as a safetensors tensor or typed JSON (nothing is pickled).

    Attributes:
        key: the full ``/``-joined key path of the value, e.g. ``"cfg/inner/fn"``.
        value_type: the type of the offending value.
    """

    def __init__(self, message: str, key: str, value_type: type | None = None) -> None:
        super().__init__(message)
        self.key = key
        self.value_type = value_type


class CheckpointTooLargeError(CheckpointError, ValueError):
    """A save would write a file bigger than every reader accepts (``index.json``: 256 MiB; a shard's
    safetensors header: 100,000,000 bytes), so the checkpoint could never be restored. Nothing was
    committed, and the previous checkpoints are intact.

    Why refuse rather than write it: readers bound these files to bound the memory a hostile one
    can take (see ``docs/format.md``, "Limits"). Each stored tensor's name is in the index two to
    four times, so a job that shards every tensor over very many ranks (each chunk is a stored
    tensor), or keys with very long names, can reach the limit.

    Attributes:
        path: the checkpoint being saved (None where the file was being encoded on its own).
        what: the file that would be too large (``"index.json"``, ``"shard header"``), or
            ``"index.json containers"``: an index holding more JSON objects and arrays than a
            reader parses for its size (very many empty containers in the state).
        size: the bytes it would take (for ``"index.json containers"``, how many it would hold).
        limit: the most a reader accepts, in the same unit.
    """

    def __init__(self, message: str, path: str | None, what: str, size: int, limit: int) -> None:
        super().__init__(message)
        self.path = path
        self.what = what
        self.size = size
        self.limit = limit


class RankTimeoutError(CheckpointError):
    """Some ranks did not reach an exchange in time (dead, hung, or not making the same call).

    Attributes:
        ranks: the ranks (of the group) whose part never arrived.
    """

    def __init__(self, what: str, ranks: list[int], timeout_secs: float,
                 consequence: str = "Nothing was committed.", *, message: str | None = None) -> None:
        """``message`` replaces the one made of the others: the same error relayed by another rank."""
        names = ", ".join(map(str, ranks)) if len(ranks) < 20 else f"{len(ranks)} ranks"
        super().__init__(message or (
            f"Rank{'s' if len(ranks) > 1 else ''} {names} did not reach {what} within {timeout_secs:g} s (a rank "
            f"died, hangs, or is not making the same call). {consequence} Pass timeout_secs= to wait longer."
        ))
        self.ranks = ranks


class RestoreMismatchError(CheckpointError, AssertionError):
    """A restore assertion failed; ``.report`` holds the full :class:`MismatchReport`.

    Attributes:
        report: what was missing, unexpected or mismatched.
    """

    def __init__(self, message: str, report: Any) -> None:  # a torchckpt.MismatchReport
        super().__init__(message)
        self.report = report


class RenameConflictError(CheckpointError, ValueError):
    """A rename that cannot be applied: two checkpoint keys given one object key, or a value moved
    where the tree has no room for it (under a plain value, in or out of a list). Raised while the
    restore is planned, before any object changes. On several ranks every rank raises it, with
    the same message.

    Attributes:
        key: the object key (after the rename) the conflict is at.
        checkpoint_keys: the checkpoint keys involved, sorted.
    """

    def __init__(self, message: str, key: str, checkpoint_keys: list[str]) -> None:
        super().__init__(message)
        self.key = key
        self.checkpoint_keys = sorted(checkpoint_keys)


class UnsafePickleError(CheckpointError, ValueError):
    """A pickle needs more than tensors and plain values to be read: torchckpt never unpickles it.

    Attributes:
        path: the file refused.
        global_name: the global it asked for (``"posix.system"``, ``"__main__.Color"``), or None
            when torch refused it for another reason.
    """

    def __init__(self, message: str, path: str, global_name: str | None) -> None:
        super().__init__(message)
        self.path = path
        self.global_name = global_name


def format_keys(keys: Any, limit: int = 10) -> str:
    """Sorted, capped, comma-separated keys: ``a, b, c ... and 37 more``."""
    items = sorted(str(k) for k in keys)
    shown = ", ".join(items[:limit])
    if len(items) > limit:
        shown += f" ... and {len(items) - limit} more"
    return shown


def short_repr(value: Any, limit: int = 80) -> str:
    """``repr(value)`` cut to ``limit`` characters: a value from an untrusted file, in a message.

    Bounded work whatever the value: a pickle's memo lets a few hundred bytes make nested tuples
    whose full repr has 2**k parts, so containers are shown a few levels and items deep
    (``reprlib``), text only up to the limit, and an int too long to print by its size."""
    if isinstance(value, (str, bytes)):
        text = repr(value[: limit + 1])
    elif type(value) is int and value.bit_length() > 1024:  # repr of a 4,300-digit int raises
        text = f"<an int of {value.bit_length()} bits>"
    elif isinstance(value, (tuple, list, dict, set, frozenset)):
        text = _BRIEF.repr(value)
    else:
        text = repr(value)
    return text if len(text) <= limit else text[: limit - 3] + "..."


_BRIEF = reprlib.Repr()
_BRIEF.maxlevel = 3
_BRIEF.maxtuple = _BRIEF.maxlist = _BRIEF.maxdict = _BRIEF.maxset = _BRIEF.maxfrozenset = 8
_BRIEF.maxstring = _BRIEF.maxother = 80
_BRIEF.maxlong = 300


def printable(text: str) -> str:
    """``text`` with each character a terminal would act on (an escape sequence's ESC, a line break,
    a carriage return, any other control or format character) written as its Python escape: a name
    from an untrusted file, shown on one line as it is stored, never recolouring or clearing the
    screen or forging a line of output."""
    if text.isprintable():
        return text
    return "".join(c if c.isprintable() else c.encode("unicode_escape").decode("ascii") for c in text)


def a_or_an(word: str) -> str:
    """``"an optimizer"``, ``"a module"``: the word with its indefinite article."""
    return f"{'an' if word[:1].lower() in 'aeiou' else 'a'} {word}"


def plural(count: int, noun: str) -> str:
    """``"1 tensor"``, ``"3 tensors"``."""
    return f"{count} {noun}{'' if count == 1 else 's'}"


class VariableNotFoundError(CheckpointError, KeyError):
    """A tensor name is not in the checkpoint.

    Attributes:
        name: the name asked for.
        suggestions: close names that do exist ("Did you mean ...?").
    """

    def __init__(self, message: str, name: str, suggestions: list[str] | None = None) -> None:
        super().__init__(message)
        self.name = name
        self.suggestions = suggestions or []

    def __str__(self) -> str:
        return str(self.args[0])


# -- the one wording of each integrity error ------------------------------------------------------


def checksum_mismatch(name: str, path: str, recorded: int | str, read: int) -> str:
    """A tensor's bytes do not hash to the checksum its index recorded."""
    recorded_hex = recorded if isinstance(recorded, str) else f"{recorded:016x}"
    return f"Tensor {name!r} in {path} fails its checksum (recorded {recorded_hex}, read {read:016x}): the shard is corrupt."


def shard_size_mismatch(path: str, size: int, recorded: int, index_file: str) -> str:
    """A shard's size is not the one its index recorded."""
    return f"Shard {path} is {size} bytes but {index_file} records {recorded}; it was truncated or replaced."


def shard_missing(path: str, index_file: str | None = None) -> str:
    """A shard is not there (one that ``index_file`` lists, where an index lists it)."""
    listed = f" listed in {index_file}" if index_file else ""
    return f"Shard {path}{listed} is missing."


def unreadable(path: str, error: OSError, action: str = "read",
               what: str = "shard") -> CorruptCheckpointError | CheckpointReadError:
    """The error for a file of a checkpoint (``what``) the system would not ``action`` (open, read):
    a :class:`CheckpointReadError` when the cause lies with this process or machine (out of file
    descriptors or memory, no permission, a network that failed), which says nothing about the
    checkpoint; else a :class:`CorruptCheckpointError` (an I/O error of the disk: this copy cannot
    be read, and a resume falls back to the checkpoint before it)."""
    if isinstance(error, CheckpointReadError):  # already classified (a lazy open, under a read)
        return error
    reason = error.strerror or str(error) or type(error).__name__
    message = f"Cannot {action} {what} {path}: {reason}."
    if not _is_local_cause(error):
        return CorruptCheckpointError(message, path)
    hint = _HINTS.get(error.errno or 0, "")
    if not hint and isinstance(error, PermissionError):
        hint = _HINTS[errno.EACCES]
    return CheckpointReadError(f"{message} {hint}The checkpoint is not treated as damaged: remove the cause and "
                               "restore again.", path, error.errno)


def _is_local_cause(error: OSError) -> bool:
    return error.errno in _LOCAL_CAUSES or isinstance(
        error, (PermissionError, TimeoutError, ConnectionError, InterruptedError, BlockingIOError))


_LOCAL_CAUSES = frozenset(getattr(errno, name) for name in (
    "EMFILE", "ENFILE", "ENOMEM", "ENOBUFS", "EACCES", "EPERM", "EAGAIN", "EINTR", "ETIMEDOUT", "ENOLCK",
    "ECONNRESET", "ECONNREFUSED", "ECONNABORTED", "ENETDOWN", "ENETUNREACH", "EHOSTUNREACH", "ENOTCONN", "ESTALE",
) if hasattr(errno, name))
_HINTS = {
    errno.EMFILE: "This process has as many files open as it may: raise its limit (`ulimit -n`, or its hard "
                  "limit), or close files it holds elsewhere. ",
    errno.ENFILE: "The system's table of open files is full: close files elsewhere, or raise fs.file-max. ",
    errno.EACCES: "This process may not read it: check the file's permissions and owner. ",
    errno.ESTALE: "A network file system's handle to it went stale: the file was deleted or replaced on the "
                  "server (by another client's retention, or a save under the same number), or the server "
                  "restarted; restore again (a newer checkpoint, if this one is gone). ",
}


PARTLY_RESTORED = " Objects may be partly restored; restore another checkpoint, and run `torchckpt verify` on this one."
RESTORED_ON_THIS_RANK = ("This rank had already restored its own part, so its objects are partly restored: restore "
                         "again on every rank (or start from initial values) before training on.")


class DamagedCheckpointWarning(UserWarning):
    """A checkpoint was found damaged and a restore fell back to the one before it.

    Attributes:
        path: the damaged checkpoint.
        reason: what was wrong with it.
        fallback: the checkpoint restored instead (None while none was found yet).
    """

    def __init__(self, path: str, reason: str, fallback: str | None) -> None:
        then = f"restoring {fallback} instead" if fallback else "no older checkpoint is left to restore"
        super().__init__(f"{path} is damaged, so it was not used: {reason.rstrip('.')}. {then.capitalize()}.")
        self.path = path
        self.reason = reason
        self.fallback = fallback
