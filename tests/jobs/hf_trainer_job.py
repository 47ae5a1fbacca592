"""A tiny GPT-2 trained by the Hugging Face Trainer with ``TorchckptCallback``, SIGKILLed between two
saves (``tests/test_hf_trainer.py``), and the pieces the tests build their runs from.

    python tests/jobs/hf_trainer_job.py DIR KILL_AT THREADS

trains ``RESUME_STEPS`` steps saving every ``SAVE_EVERY`` into ``DIR/runs`` and kills itself with
SIGKILL when ``global_step`` reaches KILL_AT, at the next step's ``on_step_begin``: after the
callback wrote the save that step's hook writes, before the step runs. Nothing is cleaned up (the
manager is not closed, its claim on the directory is left as a crash leaves it). THREADS is the
test process's thread count (1), so both processes compute alike.
"""

from __future__ import annotations

import os
import signal
import sys
from pathlib import Path
from typing import Any

import torch
import transformers

from torchckpt.integrations.transformers import TorchckptCallback

SAVE_EVERY = 2
RESUME_STEPS = 10  # 16 sequences in batches of 4: 4 steps an epoch, so 10 steps span 2.5 epochs


class Tokens(torch.utils.data.Dataset):
    """Sixteen fixed sequences of 8 token ids, labels equal to the inputs (language modelling)."""

    def __init__(self) -> None:
        self.ids = torch.randint(0, 50, (16, 8), generator=torch.Generator().manual_seed(3))

    def __len__(self) -> int:
        return len(self.ids)

    def __getitem__(self, i: int) -> dict[str, torch.Tensor]:
        return {"input_ids": self.ids[i], "labels": self.ids[i]}


def gpt2_config() -> Any:
    """One layer, 32 wide, with GPT-2's default dropout (0.1): every step draws from the global generator."""
    return transformers.GPT2Config(n_layer=1, n_embd=32, n_head=2, n_positions=16, vocab_size=50)


def trainer_for(output: Path, config: Any, max_steps: int, callbacks: list[Any], **options: Any) -> Any:
    """A Trainer of a fresh tiny GPT-2 (seeded) on shuffled :class:`Tokens`, batches of 4, on the CPU.

    ``options`` override the training arguments (the default: a constant learning rate, no logging)."""
    torch.manual_seed(0)
    model = transformers.GPT2LMHeadModel(config)
    arguments = {"max_steps": max_steps, "per_device_train_batch_size": 4, "learning_rate": 1e-3,
                 "lr_scheduler_type": "constant", "save_strategy": "steps", "save_steps": SAVE_EVERY,
                 "logging_strategy": "no", "report_to": [], "use_cpu": True, "disable_tqdm": True, "seed": 0,
                 "dataloader_num_workers": 0, **options}
    args = transformers.TrainingArguments(output_dir=str(output / "hf"), **arguments)
    return transformers.Trainer(model=model, args=args, train_dataset=Tokens(), callbacks=callbacks)


RESUME_OPTIONS = {"lr_scheduler_type": "linear", "warmup_steps": 2, "logging_steps": 1,
                  "logging_strategy": "steps"}  # a schedule that moves, and every step's loss logged


class KillAt(transformers.TrainerCallback):
    """SIGKILL this process at the ``on_step_begin`` that follows global step ``step``."""

    def __init__(self, step: int) -> None:
        self.step = step

    def on_step_begin(self, args: Any, state: Any, control: Any, **kwargs: Any) -> None:
        if state.global_step == self.step:
            os.kill(os.getpid(), signal.SIGKILL)


def main(directory: str, kill_at: int, threads: int) -> None:
    torch.set_num_threads(threads)
    callback = TorchckptCallback(Path(directory) / "runs")
    trainer = trainer_for(Path(directory), gpt2_config(), RESUME_STEPS, [callback, KillAt(kill_at)], **RESUME_OPTIONS)
    trainer.train()
    raise SystemExit(f"the run was not killed at global step {kill_at}")


if __name__ == "__main__":
    main(sys.argv[1], int(sys.argv[2]), int(sys.argv[3]))
