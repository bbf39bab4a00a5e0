"""What every shell shares: flags generated from the options dataclasses, verbosity and logging, exit codes.

The CLI's commands, the runner and the integrations import this module (and only this one of `molgen_export.cli`).
A flag is made from a dataclass field (`add_option_flags`): `--max-shard-size` from `max_shard_size`, its type and
default from the annotation, its choices from `metadata["choices"]`, its help from the docstring under the field.
An option added to `ExportOptions` or `WatchOptions` is therefore a flag of every command that takes them.
"""

from __future__ import annotations

import argparse
import ast
import dataclasses
import functools
import inspect
import logging
import os
import sys
import textwrap
import types
import typing
from collections.abc import Iterable, Mapping
from pathlib import Path

from molgen_export.errors import MolgenExportError
from molgen_export.options import ExportOptions

EXIT_OK, EXIT_FAILED, EXIT_USAGE = 0, 1, 2
EXIT_INTERRUPTED = 130

EXPORT_FIELDS_NOT_FLAGS = ("force", "dry_run", "extra")
"""ExportOptions fields `add_export_options` leaves out: each command says what forcing and dry runs mean to it,
and `extra` is for callers of the library, not the command line."""

WRITE_AND_VERIFY_FIELDS = ("dtype", "max_shard_size", "skip_logits", "logits_atol", "device", "threads")
"""The ExportOptions fields of every command that writes an HF folder: dtype, shard size, the logit check."""


# --- flags from dataclass fields ------------------------------------------------------------------------------------


@functools.cache
def field_docs(options: type) -> dict[str, str]:
    """The docstring under each field of a dataclass, read from its source (`field: type = default` then `\"\"\"...\"\"\"`)."""
    body = ast.parse(textwrap.dedent(inspect.getsource(options))).body[0].body
    docs = {}
    for stmt, following in zip(body, body[1:]):
        if (isinstance(stmt, ast.AnnAssign) and isinstance(stmt.target, ast.Name) and isinstance(following, ast.Expr)
                and isinstance(following.value, ast.Constant) and isinstance(following.value.value, str)):
            docs[stmt.target.id] = " ".join(following.value.value.split())
    return docs


def _flag_type(annotation: object) -> type | None:
    """`Path | None` -> Path, `int` -> int, ...; None for a type no flag can carry (dict, list)."""
    if isinstance(annotation, types.UnionType) or typing.get_origin(annotation) is typing.Union:
        kinds = [a for a in typing.get_args(annotation) if a is not type(None)]
        annotation = kinds[0] if len(kinds) == 1 else None
    return annotation if annotation in (str, int, float, bool, Path) else None


def _field_default(f: dataclasses.Field) -> object:
    if f.default is not dataclasses.MISSING:
        return f.default
    return None if f.default_factory is dataclasses.MISSING else f.default_factory()


def add_option_flags(parser: argparse.ArgumentParser | argparse._ArgumentGroup, options: type,
                     names: Iterable[str] | None = None, *, skip: Iterable[str] = (),
                     help: Mapping[str, str] | None = None, defaults: Mapping[str, object] | None = None,
                     required: Iterable[str] = ()) -> None:
    """Add one `--flag-name` per field of the dataclass `options`.

    Args:
        parser: the parser or argument group to add to.
        options: a dataclass whose fields have flag types (str, int, float, bool, Path, or one of them `| None`).
        names: the fields to add, in this order; default: every field in declaration order.
        skip: fields to leave out.
        help: help text replacing a field's docstring, where this command means something narrower.
        defaults: defaults replacing a field's own, where this command's differ (the watcher's 4 threads).
        required: fields the command cannot run without (no default then).

    Raises:
        TypeError: a named field has a type no flag can carry.
    """
    fields = {f.name: f for f in dataclasses.fields(options)}
    hints = typing.get_type_hints(options)
    docs = field_docs(options)
    help, defaults, skip, required = dict(help or {}), dict(defaults or {}), set(skip), set(required)
    for name in (list(names) if names is not None else list(fields)):
        if name in skip:
            continue
        f = fields[name]
        kind = _flag_type(hints[name])
        if kind is None:
            raise TypeError(f"{options.__name__}.{name}: {hints[name]} cannot be a flag; pass it in skip=")
        default = defaults.get(name, _field_default(f))
        text = help.get(name) or docs.get(name, "").replace("`", "")
        flag = "--" + name.replace("_", "-")
        if kind is bool:
            action = argparse.BooleanOptionalAction if default else "store_true"
            parser.add_argument(flag, action=action, default=bool(default), help=text.replace("%", "%%"))
            continue
        if default is not None and (default != _field_default(f) or "default" not in text.lower()):
            text += f" (default: {default})"
        kwargs = {"required": True} if name in required else {"default": default}
        if f.metadata.get("choices"):
            kwargs["choices"] = tuple(f.metadata["choices"])
        parser.add_argument(flag, type=kind, help=text.replace("%", "%%"), **kwargs)


