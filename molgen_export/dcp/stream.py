"""Stream model tensors out of a step as row pieces, read ahead by two threads into a few reusable buffers.

The export's memory then stays flat in the model's size: a piece is at most `piece_bytes` of whole rows
(dim 0) of one tensor, read with one large `pread` straight from the shard into a pooled buffer (no
intermediate copy, no fresh allocation to page-fault in), while the caller casts and writes the pieces before.
Small items (up to `read.SMALL_ITEM_BYTES`) are read whole, headers included, in one `pread`.
Chunks that cannot be read in place (see `dcp_read`), and tensor sources other than a DCP step (a
`source.TensorSource` whose `reads_in_place` is False, e.g. `convert.weights_folder.WeightsFolder`), are read
whole and handed out in row slices.
"""

from __future__ import annotations

import logging
import mmap
import os
import threading
import time
from collections.abc import Iterable, Iterator
from dataclasses import dataclass

import torch

from molgen_export.dcp import read

logger = logging.getLogger(__name__)

DEFAULT_PIECE_BYTES = 64 << 20
"""Largest piece read at once; 3 such buffers (6 when pieces come in pairs) are the reader's whole memory."""
MAP_SHARDS = False
"""Read large items through a read-only mapping of the shard instead of `pread`: the caller casts straight from
the page cache (one memory copy fewer; each piece's pages are unmapped once used, so they never add up in our
memory). Off by default: on this project's 2-core test machine it saved reader CPU (0.3 s instead of 2-2.7 s
at 1.7B with a hot cache) but no wall time, and an I/O error on a mapped page kills the process with SIGBUS
where `pread` raises an error the watcher can retry (docs/PERFORMANCE.md)."""
_PAGE = mmap.PAGESIZE


@dataclass(frozen=True)
class PieceRequest:
    """Rows `row_start:row_stop` of one tensor, lying in one chunk when `chunk` is set."""

    fqn: str
    row_start: int
    row_stop: int
    chunk: int | None = None
    """Index of the chunk holding these rows when they can be read in place; None: read the tensor whole."""


@dataclass(frozen=True)
class Piece:
    """Rows of one tensor. `tensor` may live in a pooled buffer: it is valid until the stream moves on."""

    fqn: str
    row_start: int
    tensor: torch.Tensor
    path: str

    @property
    def row_stop(self) -> int:
        return self.row_start + (self.tensor.shape[0] if self.tensor.dim() else 1)


@dataclass
class StreamStats:
    """Where the streaming time went (seconds), filled by the stream."""

    read_io: float = 0.0
    """Reader threads inside reads (summed over the threads)."""
    consumer_waiting: float = 0.0
    """Consumer waiting for a piece: the disk was the bottleneck."""
    pieces: int = 0


def _shape_rows(shape: tuple[int, ...]) -> int:
    return shape[0] if shape else 1


def disk_order(source, fqns: Iterable[str]) -> list[str]:
    """`fqns` sorted by where their first chunk lies (file, offset), for sequential reads; other sources: as given."""
    fqns = list(fqns)
    if not source.reads_in_place:
        return fqns

    def where(fqn: str):
        chunks = source.model[fqn].chunks
        first = min(chunks, key=lambda c: (c.relative_path, c.file_offset)) if chunks else None
        return (first.relative_path, first.file_offset) if first else ("", 0)

    return sorted(fqns, key=where)


def _boundaries(source, fqn: str) -> list[int] | None:
    """Row boundaries of the chunks of a DCP tensor readable in row ranges, else None."""
    if not source.reads_in_place:
        return None
    entry = source.model[fqn]
    if not entry.shape or not entry.row_chunked or any(c.transforms for c in entry.chunks):
        return None
    return sorted({0, entry.rows, *(c.row_start for c in entry.chunks), *(c.row_start + c.sizes[0] for c in entry.chunks)})


def _chunk_for(source, fqn: str, start: int, stop: int) -> int | None:
    for index, chunk in enumerate(source.model[fqn].chunks):
        if chunk.row_start <= start and stop <= chunk.row_start + chunk.sizes[0]:
            return index
    return None


