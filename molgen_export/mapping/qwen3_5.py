"""TorchTitan `qwen3_5` (Qwen3.5 dense and MoE, torchtitan 0.3) -> HF `Qwen3_5ForCausalLM` /
`Qwen3_5MoeForCausalLM` text model: the key map as data, the few tensor fusions as data plus one function, and
strict accounting (every checkpoint key is exported, set aside with its reason, or refused by name).

Ours, not torchtitan's `Qwen35StateDictAdapter`: the 0.3.0 adapter writes the routed experts in the wrong layout
(`ADAPTER_030_EXPERT_LAYOUT`, fixed upstream in pytorch/torchtitan#4373). Every other name it gives agrees with
this table once its `model.language_model.` prefix (HF's multimodal class) is read as `model.` (the CausalLM's
own `state_dict()` names, which this map writes; transformers loads both).
"""

from __future__ import annotations

import re
from dataclasses import dataclass, field

import torch

from molgen_export.errors import MappingError

HF_TEXT_PREFIX = "model."
"""Where `Qwen3_5ForCausalLM.state_dict()` keeps the text model (`model.layers.*`); `lm_head.weight` is at the root."""

ADAPTER_TEXT_PREFIX = "model.language_model."
"""The same tensors as torchtitan's adapter and HF's `Qwen3_5ForConditionalGeneration` name them."""

# (TorchTitan template, HF template, comment): one tensor each side, same values. "{}" is the layer index.
RENAMES: tuple[tuple[str, str, str], ...] = (
    ("tok_embeddings.weight", "model.embed_tokens.weight", "token embedding [V, D]"),
    ("norm.weight", "model.norm.weight", "final OffsetRMSNorm; both sides scale by (1 + w)"),
    ("lm_head.weight", "lm_head.weight", "output head [V, D] (torchtitan 0.3 qwen3_5 never ties it)"),
    ("layers.{}.attention_norm.weight", "model.layers.{}.input_layernorm.weight", "pre-mixer OffsetRMSNorm"),
    ("layers.{}.ffn_norm.weight", "model.layers.{}.post_attention_layernorm.weight", "pre-MLP OffsetRMSNorm"),
    # full (gated) attention layers
    ("layers.{}.attn.wq.weight", "model.layers.{}.self_attn.q_proj.weight",
     "[2 * H * hd, D]: per head, hd query rows then hd gate rows, on both sides"),
    ("layers.{}.attn.wk.weight", "model.layers.{}.self_attn.k_proj.weight", "[Hkv * hd, D]"),
    ("layers.{}.attn.wv.weight", "model.layers.{}.self_attn.v_proj.weight", "[Hkv * hd, D]"),
    ("layers.{}.attn.wo.weight", "model.layers.{}.self_attn.o_proj.weight", "[D, H * hd]"),
    ("layers.{}.attn.q_norm.weight", "model.layers.{}.self_attn.q_norm.weight", "per-head OffsetRMSNorm [hd]"),
    ("layers.{}.attn.k_norm.weight", "model.layers.{}.self_attn.k_norm.weight", "per-head OffsetRMSNorm [hd]"),
    # Gated DeltaNet (linear attention) layers
    ("layers.{}.attn.in_proj_z.weight", "model.layers.{}.linear_attn.in_proj_z.weight", "output gate [Hv * dv, D]"),
    ("layers.{}.attn.in_proj_a.weight", "model.layers.{}.linear_attn.in_proj_a.weight", "decay input [Hv, D]"),
    ("layers.{}.attn.in_proj_b.weight", "model.layers.{}.linear_attn.in_proj_b.weight", "beta input [Hv, D]"),
    ("layers.{}.attn.A_log", "model.layers.{}.linear_attn.A_log", "log decay rate per value head [Hv]"),
    ("layers.{}.attn.dt_bias", "model.layers.{}.linear_attn.dt_bias", "decay bias per value head [Hv]"),
    ("layers.{}.attn.norm.weight", "model.layers.{}.linear_attn.norm.weight", "gated RMSNorm (plain w) [dv]"),
    ("layers.{}.attn.out_proj.weight", "model.layers.{}.linear_attn.out_proj.weight", "[D, Hv * dv]"),
    # dense MLP
    ("layers.{}.feed_forward.w1.weight", "model.layers.{}.mlp.gate_proj.weight", "[F, D]"),
    ("layers.{}.feed_forward.w3.weight", "model.layers.{}.mlp.up_proj.weight", "[F, D]"),
    ("layers.{}.feed_forward.w2.weight", "model.layers.{}.mlp.down_proj.weight", "[D, F]"),
    # MoE: router, shared expert and its sigmoid gate
    ("layers.{}.moe.router.gate.weight", "model.layers.{}.mlp.gate.weight", "router [E, D] (softmax, top-k renormed)"),
    ("layers.{}.moe.shared_experts.w1.weight", "model.layers.{}.mlp.shared_expert.gate_proj.weight", "[Fs, D]"),
    ("layers.{}.moe.shared_experts.w3.weight", "model.layers.{}.mlp.shared_expert.up_proj.weight", "[Fs, D]"),
    ("layers.{}.moe.shared_experts.w2.weight", "model.layers.{}.mlp.shared_expert.down_proj.weight", "[D, Fs]"),
    ("layers.{}.moe.shared_experts.gate.weight", "model.layers.{}.mlp.shared_expert_gate.weight", "[1, D]"),
    # MoE routed experts: ours (the 0.3.0 adapter transposes this one to [E, F, D])
    ("layers.{}.moe.routed_experts.inner_experts.w2_EDF", "model.layers.{}.mlp.experts.down_proj",
     "[E, D, F] on both sides: HF's F.linear(h, down_proj[e]) is TorchTitan's h @ w2_EDF[e].T"),
)

