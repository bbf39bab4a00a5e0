"""Where the watcher's events come from: the filesystem type, inotify or polling, and which paths name a step.

The watcher queues a step when DCP renames its `.metadata` into place; this module decides how to observe that
(inotify, or a polling observer on network filesystems where inotify misses other nodes' writes) and turns a
filesystem event into "queue this step" or "forget this step", ignoring our own output, locks and temp folders.
"""

from __future__ import annotations

import logging
import os
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path

from molgen_export.dcp import discover

logger = logging.getLogger(__name__)

NETWORK_FILESYSTEMS = frozenset({
    "nfs", "nfs4", "lustre", "gpfs", "cifs", "smb", "smb2", "smb3", "smbfs", "ceph", "cephfs", "glusterfs",
    "beegfs", "panfs", "wekafs", "9p", "afs", "ocfs2", "gfs2", "davfs", "virtiofs", "orangefs"})
"""Filesystems where inotify does not see writes made by other machines (watchdog#504, #395)."""

DEFAULT_POLL_SECONDS = 10.0
CREATED_SETTLE_SECONDS = 0.2
"""A `.metadata` that was *created* (copied in) rather than renamed into place gets this long to be closed."""


@dataclass(frozen=True)
class StepEvent:
    """What a filesystem event means for the watcher's queue."""

    action: str
    """`submit` (the step is complete, or just became so) or `forget` (its folder was deleted)."""
    step_dir: Path
    delay: float = 0.0
    """Seconds to wait before exporting (a created `.metadata` may still be being written)."""


def filesystem_type(path: Path, mounts_file: Path = Path("/proc/mounts")) -> str:
    """The type of the filesystem holding `path` (or its nearest existing parent), from `/proc/mounts`.

    Args:
        path: any path; it need not exist yet.
        mounts_file: the mount table to read.

    Returns:
        The filesystem type (`ext4`, `nfs4`, `lustre`, ...), or `unknown` when the table cannot be read.
    """
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
    """Resolve `poll` into a polling interval in seconds, or None for inotify.

    Args:
        checkpoint_root: the folder to watch (its filesystem decides `auto`).
        poll: `auto`, `off`, or seconds as a string (as `WatchOptions.poll` holds it).
        mounts_file: the mount table to read.
    """
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


def step_event(checkpoint_root: Path, event) -> StepEvent | None:
    """What a watchdog event means for the queue, or None when it means nothing.

    Only `created`, `moved` (DCP's rename of `.metadata`), `closed` and `deleted` events count; opened, modified
    and closed-without-write events are our own reads and DCP's writes in progress. Never reads checkpoint data.

    Args:
        checkpoint_root: the watched folder.
        event: a `watchdog.events.FileSystemEvent`.
    """
    kind = event.event_type
    if kind not in ("created", "moved", "closed", "deleted"):
        return None
    path = event.dest_path if kind == "moved" else event.src_path
    found = step_dir_for_event(checkpoint_root, os.fsdecode(path))
    if found is None:
        return None
    step_dir, what = found
    if kind == "deleted":
        return StepEvent("forget", step_dir) if what == "dir" else None
    if what == "metadata":
        return StepEvent("submit", step_dir, CREATED_SETTLE_SECONDS if kind == "created" else 0.0)
    if kind in ("created", "moved") and (step_dir / discover.METADATA_FILE).exists():
        return StepEvent("submit", step_dir)
    return None


def start_observer(checkpoint_root: Path, poll: str, on_event: Callable[[StepEvent], None]):
    """Start a daemon watchdog observer on `checkpoint_root` that calls `on_event` with each meaningful event.

    Args:
        checkpoint_root: an existing folder, watched recursively.
        poll: `auto`, `off` or seconds (see `polling_interval`).
        on_event: called in the observer thread; an exception it raises is logged, never fatal.

    Returns:
        `(observer, interval)`: the started observer (call `.stop()` on it) and the polling interval in seconds,
        None for inotify.
    """
    from watchdog.events import FileSystemEventHandler
    from watchdog.observers import Observer
    from watchdog.observers.polling import PollingObserver

    interval = polling_interval(checkpoint_root, poll)

    class Handler(FileSystemEventHandler):
        def on_any_event(self, event):
            try:
                found = step_event(checkpoint_root, event)
                if found is not None:
                    on_event(found)
            except Exception:  # the observer thread must survive anything
                logger.exception("cannot handle %r", event)

    observer = Observer() if interval is None else PollingObserver(timeout=interval)
    observer.schedule(Handler(), str(checkpoint_root), recursive=True)
    observer.daemon = True
    observer.start()
    return observer, interval
