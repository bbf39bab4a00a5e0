"""The watcher's `--on-export` commands: run after each successful export, in their own thread, recorded.

A command (e.g. an eval) gets `{hf_dir}`, `{step}`, `{step_dir}`, `{report}`, `{export_root}`, `{eval_dir}`
(`<export_root>/evals/step-N/`, made when named) and `{python}` filled in, runs with a timeout in its own process
group (killed whole), and its exit status and output tail go to the journal. Its failure never stops the watcher.
A template starting with `@` is a recipe (`@smoke`, `@lm-eval ...`; see `evals`).
"""

from __future__ import annotations

import logging
import os
import queue
import shlex
import signal
import subprocess
import sys
import threading
import time
from collections.abc import Callable
from pathlib import Path

from molgen_export import evals
from molgen_export.pipeline import export
from molgen_export.watch.journal import append_journal

logger = logging.getLogger(__name__)


class ExportHooks:
    """Runs an `on_export` command template for each exported step, one at a time, in a daemon thread.

    Args:
        template: the command line, split with `shlex`, or an `@recipe`; None runs nothing.
        export_root: where the journal is.
        timeout: seconds a command may run before it is killed.
        stopping: returns True once the watcher is stopping; queued commands are then skipped.
    """

    def __init__(self, template: str | None, export_root: Path, timeout: float, stopping: Callable[[], bool],
                 nice: int = 0):
        self.template = template
        self.command = evals.expand_recipe(template) if template else None  # an unknown @recipe fails here
        self.export_root = export_root
        self.timeout = timeout
        self.stopping = stopping
        self._jobs: queue.Queue = queue.Queue()
        self._thread: threading.Thread | None = None
        self._process: subprocess.Popen | None = None
        self.nice = nice
        """Niceness added to each hook process (an lm-eval run must not take the CPU from training)."""

    @property
    def thread(self) -> threading.Thread | None:
        """The thread running the commands, once started."""
        return self._thread

    def start(self) -> None:
        """Start the thread that runs queued commands until `close()`."""
        self._thread = threading.Thread(target=self._run_queued, name="molgen-watch-hooks", daemon=True)
        self._thread.start()

    def add(self, step: int, step_dir: Path, output_dir: Path) -> None:
        """Queue the command for an exported step (nothing when there is no template)."""
        if self.template:
            self._jobs.put((step, step_dir, output_dir))

    def close(self) -> None:
        """Let the thread finish: commands queued before this still run unless the watcher is stopping."""
        self._jobs.put(None)

    def kill_running(self) -> None:
        """Kill the command running now, if any."""
        process = self._process
        if process is not None and process.poll() is None:
            _kill_group(process)

    def run_queued_here(self) -> None:
        """Run what is queued in the caller's thread (for one-shot use without `start()`)."""
        while not self._jobs.empty():
            job = self._jobs.get_nowait()
            if job is not None:
                self.run(*job)

    def _run_queued(self) -> None:
        while True:
            job = self._jobs.get()
            if job is None:
                return
            if self.stopping():
                logger.info("step-%d: on_export not run (stopping)", job[0])
                continue
            self.run(*job)

    def run(self, step: int, step_dir: Path, output_dir: Path) -> None:
        """Run the command for one step now, wait for it (up to the timeout) and journal the result."""
        template, command = self.template or "", self.command or ""
        entry = {"event": "on_export", "step": step, "hf_dir": str(output_dir), "command": template}
        started = time.monotonic()
        try:
            eval_dir = evals.eval_dir_for(self.export_root, step)
            if "{eval_dir}" in command:
                eval_dir.mkdir(parents=True, exist_ok=True)
            argv = [arg.format(hf_dir=output_dir, step=step, step_dir=step_dir, python=sys.executable,
                               report=output_dir / export.REPORT_FILE, export_root=self.export_root,
                               eval_dir=eval_dir) for arg in shlex.split(command)]
            entry["argv"] = argv
            self._process = subprocess.Popen(argv, stdout=subprocess.PIPE, stderr=subprocess.STDOUT,
                                             stdin=subprocess.DEVNULL, start_new_session=True)
            _lower_priority(self._process.pid, self.nice)
            try:
                out, _ = self._process.communicate(timeout=self.timeout)
            except subprocess.TimeoutExpired:
                _kill_group(self._process)
                out, _ = self._process.communicate()
                entry["error"] = f"killed after {self.timeout:g} s"
            entry["exit_code"] = self._process.returncode
            entry["output_tail"] = out.decode(errors="replace")[-2000:]
        except (OSError, ValueError, KeyError, IndexError) as exc:
            entry["exit_code"], entry["error"] = None, f"{type(exc).__name__}: {exc}"
        finally:
            self._process = None
        entry["duration_s"] = round(time.monotonic() - started, 3)
        append_journal(self.export_root, entry)
        ok = entry.get("exit_code") == 0
        logger.log(logging.INFO if ok else logging.WARNING, "step-%d on_export exited %s%s", step,
                   entry.get("exit_code"), f" ({entry['error']})" if entry.get("error") else "")


def _lower_priority(pid: int, nice: int) -> None:
    """Run the hook `nice` steps below this process (its main thread), whichever thread started it."""
    if nice <= 0:
        return
    try:
        target = min(19, os.getpriority(os.PRIO_PROCESS, os.getpid()) + nice)
        if os.getpriority(os.PRIO_PROCESS, pid) < target:
            os.setpriority(os.PRIO_PROCESS, pid, target)
    except OSError as exc:  # the hook already ended, or not permitted
        logger.debug("cannot lower the priority of hook %d: %s", pid, exc)


def _kill_group(process: subprocess.Popen) -> None:
    """Kill a command and whatever it started (it runs in its own session: lm-eval/vLLM start workers)."""
    try:
        os.killpg(process.pid, signal.SIGKILL)
    except (ProcessLookupError, PermissionError):
        process.kill()