# (HF template, TorchTitan templates in order, concat dim, comment): one HF tensor from several TorchTitan ones.
FUSIONS: tuple[tuple[str, tuple[str, ...], int, str], ...] = (
    ("model.layers.{}.linear_attn.in_proj_qkv.weight",
     ("layers.{}.attn.in_proj_q.weight", "layers.{}.attn.in_proj_k.weight", "layers.{}.attn.in_proj_v.weight"), 0,
     "[2 * Hk * dk + Hv * dv, D]: q rows, k rows, v rows (HF splits them in that order after its conv)"),
    ("model.layers.{}.linear_attn.conv1d.weight",
     ("layers.{}.attn.conv_q.weight", "layers.{}.attn.conv_k.weight", "layers.{}.attn.conv_v.weight"), 0,
     "depthwise causal conv [C, 1, kernel] over the same q, k, v channels"),
    ("model.layers.{}.mlp.experts.gate_up_proj",
     ("layers.{}.moe.routed_experts.inner_experts.w1_EFD", "layers.{}.moe.routed_experts.inner_experts.w3_EFD"), 1,
     "[E, 2F, D]: per expert the F gate rows then the F up rows (HF chunks F.linear(x, gate_up_proj[e]) in two)"),
)

# (TorchTitan pattern, reason): tensors that are not exported, each named in the plan with its reason.
SET_ASIDE: tuple[tuple[str, str], ...] = (
    (r"layers\.\d+\.moe\.expert_bias_E", ("MoE load-balancing bias (HF routes without one: it must be zero, "
                                          "checked on the data)")),
    (r"layers\.\d+\.moe\.tokens_per_expert(_E)?", "MoE token counts (training statistics)"),
)

VISION_RE = re.compile(r"^vision_encoder\.")
"""The vision tower (`Qwen35VisionEncoder`, which torchtitan 0.3's qwen3_5 model always builds: patch_embed,
pos_embed, layers.N.*, merger.*). HF's text classes have no place for it and the export to HF's multimodal
`Qwen3_5ForConditionalGeneration` is not implemented: it is refused by name unless the export is told to drop it."""

VISION_KEYS_SHOWN = 5
"""How many vision-tower keys a refusal names before the count of the rest."""

