"""mapping.architecture: the architecture read off real checkpoint shapes, settled against the run config, the
torchtitan flavor registry and the base config.json (the shapes win, contradictions are refused naming the field),
vocab padding kept, tied embeddings decided from what the checkpoint holds."""

from __future__ import annotations

import dataclasses
import json
from pathlib import Path

import pytest
import torch

from molgen_export.demo import build_model, job_config_dict, tiny_arch, tiny_moe_arch, write_base_assets
from molgen_export.errors import ConfigError
from molgen_export.mapping import architecture
from molgen_export.mapping.run_config import ModelDims, parse_run_config

SOURCE = Path("/nonexistent/run/job_config.json")


def _shapes(arch, *, drop=()) -> dict[str, tuple[int, ...]]:
    """Canonical key -> shape of a real TorchTitan model of `arch` (as `canonicalize_keys` leaves them)."""
    model = build_model(arch, seed=0, fused_qkv=False)
    return {k: tuple(v.shape) for k, v in model.state_dict().items() if k not in drop}


def _run(arch, **changes):
    """The run config TorchTitan itself dumps for `arch` (Trainer.Config.to_dict()), parsed."""
    data = job_config_dict(arch, flavor="molgen_tiny", hf_assets_path="./assets", dump_folder="./run",
                           seq_len=arch.max_seq_len)
    run = parse_run_config(data, SOURCE)
    return dataclasses.replace(run, dims=dataclasses.replace(run.dims, **changes)) if changes else run


def _dims_only_run(**dims):
    """A TorchTitan 0.2 job config (names a model, states no dims): the base config.json is the only dims source."""
    run = parse_run_config({"model": {"name": "qwen3", "flavor": "not_a_registered_flavor"}}, SOURCE)
    return dataclasses.replace(run, dims=ModelDims(**dims))


def _base(arch, tmp_path: Path) -> dict:
    write_base_assets(tmp_path, arch, eos_id=0)
    return architecture.read_base_hf_config(tmp_path)


@pytest.fixture(scope="module")
def padded():
    """A tied arch whose vocab (384 rows) is padded past a 300-token tokenizer, and its real shapes."""
    arch = tiny_arch(vocab_size=384, tie=True)
    return arch, _shapes(arch)


def test_facts_from_real_shapes(padded):
    arch, shapes = padded
    facts = architecture.facts_from_shapes(shapes)
    assert facts == architecture.ShapeFacts(vocab_size=384, dim=64, n_layers=2, n_heads=4, n_kv_heads=2,
                                            head_dim=32, hidden_dim=160, has_head=True)
    # head_dim comes from q_norm, not dim / n_heads (like Qwen3-0.6B: 1024 / 16 != 128)
    assert facts.head_dim != facts.dim // facts.n_heads


def test_facts_refuse_a_checkpoint_missing_what_the_architecture_needs(padded):
    _, shapes = padded
    for key in ("tok_embeddings.weight", "layers.0.attention.q_norm.weight", "layers.0.attention.qkv_linear.wk.weight"):
        with pytest.raises(ConfigError) as info:
            architecture.facts_from_shapes({k: v for k, v in shapes.items() if k != key})
        assert key in str(info.value)
    fused = {**shapes, "layers.0.attention.qkv_linear.wqkv.weight": (256, 64)}
    with pytest.raises(ConfigError, match="fused wqkv"):
        architecture.facts_from_shapes(fused)


def test_moe_facts():
    arch = tiny_moe_arch(num_experts=12, moe_layers=(1,))
    facts = architecture.facts_from_shapes(_shapes(arch))
    assert (facts.num_experts, facts.moe_hidden_dim, facts.moe_layers, facts.hidden_dim) == (12, 48, (1,), 160)
    all_moe = architecture.facts_from_shapes(_shapes(tiny_moe_arch(num_experts=4, moe_layers=(0, 1))))
    assert all_moe.moe_layers == (0, 1) and all_moe.hidden_dim is None


def test_shapes_and_real_run_config_resolve_to_the_trained_arch(padded, tmp_path):
    arch, shapes = padded
    resolved, warnings = architecture.resolve_architecture(_run(arch), architecture.facts_from_shapes(shapes),
                                                           _base(arch, tmp_path))
    assert resolved == arch
    assert warnings == []


