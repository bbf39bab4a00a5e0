"""Cooperative cancellation: a token one thread sets and the export polls between pieces of work.

The export checks the token at points where stopping is safe (between row pieces of the weight stream, before the
logit gate, between its layers, before publishing), so an abort never lands inside a `finally`, a held lock or a
half-written file, and the export's own clean-up (writer aborted, temporary folder removed, lock released) runs
as for any other error.
"""

from __future__ import annotations

import threading
import time

from molgen_export.errors import ExportAborted


class CancelToken:
    """A request to stop, set once from any thread, seen by `check()` in the export's thread."""

    def __init__(self) -> None:
        self._event = threading.Event()
        self.reason = ""
        self.requested_at: float | None = None
        """`time.monotonic()` of the first request (to measure how fast the export stops)."""

    def request(self, reason: str = "cancelled") -> None:
        """Ask the export to stop at its next check; later requests keep the first reason."""
        if not self._event.is_set():
            self.reason = reason
            self.requested_at = time.monotonic()
            self._event.set()

    @property
    def requested(self) -> bool:
        return self._event.is_set()

    def check(self, where: str = "") -> None:
        """Return at once, or raise when a stop was requested.

        Raises:
            ExportAborted: `request()` was called; `where` names the point that saw it.
        """
        if self._event.is_set():
            raise ExportAborted(self.reason, where)

    def wait(self, timeout: float | None = None) -> bool:
        """Block until a stop is requested or `timeout` passes; True when requested."""
        return self._event.wait(timeout)


def check_cancel(cancel: CancelToken | None, where: str = "") -> None:
    """`cancel.check(where)` when there is a token (the export runs without one from the CLI and the library)."""
    if cancel is not None:
        cancel.check(where)
