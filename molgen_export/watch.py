"""The watcher: export each `step-N` of a checkpoint folder as soon as DCP renames its `.metadata` into place.

A watchdog observer (inotify, or polling for NFS/Lustre/GPFS where inotify misses other nodes' writes) only
queues step folders; one worker thread exports them one at a time, lowest step first, through
`export.export_step`. Skips, failures (retried with back-off), purged sources, locks held by other processes
and `--on-export` hooks are recorded in a journal (`<export_root>/.molgen-watch.jsonl`) and failures also in
`<export_root>/.step-N-hf.failed.json`, so a restarted watcher exports exactly the steps still missing.
"""

from __future__ import annotations

import argparse
import ctypes
import json
import logging
import os
import queue
import shlex
import shutil
import signal
import socket
import subprocess
import sys
import threading
import time
from collections.abc import Callable
from dataclasses import asdict, dataclass, field
from pathlib import Path

from molgen_export import discover, export
from molgen_export.config import ExportOptions
from molgen_export.errors import MolgenExportError, SourceVanishedError, StepLockedError, UsageError

logger = logging.getLogger(__name__)

NETWORK_FILESYSTEMS = frozenset({
    "nfs", "nfs4", "lustre", "gpfs", "cifs", "smb", "smb2", "smb3", "smbfs", "ceph", "cephfs", "glusterfs",
    "beegfs", "panfs", "wekafs", "9p", "afs", "ocfs2", "gfs2", "davfs", "virtiofs", "orangefs"})
"""Filesystems where inotify does not see writes made by other machines (watchdog#504, #395)."""

DEFAULT_POLL_SECONDS = 10.0
JOURNAL_FILE = ".molgen-watch.jsonl"
"""One JSON line per outcome and per hook run, appended by every watcher exporting into this root."""
CREATED_SETTLE_SECONDS = 0.2
"""A `.metadata` that was *created* (copied in) rather than renamed into place gets this long to be closed."""


class ExportAborted(BaseException):
    """Raised inside the worker thread to abort the export in flight (the export removes its temp folder)."""


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


@dataclass(frozen=True)
class StepOutcome:
    """What the watcher did with one step, once."""

    step: int
    status: str
    """`exported`, `skipped` (done before), `locked` (another process has it), `vanished` (deleted), `failed`
    (will retry), `gave-up` (retries spent) or `aborted` (stopped by a signal)."""
    step_dir: str
    output_dir: str
    attempts: int = 0
    detected_via: str = ""
    """`scan`, `inotify` or `poll`."""
    detect_latency_s: float | None = None
    """From `.metadata`'s mtime to the watcher seeing it."""
    start_latency_s: float | None = None
    """From `.metadata`'s mtime to the export starting (includes waiting behind earlier steps)."""
    duration_s: float | None = None
    error: str | None = None
    report: export.ExportReport | None = field(default=None, repr=False)

    def to_json(self) -> dict:
        data = asdict(self)
        data.pop("report")
        return data


@dataclass
class _Pending:
    step: int
    step_dir: Path
    seen_at: float
    via: str
    not_before: float = 0.0
    attempts: int = 0
    locked: bool = False


def filesystem_type(path: Path, mounts_file: Path = Path("/proc/mounts")) -> str:
    """The type of the filesystem holding `path` (or its nearest existing parent), from `/proc/mounts`."""
    existing, tail = Path(path).absolute(), []
    while not existing.exists() and existing != existing.parent:
        tail.insert(0, existing.name)
        existing = existing.parent
    target = os.path.join(os.path.realpath(existing), *tail)
    best, fstype = "", "unknown"
    try:
        lines = Path(mounts_file).read_text().splitlines()
    except OSError:
        return fstype
    for line in lines:
        parts = line.split()
        if len(parts) < 3:
            continue
        mount_point = parts[1].replace("\\040", " ")
        inside = target == mount_point or target.startswith(mount_point.rstrip("/") + "/")
        if inside and len(mount_point) >= len(best):
            best, fstype = mount_point, parts[2]
    return fstype


