"""The Qwen3.5 mapping probe: the export's own map (`mapping.qwen3_5.to_hf_text`) run on random weights of the run's
model, so a swap a barely trained checkpoint hides is still caught.

A fresh or barely trained Qwen3.5 has every OffsetRMSNorm weight near 0 (the scale is 1 + w), the same in q_norm and
k_norm, in every layer's two norms: a map that swaps them computes the same logits on such weights. The probe
builds torchtitan's qwen3_5 of the run's own model config (shrunk: a few layers, at most `PROBE_VOCAB` vocabulary
rows and `PROBE_EXPERTS` experts, a token-sized vision tower the text logits never read), gives every parameter a
random value far from its init (vectors uniform in [0.25, 2.5], matrices N(0, 1/fan_in)), rounds them to the export
dtype, maps them with the export's map, loads the result with `AutoModelForCausalLM` under the exported
`config.json` (the shrunk fields changed) and compares the logits with torchtitan's own modules (`qwen3_5_reference`:
the pure-torch delta rule off CUDA).
"""

from __future__ import annotations

import copy
import dataclasses
import json
import logging
import tempfile
from pathlib import Path

import torch

from molgen_export.mapping import qwen3_5 as qmap
from molgen_export.mapping.qwen3_5_config import TOKEN_ID_FIELDS
from molgen_export.verify import logit_gate, qwen3_5_gate, qwen3_5_reference
from molgen_export.verify.probe import (
    PROBE_EXPERTS,
    PROBE_SEED,
    PROBE_VOCAB,
    probe_figures,
)

logger = logging.getLogger(__name__)


def probe_layers(layer_types: list[str], whole: bool) -> list[int]:
    """All layers for small models, else the first Gated DeltaNet and the first full-attention layer."""
    if whole:
        return list(range(len(layer_types)))
    firsts = {kind: layer_types.index(kind) for kind in ("linear_attention", "full_attention") if kind in layer_types}
    return sorted(firsts.values())


def _set_experts(config, experts: int, top_k: int) -> None:
    """Every `num_experts` under an MoE config to `experts` (router, dispatcher, grouped experts), its top-k to
    at most that, the router's gate to `experts` rows."""
    for item in dataclasses.fields(config):
        value = getattr(config, item.name)
        if item.name == "num_experts":
            setattr(config, item.name, experts)
        elif item.name == "top_k":
            setattr(config, item.name, top_k)
        elif dataclasses.is_dataclass(value) and not isinstance(value, type):
            _set_experts(value, experts, top_k)
    router = getattr(config, "router", None)
    if router is not None and hasattr(router, "gate"):
        router.gate.out_features = experts


def shrink_config(titan_config, layers: list[int], vocab: int, experts: int | None):
    """A copy of the run's `Qwen35Model.Config` with only `layers`, `vocab` rows, `experts` experts per MoE layer,
    and a token-sized vision tower."""
    package = qwen3_5_reference.import_qwen3_5().package
    config = copy.deepcopy(titan_config)
    config.layers = [config.layers[i] for i in layers]
    config.vocab_size = vocab
    config.tok_embeddings.num_embeddings = vocab
    config.lm_head.out_features = vocab
    config.vision_encoder = package._qwen35_vision_encoder_config(
        dim=16, ffn_dim=16, num_layers=1, num_heads=1, patch_size=2, temporal_patch_size=1, spatial_merge_size=1,
        out_hidden_size=config.dim, num_position_embeddings=4)
    for layer in config.layers:
        if layer.moe is not None and experts is not None:
            _set_experts(layer.moe, experts, min(layer.moe.router.top_k, experts))
    return config


