"""Write the HF folder: streaming safetensors shards (header computed up front, tensors written in place as
they arrive), index, configs, tokenizer files, then an atomic publish of the whole folder."""

from __future__ import annotations

import errno
import json
import logging
import os
import shutil
import uuid
from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import dataclass
from pathlib import Path

import torch

from molgen_export.errors import OutputError

logger = logging.getLogger(__name__)

SAFETENSORS_DTYPES = {torch.float32: "F32", torch.bfloat16: "BF16", torch.float16: "F16", torch.float64: "F64",
                      torch.int64: "I64", torch.int32: "I32", torch.int8: "I8", torch.uint8: "U8", torch.bool: "BOOL"}
SINGLE_FILE = "model.safetensors"
INDEX_FILE = "model.safetensors.index.json"
TEMP_PREFIX = "."
"""Temporary folders are hidden siblings (`.step-N-hf.tmp-...`) so listings and watchers skip them."""


@dataclass(frozen=True)
class PlannedTensor:
    hf_key: str
    shape: tuple[int, ...]
    dtype: torch.dtype

    @property
    def nbytes(self) -> int:
        n = self.dtype.itemsize
        for d in self.shape:
            n *= d
        return n


@dataclass(frozen=True)
class Shard:
    filename: str
    tensors: tuple[PlannedTensor, ...]
    header: bytes
    """The 8-byte length prefix plus the JSON header, padded to 8 bytes."""
    offsets: dict[str, int]
    """hf_key -> absolute byte offset of its data in the file."""

    @property
    def size(self) -> int:
        return len(self.header) + sum(t.nbytes for t in self.tensors)


def plan_shards(tensors: list[PlannedTensor], max_shard_bytes: int) -> list[Shard]:
    """Split tensors (in HF key order) into shards of at most `max_shard_bytes` (a larger tensor gets its own)."""
    ordered = sorted(tensors, key=lambda t: t.hf_key)
    groups: list[list[PlannedTensor]] = [[]]
    size = 0
    for tensor in ordered:
        if groups[-1] and size + tensor.nbytes > max_shard_bytes:
            groups.append([])
            size = 0
        groups[-1].append(tensor)
        size += tensor.nbytes
    shards = []
    for i, group in enumerate(groups):
        name = SINGLE_FILE if len(groups) == 1 else f"model-{i + 1:05d}-of-{len(groups):05d}.safetensors"
        header: dict = {"__metadata__": {"format": "pt"}}
        begin = 0
        for tensor in group:
            header[tensor.hf_key] = {"dtype": SAFETENSORS_DTYPES[tensor.dtype], "shape": list(tensor.shape),
                                     "data_offsets": [begin, begin + tensor.nbytes]}
            begin += tensor.nbytes
        text = json.dumps(header, separators=(",", ":")).encode()
        text += b" " * (-len(text) % 8)
        prefix = len(text).to_bytes(8, "little") + text
        offsets = {t.hf_key: len(prefix) + header[t.hf_key]["data_offsets"][0] for t in group}
        shards.append(Shard(name, tuple(group), prefix, offsets))
    return shards


def _output_error(exc: OSError, path: Path, needed: int | None = None) -> OutputError:
    if exc.errno == errno.ENOSPC:
        need = f"; the export needs {needed / 1e9:.2f} GB there" if needed else ""
        return OutputError(f"no space left on the device holding {path}{need}", path=path,
                           hint="free space or choose another --output; the temporary output was removed")
    if exc.errno in (errno.EACCES, errno.EPERM, errno.EROFS):
        return OutputError(f"cannot write to {path}: {exc.strerror}", path=path,
                           hint="choose a writable --output folder")
    return OutputError(f"writing {path} failed: {exc}", path=path)


