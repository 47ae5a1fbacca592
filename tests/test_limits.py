"""A writer never commits what a reader refuses: files past the readers' size limits fail the save.

Readers bound ``index.json`` (256 MiB) and each shard's header (100,000,000 bytes) to bound the
memory a hostile file can take. A save whose index or header would be bigger fails with
``CheckpointTooLargeError`` before anything is committed: otherwise a manager would commit a
checkpoint nobody can restore and, keeping the last one, delete the good one before it.
"""

from __future__ import annotations

import os

import pytest
import torch

import torchckpt
from torchckpt._format import spec

from .jobs.limits import LONG_NAMES, NAME_CHARS, long_named_state
from .test_distributed import ok


def test_a_save_whose_index_would_be_too_large_fails_and_keeps_the_checkpoint_before_it(tmp_path):
    ckpt = torchckpt.Checkpoint(model={"w": torch.ones(3)})
    mgr = torchckpt.CheckpointManager(ckpt, tmp_path, max_to_keep=1, max_shard_size=16 * 300)
    first = mgr.save()
    ckpt.model = long_named_state()
    with pytest.raises(torchckpt.CheckpointTooLargeError, match=r"index\.json would be [0-9,]+ bytes, over the "
                       r"268,435,456 bytes every reader accepts, so nobody could restore it\. It lists 1,400 stored "
                       r"tensors.*Nothing was committed\. Store fewer tensors") as caught:
        mgr.save()
    error = caught.value
    assert isinstance(error, ValueError)
    assert (error.what, error.limit, error.path) == ("index.json", spec.MAX_INDEX_SIZE, str(tmp_path / "ckpt-2"))
    assert 2 * LONG_NAMES * NAME_CHARS < error.size < 3 * LONG_NAMES * NAME_CHARS  # each name twice, and the rest
    assert mgr.checkpoints == [first] and mgr.latest_checkpoint == first
    assert sorted(os.listdir(tmp_path)) == [".torchckpt.lock", "checkpoints.json", "ckpt-1"]  # no stage left
    ckpt.model = {"w": torch.full((3,), 2.0)}
    second = mgr.save()
    assert os.path.basename(second) == "ckpt-2"  # the failed save took no number
    ckpt.model = {"w": torch.zeros(3)}
    mgr.restore_or_initialize(strict=True)
    assert ckpt.model["w"].tolist() == [2.0, 2.0, 2.0]
    mgr.close()


def test_a_shard_header_too_large_fails_the_save_with_the_fix(tmp_path):
    state = {f"{i:04d}" + "n" * NAME_CHARS: torch.zeros(1) for i in range(1001)}  # 100 MB of names in one shard
    ckpt = torchckpt.Checkpoint(model=state)
    with pytest.raises(torchckpt.CheckpointTooLargeError, match=r"A shard header would be 100,[0-9,]+ bytes, over "
                       r"safetensors' limit of 100,000,000; use a smaller max_shard_size") as caught:
        ckpt.write(tmp_path / "c")
    assert (caught.value.what, caught.value.limit) == ("shard header", spec.MAX_HEADER_SIZE)
    assert caught.value.size > spec.MAX_HEADER_SIZE
    assert not (tmp_path / "c").exists() and os.listdir(tmp_path) == []
    path = ckpt.write(tmp_path / "c", max_shard_size=2000)  # shards of 500 tensors: the fix the message gives
    assert len(torchckpt.load_checkpoint(path).get_variable_to_shape_map()) == 1001


def test_on_2_ranks_every_rank_raises_the_same_typed_error_and_nothing_is_committed(world2):
    found = ok(world2, "index_too_large", 2)
    for result in found:
        error = result["too_large"]
        assert error != "saved"
        assert error["type"] == "CheckpointTooLargeError"
        assert error["message"].startswith("Saving ") and "failed on rank 0: Cannot save " in error["message"]
        assert (error["what"], error["limit"], error["ranks"]) == ("index.json", spec.MAX_INDEX_SIZE, [0])
        assert error["size"] > spec.MAX_INDEX_SIZE
        assert result["first"] == "ckpt-1" and result["kept"] == ["ckpt-1"]
        assert result["next"] == "ckpt-2" and result["restored"] == [2.0, 2.0, 2.0]
    assert found[0]["too_large"] == found[1]["too_large"]  # the same error on every rank
    assert found[0]["entries"] == [".torchckpt.lock", "checkpoints.json", "ckpt-1"]  # no stage, no checkpoint


def test_a_state_of_very_many_empty_containers_fails_before_the_commit_and_one_just_under_reads_back(tmp_path):
    ckpt = torchckpt.Checkpoint(rows=[[] for _ in range(300_000)])  # 4 bytes a container, readers allow 1 per 16
    with pytest.raises(torchckpt.CheckpointTooLargeError, match=r"index\.json would hold 300,0[0-9]{2} JSON objects "
                       r"and arrays in [0-9,]+ bytes, more than the 27[0-9,]+ a reader parses in a file of that size.*"
                       r"Nothing was committed\. The state holds very many small containers") as caught:
        ckpt.write(tmp_path / "c")
    error = caught.value
    assert error.what == "index.json containers" and error.size > error.limit > 200_000
    assert os.listdir(tmp_path) == []
    ckpt.rows = [[] for _ in range(250_000)]
    ckpt.write(tmp_path / "c")
    restored = torchckpt.Checkpoint(rows=None)
    restored.read(tmp_path / "c")
    assert restored.rows == ckpt.rows
