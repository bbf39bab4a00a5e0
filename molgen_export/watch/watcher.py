"""The watcher: export each `step-N` of a checkpoint folder as soon as DCP renames its `.metadata` into place.

A watchdog observer (`watch_fs`: inotify, or polling for NFS/Lustre/GPFS) only queues step folders
(`watch_queue`); one worker thread takes them one at a time, lowest step first, and applies the per-step rules
(`watch_step`: skip, give up, claim, `export.export_step`, retry). Outcomes go to the journal and failures to
failure records (`watch_state`), so a restarted watcher exports exactly the steps still missing; `--on-export`
commands run in their own thread (`watch_hooks`). This module composes them into `Watcher` (threads, lifetime,
signals); `molgen_export.cli.watch` is the `molgen-export watch` command over it.
"""

from __future__ import annotations

import logging
import os
import shutil
import threading
import time
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path

from molgen_export.cancel import CancelToken
from molgen_export.dcp import discover
from molgen_export.errors import ExportAborted
from molgen_export.pipeline import export
from molgen_export.pipeline.summary import summary_line
from molgen_export.watch import events
from molgen_export.options import ExportOptions
from molgen_export.errors import UsageError
from molgen_export.watch.on_export import ExportHooks
from molgen_export.watch.step_queue import StepQueue
from molgen_export.watch.journal import StepOutcome, append_journal, export_root_for
from molgen_export.watch.step_export import VANISHED_BEFORE_START, StepExporter
from molgen_export.hf.publish import process_alive

logger = logging.getLogger(__name__)

@dataclass(frozen=True)
class WatchOptions:
    """How the watcher finds, schedules and follows up exports. Field names are the CLI flags and YAML keys."""

    poll: str = "auto"
    """`auto` (polling on network filesystems, inotify elsewhere), `off` or `0` (inotify), or the polling interval
    in seconds."""
    retries: int = 3
    """Attempts after the first for a step whose export failed; 0 never retries."""
    retry_backoff: float = 30.0
    """Seconds before the first retry; doubles with each further attempt."""
    locked_recheck: float = 15.0
    """Seconds before looking again at a step another process is exporting."""
    rescan: float = 300.0
    """Seconds between full rescans of the checkpoint folder (events can be lost); 0 turns them off."""
    nice: int = 10
    """Niceness added to the export thread (and the hooks it starts), so training keeps the CPU."""
    on_export: str | None = None
    """Command run after each successful export; `{hf_dir}`, `{step}`, `{step_dir}`, `{report}` and `{python}`
    (this interpreter) are filled in."""
    on_export_timeout: float = 3600.0
    """Seconds an `on_export` command may run before it is killed."""
    grace: float = 10.0
    """On SIGINT/SIGTERM, seconds to let the export in flight finish before aborting it (no partial output)."""
    once: bool = False
    """Export the complete steps found at start, then exit."""
    until_pid: int | None = None
    """Once this process has ended, export what is left and exit."""

    def __post_init__(self) -> None:
        if self.poll in ("0", "0.0", "false", "False", "inotify"):
            object.__setattr__(self, "poll", "off")
        if self.poll not in ("auto", "off"):
            try:
                seconds = float(self.poll)
            except ValueError:
                raise UsageError(f"cannot read poll={self.poll!r}", hint="use auto, off, or seconds such as 10") from None
            if seconds <= 0:
                raise UsageError(f"the polling interval must be positive, got {self.poll!r}", hint="use off for inotify")
        if self.retries < 0 or self.retry_backoff < 0 or self.grace < 0:
            raise UsageError("retries, retry_backoff and grace must not be negative")


