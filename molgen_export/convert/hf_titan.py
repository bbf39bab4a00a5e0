"""HuggingFace Qwen3 <-> TorchTitan weights.

`import-hf` maps an HF folder through torchtitan's `Qwen3StateDictAdapter.from_hf` into TorchTitan names and writes
them as safetensors or as a DCP checkpoint TorchTitan loads (`checkpoint.initial_load_path`); the TorchTitan model
built from what was written is checked against the HF model's logits. `export-titan` sends TorchTitan-named
safetensors through the DCP export's skeleton (`plan.plan_source` / `export.export_source`), so they get the same
checks, verification, skip rules and refusal of a folder molgen_export did not write as a DCP step.
"""

from __future__ import annotations

import dataclasses
import logging
import time
import warnings
from dataclasses import asdict, dataclass, field
from pathlib import Path

import torch

from molgen_export.mapping import architecture
from molgen_export.verify import checks
from molgen_export.dcp import discover
from molgen_export.pipeline import export, weight_stream
from molgen_export.pipeline.plan import plan_source
from molgen_export.pipeline.timing import Timer
from molgen_export.verify import logit_gate
from molgen_export.mapping import keymap
from molgen_export.mapping import run_config
from molgen_export.hf import safetensors_writer
from molgen_export.hf import publish
from molgen_export.hf.publish import check_output_dir, staged_output
from molgen_export.options import EXPORT_DTYPES, ExportOptions, parse_size
from molgen_export.errors import ConfigError, UsageError
from molgen_export.convert.weights_folder import WeightsFolder, open_weights_folder
from molgen_export.convert.hf_qwen3 import (check_titan_state, decide_tie, dominant_dtype, dtype_name, hf_run_config,
                                            map_hf_to_titan, read_hf_qwen3_config)
from molgen_export.convert.read_back import logits_finding, read_back

logger = logging.getLogger(__name__)

FORMATS = ("safetensors", "dcp")
IMPORT_REPORT = "import_report.json"


@dataclass(frozen=True)
class ImportReport:
    """What `import_hf` did; saved as `import_report.json` beside the weights."""

    source_dir: str
    output_dir: str
    format: str
    """`safetensors` or `dcp`."""
    source_format: str
    """`safetensors` or `bin`."""
    tied: bool
    hf_tensors: int
    """HF tensors read (skipped buffers not counted)."""
    titan_tensors: int
    """TorchTitan tensors written (the tied head counts: TorchTitan's state dict holds it)."""
    skipped: tuple[str, ...]
    dtypes: tuple[str, ...]
    files: tuple[str, ...]
    findings: tuple[dict, ...]
    fidelity: dict | None
    warnings: tuple[str, ...]
    timings: dict[str, float] = field(default_factory=dict)
    versions: dict[str, str] = field(default_factory=dict)

    def to_json(self) -> dict:
        return asdict(self)


@dataclass(frozen=True)
class _ImportPlan:
    """Everything `import_hf` decides before writing."""

    source: WeightsFolder
    hf_config: dict
    arch: architecture.Qwen3Arch
    tie: bool
    mapping: dict[str, str]
    """hf_key -> titan_key for every tensor read (a tied file's lm_head excluded)."""
    skipped: tuple[str, ...]
    findings: tuple[checks.Finding, ...]
    warnings: tuple[str, ...]


