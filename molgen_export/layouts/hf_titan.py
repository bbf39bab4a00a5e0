"""HuggingFace Qwen3 <-> TorchTitan weights.

`import-hf` maps an HF folder through torchtitan's `Qwen3StateDictAdapter.from_hf` into TorchTitan names and writes
them as safetensors or as a DCP checkpoint TorchTitan loads (`checkpoint.initial_load_path`); the TorchTitan model
built from what was written is checked against the HF model's logits. `export-titan` sends TorchTitan-named
safetensors through the DCP export pipeline (`export.plan_source` / `export.export_planned`), so they get the same
checks and verification as a DCP step.
"""

from __future__ import annotations

import argparse
import dataclasses
import json
import logging
import re
import time
import warnings
from dataclasses import asdict, dataclass, field
from pathlib import Path

import torch

from molgen_export import architecture, checks, discover, export, fidelity, naming, run_config, write
from molgen_export.config import EXPORT_DTYPES, ExportOptions, parse_size
from molgen_export.errors import ConfigError, MappingError, UsageError
from molgen_export.layouts.folder_read import WeightsFolder, open_weights_folder
from molgen_export.layouts.output import check_output_dir, staged_output

logger = logging.getLogger(__name__)

FORMATS = ("safetensors", "dcp")
IMPORT_REPORT = "import_report.json"
HF_CONFIG_KIND = "hf-config"
"""`RunConfig.kind` of a run config made from an HF `config.json` (no TorchTitan job config involved)."""

SKIPPED_HF_KEYS: tuple[tuple[re.Pattern, str], ...] = (
    # Rotary inverse frequencies: a buffer recomputed from rope_theta that old transformers versions saved.
    (re.compile(r"(^|\.)rotary_emb\.inv_freq$"), "rotary inv_freq buffer"),
)

IMPORT_HF_EPILOG = """\
examples:
  molgen-export import-hf Qwen/Qwen3-0.6B-local titan-init --format dcp
      -> a DCP checkpoint; start TorchTitan from it with checkpoint.initial_load_path=/abs/path/titan-init
  molgen-export import-hf hf-model titan-weights                 (TorchTitan-named model.safetensors)
  molgen-export import-hf hf-model titan-weights --dtype bfloat16 --force

The TorchTitan model built from the written files is compared with the HF model on fixed tokens (float32);
--skip-logits turns that off. Exit codes: 0 written and verified, 1 a check or the logit comparison failed,
2 bad input or config.
"""

EXPORT_TITAN_EPILOG = """\
examples:
  molgen-export export-titan titan-weights --output hf-out --hf-assets Qwen3-0.6B-assets
  molgen-export export-titan titan-weights --output hf-out --config outputs/job_config.json --dtype bfloat16
  molgen-export export-titan titan-weights --output hf-out --hf-assets assets --dry-run

TITAN_DIR holds TorchTitan-named safetensors (model.safetensors, or shards with an index). The export runs the
DCP pipeline's checks, writes the HF folder and compares TorchTitan and HF logits before publishing.
"""


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


def read_hf_qwen3_config(folder: Path) -> dict:
    """The folder's `config.json` as transformers resolves it (defaults filled in), checked to be a dense Qwen3.

    Raises:
        ConfigError: missing, not Qwen3, MoE, or a RoPE variant TorchTitan's Qwen3 does not implement.
    """
    from transformers import Qwen3Config

    raw = architecture.read_base_hf_config(folder)
    path = folder / "config.json"
    model_type = raw.get("model_type")
    if model_type != "qwen3":
        raise ConfigError(f"{path} has model_type={model_type!r}; this conversion handles dense Qwen3 (`qwen3`) only",
                          path=path, hint="qwen3_moe and other families are not supported by import-hf yet")
    resolved = Qwen3Config.from_dict({k: v for k, v in raw.items() if k != "transformers_version"}).to_dict()
    rope = resolved.get("rope_parameters") or {}
    if rope.get("rope_type", "default") != "default":
        raise ConfigError(f"{path} uses rope_type={rope.get('rope_type')!r}; TorchTitan's Qwen3 implements plain "
                          "RoPE (CosSinRoPE) only, so the imported model would compute different logits",
                          path=path, hint="import a model with default RoPE")
    return resolved