def is_network_filesystem(fstype: str) -> bool:
    """True for NFS, Lustre, GPFS, SMB, FUSE mounts and the like, where inotify misses remote writes."""
    return fstype in NETWORK_FILESYSTEMS or fstype.startswith("fuse") or fstype.startswith("nfs")


def polling_interval(checkpoint_root: Path, poll: str, mounts_file: Path = Path("/proc/mounts")) -> float | None:
    """Resolve `poll` into a polling interval in seconds, or None for inotify."""
    if poll == "off":
        return None
    if poll == "auto":
        return DEFAULT_POLL_SECONDS if is_network_filesystem(filesystem_type(checkpoint_root, mounts_file)) else None
    return float(poll)


def step_dir_for_event(checkpoint_root: Path, path: str) -> tuple[Path, str] | None:
    """`(step_dir, what)` when `path` is a step's `.metadata` (`what="metadata"`) or a step folder itself
    (`what="dir"`), else None: our own `*-hf` output, temp folders, locks and nested files are ignored."""
    try:
        parts = Path(path).relative_to(checkpoint_root).parts
    except ValueError:
        return None
    if not parts or discover.step_number(Path(parts[0])) is None:
        return None
    if len(parts) == 1:
        return checkpoint_root / parts[0], "dir"
    if len(parts) == 2 and parts[1] == discover.METADATA_FILE:
        return checkpoint_root / parts[0], "metadata"
    return None


def export_root_for(checkpoint_root: Path, options: ExportOptions) -> Path:
    """The folder `step-N-hf/` exports of this checkpoint root go to."""
    return export.output_dir_for(Path(checkpoint_root) / "step-0", options).parent


def failure_record_path(output_dir: Path) -> Path:
    """`<export_root>/.step-N-hf.failed.json`: why the last attempts at this step failed."""
    return output_dir.parent / f".{output_dir.name}.failed.json"


def read_failure_record(output_dir: Path) -> dict | None:
    """The failure record of a step's output, or None when there is none (or it is unreadable)."""
    try:
        return json.loads(failure_record_path(output_dir).read_text())
    except (OSError, ValueError):
        return None


def _append_journal(export_root: Path, entry: dict) -> None:
    entry = {"time": time.time(), "host": socket.gethostname(), "pid": os.getpid(), **entry}
    try:
        export_root.mkdir(parents=True, exist_ok=True)
        with open(export_root / JOURNAL_FILE, "a", encoding="utf-8") as f:
            f.write(json.dumps(entry) + "\n")
    except OSError as exc:
        logger.warning("cannot append to the watch journal in %s: %s", export_root, exc)


def _write_json_atomic(path: Path, data: dict) -> None:
    temp = path.parent / f"{path.name}.tmp-{os.getpid()}"
    try:
        temp.write_text(json.dumps(data, indent=2) + "\n")
        os.replace(temp, path)
    except OSError as exc:
        logger.warning("cannot write %s: %s", path, exc)


def read_journal(export_root: Path) -> list[dict]:
    """Every entry of the watch journal of an export root (empty when there is none)."""
    path = Path(export_root) / JOURNAL_FILE
    if not path.is_file():
        return []
    return [json.loads(line) for line in path.read_text().splitlines() if line.strip()]


def process_alive(pid: int) -> bool:
    """True while process `pid` runs (a zombie, ended but not yet reaped by its parent, counts as ended)."""
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:
        return True
    try:
        return Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()[0] != "Z"
    except (OSError, IndexError):
        return True


