"""vLLM merged layout <-> HF as zero-copy views: storage is shared, an HF model (built on the meta device) run on
the views computes the normally loaded model's logits, and gradients land in the merged tensors."""

from __future__ import annotations

import pytest
import torch

from molgen_export.convert import vllm
from molgen_export.errors import ConfigError, MappingError


def qwen3(tie: bool, n_kv_heads: int = 2):
    from transformers import Qwen3Config, Qwen3ForCausalLM

    config = Qwen3Config(vocab_size=300, hidden_size=64, intermediate_size=160, num_hidden_layers=2,
                         num_attention_heads=4, num_key_value_heads=n_kv_heads, head_dim=32,
                         tie_word_embeddings=tie)
    torch.manual_seed(0)
    return config, Qwen3ForCausalLM(config).eval()


def qwen35():
    """A tiny Qwen3.5 text model: one Gated DeltaNet (linear attention) layer, one gated full-attention layer."""
    from transformers import Qwen3_5TextConfig
    from transformers.models.qwen3_5.modeling_qwen3_5 import Qwen3_5ForCausalLM

    config = Qwen3_5TextConfig(vocab_size=300, hidden_size=64, intermediate_size=128, num_hidden_layers=2,
                               num_attention_heads=4, num_key_value_heads=2, head_dim=16, linear_key_head_dim=16,
                               linear_value_head_dim=16, linear_num_key_heads=2, linear_num_value_heads=4,
                               layer_types=["linear_attention", "full_attention"])
    torch.manual_seed(0)
    return config, Qwen3_5ForCausalLM(config).eval()


def storage(t: torch.Tensor) -> int:
    return t.untyped_storage().data_ptr()


TOKENS = torch.randint(0, 300, (2, 16), generator=torch.Generator().manual_seed(3))


@pytest.mark.parametrize("tie", [True, False])
def test_views_share_storage_with_the_merged_tensors(tie):
    config, model = qwen3(tie)
    hf_state = dict(model.state_dict())
    merged = vllm.vllm_fused_from_hf(hf_state, config)
    assert merged["model.layers.1.self_attn.qkv_proj.weight"].shape == (128 + 64 + 64, 64)
    assert merged["model.layers.0.mlp.gate_up_proj.weight"].shape == (2 * 160, 64)
    assert ("lm_head.weight" in merged) == (not tie)  # vLLM reuses the embedding when tied
    assert storage(merged["model.layers.0.self_attn.qkv_proj.weight"]) != storage(hf_state["model.layers.0.self_attn.q_proj.weight"])

    views = vllm.hf_views_from_vllm(merged, config)
    assert set(views) == set(hf_state) - ({"lm_head.weight"} if tie else set())
    for hf_key, view in views.items():
        torch.testing.assert_close(view, hf_state[hf_key], atol=0, rtol=0)
    for layer in range(2):
        qkv = merged[f"model.layers.{layer}.self_attn.qkv_proj.weight"]
        gate_up = merged[f"model.layers.{layer}.mlp.gate_up_proj.weight"]
        for part in ("q_proj", "k_proj", "v_proj"):
            assert storage(views[f"model.layers.{layer}.self_attn.{part}.weight"]) == storage(qkv)
        for part in ("gate_proj", "up_proj"):
            assert storage(views[f"model.layers.{layer}.mlp.{part}.weight"]) == storage(gate_up)
    # a write into the merged memory is seen through the views: weight sync without copies
    merged["model.layers.0.self_attn.qkv_proj.weight"][128 + 5, 7] = 42.0
    assert views["model.layers.0.self_attn.k_proj.weight"][5, 7] == 42.0


