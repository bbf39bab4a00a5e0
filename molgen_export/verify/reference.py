"""The verifier's TorchTitan model config, taken from the run's own model config, and the rules that say, field by
field, how each setting of that config reaches the HF model (mapped), why it does not matter to the forward
(irrelevant), or why the export must refuse it (HF's Qwen3 / Qwen3-MoE cannot express it).

Independence: the reference is the run's `model_spec.model` (TorchTitan 0.3 `to_dict()`) laid onto a torchtitan
config of the same structure, then rendered back with `to_dict()` and diffed against the run's dict field by
field. A field the reference did not take (a new TorchTitan field, a value we failed to carry) is an error, so
nothing the run set is silently dropped on both sides of the logit gate.
"""

from __future__ import annotations

import copy
import dataclasses
import functools
import json
import re
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from molgen_export.errors import ConfigError
from molgen_export.verify.field_rules import FieldDecision, Rule, same_value

_SKIPPED_SUBTREES = ("param_init", "sharding_config")
"""Initialization functions and parallel sharding: never part of the forward of a loaded model."""

_ATTENTION_BACKEND = "inner_attention"
"""The attention kernel (flex / varlen); the reference runs causal SDPA, which computes the same for one causal
sequence; its forward-relevant fields (a sliding window) are checked by the rules below."""


_LINEAR_DIMS = ("in_features", "out_features")


