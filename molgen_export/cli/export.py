"""`molgen-export --dcp-path PATH`: export the selected steps of a checkpoint folder (the default command)."""

from __future__ import annotations

import argparse
import json
import sys
from collections.abc import Sequence
from pathlib import Path

from molgen_export.cli import flags
from molgen_export.errors import MolgenExportError, UsageError
from molgen_export.pipeline.summary import format_size, summary_line

EXPORT_EPILOG = """\
examples:
  python -m molgen_export --dcp-path outputs/checkpoint/step-1800
  python -m molgen_export --dcp-path outputs --steps latest
  python -m molgen_export --dcp-path outputs/checkpoint --steps 100-500 --dtype bfloat16
  python -m molgen_export --dcp-path outputs/checkpoint --dry-run
  python -m molgen_export --dcp-path outputs/checkpoint/step-20/__0_0.distcp --output /data/hf --json
  torchrun --nproc-per-node 4 -m molgen_export --dcp-path outputs/checkpoint/step-1800 --distributed
  python -m molgen_export demo --workdir /tmp/molgen-demo

exit codes: 0 every requested step exported (or already was); 1 a step failed its checks or the logit
comparison; 2 bad usage, input or config. Set MOLGEN_EXPORT_DEBUG=1 to see tracebacks.
subcommands: """


def build_export_parser(subcommands: Sequence[str] = ()) -> argparse.ArgumentParser:
    """The parser of `molgen-export --dcp-path PATH`; its epilog lists `subcommands`."""
    parser = argparse.ArgumentParser(
        prog="molgen-export", description="Export TorchTitan Qwen3 DCP checkpoints to verified HuggingFace folders.",
        epilog=EXPORT_EPILOG + ", ".join(subcommands), formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--dcp-path", type=Path, required=True,
                        help="a step-N folder, a checkpoint folder or run folder holding step-N folders, or one .distcp file")
    parser.add_argument("--steps", default="all", help="which steps: all (default), latest, 10,20, 100-500, every:K")
    parser.add_argument("--force", action="store_true", help="re-export steps already exported from the same source")
    parser.add_argument("--dry-run", action="store_true", help="read metadata and configs only; print the plan")
    parser.add_argument("--json", action="store_true", help="print the reports as JSON")
    parser.add_argument("--distributed", action="store_true",
                        help="run under torchrun: the ranks split the output shards, rank 0 verifies and publishes")
    flags.add_verbosity(parser)
    flags.add_export_options(parser)
    return parser


def select_steps(steps: list, selector: str) -> list:
    """Pick StepInfos by `all`, `latest`, `10,20`, `100-500` or `every:K` (steps whose N is a multiple of K).

    Raises:
        UsageError: the selector cannot be read.
    """
    selector = selector.strip()
    if selector == "all":
        return steps
    if selector == "latest":
        complete = [s for s in steps if s.complete]
        return complete[-1:] if complete else steps[-1:]
    try:
        if selector.startswith("every:"):
            k = int(selector.split(":", 1)[1])
            if k <= 0:
                raise ValueError
            return [s for s in steps if s.step % k == 0]
        if "-" in selector and "," not in selector:
            low, high = (int(x) for x in selector.split("-", 1))
            return [s for s in steps if low <= s.step <= high]
        wanted = {int(x) for x in selector.split(",") if x.strip()}
    except ValueError as exc:
        raise UsageError(f"cannot read --steps {selector!r}", hint="use all, latest, 10,20, 100-500 or every:K") from exc
    missing = wanted - {s.step for s in steps}
    if missing:
        raise UsageError(f"--steps names step(s) {sorted(missing)} that do not exist",
                         hint=f"available: {', '.join(str(s.step) for s in steps) or 'none'}")
    return [s for s in steps if s.step in wanted]


def dry_run_block(report, step_info, state: str) -> str:
    """The multi-line dry-run description of one step."""
    lines = [f"{step_info.step_dir.name}: complete, {state}"]
    tie_note = ""
    if report.hf_tensors_untied is not None and report.hf_tensors_untied != report.hf_tensors:
        tie_note = f" ({report.hf_tensors_untied} if the stored head differs from the embedding: decided on the data)"
    lines.append(f"  model tensors   {report.tensors} ({format_size(report.model_bytes)}), -> {report.hf_tensors} HF tensors"
                 f"{tie_note}")
    lines.append(f"  other state     {format_size(report.other_bytes)} (optimizer, scheduler, dataloader; not read)")
    lines.append(f"  dtype           {report.checkpoint_dtype} -> {report.export_dtype}")
    lines.append(f"  run config      {report.run_config.get('path')} ({report.run_config.get('kind')})")
    lines.append(f"  base assets     {report.hf_assets}")
    lines.append(f"  output          {report.output_dir}")
    for finding in report.findings:
        lines.append(f"  check {finding['name']:<16} {'ok' if finding['ok'] else 'FAILED'}  {finding['detail']}")
    for warning in report.warnings:
        lines.append(f"  warning         {warning}")
    return "\n".join(lines)


