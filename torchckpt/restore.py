"""Partial restore with mismatch reporting: ``RestoreStatus`` and its ``MismatchReport``.

A restore is planned before anything is touched (``_load``): every value in the checkpoint is
matched to a destination by name (after ``rename=``, when given), shape and dtype, and every
mismatch is recorded. Only then are the matching values applied. Nothing that mismatches is ever
applied, and nothing is silently ignored: either an assertion looks at the report,
``expect_partial()`` acknowledges it, or a warning names the keys when the status is discarded
(as TensorFlow warns when its restore coordinator is collected).
"""

from __future__ import annotations

import warnings
from collections.abc import Iterable

from torchckpt._load.rename import Rename, RenameConflictError
from torchckpt._load.report import MismatchReport
from torchckpt.errors import RestoreMismatchError

__all__ = ["MismatchReport", "PartialRestoreWarning", "Rename", "RenameConflictError", "RestoreStatus"]


class PartialRestoreWarning(UserWarning):
    """Some checkpoint values were not used, or some objects were not fully matched."""


class RestoreStatus:
    """The result of ``Checkpoint.restore`` / ``read``: assertions over its :class:`MismatchReport`.

    Example:
        >>> import torch, torchckpt
        >>> status = torchckpt.Checkpoint(w=torch.zeros(2)).restore(None)
        >>> status.report.restored_keys
        []
    """

    def __init__(self, report: MismatchReport, path: str | None) -> None:
        self.report = report
        self.path = path
        self._acknowledged = False

    def _fail(self, what: str, include: Iterable[str]) -> None:
        self._acknowledged = True
        if self.path is None:
            raise RestoreMismatchError(
                "No checkpoint specified (save_path=None); nothing is being restored.", self.report
            )
        details = self.report.lines(include)
        raise RestoreMismatchError(f"{what} when restoring {self.path}: " + "; ".join(details), self.report)

    def assert_consumed(self) -> RestoreStatus:
        """Every value in the checkpoint was used and every tracked object fully matched."""
        self._acknowledged = True
        if self.path is None or self.report:
            self._fail("Not all values matched", ("missing", "unexpected", "shape", "dtype", "skipped"))
        return self

    def assert_existing_objects_matched(self) -> RestoreStatus:
        """Every tracked object was fully matched; extra checkpoint values are fine."""
        self._acknowledged = True
        r = self.report
        if (self.path is None or r.missing_keys or r.shape_mismatches or r.dtype_mismatches or r.skipped_objects
                or r.left_from_damaged):
            self._fail("Some tracked objects were not fully matched", ("missing", "shape", "dtype", "skipped"))
        return self

    def assert_nontrivial_match(self) -> RestoreStatus:
        """Something was restored (besides ``save_counter``, which every checkpoint of a
        ``Checkpoint.save`` has); on several ranks, on every rank."""
        self._acknowledged = True
        if self.path is None:
            self._fail("", ())
        ranks = self.report.restored_nothing_on
        if self.report.restored_nothing() or ranks:
            where = f" on rank{'s' if len(ranks) > 1 else ''} {', '.join(map(str, ranks))}" if ranks else ""
            raise RestoreMismatchError(
                f"Nothing in {self.path} matched the objects being restored{where}; the checkpoint probably does "
                "not belong to this program. " + "; ".join(self.report.lines()),
                self.report,
            )
        return self

    def expect_partial(self) -> RestoreStatus:
        """Silence the warning about unused or unmatched values."""
        self._acknowledged = True
        return self

    def warn_if_partial(self, stacklevel: int = 2, advice: str | None = None) -> RestoreStatus:
        """Warn with :class:`PartialRestoreWarning` now if anything did not match, instead of when
        the status is dropped (a manager keeps its last one, so that would be at the end of the
        run); the warning is given once.

        Args:
            stacklevel: as for :func:`warnings.warn`, counted from the caller of this method.
            advice: the warning's last sentence, how to silence it or make it an error; by default
                ``expect_partial()`` and the ``assert_*`` methods, which a caller that warns on the
                user's behalf (``CheckpointManager.restore_or_initialize``) replaces with its own.
        """
        if not self._acknowledged and self.path is not None and self.report:
            self._acknowledged = True
            advice = advice or ("Call status.expect_partial() to silence this warning, or an assert_* method to make "
                                "it an error.")
            warnings.warn(
                f"Checkpoint {self.path} was restored with mismatches: {'; '.join(self.report.lines())}. {advice}",
                PartialRestoreWarning,
                stacklevel=stacklevel + 1,
            )
        return self

    def __del__(self) -> None:
        try:  # noqa: SIM105 - not contextlib.suppress: at interpreter shutdown the module's globals may be gone
            self.warn_if_partial()
        except Exception:  # noqa: BLE001 - never raise from __del__
            pass
