"""The verifier's reference under torchtitan 0.2.1: the run's `Qwen3ModelArgs` (its flavor in the installed
registry, with what 0.2.1's `update_from_config` sets from the job config), every field decided by the rules
below as the 0.3 reference decides `model_spec.model` (mapped to the HF config, irrelevant, or refused by name).
"""

from __future__ import annotations

import dataclasses

from molgen_export.errors import ConfigError
from molgen_export.verify.field_rules import FieldDecision, Rule


def _rules() -> tuple[Rule, ...]:
    m, i, r = "mapped", "irrelevant", "required"
    return (
        Rule("dim", m, "hidden_size"), Rule("n_layers", m, "num_hidden_layers"),
        Rule("n_heads", m, "num_attention_heads"), Rule("n_kv_heads", m, "num_key_value_heads"),
        Rule("vocab_size", m, "vocab_size"), Rule("head_dim", m, "head_dim"),
        Rule("hidden_dim", m, "intermediate_size"), Rule("norm_eps", m, "rms_norm_eps"),
        Rule("rope_theta", m, "rope_theta"), Rule("max_seq_len", m, "max_position_embeddings"),
        Rule("qk_norm", r, "HF Qwen3 always applies q_norm/k_norm", True),
        Rule("_enforced", i, "torchtitan's BaseModelArgs marker, not a model setting"),
        Rule("depth_init", i, "initialization only"),
        Rule("attn_type", i, "the attention kernel; the reference runs causal SDPA, the same for one sequence"),
        Rule("attn_mask_type", i, "document masks of packed training batches; one document is plain causal"),
        Rule("eos_id", i, "used for document masks only"),
        Rule("enable_weight_tying", m, "tie_word_embeddings (after the tie check on the data)"),
        Rule("moe_enabled", m, "Qwen3MoeForCausalLM (every layer MoE)"),
        Rule("moe_inter_dim", m, "moe_intermediate_size"),
        Rule("moe_args.num_experts", m, "num_experts"), Rule("moe_args.top_k", m, "num_experts_per_tok"),
        Rule("moe_args.route_norm", m, "norm_topk_prob"),
        Rule("moe_args.num_shared_experts", r, "HF Qwen3-MoE has no shared experts", 0),
        Rule("moe_args.score_func", r, "HF Qwen3-MoE routes with a softmax", "softmax"),
        Rule("moe_args.route_scale", r, "HF Qwen3-MoE does not scale the routing weights", 1.0),
        Rule("moe_args.score_before_experts", r, "HF Qwen3-MoE weighs the experts' outputs, not their inputs", False),
        Rule("moe_args.num_expert_groups", r, "HF Qwen3-MoE has no expert groups", None),
        Rule("moe_args.num_limited_groups", r, "HF Qwen3-MoE has no expert groups", None),
        Rule("moe_args.use_grouped_mm", i, "the experts' kernel (the reference computes them in float32)"),
        Rule("moe_args.load_balance_coeff", i,
             "training-time load balancing (its expert bias is checked on the data: check_expert_bias)"),
        Rule("moe_args._debug_force_load_balance", r, "debug routing HF cannot reproduce", False),
    )


RULES = _rules()


def decide_args(args) -> list[FieldDecision]:
    """Every field of a `Qwen3ModelArgs` with the rule that covers it (MoE fields count only when MoE is on)."""
    leaves = []
    for name, value in dataclasses.asdict(args).items():
        if isinstance(value, dict):
            leaves += [(f"{name}.{key}", item) for key, item in value.items()]
        else:
            leaves.append((name, value))
    decisions = []
    for path, value in leaves:
        rule = next((rule for rule in RULES if rule.matches(path)), None)
        if not args.moe_enabled and (path.startswith("moe_args.") or path == "moe_inter_dim"):
            rule = Rule(path, "irrelevant", "MoE is off")
        decisions.append(FieldDecision(path, value, rule))
    return decisions


def reference_args(run, api, source: str, *, seq_len: int | None):
    """The run's `Qwen3ModelArgs` for the verifier, or None when the installed registry has no such flavor.

    Returns:
        (args with causal SDPA and float32 experts, the field decisions), or None.

    Raises:
        ConfigError: a field HF Qwen3 cannot express (all of them named), or a 0.3 run config.
    """
    if getattr(run, "titan_model", None):
        raise ConfigError(f"the run config {source} was written by TorchTitan 0.3 (model_spec.model); the installed "
                          f"torchtitan {api.version} cannot build that model as the verifier's reference",
                          hint='export this run where torchtitan 0.3 is installed: pip install "torchtitan>=0.3,<0.4"')
    args = api.flavor_config(run.model_name, run.flavor, custom_import=run.custom_import, launch_dir=run.launch_dir)
    if args is None:
        return None
    if seq_len:  # what 0.2.1's Qwen3ModelArgs.update_from_config takes from the job config
        args.max_seq_len = seq_len
    decisions = decide_args(args)
    refused = [d for d in decisions if d.refused]
    if refused:
        lines = [f"{d.path} = {d.value!r} (" + (f"{d.rule.target}; only {d.rule.value!r} can be exported)" if d.rule
                 else "a field molgen_export does not know: it cannot tell whether HF Qwen3 can express it)")
                 for d in refused]
        raise ConfigError(f"torchtitan flavor {run.flavor!r} ({source}) sets what the HF Qwen3 model cannot express: "
                          + "; ".join(lines),
                          hint="such a run cannot be exported as HF Qwen3 without changing the model it computes")
    reference = dataclasses.replace(args, attn_type="sdpa", moe_args=dataclasses.replace(args.moe_args,
                                                                                          use_grouped_mm=False))
    return reference, decisions
