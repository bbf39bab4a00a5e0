"""A DCP step's `.metadata`, read by a pickle reader that can change nothing: which model tensors it holds and where.

Nothing else of the step is read here. `.metadata` is a pickle that other people write (a shared cluster, a
downloaded checkpoint), so it goes through `safe_pickle`, never through Python's unpickler: its globals resolve
to our own constructors for DCP's metadata dataclasses (stand-ins of the same names, `metadata_classes`: DCP itself
is never imported), `torch.Size`, dtypes, layouts and paths, which build fresh objects from plain values (no class object is ever handed to the stream, so nothing can be poisoned).
The result is then checked field by field, and every shard path it names must be a plain file name inside
the step folder (`check_shard_name`) before anything else sees it. `model_ranges_hint` reads the same names
into inert records, to start the disk early.
"""

from __future__ import annotations

import dataclasses
import functools
import hashlib
import logging
import os
import pathlib
import stat
import threading
from collections import OrderedDict
from pathlib import Path

import torch

from molgen_export.dcp import metadata_classes as classes
from molgen_export.dcp import safe_pickle
from molgen_export.dcp.discover import METADATA_FILE
from molgen_export.dcp.metadata_classes import _MEM_FORMAT_ENCODING, TensorProperties
from molgen_export.errors import CheckpointFormatError, SourceVanishedError, UnsafeCheckpointError

logger = logging.getLogger(__name__)

NON_MODEL_PREFIXES = ("optimizer", "lr_scheduler", "dataloader", "train_state")
"""Top-level entries TorchTitan saves beside the model FQNs."""

MAX_METADATA_BYTES = 1 << 30
"""Largest `.metadata` read (a 70B model on 1024 ranks writes tens of MB)."""
MAX_DIMS = 64
"""Most dimensions of a `torch.Size` in the metadata."""
MAX_PATH_CHARS = 4096
"""Longest path (`StorageMeta.checkpoint_id`) built from the metadata."""

_DCP = "torch.distributed.checkpoint.metadata"
_DCP_CLASSES = (
    (_DCP, "Metadata"), (_DCP, "TensorStorageMetadata"), (_DCP, "BytesStorageMetadata"),
    (_DCP, "ChunkStorageMetadata"), (_DCP, "TensorProperties"), (_DCP, "MetadataIndex"), (_DCP, "StorageMeta"),
    ("torch.distributed.checkpoint.filesystem", "_StorageInfo"),
)
"""The dataclasses DCP's FileSystemWriter pickles into `.metadata` (torch 2.0 to 2.13): instantiated with NEWOBJ
and given their state with BUILD, which our reader allows on fresh instances only."""
_DTYPES = {name: value for name, value in vars(torch).items() if isinstance(value, torch.dtype)}
_LAYOUTS = {str(value): value for value in vars(torch).values() if isinstance(value, torch.layout)}
_UNSAFE_HINT = "only export checkpoints written by torch.distributed.checkpoint; if this one is yours, it is damaged"
_CORRUPT_HINT = "the file is corrupt or truncated; re-save the checkpoint or pick another step"


# -- constructors the reader may call: plain values in, fresh objects out ------------------------------------

def _dims(dims) -> tuple[int, ...]:
    if type(dims) not in (tuple, list) or len(dims) > MAX_DIMS:
        raise ValueError(f"a size of {type(dims).__name__}, not at most {MAX_DIMS} integers")
    for d in dims:
        if type(d) is not int or not -(1 << 63) <= d < 1 << 63:
            raise ValueError(f"a size holding {type(d).__name__} {d!r:.40}")
    return tuple(dims)


def _path_parts(parts: tuple) -> tuple[str, ...]:
    if len(parts) > MAX_PATH_CHARS or not all(type(p) is str for p in parts):
        raise ValueError("a path made of something other than strings")
    if sum(len(p) for p in parts) > MAX_PATH_CHARS or any("\0" in p for p in parts):
        raise ValueError(f"a path of more than {MAX_PATH_CHARS} characters, or with a NUL")
    return parts


