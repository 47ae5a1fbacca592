"""``python -m torchckpt``: the torchckpt command line."""

from torchckpt.cli import entry_point

entry_point()
