"""The ``torchckpt`` command: ``main(argv) -> int``; errors are one ``Error: ...`` line, never a traceback."""

from __future__ import annotations

import argparse
import sys
from collections.abc import Sequence

from torchckpt import __version__
from torchckpt.errors import CheckpointError


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="torchckpt",
        description="Inspect, compare, verify and export torchckpt checkpoints.",
    )
    parser.add_argument("--version", action="version", version=f"torchckpt {__version__}")
    parser.add_subparsers(dest="command", metavar="COMMAND")
    return parser


def main(argv: Sequence[str] | None = None) -> int:
    """Run the command line; returns the exit code (0 ok, 1 error, 2 usage)."""
    parser = build_parser()
    try:
        args = parser.parse_args(argv)
    except SystemExit as e:
        return int(e.code or 0)
    handler = getattr(args, "handler", None)
    if handler is None:
        parser.print_help()
        return 0
    try:
        return int(handler(args))
    except (CheckpointError, OSError, ValueError) as e:
        print(f"Error: {e}", file=sys.stderr)
        return 1


def entry_point() -> None:
    sys.exit(main())
