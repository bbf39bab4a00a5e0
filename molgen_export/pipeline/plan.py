"""The export plan: everything decided from the run config, the base assets and the tensor source's metadata
before any tensor data is read (names mapped, architecture resolved, reference built), and the checks that need
only the metadata."""

from __future__ import annotations

import dataclasses
from dataclasses import asdict, dataclass, field
from pathlib import Path

import torch

from molgen_export.dcp import read
from molgen_export.dcp.source import TensorSource
from molgen_export.errors import ConfigError
from molgen_export.hf import config_files
from molgen_export.mapping import architecture, keymap, run_config
from molgen_export.options import ExportOptions
from molgen_export.pipeline.report import ExportReport
from molgen_export.pipeline.timing import Timer
from molgen_export.verify import checks, reference

DTYPES = {"bfloat16": torch.bfloat16, "float16": torch.float16, "float32": torch.float32}
"""Export dtype names (`--dtype`, the run's training dtype) -> torch dtypes."""


@dataclass
class ExportPlan:
    """Everything decided before any tensor data is read."""

    meta: TensorSource
    """The tensor source: a DCP step (`read.StepMetadata`) or a weights folder (see `dcp.source.TensorSource`)."""
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
    source_fingerprint: str = ""
    """The source's fingerprint (`export.source_fingerprint` of a step, `WeightsFolder.fingerprint`): an export is
    skipped only when this, the options that change the files and the assets match what the folder records."""
    deferred: bool = False
    """Planned without torchtitan's model code (names from `keymap.HF_NAME_TABLE`, the reference's fields decided
    on the run's dict, no registry cross-check): `confirm_plan` must settle it before anything is published."""

    @property
    def export_dtype_name(self) -> str:
        """The export dtype as the report and `config.json` spell it (`bfloat16`, ...)."""
        return str(self.export_dtype).removeprefix("torch.")

    @property
    def heads(self) -> tuple[int, int, int]:
        """(n_heads, n_kv_heads, head_dim): what splitting a fused wqkv needs."""
        return self.arch.n_heads, self.arch.n_kv_heads, self.arch.head_dim


def plan_dcp_step(step_dir: Path, options: ExportOptions, report: ExportReport, timer: Timer, *,
                  fingerprint: str = "", run: run_config.RunConfig | None = None, defer: bool = False) -> ExportPlan:
    """Plan the export of a DCP step folder: read the run config (unless the caller has: `run`) and `.metadata`
    (the shards are prefetched meanwhile unless it is a dry run), then `plan_source`.

    With `defer` (an export in this process, which has started importing torchtitan on a thread:
    `titan.import_in_background`), the plan leaves what needs torchtitan to `confirm_plan` (see `plan_source`).
    """
    if not options.dry_run:  # the disk starts on the model bytes while we import and plan
        read.prefetch_step(step_dir)
    with timer.stage("config"):
        run = run or run_config.load_run_config(step_dir.parent, options.config)
    with timer.stage("metadata"):
        meta = read.read_step_metadata(step_dir)
    return plan_source(meta, run, options, report, timer, fingerprint=fingerprint,
                       defer=defer and not options.dry_run)


DRY_RUN_NOTE = ("dry run: each field decided on the run's dict and names from molgen's table of the adapter's "
                "(torchtitan not imported); the export asks torchtitan's adapter and builds the verifier's model")
DEFERRED_NOTE = ("planned on the run's dict and molgen's table of the adapter's names while torchtitan was imported, "
                 "then confirmed with torchtitan's adapter and registry before publishing")