ADAPTER_030_EXPERT_LAYOUT = {
    "gate_up_proj": ("cat(w1_EFD.transpose(-2, -1), w3_EFD.transpose(-2, -1), dim=-1)", "[E, D, 2F]"),
    "down_proj": ("w2_EDF.transpose(-2, -1)", "[E, F, D]"),
}
"""What torchtitan 0.3.0's `Qwen35StateDictAdapter.to_hf` writes for the routed experts (HF wants [E, 2F, D] and
[E, D, F]): pinned by a test so a torchtitan that fixes it is noticed."""


def _template_re(template: str) -> re.Pattern:
    return re.compile("^" + re.escape(template).replace(r"\{\}", r"(\d+)") + "$")


_RENAME_RES = tuple((_template_re(titan), hf) for titan, hf, _ in RENAMES)
_FUSION_PART_RES = tuple((_template_re(part), index, position)
                         for index, (_, parts, _, _) in enumerate(FUSIONS) for position, part in enumerate(parts))
_SET_ASIDE_RES = tuple((re.compile(f"^{pattern}$"), reason) for pattern, reason in SET_ASIDE)


@dataclass(frozen=True)
class HfTensor:
    """One HF tensor and the TorchTitan tensors it is made of."""

    hf_key: str
    titan_keys: tuple[str, ...]
    concat_dim: int | None
    """None: the one TorchTitan tensor as it is; else the parts concatenated along this dim."""
    shape: tuple[int, ...]


@dataclass(frozen=True)
class Qwen35Plan:
    """Every checkpoint key accounted for: `tensors` exported, `set_aside` (TorchTitan key -> reason) not."""

    tensors: tuple[HfTensor, ...]
    set_aside: dict[str, str] = field(default_factory=dict)

    @property
    def hf_keys(self) -> set[str]:
        return {t.hf_key for t in self.tensors}


def plan_hf_text(titan_shapes: dict[str, tuple[int, ...]], *, text_only: bool = False) -> Qwen35Plan:
    """The HF text-model tensors of a TorchTitan qwen3_5 state dict, from its keys and shapes alone.

    Args:
        titan_shapes: canonical TorchTitan key -> shape (every model tensor of the checkpoint).
        text_only: leave the vision tower out (each of its keys is listed in `set_aside`), what the export's
            `drop_vision_tower` option asks for; without it a checkpoint with vision weights is refused.

    Raises:
        MappingError: keys this map does not know, vision weights without `text_only` (the first
            `VISION_KEYS_SHOWN` named, the rest counted, all on `.titan_keys`), a fusion with parts missing or of
            shapes that do not concatenate; every such key named.
    """
    tensors: list[HfTensor] = []
    set_aside: dict[str, str] = {}
    unknown: list[str] = []
    vision: list[str] = []
    parts: dict[tuple[int, str], dict[int, str]] = {}
    for titan_key in sorted(titan_shapes):
        if VISION_RE.match(titan_key):
            vision.append(titan_key)
            continue
        reason = next((why for pattern, why in _SET_ASIDE_RES if pattern.match(titan_key)), None)
        if reason is not None:
            set_aside[titan_key] = reason
            continue
        hf_key = next((_fill(hf, m) for pattern, hf in _RENAME_RES if (m := pattern.match(titan_key))), None)
        if hf_key is not None:
            tensors.append(HfTensor(hf_key, (titan_key,), None, tuple(titan_shapes[titan_key])))
            continue
        part = next(((index, position, m) for pattern, index, position in _FUSION_PART_RES
                     if (m := pattern.match(titan_key))), None)
        if part is None:
            unknown.append(titan_key)
            continue
        index, position, m = part
        parts.setdefault((index, m.group(1)), {})[position] = titan_key
    if unknown:
        raise MappingError(f"{len(unknown)} checkpoint tensor(s) map to no HF Qwen3.5 text parameter: "
                           + ", ".join(unknown[:10]) + (" ..." if len(unknown) > 10 else ""),
                           hint="the checkpoint is not a torchtitan 0.3 qwen3_5 model (or a newer layout); "
                                "nothing was written")
    if vision and not text_only:
        raise _vision_refusal(vision)
    set_aside.update({key: "vision tower (text-only export)" for key in vision})
    problems: list[str] = []
    for (index, layer), found in sorted(parts.items()):
        hf_template, templates, dim, _ = FUSIONS[index]
        hf_key = hf_template.replace("{}", layer)
        missing = [t.replace("{}", layer) for position, t in enumerate(templates) if position not in found]
        if missing:
            problems.append(f"{hf_key} needs {', '.join(missing)} (missing)")
            continue
        keys = tuple(found[position] for position in range(len(templates)))
        shapes = [tuple(titan_shapes[k]) for k in keys]
        rest = {s[:dim] + s[dim + 1:] for s in shapes}
        if len(rest) != 1:
            problems.append(f"{hf_key}: {', '.join(f'{k} {list(s)}' for k, s in zip(keys, shapes))} do not "
                            f"concatenate along dim {dim}")
            continue
        shape = list(shapes[0])
        shape[dim] = sum(s[dim] for s in shapes)
        tensors.append(HfTensor(hf_key, keys, dim, tuple(shape)))
    if problems:
        raise MappingError("cannot build the fused HF Qwen3.5 tensors: " + "; ".join(problems[:6]),
                           hint="the checkpoint is incomplete or not a torchtitan qwen3_5 model; nothing was written")
    return Qwen35Plan(tuple(sorted(tensors, key=lambda t: t.hf_key)), set_aside)