def _raise_in_thread(thread: threading.Thread, exc_type: type[BaseException]) -> bool:
    if thread.ident is None or not thread.is_alive():
        return False
    return ctypes.pythonapi.PyThreadState_SetAsyncExc(ctypes.c_ulong(thread.ident), ctypes.py_object(exc_type)) == 1


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
        self._pending: dict[int, _Pending] = {}
        self._finished: set[int] = set()
        self._cond = threading.Condition()
        self._stopping = False
        self._draining = self.watch_options.once
        self._observer = None
        self._worker: threading.Thread | None = None
        self._hooks: queue.Queue = queue.Queue()
        self._hook_thread: threading.Thread | None = None
        self._hook_process: subprocess.Popen | None = None
        self._exporting: Path | None = None
        self._in_flight: int | None = None
        self._last_scan = 0.0
        self._stopped_at: float | None = None
        self._stop_grace = 0.0

    # --- queue -------------------------------------------------------------------------------------------

    def submit(self, step_dir: Path, *, via: str = "scan", delay: float = 0.0) -> None:
        """Queue a step folder (idempotent); it is exported once its `.metadata` is there."""
        step = discover.step_number(step_dir)
        if step is None:
            return
        with self._cond:
            if self._stopping:
                return
            item = self._pending.get(step)
            if item is None:
                self._pending[step] = _Pending(step, Path(step_dir), time.time(), via, time.monotonic() + delay)
                logger.debug("queued step-%d (%s)", step, via)
            elif delay == 0 and item.attempts == 0:
                item.not_before = min(item.not_before, time.monotonic())
            self._cond.notify_all()

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
        with self._cond:
            item = self._pending.get(step)
            if item is not None and item.step_dir == step_dir:
                del self._pending[step]
                self._record(StepOutcome(step, "vanished", str(step_dir),
                                         str(export.output_dir_for(step_dir, self.options)), item.attempts, item.via,
                                         error="deleted before its export started (keep_latest_k purge?)"))

    def _next_ready(self) -> _Pending | None:
        now = time.monotonic()
        ready = [item for item in self._pending.values() if item.not_before <= now]
        if not ready:
            return None
        item = min(ready, key=lambda i: i.step)
        del self._pending[item.step]
        return item

    # --- lifetime ----------------------------------------------------------------------------------------

    def start(self) -> None:
        """Start the worker thread (which waits for the root, starts the observer and scans)."""
        self._worker = threading.Thread(target=self._work, name="molgen-watch-export", daemon=True)
        self._worker.start()
        self._hook_thread = threading.Thread(target=self._run_hooks, name="molgen-watch-hooks", daemon=True)
        self._hook_thread.start()

    def drain(self) -> None:
        """Export what is queued (after one last scan), then stop; `join()` waits for it."""
        self.scan()
        with self._cond:
            self._draining = True
            self._cond.notify_all()

    def stop(self, grace: float | None = None) -> None:
        """Stop taking work; let the export in flight finish for `grace` seconds, then abort it (no output)."""
        grace = self.watch_options.grace if grace is None else grace
        with self._cond:
            already = self._stopping
            self._stopping = True
            self._stopped_at = time.monotonic() if self._stopped_at is None else self._stopped_at
            self._stop_grace = grace
            self._pending.clear()
            self._cond.notify_all()
        self._hooks.put(None)
        if not already:
            logger.info("stopping: no new exports; %s", f"the export in flight may finish within {grace:.0f} s"
                        if self._exporting else "none in flight")
        timer = threading.Timer(grace, self._abort)
        timer.daemon = True
        timer.start()

    def _abort(self) -> None:
        if self._exporting is not None and self._worker is not None:
            logger.warning("aborting the export of %s; its temporary folder is removed", self._exporting.name)
            _raise_in_thread(self._worker, ExportAborted)
        process = self._hook_process
        if process is not None and process.poll() is None:
            process.kill()

    def join(self, timeout: float | None = None) -> bool:
        """Wait for the worker (and the hooks it queued) to finish; True when they did within `timeout`."""
        deadline = None if timeout is None else time.monotonic() + timeout
        for thread in (self._worker, self._hook_thread):
            if thread is not None:
                thread.join(None if deadline is None else max(0.0, deadline - time.monotonic()))
        return not any(t is not None and t.is_alive() for t in (self._worker, self._hook_thread))

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
        self._draining = True
        self.submit(Path(step_dir).absolute(), via="hook")
        self._loop()
        while not self._hooks.empty():
            job = self._hooks.get_nowait()
            if job is not None:
                self._run_hook(*job)
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
            self._hooks.put(None)

    def _loop(self) -> None:
        while True:
            item = self._take()
            if item is None:
                return
            self._in_flight = item.step
            try:
                self._process(item)
            finally:
                self._in_flight = None

    def _wait_for_root(self) -> bool:
        announced = False
        while not self.checkpoint_root.is_dir():
            if self.watch_options.once:
                logger.warning("%s does not exist; nothing to export", self.checkpoint_root)
                return False
            if not announced:
                logger.info("waiting for %s to appear", self.checkpoint_root)
                announced = True
            with self._cond:
                if self._stopping or (self._draining and not self._pending):
                    return False
                self._cond.wait(0.5)
            self._check_until_pid()
        return True

    def _take(self) -> _Pending | None:
        while True:
            with self._cond:
                if self._stopping:
                    return None
                item = self._next_ready()
                if item is not None:
                    return item
                if self._draining and not self._pending:
                    return None
                waits = [i.not_before - time.monotonic() for i in self._pending.values()]
                self._cond.wait(max(0.01, min([0.5, *waits])))
            self._check_until_pid()
            rescan = self.watch_options.rescan
            if rescan and not self._draining and time.monotonic() - self._last_scan > rescan:
                self.scan()

    def _check_until_pid(self) -> None:
        pid = self.watch_options.until_pid
        if pid is not None and not self._draining and not process_alive(pid):
            logger.info("process %d has ended; exporting what is left, then exiting", pid)
            self.drain()

    def _start_observer(self) -> None:
        from watchdog.events import FileSystemEventHandler
        from watchdog.observers import Observer
        from watchdog.observers.polling import PollingObserver

        interval = polling_interval(self.checkpoint_root, self.watch_options.poll)
        watcher = self

        class Handler(FileSystemEventHandler):
            def on_any_event(self, event):
                try:
                    watcher._on_event(event)
                except Exception:  # the observer thread must survive anything
                    logger.exception("cannot handle %r", event)

        if interval is None:
            self._observer, self.mode = Observer(), "inotify"
        else:
            self._observer, self.mode = PollingObserver(timeout=interval), "poll"
        self._observer.schedule(Handler(), str(self.checkpoint_root), recursive=True)
        self._observer.daemon = True
        self._observer.start()
        fstype = filesystem_type(self.checkpoint_root)
        logger.info("watching %s (%s) with %s; exports go to %s", self.checkpoint_root, fstype,
                    "inotify" if interval is None else f"polling every {interval:g} s", self.export_root)

    def _on_event(self, event) -> None:
        """Observer thread: turn an event into a queued step; never blocks, never reads checkpoint data."""
        kind = event.event_type
        if kind not in ("created", "moved", "closed", "deleted"):
            return  # opened/closed_no_write/modified: our own reads and DCP's writes in progress
        path = event.dest_path if kind == "moved" else event.src_path
        found = step_dir_for_event(self.checkpoint_root, os.fsdecode(path))
        if found is None:
            return
        step_dir, what = found
        if kind == "deleted":
            if what == "dir":
                self._forget(step_dir)
            return
        if what == "metadata":
            self.submit(step_dir, via=self.mode, delay=CREATED_SETTLE_SECONDS if kind == "created" else 0.0)
        elif kind in ("created", "moved") and (step_dir / discover.METADATA_FILE).exists():
            self.submit(step_dir, via=self.mode)

    def _record(self, outcome: StepOutcome) -> None:
        self.outcomes.append(outcome)
        if outcome.status in ("exported", "skipped", "vanished", "gave-up"):
            self._finished.add(outcome.step)
        _append_journal(self.export_root, {"event": "step", **outcome.to_json()})
        level = logging.WARNING if outcome.status in ("failed", "gave-up") else logging.INFO
        logger.log(level, "step-%d %s%s", outcome.step, outcome.status,
                   f": {outcome.error.splitlines()[0]}" if outcome.error else "")
        if self.on_outcome is not None:
            try:
                self.on_outcome(outcome)
            except Exception:  # a printing callback must never stop the watcher
                logger.exception("on_outcome callback failed")

    def _process(self, item: _Pending) -> None:
        from filelock import FileLock, Timeout

        step_dir, options = item.step_dir, self.options
        output_dir = export.output_dir_for(step_dir, options)

        def outcome(status: str, **extra) -> StepOutcome:
            return StepOutcome(item.step, status, str(step_dir), str(output_dir), item.attempts, item.via, **extra)

        if not step_dir.is_dir():
            self._record(outcome("vanished", error="deleted before its export started (keep_latest_k purge?)"))
            return
        if not (step_dir / discover.METADATA_FILE).is_file():
            logger.debug("step-%d has no .metadata yet; waiting for it", item.step)
            return
        if export.export_state(step_dir, options) == "exported":
            if item.step in self._finished:  # a late event for a step this watcher already handled
                logger.debug("step-%d already handled in this session", item.step)
            else:
                self._record(outcome("skipped"))
            return
        if item.attempts == 0 and self._gave_up_before(step_dir, output_dir):
            self._record(outcome("gave-up", error=f"gave up in an earlier run; delete "
                                                  f"{failure_record_path(output_dir)} to try again"))
            return
        output_dir.parent.mkdir(parents=True, exist_ok=True)
        # Held across check-then-export, so a second watcher cannot start once this one has finished.
        claim = FileLock(str(output_dir.parent / f".{output_dir.name}.watch.lock"))
        try:
            claim.acquire(timeout=0)
        except Timeout:
            self._requeue_locked(item, outcome)
            return
        try:
            self._export_claimed(item, step_dir, output_dir, outcome)
        finally:
            claim.release()

    def _gave_up_before(self, step_dir: Path, output_dir: Path) -> bool:
        record = read_failure_record(output_dir)
        if not record or record.get("attempts", 0) <= self.watch_options.retries:
            return False
        try:
            return record.get("source_fingerprint") == export.source_fingerprint(step_dir)
        except OSError:
            return False

    def _requeue_locked(self, item: _Pending, outcome: Callable[..., StepOutcome]) -> None:
        if not item.locked:
            item.locked = True
            self._record(outcome("locked", error=f"another process is exporting it; looking again every "
                                                 f"{self.watch_options.locked_recheck:g} s"))
        with self._cond:
            if not self._stopping and item.step not in self._pending:
                item.not_before = time.monotonic() + self.watch_options.locked_recheck
                self._pending[item.step] = item

    def _export_claimed(self, item: _Pending, step_dir: Path, output_dir: Path,
                        outcome: Callable[..., StepOutcome]) -> None:
        if export.export_state(step_dir, self.options) == "exported":
            self._record(outcome("skipped"))
            return
        try:
            mtime = (step_dir / discover.METADATA_FILE).stat().st_mtime
        except FileNotFoundError:
            self._record(outcome("vanished", error="deleted before its export started (keep_latest_k purge?)"))
            return
        started = time.time()
        latency = {"detect_latency_s": round(max(0.0, item.seen_at - mtime), 3),
                   "start_latency_s": round(max(0.0, started - mtime), 3)}
        with self._cond:
            waiting = sorted(self._pending)
        logger.info("step-%d: export starts %.2f s after .metadata appeared (seen after %.2f s, via %s)%s",
                    item.step, latency["start_latency_s"], latency["detect_latency_s"], item.via,
                    f"; {len(waiting)} more queued (step-{waiting[0]} first)" if waiting else "")
        self._exporting = step_dir
        try:
            if self.before_export is not None:
                self.before_export(step_dir)
            report = export.export_step(step_dir, self.options)
        except ExportAborted:
            self._exporting = None
            self._record(outcome("aborted", error="stopped by a signal; nothing was published", **latency))
            raise
        except StepLockedError:
            self._exporting = None
            self._requeue_locked(item, outcome)
            return
        except Exception as exc:  # noqa: BLE001 - any failure is recorded and retried, never fatal
            self._exporting = None
            duration = round(time.time() - started, 3)
            if isinstance(exc, SourceVanishedError) or not (step_dir / discover.METADATA_FILE).exists():
                self._record(outcome("vanished", duration_s=duration, error=f"deleted while it was read "
                                     f"(keep_latest_k purge?); nothing was published ({exc})", **latency))
                return
            if not isinstance(exc, MolgenExportError):
                logger.debug("unexpected error exporting %s", step_dir, exc_info=True)
            self._failed(item, step_dir, output_dir, exc, outcome, duration, latency)
            return
        self._exporting = None
        failure_record_path(output_dir).unlink(missing_ok=True)
        result = outcome("exported", duration_s=round(time.time() - started, 3), report=report, **latency)
        self._record(result)
        if self.watch_options.on_export:
            self._hooks.put((item.step, step_dir, output_dir))

    def _failed(self, item: _Pending, step_dir: Path, output_dir: Path, exc: Exception,
                outcome: Callable[..., StepOutcome], duration: float, latency: dict) -> None:
        item.attempts += 1
        error = f"{type(exc).__name__}: {exc}"
        retry = item.attempts <= self.watch_options.retries
        delay = self.watch_options.retry_backoff * 2 ** (item.attempts - 1)
        try:
            fingerprint = export.source_fingerprint(step_dir)
        except OSError:
            fingerprint = None
        record = {"step": item.step, "step_dir": str(step_dir), "attempts": item.attempts, "error": error,
                  "error_type": type(exc).__name__, "time": time.time(), "host": socket.gethostname(),
                  "source_fingerprint": fingerprint, "next_retry_in_s": delay if retry else None,
                  "gave_up": not retry}
        _write_json_atomic(failure_record_path(output_dir), record)
        self._record(outcome("failed" if retry else "gave-up", duration_s=duration, error=error, **latency))
        if retry:
            logger.warning("step-%d: attempt %d failed; retrying in %.0f s", item.step, item.attempts, delay)
            with self._cond:
                if not self._stopping and item.step not in self._pending:
                    item.not_before = time.monotonic() + delay
                    self._pending[item.step] = item

    # --- on_export hooks ---------------------------------------------------------------------------------

    def _run_hooks(self) -> None:
        while True:
            job = self._hooks.get()
            if job is None:
                return
            if self._stopping:
                logger.info("step-%d: on_export not run (stopping)", job[0])
                continue
            self._run_hook(*job)

    def _run_hook(self, step: int, step_dir: Path, output_dir: Path) -> None:
        template = self.watch_options.on_export or ""
        entry = {"event": "on_export", "step": step, "hf_dir": str(output_dir), "command": template}
        started = time.monotonic()
        try:
            argv = [arg.format(hf_dir=output_dir, step=step, step_dir=step_dir, python=sys.executable,
                               report=output_dir / export.REPORT_FILE) for arg in shlex.split(template)]
            entry["argv"] = argv
            self._hook_process = subprocess.Popen(argv, stdout=subprocess.PIPE, stderr=subprocess.STDOUT,
                                                  stdin=subprocess.DEVNULL)
            try:
                out, _ = self._hook_process.communicate(timeout=self.watch_options.on_export_timeout)
            except subprocess.TimeoutExpired:
                self._hook_process.kill()
                out, _ = self._hook_process.communicate()
                entry["error"] = f"killed after {self.watch_options.on_export_timeout:g} s"
            entry["exit_code"] = self._hook_process.returncode
            entry["output_tail"] = out.decode(errors="replace")[-2000:]
        except (OSError, ValueError, KeyError, IndexError) as exc:
            entry["exit_code"], entry["error"] = None, f"{type(exc).__name__}: {exc}"
        finally:
            self._hook_process = None
        entry["duration_s"] = round(time.monotonic() - started, 3)
        _append_journal(self.export_root, entry)
        ok = entry.get("exit_code") == 0
        logger.log(logging.INFO if ok else logging.WARNING, "step-%d on_export exited %s%s", step,
                   entry.get("exit_code"), f" ({entry['error']})" if entry.get("error") else "")


