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
import logging
import sys
import types
from dataclasses import dataclass

import torch
import torch.nn.functional as F

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
    for start, end in zip(bounds[:-1], bounds[1:]):
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
