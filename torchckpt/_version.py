"""The package version, in one place (the index records which torchckpt wrote a checkpoint)."""

__version__ = "0.1.0"
