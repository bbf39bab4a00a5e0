"""The export pipeline: `export_step(step_dir, options) -> ExportReport`.

discover -> run config -> read metadata -> map names -> check -> stream tensors into safetensors -> verify
(on-disk files and logits) -> publish with one rename. CLI, watcher and runner only call this module.

One skeleton serves every tensor source: `export_source` (plan, metadata checks, dry run) and `export_planned`
(lock, skip check, staged folder, `write_weights`, `finish_export`, publish, report) run the DCP export, export-titan
(`convert.hf_titan`) and the distributed export (`distributed`, with its own `write_weights`). The plan is in
`plan.py`, the report and model card in `report.py`, the stage timer in `timing.py`.
"""

from __future__ import annotations

import hashlib
import json
import logging
import time
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path

from molgen_export.verify import checks
from molgen_export.dcp import read
from molgen_export.dcp import discover
from molgen_export.pipeline import weight_stream
from molgen_export.pipeline.plan import (DTYPES, ExportPlan, check_expert_bias, confirm_plan, metadata_checks,  # noqa: F401
                                         plan_dcp_step)
from molgen_export.pipeline.report import REPORT_FILE, ExportReport, model_card, options_record, versions  # noqa: F401
from molgen_export.pipeline.timing import Timer
from molgen_export.verify import gate, logit_gate
from molgen_export.verify.logit_gate import MOE_TOLERANCE_FACTOR
from molgen_export.hf import config_files
from molgen_export.verify import probe
from molgen_export.mapping import run_config
from molgen_export.hf import safetensors_writer
from molgen_export.hf import publish
from molgen_export.options import ExportOptions
from molgen_export.cancel import CancelToken, check_cancel
from molgen_export.errors import MolgenExportError, OutputError, VerificationError

logger = logging.getLogger(__name__)



def source_fingerprint(step_dir: Path) -> str:
    """sha256 over `.metadata` (it carries DCP's unique save id) and the name and size of every file the export
    reads: each shard the metadata names (confined to the step folder) and every `*.distcp` beside them. A
    `.metadata` that cannot be read safely (the export refuses it) adds only the `*.distcp`."""
    digest = hashlib.sha256()
    try:
        raw = read.read_metadata_bytes(step_dir)
    except ValueError:  # not a regular file, or too large: nothing of it is hashed, nor read by the export
        raw = b""
    digest.update(raw)
    try:
        referenced = set(read.referenced_files(step_dir, raw))
    except ValueError:  # CheckpointFormatError / UnsafeCheckpointError: the export refuses this step
        referenced = set()
    for name in sorted({p.name for p in step_dir.glob("*.distcp")} | referenced):
        path = step_dir / name
        size = path.stat().st_size if name not in referenced or path.exists() else "missing"
        digest.update(f"{name}:{size}".encode())
    return digest.hexdigest()


def output_dir_for(step_dir: Path, options: ExportOptions) -> Path:
    """Where `step-N-hf/` goes: `--output`, `<checkpoint_root>-hf/` (default), or beside the step."""
    name = f"{step_dir.name}-hf"
    if options.output is not None:
        return options.output / name
    if options.layout == "beside":
        return step_dir.parent / name
    root = step_dir.parent
    return root.parent / f"{root.name}-hf" / name


OUTPUT_FORMAT = "molgen_export.hf_export/2"
"""Version of what an export folder holds; bumped when the same inputs would give other bytes."""


def output_inputs(fingerprint: str, *, export_dtype: str, max_shard_bytes: int, assets: Path | None) -> dict:
    """Everything that decides an export's bytes besides the code: the source, the options that change the files,
    and the base assets' contents (config, generation config, tokenizer files)."""
    asset_hashes = {}
    if assets is not None:
        for name in ("config.json", "generation_config.json", *config_files.TOKENIZER_FILES):
            digest = _file_sha256(assets / name)
            if digest is not None:
                asset_hashes[name] = digest
    return {"format": OUTPUT_FORMAT, "source_fingerprint": fingerprint, "export_dtype": export_dtype,
            "max_shard_bytes": max_shard_bytes, "assets": asset_hashes}


_SHA256_CACHE: dict[tuple[str, int, int], str] = {}


