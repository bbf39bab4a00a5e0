"""The command line, a shell over the stages: `main` (the table of commands, `cli.commands`), one module per command or
group (`export`, `demo`, `preflight`, `watch`, `report`, `convert`, `eval`) and `flags`, what they share with the
runner and the integrations (flags generated from the options dataclasses, logging, exit codes)."""

from molgen_export.cli.commands import main, run

__all__ = ["main", "run"]