def _layout(name) -> torch.layout:
    if type(name) is not str or name not in _LAYOUTS:
        raise ValueError(f"no layout {name!r:.40}")
    return _LAYOUTS[name]


def _dataclass_spec(cls: type, build=None, module: str | None = None) -> safe_pickle.Class:
    """NEWOBJ makes `object.__new__(cls)`; BUILD writes a dict of `cls`'s own field names into that one instance."""
    names = frozenset(f.name for f in dataclasses.fields(cls))

    def build_fields(obj, state) -> None:
        if type(state) is not dict:
            raise ValueError(f"state is a {type(state).__name__}, not a dict of fields")
        if not state.keys() <= names:  # (no key the reader makes equals a str unless it is one)
            for key in state:
                if type(key) is not str or key not in names:
                    raise ValueError(f"{cls.__name__} has no field {key!r:.60}")
        obj.__dict__.update(state)

    return safe_pickle.Class(f"{module or cls.__module__}.{cls.__name__}", lambda: object.__new__(cls),
                             build or build_fields)


@functools.cache
def _metadata_specs() -> dict[tuple[str, str], safe_pickle.Spec]:
    """DCP's names -> our stand-ins of its classes (`metadata_classes`): DCP itself is never imported."""
    specs: dict[tuple[str, str], safe_pickle.Spec] = {}
    for module, name in _DCP_CLASSES:
        specs[(module, name)] = _dataclass_spec(classes.CLASSES[(module, name)], module=module)
    encodings = {member.value: member for member in _MEM_FORMAT_ENCODING}
    formats = {_MEM_FORMAT_ENCODING.TORCH_CONTIGUOUS_FORMAT: torch.contiguous_format,
               _MEM_FORMAT_ENCODING.TORCH_CHANNELS_LAST: torch.channels_last,
               _MEM_FORMAT_ENCODING.TORCH_PRESERVE_FORMAT: torch.preserve_format}
    build_dict = specs[(_DCP, "TensorProperties")].build

    def build_properties(obj, state) -> None:
        # TensorProperties.__getstate__ writes (dtype, layout, requires_grad, memory format encoding, pin_memory)
        if type(state) is not tuple:
            return build_dict(obj, state)
        if len(state) != 5:
            raise ValueError(f"state of {len(state)} values, not 5")
        dtype, layout, requires_grad, encoding, pin_memory = state
        if (not isinstance(dtype, torch.dtype) or not isinstance(layout, torch.layout) or type(requires_grad) is not bool
                or type(pin_memory) is not bool or type(encoding) is not _MEM_FORMAT_ENCODING):
            raise ValueError("state values of the wrong types")
        obj.__dict__.update(dtype=dtype, layout=layout, requires_grad=requires_grad, memory_format=formats[encoding],
                            pin_memory=pin_memory)

    def encoding(value) -> _MEM_FORMAT_ENCODING:
        if type(value) is not int or value not in encodings:
            raise ValueError(f"no memory format encoding {value!r:.40}")
        return encodings[value]

    specs[(_DCP, "TensorProperties")] = _dataclass_spec(TensorProperties, build_properties, module=_DCP)
    specs[(_DCP, "_MEM_FORMAT_ENCODING")] = safe_pickle.Function("_MEM_FORMAT_ENCODING", encoding)
    specs[("torch", "Size")] = safe_pickle.Function("torch.Size", lambda dims: torch.Size(_dims(dims)))
    specs[("torch.serialization", "_get_layout")] = safe_pickle.Function("torch.serialization._get_layout", _layout)
    for name, build in (("PosixPath", pathlib.PosixPath), ("PurePosixPath", pathlib.PurePosixPath),
                        ("WindowsPath", pathlib.PureWindowsPath), ("PureWindowsPath", pathlib.PureWindowsPath)):
        specs[("pathlib", name)] = safe_pickle.Function(f"pathlib.{name}",
                                                        lambda *parts, build=build: build(*_path_parts(parts)))
    specs.update(_container_specs())
    specs.update({("torch", name): safe_pickle.Constant(f"torch.{name}", value) for name, value in _DTYPES.items()})
    return specs


