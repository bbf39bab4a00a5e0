"""What the export needs from a tensor source: the `TensorSource` protocol that a DCP step (`read.StepMetadata`)
and a folder of weights files (`convert.weights_folder.WeightsFolder`) both satisfy."""

from __future__ import annotations

from collections.abc import Mapping
from pathlib import Path
from typing import TYPE_CHECKING, Protocol

import torch

if TYPE_CHECKING:
    from molgen_export.dcp.read import ByteCounter


class TensorEntry(Protocol):
    """One tensor as the source's metadata or file headers describe it (before any data is read)."""

    @property
    def shape(self) -> tuple[int, ...]: ...

    @property
    def dtype(self) -> torch.dtype: ...

    @property
    def stored_bytes(self) -> int:
        """Bytes the tensor takes where it is stored."""
        ...


class TensorSource(Protocol):
    """Where the weights of one export come from; the planner, the streamer (`dcp.stream`,
    `pipeline.weight_stream`) and the verifier's `TitanWeights` read through this and nothing else.

    A DCP step also exposes its chunk layout (`TensorEntry.chunks`, `records`); it says so with `reads_in_place`,
    and only then are tensors read in row ranges straight from the shards. Any other source is read with `read`
    (whole tensors, handed out in row slices).
    """

    step_dir: Path
    """The folder the tensors live in."""
    model: Mapping[str, TensorEntry]
    """Model tensors by their key in the source, in the order the source lists them."""
    other_bytes: int
    """Bytes of optimizer, scheduler, dataloader and train state (never read; 0 for a weights folder)."""
    other_keys: int
    """How many such non-model entries there are."""
    reads_in_place: bool
    """True for a DCP step (`model` entries carry DCP chunks, read in place in row ranges); False: `read` only."""

    @property
    def label(self) -> str:
        """A short name for messages (the folder name, e.g. `step-1800`)."""
        ...

    @property
    def model_bytes(self) -> int:
        """Bytes stored for the model tensors."""
        ...

    def check_files(self) -> None:
        """Refuse files that vanished or shrank since the metadata was read (raises a `MolgenExportError`)."""
        ...

    def read(self, key: str, counter: ByteCounter | None = None) -> torch.Tensor:
        """One whole tensor as stored; the bytes read are added to `counter` when given."""
        ...
