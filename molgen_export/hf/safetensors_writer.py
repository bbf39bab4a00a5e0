"""Streaming safetensors shards: the shard plan and every header computed up front, tensors written in place at
their offsets as they arrive, and the index (`model.safetensors.index.json`) when there are several."""

from __future__ import annotations

import errno
import json
import logging
import os
import shutil
from dataclasses import dataclass
from pathlib import Path

import torch

from molgen_export.errors import OutputError
from molgen_export.hf.publish import output_error, write_json

logger = logging.getLogger(__name__)

SAFETENSORS_DTYPES = {torch.float32: "F32", torch.bfloat16: "BF16", torch.float16: "F16", torch.float64: "F64",
                      torch.int64: "I64", torch.int32: "I32", torch.int8: "I8", torch.uint8: "U8", torch.bool: "BOOL"}
SINGLE_FILE = "model.safetensors"
INDEX_FILE = "model.safetensors.index.json"


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
                raise output_error(exc, path, total) from exc

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
            raise output_error(exc, self.folder / shard.filename, sum(s.size for s in self.shards)) from exc

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