def _vision_refusal(vision: list[str]) -> MappingError:
    shown = ", ".join(vision[:VISION_KEYS_SHOWN])
    rest = f" and {len(vision) - VISION_KEYS_SHOWN} more" if len(vision) > VISION_KEYS_SHOWN else ""
    error = MappingError(
        f"the checkpoint holds {len(vision)} vision-tower tensor(s): {shown}{rest}. The HF text export "
        "(Qwen3_5ForCausalLM / Qwen3_5MoeForCausalLM) cannot carry them, and an export to HF's multimodal "
        "Qwen3_5ForConditionalGeneration is not implemented",
        hint="to publish a text-only model without the vision tower, export with --drop-vision-tower (YAML: "
             "drop_vision_tower: true); every left-out tensor is then named in the report. Nothing was written")
    error.titan_keys = tuple(vision)
    return error


def _fill(template: str, match: re.Match) -> str:
    return template.replace("{}", match.group(1)) if match.groups() else template


def build_hf_tensor(entry: HfTensor, titan_tensors: dict[str, torch.Tensor]) -> torch.Tensor:
    """The HF tensor of one plan entry, from the TorchTitan tensors it names (a fresh contiguous tensor)."""
    if entry.concat_dim is None:
        return titan_tensors[entry.titan_keys[0]].contiguous()
    return torch.cat([titan_tensors[k] for k in entry.titan_keys], dim=entry.concat_dim)


def to_hf_text(titan_sd: dict[str, torch.Tensor], *, text_only: bool = False
               ) -> tuple[dict[str, torch.Tensor], Qwen35Plan]:
    """The HF text-model state dict of a TorchTitan qwen3_5 state dict, and the plan that accounts for every key."""
    plan = plan_hf_text({k: tuple(v.shape) for k, v in titan_sd.items()}, text_only=text_only)
    return {entry.hf_key: build_hf_tensor(entry, titan_sd) for entry in plan.tensors}, plan


MODEL_NAMES = ("qwen3_5", "qwen3_6", "qwen3_8")
"""TorchTitan registry names over the same `qwen3_5` code (`model_spec.name` / `model.name`)."""

_FAMILY_KEY_RE = re.compile(r"^layers\.\d+\.attn\.(A_log|dt_bias|in_proj_[qkvzab]\.weight|conv_[qkv]\.weight|"
                            r"wq\.weight|q_norm\.weight)$")
"""Keys only a qwen3_5 model has: its mixers live under `attn.` (TorchTitan's Qwen3 says `attention.`)."""


def is_qwen3_5(model_name: str | None, checkpoint_keys) -> bool:
    """Whether a run is TorchTitan's qwen3_5 family: by its model name, else by its checkpoint's keys."""
    from molgen_export.mapping.keymap import canonical_titan_key

    if model_name is not None:
        return model_name in MODEL_NAMES
    return any(_FAMILY_KEY_RE.match(canonical_titan_key(key)[0]) for key in checkpoint_keys)