def _rules() -> tuple[Rule, ...]:
    m, i, r = "mapped", "irrelevant", "required"
    rules = [
        Rule("dim", m, "hidden_size"), Rule("vocab_size", m, "vocab_size"),
        Rule("enable_weight_tying", m, "tie_word_embeddings (after the tie check on the data)"),
        Rule("tok_embeddings.num_embeddings", m, "vocab_size"), Rule("tok_embeddings.embedding_dim", m, "hidden_size"),
        Rule("lm_head.bias", r, "HF Qwen3's lm_head has no bias", False),
        Rule("norm.normalized_shape", m, "hidden_size"), Rule("norm.eps", m, "rms_norm_eps"),
        Rule("norm.elementwise_affine", r, "HF Qwen3RMSNorm always has a weight", True),
        Rule("layers.*.attention.n_heads", m, "num_attention_heads"),
        Rule("layers.*.attention.dim", m, "hidden_size"),
        Rule("layers.*.attention.n_kv_heads", m, "num_key_value_heads"),
        Rule("layers.*.attention.head_dim", m, "head_dim"),
        Rule("layers.*.attention.qkv_linear.head_dim", m, "head_dim"),
        Rule("layers.*.attention.qkv_linear.n_heads", m, "num_attention_heads"),
        Rule("layers.*.attention.qkv_linear.n_kv_heads", m, "num_key_value_heads"),
        Rule("layers.*.attention.qk_norm", "present", "HF Qwen3 always applies q_norm/k_norm"),
        Rule("layers.*.attention.qk_norm.normalized_shape", m, "head_dim"),
        Rule("layers.*.attention.qk_norm.eps", m, "rms_norm_eps (one eps for every norm in HF Qwen3)"),
        Rule("layers.*.attention.qk_norm.elementwise_affine", r, "HF Qwen3 q_norm/k_norm always have a weight", True),
        Rule("layers.*.attention.rope.dim", m, "head_dim (HF Qwen3 rotates the whole head)"),
        Rule("layers.*.attention.rope.max_seq_len", m, "max_position_embeddings"),
        Rule("layers.*.attention.rope.theta", m, "rope_theta"),
        Rule("layers.*.attention.rope.scaling", m, "rope_scaling.rope_type (none -> default, yarn -> yarn)"),
        Rule("layers.*.attention.rope.rope_factor", m, "rope_scaling.factor (yarn)"),
        Rule("layers.*.attention.rope.beta_fast", m, "rope_scaling.beta_fast (yarn)"),
        Rule("layers.*.attention.rope.beta_slow", m, "rope_scaling.beta_slow (yarn)"),
        Rule("layers.*.attention.rope.original_seq_len", m, "rope_scaling.original_max_position_embeddings (yarn)"),
        Rule("layers.*.attention.rope.truncate", m, "rope_scaling.truncate (yarn)"),
        Rule("layers.*.attention.rope.scaling_factor", i, "llama scaling only, which Qwen3's cos/sin RoPE refuses"),
        Rule("layers.*.attention.rope.low_freq_factor", i, "llama scaling only, which Qwen3's cos/sin RoPE refuses"),
        Rule("layers.*.attention.rope.high_freq_factor", i, "llama scaling only, which Qwen3's cos/sin RoPE refuses"),
        Rule("layers.*.attention.rope.original_max_position_embeddings", i,
             "llama scaling only, which Qwen3's cos/sin RoPE refuses"),
        Rule("layers.*.attention.inner_attention.block_size", i, "flex kernel tiling"),
        Rule("layers.*.attention.inner_attention.kernel_options", i, "flex kernel options"),
        Rule("layers.*.attention.inner_attention.window_size", r,
             "HF Qwen3 exports here use full causal attention (no sliding window)", [-1, 0]),
        Rule("layers.*.attention_norm.normalized_shape", m, "hidden_size"),
        Rule("layers.*.attention_norm.eps", m, "rms_norm_eps"),
        Rule("layers.*.attention_norm.elementwise_affine", r, "HF Qwen3RMSNorm always has a weight", True),
        Rule("layers.*.ffn_norm.normalized_shape", m, "hidden_size"),
        Rule("layers.*.ffn_norm.eps", m, "rms_norm_eps"),
        Rule("layers.*.ffn_norm.elementwise_affine", r, "HF Qwen3RMSNorm always has a weight", True),
        Rule("layers.*.feed_forward", m, "intermediate_size (None on MoE layers: mlp_only_layers)"),
        Rule("layers.*.moe", m, "mlp_only_layers (None on dense layers)"),
        Rule("layers.*.moe.num_experts", m, "num_experts"),
        Rule("layers.*.moe.routed_experts.inner_experts.dim", m, "hidden_size"),
        Rule("layers.*.moe.routed_experts.inner_experts.hidden_dim", m, "moe_intermediate_size"),
        Rule("layers.*.moe.routed_experts.inner_experts.num_experts", m, "num_experts"),
        Rule("layers.*.moe.routed_experts.token_dispatcher.num_experts", m, "num_experts"),
        Rule("layers.*.moe.routed_experts.token_dispatcher.top_k", m, "num_experts_per_tok"),
        Rule("layers.*.moe.router.num_experts", m, "num_experts"),
        Rule("layers.*.moe.router.top_k", m, "num_experts_per_tok"),
        Rule("layers.*.moe.router.route_norm", m, "norm_topk_prob"),
        Rule("layers.*.moe.router.score_func", r, "HF Qwen3-MoE routes with a softmax", "softmax"),
        Rule("layers.*.moe.router.route_scale", r, "HF Qwen3-MoE does not scale the routing weights", 1.0),
        Rule("layers.*.moe.router.num_expert_groups", r, "HF Qwen3-MoE has no expert groups", None),
        Rule("layers.*.moe.router.num_limited_groups", r, "HF Qwen3-MoE has no expert groups", None),
        Rule("layers.*.moe.router._debug_force_load_balance", r, "debug routing HF cannot reproduce", False),
        Rule("layers.*.moe.router.gate.bias", r, "HF Qwen3-MoE's router has no bias", False),
        Rule("layers.*.moe.shared_experts", r, "HF Qwen3-MoE has no shared experts", None),
        Rule("layers.*.moe.load_balance_coeff", i,
             "training-time load balancing (its expert bias is checked on the data: check_expert_bias)"),
    ]
    for linear in ("layers.*.attention.qkv_linear.wqkv", "layers.*.attention.qkv_linear.wq",
                   "layers.*.attention.qkv_linear.wk", "layers.*.attention.qkv_linear.wv",
                   "layers.*.attention.qkv_linear.wkv", "layers.*.attention.wo", "layers.*.feed_forward.w1",
                   "layers.*.feed_forward.w2", "layers.*.feed_forward.w3", "lm_head", "layers.*.moe.router.gate"):
        rules += [Rule(f"{linear}.{name}", m, "checked against the checkpoint's shapes") for name in _LINEAR_DIMS]
        if not linear.endswith(("lm_head", "router.gate")):
            rules.append(Rule(f"{linear}.bias", r, "HF Qwen3 projections have no bias", False))
    return tuple(rules)


