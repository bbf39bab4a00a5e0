"""What the watcher keeps on disk between runs: the journal, failure records and per-step claim locks.

All of it lives in the export root (outside the checkpoint folder, where TorchTitan's purge and resume scan
cannot see it): `.molgen-watch.jsonl` (one JSON line per outcome and per hook run, appended by every watcher
exporting into this root), `.step-N-hf.failed.json` (why the last attempts at a step failed) and
`.step-N-hf.watch.lock` (held across check-then-export so two watchers never both start one step).
A restarted watcher reads these to export exactly the steps still missing.
"""

from __future__ import annotations

import json
import logging
import os
import socket
import time
from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import asdict, dataclass, field
from pathlib import Path

from molgen_export.pipeline import export
from molgen_export.options import ExportOptions

logger = logging.getLogger(__name__)

JOURNAL_FILE = ".molgen-watch.jsonl"
"""One JSON line per outcome and per hook run, appended by every watcher exporting into this root."""


@dataclass(frozen=True)
class StepOutcome:
    """What the watcher did with one step, once (one journal line)."""

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
        """The journal fields (everything but the report, which is in the export's own folder)."""
        data = asdict(self)
        data.pop("report")
        return data


def export_root_for(checkpoint_root: Path, options: ExportOptions) -> Path:
    """The folder `step-N-hf/` exports of this checkpoint root go to."""
    return export.output_dir_for(Path(checkpoint_root) / "step-0", options).parent


def append_journal(export_root: Path, entry: dict) -> None:
    """Append one entry (with time, host and pid) to the export root's journal; a write error is only logged."""
    entry = {"time": time.time(), "host": socket.gethostname(), "pid": os.getpid(), **entry}
    try:
        export_root.mkdir(parents=True, exist_ok=True)
        with open(export_root / JOURNAL_FILE, "a", encoding="utf-8") as f:
            f.write(json.dumps(entry) + "\n")
    except OSError as exc:
        logger.warning("cannot append to the watch journal in %s: %s", export_root, exc)


def read_journal(export_root: Path) -> list[dict]:
    """Every entry of the watch journal of an export root (empty when there is none)."""
    path = Path(export_root) / JOURNAL_FILE
    if not path.is_file():
        return []
    return [json.loads(line) for line in path.read_text().splitlines() if line.strip()]


def failure_record_path(output_dir: Path) -> Path:
    """`<export_root>/.step-N-hf.failed.json`: why the last attempts at this step failed."""
    return output_dir.parent / f".{output_dir.name}.failed.json"


def read_failure_record(output_dir: Path) -> dict | None:
    """The failure record of a step's output, or None when there is none (or it is unreadable)."""
    try:
        return json.loads(failure_record_path(output_dir).read_text())
    except (OSError, ValueError):
        return None


def write_failure_record(output_dir: Path, record: dict) -> None:
    """Replace the failure record of a step's output in one rename; a write error is only logged."""
    path = failure_record_path(output_dir)
    temp = path.parent / f"{path.name}.tmp-{os.getpid()}"
    try:
        temp.write_text(json.dumps(record, indent=2) + "\n")
        os.replace(temp, path)
    except OSError as exc:
        logger.warning("cannot write %s: %s", path, exc)


def gave_up_before(step_dir: Path, output_dir: Path, retries: int) -> bool:
    """True when an earlier run spent more than `retries` retries on this very save (same source fingerprint)."""
    record = read_failure_record(output_dir)
    if not record or record.get("attempts", 0) <= retries:
        return False
    try:
        return record.get("source_fingerprint") == export.source_fingerprint(step_dir)
    except OSError:
        return False


@contextmanager
def step_claim(output_dir: Path) -> Iterator[bool]:
    """Try to hold `.step-N-hf.watch.lock` beside the output, without waiting.

    Held across check-then-export, so a second watcher cannot start a step once this one has finished it.
    The kernel releases the lock when the process dies.

    Args:
        output_dir: the step's `step-N-hf` folder (its parent is created).

    Yields:
        True while this process holds the claim, False when another process holds it.
    """
    from molgen_export.hf.publish import try_lock

    output_dir.parent.mkdir(parents=True, exist_ok=True)
    with try_lock(output_dir.parent / f".{output_dir.name}.watch.lock") as held:
        yield held
