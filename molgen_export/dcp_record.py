"""Find a tensor's raw bytes inside one DCP item, so shards can be read straight into our own buffers.

`torch.distributed.checkpoint` stores each tensor item as a `torch.save` zip archive placed at a byte range of
a `.distcp` shard (`filesystem.py`, `_write_item`). The archive keeps the tensor's storage as one *stored*
(uncompressed) record, so the bytes can be read in place: this module reads the archive's central directory
and its small `data.pkl` (through a restricted unpickler that builds nothing but a description of the tensor)
and returns where the storage bytes are and how to view them. Anything it does not recognise raises
`RecordNotUnderstood`; the caller then decodes the item with `torch.load(weights_only=True)` instead.
"""

from __future__ import annotations

import io
import logging
import pickle
import struct
from collections import OrderedDict
from collections.abc import Callable
from dataclasses import dataclass

import torch

logger = logging.getLogger(__name__)

_LOCAL_HEADER = struct.Struct("<4sHHHHHIIIHH")
_CENTRAL_HEADER = struct.Struct("<4sHHHHHHIIIHHHHHII")
_END_OF_DIRECTORY = struct.Struct("<4sHHHHIIH")
_ZIP64_END_OF_DIRECTORY = struct.Struct("<4sQHHIIQQQQ")
_ZIP64_LOCATOR = struct.Struct("<4sIQI")
_SMALL_READ = 4096
"""Bytes read at each end of an item to find its directory and headers."""

_STORAGE_DTYPES = {
    "FloatStorage": torch.float32, "BFloat16Storage": torch.bfloat16, "HalfStorage": torch.float16,
    "DoubleStorage": torch.float64, "LongStorage": torch.int64, "IntStorage": torch.int32,
    "ShortStorage": torch.int16, "CharStorage": torch.int8, "ByteStorage": torch.uint8, "BoolStorage": torch.bool,
}
"""The legacy typed-storage classes `torch.save` names in `data.pkl`, and their dtypes."""


class RecordNotUnderstood(Exception):
    """The item is not a plain single-tensor `torch.save` archive this module can read in place."""


@dataclass(frozen=True)
class TensorRecord:
    """Where one saved tensor's storage lies inside its DCP item, and how to view it."""

    data_offset: int
    """Byte offset of the storage inside the item (add the item's offset in the shard file)."""
    nbytes: int
    """Bytes of storage."""
    dtype: torch.dtype
    size: tuple[int, ...]
    stride: tuple[int, ...]
    storage_offset: int

    @property
    def is_dense_rows(self) -> bool:
        """True when the storage holds exactly the tensor, row-major: any row range is one byte range."""
        expected = []
        step = 1
        for dim in reversed(self.size):
            expected.append(step)
            step *= dim
        numel = step
        dense = all(d == 1 or s == e for d, s, e in zip(self.size, self.stride, reversed(expected)))
        return dense and self.storage_offset == 0 and self.nbytes == numel * self.dtype.itemsize


@dataclass(frozen=True)
class _StorageRef:
    dtype: torch.dtype
    key: str
    numel: int


@dataclass(frozen=True)
class _TensorRef:
    storage: _StorageRef
    storage_offset: int
    size: tuple[int, ...]
    stride: tuple[int, ...]


def _describe_tensor(storage, storage_offset, size, stride, requires_grad=False, backward_hooks=None,
                     metadata=None) -> _TensorRef:
    """Stands in for `torch._utils._rebuild_tensor_v2`: records the arguments, builds nothing."""
    if not isinstance(storage, _StorageRef) or backward_hooks or metadata:
        raise RecordNotUnderstood("data.pkl rebuilds the tensor with hooks or metadata")
    return _TensorRef(storage, int(storage_offset), tuple(int(s) for s in size), tuple(int(s) for s in stride))