def _container_specs() -> dict[tuple[str, str], safe_pickle.Spec]:
    dict_spec = safe_pickle.Function("collections.OrderedDict", OrderedDict, container="dict")
    set_spec = safe_pickle.Function("builtins.set", set, container="set")
    frozenset_spec = safe_pickle.Function("builtins.frozenset", frozenset, container="frozenset")
    return {("collections", "OrderedDict"): dict_spec, ("builtins", "set"): set_spec,
            ("builtins", "frozenset"): frozenset_spec, ("__builtin__", "set"): set_spec,
            ("__builtin__", "frozenset"): frozenset_spec}


def _resolve(module: str, name: str) -> safe_pickle.Spec | None:
    return _metadata_specs().get((module, name))


# -- what the result must look like --------------------------------------------------------------------------

_PLAIN = (str, bytes, int, float, bool, type(None), tuple, list, dict, OrderedDict, set, frozenset, torch.Size)


@functools.cache
def _defaults(cls: type) -> dict[str, object]:
    """Field name -> default of a dataclass (`dataclasses.MISSING` when it has none, or only a factory)."""
    return {f.name: f.default for f in dataclasses.fields(cls)}


def _place(where: str, at: tuple) -> str:
    return where.format(*at) if at else where


class _Shape:
    """Checks the unpickled object against what DCP writes, field by field (types, required fields, ranges)."""

    def __init__(self, path: Path):
        self.path = path
        self.dcp = classes
        self.storage_info = classes._StorageInfo

    def bad(self, what: str) -> CheckpointFormatError:
        return CheckpointFormatError(f"{self.path} is not readable DCP metadata: {what}", path=self.path,
                                     hint=_CORRUPT_HINT)

    # `where` names the checked place; with `at`, it is a `str.format` template of those values, formatted only
    # for a message (a 235B step has 140 000 places to check, and naming each would take longer than the check).

    def fields(self, obj, cls: type, where: str, *at) -> dict:
        if type(obj) is not cls:
            raise self.bad(f"{_place(where, at)} is a {type(obj).__name__}, not {cls.__name__}")
        own = vars(obj)
        defaults = _defaults(cls)
        if own.keys() == defaults.keys():
            return own  # every field set (what DCP writes): nothing to fill in
        values = {}
        for name, default in defaults.items():
            if name in own:
                values[name] = own[name]
            elif default is not dataclasses.MISSING:
                values[name] = default
            else:
                raise self.bad(f"{_place(where, at)} has no `{name}`")
        return values

    def of(self, value, types, where: str, *at):
        if not isinstance(value, types):
            raise self.bad(f"{_place(where, at)} is a {type(value).__name__}")
        return value

    def count(self, value, where: str, *at) -> int:
        if type(value) is not int or not 0 <= value < 1 << 63:
            raise self.bad(f"{_place(where, at)} is {value!r:.40}, not a byte count")
        return value

    def size(self, value, where: str, *at) -> torch.Size:
        if type(value) is not torch.Size:
            raise self.bad(f"{_place(where, at)} is a {type(value).__name__}, not a torch.Size")
        return value

    def plain(self, value, where: str) -> None:
        seen: set[int] = set()
        todo = [value]
        while todo:
            item = todo.pop()
            if type(item) in (tuple, list, set, frozenset, torch.Size):
                if id(item) not in seen:
                    seen.add(id(item))
                    todo.extend(item)
            elif type(item) in (dict, OrderedDict):
                if id(item) not in seen:
                    seen.add(id(item))
                    todo.extend(item.keys())
                    todo.extend(item.values())
            elif type(item) not in _PLAIN:
                raise self.bad(f"{where} holds a {type(item).__name__}")

    def metadata(self, obj):
        dcp = self.dcp
        if type(obj) is not dcp.Metadata:
            raise CheckpointFormatError(f"{self.path} does not hold DCP checkpoint metadata", path=self.path,
                                        hint="point --dcp-path at a step folder written by torch.distributed.checkpoint")
        top = self.fields(obj, dcp.Metadata, "the metadata")
        if top["storage_data"] is None:
            raise CheckpointFormatError(f"{self.path} does not hold DCP checkpoint metadata", path=self.path,
                                        hint="point --dcp-path at a step folder written by torch.distributed.checkpoint")
        items = self.of(top["state_dict_metadata"], dict, "state_dict_metadata")
        bytes_item, tensor_item = dcp.BytesStorageMetadata, dcp.TensorStorageMetadata
        properties, chunk_item, size_type = dcp.TensorProperties, dcp.ChunkStorageMetadata, torch.Size
        item_at = "state_dict_metadata[{0!r:.80}]"
        for fqn, item in items.items():
            self.of(fqn, str, "a key of state_dict_metadata ({0!r:.40})", fqn)
            if type(item) is bytes_item:
                self.fields(item, bytes_item, item_at, fqn)
                continue
            tensor = self.fields(item, tensor_item, item_at, fqn)
            props = self.fields(tensor["properties"], properties, item_at + ".properties", fqn)
            self.of(props["dtype"], torch.dtype, item_at + ".properties.dtype", fqn)
            self.of(props["layout"], torch.layout, item_at + ".properties.layout", fqn)
            self.of(props["memory_format"], torch.memory_format, item_at + ".properties.memory_format", fqn)
            self.of(props["requires_grad"], bool, item_at + ".properties.requires_grad", fqn)
            self.of(props["pin_memory"], bool, item_at + ".properties.pin_memory", fqn)
            size = self.size(tensor["size"], item_at + ".size", fqn)
            for i, chunk in enumerate(self.of(tensor["chunks"], list, item_at + ".chunks", fqn)):
                part = self.fields(chunk, chunk_item, item_at + ".chunks[{1}]", fqn, i)
                offsets, sizes = part["offsets"], part["sizes"]
                if type(offsets) is not size_type or type(sizes) is not size_type:
                    self.size(offsets, item_at + ".chunks[{1}].offsets", fqn, i)
                    self.size(sizes, item_at + ".chunks[{1}].sizes", fqn, i)
                if len(offsets) != len(size) or len(sizes) != len(size) or min((*offsets, *sizes, 0)) < 0:
                    raise self.bad(f"{_place(item_at, (fqn,))}.chunks[{i}] is at {tuple(offsets)} of {tuple(sizes)}, "
                                   f"for a tensor of {tuple(size)}")
        index_type, storage_type = dcp.MetadataIndex, self.storage_info
        entry_at = "storage_data[{0!r:.80}]"
        for index, info in self.of(top["storage_data"], dict, "storage_data").items():
            key = self.fields(index, index_type, "a key of storage_data")
            fqn = self.of(key["fqn"], str, "a key of storage_data: its fqn")
            if key["offset"] is not None:
                self.size(key["offset"], entry_at + " offset", fqn)
            if key["index"] is not None:
                self.of(key["index"], int, entry_at + " index", fqn)
            storage = self.fields(info, storage_type, entry_at, fqn)
            self.of(storage["relative_path"], str, entry_at + ".relative_path", fqn)
            self.count(storage["offset"], entry_at + ".offset", fqn)
            self.count(storage["length"], entry_at + ".length", fqn)
            transforms = storage.get("transform_descriptors")
            if transforms is not None:
                for t in self.of(transforms, (list, tuple), entry_at + ".transform_descriptors", fqn):
                    self.of(t, str, entry_at + ".transform_descriptors", fqn)
        self.plain(top["planner_data"], "planner_data")
        if top["version"] is not None:
            self.of(top["version"], str, "version")
        if top["storage_meta"] is not None:
            meta = self.fields(top["storage_meta"], dcp.StorageMeta, "storage_meta")
            if meta["checkpoint_id"] is not None:
                self.of(meta["checkpoint_id"], (str, pathlib.PurePath), "storage_meta.checkpoint_id")
            for name in ("save_id", "load_id"):
                if meta[name] is not None:
                    self.of(meta[name], str, f"storage_meta.{name}")
            for module in self.of(meta["modules"], list, "storage_meta.modules"):
                self.of(module, str, "storage_meta.modules")
        return obj


