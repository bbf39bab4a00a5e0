"""The Qwen3.5 export's data path: checkpoint pieces -> cast -> NaN/Inf screen -> safetensors, one HF tensor at a
time, with memory bounded by the piece size (not by a tensor, a layer or the model).

Qwen3.5 fuses several TorchTitan tensors into one HF tensor (`mapping/qwen3_5.FUSIONS`: `in_proj_q/k/v` ->
`in_proj_qkv` and `conv_q/k/v` -> `conv1d` along dim 0, `w1_EFD`/`w3_EFD` -> `gate_up_proj` along dim 1). Nothing
is concatenated in memory: each part is read in row pieces (`dcp.stream`, pooled buffers), cast into one reusable
buffer (`weight_stream.Caster`) and written straight to where its bytes lie in the HF tensor
(`SafetensorsWriter.write_part`). Along dim 0 a part's piece is one contiguous range of the HF tensor; along dim
d > 0 each index of the dims before d is (part's slice -> one contiguous range), e.g. one expert's F gate rows,
then its F up rows. The shard plan is the one `plan_shards` makes for the plan's tensors, so the files are
byte-identical to writing the concatenated tensors whole (tested).

`titan_weights` gives the verifier the checkpoint's own tensors again (`weight_stream.TitanWeights`: read on
demand, rounded to the export dtype), never our output.
"""

from __future__ import annotations

import logging
import math
import time
from collections.abc import Callable
from contextlib import closing
from dataclasses import dataclass, field

import torch

from molgen_export.cancel import CancelToken, check_cancel
from molgen_export.dcp import read, stream
from molgen_export.dcp.source import TensorSource
from molgen_export.hf import safetensors_writer
from molgen_export.mapping import keymap
from molgen_export.mapping import qwen3_5 as qmap
from molgen_export.pipeline import weight_stream
from molgen_export.verify import checks

logger = logging.getLogger(__name__)


@dataclass
class Qwen35StreamOutcome:
    """What streaming the text model wrote and saw."""

    planned: list[safetensors_writer.PlannedTensor]
    files: list[str]
    nonfinite: dict[str, tuple[int, int]] = field(default_factory=dict)
    """HF key -> (NaN, Inf) counts in the values written, for the tensors that have any."""
    largest_write: int = 0
    """Bytes of the largest single write (a cast block, or one slice of it): what one write held in memory."""
    pieces: int = 0


def planned_tensors(plan: qmap.Qwen35Plan, dtype: torch.dtype) -> list[safetensors_writer.PlannedTensor]:
    """The HF tensors the files hold, in the export dtype."""
    return [safetensors_writer.PlannedTensor(t.hf_key, tuple(t.shape), dtype) for t in plan.tensors]