def plan_import(hf_dir: Path) -> _ImportPlan:
    """Read headers and config, map every name, resolve and check the architecture; no tensor data is read
    (except the embedding and head when a tied file holds both)."""
    source = open_weights_folder(hf_dir)
    hf_config = read_hf_qwen3_config(source.step_dir)
    dims = architecture.dims_from_hf_config(hf_config)
    stated = architecture.Qwen3Arch(
        vocab_size=dims.vocab_size, dim=dims.dim, n_layers=dims.n_layers, n_heads=dims.n_heads,
        n_kv_heads=dims.n_kv_heads, head_dim=dims.head_dim, hidden_dim=dims.hidden_dim, norm_eps=dims.norm_eps,
        rope_theta=dims.rope_theta, max_seq_len=dims.max_seq_len, tie_word_embeddings=bool(dims.tie_word_embeddings))
    mapping, skipped = map_hf_to_titan({k: e.shape for k, e in source.model.items()}, stated.titan_model_config())
    tie, tie_finding = decide_tie(source, hf_config)
    if tie:
        mapping.pop("lm_head.weight", None)
    titan_shapes = {titan_key: source.model[hf_key].shape for hf_key, titan_key in mapping.items()}
    if tie:
        titan_shapes["lm_head.weight"] = titan_shapes.get("tok_embeddings.weight", ())
    run = hf_run_config(source.step_dir, hf_config, dominant_dtype(source))
    arch, arch_warnings = architecture.resolve_architecture(run, architecture.facts_from_shapes(titan_shapes),
                                                            hf_config)
    findings = (
        checks.check_key_coverage(set(mapping), keymap.expected_hf_keys(arch.n_layers, with_head=not tie)),
        checks.check_embedding_shapes(titan_shapes, arch.vocab_size, arch.dim),
        tie_finding,
        check_titan_state(titan_shapes, arch, tie=tie),
    )
    return _ImportPlan(source, hf_config, arch, tie, mapping, tuple(skipped), findings, tuple(arch_warnings))


def _titan_tensors(plan: _ImportPlan, dtype: torch.dtype | None):
    """`(titan_key, tensor)` in file order, embedding first; the tied head comes right after the embedding."""
    by_titan = {t: h for h, t in plan.mapping.items()}
    order = ["tok_embeddings.weight"] + [t for t in by_titan if t != "tok_embeddings.weight"]
    for titan_key in order:
        tensor = plan.source.read(by_titan[titan_key])
        if dtype is not None and tensor.is_floating_point():
            tensor = tensor.to(dtype)
        yield titan_key, tensor
        if titan_key == "tok_embeddings.weight" and plan.tie:
            yield "lm_head.weight", tensor


def _write_dcp(state: dict[str, torch.Tensor], folder: Path) -> list[str]:
    """A plain model state dict saved with torch.distributed.checkpoint, as TorchTitan's model-only loads read it."""
    import torch.distributed.checkpoint as dcp

    with warnings.catch_warnings():
        warnings.simplefilter("ignore", UserWarning)  # "torch.distributed is not initialized": one process is right
        dcp.save(state, storage_writer=dcp.FileSystemWriter(str(folder)))
    return sorted(p.name for p in folder.iterdir())


