"""The Qwen3.5 export's streaming writer and layer-wise gate, on tiny real torchtitan `qwen3_5` runs (trained two steps
on CPU with the pure-torch delta rule, saved with DCP): the streamed files are byte-identical to writing the fused
tensors whole, a process streaming a ~100 MB checkpoint grows by a few pieces, not by the model; the layer-wise gate
passes a good export, names the first layer whose written weights were corrupted, and refuses the torchtitan 0.3.0
adapter's expert layout; both gates compare MoE routing and refuse router gate rows out of expert order.
"""

from __future__ import annotations

import json
import subprocess
import sys
import warnings
from pathlib import Path

import pytest
import torch

from molgen_export.dcp import read
from molgen_export.hf import safetensors_writer
from molgen_export.mapping import qwen3_5 as qmap
from molgen_export.mapping.keymap import canonical_titan_key
from molgen_export.mapping.qwen3_5_config import hf_text_config
from molgen_export.pipeline import qwen3_5_stream
from molgen_export.verify import gate, qwen3_5_gate
from tests.pipeline.test_qwen3_5 import (
    RELATIVE_TOLERANCE,
    TITAN,
    _qwen3_5_run,
    _trained,
    ref,
)


def _save_step(state: dict[str, torch.Tensor], step_dir: Path) -> read.StepMetadata:
    import torch.distributed.checkpoint as dcp

    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        dcp.save({**state, "train_state": {"step": 2}}, checkpoint_id=str(step_dir))
    return read.read_step_metadata(step_dir)


def _plan(meta: read.StepMetadata) -> tuple[dict[str, str], qmap.Qwen35Plan]:
    canonical = {canonical_titan_key(k)[0]: k for k in meta.model}
    return canonical, qmap.plan_hf_text({k: tuple(meta.model[c].shape) for k, c in canonical.items()},
                                        text_only=True)


class _RecordingWriter(safetensors_writer.SafetensorsWriter):
    """The real writer, recording how many bytes each write handed it."""

    def __init__(self, folder, shards):
        super().__init__(folder, shards)
        self.sizes: list[int] = []

    def write_part(self, hf_key, start, data):
        self.sizes.append(data.numel() * data.element_size())
        super().write_part(hf_key, start, data)


@pytest.mark.parametrize("kind", ["dense", "moe"])
@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float32])
def test_streamed_files_are_byte_identical_to_writing_the_fused_tensors_whole(kind, dtype, tmp_path):
    """Small pieces, a small cast buffer and several shards: every file equals what the earlier in-memory path
    wrote (each HF tensor concatenated whole from the rounded TorchTitan tensors, `SafetensorsWriter.write`), and
    each single write held at most one cast block (or one expert's slice of it)."""
    _, _, state = _trained(kind)
    meta = _save_step(dict(state), tmp_path / "step-2")
    canonical, plan = _plan(meta)
    shard_bytes = 96 << 10
    cast_bytes = 2048
    writers: list[_RecordingWriter] = []

    def open_writer(planned, folder):
        writers.append(_RecordingWriter(folder, safetensors_writer.plan_shards(planned, shard_bytes)))
        return writers[-1]

    streamed = tmp_path / "streamed"
    streamed.mkdir()
    outcome = qwen3_5_stream.stream_text_model(meta, canonical, plan, dtype, lambda p: open_writer(p, streamed),
                                               read.ByteCounter(), piece_bytes=4096, cast_bytes=cast_bytes)
    assert len(outcome.files) > 2 and safetensors_writer.INDEX_FILE in outcome.files  # sharded, with the index
    assert not outcome.nonfinite

    whole = tmp_path / "whole"
    whole.mkdir()
    rounded = {k: meta.read(c).to(dtype) for k, c in canonical.items() if not k.startswith("vision_encoder.")}
    hf_sd = {t.hf_key: qmap.build_hf_tensor(t, rounded) for t in plan.tensors}
    planned = [safetensors_writer.PlannedTensor(k, tuple(v.shape), v.dtype) for k, v in hf_sd.items()]
    writer = safetensors_writer.SafetensorsWriter(whole, safetensors_writer.plan_shards(planned, shard_bytes))
    for key, tensor in hf_sd.items():
        writer.write(key, tensor)
    assert writer.close() == outcome.files
    for name in outcome.files:
        assert (streamed / name).read_bytes() == (whole / name).read_bytes(), name

    # written in parts: cast, none bigger than a cast block (or one row of a part); not cast, none bigger than the
    # piece read (these tiny tensors are all under `read.SMALL_ITEM_BYTES`, which are read whole)
    widest_row = max(torch.Size(meta.model[canonical[k]].shape[1:]).numel() * dtype.itemsize
                     for t in plan.tensors for k in t.titan_keys)
    sizes = writers[0].sizes
    assert max(sizes) == outcome.largest_write
    if dtype == torch.bfloat16:
        assert outcome.largest_write <= max(cast_bytes, widest_row)
        assert len(sizes) > len(plan.tensors)
    else:
        assert outcome.largest_write <= read.SMALL_ITEM_BYTES
    if kind == "moe":
        gate_up = next(t for t in plan.tensors if t.hf_key.endswith("layers.0.mlp.experts.gate_up_proj"))
        assert gate_up.concat_dim == 1 and len(gate_up.titan_keys) == 2