RULES = _rules()


_same = same_value


_WHOLE_VALUES = {"layers.*.attention.inner_attention.kernel_options"}
"""Dict-valued fields decided as one value (other dicts are sub-configs: their fields are decided one by one;
a rule naming a sub-config, like `layers.*.moe`, decides it only where it is None)."""


@functools.lru_cache(maxsize=4096)
def _rule_for(general: str) -> Rule | None:
    """The first rule matching a general path; cached, since every layer repeats the same few dozen paths
    (uncached, a 94-layer MoE config cost ~5000 leaves x ~40 regex matches)."""
    return next((rule for rule in RULES if rule.matches(general)), None)


def _leaves(data, path: str = ""):
    """Leaf paths of a to_dict() tree: scalars, None sub-configs and whatever a rule names whole;
    `param_init`/`sharding_config` skipped."""
    if path and isinstance(data, dict) and _general(path) in _WHOLE_VALUES:
        yield path, data
    elif isinstance(data, dict):
        for key, value in data.items():
            if key in _SKIPPED_SUBTREES:
                continue
            yield from _leaves(value, f"{path}.{key}" if path else key)
    elif isinstance(data, list) and path.rsplit(".", 1)[-1] == "layers":
        for index, value in enumerate(data):
            yield from _leaves(value, f"{path}.{index}")
    else:
        yield path, data


def _general(path: str) -> str:
    return re.sub(r"^layers\.\d+\.", "layers.*.", path)


def decide_fields(model: dict) -> list[FieldDecision]:
    """Every leaf of the run's `model_spec.model` with the rule that covers it (None: no rule knows it)."""
    decisions = []
    for path, value in _leaves(model):
        general = _general(path)
        decisions.append(FieldDecision(path, value, _rule_for(general)))
    return decisions


def _rope_scaling(model: dict) -> dict | None:
    """The HF `rope_scaling` for the run's RoPE (None: plain RoPE), the same for every layer or refused."""
    ropes = [json.dumps(((layer or {}).get("attention") or {}).get("rope"), sort_keys=True)
             for layer in model.get("layers") or []]
    if len(set(ropes)) > 1:
        raise ConfigError("the run's layers use different RoPE settings (model_spec.model.layers.*.attention.rope); "
                          "HF Qwen3 has one rope config for all layers",
                          hint="export a run whose layers share one RoPE config")
    rope = json.loads(ropes[0]) if ropes else None
    if not rope or rope.get("scaling", "none") == "none":
        return None
    if rope["scaling"] == "yarn":
        if float(rope.get("rope_factor", 1.0)) <= 1.0:
            return None  # TorchTitan applies YaRN only for a factor above 1
        # TorchTitan keeps YaRN a pure rotation and Qwen3 folds no mscale into attention: attention_factor 1
        return {"rope_type": "yarn", "factor": float(rope["rope_factor"]),
                "original_max_position_embeddings": int(rope["original_seq_len"]),
                "beta_fast": float(rope["beta_fast"]), "beta_slow": float(rope["beta_slow"]),
                "truncate": bool(rope.get("truncate", True)), "attention_factor": 1.0}
    raise ConfigError(f"the run's RoPE scaling is {rope['scaling']!r} (model_spec.model.layers.*.attention.rope."
                      "scaling); TorchTitan's Qwen3 cos/sin RoPE supports only 'none' and 'yarn'",
                      hint="check the run config; only none and yarn RoPE scaling can be exported")