def import_hf(hf_dir: Path, output_dir: Path, *, fmt: str = "safetensors", dtype: str | None = None,
              verify: bool = True, logits_atol: float = 1e-3, max_shard_size: str = "5GB",
              force: bool = False) -> ImportReport:
    """Convert an HF Qwen3 folder into TorchTitan-named weights in `output_dir`, verified, published atomically.

    Args:
        hf_dir: HF model folder (safetensors, single or sharded with an index, or `pytorch_model.bin`).
        output_dir: the folder to create (`model.safetensors` or a DCP checkpoint, plus `import_report.json`).
        fmt: `safetensors` or `dcp`.
        dtype: cast floating tensors to this dtype; None keeps each tensor's stored dtype.
        verify: compare the logits of the TorchTitan model built from the written files with the HF model's.
        logits_atol: accepted max|logit difference| relative to max|logit|.
        max_shard_size: largest safetensors file.
        force: replace an existing, non-empty `output_dir`.

    Returns:
        The report (also written as `import_report.json`).

    Raises:
        MolgenExportError: any refusal or failed check; nothing is published then.
    """
    if fmt not in FORMATS:
        raise UsageError(f"unknown format {fmt!r}", hint=f"use one of {', '.join(FORMATS)}")
    if dtype is not None and dtype not in export.DTYPES:
        raise UsageError(f"unknown dtype {dtype!r}", hint=f"use one of {', '.join(EXPORT_DTYPES)}")
    hf_dir, output_dir = Path(hf_dir), Path(output_dir)
    check_output_dir(output_dir, force=force)
    timings: dict[str, float] = {}
    timer = Timer(timings)
    started = time.perf_counter()
    with timer.stage("map"):
        plan = plan_import(hf_dir)
    findings = list(plan.findings)
    checks.raise_on_failures(findings, str(hf_dir))
    cast = export.DTYPES[dtype] if dtype else None
    planned = {t: safetensors_writer.PlannedTensor(t, plan.source.model[h].shape,  # PlannedTensor's `hf_key` holds the TITAN key here
                                      cast if cast and plan.source.model[h].dtype.is_floating_point
                                      else plan.source.model[h].dtype)
               for h, t in plan.mapping.items()}
    if plan.tie:
        planned["lm_head.weight"] = dataclasses.replace(planned["tok_embeddings.weight"], hf_key="lm_head.weight")
    with staged_output(output_dir, force=force) as temp_dir:
        nonfinite: list[tuple[str, str, int, int]] = []
        by_titan = {t: h for h, t in plan.mapping.items()}
        with timer.stage("write"):
            if fmt == "safetensors":
                writer = safetensors_writer.SafetensorsWriter(temp_dir, safetensors_writer.plan_shards(list(planned.values()),
                                                                             parse_size(max_shard_size)))
                try:
                    for titan_key, tensor in _titan_tensors(plan, cast):
                        _count_nonfinite(nonfinite, by_titan.get(titan_key, "lm_head.weight (tied)"), titan_key, tensor)
                        writer.write(titan_key, tensor)
                    findings.append(checks.nonfinite_finding(nonfinite, len(planned)))
                    checks.raise_on_failures(findings, str(hf_dir))
                    files = writer.close()
                except BaseException:
                    writer.abort()
                    raise
            else:
                state = {}
                for titan_key, tensor in _titan_tensors(plan, cast):
                    _count_nonfinite(nonfinite, by_titan.get(titan_key, "lm_head.weight (tied)"), titan_key, tensor)
                    state[titan_key] = tensor
                findings.append(checks.nonfinite_finding(nonfinite, len(planned)))
                checks.raise_on_failures(findings, str(hf_dir))
                files = _write_dcp(state, temp_dir)
                del state
        fidelity_json = None
        with timer.stage("verify"):
            written_finding, titan_state = read_back(temp_dir, fmt, planned, tensors=verify)
            findings.append(written_finding)
            checks.raise_on_failures(findings, str(hf_dir))
            if verify:
                result = verify_import_logits(plan.arch, titan_state, hf_dir, tie=plan.tie, dtype=cast,
                                              tolerance=logits_atol)
                fidelity_json = result.to_json()
                findings.append(logits_finding(result, "TorchTitan (from the written files) vs HF"))
            else:
                findings.append(checks.Finding("logits", True, "skipped (--skip-logits)", warning=True))
            del titan_state
            checks.raise_on_failures(findings, str(hf_dir))
        timings["total"] = round(time.perf_counter() - started, 4)
        report = ImportReport(
            source_dir=str(hf_dir), output_dir=str(output_dir), format=fmt, source_format=plan.source.fmt,
            tied=plan.tie, hf_tensors=len(plan.source.model) - len(plan.skipped),
            titan_tensors=len(planned), skipped=plan.skipped,
            dtypes=tuple(sorted({dtype_name(p.dtype) for p in planned.values()})),
            files=tuple(files) + (IMPORT_REPORT,), findings=tuple(f.to_json() for f in findings),
            fidelity=fidelity_json, warnings=plan.warnings, timings=timings, versions=export.versions())
        publish.write_json(temp_dir / IMPORT_REPORT, report.to_json())
    logger.info("imported %s -> %s (%s, %d tensors) in %.2f s", hf_dir, output_dir, fmt, len(planned), timings["total"])
    return report