_RSS_SCRIPT = r"""
import json, sys
from pathlib import Path
import torch
from molgen_export.dcp import read
from molgen_export.hf import safetensors_writer
from molgen_export.mapping import qwen3_5 as qmap
from molgen_export.mapping.keymap import canonical_titan_key
from molgen_export.pipeline import qwen3_5_stream

def status(field):
    for line in Path("/proc/self/status").read_text().splitlines():
        if line.startswith(field + ":"):
            return int(line.split()[1]) * 1024
step_dir, out_dir, mode = Path(sys.argv[1]), Path(sys.argv[2]), sys.argv[3]
meta = read.read_step_metadata(step_dir)
canonical = {canonical_titan_key(k)[0]: k for k in meta.model}
plan = qmap.plan_hf_text({k: tuple(meta.model[c].shape) for k, c in canonical.items()}, text_only=True)
open_writer = lambda planned: safetensors_writer.SafetensorsWriter(out_dir, safetensors_writer.plan_shards(planned, 1 << 40))
base = status("VmRSS")
Path("/proc/self/clear_refs").write_text("5")  # resets VmHWM (peak RSS) to the current RSS
if mode == "stream":
    qwen3_5_stream.stream_text_model(meta, canonical, plan, torch.bfloat16, open_writer, read.ByteCounter(),
                                     piece_bytes=1 << 20, cast_bytes=1 << 20)
else:  # the earlier path: the text model read whole, rounded, concatenated, written
    rounded = {k: meta.read(c).to(torch.bfloat16) for k, c in canonical.items()}
    hf_sd = {t.hf_key: qmap.build_hf_tensor(t, rounded) for t in plan.tensors}
    writer = open_writer(qwen3_5_stream.planned_tensors(plan, torch.bfloat16))
    for key, tensor in hf_sd.items():
        writer.write(key, tensor)
    writer.close()
print(json.dumps({"base": base, "peak": status("VmHWM"), "model_bytes": meta.model_bytes}))
"""


def _peak_growth(step_dir: Path, out_dir: Path, mode: str) -> dict:
    out_dir.mkdir()
    done = subprocess.run([sys.executable, "-c", _RSS_SCRIPT, str(step_dir), str(out_dir), mode],
                          check=False, capture_output=True, text=True, cwd=Path(__file__).resolve().parents[2], timeout=300)
    assert done.returncode == 0, done.stderr[-2000:]
    return json.loads(done.stdout.strip().splitlines()[-1])


