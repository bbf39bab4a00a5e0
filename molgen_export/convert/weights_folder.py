"""Read a folder of weights tensor by tensor: safetensors (one file, or shards with an index) or `.bin` files
loaded with `weights_only=True`. Names, shapes and dtypes come from the headers before any data is read.

`WeightsFolder` is a `dcp.source.TensorSource` (as a DCP step's `read.StepMetadata` is), so TorchTitan-named
safetensors go through the same export pipeline as DCP steps.
"""

from __future__ import annotations

import hashlib
import json
import logging
import pickle
import re
from dataclasses import dataclass
from pathlib import Path

import torch

from molgen_export.errors import CheckpointFormatError, UnsafeCheckpointError

logger = logging.getLogger(__name__)

SAFETENSORS_INDEX = "model.safetensors.index.json"
SAFETENSORS_SINGLE = "model.safetensors"
BIN_INDEX = "pytorch_model.bin.index.json"
BIN_SINGLE = "pytorch_model.bin"

SAFETENSORS_DTYPES = {"F64": torch.float64, "F32": torch.float32, "F16": torch.float16, "BF16": torch.bfloat16,
                      "I64": torch.int64, "I32": torch.int32, "I16": torch.int16, "I8": torch.int8,
                      "U8": torch.uint8, "BOOL": torch.bool}
"""safetensors header dtype codes -> torch dtypes."""


@dataclass(frozen=True)
class WeightEntry:
    """One tensor of the folder as its file header describes it."""

    key: str
    file: str
    """File name inside the folder."""
    shape: tuple[int, ...]
    dtype: torch.dtype

    @property
    def stored_bytes(self) -> int:
        n = self.dtype.itemsize
        for d in self.shape:
            n *= d
        return n


class WeightsFolder:
    """The tensors of one weights folder, read one at a time.

    Attributes:
        step_dir: the folder (named so for the tensor-source interface).
        model: key -> `WeightEntry`, in file order.
        fmt: `safetensors` or `bin`.
    """

    other_bytes = 0
    """No optimizer or training state lives in a weights folder."""
    other_keys = 0
    reads_in_place = False
    """Tensors are read whole with `read` (no DCP chunks to read in place)."""

    def __init__(self, folder: Path, model: dict[str, WeightEntry], fmt: str, bin_states: dict[str, dict] | None = None):
        self.step_dir = folder
        self.model = model
        self.fmt = fmt
        self._bin_states = bin_states or {}
        self._handles: dict[str, object] = {}

    @property
    def label(self) -> str:
        return self.step_dir.name

    @property
    def model_bytes(self) -> int:
        return sum(e.stored_bytes for e in self.model.values())

    @property
    def files(self) -> list[str]:
        return sorted({e.file for e in self.model.values()})

    def check_files(self) -> None:
        """Refuse a file that vanished or shrank since the headers were read.

        Raises:
            CheckpointFormatError: naming the file.
        """
        for name in self.files:
            path = self.step_dir / name
            if not path.is_file():
                raise CheckpointFormatError(f"weights file {path} is missing", path=path,
                                            hint="the folder changed while it was read; copy it completely and retry")

    def read(self, key: str, counter=None) -> torch.Tensor:
        """One tensor, as stored (dtype and shape from the file).

        Args:
            key: the tensor name in the files.
            counter: a `dcp_read.ByteCounter` to add the bytes read to, or None.
        """
        entry = self.model[key]
        if self.fmt == "bin":
            tensor = self._bin_states[entry.file][key]
        else:
            handle = self._handles.get(entry.file)
            if handle is None:
                from safetensors import safe_open

                handle = safe_open(str(self.step_dir / entry.file), framework="pt")
                self._handles[entry.file] = handle
            tensor = handle.get_tensor(key)
        if counter is not None:
            counter.add(entry.stored_bytes)
        return tensor

    def fingerprint(self) -> str:
        """sha256 over every tensor's name, file, dtype and shape, and the files' names and sizes."""
        digest = hashlib.sha256()
        for entry in self.model.values():
            digest.update(f"{entry.key}|{entry.file}|{entry.dtype}|{list(entry.shape)}\n".encode())
        for name in self.files:
            digest.update(f"{name}:{(self.step_dir / name).stat().st_size}\n".encode())
        return digest.hexdigest()


