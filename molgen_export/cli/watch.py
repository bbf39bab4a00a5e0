"""`molgen-export watch CHECKPOINT_ROOT`: the watcher in the foreground, one line per outcome, until a signal."""

from __future__ import annotations

import argparse
import signal
from pathlib import Path

from molgen_export.cli import flags

WATCH_EPILOG = """\
examples:
  molgen-export watch outputs/checkpoint
  molgen-export watch /lustre/run7/checkpoint --poll 30 --dtype bfloat16 --output /data/hf/run7
  molgen-export watch outputs/checkpoint --once
  molgen-export watch outputs/checkpoint --until-pid $TRAINER_PID --threads 4 --nice 10
  molgen-export watch outputs/checkpoint --on-export "python -m molgen_export.integrations.on_export_smoke {hf_dir} {step}"

Exports go to <checkpoint_root>-hf/step-N-hf/ (or --output). Each outcome is appended to
<export_root>/.molgen-watch.jsonl; a failing step leaves <export_root>/.step-N-hf.failed.json and is retried
--retries times with back-off. SIGINT/SIGTERM stop it cleanly (exit 0; a second signal aborts at once).
exit codes: 0 stopped or done; 1 with --once/--until-pid, some step failed for good; 2 bad usage."""

WATCH_DEFAULTS = {"threads": 4}
"""Where the watcher's defaults differ from the library's: an export beside training must leave it cores."""


def add_watch_arguments(parser: argparse.ArgumentParser) -> None:
    """Flags of `molgen-export watch`: every WatchOptions field, then every export option."""
    from molgen_export.watch.watcher import WatchOptions

    parser.add_argument("checkpoint_root", type=Path, help="the checkpoint folder holding step-N folders")
    flags.add_option_flags(parser.add_argument_group("watch options"), WatchOptions)
    flags.add_export_options(parser, defaults=WATCH_DEFAULTS)
    flags.add_verbosity(parser)


def run_watch(args: argparse.Namespace) -> int:
    """`molgen-export watch`: run a Watcher in the foreground until a signal (or --once/--until-pid)."""
    from molgen_export.watch.watcher import Watcher, WatchOptions, describe_outcome

    options = flags.options_from_args(args)
    watch_options = flags.options_from_args(args, WatchOptions)
    watcher = Watcher(args.checkpoint_root, options, watch_options,
                      on_outcome=lambda o: print(describe_outcome(o), flush=True))
    signals = {"count": 0}

    def on_signal(signum, _frame):
        signals["count"] += 1
        watcher.stop(grace=watch_options.grace if signals["count"] == 1 else 0.0)

    previous = {s: signal.signal(s, on_signal) for s in (signal.SIGINT, signal.SIGTERM)}
    try:
        print(f"watching {watcher.checkpoint_root} -> {watcher.export_root}"
              + (" (once)" if watch_options.once else ""), flush=True)
        outcomes = watcher.run()
    finally:
        for signum, handler in previous.items():
            signal.signal(signum, handler)
    tally: dict[str, int] = {}
    for outcome in outcomes:
        tally[outcome.status] = tally.get(outcome.status, 0) + 1
    print(f"watch ended ({watcher.mode}): " + (", ".join(f"{n} {s}" for s, n in sorted(tally.items())) or "nothing to do"),
          flush=True)
    failed = {o.step for o in outcomes if o.status == "gave-up"} - {o.step for o in outcomes if o.status == "exported"}
    if failed and signals["count"] == 0 and (watch_options.once or watch_options.until_pid):
        return flags.EXIT_FAILED
    return flags.EXIT_OK
