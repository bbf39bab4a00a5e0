"""How an export report reads on one terminal line: the CLI, the watcher, the runner and the hooks print it."""

from __future__ import annotations

from pathlib import Path

_SHORT_DTYPES = {"bfloat16": "bf16", "float16": "fp16", "float32": "fp32"}


def format_size(n: int) -> str:
    """`1.23 GB` from 100 MB up, else `4.56 MB`."""
    return f"{n / 1e9:.2f} GB" if n >= 1e8 else f"{n / 1e6:.2f} MB"


def summary_line(report) -> str:
    """One line per step: `step-20  ok  1.23 GB  bf16  logits max|Δ| 3e-06  12.4 s  -> path`.

    Args:
        report: an `ExportReport` (exported, planned, skipped or failed).
    """
    name = Path(report.step_dir).name
    if report.status == "failed":
        first = (report.error or "").splitlines()[0] if report.error else ""
        return f"{name}  FAILED  {first}"
    parts = [name, {"exported": "ok", "planned": "plan", "skipped": "skip"}.get(report.status, report.status)]
    if report.status == "skipped":
        return f"{name}  skip  already exported from this checkpoint  -> {report.output_dir}"
    parts.append(format_size(report.output_bytes or report.model_bytes))
    parts.append(_SHORT_DTYPES.get(report.export_dtype, report.export_dtype))
    if report.fidelity:
        parts.append(f"logits max|Δ| {report.fidelity['max_abs_diff']:.2g}")
    if "total" in report.timings:
        parts.append(f"{report.timings['total']:.1f} s")
    parts.append(f"-> {report.output_dir}")
    return "  ".join(parts)