class _DataPickleReader(pickle.Unpickler):
    """Reads a `torch.save` data.pkl that holds one plain tensor; admits nothing else."""

    def find_class(self, module: str, name: str):
        if (module, name) == ("torch._utils", "_rebuild_tensor_v2"):
            return _describe_tensor
        if (module, name) == ("collections", "OrderedDict"):
            return OrderedDict
        if module == "torch" and name in _STORAGE_DTYPES:
            return _STORAGE_DTYPES[name]
        raise RecordNotUnderstood(f"data.pkl names `{module}.{name}`")

    def persistent_load(self, pid):
        if not (isinstance(pid, tuple) and len(pid) == 5 and pid[0] == "storage"
                and isinstance(pid[1], torch.dtype)):
            raise RecordNotUnderstood(f"unexpected storage reference {pid!r:.80}")
        return _StorageRef(pid[1], str(pid[2]), int(pid[4]))


@dataclass(frozen=True)
class _Entry:
    name: str
    method: int
    compressed: int
    size: int
    local_offset: int


def _zip64_values(extra: bytes, wanted: list[str], values: dict[str, int]) -> None:
    pos = 0
    while pos + 4 <= len(extra):
        tag, length = struct.unpack_from("<HH", extra, pos)
        if tag == 0x0001:
            field_pos = pos + 4
            for name in wanted:
                if field_pos + 8 > pos + 4 + length:
                    raise RecordNotUnderstood("short zip64 extra field")
                values[name] = struct.unpack_from("<Q", extra, field_pos)[0]
                field_pos += 8
            return
        pos += 4 + length
    if wanted:
        raise RecordNotUnderstood("zip64 sizes without a zip64 extra field")


def _central_directory(read: Callable[[int, int], bytes], length: int) -> list[_Entry]:
    tail_start = max(0, length - _SMALL_READ)
    tail = read(tail_start, length - tail_start)
    end = tail.rfind(b"PK\x05\x06")
    if end < 0 or end + _END_OF_DIRECTORY.size > len(tail):
        raise RecordNotUnderstood("no zip end-of-directory record")
    _, _, _, _, count, cd_size, cd_offset, _ = _END_OF_DIRECTORY.unpack_from(tail, end)
    if count == 0xFFFF or cd_size == 0xFFFFFFFF or cd_offset == 0xFFFFFFFF:
        locator = end - _ZIP64_LOCATOR.size
        if locator < 0 or tail[locator:locator + 4] != b"PK\x06\x07":
            raise RecordNotUnderstood("zip64 archive without a locator")
        _, _, record_offset, _ = _ZIP64_LOCATOR.unpack_from(tail, locator)
        if record_offset < tail_start:
            raise RecordNotUnderstood("zip64 directory record out of reach")
        record = record_offset - tail_start
        if tail[record:record + 4] != b"PK\x06\x06":
            raise RecordNotUnderstood("bad zip64 directory record")
        fields = _ZIP64_END_OF_DIRECTORY.unpack_from(tail, record)
        count, cd_size, cd_offset = fields[7], fields[8], fields[9]
    if cd_offset + cd_size > length:
        raise RecordNotUnderstood("zip directory beyond the item")
    directory = tail[cd_offset - tail_start:cd_offset - tail_start + cd_size] if cd_offset >= tail_start \
        else read(cd_offset, cd_size)
    entries = []
    pos = 0
    for _ in range(count):
        if directory[pos:pos + 4] != b"PK\x01\x02":
            raise RecordNotUnderstood("bad zip directory entry")
        (_, _, _, flags, method, _, _, _, compressed, size, name_len, extra_len, comment_len, _, _, _,
         local_offset) = _CENTRAL_HEADER.unpack_from(directory, pos)
        name = directory[pos + 46:pos + 46 + name_len].decode("utf-8", "replace")
        extra = directory[pos + 46 + name_len:pos + 46 + name_len + extra_len]
        values = {"size": size, "compressed": compressed, "local_offset": local_offset}
        wanted = [k for k in ("size", "compressed", "local_offset") if values[k] == 0xFFFFFFFF]
        _zip64_values(extra, wanted, values)
        if flags & 0x1:
            raise RecordNotUnderstood("encrypted zip entry")
        entries.append(_Entry(name, method, values["compressed"], values["size"], values["local_offset"]))
        pos += 46 + name_len + extra_len + comment_len
    return entries


