"""The HF Qwen3.5 text config (`qwen3_5_text` / `qwen3_5_moe_text`) of a torchtitan 0.3 `Qwen35Model.Config`:
each HF field read off the run's own modules, and a refusal naming every setting HF's model cannot express."""

from __future__ import annotations

from typing import Any

from molgen_export.errors import ConfigError


def _layer_kind(layer) -> str:
    return "full_attention" if layer.attention is not None else "linear_attention"


def _one(values: dict[str, Any], what: str, problems: list[str]) -> Any:
    """The single value `values` (path -> value) agree on; a problem naming the paths when they differ."""
    counts: dict[str, int] = {}
    for value in values.values():
        counts[repr(value)] = counts.get(repr(value), 0) + 1
    if len(counts) > 1:
        common = max(counts, key=counts.get)
        odd = [f"{path} = {value!r}" for path, value in values.items() if repr(value) != common]
        problems.append(f"{what} differs ({', '.join(odd[:4])}{', ...' if len(odd) > 4 else ''}; elsewhere "
                        f"{common}): HF has one value for the whole model")
    return next(iter(values.values()), None)


def hf_text_config(titan_config, *, tie_word_embeddings: bool = False) -> dict[str, Any]:
    """The `config.json` fields of the HF text model that computes what `titan_config` computes.

    Raises:
        ConfigError: every setting of the run HF Qwen3.5 cannot express (biases, other routers, a rope scaling,
            different norm eps, MoE and dense layers mixed, ...), all named in one message.
    """
    problems: list[str] = []
    layers = list(titan_config.layers)
    attention = {f"layers.{i}.attention": layer.attention for i, layer in enumerate(layers) if layer.attention}
    delta = {f"layers.{i}.delta_net": layer.delta_net for i, layer in enumerate(layers) if layer.delta_net}
    moe = {f"layers.{i}.moe": layer.moe for i, layer in enumerate(layers) if layer.moe is not None}
    eps = {"norm.eps": titan_config.norm.eps}
    for i, layer in enumerate(layers):
        eps[f"layers.{i}.attention_norm.eps"] = layer.attention_norm.eps
        eps[f"layers.{i}.ffn_norm.eps"] = layer.ffn_norm.eps
    for path, a in attention.items():
        eps[f"{path}.q_norm.eps"], eps[f"{path}.k_norm.eps"] = a.q_norm.eps, a.k_norm.eps
        for name in ("wq", "wk", "wv", "wo"):
            if getattr(a, name).bias:
                problems.append(f"{path}.{name}.bias = True (HF Qwen3.5 attention has no biases)")
        if a.wq.out_features != 2 * a.n_heads * a.head_dim:
            problems.append(f"{path}.wq.out_features = {a.wq.out_features}, not 2 * n_heads * head_dim "
                            "(HF Qwen3.5 always gates its attention output)")
        if a.rope.scaling != "none":
            problems.append(f"{path}.rope.scaling = {a.rope.scaling!r} (the export writes plain RoPE)")
    for path, d in delta.items():
        eps[f"{path}.norm.eps"] = d.norm.eps
        for name in ("in_proj_q", "in_proj_k", "in_proj_v", "in_proj_z", "in_proj_a", "in_proj_b", "out_proj",
                     "conv_q", "conv_k", "conv_v"):
            if getattr(d, name).bias:
                problems.append(f"{path}.{name}.bias = True (HF Qwen3.5's Gated DeltaNet has no biases)")
    if titan_config.lm_head.bias:
        problems.append("lm_head.bias = True (HF's lm_head has no bias)")
    rms_norm_eps = _one(eps, "the RMSNorm eps", problems)

    config: dict[str, Any] = {
        "vocab_size": titan_config.vocab_size,
        "hidden_size": titan_config.dim,
        "num_hidden_layers": len(layers),
        "layer_types": [_layer_kind(layer) for layer in layers],
        "rms_norm_eps": rms_norm_eps,
        "hidden_act": "silu",
        "attention_bias": False,
        "tie_word_embeddings": tie_word_embeddings,
    }
    if attention:
        def field(name):
            return _one({f"{p}.{name}": getattr(a, name) for p, a in attention.items()}, name, problems)

        head_dim = field("head_dim")
        rotary_dim = field("rotary_dim")
        rope = {f"{p}.rope": (a.rope.theta, a.rope.max_seq_len, tuple(a.rope.mrope_section))
                for p, a in attention.items()}
        theta, max_seq_len, mrope_section = _one(rope, "rope (theta, max_seq_len, mrope_section)", problems)
        config.update(num_attention_heads=field("n_heads"), num_key_value_heads=field("n_kv_heads"),
                      head_dim=head_dim, max_position_embeddings=max_seq_len,
                      rope_parameters={"rope_type": "default", "rope_theta": theta,
                                       "partial_rotary_factor": rotary_dim / head_dim,
                                       "mrope_section": list(mrope_section), "mrope_interleaved": True})
    if delta:
        def dn(what, get):
            return _one({p: get(d) for p, d in delta.items()}, what, problems)

        key_dim = dn("key_head_dim", lambda d: d.key_head_dim)
        value_dim = dn("value_head_dim", lambda d: d.value_head_dim)
        config.update(linear_key_head_dim=key_dim, linear_value_head_dim=value_dim,
                      linear_num_key_heads=dn("n_key_heads", lambda d: d.in_proj_q.out_features // d.key_head_dim),
                      linear_num_value_heads=dn("n_value_heads",
                                                lambda d: d.in_proj_v.out_features // d.value_head_dim),
                      linear_conv_kernel_dim=dn("conv_kernel_size", lambda d: d.conv_kernel_size))
    if moe:
        if len(moe) != len(layers):
            problems.append(f"{len(moe)} of {len(layers)} layers are MoE: HF Qwen3.5-MoE has an MoE block in every "
                            "layer")
        for path, m in moe.items():
            router = m.router
            if router.score_func != "softmax" or not router.route_norm or router.route_scale != 1.0:
                problems.append(f"{path}.router: score_func={router.score_func!r}, route_norm={router.route_norm}, "
                                f"route_scale={router.route_scale} (HF routes softmax, renormalized top-k, unscaled)")
            if router.num_expert_groups is not None or router._debug_force_load_balance:
                problems.append(f"{path}.router: expert groups or forced balance (HF has neither)")
            if router.gate.bias:
                problems.append(f"{path}.router.gate.bias = True (HF's router has no bias)")
            if m.shared_experts is None or getattr(m.shared_experts, "gate", None) is None:
                problems.append(f"{path}.shared_experts: HF Qwen3.5-MoE always has a sigmoid-gated shared expert")

        def me(what, get):
            return _one({p: get(m) for p, m in moe.items()}, what, problems)

        config.update(num_experts=me("num_experts", lambda m: m.num_experts),
                      num_experts_per_tok=me("top_k", lambda m: m.router.top_k),
                      moe_intermediate_size=me("moe hidden_dim", lambda m: m.routed_experts.inner_experts.hidden_dim),
                      shared_expert_intermediate_size=me("shared hidden_dim",
                                                         lambda m: m.shared_experts.w1.out_features
                                                         if m.shared_experts is not None else None))
        config.update(model_type="qwen3_5_moe_text", architectures=["Qwen3_5MoeForCausalLM"])
    else:
        ffn = {f"layers.{i}.feed_forward": layer.feed_forward for i, layer in enumerate(layers)}
        config["intermediate_size"] = _one({p: f.w1.out_features for p, f in ffn.items()}, "intermediate_size",
                                           problems)
        config.update(model_type="qwen3_5_text", architectures=["Qwen3_5ForCausalLM"])
    if problems:
        raise ConfigError("the torchtitan qwen3_5 model sets what HF Qwen3.5 cannot express: "
                          + "; ".join(problems[:10]) + " (paths under the run's model_spec.model)",
                          hint="such a run cannot be exported as HF Qwen3.5 without changing what it computes")
    return config


TOKEN_ID_FIELDS = ("bos_token_id", "eos_token_id", "pad_token_id")
"""Taken from the base assets' config (the tokenizer's ids); the run's config does not know them."""


def with_base_config(hf_fields: dict[str, Any], base: dict[str, Any] | None) -> tuple[dict[str, Any], list[str]]:
    """The export's `config.json`: the run's fields, the token ids of the base assets' config (a multimodal
    Qwen3.5 `config.json` keeps them, and the text fields, under `text_config`), and a warning for every model
    field where the base says otherwise than the run (the run's is written: it is what was trained).

    Returns:
        The config, and the warnings.
    """
    if not base:
        return dict(hf_fields), []
    text = base.get("text_config") if isinstance(base.get("text_config"), dict) else base
    config = dict(hf_fields)
    for name in TOKEN_ID_FIELDS:
        value = text.get(name, base.get(name))
        if value is not None:
            config[name] = value
    differ = [f"{name}: base {text[name]!r}, run {hf_fields[name]!r}" for name in sorted(hf_fields)
              if name not in ("architectures", "model_type", "tie_word_embeddings") and name in text
              and text[name] != hf_fields[name]]
    if differ:
        return config, [f"the base assets' config.json describes another model than the run trained ("
                        + "; ".join(differ[:6]) + (" ..." if len(differ) > 6 else "") + "): the run's values are "
                        "written"]
    return config, []