def test_resolved_arch_builds_a_model_with_the_checkpoints_shapes(padded, tmp_path):
    arch, shapes = padded
    resolved, _ = architecture.resolve_architecture(_run(arch), architecture.facts_from_shapes(shapes),
                                                    _base(arch, tmp_path))
    with torch.device("meta"):
        model = resolved.titan_model_config().build()
    assert {k: tuple(v.shape) for k, v in model.state_dict().items()} == shapes


def test_vocab_padding_rows_kept(padded, tmp_path):
    """config.vocab_size = embedding rows, even when the base config (the released model) states the tokenizer's."""
    arch, shapes = padded
    base = _base(dataclasses.replace(arch, vocab_size=300), tmp_path)
    resolved, warnings = architecture.resolve_architecture(_run(arch), architecture.facts_from_shapes(shapes), base)
    assert resolved.vocab_size == 384
    assert warnings == ["base assets config.json says vocab_size=300, the checkpoint has 384; the checkpoint wins"]


def test_base_config_alone_must_match_the_shapes(padded, tmp_path):
    arch, shapes = padded
    base = _base(dataclasses.replace(arch, n_kv_heads=4), tmp_path)
    with pytest.raises(ConfigError) as info:
        architecture.resolve_architecture(_dims_only_run(), architecture.facts_from_shapes(shapes), base)
    assert "n_kv_heads=4" in str(info.value) and "say 2" in str(info.value)
    assert "base assets config.json" in str(info.value)


@pytest.mark.parametrize(("field", "wrong"), [("dim", 128), ("n_heads", 8), ("head_dim", 16), ("n_layers", 3),
                                              ("vocab_size", 320), ("hidden_dim", 96)])
def test_run_config_contradicting_the_shapes_is_refused(padded, tmp_path, field, wrong):
    arch, shapes = padded
    with pytest.raises(ConfigError) as info:
        architecture.resolve_architecture(_run(arch, **{field: wrong}), architecture.facts_from_shapes(shapes),
                                          _base(arch, tmp_path))
    assert f"{field}={wrong}" in str(info.value)
    assert "--config" in info.value.hint


def test_settings_the_shapes_cannot_check_go_to_the_run_config_with_a_warning(padded, tmp_path):
    arch, shapes = padded
    base = _base(dataclasses.replace(arch, rope_theta=10_000.0, norm_eps=1e-5), tmp_path)
    resolved, warnings = architecture.resolve_architecture(_run(arch), architecture.facts_from_shapes(shapes), base)
    assert (resolved.rope_theta, resolved.norm_eps) == (1_000_000.0, 1e-6)
    assert any(w.startswith("rope_theta:") and "using 1000000.0" in w for w in warnings)
    assert any(w.startswith("norm_eps:") for w in warnings)


def test_defaults_when_no_source_states_rope_or_eps(padded, tmp_path):
    arch, shapes = padded
    base = {k: v for k, v in _base(arch, tmp_path).items() if k not in ("rope_theta", "rms_norm_eps")}
    resolved, _ = architecture.resolve_architecture(_dims_only_run(), architecture.facts_from_shapes(shapes), base)
    assert resolved.rope_theta == architecture.QWEN3_ROPE_THETA == 1e6  # not transformers' 10000
    assert resolved.norm_eps == architecture.QWEN3_NORM_EPS


def test_tied_embeddings_from_what_the_checkpoint_holds(padded, tmp_path):
    arch, shapes = padded
    headless = architecture.facts_from_shapes({k: v for k, v in shapes.items() if k != "lm_head.weight"})
    assert not headless.has_head
    base = {k: v for k, v in _base(arch, tmp_path).items() if k != "tie_word_embeddings"}
    # no head and nobody says otherwise: tied
    resolved, _ = architecture.resolve_architecture(_dims_only_run(), headless, base)
    assert resolved.tie_word_embeddings is True
    # a head and nobody says: untied
    resolved, _ = architecture.resolve_architecture(_dims_only_run(), architecture.facts_from_shapes(shapes), base)
    assert resolved.tie_word_embeddings is False
    # no head but the run says untied: nothing to write as lm_head
    with pytest.raises(ConfigError, match="no lm_head"):
        architecture.resolve_architecture(_run(arch, tie_word_embeddings=False), headless, base)


def test_moe_resolution_and_missing_top_k(tmp_path):
    arch = tiny_moe_arch(num_experts=12, top_k=3, moe_layers=(1,))
    facts = architecture.facts_from_shapes(_shapes(arch))
    resolved, _ = architecture.resolve_architecture(_run(arch), facts, _base(arch, tmp_path))
    assert resolved.moe == arch.moe
    base = {k: v for k, v in _base(arch, tmp_path).items() if k != "num_experts_per_tok"}
    with pytest.raises(ConfigError, match="top_k"):
        architecture.resolve_architecture(_dims_only_run(), facts, base)


