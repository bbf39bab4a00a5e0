"""Verification the conversions share: re-read what was written (safetensors or DCP) against the plan, and turn a
logit comparison into a finding that also fails on NaN/Inf logits."""

from __future__ import annotations

import logging
import math
from pathlib import Path

import torch

from molgen_export.verify import checks
from molgen_export.dcp import read
from molgen_export.verify import logit_gate
from molgen_export.hf import safetensors_writer
from molgen_export.convert.weights_folder import open_weights_folder

logger = logging.getLogger(__name__)


def read_back(folder: Path, fmt: str, planned: dict[str, safetensors_writer.PlannedTensor], *,
              tensors: bool = True) -> tuple[checks.Finding, dict]:
    """Re-open what was written: names, dtypes and shapes as planned, and the tensors (for a logit check).

    Args:
        folder: the folder just written.
        fmt: `safetensors` (model.safetensors or shards with an index) or `dcp`.
        planned: key -> what was meant to be written.
        tensors: also read the tensors back (else only headers and metadata).

    Returns:
        A `written_files` finding and key -> tensor as read from disk (empty without `tensors`).
    """
    if fmt == "safetensors":
        finding = logit_gate.check_written_tensors(folder, planned)
        written = open_weights_folder(folder)
        return finding, {k: written.read(k) for k in written.model} if tensors else {}
    meta = read.read_step_metadata(folder)
    problems = [f"`{k}` missing" for k in sorted(set(planned) - set(meta.model))]
    problems += [f"unplanned `{k}`" for k in sorted(set(meta.model) - set(planned))]
    problems += [f"`{k}` is {meta.model[k].dtype} {list(meta.model[k].shape)}, planned {p.dtype} {list(p.shape)}"
                 for k, p in planned.items() if k in meta.model
                 and (meta.model[k].dtype, tuple(meta.model[k].shape)) != (p.dtype, tuple(p.shape))]
    state = {k: meta.read(k) for k in meta.model} if tensors else {}
    if problems:
        return checks.Finding("written_files", False, "; ".join(problems[:10])), state
    return checks.Finding("written_files", True, f"{len(meta.model)} tensors re-read from the DCP metadata and "
                                                 "shards: names, shapes and dtypes as planned"), state


def logits_finding(result: logit_gate.FidelityResult, label: str, *, finite: bool = True) -> checks.Finding:
    """The `logits` finding of a comparison. Non-finite logits fail it: `logit_gate.compare_logits` folds its
    maximum with Python's `max`, which drops NaN, so only the NaN mean shows them.

    Args:
        result: the comparison.
        label: what was compared with what, for the detail.
        finite: False when the caller saw non-finite logits itself.
    """
    if not finite or not math.isfinite(result.mean_abs_diff):
        return checks.Finding("logits", False, f"{label}: the logits are not finite (NaN/Inf), e.g. from weights "
                                               "that overflowed the dtype")
    return checks.Finding("logits", result.passed,
                          f"{label}: max|Δ| {result.max_abs_diff:.3g} (limit {result.tolerance:.3g}), mean|Δ| "
                          f"{result.mean_abs_diff:.3g}, top-1 agreement {result.top1_agreement:.4f} over "
                          f"{result.tokens} tokens")


def finite_logits(logits: torch.Tensor) -> bool:
    """True when every logit is finite."""
    return bool(torch.isfinite(logits).all())
