"""Stand-ins for the dataclasses DCP pickles into `.metadata`, so reading one never imports
`torch.distributed.checkpoint` (0.6-0.9 s here: its package imports DTensor and the planners).

Same class names, fields, defaults, equality and hashing as torch 2.13's `torch.distributed.checkpoint.metadata`
and `filesystem._StorageInfo`; `dcp.metadata` reads the file into these. The one reader that hands the metadata to
DCP itself (a tensor stored with DCP transforms, `read._read_with_dcp`) converts it with `to_dcp`.
"""

from __future__ import annotations

import enum
from collections import OrderedDict
from dataclasses import dataclass, field

import torch

DCP_MODULE = "torch.distributed.checkpoint.metadata"
FILESYSTEM_MODULE = "torch.distributed.checkpoint.filesystem"


class _MEM_FORMAT_ENCODING(enum.Enum):  # noqa: N801 - DCP's own name
    """DCP's encoding of a tensor's memory format in `TensorProperties`' pickled state."""

    TORCH_CONTIGUOUS_FORMAT = 0
    TORCH_CHANNELS_LAST = 1
    TORCH_PRESERVE_FORMAT = 2


@dataclass
class ChunkStorageMetadata:
    offsets: torch.Size
    sizes: torch.Size


@dataclass
class TensorProperties:
    dtype: torch.dtype = field(default_factory=torch.get_default_dtype)
    layout: torch.layout = torch.strided
    requires_grad: bool = False
    memory_format: torch.memory_format = torch.contiguous_format
    pin_memory: bool = False


@dataclass
class TensorStorageMetadata:
    properties: TensorProperties
    size: torch.Size
    chunks: list[ChunkStorageMetadata]


@dataclass
class BytesStorageMetadata:
    pass


@dataclass
class StorageMeta:
    checkpoint_id: object = None
    save_id: str | None = None
    load_id: str | None = None
    modules: list[str] = field(default_factory=list)


@dataclass(frozen=True)
class MetadataIndex:
    """A key of `storage_data`: hashed and compared by `fqn` and `offset`, as DCP's is."""

    fqn: str
    offset: torch.Size | None = None
    index: int | None = field(hash=False, compare=False, default=None)


@dataclass
class Metadata:
    state_dict_metadata: dict
    planner_data: object = None
    storage_data: dict | None = None
    storage_meta: StorageMeta | None = None
    version: str | None = None


@dataclass
class _StorageInfo:
    relative_path: str
    offset: int
    length: int
    transform_descriptors: object = None


CLASSES: dict[tuple[str, str], type] = {
    (DCP_MODULE, "Metadata"): Metadata, (DCP_MODULE, "TensorStorageMetadata"): TensorStorageMetadata,
    (DCP_MODULE, "BytesStorageMetadata"): BytesStorageMetadata,
    (DCP_MODULE, "ChunkStorageMetadata"): ChunkStorageMetadata, (DCP_MODULE, "TensorProperties"): TensorProperties,
    (DCP_MODULE, "MetadataIndex"): MetadataIndex, (DCP_MODULE, "StorageMeta"): StorageMeta,
    (FILESYSTEM_MODULE, "_StorageInfo"): _StorageInfo,
}
"""(module, name) DCP pickles them under -> the stand-in."""


def to_dcp(value):
    """The same metadata built of DCP's own classes (field values shared, containers copied)."""
    import importlib

    real = {cls: getattr(importlib.import_module(module), name) for (module, name), cls in CLASSES.items()}

    def convert(item):
        kind = real.get(type(item))
        if kind is not None:
            made = object.__new__(kind)
            made.__dict__.update({k: convert(v) for k, v in vars(item).items()})
            return made
        if type(item) in (dict, OrderedDict):
            return type(item)((convert(k), convert(v)) for k, v in item.items())
        if type(item) is list:
            return [convert(v) for v in item]
        return item

    return convert(value)