def test_streaming_a_100mb_checkpoint_grows_the_process_by_pieces_not_by_the_model(tmp_path):
    """A fresh process streams a ~100 MB float32 MoE checkpoint (expert tensors of 8 MB, read in 1 MB pieces) to
    bfloat16: its peak resident memory (VmHWM, reset just before) grows by a few MB; the same process reading
    the model whole grows by most of the model. Measured on Linux through /proc/self/status."""
    if not Path("/proc/self/clear_refs").exists():
        pytest.skip("needs Linux /proc/self/clear_refs to reset the peak RSS")
    from torchtitan.models.common import Embedding, Linear

    dim, vocab = 256, 512
    rope = TITAN.MRoPE.Config(dim=8, max_seq_len=64, theta=10_000.0, mrope_section=[2, 1, 1])
    layers = TITAN._build_qwen35_moe_layers(
        moe_hidden_dim=512, num_experts=16, top_k=2, shared_expert_hidden_dim=64, rope=rope, attn_backend="flex",
        n_layers=4, dim=dim, n_heads=4, n_kv_heads=2, head_dim=32, rotary_dim=8, n_key_heads=2, n_value_heads=4,
        key_head_dim=32, value_head_dim=32, full_attention_interval=2)
    config = TITAN.Qwen35Model.Config(
        vocab_size=vocab, dim=dim, norm=TITAN._offset_norm(dim),
        tok_embeddings=Embedding.Config(num_embeddings=vocab, embedding_dim=dim),
        lm_head=Linear.Config(in_features=dim, out_features=vocab), layers=layers,
        vision_encoder=TITAN._qwen35_vision_encoder_config(dim=32, ffn_dim=32, num_layers=1, num_heads=2,
                                                           patch_size=2, temporal_patch_size=1, spatial_merge_size=1,
                                                           out_hidden_size=dim, num_position_embeddings=4))
    with torch.device("meta"):
        shapes = {k: (tuple(v.shape), v.dtype) for k, v in config.build().state_dict().items()
                  if not k.startswith("vision_encoder.")}
    generator = torch.Generator().manual_seed(0)
    state = {k: torch.randn(shape, generator=generator) if dtype.is_floating_point else torch.zeros(shape, dtype=dtype)
             for k, (shape, dtype) in shapes.items()}
    meta = _save_step(state, tmp_path / "step-1")
    del state
    assert meta.model_bytes > 90e6

    streamed = _peak_growth(tmp_path / "step-1", tmp_path / "streamed", "stream")
    whole = _peak_growth(tmp_path / "step-1", tmp_path / "whole", "whole")
    assert (tmp_path / "streamed" / "model.safetensors").read_bytes() == \
        (tmp_path / "whole" / "model.safetensors").read_bytes()
    streamed_growth, whole_growth = streamed["peak"] - streamed["base"], whole["peak"] - whole["base"]
    print(f"peak RSS growth: streaming {streamed_growth / 1e6:.1f} MB, whole {whole_growth / 1e6:.1f} MB, "
          f"model {meta.model_bytes / 1e6:.1f} MB")
    # the measurement sees a model held in memory (CI measured 0.89x the model's bytes: the whole path casts and
    # lets go of tensors as it goes, so not all of it is resident at the peak)
    assert whole_growth > 0.6 * meta.model_bytes
    assert streamed_growth < 32e6, streamed_growth  # 3 pooled 1 MB pieces, a 1 MB cast buffer, small items


def _force_layerwise(monkeypatch):
    monkeypatch.setattr(gate, "WHOLE_MODEL_MAX_PARAMS", 0)  # the path big models take


@pytest.mark.parametrize("kind", ["dense", "moe"])
def test_layerwise_gate_passes_a_good_export_and_names_the_first_corrupted_layer(kind, tmp_path, monkeypatch):
    from safetensors.torch import load_file, save_file

    from molgen_export.errors import VerificationError
    from molgen_export.options import ExportOptions
    from molgen_export.pipeline.export import export_step

    _force_layerwise(monkeypatch)
    step_dir, job_config, config = _qwen3_5_run(tmp_path, kind == "moe")
    report = export_step(step_dir, ExportOptions(config=job_config, output=tmp_path / "out", dtype="float32",
                                                drop_vision_tower=True))
    fidelity = report.fidelity
    assert report.status == "exported" and fidelity["mode"] == "layerwise" and fidelity["passed"]
    assert [s["name"] for s in fidelity["stages"]] == ["embedding"] + [f"layer {i}" for i in range(4)]
    assert fidelity["first_divergence"] is None and fidelity["top1_agreement"] == 1.0
    assert fidelity["max_abs_diff"] <= RELATIVE_TOLERANCE * fidelity["logit_scale"]
    assert fidelity["delta_rule_op"] == ref.DELTA_RULE_OP
    assert report.verify_bytes_read > 0  # the reference read the checkpoint again
    logits = next(f for f in report.findings if f["name"] == "logits")
    assert "(layerwise)" in logits["detail"]
    if kind == "moe":  # each layer's router on each side's own layer input: the same experts for every token
        assert fidelity["routing_agreement"] == 1.0
        assert [r["layer"] for r in fidelity["routing"]] == [0, 1, 2, 3]
        assert "same experts chosen for 1.0000 of tokens" in logits["detail"]
    else:
        assert fidelity["routing_agreement"] is None and fidelity["routing"] == []
    assert fidelity["probe"]["passed"] and fidelity["probe"]["layers"] == [0, 1]  # one layer of each kind

    # layer 2 (Gated DeltaNet) corrupted in the written files: layers 0 and 1 still agree, layer 2 is named
    hf_dir = Path(report.output_dir)
    meta = read.read_step_metadata(step_dir)
    canonical, _ = _plan(meta)
    titan = qwen3_5_stream.titan_weights(meta, canonical, torch.float32)
    hf_sd = load_file(str(hf_dir / "model.safetensors"))
    key = "model.layers.2.linear_attn.in_proj_qkv.weight"
    hf_sd[key] = hf_sd[key] * 1.5
    save_file(hf_sd, str(hf_dir / "model.safetensors"), metadata={"format": "pt"})
    params = sum(v.numel() for v in hf_sd.values())
    broken = qwen3_5_gate.verify_qwen3_5_export(config, titan, hf_dir, params=params, vocab_limit=config.vocab_size,
                                                tolerance=RELATIVE_TOLERANCE)
    assert broken.mode == "layerwise" and not broken.passed
    assert broken.result.first_divergence == "layer 2"
    assert [s["passed"] for s in broken.result.stages[:3]] == [True, True, True]  # embedding, layers 0 and 1
    with pytest.raises(VerificationError, match=r"first divergence: layer 2"):
        qwen3_5_gate.require_passed(broken, hf_dir)