def _file_sha256(path: Path) -> str | None:
    """sha256 of a file, or None when absent; kept per (path, size, mtime): a watcher asks for the same base
    assets (an 11 MB tokenizer.json for Qwen) several times per step."""
    try:
        stat = path.stat()
    except FileNotFoundError:
        return None
    if not path.is_file():
        return None
    key = (str(path), stat.st_size, stat.st_mtime_ns)
    if key not in _SHA256_CACHE:
        _SHA256_CACHE[key] = hashlib.sha256(path.read_bytes()).hexdigest()
    return _SHA256_CACHE[key]


def _recorded(output_dir: Path) -> dict | None:
    """The report of an existing export, or None (no folder, or not a molgen_export export)."""
    try:
        data = json.loads((output_dir / REPORT_FILE).read_text())
    except (OSError, ValueError):
        return None
    return data if isinstance(data, dict) else None


def _changed_inputs(recorded: dict | None, current: dict) -> list[str]:
    """Which of `output_inputs` differ from what an existing export recorded (all, when it recorded none)."""
    before = (recorded or {}).get("output_inputs")
    if not isinstance(before, dict):
        return ["format"]
    changed = [key for key in current if key != "assets" and before.get(key) != current[key]]
    old_assets, new_assets = before.get("assets") or {}, current["assets"]
    changed += [f"assets/{name}" for name in sorted(set(old_assets) | set(new_assets))
                if old_assets.get(name) != new_assets.get(name)]
    return changed


def export_state(step_dir: Path, options: ExportOptions) -> str:
    """`exported` (same source and same options/assets), `stale` (an export that another save of this step, or
    other options or assets, would not reproduce) or `missing`."""
    output_dir = output_dir_for(step_dir, options)
    recorded = _recorded(output_dir)
    if recorded is None:
        return "missing"
    try:
        run = run_config.load_run_config(step_dir.parent, options.config)
        current = output_inputs(source_fingerprint(step_dir), export_dtype=options.dtype or run.compute_dtype,
                                max_shard_bytes=options.max_shard_bytes, assets=options.hf_assets or run.hf_assets_path)
    except (OSError, ValueError, MolgenExportError):
        return "stale"
    return "stale" if _changed_inputs(recorded, current) else "exported"


def plan_step(step_dir: Path, options: ExportOptions | None = None) -> ExportReport:
    """Dry run: read metadata and configs only, run the metadata checks, write nothing."""
    return export_step(step_dir, ExportOptions(**{**(options or ExportOptions()).__dict__, "dry_run": True}))


def export_step(step_dir: Path, options: ExportOptions | None = None, *, cancel: CancelToken | None = None,
                progress: weight_stream.ProgressFactory | None = None) -> ExportReport:
    """Export one complete DCP step folder to a verified HF folder, or explain why not.

    Args:
        step_dir: a `step-N` folder holding `.metadata` and `*.distcp` shards.
        options: export options; defaults when None. `options.threads` holds for this export only.
        cancel: checked between pieces of the stream, before and during the logit gate and before publishing.
        progress: makes a progress bar for the weight stream (the CLI's tqdm); None: no bar.

    Returns:
        The report (also written as `export_report.json` in the export).

    Raises:
        MolgenExportError: any refusal; nothing is published when one is raised.
        ExportAborted: `cancel` was requested; the temporary folder is removed and nothing is published.
    """
    options = options or ExportOptions()
    with weight_stream.torch_threads(options.threads):  # the caller's thread count comes back afterwards
        return _export_step(Path(step_dir), options, cancel, progress)


def _export_step(step_dir: Path, options: ExportOptions, cancel: CancelToken | None,
                 progress: weight_stream.ProgressFactory | None) -> ExportReport:
    info = discover.describe_step(step_dir)
    discover.require_dcp(info)
    output_dir = output_dir_for(step_dir, options)
    report = ExportReport(step=info.step, step_dir=str(step_dir), output_dir=str(output_dir), versions=versions(),
                          options=options_record(options))
    run = _readable_run_config(step_dir, options)  # read once; None: planning reads it again and says why
    if _is_qwen3_5(run):  # TorchTitan's qwen3_5 family: its own map, config and logit gate
        from molgen_export.pipeline import qwen3_5_export

        report.source_fingerprint = source_fingerprint(step_dir)
        return qwen3_5_export.export_qwen3_5_step(step_dir, run, options, report, output_dir, cancel=cancel,
                                                  publish_step=publish_step)
    from molgen_export.verify import reference

    defer = not options.dry_run and run is not None and reference.can_decide_on_dict(run)
    if defer:  # torchtitan's ~2 s of imports run beside the fingerprint, the plan and the stream
        from molgen_export.mapping import titan

        titan.import_in_background()

    def plan_export(timer: Timer) -> ExportPlan:
        fingerprint = report.source_fingerprint = source_fingerprint(step_dir)  # counted in `total`, as planning is
        return plan_dcp_step(step_dir, options, report, timer, fingerprint=fingerprint, run=run, defer=defer)

    return export_source(report, options, output_dir, plan_export, cancel=cancel, progress=progress)


