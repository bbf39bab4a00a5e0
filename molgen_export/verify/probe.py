"""The mapping probe: the export's own key mapping run on random weights of the checkpoint's shapes.

A barely trained checkpoint hides mapping errors: its norms are still about 1, so swapping q_norm and k_norm (or
two norms of a layer) changes nothing measurable. The probe builds the verifier's TorchTitan model (the run's own
model config) with random weights far from their init values (norm weights in [0.25, 2.5]), names them as the
checkpoint names its tensors, sends them through the same canonicalization and mapping as the export, loads the
result with `AutoModelForCausalLM.from_pretrained` under the exported config.json, and compares logits and MoE
routing. Cheap: a few layers, at most `PROBE_VOCAB` embedding rows and `PROBE_EXPERTS` experts.
"""

from __future__ import annotations

import json
import logging
import tempfile
from pathlib import Path

import torch

from molgen_export.mapping import keymap

logger = logging.getLogger(__name__)

PROBE_VOCAB = 512
"""Embedding rows of the probe model (the mapping of the embedding and head does not depend on their count)."""
PROBE_EXPERTS = 12
"""Experts per MoE layer in the probe (above 10, so that numeric expert order matters)."""
PROBE_SEED = 20261201


def _probe_layers(n_layers: int, moe_layers: tuple[int, ...], whole: bool) -> list[int]:
    """Which layers the probe keeps: all for small models, else the first layer of each kind."""
    if whole:
        return list(range(n_layers))
    dense = [i for i in range(n_layers) if i not in moe_layers]
    return sorted({i for i in (dense[:1] + list(moe_layers[:1])) if i is not None} or {0})


def _randomize(model: torch.nn.Module, generator: torch.Generator) -> None:
    """Every parameter random: matrices N(0, 1/fan_in), vectors (norm weights) uniform in [0.25, 2.5]."""
    with torch.no_grad():
        for name, param in model.named_parameters():
            if param.dim() == 1:
                param.copy_(torch.rand(param.shape, generator=generator) * 2.25 + 0.25)
            else:
                fan_in = param.shape[-1]
                param.copy_(torch.randn(param.shape, generator=generator) / fan_in ** 0.5)


def _fuse_qkv(wq: torch.Tensor, wk: torch.Tensor, wv: torch.Tensor, *, n_heads: int, n_kv_heads: int,
              head_dim: int) -> torch.Tensor:
    """TorchTitan's GQA-interleaved fused layout `[n_kv, heads_per_kv + 2, head_dim, dim]` (for checkpoints that
    store `wqkv`)."""
    per_kv = n_heads // n_kv_heads
    dim = wq.shape[-1]
    q = wq.reshape(n_kv_heads, per_kv, head_dim, dim)
    k = wk.reshape(n_kv_heads, 1, head_dim, dim)
    v = wv.reshape(n_kv_heads, 1, head_dim, dim)
    return torch.cat([q, k, v], dim=1).reshape(-1, dim)


def _checkpoint_names(plan, layers: list[int]) -> dict[str, str]:
    """Canonical TorchTitan key of the probe model -> the key the checkpoint uses for it (layers renumbered)."""
    names: dict[str, str] = {}
    renumber = {old: new for new, old in enumerate(layers)}

    def local(key: str) -> str | None:
        parts = key.split(".")
        if parts[0] != "layers":
            return key
        old = int(parts[1])
        return None if old not in renumber else ".".join(["layers", str(renumber[old]), *parts[2:]])

    for source in plan.sources.values():
        canonical = local(source.grouped_key if source.expert is not None else source.titan_key)
        if canonical is None:
            continue
        checkpoint = source.checkpoint_key
        for part in (f"layers.{old}." for old in renumber):
            if part in checkpoint:
                checkpoint = checkpoint.replace(part, f"layers.{renumber[int(part.split('.')[1])]}.", 1)
                break
        names[canonical] = checkpoint
    return names


def probe_figures(result, layers: list[int], vocab: int, experts: int | None) -> dict:
    """The report's `fidelity.probe` figures of a probe's comparison (`logit_gate.FidelityResult`)."""
    return {"layers": layers, "vocab": vocab, "experts": experts, "tokens": result.tokens,
            "max_abs_diff": result.max_abs_diff, "tolerance": result.tolerance,
            "top1_agreement": result.top1_agreement, "routing_agreement": result.routing_agreement,
            "passed": result.passed}