# -- shard paths: plain file names inside the step folder ----------------------------------------------------

def shard_name_problem(name: object) -> str | None:
    """Why `name` is not a plain file name (no folder, no `..`, no NUL or control character), or None."""
    if type(name) is not str:
        return f"a {type(name).__name__}, not a file name"
    if name in ("", ".", ".."):
        return "not a file name"
    if "/" in name or "\\" in name:
        return "a path, not a plain file name" + (" (absolute)" if name.startswith("/") else "")
    if len(name) > 255 or any(ord(c) < 32 or ord(c) == 127 for c in name):
        return "not a plain file name (too long, or a control character)"
    return None


def check_shard_name(step_dir: Path, name: object, entry: str) -> None:
    """Refuse a storage path from `.metadata` that is not a plain file name resolving inside the step folder.

    A symlink is followed: it must end inside the step folder, at a regular file. A name that does not exist
    passes (`check_shard_files` reports it missing).

    Raises:
        UnsafeCheckpointError: naming the entry, the path and what is wrong with it.
    """
    problem = shard_name_problem(name)
    if problem is None:
        path = step_dir / name
        try:
            if path.is_symlink():
                real, root = os.path.realpath(path), os.path.realpath(step_dir)
                if real == root or os.path.commonpath([real, root]) != root:
                    problem = f"a symlink to {real}, outside the step folder"
            if problem is None:
                mode = os.stat(path).st_mode
                if not stat.S_ISREG(mode):
                    problem = "not a regular file"
        except FileNotFoundError:
            pass
        except (OSError, ValueError) as exc:
            problem = f"not readable ({type(exc).__name__}: {exc})"
    if problem is not None:
        raise UnsafeCheckpointError(
            f"{step_dir / METADATA_FILE} stores {entry} in `{name!s:.200}`, which is {problem}; refusing to read it "
            "(a crafted .metadata can point the export at files outside the step)",
            hint="DCP names each shard by a plain file name inside the step folder (`__0_0.distcp`); "
                 "export only checkpoints written by torch.distributed.checkpoint", path=step_dir)