def hf_run_config(folder: Path, hf_config: dict, dtype: str) -> run_config.RunConfig:
    """A `RunConfig` that says what an HF folder says: no dims of its own (the shapes and `config.json` decide),
    the folder as assets and tokenizer, `dtype` as the training dtype."""
    return run_config.RunConfig(
        source=folder / "config.json", kind=HF_CONFIG_KIND, model_name="qwen3", flavor=None,
        dims=run_config.ModelDims(), seq_len=None, training_dtype=dtype, mixed_precision_param=dtype,
        hf_assets_path=folder, tokenizer_path=folder, keep_latest_k=None, checkpoint_folder=None, launch_dir=None,
        job_config_path=None)


def _dtype_name(dtype: torch.dtype) -> str:
    return str(dtype).removeprefix("torch.")


def _dominant_dtype(source: WeightsFolder) -> str:
    counts: dict[str, int] = {}
    for entry in source.model.values():
        if entry.dtype.is_floating_point:
            counts[_dtype_name(entry.dtype)] = counts.get(_dtype_name(entry.dtype), 0) + entry.stored_bytes
    return max(counts, key=counts.get) if counts else "float32"


def map_hf_to_titan(hf_shapes: dict[str, tuple[int, ...]], titan_model_config) -> tuple[dict[str, str], list[str]]:
    """TorchTitan key of every HF key, through torchtitan's `Qwen3StateDictAdapter.from_hf`, one key at a time.

    Returns:
        hf_key -> titan_key, and the HF keys skipped on purpose (rotary `inv_freq` buffers).

    Raises:
        MappingError: HF keys the adapter does not know (a dense Qwen3 has no such tensor), naming each.
    """
    from torchtitan.models.qwen3 import Qwen3StateDictAdapter

    adapter = Qwen3StateDictAdapter(dataclasses.replace(titan_model_config, enable_weight_tying=False), None)
    mapping: dict[str, str] = {}
    skipped: list[str] = []
    unmapped: list[str] = []
    for hf_key, shape in hf_shapes.items():
        if any(pattern.search(hf_key) for pattern, _ in SKIPPED_HF_KEYS):
            skipped.append(hf_key)
            continue
        try:
            produced = adapter.from_hf({hf_key: torch.empty(shape, device="meta")})
        except (KeyError, AssertionError, StopIteration):
            produced = {}
        if len(produced) != 1:
            unmapped.append(hf_key)
            continue
        (titan_key,) = produced
        mapping[hf_key] = titan_key
    if unmapped:
        raise MappingError(f"{len(unmapped)} HF tensor(s) have no TorchTitan Qwen3 parameter: "
                           + ", ".join(sorted(unmapped)[:10]) + (" ..." if len(unmapped) > 10 else ""),
                           hint="the folder holds tensors a dense Qwen3 does not have (another family, MoE, "
                                "biases); nothing was written")
    return mapping, skipped


def check_titan_state(titan_shapes: dict[str, tuple[int, ...]], arch: architecture.Qwen3Arch, *,
                      tie: bool) -> checks.Finding:
    """The keys and shapes equal those of TorchTitan's own Qwen3 state dict (built on the meta device)."""
    config = arch.titan_model_config(tie=tie, fused_qkv=True)
    with torch.device("meta"):
        model = config.build()
    expected = {k: tuple(v.shape) for k, v in model.state_dict().items()}
    problems = [f"missing `{k}`" for k in sorted(set(expected) - set(titan_shapes))]
    problems += [f"unexpected `{k}`" for k in sorted(set(titan_shapes) - set(expected))]
    problems += [f"`{k}` is {list(titan_shapes[k])}, TorchTitan has {list(v)}"
                 for k, v in expected.items() if k in titan_shapes and tuple(titan_shapes[k]) != v]
    if problems:
        return checks.Finding("titan_state", False, "; ".join(problems[:10]))
    return checks.Finding("titan_state", True, f"{len(expected)} tensors = TorchTitan Qwen3's state dict "
                                               "(keys and shapes)")


