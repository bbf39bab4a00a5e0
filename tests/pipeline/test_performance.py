"""Export at disk speed with bounded memory (issue 5): what is read, how it is read, the layer-wise check, the bench.

The big benchmark runs stay out of CI (`scripts/bench_export.py --flavor 0.6B|1.7B|8B`, figures in
docs/PERFORMANCE.md); a tiny-flavor run of the same script keeps it from rotting.
"""

from __future__ import annotations

import dataclasses
import json
import os
import subprocess
import sys
import warnings
from pathlib import Path

import pytest
import torch
from safetensors import safe_open
from safetensors.torch import load_file, save_file

from molgen_export.dcp import read
from molgen_export.dcp import torch_save_record
from molgen_export.dcp import stream
from molgen_export.pipeline import weight_stream
from molgen_export.verify import gate
from molgen_export.mapping import keymap
from molgen_export.hf import safetensors_writer
from molgen_export.options import ExportOptions
from molgen_export.errors import VerificationError
from molgen_export.pipeline.export import ExportReport, export_step
from molgen_export.pipeline.plan import plan_dcp_step
from molgen_export.pipeline.timing import Timer

REPO = Path(__file__).resolve().parents[2]


def _save(state: dict, step_dir: Path) -> None:
    import torch.distributed.checkpoint as dcp

    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        dcp.save(state, checkpoint_id=str(step_dir))


def _non_model_ranges(step_dir: Path) -> dict[str, list[tuple[int, int]]]:
    metadata = read.load_metadata_object(step_dir)
    ranges: dict[str, list[tuple[int, int]]] = {}
    for index, info in metadata.storage_data.items():
        if not read.is_model_key(index.fqn):
            ranges.setdefault(str(step_dir / info.relative_path), []).append((info.offset, info.offset + info.length))
    return ranges


def _planned(step_dir: Path, options: ExportOptions | None = None):
    options = options or ExportOptions()
    report = ExportReport(step=0, step_dir=str(step_dir), output_dir="")
    return plan_dcp_step(step_dir, options, report, Timer({}))


# -- what is read ------------------------------------------------------------------------------------------

def test_export_reads_model_bytes_only_never_optimizer_bytes(demo_run, monkeypatch):
    """Every read and every read-ahead hint of the export lands inside model items; bytes_read <= 1.05x."""
    step = demo_run.steps[-1]
    forbidden = _non_model_ranges(step)
    touched: list[tuple[str, int, int, str]] = []
    real_preadv, real_fadvise = os.preadv, os.posix_fadvise

    def path_of(fd: int) -> str:
        return os.readlink(f"/proc/self/fd/{fd}")

    def preadv(fd, buffers, offset, *args):
        n = real_preadv(fd, buffers, offset, *args)
        touched.append((path_of(fd), offset, offset + n, "read"))
        return n

    def fadvise(fd, offset, length, advice):
        if advice == os.POSIX_FADV_WILLNEED:
            touched.append((path_of(fd), offset, offset + length, "willneed"))
        return real_fadvise(fd, offset, length, advice)

    monkeypatch.setattr(os, "preadv", preadv)
    monkeypatch.setattr(os, "posix_fadvise", fadvise)
    report = export_step(step, ExportOptions(skip_logits=True))
    monkeypatch.undo()

    shard_touches = [t for t in touched if t[0].endswith(".distcp")]
    assert any(kind == "willneed" for *_, kind in shard_touches)  # the disk was told what is coming
    for path, start, end, kind in shard_touches:
        for bad_start, bad_end in forbidden.get(path, []):
            assert end <= bad_start or start >= bad_end, f"{kind} {start}:{end} overlaps a non-model item"
    assert report.other_bytes > report.model_bytes  # the AdamW state is there, and was skipped
    assert 0 < report.bytes_read <= 1.05 * report.model_bytes
    assert report.read_paths == {"direct": report.tensors}
    for stage in ("stream", "fsync", "verify_files", "stream.read_wait", "total"):
        assert stage in report.timings


