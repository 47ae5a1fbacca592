"""Shared fixtures: small models and an optimizer that has state (after one step)."""

from __future__ import annotations

import json
import os

import pytest
import torch
import xxhash

from torchckpt import _format


def read_index(directory: str | os.PathLike[str]) -> dict:
    """A checkpoint's ``index.json``, parsed (its seal is left in)."""
    with open(os.path.join(directory, "index.json"), "rb") as f:
        return json.loads(f.read())


def sealed_json(value: dict, expand=lambda text: text) -> bytes:
    """``value`` as a sealed file's bytes (ASCII-escaped, so a forged lone surrogate can be written),
    with a valid seal: what a forger would write. ``expand`` may rewrite the text before it is sealed."""
    pieces, separator = [], "{\n"
    for key, child in value.items():
        if key != _format.SEAL_KEY:
            pieces.append(f"{separator} {json.dumps(key)}: {json.dumps(child)}")
            separator = ",\n"
    body = expand("".join(pieces).encode())
    return body + f',\n "{_format.SEAL_KEY}": "{xxhash.xxh3_64_hexdigest(body)}"\n}}\n'.encode()


def write_index(directory: str | os.PathLike[str], index: dict) -> None:
    """Write ``index`` as the checkpoint's ``index.json`` with a valid seal, as a forger would:
    the tests that use it check what the reader does beyond the seal."""
    with open(os.path.join(directory, "index.json"), "wb") as f:
        f.write(sealed_json(index))


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
    """``_format.read_header`` of a local file (the parser reads from an open source)."""
    from torchckpt import _format
    from torchckpt._local import LOCAL

    source = LOCAL.open(str(path), "Shard")
    try:
        return _format.read_header(source, name)
    finally:
        source.close()
