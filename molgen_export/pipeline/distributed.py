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
from contextlib import ExitStack
from pathlib import Path

from molgen_export.verify import checks
from molgen_export.dcp import read
from molgen_export.dcp import discover
from molgen_export.pipeline import export
from molgen_export.pipeline import weight_stream
from molgen_export.hf import safetensors_writer
from molgen_export.hf import publish
from molgen_export.options import ExportOptions
from molgen_export.errors import MolgenExportError

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


def export_step_distributed(step_dir: Path, options: ExportOptions) -> export.ExportReport:
    """Export one step with every rank of the default process group (see the module docstring).

    Returns:
        The report, the same on every rank.

    Raises:
        MolgenExportError: on every rank when any rank failed; nothing is published.
    """
    dist = _dist()
    rank, world = dist.get_rank(), dist.get_world_size()
    step_dir = Path(step_dir)
    info = discover.describe_step(step_dir)
    discover.require_dcp(info)
    output_dir = export.output_dir_for(step_dir, options)
    report = export.ExportReport(step=info.step, step_dir=str(step_dir), output_dir=str(output_dir),
                                 versions=export.versions())
    timer = export._Timer(report.timings)
    started = time.perf_counter()
    report.source_fingerprint = export.source_fingerprint(step_dir)
    plan = export._plan(step_dir, options, report, timer)
    findings = export._metadata_checks(plan, None)
    checks.raise_on_failures(findings, step_dir.name)
    counter = read.ByteCounter()

    with ExitStack() as stack:
        decision: dict = {}
        if rank == 0:
            try:
                stack.enter_context(export.step_lock(output_dir))
                if export.already_exported(plan, options, report, output_dir):
                    decision = {"skip": True}
                else:
                    publish.clean_stale_temp_dirs(output_dir.parent, output_dir.name)
                    temp_dir = publish.make_temp_dir(output_dir.parent, output_dir.name)
                    stack.callback(lambda: publish.remove_tree(temp_dir) if temp_dir.exists() else None)
                    findings = export.check_expert_bias(plan, options, report, counter)
                    with timer.stage("tie"):
                        tie, tie_finding = weight_stream.decide_tie(plan.meta, plan.sources,
                                                                    plan.arch.tie_word_embeddings, counter)
                    decision = {"temp": str(temp_dir), "tie": tie, "tie_finding": tie_finding.to_json(),
                                "findings": [f.to_json() for f in findings], "warnings": list(report.warnings)}
            except BaseException as exc:  # told to the other ranks, then raised here
                decision = {"error": f"rank 0: {type(exc).__name__}: {exc}"}
                _broadcast(decision)
                raise
        decision = _broadcast(decision)
        if "error" in decision:
            raise DistributedExportError(decision["error"], hint="see rank 0's message; nothing was published")
        if decision.get("skip"):
            report.status = "skipped"
            return report
        temp_dir, tie = Path(decision["temp"]), decision["tie"]
        tie_finding = checks.Finding(**decision["tie_finding"])
        findings = [checks.Finding(**f) for f in decision["findings"]]
        report.warnings = list(decision["warnings"])
        if tie_finding.warning:
            report.warnings.append(tie_finding.detail)
        findings += export._metadata_checks(plan, tie) + [tie_finding]

        heads = (plan.arch.n_heads, plan.arch.n_kv_heads, plan.arch.head_dim)
        everything = weight_stream.WeightStreamer(plan.meta, plan.sources, plan.mapping, plan.export_dtype, heads,
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
                        plan.mapping, plan.export_dtype, heads, lambda _planned: safetensors_writer.SafetensorsWriter(temp_dir, mine),
                        counter)
                    outcome = streamer.stream_known_tie(tie)
                    outcome.writer.close(index=False)
                    result["nonfinite"] = outcome.nonfinite
        except BaseException as exc:
            result["error"] = f"rank {rank}: {type(exc).__name__}: {exc}"
            logger.error("%s", result["error"])
        result["bytes"] = counter.bytes
        gathered: list = [None] * world
        dist.all_gather_object(gathered, result)
        errors = [r["error"] for r in gathered if r["error"]]

        outcome_json: dict = {}
        if rank == 0:
            try:
                if errors:
                    raise DistributedExportError("; ".join(errors), hint="nothing was published")
                report.tied = tie
                report.bytes_read = sum(r["bytes"] for r in gathered)
                nonfinite = [(plan.sources[k].checkpoint_key, plan.mapping[k], nan, inf)
                             for r in gathered for k, (nan, inf) in r["nonfinite"].items()]
                findings.append(checks.nonfinite_finding(nonfinite, len(plan.sources)))
                checks.raise_on_failures(findings, plan.meta.label)
                report.files = [s.filename for s in shards] + safetensors_writer.write_index(temp_dir, shards)
                export.finish_export(plan, options, report, timer, temp_dir, tie, planned, findings)
                report.timings["total"] = round(time.perf_counter() - started, 4)
                report.status, report.written = "exported", True
                report.warnings.append(f"exported by {world} ranks")
                publish.write_json(temp_dir / export.REPORT_FILE, report.to_json())
                publish.publish(temp_dir, output_dir)
                outcome_json = {"report": report.to_json()}
            except BaseException as exc:
                outcome_json = {"error": f"{type(exc).__name__}: {exc}"}
                _broadcast(outcome_json)
                raise
        outcome_json = _broadcast(outcome_json)
        if "error" in outcome_json:
            raise DistributedExportError(f"rank 0: {outcome_json['error']}", hint="nothing was published")
        return export.ExportReport(**outcome_json["report"])


def _broadcast(payload: dict) -> dict:
    """Rank 0's payload, on every rank."""
    dist = _dist()
    box = [payload if dist.get_rank() == 0 else None]
    dist.broadcast_object_list(box, src=0)
    return box[0]