def _safetensors_entries(path: Path) -> list[WeightEntry]:
    from safetensors import safe_open

    try:
        with safe_open(str(path), framework="pt") as handle:
            entries = []
            for key in handle.keys():
                piece = handle.get_slice(key)
                code = piece.get_dtype()
                if code not in SAFETENSORS_DTYPES:
                    raise CheckpointFormatError(f"tensor `{key}` in {path} has dtype {code}, which is not a weight dtype "
                                                "molgen_export reads", path=path,
                                                hint="convert the file to bf16/fp16/fp32 weights first")
                entries.append(WeightEntry(key, path.name, tuple(piece.get_shape()), SAFETENSORS_DTYPES[code]))
            return entries
    except CheckpointFormatError:
        raise
    except Exception as exc:  # safetensors raises its own error types on damaged headers
        raise CheckpointFormatError(f"{path} is not a readable safetensors file ({exc})", path=path,
                                    hint="the file is truncated or damaged; copy it again") from exc


def load_bin(path: Path) -> dict:
    """`torch.load(path, weights_only=True)`, memory-mapped when the file allows it.

    Raises:
        UnsafeCheckpointError: the file holds objects `weights_only` loading refuses (it would need unpickling
            arbitrary code); it is never loaded unsafely.
        CheckpointFormatError: not a torch save file.
    """
    try:
        try:
            return torch.load(path, map_location="cpu", weights_only=True, mmap=True)
        except RuntimeError as exc:
            if "mmap" not in str(exc) and "zip" not in str(exc).lower():
                raise
            return torch.load(path, map_location="cpu", weights_only=True)  # legacy (pre-zip) format
    except pickle.UnpicklingError as exc:
        found = re.search(r"GLOBAL ([\w.]+)", str(exc))
        wanted = f"it references `{found.group(1)}`" if found else str(exc).strip().splitlines()[0]
        raise UnsafeCheckpointError(
            f"{path} cannot be loaded with torch.load(weights_only=True): it holds objects beyond tensors and plain "
            f"containers ({wanted}); loading it would mean unpickling arbitrary code, which molgen_export never does",
            path=path,
            hint="in an environment that trusts the file, re-save only the tensors and plain values, e.g. "
                 "torch.save({k: v for k, v in ckpt.items() if k in ('model', 'model_args')}, 'clean.pt')") from exc
    except (OSError, EOFError, RuntimeError, ValueError) as exc:
        raise CheckpointFormatError(f"{path} is not a readable torch checkpoint ({exc})", path=path,
                                    hint="the file is truncated or not a torch.save file") from exc


def _bin_entries(path: Path) -> tuple[list[WeightEntry], dict]:
    state = load_bin(path)
    if not isinstance(state, dict):
        raise CheckpointFormatError(f"{path} holds a {type(state).__name__}, not a state dict", path=path)
    tensors = {k: v for k, v in state.items() if isinstance(v, torch.Tensor)}
    skipped = sorted(set(state) - set(tensors))
    if skipped:
        logger.warning("%s: ignoring %d non-tensor entries: %s", path, len(skipped), skipped[:5])
    return [WeightEntry(k, path.name, tuple(v.shape), v.dtype) for k, v in tensors.items()], tensors


def _index_files(index_path: Path) -> dict[str, str]:
    try:
        weight_map = json.loads(index_path.read_text())["weight_map"]
    except (OSError, ValueError, KeyError, TypeError) as exc:
        raise CheckpointFormatError(f"{index_path} is not a weights index with a `weight_map` ({exc})",
                                    path=index_path, hint="re-save the model or remove the broken index") from exc
    return dict(weight_map)


