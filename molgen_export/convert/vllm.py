"""vLLM's merged weight layout <-> HF names, as zero-copy views.

vLLM stores `q_proj/k_proj/v_proj` as one `qkv_proj` (`cat([q; k; v], dim=0)`) and `gate_proj/up_proj` as one
`gate_up_proj` (also a MoE's `shared_expert.gate_up_proj`). For Qwen3.5 Gated DeltaNet layers, where HF keeps
`in_proj_qkv` ([q; k; v] rows), `in_proj_z`, `in_proj_b` and `in_proj_a` separate, vLLM's `Qwen3_5` model loads
`in_proj_qkv` and `in_proj_z` into one `in_proj_qkvz` (output sizes `[key_dim, key_dim, value_dim, value_dim]`:
plain `cat([in_proj_qkv; in_proj_z], dim=0)`, not interleaved) and `in_proj_b` then `in_proj_a` into `in_proj_ba`.
Qwen3-Next is different: its HF checkpoint already holds `in_proj_qkvz`/`in_proj_ba`, interleaved per key-head
group, and vLLM loads them as they are, so for `qwen3_next` they pass through unsplit. Qwen3.5 MoE routed experts
keep HF's layout under vLLM's FusedMoE names: `experts.gate_up_proj` [E, 2F, D] (gate rows, then up rows) is
`experts.w13_weight`, `experts.down_proj` [E, D, F] is `experts.w2_weight`, the same tensors.

Merged -> HF is a dim-0 `narrow` per part (or the tensor itself, renamed): a view on the same memory, no copy.
HF -> merged (`vllm_fused_from_hf`) concatenates and therefore allocates.

To run an HF model on the merged memory this module uses `torch.func.functional_call`: the HF model is built on
the meta device (no weight memory of its own, buffers materialized), and each call narrows fresh views of the
merged tensors and hands them to the model for that call. Autograd records the `narrow`, so gradients land in the
merged tensors' `.grad`, and an optimizer over the merged tensors updates the memory vLLM reads. (Replacing the
model's parameters by `nn.Parameter` views would share the weights too, but each such parameter is its own
autograd leaf, so gradients would land in separate `.grad` tensors, not in the merged layout.)

Views are for the global (unsharded) layout as vLLM's loader writes it: under vLLM tensor parallelism each rank's
`qkv_proj` is `[q_r; k_r; v_r]` (and `in_proj_qkvz` `[q_r; k_r; v_r; z_r]`), not a slice of the global tensor, and
its sizes will not match the config's; MoE backends that repack `w13_weight`/`w2_weight` after loading (ROCm
AITER shuffling, CPU weight packing, kernels that want the up rows first) and a shared expert fused into the routed
experts are not a view of this layout either.
"""

from __future__ import annotations

import logging
from collections.abc import Callable, Iterable, Mapping
from dataclasses import dataclass
from types import SimpleNamespace
from typing import Any

import torch

from molgen_export.errors import ConfigError, MappingError

logger = logging.getLogger(__name__)

# (merged vLLM module suffix, HF module suffixes in merged order, split-size group). Applies to `.weight` and `.bias`.
MERGED_MODULES: tuple[tuple[str, tuple[str, ...], str], ...] = (
    # full attention: q rows (doubled when the attention output is gated), then k, then v
    ("self_attn.qkv_proj", ("self_attn.q_proj", "self_attn.k_proj", "self_attn.v_proj"), "qkv"),
    # SwiGLU MLP: gate rows, then up rows
    ("mlp.gate_up_proj", ("mlp.gate_proj", "mlp.up_proj"), "gate_up"),
    # MoE shared expert (Qwen3.5 MoE, Qwen3-Next): gate rows, then up rows
    ("mlp.shared_expert.gate_up_proj", ("mlp.shared_expert.gate_proj", "mlp.shared_expert.up_proj"),
     "shared_gate_up"),
    # Gated DeltaNet linear attention (Qwen3.5): in_proj_qkv's [q; k; v] rows, then z (output gate) rows
    ("linear_attn.in_proj_qkvz", ("linear_attn.in_proj_qkv", "linear_attn.in_proj_z"), "qkvz"),
    # Gated DeltaNet linear attention (Qwen3.5): beta rows, then alpha rows (one per value head each)
    ("linear_attn.in_proj_ba", ("linear_attn.in_proj_b", "linear_attn.in_proj_a"), "ba"),
)