def test_read_paths_agree(demo_run):
    """In place, torch.load and the public DCP reader give the same tensors; the counter says which ran."""
    step = demo_run.steps[0]
    meta = read.read_step_metadata(step)
    direct, through_dcp = read.ByteCounter(), read.ByteCounter()
    transformed = dataclasses.replace(meta, model={
        k: dataclasses.replace(e, chunks=tuple(dataclasses.replace(c, transforms=("test.identity",)) for c in e.chunks))
        for k, e in meta.model.items()}, records={})
    for fqn, entry in meta.model.items():
        chunk = entry.chunks[0]
        raw = read._read_range(step / chunk.relative_path, chunk.file_offset, chunk.length)
        expected = read.decode_item(fqn, step / chunk.relative_path, chunk, raw)
        assert torch.equal(read.read_tensor(meta, fqn, direct), expected)
        assert torch.equal(read.read_tensor(transformed, fqn, through_dcp), expected)
        if entry.shape and entry.shape[0] > 3:
            assert torch.equal(read.read_rows(meta, fqn, 1, 3), expected[1:3])
    assert direct.paths == {"direct": len(meta.model)} and direct.bytes == meta.model_bytes
    assert through_dcp.paths == {"dcp": len(meta.model)}


def test_unrecognised_records_fall_back_to_torch_load(demo_run, tmp_path, monkeypatch):
    step = demo_run.steps[0]
    reference = Path(export_step(step, ExportOptions(output=tmp_path / "a", skip_logits=True)).output_dir)

    def not_understood(read, length):
        raise torch_save_record.RecordNotUnderstood("test")

    monkeypatch.setattr(read, "locate_tensor", not_understood)
    report = export_step(step, ExportOptions(output=tmp_path / "b", skip_logits=True))
    assert report.read_paths == {"torch.load": report.tensors}
    assert report.bytes_read <= 1.05 * report.model_bytes  # each item still read once
    assert (Path(report.output_dir) / "model.safetensors").read_bytes() == (reference / "model.safetensors").read_bytes()


def test_record_locator_matches_torch_load(tmp_path):
    """Row-major, transposed (not dense), bf16 and 0-d tensors: located in place exactly as torch.load sees them."""
    state = {"a": torch.randn(4, 3), "t": torch.randn(3, 4).t(), "b": torch.randn(5).to(torch.bfloat16),
             "s": torch.tensor(2.5), "big": torch.randn(700, 500)}
    _save(state, tmp_path / "step-1")
    metadata = read.load_metadata_object(tmp_path / "step-1")
    shard = (tmp_path / "step-1" / "__0_0.distcp").read_bytes()
    for index, info in metadata.storage_data.items():
        item = shard[info.offset:info.offset + info.length]
        record = torch_save_record.locate_tensor(lambda o, n: item[o:o + n], len(item))
        data = torch.frombuffer(bytearray(item), dtype=torch.uint8)[record.data_offset:record.data_offset + record.nbytes]
        assert torch.equal(read.view_record(data, record), state[index.fqn])
        assert record.is_dense_rows == (index.fqn != "t")


# -- streaming in pieces --------------------------------------------------------------------------------------

def test_pieces_reassemble_exactly_with_bounded_buffers(tmp_path):
    state = {"w": torch.randn(1500, 300), "t": torch.randn(300, 1200).t(), "n": torch.randn(300),
             "optimizer": {"state": torch.randn(3000, 300)}}
    _save(state, tmp_path / "step-1")
    meta = read.read_step_metadata(tmp_path / "step-1")
    counter, buffers = read.ByteCounter(), {}
    piece_bytes = 100_000
    groups = stream.plan_requests(meta, stream.disk_order(meta, meta.model), piece_bytes)
    got: dict[str, list[torch.Tensor]] = {}
    for (piece,) in stream.stream_pieces(meta, groups, counter, piece_bytes=piece_bytes, buffers=buffers):
        got.setdefault(piece.fqn, []).append(piece.tensor.clone())
    assert torch.equal(torch.cat(got["w"]), state["w"]) and len(got["w"]) > 10
    assert torch.equal(torch.cat(got["t"]), state["t"])  # not row-major: read whole, handed out in rows
    assert torch.equal(torch.cat(got["n"]), state["n"])
    assert len(buffers) <= 3 and all(len(b) <= piece_bytes for b in buffers.values())
    # a small item (read whole) with more rows than fit a piece comes out complete too
    small = stream.plan_requests(meta, ["n"], piece_bytes=64)
    assert [(r.row_start, r.row_stop) for (r,) in small] == [(0, 300)]
    assert counter.bytes <= 1.05 * meta.model_bytes


