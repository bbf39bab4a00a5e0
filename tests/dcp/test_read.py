"""dcp.read: model tensors read back from real DCP saves (one process, and a 2-rank FSDP2 save whose tensors are
split across both ranks' shards) are identical to the state dict that was saved; the optimizer's bytes are never
read (nor needed: garbage there changes nothing); missing and truncated shards are refused by name."""

from __future__ import annotations

import os
import shutil
import sys
from pathlib import Path

import pytest
import torch
from torch.distributed.checkpoint import FileSystemReader

from molgen_export.dcp import read
from molgen_export.demo import save_dcp
from molgen_export.errors import CheckpointFormatError, SourceVanishedError
from tests.helpers.procs import run_group

REPO = Path(__file__).resolve().parents[2]


read_step_metadata = read.read_step_metadata


def _non_model_ranges(step_dir: Path) -> list[tuple[str, int, int]]:
    """(file, offset, length) of every optimizer/scheduler/dataloader/train-state item, per torch's own reader."""
    metadata = FileSystemReader(str(step_dir)).read_metadata()
    return [(str(info.relative_path), info.offset, info.length) for index, info in metadata.storage_data.items()
            if index.fqn.split(".", 1)[0] in ("optimizer", "lr_scheduler", "dataloader", "train_state")]


def _spoil(step_dir: Path, ranges: list[tuple[str, int, int]]) -> None:
    """Overwrite these byte ranges with garbage, in place (file sizes unchanged)."""
    for name, offset, length in ranges:
        with open(step_dir / name, "r+b") as f:
            f.seek(offset)
            f.write(b"\xff" * length)


@pytest.fixture(scope="module")
def single(tmp_path_factory):
    """A one-process save: model tensors of several dtypes (one larger than the small-item limit), optimizer state."""
    generator = torch.Generator().manual_seed(0)
    model = {
        "tok_embeddings.weight": torch.randn(640, 640, generator=generator),  # 1.6 MB: read in place, by rows
        "layers.0.attention.wo.weight": torch.randn(64, 128, generator=generator).to(torch.bfloat16),
        "layers.0.attention_norm.weight": torch.randn(64, generator=generator).to(torch.float16),
        "layers.0.feed_forward.w1.weight": torch.randn(160, 64, generator=generator).t(),  # saved non-contiguous
        "norm.weight": torch.ones(64),
    }
    model["norm.weight"][5] = float("nan")
    optimizer = {"state": {k: {"exp_avg": torch.randn(v.shape, generator=generator).float(),
                               "exp_avg_sq": torch.rand(v.shape, generator=generator).float(),
                               "step": torch.tensor(10.0)} for k, v in model.items()},
                 "param_groups": [{"lr": 1e-3, "params": list(model)}]}
    step_dir = tmp_path_factory.mktemp("single") / "step-10"
    save_dcp({**model, "optimizer": optimizer, "train_state": {"step": 10}}, step_dir)
    return step_dir, {k: v.clone() for k, v in model.items()}


@pytest.fixture(scope="module")
def sharded(tmp_path_factory):
    """A 2-rank gloo save of a tiny TorchTitan Qwen3 sharded by FSDP2, and the full state dict rank 0 kept."""
    root = tmp_path_factory.mktemp("sharded")
    step_dir, reference = root / "step-10", root / "reference.pt"
    env = {**os.environ, "OMP_NUM_THREADS": "1"}
    run_group([sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc-per-node", "2",
               str(REPO / "tests" / "helpers" / "sharded_save.py"), str(step_dir), "0", str(reference)],
              timeout=180, env=env)
    return step_dir, torch.load(reference, weights_only=True)


def _same_bits(a: torch.Tensor, b: torch.Tensor) -> bool:
    return (a.dtype == b.dtype and a.shape == b.shape
            and torch.equal(a.contiguous().view(-1).view(torch.uint8), b.contiguous().view(-1).view(torch.uint8)))


def test_single_process_save_reads_back_identical(single):
    step_dir, model = single
    meta = read_step_metadata(step_dir)
    assert list(meta.model) == list(model)
    assert meta.label == "step-10"
    for fqn, value in model.items():
        entry = meta.model[fqn]
        assert (entry.shape, entry.dtype) == (tuple(value.shape), value.dtype)
        assert _same_bits(read.read_tensor(meta, fqn), value), fqn  # NaN included
        assert _same_bits(meta.read(fqn), value), fqn


