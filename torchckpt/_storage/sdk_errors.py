"""A cloud SDK's errors as the ``OSError`` kinds the rest of the package already handles.

fsspec's filesystems turn most of their SDK's failures into ``OSError`` (s3fs: a refused request
is a ``PermissionError``, a missing key a ``FileNotFoundError``), but not all: missing credentials
(botocore's ``NoCredentialsError``) and an endpoint that cannot be reached
(``EndpointConnectionError``) come out as they are. Those are causes that lie with this process or
machine, not with a checkpoint, so they become a :class:`CheckpointReadError` (an ``OSError``
with ``EACCES`` or ``ECONNREFUSED``) saying what to set: never "not found" (the storage's
predicates let it through), never "damage" (which a manager would record and fall back past); a
save reports it as a ``CheckpointWriteError``.
"""

from __future__ import annotations

import contextlib
import errno
import functools
from collections.abc import Iterator
from typing import Any

from torchckpt.errors import CheckpointReadError

_CREDENTIALS = ("NoCredentialsError", "PartialCredentialsError", "CredentialRetrievalError",
                "NoAuthTokenError", "UnauthorizedSSOTokenError", "TokenRetrievalError")


def store_error(error: BaseException) -> CheckpointReadError | None:
    """``error`` as a :class:`CheckpointReadError` when it is botocore's missing credentials or a
    connection that failed; None for anything else (raised as it is)."""
    if isinstance(error, OSError):
        return None
    try:
        from botocore import exceptions as boto
    except ImportError:
        return None
    if not isinstance(error, boto.BotoCoreError):
        return None
    if type(error).__name__ in _CREDENTIALS:
        return CheckpointReadError(
            f"No usable S3 credentials ({error}). Set AWS_ACCESS_KEY_ID and AWS_SECRET_ACCESS_KEY (or AWS_PROFILE), "
            "or pass storage_options={'key': ..., 'secret': ...}, or {'anon': True} for a public bucket.",
            None, errno.EACCES)
    if isinstance(error, (boto.ConnectionError, boto.HTTPClientError)):  # unreachable, or stopped answering
        return CheckpointReadError(
            f"Cannot reach the object store ({error}). Check the endpoint (AWS_ENDPOINT_URL, or storage_options="
            "{'client_kwargs': {'endpoint_url': ...}}) and the network.", None, errno.ECONNREFUSED)
    return None


@contextlib.contextmanager
def translating() -> Iterator[None]:
    """Around calls into a filesystem: :func:`store_error` of what they raise, chained to it."""
    try:
        yield
    except Exception as e:
        translated = store_error(e)
        if translated is None:
            raise
        raise translated from e


class Translating:
    """A filesystem whose methods raise :func:`store_error` of its SDK's errors (its other attributes,
    its event loop for one, pass through as they are)."""

    def __init__(self, fs: Any) -> None:
        self.wrapped = fs

    def __getattr__(self, name: str) -> Any:
        if name == "wrapped":  # not set yet (a copy or an unpickling in progress): no recursion
            raise AttributeError(name)
        value = getattr(self.wrapped, name)
        if not callable(value):
            return value

        @functools.wraps(value)
        def call(*args: Any, **kwargs: Any) -> Any:
            with translating():
                return value(*args, **kwargs)

        return call