def _readable_run_config(step_dir: Path, options: ExportOptions) -> run_config.RunConfig | None:
    """The step's run config, or None when it cannot be read (the Qwen3 planner then reports why)."""
    try:
        return run_config.load_run_config(step_dir.parent, options.config)
    except (MolgenExportError, OSError, ValueError):
        return None


def _is_qwen3_5(run: run_config.RunConfig | None) -> bool:
    from molgen_export.mapping import qwen3_5

    return run is not None and run.model_name is not None and qwen3_5.is_qwen3_5(run.model_name, ())


def qwen3_5_run_config(step_dir: Path, options: ExportOptions) -> run_config.RunConfig | None:
    """The run config when it names TorchTitan's qwen3_5 family, else None (also when it cannot be read: the
    Qwen3 path then reports that as it always has)."""
    run = _readable_run_config(step_dir, options)
    return run if _is_qwen3_5(run) else None


def export_source(report: ExportReport, options: ExportOptions, output_dir: Path,
                  plan_export: Callable[[Timer], ExportPlan], *, cancel: CancelToken | None = None,
                  progress: weight_stream.ProgressFactory | None = None) -> ExportReport:
    """The export of any tensor source (a DCP step, TorchTitan-named safetensors): plan, metadata checks, then
    either the dry-run report or `export_planned`.

    Args:
        report: the report to fill (step, source and output already set).
        options: the export options.
        output_dir: the HF folder to create or replace.
        plan_export: makes the plan (`plan.plan_dcp_step` or `plan.plan_source` bound to its source), timed by
            the timer it is given.
        cancel: see `export_step`.
        progress: see `export_step`.

    Returns:
        The report: `planned` (dry run), `skipped` or `exported`.

    Raises:
        MolgenExportError: any refusal or failed check; nothing is published then.
    """
    timer = Timer(report.timings)
    started = time.perf_counter()
    plan = plan_export(timer)
    meta_findings = metadata_checks(plan, None)
    report.findings = [f.to_json() for f in meta_findings]
    if options.dry_run:
        # what will be written: the head is dropped when the run ties it and the data confirms it
        report.hf_tensors_untied = len(plan.mapping)
        tied_head = plan.arch.tie_word_embeddings and "lm_head.weight" in plan.sources
        report.hf_tensors = len(plan.mapping) - (1 if tied_head else 0)
        report.status = "planned"
        report.timings["total"] = round(time.perf_counter() - started, 4)
        return report
    checks.raise_on_failures(meta_findings, plan.meta.label)
    return export_planned(plan, output_dir, options=options, report=report, timer=timer, started=started,
                          cancel=cancel, progress=progress)


@dataclass(frozen=True)
class WrittenWeights:
    """What writing the weights into the temporary folder hands on to `finish_export`."""

    tie: bool
    """Whether the files were written tied (no head tensor, `tie_word_embeddings=true`)."""
    planned: list[safetensors_writer.PlannedTensor]
    """The tensors the files hold (what `verify_files` reads back)."""
    files: list[str]
    """The weight files written (shards, then the index when sharded)."""
    findings: list[checks.Finding]
    """The findings so far (metadata, expert bias, tie, finite values); all passed."""
    report_notes: tuple[str, ...] = ()
    """Warnings for the report only, added after the model card (which then stays byte-identical to a
    single-process export's)."""


WriteWeights = Callable[[ExportPlan, Path], WrittenWeights]
"""`write_weights(plan, temp_dir)`: stream the weights into `temp_dir` (`stream_weights`, or the distributed ranks)."""


@dataclass(frozen=True)
class ExistingExport:
    """What `check_existing` found in the output folder."""

    inputs: dict
    """This export's `output_inputs` (recorded in its report)."""
    skip: bool
    """The folder already holds this export: same source, options and assets."""
    replaced: list[str]
    """Why the folder's earlier export will be replaced (the inputs that changed, or `--force`); empty if none."""