@pytest.mark.parametrize("tie", [True, False])
def test_hf_model_on_the_merged_memory_matches_and_gradients_land_there(tie):
    config, reference = qwen3(tie)
    merged = {k: v.clone().requires_grad_(True) for k, v in vllm.vllm_fused_from_hf(dict(reference.state_dict()), config).items()}
    meta_model = vllm.build_meta_hf_model(config)
    assert all(p.is_meta for p in meta_model.parameters())  # no weight memory of its own
    on_merged = vllm.MergedWeightsModel(meta_model, merged, config)

    got = on_merged(input_ids=TOKENS).logits
    want = reference(input_ids=TOKENS).logits
    torch.testing.assert_close(got, want, atol=1e-5, rtol=1e-5)
    print(f"vLLM views tie={tie}: HF model on merged memory vs normally loaded max|Δlogit| "
          f"{float((got - want).detach().abs().max()):.3g}")

    got.float().square().mean().backward()
    want.float().square().mean().backward()
    grads = {k: p.grad for k, p in reference.named_parameters()}
    for layer in range(2):
        qkv = merged[f"model.layers.{layer}.self_attn.qkv_proj.weight"].grad
        torch.testing.assert_close(qkv, torch.cat([grads[f"model.layers.{layer}.self_attn.{p}_proj.weight"]
                                                   for p in "qkv"]), atol=1e-6, rtol=1e-5)
        gate_up = merged[f"model.layers.{layer}.mlp.gate_up_proj.weight"].grad
        torch.testing.assert_close(gate_up, torch.cat([grads[f"model.layers.{layer}.mlp.gate_proj.weight"],
                                                       grads[f"model.layers.{layer}.mlp.up_proj.weight"]]),
                                   atol=1e-6, rtol=1e-5)
    torch.testing.assert_close(merged["model.embed_tokens.weight"].grad, grads["model.embed_tokens.weight"],
                               atol=1e-6, rtol=1e-5)  # tied: head and embedding gradients both land here
    worst = max(float((merged[f"model.layers.{i}.self_attn.qkv_proj.weight"].grad - torch.cat(
        [grads[f"model.layers.{i}.self_attn.{p}_proj.weight"] for p in "qkv"])).abs().max()) for i in range(2))
    print(f"vLLM views tie={tie}: qkv_proj.grad vs cat(q, k, v grads of the HF model) max|Δ| {worst:.3g}")

    # an optimizer step on the merged tensors changes what the HF model computes next
    with torch.no_grad():
        torch.optim.SGD(merged.values(), lr=0.5).step()
    assert not torch.allclose(on_merged(input_ids=TOKENS).logits, got)


def test_qwen35_linear_attention_merge_is_a_plain_dim0_concat_and_views_match():
    """vLLM's Qwen3.5 `in_proj_qkvz` is `cat([in_proj_qkv; in_proj_z])` (output sizes [k, k, v, v], not Qwen3-Next's
    per-key-head interleaving) and `in_proj_ba` is `cat([in_proj_b; in_proj_a])`."""
    config, reference = qwen35()
    hf_state = dict(reference.state_dict())
    merged = vllm.vllm_fused_from_hf(hf_state, config)
    key_dim, value_dim, value_heads = 2 * 16, 4 * 16, 4  # from the config: heads x head dims
    qkvz = merged["model.layers.0.linear_attn.in_proj_qkvz.weight"]
    ba = merged["model.layers.0.linear_attn.in_proj_ba.weight"]
    assert qkvz.shape == (2 * key_dim + value_dim + value_dim, 64)
    assert ba.shape == (2 * value_heads, 64)
    assert merged["model.layers.1.self_attn.qkv_proj.weight"].shape == (2 * 4 * 16 + 2 * 16 + 2 * 16, 64)  # gated q
    layer = "model.layers.0.linear_attn"
    assert torch.equal(qkvz[:key_dim], hf_state[f"{layer}.in_proj_qkv.weight"][:key_dim])  # q rows first
    assert torch.equal(qkvz[2 * key_dim + value_dim:], hf_state[f"{layer}.in_proj_z.weight"])  # z rows last
    assert torch.equal(ba[:value_heads], hf_state[f"{layer}.in_proj_b.weight"])  # b rows, then a rows
    assert not any(".in_proj_qkv." in k or ".in_proj_z." in k or ".in_proj_b." in k for k in merged)

    views = vllm.hf_views_from_vllm(merged, config)
    assert set(views) == set(hf_state)
    for part, source in (("in_proj_qkv", qkvz), ("in_proj_z", qkvz), ("in_proj_b", ba), ("in_proj_a", ba)):
        assert storage(views[f"{layer}.{part}.weight"]) == storage(source)
        torch.testing.assert_close(views[f"{layer}.{part}.weight"], hf_state[f"{layer}.{part}.weight"],
                                   atol=0, rtol=0)
    on_merged = vllm.MergedWeightsModel(vllm.build_meta_hf_model(config), merged, config)
    with torch.no_grad():
        got, want = on_merged(input_ids=TOKENS).logits, reference(input_ids=TOKENS).logits
    torch.testing.assert_close(got, want, atol=1e-5, rtol=1e-5)
    print(f"vLLM views Qwen3.5 (linear + gated attention): max|Δlogit| {float((got - want).abs().max()):.3g}")


