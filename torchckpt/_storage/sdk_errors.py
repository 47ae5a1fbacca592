"""A cloud SDK's errors as the ``OSError`` kinds the rest of the package already handles.

fsspec's filesystems turn most of their SDK's failures into ``OSError`` (s3fs: a refused request
is a ``PermissionError``, a missing key a ``FileNotFoundError``), but not all: missing credentials
(botocore's ``NoCredentialsError``) and an endpoint that cannot be reached
(``EndpointConnectionError``) come out as they are. Those are causes that lie with this process or
machine, not with a checkpoint, so they become a :class:`CheckpointReadError` (an ``OSError``
with ``EACCES`` or ``ECONNREFUSED``) saying what to set: never "not found" (the storage's
predicates let it through), never "damage" (which a manager would record and fall back past); a
save reports it as a ``CheckpointWriteError``. On an object store a refused request (wrong
credentials, a policy that does not allow it: s3fs's ``PermissionError``) is such a cause too,
and is never taken for an absent object. Files a filesystem opens (a small object's upload)
raise through the same translation as its own methods.

gcsfs and adlfs are read the same way, by their SDKs' class names (nothing is imported for it):
google-auth's errors (no credentials, a token that cannot be refreshed), gcsfs's ``HttpError``
(401/403 a refusal, any other status the store's failure), and its 403, which gcsfs raises as a
plain ``OSError("Forbidden: ...")`` that the storage's predicates would otherwise take for "no
such object"; azure-core's ``ClientAuthenticationError`` and its ``ServiceRequestError``/
``ServiceResponseError``; and aiohttp's lost connections (an ``OSError`` too), on which both ride.
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


def store_error(error: BaseException, object_store: bool = True, path: str | None = None) -> CheckpointReadError | None:
    """``error`` as a :class:`CheckpointReadError` when it is botocore's missing credentials, a
    connection that failed, or (``object_store``) a request the store refused (to ``path``, where
    the error does not say); None for anything else (raised as it is)."""
    if isinstance(error, CheckpointReadError):
        return None
    if isinstance(error, PermissionError) and object_store:
        path = error.filename or path
        return CheckpointReadError(
            f"The object store refused access{f' to {path}' if path else ''} ({error.strerror or error}): the "
            "credentials in use may not read or write it. Check them (for S3: AWS_ACCESS_KEY_ID and "
            "AWS_SECRET_ACCESS_KEY, or AWS_PROFILE, or storage_options={'key': ..., 'secret': ...}; for a public "
            "bucket, {'anon': True}).",
            path, errno.EACCES)
    cloud = _cloud_error(error, object_store, path)
    if cloud is not None:
        return cloud
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


def _classes(error: BaseException) -> set[tuple[str, str]]:
    """(module, name) of ``error``'s class and every class it derives from."""
    return {(c.__module__, c.__name__) for c in type(error).__mro__}


_GOOGLE_AUTH = ("google.auth.exceptions", "GoogleAuthError")
_GCSFS_HTTP = ("gcsfs.retry", "HttpError")
_AZURE_AUTH = ("azure.core.exceptions", "ClientAuthenticationError")
_AZURE_CONNECTION = {("azure.core.exceptions", "ServiceRequestError"), ("azure.core.exceptions", "ServiceResponseError")}
_AIOHTTP_CONNECTION = {("aiohttp.client_exceptions", "ClientConnectionError")}


def _cloud_error(error: BaseException, object_store: bool, path: str | None) -> CheckpointReadError | None:
    """Google Cloud Storage's and Azure's errors (see the module) as :func:`store_error` gives S3's."""
    classes = _classes(error)
    if _GOOGLE_AUTH in classes:
        return CheckpointReadError(
            f"No usable Google Cloud credentials ({_first_line(error)}). Set GOOGLE_APPLICATION_CREDENTIALS to a service account "
            "key file, or run `gcloud auth application-default login`, or pass storage_options={'token': ...} "
            "({'token': 'anon'} for a public bucket).", path, errno.EACCES)
    status = getattr(error, "code", None) if _GCSFS_HTTP in classes else None
    forbidden = object_store and type(error) is OSError and error.errno is None and str(error).startswith("Forbidden: ")
    if forbidden or _AZURE_AUTH in classes or status in (401, 403):  # (``forbidden``: gcsfs's 403)
        return CheckpointReadError(
            f"The object store refused access{f' to {path}' if path else ''} ({_first_line(error)}): the credentials "
            "in use may not read or write it. Check them (Google Cloud Storage: GOOGLE_APPLICATION_CREDENTIALS or "
            "storage_options={'token': ...}; Azure: AZURE_STORAGE_CONNECTION_STRING, or storage_options="
            "{'account_name': ..., 'account_key': ...} or {'sas_token': ...}).", path, errno.EACCES)
    if _GCSFS_HTTP in classes:  # a status gcsfs gave up retrying (a 5xx, 429): the store's failure, not the checkpoint's
        return CheckpointReadError(
            f"The object store failed the request{f' for {path}' if path else ''} (HTTP {status}: "
            f"{_first_line(error)}); nothing here is damaged. Try again later.", path, errno.EIO)
    if classes & (_AZURE_CONNECTION | _AIOHTTP_CONNECTION):
        return CheckpointReadError(
            f"Cannot reach the object store ({_first_line(error)}). Check the endpoint (the account or bucket name, "
            "storage_options) and the network.", path, errno.ECONNREFUSED)
    return None


def _first_line(error: BaseException) -> str:
    """The first line of ``error``'s message (gcsfs appends the whole response body)."""
    text = str(error).strip()
    return text.splitlines()[0] if text else type(error).__name__


@contextlib.contextmanager
def translating(object_store: bool = True, path: str | None = None) -> Iterator[None]:
    """Around calls into a filesystem (on ``path``): :func:`store_error` of what they raise, chained to it."""
    try:
        yield
    except Exception as e:
        translated = store_error(e, object_store, path)
        if translated is None:
            raise
        raise translated from e


class Translating:
    """A filesystem (or a file it opened) whose methods raise :func:`store_error` of its SDK's
    errors; what ``open`` returns is translated too (its other attributes, the filesystem's event
    loop for one, pass through as they are). ``object_store``: a refused request is the store's
    refusal (credentials, policy), not a file's permissions."""

    def __init__(self, fs: Any, object_store: bool = True) -> None:
        self.wrapped = fs
        self.object_store = object_store

    def __getattr__(self, name: str) -> Any:
        if name in ("wrapped", "object_store"):  # not set yet (a copy or an unpickling in progress): no recursion
            raise AttributeError(name)
        value = getattr(self.wrapped, name)
        if not callable(value):
            return value
        object_store = self.object_store

        @functools.wraps(value)
        def call(*args: Any, **kwargs: Any) -> Any:
            with translating(object_store, args[0] if args and isinstance(args[0], str) else None):
                result = value(*args, **kwargs)
            return Translating(result, object_store) if name == "open" else result

        return call

    def __enter__(self) -> Translating:  # a file opened by ``open``
        with translating(self.object_store):
            self.wrapped.__enter__()
        return self

    def __exit__(self, *exc: Any) -> Any:  # closing a file uploads it
        with translating(self.object_store):
            return self.wrapped.__exit__(*exc)
