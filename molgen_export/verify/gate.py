"""The export's logit gate: the whole-model comparison for small models, layer by layer for big ones.

`verify_export` picks the path by the model's size (MoE always whole, for the routing check) and is what the
pipeline calls; `logit_gate` holds the whole-model pieces, `layerwise` the per-layer ones.
"""

from __future__ import annotations

import logging
from pathlib import Path
from typing import Protocol

import torch

from molgen_export.mapping.architecture import Qwen3Arch
from molgen_export.verify.layerwise import layer_params, verify_layerwise
from molgen_export.verify.logit_gate import FidelityResult, fixed_token_batch, prompt_tokens, verify_logits

logger = logging.getLogger(__name__)


WHOLE_MODEL_MAX_PARAMS = 50_000_000
"""Models up to this many parameters are compared whole (two float32 copies: 0.4 GB); bigger ones layer by layer."""
LAYERWISE_LENGTH = 16
"""Tokens per sequence on the layer-wise path: one random sequence and the prompt, each at most this long."""


class TitanSource(Protocol):
    """The checkpoint's tensors under canonical TorchTitan names, rounded to the export dtype (see
    `export_stream.TitanWeights`)."""

    def keys(self) -> list[str]:
        """Every canonical TorchTitan key the checkpoint provides."""

    def read(self, keys: list[str]) -> dict[str, torch.Tensor]:
        """Whole tensors."""

    def fill(self, targets: dict[str, torch.Tensor]) -> None:
        """Copy each named tensor into its (float32) target."""

    def rows(self, key: str, start: int, stop: int) -> torch.Tensor:
        """Rows `start:stop` of a tensor."""


def model_params(arch: Qwen3Arch) -> int:
    """Parameters of the TorchTitan model for this architecture (the head counted even when tied)."""
    return 2 * arch.vocab_size * arch.dim + arch.n_layers * layer_params(arch) + arch.dim


def verify_export(arch: Qwen3Arch, titan: TitanSource, hf_dir: Path, *, tie: bool, vocab_limit: int,
                  tolerance: float, device: str = "cpu", mode: str = "auto", reference=None) -> FidelityResult:
    """Compare the TorchTitan model built from the checkpoint's tensors with the folder just written.

    Args:
        arch: the exported architecture.
        titan: the checkpoint's tensors, rounded to the export dtype (read again, never taken from our output).
        hf_dir: the written folder.
        tie: whether the export tied the head.
        vocab_limit: logits compared on `[:vocab_limit]`.
        tolerance: max|Δ| allowed, relative to max(1, max|TorchTitan value|).
        device: `cpu` or `cuda`.
        mode: `whole`, `layerwise`, or `auto` (whole up to `WHOLE_MODEL_MAX_PARAMS`, MoE always whole).
        reference: the torchtitan model config of the TorchTitan side (from the run's own model config; see
            `reference.build_reference`); None builds it from `arch` (conversions with no run config).

    Returns:
        The figures; `passed` is False when the logits (or, layer-wise, any layer) differ beyond tolerance.
    """
    if mode == "auto":
        small = model_params(arch) <= WHOLE_MODEL_MAX_PARAMS
        mode = "whole" if small or getattr(arch, "moe", None) is not None else "layerwise"
    if mode == "whole":
        keys = [k for k in titan.keys() if not (tie and k == "lm_head.weight")]
        return verify_logits(arch, titan.read(keys), hf_dir, tie=tie, vocab_limit=vocab_limit, tolerance=tolerance,
                             device=device, reference=reference)
    batches = [fixed_token_batch(vocab_limit, batch=1, length=LAYERWISE_LENGTH)]
    prompt = prompt_tokens(hf_dir)[:, :LAYERWISE_LENGTH]
    if prompt.numel() and int(prompt.max()) < arch.vocab_size:
        batches.append(prompt)
    result = verify_layerwise(arch, titan, hf_dir, batches, tie=tie, vocab_limit=vocab_limit, tolerance=tolerance,
                              device=device, reference=reference)
    logger.info("logits: max|Δ| %.3g mean|Δ| %.3g top-1 %.4f over %d tokens (layer-wise)", result.max_abs_diff,
                result.mean_abs_diff, result.top1_agreement, result.tokens)
    return result