def test_qwen35_lora_layout_keeps_in_proj_qkv_and_z_separate():
    """With LoRA enabled vLLM's Qwen3.5 keeps `in_proj_qkv` and `in_proj_z` (still merging `in_proj_ba`)."""
    config, reference = qwen35()
    merged = vllm.vllm_fused_from_hf(dict(reference.state_dict()), config, keep_separate=("linear_attn.in_proj_qkvz",))
    layer = "model.layers.0.linear_attn"
    assert f"{layer}.in_proj_qkv.weight" in merged and f"{layer}.in_proj_z.weight" in merged
    assert f"{layer}.in_proj_qkvz.weight" not in merged and f"{layer}.in_proj_ba.weight" in merged
    on_merged = vllm.MergedWeightsModel(vllm.build_meta_hf_model(config), merged, config)
    with torch.no_grad():
        torch.testing.assert_close(on_merged(input_ids=TOKENS).logits, reference(input_ids=TOKENS).logits,
                                   atol=1e-5, rtol=1e-5)
    with pytest.raises(ConfigError, match=r"in_proj_qkv.*not merged"):
        vllm.vllm_fused_from_hf(dict(reference.state_dict()), config, keep_separate=("linear_attn.in_proj_qkv",))


def qwen35_moe():
    """A tiny Qwen3.5 MoE text model (every layer sparse, with a shared expert)."""
    from transformers import Qwen3_5MoeTextConfig
    from transformers.models.qwen3_5_moe.modeling_qwen3_5_moe import (
        Qwen3_5MoeForCausalLM,
    )

    config = Qwen3_5MoeTextConfig(vocab_size=300, hidden_size=64, num_hidden_layers=2, num_attention_heads=4,
                                  num_key_value_heads=2, head_dim=16, linear_key_head_dim=16,
                                  linear_value_head_dim=16, linear_num_key_heads=2, linear_num_value_heads=4,
                                  num_experts=4, num_experts_per_tok=2, moe_intermediate_size=32,
                                  shared_expert_intermediate_size=48,
                                  layer_types=["linear_attention", "full_attention"])
    torch.manual_seed(0)
    return config, Qwen3_5MoeForCausalLM(config).eval()


def test_qwen35_moe_experts_are_vllm_fused_moe_names_over_the_same_tensors():
    """vLLM's Qwen3.5 MoE loads HF's `experts.gate_up_proj` [E, 2F, D] into FusedMoE `w13_weight` (gate half, then up
    half, no transpose) and `experts.down_proj` [E, D, F] into `w2_weight`; the shared expert's gate/up merge."""
    config, reference = qwen35_moe()
    hf_state = dict(reference.state_dict())
    merged = vllm.vllm_fused_from_hf(hf_state, config)
    mlp = "model.layers.0.mlp"
    assert merged[f"{mlp}.experts.w13_weight"] is hf_state[f"{mlp}.experts.gate_up_proj"]  # renamed, not copied
    assert merged[f"{mlp}.experts.w2_weight"] is hf_state[f"{mlp}.experts.down_proj"]
    assert merged[f"{mlp}.shared_expert.gate_up_proj.weight"].shape == (2 * 48, 64)
    assert f"{mlp}.gate.weight" in merged and f"{mlp}.shared_expert_gate.weight" in merged
    assert not any(k.endswith(("experts.gate_up_proj", "experts.down_proj", "shared_expert.gate_proj.weight"))
                   for k in merged)

    merged = {k: v.clone().requires_grad_(True) for k, v in merged.items()}
    views = vllm.hf_views_from_vllm(merged, config)
    assert set(views) == set(hf_state)
    assert storage(views[f"{mlp}.experts.gate_up_proj"]) == storage(merged[f"{mlp}.experts.w13_weight"])
    assert storage(views[f"{mlp}.shared_expert.up_proj.weight"]) == storage(
        merged[f"{mlp}.shared_expert.gate_up_proj.weight"])
    on_merged = vllm.MergedWeightsModel(vllm.build_meta_hf_model(config), merged, config)
    got, want = on_merged(input_ids=TOKENS).logits, reference(input_ids=TOKENS).logits
    torch.testing.assert_close(got, want, atol=1e-5, rtol=1e-5)
    print(f"vLLM views Qwen3.5 MoE: max|Δlogit| {float((got - want).detach().abs().max()):.3g}")
    got.float().square().mean().backward()
    want.float().square().mean().backward()
    grads = {k: p.grad for k, p in reference.named_parameters()}
    torch.testing.assert_close(merged[f"{mlp}.experts.w13_weight"].grad, grads[f"{mlp}.experts.gate_up_proj"],
                               atol=1e-6, rtol=1e-5)
    torch.testing.assert_close(merged[f"{mlp}.shared_expert.gate_up_proj.weight"].grad,
                               torch.cat([grads[f"{mlp}.shared_expert.gate_proj.weight"],
                                          grads[f"{mlp}.shared_expert.up_proj.weight"]]), atol=1e-6, rtol=1e-5)


