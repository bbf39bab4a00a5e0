"""`python -m molgen_export.cli.eval lm-eval HF_DIR ...`: the `@lm-eval` recipe's own entry point (see evals.RECIPES).

It parses our few flags, leaves the rest to lm-eval, and replaces itself with `lm_eval run` (`evals.lm_eval_argv`).
"""

from __future__ import annotations

import argparse
import importlib.util
import os
import re
import shlex
import sys
from collections.abc import Sequence
from pathlib import Path

from molgen_export.cli import flags
from molgen_export.evals import INSTALL_HINT, choose_backend, eval_dir_for, lm_eval_argv


def run_lm_eval(argv: Sequence[str] | None = None) -> int:
    """`python -m molgen_export.cli.eval lm-eval HF_DIR [--eval-dir DIR] LM_EVAL_ARGS...`: becomes `lm_eval run`.

    The process replaces itself with lm-eval (`os.execv`), so the watcher's timeout and kill reach lm-eval itself
    and the journal's output tail is lm-eval's own (its results table). Returns only when it cannot start it.
    """
    parser = argparse.ArgumentParser(prog="python -m molgen_export.cli.eval lm-eval",
                                     description="Evaluate one exported step with lm-eval; other flags go to lm_eval.",
                                     allow_abbrev=False)
    parser.add_argument("hf_dir", type=Path)
    parser.add_argument("--eval-dir", type=Path, help="default: <export_root>/evals/step-N/ for HF_DIR step-N-hf")
    parser.add_argument("--model", default="auto", help="auto (vllm on a GPU where installed, else hf), hf, vllm")
    parser.add_argument("--device", default="auto", help="auto, cpu or cuda")
    parser.add_argument("--model_args", default="", help="extra key=value,... for the model (after pretrained, dtype)")
    args, lm_eval_args = parser.parse_known_args(argv)
    if not any(a in ("--tasks", "-t") or a.startswith("--tasks=") for a in lm_eval_args):
        parser.error("name the lm-eval tasks: --tasks TASK[,TASK...] (and --include_path DIR for tasks of your own)")
    if importlib.util.find_spec("lm_eval") is None:
        print(f"error: lm-eval is not installed in {sys.executable}\n  fix: {INSTALL_HINT}", file=sys.stderr)
        return flags.EXIT_USAGE
    eval_dir = args.eval_dir or _eval_dir_beside(args.hf_dir)
    eval_dir.mkdir(parents=True, exist_ok=True)
    model, device = choose_backend(args.model, args.device)
    command = lm_eval_argv(args.hf_dir, eval_dir, lm_eval_args, model=model, device=device, model_args=args.model_args)
    print("running: " + shlex.join(command), flush=True)
    sys.stdout.flush()
    sys.stderr.flush()
    os.execv(command[0], command)
    return flags.EXIT_USAGE  # not reached


def _eval_dir_beside(hf_dir: Path) -> Path:
    match = re.fullmatch(r"step-(\d+)-hf", Path(hf_dir).name)
    if match is None:
        raise SystemExit(f"error: cannot tell the step of {hf_dir}; pass --eval-dir")
    return eval_dir_for(Path(hf_dir).parent, int(match.group(1)))


def main(argv: list[str] | None = None) -> int:
    """`python -m molgen_export.cli.eval lm-eval ...`: the recipes' own entry point."""
    argv = list(sys.argv[1:] if argv is None else argv)
    if not argv or argv[0] != "lm-eval":
        print("usage: python -m molgen_export.cli.eval lm-eval HF_DIR [--eval-dir DIR] --tasks TASKS [lm_eval flags]",
              file=sys.stderr)
        return flags.EXIT_USAGE
    return run_lm_eval(argv[1:])


if __name__ == "__main__":
    sys.exit(main())
