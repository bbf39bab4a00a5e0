"""`molgen-export`: the command table and `main`. `--dcp-path PATH` exports steps; the subcommands add the demo,
the preflight, the watcher, the run report and the other conversions. Errors end in one line and an exit code."""

from __future__ import annotations

import argparse
import logging
import os
import sys
from collections.abc import Callable
from dataclasses import dataclass
from typing import NoReturn

from molgen_export.cli import convert, demo, export, flags, preflight, report, watch


@dataclass(frozen=True)
class Command:
    """One subcommand: its flags, what runs it (returning the exit code), its one-line help and examples."""

    add_arguments: Callable[[argparse.ArgumentParser], None]
    run: Callable[[argparse.Namespace], int]
    help: str
    epilog: str | None = None


COMMANDS: dict[str, Command] = {
    "demo": Command(demo.add_demo_arguments, demo.run_demo,
                    "make a tiny TorchTitan Qwen3 run, export every step and verify it"),
    "preflight": Command(preflight.add_preflight_arguments, preflight.run_preflight,
                         "prove from a job config, before training, that its checkpoints will export"),
    "watch": Command(watch.add_watch_arguments, watch.run_watch,
                     "watch a checkpoint folder and export each step as it completes", watch.WATCH_EPILOG),
    "report": Command(report.add_report_arguments, report.run_report,
                      "per-step table, HTML page or PNG of a run's exports, checks and evals", report.REPORT_EPILOG),
    "import-hf": Command(convert.add_import_hf_arguments, convert.run_import_hf,
                         "HF Qwen3 folder -> TorchTitan weights (safetensors or DCP)", convert.IMPORT_HF_EPILOG),
    "export-titan": Command(convert.add_export_titan_arguments, convert.run_export_titan,
                            "TorchTitan-named safetensors -> verified HF folder", convert.EXPORT_TITAN_EPILOG),
    "to-jax": Command(convert.add_to_jax_arguments, convert.run_to_jax,
                      "HF Qwen3 folder -> per-layer [in, out] arrays for JAX", convert.TO_JAX_EPILOG),
    "from-nanogpt": Command(convert.add_from_nanogpt_arguments, convert.run_from_nanogpt,
                            "nanoGPT/GPT-2 .pt checkpoint -> HF safetensors", convert.FROM_NANOGPT_EPILOG),
}
"""`molgen-export NAME ...`; without a name, `molgen-export --dcp-path PATH` exports (`export.run_export`)."""


def build_parser(name: str) -> argparse.ArgumentParser:
    """The parser of `molgen-export NAME`."""
    command = COMMANDS[name]
    parser = argparse.ArgumentParser(prog=f"molgen-export {name}", description=command.help, epilog=command.epilog,
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    command.add_arguments(parser)
    return parser


def main(argv: list[str] | None = None) -> int:
    """Entry point of `molgen-export` and `python -m molgen_export`; returns the exit code."""
    argv = list(sys.argv[1:] if argv is None else argv)
    try:
        if argv and argv[0] in COMMANDS:
            args = build_parser(argv[0]).parse_args(argv[1:])
            flags.setup_logging(args)
            return int(COMMANDS[argv[0]].run(args))
        args = export.build_export_parser(subcommands=COMMANDS).parse_args(argv)
        flags.setup_logging(args)
        return export.run_export(args)
    except SystemExit as exc:  # argparse: --help is 0, bad usage is 2
        return int(exc.code or 0)
    except (KeyboardInterrupt, Exception) as exc:
        return flags.report_error(exc)


def run() -> NoReturn:
    """`main` as a process: exit with its code without the interpreter's teardown.

    Everything a command promises is durable when `main` returns (outputs are fsynced before their rename, the
    watcher has stopped its threads), and tearing down torch and torchtitan's modules costs 0.4-1 s of nothing.
    Python's own buffers are flushed and logging shut down first; atexit handlers do not run (the package
    registers none).
    """
    code = main()
    for stream in (sys.stdout, sys.stderr):
        try:
            stream.flush()
        except (OSError, ValueError):  # a closed pipe: nothing more can be said
            pass
    logging.shutdown()
    os._exit(code)
