"""A DCP step's `.metadata`, unpickled by a restricted unpickler: which model tensors it holds and where.

Nothing else of the step is read here. `.metadata` is a pickle, and a crafted one can run code, so only DCP's
own metadata classes and the plain types they hold are admitted (`load_metadata_object`); `model_ranges_hint`
reads it with inert stand-ins instead, before DCP is even imported, to start the disk early.
"""

from __future__ import annotations

import logging
import pickle
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
        """One model tensor, chunks reassembled (see `dcp_read.read_tensor`)."""
        from molgen_export.dcp_read import read_tensor

        return read_tensor(self, fqn, counter)

    def iter(self, fqns: Iterable[str], counter=None) -> Iterator[tuple[str, torch.Tensor]]:
        """`(fqn, tensor)` pairs in order, read ahead on a thread (see `dcp_stream.iter_tensors`)."""
        from molgen_export.dcp_stream import iter_tensors

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
            chunks.append(ChunkLocation(offsets, tuple(int(s) for s in chunk.sizes), str(info.relative_path),
                                        int(info.offset), int(info.length),
                                        tuple(str(t) for t in info.transform_descriptors or ())))
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




class _Inert:
    """Stands in for an admitted DCP class when only the plain fields of `.metadata` are wanted."""

    def __init__(self, *args, **kwargs):
        self.args = args

    def __setstate__(self, state) -> None:
        if isinstance(state, tuple) and len(state) == 2 and isinstance(state[1], dict):
            state = {**(state[0] or {}), **state[1]}
        if isinstance(state, dict):
            self.__dict__.update(state)
        else:
            self.state = state


class _HintUnpickler(pickle.Unpickler):
    """The restricted unpickler's allow-list, with every admitted name mapped to an inert stand-in: nothing of
    torch (or anything else) is imported or called."""

    _stand_ins: dict[tuple[str, str], type] = {}

    def find_class(self, module: str, name: str):
        if (module, name) not in _ALLOWED_GLOBALS and module != "torch":
            raise UnsafeCheckpointError(f"`{module}.{name}` in .metadata")
        key = (module, name)
        if key not in self._stand_ins:
            self._stand_ins[key] = type(name, (_Inert,), {})
        return self._stand_ins[key]


def model_ranges_hint(step_dir: Path) -> list[tuple[str, int, int]] | None:
    """`(shard, offset, length)` of every model item, read from `.metadata` without importing DCP, or None.

    Only a hint for prefetching (never for reading data): None on anything unexpected.
    """
    try:
        with open(step_dir / METADATA_FILE, "rb") as f:
            metadata = _HintUnpickler(f).load()
        ranges = []
        for index, info in metadata.storage_data.items():
            if is_model_key(str(index.fqn)):
                ranges.append((str(info.relative_path), int(info.offset), int(info.length)))
        return sorted(ranges)
    except Exception as exc:  # a hint: the real reader reports real problems
        logger.debug("no prefetch hint from %s: %s", step_dir, exc)
        return None
