"""`molgen-export demo`: make a tiny TorchTitan Qwen3 run, export every step and verify it (optionally evaluate)."""

from __future__ import annotations

import argparse
import time
from pathlib import Path

from molgen_export.cli import flags
from molgen_export.errors import UsageError
from molgen_export.pipeline.summary import summary_line


def add_demo_arguments(parser: argparse.ArgumentParser) -> None:
    """Flags of `molgen-export demo`."""
    parser.add_argument("--workdir", type=Path, default=Path("demo-run"),
                        help="where the demo run is made (default ./demo-run); replaced if it exists")
    parser.add_argument("--steps", default="10,20", help="checkpoint steps to train to (default 10,20)")
    parser.add_argument("--eval", action="store_true",
                        help="after each export run the @lm-eval recipe on a local demo task (needs the [eval] extra), "
                             "then print `molgen-export report`")
    flags.add_verbosity(parser)


def run_demo(args: argparse.Namespace) -> int:
    """`molgen-export demo`: train the tiny run, export each checkpoint, print one line per step."""
    import shutil

    from molgen_export.dcp import discover
    from molgen_export.demo import make_demo_run
    from molgen_export.options import ExportOptions
    from molgen_export.pipeline import export

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
    return flags.EXIT_OK


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