def stream_text_model(source: TensorSource, canonical: dict[str, str], plan: qmap.Qwen35Plan, dtype: torch.dtype,
                      open_writer: Callable[[list[safetensors_writer.PlannedTensor]],
                                            safetensors_writer.SafetensorsWriter],
                      counter: read.ByteCounter, *, piece_bytes: int = stream.DEFAULT_PIECE_BYTES,
                      cast_bytes: int = weight_stream.CAST_BYTES, cancel: CancelToken | None = None,
                      before_close: Callable[[Qwen35StreamOutcome], None] | None = None,
                      readers: int = 2) -> Qwen35StreamOutcome:
    """Write every HF tensor of `plan` from the checkpoint's pieces, each part straight to its place.

    Args:
        source: the checkpoint (a DCP step: pieces read in place; any other source: tensors read whole).
        canonical: canonical TorchTitan key -> checkpoint key.
        plan: the Qwen3.5 plan (`mapping.qwen3_5.plan_hf_text`).
        dtype: the export dtype.
        open_writer: makes the writer for the planned tensors (the shard plan).
        counter: counts the bytes read.
        piece_bytes: largest piece read at once (3 pooled buffers of this size are the reader's memory).
        cast_bytes: size of the reusable cast buffer.
        cancel: checked between pieces and blocks (`ExportAborted`).
        before_close: runs after the last write and before the files are fsynced (raise there to refuse: e.g. on
            NaN/Inf); the writer is aborted then.
        readers: reader threads (`ExportOptions.reader_threads`).

    Returns:
        The planned tensors, the files written (the index among them when sharded), the NaN/Inf counts.
    """
    planned = planned_tensors(plan, dtype)
    writer = open_writer(planned)
    outcome = Qwen35StreamOutcome(planned, [])
    caster = weight_stream.Caster(cast_bytes)
    buffers: dict[int, bytearray] = {}
    stats = stream.StreamStats()
    shapes = {t.hf_key: t.shape for t in plan.tensors}
    # (checkpoint key of a part) -> (HF tensor, concat dim, offset of the part along that dim)
    targets: list[tuple[str, str, int | None, int]] = []
    for entry in plan.tensors:
        offset = 0
        for titan_key in entry.titan_keys:
            targets.append((canonical[titan_key], entry.hf_key, entry.concat_dim, offset))
            if entry.concat_dim is not None:
                offset += tuple(source.model[canonical[titan_key]].shape)[entry.concat_dim]
    began = time.perf_counter()
    try:
        with weight_stream.torch_threads(1):
            # in the order the bytes lie on disk: every piece lands at its own offset, so the order is free
            groups = stream.plan_requests(source, stream.disk_order(source, [t[0] for t in targets]), piece_bytes)
            where = {t[0]: t[1:] for t in targets}
            with closing(stream.stream_pieces(source, groups, counter, piece_bytes=piece_bytes, stats=stats,
                                              buffers=buffers, cancel=cancel, readers=readers)) as pieces:
                for (piece,) in pieces:
                    hf_key, dim, offset = where[piece.fqn]
                    _write_piece(writer, outcome, caster, piece, hf_key, shapes[hf_key], dim, offset, dtype, cancel)
        if before_close is not None:
            before_close(outcome)
        outcome.files = writer.close()
    except BaseException:
        writer.abort()
        raise
    finally:
        buffers.clear()
    outcome.pieces = stats.pieces
    logger.info("streamed %d HF tensors from %d pieces in %.2f s (reads %.2f s, waiting %.2f s, cast %.2f s); "
                "largest write %d bytes", len(planned), stats.pieces, time.perf_counter() - began, stats.read_io,
                stats.consumer_waiting, caster.seconds, outcome.largest_write)
    return outcome


def _write_piece(writer: safetensors_writer.SafetensorsWriter, outcome: Qwen35StreamOutcome,
                 caster: weight_stream.Caster, piece: stream.Piece, hf_key: str, hf_shape: tuple[int, ...],
                 dim: int | None, offset: int, dtype: torch.dtype, cancel: CancelToken | None) -> None:
    """Cast, screen and write one piece (rows of dim 0 of one TorchTitan part) where its bytes lie in `hf_key`."""
    itemsize = dtype.itemsize
    for row_offset, block in caster.blocks(piece.tensor, dtype):
        check_cancel(cancel, f"writing {hf_key}")
        found = checks.nonfinite_in(block)
        if found is not None:
            before = outcome.nonfinite.get(hf_key, (0, 0))
            outcome.nonfinite[hf_key] = (before[0] + found[0], before[1] + found[1])
        first_row = piece.row_start + row_offset
        if dim is None or dim == 0:
            # the part's rows [first_row, +n) are the HF tensor's rows [offset + first_row, +n)
            row_bytes = math.prod(hf_shape[1:]) * itemsize
            writer.write_part(hf_key, (offset + first_row) * row_bytes, block)
            outcome.largest_write = max(outcome.largest_write, block.numel() * itemsize)
            continue
        # along dim d > 0: per index of the dims before d, the part's slice is one contiguous range of the HF tensor
        part_size = block.shape[dim]
        inner = math.prod(hf_shape[dim + 1:])
        slices = block.reshape(-1, part_size * inner)
        prefix_start = first_row * math.prod(hf_shape[1:dim])
        for i in range(slices.shape[0]):
            start = ((prefix_start + i) * hf_shape[dim] + offset) * inner * itemsize
            writer.write_part(hf_key, start, slices[i])
        outcome.largest_write = max(outcome.largest_write, slices.shape[1] * itemsize)


def titan_weights(source: TensorSource, canonical: dict[str, str], dtype: torch.dtype,
                  counter: read.ByteCounter | None = None, *,
                  cancel: CancelToken | None = None) -> weight_stream.TitanWeights:
    """The checkpoint's text-model tensors under canonical TorchTitan names, rounded to `dtype`, read on demand
    (for the logit gate: `keys`, `read`, `fill`, `rows`); the vision tower is left out."""
    sources = {key: keymap.TensorSource(key, checkpoint_key, tuple(source.model[checkpoint_key].shape))
               for key, checkpoint_key in canonical.items() if not qmap.VISION_RE.match(key)}
    return weight_stream.TitanWeights(source, sources, dtype, (1, 1, 1), counter, cancel=cancel)
