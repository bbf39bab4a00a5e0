"""mapping.keymap: every TorchTitan Qwen3 key gets the HF name torchtitan's own `Qwen3StateDictAdapter` gives it,
old names and wrapper segments canonicalize to the same keys, experts split per expert in numeric order, the fused
wqkv splits like torchtitan's, and unknown or colliding keys are refused by name."""

from __future__ import annotations

import re

import pytest
import torch

from molgen_export.demo import build_model, tiny_arch, tiny_moe_arch
from molgen_export.errors import MappingError
from molgen_export.mapping import keymap, titan


def _canonical_sd(model) -> dict[str, torch.Tensor]:
    """The model's state dict under canonical (TorchTitan 0.3) keys, whichever torchtitan is installed."""
    return {keymap.canonical_titan_key(k)[0]: v.detach().clone() for k, v in model.state_dict().items()}


@pytest.fixture(scope="module")
def dense():
    """(arch, canonical titan state dict) of a real untied 2-layer TorchTitan Qwen3."""
    arch = tiny_arch(vocab_size=320, tie=False)
    return arch, _canonical_sd(build_model(arch, seed=3, fused_qkv=False))


@pytest.fixture(scope="module")
def moe():
    """(arch, canonical titan state dict) of a real Qwen3 MoE: layer 0 dense, layer 1 with 12 experts (more than 10)."""
    arch = tiny_moe_arch(num_experts=12, moe_layers=(1,))
    return arch, _canonical_sd(build_model(arch, seed=4, fused_qkv=False))