def test_mapped_reads_match_and_release_their_pages(tmp_path, monkeypatch):
    """The opt-in mmap path (stream.MAP_SHARDS) gives the same pieces and unmaps each one once used."""
    state = {"w": torch.randn(1500, 300), "v": torch.randn(900, 400)}
    _save(state, tmp_path / "step-1")
    meta = read.read_step_metadata(tmp_path / "step-1")
    monkeypatch.setattr(stream, "MAP_SHARDS", True)
    released: list[int] = []
    real_release = stream._Reader.release

    def release(self, slot):
        if slot in self.mapped:
            released.append(slot)
        real_release(self, slot)

    monkeypatch.setattr(stream._Reader, "release", release)
    groups = stream.plan_requests(meta, ["w", "v"], 200_000)
    got: dict[str, list[torch.Tensor]] = {}
    for (piece,) in stream.stream_pieces(meta, groups, piece_bytes=200_000):
        got.setdefault(piece.fqn, []).append(piece.tensor.clone())
    assert torch.equal(torch.cat(got["w"]), state["w"]) and torch.equal(torch.cat(got["v"]), state["v"])
    assert len(released) == len(groups)


def test_head_matching_embedding_at_first_then_differing_is_exported_untied(tmp_path):
    """The tie is decided piece by piece; a late difference restarts the two tensors untied, correctly."""
    embedding = torch.randn(2000, 256)
    head = embedding.clone()
    head[1900:] += 1.0
    _save({"tok_embeddings.weight": embedding, "lm_head.weight": head, "norm.weight": torch.ones(256)},
          tmp_path / "step-1")
    meta = read.read_step_metadata(tmp_path / "step-1")
    sources = {k: keymap.TensorSource(k, k, tuple(e.shape)) for k, e in meta.model.items()}
    mapping = {"tok_embeddings.weight": "model.embed_tokens.weight", "lm_head.weight": "lm_head.weight",
               "norm.weight": "model.norm.weight"}
    out = tmp_path / "out"
    out.mkdir()
    streamer = weight_stream.WeightStreamer(
        meta, sources, mapping, torch.bfloat16, (1, 1, 1),
        lambda planned: safetensors_writer.SafetensorsWriter(out, safetensors_writer.plan_shards(planned, 1 << 40)),
        read.ByteCounter(), piece_bytes=256 * 1024)
    outcome = streamer.stream(run_says_tied=True)
    outcome.writer.close()
    assert outcome.tie is False and outcome.rereads > 0 and outcome.tie_finding.warning
    written = load_file(out / "model.safetensors")
    assert torch.equal(written["lm_head.weight"], head.to(torch.bfloat16))
    assert torch.equal(written["model.embed_tokens.weight"], embedding.to(torch.bfloat16))


# -- layer-wise verification ---------------------------------------------------------------------------------

def _titan(step_dir: Path, dtype=torch.float32):
    plan = _planned(step_dir, ExportOptions(dtype="float32"))
    heads = (plan.arch.n_heads, plan.arch.n_kv_heads, plan.arch.head_dim)
    return plan, weight_stream.TitanWeights(plan.meta, plan.sources, dtype, heads)


def test_layerwise_agrees_with_whole_model(demo_run, tmp_path):
    step = demo_run.steps[-1]
    hf_dir = Path(export_step(step, ExportOptions(output=tmp_path, dtype="float32", skip_logits=True)).output_dir)
    plan, titan = _titan(step)
    whole = gate.verify_export(plan.arch, titan, hf_dir, tie=True, vocab_limit=plan.tokenizer_size,
                                   tolerance=1e-3, mode="whole")
    layerwise = gate.verify_export(plan.arch, titan, hf_dir, tie=True, vocab_limit=plan.tokenizer_size,
                                       tolerance=1e-3, mode="layerwise")
    assert whole.passed and layerwise.passed and layerwise.mode == "layerwise"
    assert layerwise.max_abs_diff < 1e-4 and layerwise.top1_agreement == 1.0
    assert [s["name"] for s in layerwise.stages] == ["embedding", "layer 0", "layer 1"]
    assert layerwise.first_divergence is None