def test_other_model_families_refused(padded, tmp_path):
    arch, shapes = padded
    facts = architecture.facts_from_shapes(shapes)
    llama_run = dataclasses.replace(_dims_only_run(), model_name="llama3")
    with pytest.raises(ConfigError, match="llama3"):
        architecture.resolve_architecture(llama_run, facts, _base(arch, tmp_path))
    with pytest.raises(ConfigError, match="`llama` model"):
        architecture.resolve_architecture(_dims_only_run(), facts, {**_base(arch, tmp_path), "model_type": "llama"})


def test_dims_from_transformers_qwen3_configs():
    from transformers import Qwen3Config, Qwen3MoeConfig

    dense = Qwen3Config(vocab_size=384, hidden_size=64, intermediate_size=160, num_hidden_layers=2,
                        num_attention_heads=4, num_key_value_heads=2, head_dim=32, rms_norm_eps=1e-6,
                        max_position_embeddings=256, tie_word_embeddings=True, rope_theta=1e6)
    dims = architecture.dims_from_hf_config(dense.to_dict())
    assert (dims.vocab_size, dims.dim, dims.hidden_dim, dims.n_layers, dims.n_heads, dims.n_kv_heads,
            dims.head_dim, dims.max_seq_len, dims.tie_word_embeddings) == (384, 64, 160, 2, 4, 2, 32, 256, True)
    assert dims.rope_theta == 1e6 and not dims.moe
    moe = Qwen3MoeConfig(num_hidden_layers=4, num_experts=12, num_experts_per_tok=2, moe_intermediate_size=48,
                         mlp_only_layers=[0, 2], decoder_sparse_step=1, norm_topk_prob=True)
    dims = architecture.dims_from_hf_config(moe.to_dict())
    assert (dims.moe, dims.num_experts, dims.top_k, dims.moe_hidden_dim, dims.moe_layers) == (True, 12, 2, 48, (1, 3))


def test_flavor_registry_dims():
    small = architecture.dims_from_flavor("qwen3", "0.6B")
    assert (small.dim, small.n_heads, small.head_dim, small.tie_word_embeddings) == (1024, 16, 128, True)
    assert architecture.dims_from_flavor("qwen3", "8B").tie_word_embeddings is False
    assert architecture.dims_from_flavor("qwen3", "no_such_flavor") is None
    assert architecture.dims_from_flavor("llama3", "8B") is None


def test_read_base_hf_config_errors(tmp_path):
    with pytest.raises(ConfigError, match="no config.json"):
        architecture.read_base_hf_config(tmp_path)
    (tmp_path / "config.json").write_text("{not json")
    with pytest.raises(ConfigError, match="not valid JSON"):
        architecture.read_base_hf_config(tmp_path)
    (tmp_path / "config.json").write_text(json.dumps({"model_type": "qwen3"}))
    assert architecture.read_base_hf_config(tmp_path) == {"model_type": "qwen3"}


def test_moe_base_config_saved_by_transformers_5_resolves(tmp_path):
    """transformers 5 writes Qwen3-MoE's expert count as `num_local_experts`; it must still read as MoE (bug fixed:
    it was read as dense, and the export then refused the run for want of a top_k that the file states)."""
    from transformers import Qwen3MoeConfig

    arch = tiny_moe_arch(num_experts=12, top_k=3, moe_layers=(1,))
    saved = Qwen3MoeConfig(vocab_size=arch.vocab_size, hidden_size=arch.dim, intermediate_size=arch.hidden_dim,
                           num_hidden_layers=arch.n_layers, num_attention_heads=arch.n_heads,
                           num_key_value_heads=arch.n_kv_heads, head_dim=arch.head_dim, num_experts=12,
                           num_experts_per_tok=3, moe_intermediate_size=48, mlp_only_layers=[0], norm_topk_prob=True)
    saved.save_pretrained(tmp_path)
    base = architecture.read_base_hf_config(tmp_path)
    assert "num_experts" not in base and base["num_local_experts"] == 12  # how transformers 5 spells it on disk
    resolved, _ = architecture.resolve_architecture(_dims_only_run(), architecture.facts_from_shapes(_shapes(arch)),
                                                    base)
    assert resolved.moe == arch.moe
