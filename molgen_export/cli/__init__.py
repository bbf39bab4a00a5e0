"""Command line: `python -m molgen_export --dcp-path PATH` exports steps; subcommands add the demo, the watcher
and the other conversions. Exceptions map to exit codes in one table here."""

from __future__ import annotations

import argparse
import importlib
import json
import logging
import os
import sys
import time
from pathlib import Path

from molgen_export.errors import MolgenExportError, UsageError

logger = logging.getLogger("molgen_export")

EXIT_OK, EXIT_FAILED, EXIT_USAGE = 0, 1, 2

SUBCOMMANDS: dict[str, tuple[str, str]] = {
    # name: (module, help). Each module defines add_arguments(parser) and run(args) -> int for that name,
    # as `add_<name>_arguments` / `run_<name>` with dashes turned into underscores.
    "demo": ("molgen_export.cli", "make a tiny TorchTitan Qwen3 run, export every step and verify it"),
    "preflight": ("molgen_export.cli", "prove from a job config, before training, that its checkpoints will export"),
    "watch": ("molgen_export.watch.watcher", "watch a checkpoint folder and export each step as it completes"),
    "report": ("molgen_export.watch.run_report", "per-step table, HTML page or PNG of a run's exports, checks and evals"),
    "import-hf": ("molgen_export.convert.hf_titan", "HF Qwen3 folder -> TorchTitan weights (safetensors or DCP)"),
    "export-titan": ("molgen_export.convert.hf_titan", "TorchTitan-named safetensors -> verified HF folder"),
    "to-jax": ("molgen_export.convert.jax_arrays", "HF Qwen3 folder -> per-layer [in, out] arrays for JAX"),
    "from-nanogpt": ("molgen_export.convert.nanogpt", "nanoGPT/GPT-2 .pt checkpoint -> HF safetensors"),
}

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
subcommands: """ + ", ".join(SUBCOMMANDS)


def add_export_options(parser: argparse.ArgumentParser) -> None:
    """The options every exporting command shares (CLI, watcher)."""
    from molgen_export.options import LAYOUTS

    group = parser.add_argument_group("export options")
    group.add_argument("--output", type=Path, help="export root: step-N-hf/ folders go under it "
                       "(default: <checkpoint_root>-hf/ beside the checkpoint folder)")
    group.add_argument("--layout", choices=LAYOUTS, default="sibling",
                       help="'beside' writes <step-dir>-hf inside the checkpoint folder (unsafe when TorchTitan purges)")
    group.add_argument("--config", type=Path, help="run config (job_config.json) to use instead of searching")
    group.add_argument("--hf-assets", type=Path, help="base assets folder overriding the run's hf_assets_path")
    add_write_and_verify_options(group, dtype_help="export dtype (default: the run's compute dtype)")
    group.add_argument("--allow-expert-bias-drop", action="store_true",
                       help="export a Qwen3 MoE whose load-balancing expert bias is non-zero (routing will differ; "
                            "recorded as a warning)")


def add_write_and_verify_options(group, *, dtype_help: str) -> None:
    """Flags every command that writes an HF folder shares: dtype, shard size, and the logit check."""
    from molgen_export.options import EXPORT_DTYPES

    group.add_argument("--dtype", choices=EXPORT_DTYPES, help=dtype_help)
    group.add_argument("--max-shard-size", default="5GB", help="largest safetensors file (default 5GB)")
    group.add_argument("--skip-logits", action="store_true", help="skip the TorchTitan-vs-HF logit comparison")
    group.add_argument("--logits-atol", type=float, default=1e-3,
                       help="accepted max|logit difference| relative to max|logit| (default 1e-3)")
    group.add_argument("--device", default="cpu", help="device for the logit comparison (cpu or cuda)")
    group.add_argument("--threads", type=int, help="torch threads for the export")


def options_from_args(args: argparse.Namespace, **overrides):
    """ExportOptions from parsed flags (one spelling: --max-shard-size <-> max_shard_size)."""
    from molgen_export.options import ExportOptions

    fields = ExportOptions.__dataclass_fields__
    values = {name: getattr(args, name) for name in fields if hasattr(args, name) and getattr(args, name) is not None}
    values.update(overrides)
    return ExportOptions(**values)


def build_export_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="molgen-export", description="Export TorchTitan Qwen3 DCP checkpoints to verified HuggingFace folders.",
        epilog=EXPORT_EPILOG, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--dcp-path", type=Path, required=True,
                        help="a step-N folder, a checkpoint folder or run folder holding step-N folders, or one .distcp file")
    parser.add_argument("--steps", default="all", help="which steps: all (default), latest, 10,20, 100-500, every:K")
    parser.add_argument("--force", action="store_true", help="re-export steps already exported from the same source")
    parser.add_argument("--dry-run", action="store_true", help="read metadata and configs only; print the plan")
    parser.add_argument("--json", action="store_true", help="print the reports as JSON")
    parser.add_argument("--distributed", action="store_true",
                        help="run under torchrun: the ranks split the output shards, rank 0 verifies and publishes")
    add_verbosity(parser)
    add_export_options(parser)
    return parser


def add_verbosity(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("-v", "--verbose", action="count", default=0, help="more logging (-vv for debug)")
    parser.add_argument("-q", "--quiet", action="store_true", help="only errors")


def setup_logging(args: argparse.Namespace) -> None:
    level = logging.ERROR if getattr(args, "quiet", False) else (
        logging.DEBUG if getattr(args, "verbose", 0) > 1 else logging.INFO if getattr(args, "verbose", 0) else logging.WARNING)
    logging.basicConfig(level=level, format="%(asctime)s %(levelname)s %(name)s: %(message)s", stream=sys.stderr)
    logging.getLogger("molgen_export").setLevel(level)


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


def _size(n: int) -> str:
    return f"{n / 1e9:.2f} GB" if n >= 1e8 else f"{n / 1e6:.2f} MB"


def summary_line(report) -> str:
    """One line per step: `step-20  ok  1.23 GB  bf16  logits max|Δ| 3e-06  12.4 s  -> path`."""
    short = {"bfloat16": "bf16", "float16": "fp16", "float32": "fp32"}
    name = Path(report.step_dir).name
    if report.status == "failed":
        first = (report.error or "").splitlines()[0] if report.error else ""
        return f"{name}  FAILED  {first}"
    parts = [name, {"exported": "ok", "planned": "plan", "skipped": "skip"}.get(report.status, report.status)]
    if report.status == "skipped":
        return f"{name}  skip  already exported from this checkpoint  -> {report.output_dir}"
    parts.append(_size(report.output_bytes or report.model_bytes))
    parts.append(short.get(report.export_dtype, report.export_dtype))
    if report.fidelity:
        parts.append(f"logits max|Δ| {report.fidelity['max_abs_diff']:.2g}")
    if "total" in report.timings:
        parts.append(f"{report.timings['total']:.1f} s")
    parts.append(f"-> {report.output_dir}")
    return "  ".join(parts)


def dry_run_block(report, step_info, state: str) -> str:
    """The multi-line dry-run description of one step."""
    lines = [f"{step_info.step_dir.name}: complete, {state}"]
    tie_note = ""
    if report.hf_tensors_untied is not None and report.hf_tensors_untied != report.hf_tensors:
        tie_note = f" ({report.hf_tensors_untied} if the stored head differs from the embedding: decided on the data)"
    lines.append(f"  model tensors   {report.tensors} ({_size(report.model_bytes)}), -> {report.hf_tensors} HF tensors"
                 f"{tie_note}")
    lines.append(f"  other state     {_size(report.other_bytes)} (optimizer, scheduler, dataloader; not read)")
    lines.append(f"  dtype           {report.checkpoint_dtype} -> {report.export_dtype}")
    lines.append(f"  run config      {report.run_config.get('path')} ({report.run_config.get('kind')})")
    lines.append(f"  base assets     {report.hf_assets}")
    lines.append(f"  output          {report.output_dir}")
    for finding in report.findings:
        lines.append(f"  check {finding['name']:<16} {'ok' if finding['ok'] else 'FAILED'}  {finding['detail']}")
    for warning in report.warnings:
        lines.append(f"  warning         {warning}")
    return "\n".join(lines)


def _exit_code_for(exc: BaseException) -> int:
    if isinstance(exc, MolgenExportError):
        return exc.exit_code
    if isinstance(exc, KeyboardInterrupt):
        return 130
    return EXIT_FAILED


def run_export(args: argparse.Namespace) -> int:
    from molgen_export.dcp import discover
    from molgen_export.pipeline import export

    if args.distributed:
        return _run_distributed(args)
    progress = _progress_bars() if sys.stderr.isatty() and not args.quiet and not args.json else None
    options = options_from_args(args, dry_run=False)
    checkpoint_root, steps = discover.resolve_checkpoint_root(args.dcp_path)
    single = len(steps) == 1 and (args.dcp_path.is_file() or discover.step_number(args.dcp_path) is not None)
    steps = select_steps(steps, args.steps)
    if not steps:
        raise UsageError(f"--steps {args.steps!r} selects no step in {checkpoint_root}")
    reports = []
    code = EXIT_OK
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
                    code = max(code, EXIT_FAILED)
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
        options = options_from_args(args, dry_run=False)
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
        return EXIT_OK
    finally:
        if started_group:
            dist.destroy_process_group()


def add_demo_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--workdir", type=Path, default=Path("demo-run"),
                        help="where the demo run is made (default ./demo-run); replaced if it exists")
    parser.add_argument("--steps", default="10,20", help="checkpoint steps to train to (default 10,20)")
    parser.add_argument("--eval", action="store_true",
                        help="after each export run the @lm-eval recipe on a local demo task (needs the [eval] extra), "
                             "then print `molgen-export report`")
    add_verbosity(parser)


def run_demo(args: argparse.Namespace) -> int:
    import shutil

    from molgen_export.dcp import discover
    from molgen_export.pipeline import export
    from molgen_export.options import ExportOptions
    from molgen_export.demo import make_demo_run

    started = time.perf_counter()
    if args.workdir.exists():
        shutil.rmtree(args.workdir)
    steps = tuple(int(s) for s in args.steps.split(","))
    run = make_demo_run(args.workdir, steps=steps)
    print(f"demo run: {run.run_dir} (tiny Qwen3: {run.arch.n_layers} layers, dim {run.arch.dim}, "
          f"vocab {run.arch.vocab_size} rows for {run.tokenizer_size} tokens), checkpoints {', '.join(p.name for p in run.steps)}")
    _, infos = discover.resolve_checkpoint_root(run.checkpoint_root)
    hooks = _demo_eval_hooks(args.workdir, run) if args.eval else None
    exported = []
    for info in infos:
        report = export.export_step(info.step_dir, ExportOptions())
        print(summary_line(report))
        exported.append((info.step, info.step_dir, Path(report.output_dir)))
    if hooks is not None:  # after the exports, as the watcher's own hook thread would run them
        from molgen_export.watch.run_report import collect_report, format_table

        for job in exported:
            hooks.run(*job)
        print(format_table(collect_report(hooks.export_root)))
    print(f"demo done in {time.perf_counter() - started:.1f} s; load it with "
          f"AutoModelForCausalLM.from_pretrained('{run.run_dir}/checkpoint-hf/{run.steps[-1].name}-hf')")
    return EXIT_OK


def add_preflight_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("job_config", type=Path, help="the run's job config (TorchTitan's job_config.json, a 0.2 "
                                                      "TOML, or the runner's checkpoint-folder config.json)")
    parser.add_argument("--hf-assets", type=Path, help="base assets folder overriding the run's hf_assets_path")
    parser.add_argument("--output", type=Path, help="export root whose free space to check")
    parser.add_argument("--dtype", choices=("bfloat16", "float16", "float32"), help="export dtype")
    parser.add_argument("--json", action="store_true", help="print the findings as JSON")
    add_verbosity(parser)


def run_preflight(args: argparse.Namespace) -> int:
    from molgen_export.options import ExportOptions
    from molgen_export.verify.preflight import run_preflight as preflight

    result = preflight(args.job_config, ExportOptions(hf_assets=args.hf_assets, output=args.output, dtype=args.dtype))
    if args.json:
        print(json.dumps(result.to_json(), indent=2))
    else:
        print(f"preflight {result.job_config}: {'exportable' if result.ok else 'NOT exportable'}")
        for line in result.lines():
            print(f"  {line}")
    return EXIT_OK if result.ok else 2


def _demo_eval_hooks(workdir: Path, run):
    """The watcher's `@lm-eval` hook over a local task written into the demo's workdir (nothing downloaded)."""
    import importlib.util
    import shlex

    from molgen_export.evals import INSTALL_HINT, write_demo_tasks
    from molgen_export.watch.on_export import ExportHooks

    if importlib.util.find_spec("lm_eval") is None:
        raise UsageError("demo --eval needs lm-eval", hint=INSTALL_HINT)
    tasks = ",".join(write_demo_tasks(workdir / "tasks"))
    template = f"@lm-eval --tasks {tasks} --include_path {shlex.quote(str(workdir.absolute() / 'tasks'))}"
    print(f"evaluating each export with on_export {template!r}")
    return ExportHooks(template, run.checkpoint_root.parent / f"{run.checkpoint_root.name}-hf", 900.0, lambda: False)


def main(argv: list[str] | None = None) -> int:
    """Entry point of `molgen-export` and `python -m molgen_export`; returns the exit code."""
    argv = list(sys.argv[1:] if argv is None else argv)
    try:
        if argv and argv[0] in SUBCOMMANDS:
            name = argv[0]
            module_name, help_text = SUBCOMMANDS[name]
            module = importlib.import_module(module_name)
            attr = name.replace("-", "_")
            parser = argparse.ArgumentParser(prog=f"molgen-export {name}", description=help_text,
                                             epilog=getattr(module, f"{attr.upper()}_EPILOG", None),
                                             formatter_class=argparse.RawDescriptionHelpFormatter)
            getattr(module, f"add_{attr}_arguments")(parser)
            args = parser.parse_args(argv[1:])
            setup_logging(args)
            return int(getattr(module, f"run_{attr}")(args))
        args = build_export_parser().parse_args(argv)
        setup_logging(args)
        return run_export(args)
    except SystemExit as exc:  # argparse: --help is 0, bad usage is 2
        return int(exc.code or 0)
    except (MolgenExportError, KeyboardInterrupt, Exception) as exc:
        if os.environ.get("MOLGEN_EXPORT_DEBUG"):
            raise
        if isinstance(exc, MolgenExportError):
            print(f"error: {exc}", file=sys.stderr)
        elif isinstance(exc, KeyboardInterrupt):
            print("interrupted; no partial output was published", file=sys.stderr)
        elif isinstance(exc, ModuleNotFoundError) and exc.name:
            print(f"error: the Python package `{exc.name.split('.')[0]}` is not installed in {sys.executable}\n"
                  "  fix: run molgen_export from the environment it was installed into (the README's "
                  "`.venv/bin/python -m molgen_export`), or `pip install -e .` there", file=sys.stderr)
            return 2
        else:
            print(f"error: unexpected {type(exc).__name__}: {exc}\n  (set MOLGEN_EXPORT_DEBUG=1 for the traceback; "
                  "please report it)", file=sys.stderr)
        return _exit_code_for(exc)