def _randomize(model: torch.nn.Module, generator: torch.Generator) -> None:
    """Every text-model parameter random: vectors (norm weights, A_log, dt_bias) uniform in [0.25, 2.5], matrices
    N(0, 1/fan_in) (fan_in: the last dim; a conv's kernel)."""
    with torch.no_grad():
        for name, param in model.named_parameters():
            if name.startswith("vision_encoder."):
                continue
            if param.dim() == 1:
                param.copy_(torch.rand(param.shape, generator=generator) * 2.25 + 0.25)
            else:
                param.copy_(torch.randn(param.shape, generator=generator) / param.shape[-1] ** 0.5)


def run_probe(titan_config, hf_config: dict, dtype: torch.dtype, *, tolerance: float, whole: bool,
              device: str = "cpu") -> dict:
    """Run the export's Qwen3.5 map on random weights and compare torchtitan with HF on them.

    Args:
        titan_config: the run's `Qwen35Model.Config`.
        hf_config: the exported `config.json` dict.
        dtype: the export dtype (the random weights are rounded to it, as the checkpoint's are).
        tolerance: relative logit tolerance, as for the checkpoint's own weights.
        whole: keep every layer (small models) instead of one of each kind.

    Returns:
        Figures for the report: layers, vocab, experts, tokens, max|Δ|, tolerance, top-1, routing agreement (the
        worst MoE layer's share of tokens sent to the same experts; None for a dense model), passed.

    Raises:
        VerificationError: the mapped probe does not load (missing, unexpected or mismatched keys).
    """
    from safetensors.torch import save_file

    layer_types = list(hf_config["layer_types"])
    layers = probe_layers(layer_types, whole)
    vocab = min(hf_config["vocab_size"], PROBE_VOCAB)
    experts = min(hf_config["num_experts"], PROBE_EXPERTS) if "num_experts" in hf_config else None
    config = shrink_config(titan_config, layers, vocab, experts)
    generator = torch.Generator().manual_seed(PROBE_SEED)
    model = qwen3_5_reference.build_reference_model(config)
    _randomize(model, generator)
    rounded = {k: v.detach().to(dtype) for k, v in model.state_dict().items()}
    del model
    hf_sd, _ = qmap.to_hf_text(rounded, text_only=True)  # the map under test
    titan_model = qwen3_5_reference.build_reference_model(config, {k: v.float() for k, v in rounded.items()},
                                                          device=device)
    probe_config = dict(hf_config)
    probe_config.update({"num_hidden_layers": len(layers), "layer_types": [layer_types[i] for i in layers],
                         "vocab_size": vocab, "tie_word_embeddings": False, "dtype": "float32"})
    for key in TOKEN_ID_FIELDS:
        if isinstance(probe_config.get(key), int) and probe_config[key] >= vocab:
            probe_config[key] = None
    if experts is not None:
        probe_config.update({"num_experts": experts,
                             "num_experts_per_tok": min(hf_config["num_experts_per_tok"], experts)})
    with tempfile.TemporaryDirectory(prefix="molgen-probe-") as folder:
        Path(folder, "config.json").write_text(json.dumps(probe_config))
        save_file({k: v.contiguous() for k, v in hf_sd.items()}, str(Path(folder, "model.safetensors")),
                  metadata={"format": "pt"})
        hf_model = logit_gate.load_hf_model(Path(folder), device)
    tokens = torch.randint(0, vocab, (2, 16), generator=generator)
    with logit_gate.RoutingRecorder(titan_model, hf_model) as routing:  # MoE: a permuted gate routes elsewhere
        result = logit_gate.compare_logits(qwen3_5_gate._TitanLogits(titan_model), hf_model, [tokens], vocab,
                                           tolerance=tolerance, device=device)
    if routing.layers:
        result = routing.apply(result)
    figures = probe_figures(result, layers, vocab, experts)
    logger.info("qwen3_5 mapping probe: layers %s, max|Δ| %.3g (limit %.3g), top-1 %.4f%s", layers,
                result.max_abs_diff, result.tolerance, result.top1_agreement,
                f", same experts {result.routing_agreement:.4f}" if result.routing_agreement is not None else "")
    return figures

