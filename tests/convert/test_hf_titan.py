"""HF Qwen3 <-> TorchTitan: round trip byte for byte, a DCP import that TorchTitan loads and that computes the HF
model's logits, `.bin` sources, and refusals that name the tensor and the fix."""

from __future__ import annotations

import json
import shutil
from pathlib import Path

import pytest
import torch

from molgen_export.cli import main
from molgen_export.demo import make_tokenizer, tiny_arch
from molgen_export.errors import ConfigError, MappingError, OutputError
from molgen_export.convert.weights_folder import open_weights_folder
from tests.helpers.titan_version import requires_titan03

pytestmark = requires_titan03("the HF -> TorchTitan conversion (convert/hf_titan.py) writes and checks 0.3 "
                             "names; under 0.2.1 only the export is supported")


def make_hf_folder(folder: Path, *, tie: bool, dtype: torch.dtype, shard: str | None = None, seed: int = 0) -> Path:
    """A tiny HF Qwen3 (same dims as `demo.tiny_arch`) saved by transformers, with a tokenizer."""
    from transformers import Qwen3Config, Qwen3ForCausalLM

    arch = tiny_arch(tie=tie)
    config = Qwen3Config(vocab_size=arch.vocab_size, hidden_size=arch.dim, intermediate_size=arch.hidden_dim,
                         num_hidden_layers=arch.n_layers, num_attention_heads=arch.n_heads,
                         num_key_value_heads=arch.n_kv_heads, head_dim=arch.head_dim, rope_theta=arch.rope_theta,
                         rms_norm_eps=arch.norm_eps, max_position_embeddings=arch.max_seq_len, tie_word_embeddings=tie)
    torch.manual_seed(seed)
    model = Qwen3ForCausalLM(config)
    with torch.no_grad():  # norms away from 1 so a swapped norm shows in the logits
        for name, parameter in model.named_parameters():
            if parameter.dim() == 1:
                parameter.normal_(1.0, 0.2)
    model.to(dtype).save_pretrained(folder, **({"max_shard_size": shard} if shard else {}))
    make_tokenizer(folder)
    return folder


@pytest.fixture(scope="module")
def hf_folders(tmp_path_factory):
    root = tmp_path_factory.mktemp("hf")
    return {
        "tied-bf16-sharded": make_hf_folder(root / "tied", tie=True, dtype=torch.bfloat16, shard="60KB"),
        "untied-fp32": make_hf_folder(root / "untied", tie=False, dtype=torch.float32, seed=1),
    }


def hf_logits(folder: Path, tokens: torch.Tensor) -> torch.Tensor:
    from transformers import AutoModelForCausalLM

    model = AutoModelForCausalLM.from_pretrained(folder, dtype=torch.float32).eval()
    with torch.no_grad():
        return model(input_ids=tokens).logits


@pytest.mark.parametrize("name", ["tied-bf16-sharded", "untied-fp32"])
def test_round_trip_hf_titan_hf_is_byte_identical(hf_folders, tmp_path, name, capsys):
    source = hf_folders[name]
    titan, back = tmp_path / "titan", tmp_path / "back"
    assert main(["import-hf", str(source), str(titan), "--json"]) == 0
    imported = json.loads(capsys.readouterr().out)
    assert imported["tied"] == name.startswith("tied") and imported["titan_tensors"] == 25
    titan_keys = set(open_weights_folder(titan).model)
    assert "layers.1.attention.qkv_linear.wk.weight" in titan_keys and "layers.0.attention.q_norm.weight" in titan_keys

    assert main(["export-titan", str(titan), "--output", str(back), "--hf-assets", str(source), "--dry-run"]) == 0
    assert "check key_coverage" in capsys.readouterr().out and not back.exists()
    assert main(["export-titan", str(titan), "--output", str(back), "--hf-assets", str(source), "--json"]) == 0
    exported = json.loads(capsys.readouterr().out)
    assert exported["status"] == "exported" and all(f["ok"] for f in exported["findings"])

    original, round_trip = open_weights_folder(source), open_weights_folder(back)
    assert set(round_trip.model) == set(original.model)
    for key in original.model:
        before, after = original.read(key), round_trip.read(key)
        assert before.dtype == after.dtype and before.shape == after.shape, key
        assert torch.equal(before.view(torch.uint8), after.view(torch.uint8)), f"{key} changed in the round trip"
    print(f"{name}: {len(original.model)} tensors byte-identical after HF -> TorchTitan -> HF; import logits "
          f"max|Δ| {imported['fidelity']['max_abs_diff']:.3g}, export logits max|Δ| "
          f"{exported['fidelity']['max_abs_diff']:.3g}")