def _split(source, fqn: str, bounds: list[int], piece_bytes: int) -> list[PieceRequest]:
    entry = source.model[fqn]
    row_bytes = max(1, entry.row_elements * entry.dtype.itemsize)
    step = max(1, piece_bytes // row_bytes)
    requests = []
    for first, last in zip(bounds, bounds[1:]):
        chunk = _chunk_for(source, fqn, first, last)
        small = chunk is not None and entry.chunks[chunk].length <= read.SMALL_ITEM_BYTES
        size = last - first if small else step  # a small item is read whole anyway: one piece
        for start in range(first, last, size):
            stop = min(last, start + size)
            requests.append(PieceRequest(fqn, start, stop, _chunk_for(source, fqn, start, stop)))
    return requests


def plan_requests(source, fqns: Iterable[str], piece_bytes: int = DEFAULT_PIECE_BYTES,
                  whole: Iterable[str] = ()) -> list[tuple[PieceRequest, ...]]:
    """One group per piece, tensors in the given order, each split into pieces of at most `piece_bytes`.

    Args:
        source: a `read.StepMetadata` or any tensor source.
        fqns: the tensors, in reading order.
        piece_bytes: the largest piece.
        whole: tensors the caller needs in one piece (e.g. a fused wqkv to split).
    """
    whole = set(whole)
    groups: list[tuple[PieceRequest, ...]] = []
    for fqn in fqns:
        bounds = None if fqn in whole else _boundaries(source, fqn)
        if bounds is None:
            groups.append((PieceRequest(fqn, 0, _shape_rows(tuple(source.model[fqn].shape))),))
        else:
            groups.extend((request,) for request in _split(source, fqn, bounds, piece_bytes))
    return groups


def plan_pairs(source, first: str, second: str, piece_bytes: int = DEFAULT_PIECE_BYTES
               ) -> list[tuple[PieceRequest, PieceRequest]]:
    """Pieces of two same-shaped tensors over the same rows, in pairs (e.g. embedding and head, to compare them)."""
    a_shape, b_shape = tuple(source.model[first].shape), tuple(source.model[second].shape)
    a_bounds, b_bounds = _boundaries(source, first), _boundaries(source, second)
    if a_shape != b_shape or a_bounds is None or b_bounds is None:
        return [(PieceRequest(first, 0, _shape_rows(a_shape)), PieceRequest(second, 0, _shape_rows(b_shape)))]
    bounds = sorted(set(a_bounds) | set(b_bounds))
    firsts = _split(source, first, bounds, piece_bytes)
    return [(a, PieceRequest(second, a.row_start, a.row_stop, _chunk_for(source, second, a.row_start, a.row_stop)))
            for a in firsts]


class _Reader:
    """The reader thread's side: fills pooled buffers for requests, in order."""

    def __init__(self, source, counter: read.ByteCounter | None, piece_bytes: int, stats: StreamStats,
                 buffers: dict[int, bytearray]):
        self.source = source
        self.counter = counter
        self.piece_bytes = piece_bytes
        self.stats = stats
        self.buffers = buffers
        self.fds: dict[str, int] = {}
        self.maps: dict[str, mmap.mmap | None] = {}
        self.mapped: dict[int, tuple[mmap.mmap, int, int]] = {}
        """slot -> (mapping, offset, length) of the piece that slot holds, to unmap once it is used."""
        self.whole: tuple[str, torch.Tensor] | None = None
        self.noted: set[tuple[str, int]] = set()
        self._lock = threading.RLock()

    def hint(self, request: PieceRequest) -> None:
        """Ask the kernel to start reading a coming request's bytes (the disk works while we copy and cast)."""
        if not self.source.reads_in_place or request.chunk is None:
            return
        entry = self.source.model[request.fqn]
        chunk = entry.chunks[request.chunk]
        record = self.source.records.get((request.fqn, request.chunk))
        if record is None:
            offset, length = chunk.file_offset, min(chunk.length, self.piece_bytes)
        else:
            row_bytes = entry.row_elements * entry.dtype.itemsize
            offset = chunk.file_offset + record.data_offset + (request.row_start - chunk.row_start) * row_bytes
            length = (request.row_stop - request.row_start) * row_bytes
        try:
            os.posix_fadvise(self._fd(chunk.relative_path), offset, length, os.POSIX_FADV_WILLNEED)
        except (AttributeError, OSError):
            pass

    def release(self, slot: int) -> None:
        """The caller is done with the piece in `slot`: drop its mapped pages from our memory (not the cache)."""
        mapped = self.mapped.pop(slot, None)
        if mapped is not None:
            mapping, offset, length = mapped
            start = offset - offset % _PAGE
            try:
                mapping.madvise(mmap.MADV_DONTNEED, start, length + offset - start)
            except (OSError, ValueError):
                pass

    def close(self) -> None:
        for slot in list(self.mapped):
            self.release(slot)
        for mapping in self.maps.values():
            if mapping is not None:
                try:
                    mapping.close()
                except BufferError:  # a tensor still views it; it goes when that tensor does
                    pass
        self.maps.clear()
        for fd in self.fds.values():
            os.close(fd)
        self.fds.clear()

    def _map(self, name: str) -> mmap.mmap | None:
        with self._lock:
            if name not in self.maps:
                try:
                    self.maps[name] = mmap.mmap(self._fd(name), 0, access=mmap.ACCESS_COPY)
                except (OSError, ValueError) as exc:
                    logger.info("cannot map %s (%s); reading it with pread", name, exc)
                    self.maps[name] = None
            return self.maps[name]

    def _fd(self, name: str) -> int:
        with self._lock:
            fd = self.fds.get(name)
            if fd is None:
                fd = read.open_shard(self.source.step_dir / name)
                try:
                    os.posix_fadvise(fd, 0, 0, os.POSIX_FADV_SEQUENTIAL)
                except (AttributeError, OSError):
                    pass
                self.fds[name] = fd
            return fd

    def _buffer(self, slot: int, nbytes: int) -> bytearray:
        buf = self.buffers.get(slot)
        if nbytes > self.piece_bytes:
            return bytearray(nbytes)  # one-off, larger than a pooled buffer
        if buf is None or len(buf) < self.piece_bytes:
            buf = self.buffers[slot] = bytearray(self.piece_bytes)
        return buf

    def fill(self, request: PieceRequest, slot: int) -> Piece:
        source = self.source
        entry = source.model[request.fqn]
        start = time.perf_counter()
        try:
            if source.reads_in_place and request.chunk is not None:
                if entry.chunks[request.chunk].length <= read.SMALL_ITEM_BYTES:
                    return self._fill_small(request, slot, entry)
                record = read.chunk_record(source, request.fqn, request.chunk, self.counter)
                if record is not None and record.is_dense_rows:
                    return self._fill_direct(request, slot, entry, record)
            with self._lock:  # read whole once, handed out in row slices
                if self.whole is None or self.whole[0] != request.fqn:
                    self.whole = None
                    self.whole = (request.fqn, source.read(request.fqn, self.counter))
                tensor = self.whole[1]
            if tensor.dim():
                tensor = tensor[request.row_start:request.row_stop]
            return Piece(request.fqn, request.row_start, tensor, "whole")
        finally:
            self.stats.read_io += time.perf_counter() - start

    def _fill_small(self, request: PieceRequest, slot: int, entry) -> Piece:
        """A small item read whole with one pread (no separate header reads), viewed in place or decoded."""
        chunk = entry.chunks[request.chunk]
        path = self.source.step_dir / chunk.relative_path
        buf = self._buffer(slot, chunk.length)
        view = memoryview(buf)[:chunk.length]
        read.pread_into(self._fd(chunk.relative_path), path, view, chunk.file_offset)
        record = read.chunk_record(self.source, request.fqn, request.chunk, self.counter, item=view)
        if record is not None:
            data = torch.frombuffer(buf, dtype=torch.uint8, count=chunk.length) if chunk.length else \
                torch.empty(0, dtype=torch.uint8)
            tensor = read.view_record(data[record.data_offset:record.data_offset + record.nbytes], record)
            how = read.PATH_DIRECT
        else:
            tensor = read.decode_item(request.fqn, path, chunk, view)
            how = read.PATH_TORCH_LOAD
        if self.counter is not None:
            self.counter.add(chunk.length)
            if (request.fqn, request.chunk) not in self.noted:
                self.noted.add((request.fqn, request.chunk))
                self.counter.note(how)
        if tensor.dim():
            tensor = tensor[request.row_start - chunk.row_start:request.row_stop - chunk.row_start]
        return Piece(request.fqn, request.row_start, tensor, how)

    def _fill_direct(self, request: PieceRequest, slot: int, entry, record) -> Piece:
        chunk = entry.chunks[request.chunk]
        rows = request.row_stop - request.row_start
        row_bytes = entry.row_elements * entry.dtype.itemsize
        nbytes = rows * row_bytes
        shape = (rows, *entry.shape[1:]) if entry.shape else ()
        if nbytes == 0:
            return Piece(request.fqn, request.row_start, torch.empty(shape, dtype=entry.dtype), read.PATH_DIRECT)
        offset = chunk.file_offset + record.data_offset + (request.row_start - chunk.row_start) * row_bytes
        mapping = self._map(chunk.relative_path) if MAP_SHARDS else None
        if mapping is not None:
            raw = torch.frombuffer(mapping, dtype=torch.uint8, count=nbytes, offset=offset)
            raw[::_PAGE].sum()  # fault the pages in here, so the caller never waits on the disk
            self.mapped[slot] = (mapping, offset, nbytes)
        else:
            buf = self._buffer(slot, nbytes)
            read.pread_into(self._fd(chunk.relative_path), self.source.step_dir / chunk.relative_path,
                                memoryview(buf)[:nbytes], offset)
            raw = torch.frombuffer(buf, dtype=torch.uint8, count=nbytes)
        if self.counter is not None:
            self.counter.add(nbytes)
            if (request.fqn, request.chunk) not in self.noted:
                self.noted.add((request.fqn, request.chunk))
                self.counter.note(read.PATH_DIRECT)
        return Piece(request.fqn, request.row_start, raw.view(entry.dtype).view(shape), read.PATH_DIRECT)


def stream_pieces(source, groups: list[tuple[PieceRequest, ...]], counter: read.ByteCounter | None = None, *,
                  piece_bytes: int = DEFAULT_PIECE_BYTES, depth: int = 2, readers: int = 2,
                  stats: StreamStats | None = None, buffers: dict[int, bytearray] | None = None,
                  cancel=None) -> Iterator[tuple[Piece, ...]]:
    """Yield the pieces of each group in order, up to `depth` groups read ahead by `readers` threads.

    Two readers keep both cores copying from the page cache while the disk works on what the kernel was
    told is coming (`posix_fadvise(WILLNEED)` one group ahead of the reads). A piece's tensor may be a view
    of a pooled buffer: it is valid until the next group is requested. Errors from a reader surface at the
    group they hit; closing the iterator lets the reads in flight finish and stops.

    With `cancel` (a `cancel.CancelToken`), a stop request raises `ExportAborted` at the next group, in the
    caller's thread; the readers skip the requests they have not started, the pool is shut down (waiting for the
    one read each thread may be in) and the shards are closed before it propagates.

    Args:
        source: a `read.StepMetadata` (pieces read in place) or any tensor source (tensors read whole).
        groups: from `plan_requests` or `plan_pairs`.
        counter: adds the bytes read and the read paths.
        piece_bytes: size of a pooled buffer.
        depth: groups read ahead.
        readers: reader threads.
        stats: filled with where the time went.
        buffers: the buffer pool (slot -> buffer); pass the same dict to reuse buffers across streams.
        cancel: checked before each group is handed out, and by the readers before each read.

    Raises:
        ExportAborted: `cancel` was requested.
    """
    from collections import deque
    from concurrent.futures import ThreadPoolExecutor

    stats = stats if stats is not None else StreamStats()
    if not groups:
        return
    width = max(len(g) for g in groups)
    free_slots = list(range(width * (depth + 1)))
    reader = _Reader(source, counter, piece_bytes, stats, buffers if buffers is not None else {})
    pending: deque = deque()
    following = 0

    def fill(group: tuple[PieceRequest, ...], slots: list[int]) -> tuple[Piece, ...]:
        pieces = []
        for request, slot in zip(group, slots):
            if cancel is not None:
                cancel.check(f"reading {request.fqn}")
            pieces.append(reader.fill(request, slot))
        return tuple(pieces)

    pool = ThreadPoolExecutor(max_workers=max(1, readers), thread_name_prefix="molgen-dcp-reader")

    def submit_more() -> None:
        nonlocal following
        while following < len(groups) and len(pending) <= depth and len(free_slots) >= len(groups[following]):
            group = groups[following]
            slots = [free_slots.pop() for _ in group]
            pending.append((pool.submit(fill, group, slots), slots))
            following += 1
            if following < len(groups):
                for request in groups[following]:
                    reader.hint(request)

    try:
        if groups:
            for request in groups[0]:
                reader.hint(request)
        submit_more()
        for _ in groups:
            if cancel is not None:
                cancel.check("between pieces")
            future, slots = pending.popleft()
            waited = time.perf_counter()
            pieces = future.result()
            stats.consumer_waiting += time.perf_counter() - waited
            stats.pieces += len(pieces)
            yield pieces
            for slot in slots:
                reader.release(slot)
            free_slots.extend(slots)
            submit_more()
    finally:
        pool.shutdown(wait=True, cancel_futures=True)
        reader.close()