LINEAR_ATTENTION_GROUPS = frozenset({"qkvz", "ba"})
"""The merges of HF's separate Gated DeltaNet projections (Qwen3.5 layout)."""

INTERLEAVED_LINEAR_ATTENTION_MODEL_TYPES = frozenset({"qwen3_next"})
"""Model types whose HF checkpoint already holds `in_proj_qkvz`/`in_proj_ba` (interleaved per key-head group),
which vLLM loads unchanged: no merge, no split."""

# (vLLM parameter suffix, HF parameter suffix): one tensor under two names, same layout.
RENAMED_PARAMS: tuple[tuple[str, str], ...] = (
    # Qwen3.5 MoE routed experts [E, 2F, D]: per expert the F gate rows, then the F up rows (vLLM's w1 then w3)
    ("mlp.experts.w13_weight", "mlp.experts.gate_up_proj"),
    # ... and [E, D, F] (vLLM's w2)
    ("mlp.experts.w2_weight", "mlp.experts.down_proj"),
)

# (vLLM name prefix, HF name prefix): models whose language model sits under `language_model.` in vLLM.
PREFIX_RULES: tuple[tuple[str, str], ...] = (
    # Qwen3.5 / Qwen3-VL conditional-generation models: the text decoder
    ("language_model.model.", "model.language_model."),
    # ... and their head
    ("language_model.lm_head.", "lm_head."),
    # ... and the vision tower (its inner names are passed through unchanged, not checked)
    ("visual.", "model.visual."),
)

GATED_ATTENTION_MODEL_TYPES = frozenset({"qwen3_next", "qwen3_5", "qwen3_5_text", "qwen3_5_moe", "qwen3_5_moe_text"})
"""Model types whose full-attention `q_proj` holds query and output-gate rows (2 x heads x head_dim) unless the
config's `attn_output_gate` says otherwise."""

SKIPPED_HF_SUFFIXES = ("rotary_emb.inv_freq",)
"""HF buffers vLLM does not hold (recomputed from the config)."""


@dataclass(frozen=True)
class SplitSizes:
    """Dim-0 row counts of each part of each merged tensor, computed from the model config."""

    qkv: tuple[int, int, int]
    gate_up: tuple[int, int] | None
    """None when the config has no dense `intermediate_size` (a MoE whose every layer is sparse)."""
    shared_gate_up: tuple[int, int] | None
    """None when the config has no `shared_expert_intermediate_size`."""
    qkvz: tuple[int, int] | None
    """None when the config has no linear-attention dims."""
    ba: tuple[int, int] | None
    interleaved_linear_attention: bool = False
    """True for Qwen3-Next: `in_proj_qkvz`/`in_proj_ba` are HF tensors themselves, never merged or split."""


def _text_config(config: Any) -> Any:
    if isinstance(config, Mapping):
        config = SimpleNamespace(**config)
        text = getattr(config, "text_config", None)
        return SimpleNamespace(**text) if isinstance(text, Mapping) else config
    text = getattr(config, "text_config", None)
    return text if text is not None else config


