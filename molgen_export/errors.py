"""One exception hierarchy for the whole package; the CLI maps each class to an exit code."""

from __future__ import annotations

from pathlib import Path


class MolgenExportError(Exception):
    """Base class of every error molgen_export raises on purpose.

    Attributes:
        exit_code: the CLI exit status for this error class.
        hint: one line telling the user what to do about it.
    """

    exit_code = 2

    def __init__(self, message: str, *, hint: str | None = None, path: Path | None = None):
        super().__init__(message)
        self.hint = hint
        self.path = path

    def __str__(self) -> str:
        text = super().__str__()
        return f"{text}\n  fix: {self.hint}" if self.hint else text


class UsageError(MolgenExportError, ValueError):
    """The command line or options are wrong (exit 2)."""


class ConfigError(MolgenExportError, ValueError):
    """The run config is missing, unreadable, or contradicts the checkpoint (exit 2)."""


class CheckpointNotReadyError(MolgenExportError):
    """The step folder has no `.metadata` yet: DCP has not finished writing it (exit 2)."""


class CheckpointFormatError(MolgenExportError, ValueError):
    """The step folder is not a readable DCP checkpoint (corrupt, truncated, other format) (exit 2)."""


class UnsafeCheckpointError(CheckpointFormatError):
    """A checkpoint file asks to run or import something it has no business with (exit 2)."""


class SourceVanishedError(MolgenExportError, FileNotFoundError):
    """The step folder disappeared while it was read (e.g. TorchTitan's keep_latest_k purge)."""


class MappingError(MolgenExportError, KeyError):
    """A checkpoint key maps to nothing, or an HF parameter is left unfilled (exit 1)."""

    exit_code = 1

    def __str__(self) -> str:  # KeyError would repr() the message
        return MolgenExportError.__str__(self)


class VerificationError(MolgenExportError):
    """A check or the logit comparison failed; nothing was published (exit 1).

    Attributes:
        findings: every failed finding, so callers can show them all at once.
    """

    exit_code = 1

    def __init__(self, message: str, *, findings: list | None = None, hint: str | None = None):
        super().__init__(message, hint=hint)
        self.findings = list(findings or [])


class OutputError(MolgenExportError, OSError):
    """The output folder cannot be written (permissions, disk full, locked) (exit 2)."""


class StepLockedError(OutputError):
    """Another process (a watcher or a CLI run) is exporting this step right now (exit 2)."""


class DependencyError(MolgenExportError, ImportError):
    """A library the export needs is missing or of a version it cannot use (exit 2)."""


class ExportAborted(BaseException):
    """The export was cancelled (the watcher stopping on SIGINT/SIGTERM); nothing was published.

    A `BaseException`, as `KeyboardInterrupt` is, so no `except Exception` on the way (a retry, a failure record)
    takes it for a failed export. Raised by `cancel.CancelToken.check` at the points the export polls it.

    Attributes:
        reason: why the export was cancelled.
        where: the point of the export that saw the request.
    """

    def __init__(self, reason: str = "cancelled", where: str = ""):
        super().__init__(f"{reason} (at {where})" if where else reason)
        self.reason = reason
        self.where = where
