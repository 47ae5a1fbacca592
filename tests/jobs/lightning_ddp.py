"""A Lightning fit under DDP on 2 CPU processes, checkpointed by ``TorchckptCheckpointIO`` and by
Lightning's default ``CheckpointIO``, each resumed with ``ckpt_path="last"`` (``tests/test_lightning.py``).

Run as one rank of a gloo job on 127.0.0.1 with ``python -m tests.jobs.lightning_ddp DIR``
(``RANK``, ``LOCAL_RANK``, ``WORLD_SIZE``, ``MASTER_ADDR``, ``MASTER_PORT`` set, so Lightning
starts no process of its own). Each rank runs, for each plugin, 2 epochs with
``ModelCheckpoint(save_top_k=2, save_last=True)`` into ``DIR/<plugin>``, then a new ``Trainer``
resumed from ``last`` to 3 epochs, and writes the final weights and optimizer state to
``DIR/<plugin>-rank<r>.safetensors`` and what else it saw to ``.json``; an error is written to
``DIR/error-rank<r>.txt`` instead. Lightning saves and removes checkpoints on rank 0 alone, so a
save that waited for the other rank would never end: the test's timeout would tell.
"""

from __future__ import annotations

import datetime
import json
import os
import sys
import traceback
import warnings
from pathlib import Path
from typing import Any

import lightning.pytorch as pl
import safetensors.torch
import torch
from lightning.pytorch.callbacks import ModelCheckpoint
from lightning.pytorch.plugins.io import TorchCheckpointIO
from lightning.pytorch.strategies import DDPStrategy

from torchckpt.integrations.lightning import TorchckptCheckpointIO

WORLD = 2
PLUGINS = {"torchckpt": TorchckptCheckpointIO, "default": TorchCheckpointIO}


class Regressor(pl.LightningModule):
    """Three inputs to one output, with Adam (optimizer state to compare)."""

    def __init__(self, hidden: int = 4) -> None:
        super().__init__()
        self.save_hyperparameters()
        self.net = torch.nn.Sequential(torch.nn.Linear(3, hidden), torch.nn.Tanh(), torch.nn.Linear(hidden, 1))

    def training_step(self, batch: Any, batch_idx: int) -> torch.Tensor:
        x, y = batch
        return torch.nn.functional.mse_loss(self.net(x), y)

    def validation_step(self, batch: Any, batch_idx: int) -> None:
        x, y = batch
        self.log("val_loss", torch.nn.functional.mse_loss(self.net(x), y), sync_dist=True)

    def configure_optimizers(self) -> torch.optim.Optimizer:
        return torch.optim.Adam(self.parameters(), lr=0.05)


def loaders() -> tuple[torch.utils.data.DataLoader[Any], torch.utils.data.DataLoader[Any]]:
    """16 shuffled training points (Lightning gives each rank 8 through a DistributedSampler) and 8
    validation points, in batches of 4."""
    x = torch.randn(24, 3, generator=torch.Generator().manual_seed(0))
    data = torch.utils.data.TensorDataset(x, x.sum(1, keepdim=True).sin())
    train = torch.utils.data.DataLoader(torch.utils.data.Subset(data, range(16)), batch_size=4, shuffle=True)
    return train, torch.utils.data.DataLoader(torch.utils.data.Subset(data, range(16, 24)), batch_size=4)


def fit(root: Path, plugin: str, epochs: int, ckpt_path: str | None) -> tuple[Regressor, pl.Trainer]:
    pl.seed_everything(0 if ckpt_path is None else 1, verbose=False)  # a resume must not depend on it
    model = Regressor()
    trainer = pl.Trainer(
        default_root_dir=str(root), max_epochs=epochs, accelerator="cpu", devices=WORLD,
        strategy=DDPStrategy(process_group_backend="gloo", timeout=datetime.timedelta(seconds=60)),
        plugins=[PLUGINS[plugin]()], logger=False, enable_progress_bar=False, enable_model_summary=False,
        deterministic=True, num_sanity_val_steps=0,
        callbacks=[ModelCheckpoint(dirpath=str(root), save_top_k=2, monitor="val_loss", save_last=True)])
    trainer.fit(model, *loaders(), ckpt_path=ckpt_path)
    return model, trainer


def run(directory: Path, plugin: str, rank: int) -> None:
    root = directory / plugin
    fit(root, plugin, 2, None)
    first = sorted(os.listdir(root))
    model, trainer = fit(root, plugin, 3, "last")
    tensors = {f"model/{k}": v for k, v in model.state_dict().items()}
    optimizer = trainer.optimizers[0].state_dict()
    for index, state in optimizer["state"].items():
        tensors.update({f"opt/{index}/{k}": torch.as_tensor(v) for k, v in state.items()})
    safetensors.torch.save_file({k: v.contiguous() for k, v in tensors.items()},
                                str(directory / f"{plugin}-rank{rank}.safetensors"))
    info = {"global_step": trainer.global_step, "after_two_epochs": first, "after_resume": sorted(os.listdir(root)),
            "best_k": sorted(os.path.basename(p) for p in trainer.checkpoint_callback.best_k_models),
            "kinds": {name: "directory" if os.path.isdir(root / name) else "file" for name in os.listdir(root)},
            "param_groups": optimizer["param_groups"]}
    (directory / f"{plugin}-rank{rank}.json").write_text(json.dumps(info, default=str))


def main() -> None:
    directory, rank = Path(sys.argv[1]), int(os.environ["RANK"])
    warnings.filterwarnings("ignore", ".*does not have many workers.*")
    try:
        for plugin in PLUGINS:
            run(directory, plugin, rank)
    except BaseException:
        (directory / f"error-rank{rank}.txt").write_text(traceback.format_exc())
        raise
    finally:
        if torch.distributed.is_initialized():
            torch.distributed.destroy_process_group()


if __name__ == "__main__":
    main()
