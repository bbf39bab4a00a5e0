"""The CPU reference for TorchTitan's `qwen3_5` (Qwen3.5 dense and MoE): torchtitan's own modules, with the one
GPU-only piece, the gated delta rule of its Gated DeltaNet layers, replaced by a pure-torch op of ours.

torchtitan 0.3.0 runs the delta rule on `fla` Triton kernels (CUDA only) and imports `fla` when its `qwen3_5`
package is imported. The reference keeps every module, parameter and forward of torchtitan's model; it swaps
only each `GatedDeltaKernel`'s op for `recurrent_gated_delta_rule` (token by token, float32: the recurrence as the
Gated DeltaNet paper writes it, not HF's chunked form, so HF's `torch_chunk_gated_delta_rule` is checked against
an independent computation), and full attention for causal SDPA (one causal sequence: the same as flex).

Without `fla` installed, torchtitan's `qwen3_5` package is imported with placeholder `fla` modules whose kernels
raise when called; they are removed from `sys.modules` right after, so no other import (transformers decides
between `fla` and its torch path by importing `fla`) ever sees them.
"""

from __future__ import annotations

import contextlib
import importlib
import importlib.util
import itertools
import logging
import sys
import types
from dataclasses import dataclass

import torch

logger = logging.getLogger(__name__)

DELTA_RULE_OP = "molgen_export.verify.qwen3_5_reference.recurrent_gated_delta_rule"
"""The pure-torch delta-rule op the CPU reference runs in place of torchtitan's `fla` kernels (reports name it)."""

_FLA_MODULES = {
    "fla": (),
    "fla.modules": (),
    "fla.modules.conv": (),
    "fla.modules.conv.triton": (),
    "fla.modules.conv.triton.ops": ("CausalConv1dFunction",),
    "fla.modules.conv.causal_conv1d": ("causal_conv1d",),
    "fla.ops": (),
    "fla.ops.gated_delta_rule": ("chunk_gated_delta_rule", "fused_recurrent_gated_delta_rule"),
    "fla.ops.gated_delta_rule.chunk": ("ChunkGatedDeltaRuleFunction",),
    "fla.ops.gated_delta_rule.fused_recurrent": ("FusedRecurrentFunction",),
}
"""What torchtitan 0.3.0's `qwen3_5/model.py` imports from `fla`, module by module."""


@dataclass(frozen=True)
class Qwen35Titan:
    """torchtitan's `qwen3_5` package as imported here, and how."""

    package: types.ModuleType
    fla_placeholders: bool
    """True when `fla` is not installed and the package was imported over placeholder `fla` modules."""


def _fla_missing(name: str):
    def missing(*args, **kwargs):
        raise RuntimeError(f"`fla` is not installed: torchtitan's {name} cannot run here; the CPU reference "
                           f"replaces it ({DELTA_RULE_OP})")
    return missing


@contextlib.contextmanager
def _placeholder_fla():
    added = []
    try:
        for module_name, names in _FLA_MODULES.items():
            if module_name in sys.modules:
                continue
            module = types.ModuleType(module_name, "placeholder for `fla` (molgen_export CPU reference)")
            module.__path__ = []  # a package, so submodules resolve to the entries added here
            for name in names:
                if name[0].isupper():
                    setattr(module, name, type(name, (torch.autograd.Function,), {"forward": _fla_missing(name)}))
                else:
                    setattr(module, name, _fla_missing(name))
            sys.modules[module_name] = module
            added.append(module_name)
        yield
    finally:
        for module_name in added:
            sys.modules.pop(module_name, None)


