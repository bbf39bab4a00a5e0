"""`molgen-export report PATH`: the per-step table, HTML page or PNG of a run's exports, checks and evals."""

from __future__ import annotations

import argparse
import json
from pathlib import Path

from molgen_export.cli import flags

REPORT_EPILOG = """\
examples:
  molgen-export report outputs/checkpoint-hf                 # an export root: a table on the terminal
  molgen-export report outputs --html report.html            # a run folder; one self-contained page
  molgen-export report outputs/checkpoint --png report.png   # the plots alone, for CI logs
  molgen-export report outputs --json

It reads only molgen-export's own files (export_report.json, the watch journal and failure records, smoke.jsonl,
evals/step-N/*.json) and may run while training and the watcher go on.
exit codes: 0 report made; 2 nothing to report at that path."""


def add_report_arguments(parser: argparse.ArgumentParser) -> None:
    """Flags of `molgen-export report`."""
    parser.add_argument("path", type=Path, metavar="RUN_OR_EXPORT_ROOT",
                        help="the export root (<checkpoint_root>-hf), the checkpoint folder or the run folder")
    parser.add_argument("--html", type=Path, help="write one self-contained HTML page (plots embedded)")
    parser.add_argument("--png", type=Path, help="write the plots as one PNG")
    parser.add_argument("--json", action="store_true", help="print the report as JSON instead of a table")
    flags.add_verbosity(parser)


def run_report(args: argparse.Namespace) -> int:
    """`molgen-export report`: print the table (or JSON); write the page and the PNG when asked."""
    from molgen_export.hf.publish import write_text
    from molgen_export.watch.run_report import collect_report, format_table, render_html, render_plots

    report = collect_report(args.path)
    if args.html or args.png:
        png = render_plots(report)
        if args.png:
            args.png.parent.mkdir(parents=True, exist_ok=True)
            args.png.write_bytes(png)
        if args.html:
            args.html.parent.mkdir(parents=True, exist_ok=True)
            write_text(args.html, render_html(report, png))
    print(json.dumps(report.to_json(), indent=2) if args.json else format_table(report))
    for path in (args.html, args.png):
        if path and not args.json:
            print(f"wrote {path}")
    return flags.EXIT_OK
