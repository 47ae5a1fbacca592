"""Shared fixtures: small models, an optimizer that has state (after one step), and storage doubles."""

from __future__ import annotations

import contextlib
import json
import math
import os

import pytest
import torch
import xxhash
from hypothesis import settings

from torchckpt._format import spec
from torchckpt._storage import registry

from .distributed import (  # noqa: F401
    job_dir,
    killed,
    killed_after_commit,
    killed_async,
    s3_run,
    world2,
    world3,
    world4,
    world4_from_2,
)
from .doubles import LocalDouble, RemoteDouble

# CI runs the property tests with fixed seeds: a run passes or fails for the code alone, never for
# the examples it happened to draw. Runs elsewhere draw new examples each time, and find new cases.
settings.register_profile("ci", derandomize=True)
if os.environ.get("CI"):
    settings.load_profile("ci")


def read_index(directory: str | os.PathLike[str]) -> dict:
    """A checkpoint's ``index.json``, parsed (its seal is left in)."""
    with open(os.path.join(directory, "index.json"), "rb") as f:
        return json.loads(f.read())


def sealed_json(value: dict, expand=lambda text: text) -> bytes:
    """``value`` as a sealed file's bytes (ASCII-escaped, so a forged lone surrogate can be written),
    with a valid seal: what a forger would write. ``expand`` may rewrite the text before it is sealed."""
    pieces, separator = [], "{\n"
    for key, child in value.items():
        if key != spec.SEAL_KEY:
            pieces.append(f"{separator} {json.dumps(key)}: {json.dumps(child)}")
            separator = ",\n"
    body = expand("".join(pieces).encode())
    return body + f',\n "{spec.SEAL_KEY}": "{xxhash.xxh3_64_hexdigest(body)}"\n}}\n'.encode()


def write_index(directory: str | os.PathLike[str], index: dict) -> None:
    """Write ``index`` as the checkpoint's ``index.json`` with a valid seal, as a forger would:
    the tests that use it check what the reader does beyond the seal."""
    with open(os.path.join(directory, "index.json"), "wb") as f:
        f.write(sealed_json(index))


def assert_same(got, expected, *, exact_types: bool = True) -> None:
    """Equal nested state: dict keys in the same order, list and tuple items in turn, tensors of one
    dtype, shape and device bit for bit, NaN where NaN was, equal plain values. With ``exact_types``
    every value and dict key also has the expected type (a tuple stays a tuple, an int key an int)."""
    if exact_types:
        assert type(got) is type(expected), (type(got), type(expected))
    if isinstance(got, torch.Tensor):
        assert got.dtype == expected.dtype and got.shape == expected.shape and got.device == expected.device
        assert torch.equal(got.reshape(-1).view(torch.uint8), expected.reshape(-1).view(torch.uint8))
    elif isinstance(got, dict):
        assert list(got) == list(expected)
        if exact_types:
            assert all(type(a) is type(b) for a, b in zip(got, expected))
        for k in got:
            assert_same(got[k], expected[k], exact_types=exact_types)
    elif isinstance(got, (list, tuple)):
        assert len(got) == len(expected)
        for a, b in zip(got, expected):
            assert_same(a, b, exact_types=exact_types)
    elif isinstance(got, float) and isinstance(expected, float) and math.isnan(expected):
        assert math.isnan(got)
    else:
        assert got == expected


def make_mlp(seed: int = 0) -> torch.nn.Module:
    torch.manual_seed(seed)
    return torch.nn.Sequential(torch.nn.Linear(4, 8), torch.nn.ReLU(), torch.nn.Linear(8, 3))


def train_step(model: torch.nn.Module, opt: torch.optim.Optimizer, step: int) -> None:
    g = torch.Generator().manual_seed(1000 + step)
    x, y = torch.randn(6, 4, generator=g), torch.randn(6, 3, generator=g)
    opt.zero_grad()
    torch.nn.functional.mse_loss(model(x), y).backward()
    opt.step()


class TiedLM(torch.nn.Module):
    """An embedding whose weight is also the output head's (tied weights), plus a norm."""

    def __init__(self, vocab: int = 10, dim: int = 4) -> None:
        super().__init__()
        self.embed = torch.nn.Embedding(vocab, dim)
        self.head = torch.nn.Linear(dim, vocab, bias=False)
        self.head.weight = self.embed.weight
        self.norm = torch.nn.LayerNorm(dim)


@pytest.fixture
def mlp() -> torch.nn.Module:
    return make_mlp(0)


@pytest.fixture
def stepped_optimizer(mlp: torch.nn.Module) -> torch.optim.Optimizer:
    """An Adam optimizer after one step(): its state is populated, so restore tests prove something."""
    opt = torch.optim.Adam(mlp.parameters(), lr=0.01)
    train_step(mlp, opt, 0)
    return opt


def pytest_collection_modifyitems(config: pytest.Config, items: list[pytest.Item]) -> None:
    if torch.cuda.is_available():
        return
    skip = pytest.mark.skip(reason="needs CUDA")
    for item in items:
        if "gpu" in item.keywords:
            item.add_marker(skip)