def open_weights_folder(path: Path) -> WeightsFolder:
    """Open a weights folder (or one `.safetensors`/`.bin`/`.pt` file) without reading tensor data.

    Looks, in order, for `model.safetensors.index.json`, `model.safetensors`, a single other `*.safetensors`,
    `pytorch_model.bin.index.json`, `pytorch_model.bin`.

    Raises:
        CheckpointFormatError: no weights found, a damaged file, or an index that names tensors its shards lack.
        UnsafeCheckpointError: a `.bin` that needs unsafe unpickling.
    """
    path = Path(path)
    if path.is_file():
        folder, names, fmt = path.parent, [path.name], "safetensors" if path.suffix == ".safetensors" else "bin"
        index = None
    elif path.is_dir():
        folder = path
        index, names, fmt = _find_files(path)
    else:
        raise CheckpointFormatError(f"{path} does not exist", path=path, hint="check the path")
    entries: dict[str, WeightEntry] = {}
    bin_states: dict[str, dict] = {}
    for name in names:
        file_path = folder / name
        if not file_path.is_file():
            raise CheckpointFormatError(f"{index or folder} names shard {name}, which is missing", path=file_path,
                                        hint="copy the whole model folder")
        if fmt == "safetensors":
            found = _safetensors_entries(file_path)
        else:
            found, bin_states[name] = _bin_entries(file_path)
        for entry in found:
            if entry.key in entries:
                raise CheckpointFormatError(f"tensor `{entry.key}` is in both {entries[entry.key].file} and {name}",
                                            path=folder, hint="the folder mixes two saves; re-save the model")
            entries[entry.key] = entry
    if index is not None:
        weight_map = _index_files(index)
        wrong = sorted(k for k, f in weight_map.items() if entries.get(k) is None or entries[k].file != f)
        unlisted = sorted(set(entries) - set(weight_map))
        if wrong or unlisted:
            raise CheckpointFormatError(
                f"{index} disagrees with its shards: " + "; ".join(
                    part for part in (f"listed but not in that shard: {wrong[:5]}" if wrong else "",
                                      f"in a shard but not listed: {unlisted[:5]}" if unlisted else "") if part),
                path=index, hint="the index is stale (pytorch/torchtitan#3764 shows how); re-save the model")
    if not entries:
        raise CheckpointFormatError(f"{path} holds no tensors", path=path, hint="point at a folder with model weights")
    logger.info("%s: %d tensors in %d %s file(s)", path, len(entries), len(names), fmt)
    return WeightsFolder(folder, entries, fmt, bin_states)


def _find_files(folder: Path) -> tuple[Path | None, list[str], str]:
    if (folder / SAFETENSORS_INDEX).is_file():
        index = folder / SAFETENSORS_INDEX
        return index, sorted(set(_index_files(index).values())), "safetensors"
    if (folder / SAFETENSORS_SINGLE).is_file():
        return None, [SAFETENSORS_SINGLE], "safetensors"
    loose = sorted(p.name for p in folder.glob("*.safetensors"))
    if len(loose) == 1:
        return None, loose, "safetensors"
    if (folder / BIN_INDEX).is_file():
        index = folder / BIN_INDEX
        return index, sorted(set(_index_files(index).values())), "bin"
    if (folder / BIN_SINGLE).is_file():
        return None, [BIN_SINGLE], "bin"
    present = sorted(p.name for p in folder.iterdir())[:10]
    raise CheckpointFormatError(
        f"{folder} holds no model weights: no {SAFETENSORS_INDEX}, {SAFETENSORS_SINGLE}, single *.safetensors, "
        f"{BIN_INDEX} or {BIN_SINGLE} (found: {', '.join(present) or 'nothing'})", path=folder,
        hint="point at the folder holding the weights" + (" (several loose *.safetensors need an index)" if loose else ""))