def split_sizes(config: Any) -> SplitSizes:
    """Row counts of the merged parts from an HF config (a `PretrainedConfig` or a `config.json` dict).

    Raises:
        ConfigError: the config lacks a dimension the sizes need.
    """
    text = _text_config(config)

    def need(name: str) -> int:
        value = getattr(text, name, None)
        if value is None:
            raise ConfigError(f"the model config has no `{name}`, which the merged vLLM layout's split sizes need",
                              hint="pass the model's HF config (for multimodal models, the one with text_config)")
        return int(value)

    def pair(name: str) -> tuple[int, int] | None:
        value = getattr(text, name, None)
        return (int(value), int(value)) if value else None

    model_type = getattr(text, "model_type", None)
    n_heads = need("num_attention_heads")
    head_dim = getattr(text, "head_dim", None) or need("hidden_size") // n_heads
    n_kv_heads = getattr(text, "num_key_value_heads", None) or n_heads
    gated = getattr(text, "attn_output_gate", None)
    if gated is None:
        gated = model_type in GATED_ATTENTION_MODEL_TYPES
    q_rows = n_heads * head_dim * (2 if gated else 1)
    qkvz = ba = None
    if getattr(text, "linear_num_value_heads", None):
        key_dim = need("linear_num_key_heads") * need("linear_key_head_dim")
        value_heads = need("linear_num_value_heads")
        value_dim = value_heads * need("linear_value_head_dim")
        qkvz = (2 * key_dim + value_dim, value_dim)
        ba = (value_heads, value_heads)
    return SplitSizes(qkv=(q_rows, n_kv_heads * head_dim, n_kv_heads * head_dim),
                      gate_up=pair("intermediate_size"), shared_gate_up=pair("shared_expert_intermediate_size"),
                      qkvz=qkvz, ba=ba,
                      interleaved_linear_attention=model_type in INTERLEAVED_LINEAR_ATTENTION_MODEL_TYPES)


def _merged_modules(sizes: SplitSizes, keep_separate: Iterable[str] = ()
                    ) -> tuple[tuple[str, tuple[str, ...], str], ...]:
    """The `MERGED_MODULES` entries that apply to a model (its config's `sizes`), less those kept separate."""
    kept = set(keep_separate)
    unknown = kept - {merged for merged, _, _ in MERGED_MODULES}
    if unknown:
        raise ConfigError(f"keep_separate names {sorted(unknown)}, which are not merged vLLM modules",
                          hint=f"use some of {[merged for merged, _, _ in MERGED_MODULES]}")
    return tuple((merged, parts, group) for merged, parts, group in MERGED_MODULES
                 if merged not in kept
                 and not (sizes.interleaved_linear_attention and group in LINEAR_ATTENTION_GROUPS))


def _swap_prefix(name: str, rules: tuple[tuple[str, str], ...], reverse: bool) -> str:
    for vllm_prefix, hf_prefix in rules:
        source, target = (hf_prefix, vllm_prefix) if reverse else (vllm_prefix, hf_prefix)
        if name.startswith(source):
            return target + name[len(source):]
    return name


def _prefix_rules(names: Iterable[str], *, hf_side: bool) -> tuple[tuple[str, str], ...]:
    """`PREFIX_RULES` for a conditional-generation model (its decoder under `language_model`), else none."""
    marker = "model.language_model." if hf_side else "language_model."
    return PREFIX_RULES if any(n.startswith(marker) for n in names) else ()


def hf_name_for(vllm_name: str, rules: tuple[tuple[str, str], ...] = PREFIX_RULES) -> str:
    """The HF name of a vLLM parameter name: prefix rules and `RENAMED_PARAMS` (merged modules are split
    separately)."""
    return _renamed(_swap_prefix(vllm_name, rules, reverse=False), to_hf=True)


def vllm_name_for(hf_name: str, rules: tuple[tuple[str, str], ...] = PREFIX_RULES) -> str:
    """The vLLM name of an HF parameter name: prefix rules and `RENAMED_PARAMS`."""
    return _renamed(_swap_prefix(hf_name, rules, reverse=True), to_hf=False)


def _merged_match(name: str, modules: tuple[tuple[str, tuple[str, ...], str], ...]
                  ) -> tuple[str, str, tuple[str, ...], str] | None:
    """(module prefix, parameter suffix, HF part modules, size group) when `name` is a merged vLLM parameter."""
    for merged, parts, group in modules:
        for suffix in (".weight", ".bias"):
            tail = f".{merged}{suffix}"
            if name.endswith(tail):
                return name[: -len(tail)], suffix, parts, group
    return None


def _renamed(name: str, *, to_hf: bool) -> str:
    """`name` with a `RENAMED_PARAMS` suffix swapped to the other side's spelling (else unchanged)."""
    for vllm_suffix, hf_suffix in RENAMED_PARAMS:
        source, target = (vllm_suffix, hf_suffix) if to_hf else (hf_suffix, vllm_suffix)
        if name.endswith(f".{source}"):
            return name[: -len(source)] + target
    return name


