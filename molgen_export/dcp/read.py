"""Read model tensors from a DCP step, one at a time, never the optimizer state.

Each chunk comes from its byte range in its `.distcp` shard. It is read in place when its `torch.save` record
is understood (`dcp_record`: the storage bytes go straight into the tensor), else decoded with
`torch.load(weights_only=True)`; chunks stored with DCP transforms (e.g. compression) go through the public
DCP reader, with `.metadata` still unpickled by ours. `ByteCounter` records the bytes read and which path each
chunk took. `StepMetadata` is the plan of a step built here from the object `dcp.metadata` unpickled and
checked (its entry points are re-exported here); row-piece streaming is `dcp.stream`, which imports this.
"""

from __future__ import annotations

import io
import logging
import os
import threading
from dataclasses import dataclass, field
from pathlib import Path

import torch

from molgen_export.dcp.discover import METADATA_FILE
from molgen_export.dcp.metadata import (NON_MODEL_PREFIXES, check_opened_shard, is_model_key,  # noqa: F401
                                        load_metadata_object, model_ranges_hint, read_metadata_bytes,
                                        referenced_files)
from molgen_export.dcp.torch_save_record import RecordNotUnderstood, TensorRecord, locate_tensor
from molgen_export.errors import CheckpointFormatError, MolgenExportError, SourceVanishedError, UnsafeCheckpointError

logger = logging.getLogger(__name__)

PATH_DIRECT = "direct"
"""A chunk read in place: its storage bytes straight from the shard into the tensor (or buffer) that uses them."""
PATH_TORCH_LOAD = "torch.load"
"""A chunk whose record was not understood, decoded from its bytes with `torch.load(weights_only=True)`."""
PATH_DCP = "dcp"
"""A chunk stored with DCP transforms, read through the public DCP reader (metadata still unpickled by ours)."""


class ByteCounter:
    """Counts shard bytes read and which path each chunk was read by, across threads."""

    def __init__(self) -> None:
        self._lock = threading.Lock()
        self.bytes = 0
        self.paths: dict[str, int] = {}

    def add(self, n: int) -> None:
        with self._lock:
            self.bytes += n

    def note(self, path: str, chunks: int = 1) -> None:
        """Record that `chunks` chunks were read by `path` (`PATH_DIRECT`, `PATH_TORCH_LOAD` or `PATH_DCP`)."""
        with self._lock:
            self.paths[path] = self.paths.get(path, 0) + chunks


@dataclass(frozen=True)
class ChunkLocation:
    """Where one saved chunk of a tensor lives."""

    offsets: tuple[int, ...]
    sizes: tuple[int, ...]
    relative_path: str
    file_offset: int
    length: int
    transforms: tuple[str, ...] = ()
    """DCP storage transforms (e.g. compression); such chunks are read through the public DCP reader."""

    @property
    def row_start(self) -> int:
        return self.offsets[0] if self.offsets else 0


@dataclass(frozen=True)
class TensorEntry:
    """One tensor of the checkpoint as the metadata describes it."""

    fqn: str
    shape: tuple[int, ...]
    dtype: torch.dtype
    chunks: tuple[ChunkLocation, ...]

    @property
    def numel(self) -> int:
        n = 1
        for d in self.shape:
            n *= d
        return n

    @property
    def nbytes(self) -> int:
        return self.numel * self.dtype.itemsize

    @property
    def stored_bytes(self) -> int:
        return sum(c.length for c in self.chunks)

    @property
    def row_elements(self) -> int:
        """Elements in one row (one index of dim 0); 1 for 0-d and 1-d tensors."""
        n = 1
        for d in self.shape[1:]:
            n *= d
        return n

    @property
    def rows(self) -> int:
        return self.shape[0] if self.shape else 1

    @property
    def row_chunked(self) -> bool:
        """True when every chunk is a whole-row slice (dim-0 sharding, or a single chunk)."""
        return all(c.offsets[1:] == (0,) * len(c.offsets[1:]) and c.sizes[1:] == self.shape[1:] for c in self.chunks)