def plan_source(meta: TensorSource, run: run_config.RunConfig, options: ExportOptions, report: ExportReport,
                timer: Timer, *, fingerprint: str = "", defer: bool = False) -> ExportPlan:
    """Decide everything about an export before reading tensor data.

    A dry run, and with `defer` an export, of a run that carries its own model config (TorchTitan 0.3) import
    none of torchtitan's model code here (~2 s of imports, most of a dry run): the reference's fields are decided
    on the run's dict (every refusal still raised), names come from `keymap.HF_NAME_TABLE` (held equal to the
    adapter's by the tests) and the flavor registry is not consulted; a deferred plan is settled by `confirm_plan`.

    Args:
        meta: the tensor source (`dcp.source.TensorSource`: a `read.StepMetadata` or a `WeightsFolder`).
        run: the run config.
        options: the export options (`dtype`, `hf_assets`, `layout`, `output`).
        report: filled with what was decided (run config, assets, architecture, key rules, dtypes, sizes).
        timer: times the `config`, `metadata` and `map` stages.
        fingerprint: the source's fingerprint (kept in the plan for the skip check).

    Returns:
        The plan.

    Raises:
        ConfigError: no base assets, a model-less step, or a dtype that is not an export dtype.
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
        fused = any(s.part is not None for s in sources.values())
        ref = None
        if options.dry_run or defer:
            ref = reference.dict_reference(run, checkpoint_fused_qkv=fused,
                                           why=DRY_RUN_NOTE if options.dry_run else None)
        arch, ref, mapping, warnings = _settle(meta, run, sources, base_config, fused, ref)
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
    return ExportPlan(meta, run, assets, sources, mapping, arch, base_config, DTYPES[dtype_name], tokenizer_files,
                      tokenizer_size, buffers, ref, fingerprint, deferred=ref.config is None and not options.dry_run)


def _settle(meta: TensorSource, run: run_config.RunConfig, sources: dict[str, keymap.TensorSource],
            base_config: dict, fused: bool, ref: reference.Reference | None):
    """Architecture, reference, names and warnings: with torchtitan (`ref` None), or from a `dict_reference`
    with the name table and no registry."""
    canonical_shapes = {s.grouped_key: tuple(meta.model[s.checkpoint_key].shape) if s.expert is not None else s.shape
                        for s in sources.values()}
    facts = architecture.facts_from_shapes(canonical_shapes)
    arch, warnings = architecture.resolve_architecture(run, facts, base_config, registry=ref is None)
    if ref is None:
        ref = reference.build_reference(run, arch, checkpoint_fused_qkv=fused)
        arch = dataclasses.replace(arch, rope_scaling=ref.rope_scaling)
        return arch, ref, keymap.map_to_hf(sources, arch.titan_model_config()), warnings
    arch = dataclasses.replace(arch, rope_scaling=ref.rope_scaling)
    return arch, ref, keymap.map_by_table(sources), warnings


def confirm_plan(plan: ExportPlan, report: ExportReport, timer: Timer) -> tuple[ExportPlan, bool]:
    """Settle a deferred plan with torchtitan: the registry cross-check, the whole reference (the verifier's model
    config) and the adapter's names, exactly as a plan made with torchtitan would have them.

    Returns:
        The settled plan, and whether what was written from the deferred one must be written again (the adapter
        or the registry decided differently from the table: never for the supported versions, which the tests
        hold equal, but a later 0.3.x may rename).

    Raises:
        ConfigError, MappingError, DependencyError: as `plan_source` with torchtitan would have raised.
    """
    if not plan.deferred:
        return plan, False
    with timer.stage("confirm"):
        fused = plan.reference.fused_qkv
        arch, ref, mapping, warnings = _settle(plan.meta, plan.run, plan.sources, plan.base_config, fused, None)
    report.warnings.extend(w for w in warnings if w not in report.warnings)
    report.reference = {**ref.summary(), "planned": DEFERRED_NOTE}  # the model card stays as a plan with torchtitan's
    report.architecture = asdict(arch)
    redo = mapping != plan.mapping or arch != plan.arch
    if redo:
        renamed = sorted(k for k in plan.mapping if mapping.get(k) != plan.mapping[k])
        report.warnings.append(f"torchtitan's adapter or registry decided differently from molgen's table "
                               f"({len(renamed)} name(s), e.g. {renamed[:3]}); the weights were written again with "
                               "torchtitan's decision")
    return dataclasses.replace(plan, arch=arch, reference=ref, mapping=mapping, deferred=False), redo


def metadata_checks(plan: ExportPlan, tie: bool | None) -> list[checks.Finding]:
    """The checks that need no tensor data: key coverage, embedding shapes, vocab padding, MoE and run settings.

    Args:
        plan: the plan.
        tie: the tie decision once the head was compared with the embedding; None before (then the findings
            also say what the data check will decide).
    """
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


def check_expert_bias(plan: ExportPlan, options: ExportOptions, report: ExportReport,
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