def _shares_storage(view: torch.Tensor, source: torch.Tensor) -> bool:
    return view.untyped_storage().data_ptr() == source.untyped_storage().data_ptr()


def hf_views_from_vllm(params: Mapping[str, torch.Tensor], config: Any) -> dict[str, torch.Tensor]:
    """HF-named tensors over vLLM's merged parameters, without copies.

    Merged tensors are split with dim-0 `narrow` (split sizes from `config`); other tensors are returned as they
    are, renamed. Tensors a vLLM version keeps separate (e.g. `in_proj_qkv`/`in_proj_z` with LoRA enabled) and
    Qwen3-Next's interleaved `in_proj_qkvz`/`in_proj_ba` pass through unsplit. Views of tensors that require grad are autograd views: gradients through them accumulate into
    the merged tensor.

    Args:
        params: vLLM parameter name -> tensor (e.g. `dict(llm_model.named_parameters())`).
        config: the model's HF config (`PretrainedConfig` or dict).

    Returns:
        HF name -> tensor, every split part a view sharing storage with its merged source.

    Raises:
        MappingError: a merged tensor whose rows do not add up to the config's split sizes, or a view that does not
            share storage with its source (e.g. a tensor subclass that copies on `narrow`).
    """
    sizes = split_sizes(config)
    modules = _merged_modules(sizes)
    rules = _prefix_rules(params, hf_side=False)
    views: dict[str, torch.Tensor] = {}
    for vllm_name, merged in params.items():
        match = _merged_match(vllm_name, modules)
        if match is None:
            views[hf_name_for(vllm_name, rules)] = merged
            continue
        prefix, suffix, parts, group = match
        rows = getattr(sizes, group)
        if rows is None or merged.shape[0] != sum(rows):
            raise MappingError(
                f"vLLM tensor `{vllm_name}` has {merged.shape[0]} rows but the config's split sizes for it are "
                f"{rows} (sum {sum(rows) if rows else 'n/a'})",
                hint="pass the config of this model; a tensor-parallel rank's shard is not the global layout")
        start = 0
        for part, count in zip(parts, rows):
            hf_name = hf_name_for(f"{prefix}.{part}{suffix}", rules)
            view = merged.narrow(0, start, count)
            if not _shares_storage(view, merged):
                raise MappingError(f"the view `{hf_name}` of `{vllm_name}` does not share storage with it",
                                   hint="pass plain (non-subclass) tensors; a copy would break weight sharing")
            views[hf_name] = view
            start += count
    return views


def vllm_fused_from_hf(hf_params: Mapping[str, torch.Tensor], config: Any, *,
                       keep_separate: Iterable[str] = ()) -> dict[str, torch.Tensor]:
    """vLLM's merged layout from HF-named tensors. Merged tensors are new allocations (`torch.cat`); the others
    are passed through renamed. Rotary `inv_freq` buffers are dropped, and a tied `lm_head.weight` too (vLLM
    reuses the embedding).

    Args:
        hf_params: HF name -> tensor (e.g. `dict(model.state_dict())`).
        config: the model's HF config (`PretrainedConfig` or dict).
        keep_separate: merged vLLM modules (`MERGED_MODULES` names) to leave as their HF parts, for a vLLM that
            does not merge them: `("linear_attn.in_proj_qkvz",)` for Qwen3.5 with LoRA enabled, where vLLM keeps
            `in_proj_qkv` and `in_proj_z`.

    Raises:
        MappingError: a merged module with a part missing, or parts whose rows differ from the config's sizes.
        ConfigError: `keep_separate` names a module that is not merged.
    """
    sizes = split_sizes(config)
    modules = _merged_modules(sizes, keep_separate)
    tied = bool(getattr(_text_config(config), "tie_word_embeddings", False))
    rules = _prefix_rules(hf_params, hf_side=True)
    used: set[str] = set()
    fused: dict[str, torch.Tensor] = {}
    for hf_name, tensor in hf_params.items():
        if hf_name in used or hf_name.endswith(SKIPPED_HF_SUFFIXES):
            continue
        if tied and hf_name == "lm_head.weight":
            continue
        for merged, parts, group in modules:
            found = next(((hf_name[: -len(f".{p}{s}")], s) for p in parts for s in (".weight", ".bias")
                          if hf_name.endswith(f".{p}{s}")), None)
            if found is None:
                continue
            prefix, suffix = found
            names = [f"{prefix}.{p}{suffix}" for p in parts]
            missing = [n for n in names if n not in hf_params]
            if missing:
                raise MappingError(f"`{names[0]}`'s merged vLLM tensor needs {missing}, which are absent",
                                   hint="pass every HF tensor of the model")
            rows = tuple(hf_params[n].shape[0] for n in names)
            if rows != getattr(sizes, group):
                raise MappingError(f"{names} have rows {rows}, the config says {getattr(sizes, group)}",
                                   hint="pass the config of this model")
            fused[vllm_name_for(f"{prefix}.{merged}{suffix}", rules)] = torch.cat([hf_params[n] for n in names], dim=0)
            used.update(names)
            break
        else:
            fused[vllm_name_for(hf_name, rules)] = tensor
    return fused