class SafetensorsWriter:
    """Writes planned shards in place: each tensor lands at its precomputed offset, in any order."""

    def __init__(self, folder: Path, shards: list[Shard]):
        self.folder = folder
        self.shards = shards
        self._where = {key: (shard, offset) for shard in shards for key, offset in shard.offsets.items()}
        self._expected = {t.hf_key: t for shard in shards for t in shard.tensors}
        self._written: set[str] = set()
        self._parts: dict[str, list[tuple[int, int]]] = {}
        self._fds: dict[str, int] = {}
        total = sum(s.size for s in shards)
        try:
            free = shutil.disk_usage(folder).free
        except OSError:
            free = None
        if free is not None and free < total:
            raise OutputError(f"not enough space in {folder}: {free / 1e9:.2f} GB free, the weights need "
                              f"{total / 1e9:.2f} GB", path=folder,
                              hint="free space or choose another --output; nothing was published")
        for shard in shards:
            path = folder / shard.filename
            try:
                fd = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o666)
                self._fds[shard.filename] = fd
                try:
                    os.posix_fallocate(fd, 0, shard.size)
                except OSError as exc:
                    if exc.errno not in (errno.EOPNOTSUPP, errno.EINVAL):
                        raise
                    os.ftruncate(fd, shard.size)
                os.pwrite(fd, shard.header, 0)
            except OSError as exc:
                self.abort()
                raise _output_error(exc, path, total) from exc

    def write(self, hf_key: str, tensor: torch.Tensor) -> None:
        """Write one tensor; its dtype and shape must match the plan."""
        planned = self._expected.get(hf_key)
        if planned is None or hf_key in self._written:
            raise AssertionError(f"unplanned or repeated write of {hf_key}")
        if tensor.dtype != planned.dtype or tuple(tensor.shape) != planned.shape:
            raise AssertionError(f"{hf_key}: got {tensor.dtype} {list(tensor.shape)}, "
                                 f"planned {planned.dtype} {list(planned.shape)}")
        if hf_key in self._parts:
            raise AssertionError(f"{hf_key} is being written in parts")
        self._pwrite(hf_key, 0, tensor)
        self._written.add(hf_key)

    def write_part(self, hf_key: str, start: int, data: torch.Tensor) -> None:
        """Write `data` as bytes `start:start + data.nbytes` of tensor `hf_key` (for tensors streamed in pieces).

        The parts of a tensor may come in any order; they must have the planned dtype and cover the tensor
        exactly once. The tensor counts as written once its last byte is.
        """
        planned = self._expected.get(hf_key)
        if planned is None or hf_key in self._written:
            raise AssertionError(f"unplanned or repeated write of {hf_key}")
        if data.dtype != planned.dtype:
            raise AssertionError(f"{hf_key}: part of dtype {data.dtype}, planned {planned.dtype}")
        end = start + data.numel() * data.element_size()
        parts = self._parts.setdefault(hf_key, [])
        if start < 0 or end > planned.nbytes or any(start < e and s < end for s, e in parts):
            raise AssertionError(f"{hf_key}: part {start}:{end} overlaps another or leaves the tensor's "
                                 f"{planned.nbytes} bytes")
        self._pwrite(hf_key, start, data)
        parts.append((start, end))
        if sum(e - s for s, e in parts) == planned.nbytes:
            self._written.add(hf_key)
            del self._parts[hf_key]

    def _pwrite(self, hf_key: str, start: int, tensor: torch.Tensor) -> None:
        shard, offset = self._where[hf_key]
        data = tensor.detach().contiguous().reshape(-1).view(torch.uint8).numpy()
        view = memoryview(data)
        done = 0
        try:
            while done < len(view):
                done += os.pwrite(self._fds[shard.filename], view[done:], offset + start + done)
        except OSError as exc:
            raise _output_error(exc, self.folder / shard.filename, sum(s.size for s in self.shards)) from exc

    def close(self, *, index: bool = True) -> list[str]:
        """fsync and close every shard; write the index when sharded (unless `index=False`: a rank of a
        distributed export writes some shards, rank 0 the index of all). Returns the files written."""
        missing = sorted(set(self._expected) - self._written)
        if missing:
            raise AssertionError(f"tensors never written: {missing[:5]}")
        for name, fd in self._fds.items():
            os.fsync(fd)
            os.close(fd)
        self._fds.clear()
        files = [s.filename for s in self.shards]
        if index:
            files += write_index(self.folder, self.shards)
        return files

    def abort(self) -> None:
        for fd in self._fds.values():
            try:
                os.close(fd)
            except OSError:
                pass
        self._fds.clear()


def write_index(folder: Path, shards: list[Shard]) -> list[str]:
    """`model.safetensors.index.json` for these shards, when there are several; returns what was written."""
    if len(shards) <= 1:
        return []
    weight_map = {key: shard.filename for shard in shards for key in shard.offsets}
    index = {"metadata": {"total_size": sum(t.nbytes for shard in shards for t in shard.tensors)},
             "weight_map": dict(sorted(weight_map.items()))}
    write_json(folder / INDEX_FILE, index)
    return [INDEX_FILE]


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
        raise _output_error(exc, path) from exc


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
            raise _output_error(exc, target) from exc
        names.append(source.name)
    return names


def make_temp_dir(output_root: Path, final_name: str) -> Path:
    """Create the hidden temporary sibling the export is written into."""
    try:
        output_root.mkdir(parents=True, exist_ok=True)
        temp = output_root / f"{TEMP_PREFIX}{final_name}.tmp-{os.getpid()}-{uuid.uuid4().hex[:8]}"
        temp.mkdir()
    except OSError as exc:
        raise _output_error(exc, output_root) from exc
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
        raise _output_error(exc, final_dir) from exc
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