def _theirs_to_hf(arch, titan_sd: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    """torchtitan's own `Qwen3StateDictAdapter.to_hf` (of the installed torchtitan, in its own key names)."""
    api = titan.installed()
    return api.state_dict_adapter(arch.titan_model_config()).to_hf({api.native_key(k): v for k, v in titan_sd.items()})


def _theirs_from_hf(arch, hf_sd: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    """torchtitan's own `Qwen3StateDictAdapter.from_hf`, its keys canonicalized."""
    back = titan.installed().state_dict_adapter(arch.titan_model_config()).from_hf(dict(hf_sd))
    return {keymap.canonical_titan_key(k)[0]: v for k, v in back.items()}


def _map(titan_sd: dict[str, torch.Tensor], arch, **heads):
    shapes = {k: tuple(v.shape) for k, v in titan_sd.items()}
    kept, buffers = keymap.split_training_buffers(shapes)
    sources, rules = keymap.canonicalize_keys(kept, **heads)
    return sources, keymap.map_to_hf(sources, arch.titan_model_config()), buffers, rules


def _hf_state_dict(titan_sd, sources, mapping, heads=None) -> dict[str, torch.Tensor]:
    """The HF tensors our mapping says to write, cut out of the TorchTitan tensors the way the export does."""
    hf_sd = {}
    for titan_key, source in sources.items():
        value = titan_sd[source.checkpoint_key]
        if source.expert is not None:
            value = value[source.expert]
        elif source.part is not None:
            value = keymap.split_fused_qkv(value, source.part, **heads)
        hf_sd[mapping[titan_key]] = value
    return hf_sd


def test_dense_keys_map_to_what_torchtitans_adapter_gives(dense):
    arch, titan_sd = dense
    sources, mapping, buffers, rules = _map(titan_sd, arch)
    theirs = _theirs_to_hf(arch, titan_sd)
    assert not buffers and not rules
    assert set(sources) == set(titan_sd)  # nothing dropped, nothing invented
    assert len(set(mapping.values())) == len(mapping)  # one HF name per tensor
    ours = _hf_state_dict(titan_sd, sources, mapping)
    assert set(ours) == set(theirs)
    for hf_key, value in theirs.items():
        assert torch.equal(ours[hf_key], value), hf_key
    assert set(ours) == keymap.expected_hf_keys(arch.n_layers, with_head=True)


def test_moe_experts_split_per_expert_in_numeric_order(moe):
    arch, titan_sd = moe
    sources, mapping, buffers, _ = _map(titan_sd, arch)
    assert buffers == {"layers.1.moe.expert_bias_E": "layers.1.moe.expert_bias_E"}
    grouped = "layers.1.moe.routed_experts.inner_experts.w1_EFD"
    assert [s.expert for k, s in sources.items() if s.grouped_key == grouped] == list(range(12))
    for expert in range(12):
        source = sources[f"{grouped}#{expert}"]
        assert source.shape == tuple(titan_sd[grouped].shape[1:])
        assert mapping[source.titan_key] == f"model.layers.1.mlp.experts.{expert}.gate_proj.weight"
    assert mapping["layers.1.moe.routed_experts.inner_experts.w2_EDF#10"] == \
        "model.layers.1.mlp.experts.10.down_proj.weight"
    assert mapping["layers.1.moe.router.gate.weight"] == "model.layers.1.mlp.gate.weight"

    theirs = _theirs_to_hf(arch, {k: v for k, v in titan_sd.items() if k not in buffers})
    ours = _hf_state_dict(titan_sd, sources, mapping)
    assert set(ours) == set(theirs)
    for hf_key, value in theirs.items():
        assert torch.equal(ours[hf_key], value), hf_key  # expert e of ours is expert e of torchtitan's split
    assert set(ours) == keymap.expected_hf_keys(arch.n_layers, with_head=True, moe_layers=(1,), num_experts=12)


@pytest.mark.parametrize("model_fixture", ["dense", "moe"])
def test_round_trip_through_torchtitans_from_hf(model_fixture, request):
    arch, titan_sd = request.getfixturevalue(model_fixture)
    sources, mapping, buffers, _ = _map(titan_sd, arch)
    hf_sd = _hf_state_dict(titan_sd, sources, mapping)
    back = _theirs_from_hf(arch, hf_sd)
    expected = {k: v for k, v in titan_sd.items() if k not in buffers}
    assert set(back) == set(expected)
    for titan_key, value in expected.items():
        assert torch.equal(back[titan_key], value), titan_key


LEGACY_RENAMES = (
    # (how TorchTitan 0.2 / wrappers spelled it, the canonical 0.3 key)
    ("output.weight", "lm_head.weight"),
    ("layers.0.attention.wq.weight", "layers.0.attention.qkv_linear.wq.weight"),
    ("layers.1.attention.wv.weight", "layers.1.attention.qkv_linear.wv.weight"),
    ("layers.1.moe.experts.w1", "layers.1.moe.routed_experts.inner_experts.w1_EFD"),
    ("layers.1.moe.experts.w2", "layers.1.moe.routed_experts.inner_experts.w2_EDF"),
    ("layers.1.moe.experts.w3", "layers.1.moe.routed_experts.inner_experts.w3_EFD"),
    ("layers.1.moe.expert_bias", "layers.1.moe.expert_bias_E"),
    ("_orig_mod.layers.0.attention_norm.weight", "layers.0.attention_norm.weight"),
    ("layers.0._checkpoint_wrapped_module.attention.wo.weight", "layers.0.attention.wo.weight"),
    ("module.layers.0._fsdp_wrapped_module.ffn_norm.weight", "layers.0.ffn_norm.weight"),
    ("model.tok_embeddings.weight", "tok_embeddings.weight"),
    ("MODEL.norm.weight", "norm.weight"),
    ("model.layers.0._orig_mod.attention.wk.weight", "layers.0.attention.qkv_linear.wk.weight"),
)


@pytest.mark.parametrize(("checkpoint_key", "titan_key"), LEGACY_RENAMES)
def test_old_names_and_wrappers_canonicalize(checkpoint_key, titan_key):
    canonical, rules = keymap.canonical_titan_key(checkpoint_key)
    assert canonical == titan_key
    assert rules  # which rule fired is recorded
    assert keymap.canonical_titan_key(titan_key) == (titan_key, ())  # canonical keys are left alone


def test_model_prefix_only_stripped_before_a_titan_root():
    # `model.` is a prefix only in front of a TorchTitan root; elsewhere it is part of a name
    assert keymap.canonical_titan_key("model.visual.weight") == ("model.visual.weight", ())


def test_old_checkpoint_maps_like_a_new_one(moe):
    arch, titan_sd = moe
    # the TorchTitan 0.2 names (no wrapper segments or prefixes: every key gets `_orig_mod.` below)
    old_names = {new: old for old, new in LEGACY_RENAMES
                 if not set(old.split(".")) & {*keymap.WRAPPER_SEGMENTS, "model", "MODEL"}}

    def to_old(key: str) -> str:
        key = old_names.get(key, key)
        key = re.sub(r"^layers\.(\d+)\.attention\.qkv_linear\.(w[qkv])\.", r"layers.\1.attention.\2.", key)
        return "_orig_mod." + key

    old_sd = {to_old(k): v for k, v in titan_sd.items()}
    assert set(old_sd).isdisjoint(titan_sd)
    sources_new, mapping_new, buffers_new, _ = _map(titan_sd, arch)
    sources_old, mapping_old, buffers_old, rules = _map(old_sd, arch)
    assert mapping_old == mapping_new
    assert list(buffers_old) == list(buffers_new)
    assert {k: (s.shape, s.expert) for k, s in sources_old.items()} == \
        {k: (s.shape, s.expert) for k, s in sources_new.items()}
    assert rules["wrapper segments _orig_mod"] == len(old_sd) - len(buffers_old)
    assert rules["output.weight (0.2)"] == 1
    assert rules["attention.w{q,k,v} (0.2)"] == 3 * arch.n_layers
    assert torch.equal(_hf_state_dict(old_sd, sources_old, mapping_old)["model.layers.1.mlp.experts.11.up_proj.weight"],
                       titan_sd["layers.1.moe.routed_experts.inner_experts.w3_EFD"][11])


@pytest.mark.parametrize("unknown", ["layers.0.attention.rotary_emb.freqs", "vision_tower.proj.weight",
                                     "layers.0.feed_forward.w4.weight"])
def test_unknown_key_refused_by_name(dense, unknown):
    arch, titan_sd = dense
    shapes = {k: tuple(v.shape) for k, v in titan_sd.items()}
    shapes[unknown] = (4, 4)
    sources, _ = keymap.canonicalize_keys(shapes)
    with pytest.raises(MappingError) as info:
        keymap.map_to_hf(sources, arch.titan_model_config())
    assert unknown in str(info.value)
    assert "1 checkpoint tensor(s)" in str(info.value)
    assert info.value.hint and "nothing was written" in info.value.hint
    assert isinstance(info.value, KeyError)


def test_every_unknown_key_is_named(dense):
    arch, titan_sd = dense
    shapes = {k: tuple(v.shape) for k, v in titan_sd.items()}
    unknown = [f"extra.block{i}.weight" for i in range(3)]
    shapes.update({k: (2,) for k in unknown})
    sources, _ = keymap.canonicalize_keys(shapes)
    with pytest.raises(MappingError) as info:
        keymap.map_to_hf(sources, arch.titan_model_config())
    message = str(info.value)
    assert "3 checkpoint tensor(s)" in message and all(k in message for k in unknown)


def test_two_keys_landing_on_one_canonical_key_are_refused():
    shapes = {"layers.0.attention.wq.weight": (128, 64), "layers.0.attention.qkv_linear.wq.weight": (128, 64)}
    with pytest.raises(MappingError) as info:
        keymap.canonicalize_keys(shapes)
    message = str(info.value)
    assert "layers.0.attention.wq.weight" in message and "layers.0.attention.qkv_linear.wq.weight" in message


@pytest.mark.skipif(titan.installed().release < (0, 3, 0), reason="torchtitan 0.2.1 has no fused wqkv")
def test_fused_wqkv_splits_like_torchtitan():
    """The model's fused parameter, split by us, equals what torchtitan's own save-time split writes."""
    arch = tiny_arch(vocab_size=320, tie=False)
    model = build_model(arch, seed=5, fused_qkv=True)
    params = dict(model.named_parameters())
    titan_sd = model.state_dict()
    heads = dict(n_heads=arch.n_heads, n_kv_heads=arch.n_kv_heads, head_dim=arch.head_dim)
    fused_key = "layers.1.attention.qkv_linear.wqkv.weight"
    wqkv = params[fused_key].detach()
    for part in ("wq", "wk", "wv"):
        split = keymap.split_fused_qkv(wqkv, part, **heads)
        assert split.is_contiguous()
        assert torch.equal(split, titan_sd[f"layers.1.attention.qkv_linear.{part}.weight"]), part

    sources, rules = keymap.canonicalize_keys({fused_key: tuple(wqkv.shape)}, **heads)
    assert {k: (s.part, s.shape, s.checkpoint_key) for k, s in sources.items()} == {
        "layers.1.attention.qkv_linear.wq.weight": ("wq", (arch.n_heads * arch.head_dim, arch.dim), fused_key),
        "layers.1.attention.qkv_linear.wk.weight": ("wk", (arch.n_kv_heads * arch.head_dim, arch.dim), fused_key),
        "layers.1.attention.qkv_linear.wv.weight": ("wv", (arch.n_kv_heads * arch.head_dim, arch.dim), fused_key),
    }
    assert rules == {"fused wqkv split": 1}
    with pytest.raises(ValueError):
        keymap.split_fused_qkv(wqkv, "wo", **heads)


def test_fused_wqkv_needs_head_counts_that_fit():
    shape = {"layers.0.attention.qkv_linear.wqkv.weight": (256, 64)}
    with pytest.raises(MappingError, match="needs n_heads"):
        keymap.canonicalize_keys(shape)
    with pytest.raises(MappingError, match="256 rows, expected 320") as info:
        keymap.canonicalize_keys(shape, n_heads=6, n_kv_heads=2, head_dim=32)
    assert "layers.0.attention.qkv_linear.wqkv.weight" in str(info.value)


def test_training_buffers_set_aside_old_and_new_names():
    shapes = {"layers.1.moe.expert_bias_E": (12,), "_orig_mod.layers.2.moe.expert_bias": (12,),
              "layers.3.moe.tokens_per_expert": (12,), "layers.1.moe.router.gate.weight": (12, 64)}
    kept, buffers = keymap.split_training_buffers(shapes)
    assert kept == {"layers.1.moe.router.gate.weight": (12, 64)}
    assert buffers == {"layers.1.moe.expert_bias_E": "layers.1.moe.expert_bias_E",
                       "layers.2.moe.expert_bias_E": "_orig_mod.layers.2.moe.expert_bias",
                       "layers.3.moe.tokens_per_expert": "layers.3.moe.tokens_per_expert"}


def test_expected_hf_keys_counts():
    dense_keys = keymap.expected_hf_keys(3, with_head=False)
    assert len(dense_keys) == 2 + 3 * 11 and "lm_head.weight" not in dense_keys
    moe_keys = keymap.expected_hf_keys(2, with_head=True, moe_layers=(1,), num_experts=12)
    assert len(moe_keys) == 3 + 2 * 8 + 3 + 1 + 12 * 3
    assert "model.layers.1.mlp.gate_proj.weight" not in moe_keys
    assert "model.layers.1.mlp.experts.11.down_proj.weight" in moe_keys
    assert "model.layers.1.mlp.experts.12.down_proj.weight" not in moe_keys
