"""Publishing a folder: files written and fsynced, a hidden temporary sibling, one rename into place, stale
temporaries cleaned (`staged_folder`, the one staged publish every writer uses), and the per-folder lock
(`folder_lock` over `try_lock`) that export, watcher and conversions share."""

from __future__ import annotations

import errno
import json
import os
import shutil
import logging
import uuid
from collections.abc import Callable, Iterator
from contextlib import AbstractContextManager, contextmanager, nullcontext
from pathlib import Path

from molgen_export.errors import OutputError, StepLockedError

logger = logging.getLogger(__name__)

TEMP_PREFIX = "."
"""Temporary folders are hidden siblings (`.step-N-hf.tmp-...`) so listings and watchers skip them."""


def output_error(exc: OSError, path: Path, needed: int | None = None) -> OutputError:
    if exc.errno == errno.ENOSPC:
        need = f"; the export needs {needed / 1e9:.2f} GB there" if needed else ""
        return OutputError(f"no space left on the device holding {path}{need}", path=path,
                           hint="free space or choose another --output; the temporary output was removed")
    if exc.errno in (errno.EACCES, errno.EPERM, errno.EROFS):
        return OutputError(f"cannot write to {path}: {exc.strerror}", path=path,
                           hint="choose a writable --output folder")
    return OutputError(f"writing {path} failed: {exc}", path=path)


def write_json(path: Path, data: dict) -> None:
    """Write JSON deterministically (2-space indent, trailing newline) and fsync it."""
    write_text(path, json.dumps(data, indent=2, ensure_ascii=False) + "\n")


def write_text(path: Path, text: str) -> None:
    """Write a UTF-8 text file and fsync it."""
    try:
        with open(path, "w", encoding="utf-8") as f:
            f.write(text)
            f.flush()
            os.fsync(f.fileno())
    except OSError as exc:
        raise output_error(exc, path) from exc


def copy_files(files: list[Path], folder: Path) -> list[str]:
    """Copy files byte for byte (no re-saving through transformers) into `folder`."""
    names = []
    for source in files:
        target = folder / source.name
        try:
            shutil.copyfile(source, target)
            with open(target, "rb+") as f:
                os.fsync(f.fileno())
        except OSError as exc:
            raise output_error(exc, target) from exc
        names.append(source.name)
    return names


def make_temp_dir(output_root: Path, final_name: str) -> Path:
    """Create the hidden temporary sibling the export is written into."""
    try:
        output_root.mkdir(parents=True, exist_ok=True)
        temp = output_root / f"{TEMP_PREFIX}{final_name}.tmp-{os.getpid()}-{uuid.uuid4().hex[:8]}"
        temp.mkdir()
    except OSError as exc:
        raise output_error(exc, output_root) from exc
    return temp


def is_temp_name(name: str) -> bool:
    return name.startswith(TEMP_PREFIX) and (".tmp-" in name or ".old-" in name)


def remove_tree(path: Path) -> None:
    shutil.rmtree(path, ignore_errors=True)


def _fsync_dir(path: Path) -> None:
    try:
        fd = os.open(path, os.O_RDONLY)
    except OSError:
        return
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


def publish(temp_dir: Path, final_dir: Path) -> None:
    """Move the finished temporary folder into place; an older export is swapped out, then removed.

    A crash at any point leaves the old export, or none, at `final_dir`, never a mix: the folder appears by
    one rename. (Replacing needs two renames; between them `final_dir` is briefly absent.)
    """
    _fsync_dir(temp_dir)
    old = None
    if final_dir.exists():
        old = final_dir.parent / f"{TEMP_PREFIX}{final_dir.name}.old-{uuid.uuid4().hex[:8]}"
        os.rename(final_dir, old)
    try:
        os.rename(temp_dir, final_dir)
    except OSError as exc:
        if old is not None:
            os.rename(old, final_dir)
        raise output_error(exc, final_dir) from exc
    _fsync_dir(final_dir.parent)
    if old is not None:
        remove_tree(old)


def clean_stale_temp_dirs(output_root: Path, final_name: str) -> int:
    """Remove temporary folders a killed export of this step left behind; returns how many."""
    removed = 0
    if not output_root.is_dir():
        return 0
    for child in output_root.iterdir():
        if child.name.startswith(f"{TEMP_PREFIX}{final_name}.") and is_temp_name(child.name):
            pid_part = child.name.split(".tmp-")[-1].split("-")[0] if ".tmp-" in child.name else ""
            if pid_part.isdigit() and process_alive(int(pid_part)) and int(pid_part) != os.getpid():
                continue
            remove_tree(child)
            removed += 1
    return removed


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


