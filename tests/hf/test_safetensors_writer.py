"""hf.safetensors_writer: the shard plan keeps every shard under the bound (unless one tensor alone is larger), the
headers and offsets are what the safetensors format says, the files load with the `safetensors` library bit for
bit whatever order tensors (or their parts) arrive in, the index maps exactly the written tensors, and two writes
of the same tensors give the same bytes."""

from __future__ import annotations

import hashlib
import json
import random
from pathlib import Path

import pytest
import torch
from safetensors import safe_open
from safetensors.torch import load_file

from molgen_export.errors import OutputError
from molgen_export.hf import safetensors_writer as writer


def _tensors(seed: int = 0) -> dict[str, torch.Tensor]:
    """A small HF-like state dict of mixed dtypes and shapes, including a 0-d and an empty tensor."""
    generator = torch.Generator().manual_seed(seed)
    tensors = {
        "model.embed_tokens.weight": torch.randn(96, 16, generator=generator).to(torch.bfloat16),
        "model.norm.weight": torch.randn(16, generator=generator),
        "lm_head.weight": torch.randn(96, 16, generator=generator).to(torch.float16),
        "model.layers.0.mlp.gate_proj.weight": torch.randn(40, 16, generator=generator).to(torch.bfloat16),
        "model.layers.0.mlp.down_proj.weight": torch.randn(16, 40, generator=generator).to(torch.bfloat16),
        "model.layers.1.self_attn.q_proj.weight": torch.randn(32, 16, generator=generator, dtype=torch.float64),
        "model.layers.1.counts": torch.randint(-1000, 1000, (7,), generator=generator),
        "model.layers.1.small": torch.randint(0, 100, (3, 3), generator=generator, dtype=torch.int32),
        "model.layers.1.mask": torch.rand(5, generator=generator) > 0.5,
        "model.layers.1.bytes": torch.randint(0, 255, (9,), generator=generator, dtype=torch.uint8),
        "model.layers.1.scale": torch.tensor(0.125),
        "model.layers.1.empty": torch.empty(0, 16),
    }
    # non-finite values must survive bit for bit too
    tensors["model.norm.weight"][3] = float("nan")
    tensors["model.norm.weight"][4] = float("-inf")
    return tensors


def _planned(tensors: dict[str, torch.Tensor]) -> list[writer.PlannedTensor]:
    return [writer.PlannedTensor(k, tuple(v.shape), v.dtype) for k, v in tensors.items()]


def _write(folder: Path, tensors: dict[str, torch.Tensor], max_shard_bytes: int, order_seed: int | None = None):
    folder.mkdir(parents=True, exist_ok=True)
    shards = writer.plan_shards(_planned(tensors), max_shard_bytes)
    out = writer.SafetensorsWriter(folder, shards)
    keys = list(tensors)
    if order_seed is not None:
        random.Random(order_seed).shuffle(keys)
    for key in keys:
        out.write(key, tensors[key])
    return shards, out.close()


def _same_bits(a: torch.Tensor, b: torch.Tensor) -> bool:
    if a.dtype != b.dtype or a.shape != b.shape:
        return False
    return torch.equal(a.contiguous().reshape(-1).view(torch.uint8), b.contiguous().reshape(-1).view(torch.uint8))


@pytest.mark.parametrize("limit", [1, 100, 1000, 3000, 10**9])
def test_shard_plan_bound(limit):
    planned = _planned(_tensors())
    shards = writer.plan_shards(planned, limit)
    assert [t.hf_key for s in shards for t in s.tensors] == sorted(t.hf_key for t in planned)  # each once, in order
    for shard in shards:
        data = sum(t.nbytes for t in shard.tensors)
        assert data <= limit or len(shard.tensors) == 1, (shard.filename, data)
    for this, following in zip(shards, shards[1:]):  # a shard closes only when the next tensor would not fit
        assert sum(t.nbytes for t in this.tensors) + following.tensors[0].nbytes > limit
    if len(shards) == 1:
        assert shards[0].filename == "model.safetensors"
    else:
        assert [s.filename for s in shards] == [f"model-{i:05d}-of-{len(shards):05d}.safetensors"
                                                for i in range(1, len(shards) + 1)]


def test_one_tensor_larger_than_the_bound_gets_its_own_shard():
    big = writer.PlannedTensor("b.big", (1000,), torch.float32)
    small = [writer.PlannedTensor(f"{c}.small", (10,), torch.float32) for c in "ac"]
    shards = writer.plan_shards([*small, big], 100)
    assert [[t.hf_key for t in s.tensors] for s in shards] == [["a.small"], ["b.big"], ["c.small"]]


def test_header_and_offsets_follow_the_format(tmp_path):
    tensors = _tensors()
    shards, _ = _write(tmp_path, tensors, 2000)
    assert len(shards) > 1
    for shard in shards:
        raw = (tmp_path / shard.filename).read_bytes()
        length = int.from_bytes(raw[:8], "little")
        assert (8 + length) % 8 == 0  # data starts 8-byte aligned
        assert raw[:8 + length] == shard.header
        header = json.loads(raw[8:8 + length])
        assert header.pop("__metadata__") == {"format": "pt"}
        assert len(raw) == shard.size == 8 + length + sum(t.nbytes for t in shard.tensors)
        begin = 0
        for tensor in shard.tensors:  # contiguous, in plan order, no gaps
            entry = header[tensor.hf_key]
            assert entry["data_offsets"] == [begin, begin + tensor.nbytes]
            assert entry["shape"] == list(tensor.shape)
            assert entry["dtype"] == writer.SAFETENSORS_DTYPES[tensor.dtype]
            assert shard.offsets[tensor.hf_key] == 8 + length + begin
            expected = tensors[tensor.hf_key].contiguous().reshape(-1).view(torch.uint8).numpy().tobytes()
            assert raw[shard.offsets[tensor.hf_key]:shard.offsets[tensor.hf_key] + tensor.nbytes] == expected
            begin += tensor.nbytes
        assert set(header) == {t.hf_key for t in shard.tensors}