@pytest.mark.parametrize("breakage, layer", [("swap_gate_up", 1), ("wrong_q_norm", 0)])
def test_layerwise_names_the_layer_a_broken_mapping_breaks(demo_run, tmp_path, breakage, layer):
    step = demo_run.steps[-1]
    hf_dir = Path(export_step(step, ExportOptions(output=tmp_path, dtype="float32", skip_logits=True)).output_dir)
    files = load_file(hf_dir / "model.safetensors")
    prefix = f"model.layers.{layer}."
    if breakage == "swap_gate_up":
        gate_key, up_key = prefix + "mlp.gate_proj.weight", prefix + "mlp.up_proj.weight"
        files[gate_key], files[up_key] = files[up_key], files[gate_key]
    else:
        files[prefix + "self_attn.q_norm.weight"] = files[prefix + "self_attn.k_norm.weight"] * 3.0
    save_file(files, hf_dir / "model.safetensors", metadata={"format": "pt"})
    plan, titan = _titan(step)
    result = gate.verify_export(plan.arch, titan, hf_dir, tie=True, vocab_limit=plan.tokenizer_size,
                                    tolerance=1e-3, mode="layerwise")
    assert not result.passed and result.first_divergence == f"layer {layer}"
    before = [s for s in result.stages if s["name"] == f"layer {layer - 1}" or s["name"] == "embedding"]
    broken = next(s for s in result.stages if s["name"] == f"layer {layer}")
    assert all(s["max_abs_diff"] < 1e-5 for s in before)
    assert broken["max_abs_diff"] > 10 * 1e-3 * max(1.0, broken["scale"])  # far beyond tolerance


def test_export_fails_with_the_layer_when_the_mapping_is_wrong(demo_run, monkeypatch):
    """End to end: a mapping that swaps w1/w3 in layer 1 is refused, nothing published, the layer named."""
    import molgen_export.pipeline.export as export_module

    real_map = keymap.map_to_hf

    def swapped(sources, config):
        mapping = real_map(sources, config)
        w1, w3 = "layers.1.feed_forward.w1.weight", "layers.1.feed_forward.w3.weight"
        if w1 in mapping:  # the mapping probe maps layer 0 alone on the layer-wise path
            mapping[w1], mapping[w3] = mapping[w3], mapping[w1]
        return mapping

    monkeypatch.setattr(keymap, "map_to_hf", swapped)  # what the planner (`plan.plan_source`) calls
    monkeypatch.setattr(gate, "WHOLE_MODEL_MAX_PARAMS", 0)  # the path big models take
    with pytest.raises(VerificationError, match="first divergence: layer 1"):
        export_step(demo_run.steps[0])
    assert not export_module.output_dir_for(demo_run.steps[0], ExportOptions()).exists()


def test_layerwise_export_report(demo_run, monkeypatch):
    monkeypatch.setattr(gate, "WHOLE_MODEL_MAX_PARAMS", 0)
    report = export_step(demo_run.steps[0])
    assert report.fidelity["mode"] == "layerwise" and report.fidelity["passed"]
    assert report.verify_bytes_read > 0
    assert len(report.fidelity["stages"]) == demo_run.arch.n_layers + 1
    assert "verify_logits" in report.timings
    with safe_open(Path(report.output_dir) / "model.safetensors", "pt") as f:
        assert "lm_head.weight" not in f.keys()


# -- the benchmark script --------------------------------------------------------------------------------------

def test_bench_script_smoke(tmp_path):
    """The benchmark's tiny flavor: builds the TorchTitan layout, runs the contenders, writes the table."""
    proc = subprocess.run([sys.executable, str(REPO / "scripts" / "bench_export.py"), "--flavor", "tiny",
                           "--workdir", str(tmp_path), "--repeats", "1", "--verify", "--warm", "--reader-threads", "1"],
                          capture_output=True, text=True, timeout=300)
    assert proc.returncode == 0, proc.stderr[-3000:]
    assert "| tiny float32 -> bfloat16 |" in proc.stdout
    for ratio in ("skip-logits / streaming reference with sync", "skip-logits / (`cp -r` + sync)",
                  "verified / skip-logits", "| 1 | "):
        assert ratio in proc.stdout, ratio
    result = json.loads((tmp_path / "results-tiny.json").read_text())
    assert result["step_bytes"] > 2 * result["model_bytes"]  # the AdamW state is in the step
    assert result["bytes_read"] <= 1.05 * result["model_bytes"]
    assert result["read_paths"] == {"direct": result["read_paths"]["direct"]}
    assert 0 < result["export_peak_rss_mb"] < 4096 and result["copy_wall_s"] > 0 and result["cp_wall_s"] > 0
    assert result["fidelity"]["passed"] and result["verify_logits_s"] > 0 and result["warm_export_s"] > 0
    assert result["copy_wall_sync_s"] >= result["copy_wall_s"] and result["cp_wall_sync_s"] >= result["cp_wall_s"]
    assert result["verified_over_skip"] > 0 and result["reader_threads"]["1"]["wall_s"] > 0
