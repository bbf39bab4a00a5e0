"""The export report: what one export did (`ExportReport`, saved as `export_report.json`) and the model card
(`README.md`) made from it."""

from __future__ import annotations

from dataclasses import asdict, dataclass, field
from pathlib import Path

from molgen_export.options import ExportOptions

REPORT_FILE = "export_report.json"


@dataclass
class ExportReport:
    """What one export did (or, with `written=False`, would do). Saved as `export_report.json`."""

    step: int
    step_dir: str
    output_dir: str
    written: bool = False
    source_format: str = "TorchTitan DCP checkpoint"
    """What the weights were read from (the model card says it)."""
    status: str = "planned"
    """`exported`, `planned` (dry run), `skipped` (already exported from the same source) or `failed`."""
    source_fingerprint: str = ""
    output_inputs: dict = field(default_factory=dict)
    """What decides the bytes of this export (`export.output_inputs`): an export is skipped only when all match."""
    options: dict = field(default_factory=dict)
    """The export options this report was made with (paths as strings; `extra` left out)."""
    replaced: list[str] = field(default_factory=list)
    """Why an earlier export of this step was replaced: the `output_inputs` that changed (or `--force`)."""
    run_config: dict = field(default_factory=dict)
    hf_assets: str = ""
    hf_assets_overridden: bool = False
    checkpoint_dtype: str = ""
    export_dtype: str = ""
    tied: bool | None = None
    tensors: int = 0
    hf_tensors: int = 0
    hf_tensors_untied: int | None = None
    """Dry run only: the HF tensor count should the stored head turn out to differ from the embedding."""
    model_bytes: int = 0
    other_bytes: int = 0
    """Optimizer, scheduler, dataloader and train-state bytes in the step (never read)."""
    bytes_read: int = 0
    """Shard bytes the export read (model tensors only; headers of their items included)."""
    read_paths: dict[str, int] = field(default_factory=dict)
    """Chunks read per path: `direct` (in place), `torch.load` (record not understood), `dcp` (public DCP reader)."""
    verify_bytes_read: int = 0
    """Shard bytes the logit check read again (the reference comes from the checkpoint, not from our output)."""
    output_bytes: int = 0
    files: list[str] = field(default_factory=list)
    key_rules: dict[str, int] = field(default_factory=dict)
    architecture: dict = field(default_factory=dict)
    reference: dict = field(default_factory=dict)
    """What the verifier's TorchTitan model was built from, and how many run-config fields were mapped, required
    or irrelevant (see `reference.RULES`); `planned` says when the plan was made before torchtitan was imported
    and confirmed with it (`plan.confirm_plan`)."""
    findings: list[dict] = field(default_factory=list)
    fidelity: dict | None = None
    warnings: list[str] = field(default_factory=list)
    timings: dict[str, float] = field(default_factory=dict)
    versions: dict[str, str] = field(default_factory=dict)
    error: str | None = None

    def to_json(self) -> dict:
        return asdict(self)

    @property
    def ok(self) -> bool:
        return self.status in ("exported", "planned", "skipped") and all(f["ok"] for f in self.findings)


def versions() -> dict[str, str]:
    """Versions of the libraries that shaped the export."""
    import importlib.metadata as md

    found = {}
    for name in ("molgen-export", "torch", "torchtitan", "transformers", "safetensors"):
        try:
            found[name] = md.version(name)
        except md.PackageNotFoundError:
            found[name] = "not installed"
    return found


def options_record(options: ExportOptions) -> dict:
    """The options as the report records them: JSON values, paths as strings, `extra` left out."""
    return {name: str(value) if isinstance(value, Path) else value
            for name, value in options.__dict__.items() if name != "extra"}


def _provenance(report: ExportReport) -> str:
    parts = ([f"step {report.step}"] if report.step >= 0 else []) + (
        [f"source fingerprint `{report.source_fingerprint[:16]}`"] if report.source_fingerprint else [])
    return f" ({', '.join(parts)})" if parts else ""


def _base_card_metadata(assets: Path) -> dict[str, str]:
    """`license`, `base_model`, `pipeline_tag`... from the YAML front matter of the base assets' README.md (the
    released model's card), as plain one-line values; nothing when there is no card."""
    try:
        text = (assets / "README.md").read_text()
    except (OSError, UnicodeDecodeError):
        return {}
    if not text.startswith("---"):
        return {}
    found: dict[str, str] = {}
    for line in text.split("\n")[1:]:
        if line.strip() == "---":
            break
        key, _, value = line.partition(":")
        value = value.strip()
        if key in ("license", "license_name", "license_link", "base_model", "pipeline_tag") and value:
            found[key] = value
    return found


def _relative_to_run(path: str, step_dir: str) -> str:
    """`path` as seen from the run folder above the checkpoint folder (the card's other paths are relative too)."""
    import os

    try:
        return os.path.relpath(path, Path(step_dir).resolve().parent.parent)
    except ValueError:
        return path


def model_card(report: ExportReport) -> str:
    """A README.md for the export: where it came from, what was checked, how well it matches."""
    base = _base_card_metadata(Path(report.hf_assets)) if report.hf_assets else {}
    moe = bool((report.architecture or {}).get("moe"))
    lines = ["---", "library_name: transformers", f"pipeline_tag: {base.get('pipeline_tag', 'text-generation')}"]
    lines += [f"{key}: {base[key]}" for key in ("license", "license_name", "license_link", "base_model") if key in base]
    lines += [f"tags: [{'qwen3_moe' if moe else 'qwen3'}, torchtitan, molgen-export]", "---"]
    lines += [
        f"# {Path(report.step_dir).parent.parent.name or 'run'} / {Path(report.step_dir).name}",
        "",
        f"Exported by molgen_export {report.versions.get('molgen-export', '?')} from the {report.source_format} "
        f"`{report.step_dir}`{_provenance(report)}.",
        "",
        f"- dtype: checkpoint {report.checkpoint_dtype} -> export {report.export_dtype}",
        f"- tied embeddings: {report.tied}",
        f"- run config: `{report.run_config.get('path')}` ({report.run_config.get('kind')})",
        f"- base assets: `{_relative_to_run(report.hf_assets, report.step_dir)}`"
        f"{' (overridden with --hf-assets)' if report.hf_assets_overridden else ''}",
        "",
        "## Checks",
        "",
        "| check | result | detail |",
        "|---|---|---|",
    ]
    for finding in report.findings:
        result = "ok" if finding["ok"] else "FAILED"
        if finding.get("warning"):
            result += " (warning)"
        lines.append(f"| {finding['name']} | {result} | {finding['detail'].replace('|', chr(92) + '|')} |")
    if report.fidelity:
        fid = report.fidelity
        lines += ["", "## Fidelity", "",
                  f"TorchTitan model vs this folder loaded with transformers, float32, {fid['tokens']} tokens in "
                  f"{fid['sequences']} sequences: max|Δlogit| {fid['max_abs_diff']:.3g}, mean {fid['mean_abs_diff']:.3g}, "
                  f"top-1 agreement {fid['top1_agreement']:.4f}."]
    if report.warnings:
        lines += ["", "## Warnings", ""] + [f"- {w}" for w in report.warnings]
    lines += ["", "## Load", "", "```python", "from transformers import AutoModelForCausalLM, AutoTokenizer",
              'model = AutoModelForCausalLM.from_pretrained(path, dtype="auto")',
              "tokenizer = AutoTokenizer.from_pretrained(path)", "```", ""]
    return "\n".join(lines)