def import_qwen3_5() -> Qwen35Titan:
    """torchtitan's `qwen3_5` package, imported over placeholder `fla` modules when `fla` is not installed.

    Raises:
        ImportError: the installed torchtitan has no `qwen3_5` (before 0.3.0), or it fails to import.
    """
    if "torchtitan.models.qwen3_5" in sys.modules:
        package = sys.modules["torchtitan.models.qwen3_5"]
        return Qwen35Titan(package, getattr(package, "_molgen_fla_placeholders", False))
    if importlib.util.find_spec("torchtitan") is None:
        raise ImportError("torchtitan is not installed")
    if importlib.util.find_spec("torchtitan.models.qwen3_5") is None:
        raise ImportError("the installed torchtitan has no models.qwen3_5 (added in torchtitan 0.3.0)")
    placeholders = importlib.util.find_spec("fla") is None
    with _placeholder_fla() if placeholders else contextlib.nullcontext():
        package = importlib.import_module("torchtitan.models.qwen3_5")
    package._molgen_fla_placeholders = placeholders
    return Qwen35Titan(package, placeholders)


def _l2_normalize(x: torch.Tensor, eps: float = 1e-6) -> torch.Tensor:
    return x * torch.rsqrt(x.pow(2).sum(-1, keepdim=True) + eps)


def recurrent_gated_delta_rule(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, g: torch.Tensor, beta: torch.Tensor,
                               *, use_qk_l2norm_in_kernel: bool = False, cu_seqlens: torch.Tensor | None = None,
                               **_unused) -> tuple[torch.Tensor, torch.Tensor]:
    """The gated delta rule, one token at a time, in float32 (the signature of `fla`'s `chunk_gated_delta_rule`).

    With the state `S` `[K, V]` per head, for each token t::

        S <- exp(g_t) * S                          (gated decay)
        S <- S + beta_t * k_t (v_t - S^T k_t)^T    (delta rule: write only what S does not already predict)
        o_t = S^T (q_t / sqrt(K))

    Args:
        q, k: `[B, T, H, K]` (heads already matched to v's), v: `[B, T, H, V]`, g (log decay, <= 0) and beta:
            `[B, T, H]`.
        use_qk_l2norm_in_kernel: L2-normalize q and k first (eps 1e-6 inside the root, as `fla` does).
        cu_seqlens: document offsets into T (B must be 1): the state restarts at each document.

    Returns:
        The output `[B, T, H, V]` in q's dtype, and the final state `[B, H, K, V]` (float32).
    """
    dtype = q.dtype
    q, k, v, g, beta = (x.float() for x in (q, k, v, g, beta))
    if use_qk_l2norm_in_kernel:
        q, k = _l2_normalize(q), _l2_normalize(k)
    q = q * q.shape[-1] ** -0.5
    batch, length, heads, key_dim = k.shape
    bounds = [0, length] if cu_seqlens is None else [int(b) for b in cu_seqlens.tolist()]
    if cu_seqlens is not None and batch != 1:
        raise ValueError(f"document offsets need batch size 1, got {batch}")
    out = torch.zeros_like(v)
    state = q.new_zeros(batch, heads, key_dim, v.shape[-1])
    for start, end in itertools.pairwise(bounds):
        state = q.new_zeros(batch, heads, key_dim, v.shape[-1])
        for t in range(start, end):
            state = state * g[:, t].exp()[..., None, None]
            predicted = torch.einsum("bhkv,bhk->bhv", state, k[:, t])
            state = state + torch.einsum("bhk,bhv->bhkv", k[:, t], beta[:, t, :, None] * (v[:, t] - predicted))
            out[:, t] = torch.einsum("bhkv,bhk->bhv", state, q[:, t])
    return out.to(dtype), state


def _pure_torch_kernel_forward(self, xq_BLNK, xk_BLNK, xv_BLNV, g_BLN, beta_BLN, *, cu_seqlens=None,
                               cu_seqlens_cpu=None):
    """`GatedDeltaKernel.forward` with `fla` replaced by `recurrent_gated_delta_rule` (the same head matching)."""
    if xq_BLNK.shape[2] != xv_BLNV.shape[2]:
        repeat = xv_BLNV.shape[2] // xq_BLNK.shape[2]
        xq_BLNK = xq_BLNK.repeat_interleave(repeat, dim=2)
        xk_BLNK = xk_BLNK.repeat_interleave(repeat, dim=2)
    out, _ = recurrent_gated_delta_rule(xq_BLNK, xk_BLNK, xv_BLNV, g_BLN, beta_BLN, use_qk_l2norm_in_kernel=True,
                                        cu_seqlens=cu_seqlens)
    return out