@dataclass(frozen=True)
class StepMetadata:
    """The `.metadata` of one step, split into model tensors and everything else."""

    step_dir: Path
    model: dict[str, TensorEntry]
    """Model tensors by their checkpoint FQN, in the order the checkpoint lists them."""
    other_bytes: int
    """Bytes stored for optimizer, scheduler, dataloader and train state (never read)."""
    other_keys: int
    files: dict[str, int] = field(default_factory=dict)
    """Shard file name -> size on disk when the metadata was read."""
    extents: dict[str, int] = field(default_factory=dict)
    """Shard file name -> the byte where its last item (model or not) ends, per the metadata."""
    records: dict = field(default_factory=dict, compare=False, repr=False)
    """(fqn, chunk index) -> `TensorRecord`, or None when the chunk is not readable in place (a cache)."""
    reads_in_place = True
    """A `source.TensorSource` whose entries carry DCP chunks: `stream` reads them in place, in row ranges."""

    @property
    def model_bytes(self) -> int:
        return sum(e.stored_bytes for e in self.model.values())

    @property
    def label(self) -> str:
        return self.step_dir.name

    def check_files(self) -> None:
        """Refuse missing or truncated shards (see `check_shard_files`)."""
        check_shard_files(self)

    def read(self, fqn: str, counter=None) -> torch.Tensor:
        """One model tensor, chunks reassembled (see `read_tensor`)."""
        return read_tensor(self, fqn, counter)


def read_step_metadata(step_dir: Path) -> StepMetadata:
    """Read `.metadata` and plan where each model tensor's bytes are; no shard data is read.

    Raises:
        CheckpointFormatError: the metadata is unreadable, or a chunk has no storage entry.
    """
    from molgen_export.dcp.metadata_classes import TensorStorageMetadata

    metadata = load_metadata_object(step_dir)
    # one pass over the storage entries (tens of thousands at scale): where each chunk is, where each shard ends
    locations = {}
    extents: dict[str, int] = {}
    for idx, info in metadata.storage_data.items():
        locations[(idx.fqn, idx.offset)] = info  # a torch.Size hashes and compares as the tuple of its ints
        name = str(info.relative_path)
        end = int(info.offset) + int(info.length)
        if extents.get(name, -1) < end:
            extents[name] = end
    model: dict[str, TensorEntry] = {}
    other_keys = 0
    for fqn, item in metadata.state_dict_metadata.items():
        if not is_model_key(fqn) or not isinstance(item, TensorStorageMetadata):
            other_keys += 1
            continue
        chunks = []
        for chunk in item.chunks:
            offsets = tuple(int(o) for o in chunk.offsets)
            info = locations.get((fqn, offsets))
            if info is None:
                raise CheckpointFormatError(f"{step_dir / METADATA_FILE} lists tensor `{fqn}` chunk at {offsets} "
                                            "but no shard holds it", path=step_dir,
                                            hint="the metadata comes from a different or damaged save")
            chunks.append(ChunkLocation(offsets, tuple(int(s) for s in chunk.sizes), str(info.relative_path),
                                        int(info.offset), int(info.length),
                                        tuple(str(t) for t in info.transform_descriptors or ())))
        model[fqn] = TensorEntry(fqn, tuple(int(s) for s in item.size), item.properties.dtype, tuple(chunks))
    model_keys = set(model)
    other_bytes = sum(info.length for (fqn, _), info in locations.items() if fqn not in model_keys)
    files = {}
    for name in extents:  # in the order the metadata first names them
        try:
            files[name] = (step_dir / name).stat().st_size
        except FileNotFoundError:
            files[name] = -1
    return StepMetadata(step_dir=step_dir, model=model, other_bytes=other_bytes, other_keys=other_keys, files=files,
                        extents=extents)


def check_shard_files(meta: StepMetadata) -> None:
    """Refuse a step whose shard files are missing or shorter than the metadata says.

    Raises:
        CheckpointFormatError: naming the file and how many bytes it should hold.
    """
    # Every file the metadata names, to its last item: a shard cut short anywhere means a broken save,
    # even when the model's bytes happen to lie before the cut.
    for name, end in sorted(meta.extents.items()):
        size = meta.files.get(name, -1)
        if size < 0:
            raise CheckpointFormatError(f"shard {meta.step_dir / name} is missing", path=meta.step_dir / name,
                                        hint="the checkpoint is incomplete or was partly deleted; pick another step")
        if size < end:
            raise CheckpointFormatError(f"shard {meta.step_dir / name} is truncated: {size} bytes, "
                                        f"the metadata needs at least {end}", path=meta.step_dir / name,
                                        hint="the shard was cut short (disk full or copy interrupted); re-save or pick another step")


