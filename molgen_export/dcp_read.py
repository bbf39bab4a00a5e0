"""Read a DCP step folder: metadata through a restricted unpickler, then model tensors streamed one at a time.

Only the tensors the export asks for are read (never the optimizer state), each chunk straight from its
byte range in its `.distcp` shard, so memory stays bounded by the largest tensor.
"""

from __future__ import annotations

import io
import logging
import os
import pickle
import threading
from collections.abc import Iterable, Iterator
from dataclasses import dataclass, field
from pathlib import Path

import torch

from molgen_export.discover import METADATA_FILE
from molgen_export.errors import CheckpointFormatError, SourceVanishedError, UnsafeCheckpointError

logger = logging.getLogger(__name__)

NON_MODEL_PREFIXES = ("optimizer", "lr_scheduler", "dataloader", "train_state")
"""Top-level entries TorchTitan saves beside the model FQNs."""

_DCP_METADATA_CLASSES = {
    "Metadata", "TensorStorageMetadata", "BytesStorageMetadata", "ChunkStorageMetadata",
    "TensorProperties", "MetadataIndex", "StorageMeta", "_MEM_FORMAT_ENCODING",
}
_ALLOWED_GLOBALS = {
    **{("torch.distributed.checkpoint.metadata", name): None for name in _DCP_METADATA_CLASSES},
    ("torch.distributed.checkpoint.filesystem", "_StorageInfo"): None,
    ("torch.serialization", "_get_layout"): None,
    ("torch", "Size"): None,
    ("pathlib", "PosixPath"): None,
    ("pathlib", "PurePosixPath"): None,
    ("pathlib", "WindowsPath"): None,
    ("collections", "OrderedDict"): None,
    ("builtins", "set"): None,
    ("builtins", "frozenset"): None,
}


class _MetadataUnpickler(pickle.Unpickler):
    """Unpickles DCP `.metadata` admitting only DCP's metadata classes and the plain types they hold."""

    def __init__(self, file, source: Path):
        super().__init__(file)
        self._source = source

    def find_class(self, module: str, name: str):
        if (module, name) in _ALLOWED_GLOBALS:
            return super().find_class(module, name)
        if module == "torch" and isinstance(getattr(torch, name, None), torch.dtype):
            return getattr(torch, name)
        raise UnsafeCheckpointError(
            f"{self._source} asks to load `{module}.{name}`, which is not part of DCP checkpoint metadata; "
            "refusing to unpickle it (a crafted .metadata can run code)",
            hint="only export checkpoints written by torch.distributed.checkpoint; if this one is yours, it is damaged",
            path=self._source)


@dataclass(frozen=True)
class ChunkLocation:
    """Where one saved chunk of a tensor lives."""

    offsets: tuple[int, ...]
    sizes: tuple[int, ...]
    relative_path: str
    file_offset: int
    length: int


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

    @property
    def model_bytes(self) -> int:
        return sum(e.stored_bytes for e in self.model.values())

    @property
    def label(self) -> str:
        return self.step_dir.name

    def check_files(self) -> None:
        """Refuse missing or truncated shards (see `check_shard_files`)."""
        check_shard_files(self)

    def read(self, fqn: str, counter: ByteCounter | None = None) -> torch.Tensor:
        """One model tensor, chunks reassembled."""
        return read_tensor(self, fqn, counter)

    def iter(self, fqns: Iterable[str], counter: ByteCounter | None = None) -> Iterator[tuple[str, torch.Tensor]]:
        """`(fqn, tensor)` pairs in order, read ahead on a thread."""
        return iter_tensors(self, fqns, counter)


def is_model_key(fqn: str) -> bool:
    """True for a model FQN, False for TorchTitan's optimizer/scheduler/dataloader/train_state entries."""
    return fqn.split(".", 1)[0] not in NON_MODEL_PREFIXES


def load_metadata_object(step_dir: Path):
    """Unpickle `.metadata` with the restricted unpickler.

    Raises:
        CheckpointFormatError: missing, unreadable or not DCP metadata.
        UnsafeCheckpointError: it references anything outside DCP's metadata classes.
    """
    from torch.distributed.checkpoint.metadata import Metadata

    path = step_dir / METADATA_FILE
    try:
        with open(path, "rb") as f:
            metadata = _MetadataUnpickler(f, path).load()
    except FileNotFoundError as exc:
        if not step_dir.exists():
            raise SourceVanishedError(f"{step_dir} disappeared before it could be read", path=step_dir) from exc
        raise CheckpointFormatError(f"{path} is missing", path=path,
                                    hint="the checkpoint is incomplete; wait for the save or pick another step") from exc
    except UnsafeCheckpointError:
        raise
    except Exception as exc:  # pickle raises many types on garbage
        raise CheckpointFormatError(f"{path} is not readable DCP metadata ({type(exc).__name__}: {exc})", path=path,
                                    hint="the file is corrupt or truncated; re-save the checkpoint or pick another step") from exc
    if not isinstance(metadata, Metadata) or metadata.storage_data is None:
        raise CheckpointFormatError(f"{path} does not hold DCP checkpoint metadata", path=path,
                                    hint="point --dcp-path at a step folder written by torch.distributed.checkpoint")
    return metadata