class Watcher:
    """Watches one checkpoint root and exports each complete step once, one at a time, lowest step first.

    Use `run()` to block until stopped (or, with `once`/`until_pid`, until done), or `start()`, then
    `drain()`/`stop()` and `join()` when another loop (the runner's) owns the main thread.

    Args:
        checkpoint_root: the folder holding `step-N` folders; it may not exist yet.
        options: export options for every step.
        watch_options: observer, retries, hooks and lifetime.
        before_export: called with the step folder before each export (the runner writes config.json there).
        on_outcome: called (in the worker thread) with each StepOutcome; the CLI prints them.
    """

    def __init__(self, checkpoint_root: Path, options: ExportOptions | None = None,
                 watch_options: WatchOptions | None = None, *, before_export: Callable[[Path], None] | None = None,
                 on_outcome: Callable[[StepOutcome], None] | None = None):
        self.checkpoint_root = Path(checkpoint_root).absolute()
        self.options = options or ExportOptions()
        self.watch_options = watch_options or WatchOptions()
        self.export_root = export_root_for(self.checkpoint_root, self.options)
        self.before_export = before_export
        self.on_outcome = on_outcome
        self.outcomes: list[StepOutcome] = []
        self.mode = "scan" if self.watch_options.once else "starting"
        self._queue = StepQueue(draining=self.watch_options.once)
        self._finished: set[int] = set()
        self._observer = None
        self._worker: threading.Thread | None = None
        self._hooks = ExportHooks(self.watch_options.on_export, self.export_root,
                                  self.watch_options.on_export_timeout, lambda: self._queue.stopping,
                                  nice=self.watch_options.nice)
        self.cancel = CancelToken()
        """Requested when the grace after `stop()` runs out; the export in flight stops at its next check."""
        self._step = StepExporter(self.options, retries=self.watch_options.retries,
                                  retry_backoff=self.watch_options.retry_backoff,
                                  locked_recheck=self.watch_options.locked_recheck, queue=self._queue,
                                  hooks=self._hooks, record=self._record, finished=self._finished.__contains__,
                                  before_export=before_export, cancel=self.cancel)
        self._in_flight: int | None = None
        self._last_scan = 0.0
        self._stopped_at: float | None = None
        self._stop_grace = 0.0

    # --- queue -------------------------------------------------------------------------------------------

    def submit(self, step_dir: Path, *, via: str = "scan", delay: float = 0.0) -> None:
        """Queue a step folder (idempotent); it is exported once its `.metadata` is there."""
        step = discover.step_number(step_dir)
        if step is not None:
            self._queue.add(step, Path(step_dir), via, delay)

    def scan(self) -> int:
        """Queue every complete step not already handled in this session; returns how many were queued."""
        self._last_scan = time.monotonic()
        if not self.checkpoint_root.is_dir():
            return 0
        queued = 0
        try:
            steps = discover.list_steps(self.checkpoint_root)
        except OSError as exc:
            logger.warning("cannot list %s: %s", self.checkpoint_root, exc)
            return 0
        for info in steps:
            if info.complete and info.step not in self._finished and info.step != self._in_flight:
                self.submit(info.step_dir, via="scan")
                queued += 1
        return queued

    def _forget(self, step_dir: Path) -> None:
        step = discover.step_number(step_dir)
        item = None if step is None else self._queue.forget(step, step_dir)
        if item is not None:
            self._record(StepOutcome(item.step, "vanished", str(step_dir),
                                     str(export.output_dir_for(step_dir, self.options)), item.attempts, item.via,
                                     error=VANISHED_BEFORE_START))

    # --- lifetime ----------------------------------------------------------------------------------------

    def start(self) -> None:
        """Start the worker thread (which waits for the root, starts the observer and scans)."""
        self._worker = threading.Thread(target=self._work, name="molgen-watch-export", daemon=True)
        self._worker.start()
        self._hooks.start()

    def drain(self) -> None:
        """Export what is queued (after one last scan), then stop; `join()` waits for it."""
        self.scan()
        self._queue.drain()

    def stop(self, grace: float | None = None) -> None:
        """Stop taking work; let the export in flight finish for `grace` seconds, then abort it (no output)."""
        grace = self.watch_options.grace if grace is None else grace
        self._stopped_at = time.monotonic() if self._stopped_at is None else self._stopped_at
        self._stop_grace = grace
        already = self._queue.stop()
        self._hooks.close()
        if not already:
            logger.info("stopping: no new exports; %s", f"the export in flight may finish within {grace:.0f} s"
                        if self._step.exporting else "none in flight")
        timer = threading.Timer(grace, self._abort)
        timer.daemon = True
        timer.start()

    def _abort(self) -> None:
        exporting = self._step.exporting
        if exporting is not None:
            logger.warning("aborting the export of %s; its temporary folder is removed", exporting.name)
        # requested even when none is in flight: an export starting after this moment stops at its first check
        self.cancel.request("stopped by a signal")
        self._hooks.kill_running()

    def join(self, timeout: float | None = None) -> bool:
        """Wait for the worker (and the hooks it queued) to finish; True when they did within `timeout`."""
        deadline = None if timeout is None else time.monotonic() + timeout
        threads = (self._worker, self._hooks.thread)
        for thread in threads:
            if thread is not None:
                thread.join(None if deadline is None else max(0.0, deadline - time.monotonic()))
        return not any(t is not None and t.is_alive() for t in threads)

    def run(self) -> list[StepOutcome]:
        """Start, then block until stopped, or done with `once`/`until_pid`. Returns the outcomes."""
        self.start()
        while not self.join(timeout=0.5):
            if self._stopped_at is not None and time.monotonic() - self._stopped_at > self._stop_grace + 30:
                logger.warning("the export thread did not stop; removing its temporary folder and leaving it")
                self._remove_own_temp_dirs()
                break
        return self.outcomes

    def _remove_own_temp_dirs(self) -> None:
        if self.export_root.is_dir():
            for child in self.export_root.glob(f".step-*.tmp-{os.getpid()}-*"):
                shutil.rmtree(child, ignore_errors=True)

    # --- worker ------------------------------------------------------------------------------------------

    def export_now(self, step_dir: Path) -> list[StepOutcome]:
        """Export one step in the caller's thread with the watcher's rules (skip, lock, retries, record, hook).

        Returns:
            The outcomes, the last one final (`exported`, `skipped`, `vanished`, `gave-up`, ...).
        """
        self._queue.drain()
        self.submit(Path(step_dir).absolute(), via="hook")
        self._loop()
        self._hooks.run_queued_here()
        return self.outcomes

    def _work(self) -> None:
        if self.watch_options.nice:
            try:
                os.nice(self.watch_options.nice)  # per thread on Linux: training's threads keep their priority
            except OSError as exc:
                logger.warning("cannot lower the export thread's priority: %s", exc)
        try:
            if not self._wait_for_root():
                return
            if not self.watch_options.once:
                self._start_observer()
            self.scan()
            self._loop()
        except ExportAborted:
            pass
        finally:
            if self._observer is not None:
                self._observer.stop()
            self._hooks.close()

    def _loop(self) -> None:
        while True:
            item = self._queue.take(self._on_wake)
            if item is None:
                return
            self._in_flight = item.step
            try:
                self._step.process(item)
            finally:
                self._in_flight = None

    def _on_wake(self) -> None:
        self._check_until_pid()
        rescan = self.watch_options.rescan
        if rescan and not self._queue.draining and time.monotonic() - self._last_scan > rescan:
            self.scan()

    def _wait_for_root(self) -> bool:
        announced = False
        while not self.checkpoint_root.is_dir():
            if self.watch_options.once:
                logger.warning("%s does not exist; nothing to export", self.checkpoint_root)
                return False
            if not announced:
                logger.info("waiting for %s to appear", self.checkpoint_root)
                announced = True
            if not self._queue.wait(0.5):
                return False
            self._check_until_pid()
        return True

    def _check_until_pid(self) -> None:
        pid = self.watch_options.until_pid
        if pid is not None and not self._queue.draining and not process_alive(pid):
            logger.info("process %d has ended; exporting what is left, then exiting", pid)
            self.drain()

    def _start_observer(self) -> None:
        self._observer, interval = events.start_observer(self.checkpoint_root, self.watch_options.poll,
                                                           self._on_step_event)
        self.mode = "inotify" if interval is None else "poll"
        logger.info("watching %s (%s) with %s; exports go to %s", self.checkpoint_root,
                    events.filesystem_type(self.checkpoint_root),
                    "inotify" if interval is None else f"polling every {interval:g} s", self.export_root)

    def _on_step_event(self, event: events.StepEvent) -> None:
        """Observer thread: queue or forget a step; never blocks, never reads checkpoint data."""
        if event.action == "forget":
            self._forget(event.step_dir)
        else:
            self.submit(event.step_dir, via=self.mode, delay=event.delay)

    def _record(self, outcome: StepOutcome) -> None:
        self.outcomes.append(outcome)
        if outcome.status in ("exported", "skipped", "vanished", "gave-up"):
            self._finished.add(outcome.step)
        append_journal(self.export_root, {"event": "step", **outcome.to_json()})
        level = logging.WARNING if outcome.status in ("failed", "gave-up") else logging.INFO
        logger.log(level, "step-%d %s%s", outcome.step, outcome.status,
                   f": {outcome.error.splitlines()[0]}" if outcome.error else "")
        if self.on_outcome is not None:
            try:
                self.on_outcome(outcome)
            except Exception:  # a printing callback must never stop the watcher
                logger.exception("on_outcome callback failed")


# --- terminal lines --------------------------------------------------------------------------------------


def describe_outcome(outcome: StepOutcome) -> str:
    """One line per outcome for the terminal (the CLI, the runner and the post-checkpoint hook print it)."""
    latency = (f"  latency {outcome.start_latency_s:.2f} s ({outcome.detected_via})"
               if outcome.start_latency_s is not None else "")
    if outcome.status == "exported" and outcome.report is not None:
        return summary_line(outcome.report) + latency
    detail = f"  {outcome.error.splitlines()[0]}" if outcome.error else ""
    return f"step-{outcome.step}  {outcome.status}{detail}"
