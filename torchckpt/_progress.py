"""tqdm progress bars, in bytes, for long saves, restores and verifications."""

from __future__ import annotations

import sys
from typing import Any

PROGRESS_THRESHOLD_BYTES = 256 * 2**20


class _NoBar:
    def update(self, n: int) -> None:
        pass

    def close(self) -> None:
        pass

    def __enter__(self) -> _NoBar:
        return self

    def __exit__(self, *exc: object) -> None:
        pass


def progress_bar(total: int, desc: str, progress: bool | None) -> Any:
    """A byte-counting tqdm bar, or a no-op one.

    Args:
        total: bytes the operation will move.
        desc: the bar's label.
        progress: True forces a bar, False hides it, None shows it on a terminal when ``total``
            is at least ``PROGRESS_THRESHOLD_BYTES``.
    """
    show = progress if progress is not None else (total >= PROGRESS_THRESHOLD_BYTES and sys.stderr.isatty())
    if not show:
        return _NoBar()
    from tqdm.auto import tqdm

    return tqdm(total=total, desc=desc, unit="B", unit_scale=True, unit_divisor=1024, leave=False)