def read_step_metadata(step_dir: Path) -> StepMetadata:
    """Read `.metadata` and plan where each model tensor's bytes are; no shard data is read.

    Raises:
        CheckpointFormatError: the metadata is unreadable, or a chunk has no storage entry.
    """
    from torch.distributed.checkpoint.metadata import TensorStorageMetadata

    metadata = load_metadata_object(step_dir)
    locations = {(idx.fqn, tuple(idx.offset) if idx.offset is not None else None): info
                 for idx, info in metadata.storage_data.items()}
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
            if info.transform_descriptors:
                raise CheckpointFormatError(
                    f"tensor `{fqn}` in {step_dir} is stored with transforms {list(info.transform_descriptors)} "
                    "(e.g. compression), which molgen_export does not decode", path=step_dir,
                    hint="save checkpoints without storage transforms")
            chunks.append(ChunkLocation(offsets, tuple(int(s) for s in chunk.sizes), str(info.relative_path),
                                        int(info.offset), int(info.length)))
        model[fqn] = TensorEntry(fqn, tuple(int(s) for s in item.size), item.properties.dtype, tuple(chunks))
    model_keys = set(model)
    other_bytes = sum(info.length for (fqn, _), info in locations.items() if fqn not in model_keys)
    files = {}
    extents: dict[str, int] = {}
    for info in metadata.storage_data.values():
        name = str(info.relative_path)
        extents[name] = max(extents.get(name, 0), int(info.offset) + int(info.length))
        if name not in files:
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


class ByteCounter:
    """Counts shard bytes read, across threads."""

    def __init__(self) -> None:
        self._lock = threading.Lock()
        self.bytes = 0

    def add(self, n: int) -> None:
        with self._lock:
            self.bytes += n


def _read_range(path: Path, offset: int, length: int) -> bytearray:
    buf = bytearray(length)
    try:
        fd = os.open(path, os.O_RDONLY)
    except FileNotFoundError as exc:
        raise SourceVanishedError(f"shard {path} disappeared while it was read", path=path) from exc
    try:
        view = memoryview(buf)
        done = 0
        while done < length:
            n = os.preadv(fd, [view[done:]], offset + done)
            if n == 0:
                raise CheckpointFormatError(f"shard {path} ends at byte {offset + done}, expected {offset + length}",
                                            path=path, hint="the shard is truncated; re-save or pick another step")
            done += n
    finally:
        os.close(fd)
    return buf


def read_tensor(meta: StepMetadata, fqn: str, counter: ByteCounter | None = None) -> torch.Tensor:
    """Read one model tensor, reassembling its chunks (FSDP/TP shards) into one full tensor.

    Raises:
        CheckpointFormatError: a shard is truncated or a chunk does not decode to the promised shape.
        SourceVanishedError: the shard disappeared.
    """
    entry = meta.model[fqn]
    full: torch.Tensor | None = None
    for chunk in entry.chunks:
        path = meta.step_dir / chunk.relative_path
        raw = _read_range(path, chunk.file_offset, chunk.length)
        if counter is not None:
            counter.add(chunk.length)
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


def iter_tensors(meta: StepMetadata, fqns: Iterable[str], counter: ByteCounter | None = None,
                 prefetch: int = 2) -> Iterator[tuple[str, torch.Tensor]]:
    """Yield `(fqn, tensor)` in the given order, reading ahead on one thread while the caller works.

    Memory is bounded by `prefetch + 1` tensors. Errors from the reader surface at the tensor they hit.
    """
    import queue

    order = list(fqns)
    if prefetch <= 0 or len(order) <= 1:
        for fqn in order:
            yield fqn, read_tensor(meta, fqn, counter)
        return
    slots: queue.Queue = queue.Queue(maxsize=prefetch)
    stop = threading.Event()

    def produce() -> None:
        for fqn in order:
            if stop.is_set():
                return
            try:
                item = (fqn, read_tensor(meta, fqn, counter), None)
            except BaseException as exc:  # handed to the consumer
                item = (fqn, None, exc)
            while not stop.is_set():
                try:
                    slots.put(item, timeout=0.1)
                    break
                except queue.Full:
                    continue
            if item[2] is not None:
                return

    thread = threading.Thread(target=produce, name="molgen-dcp-reader", daemon=True)
    thread.start()
    try:
        for _ in order:
            fqn, tensor, exc = slots.get()
            if exc is not None:
                raise exc
            yield fqn, tensor
    finally:
        stop.set()
        thread.join(timeout=5)