def read_header_file(path, name):
    """``_load.opened.read_header`` of a local file (the parser reads from an open source)."""
    from torchckpt._load import opened
    from torchckpt._storage.local import LOCAL

    source = LOCAL.open(str(path), "Shard")
    try:
        return opened.read_header(source, name)
    finally:
        source.close()


# -- storage doubles (tests/doubles.py) ------------------------------------------------------------


@pytest.fixture
def install():
    """``install(prefix, storage)``: every face is served ``storage`` for the paths under ``prefix``
    until the test ends; returns ``storage``."""
    with contextlib.ExitStack() as stack:
        yield lambda prefix, storage: stack.enter_context(registry.installed(str(prefix), storage))


@pytest.fixture
def disk(tmp_path, install) -> LocalDouble:
    """The local disk under ``tmp_path`` as a double a test can arm (``disk.fail("stage", error)``)."""
    return install(tmp_path, LocalDouble())


# -- torch.distributed -------------------------------------------------------------------------


@pytest.fixture
def gloo_world_of_one():
    """torch.distributed initialised with gloo on one rank (127.0.0.1, a free port), then destroyed."""
    import datetime
    import socket

    import torch.distributed as dist

    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    dist.init_process_group("gloo", rank=0, world_size=1, init_method=f"tcp://127.0.0.1:{port}",
                            timeout=datetime.timedelta(seconds=30))
    try:
        yield
    finally:
        dist.destroy_process_group()


# -- object stores: memory:// in this process, and a real S3 API (moto's server on loopback) ------


@pytest.fixture(scope="session")
def s3_endpoint():
    """A moto S3 server on 127.0.0.1 (a free port) for the session; skipped without moto and s3fs."""
    pytest.importorskip("s3fs")
    server_module = pytest.importorskip("moto.server")
    import logging
    import socket

    logging.getLogger("werkzeug").setLevel(logging.ERROR)
    saved = {k: os.environ.get(k) for k in S3_ENV}
    os.environ.update(S3_ENV)
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    server = server_module.ThreadedMotoServer(ip_address="127.0.0.1", port=port, verbose=False)
    server.start()
    try:
        yield f"http://127.0.0.1:{port}"
    finally:
        server.stop()
        for key, value in saved.items():
            if value is None:
                os.environ.pop(key, None)
            else:
                os.environ[key] = value


# Dummy credentials, and never a probe of the EC2 metadata address (nothing but loopback is reachable).
S3_ENV = {"AWS_ACCESS_KEY_ID": "testing", "AWS_SECRET_ACCESS_KEY": "testing", "AWS_EC2_METADATA_DISABLED": "true",
          "AWS_DEFAULT_REGION": "us-east-1"}


class Remote:
    """A fresh location on an object store: ``url`` (a directory), ``options`` to pass as
    ``storage_options``, and ``storage``: the double every face is served for ``url``."""

    def __init__(self, kind: str, url: str, options: dict | None, install) -> None:
        self.kind, self.url, self.options = kind, url, options
        self._install = install
        self.doubles: list[RemoteDouble] = []
        self.storage = self.install()

    def install(self, **tuning) -> RemoteDouble:
        """A new double of the store for ``url``, with ``FsspecStorage``'s ``tuning`` (``lease_secs=0.6``),
        served from now on; it is ``storage`` too."""
        self.storage = self._install(self.url, RemoteDouble(self.fs, self.kind, **tuning))
        self.doubles.append(self.storage)
        return self.storage

    def at(self, *names: str) -> str:
        return "/".join([self.url, *names])

    @property
    def fs(self):
        import fsspec

        return fsspec.filesystem(self.kind, **(self.options or {}))

    def names(self, *parts: str) -> list[str]:
        """What is directly under ``url/parts``, by name (listing caches dropped)."""
        self.fs.invalidate_cache()
        try:
            return sorted(p.rstrip("/").rsplit("/", 1)[-1] for p in self.fs.ls(self.at(*parts), detail=False))
        except FileNotFoundError:
            return []


@pytest.fixture(params=["memory", "s3"])
def remote(request, install):
    """Each test runs on ``memory://`` (in process) and on the moto server (a real S3 API)."""
    import uuid

    pytest.importorskip("fsspec")
    name = f"t{uuid.uuid4().hex[:12]}"
    if request.param == "memory":
        loc = Remote("memory", f"memory://{name}/run", None, install)
    else:
        endpoint = request.getfixturevalue("s3_endpoint")
        loc = Remote("s3", f"s3://{name}/run", {"client_kwargs": {"endpoint_url": endpoint}}, install)
        loc.fs.mkdir(name)  # the bucket
    try:
        yield loc
    finally:
        for double in loc.doubles:  # a manager a test did not close: its lease stops being renewed
            for directory in {args[0] for args in double.called("claim")}:
                double.release(directory)
        if loc.kind == "memory" and loc.fs.exists(f"memory://{name}"):
            loc.fs.rm(f"memory://{name}", recursive=True)