def test_sharded_two_rank_save_reads_back_identical(sharded):
    step_dir, reference = sharded
    meta = read_step_metadata(step_dir)
    meta.check_files()
    assert sorted(meta.files) == ["__0_0.distcp", "__1_0.distcp"]
    assert set(meta.model) == set(reference)
    split = [fqn for fqn, entry in meta.model.items()
             if {c.relative_path for c in entry.chunks} == {"__0_0.distcp", "__1_0.distcp"}]
    assert "tok_embeddings.weight" in split and len(split) > len(meta.model) // 2  # really spread over both ranks
    counter = read.ByteCounter()
    for fqn, value in reference.items():
        assert _same_bits(read.read_tensor(meta, fqn, counter), value), fqn


def test_rows_of_a_sharded_tensor(sharded):
    step_dir, reference = sharded
    meta = read_step_metadata(step_dir)
    full = reference["tok_embeddings.weight"]
    half = full.shape[0] // 2
    for start, stop in ((0, 1), (half - 3, half + 5), (half, full.shape[0]), (0, full.shape[0])):
        assert torch.equal(read.read_rows(meta, "tok_embeddings.weight", start, stop), full[start:stop])


def test_rows_of_a_large_tensor_read_only_their_bytes(single):
    step_dir, model = single
    meta = read_step_metadata(step_dir)
    counter = read.ByteCounter()
    rows = read.read_rows(meta, "tok_embeddings.weight", 100, 110, counter)
    assert torch.equal(rows, model["tok_embeddings.weight"][100:110])
    entry = meta.model["tok_embeddings.weight"]
    assert counter.bytes < entry.nbytes // 10  # 10 of 640 rows, plus a few KB of record headers


@pytest.mark.parametrize("which", ["single", "sharded"])
def test_optimizer_bytes_never_read(which, request, tmp_path):
    source, saved = request.getfixturevalue(which)
    step_dir = tmp_path / "step-10"
    shutil.copytree(source, step_dir)
    others = _non_model_ranges(step_dir)
    assert sum(length for _, _, length in others) > 0
    meta = read_step_metadata(step_dir)
    assert meta.other_bytes == sum(length for _, _, length in others)
    assert all(not fqn.startswith(("optimizer", "train_state")) for fqn in meta.model)
    _spoil(step_dir, others)  # every optimizer and train-state byte is now garbage
    counter = read.ByteCounter()
    for fqn, value in saved.items():
        assert _same_bits(read.read_tensor(meta, fqn, counter), value), fqn
    # the model's stored bytes were read, plus at most a few KB of record headers (inside the model's items) per
    # chunk read in place; the optimizer's megabytes were not
    chunks = sum(len(e.chunks) for e in meta.model.values())
    assert meta.model_bytes <= counter.bytes <= meta.model_bytes + chunks * 16 * 1024
    assert counter.bytes - meta.model_bytes < meta.other_bytes // 100
    assert sum(counter.paths.values()) == sum(len(e.chunks) for e in meta.model.values())


def test_a_truncated_shard_is_refused_by_name(single, tmp_path):
    step_dir = tmp_path / "step-10"
    shutil.copytree(single[0], step_dir)
    shard = sorted(step_dir.glob("*.distcp"))[0]
    size = shard.stat().st_size
    os.truncate(shard, size - 100)
    meta = read_step_metadata(step_dir)
    with pytest.raises(CheckpointFormatError, match="truncated") as info:
        meta.check_files()
    assert info.value.path == shard and str(size - 100) in str(info.value)
    last = max(meta.model.values(), key=lambda e: max(c.file_offset + c.length for c in e.chunks))
    if max(c.file_offset + c.length for c in last.chunks) > size - 100:  # the cut reaches a model tensor
        with pytest.raises(CheckpointFormatError):
            read.read_tensor(meta, last.fqn)


def test_a_shard_removed_mid_read_is_a_vanished_source(single, tmp_path):
    step_dir = tmp_path / "step-10"
    shutil.copytree(single[0], step_dir)
    meta = read_step_metadata(step_dir)
    for shard in step_dir.glob("*.distcp"):
        shard.unlink()  # TorchTitan's keep_latest_k purge
    with pytest.raises(SourceVanishedError):
        read.read_tensor(meta, "norm.weight")
    with pytest.raises(CheckpointFormatError, match="missing"):
        read_step_metadata(step_dir).check_files()


def test_metadata_of_a_step_without_one(tmp_path):
    (tmp_path / "step-1").mkdir()
    with pytest.raises(Exception) as info:
        read_step_metadata(tmp_path / "step-1")
    assert "step-1" in str(info.value)