def use_pure_torch_delta_rule(model: torch.nn.Module) -> int:
    """Make every `GatedDeltaKernel` of `model` run `recurrent_gated_delta_rule`; returns how many it changed."""
    kernel_class = import_qwen3_5().package.GatedDeltaKernel
    changed = 0
    for module in model.modules():
        if isinstance(module, kernel_class):
            module.forward = types.MethodType(_pure_torch_kernel_forward, module)
            changed += 1
    return changed


def reference_config(config):
    """A copy of a `Qwen35Model.Config` whose full-attention layers run causal SDPA (the rest unchanged)."""
    import copy

    from torchtitan.models.common.attention import ScaledDotProductAttention

    config = copy.deepcopy(config)
    for layer in config.layers:
        if layer.attention is not None:
            layer.attention.inner_attention = ScaledDotProductAttention.Config()
    return config


def build_reference_model(config, titan_state: dict[str, torch.Tensor] | None = None, *,
                          device: str = "cpu") -> torch.nn.Module:
    """torchtitan's Qwen3.5 model of `config` in float32 on `device`, with causal SDPA, and the pure-torch delta
    rule where the real kernels cannot run (no `fla`, or not on CUDA); loaded with `titan_state` when given.

    A zero MoE expert bias is filled in when the state lacks it (HF routes without one)."""
    import_qwen3_5()
    config = reference_config(config)
    with torch.device("meta"):
        model = config.build()
    model.to_empty(device=device)
    with torch.no_grad():
        model.init_states(buffer_device=torch.device(device))
    model = model.float()
    if titan_state is not None:
        state = {k: v.to(device=device, dtype=torch.float32) for k, v in titan_state.items()}
        for key, buffer in model.state_dict().items():
            if key.endswith("moe.expert_bias_E") and key not in state:
                state[key] = torch.zeros_like(buffer)
        model.load_state_dict(state, strict=True)
    if importlib.util.find_spec("fla") is None or not str(device).startswith("cuda"):
        use_pure_torch_delta_rule(model)
    if any(layer.moe is not None for layer in config.layers):
        from molgen_export.mapping import titan

        titan.installed().float32_experts(model)  # torchtitan's grouped GEMMs run in bf16 whatever the dtype
    return model.eval()


_TEXT_ONLY = {"image_id": -1, "video_id": -1}
"""Placeholder token ids: no vision inputs are passed, so no token is ever looked up as one."""


def forward_logits(model: torch.nn.Module, tokens: torch.Tensor) -> torch.Tensor:
    """Logits `[B, T, vocab]` of the text model, one row at a time.

    Without document offsets torchtitan's Gated DeltaNet folds the batch into one stream (its conv and state would
    run across rows), so each row is its own forward, with plain 1-D positions (text-only RoPE).
    """
    rows = []
    with torch.no_grad():
        for row in tokens:
            positions = torch.arange(row.shape[0], device=row.device)[None]
            rows.append(model(row[None], positions=positions, attention_masks=None, special_tokens=_TEXT_ONLY))
    return torch.cat(rows).float()


