"""Export options: one frozen dataclass shared by the CLI, the watcher, the runner and YAML configs."""

from __future__ import annotations

import re
from dataclasses import dataclass, field
from pathlib import Path

from molgen_export.errors import UsageError

EXPORT_DTYPES = ("bfloat16", "float16", "float32")
LAYOUTS = ("sibling", "beside")
DEFAULT_MAX_SHARD_SIZE = "5GB"

_SIZE_UNITS = {"": 1, "B": 1, "KB": 10**3, "MB": 10**6, "GB": 10**9, "TB": 10**12,
               "KIB": 2**10, "MIB": 2**20, "GIB": 2**30, "TIB": 2**40}


def parse_size(text: str | int) -> int:
    """Parse a byte size such as ``5GB``, ``500MiB`` or ``1024`` (the huggingface_hub spelling).

    Raises:
        UsageError: the text is not a positive size.
    """
    if isinstance(text, int):
        value = text
    else:
        match = re.fullmatch(r"\s*(\d+(?:\.\d+)?)\s*([A-Za-z]*)\s*", str(text))
        unit = match.group(2).upper() if match else None
        if not match or unit not in _SIZE_UNITS:
            raise UsageError(f"cannot read the size {text!r}", hint="write it like 5GB, 500MB or 2GiB")
        value = int(float(match.group(1)) * _SIZE_UNITS[unit])
    if value <= 0:
        raise UsageError(f"size must be positive, got {text!r}")
    return value


@dataclass(frozen=True)
class ExportOptions:
    """How one step is exported. Field names are the YAML keys and, with dashes, the CLI flags.

    The flags are generated from these fields (`molgen_export.cli.flags.add_option_flags`): the type and the default
    from the annotation, the choices from `metadata["choices"]`, the help from the docstring under each field.
    """

    output: Path | None = None
    """Export root; `step-N-hf/` folders go under it. Default: `<checkpoint_root>-hf/` beside the checkpoint folder."""

    layout: str = field(default="sibling", metadata={"choices": LAYOUTS})
    """`sibling` (default, outside the checkpoint folder) or `beside` (`<step-dir>-hf` inside it, unsafe with purging)."""

    dtype: str | None = field(default=None, metadata={"choices": EXPORT_DTYPES})
    """Export dtype; default: the run's compute dtype (`mixed_precision_param`, bfloat16 for standard runs)."""

    config: Path | None = None
    """Run config file to use instead of looking for `<checkpoint_root>/config.json` / `job_config.json`."""

    hf_assets: Path | None = None
    """Base assets folder (Qwen3 config.json + tokenizer) overriding the run config's `hf_assets_path`."""

    max_shard_size: str = DEFAULT_MAX_SHARD_SIZE
    """Largest safetensors shard; larger models are split with a `model.safetensors.index.json`."""

    skip_logits: bool = False
    """Skip the TorchTitan-vs-HF logit comparison (never the default)."""

    logits_atol: float = 1e-3
    """Accepted max|logit difference| between the TorchTitan and the HF model, relative to the logits' scale:
    the limit is `logits_atol * max(1, max|logit|)` (float32, same rounded weights)."""

    device: str = "cpu"
    """Device for the logit comparison: `cpu` or `cuda`."""

    force: bool = False
    """Re-export a step even when an export from the same source already exists."""

    dry_run: bool = False
    """Read metadata and configs only; plan and check, write nothing."""

    allow_expert_bias_drop: bool = False
    """Export a Qwen3 MoE whose load-balancing expert bias is non-zero (routing will differ; recorded as a warning)."""

    drop_vision_tower: bool = False
    """Export a Qwen3.5 run text-only, leaving out its vision-tower tensors (each named in the report). Without it a
    checkpoint with vision weights is refused by name: the multimodal HF export is not implemented."""

    threads: int | None = None
    """torch intra-op threads for the export (unset: torch's own default)."""

    reader_threads: int = 2
    """Threads reading the checkpoint's pieces ahead of the writer (two keep 2 cores busy; a fast NVMe wants more)."""

    extra: dict = field(default_factory=dict)
    """Free-form values recorded in the report (e.g. who started the export)."""

    def __post_init__(self) -> None:
        if self.dtype is not None and self.dtype not in EXPORT_DTYPES:
            raise UsageError(f"unknown export dtype {self.dtype!r}", hint=f"use one of {', '.join(EXPORT_DTYPES)}")
        if self.layout not in LAYOUTS:
            raise UsageError(f"unknown layout {self.layout!r}", hint=f"use one of {', '.join(LAYOUTS)}")
        if self.device not in ("cpu", "cuda") and not self.device.startswith("cuda:"):
            raise UsageError(f"unknown device {self.device!r}", hint="use cpu or cuda")
        if self.logits_atol <= 0:
            raise UsageError("logits_atol must be positive")
        if self.reader_threads < 1:
            raise UsageError(f"reader_threads must be at least 1, got {self.reader_threads}")
        parse_size(self.max_shard_size)
        for name in ("output", "config", "hf_assets"):
            value = getattr(self, name)
            if value is not None and not isinstance(value, Path):
                object.__setattr__(self, name, Path(value))

    @property
    def max_shard_bytes(self) -> int:
        """`max_shard_size` in bytes."""
        return parse_size(self.max_shard_size)