def decide_tie(source: WeightsFolder, hf_config: dict) -> tuple[bool, checks.Finding]:
    """Whether an HF Qwen3 folder's head is its embedding, as transformers decides it (config first).

    Returns:
        Whether tied, and the finding saying how the head is handled.

    Raises:
        ConfigError: untied without a head, or tied while the file's head differs from the embedding.
    """
    path = source.step_dir / "config.json"
    has_head = "lm_head.weight" in source.model
    if not hf_config.get("tie_word_embeddings"):
        if not has_head:
            raise ConfigError(f"{path} says tie_word_embeddings=false but the weights hold no lm_head.weight, so "
                              "transformers would initialize the head randomly", path=path,
                              hint="set tie_word_embeddings to true if the head is the embedding")
        return False, checks.Finding("tied_weights", True, "untied: lm_head.weight imported as lm_head.weight")
    if not has_head:
        return True, checks.Finding("tied_weights", True, "tied: lm_head.weight := tok_embeddings.weight")
    embedding = source.read("model.embed_tokens.weight")
    head = source.read("lm_head.weight")
    if embedding.shape != head.shape or not torch.equal(embedding, head):
        raise ConfigError(f"{path} ties the head to the embedding but the file's lm_head.weight differs from "
                          "model.embed_tokens.weight; transformers ignores the file's head in that case "
                          "(huggingface/transformers#41038), so which head is meant is ambiguous", path=path,
                          hint="set tie_word_embeddings=false if the separate head is the trained one, else drop it")
    return True, checks.Finding("tied_weights", True, "tied: the file's lm_head.weight equals the embedding bit for "
                                                      "bit; TorchTitan lm_head.weight := tok_embeddings.weight")