def options_from_args(args: argparse.Namespace, options: type = ExportOptions, /, **overrides):
    """The `options` dataclass (ExportOptions by default) from parsed flags: each field that has a flag and a value
    (one spelling: `--max-shard-size` <-> `max_shard_size`), then `overrides`."""
    values = {f.name: getattr(args, f.name) for f in dataclasses.fields(options)
              if getattr(args, f.name, None) is not None}
    values.update(overrides)
    return options(**values)


def add_export_options(parser: argparse.ArgumentParser, *, defaults: Mapping[str, object] | None = None) -> None:
    """The ExportOptions flags every exporting command shares (export, watch, the post-checkpoint hook)."""
    group = parser.add_argument_group("export options")
    add_option_flags(group, ExportOptions, skip=EXPORT_FIELDS_NOT_FLAGS, defaults=defaults)


def add_write_and_verify_options(parser: argparse.ArgumentParser | argparse._ArgumentGroup, *,
                                 help: Mapping[str, str] | None = None) -> None:
    """Flags every command that writes an HF folder shares: dtype, shard size, the logit check, threads."""
    add_option_flags(parser, ExportOptions, WRITE_AND_VERIFY_FIELDS, help=help)


# --- verbosity and logging ------------------------------------------------------------------------------------------


def add_verbosity(parser: argparse.ArgumentParser) -> None:
    """`-v`/`-vv`/`-q`."""
    parser.add_argument("-v", "--verbose", action="count", default=0, help="more logging (-vv for debug)")
    parser.add_argument("-q", "--quiet", action="store_true", help="only errors")


def setup_logging(args: argparse.Namespace) -> None:
    """Handlers for the entry point: WARNING by default, INFO with -v, DEBUG with -vv, ERROR with -q; to stderr."""
    level = logging.ERROR if getattr(args, "quiet", False) else (
        logging.DEBUG if getattr(args, "verbose", 0) > 1 else logging.INFO if getattr(args, "verbose", 0) else logging.WARNING)
    logging.basicConfig(level=level, format="%(asctime)s %(levelname)s %(name)s: %(message)s", stream=sys.stderr)
    logging.getLogger("molgen_export").setLevel(level)


# --- exit codes -----------------------------------------------------------------------------------------------------


def exit_code_for(exc: BaseException) -> int:
    """The exit code of an exception: a MolgenExportError's own (2 usage/input, 1 failed check), 130 interrupted, else 1."""
    if isinstance(exc, MolgenExportError):
        return exc.exit_code
    if isinstance(exc, KeyboardInterrupt):
        return EXIT_INTERRUPTED
    return EXIT_FAILED


def report_error(exc: BaseException) -> int:
    """Print one line (and the hint) for an exception that ended a command; returns its exit code.

    Re-raises it when MOLGEN_EXPORT_DEBUG is set, so the traceback shows.
    """
    if os.environ.get("MOLGEN_EXPORT_DEBUG"):
        raise exc
    if isinstance(exc, MolgenExportError):
        print(f"error: {exc}", file=sys.stderr)
    elif isinstance(exc, KeyboardInterrupt):
        print("interrupted; no partial output was published", file=sys.stderr)
    elif isinstance(exc, ModuleNotFoundError) and exc.name:
        print(f"error: the Python package `{exc.name.split('.')[0]}` is not installed in {sys.executable}\n"
              "  fix: run molgen_export from the environment it was installed into (the README's "
              "`.venv/bin/python -m molgen_export`), or `pip install -e .` there", file=sys.stderr)
        return EXIT_USAGE
    else:
        print(f"error: unexpected {type(exc).__name__}: {exc}\n  (set MOLGEN_EXPORT_DEBUG=1 for the traceback; "
              "please report it)", file=sys.stderr)
    return exit_code_for(exc)