@pytest.mark.parametrize("tie", [True, False])
def test_dcp_import_loads_into_torchtitan_and_computes_hf_logits(tmp_path, tie):
    """Load the DCP the way TorchTitan's CheckpointManager does for `initial_load_path` (model only): the model's
    state dict (fused QKV model, the 0.3 default), `dcp.load` into it, then `load_state_dict`."""
    import warnings

    import torch.distributed.checkpoint as dcp
    from torchtitan.components.checkpointer.base import ModelWrapper

    from molgen_export.demo import build_model
    from molgen_export.convert.hf_titan import import_hf

    source = make_hf_folder(tmp_path / "hf", tie=tie, dtype=torch.float32, seed=3)
    report = import_hf(source, tmp_path / "titan-init", fmt="dcp")
    assert (tmp_path / "titan-init" / ".metadata").is_file() and report.tied == tie

    model = build_model(tiny_arch(tie=tie), seed=99, fused_qkv=True)  # other weights: the load must replace them
    wrapper = ModelWrapper(model)
    state = wrapper.state_dict()
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", UserWarning)  # "torch.distributed ... uninitialized": one process is right
        dcp.load(state, checkpoint_id=str(tmp_path / "titan-init"))
    wrapper.load_state_dict(state)
    tokens = torch.randint(0, 300, (2, 24), generator=torch.Generator().manual_seed(5))
    with torch.no_grad():
        titan_logits = model.eval()(tokens)
    want = hf_logits(source, tokens)
    torch.testing.assert_close(titan_logits, want, atol=1e-4, rtol=1e-4)
    print(f"DCP import tie={tie}: TorchTitan (loaded as initial_load_path) vs HF max|Δlogit| "
          f"{float((titan_logits - want).abs().max()):.3g}; import's own check {report.fidelity['max_abs_diff']:.3g}")


def test_bin_source_with_inv_freq_buffers(hf_folders, tmp_path):
    from molgen_export.convert.hf_titan import import_hf

    source = hf_folders["untied-fp32"]
    bin_dir = tmp_path / "bin"
    bin_dir.mkdir()
    state = {k: open_weights_folder(source).read(k) for k in open_weights_folder(source).model}
    for layer in range(2):  # what checkpoints saved by old transformers versions carry
        state[f"model.layers.{layer}.self_attn.rotary_emb.inv_freq"] = torch.ones(16)
    torch.save(state, bin_dir / "pytorch_model.bin")
    for name in ("config.json", "tokenizer.json", "tokenizer_config.json"):
        shutil.copy(source / name, bin_dir / name)
    report = import_hf(bin_dir, tmp_path / "titan")
    assert report.source_format == "bin" and len(report.skipped) == 2
    assert all(k.endswith("rotary_emb.inv_freq") for k in report.skipped)
    assert report.fidelity["max_abs_diff"] <= report.fidelity["tolerance"]


def test_unknown_hf_tensor_is_refused_by_name(hf_folders, tmp_path, capsys):
    from safetensors.torch import save_file

    folder = tmp_path / "extra"
    shutil.copytree(hf_folders["untied-fp32"], folder)
    state = {k: open_weights_folder(folder).read(k) for k in open_weights_folder(folder).model}
    state["model.layers.0.self_attn.q_proj.bias"] = torch.zeros(128)
    save_file(state, str(folder / "model.safetensors"), metadata={"format": "pt"})
    assert main(["import-hf", str(folder), str(tmp_path / "out")]) == 1
    err = capsys.readouterr().err
    assert "model.layers.0.self_attn.q_proj.bias" in err and "fix:" in err
    assert not (tmp_path / "out").exists()
    from molgen_export.convert.hf_titan import import_hf

    with pytest.raises(MappingError):
        import_hf(folder, tmp_path / "out")


def test_tied_config_with_a_different_head_is_refused(hf_folders, tmp_path):
    from molgen_export.convert.hf_titan import import_hf

    folder = tmp_path / "ambiguous"
    shutil.copytree(hf_folders["untied-fp32"], folder)
    config = json.loads((folder / "config.json").read_text())
    (folder / "config.json").write_text(json.dumps({**config, "tie_word_embeddings": True}))
    with pytest.raises(ConfigError, match="lm_head.weight differs") as info:
        import_hf(folder, tmp_path / "out")
    assert "tie_word_embeddings=false" in str(info.value)