# --- CLI ---------------------------------------------------------------------------------------------------

WATCH_EPILOG = """\
examples:
  molgen-export watch outputs/checkpoint
  molgen-export watch /lustre/run7/checkpoint --poll 30 --dtype bfloat16 --output /data/hf/run7
  molgen-export watch outputs/checkpoint --once
  molgen-export watch outputs/checkpoint --until-pid $TRAINER_PID --threads 4 --nice 10
  molgen-export watch outputs/checkpoint --on-export "python -m hooks.on_export_smoke {hf_dir} {step}"

Exports go to <checkpoint_root>-hf/step-N-hf/ (or --output). Each outcome is appended to
<export_root>/.molgen-watch.jsonl; a failing step leaves <export_root>/.step-N-hf.failed.json and is retried
--retries times with back-off. SIGINT/SIGTERM stop it cleanly (exit 0; a second signal aborts at once).
exit codes: 0 stopped or done; 1 with --once/--until-pid, some step failed for good; 2 bad usage."""


def add_watch_arguments(parser: argparse.ArgumentParser) -> None:
    """Flags of `molgen-export watch`."""
    from molgen_export import cli

    defaults = WatchOptions()
    parser.add_argument("checkpoint_root", type=Path, help="the checkpoint folder holding step-N folders")
    group = parser.add_argument_group("watch options")
    group.add_argument("--poll", default="auto", help="auto (default: polling on NFS/Lustre/GPFS/FUSE, inotify "
                       "elsewhere), off (inotify), or a polling interval in seconds")
    group.add_argument("--once", action="store_true", help="export the complete steps there now, then exit")
    group.add_argument("--until-pid", type=int, help="after this process ends, export what is left and exit")
    group.add_argument("--nice", type=int, default=defaults.nice, help=f"niceness of the exports (default {defaults.nice})")
    group.add_argument("--on-export", help='command run after each export, e.g. "python eval.py {hf_dir} {step}"')
    group.add_argument("--retries", type=int, default=defaults.retries, help="retries of a failed step (default 3)")
    group.add_argument("--retry-backoff", type=float, default=defaults.retry_backoff,
                       help="seconds before the first retry, doubling after (default 30)")
    group.add_argument("--grace", type=float, default=defaults.grace,
                       help="on SIGTERM, seconds the export in flight may take to finish before it is aborted")
    group.add_argument("--rescan", type=float, default=defaults.rescan, help="seconds between full rescans (0: off)")
    cli.add_export_options(parser)
    parser.set_defaults(threads=4)
    cli.add_verbosity(parser)