@dataclass(frozen=True)
class _ImportPlan:
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
    run = hf_run_config(source.step_dir, hf_config, _dominant_dtype(source))
    arch, arch_warnings = architecture.resolve_architecture(run, architecture.facts_from_shapes(titan_shapes),
                                                            hf_config)
    findings = (
        checks.check_key_coverage(set(mapping), naming.expected_hf_keys(arch.n_layers, with_head=not tie)),
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


def _read_back(folder: Path, fmt: str, planned: dict[str, write.PlannedTensor]) -> tuple[checks.Finding, dict]:
    """Re-open what was written: names, dtypes and shapes as planned, and the tensors for the logit check."""
    if fmt == "safetensors":
        finding = fidelity.check_written_tensors(folder, planned)
        written = open_weights_folder(folder)
        return finding, {k: written.read(k) for k in written.model}
    from molgen_export import dcp_read

    meta = dcp_read.read_step_metadata(folder)
    problems = [f"`{k}` missing" for k in sorted(set(planned) - set(meta.model))]
    problems += [f"unplanned `{k}`" for k in sorted(set(meta.model) - set(planned))]
    problems += [f"`{k}` is {meta.model[k].dtype} {list(meta.model[k].shape)}, planned {p.dtype} {list(p.shape)}"
                 for k, p in planned.items() if k in meta.model
                 and (meta.model[k].dtype, tuple(meta.model[k].shape)) != (p.dtype, tuple(p.shape))]
    state = {k: meta.read(k) for k in meta.model}
    if problems:
        return checks.Finding("written_files", False, "; ".join(problems[:10])), state
    return checks.Finding("written_files", True, f"{len(meta.model)} tensors re-read from the DCP metadata and "
                                                 "shards: names, shapes and dtypes as planned"), state


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
    timer = export._Timer(timings)
    started = time.perf_counter()
    with timer.stage("map"):
        plan = plan_import(hf_dir)
    findings = list(plan.findings)
    checks.raise_on_failures(findings, str(hf_dir))
    cast = export.DTYPES[dtype] if dtype else None
    planned = {t: write.PlannedTensor(t, plan.source.model[h].shape,  # PlannedTensor's `hf_key` holds the TITAN key here
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
                writer = write.SafetensorsWriter(temp_dir, write.plan_shards(list(planned.values()),
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
            written_finding, titan_state = _read_back(temp_dir, fmt, planned)
            findings.append(written_finding)
            checks.raise_on_failures(findings, str(hf_dir))
            if verify:
                result = verify_import_logits(plan.arch, titan_state, hf_dir, tie=plan.tie, dtype=cast,
                                              tolerance=logits_atol)
                fidelity_json = result.to_json()
                findings.append(checks.Finding(
                    "logits", result.passed,
                    f"TorchTitan (from the written files) vs HF: max|Δ| {result.max_abs_diff:.3g} (limit "
                    f"{result.tolerance:.3g}), top-1 agreement {result.top1_agreement:.4f} over {result.tokens} tokens"))
            else:
                findings.append(checks.Finding("logits", True, "skipped (--skip-logits)", warning=True))
            del titan_state
            checks.raise_on_failures(findings, str(hf_dir))
        timings["total"] = round(time.perf_counter() - started, 4)
        report = ImportReport(
            source_dir=str(hf_dir), output_dir=str(output_dir), format=fmt, source_format=plan.source.fmt,
            tied=plan.tie, hf_tensors=len(plan.source.model) - len(plan.skipped),
            titan_tensors=len(planned), skipped=plan.skipped,
            dtypes=tuple(sorted({_dtype_name(p.dtype) for p in planned.values()})),
            files=tuple(files) + (IMPORT_REPORT,), findings=tuple(f.to_json() for f in findings),
            fidelity=fidelity_json, warnings=plan.warnings, timings=timings, versions=export.versions())
        write.write_json(temp_dir / IMPORT_REPORT, report.to_json())
    logger.info("imported %s -> %s (%s, %d tensors) in %.2f s", hf_dir, output_dir, fmt, len(planned), timings["total"])
    return report


def _count_nonfinite(bad: list, hf_key: str, titan_key: str, tensor: torch.Tensor) -> None:
    nan, inf = checks.count_nonfinite(tensor)
    if nan or inf:
        bad.append((hf_key, titan_key, nan, inf))


def verify_import_logits(arch: architecture.Qwen3Arch, titan_state: dict[str, torch.Tensor], hf_dir: Path, *,
                         tie: bool, dtype: torch.dtype | None, tolerance: float) -> fidelity.FidelityResult:
    """TorchTitan model from the written tensors vs the HF model loaded from `hf_dir` (rounded to `dtype` when the
    import cast), float32, on a fixed random batch."""
    titan_model = fidelity.build_titan_model(arch, titan_state, tie=tie)
    hf_model = fidelity.load_hf_model(hf_dir)
    if dtype is not None:
        with torch.no_grad():
            for parameter in hf_model.parameters():
                parameter.copy_(parameter.to(dtype).float())
    result = fidelity.compare_logits(titan_model, hf_model, [fidelity.fixed_token_batch(arch.vocab_size)],
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
    titan_dir, output_dir = Path(titan_dir), Path(output_dir)
    if not options.dry_run:
        check_output_dir(output_dir, force=options.force)
    source = open_weights_folder(titan_dir)
    _refuse_hf_names(source)
    if options.config is not None:
        run = run_config.read_config_file(options.config)
    elif options.hf_assets is not None:
        run = hf_run_config(options.hf_assets, architecture.read_base_hf_config(options.hf_assets),
                            _dominant_dtype(source))
    else:
        raise UsageError("export-titan needs the HF assets (config.json and tokenizer) of the model",
                         hint="pass --hf-assets DIR, or --config with the run's job_config.json")
    step = discover.step_number(source.step_dir)
    report = export.ExportReport(step=step if step is not None else -1, step_dir=str(source.step_dir),
                                 output_dir=str(output_dir), versions=export.versions())
    report.source_fingerprint = source.fingerprint()
    timer = export._Timer(report.timings)
    started = time.perf_counter()
    if options.threads:
        torch.set_num_threads(options.threads)
    plan = export.plan_source(source, run, options, report, timer)
    meta_findings = export._metadata_checks(plan, None)
    report.findings = [f.to_json() for f in meta_findings]
    if options.dry_run:
        report.hf_tensors = len(plan.mapping)
        report.timings["total"] = round(time.perf_counter() - started, 4)
        return report
    checks.raise_on_failures(meta_findings, source.label)
    return export.export_planned(plan, options, report, timer, output_dir, started)


# ----------------------------------------------------------------------------------------------- command line


def add_import_hf_arguments(parser: argparse.ArgumentParser) -> None:
    from molgen_export.cli import add_verbosity

    parser.add_argument("hf_dir", type=Path, metavar="HF_DIR", help="HF Qwen3 folder (safetensors or .bin)")
    parser.add_argument("output_dir", type=Path, metavar="OUT_DIR", help="folder to create")
    parser.add_argument("--format", choices=FORMATS, default="safetensors",
                        help="safetensors (TorchTitan names) or dcp (loadable as checkpoint.initial_load_path)")
    parser.add_argument("--dtype", choices=EXPORT_DTYPES, help="cast floating tensors (default: keep stored dtypes)")
    parser.add_argument("--max-shard-size", default="5GB", help="largest safetensors file (default 5GB)")
    parser.add_argument("--skip-logits", action="store_true", help="skip the TorchTitan-vs-HF logit comparison")
    parser.add_argument("--logits-atol", type=float, default=1e-3,
                        help="accepted max|logit difference| relative to max|logit| (default 1e-3)")
    parser.add_argument("--force", action="store_true", help="replace OUT_DIR if it exists")
    parser.add_argument("--json", action="store_true", help="print the report as JSON")
    add_verbosity(parser)


def run_import_hf(args: argparse.Namespace) -> int:
    report = import_hf(args.hf_dir, args.output_dir, fmt=args.format, dtype=args.dtype, verify=not args.skip_logits,
                       logits_atol=args.logits_atol, max_shard_size=args.max_shard_size, force=args.force)
    if args.json:
        print(json.dumps(report.to_json(), indent=2))
    else:
        logits = f"logits max|Δ| {report.fidelity['max_abs_diff']:.2g}" if report.fidelity else "logits skipped"
        print(f"{report.source_dir}  ok  {report.titan_tensors} TorchTitan tensors ({report.format}, "
              f"{','.join(report.dtypes)}, {'tied' if report.tied else 'untied'})  {logits}  "
              f"{report.timings.get('total', 0):.1f} s  -> {report.output_dir}")
    return 0


def add_export_titan_arguments(parser: argparse.ArgumentParser) -> None:
    from molgen_export.cli import add_verbosity

    parser.add_argument("titan_dir", type=Path, metavar="TITAN_DIR", help="folder of TorchTitan-named safetensors")
    parser.add_argument("--output", type=Path, required=True, help="the HF folder to create")
    parser.add_argument("--hf-assets", type=Path, help="HF assets: Qwen3 config.json and tokenizer")
    parser.add_argument("--config", type=Path, help="the run's job_config.json (instead of deriving from --hf-assets)")
    parser.add_argument("--dtype", choices=EXPORT_DTYPES, help="export dtype (default: the stored dtype)")
    parser.add_argument("--max-shard-size", default="5GB", help="largest safetensors file (default 5GB)")
    parser.add_argument("--skip-logits", action="store_true", help="skip the TorchTitan-vs-HF logit comparison")
    parser.add_argument("--logits-atol", type=float, default=1e-3,
                        help="accepted max|logit difference| relative to max|logit| (default 1e-3)")
    parser.add_argument("--device", default="cpu", help="device for the logit comparison (cpu or cuda)")
    parser.add_argument("--threads", type=int, help="torch threads")
    parser.add_argument("--dry-run", action="store_true", help="plan and check from headers only; write nothing")
    parser.add_argument("--force", action="store_true", help="replace --output if it exists")
    parser.add_argument("--json", action="store_true", help="print the report as JSON")
    add_verbosity(parser)


def run_export_titan(args: argparse.Namespace) -> int:
    from molgen_export.cli import options_from_args, summary_line

    options = options_from_args(args, output=args.output)
    report = export_titan(args.titan_dir, args.output, options)
    if args.json:
        print(json.dumps(report.to_json(), indent=2))
    else:
        print(summary_line(report))
        if options.dry_run:
            for finding in report.findings:
                print(f"  check {finding['name']:<14} {'ok' if finding['ok'] else 'FAILED'}  {finding['detail']}")
    return 0 if report.ok else 1