def _data_start(read: Callable[[int, int], bytes], entry: _Entry, head: bytes) -> int:
    if entry.local_offset + _LOCAL_HEADER.size <= len(head):
        header = head[entry.local_offset:entry.local_offset + _LOCAL_HEADER.size]
    else:
        header = read(entry.local_offset, _LOCAL_HEADER.size)
    if len(header) < _LOCAL_HEADER.size or header[:4] != b"PK\x03\x04":
        raise RecordNotUnderstood(f"bad local header for {entry.name}")
    name_len, extra_len = _LOCAL_HEADER.unpack_from(header)[9:11]
    return entry.local_offset + _LOCAL_HEADER.size + name_len + extra_len


def _record_bytes(read: Callable[[int, int], bytes], entry: _Entry, head: bytes) -> bytes:
    if entry.method != 0 or entry.compressed != entry.size:
        raise RecordNotUnderstood(f"{entry.name} is compressed")
    start = _data_start(read, entry, head)
    if start + entry.size <= len(head):
        return head[start:start + entry.size]
    return read(start, entry.size)


def locate_tensor(read: Callable[[int, int], bytes], length: int) -> TensorRecord:
    """Describe the single tensor stored in a `torch.save` archive of `length` bytes.

    Args:
        read: `read(offset, n)` returns `n` bytes of the item starting at `offset` (relative to the item).
        length: the item's length in bytes (from the DCP metadata).

    Returns:
        Where its storage is and its dtype, size, stride and storage offset.

    Raises:
        RecordNotUnderstood: not a plain, uncompressed, little-endian, single-tensor archive.
    """
    entries = _central_directory(read, length)
    by_suffix = {}
    for entry in entries:
        _, _, suffix = entry.name.partition("/")
        by_suffix[suffix] = entry
    pickle_entry = by_suffix.get("data.pkl")
    if pickle_entry is None:
        raise RecordNotUnderstood("no data.pkl in the archive")
    head = read(0, min(length, _SMALL_READ))
    order = by_suffix.get("byteorder")
    if order is not None and _record_bytes(read, order, head) != b"little":
        raise RecordNotUnderstood("big-endian archive")
    try:
        described = _DataPickleReader(io.BytesIO(_record_bytes(read, pickle_entry, head))).load()
    except RecordNotUnderstood:
        raise
    except Exception as exc:  # any unpickling failure means: not a plain tensor
        raise RecordNotUnderstood(f"data.pkl does not describe a plain tensor ({type(exc).__name__})") from exc
    if not isinstance(described, _TensorRef):
        raise RecordNotUnderstood(f"data.pkl holds a {type(described).__name__}, not one tensor")
    storage = described.storage
    data_entry = by_suffix.get(f"data/{storage.key}")
    if data_entry is None:
        raise RecordNotUnderstood(f"no record for storage {storage.key}")
    if data_entry.method != 0 or data_entry.compressed != data_entry.size:
        raise RecordNotUnderstood("storage record is compressed")
    if data_entry.size != storage.numel * storage.dtype.itemsize:
        raise RecordNotUnderstood("storage record size disagrees with data.pkl")
    start = _data_start(read, data_entry, head)
    if start + data_entry.size > length:
        raise RecordNotUnderstood("storage record runs past the item")
    return TensorRecord(data_offset=start, nbytes=data_entry.size, dtype=storage.dtype, size=described.size,
                        stride=described.stride, storage_offset=described.storage_offset)