def test_layerwise_gate_refuses_the_030_adapter_expert_layout(tmp_path, monkeypatch):
    """The folder with torchtitan 0.3.0's `gate_up_proj` [E, D, 2F] (here of HF's shape, so it loads) fails the
    layer-wise gate at the first MoE layer, and the export is refused with the hint naming the expert layout."""
    from safetensors.torch import save_file

    from molgen_export.errors import VerificationError

    _, config, state = _trained("moe")
    meta = _save_step(dict(state), tmp_path / "step-2")
    canonical, _ = _plan(meta)
    titan = qwen3_5_stream.titan_weights(meta, canonical, torch.float32)
    adapter_sd = TITAN.Qwen35StateDictAdapter(config, None).to_hf(dict(state))
    ours, _ = qmap.to_hf_text(dict(state), text_only=True)
    following_adapter = {k: (adapter_sd[qmap.ADAPTER_TEXT_PREFIX + k[len("model."):]] if k.endswith("gate_up_proj")
                             else v) for k, v in ours.items()}
    params = sum(v.numel() for v in ours.values())
    results = {}
    for name, hf_sd in (("ours", ours), ("adapter", following_adapter)):
        hf_dir = tmp_path / name
        hf_dir.mkdir()
        save_file({k: v.contiguous() for k, v in hf_sd.items()}, str(hf_dir / "model.safetensors"),
                  metadata={"format": "pt"})
        (hf_dir / "config.json").write_text(json.dumps(hf_text_config(config)))
        _force_layerwise(monkeypatch)
        results[name] = qwen3_5_gate.verify_qwen3_5_export(config, titan, hf_dir, params=params,
                                                           vocab_limit=config.vocab_size,
                                                           tolerance=RELATIVE_TOLERANCE)
    assert results["ours"].passed and results["ours"].mode == "layerwise"
    refused = results["adapter"]
    assert refused.mode == "layerwise" and not refused.passed
    assert refused.result.first_divergence == "layer 0"  # every Qwen3.5-MoE layer is MoE
    with pytest.raises(VerificationError, match=r"first divergence: layer 0") as caught:
        qwen3_5_gate.require_passed(refused, tmp_path / "adapter")
    assert "expert layout" in caught.value.hint


