"""Qwen3 MoE checkpoints: per-expert HF layout in numeric order, expert bias, logits vs TorchTitan (issue 8)."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file

from molgen_export.cli import main
from molgen_export.options import ExportOptions
from tests.helpers.procs import run_group
from tests.helpers.titan_version import IS_TITAN021, MOE_LAYERS, native_key
from molgen_export.demo import make_demo_run, tiny_moe_arch
from molgen_export.errors import VerificationError
from molgen_export.pipeline.export import export_step

REPO = Path(__file__).resolve().parents[2]


def hf_tensors(hf_dir: Path) -> dict[str, torch.Tensor]:
    tensors = {}
    for path in sorted(hf_dir.glob("*.safetensors")):
        tensors.update(load_file(path))
    return tensors


@pytest.fixture(scope="module")
def moe_run(tmp_path_factory):
    """12 experts (so 10 and 11 sort after 9 only numerically), layer 0 dense (MoE under 0.2.1), layer 1 MoE."""
    return make_demo_run(tmp_path_factory.mktemp("moe"), steps=(5,), arch=tiny_moe_arch(moe_layers=MOE_LAYERS))


def test_moe_export_loads_as_qwen3_moe_and_matches_titan(moe_run, tmp_path):
    report = export_step(moe_run.steps[0], ExportOptions(output=tmp_path, dtype="float32"))
    hf_dir = Path(report.output_dir)
    config = json.loads((hf_dir / "config.json").read_text())
    assert config["architectures"] == ["Qwen3MoeForCausalLM"] and config["model_type"] == "qwen3_moe"
    assert (config["num_experts"], config["num_experts_per_tok"], config["moe_intermediate_size"]) == (12, 2, 48)
    assert config["mlp_only_layers"] == ([] if IS_TITAN021 else [0]) and config["norm_topk_prob"] is True
    assert report.fidelity["passed"] and report.fidelity["top1_agreement"] == 1.0

    tensors = hf_tensors(hf_dir)
    assert ("model.layers.0.mlp.gate_proj.weight" in tensors) is not IS_TITAN021  # the dense layer stays dense
    assert not any("expert_bias" in k for k in tensors)
    from molgen_export.dcp.read import read_step_metadata

    meta = read_step_metadata(moe_run.steps[0])
    w1 = meta.read(native_key("layers.1.moe.routed_experts.inner_experts.w1_EFD"))
    w2 = meta.read(native_key("layers.1.moe.routed_experts.inner_experts.w2_EDF"))
    for expert in (0, 9, 10, 11):  # numeric order: expert 10 is not expert 1's neighbour
        assert torch.equal(tensors[f"model.layers.1.mlp.experts.{expert}.gate_proj.weight"], w1[expert])
        assert torch.equal(tensors[f"model.layers.1.mlp.experts.{expert}.down_proj.weight"], w2[expert])
    assert torch.equal(tensors["model.layers.1.mlp.gate.weight"], meta.read("layers.1.moe.router.gate.weight"))

    # a separate reader: transformers (which fuses experts in memory) loads the per-expert files cleanly
    from transformers import AutoModelForCausalLM

    model, info = AutoModelForCausalLM.from_pretrained(hf_dir, output_loading_info=True)
    assert type(model).__name__ == "Qwen3MoeForCausalLM"
    assert not info["missing_keys"] and not info["unexpected_keys"]


def test_swapped_experts_are_caught_by_the_logit_check(moe_run, tmp_path):
    """A mis-ordered expert (what string-sorted ids do) is a large logit difference, not a silent change."""
    from molgen_export.verify import logit_gate
    from molgen_export.dcp.read import read_step_metadata
    from molgen_export.mapping.keymap import canonicalize_keys, split_training_buffers

    report = export_step(moe_run.steps[0], ExportOptions(output=tmp_path, dtype="float32"))
    hf_dir = Path(report.output_dir)
    meta = read_step_metadata(moe_run.steps[0])
    shapes, _ = split_training_buffers({k: e.shape for k, e in meta.model.items()})
    state = {k: meta.read(k) for k in shapes}
    arch = moe_run.arch
    titan = logit_gate.build_titan_model(arch, state, tie=False)
    hf_model = logit_gate.load_hf_model(hf_dir)
    batches = [logit_gate.fixed_token_batch(moe_run.tokenizer_size)]
    from molgen_export.pipeline.export import MOE_TOLERANCE_FACTOR

    tolerance = ExportOptions().logits_atol * MOE_TOLERANCE_FACTOR  # what the export applies to MoE
    good = logit_gate.compare_logits(titan, hf_model, batches, moe_run.tokenizer_size, tolerance=tolerance)
    assert good.passed
    swapped = dict(state)
    for key in ("w1_EFD", "w2_EDF", "w3_EFD"):
        name = native_key(f"layers.1.moe.routed_experts.inner_experts.{key}")
        value = state[name].clone()
        value[[1, 10]] = value[[10, 1]]
        swapped[name] = value
    bad_titan = logit_gate.build_titan_model(arch, swapped, tie=False)
    bad = logit_gate.compare_logits(bad_titan, hf_model, batches, moe_run.tokenizer_size, tolerance=tolerance)
    assert good.max_abs_diff < 1e-5
    assert not bad.passed and bad.max_abs_diff > 1000 * good.max_abs_diff


def test_nonzero_expert_bias_is_refused_unless_allowed(tmp_path, capsys):
    def bias(state):
        state[native_key("layers.1.moe.expert_bias_E")] = torch.linspace(-0.5, 0.5, 12)

    run = make_demo_run(tmp_path, steps=(5,), arch=tiny_moe_arch(moe_layers=MOE_LAYERS), mutate=bias)
    with pytest.raises(VerificationError, match="max\\|bias\\| 0.5") as info:
        export_step(run.steps[0])
    assert "--allow-expert-bias-drop" in str(info.value)
    assert not (run.run_dir / "checkpoint-hf" / "step-5-hf").exists()
    assert main(["--dcp-path", str(run.steps[0]), "--allow-expert-bias-drop"]) == 0
    report = json.loads((run.run_dir / "checkpoint-hf" / "step-5-hf" / "export_report.json").read_text())
    assert any("routing after export differs" in w for w in report["warnings"])
    card = (run.run_dir / "checkpoint-hf" / "step-5-hf" / "README.md").read_text()
    assert "--allow-expert-bias-drop" in card


def test_titan_02_moe_names(tmp_path):
    def old_names(key: str) -> str:
        return (key.replace("moe.routed_experts.inner_experts.w1_EFD", "moe.experts.w1")
                .replace("moe.routed_experts.inner_experts.w2_EDF", "moe.experts.w2")
                .replace("moe.routed_experts.inner_experts.w3_EFD", "moe.experts.w3")
                .replace("moe.expert_bias_E", "moe.expert_bias"))

    run = make_demo_run(tmp_path, steps=(5,), arch=tiny_moe_arch(moe_layers=(0, 1)), rename=old_names)
    report = export_step(run.steps[0])
    assert report.key_rules["moe.experts.w1/w3 (0.2)"] == 4 and report.key_rules["moe.experts.w2 (0.2)"] == 2
    assert report.fidelity["passed"]


def test_dry_run_lists_experts_and_routing(moe_run, capsys):
    assert main(["--dcp-path", str(moe_run.steps[0]), "--dry-run"]) == 0
    out = capsys.readouterr().out
    assert f"12 experts, top-2, expert FFN 48, norm_topk_prob=True, MoE layers {list(MOE_LAYERS)}" in out


@pytest.mark.slow
def test_two_rank_fsdp_moe_checkpoint(tmp_path):
    """Experts sharded along the expert dim by FSDP2 over 2 gloo ranks reassemble and verify."""
    checkpoint_root = tmp_path / "run" / "checkpoint"
    checkpoint_root.mkdir(parents=True)
    reference = tmp_path / "reference.pt"
    run_group([sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc-per-node", "2",
                    str(REPO / "tests" / "helpers" / "sharded_save.py"), str(checkpoint_root / "step-10"), "0",
                    str(reference), "moe"], timeout=180, env={**os.environ, "OMP_NUM_THREADS": "1"})
    from molgen_export.demo import job_config_dict, make_tokenizer, write_base_assets
    from molgen_export.mapping.run_config import write_checkpoint_config

    make_tokenizer(tmp_path / "assets")
    arch = tiny_moe_arch(moe_layers=MOE_LAYERS)
    write_base_assets(tmp_path / "assets", arch, eos_id=0)
    job = tmp_path / "run" / "job_config.json"
    job.write_text(json.dumps(job_config_dict(arch, flavor="tiny_moe", hf_assets_path="./assets",
                                              dump_folder="./run", seq_len=256)))
    write_checkpoint_config(checkpoint_root, job, launch_dir=tmp_path)
    report = export_step(checkpoint_root / "step-10", ExportOptions(dtype="float32"))
    assert report.fidelity["passed"]
    tensors = hf_tensors(Path(report.output_dir))
    full = torch.load(reference, weights_only=True)
    grouped = full[native_key("layers.1.moe.routed_experts.inner_experts.w3_EFD")]
    for expert in range(12):
        assert torch.equal(tensors[f"model.layers.1.mlp.experts.{expert}.up_proj.weight"], grouped[expert])