def watch_options_from_args(args: argparse.Namespace) -> WatchOptions:
    """WatchOptions from parsed flags (same spelling: --retry-backoff <-> retry_backoff)."""
    names = WatchOptions.__dataclass_fields__
    return WatchOptions(**{n: getattr(args, n) for n in names if getattr(args, n, None) is not None})


def describe_outcome(outcome: StepOutcome) -> str:
    """One line per outcome for the terminal."""
    from molgen_export import cli

    latency = (f"  latency {outcome.start_latency_s:.2f} s ({outcome.detected_via})"
               if outcome.start_latency_s is not None else "")
    if outcome.status == "exported" and outcome.report is not None:
        return cli.summary_line(outcome.report) + latency
    detail = f"  {outcome.error.splitlines()[0]}" if outcome.error else ""
    return f"step-{outcome.step}  {outcome.status}{detail}"


def run_watch(args: argparse.Namespace) -> int:
    """`molgen-export watch`: run a Watcher in the foreground until a signal (or --once/--until-pid)."""
    from molgen_export import cli

    options = cli.options_from_args(args)
    watch_options = watch_options_from_args(args)
    watcher = Watcher(args.checkpoint_root, options, watch_options,
                      on_outcome=lambda o: print(describe_outcome(o), flush=True))
    signals = {"count": 0}

    def on_signal(signum, _frame):
        signals["count"] += 1
        watcher.stop(grace=watch_options.grace if signals["count"] == 1 else 0.0)

    previous = {s: signal.signal(s, on_signal) for s in (signal.SIGINT, signal.SIGTERM)}
    try:
        print(f"watching {watcher.checkpoint_root} -> {watcher.export_root}"
              + (" (once)" if watch_options.once else ""), flush=True)
        outcomes = watcher.run()
    finally:
        for signum, handler in previous.items():
            signal.signal(signum, handler)
    tally: dict[str, int] = {}
    for outcome in outcomes:
        tally[outcome.status] = tally.get(outcome.status, 0) + 1
    print(f"watch ended ({watcher.mode}): " + (", ".join(f"{n} {s}" for s, n in sorted(tally.items())) or "nothing to do"),
          flush=True)
    failed = {o.step for o in outcomes if o.status == "gave-up"} - {o.step for o in outcomes if o.status == "exported"}
    if failed and signals["count"] == 0 and (watch_options.once or watch_options.until_pid):
        return cli.EXIT_FAILED
    return cli.EXIT_OK