@pytest.mark.parametrize("mode", ["whole", "layerwise"])
def test_router_gate_rows_of_two_experts_swapped_are_refused_on_routing(mode, tmp_path, monkeypatch):
    """Layer 0's router gate rows for experts 0 and 1 swapped in the written file: HF sends those tokens to the
    other expert, the logits move far beyond tolerance and the worst layer's routing agreement (layer 0) falls
    below `ROUTING_MIN_AGREEMENT`; both figures are in the refusal. With the two experts' weights swapped as well
    (experts renumbered), the logits agree within tolerance and only the routing comparison refuses the export."""
    from safetensors.torch import save_file

    from molgen_export.errors import VerificationError
    from molgen_export.verify.logit_gate import ROUTING_MIN_AGREEMENT

    _, config, state = _trained("moe")
    meta = _save_step(dict(state), tmp_path / "step-2")
    canonical, _ = _plan(meta)
    titan = qwen3_5_stream.titan_weights(meta, canonical, torch.float32)
    ours, _ = qmap.to_hf_text(dict(state), text_only=True)
    swap = [1, 0, *range(2, ours["model.layers.0.mlp.gate.weight"].shape[0])]
    gate_swapped = {**ours, "model.layers.0.mlp.gate.weight": ours["model.layers.0.mlp.gate.weight"][swap]}
    renumbered = {**gate_swapped, **{k: ours[k][swap] for k in ("model.layers.0.mlp.experts.gate_up_proj",
                                                                "model.layers.0.mlp.experts.down_proj")}}
    if mode == "layerwise":
        _force_layerwise(monkeypatch)
    results = {}
    for name, hf_sd in (("gate_swapped", gate_swapped), ("renumbered", renumbered)):
        hf_dir = tmp_path / name
        hf_dir.mkdir()
        save_file({k: v.contiguous() for k, v in hf_sd.items()}, str(hf_dir / "model.safetensors"),
                  metadata={"format": "pt"})
        (hf_dir / "config.json").write_text(json.dumps(hf_text_config(config)))
        results[name] = qwen3_5_gate.verify_qwen3_5_export(config, titan, hf_dir, params=sum(
            v.numel() for v in hf_sd.values()), vocab_limit=config.vocab_size, tolerance=RELATIVE_TOLERANCE)
    for name, fidelity in results.items():
        r = fidelity.result
        assert r.mode == mode and not r.passed, name
        assert r.routing_agreement < ROUTING_MIN_AGREEMENT, name
        assert r.routing[0]["same_experts"] == r.routing_agreement  # layer 0 is the worst
        with pytest.raises(VerificationError, match=r"same experts chosen for 0\.\d+ of tokens") as caught:
            qwen3_5_gate.require_passed(fidelity, tmp_path / name)
        assert "router gate rows" in caught.value.hint
    swapped, renumbered_r = results["gate_swapped"].result, results["renumbered"].result
    assert swapped.max_abs_diff > swapped.tolerance  # the logits fail too: other experts compute those tokens
    assert renumbered_r.max_abs_diff <= renumbered_r.tolerance  # the same logits: routing alone refuses
    assert renumbered_r.first_divergence is None
    print(f"{mode}: gate rows swapped: routing {swapped.routing_agreement:.4f}, max|Δ| {swapped.max_abs_diff:.3g}; "
          f"renumbered: routing {renumbered_r.routing_agreement:.4f}, max|Δ| {renumbered_r.max_abs_diff:.3g} "
          f"(limit {renumbered_r.tolerance:.3g})")


def test_mapping_probe_catches_a_norm_swap_the_checkpoint_hides(tmp_path, monkeypatch):
    """An untrained run has every q_norm equal to its k_norm: a map that swaps them passes the logit gate on the
    checkpoint's weights, and the probe (random weights through the same map) refuses the export, nothing
    published. The right map passes both."""
    import tests.pipeline.test_qwen3_5 as tiny
    from molgen_export.errors import VerificationError
    from molgen_export.options import ExportOptions
    from molgen_export.pipeline.export import export_step

    def untrained(config):
        torch.manual_seed(0)
        return {k: v.detach().clone() for k, v in ref.build_reference_model(config).state_dict().items()}

    monkeypatch.setattr(tiny, "_train_two_steps", untrained)
    step_dir, job_config, _ = _qwen3_5_run(tmp_path, moe=False)
    meta = read.read_step_metadata(step_dir)
    assert torch.equal(meta.read("layers.1.attn.q_norm.weight"), meta.read("layers.1.attn.k_norm.weight"))
    options = ExportOptions(config=job_config, output=tmp_path / "out", dtype="float32", drop_vision_tower=True)

    good = export_step(step_dir, options)
    probe = good.fidelity["probe"]
    assert good.status == "exported" and probe["passed"] and probe["layers"] == [0, 1, 2, 3]

    swap = {"model.layers.{}.self_attn.q_norm.weight": "model.layers.{}.self_attn.k_norm.weight",
            "model.layers.{}.self_attn.k_norm.weight": "model.layers.{}.self_attn.q_norm.weight"}
    monkeypatch.setattr(qmap, "_RENAME_RES", tuple((p, swap.get(h, h)) for p, h in qmap._RENAME_RES))
    with pytest.raises(VerificationError) as caught:
        export_step(step_dir, ExportOptions(**{**options.__dict__, "output": tmp_path / "swapped"}))
    failed = {f.name: f for f in caught.value.findings}  # the failed findings only
    assert list(failed) == ["mapping_probe"]  # the logit gate passed: the checkpoint cannot tell q_norm from k_norm
    assert "random weights" in failed["mapping_probe"].detail
    assert not (tmp_path / "swapped" / "step-2-hf").exists()


