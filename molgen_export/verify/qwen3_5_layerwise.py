"""Layer-by-layer logit verification of a Qwen3.5 export, for models too big to hold twice in float32.

Both models are built on the meta device (torchtitan's `qwen3_5` from the run's own model config, with causal SDPA
and the pure-torch delta rule as in `qwen3_5_reference`; HF's model from the folder's `config.json`), and one
layer of each at a time is made real and filled: the torchtitan block from the checkpoint's bytes (rounded to the
export dtype, through the caller's `WeightSource`), the HF decoder layer from the safetensors just written
(`layerwise.HFWeights`). Each side carries its own hidden states from its own embedding rows; they are compared
after every layer and as logits at the end (the head in row blocks), so memory holds one layer of each side and the
first layer where the two diverge is named. Each layer's type (Gated DeltaNet or gated full attention, dense MLP
or MoE) comes from its own config on each side. In a MoE layer the experts torchtitan's router and HF's gate choose
(each on its own side's layer input) are compared too, as the whole-model gate does (`logit_gate.RoutingRecorder`).

Each token row runs alone (torchtitan's Gated DeltaNet folds a batch into one stream without document offsets).
"""

from __future__ import annotations

import gc
import importlib.util
import logging
import time
import types
from pathlib import Path

import torch

from molgen_export.errors import VerificationError
from molgen_export.verify import qwen3_5_reference
from molgen_export.verify.layerwise import (
    HFWeights,
    WeightSource,
    _compare_head,
    _Diff,
    _params,
    embed_both,
    stage_figures,
)
from molgen_export.verify.logit_gate import (
    ROUTING_MIN_AGREEMENT,
    FidelityResult,
    RoutingRecorder,
)

logger = logging.getLogger(__name__)

_ZERO_FILLED = ("moe.expert_bias_E",)
"""Buffers the reference fills with zeros when the checkpoint lacks them (HF routes without a bias)."""


def _real_titan_block(block: torch.nn.Module, prefix: str, titan: WeightSource, available: set[str],
                      device: str, pure_torch: bool) -> torch.nn.Module:
    """Make a meta torchtitan block real in float32 and load the checkpoint's tensors into it (strictly)."""
    from torchtitan.models.common.rope import RoPE

    block.to_empty(device=device)
    block.float()
    for module in block.modules():
        if isinstance(module, RoPE):
            module.init_states(buffer_device=torch.device(device))
    state = block.state_dict(keep_vars=True)
    owned = {**dict(block.named_parameters()), **dict(block.named_buffers())}
    in_place = all(name in owned and state[name] is owned[name] for name in state)
    # the block's own tensors are filled in place (one copy of the layer); else copies, loaded strictly
    targets = ({name: owned[name].data for name in state} if in_place else
               {name: torch.empty(t.shape, dtype=torch.float32, device=device) for name, t in state.items()})
    missing = [prefix + n for n in targets if prefix + n not in available and not n.endswith(_ZERO_FILLED)]
    if missing:
        raise VerificationError(f"the checkpoint lacks {', '.join(missing[:4])}, which torchtitan's qwen3_5 block "
                                f"`{prefix.rstrip('.')}` needs", hint="the checkpoint does not match the run's model "
                                                                      "config; nothing should be published")
    for name in [n for n in targets if prefix + n not in available]:
        targets[name].zero_()
    titan.fill({prefix + name: t for name, t in targets.items() if prefix + name in available})
    if not in_place:
        block.load_state_dict(targets, strict=True)  # the RoPE cache is a non-persistent buffer, made above
    if pure_torch:
        qwen3_5_reference.use_pure_torch_delta_rule(block)
    if getattr(block, "moe_enabled", False):
        from molgen_export.mapping import titan as titan_api

        titan_api.installed().float32_experts(block)  # torchtitan's grouped GEMMs run in bf16 whatever the dtype
    return block.eval()


def _real_hf_module(module: torch.nn.Module, prefix: str, hf: HFWeights, device: str) -> torch.nn.Module:
    module.to_empty(device=device)
    module.float()
    hf.fill(_params(module, prefix))
    return module.eval()