def test_refusals_export_titan_on_hf_names_and_existing_output(hf_folders, tmp_path):
    from molgen_export.options import ExportOptions
    from molgen_export.convert.hf_titan import export_titan, import_hf

    source = hf_folders["untied-fp32"]
    with pytest.raises(ConfigError, match="HF-named weights"):
        export_titan(source, tmp_path / "out", ExportOptions(hf_assets=source))
    (tmp_path / "taken").mkdir()
    (tmp_path / "taken" / "notes.txt").write_text("mine")
    with pytest.raises(OutputError, match="--force"):
        import_hf(source, tmp_path / "taken", verify=False)
    assert (tmp_path / "taken" / "notes.txt").read_text() == "mine"


@pytest.mark.parametrize("command", ["import-hf", "export-titan", "to-jax", "from-nanogpt"])
def test_every_conversion_has_help_with_examples(command, capsys):
    assert main([command, "--help"]) == 0
    text = capsys.readouterr().out
    assert f"molgen-export {command}" in text and "examples:" in text


def test_nan_in_the_source_is_refused_naming_both_keys(hf_folders, tmp_path):
    from safetensors.torch import save_file

    from molgen_export.errors import VerificationError
    from molgen_export.convert.hf_titan import import_hf

    folder = tmp_path / "nan"
    shutil.copytree(hf_folders["untied-fp32"], folder)
    state = {k: open_weights_folder(folder).read(k) for k in open_weights_folder(folder).model}
    state["model.layers.1.self_attn.k_proj.weight"][3, 4] = float("nan")
    save_file(state, str(folder / "model.safetensors"), metadata={"format": "pt"})
    with pytest.raises(VerificationError) as info:
        import_hf(folder, tmp_path / "out", fmt="dcp")
    assert "layers.1.attention.qkv_linear.wk.weight" in str(info.value)
    assert "model.layers.1.self_attn.k_proj.weight" in str(info.value) and "1 NaN" in str(info.value)
    assert not (tmp_path / "out").exists() and not list(tmp_path.glob(".out.tmp-*"))  # no leftovers


def test_export_titan_skips_only_when_every_input_matches_and_refuses_a_foreign_folder(hf_folders, tmp_path):
    """export-titan runs the DCP export's skeleton (issue 13): an export is skipped only when the source, the dtype,
    the shard size, the assets and the format all match what the folder records; a folder molgen_export did not
    write is refused without --force, and replaced with it."""
    from molgen_export.convert.hf_titan import export_titan, import_hf
    from molgen_export.options import ExportOptions

    source = hf_folders["untied-fp32"]
    titan, out = tmp_path / "titan", tmp_path / "back"
    import_hf(source, titan, verify=False)
    options = ExportOptions(hf_assets=source, skip_logits=True)
    first = export_titan(titan, out, options)
    assert first.status == "exported" and first.replaced == [] and first.export_dtype == "float32"
    weights = (out / "model.safetensors").read_bytes()

    again = export_titan(titan, out, options)
    assert again.status == "skipped" and not again.written and again.output_inputs == first.output_inputs
    assert json.loads((out / "export_report.json").read_text())["status"] == "exported"  # the folder was kept

    other_dtype = export_titan(titan, out, ExportOptions(hf_assets=source, skip_logits=True, dtype="bfloat16"))
    assert other_dtype.status == "exported" and other_dtype.replaced == ["export_dtype"]
    assert json.loads((out / "export_report.json").read_text())["export_dtype"] == "bfloat16"
    assert (out / "model.safetensors").read_bytes() != weights
    other_shards = export_titan(titan, out, ExportOptions(hf_assets=source, skip_logits=True, dtype="bfloat16",
                                                          max_shard_size="60KB"))
    assert other_shards.status == "exported" and other_shards.replaced == ["max_shard_bytes"]
    assert (out / "model.safetensors.index.json").is_file() and not (out / "model.safetensors").exists()

    foreign = tmp_path / "foreign"
    foreign.mkdir()
    (foreign / "notes.txt").write_text("mine")
    with pytest.raises(OutputError, match="not a molgen_export export") as info:
        export_titan(titan, foreign, options)
    assert "--force" in str(info.value)
    assert sorted(p.name for p in foreign.iterdir()) == ["notes.txt"] and not list(tmp_path.glob(".foreign.tmp-*"))
    forced = export_titan(titan, foreign, ExportOptions(hf_assets=source, skip_logits=True, force=True))
    assert forced.status == "exported" and forced.replaced == ["--force"] and not (foreign / "notes.txt").exists()