def export_planned(plan: ExportPlan, output_dir: Path, *, options: ExportOptions, report: ExportReport,
                   timer: Timer, started: float, cancel: CancelToken | None = None,
                   progress: weight_stream.ProgressFactory | None = None,
                   write_weights: WriteWeights | None = None) -> ExportReport:
    """The one export skeleton after planning: lock -> skip check -> temporary folder -> write the weights ->
    verify -> publish -> report. Every export runs it: DCP steps, TorchTitan-named safetensors, distributed ranks.

    Without `options.force`, an export already published from the same source, options and assets is kept and
    the report says `skipped`: checked after taking the lock, so a process that waited behind another's export
    of this step does not redo it. A folder molgen_export did not write is refused unless `options.force`.

    Args:
        plan: the plan (its metadata checks passed).
        output_dir: the HF folder to create or replace.
        options: the export options.
        report: the report to fill.
        timer: adds this export's stage timings to the report.
        started: `time.perf_counter()` when the export began (for `timings.total`).
        cancel: see `export_step`.
        progress: see `export_step`.
        write_weights: writes the weights into the temporary folder; default `stream_weights` (one process).

    Raises:
        MolgenExportError: any refusal or failed check; the temporary folder is removed, nothing is published.
    """
    if write_weights is None:
        def write_weights(plan: ExportPlan, temp_dir: Path) -> WrittenWeights:
            return stream_weights(plan, temp_dir, options=options, report=report, timer=timer, cancel=cancel,
                                  progress=progress)

    def build(temp_dir: Path) -> None:
        written = write_weights(plan, temp_dir)
        settled, redo = confirm_plan(plan, report, timer)
        if redo:  # torchtitan decided otherwise than the table: write again with its names
            for leftover in temp_dir.iterdir():
                leftover.unlink()
            written = write_weights(settled, temp_dir)
        finish_export(settled, written, options=options, report=report, timer=timer, temp_dir=temp_dir,
                      cancel=cancel)
        report.warnings.extend(written.report_notes)

    publish_step(plan, output_dir, build, options=options, report=report, timer=timer, started=started,
                 cancel=cancel)
    if report.status == "exported":
        logger.info("%s exported to %s in %.2f s", plan.meta.label, output_dir, report.timings["total"])
    return report


def publish_step(key, output_dir: Path, build: Callable[[Path], None], *, options: ExportOptions,
                 report: ExportReport, timer: Timer, started: float, cancel: CancelToken | None = None) -> ExportReport:
    """The skeleton's outer half, for every model family: under the folder's lock, the skip check, then `build`
    into a staged folder, the report written into it, and one rename to publish.

    Args:
        key: what the skip check reads (`check_existing`): an `ExportPlan`, or anything with its `meta`,
            `source_fingerprint`, `export_dtype_name` and `assets`.
        build: writes and verifies the export in the temporary folder it is given, filling `report` (raises on
            any failed check: the folder is removed, nothing is published).

    Returns:
        `report`, its status `skipped` (the folder already holds this export) or `exported`.
    """
    with publish.folder_lock(output_dir):
        existing = check_existing(key, options, output_dir)
        report.output_inputs = existing.inputs
        if existing.skip:
            report.status = "skipped"
            report.timings["total"] = round(time.perf_counter() - started, 4)
            return report
        report.replaced = existing.replaced
        check_cancel(cancel, "start")
        with publish.staged_folder(output_dir, publishing=lambda: timer.stage("publish")) as temp_dir:
            build(temp_dir)
            report.timings["total"] = round(time.perf_counter() - started, 4)
            report.status = "exported"
            report.written = True
            publish.write_json(temp_dir / REPORT_FILE, report.to_json())
            check_cancel(cancel, "publish")  # the last point: after the rename the export is published
    return report


def check_existing(plan: ExportPlan, options: ExportOptions, output_dir: Path) -> ExistingExport:
    """Whether `output_dir` already holds this export (same source, options and assets); call under its lock.

    Raises:
        OutputError: `output_dir` exists but is not a molgen_export export, and `options.force` is not set.
    """
    inputs = output_inputs(plan.source_fingerprint, export_dtype=plan.export_dtype_name,
                           max_shard_bytes=options.max_shard_bytes, assets=plan.assets)
    recorded = _recorded(output_dir)
    if output_dir.exists() and recorded is None and not options.force:
        raise OutputError(f"{output_dir} exists and is not a molgen_export export (no {REPORT_FILE}); "
                          "refusing to replace what molgen_export did not write", path=output_dir,
                          hint="move that folder away, or pass --force to replace it")
    changed = ["--force"] if options.force and output_dir.exists() else _changed_inputs(recorded, inputs)
    if recorded is not None and not changed:
        logger.info("%s already exported from this checkpoint, with these options and assets, to %s",
                    plan.meta.label, output_dir)
        return ExistingExport(inputs, True, [])
    if output_dir.exists():
        logger.info("%s: replacing the export in %s (changed: %s)", plan.meta.label, output_dir, ", ".join(changed))
        return ExistingExport(inputs, False, changed)
    return ExistingExport(inputs, False, [])