def check_opened_shard(fd: int, path: Path) -> None:
    """Refuse an opened shard that is not a regular file inside its step folder (where the open ended up,
    read from /proc on Linux: a symlink swapped in after the metadata was checked is caught here too).

    Raises:
        UnsafeCheckpointError: it is not.
    """
    if not stat.S_ISREG(os.fstat(fd).st_mode):
        raise UnsafeCheckpointError(f"shard {path} is not a regular file; refusing to read it", path=path,
                                    hint="a DCP shard is a plain file inside the step folder")
    try:
        real = os.readlink(f"/proc/self/fd/{fd}")
    except OSError:  # no /proc: the check of the names when the metadata was read stands
        return
    root = os.path.realpath(path.parent)
    if not real.startswith(root.rstrip("/") + "/"):
        raise UnsafeCheckpointError(f"shard {path} resolves to {real}, outside the step folder; refusing to read it",
                                    path=path, hint="a DCP shard is a plain file inside the step folder")


def _confine(step_dir: Path, metadata) -> None:
    checked: set[str] = set()
    for index, info in metadata.storage_data.items():
        if info.relative_path not in checked:
            check_shard_name(step_dir, info.relative_path, f"`{index.fqn}` (offset {index.offset})")
            checked.add(info.relative_path)


# -- reading -------------------------------------------------------------------------------------------------

def read_metadata_bytes(step_dir: Path) -> bytes:
    """The bytes of the step's `.metadata`: a regular file (never a FIFO or device) of at most MAX_METADATA_BYTES.

    Raises:
        FileNotFoundError: there is none.
        CheckpointFormatError: it is not a regular file, is too large, or cannot be read.
    """
    path = step_dir / METADATA_FILE
    fd = os.open(path, os.O_RDONLY | os.O_NONBLOCK | getattr(os, "O_CLOEXEC", 0))
    try:
        if not stat.S_ISREG(os.fstat(fd).st_mode):
            raise CheckpointFormatError(f"{path} is not a regular file", path=path,
                                        hint="DCP writes .metadata as a plain file; pick another step")
        parts, total = [], 0
        while True:
            part = os.read(fd, min(1 << 24, MAX_METADATA_BYTES + 1 - total))
            if not part:
                return b"".join(parts)
            parts.append(part)
            total += len(part)
            if total > MAX_METADATA_BYTES:
                raise CheckpointFormatError(f"{path} is larger than {MAX_METADATA_BYTES >> 20} MiB", path=path,
                                            hint="DCP metadata is far smaller; the file is not DCP's")
    finally:
        os.close(fd)