@dataclass
class Reference:
    """The verifier's TorchTitan model config and where it came from."""

    config: Any
    """A torchtitan `Qwen3Model.Config` (attention backend replaced by causal SDPA); None until built
    (`dict_reference`)."""
    source: str
    """Human-readable: which config the reference was built from."""
    fused_qkv: bool
    """Whether the checkpoint itself stores a fused `wqkv` (an older layout): the reference then takes it whole."""
    rope_scaling: dict | None = None
    """The HF `rope_scaling` the run's RoPE needs (None: plain RoPE)."""
    decisions: list[FieldDecision] = field(default_factory=list)

    def summary(self) -> dict:
        counts: dict[str, int] = {}
        for decision in self.decisions:
            counts[decision.rule.action] = counts.get(decision.rule.action, 0) + 1
        return {"source": self.source, "fused_qkv": self.fused_qkv, "rope_scaling": self.rope_scaling,
                "fields": counts}

    def with_tie(self, tie: bool):
        return dataclasses.replace(self.config, enable_weight_tying=tie)


def _render(config) -> dict:
    """A torchtitan config rendered as TorchTitan writes it (`to_dict()` through JSON, functions as repr)."""
    return json.loads(json.dumps(config.to_dict(), default=repr))


def _overlay(target, data: dict, path: str, problems: list[str]) -> None:
    """Set every field `data` names onto the torchtitan config `target`, recursively (in place)."""
    names = {f.name for f in dataclasses.fields(target)}
    for key, value in data.items():
        where = f"{path}.{key}" if path else key
        if key in _SKIPPED_SUBTREES or key == _ATTENTION_BACKEND:
            continue
        if key not in names:
            problems.append(f"{where}: the installed torchtitan's config has no such field")
            continue
        current = getattr(target, key)
        if dataclasses.is_dataclass(current) and isinstance(value, dict):
            _overlay(current, value, where, problems)
        elif isinstance(current, list) and isinstance(value, list):
            if len(current) != len(value):
                problems.append(f"{where}: {len(value)} entries, the checkpoint's shapes give {len(current)}")
                continue
            for index, (item, item_data) in enumerate(zip(current, value)):
                if dataclasses.is_dataclass(item) and isinstance(item_data, dict):
                    _overlay(item, item_data, f"{where}.{index}", problems)
                elif item != item_data:
                    current[index] = item_data
        elif value is None or not dataclasses.is_dataclass(current) and not isinstance(value, dict):
            setattr(target, key, tuple(value) if isinstance(current, tuple) and isinstance(value, list) else value)
        else:
            problems.append(f"{where}: cannot take {type(value).__name__} onto {type(current).__name__}")


def _diff(run: Any, ours: Any, path: str, out: list[str]) -> None:
    if isinstance(run, dict) and isinstance(ours, dict):
        for key in sorted(set(run) | set(ours)):
            if key in _SKIPPED_SUBTREES or key == _ATTENTION_BACKEND:
                continue
            where = f"{path}.{key}" if path else key
            if key not in ours:
                out.append(f"{where}: the run sets {run[key]!r}, the reference has no such field")
            elif key not in run:
                out.append(f"{where}: the reference has {ours[key]!r}, the run config does not say")
            else:
                _diff(run[key], ours[key], where, out)
    elif isinstance(run, list) and isinstance(ours, list) and len(run) == len(ours):
        for index, (a, b) in enumerate(zip(run, ours)):
            _diff(a, b, f"{path}.{index}", out)
    elif not _same(run, ours):
        out.append(f"{path}: run {run!r}, reference {ours!r}")


def _with_sdpa(config) -> None:
    from torchtitan.models.common.attention import ScaledDotProductAttention

    for layer in config.layers:
        layer.attention.inner_attention = ScaledDotProductAttention.Config()


