"""Flags made from the options dataclasses (issue 13): one edit in options.py adds an option to every command."""

from __future__ import annotations

import argparse
import dataclasses
from dataclasses import dataclass, field
from pathlib import Path

import pytest

from molgen_export.cli import flags
from molgen_export.cli.commands import COMMANDS
from molgen_export.options import EXPORT_DTYPES, LAYOUTS, ExportOptions
from molgen_export.watch.watcher import WatchOptions


def _parser(add) -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(exit_on_error=False)
    add(parser)
    return parser


def _actions(parser: argparse.ArgumentParser) -> dict[str, argparse.Action]:
    return {a.dest: a for a in parser._actions}


def test_every_export_option_is_a_flag_with_the_dataclass_default():
    actions = _actions(_parser(flags.add_export_options))
    wanted = {f.name for f in dataclasses.fields(ExportOptions)} - set(flags.EXPORT_FIELDS_NOT_FLAGS)
    assert wanted <= set(actions)
    for f in dataclasses.fields(ExportOptions):
        if f.name in wanted:
            assert actions[f.name].default == f.default, f.name
            assert actions[f.name].option_strings == ["--" + f.name.replace("_", "-")]
    assert tuple(actions["layout"].choices) == LAYOUTS and tuple(actions["dtype"].choices) == EXPORT_DTYPES
    assert actions["threads"].type is int and actions["logits_atol"].type is float and actions["output"].type is Path
    assert "Largest safetensors shard" in actions["max_shard_size"].help and "5GB" in actions["max_shard_size"].help


def test_parsed_defaults_give_the_default_options():
    args = _parser(flags.add_export_options).parse_args([])
    assert flags.options_from_args(args) == ExportOptions()
    watch_args = _parser(COMMANDS["watch"].add_arguments).parse_args(["ckpt"])
    assert flags.options_from_args(watch_args, WatchOptions) == WatchOptions()
    assert flags.options_from_args(watch_args).threads == 4  # the watcher's own default, shown in its help


def test_every_watch_option_is_a_flag_of_watch():
    actions = _actions(_parser(COMMANDS["watch"].add_arguments))
    for f in dataclasses.fields(WatchOptions):
        assert actions[f.name].default == f.default, f.name


def test_no_command_hard_codes_an_export_default():
    """Where a command's flag is an ExportOptions field with the same meaning, its default is the dataclass's."""
    minimal = {"import-hf": ["a", "b"], "export-titan": ["a", "--output", "o"], "from-nanogpt": ["c", "--output", "o"]}
    defaults = {f.name: f.default for f in dataclasses.fields(ExportOptions)}
    for name, argv in minimal.items():
        args = vars(_parser(COMMANDS[name].add_arguments).parse_args(argv))
        for key in ("max_shard_size", "logits_atol", "device", "skip_logits"):
            if key in args:
                assert args[key] == defaults[key], (name, key)


def test_a_new_field_is_a_flag_without_another_edit():
    @dataclass(frozen=True)
    class Options:
        colour: str = field(default="red", metadata={"choices": ("red", "blue")})
        """Which colour; 100% opaque."""
        width: int | None = None
        """Width in pixels."""
        strict: bool = False
        """Refuse what is odd."""

    parser = _parser(lambda p: flags.add_option_flags(p, Options))
    args = parser.parse_args(["--colour", "blue", "--width", "3", "--strict"])
    assert flags.options_from_args(args, Options) == Options(colour="blue", width=3, strict=True)
    actions = _actions(parser)
    assert actions["colour"].help == "Which colour; 100%% opaque. (default: red)"  # argparse shows one %
    assert actions["width"].help == "Width in pixels."
    with pytest.raises(argparse.ArgumentError):
        parser.parse_args(["--colour", "green"])


def test_a_field_no_flag_can_carry_is_named():
    with pytest.raises(TypeError, match="extra"):
        flags.add_option_flags(argparse.ArgumentParser(), ExportOptions, ["extra"])