def _refusal(exc: safe_pickle.Refused, path: Path) -> CheckpointFormatError:
    if exc.kind == safe_pickle.UNKNOWN:
        return UnsafeCheckpointError(
            f"{path} asks to load `{exc.module}.{exc.name}`, which is not part of DCP checkpoint metadata; "
            "refusing to unpickle it (a crafted .metadata can run code)", hint=_UNSAFE_HINT, path=path)
    if exc.kind == safe_pickle.UNSAFE:
        return UnsafeCheckpointError(f"{path}: {exc}; refusing to unpickle it (DCP never writes this, a crafted "
                                     ".metadata does)", hint=_UNSAFE_HINT, path=path)
    return CheckpointFormatError(f"{path} is not readable DCP metadata ({exc})", path=path, hint=_CORRUPT_HINT)


def _parse(raw: bytes, path: Path):
    try:
        obj = safe_pickle.load(raw, _resolve)
    except safe_pickle.Refused as exc:
        raise _refusal(exc, path) from exc
    return _Shape(path).metadata(obj)


def load_metadata_object(step_dir: Path):
    """`.metadata` as DCP's `Metadata`, read by `safe_pickle`, checked field by field, its shard paths confined.

    Raises:
        CheckpointFormatError: missing, unreadable or not DCP metadata.
        UnsafeCheckpointError: it asks for anything outside DCP's metadata classes, tries to change an object it
            has no business with, or names a shard outside the step folder.
        SourceVanishedError: the step folder is gone.
    """
    path = step_dir / METADATA_FILE
    try:
        raw = read_metadata_bytes(step_dir)
    except FileNotFoundError as exc:
        if not step_dir.exists():
            raise SourceVanishedError(f"{step_dir} disappeared before it could be read", path=step_dir) from exc
        raise CheckpointFormatError(f"{path} is missing", path=path,
                                    hint="the checkpoint is incomplete; wait for the save or pick another step") from exc
    except OSError as exc:
        raise CheckpointFormatError(f"{path} cannot be read ({exc})", path=path, hint=_CORRUPT_HINT) from exc
    metadata = _waiting(raw) or _parse(raw, path)
    _confine(step_dir, metadata)
    return metadata


_NAMES_CACHE: OrderedDict[bytes, tuple[str, ...]] = OrderedDict()
_NAMES_LOCK = threading.Lock()
_WAITING: dict[bytes, object] = {}
"""At most one `Metadata` that `referenced_files` parsed (by the sha256 of its bytes) and nobody holds yet: the
export's fingerprint comes first, so its parse is handed to `load_metadata_object` (once) and read by
`model_ranges_hint`, instead of parsing the same bytes three times."""


def _waiting(raw: bytes, take: bool = True):
    """The parsed `Metadata` of exactly these bytes that waits for its one user (removed when `take`), or None."""
    key = hashlib.sha256(raw).digest()
    with _NAMES_LOCK:
        return _WAITING.pop(key, None) if take else _WAITING.get(key)


