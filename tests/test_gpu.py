"""CUDA paths: tensors are written from host copies and restored to their device. Skipped without CUDA."""

from __future__ import annotations

import pytest
import torch

import torchckpt

pytestmark = pytest.mark.gpu


def test_cuda_module_and_optimizer_roundtrip(tmp_path):
    torch.manual_seed(0)
    model = torch.nn.Sequential(torch.nn.Linear(64, 64), torch.nn.GELU(), torch.nn.Linear(64, 8)).cuda()
    opt = torch.optim.AdamW(model.parameters(), lr=1e-3)
    model(torch.randn(4, 64, device="cuda")).sum().backward()
    opt.step()
    path = torchckpt.Checkpoint(model=model, opt=opt, rng=torchckpt.RNGState()).write(tmp_path / "c")
    torch.manual_seed(1)
    fresh = torch.nn.Sequential(torch.nn.Linear(64, 64), torch.nn.GELU(), torch.nn.Linear(64, 8)).cuda()
    fresh_opt = torch.optim.AdamW(fresh.parameters(), lr=1e-3)
    torchckpt.Checkpoint(model=fresh, opt=fresh_opt, rng=torchckpt.RNGState()).read(path).assert_consumed()
    for a, b in zip(model.parameters(), fresh.parameters()):
        assert b.device.type == "cuda" and torch.equal(a, b)
    state = fresh_opt.state_dict()["state"][0]["exp_avg"]
    assert state.device.type == "cuda" and torch.equal(state, opt.state_dict()["state"][0]["exp_avg"])


def test_cuda_tensor_larger_than_the_staging_chunk_and_non_contiguous(tmp_path):
    big = torch.randn(4097, 4096, device="cuda")  # 16 KiB over the 64 MiB staging chunk: a full chunk, then a partial one
    strided = big.t()
    path = torchckpt.Checkpoint(big=big, strided=strided, half=big.half()).write(tmp_path / "c")
    dest = {"big": torch.zeros_like(big), "strided": torch.zeros(4097, 4096, device="cuda").t(),
            "half": torch.zeros_like(big.half())}
    torchckpt.Checkpoint(**dest).read(path).assert_consumed()
    assert torch.equal(dest["big"], big) and torch.equal(dest["strided"], strided) and torch.equal(dest["half"], big.half())


def test_cuda_rng_state_restores(tmp_path):
    rng = torchckpt.RNGState()
    torch.cuda.manual_seed_all(3)
    path = torchckpt.Checkpoint(rng=rng).write(tmp_path / "c")
    expected = torch.rand(4, device="cuda")
    torch.cuda.manual_seed_all(9)
    torchckpt.Checkpoint(rng=torchckpt.RNGState()).read(path).assert_consumed()
    assert torch.equal(torch.rand(4, device="cuda"), expected)


def test_cuda_async_snapshot_is_pinned_and_holds_values_as_of_save(tmp_path):
    """Async saves copy CUDA state into pinned host memory and return; the values are those of
    save() time though the model changes right after, on the first save and on a reused layout."""
    torch.manual_seed(0)
    model = torch.nn.Linear(256, 256).cuda()
    host = torch.arange(10.0)
    step = torch.tensor(1, device="cuda")
    ckpt = torchckpt.Checkpoint(model=model, host=host, step=step)
    expected = []
    for i in range(3):
        expected.append({k: v.detach().cpu().clone() for k, v in model.state_dict().items()})
        ckpt.write(tmp_path / f"c{i}", async_save=True)
        with torch.no_grad():
            for p in model.parameters():
                p.add_(1.0)
        host.add_(1)
        step.add_(1)
        ckpt.wait_until_finished()
    assert ckpt._writer._staging.flat.is_pinned()
    for i, values in enumerate(expected):
        reader = torchckpt.load_checkpoint(tmp_path / f"c{i}")
        for k, v in values.items():
            assert torch.equal(reader.get_tensor(f"model/{k}"), v)
        assert torch.equal(reader.get_tensor("host"), torch.arange(10.0) + i)
        assert int(reader.get_tensor("step")) == 1 + i
    fresh = torch.nn.Linear(256, 256).cuda()
    torchckpt.Checkpoint(model=fresh, host=torch.zeros(10), step=torch.tensor(0, device="cuda")).read(
        tmp_path / "c2").assert_consumed()
    assert torch.equal(fresh.weight.cpu(), expected[2]["weight"])


@pytest.mark.skipif(torch.cuda.device_count() < 2, reason="needs two GPUs")
def test_async_snapshot_waits_for_every_gpu_not_just_the_current_one(tmp_path):
    """State on a second GPU (model parallel in one process): save() must wait for that GPU's
    copy too, or training's next step overwrites values the writer has not read yet."""
    assert torch.cuda.current_device() == 0
    big = torch.full((64, 2**20), 1.0, device="cuda:1")  # 256 MiB: long enough to still be copying
    small = torch.full((4,), 1.0, device="cuda:0")
    ckpt = torchckpt.Checkpoint(big=big, small=small)
    for i in range(2):  # the first save lays out the staging memory, the second reuses it
        ckpt.write(tmp_path / f"c{i}", async_save=True)
        big.add_(1)
        small.add_(1)
        ckpt.wait_until_finished()
        reader = torchckpt.load_checkpoint(tmp_path / f"c{i}")
        assert torch.equal(reader.get_tensor("big"), torch.full((64, 2**20), float(i + 1)))
        assert torch.equal(reader.get_tensor("small"), torch.full((4,), float(i + 1)))