def stream_weights(plan: ExportPlan, temp_dir: Path, *, options: ExportOptions, report: ExportReport, timer: Timer,
                   cancel: CancelToken | None = None,
                   progress: weight_stream.ProgressFactory | None = None) -> WrittenWeights:
    """One process's `write_weights`: stream the weights into safetensors files in `temp_dir`, deciding the tie on
    the way (`weight_stream.WeightStreamer`), with the expert-bias, tie and NaN/Inf findings.

    Memory stays flat in the model's size (row pieces, see `dcp.stream`); the optimizer state is never read.
    Timings: `stream` (read, cast, NaN/Inf screen and write, overlapped), `fsync`; `stream.*` break the stream
    down (`read_wait` high: the disk was the bottleneck).

    Raises:
        VerificationError: a finding failed (the files are left for the caller to remove with `temp_dir`).
    """
    counter = read.ByteCounter()
    heads = plan.heads
    findings = check_expert_bias(plan, options, report, counter)

    def open_writer(planned: list[safetensors_writer.PlannedTensor]) -> safetensors_writer.SafetensorsWriter:
        return safetensors_writer.SafetensorsWriter(temp_dir, safetensors_writer.plan_shards(planned, options.max_shard_bytes))

    def after_tie(outcome: weight_stream.StreamOutcome) -> None:
        if outcome.tie_finding.warning:
            report.warnings.append(outcome.tie_finding.detail)
        findings.extend(metadata_checks(plan, outcome.tie) + [outcome.tie_finding])
        checks.raise_on_failures(findings, plan.meta.label)

    streamer = weight_stream.WeightStreamer(plan.meta, plan.sources, plan.mapping, plan.export_dtype, heads,
                                            open_writer, counter, cancel=cancel, progress=progress,
                                            readers=options.reader_threads)
    with timer.stage("stream"):
        outcome = streamer.stream(plan.arch.tie_word_embeddings, after_tie)
    writer = outcome.writer
    try:
        report.tied = outcome.tie
        report.bytes_read = counter.bytes
        report.read_paths = dict(sorted(counter.paths.items()))
        if outcome.rereads:
            report.warnings.append(f"the head equalled the embedding on its first rows but not later: "
                                   f"{outcome.rereads} piece(s) of both were read twice")
        report.timings.update({"stream.read_io": round(streamer.stats.read_io, 4),
                               "stream.read_wait": round(streamer.stats.consumer_waiting, 4),
                               "stream.cast": round(streamer.caster.seconds, 4)})
        nonfinite = [(plan.sources[k].checkpoint_key, plan.mapping[k], nan, inf)
                     for k, (nan, inf) in outcome.nonfinite.items()]
        findings.append(checks.nonfinite_finding(nonfinite, len(plan.sources)))
        checks.raise_on_failures(findings, plan.meta.label)
        with timer.stage("fsync"):
            files = writer.close()
    except BaseException:
        writer.abort()
        raise
    return WrittenWeights(outcome.tie, outcome.planned, files, findings)


