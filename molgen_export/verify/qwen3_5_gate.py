"""The logit gate for Qwen3.5 exports: torchtitan's `qwen3_5` modules (the CPU reference, see
`qwen3_5_reference`) against the HF folder as written, on the same tokens and with the same figures and tolerance
rule as the Qwen3 gate.

`verify_qwen3_5_export` picks the path by the text model's parameter count, as `gate.verify_export` does for Qwen3
(`gate.WHOLE_MODEL_MAX_PARAMS`; MoE too, since a Qwen3.5 MoE is never small enough to hold twice): small models
whole (`verify_qwen3_5_logits`: the whole reference against `AutoModelForCausalLM` on the folder), bigger ones
layer by layer (`qwen3_5_layerwise`: one block of each side at a time, the first divergent layer named). Either
way the torchtitan side is the run's own model config with the checkpoint's bytes, never our mapping. For MoE,
as on Qwen3, the experts each MoE layer chooses are compared too (torchtitan's `TokenChoiceTopKRouter` against
HF's `Qwen3_5MoeTopKRouter`, `logit_gate.RoutingRecorder`): the worst layer's share of tokens routed to the same
experts is `routing_agreement`, and below `logit_gate.ROUTING_MIN_AGREEMENT` the gate fails.
"""

from __future__ import annotations

import logging
from dataclasses import asdict, dataclass
from pathlib import Path

import torch

from molgen_export.errors import VerificationError
from molgen_export.verify import gate, logit_gate, qwen3_5_layerwise, qwen3_5_reference

logger = logging.getLogger(__name__)


@dataclass(frozen=True)
class Qwen35Fidelity:
    """The comparison's figures, and how the TorchTitan side computed its Gated DeltaNet layers."""

    result: logit_gate.FidelityResult
    delta_rule_op: str
    """`fla` (torchtitan's own kernels, on CUDA) or `qwen3_5_reference.DELTA_RULE_OP` (the pure-torch op)."""
    fla_placeholders: bool
    """torchtitan's qwen3_5 was imported over placeholder `fla` modules (`fla` is not installed here)."""

    @property
    def mode(self) -> str:
        return self.result.mode

    @property
    def passed(self) -> bool:
        return self.result.passed

    def to_json(self) -> dict:
        return {**asdict(self.result), "delta_rule_op": self.delta_rule_op, "fla_placeholders": self.fla_placeholders}


class _TitanLogits(torch.nn.Module):
    """The reference model behind the `model(tokens) -> logits` call `compare_logits` makes."""

    def __init__(self, model: torch.nn.Module):
        super().__init__()
        self.model = model

    def forward(self, tokens: torch.Tensor) -> torch.Tensor:
        return qwen3_5_reference.forward_logits(self.model, tokens)


def verify_qwen3_5_logits(titan_config, titan_state: dict[str, torch.Tensor], hf_dir: Path, *, vocab_limit: int,
                          tolerance: float, device: str = "cpu", batch: int = 2, length: int = 32) -> Qwen35Fidelity:
    """Build torchtitan's model of `titan_config` with `titan_state` and compare it with the folder `hf_dir`.

    Args:
        titan_config: the run's `Qwen35Model.Config`.
        titan_state: its text-model tensors (TorchTitan names; the vision tower and the expert bias may be left
            out: a missing expert bias routes as zero, as HF does).
        hf_dir: the HF folder written by the export.
        vocab_limit: logits compared on `[:vocab_limit]` (the tokenizer's ids).
        tolerance: allowed max|Δ| relative to max(1, max|logit|).

    Raises:
        VerificationError: transformers loads the folder with missing, unexpected or mismatched keys.
    """
    imported = qwen3_5_reference.import_qwen3_5()
    model = qwen3_5_reference.build_reference_model(titan_config, _with_model_only(titan_config, titan_state),
                                                    device=device)
    hf_model = logit_gate.load_hf_model(hf_dir, device)
    tokens = [logit_gate.fixed_token_batch(vocab_limit, batch=batch, length=length)]
    with logit_gate.RoutingRecorder(model, hf_model) as routing:  # MoE: torchtitan's routers vs HF's gates
        result = logit_gate.compare_logits(_TitanLogits(model), hf_model, tokens, vocab_limit, tolerance=tolerance,
                                           device=device)
    if routing.layers:
        result = routing.apply(result)
    on_fla = not imported.fla_placeholders and str(device).startswith("cuda")
    fidelity = Qwen35Fidelity(result, "fla" if on_fla else qwen3_5_reference.DELTA_RULE_OP,
                              imported.fla_placeholders)
    logger.info("qwen3_5 logits: max|Δ| %.3g (limit %.3g) top-1 %.4f over %d tokens%s; delta rule %s",
                result.max_abs_diff, result.tolerance, result.top1_agreement, result.tokens,
                routing_text(result), fidelity.delta_rule_op)
    return fidelity


