"""The export of a TorchTitan `qwen3_5` run's DCP step (Qwen3.5 dense or MoE) to an HF text model: the same
stages as the Qwen3 export (run config -> metadata -> map -> check -> write -> verify what is on disk -> publish),
with Qwen3.5's own map (`mapping/qwen3_5.py`), config (`mapping/qwen3_5_config.py`) and logit gate
(`verify/qwen3_5_gate.py`, torchtitan's modules with the pure-torch delta rule on CPU).

Text-only: a checkpoint's vision tower is refused by name at planning unless `drop_vision_tower` is set, then
its tensors are left out and each is named in the report (`set_aside` finding).

Memory stays flat in the model's size, as on the Qwen3 path: the weights are streamed in row pieces, each part of
a fused HF tensor (`in_proj_qkv`, `conv1d`, `gate_up_proj`) written straight to its place in the file
(`qwen3_5_stream`); the logit gate reads the checkpoint again (`qwen3_5_stream.titan_weights`) and runs whole up to
`verify.gate.WHOLE_MODEL_MAX_PARAMS` parameters, layer by layer above (`verify/qwen3_5_layerwise.py`); then the
mapping probe (`verify/qwen3_5_probe.py`) runs the same map on random weights. Not for Qwen3.5 yet: the
distributed export.
"""

from __future__ import annotations

import json
import logging
import math
import time
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path

import torch

from molgen_export.cancel import CancelToken, check_cancel
from molgen_export.dcp import read
from molgen_export.errors import ConfigError, DependencyError, MappingError
from molgen_export.hf import config_files, publish, safetensors_writer
from molgen_export.mapping import qwen3_5 as qmap
from molgen_export.mapping.keymap import canonical_titan_key
from molgen_export.mapping.qwen3_5_config import hf_text_config, with_base_config
from molgen_export.options import ExportOptions
from molgen_export.pipeline import qwen3_5_stream
from molgen_export.pipeline.plan import DTYPES
from molgen_export.pipeline.report import REPORT_FILE, ExportReport
from molgen_export.pipeline.timing import Timer
from molgen_export.verify import (
    checks,
    logit_gate,
    qwen3_5_gate,
    qwen3_5_probe,
    qwen3_5_reference,
)
from molgen_export.verify.logit_gate import MOE_TOLERANCE_FACTOR

logger = logging.getLogger(__name__)


def titan_config_of_run(run):
    """The run's `Qwen35Model.Config`: its own `model_spec.model`, else its flavor from the installed registry.

    Raises:
        ConfigError: neither is there, or the run's model config does not fit the installed torchtitan.
        DependencyError: the installed torchtitan has no qwen3_5.
    """
    try:
        package = qwen3_5_reference.import_qwen3_5().package
    except ImportError as exc:
        raise DependencyError(f"the run {run.source} is a TorchTitan qwen3_5 run, and this torchtitan cannot build "
                              f"its model: {exc}", hint="install torchtitan 0.3 (it has models.qwen3_5)") from exc
    if run.titan_model:
        return qwen3_5_reference.config_from_run_model(run.titan_model, f"{run.source.name} (model_spec.model)")
    registry = package.qwen3_5_configs
    if run.flavor in registry:
        return registry[run.flavor](attn_backend="flex")
    raise ConfigError(f"the run config {run.source} carries no model config and names flavor {run.flavor!r}, which "
                      "the installed torchtitan's qwen3_5 registry does not have", path=run.source,
                      hint="pass the run's job_config.json (TorchTitan 0.3 writes model_spec.model) with --config")


def _expected_hf_shapes(hf_fields: dict) -> dict[str, tuple[int, ...]]:
    """Every tensor (and its shape) of the HF model `hf_fields` describes, from transformers itself (on meta)."""
    from transformers import AutoConfig, AutoModelForCausalLM

    fields = {k: v for k, v in hf_fields.items() if k not in ("model_type", "architectures", "dtype")}
    config = AutoConfig.for_model(hf_fields["model_type"], **fields)
    with torch.device("meta"):
        model = AutoModelForCausalLM.from_config(config)
    return {k: tuple(v.shape) for k, v in model.state_dict().items()}


@dataclass(frozen=True)
class SkipKey:
    """What the skip check (`export.check_existing`) reads of a plan."""

    meta: read.StepMetadata
    source_fingerprint: str
    export_dtype_name: str
    assets: Path


def _set_aside_detail(set_aside: dict[str, str]) -> str:
    """Every checkpoint key not exported, grouped by its reason."""
    by_reason: dict[str, list[str]] = {}
    for key, why in sorted(set_aside.items()):
        by_reason.setdefault(why, []).append(key)
    return "; ".join(f"{len(keys)} {why}: {', '.join(keys)}" for why, keys in by_reason.items()) or "nothing"


