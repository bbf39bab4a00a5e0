"""`molgen-export preflight JOB_CONFIG`: prove from a job config, before training, that its checkpoints will export."""

from __future__ import annotations

import argparse
import json
from pathlib import Path

from molgen_export.cli import flags
from molgen_export.options import ExportOptions

PREFLIGHT_FIELDS = ("hf_assets", "output", "dtype")
"""The ExportOptions a preflight reads: where the base assets are, which disk the exports go to, their dtype."""


def add_preflight_arguments(parser: argparse.ArgumentParser) -> None:
    """Flags of `molgen-export preflight`."""
    parser.add_argument("job_config", type=Path, help="the run's job config (TorchTitan's job_config.json, a 0.2 "
                                                      "TOML, or the runner's checkpoint-folder config.json)")
    flags.add_option_flags(parser, ExportOptions, PREFLIGHT_FIELDS,
                           help={"output": "export root whose free space to check"})
    parser.add_argument("--json", action="store_true", help="print the findings as JSON")
    flags.add_verbosity(parser)


def run_preflight(args: argparse.Namespace) -> int:
    """`molgen-export preflight`: print the findings; 0 when exportable, 2 when not."""
    from molgen_export.verify.preflight import run_preflight as preflight

    result = preflight(args.job_config, flags.options_from_args(args))
    if args.json:
        print(json.dumps(result.to_json(), indent=2))
    else:
        print(f"preflight {result.job_config}: {'exportable' if result.ok else 'NOT exportable'}")
        for line in result.lines():
            print(f"  {line}")
    return flags.EXIT_OK if result.ok else flags.EXIT_USAGE
