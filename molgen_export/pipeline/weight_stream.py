"""The export's data path: checkpoint pieces -> cast -> NaN/Inf screen -> safetensors, with the tie decided on the way.

Part of the composer (`export.py` calls it; it calls the read, check and write stages). Memory stays flat in
the model's size: tensors arrive as row pieces in pooled buffers (`dcp_stream`), are cast into one reusable
buffer and written at their final offset (`safetensors_writer.SafetensorsWriter.write_part`).

The embedding and the head are streamed first, side by side, and compared bit for bit piece by piece. The
output layout (which tensors the files hold) depends on the outcome, so the writer is opened for the tied
layout and reopened untied at the first differing piece; when that piece is the first one (a truly untied
head differs everywhere), nothing was written yet and nothing is lost. Only a head equal to the embedding on
its first rows but not later costs a second read of those rows, which the report then shows in `bytes_read`.

`TitanWeights` reads the checkpoint's tensors again for the verifier, one layer at a time, rounded to the
export dtype, so the reference never comes from our own output.
"""

from __future__ import annotations

import logging
import math
import time
from collections.abc import Callable, Iterable
from contextlib import closing, contextmanager
from dataclasses import dataclass, field

import torch

from molgen_export.verify import checks
from molgen_export.dcp import read
from molgen_export.dcp import stream
from molgen_export.dcp.source import TensorSource
from molgen_export.mapping import keymap
from molgen_export.hf import safetensors_writer
from molgen_export.cancel import CancelToken, check_cancel

logger = logging.getLogger(__name__)

ProgressFactory = Callable[[int, str], object]
"""`factory(total_bytes, label)` makes a progress bar (`total`, `update(n)`, `close()`, as tqdm's) for one stream;
the CLI passes one when it writes to a terminal (the library, the watcher and pipes pass none: no bar)."""

CAST_BYTES = 32 << 20
"""Size of the reusable buffer a piece is cast into (a piece is cast in blocks of whole rows)."""


@contextmanager
def torch_threads(n: int | None):
    """Run the block with `n` intra-op threads (one thread casts fastest while another one reads), then restore
    the caller's count; `n` None or 0 leaves it as it is."""
    before = torch.get_num_threads()
    if n:
        torch.set_num_threads(n)
    try:
        yield
    finally:
        if n and torch.get_num_threads() != before:
            torch.set_num_threads(before)