def export_qwen3_5_step(step_dir: Path, run, options: ExportOptions, report: ExportReport, output_dir: Path, *,
                        cancel: CancelToken | None = None,
                        publish_step: Callable[..., ExportReport]) -> ExportReport:
    """Export one qwen3_5 DCP step; the report says `planned` (dry run), `skipped` or `exported`.

    Args:
        publish_step: the pipeline's outer skeleton (`export.publish_step`: folder lock, skip check, staged
            folder, report, one rename), handed in because `export` imports this module.

    Raises:
        ConfigError: no base assets, a setting HF Qwen3.5 cannot express, a dtype that is not an export dtype.
        MappingError: a checkpoint key the map does not know (every one named).
        VerificationError: a failed check or logit gate; nothing is published.
    """
    timer = Timer(report.timings)
    started = time.perf_counter()
    with timer.stage("config"):
        assets = options.hf_assets or run.hf_assets_path
        if assets is None or not Path(assets).is_dir():
            raise ConfigError(f"the base assets folder {assets} of the run {run.source} is missing", path=run.source,
                              hint="pass the folder holding the Qwen3.5 tokenizer with --hf-assets")
        titan_config = titan_config_of_run(run)
        hf_fields = hf_text_config(titan_config)
        tokenizer_size = config_files.tokenizer_size(assets)
        base_path = Path(assets) / "config.json"
        try:
            base = json.loads(base_path.read_text()) if base_path.is_file() else None
        except ValueError as exc:
            raise ConfigError(f"{base_path} is not valid JSON: {exc}", path=base_path) from exc
        hf_fields, base_warnings = with_base_config(hf_fields, base)
        report.warnings.extend(base_warnings)
        report.run_config = {"path": str(run.source), "kind": run.kind, "flavor": run.flavor,
                             "model_name": run.model_name}
        report.hf_assets = str(assets)
        report.hf_assets_overridden = options.hf_assets is not None
    with timer.stage("metadata"):
        meta = read.read_step_metadata(step_dir)
        meta.check_files()
    with timer.stage("map"):
        canonical: dict[str, str] = {}
        for checkpoint_key in meta.model:
            titan_key, _ = canonical_titan_key(checkpoint_key)
            if titan_key in canonical:
                raise MappingError(f"checkpoint keys `{canonical[titan_key]}` and `{checkpoint_key}` both name "
                                   f"`{titan_key}`", hint="the checkpoint mixes two models; re-save it")
            canonical[titan_key] = checkpoint_key
        plan = qmap.plan_hf_text({k: tuple(meta.model[c].shape) for k, c in canonical.items()},
                                 text_only=options.drop_vision_tower)
        expected = _expected_hf_shapes(hf_fields)
    dtype_name = options.dtype or run.compute_dtype
    if dtype_name not in DTYPES:
        raise ConfigError(f"the run's dtype {dtype_name!r} is not an export dtype", hint="pass --dtype bfloat16")
    export_dtype = DTYPES[dtype_name]
    vision = sorted(k for k, why in plan.set_aside.items() if why.startswith("vision"))
    report.architecture = {"family": "qwen3_5", **{k: v for k, v in hf_fields.items() if k != "architectures"}}
    report.reference = {"source": f"{run.source.name}", "delta_rule_op": qwen3_5_reference.DELTA_RULE_OP}
    report.export_dtype = dtype_name
    report.checkpoint_dtype = ",".join(sorted({str(e.dtype).removeprefix("torch.") for e in meta.model.values()}))
    report.tensors, report.model_bytes, report.other_bytes = len(meta.model), meta.model_bytes, meta.other_bytes
    report.hf_tensors = len(plan.tensors)
    if vision:
        report.warnings.append(f"text-only export ({hf_fields['architectures'][0]}): the {len(vision)} vision-tower "
                               "tensors are left out (named in the `set_aside` finding)")
    shapes = {t.hf_key: t.shape for t in plan.tensors}
    wrong = sorted(k for k in shapes if k in expected and shapes[k] != expected[k])
    findings = [
        checks.check_key_coverage(set(shapes), set(expected)),
        checks.Finding("shapes", not wrong, "every tensor has the shape the run's config gives HF" if not wrong else
                       "; ".join(f"`{k}` {list(shapes[k])}, the config gives {list(expected[k])}" for k in wrong[:6])),
        checks.check_vocab_padding(hf_fields["vocab_size"], tokenizer_size),
        checks.Finding("layer_types", True, " ".join("F" if t == "full_attention" else "L"
                                                     for t in hf_fields["layer_types"])
                       + " (L: Gated DeltaNet, F: gated full attention)"),
        checks.Finding("set_aside", True, _set_aside_detail(plan.set_aside)),
    ]
    report.findings = [f.to_json() for f in findings]
    if options.dry_run:
        report.status = "planned"
        report.timings["total"] = round(time.perf_counter() - started, 4)
        return report
    checks.raise_on_failures(findings, meta.label)

    def build(temp_dir: Path) -> None:
        counter = read.ByteCounter()
        with timer.stage("stream"):
            biases = {k: meta.read(canonical[k], counter) for k in plan.set_aside if k.endswith("expert_bias_E")}
            if biases:
                finding = checks.check_expert_bias(biases, options.allow_expert_bias_drop)
                findings.append(finding)
                if finding.warning:
                    report.warnings.append(finding.detail)
                checks.raise_on_failures(findings, meta.label)

            def open_writer(planned):
                return safetensors_writer.SafetensorsWriter(
                    temp_dir, safetensors_writer.plan_shards(planned, options.max_shard_bytes))

            def before_close(outcome: qwen3_5_stream.Qwen35StreamOutcome) -> None:
                bad = [(",".join(canonical[k] for k in by_hf[hf_key].titan_keys), hf_key, nan, inf)
                       for hf_key, (nan, inf) in sorted(outcome.nonfinite.items())]
                findings.append(checks.nonfinite_finding(bad, len(plan.tensors)))
                checks.raise_on_failures(findings, meta.label)

            by_hf = {t.hf_key: t for t in plan.tensors}
            outcome = qwen3_5_stream.stream_text_model(meta, canonical, plan, export_dtype, open_writer, counter,
                                                       cancel=cancel, before_close=before_close,
                                                       readers=options.reader_threads)
            planned, files = outcome.planned, list(outcome.files)
            report.bytes_read = counter.bytes
            report.read_paths = dict(sorted(counter.paths.items()))
        with timer.stage("assets"):
            hf_config = {**hf_fields, "dtype": dtype_name}
            generation = config_files.build_generation_config(Path(assets), hf_config)
            publish.write_json(temp_dir / "config.json", hf_config)
            publish.write_json(temp_dir / "generation_config.json", generation)
            files += ["config.json", "generation_config.json"]
            files += publish.copy_files(config_files.tokenizer_files(Path(assets)), temp_dir)
        with timer.stage("verify_files"):
            findings.append(logit_gate.check_written_tensors(temp_dir, {t.hf_key: t for t in planned}))
            checks.raise_on_failures(findings, meta.label)
        if options.skip_logits:
            findings.append(checks.Finding("logits", True, "skipped (--skip-logits)", warning=True))
        else:
            check_cancel(cancel, "logit gate")
            with timer.stage("verify_logits"):
                tolerance = options.logits_atol * (MOE_TOLERANCE_FACTOR if "num_experts" in hf_fields else 1)
                limit = min(tokenizer_size or hf_fields["vocab_size"], hf_fields["vocab_size"])
                verify_counter = read.ByteCounter()
                titan = qwen3_5_stream.titan_weights(meta, canonical, export_dtype, verify_counter, cancel=cancel)
                fidelity = qwen3_5_gate.verify_qwen3_5_export(
                    titan_config, titan, temp_dir, params=sum(math.prod(t.shape) for t in plan.tensors),
                    vocab_limit=limit, tolerance=tolerance, device=options.device)
                report.verify_bytes_read = verify_counter.bytes
            r = fidelity.result
            report.fidelity = fidelity.to_json()
            where = f"; first divergence: {r.first_divergence}" if r.first_divergence else ""
            findings.append(checks.Finding(
                "logits", r.passed, f"max|Δ| {r.max_abs_diff:.3g} (limit {r.tolerance:.3g}), top-1 agreement "
                                    f"{r.top1_agreement:.4f} over {r.tokens} tokens{qwen3_5_gate.routing_text(r)} "
                                    f"({r.mode}){where}; torchtitan's qwen3_5 modules with the delta rule of "
                                    f"{fidelity.delta_rule_op}"))
            check_cancel(cancel, "mapping probe")
            with timer.stage("verify_probe"):
                figures = qwen3_5_probe.run_probe(titan_config, hf_config, export_dtype, tolerance=tolerance,
                                                  whole=r.mode == "whole", device=options.device)
            report.fidelity["probe"] = figures
            experts = f", {figures['experts']} experts" if figures["experts"] else ""
            findings.append(checks.Finding(
                "mapping_probe", figures["passed"],
                f"random weights (norms in [0.25, 2.5]) through the same map, layers {figures['layers']}, "
                f"{figures['vocab']} vocab rows{experts}: "
                f"max|Δ| {figures['max_abs_diff']:.3g} (limit {figures['tolerance']:.3g}), "
                f"top-1 {figures['top1_agreement']:.4f}"
                + (f", same experts {figures['routing_agreement']:.4f}" if figures["routing_agreement"] is not None
                   else "")))
        report.findings = [f.to_json() for f in findings]
        checks.raise_on_failures(findings, meta.label)
        report.output_bytes = sum((temp_dir / name).stat().st_size for name in files)
        report.files = files + [REPORT_FILE]

    publish_step(SkipKey(meta, report.source_fingerprint, dtype_name, Path(assets)), output_dir, build,
                 options=options, report=report, timer=timer, started=started, cancel=cancel)
    if report.status == "exported":
        logger.info("%s exported (qwen3_5, text-only) to %s in %.2f s", meta.label, output_dir,
                    report.timings["total"])
    return report