def referenced_files(step_dir: Path, raw: bytes | None = None) -> list[str]:
    """Every shard file name `.metadata` (its bytes `raw`, else read) refers to, sorted, each confined to the step.

    The names are parsed once per distinct `.metadata` (a small cache keyed by its sha256); the confinement
    (symlinks) is checked on every call.

    Raises:
        CheckpointFormatError, UnsafeCheckpointError: as `load_metadata_object`.
    """
    path = step_dir / METADATA_FILE
    raw = read_metadata_bytes(step_dir) if raw is None else raw
    key = hashlib.sha256(raw).digest()
    with _NAMES_LOCK:
        names = _NAMES_CACHE.get(key)
    if names is None:
        metadata = _parse(raw, path)
        _confine(step_dir, metadata)
        names = tuple(sorted({info.relative_path for info in metadata.storage_data.values()}))
        with _NAMES_LOCK:
            _NAMES_CACHE[key] = names
            while len(_NAMES_CACHE) > 64:
                _NAMES_CACHE.popitem(last=False)
            _WAITING.clear()
            _WAITING[key] = metadata
    else:
        for name in names:
            check_shard_name(step_dir, name, "a shard")
    return list(names)


def is_model_key(fqn: str) -> bool:
    """True for a model FQN, False for TorchTitan's optimizer/scheduler/dataloader/train_state entries."""
    return fqn.split(".", 1)[0] not in NON_MODEL_PREFIXES


class _Record:
    """Stands in for a DCP dataclass in `model_ranges_hint`: a fresh record of the fields BUILD gave it."""

    def __init__(self, kind: str):
        self.kind = kind
        self.fields: dict = {}


def _record_spec(module: str, name: str) -> safe_pickle.Class:
    def build(record: _Record, state) -> None:
        if type(state) is dict and all(type(k) is str for k in state):
            record.fields.update(state)
        else:
            record.fields["state"] = state

    return safe_pickle.Class(f"{module}.{name}", lambda: _Record(name), build)


def _encoding_value(value) -> int:
    if type(value) is not int:
        raise ValueError(f"no memory format encoding {value!r:.40}")
    return value


@functools.cache
def _hint_specs() -> dict[tuple[str, str], safe_pickle.Spec]:
    """The same names as `_metadata_specs`, mapped to inert records and plain values: nothing of DCP is imported."""
    specs: dict[tuple[str, str], safe_pickle.Spec] = {key: _record_spec(*key) for key in _DCP_CLASSES}
    specs[(_DCP, "_MEM_FORMAT_ENCODING")] = safe_pickle.Function("_MEM_FORMAT_ENCODING", _encoding_value)
    specs[("torch", "Size")] = safe_pickle.Function("torch.Size", _dims)
    specs[("torch.serialization", "_get_layout")] = safe_pickle.Function("torch.serialization._get_layout", _layout)
    for name in ("PosixPath", "PurePosixPath", "WindowsPath", "PureWindowsPath"):
        specs[("pathlib", name)] = safe_pickle.Function(f"pathlib.{name}", lambda *parts: "/".join(_path_parts(parts)))
    specs.update(_container_specs())
    specs.update({("torch", name): safe_pickle.Constant(f"torch.{name}", f"torch.{name}") for name in _DTYPES})
    return specs


def _hint_resolve(module: str, name: str) -> safe_pickle.Spec | None:
    return _hint_specs().get((module, name))


def model_ranges_hint(step_dir: Path) -> list[tuple[str, int, int]] | None:
    """`(shard, offset, length)` of every model item, read from `.metadata` without importing DCP, or None.

    Only a hint for prefetching (never for reading data): None on anything unexpected, a shard name that is not
    a plain file name included.
    """
    try:
        raw = read_metadata_bytes(step_dir)
        parsed = _waiting(raw, take=False)
        if parsed is not None:  # already parsed (and checked) for the fingerprint
            return sorted((info.relative_path, info.offset, info.length) for index, info in parsed.storage_data.items()
                          if is_model_key(index.fqn))
        root = safe_pickle.load(raw, _hint_resolve)
        ranges = []
        for index, info in root.fields["storage_data"].items():
            fqn, name = index.fields["fqn"], info.fields["relative_path"]
            offset, length = info.fields["offset"], info.fields["length"]
            if shard_name_problem(name) or type(fqn) is not str or type(offset) is not int or type(length) is not int:
                return None
            if is_model_key(fqn):
                ranges.append((name, offset, length))
        return sorted(ranges)
    except Exception as exc:  # a hint: the real reader reports real problems
        logger.debug("no prefetch hint from %s: %s", step_dir, exc)
        return None