@pytest.mark.parametrize("limit", [10**9, 700])
def test_files_load_bit_identically_with_safetensors(tmp_path, limit):
    tensors = _tensors()
    shards, files = _write(tmp_path, tensors, limit, order_seed=1)
    loaded: dict[str, torch.Tensor] = {}
    for shard in shards:
        part = load_file(tmp_path / shard.filename)
        assert set(part) == {t.hf_key for t in shard.tensors}
        loaded.update(part)
        with safe_open(tmp_path / shard.filename, framework="pt") as f:
            assert f.metadata() == {"format": "pt"}
    assert set(loaded) == set(tensors)
    for key, value in tensors.items():
        assert _same_bits(loaded[key], value), key
    if len(shards) == 1:
        assert files == ["model.safetensors"] and not (tmp_path / writer.INDEX_FILE).exists()


def test_index_maps_exactly_the_written_tensors(tmp_path):
    tensors = _tensors()
    shards, files = _write(tmp_path, tensors, 700)
    assert files == [s.filename for s in shards] + [writer.INDEX_FILE]
    index = json.loads((tmp_path / writer.INDEX_FILE).read_text())
    assert index["metadata"]["total_size"] == sum(v.numel() * v.element_size() for v in tensors.values())
    weight_map = index["weight_map"]
    assert list(weight_map) == sorted(tensors)
    for key, filename in weight_map.items():  # every entry names a file that holds it (pytorch/torchtitan#3764)
        with safe_open(tmp_path / filename, framework="pt") as f:
            assert key in f.keys()
    assert set(weight_map.values()) == {s.filename for s in shards}
    assert sorted(p.name for p in tmp_path.iterdir()) == sorted(files)


def test_two_writes_give_the_same_bytes_whatever_the_order(tmp_path):
    tensors = _tensors()
    digests = []
    for run, order in enumerate((None, 7)):
        folder = tmp_path / f"out{run}"
        _, files = _write(folder, tensors, 700, order_seed=order)
        digests.append({name: hashlib.sha256((folder / name).read_bytes()).hexdigest() for name in files})
    assert digests[0] == digests[1]


def test_parts_in_any_order_equal_one_write(tmp_path):
    tensors = _tensors()
    key = "model.layers.0.mlp.gate_proj.weight"
    whole_shards, whole_files = _write(tmp_path / "whole", tensors, 10**9)

    folder = tmp_path / "parts"
    folder.mkdir()
    out = writer.SafetensorsWriter(folder, writer.plan_shards(_planned(tensors), 10**9))
    for other, value in tensors.items():
        if other != key:
            out.write(other, value)
    rows = tensors[key]
    row_bytes = rows.shape[1] * rows.element_size()
    for start, stop in ((30, 40), (0, 7), (7, 30)):
        out.write_part(key, start * row_bytes, rows[start:stop])
    out.close()
    assert (folder / "model.safetensors").read_bytes() == (tmp_path / "whole" / "model.safetensors").read_bytes()


def test_a_non_contiguous_tensor_is_written_as_its_values(tmp_path):
    transposed = torch.randn(16, 40).t()
    assert not transposed.is_contiguous()
    (tmp_path / "o").mkdir()
    shards = writer.plan_shards([writer.PlannedTensor("w", (40, 16), torch.float32)], 10**9)
    out = writer.SafetensorsWriter(tmp_path / "o", shards)
    out.write("w", transposed)
    out.close()
    assert torch.equal(load_file(tmp_path / "o" / "model.safetensors")["w"], transposed)


def test_writes_against_the_plan_are_refused(tmp_path):
    tensors = {"a": torch.zeros(4, 4), "b": torch.zeros(8, dtype=torch.bfloat16)}
    out = writer.SafetensorsWriter(tmp_path, writer.plan_shards(_planned(tensors), 10**9))
    with pytest.raises(AssertionError, match="unplanned"):
        out.write("c", torch.zeros(1))
    with pytest.raises(AssertionError, match="planned torch.float32"):
        out.write("a", torch.zeros(4, 4, dtype=torch.float64))
    with pytest.raises(AssertionError, match=r"\[4, 4\]"):
        out.write("a", torch.zeros(16))
    out.write("a", tensors["a"])
    with pytest.raises(AssertionError, match="repeated"):
        out.write("a", tensors["a"])
    out.write_part("b", 0, torch.zeros(4, dtype=torch.bfloat16))
    with pytest.raises(AssertionError, match="overlaps"):
        out.write_part("b", 6, torch.zeros(2, dtype=torch.bfloat16))  # bytes 6:10 overlap 0:8
    with pytest.raises(AssertionError, match="overlaps"):
        out.write_part("b", 12, torch.zeros(4, dtype=torch.bfloat16))  # past the tensor's 16 bytes
    with pytest.raises(AssertionError, match="in parts"):
        out.write("b", tensors["b"])
    with pytest.raises(AssertionError, match="never written"):
        out.close()
    out.write_part("b", 8, torch.zeros(4, dtype=torch.bfloat16))
    assert out.close() == ["model.safetensors"]


def test_an_existing_shard_file_is_never_overwritten(tmp_path):
    (tmp_path / "model.safetensors").write_bytes(b"someone else's")
    with pytest.raises(OutputError):
        writer.SafetensorsWriter(tmp_path, writer.plan_shards([writer.PlannedTensor("a", (2,), torch.float32)], 10))
    assert (tmp_path / "model.safetensors").read_bytes() == b"someone else's"
