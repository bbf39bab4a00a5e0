"""Distributed export over torch.distributed: the ranks divide the output shards, rank 0 verifies and publishes.

`torchrun --nproc-per-node N -m molgen_export --dcp-path STEP --distributed`. Every rank plans from the
metadata (cheap, identical everywhere). Rank 0 takes the step lock, makes the temporary folder and decides the
tie (head vs embedding, compared piece by piece); the ranks then split the shard plan round-robin, each reading
from the DCP checkpoint only the tensors of its shards and writing those files into the shared temporary folder.
After a gather, rank 0 writes the index, configs and tokenizer, re-reads the files, runs the logit check (memory
bounded as in the single-process path) and publishes with one rename. The files are byte-identical to a
single-process export with the same options. A failure on any rank aborts every rank and publishes nothing.
"""

from __future__ import annotations

import logging
import os
import time
from pathlib import Path

from molgen_export.verify import checks
from molgen_export.dcp import read
from molgen_export.dcp import discover
from molgen_export.pipeline import export
from molgen_export.pipeline import weight_stream
from molgen_export.pipeline.plan import ExportPlan, check_expert_bias, metadata_checks, plan_dcp_step
from molgen_export.pipeline.report import ExportReport
from molgen_export.pipeline.timing import Timer
from molgen_export.hf import safetensors_writer
from molgen_export.options import ExportOptions
from molgen_export.errors import ConfigError, MolgenExportError

logger = logging.getLogger(__name__)

BACKEND_ENV = "MOLGEN_EXPORT_BACKEND"
"""Process-group backend when molgen_export starts the group itself (default gloo: the export runs on CPU)."""


class DistributedExportError(MolgenExportError):
    """Another rank failed; this rank published nothing (exit 1)."""

    exit_code = 1


def _dist():
    import torch.distributed as dist

    return dist


def ensure_process_group() -> bool:
    """Start the default process group from torchrun's environment if none is running; True when we started it."""
    dist = _dist()
    if dist.is_initialized():
        return False
    dist.init_process_group(backend=os.environ.get(BACKEND_ENV, "gloo"))
    return True


def export_step_distributed(step_dir: Path, options: ExportOptions) -> ExportReport:
    """Export one step with every rank of the default process group (see the module docstring).

    Every rank plans; rank 0 runs the export skeleton (`export.export_planned`: lock, skip check, temporary
    folder, verify, publish) with a `write_weights` that tells the other ranks the tie and the temporary folder,
    writes its own shards and gathers theirs.

    Returns:
        The report, the same on every rank.

    Raises:
        MolgenExportError: on every rank when any rank failed; nothing is published.
        ConfigError: on every rank, for a TorchTitan qwen3_5 run (its distributed export is not built yet).
    """
    if export.qwen3_5_run_config(Path(step_dir), options) is not None:
        raise ConfigError(f"{Path(step_dir).name} is a TorchTitan qwen3_5 run: molgen_export has no distributed "
                          "export for it yet", hint="export it in one process (without --distributed)")
    dist = _dist()
    rank, world = dist.get_rank(), dist.get_world_size()
    step_dir = Path(step_dir)
    info = discover.describe_step(step_dir)
    discover.require_dcp(info)
    output_dir = export.output_dir_for(step_dir, options)
    report = ExportReport(step=info.step, step_dir=str(step_dir), output_dir=str(output_dir),
                          versions=export.versions(), options=export.options_record(options))
    timer = Timer(report.timings)
    started = time.perf_counter()
    report.source_fingerprint = fingerprint = export.source_fingerprint(step_dir)
    plan = plan_dcp_step(step_dir, options, report, timer, fingerprint=fingerprint)
    checks.raise_on_failures(metadata_checks(plan, None), step_dir.name)  # every rank refuses alike: no message
    if rank != 0:
        return _follow(plan, options, report, timer, rank, world)
    return _lead(plan, options, report, timer, output_dir, started, world)