def _count_nonfinite(bad: list, hf_key: str, titan_key: str, tensor: torch.Tensor) -> None:
    nan, inf = checks.count_nonfinite(tensor)
    if nan or inf:
        bad.append((titan_key, hf_key, nan, inf))  # nonfinite_finding's order: written key, then HF key


def verify_import_logits(arch: architecture.Qwen3Arch, titan_state: dict[str, torch.Tensor], hf_dir: Path, *,
                         tie: bool, dtype: torch.dtype | None, tolerance: float) -> logit_gate.FidelityResult:
    """TorchTitan model from the written tensors vs the HF model loaded from `hf_dir` (rounded to `dtype` when the
    import cast), float32, on a fixed random batch."""
    titan_model = logit_gate.build_titan_model(arch, titan_state, tie=tie)
    hf_model = logit_gate.load_hf_model(hf_dir)
    if dtype is not None:
        with torch.no_grad():
            for parameter in hf_model.parameters():
                parameter.copy_(parameter.to(dtype).float())
    result = logit_gate.compare_logits(titan_model, hf_model, [logit_gate.fixed_token_batch(arch.vocab_size)],
                                     arch.vocab_size, tolerance=tolerance)
    logger.info("import logits: max|Δ| %.3g mean|Δ| %.3g top-1 %.4f", result.max_abs_diff, result.mean_abs_diff,
                result.top1_agreement)
    return result


def _refuse_hf_names(source: WeightsFolder) -> None:
    hf_named = [k for k in source.model if k == "model.embed_tokens.weight" or ".self_attn." in k]
    if hf_named:
        raise ConfigError(f"{source.step_dir} holds HF-named weights (`{hf_named[0]}`), not TorchTitan names: it "
                          "already is an HF model", path=source.step_dir,
                          hint="load it with transformers directly, or turn it into TorchTitan weights with "
                               "`molgen-export import-hf`")


def export_titan(titan_dir: Path, output_dir: Path, options: ExportOptions) -> export.ExportReport:
    """Export TorchTitan-named safetensors to a verified HF folder through the DCP export pipeline.

    Args:
        titan_dir: folder (or file) of TorchTitan-named safetensors.
        output_dir: the HF folder to create; replaced only with `options.force`.
        options: export options; `hf_assets` (or a run config via `config`) supplies config.json and tokenizer.

    Returns:
        The export report (`written=False` for a dry run).

    Raises:
        MolgenExportError: any refusal or failed check; nothing is published then.
    """
    with weight_stream.torch_threads(options.threads):  # the caller's thread count comes back afterwards
        return _export_titan(Path(titan_dir), Path(output_dir), options)


def _export_titan(titan_dir: Path, output_dir: Path, options: ExportOptions) -> export.ExportReport:
    source = open_weights_folder(titan_dir)
    _refuse_hf_names(source)
    if options.config is not None:
        run = run_config.read_config_file(options.config)
    elif options.hf_assets is not None:
        run = hf_run_config(options.hf_assets, architecture.read_base_hf_config(options.hf_assets),
                            dominant_dtype(source))
    else:
        raise UsageError("export-titan needs the HF assets (config.json and tokenizer) of the model",
                         hint="pass --hf-assets DIR, or --config with the run's job_config.json")
    step = discover.step_number(source.step_dir)
    report = export.ExportReport(source_format="TorchTitan-named safetensors",
                                 step=step if step is not None else -1, step_dir=str(source.step_dir),
                                 output_dir=str(output_dir), versions=export.versions())

    def plan_export(timer: Timer) -> export.ExportPlan:
        fingerprint = report.source_fingerprint = source.fingerprint()
        return plan_source(source, run, options, report, timer, fingerprint=fingerprint)

    # the DCP export's skeleton: same checks, skip rules (all inputs match) and refusal of a folder it did not write
    return export.export_source(report, options, output_dir, plan_export)
