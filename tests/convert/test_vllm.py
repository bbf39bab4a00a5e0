"""vLLM merged layout <-> HF as zero-copy views: storage is shared, an HF model (built on the meta device) run on
the views computes the normally loaded model's logits, and gradients land in the merged tensors."""

from __future__ import annotations

import pytest
import torch

from molgen_export.errors import MappingError
from molgen_export.convert import vllm


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


def test_qwen35_linear_attention_merges_and_views():
    config, reference = qwen35()
    hf_state = dict(reference.state_dict())
    merged = vllm.vllm_fused_from_hf(hf_state, config)
    key_dim, value_dim, value_heads = 2 * 16, 4 * 16, 4  # from the config: heads x head dims
    assert merged["model.layers.0.linear_attn.in_proj_qkvz.weight"].shape == (2 * key_dim + value_dim + value_dim, 64)
    assert merged["model.layers.0.linear_attn.in_proj_ba.weight"].shape == (2 * value_heads, 64)
    assert merged["model.layers.1.self_attn.qkv_proj.weight"].shape == (2 * 4 * 16 + 2 * 16 + 2 * 16, 64)  # gated q

    views = vllm.hf_views_from_vllm(merged, config)
    for part in ("in_proj_qkv", "in_proj_z"):
        assert storage(views[f"model.layers.0.linear_attn.{part}.weight"]) == storage(
            merged["model.layers.0.linear_attn.in_proj_qkvz.weight"])
        torch.testing.assert_close(views[f"model.layers.0.linear_attn.{part}.weight"],
                                   hf_state[f"model.layers.0.linear_attn.{part}.weight"], atol=0, rtol=0)
    for part in ("in_proj_b", "in_proj_a"):
        assert storage(views[f"model.layers.0.linear_attn.{part}.weight"]) == storage(
            merged["model.layers.0.linear_attn.in_proj_ba.weight"])
    on_merged = vllm.MergedWeightsModel(vllm.build_meta_hf_model(config), merged, config)
    with torch.no_grad():
        got, want = on_merged(input_ids=TOKENS).logits, reference(input_ids=TOKENS).logits
    torch.testing.assert_close(got, want, atol=1e-5, rtol=1e-5)
    print(f"vLLM views Qwen3.5 (linear + gated attention): max|Δlogit| {float((got - want).abs().max()):.3g}")


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
