"""End-to-end DCP -> HF export on real tiny TorchTitan Qwen3 checkpoints (issue 2)."""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import textwrap
import time
from pathlib import Path

import pytest
import torch
from safetensors import safe_open
from safetensors.torch import load_file

from molgen_export.options import ExportOptions
from tests.helpers.procs import run_group
from tests.helpers.titan_version import IS_TITAN021, native_key
from molgen_export.demo import make_demo_run, tiny_arch
from molgen_export.errors import (CheckpointFormatError, ConfigError, MappingError, VerificationError)
from molgen_export.pipeline.export import export_step, output_dir_for
from molgen_export.verify.logit_gate import build_titan_model, compare_logits, fixed_token_batch, load_hf_model

REPO = Path(__file__).resolve().parents[2]


def titan_reference_state(step_dir: Path) -> dict[str, torch.Tensor]:
    """The checkpoint's model tensors under canonical TorchTitan names, read with the public DCP API."""
    import torch.distributed.checkpoint as dcp
    from torch.distributed.checkpoint import FileSystemReader

    reader = FileSystemReader(str(step_dir))
    metadata = reader.read_metadata()
    state = {k: torch.empty(m.size, dtype=m.properties.dtype) for k, m in metadata.state_dict_metadata.items()
             if not k.startswith(("optimizer", "lr_scheduler", "dataloader", "train_state")) and hasattr(m, "size")}
    dcp.load(state, storage_reader=reader)
    return state


def hf_folder_tensors(hf_dir: Path) -> dict[str, torch.Tensor]:
    tensors = {}
    for path in sorted(hf_dir.glob("*.safetensors")):
        tensors.update(load_file(path))
    return tensors


def test_demo_export_loads_and_matches_titan_logits(demo_run):
    step = demo_run.steps[-1]
    report = export_step(step)
    hf_dir = Path(report.output_dir)
    assert hf_dir == demo_run.run_dir / "checkpoint-hf" / "step-20-hf"  # outside the checkpoint folder
    assert report.status == "exported" and report.written and all(f["ok"] for f in report.findings)
    assert report.fidelity["max_abs_diff"] <= report.fidelity["tolerance"]
    assert report.fidelity["top1_agreement"] == 1.0
    assert 0 < report.bytes_read <= 1.05 * report.model_bytes  # optimizer state never read
    assert report.other_bytes > report.model_bytes
    names = {p.name for p in hf_dir.iterdir()}
    assert {"config.json", "generation_config.json", "model.safetensors", "tokenizer.json",
            "tokenizer_config.json", "special_tokens_map.json", "README.md", "export_report.json"} <= names

    config = json.loads((hf_dir / "config.json").read_text())
    assert config["architectures"] == ["Qwen3ForCausalLM"] and config["tie_word_embeddings"] is True
    assert config["head_dim"] == 32 and config["hidden_size"] == 64  # head_dim != dim / heads
    # RoPE as HF's own Qwen3 configs write it (a `rope_type: default` makes llama.cpp's converter warn)
    assert config["rope_theta"] == 1e6 and config["rope_scaling"] is None and "rope_parameters" not in config
    assert config["vocab_size"] == 320 and config["dtype"] == "bfloat16"
    with safe_open(hf_dir / "model.safetensors", "pt") as f:
        assert f.metadata() == {"format": "pt"}
        assert "lm_head.weight" not in f.keys()
    # tokenizer files are copied byte for byte
    for name in ("tokenizer.json", "tokenizer_config.json"):
        assert (hf_dir / name).read_bytes() == (demo_run.assets_dir / name).read_bytes()

    # Independent check in a separate process: transformers loads it, logits match the TorchTitan model's
    # on new tokens (fresh seed), computed from the checkpoint read with the public DCP API.
    tokens = fixed_token_batch(demo_run.tokenizer_size, batch=3, length=24, seed=99)
    torch.save(tokens, hf_dir.parent / "tokens.pt")
    script = textwrap.dedent(f"""
        import torch
        from transformers import AutoModelForCausalLM, AutoTokenizer
        model = AutoModelForCausalLM.from_pretrained({str(hf_dir)!r}, dtype=torch.float32)
        tok = AutoTokenizer.from_pretrained({str(hf_dir)!r})
        assert len(tok) == {demo_run.tokenizer_size}, len(tok)
        ids = torch.load({str(hf_dir.parent / 'tokens.pt')!r}, weights_only=True)
        torch.save(model(input_ids=ids).logits, {str(hf_dir.parent / 'hf_logits.pt')!r})
    """)
    subprocess.run([sys.executable, "-c", script], check=True, timeout=120)
    hf_logits = torch.load(hf_dir.parent / "hf_logits.pt", weights_only=True)
    state = titan_reference_state(step)
    rounded = {k: v.to(torch.bfloat16) for k, v in state.items()}
    titan = build_titan_model(demo_run.arch, rounded, tie=True)
    with torch.no_grad():
        titan_logits = titan(tokens)
    torch.testing.assert_close(hf_logits, titan_logits, atol=1e-4, rtol=1e-4)