def refuse_unexpressible(model: dict, source: str) -> list[FieldDecision]:
    """Decide every field; raise naming each one HF cannot express (or that no rule knows).

    Raises:
        ConfigError: at least one refused field, all of them listed.
    """
    decisions = decide_fields(model)
    refused = [d for d in decisions if d.refused]
    if refused:
        seen: dict[str, FieldDecision] = {}
        for decision in refused:
            seen.setdefault(_general(decision.path), decision)
        lines = []
        for general, decision in list(seen.items())[:12]:
            if decision.rule is None:
                lines.append(f"model_spec.model.{general} = {decision.value!r} (a field molgen_export does not know: "
                             "it cannot tell whether HF Qwen3 can express it)")
            else:
                lines.append(f"model_spec.model.{general} = {decision.value!r} ({decision.rule.target}; "
                             f"only {decision.rule.value!r} can be exported)")
        raise ConfigError(f"the run config {source} sets what the HF Qwen3 model cannot express: " + "; ".join(lines),
                          hint="such a run cannot be exported as HF Qwen3 without changing the model it computes")
    eps = {d.path: d.value for d in decisions if d.path.endswith(".eps")}
    if len({float(v) for v in eps.values()}) > 1:
        shown = ", ".join(f"model_spec.model.{k} = {v!r}" for k, v in list(eps.items())[:4])
        raise ConfigError(f"the run config {source} uses different RMSNorm eps values ({shown}, ...); HF Qwen3 has one "
                          "rms_norm_eps for every norm", hint="such a run cannot be exported as HF Qwen3")
    for layer_index, layer in enumerate(model.get("layers") or []):
        attention = (layer or {}).get("attention") or {}
        rope_dim, head_dim = (attention.get("rope") or {}).get("dim"), attention.get("head_dim")
        if rope_dim is not None and head_dim is not None and rope_dim != head_dim:
            raise ConfigError(f"the run config {source} rotates {rope_dim} of {head_dim} head dims "
                              f"(model_spec.model.layers.{layer_index}.attention.rope.dim); HF Qwen3 rotates the "
                              "whole head", hint="such a run cannot be exported as HF Qwen3")
    _rope_scaling(model)
    return decisions


def reference_from_run_model(model: dict, skeleton, source: str, *, checkpoint_fused_qkv: bool) -> Reference:
    """The reference config: the run's `model_spec.model` laid onto `skeleton(fused_qkv)` (a torchtitan config
    of the same structure), checked field by field against the run's dict.

    Raises:
        ConfigError: a refused setting, or a field the reference could not take.
    """
    decisions = refuse_unexpressible(model, source)
    config = copy.deepcopy(skeleton(_fuses_qkv(model)))
    problems: list[str] = []
    _overlay(config, model, "", problems)
    if not problems:
        _diff(json.loads(json.dumps(model, default=repr)), _render(config), "", problems)
    if problems:
        raise ConfigError(f"the verifier's TorchTitan model cannot be built from the run config {source}: "
                          + "; ".join(f"model_spec.model.{p}" for p in problems[:8]),
                          hint="the run's model config does not fit this checkpoint or this torchtitan version")
    _with_sdpa(config)
    return Reference(config, source, checkpoint_fused_qkv, _rope_scaling(model), decisions)


def _fuses_qkv(model: dict) -> bool:
    """Whether the run's model fuses its QKV projection (TorchTitan's `wqkv`; its state dict still says
    wq/wk/wv, so the checkpoint does too)."""
    return any("wqkv" in (((layer or {}).get("attention") or {}).get("qkv_linear") or {})
               for layer in model.get("layers") or [])


def _model_config_file(run) -> Path:
    """The file the run's model config was read from (the runner's config.json points at the job config)."""
    return run.job_config_path if run.kind == "runner" and run.job_config_path else run.source


def skeleton_config(arch, *, fused_qkv: bool):
    """A torchtitan config with the structure of `arch` (which layers are MoE, fused QKV): only a container for
    the run's own values."""
    return arch.titan_model_config(fused_qkv=fused_qkv)


