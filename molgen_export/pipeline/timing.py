"""Stage timings of an export or a conversion: `Timer.stage(name)` adds the seconds a block took to a dict."""

from __future__ import annotations

import logging
import time
from collections.abc import Iterator
from contextlib import contextmanager

logger = logging.getLogger(__name__)


class Timer:
    """Adds wall-clock seconds per stage into `timings` (the report's `timings` dict) and logs one INFO line each.

    Args:
        timings: stage name -> seconds, rounded to 0.1 ms; a stage entered twice adds up.
    """

    def __init__(self, timings: dict[str, float]):
        self.timings = timings

    @contextmanager
    def stage(self, name: str) -> Iterator[None]:
        """Time the block as stage `name` (also when it raises)."""
        start = time.perf_counter()
        try:
            yield
        finally:
            self.timings[name] = round(self.timings.get(name, 0.0) + time.perf_counter() - start, 4)
            logger.info("%-9s %.2f s", name, time.perf_counter() - start)
