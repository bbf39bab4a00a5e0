"""The export pipeline: `export_step(step_dir, options) -> ExportReport`.

discover -> run config -> read metadata -> map names -> check -> stream tensors into safetensors -> verify
(on-disk files and logits) -> publish with one rename. CLI, watcher and runner only call this module.
"""

from __future__ import annotations

import dataclasses
import hashlib
import json
import logging
import time
from contextlib import contextmanager
from dataclasses import asdict, dataclass, field
from pathlib import Path

import torch

from molgen_export.mapping import architecture
from molgen_export.verify import checks
from molgen_export.dcp import read
from molgen_export.dcp import discover
from molgen_export.pipeline import weight_stream
from molgen_export.verify import logit_gate
from molgen_export.hf import config_files
from molgen_export.mapping import keymap
from molgen_export.verify import probe
from molgen_export.verify import reference
from molgen_export.mapping import run_config
from molgen_export.hf import safetensors_writer
from molgen_export.hf import publish
from molgen_export.options import ExportOptions
from molgen_export.cancel import CancelToken, check_cancel
from molgen_export.errors import ConfigError, MolgenExportError, OutputError, StepLockedError, VerificationError

logger = logging.getLogger(__name__)

REPORT_FILE = "export_report.json"
DTYPES = {"bfloat16": torch.bfloat16, "float16": torch.float16, "float32": torch.float32}
MOE_TOLERANCE_FACTOR = 2
"""The logit tolerance for Qwen3 MoE exports is this many times `logits_atol` (see `_export_into`)."""


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
    or irrelevant (see `reference.RULES`)."""
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


def options_record(options: ExportOptions) -> dict:
    """The options as the report records them: JSON values, paths as strings, `extra` left out."""
    return {name: str(value) if isinstance(value, Path) else value
            for name, value in options.__dict__.items() if name != "extra"}


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


def _recorded_fingerprint(output_dir: Path) -> str | None:
    """The source fingerprint an existing export records, or None."""
    return (_recorded(output_dir) or {}).get("source_fingerprint")


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


class _Timer:
    def __init__(self, timings: dict[str, float]):
        self.timings = timings

    @contextmanager
    def stage(self, name: str):
        start = time.perf_counter()
        try:
            yield
        finally:
            self.timings[name] = round(self.timings.get(name, 0.0) + time.perf_counter() - start, 4)
            logger.info("%-9s %.2f s", name, time.perf_counter() - start)


@contextmanager
def step_lock(output_dir: Path):
    """Hold `.step-N-hf.lock` beside the output so two processes never export one step at once.

    Raises:
        StepLockedError: another process holds it.
    """
    try:
        output_dir.parent.mkdir(parents=True, exist_ok=True)
    except OSError as exc:
        raise OutputError(f"cannot create the export folder {output_dir.parent}: {exc.strerror or exc}",
                          path=output_dir.parent, hint="choose a writable --output folder") from exc
    with publish.try_lock(output_dir.parent / f".{output_dir.name}.lock") as held:
        if not held:
            raise StepLockedError(f"{output_dir.name} is being exported by another process", path=output_dir,
                                  hint="wait for it to finish; the export lock is released when that process ends")
        yield


@dataclass
class _Plan:
    """Everything decided before any tensor data is read."""

    meta: read.StepMetadata
    """The tensor source (a DCP step, or any object with the same interface; see `plan_source`)."""
    run: run_config.RunConfig
    assets: Path
    sources: dict[str, keymap.TensorSource]
    mapping: dict[str, str]
    arch: architecture.Qwen3Arch
    base_config: dict
    export_dtype: torch.dtype
    tokenizer_files: list[Path]
    tokenizer_size: int | None
    training_buffers: dict[str, str] = field(default_factory=dict)
    """MoE training-only buffers (canonical key -> checkpoint key): checked, never exported."""
    reference: reference.Reference | None = None
    """The verifier's TorchTitan model config, from the run's own model config."""


def _plan(step_dir: Path, options: ExportOptions, report: ExportReport, timer: _Timer) -> _Plan:
    if not options.dry_run:  # the disk starts on the model bytes while we import and plan
        read.prefetch_step(step_dir)
    with timer.stage("config"):
        run = run_config.load_run_config(step_dir.parent, options.config)
    with timer.stage("metadata"):
        meta = read.read_step_metadata(step_dir)
    return plan_source(meta, run, options, report, timer)


def plan_source(meta, run: run_config.RunConfig, options: ExportOptions, report: ExportReport,
                timer: _Timer) -> _Plan:
    """Decide everything about an export before reading tensor data.

    Args:
        meta: the tensor source: a `read.StepMetadata`, or any object with the same `model` (key ->
            entry with `shape`, `dtype`, `stored_bytes`), `model_bytes`, `other_bytes`, `other_keys`, `label`,
            `check_files()`, `read(key, counter)` and `iter(keys, counter)`.
        run: the run config.
    """
    with timer.stage("config"):
        report.run_config = {"path": str(run.source), "kind": run.kind, "flavor": run.flavor}
        assets = options.hf_assets or run.hf_assets_path
        report.hf_assets_overridden = options.hf_assets is not None
        if assets is None:
            raise ConfigError(f"the run config {run.source} names no hf_assets_path (nor a tokenizer path), or names "
                              "one relative to a launch directory that cannot be told from the file",
                              path=run.source, hint="pass the base assets folder with --hf-assets")
        if not assets.is_dir():
            raise ConfigError(f"the base assets folder {assets} (from {'--hf-assets' if options.hf_assets else run.source}) "
                              "does not exist", path=assets,
                              hint="pass the folder holding the Qwen3 config.json and tokenizer with --hf-assets")
        report.hf_assets = str(assets)
        base_config = architecture.read_base_hf_config(assets)
        tokenizer_files = config_files.tokenizer_files(assets)
        tokenizer_size = config_files.tokenizer_size(assets)
    with timer.stage("metadata"):
        meta.check_files()
    if not meta.model:
        raise ConfigError(f"{meta.label} holds no model tensors (only {meta.other_keys} optimizer/state entries)",
                          hint="the step was saved without the model; pick another step")
    with timer.stage("map"):
        dims = run.dims if run.dims.n_heads else (architecture.dims_from_flavor(run.model_name, run.flavor)
                                                  or architecture.dims_from_hf_config(base_config))
        model_shapes, buffers = keymap.split_training_buffers({k: e.shape for k, e in meta.model.items()})
        sources, rules = keymap.canonicalize_keys(model_shapes, n_heads=dims.n_heads,
                                                  n_kv_heads=dims.n_kv_heads, head_dim=dims.head_dim)
        canonical_shapes = {s.grouped_key: tuple(meta.model[s.checkpoint_key].shape) if s.expert is not None else s.shape
                            for s in sources.values()}
        facts = architecture.facts_from_shapes(canonical_shapes)
        arch, warnings = architecture.resolve_architecture(run, facts, base_config)
        fused = any(s.part is not None for s in sources.values())
        ref = reference.build_reference(run, arch, checkpoint_fused_qkv=fused)
        arch = dataclasses.replace(arch, rope_scaling=ref.rope_scaling)
        mapping = keymap.map_to_hf(sources, arch.titan_model_config())
    report.key_rules = rules
    report.warnings.extend(warnings)
    report.architecture = asdict(arch)
    report.reference = ref.summary()
    dtype_name = options.dtype or run.compute_dtype
    if dtype_name not in DTYPES:
        raise ConfigError(f"the run's dtype {dtype_name!r} is not an export dtype", hint="pass --dtype bfloat16")
    checkpoint_dtypes = sorted({str(e.dtype).removeprefix("torch.") for e in meta.model.values()})
    report.checkpoint_dtype = ",".join(checkpoint_dtypes)
    report.export_dtype = dtype_name
    report.tensors = len(meta.model)
    report.model_bytes = meta.model_bytes
    report.other_bytes = meta.other_bytes
    if run.keep_latest_k and options.layout == "beside" and options.output is None:
        report.warnings.append(
            f"--layout beside writes into the checkpoint folder, and this run purges with keep_latest_k="
            f"{run.keep_latest_k}: TorchTitan counts `{meta.label}-hf` as a checkpoint (pattern step-(\\d+)), "
            "may delete it and may resume from it")
    return _Plan(meta, run, assets, sources, mapping, arch, base_config, DTYPES[dtype_name], tokenizer_files,
                 tokenizer_size, buffers, ref)


def _metadata_checks(plan: _Plan, tie: bool | None) -> list[checks.Finding]:
    shapes = {k: s.shape for k, s in plan.sources.items()}
    hf_keys = {plan.mapping[k] for k in plan.sources if not (tie and k == "lm_head.weight")}
    with_head = not tie if tie is not None else "lm_head.weight" in plan.sources
    found = [
        checks.check_key_coverage(hf_keys, keymap.expected_hf_keys(
            plan.arch.n_layers, with_head=with_head, moe_layers=plan.arch.moe.moe_layers if plan.arch.moe else (),
            num_experts=plan.arch.moe.num_experts if plan.arch.moe else 0)),
        checks.check_embedding_shapes(shapes, plan.arch.vocab_size, plan.arch.dim),
        checks.check_vocab_padding(plan.arch.vocab_size, plan.tokenizer_size),
    ]
    if tie is None and plan.arch.moe is not None:
        moe = plan.arch.moe
        biases = sum(1 for k in plan.training_buffers if k.endswith("expert_bias_E"))
        found.append(checks.Finding(
            "moe", True, f"{moe.num_experts} experts, top-{moe.top_k}, expert FFN {moe.moe_hidden_dim}, "
                         f"norm_topk_prob={moe.norm_topk_prob}, MoE layers {list(moe.moe_layers)}; "
                         f"{biases} expert-bias buffers (must be zero, checked when the data is read)"))
    if plan.reference is not None:
        counts = plan.reference.summary()["fields"]
        rope = plan.reference.rope_scaling
        found.append(checks.Finding(
            "run_settings", True,
            f"reference from {plan.reference.source}; "
            + (", ".join(f"{n} {a}" for a, n in sorted(counts.items())) + " fields; " if counts else "")
            + (f"RoPE {rope['rope_type']} factor {rope['factor']:g}" if rope else "plain RoPE")))
    if tie is None:  # metadata only: say what the data check will decide
        has_head = "lm_head.weight" in plan.sources
        found.append(checks.Finding(
            "tied_weights", True,
            f"run config: {'tied' if plan.arch.tie_word_embeddings else 'untied'}; checkpoint "
            + ("stores a head tensor: tied only if it equals the embedding (checked when the data is read)"
               if has_head else "stores no head tensor: tied")))
    return found


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
    timer = _Timer(report.timings)
    started = time.perf_counter()
    report.source_fingerprint = source_fingerprint(step_dir)
    plan = _plan(step_dir, options, report, timer)
    meta_findings = _metadata_checks(plan, None)
    report.findings = [f.to_json() for f in meta_findings]
    if options.dry_run:
        # what will be written: the head is dropped when the run ties it and the data confirms it
        report.hf_tensors_untied = len(plan.mapping)
        tied_head = plan.arch.tie_word_embeddings and "lm_head.weight" in plan.sources
        report.hf_tensors = len(plan.mapping) - (1 if tied_head else 0)
        report.status = "planned"
        report.timings["total"] = round(time.perf_counter() - started, 4)
        return report
    checks.raise_on_failures(meta_findings, step_dir.name)
    return export_planned(plan, options, report, timer, output_dir, started, cancel=cancel, progress=progress)


def export_planned(plan: _Plan, options: ExportOptions, report: ExportReport, timer: _Timer, output_dir: Path,
                   started: float, *, cancel: CancelToken | None = None,
                   progress: weight_stream.ProgressFactory | None = None) -> ExportReport:
    """Stream, check, write, verify and publish a planned export into `output_dir` (under its lock).

    Without `options.force`, an export already published from the same source, options and assets is kept and
    the report says `skipped`: checked after taking the lock, so a process that waited behind another's export
    of this step does not redo it.
    """
    with step_lock(output_dir):
        if already_exported(plan, options, report, output_dir):
            report.status = "skipped"
            report.timings["total"] = round(time.perf_counter() - started, 4)
            return report
        publish.clean_stale_temp_dirs(output_dir.parent, output_dir.name)
        check_cancel(cancel, "start")
        temp_dir = publish.make_temp_dir(output_dir.parent, output_dir.name)
        try:
            _export_into(plan, options, report, timer, temp_dir, cancel=cancel, progress=progress)
            with timer.stage("publish"):
                report.timings["total"] = round(time.perf_counter() - started, 4)
                report.status = "exported"
                report.written = True
                publish.write_json(temp_dir / REPORT_FILE, report.to_json())
                check_cancel(cancel, "publish")  # the last point: after the rename the export is published
                publish.publish(temp_dir, output_dir)
        except BaseException:
            publish.remove_tree(temp_dir)
            raise
    logger.info("%s exported to %s in %.2f s", plan.meta.label, output_dir, report.timings["total"])
    return report


def already_exported(plan: _Plan, options: ExportOptions, report: ExportReport, output_dir: Path) -> bool:
    """Whether `output_dir` already holds this export (same source, options and assets); call under the step lock.

    Sets `report.output_inputs`, and `report.replaced` when an earlier export will be replaced.

    Raises:
        OutputError: `output_dir` exists but is not a molgen_export export, and `options.force` is not set.
    """
    report.output_inputs = output_inputs(report.source_fingerprint, export_dtype=report.export_dtype,
                                         max_shard_bytes=options.max_shard_bytes, assets=plan.assets)
    recorded = _recorded(output_dir)
    if output_dir.exists() and recorded is None and not options.force:
        raise OutputError(f"{output_dir} exists and is not a molgen_export export (no {REPORT_FILE}); "
                          "refusing to replace what molgen_export did not write", path=output_dir,
                          hint="move that folder away, or pass --force to replace it")
    changed = ["--force"] if options.force and output_dir.exists() else _changed_inputs(recorded, report.output_inputs)
    if recorded is not None and not changed:
        logger.info("%s already exported from this checkpoint, with these options and assets, to %s",
                    plan.meta.label, output_dir)
        return True
    if output_dir.exists():
        report.replaced = changed
        logger.info("%s: replacing the export in %s (changed: %s)", plan.meta.label, output_dir, ", ".join(changed))
    return False


def check_expert_bias(plan: _Plan, options: ExportOptions, report: ExportReport,
                      counter: read.ByteCounter) -> list[checks.Finding]:
    """The MoE expert-bias finding (reads the small bias buffers); raises when it fails."""
    if plan.arch.moe is None and not plan.training_buffers:
        return []
    biases = {key: plan.meta.read(checkpoint_key, counter) for key, checkpoint_key in plan.training_buffers.items()
              if key.endswith("expert_bias_E")}
    finding = checks.check_expert_bias(biases, options.allow_expert_bias_drop)
    if finding.warning:
        report.warnings.append(finding.detail)
    checks.raise_on_failures([finding], plan.meta.label)
    return [finding]


def _export_into(plan: _Plan, options: ExportOptions, report: ExportReport, timer: _Timer, temp_dir: Path, *,
                 cancel: CancelToken | None = None, progress: weight_stream.ProgressFactory | None = None) -> None:
    """Stream the weights into `temp_dir`, write configs and tokenizer, verify what is on disk.

    Memory stays flat in the model's size (row pieces, see `export_stream`); the optimizer state is never read.
    Timings: `stream` (read, cast, NaN/Inf screen and write, overlapped), `fsync`, `assets`, `verify_files`,
    `verify_logits`; `stream.*` break the stream down (`read_wait` high: the disk was the bottleneck).
    """
    counter = read.ByteCounter()
    heads = (plan.arch.n_heads, plan.arch.n_kv_heads, plan.arch.head_dim)
    findings = check_expert_bias(plan, options, report, counter)

    def open_writer(planned: list[safetensors_writer.PlannedTensor]) -> safetensors_writer.SafetensorsWriter:
        return safetensors_writer.SafetensorsWriter(temp_dir, safetensors_writer.plan_shards(planned, options.max_shard_bytes))

    def after_tie(outcome: weight_stream.StreamOutcome) -> None:
        if outcome.tie_finding.warning:
            report.warnings.append(outcome.tie_finding.detail)
        findings.extend(_metadata_checks(plan, outcome.tie) + [outcome.tie_finding])
        checks.raise_on_failures(findings, plan.meta.label)

    streamer = weight_stream.WeightStreamer(plan.meta, plan.sources, plan.mapping, plan.export_dtype, heads,
                                            open_writer, counter, cancel=cancel, progress=progress)
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
            report.files = writer.close()
    except BaseException:
        writer.abort()
        raise
    finish_export(plan, options, report, timer, temp_dir, outcome.tie, outcome.planned, findings, cancel=cancel)


def finish_export(plan: _Plan, options: ExportOptions, report: ExportReport, timer: _Timer, temp_dir: Path,
                  tie: bool, planned: list[safetensors_writer.PlannedTensor], findings: list[checks.Finding], *,
                  cancel: CancelToken | None = None) -> None:
    """After the weights are on disk: configs, tokenizer, re-read check, logit check, model card.

    Raises:
        VerificationError: any finding failed (the caller removes `temp_dir`).
    """
    heads = (plan.arch.n_heads, plan.arch.n_kv_heads, plan.arch.head_dim)
    with timer.stage("assets"):
        hf_config = config_files.build_hf_config(plan.base_config, plan.arch, tie=tie, dtype=report.export_dtype)
        generation = config_files.build_generation_config(plan.assets, hf_config)
        report.warnings.extend(config_files.reconcile_special_tokens(hf_config, generation,
                                                                 config_files.special_token_ids(plan.assets)))
        publish.write_json(temp_dir / "config.json", hf_config)
        publish.write_json(temp_dir / "generation_config.json", generation)
        report.files += ["config.json", "generation_config.json"]
        report.files += publish.copy_files(plan.tokenizer_files, temp_dir)

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
            result = logit_gate.verify_export(plan.arch, titan, temp_dir, tie=tie,
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
    report.output_bytes = sum((temp_dir / name).stat().st_size for name in report.files)
    publish.write_text(temp_dir / "README.md", model_card(report))
    report.files += ["README.md", REPORT_FILE]


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


def failed_report(step_dir: Path, options: ExportOptions, error: MolgenExportError | Exception) -> ExportReport:
    """A report for a step that could not be exported (for `--json` and the watcher's failure records)."""
    number = discover.step_number(step_dir)
    report = ExportReport(step=number if number is not None else -1, step_dir=str(step_dir),
                          output_dir=str(output_dir_for(step_dir, options)), status="failed", error=str(error))
    if isinstance(error, VerificationError):
        report.findings = [f.to_json() for f in error.findings]
    return report