def open_shard(path: Path) -> int:
    """Open a shard (`step_dir / name`, the name confined when the metadata was read) for reading.

    Opened without blocking (a FIFO planted in the folder cannot hang the export) and checked once open: a
    regular file, inside the step folder (`check_opened_shard`).

    Raises:
        SourceVanishedError: the shard is gone (e.g. purged by TorchTitan's keep_latest_k).
        UnsafeCheckpointError: it is not a regular file inside the step folder.
    """
    try:
        fd = os.open(path, os.O_RDONLY | os.O_NONBLOCK | getattr(os, "O_CLOEXEC", 0))
    except FileNotFoundError as exc:
        raise SourceVanishedError(f"shard {path} disappeared while it was read", path=path) from exc
    try:
        check_opened_shard(fd, path)
    except BaseException:
        os.close(fd)
        raise
    return fd


def pread_into(fd: int, path: Path, view: memoryview, offset: int) -> None:
    """Fill `view` with the shard's bytes from `offset`.

    Raises:
        CheckpointFormatError: the shard ends first.
    """
    done = 0
    length = len(view)
    while done < length:
        n = os.preadv(fd, [view[done:]], offset + done)
        if n == 0:
            raise CheckpointFormatError(f"shard {path} ends at byte {offset + done}, expected {offset + length}",
                                        path=path, hint="the shard is truncated; re-save or pick another step")
        done += n


def _read_range(path: Path, offset: int, length: int) -> bytearray:
    buf = bytearray(length)
    fd = open_shard(path)
    try:
        pread_into(fd, path, memoryview(buf), offset)
    finally:
        os.close(fd)
    return buf


SMALL_ITEM_BYTES = 1 << 20
"""Items up to this size are read whole with one `pread` (their headers are then free: bytes read = item bytes)."""


def chunk_record(meta: StepMetadata, fqn: str, index: int, counter: ByteCounter | None = None,
                 item: bytes | bytearray | None = None) -> TensorRecord | None:
    """Where chunk `index` of tensor `fqn` keeps its storage bytes, or None when it cannot be read in place.

    The first time, reads a few KB at both ends of the chunk's item (or parses `item`, the whole item's bytes,
    when given); the answer is cached on `meta`.
    """
    key = (fqn, index)
    if key in meta.records:
        return meta.records[key]
    entry = meta.model[fqn]
    chunk = entry.chunks[index]
    if chunk.transforms:
        meta.records[key] = None
        return None
    path = meta.step_dir / chunk.relative_path
    fd = None if item is not None else open_shard(path)

    def read(offset: int, n: int) -> bytes:
        n = max(0, min(n, chunk.length - offset))
        if item is not None:
            return bytes(item[offset:offset + n])
        buf = bytearray(n)
        pread_into(fd, path, memoryview(buf), chunk.file_offset + offset)
        if counter is not None:
            counter.add(n)
        return bytes(buf)

    record = None
    try:
        record = locate_tensor(read, chunk.length)
    except RecordNotUnderstood as exc:
        logger.info("tensor `%s` chunk %d in %s is not read in place (%s); decoding it with torch.load",
                    fqn, index, path, exc)
    except UnsafeCheckpointError as exc:
        raise UnsafeCheckpointError(f"tensor `{fqn}` in {path} (bytes {chunk.file_offset}+{chunk.length}): "
                                    f"{exc.args[0]}", hint=exc.hint, path=path) from exc
    finally:
        if fd is not None:
            os.close(fd)
    if record is not None and (record.dtype != entry.dtype or record.size != chunk.sizes):
        logger.info("tensor `%s` chunk %d: the record says %s %s, the metadata %s %s; decoding it with torch.load",
                    fqn, index, record.dtype, record.size, entry.dtype, chunk.sizes)
        record = None
    meta.records[key] = record
    return record


def decode_item(fqn: str, path: Path, chunk: ChunkLocation, raw: bytes | bytearray | memoryview) -> torch.Tensor:
    """Decode one chunk's item bytes with `torch.load(weights_only=True)` (records not readable in place).

    Raises:
        CheckpointFormatError: the bytes do not decode to a tensor of the chunk's shape.
    """
    try:
        part = torch.load(io.BytesIO(raw), map_location="cpu", weights_only=True)
    except Exception as exc:
        raise CheckpointFormatError(f"tensor `{fqn}` in {path} (bytes {chunk.file_offset}+{chunk.length}) "
                                    f"does not decode: {exc}", path=path,
                                    hint="the shard is corrupt or belongs to another save") from exc
    if not isinstance(part, torch.Tensor) or tuple(part.shape) != chunk.sizes:
        got = tuple(part.shape) if isinstance(part, torch.Tensor) else type(part).__name__
        raise CheckpointFormatError(f"tensor `{fqn}` chunk in {path} decodes to {got}, metadata says {chunk.sizes}",
                                    path=path, hint="the metadata and the shards come from different saves")
    return part