def _lead(plan: ExportPlan, options: ExportOptions, report: ExportReport, timer: Timer, output_dir: Path,
          started: float, world: int) -> ExportReport:
    """Rank 0: the export skeleton, telling the other ranks what it decided (or why it stopped) at each step."""
    told = {"decision": False}
    counter = read.ByteCounter()

    def write_weights(plan: ExportPlan, temp_dir: Path) -> export.WrittenWeights:
        findings = check_expert_bias(plan, options, report, counter)
        with timer.stage("tie"):
            tie, tie_finding = weight_stream.decide_tie(plan.meta, plan.sources, plan.arch.tie_word_embeddings,
                                                        counter)
        _broadcast({"temp": str(temp_dir), "tie": tie})
        told["decision"] = True
        if tie_finding.warning:
            report.warnings.append(tie_finding.detail)
        findings += metadata_checks(plan, tie) + [tie_finding]
        planned, shards, gathered = _write_shards(plan, options, temp_dir, tie, timer, counter, 0, world)
        errors = [r["error"] for r in gathered if r["error"]]
        if errors:
            raise DistributedExportError("; ".join(errors), hint="nothing was published")
        report.tied = tie
        report.bytes_read = sum(r["bytes"] for r in gathered)
        nonfinite = [(plan.sources[k].checkpoint_key, plan.mapping[k], nan, inf)
                     for r in gathered for k, (nan, inf) in r["nonfinite"].items()]
        findings.append(checks.nonfinite_finding(nonfinite, len(plan.sources)))
        checks.raise_on_failures(findings, plan.meta.label)
        files = [s.filename for s in shards] + safetensors_writer.write_index(temp_dir, shards)
        return export.WrittenWeights(tie, planned, files, findings, report_notes=(f"exported by {world} ranks",))

    try:
        report = export.export_planned(plan, output_dir, options=options, report=report, timer=timer,
                                       started=started, write_weights=write_weights)
    except BaseException as exc:  # told to the other ranks (waiting for the decision, or for the outcome), then raised here
        _broadcast({"error": f"rank 0: {type(exc).__name__}: {exc}"})
        raise
    if not told["decision"]:  # already exported: the other ranks wait for the decision
        _broadcast({"skip": True})
        return report
    outcome = _broadcast({"report": report.to_json()})
    return ExportReport(**outcome["report"])


def _follow(plan: ExportPlan, options: ExportOptions, report: ExportReport, timer: Timer, rank: int,
            world: int) -> ExportReport:
    """Ranks 1..N-1: wait for rank 0's decision, write this rank's shards into its temporary folder, wait for the
    outcome."""
    decision = _broadcast({})
    if "error" in decision:
        raise DistributedExportError(decision["error"], hint="see rank 0's message; nothing was published")
    if decision.get("skip"):
        report.status = "skipped"
        return report
    _write_shards(plan, options, Path(decision["temp"]), decision["tie"], timer, read.ByteCounter(), rank, world)
    outcome = _broadcast({})
    if "error" in outcome:
        raise DistributedExportError(outcome["error"], hint="nothing was published")
    return ExportReport(**outcome["report"])


def _write_shards(plan: ExportPlan, options: ExportOptions, temp_dir: Path, tie: bool, timer: Timer,
                  counter: read.ByteCounter, rank: int, world: int) -> tuple[list, list, list[dict]]:
    """This rank's share of the shard plan (round-robin), streamed into `temp_dir`; every rank's result gathered.

    Returns:
        The planned tensors, the whole shard plan, and each rank's `{rank, error, nonfinite, files, bytes}`.
    """
    everything = weight_stream.WeightStreamer(plan.meta, plan.sources, plan.mapping, plan.export_dtype, plan.heads,
                                              None, counter)
    planned = everything.planned(tie)
    shards = safetensors_writer.plan_shards(planned, options.max_shard_bytes)
    mine = [shard for i, shard in enumerate(shards) if i % world == rank]
    my_keys = {key for shard in mine for key in shard.offsets}
    result: dict = {"rank": rank, "error": None, "nonfinite": {}, "files": [s.filename for s in mine]}
    try:
        with timer.stage("stream"):
            if mine:
                streamer = weight_stream.WeightStreamer(
                    plan.meta, {k: v for k, v in plan.sources.items() if plan.mapping[k] in my_keys},
                    plan.mapping, plan.export_dtype, plan.heads,
                    lambda _planned: safetensors_writer.SafetensorsWriter(temp_dir, mine), counter,
                    readers=options.reader_threads)
                outcome = streamer.stream_known_tie(tie)
                outcome.writer.close(index=False)
                result["nonfinite"] = outcome.nonfinite
    except BaseException as exc:
        result["error"] = f"rank {rank}: {type(exc).__name__}: {exc}"
        logger.error("%s", result["error"])
    result["bytes"] = counter.bytes
    gathered: list = [None] * world
    _dist().all_gather_object(gathered, result)
    return planned, shards, gathered


def _broadcast(payload: dict) -> dict:
    """Rank 0's payload, on every rank."""
    dist = _dist()
    box = [payload if dist.get_rank() == 0 else None]
    dist.broadcast_object_list(box, src=0)
    return box[0]