def run_export(args: argparse.Namespace) -> int:
    """`molgen-export --dcp-path PATH`: export (or plan) each selected step; returns the exit code."""
    from molgen_export.dcp import discover
    from molgen_export.pipeline import export

    if args.distributed:
        return _run_distributed(args)
    progress = _progress_bars() if sys.stderr.isatty() and not args.quiet and not args.json else None
    options = flags.options_from_args(args, dry_run=False)
    checkpoint_root, steps = discover.resolve_checkpoint_root(args.dcp_path)
    single = len(steps) == 1 and (args.dcp_path.is_file() or discover.step_number(args.dcp_path) is not None)
    steps = select_steps(steps, args.steps)
    if not steps:
        raise UsageError(f"--steps {args.steps!r} selects no step in {checkpoint_root}")
    reports = []
    code = flags.EXIT_OK
    for info in steps:
        if not info.complete:
            if single or info.format not in ("dcp-in-progress",):
                try:
                    discover.require_dcp(info)
                except MolgenExportError as exc:
                    if single:
                        raise
                    print(f"{info.step_dir.name}  refused  {str(exc).splitlines()[0]}", file=sys.stderr)
                    code = max(code, exc.exit_code)
                    continue
            print(f"{info.step_dir.name}  in progress (no .metadata yet), skipped", file=sys.stderr)
            continue
        try:
            if args.dry_run:
                report = export.plan_step(info.step_dir, options)
                state = export.export_state(info.step_dir, options)
                reports.append(report)
                if not args.json:
                    print(dry_run_block(report, info, {"missing": "not exported yet"}.get(state, state)))
                if not report.ok:
                    code = max(code, flags.EXIT_FAILED)
                continue
            if not args.force and export.export_state(info.step_dir, options) == "exported":
                report = export.ExportReport(step=info.step, step_dir=str(info.step_dir),
                                             output_dir=str(export.output_dir_for(info.step_dir, options)),
                                             status="skipped")
            else:
                report = export.export_step(info.step_dir, options, progress=progress)
        except MolgenExportError as exc:
            if single:
                raise
            report = export.failed_report(info.step_dir, options, exc)
            code = max(code, exc.exit_code)
            if not args.json:
                print(f"{info.step_dir.name}  FAILED  {exc}", file=sys.stderr)
            reports.append(report)
            continue
        reports.append(report)
        if not args.json:
            print(summary_line(report))
    if args.json:
        print(json.dumps([r.to_json() for r in reports], indent=2))
    elif not args.dry_run and len(steps) > 1:
        tally = {}
        for r in reports:
            tally[r.status] = tally.get(r.status, 0) + 1
        print("total: " + ", ".join(f"{n} {s}" for s, n in sorted(tally.items())))
    return code


def _progress_bars():
    """The `progress` of `export_step` on a terminal: a tqdm bar per export (reading, casting, writing)."""
    from tqdm import tqdm

    return lambda total, label: tqdm(total=total, desc=label, unit="B", unit_scale=True, leave=False,
                                     file=sys.stderr)


def _run_distributed(args: argparse.Namespace) -> int:
    """`--distributed`: every rank exports each selected step together; rank 0 prints."""
    from molgen_export.dcp import discover
    from molgen_export.pipeline.distributed import ensure_process_group, export_step_distributed

    if args.dry_run:
        raise UsageError("--dry-run reads no data; run it without --distributed")
    started_group = ensure_process_group()
    import torch.distributed as dist

    try:
        options = flags.options_from_args(args, dry_run=False)
        _, steps = discover.resolve_checkpoint_root(args.dcp_path)
        reports = []
        for info in select_steps(steps, args.steps):
            if not info.complete:
                if dist.get_rank() == 0:
                    print(f"{info.step_dir.name}  in progress (no .metadata yet), skipped", file=sys.stderr)
                continue
            report = export_step_distributed(info.step_dir, options)
            reports.append(report)
            if dist.get_rank() == 0 and not args.json:
                print(summary_line(report))
        if dist.get_rank() == 0 and args.json:
            print(json.dumps([r.to_json() for r in reports], indent=2))
        return flags.EXIT_OK
    finally:
        if started_group:
            dist.destroy_process_group()