def config_from_run_model(model: dict, source: str):
    """The run's `Qwen35Model.Config` from its `model_spec.model` dict (torchtitan 0.3 `to_dict()`): a skeleton of
    the same structure made with torchtitan's own qwen3_5 builders, the run's every field laid onto it, then rendered
    back and diffed against the run's dict, so nothing the run set is dropped.

    Raises:
        ConfigError: a field the installed torchtitan's config cannot take, or that the skeleton renders otherwise.
    """
    import json

    from molgen_export.errors import ConfigError
    from molgen_export.verify import reference

    try:
        config = _skeleton(model)
    except (KeyError, TypeError, ValueError, ZeroDivisionError) as exc:
        raise ConfigError(f"the run's model config {source} is not a torchtitan qwen3_5 model: {exc!r}",
                          hint="pass the run's own job config (model_spec.name qwen3_5)") from exc
    problems: list[str] = []
    reference._overlay(config, model, "", problems)
    if not problems:
        reference._diff(json.loads(json.dumps(model, default=repr)), reference._render(config), "", problems)
    if problems:
        raise ConfigError(f"the verifier's torchtitan qwen3_5 model cannot be built from the run config {source}: "
                          + "; ".join(f"model_spec.model.{p}" for p in problems[:8]),
                          hint="the run's model config does not fit this torchtitan version")
    return config


def _skeleton(model: dict):
    """A `Qwen35Model.Config` with the run's layer structure (which layers are full attention, dense or MoE) and
    the dims the builders need; every other field comes from the overlay."""
    package = import_qwen3_5().package
    from torchtitan.models.common import Embedding, Linear

    layers, dim, n = model["layers"], model["dim"], len(model["layers"])
    attention = next((layer["attention"] for layer in layers if layer.get("attention")), None)
    delta = next((layer["delta_net"] for layer in layers if layer.get("delta_net")), None)
    rope = {k: v for k, v in (attention or {}).get("rope", {}).items() if k not in ("param_init", "sharding_config")}
    common = {
        "n_layers": n, "dim": dim, "attn_backend": "flex",
        "rope": package.MRoPE.Config(**rope) if rope else package.MRoPE.Config(dim=2, max_seq_len=1, mrope_section=[1, 0, 0]),
        "n_heads": attention["n_heads"] if attention else 1, "n_kv_heads": attention["n_kv_heads"] if attention else 1,
        "head_dim": attention["head_dim"] if attention else 2, "rotary_dim": attention["rotary_dim"] if attention else 2,
        "n_key_heads": delta["in_proj_q"]["out_features"] // delta["key_head_dim"] if delta else 1,
        "n_value_heads": delta["in_proj_v"]["out_features"] // delta["value_head_dim"] if delta else 1,
        "key_head_dim": delta["key_head_dim"] if delta else 1, "value_head_dim": delta["value_head_dim"] if delta else 1}
    moe = layers[0].get("moe")
    if moe:
        def build(interval):
            return package._build_qwen35_moe_layers(
                moe_hidden_dim=moe["routed_experts"]["inner_experts"]["hidden_dim"], num_experts=moe["num_experts"],
                top_k=moe["router"]["top_k"], shared_expert_hidden_dim=moe["shared_experts"]["w1"]["out_features"],
                full_attention_interval=interval, **common)
    else:
        def build(interval):
            return package._build_qwen35_layers(hidden_dim=layers[0]["feed_forward"]["w1"]["out_features"],
                                                full_attention_interval=interval, **common)
    full, linear = build(1), build(n + 1)
    vision = model["vision_encoder"]
    return package.Qwen35Model.Config(
        vocab_size=model["vocab_size"], dim=dim, norm=package._offset_norm(dim),
        tok_embeddings=Embedding.Config(num_embeddings=model["vocab_size"], embedding_dim=dim),
        lm_head=Linear.Config(in_features=dim, out_features=model["vocab_size"]),
        layers=[full[i] if layer.get("attention") else linear[i] for i, layer in enumerate(layers)],
        vision_encoder=package._qwen35_vision_encoder_config(
            dim=vision["dim"], ffn_dim=vision["block"]["mlp"]["fc1"]["out_features"], num_layers=vision["num_layers"],
            num_heads=vision["num_heads"], patch_size=vision["patch_size"],
            temporal_patch_size=vision["temporal_patch_size"], spatial_merge_size=vision["spatial_merge_size"],
            out_hidden_size=vision["merger"]["fc2"]["out_features"],
            num_position_embeddings=vision["num_position_embeddings"], in_channels=vision["in_channels"]))