def verify_layerwise(titan_config, titan: WeightSource, titan_keys: set[str], hf_dir: Path,
                     batches: list[torch.Tensor], *, vocab_limit: int, tolerance: float,
                     device: str = "cpu") -> FidelityResult:
    """Compare torchtitan's qwen3_5 model (weights from `titan`) with the written folder, one layer at a time.

    Args:
        titan_config: the run's `Qwen35Model.Config` (the torchtitan side is built from it alone).
        titan: the checkpoint's tensors under canonical TorchTitan names, rounded to the export dtype.
        titan_keys: the keys `titan` provides (a missing MoE expert bias routes as zero, as HF does).
        hf_dir: the written folder (the HF side is built from its `config.json` and filled from its files).
        batches: token id rows `[1, L]` each (every row runs alone).
        vocab_limit: logits compared on `[:vocab_limit]`.
        tolerance: a stage passes when max|Δ| <= tolerance * max(1, max|torchtitan value|).
        device: where the layers run (on CUDA with `fla` installed, torchtitan's own kernels run).

    Returns:
        A `FidelityResult` with `mode="layerwise"`, per-stage figures (`embedding`, `layer N`), the first stage
        beyond tolerance (or `logits`), and for MoE the per-layer routing agreement and its worst (`passed` is
        False below `ROUTING_MIN_AGREEMENT`).

    Raises:
        VerificationError: the files lack a tensor or have a wrong shape; the checkpoint lacks a block tensor.
    """
    from transformers import AutoConfig, AutoModelForCausalLM

    qwen3_5_reference.import_qwen3_5()
    began = time.perf_counter()
    hf_config = AutoConfig.from_pretrained(hf_dir)
    hf = HFWeights(hf_dir)
    with torch.device("meta"):
        titan_model = qwen3_5_reference.reference_config(titan_config).build()
        hf_model = AutoModelForCausalLM.from_config(hf_config, attn_implementation="sdpa")
    n_layers = len(titan_model.layers)
    if n_layers != hf_config.num_hidden_layers:
        raise VerificationError(f"{hf_dir}/config.json has {hf_config.num_hidden_layers} layers, the run's model "
                                f"{n_layers}", hint="the export does not match its run; this is a bug, please report it")
    pure_torch = importlib.util.find_spec("fla") is None or not str(device).startswith("cuda")
    rotary = type(hf_model.model.rotary_emb)(hf_config).to(device)
    stages: list[_Diff] = []
    routing: list[dict] = []
    with torch.no_grad():
        titan_h, hf_h, stage = embed_both(titan, hf, batches, device)
        stages.append(stage)
        positions = [torch.arange(b.shape[1], device=device).unsqueeze(0).expand(b.shape[0], -1) for b in batches]
        rope = [rotary(h, p) for h, p in zip(hf_h, positions)]
        for layer in range(n_layers):
            titan_block = _real_titan_block(titan_model.layers[str(layer)], f"layers.{layer}.", titan, titan_keys,
                                            device, pure_torch)
            hf_layer = _real_hf_module(hf_model.model.layers[layer], f"model.layers.{layer}.", hf, device)
            stage = _Diff(f"layer {layer}")
            # MoE: the experts torchtitan's router and HF's gate choose, each on its own side's layer input
            with RoutingRecorder(titan_block, hf_layer) as recorder:
                for b in range(len(batches)):
                    titan_h[b] = titan_block(titan_h[b], None, positions[b])
                    out = hf_layer(hf_h[b], position_embeddings=rope[b], attention_mask=None,
                                   position_ids=positions[b])
                    hf_h[b] = out[0] if isinstance(out, tuple) else out
                    stage.update(titan_h[b], hf_h[b])
            routing += [{**figures, "moe_layer": len(routing), "layer": layer} for figures in recorder.layers]
            stages.append(stage)
            # this layer's weights go now (collected: the delta-rule and expert patches are bound methods, cycles)
            titan_model.layers[str(layer)] = torch.nn.Identity()
            hf_model.model.layers[layer] = torch.nn.Identity()
            del titan_block, hf_layer, recorder
            gc.collect()
            logger.debug("layer %d: max|Δ| %.3g", layer, stage.max_abs_diff)
        titan_norm = titan_model.norm.to_empty(device=device).float()
        titan.fill({"norm.weight": titan_norm.weight.data})
        hf_norm = _real_hf_module(hf_model.model.norm, "model.norm.", hf, device)
        titan_n = [titan_norm(h) for h in titan_h]
        hf_n = [hf_norm(h) for h in hf_h]
        hf_head = "model.embed_tokens.weight" if hf_config.tie_word_embeddings else "lm_head.weight"
        logits = _compare_head(titan, hf, titan_n, hf_n, vocab_limit, device,
                               types.SimpleNamespace(dim=hf_config.hidden_size),
                               titan_head="lm_head.weight", hf_head=hf_head)
    layers, first, limit = stage_figures(stages, logits, tolerance)
    tokens = sum(b.numel() for b in batches)
    worst = min((r["same_experts"] for r in routing), default=None)
    logger.info("qwen3_5 layer-wise verification: %d layers in %.1f s%s%s", n_layers, time.perf_counter() - began,
                f"; first divergence: {first}" if first else "",
                f"; same experts for {worst:.4f} of tokens (worst MoE layer)" if worst is not None else "")
    return FidelityResult(max_abs_diff=logits["max_abs_diff"],
                          mean_abs_diff=logits["sum_abs_diff"] / max(1, logits["count"]),
                          top1_agreement=logits["agree"] / max(1, tokens), logit_scale=logits["scale"],
                          tolerance=limit, tokens=tokens, sequences=sum(b.shape[0] for b in batches), device=device,
                          passed=first is None and (worst is None or worst >= ROUTING_MIN_AGREEMENT),
                          mode="layerwise", stages=layers, first_divergence=first, routing=routing,
                          routing_agreement=worst)