def view_record(data: torch.Tensor, record: TensorRecord) -> torch.Tensor:
    """The tensor a record describes, over `data` (a uint8 tensor holding the record's storage bytes)."""
    typed = data.view(record.dtype)
    return typed.as_strided(record.size, record.stride, typed.storage_offset() + record.storage_offset)


def read_chunk(meta: StepMetadata, fqn: str, index: int, counter: ByteCounter | None = None) -> torch.Tensor:
    """One saved chunk of a tensor (not a transformed one), in place when possible, else through torch.load.

    Raises:
        CheckpointFormatError: the chunk is truncated or does not decode to the promised shape.
        SourceVanishedError: the shard disappeared.
    """
    chunk = meta.model[fqn].chunks[index]
    path = meta.step_dir / chunk.relative_path
    if chunk.length <= SMALL_ITEM_BYTES:
        raw = _read_range(path, chunk.file_offset, chunk.length)
        if counter is not None:
            counter.add(chunk.length)
        record = chunk_record(meta, fqn, index, counter, item=raw)
        if record is None:
            if counter is not None:
                counter.note(PATH_TORCH_LOAD)
            return decode_item(fqn, path, chunk, raw)
        if counter is not None:
            counter.note(PATH_DIRECT)
        data = torch.frombuffer(raw, dtype=torch.uint8) if raw else torch.empty(0, dtype=torch.uint8)
        return view_record(data[record.data_offset:record.data_offset + record.nbytes], record)
    record = chunk_record(meta, fqn, index, counter)
    if record is not None:
        storage = torch.empty(record.nbytes, dtype=torch.uint8)
        fd = open_shard(path)
        try:
            pread_into(fd, path, memoryview(storage.numpy()), chunk.file_offset + record.data_offset)
        finally:
            os.close(fd)
        if counter is not None:
            counter.add(record.nbytes)
            counter.note(PATH_DIRECT)
        return view_record(storage, record)
    raw = _read_range(path, chunk.file_offset, chunk.length)
    if counter is not None:
        counter.add(chunk.length)
        counter.note(PATH_TORCH_LOAD)
    return decode_item(fqn, path, chunk, raw)


def read_tensor(meta: StepMetadata, fqn: str, counter: ByteCounter | None = None) -> torch.Tensor:
    """Read one model tensor, reassembling its chunks (FSDP/TP shards) into one full tensor.

    Raises:
        CheckpointFormatError: a shard is truncated or a chunk does not decode to the promised shape.
        SourceVanishedError: the shard disappeared.
    """
    entry = meta.model[fqn]
    if any(c.transforms for c in entry.chunks):
        return _read_with_dcp(meta, entry, counter)
    full: torch.Tensor | None = None
    for index, chunk in enumerate(entry.chunks):
        part = read_chunk(meta, fqn, index, counter)
        if len(entry.chunks) == 1 and chunk.sizes == entry.shape:
            return part
        if full is None:
            full = torch.empty(entry.shape, dtype=entry.dtype)
        region = full
        for dim, (start, size) in enumerate(zip(chunk.offsets, chunk.sizes)):
            region = region.narrow(dim, start, size)
        region.copy_(part)
    if full is None:
        raise CheckpointFormatError(f"tensor `{fqn}` has no chunks in {meta.step_dir}", path=meta.step_dir)
    return full


