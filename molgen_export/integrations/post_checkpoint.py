"""Post-checkpoint hook: export one step folder, e.g. from a cluster's "after save" script or a SLURM epilog.

    python -m molgen_export.integrations.post_checkpoint outputs/checkpoint/step-500 --wait 600 --dtype bfloat16

Waits (up to `--wait` seconds) for DCP to rename `.metadata` into place, then exports with the watcher's
rules: skipped when already exported from the same save, the per-step lock against a watcher or another
hook, retries with back-off, the failure record and the journal, `--on-export` afterwards.
Exit codes: 0 exported or already there; 1 the export failed; 2 bad usage or the step never completed.
"""

from __future__ import annotations

import argparse
import signal
import sys
import time
from pathlib import Path

from molgen_export.cli import flags
from molgen_export.dcp import discover
from molgen_export.watch.watcher import Watcher, WatchOptions, describe_outcome

HOOK_WATCH_FIELDS = ("retries", "retry_backoff", "nice", "on_export")
"""The WatchOptions that mean something for one step exported once (no observer, no rescans, no lifetime)."""
HOOK_DEFAULTS = {"retries": 1}
"""One retry, not the watcher's three: the hook runs once per save, often in a job's epilog with little time."""


def wait_for_metadata(step_dir: Path, timeout: float) -> bool:
    """True once `step_dir/.metadata` exists; False after `timeout` seconds without it."""
    deadline = time.monotonic() + timeout
    while not (step_dir / discover.METADATA_FILE).is_file():
        if time.monotonic() >= deadline:
            return False
        time.sleep(min(1.0, max(0.05, deadline - time.monotonic())))
    return True


def _interrupt(signum, _frame):
    raise KeyboardInterrupt(signal.Signals(signum).name)


def main(argv: list[str] | None = None) -> int:
    """Entry point; returns 0 (exported or already there), 1 (failed) or 2 (bad usage, never completed)."""
    parser = argparse.ArgumentParser(prog="python -m molgen_export.integrations.post_checkpoint", description=__doc__.splitlines()[0],
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("step_dir", type=Path, help="the step-N folder TorchTitan just saved")
    parser.add_argument("--wait", type=float, default=0.0, help="seconds to wait for .metadata (default 0)")
    flags.add_option_flags(parser, WatchOptions, HOOK_WATCH_FIELDS, defaults=HOOK_DEFAULTS)
    flags.add_export_options(parser)
    flags.add_verbosity(parser)
    args = parser.parse_args(argv)
    flags.setup_logging(args)
    if discover.step_number(args.step_dir) is None:
        print(f"error: {args.step_dir} is not a step-N folder", file=sys.stderr)
        return flags.EXIT_USAGE
    if not wait_for_metadata(args.step_dir, args.wait):
        print(f"error: {args.step_dir} has no .metadata after {args.wait:g} s: the save has not finished\n"
              "  fix: pass --wait SECONDS, or run `molgen-export watch` on the checkpoint folder", file=sys.stderr)
        return flags.EXIT_USAGE
    signal.signal(signal.SIGTERM, _interrupt)
    try:
        watcher = Watcher(args.step_dir.parent, flags.options_from_args(args),
                          WatchOptions(retries=args.retries, retry_backoff=args.retry_backoff, nice=0,
                                       on_export=args.on_export))
        if args.nice:
            import os

            os.nice(args.nice)
        outcomes = watcher.export_now(args.step_dir)
    except KeyboardInterrupt:
        print("interrupted; no partial output was published", file=sys.stderr)
        return flags.EXIT_INTERRUPTED
    for outcome in outcomes:
        print(describe_outcome(outcome))
    final = outcomes[-1].status if outcomes else "skipped"
    return flags.EXIT_OK if final in ("exported", "skipped") else flags.EXIT_FAILED


if __name__ == "__main__":
    sys.exit(main())