def build_reference(run, arch, *, checkpoint_fused_qkv: bool) -> Reference:
    """The verifier's reference for a run.

    TorchTitan 0.3 dumps (and the runner's config, through the job config it points at) carry the whole model
    config: the reference is that config. 0.2 dicts name a flavor: the installed registry's config of that flavor
    when it has it. A 0.2 custom flavor (only importable with the run's own code) leaves the architecture read
    off the checkpoint's shapes and the base config, and the report says so.

    Raises:
        ConfigError: a refused run setting, or a run model config that does not fit the checkpoint.
    """
    from molgen_export.mapping import titan

    api = titan.installed()
    if api.release < (0, 3, 0):
        return _build_reference_titan021(run, arch, api)
    model = getattr(run, "titan_model", None)
    if model:
        return reference_from_run_model(model, lambda fused: skeleton_config(arch, fused_qkv=fused),
                                        f"{_model_config_file(run).name} (model_spec.model)",
                                        checkpoint_fused_qkv=checkpoint_fused_qkv)
    if run.flavor:
        try:
            from torchtitan.models.qwen3 import qwen3_configs
        except ImportError:
            qwen3_configs = {}
        factory = qwen3_configs.get(run.flavor) if run.model_name in (None, "qwen3", "qwen3_moe") else None
        if factory is not None:
            return reference_from_run_model(_render(factory(attn_backend="flex")),
                                            lambda fused: skeleton_config(arch, fused_qkv=fused),
                                            f"torchtitan flavor {run.flavor!r} (installed registry)",
                                            checkpoint_fused_qkv=checkpoint_fused_qkv)
    config = skeleton_config(arch, fused_qkv=checkpoint_fused_qkv)
    _with_sdpa(config)
    return Reference(config, "architecture read off the checkpoint's shapes and the base config.json (the run "
                             "config carries no model config: a custom flavor)", checkpoint_fused_qkv)


def can_decide_on_dict(run) -> bool:
    """Whether `dict_reference` can decide this run without torchtitan: it carries its model config and the
    installed torchtitan is 0.3 or later (found from its distribution metadata, nothing imported)."""
    from molgen_export.mapping import titan

    release = titan.parse_version(titan.installed_version() or "")
    return bool(getattr(run, "titan_model", None)) and release is not None and release >= (0, 3, 0)


def dict_reference(run, *, checkpoint_fused_qkv: bool, why: str | None = None) -> Reference | None:
    """The reference decided without importing torchtitan's model code: every field of the run's
    `model_spec.model` decided and the refused ones raised, as `build_reference` does, but the model config itself
    (`config`) not built. For the dry run, and for the plan of an export that imports torchtitan while it streams
    (`pipeline.plan.confirm_plan` builds the whole reference before anything is published).

    Args:
        why: said after the source in `source` (the dry run: what builds the rest). None: `source` is the one
            `build_reference` gives, so the run-settings finding is the same once the reference is built.

    Returns:
        The reference, or None when the run carries no model config or the installed torchtitan is older than
        0.3 (its reference comes from the registry, which needs the import).

    Raises:
        ConfigError: a refused run setting.
    """
    if not can_decide_on_dict(run):
        return None
    source = f"{_model_config_file(run).name} (model_spec.model)"
    decisions = refuse_unexpressible(run.titan_model, source)
    return Reference(None, f"{source}; {why}" if why else source, checkpoint_fused_qkv,
                     _rope_scaling(run.titan_model), decisions)


def _build_reference_titan021(run, arch, api) -> Reference:
    """Under torchtitan 0.2.1: the run's flavor from the installed registry (`Qwen3ModelArgs`), else the custom-flavor
    fallback. The 0.2.1 model has separate wq/wk/wv, so a fused checkpoint is split for it (`fused_qkv` False)."""
    from molgen_export.verify import reference_titan021

    found = reference_titan021.reference_args(run, api, _model_config_file(run).name, seq_len=run.seq_len)
    if found is not None:
        config, decisions = found
        return Reference(config, f"torchtitan flavor {run.flavor!r} (installed torchtitan {api.version} registry, "
                                 "Qwen3ModelArgs)", False, None, decisions)
    return Reference(arch.titan_model_config(fused_qkv=False),
                     "architecture read off the checkpoint's shapes and the base config.json (the flavor is not in "
                     f"the installed torchtitan {api.version} registry: a custom flavor)", False)