def test_qwen3_next_interleaved_linear_attention_passes_through_unsplit():
    """HF Qwen3-Next already holds `in_proj_qkvz`/`in_proj_ba` (interleaved per key-head group) and vLLM loads them
    as they are: a dim-0 split into Qwen3.5 names would be wrong, so there is none."""
    from transformers import Qwen3NextConfig
    from transformers.models.qwen3_next.modeling_qwen3_next import Qwen3NextForCausalLM

    config = Qwen3NextConfig(vocab_size=300, hidden_size=64, intermediate_size=96, num_hidden_layers=2,
                             num_attention_heads=4, num_key_value_heads=2, head_dim=16, linear_key_head_dim=16,
                             linear_value_head_dim=16, linear_num_key_heads=2, linear_num_value_heads=4,
                             mlp_only_layers=[0, 1], layer_types=["linear_attention", "full_attention"])
    torch.manual_seed(0)
    reference = Qwen3NextForCausalLM(config).eval()
    hf_state = dict(reference.state_dict())
    merged = vllm.vllm_fused_from_hf(hf_state, config)
    qkvz = "model.layers.0.linear_attn.in_proj_qkvz.weight"
    assert merged[qkvz] is hf_state[qkvz]
    views = vllm.hf_views_from_vllm(merged, config)
    assert set(views) == set(hf_state) and views[qkvz] is merged[qkvz]
    on_merged = vllm.MergedWeightsModel(vllm.build_meta_hf_model(config), merged, config)
    with torch.no_grad():
        torch.testing.assert_close(on_merged(input_ids=TOKENS).logits, reference(input_ids=TOKENS).logits,
                                   atol=1e-5, rtol=1e-5)


def test_language_model_prefix_of_conditional_generation_names():
    config, reference = qwen35()
    hf_state = {k.replace("model.", "model.language_model.", 1) if k.startswith("model.") else k: v
                for k, v in reference.state_dict().items()}
    merged = vllm.vllm_fused_from_hf(hf_state, config)
    assert "language_model.model.layers.0.linear_attn.in_proj_qkvz.weight" in merged
    assert "language_model.lm_head.weight" in merged and "language_model.model.embed_tokens.weight" in merged
    views = vllm.hf_views_from_vllm(merged, config)
    assert set(views) == set(hf_state)
    assert storage(views["model.language_model.layers.0.linear_attn.in_proj_z.weight"]) == storage(
        merged["language_model.model.layers.0.linear_attn.in_proj_qkvz.weight"])


def test_split_sizes_come_from_the_config():
    config, model = qwen3(tie=True, n_kv_heads=1)
    assert vllm.split_sizes(config).qkv == (128, 32, 32)
    merged = vllm.vllm_fused_from_hf(dict(model.state_dict()), config)
    other_config, _ = qwen3(tie=True, n_kv_heads=2)
    with pytest.raises(MappingError, match=r"model\.layers\.0\.self_attn\.qkv_proj\.weight` has 192 rows") as info:
        vllm.hf_views_from_vllm(merged, other_config)
    assert "tensor-parallel" in str(info.value)
