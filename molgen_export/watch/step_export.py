"""One queued step under the watcher's rules: skip it, give up on it, claim it, export it, or retry it later.

The rules, in order: a step whose folder or `.metadata` is gone is `vanished` (or not ready yet); one already
exported from the same save is `skipped`; one an earlier run gave up on (same save) stays `gave-up`; otherwise the
watcher takes the step's claim lock, checks again, and calls `export.export_step`. A lock held by another process
means `locked` (looked at again later); a failure is recorded beside the output and retried with back-off; a source
deleted mid-read ends cleanly as `vanished`.
"""

from __future__ import annotations

import logging
import socket
import time
from collections.abc import Callable
from pathlib import Path

from molgen_export.dcp import discover
from molgen_export.pipeline import export
from molgen_export.options import ExportOptions
from molgen_export.cancel import CancelToken
from molgen_export.errors import ExportAborted, MolgenExportError, SourceVanishedError, StepLockedError
from molgen_export.watch.on_export import ExportHooks
from molgen_export.watch.step_queue import QueuedStep, StepQueue
from molgen_export.watch.journal import (StepOutcome, failure_record_path, gave_up_before, step_claim,
                                       write_failure_record)

logger = logging.getLogger(__name__)

VANISHED_BEFORE_START = "deleted before its export started (keep_latest_k purge?)"


