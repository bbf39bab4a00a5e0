"""molgen_export: every TorchTitan Qwen3 checkpoint as a verified HuggingFace folder.

The public API (imported on first use, so `import molgen_export` stays light)::

    from molgen_export import export_step, ExportOptions
    report = export_step("outputs/checkpoint/step-1800", ExportOptions(dtype="bfloat16"))
    assert report.status == "exported"

`plan_step` is the dry run; `run_preflight` proves a job config exportable before training; every refusal is a
`MolgenExportError` (its `exit_code` is the CLI's).
"""

from __future__ import annotations

import importlib

_PUBLIC = {
    "export_step": "molgen_export.pipeline.export",
    "plan_step": "molgen_export.pipeline.export",
    "ExportReport": "molgen_export.pipeline.export",
    "ExportOptions": "molgen_export.options",
    "run_preflight": "molgen_export.verify.preflight",
    "PreflightResult": "molgen_export.verify.preflight",
    **{name: "molgen_export.errors" for name in (
        "MolgenExportError", "UsageError", "ConfigError", "CheckpointNotReadyError", "CheckpointFormatError",
        "UnsafeCheckpointError", "SourceVanishedError", "MappingError", "VerificationError", "OutputError",
        "StepLockedError", "DependencyError")},
}

__all__ = sorted(_PUBLIC)


def __getattr__(name: str):
    module = _PUBLIC.get(name)
    if module is None:
        raise AttributeError(f"module 'molgen_export' has no attribute {name!r}")
    value = getattr(importlib.import_module(module), name)
    globals()[name] = value
    return value


def __dir__() -> list[str]:
    return sorted(set(globals()) | set(__all__))