def read_rows(meta: StepMetadata, fqn: str, start: int, stop: int, counter: ByteCounter | None = None) -> torch.Tensor:
    """Rows `start:stop` (dim 0) of a model tensor, reading only their bytes when the chunks allow it.

    Raises:
        CheckpointFormatError, SourceVanishedError: as `read_tensor`.
    """
    entry = meta.model[fqn]
    if (not entry.shape or not entry.row_chunked or any(c.transforms for c in entry.chunks)
            or any(c.length <= SMALL_ITEM_BYTES for c in entry.chunks)):
        return read_tensor(meta, fqn, counter)[start:stop]
    records = [chunk_record(meta, fqn, i, counter) for i in range(len(entry.chunks))]
    if any(r is None or not r.is_dense_rows for r in records):
        return read_tensor(meta, fqn, counter)[start:stop]
    out = torch.empty((stop - start, *entry.shape[1:]), dtype=entry.dtype)
    flat = out.view(-1).view(torch.uint8).numpy() if out.numel() else None
    row_bytes = entry.row_elements * entry.dtype.itemsize
    for chunk, record in zip(entry.chunks, records):
        first, last = max(start, chunk.row_start), min(stop, chunk.row_start + chunk.sizes[0])
        if first >= last or flat is None:
            continue
        path = meta.step_dir / chunk.relative_path
        view = memoryview(flat)[(first - start) * row_bytes:(last - start) * row_bytes]
        fd = open_shard(path)
        try:
            pread_into(fd, path, view, chunk.file_offset + record.data_offset + (first - chunk.row_start) * row_bytes)
        finally:
            os.close(fd)
        if counter is not None:
            counter.add(len(view))
            counter.note(PATH_DIRECT)
    return out


def _read_with_dcp(meta: StepMetadata, entry: TensorEntry, counter: ByteCounter | None) -> torch.Tensor:
    """Read one tensor through `torch.distributed.checkpoint.load`, with `.metadata` unpickled by ours."""
    import warnings

    import torch.distributed.checkpoint as dcp
    from torch.distributed.checkpoint import FileSystemReader
    from torch.distributed.checkpoint.metadata import StorageMeta

    from molgen_export.dcp.metadata_classes import to_dcp

    step_dir = meta.step_dir

    class _RestrictedReader(FileSystemReader):
        def read_metadata(self, *args, **kwargs):
            metadata = to_dcp(load_metadata_object(step_dir))  # DCP's reader wants its own classes
            if getattr(metadata, "storage_meta", None) is None:
                metadata.storage_meta = StorageMeta()
            metadata.storage_meta.load_id = self.load_id
            return metadata

    target = torch.empty(entry.shape, dtype=entry.dtype)
    try:
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")
            dcp.load({entry.fqn: target}, storage_reader=_RestrictedReader(step_dir), no_dist=True)
    except Exception as exc:
        raise CheckpointFormatError(
            f"tensor `{entry.fqn}` in {step_dir} is stored with DCP transforms "
            f"{sorted({t for c in entry.chunks for t in c.transforms})} and the DCP reader failed: {exc}",
            path=step_dir, hint="install what the transform needs (e.g. zstandard) or save without transforms") from exc
    if counter is not None:
        counter.add(entry.stored_bytes)
        counter.note(PATH_DCP, len(entry.chunks))
    return target


def prefetch(step_dir: Path, ranges: list[tuple[str, int, int]], limit_bytes: int) -> int:
    """Ask the kernel to start reading these byte ranges into the page cache (returns at once).

    Used while the export is still importing and planning, so the disk works meanwhile. Ranges come in
    file order and stop after `limit_bytes`. Returns the bytes requested.
    """
    requested = 0
    fds: dict[str, int] = {}
    try:
        for name, offset, length in ranges:
            if requested >= limit_bytes:
                break
            fd = fds.get(name)
            if fd is None:
                try:
                    fd = fds[name] = open_shard(step_dir / name)
                except (OSError, MolgenExportError):
                    continue
            length = min(length, limit_bytes - requested)
            try:
                os.posix_fadvise(fd, offset, length, os.POSIX_FADV_WILLNEED)
            except (AttributeError, OSError):
                return requested
            requested += length
    finally:
        for fd in fds.values():
            os.close(fd)
    return requested


def prefetch_step(step_dir: Path, limit_bytes: int | None = None) -> int:
    """Start reading a step's model bytes into the page cache in the background (optimizer bytes: never).

    The ranges come from `model_ranges_hint` (no DCP import needed, so this can run first thing). By default
    at most a third of the memory available now is asked for. Returns the bytes requested (0 without a hint).
    """
    ranges = model_ranges_hint(step_dir)
    if not ranges:
        return 0
    if limit_bytes is None:
        limit_bytes = _available_memory() // 3
    requested = prefetch(step_dir, ranges, limit_bytes)
    logger.debug("asked the kernel to read ahead %.2f GB of %s", requested / 1e9, step_dir)
    return requested


def _available_memory() -> int:
    try:
        with open("/proc/meminfo") as f:
            for line in f:
                if line.startswith("MemAvailable:"):
                    return int(line.split()[1]) * 1024
    except OSError:
        pass
    return 2 << 30