def test_exports_are_byte_identical(demo_run, tmp_path):
    step = demo_run.steps[0]
    first = Path(export_step(step, ExportOptions(output=tmp_path / "a", skip_logits=True)).output_dir)
    second = Path(export_step(step, ExportOptions(output=tmp_path / "b", skip_logits=True)).output_dir)
    for name in ("model.safetensors", "config.json", "generation_config.json", "tokenizer.json"):
        assert (first / name).read_bytes() == (second / name).read_bytes(), name


@pytest.mark.skipif(IS_TITAN021, reason="a 0.2.1 run config names a flavor: planned with torchtitan, not deferred")
def test_export_plans_on_the_table_and_publishes_only_what_torchtitan_confirms(demo_run, tmp_path):
    """An export of a 0.3 run is planned while torchtitan imports (names from the table, fields on the run's
    dict), then confirmed with the adapter, the registry and the whole reference before publishing."""
    from molgen_export.pipeline import plan as plan_module

    report = export_step(demo_run.steps[0], ExportOptions(output=tmp_path / "out"))
    assert report.status == "exported" and report.fidelity["passed"]
    assert "confirm" in report.timings and report.reference["planned"] == plan_module.DEFERRED_NOTE
    assert not any("written again" in w for w in report.warnings)
    settings = next(f for f in report.findings if f["name"] == "run_settings")
    assert "dry run" not in settings["detail"] and "mapped" in settings["detail"]  # the settled reference's finding


@pytest.mark.skipif(IS_TITAN021, reason="a 0.2.1 run config names a flavor: planned with torchtitan, not deferred")
def test_a_table_that_disagrees_with_the_adapter_is_overruled(demo_run, tmp_path, monkeypatch):
    """If molgen's name table ever disagrees with the installed adapter (a later torchtitan renaming), the weights
    are written again with the adapter's names: the export equals one planned with torchtitan from the start."""
    from molgen_export.mapping import keymap

    step = demo_run.steps[0]
    good = Path(export_step(step, ExportOptions(output=tmp_path / "good", skip_logits=True)).output_dir)
    real_table = keymap.map_by_table

    def wrong_table(sources):
        mapping = real_table(sources)
        w1, w3 = "layers.1.feed_forward.w1.weight", "layers.1.feed_forward.w3.weight"
        mapping[w1], mapping[w3] = mapping[w3], mapping[w1]
        return mapping

    monkeypatch.setattr(keymap, "map_by_table", wrong_table)
    report = export_step(step, ExportOptions(output=tmp_path / "again"))
    assert report.fidelity["passed"]
    assert any("decided differently from molgen's table (2 name(s)" in w and "written again" in w
               for w in report.warnings)
    assert (Path(report.output_dir) / "model.safetensors").read_bytes() == (good / "model.safetensors").read_bytes()


def test_reexport_replaces_old_export_atomically(demo_run):
    step = demo_run.steps[0]
    out = Path(export_step(step, ExportOptions(skip_logits=True)).output_dir)
    (out / "stray.txt").write_text("from an older export")
    assert export_step(step, ExportOptions(skip_logits=True)).status == "skipped"  # same source: kept
    assert (out / "stray.txt").exists()
    export_step(step, ExportOptions(skip_logits=True, force=True))
    assert not (out / "stray.txt").exists()
    leftovers = [p.name for p in out.parent.iterdir() if p.name.startswith(".step") and not p.name.endswith(".lock")]
    assert leftovers == []


def test_untied_run_keeps_its_head(tmp_path):
    run = make_demo_run(tmp_path, steps=(5,), arch=tiny_arch(tie=False))
    report = export_step(run.steps[0])
    hf = hf_folder_tensors(Path(report.output_dir))
    assert report.tied is False and "lm_head.weight" in hf
    assert json.loads((Path(report.output_dir) / "config.json").read_text())["tie_word_embeddings"] is False
    assert report.fidelity["passed"]