def finish_export(plan: ExportPlan, written: WrittenWeights, *, options: ExportOptions, report: ExportReport,
                  timer: Timer, temp_dir: Path, cancel: CancelToken | None = None) -> None:
    """After the weights are on disk: configs, tokenizer, re-read check, logit check, model card.

    Args:
        plan: the plan.
        written: what `write_weights` wrote into `temp_dir` (tie decision, tensors, files, findings so far).
        options: the export options (`skip_logits`, `logits_atol`, `device`).
        report: filled with the files, findings, fidelity figures and sizes.
        timer: times the `assets`, `verify_files`, `verify_logits` and `verify_probe` stages.
        temp_dir: the temporary folder the export is written into.
        cancel: checked before the logit gate and the mapping probe.

    Raises:
        VerificationError: any finding failed (the caller removes `temp_dir`).
    """
    heads = plan.heads
    tie, planned = written.tie, written.planned
    findings = list(written.findings)
    files = list(written.files)
    with timer.stage("assets"):
        hf_config = config_files.build_hf_config(plan.base_config, plan.arch, tie=tie, dtype=plan.export_dtype_name)
        generation = config_files.build_generation_config(plan.assets, hf_config)
        report.warnings.extend(config_files.reconcile_special_tokens(hf_config, generation,
                                                                 config_files.special_token_ids(plan.assets)))
        publish.write_json(temp_dir / "config.json", hf_config)
        publish.write_json(temp_dir / "generation_config.json", generation)
        files += ["config.json", "generation_config.json"]
        files += publish.copy_files(plan.tokenizer_files, temp_dir)

    with timer.stage("verify_files"):
        findings.append(logit_gate.check_written_tensors(temp_dir, {t.hf_key: t for t in planned}))
        checks.raise_on_failures(findings, plan.meta.label)
    if options.skip_logits:
        findings.append(checks.Finding("logits", True, "skipped (--skip-logits)", warning=True))
    else:
        check_cancel(cancel, "logit gate")
        with timer.stage("verify_logits"):
            verify_counter = read.ByteCounter()
            fused = plan.reference is not None and plan.reference.fused_qkv
            titan = weight_stream.TitanWeights(plan.meta, plan.sources, plan.export_dtype, heads, verify_counter,
                                               keep_fused=fused, cancel=cancel)
            limit = plan.tokenizer_size or plan.arch.vocab_size
            # MoE: expert outputs are summed in another order (grouped GEMMs vs per-expert loops), and a token whose
            # router scores nearly tie may pick another expert, so the limit is MOE_TOLERANCE_FACTOR times looser
            tolerance = options.logits_atol * (MOE_TOLERANCE_FACTOR if plan.arch.moe is not None else 1)
            result = gate.verify_export(plan.arch, titan, temp_dir, tie=tie,
                                            vocab_limit=min(limit, plan.arch.vocab_size),
                                            tolerance=tolerance, device=options.device,
                                            reference=plan.reference.config if plan.reference else None)
            report.verify_bytes_read = verify_counter.bytes
            report.fidelity = result.to_json()
            where = f"; first divergence: {result.first_divergence}" if result.first_divergence else ""
            routing = (f", same experts chosen for {result.routing_agreement:.4f} of tokens (worst MoE layer)"
                       if result.routing_agreement is not None else "")
            findings.append(checks.Finding(
                "logits", result.passed,
                f"max|Δ| {result.max_abs_diff:.3g} (limit {result.tolerance:.3g}), mean|Δ| {result.mean_abs_diff:.3g}, "
                f"top-1 agreement {result.top1_agreement:.4f} over {result.tokens} tokens ({result.mode}){routing}"
                f"{where}"))
        if plan.reference is not None:
            check_cancel(cancel, "mapping probe")
            with timer.stage("verify_probe"):
                whole = result.mode == "whole"
                figures = probe.run_probe(plan, hf_config, tie=tie, tolerance=tolerance, whole=whole,
                                          device=options.device)
            report.fidelity["probe"] = figures
            routing = (f", same experts {figures['routing_agreement']:.4f}"
                       if figures["routing_agreement"] is not None else "")
            findings.append(checks.Finding(
                "mapping_probe", figures["passed"],
                f"random weights (norms in [0.25, 2.5]) through the same mapping, layers {figures['layers']}, "
                f"{figures['vocab']} vocab rows{', %d experts' % figures['experts'] if figures['experts'] else ''}: "
                f"max|Δ| {figures['max_abs_diff']:.3g} (limit {figures['tolerance']:.3g}), "
                f"top-1 {figures['top1_agreement']:.4f}{routing}"))
    report.findings = [f.to_json() for f in findings]
    checks.raise_on_failures(findings, plan.meta.label)
    report.hf_tensors = len(planned)
    report.output_bytes = sum((temp_dir / name).stat().st_size for name in files)
    report.files = files + ["README.md", REPORT_FILE]
    publish.write_text(temp_dir / "README.md", model_card(report))


def failed_report(step_dir: Path, options: ExportOptions, error: MolgenExportError | Exception) -> ExportReport:
    """A report for a step that could not be exported (for `--json` and the watcher's failure records)."""
    number = discover.step_number(step_dir)
    report = ExportReport(step=number if number is not None else -1, step_dir=str(step_dir),
                          output_dir=str(output_dir_for(step_dir, options)), status="failed", error=str(error))
    if isinstance(error, VerificationError):
        report.findings = [f.to_json() for f in error.findings]
    return report