def test_layerwise_gate_holds_one_layer_of_each_side_at_a_time(tmp_path, monkeypatch):
    """Every weight of each torchtitan block and HF decoder layer the layer-wise gate made real is gone before the
    next one is made: memory holds one layer of each side, whatever the depth (automatic garbage collection off, so
    weights kept alive by a reference cycle would be seen)."""
    import gc
    import weakref

    from safetensors.torch import save_file

    from molgen_export.verify import qwen3_5_layerwise

    _, config, state = _trained("moe")
    meta = _save_step(dict(state), tmp_path / "step-2")
    canonical, _ = _plan(meta)
    ours, _ = qmap.to_hf_text(dict(state), text_only=True)
    hf_dir = tmp_path / "hf"
    hf_dir.mkdir()
    save_file(ours, str(hf_dir / "model.safetensors"), metadata={"format": "pt"})
    (hf_dir / "config.json").write_text(json.dumps(hf_text_config(config)))
    made: dict[str, list] = {"titan": [], "hf": []}
    alive_at_each_make: list[int] = []

    def tracking(side, make):
        def wrapped(module, prefix, *args):
            alive_at_each_make.append(sum(r() is not None for layer in made[side] for r in layer))
            real = make(module, prefix, *args)
            made[side].append([weakref.ref(p) for p in real.parameters()])  # the weights themselves
            return real
        return wrapped

    monkeypatch.setattr(qwen3_5_layerwise, "_real_titan_block",
                        tracking("titan", qwen3_5_layerwise._real_titan_block))
    monkeypatch.setattr(qwen3_5_layerwise, "_real_hf_module", tracking("hf", qwen3_5_layerwise._real_hf_module))
    titan = qwen3_5_stream.titan_weights(meta, canonical, torch.float32)
    gc.disable()  # no automatic collection: the gate must free each layer itself (its patched forwards are cycles)
    try:
        fidelity = qwen3_5_gate.verify_qwen3_5_export(config, titan, hf_dir, params=0, vocab_limit=config.vocab_size,
                                                      tolerance=RELATIVE_TOLERANCE, mode="layerwise")
    finally:
        gc.enable()
    assert fidelity.passed
    assert len(made["titan"]) == 4 and len(made["hf"]) == 5  # 4 layers each, and HF's final norm
    assert alive_at_each_make == [0] * 9


def test_hf_weights_names_the_model_the_folder_is_for(tmp_path):
    """A tensor missing from a Qwen3.5 folder is named with the class its config.json gives, not Qwen3's."""
    from safetensors.torch import save_file

    from molgen_export.errors import VerificationError
    from molgen_export.verify.layerwise import HFWeights

    save_file({"model.norm.weight": torch.ones(4)}, str(tmp_path / "model.safetensors"), metadata={"format": "pt"})
    (tmp_path / "config.json").write_text(json.dumps({"architectures": ["Qwen3_5MoeForCausalLM"]}))
    with pytest.raises(VerificationError, match=r"lack `lm_head\.weight`, which Qwen3_5MoeForCausalLM needs") as caught:
        HFWeights(tmp_path).fill({"lm_head.weight": torch.empty(4)})
    assert "Qwen3_5MoeForCausalLM" in caught.value.hint and "Qwen3ForCausalLM" not in str(caught.value)
    with pytest.raises(VerificationError, match=r"is \[4\], Qwen3_5MoeForCausalLM needs \[5\]"):
        HFWeights(tmp_path).fill({"model.norm.weight": torch.empty(5)})
