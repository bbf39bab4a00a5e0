"""Find a tensor's raw bytes inside one DCP item, so shards can be read straight into our own buffers.

`torch.distributed.checkpoint` stores each tensor item as a `torch.save` zip archive placed at a byte range of
a `.distcp` shard (`filesystem.py`, `_write_item`). The archive keeps the tensor's storage as one *stored*
(uncompressed) record, so the bytes can be read in place: this module reads the archive's central directory
and its small `data.pkl` (through `safe_pickle`, with constructors that build nothing but a description of the
tensor) and returns where the storage bytes are and how to view them. Anything it does not recognise raises
`RecordNotUnderstood`; the caller then decodes the item with `torch.load(weights_only=True)` instead. A
`data.pkl` that asks for what `torch.save` never writes (a global outside torch, BUILD, a persistent id that is
not a storage, an extension code) raises `UnsafeCheckpointError`: no loader gets to see it.
"""

from __future__ import annotations

import logging
import struct
from collections import OrderedDict
from collections.abc import Callable
from dataclasses import dataclass

import torch

from molgen_export.dcp import safe_pickle
from molgen_export.errors import MolgenExportError, UnsafeCheckpointError

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


_MAX_DIMS = 64


def _ints(values, what: str) -> tuple[int, ...]:
    if type(values) is not tuple or len(values) > _MAX_DIMS:
        raise RecordNotUnderstood(f"data.pkl gives the tensor's {what} as {type(values).__name__}")
    for v in values:
        if type(v) is not int or not 0 <= v < 1 << 63:
            raise RecordNotUnderstood(f"data.pkl gives the tensor's {what} with {v!r:.40}")
    return values


def _describe_tensor(storage, storage_offset, size, stride, requires_grad=False, backward_hooks=None,
                     metadata=None) -> _TensorRef:
    """Stands in for `torch._utils._rebuild_tensor_v2`: checks and records the arguments, builds nothing."""
    if not isinstance(storage, _StorageRef):
        raise RecordNotUnderstood("data.pkl rebuilds the tensor from something other than a storage")
    if type(requires_grad) is not bool or (backward_hooks is not None and type(backward_hooks) is not OrderedDict):
        raise RecordNotUnderstood("data.pkl rebuilds the tensor with arguments of other types")
    if backward_hooks or metadata:
        raise RecordNotUnderstood("data.pkl rebuilds the tensor with hooks or metadata")
    size, stride = _ints(size, "size"), _ints(stride, "stride")
    if len(size) != len(stride):
        raise RecordNotUnderstood("data.pkl gives a size and a stride of different lengths")
    return _TensorRef(storage, _ints((storage_offset,), "storage offset")[0], size, stride)


def _storage_ref(pid) -> _StorageRef:
    """`torch.save`'s persistent id of a storage: ('storage', storage type, key, location, numel); nothing else."""
    if not (type(pid) is tuple and len(pid) == 5 and type(pid[0]) is str and pid[0] == "storage"
            and isinstance(pid[1], torch.dtype) and type(pid[2]) is str and type(pid[3]) is str
            and type(pid[4]) is int and 0 <= pid[4] < 1 << 63):
        raise ValueError(f"not a storage reference: {pid!r:.80}")
    return _StorageRef(pid[1], pid[2], pid[4])


_DATA_PICKLE_SPECS: dict[tuple[str, str], safe_pickle.Spec] = {
    ("torch._utils", "_rebuild_tensor_v2"): safe_pickle.Function("torch._utils._rebuild_tensor_v2", _describe_tensor),
    ("collections", "OrderedDict"): safe_pickle.Function("collections.OrderedDict", OrderedDict, container="dict"),
    **{("torch", name): safe_pickle.Constant(f"torch.{name}", dtype) for name, dtype in _STORAGE_DTYPES.items()},
}
"""What `torch.save` of one plain tensor names in `data.pkl`."""


def _resolve_data_pickle(module: str, name: str) -> safe_pickle.Spec | None:
    return _DATA_PICKLE_SPECS.get((module, name))


def describe_data_pickle(data: bytes) -> _TensorRef:
    """The tensor a `torch.save` `data.pkl` describes (storage key, dtype, size, stride, offset), built from nothing.

    Raises:
        RecordNotUnderstood: not one plain tensor (e.g. another torch rebuild function, or damaged bytes).
        UnsafeCheckpointError: it asks for something `torch.save` never writes.
    """
    try:
        described = safe_pickle.load(data, _resolve_data_pickle, _storage_ref)
    except safe_pickle.Refused as exc:
        if exc.kind == safe_pickle.UNKNOWN and (exc.module == "torch" or exc.module.startswith("torch.")):
            raise RecordNotUnderstood(f"data.pkl names `{exc.module}.{exc.name}`") from exc
        if exc.kind in (safe_pickle.UNKNOWN, safe_pickle.UNSAFE):
            what = f"asks to load `{exc.module}.{exc.name}`" if exc.kind == safe_pickle.UNKNOWN else f"holds {exc}"
            raise UnsafeCheckpointError(
                f"the item's data.pkl {what}, which torch.save never writes for a tensor; refusing to unpickle it",
                hint="only export checkpoints written by torch.distributed.checkpoint; if this one is yours, "
                     "it is damaged") from exc
        raise RecordNotUnderstood(f"data.pkl does not describe a plain tensor ({exc})") from exc
    if not isinstance(described, _TensorRef):
        raise RecordNotUnderstood(f"data.pkl holds a {type(described).__name__}, not one tensor")
    return described


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
        UnsafeCheckpointError: its data.pkl asks for something torch.save never writes.
    """
    try:
        return _locate_tensor(read, length)
    except (RecordNotUnderstood, MolgenExportError):
        raise
    except (struct.error, ValueError, IndexError, OverflowError, UnicodeError) as exc:  # damaged zip structures
        raise RecordNotUnderstood(f"not a readable zip archive ({type(exc).__name__}: {exc})") from exc


def _locate_tensor(read: Callable[[int, int], bytes], length: int) -> TensorRecord:
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
    described = describe_data_pickle(_record_bytes(read, pickle_entry, head))
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