# -------------------------------------------------------------------------- an HF model on the merged memory


def build_meta_hf_model(config: Any, *, device: str | torch.device = "cpu",
                        model_class: Callable[..., torch.nn.Module] | None = None) -> torch.nn.Module:
    """An HF causal LM with its parameters on the meta device (no weight memory) and its buffers materialized.

    Rotary-embedding modules are rebuilt on `device` (their buffers are computed from the config); any other
    buffer left on the meta device is refused.

    Args:
        config: the HF config.
        device: where buffers (and the views used in calls) live.
        model_class: a callable building the model from the config (default `AutoModelForCausalLM.from_config`).

    Raises:
        ConfigError: a buffer that cannot be materialized.
    """
    from transformers import AutoModelForCausalLM

    build = model_class or AutoModelForCausalLM.from_config
    with torch.device("meta"):
        model = build(config)
    for name, module in list(model.named_modules()):
        if type(module).__name__.endswith("RotaryEmbedding") and hasattr(module, "config"):
            with torch.device(device):
                rebuilt = type(module)(config=module.config)
            parent_name, _, child = name.rpartition(".")
            setattr(model.get_submodule(parent_name) if parent_name else model, child, rebuilt)
    left = [n for n, b in model.named_buffers() if b.is_meta]
    if left:
        raise ConfigError(f"buffers {left[:5]} of {type(model).__name__} stay on the meta device",
                          hint="this model has buffers build_meta_hf_model does not know how to materialize")
    return model.eval()


class MergedWeightsModel:
    """Run an HF model (built on the meta device) on vLLM's merged tensors via `torch.func.functional_call`.

    Example:
        model = MergedWeightsModel(build_meta_hf_model(config), vllm_params, config)
        logits = model(input_ids=ids).logits
        logits.sum().backward()          # gradients land in vllm_params["...qkv_proj.weight"].grad etc.
    """

    def __init__(self, model: torch.nn.Module, params: Mapping[str, torch.Tensor], config: Any):
        self.model = model
        self.params = params
        self.config = config
        views = hf_views_from_vllm(params, config)
        names = {n for n, _ in model.named_parameters()}
        missing = sorted(names - set(views))
        unknown = sorted(set(views) - names - {n for n, _ in model.named_parameters(remove_duplicate=False)})
        if missing or unknown:
            raise MappingError(f"the merged tensors do not cover {type(model).__name__}: missing {missing[:5]}, "
                               f"no such parameter {unknown[:5]}", hint="pass every vLLM parameter of this model")

    def views(self) -> dict[str, torch.Tensor]:
        """Fresh HF-named views of the merged tensors (cheap: one `narrow` per part)."""
        return hf_views_from_vllm(self.params, self.config)

    def __call__(self, *args: Any, **kwargs: Any) -> Any:
        return torch.func.functional_call(self.model, self.views(), args, kwargs, tie_weights=True, strict=False)