def test_run_configured_tied_but_trained_untied_is_exported_untied(tmp_path):
    """pytorch/torchtitan#2252: the config says tied, the checkpoint's head differs from the embedding."""

    def untie(state):
        head = native_key("lm_head.weight")  # output.weight in a 0.2.1 run
        state[head] = state[head].clone() + 0.5

    run = make_demo_run(tmp_path, steps=(5,), mutate=untie)
    report = export_step(run.steps[0])
    assert report.tied is False
    assert any("pytorch/torchtitan#2252" in w for w in report.warnings)
    hf = hf_folder_tensors(Path(report.output_dir))
    assert not torch.equal(hf["lm_head.weight"], hf["model.embed_tokens.weight"])
    config = json.loads((Path(report.output_dir) / "config.json").read_text())
    assert config["tie_word_embeddings"] is False
    assert report.fidelity["passed"]


@pytest.mark.parametrize("kind", ["nan", "inf"])
def test_nonfinite_values_refused_without_output(tmp_path, kind):
    bad = float("nan") if kind == "nan" else float("inf")

    def poison(state):
        state["layers.1.feed_forward.w2.weight"].view(-1)[:3] = bad

    run = make_demo_run(tmp_path, steps=(5,), mutate=poison)
    with pytest.raises(VerificationError) as info:
        export_step(run.steps[0])
    message = str(info.value)
    assert "layers.1.feed_forward.w2.weight" in message and "model.layers.1.mlp.down_proj.weight" in message
    assert ("3 NaN" if kind == "nan" else "3 Inf") in message
    out = output_dir_for(run.steps[0], ExportOptions())
    assert not out.exists()
    assert not [p for p in out.parent.iterdir() if ".tmp-" in p.name]


def test_titan_02_names_and_wrapper_prefixes(tmp_path):
    """0.2 names (attention.wq, output.weight), torch.compile and activation-checkpoint wrappers."""

    def old_names(key: str) -> str:
        key = key.replace("attention.qkv_linear.", "attention.").replace("lm_head.weight", "output.weight")
        if key.startswith("layers."):
            head, rest = key.split(".", 2)[:2], key.split(".", 2)[2]
            key = f"_orig_mod.{head[0]}.{head[1]}._checkpoint_wrapped_module.{rest}"
        return key

    run = make_demo_run(tmp_path, steps=(5,), rename=old_names)
    report = export_step(run.steps[0])
    assert report.key_rules["attention.w{q,k,v} (0.2)"] == 6
    assert report.key_rules["output.weight (0.2)"] == 1
    assert report.key_rules["wrapper segments _checkpoint_wrapped_module,_orig_mod"] == 22
    assert report.fidelity["passed"]


def test_fused_wqkv_checkpoint_is_split(tmp_path):
    """A checkpoint holding the fused GQA-interleaved `qkv_linear.wqkv.weight` is split, not mis-mapped."""
    from molgen_export.mapping.keymap import split_fused_qkv

    def fuse(state):
        for layer in (0, 1):
            prefix = f"layers.{layer}.attention.qkv_linear."
            wq, wk, wv = (state.pop(native_key(prefix + f"{w}.weight")) for w in ("wq", "wk", "wv"))
            q = wq.reshape(2, 2, 32, 64)
            k = wk.reshape(2, 1, 32, 64)
            v = wv.reshape(2, 1, 32, 64)
            state[prefix + "wqkv.weight"] = torch.cat([q, k, v], dim=1).reshape(-1, 64)
            fused = state[prefix + "wqkv.weight"]
            assert torch.equal(split_fused_qkv(fused, "wk", n_heads=4, n_kv_heads=2, head_dim=32), wk)

    run = make_demo_run(tmp_path, steps=(5,), mutate=fuse)
    report = export_step(run.steps[0])
    assert report.key_rules["fused wqkv split"] == 2
    assert report.fidelity["passed"] and report.fidelity["max_abs_diff"] < 1e-4