def verify_qwen3_5_export(titan_config, titan: gate.TitanSource, hf_dir: Path, *, params: int, vocab_limit: int,
                          tolerance: float, device: str = "cpu", mode: str = "auto") -> Qwen35Fidelity:
    """The Qwen3.5 logit gate on the folder just written, whole or layer by layer.

    Args:
        titan_config: the run's `Qwen35Model.Config`.
        titan: the checkpoint's text-model tensors, rounded to the export dtype (read again from the checkpoint).
        hf_dir: the written folder.
        params: parameters of the exported text model (chooses the path under `mode="auto"`).
        vocab_limit: logits compared on `[:vocab_limit]`.
        tolerance: max|Δ| allowed, relative to max(1, max|torchtitan value|) (per layer too, layer-wise).
        mode: `whole`, `layerwise`, or `auto` (whole up to `gate.WHOLE_MODEL_MAX_PARAMS` parameters).

    Raises:
        VerificationError: the folder does not load (missing, unexpected or mismatched keys or shapes).
    """
    if mode == "auto":
        mode = "whole" if params <= gate.WHOLE_MODEL_MAX_PARAMS else "layerwise"
    if mode == "whole":
        state = {k: v.float() for k, v in titan.read(titan.keys()).items()}
        return verify_qwen3_5_logits(titan_config, state, hf_dir, vocab_limit=vocab_limit, tolerance=tolerance,
                                     device=device)
    if mode != "layerwise":
        raise ValueError(f"mode {mode!r}: whole, layerwise or auto")
    imported = qwen3_5_reference.import_qwen3_5()
    batches = [logit_gate.fixed_token_batch(vocab_limit, batch=1, length=gate.LAYERWISE_LENGTH)]
    prompt = logit_gate.prompt_tokens(hf_dir)[:, :gate.LAYERWISE_LENGTH]
    if prompt.numel() and int(prompt.max()) < vocab_limit:
        batches.append(prompt)
    result = qwen3_5_layerwise.verify_layerwise(titan_config, titan, set(titan.keys()), hf_dir, batches,
                                                vocab_limit=vocab_limit, tolerance=tolerance, device=device)
    on_fla = not imported.fla_placeholders and str(device).startswith("cuda")
    return Qwen35Fidelity(result, "fla" if on_fla else qwen3_5_reference.DELTA_RULE_OP, imported.fla_placeholders)


def _with_model_only(titan_config, titan_state: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    """The state with the vision tower filled from a fresh build when absent: the text logits never read it."""
    if any(k.startswith("vision_encoder.") for k in titan_state):
        return titan_state
    with torch.device("meta"):
        skeleton = qwen3_5_reference.reference_config(titan_config).build()
    filled = dict(titan_state)
    for key, value in skeleton.state_dict().items():
        if key.startswith("vision_encoder.") and key not in filled:
            filled[key] = torch.zeros(value.shape, dtype=torch.float32)
    return filled


def routing_text(result: logit_gate.FidelityResult) -> str:
    """`, same experts chosen for X of tokens (worst MoE layer; 0.9 the least allowed)`; empty for a dense model."""
    if result.routing_agreement is None:
        return ""
    return (f", same experts chosen for {result.routing_agreement:.4f} of tokens (worst MoE layer; "
            f"{logit_gate.ROUTING_MIN_AGREEMENT} the least allowed)")


def require_passed(fidelity: Qwen35Fidelity, hf_dir: Path) -> None:
    """Raise when the gate failed, with the figures.

    Raises:
        VerificationError: max|Δ| beyond the tolerance (or NaN), or a MoE layer whose experts chosen agree for
            fewer than `logit_gate.ROUTING_MIN_AGREEMENT` of the tokens.
    """
    r = fidelity.result
    if not r.passed:
        where = f"; first divergence: {r.first_divergence}" if r.first_divergence else ""
        relation = ">" if not r.max_abs_diff <= r.tolerance else "<="
        raise VerificationError(f"the exported Qwen3.5 folder {hf_dir} computes other logits or routes to other "
                                f"experts than torchtitan's qwen3_5: max|Δ| {r.max_abs_diff:.3g} {relation} "
                                f"{r.tolerance:.3g}, top-1 agreement {r.top1_agreement:.3f} over {r.tokens} tokens"
                                f"{routing_text(r)} ({r.mode}{where}; delta rule: {fidelity.delta_rule_op})",
                                hint="the key map or a tensor layout is wrong (e.g. the torchtitan 0.3.0 adapter's "
                                     "expert layout, or router gate rows out of expert order); nothing should be "
                                     "published")
