"""The watcher's schedule: steps waiting to be exported, lowest step first, each not before its time.

The observer thread and scans add steps; the one export thread takes them. Retries and steps another process
holds go back in with a delay. Stopping empties the queue; draining lets the export thread finish what is queued
and then return.
"""

from __future__ import annotations

import logging
import threading
import time
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path

logger = logging.getLogger(__name__)


@dataclass
class QueuedStep:
    """One step waiting for its export, and what happened to it so far in this session."""

    step: int
    step_dir: Path
    seen_at: float
    """Wall-clock time the watcher first saw the step (for the detect latency)."""
    via: str
    """`scan`, `inotify`, `poll` or `hook`."""
    not_before: float = 0.0
    """`time.monotonic()` before which the step is not taken."""
    attempts: int = 0
    """Failed attempts so far."""
    locked: bool = False
    """Another process held the step once already (recorded once, not at every look)."""


class StepQueue:
    """Thread-safe queue of `QueuedStep`s keyed by step number.

    Args:
        draining: start draining (take what is queued, then end), as `--once` does.
    """

    def __init__(self, draining: bool = False):
        self._items: dict[int, QueuedStep] = {}
        self._cond = threading.Condition()
        self.stopping = False
        self.draining = draining

    def add(self, step: int, step_dir: Path, via: str, delay: float = 0.0) -> None:
        """Queue a step (idempotent); an undelayed add brings forward a step still waiting to settle."""
        with self._cond:
            if self.stopping:
                return
            item = self._items.get(step)
            if item is None:
                self._items[step] = QueuedStep(step, Path(step_dir), time.time(), via, time.monotonic() + delay)
                logger.debug("queued step-%d (%s)", step, via)
            elif delay == 0 and item.attempts == 0:
                item.not_before = min(item.not_before, time.monotonic())
            self._cond.notify_all()

    def requeue(self, item: QueuedStep, delay: float) -> None:
        """Put a taken step back, to be taken again after `delay` seconds (not while stopping)."""
        with self._cond:
            if not self.stopping and item.step not in self._items:
                item.not_before = time.monotonic() + delay
                self._items[item.step] = item

    def forget(self, step: int, step_dir: Path) -> QueuedStep | None:
        """Drop a queued step whose folder was deleted; returns it, or None when it was not queued."""
        with self._cond:
            item = self._items.get(step)
            if item is not None and item.step_dir == step_dir:
                del self._items[step]
                return item
            return None

    def waiting(self) -> list[int]:
        """The step numbers queued now, lowest first."""
        with self._cond:
            return sorted(self._items)

    def stop(self) -> bool:
        """Empty the queue and refuse new steps; returns True when it was already stopping."""
        with self._cond:
            already = self.stopping
            self.stopping = True
            self._items.clear()
            self._cond.notify_all()
            return already

    def drain(self) -> None:
        """From now on, `take` returns None once the queue is empty."""
        with self._cond:
            self.draining = True
            self._cond.notify_all()

    def finished(self) -> bool:
        """True when stopping, or draining with nothing left."""
        with self._cond:
            return self.stopping or (self.draining and not self._items)

    def wait(self, timeout: float) -> bool:
        """Wait up to `timeout` seconds for a change; False at once when `finished()`."""
        with self._cond:
            if self.stopping or (self.draining and not self._items):
                return False
            self._cond.wait(timeout)
            return True

    def take(self, on_wake: Callable[[], None]) -> QueuedStep | None:
        """Block until a step is ready and return it, lowest step first; None when stopping or drained.

        Args:
            on_wake: called (without the lock held) each time the wait ends empty-handed, at least every 0.5 s.
        """
        while True:
            with self._cond:
                if self.stopping:
                    return None
                item = self._next_ready()
                if item is not None:
                    return item
                if self.draining and not self._items:
                    return None
                waits = [i.not_before - time.monotonic() for i in self._items.values()]
                self._cond.wait(max(0.01, min([0.5, *waits])))
            on_wake()

    def _next_ready(self) -> QueuedStep | None:
        now = time.monotonic()
        ready = [item for item in self._items.values() if item.not_before <= now]
        if not ready:
            return None
        item = min(ready, key=lambda i: i.step)
        del self._items[item.step]
        return item