def run_probe(plan, hf_config: dict, *, tie: bool, tolerance: float, whole: bool, device: str = "cpu") -> dict:
    """Run the export's mapping on random weights and compare TorchTitan with HF on them.

    Args:
        plan: the export plan (`plan.ExportPlan`): its reference config, checkpoint sources and head counts.
        hf_config: the exported `config.json` dict.
        tie: the export's tie decision.
        tolerance: relative logit tolerance, as for the checkpoint's own weights.
        whole: keep every layer (small models) instead of one of each kind.

    Returns:
        Figures for the report: layers, vocab, experts, max|Δ|, top-1, routing agreement, passed.
    """
    from safetensors.torch import save_file

    from molgen_export.verify import logit_gate

    arch = plan.arch
    moe_layers = arch.moe.moe_layers if arch.moe else ()
    layers = _probe_layers(arch.n_layers, moe_layers, whole)
    vocab = min(arch.vocab_size, PROBE_VOCAB)
    experts = min(arch.moe.num_experts, PROBE_EXPERTS) if arch.moe else None
    from molgen_export.mapping import titan

    api = titan.installed()
    config = api.shrink_config(logit_gate.titan_config(plan.reference.config, tie=tie), layers, vocab, experts)
    generator = torch.Generator().manual_seed(PROBE_SEED)
    titan_model = api.build_model(config, "cpu")
    _randomize(titan_model, generator)
    # under canonical names (the installed model's own may be 0.2.1's), as the checkpoint's sources are
    rounded = {keymap.canonical_titan_key(k)[0]: v.detach().to(plan.export_dtype)
               for k, v in titan_model.state_dict().items()}
    titan_model = logit_gate.build_titan_model(config, {k: v.float() for k, v in rounded.items()
                                                      if not k.endswith("expert_bias_E")}, tie=tie)

    # the checkpoint's names for these tensors, then the export's own canonicalization and mapping
    names = _checkpoint_names(plan, layers)
    checkpoint: dict[str, torch.Tensor] = {}
    fused_parts: dict[str, dict[str, torch.Tensor]] = {}
    for key, tensor in rounded.items():
        target = names.get(key)
        if target is None or keymap.TRAINING_BUFFER_RE.match(key):
            continue  # a tied head the checkpoint does not store; MoE training buffers
        fused = keymap.FUSED_QKV_RE.match(keymap.canonical_titan_key(target)[0])
        if fused:
            fused_parts.setdefault(target, {})[key.rsplit(".", 2)[-2]] = tensor
            continue
        checkpoint[target] = tensor
    heads = (arch.n_heads, arch.n_kv_heads, arch.head_dim)
    for target, parts in fused_parts.items():
        checkpoint[target] = _fuse_qkv(parts["wq"], parts["wk"], parts["wv"], n_heads=heads[0], n_kv_heads=heads[1],
                                       head_dim=heads[2])
    shapes, _ = keymap.split_training_buffers({k: tuple(v.shape) for k, v in checkpoint.items()})
    sources, _ = keymap.canonicalize_keys(shapes, n_heads=heads[0], n_kv_heads=heads[1], head_dim=heads[2])
    mapping = keymap.map_to_hf(sources, config)
    hf_state: dict[str, torch.Tensor] = {}
    for key, source in sources.items():
        if tie and source.titan_key == "lm_head.weight":
            continue
        value = checkpoint[source.checkpoint_key]
        if source.part is not None:
            value = keymap.split_fused_qkv(value, source.part, n_heads=heads[0], n_kv_heads=heads[1],
                                           head_dim=heads[2])
        if source.expert is not None:
            value = value[source.expert]
        hf_state[mapping[key]] = value.contiguous()

    probe_config = dict(hf_config)
    kept_moe = [new for new, old in enumerate(layers) if old in moe_layers]
    probe_config.update({"num_hidden_layers": len(layers), "vocab_size": vocab, "max_window_layers": len(layers),
                         "layer_types": ["full_attention"] * len(layers), "tie_word_embeddings": tie})
    for key in ("bos_token_id", "eos_token_id", "pad_token_id"):
        if isinstance(probe_config.get(key), int) and probe_config[key] >= vocab:
            probe_config[key] = None
    if experts is not None:
        probe_config.update({"num_experts": experts, "num_experts_per_tok": min(arch.moe.top_k, experts),
                             "mlp_only_layers": [i for i in range(len(layers)) if i not in kept_moe]})
    with tempfile.TemporaryDirectory(prefix="molgen-probe-") as folder:
        Path(folder, "config.json").write_text(json.dumps(probe_config))
        save_file(hf_state, str(Path(folder, "model.safetensors")), metadata={"format": "pt"})
        hf_model = logit_gate.load_hf_model(Path(folder), device)
    tokens = torch.randint(0, vocab, (2, 16), generator=generator)
    titan_model = titan_model.to(device)
    with logit_gate.RoutingRecorder(titan_model, hf_model) as routing:
        result = logit_gate.compare_logits(titan_model, hf_model, [tokens], vocab, tolerance=tolerance, device=device)
    if routing.layers:
        result = routing.apply(result)
    figures = probe_figures(result, layers, vocab, experts)
    logger.info("mapping probe: layers %s, max|Δ| %.3g (limit %.3g), top-1 %.4f%s", layers, result.max_abs_diff,
                result.tolerance, result.top1_agreement,
                f", routing {result.routing_agreement:.3f}" if result.routing_agreement is not None else "")
    return figures