@contextmanager
def try_lock(path: Path) -> Iterator[bool]:
    """Hold an exclusive `flock` on `path` without waiting; the file is removed again on release.

    Yields True while held, False when another process holds it. The kernel drops the lock if the process dies
    (a dead holder leaves the file, which the next holder takes over and removes). Removing the file on release
    is safe because a process that locked a file already unlinked checks that `path` still names that very file
    (same device and inode) and otherwise tries again on the new one.
    """
    import fcntl

    for _ in range(100):
        fd = os.open(path, os.O_RDWR | os.O_CREAT, 0o644)
        try:
            fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except BlockingIOError:
            os.close(fd)
            yield False
            return
        try:
            current = os.stat(path)
        except FileNotFoundError:
            current = None
        held = os.fstat(fd)
        if current is None or (current.st_dev, current.st_ino) != (held.st_dev, held.st_ino):
            os.close(fd)  # we locked a file its holder had just removed: lock the one that names `path` now
            continue
        try:
            yield True
        finally:
            try:
                os.unlink(path)
            except FileNotFoundError:
                pass
            os.close(fd)
        return
    raise OutputError(f"cannot lock {path}: it keeps being replaced", path=path,
                      hint="another process is creating and removing this lock in a loop; stop it")


@contextmanager
def folder_lock(output_dir: Path) -> Iterator[None]:
    """Hold `.<name>.lock` beside `output_dir` so two processes never write that folder at once (creates the parent).

    Raises:
        OutputError: the parent folder cannot be created.
        StepLockedError: another process holds the lock.
    """
    try:
        output_dir.parent.mkdir(parents=True, exist_ok=True)
    except OSError as exc:
        raise OutputError(f"cannot create the export folder {output_dir.parent}: {exc.strerror or exc}",
                          path=output_dir.parent, hint="choose a writable --output folder") from exc
    with try_lock(output_dir.parent / f".{output_dir.name}.lock") as held:
        if not held:
            raise StepLockedError(f"{output_dir.name} is being exported by another process", path=output_dir,
                                  hint="wait for it to finish; the export lock is released when that process ends")
        yield


@contextmanager
def staged_folder(output_dir: Path, *,
                  publishing: Callable[[], AbstractContextManager] | None = None) -> Iterator[Path]:
    """The one staged publish: a fresh hidden temporary sibling of `output_dir` (temporaries of killed writers
    removed first) is yielded; when the block ends normally it is published as `output_dir` with one rename
    (`publish`), when the block raises it is removed. Call it under `folder_lock(output_dir)`.

    Args:
        output_dir: the folder to create or replace.
        publishing: makes a context manager entered around the rename (the export times it as its `publish` stage).

    Raises:
        OutputError: the temporary folder cannot be made, or the rename fails (the temporary is removed).
    """
    clean_stale_temp_dirs(output_dir.parent, output_dir.name)
    temp_dir = make_temp_dir(output_dir.parent, output_dir.name)
    try:
        yield temp_dir
        with publishing() if publishing is not None else nullcontext():
            publish(temp_dir, output_dir)
    except BaseException:
        remove_tree(temp_dir)
        raise


def check_output_dir(output_dir: Path, *, force: bool) -> None:
    """Refuse an existing, non-empty output folder unless `force` (then it is replaced atomically on success).

    Raises:
        OutputError: the folder exists (or is a file) and `force` is off.
    """
    if output_dir.is_file():
        raise OutputError(f"the output {output_dir} is a file", path=output_dir, hint="choose a folder path")
    if output_dir.is_dir() and any(output_dir.iterdir()) and not force:
        raise OutputError(f"the output folder {output_dir} exists and is not empty", path=output_dir,
                          hint="choose another folder, or pass --force to replace it (replaced in one rename "
                               "once the new output is complete and verified)")


@contextmanager
def staged_output(output_dir: Path, *, force: bool) -> Iterator[Path]:
    """The conversions' output folder: refused if it exists (unless `force`), then written under `folder_lock`
    into `staged_folder`'s temporary sibling and published on success.

    Raises:
        OutputError: `output_dir` exists and `force` is off, or it cannot be written.
        StepLockedError: another process is writing the same output.
    """
    output_dir = Path(output_dir)
    check_output_dir(output_dir, force=force)
    with folder_lock(output_dir), staged_folder(output_dir) as temp_dir:
        yield temp_dir
    logger.info("published %s", output_dir)