def test_sharded_two_rank_fsdp_checkpoint(tmp_path):
    """A 2-rank gloo save with FSDP2 DTensor shards reassembles exactly."""
    checkpoint_root = tmp_path / "run" / "checkpoint"
    checkpoint_root.mkdir(parents=True)
    reference = tmp_path / "reference.pt"
    env = {**os.environ, "OMP_NUM_THREADS": "1"}
    run_group([sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc-per-node", "2",
                    str(REPO / "tests" / "helpers" / "sharded_save.py"), str(checkpoint_root / "step-10"), "0",
                    str(reference)], timeout=180, env=env)
    assert len(list((checkpoint_root / "step-10").glob("*.distcp"))) == 2
    from molgen_export.demo import job_config_dict, make_tokenizer, write_base_assets
    from molgen_export.mapping.run_config import write_checkpoint_config

    make_tokenizer(tmp_path / "assets")
    arch = tiny_arch(tie=False)
    write_base_assets(tmp_path / "assets", arch, eos_id=0)
    job = tmp_path / "run" / "job_config.json"
    job.write_text(json.dumps(job_config_dict(arch, flavor="tiny", hf_assets_path="./assets", dump_folder="./run",
                                              seq_len=256)))
    write_checkpoint_config(checkpoint_root, job, launch_dir=tmp_path)
    report = export_step(checkpoint_root / "step-10", ExportOptions(dtype="float32"))
    assert report.fidelity["passed"]
    hf = hf_folder_tensors(Path(report.output_dir))
    full = torch.load(reference, weights_only=True)
    assert torch.equal(hf["model.layers.1.mlp.down_proj.weight"], full["layers.1.feed_forward.w2.weight"])
    assert torch.equal(hf["model.embed_tokens.weight"], full["tok_embeddings.weight"])
    assert torch.equal(hf["model.layers.0.self_attn.k_proj.weight"], full[native_key("layers.0.attention.qkv_linear.wk.weight")])


def test_mapping_error_shows_as_large_logit_difference(demo_run, tmp_path):
    """The logit check has teeth: swapping gate and up projections is caught."""
    report = export_step(demo_run.steps[0], ExportOptions(output=tmp_path, dtype="float32"))
    hf_dir = Path(report.output_dir)
    state = titan_reference_state(demo_run.steps[0])
    titan = build_titan_model(demo_run.arch, state, tie=True)
    hf_model = load_hf_model(hf_dir)
    batches = [fixed_token_batch(demo_run.tokenizer_size)]
    good = compare_logits(titan, hf_model, batches, demo_run.tokenizer_size, tolerance=1e-3)
    assert good.passed
    layer = hf_model.model.layers[0].mlp
    with torch.no_grad():
        gate = layer.gate_proj.weight.clone()
        layer.gate_proj.weight.copy_(layer.up_proj.weight)
        layer.up_proj.weight.copy_(gate)
    bad = compare_logits(titan, hf_model, batches, demo_run.tokenizer_size, tolerance=1e-3)
    assert not bad.passed and bad.max_abs_diff > 100 * good.max_abs_diff + 1e-3


def test_missing_config_is_refused(demo_run):
    (demo_run.checkpoint_root / "config.json").unlink()
    demo_run.job_config.unlink()
    with pytest.raises(ConfigError, match="no run config") as info:
        export_step(demo_run.steps[0])
    assert "--config" in str(info.value)


def test_missing_base_assets_refused(demo_run):
    import shutil

    shutil.rmtree(demo_run.assets_dir)
    with pytest.raises(ConfigError, match="does not exist") as info:
        export_step(demo_run.steps[0])
    assert "--hf-assets" in str(info.value)


def test_config_contradicting_shapes_is_refused(demo_run):
    config = json.loads(demo_run.job_config.read_text())
    if IS_TITAN021:  # a 0.2.1 job config names a flavor: one of the registry's, of other dims
        config["model"]["flavor"], said, truth = "debugmodel", "vocab_size=2048", "320"
    else:
        config["model_spec"]["model"]["dim"], said, truth = 128, "dim=128", "64"
    demo_run.job_config.write_text(json.dumps(config))
    (demo_run.checkpoint_root / "config.json").unlink()
    with pytest.raises(ConfigError, match=said) as info:
        export_step(demo_run.steps[0])
    assert truth in str(info.value)


def test_tokenizer_larger_than_embedding_is_refused(tmp_path):
    run = make_demo_run(tmp_path, steps=(5,), arch=tiny_arch(vocab_size=320), tokenizer_vocab=300)
    # a tokenizer with more ids than the embedding has rows
    from molgen_export.demo import make_tokenizer

    make_tokenizer(run.assets_dir, vocab_size=400)
    with pytest.raises(VerificationError, match="vocab_padding"):
        export_step(run.steps[0])
    assert not output_dir_for(run.steps[0], ExportOptions()).exists()