class StepExporter:
    """Applies the watcher's rules to each step taken from the queue, in the export thread.

    Args:
        options: export options for every step.
        retries: attempts after the first for a failing step.
        retry_backoff: seconds before the first retry, doubling after.
        locked_recheck: seconds before looking again at a step another process holds.
        queue: where retried and locked steps go back.
        hooks: gets each exported step for its `on_export` command.
        record: records an outcome (journal, log, callback).
        finished: True for a step this watcher already settled in this session.
        before_export: called with the step folder before each export.
        cancel: passed to each export, which stops at its next check once it is requested (`ExportAborted`).
    """

    def __init__(self, options: ExportOptions, *, retries: int, retry_backoff: float, locked_recheck: float,
                 queue: StepQueue, hooks: ExportHooks, record: Callable[[StepOutcome], None],
                 finished: Callable[[int], bool], before_export: Callable[[Path], None] | None = None,
                 cancel: CancelToken | None = None):
        self.options = options
        self.cancel = cancel
        self.retries, self.retry_backoff, self.locked_recheck = retries, retry_backoff, locked_recheck
        self.queue, self.hooks, self.record, self.finished = queue, hooks, record, finished
        self.before_export = before_export
        self.exporting: Path | None = None
        """The step folder whose `export_step` is running now (what an abort would interrupt)."""

    def process(self, item: QueuedStep) -> None:
        """Settle one step taken from the queue: record its outcome, and requeue it when it must be retried.

        Raises:
            ExportAborted: the export was cancelled (the watcher stopping after its grace); recorded as
                `aborted`, nothing published.
        """
        step_dir, options = item.step_dir, self.options
        output_dir = export.output_dir_for(step_dir, options)

        def outcome(status: str, **extra) -> StepOutcome:
            return StepOutcome(item.step, status, str(step_dir), str(output_dir), item.attempts, item.via, **extra)

        if not step_dir.is_dir():
            self.record(outcome("vanished", error=VANISHED_BEFORE_START))
            return
        if not (step_dir / discover.METADATA_FILE).is_file():
            logger.debug("step-%d has no .metadata yet; waiting for it", item.step)
            return
        if export.export_state(step_dir, options) == "exported":
            if self.finished(item.step):  # a late event for a step this watcher already handled
                logger.debug("step-%d already handled in this session", item.step)
            else:
                self.record(outcome("skipped"))
            return
        if item.attempts == 0 and gave_up_before(step_dir, output_dir, self.retries):
            self.record(outcome("gave-up", error=f"gave up in an earlier run; delete "
                                                 f"{failure_record_path(output_dir)} to try again"))
            return
        # Held across check-then-export, so a second watcher cannot start once this one has finished.
        with step_claim(output_dir) as claimed:
            if claimed:
                self._export_claimed(item, step_dir, output_dir, outcome)
            else:
                self._requeue_locked(item, outcome)

    def _requeue_locked(self, item: QueuedStep, outcome: Callable[..., StepOutcome]) -> None:
        if not item.locked:
            item.locked = True
            self.record(outcome("locked", error=f"another process is exporting it; looking again every "
                                                f"{self.locked_recheck:g} s"))
        self.queue.requeue(item, self.locked_recheck)

    def _export_claimed(self, item: QueuedStep, step_dir: Path, output_dir: Path,
                        outcome: Callable[..., StepOutcome]) -> None:
        if export.export_state(step_dir, self.options) == "exported":
            self.record(outcome("skipped"))
            return
        try:
            mtime = (step_dir / discover.METADATA_FILE).stat().st_mtime
        except FileNotFoundError:
            self.record(outcome("vanished", error=VANISHED_BEFORE_START))
            return
        started = time.time()
        latency = {"detect_latency_s": round(max(0.0, item.seen_at - mtime), 3),
                   "start_latency_s": round(max(0.0, started - mtime), 3)}
        waiting = self.queue.waiting()
        logger.info("step-%d: export starts %.2f s after .metadata appeared (seen after %.2f s, via %s)%s",
                    item.step, latency["start_latency_s"], latency["detect_latency_s"], item.via,
                    f"; {len(waiting)} more queued (step-{waiting[0]} first)" if waiting else "")
        self.exporting = step_dir
        try:
            if self.before_export is not None:
                self.before_export(step_dir)
            report = export.export_step(step_dir, self.options, cancel=self.cancel)
        except ExportAborted as exc:
            self.exporting = None
            asked = self.cancel.requested_at if self.cancel is not None else None
            logger.info("step-%d: export stopped %s (%s)", item.step, "" if asked is None else
                        f"{time.monotonic() - asked:.3f} s after the request", exc)
            self.record(outcome("aborted", error="stopped by a signal; nothing was published", **latency))
            raise
        except StepLockedError:
            self.exporting = None
            self._requeue_locked(item, outcome)
            return
        except Exception as exc:  # noqa: BLE001 - any failure is recorded and retried, never fatal
            self.exporting = None
            duration = round(time.time() - started, 3)
            if isinstance(exc, SourceVanishedError) or not (step_dir / discover.METADATA_FILE).exists():
                self.record(outcome("vanished", duration_s=duration, error=f"deleted while it was read "
                                    f"(keep_latest_k purge?); nothing was published ({exc})", **latency))
                return
            if not isinstance(exc, MolgenExportError):
                logger.debug("unexpected error exporting %s", step_dir, exc_info=True)
            self._failed(item, step_dir, output_dir, exc, outcome, duration, latency)
            return
        self.exporting = None
        if report.status == "skipped":  # another process published this very save while this one planned
            self.record(outcome("skipped", duration_s=round(time.time() - started, 3), report=report, **latency))
            return
        failure_record_path(output_dir).unlink(missing_ok=True)
        self.record(outcome("exported", duration_s=round(time.time() - started, 3), report=report, **latency))
        self.hooks.add(item.step, step_dir, output_dir)

    def _failed(self, item: QueuedStep, step_dir: Path, output_dir: Path, exc: Exception,
                outcome: Callable[..., StepOutcome], duration: float, latency: dict) -> None:
        item.attempts += 1
        error = f"{type(exc).__name__}: {exc}"
        retry = item.attempts <= self.retries
        delay = self.retry_backoff * 2 ** (item.attempts - 1)
        try:
            fingerprint = export.source_fingerprint(step_dir)
        except OSError:
            fingerprint = None
        write_failure_record(output_dir, {
            "step": item.step, "step_dir": str(step_dir), "attempts": item.attempts, "error": error,
            "error_type": type(exc).__name__, "time": time.time(), "host": socket.gethostname(),
            "source_fingerprint": fingerprint, "next_retry_in_s": delay if retry else None, "gave_up": not retry})
        self.record(outcome("failed" if retry else "gave-up", duration_s=duration, error=error, **latency))
        if retry:
            logger.warning("step-%d: attempt %d failed; retrying in %.0f s", item.step, item.attempts, delay)
            self.queue.requeue(item, delay)