class Caster:
    """Casts row blocks of a tensor into one reusable buffer, so no cast allocates (and page-faults) memory."""

    def __init__(self, block_bytes: int = CAST_BYTES):
        self.block_bytes = block_bytes
        self._buffer = torch.empty(0, dtype=torch.uint8)
        self.seconds = 0.0

    def blocks(self, tensor: torch.Tensor, dtype: torch.dtype):
        """Yield `(row_offset, cast_block)`; each block is valid until the next one is requested."""
        if tensor.dtype == dtype:
            yield 0, tensor
            return
        rows = tensor.shape[0] if tensor.dim() else 1
        flat = tensor if tensor.dim() else tensor.reshape(1)
        row_bytes = max(1, flat[0].numel() * dtype.itemsize) if rows else 1
        step = max(1, self.block_bytes // row_bytes)
        for start in range(0, rows, step):
            source = flat[start:start + step]
            nbytes = source.numel() * dtype.itemsize
            if self._buffer.numel() < nbytes:
                self._buffer = torch.empty(max(nbytes, self.block_bytes), dtype=torch.uint8)
            began = time.perf_counter()
            out = self._buffer[:nbytes].view(dtype).view(source.shape)
            out.copy_(source)
            self.seconds += time.perf_counter() - began
            yield start, (out if tensor.dim() else out.reshape(()))


@dataclass
class StreamOutcome:
    """What streaming the weights decided and saw."""

    writer: safetensors_writer.SafetensorsWriter
    tie: bool
    tie_finding: checks.Finding | None
    """Set once the head was compared with the embedding."""
    planned: list[safetensors_writer.PlannedTensor]
    nonfinite: dict[str, tuple[int, int]] = field(default_factory=dict)
    """titan key -> (NaN, Inf) counts in the values written, for the tensors that have any."""
    rereads: int = 0
    """Embedding/head pieces read twice because the head matched the embedding at first and differed later."""


class WeightStreamer:
    """Streams one planned export's weights into a safetensors writer.

    Args:
        source: the tensor source (`dcp.source.TensorSource`: a DCP step or a weights folder).
        sources: canonical TorchTitan key -> where its values come from.
        mapping: canonical TorchTitan key -> HF key.
        dtype: the export dtype.
        arch_heads: (n_heads, n_kv_heads, head_dim) to split a fused wqkv.
        open_writer: makes the writer for the list of planned tensors.
        counter: counts the bytes read.
        piece_bytes: largest piece read at once.
        cancel: a `cancel.CancelToken`, checked between pieces and cast blocks (`ExportAborted` when requested).
        progress: makes a progress bar for the stream; None: no bar.
        readers: reader threads (`ExportOptions.reader_threads`).
    """

    def __init__(self, source: TensorSource, sources: dict[str, keymap.TensorSource], mapping: dict[str, str],
                 dtype: torch.dtype,
                 arch_heads: tuple[int, int, int],
                 open_writer: Callable[[list[safetensors_writer.PlannedTensor]], safetensors_writer.SafetensorsWriter],
                 counter: read.ByteCounter, piece_bytes: int = stream.DEFAULT_PIECE_BYTES, *,
                 cancel: CancelToken | None = None, progress: ProgressFactory | None = None, readers: int = 2):
        self.source = source
        self.sources = sources
        self.mapping = mapping
        self.dtype = dtype
        self.arch_heads = arch_heads
        self.open_writer = open_writer
        self.counter = counter
        self.piece_bytes = piece_bytes
        self.cancel = cancel
        self.progress = progress
        self.readers = readers
        self.stats = stream.StreamStats()
        self.caster = Caster()
        self.seconds = {"screen": 0.0, "write": 0.0, "compare": 0.0}
        """Time spent by the caller screening for NaN/Inf, writing, and comparing head with embedding."""
        self._buffers: dict[int, bytearray] = {}
        self._outcome: StreamOutcome | None = None
        self._bar = None
        self.by_checkpoint_key: dict[str, list[keymap.TensorSource]] = {}
        for item in sources.values():
            self.by_checkpoint_key.setdefault(item.checkpoint_key, []).append(item)

    @contextmanager
    def _streaming(self):
        """One thread for casts, a progress bar when asked for, and the writer aborted if anything fails."""
        if self.progress is not None:
            total = sum(math.prod(item.shape) for item in self.sources.values()) * self.dtype.itemsize
            self._bar = self.progress(total, getattr(self.source, "label", "export"))
        try:
            with torch_threads(1):
                yield
        except BaseException:
            if self._outcome is not None:
                self._outcome.writer.abort()
            self._buffers.clear()  # the pooled read buffers go now, not with the streamer
            raise
        finally:
            if self._bar is not None:
                self._bar.close()
                self._bar = None

    def planned(self, tie: bool) -> list[safetensors_writer.PlannedTensor]:
        """The tensors the files hold for this tie decision."""
        return [safetensors_writer.PlannedTensor(self.mapping[key], item.shape, self.dtype) for key, item in self.sources.items()
                if not (tie and key == "lm_head.weight")]

    def _stream(self, groups):
        return stream.stream_pieces(self.source, groups, self.counter, piece_bytes=self.piece_bytes,
                                    stats=self.stats, buffers=self._buffers, cancel=self.cancel, readers=self.readers)

    def _emit(self, outcome: StreamOutcome, titan_key: str, row_start: int, tensor: torch.Tensor,
              also_counts_for: str | None = None) -> None:
        """Cast, screen for NaN/Inf (counted for `titan_key` and `also_counts_for`) and write rows of a tensor."""
        hf_key = self.mapping[titan_key]
        writer = outcome.writer
        row_bytes = math.prod(tensor.shape[1:]) * self.dtype.itemsize
        for offset, block in self.caster.blocks(tensor, self.dtype):
            check_cancel(self.cancel, f"writing {hf_key}")
            began = time.perf_counter()
            found = checks.nonfinite_in(block)
            if found is not None:
                for key in (titan_key, also_counts_for):
                    if key is not None:
                        before = outcome.nonfinite.get(key, (0, 0))
                        outcome.nonfinite[key] = (before[0] + found[0], before[1] + found[1])
            screened = time.perf_counter()
            writer.write_part(hf_key, (row_start + offset) * row_bytes, block)
            self.seconds["screen"] += screened - began
            self.seconds["write"] += time.perf_counter() - screened
            if self._bar is not None:
                self._bar.update(block.numel() * block.element_size())

    def _open(self, tie: bool) -> StreamOutcome:
        """A fresh writer for this tie decision (the one open before, if any, is discarded with its files)."""
        if self._outcome is not None:
            writer = self._outcome.writer
            writer.abort()
            for shard in writer.shards:
                (writer.folder / shard.filename).unlink(missing_ok=True)
        planned = self.planned(tie)
        self._outcome = StreamOutcome(self.open_writer(planned), tie, None, planned)
        return self._outcome

    def stream(self, run_says_tied: bool, after_tie: Callable[[StreamOutcome], None] | None = None) -> StreamOutcome:
        """Stream every weight; `after_tie` runs once the tie is decided, before the other tensors are read.

        Returns:
            The writer (not yet closed), the tie decision and finding, and the NaN/Inf counts.

        Raises:
            Whatever reading, `after_tie` or writing raises; the writer is aborted first.
        """
        with self._streaming():
            outcome = self._stream_embedding_and_head(run_says_tied)
            if self._bar is not None and outcome.tie and "lm_head.weight" in self.sources:
                self._bar.total -= math.prod(self.sources["lm_head.weight"].shape) * self.dtype.itemsize
            if after_tie is not None:
                after_tie(outcome)
            self._stream_rest(outcome)
        logger.info("streamed %d pieces: readers %.2f s in reads; caller %.2f s waiting for data, %.2f s casting, "
                    "%.2f s screening, %.2f s writing, %.2f s comparing head and embedding", self.stats.pieces,
                    self.stats.read_io, self.stats.consumer_waiting, self.caster.seconds, self.seconds["screen"],
                    self.seconds["write"], self.seconds["compare"])
        return outcome

    def _stream_embedding_and_head(self, run_says_tied: bool) -> StreamOutcome:
        embed = self.sources["tok_embeddings.weight"]
        head = self.sources.get("lm_head.weight")
        if head is None:
            outcome = self._open(True)
            outcome.tie_finding, _ = checks.TieCheck(run_says_tied).finding(has_head=False)
            with closing(self._stream(stream.plan_requests(self.source, [embed.checkpoint_key],
                                                               self.piece_bytes))) as pieces:
                for (piece,) in pieces:
                    self._emit(outcome, embed.titan_key, piece.row_start, piece.tensor)
            return outcome
        pairs = stream.plan_pairs(self.source, embed.checkpoint_key, head.checkpoint_key, self.piece_bytes // 2)
        same_shape = tuple(self.source.model[embed.checkpoint_key].shape) == tuple(self.source.model[head.checkpoint_key].shape)
        check = checks.TieCheck(run_says_tied)
        outcome = self._open(same_shape)  # guess tied while they can be equal: a truly untied head differs at once
        rereads = 0
        position = 0
        while position < len(pairs):
            restart = False
            with closing(self._stream(pairs[position:])) as pieces:
                for e, h in pieces:
                    position += 1
                    if not outcome.tie:  # written untied: the check only measures the difference (run claims tying)
                        check.add(e.tensor, h.tensor)
                    else:
                        began = time.perf_counter()
                        same = check.add(e.tensor, h.tensor)
                        self.seconds["compare"] += time.perf_counter() - began
                        if same:
                            self._emit(outcome, embed.titan_key, e.row_start, e.tensor, also_counts_for=head.titan_key)
                            continue
                        outcome = self._open(False)
                        if position > 1:  # the tied layout already held pieces: read those again, untied
                            rereads = position - 1
                            logger.info("the head matched the embedding for %d pieces, then differed: reading "
                                        "both again untied", rereads)
                            position = 0
                            restart = True
                            break
                    self._emit(outcome, embed.titan_key, e.row_start, e.tensor)
                    self._emit(outcome, head.titan_key, h.row_start, h.tensor)
            if not restart:
                break
        outcome.tie = same_shape and check.equal
        outcome.rereads = rereads
        outcome.tie_finding, _ = check.finding()
        return outcome

    def stream_known_tie(self, tie: bool) -> StreamOutcome:
        """Stream `sources` with the tie already decided (see `decide_tie`): one rank of a distributed export,
        whose `sources` hold only the tensors of its shards.

        Returns:
            The writer (not yet closed), the tie decision and the NaN/Inf counts.
        """
        with self._streaming():
            outcome = self._open(tie)
            for key in ("tok_embeddings.weight", "lm_head.weight"):
                item = self.sources.get(key)
                if item is None or (tie and key == "lm_head.weight"):
                    continue
                requests = stream.plan_requests(self.source, [item.checkpoint_key], self.piece_bytes)
                with closing(self._stream(requests)) as pieces:
                    for (piece,) in pieces:
                        self._emit(outcome, key, piece.row_start, piece.tensor)
            self._stream_rest(outcome)
        return outcome

    def _stream_rest(self, outcome: StreamOutcome) -> None:
        skip = {self.sources[key].checkpoint_key for key in ("tok_embeddings.weight", "lm_head.weight")
                if key in self.sources}
        # training-only buffers (MoE expert bias) have no HF tensor: checked elsewhere, never streamed
        keys = [k for k in stream.disk_order(self.source, self.source.model)
                if k not in skip and k in self.by_checkpoint_key]
        fused = {k for k in keys if any(s.part for s in self.by_checkpoint_key.get(k, ()))}
        groups = stream.plan_requests(self.source, keys, self.piece_bytes, whole=fused)
        with closing(self._stream(groups)) as pieces:
            for (piece,) in pieces:
                for item in self.by_checkpoint_key[piece.fqn]:
                    if item.expert is not None:  # grouped experts: a piece holds whole experts (rows of dim 0)
                        local = item.expert - piece.row_start
                        if 0 <= local < piece.tensor.shape[0]:
                            self._emit(outcome, item.titan_key, 0, piece.tensor[local])
                    elif item.part is None:
                        self._emit(outcome, item.titan_key, piece.row_start, piece.tensor)
                    else:
                        n_heads, n_kv_heads, head_dim = self.arch_heads
                        value = keymap.split_fused_qkv(piece.tensor, item.part, n_heads=n_heads,
                                                       n_kv_heads=n_kv_heads, head_dim=head_dim)
                        self._emit(outcome, item.titan_key, 0, value)


def decide_tie(source: TensorSource, sources: dict[str, keymap.TensorSource], run_says_tied: bool,
               counter: read.ByteCounter | None = None,
               piece_bytes: int = stream.DEFAULT_PIECE_BYTES) -> tuple[bool, checks.Finding]:
    """Run the tie check (`checks.TieCheck`) on the head and the embedding piece by piece, writing nothing (the
    distributed export decides the tie on rank 0 before the ranks plan their shards).

    Returns:
        Whether to write the model tied, and the tied-weights finding.
    """
    embed = sources["tok_embeddings.weight"]
    head = sources.get("lm_head.weight")
    check = checks.TieCheck(run_says_tied)
    if head is None:
        return True, check.finding(has_head=False)[0]
    pairs = stream.plan_pairs(source, embed.checkpoint_key, head.checkpoint_key, piece_bytes // 2)
    with closing(stream.stream_pieces(source, pairs, counter, piece_bytes=piece_bytes)) as pieces:
        for e, h in pieces:
            check.add(e.tensor, h.tensor)
            if not check.wants_more:
                break
    finding, tie = check.finding()
    return tie, finding


class TitanWeights:
    """The checkpoint's tensors under canonical TorchTitan names, rounded to the export dtype, read on demand.

    What the verifier compares the written files against: it reads the checkpoint again (never our output),
    a layer at a time, into the caller's float32 tensors. With `cancel`, every read first checks it, so a stop
    request ends the logit gate at its next layer (`ExportAborted`).
    """

    def __init__(self, source: TensorSource, sources: dict[str, keymap.TensorSource], dtype: torch.dtype,
                 arch_heads: tuple[int, int, int], counter: read.ByteCounter | None = None,
                 piece_bytes: int = 16 << 20, keep_fused: bool = False, cancel: CancelToken | None = None):
        self.source = source
        self.cancel = cancel
        self.sources = sources
        self.dtype = dtype
        self.arch_heads = arch_heads
        self.counter = counter
        self.piece_bytes = piece_bytes
        self.caster = Caster(piece_bytes)
        self._buffers: dict[int, bytearray] = {}
        self._last: tuple[str, torch.Tensor] | None = None
        """The last tensor read whole (for sources read whole, and fused wqkv split three ways)."""
        self._canonical: dict[str, keymap.TensorSource] = {}
        """Canonical TorchTitan key -> source; per-expert sources fold back into their grouped tensor."""
        for key, item in sources.items():
            if item.part is not None and keep_fused:
                # the reference is built from the run's config, which fuses QKV as the checkpoint does: it takes
                # the checkpoint's `wqkv` whole, never our split of it
                fused_key = keymap.canonical_titan_key(item.checkpoint_key)[0]
                self._canonical[fused_key] = keymap.TensorSource(fused_key, item.checkpoint_key,
                                                                 tuple(source.model[item.checkpoint_key].shape))
            elif item.expert is None:
                self._canonical[key] = item
            elif item.grouped_key not in self._canonical:
                self._canonical[item.grouped_key] = keymap.TensorSource(item.grouped_key, item.checkpoint_key,
                                                                        tuple(source.model[item.checkpoint_key].shape))

    def _whole(self, titan_key: str) -> torch.Tensor:
        check_cancel(self.cancel, f"verifying {titan_key}")
        item = self._canonical[titan_key]
        last = self._last  # a fused wqkv feeds three keys; a local copy, as two threads may ask at once
        if last is None or last[0] != item.checkpoint_key:
            self._last = None
            last = self._last = (item.checkpoint_key, self.source.read(item.checkpoint_key, self.counter))
        tensor = last[1]
        if item.part is not None:
            n_heads, n_kv_heads, head_dim = self.arch_heads
            tensor = keymap.split_fused_qkv(tensor, item.part, n_heads=n_heads, n_kv_heads=n_kv_heads,
                                            head_dim=head_dim)
        return tensor

    def keys(self) -> list[str]:
        """Every canonical TorchTitan key of the checkpoint (grouped experts as one key)."""
        return list(self._canonical)

    def read(self, titan_keys: Iterable[str]) -> dict[str, torch.Tensor]:
        """Whole tensors, rounded to the export dtype (for small models)."""
        return {key: self._whole(key).to(self.dtype) for key in titan_keys}

    def fill(self, targets: dict[str, torch.Tensor]) -> None:
        """Copy each named tensor, rounded to the export dtype, into its (float32) target, piece by piece."""
        direct = {self._canonical[k].checkpoint_key: k for k in targets if self._canonical[k].part is None}
        for key in targets:
            if self._canonical[key].part is not None:
                targets[key].copy_(self._whole(key).to(self.dtype))
        groups = stream.plan_requests(self.source, stream.disk_order(self.source, direct), self.piece_bytes)
        check_cancel(self.cancel, "verifying")
        for (piece,) in stream.stream_pieces(self.source, groups, self.counter, piece_bytes=self.piece_bytes,
                                                 buffers=self._buffers, cancel=self.cancel):
            target = targets[direct[piece.fqn]]
            for offset, block in self.caster.blocks(piece.tensor, self.dtype):
                start = piece.row_start + offset
                if target.dim():
                    target[start:start + block.shape[0]].copy_(block)
                else:
                    target.copy_(block)

    def rows(self, titan_key: str, start: int, stop: int) -> torch.Tensor:
        """Rows `start:stop` of a tensor (embedding lookups, head blocks), rounded to the export dtype."""
        check_cancel(self.cancel, f"verifying {titan_key}")
        item = self._canonical[titan_key]
        if item.part is None and self.source.reads_in_place:
            tensor = read.read_rows(self.source, item.checkpoint_key, start, stop, self.counter)
        else:
            tensor = self._whole(titan_key)[start:stop]
        return tensor.to(self.dtype)