def test_titan_02_job_config_with_unregistered_flavor(demo_run):
    """0.2-style dicts name a (custom) flavor and carry no dims: the base assets fill in, checked by shapes."""
    job = {"job": {"dump_folder": "./run"}, "model": {"name": "qwen3", "flavor": "molgen_custom",
                                                     "hf_assets_path": "./assets"},
           "training": {"seq_len": 128, "mixed_precision_param": "bfloat16"},
           "checkpoint": {"folder": "checkpoint", "keep_latest_k": 10},
           "experimental": {"custom_import": "molgen.flavors"}}
    (demo_run.checkpoint_root / "config.json").unlink()
    demo_run.job_config.write_text(json.dumps(job))
    report = export_step(demo_run.steps[0], ExportOptions(skip_logits=True))
    assert report.run_config["kind"] == "titan-0.2" and report.status == "exported"


@pytest.mark.parametrize("layout", ["hf", "torch_checkpointing"])
def test_other_step_formats_refused(tmp_path, layout):
    step = tmp_path / "checkpoint" / "step-30"
    step.mkdir(parents=True)
    if layout == "hf":
        (step / "model.safetensors.index.json").write_text("{}")
    else:
        (step / "metadata.pkl").write_bytes(b"")
        (step / "model_0.pt").write_bytes(b"")
    with pytest.raises(CheckpointFormatError, match="last_save_in_hf" if layout == "hf" else "torch_checkpointing"):
        export_step(step)


def test_unmapped_checkpoint_key_is_an_error(tmp_path):
    def extra(state):
        state["layers.0.attention.rotary_scale.weight"] = torch.ones(4)

    run = make_demo_run(tmp_path, steps=(5,), mutate=extra)
    with pytest.raises(MappingError, match="layers.0.attention.rotary_scale.weight"):
        export_step(run.steps[0])


def test_beside_layout_warns_when_run_purges(demo_run):
    report = export_step(demo_run.steps[0], ExportOptions(layout="beside", skip_logits=True))
    assert Path(report.output_dir) == demo_run.steps[0].parent / "step-10-hf"
    assert any("keep_latest_k=10" in w for w in report.warnings)


def test_sharded_output_with_index(demo_run, tmp_path):
    report = export_step(demo_run.steps[0], ExportOptions(output=tmp_path, max_shard_size="100KB"))
    hf_dir = Path(report.output_dir)
    index = json.loads((hf_dir / "model.safetensors.index.json").read_text())
    shards = sorted(p.name for p in hf_dir.glob("*.safetensors"))
    assert len(shards) > 1 and shards[0] == f"model-00001-of-{len(shards):05d}.safetensors"
    assert set(index["weight_map"].values()) == set(shards)
    listed = set(index["weight_map"])
    assert listed == set(hf_folder_tensors(hf_dir))
    assert index["metadata"]["total_size"] == sum(t.numel() * t.element_size() for t in hf_folder_tensors(hf_dir).values())
    assert report.fidelity["passed"]


KILL_SCRIPT = """
import os, signal, sys
from pathlib import Path
import molgen_export.hf.publish as publish
from molgen_export.pipeline.export import export_step
from molgen_export.options import ExportOptions
stage = sys.argv[2]
original = getattr(publish, stage)
def killer(*args, **kwargs):
    result = original(*args, **kwargs)
    os.kill(os.getpid(), signal.SIGKILL)
    return result
setattr(publish, stage, killer)
export_step(Path(sys.argv[1]), ExportOptions(skip_logits=True))
"""


@pytest.mark.parametrize("stage", ["copy_files", "write_json"])
def test_killed_export_leaves_no_hf_folder(demo_run, stage):
    step = demo_run.steps[0]
    proc = subprocess.run([sys.executable, "-c", KILL_SCRIPT, str(step), stage], timeout=120)
    assert proc.returncode == -signal.SIGKILL
    out = output_dir_for(step, ExportOptions())
    assert not out.exists()
    # the next run cleans the dead process's temporary folder and completes
    report = export_step(step, ExportOptions(skip_logits=True))
    assert report.status == "exported"
    assert [p.name for p in out.parent.iterdir() if ".tmp-" in p.name] == []
