"""Launch TorchTitan training with the export flag: `python -m molgen_export.runner.launch --config RUN.yaml [a.b=c ...]`.

Reads an omegaconf YAML (`torchtitan:` and `export:` sections; defaults < `export.yaml` beside it < the run's
YAML < dotlist), writes the resolved job config as `<dump_folder>/job_config.json` before training starts,
launches training as a child process, and while it runs, watches its checkpoint folder with `watch.Watcher`
(writing `<checkpoint_root>/config.json` once the first `step-*` folder appears). When training ends it
drains the export queue and exits with training's exit code; Ctrl-C stops both cleanly.
"""

from __future__ import annotations

import argparse
import dataclasses
import json
import logging
import os
import signal
import subprocess
import sys
import threading
import time
from contextlib import contextmanager
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

from molgen_export.cli import flags
from molgen_export.dcp import discover
from molgen_export.mapping import run_config
from molgen_export.options import ExportOptions
from molgen_export.errors import ConfigError, MolgenExportError, OutputError, UsageError
from molgen_export.watch.watcher import Watcher, WatchOptions, describe_outcome

logger = logging.getLogger("molgen_export.runner.launch" if __name__ == "__main__" else __name__)

DEFAULTS_FILE = "export.yaml"
"""Looked for beside the run's YAML; its keys sit under the built-in defaults and over nothing else."""
DEFAULT_LAUNCHER = ("{python}", "-m", "torch.distributed.run", "--nproc-per-node", "{nproc_per_node}")
RUNNER_ENV = "MOLGEN_EXPORT_RUNNER"
"""Set in training's environment so `molgen_export.integrations.titan_checkpoint` knows a watcher is already running."""


@dataclass(frozen=True)
class TorchTitanSection:
    """How training is configured and launched (the `torchtitan:` section)."""

    module: str | None = None
    """TorchTitan 0.3 model module (`qwen3`, or the dotted path of your own config_registry module)."""
    config: str | None = None
    """Config function of that module (e.g. `qwen3_0_6b`); the runner calls it to write job_config.json."""
    job_file: str | None = None
    """Instead of module/config: a TorchTitan 0.2 TOML job file, or a JSON job config (for stand-in trainers)."""
    job_config: dict[str, Any] | None = None
    """Instead of module/config/job_file: the job config itself (for stand-in trainers)."""
    overrides: list[str] = field(default_factory=list)
    """Extra TorchTitan command-line arguments, e.g. `["--training.steps", "200", "--checkpoint.interval", "50"]`."""
    nproc_per_node: int = 1
    """Processes (GPUs) per node for torchrun."""
    dump_folder: str = "./outputs"
    """TorchTitan's dump folder, relative to `workdir`; job_config.json goes here, checkpoints under it."""
    workdir: str = "."
    """Launch directory of training (relative paths in the job config resolve against it)."""
    launcher: list[str] = field(default_factory=lambda: list(DEFAULT_LAUNCHER))
    """Command prefix before `-m torchtitan.train`; `{python}` and `{nproc_per_node}` are filled in."""
    command: list[str] | None = None
    """The whole training command instead (a stand-in trainer); `{python}`, `{job_config}`, `{dump_folder}`,
    `{checkpoint_root}`, `{nproc_per_node}` and `{workdir}` are filled in."""
    env: dict[str, str] = field(default_factory=dict)
    """Extra environment variables for training."""
    stop_timeout: float = 60.0
    """After Ctrl-C/SIGTERM, seconds training gets to stop before it is killed."""

    def __post_init__(self) -> None:
        if self.nproc_per_node < 1:
            raise ConfigError(f"torchtitan.nproc_per_node must be at least 1, got {self.nproc_per_node}")

    def check_source(self) -> None:
        """Refuse a section that names no job config source, or more than one.

        Raises:
            ConfigError: naming what was given and how to fix it.
        """
        sources = [name for name, given in (("module/config", self.module or self.config), ("job_file", self.job_file),
                                            ("job_config", self.job_config is not None)) if given]
        if len(sources) != 1:
            raise ConfigError(f"torchtitan: give exactly one of module+config, job_file or job_config "
                              f"(got {', '.join(sources) or 'none'})",
                              hint="e.g. torchtitan.module=qwen3 torchtitan.config=qwen3_0_6b")
        if (self.module is None) != (self.config is None):
            raise ConfigError("torchtitan: module and config go together",
                              hint="name the module (qwen3) and its config function (qwen3_0_6b)")


SECTION_EXCLUDED = {"dry_run", "extra", "config", "once", "until_pid"}
"""Option fields the `export:` section does not take: the runner plans the run (no dry run, its own run config,
the watcher runs for the whole training and stops with it)."""
SECTION_DEFAULTS = {"threads": 4}
"""Where the training-side default differs from the library's: an export must leave cores to training."""


def _section_field(f: dataclasses.Field) -> tuple[str, type, dataclasses.Field]:
    """An `export:` key for one option field: paths become strings (omegaconf types), defaults carried over."""
    annotation = {Path: str, "Path": str, "Path | None": "str | None"}.get(f.type, f.type)
    if isinstance(annotation, str):
        annotation = {"str | None": str | None, "int | None": int | None, "float | None": float | None,
                      "str": str, "int": int, "float": float, "bool": bool}[annotation]
    default = SECTION_DEFAULTS.get(f.name, f.default)
    return f.name, annotation, field(default=default)


def _section_fields() -> list:
    """`enabled`, every ExportOptions field, every WatchOptions field, then `preflight`: one source of options."""
    seen = set()
    out = [("enabled", bool, field(default=False))]
    for options in (ExportOptions, WatchOptions):
        for f in dataclasses.fields(options):
            if f.name in SECTION_EXCLUDED or f.name in seen:
                continue
            seen.add(f.name)
            out.append(_section_field(f))
    out.append(("preflight", str, field(default="error")))
    return out


def _section_post_init(self) -> None:
    if self.preflight not in ("error", "warn", "off"):
        raise UsageError(f"export.preflight is {self.preflight!r}", hint="use error, warn or off")
    self.export_options(Path("."))
    self.watch_options()


def _section_export_options(self, workdir: Path) -> ExportOptions:
    """The ExportOptions of this section, paths resolved against the launch directory."""
    values = {f.name: getattr(self, f.name) for f in dataclasses.fields(ExportOptions) if f.name not in SECTION_EXCLUDED}
    for name in ("output", "hf_assets"):
        if values[name] is not None:
            values[name] = (workdir / Path(values[name]).expanduser()).resolve()
    return ExportOptions(**values)


def _section_watch_options(self) -> WatchOptions:
    """The WatchOptions of this section."""
    values = {f.name: getattr(self, f.name) for f in dataclasses.fields(WatchOptions) if f.name not in SECTION_EXCLUDED}
    values["poll"] = str(values["poll"])
    return WatchOptions(**values)


ExportSection = dataclasses.make_dataclass(
    "ExportSection", _section_fields(), frozen=True,
    namespace={"__post_init__": _section_post_init, "export_options": _section_export_options,
               "watch_options": _section_watch_options,
               "__doc__": "The export flag and every export and watch option (the `export:` section; see "
                          "configs/export.yaml). Generated from ExportOptions and WatchOptions: an option added "
                          "there is a key here."})
ExportSection.__module__ = __name__


@dataclass(frozen=True)
class RunnerConfig:
    """A training run with the export flag."""

    torchtitan: TorchTitanSection = field(default_factory=TorchTitanSection)
    export: ExportSection = field(default_factory=ExportSection)
    role: str = "main"
    """`main` writes the configs and runs the watcher; `worker` (other nodes, see molgen_export.integrations.launch) only trains."""

    def __post_init__(self) -> None:
        if self.role not in ("main", "worker"):
            raise ConfigError(f"role must be main or worker, got {self.role!r}")


def load_config(path: Path, dotlist: list[str] | None = None, defaults: Path | None = None) -> RunnerConfig:
    """Merge built-in defaults < `export.yaml` (beside `path`, or `defaults`) < `path` < dotlist.

    Raises:
        ConfigError: a file is unreadable, or a key or value is wrong (with omegaconf's "did you mean").
    """
    from omegaconf import OmegaConf
    from omegaconf.errors import OmegaConfBaseException

    path = Path(path)
    if not path.is_file():
        raise ConfigError(f"runner config {path} does not exist", path=path,
                          hint="pass a YAML such as configs/qwen3_0.6b_export.yaml with --config")
    defaults = defaults or path.parent / DEFAULTS_FILE
    layers: list[tuple[str, Any]] = []
    if defaults.is_file() and defaults.resolve() != path.resolve():
        layers.append((str(defaults), lambda: OmegaConf.load(defaults)))
    layers.append((str(path), lambda: OmegaConf.load(path)))
    layers.append(("the command line", lambda: OmegaConf.from_dotlist(list(dotlist or []))))
    merged = OmegaConf.structured(RunnerConfig)
    OmegaConf.set_readonly(merged, False)
    for where, load in layers:
        try:
            merged = OmegaConf.merge(merged, load())
        except (OmegaConfBaseException, TypeError, ValueError) as exc:
            raise ConfigError(f"{where}: {exc}".replace("\n", " "), path=Path(where) if where != "the command line"
                              else None, hint="fix the key or value; configs/export.yaml lists every export key") from exc
    try:
        return OmegaConf.to_object(merged)
    except OmegaConfBaseException as exc:
        raise ConfigError(f"{path}: {exc}".replace("\n", " "), path=path) from exc
    except ConfigError:
        raise
    except MolgenExportError as exc:  # a value the export options refuse
        raise ConfigError(f"{path} (with the defaults and overrides): {exc.args[0]}", path=path, hint=exc.hint) from exc


@contextmanager
def _working_directory(path: Path):
    previous = Path.cwd()
    os.chdir(path)
    try:
        yield
    finally:
        os.chdir(previous)


def _apply_overrides(data: dict, overrides: list[str]) -> None:
    """Apply `--a.b value` / `--a.b=value` / `--flag` TorchTitan arguments to a job-config dict (0.2 TOML)."""
    i = 0
    while i < len(overrides):
        arg = overrides[i]
        i += 1
        if not arg.startswith("--"):
            continue
        key, equals, value = arg[2:].partition("=")
        if not equals and (i >= len(overrides) or overrides[i].startswith("--")):
            value = "true"
        elif not equals:
            value, i = overrides[i], i + 1
        try:
            parsed = json.loads(value)
        except ValueError:
            parsed = value
        node = data
        parts = key.replace("-", "_").split(".")
        for part in parts[:-1]:
            node = node.setdefault(part, {})
        node[parts[-1]] = parsed


def build_job_config(section: TorchTitanSection, workdir: Path) -> dict:
    """The fully resolved job config training will run with, as the dict written to job_config.json.

    Raises:
        ConfigError: the config function, job file or module cannot be read.
    """
    if section.job_config is not None:
        data = json.loads(json.dumps(section.job_config))
    elif section.job_file is not None:
        job_file = (workdir / section.job_file).resolve()
        try:
            text = job_file.read_text()
            if job_file.suffix == ".toml":
                import tomllib

                data = tomllib.loads(text)
            else:
                data = json.loads(text)
        except (OSError, ValueError) as exc:
            raise ConfigError(f"cannot read the job file {job_file}: {exc}", path=job_file,
                              hint="point torchtitan.job_file at a TorchTitan TOML or a job_config.json") from exc
        if job_file.suffix == ".toml":
            data.setdefault("job", {})["dump_folder"] = section.dump_folder
            _apply_overrides(data, section.overrides)
    else:
        import warnings

        try:
            from torchtitan.config import ConfigManager
        except ImportError as exc:
            raise ConfigError(f"torchtitan.module needs TorchTitan 0.3, which does not import here: {exc}",
                              hint="install torchtitan 0.3, or use torchtitan.job_file with a 0.2 TOML") from exc
        argv = ["--module", section.module, "--config", section.config, "--dump_folder", section.dump_folder,
                *section.overrides]
        try:
            with _working_directory(workdir), warnings.catch_warnings():
                warnings.simplefilter("ignore")
                trainer_config = ConfigManager().parse_args(argv)
        except (ImportError, ValueError, SystemExit) as exc:
            raise ConfigError(f"TorchTitan could not build the config {section.module}:{section.config} "
                              f"with {section.overrides}: {exc}",
                              hint="check torchtitan.module, torchtitan.config and torchtitan.overrides") from exc
        data = json.loads(json.dumps(trainer_config.to_dict(), default=repr))
    if "model_spec" in data or (section.job_config is not None and "job" not in data):
        data["dump_folder"] = data.get("dump_folder") or section.dump_folder
    return data


def dump_folder_of(job: dict, section: TorchTitanSection) -> str:
    """The dump folder a job config names (0.3 `dump_folder`, 0.2 `job.dump_folder`), else the section's."""
    return job.get("dump_folder") or (job.get("job") or {}).get("dump_folder") or section.dump_folder


def checkpoint_enabled(job: dict) -> bool | None:
    """Whether the job config turns checkpointing on (None when it does not say)."""
    checkpoint = job.get("checkpoint") or {}
    for key in ("enable", "enable_checkpoint"):
        if key in checkpoint:
            return bool(checkpoint[key])
    return None


def training_command(section: TorchTitanSection, values: dict[str, str]) -> list[str]:
    """The child process's argv: `command` filled in, or torchrun + `-m torchtitan.train` + the config."""
    if section.command:
        return [arg.format(**values) for arg in section.command]
    argv = [arg.format(**values) for arg in section.launcher] + ["-m", "torchtitan.train"]
    if section.module:
        argv += ["--module", section.module, "--config", section.config, "--dump_folder", section.dump_folder]
    else:
        argv += ["--job.config_file", str(section.job_file), "--job.dump_folder", section.dump_folder]
    return argv + list(section.overrides)


@dataclass(frozen=True)
class RunPlan:
    """Everything decided before training starts."""

    workdir: Path
    dump_folder: Path
    job_config_path: Path
    checkpoint_root: Path
    command: list[str]
    job_config: dict = field(repr=False)


def plan_run(config: RunnerConfig) -> RunPlan:
    """Resolve paths, the job config and the training command (nothing is written)."""
    section = config.torchtitan
    section.check_source()
    workdir = Path(section.workdir).expanduser().resolve()
    job = build_job_config(section, workdir)
    dump_folder = (workdir / dump_folder_of(job, section)).resolve()
    folder = (job.get("checkpoint") or {}).get("folder") or "checkpoint"
    checkpoint_root = dump_folder / folder
    job_config_path = dump_folder / run_config.JOB_CONFIG_NAME
    values = {"python": sys.executable, "job_config": str(job_config_path), "dump_folder": str(dump_folder),
              "checkpoint_root": str(checkpoint_root), "nproc_per_node": str(section.nproc_per_node),
              "workdir": str(workdir)}
    try:
        command = training_command(section, values)
    except (KeyError, IndexError) as exc:
        raise ConfigError(f"torchtitan.command/launcher uses an unknown placeholder {exc}",
                          hint=f"placeholders: {', '.join('{' + k + '}' for k in values)}") from exc
    return RunPlan(workdir, dump_folder, job_config_path, checkpoint_root, command, job)


class _CheckpointConfigWriter:
    """Writes `<checkpoint_root>/config.json` once the first `step-*` folder exists (from any thread)."""

    def __init__(self, plan: RunPlan):
        self.plan = plan
        self.written = False
        self._lock = threading.Lock()

    def maybe_write(self, _step_dir: Path | None = None) -> None:
        with self._lock:
            if self.written or not self.plan.checkpoint_root.is_dir():
                return
            if not any(discover.step_number(p) is not None for p in self.plan.checkpoint_root.iterdir()):
                return
            path = run_config.write_checkpoint_config(self.plan.checkpoint_root, self.plan.job_config_path,
                                                      launch_dir=self.plan.workdir)
            self.written = True
            logger.info("wrote %s", path)


def _write_job_config(plan: RunPlan) -> None:
    """Write `<dump_folder>/job_config.json` atomically (a temporary name, then a rename).

    Raises:
        OutputError: the dump folder cannot be written.
    """
    try:
        plan.dump_folder.mkdir(parents=True, exist_ok=True)
        temp = plan.job_config_path.with_name(f".{plan.job_config_path.name}.tmp-{os.getpid()}")
        temp.write_text(json.dumps(plan.job_config, indent=2) + "\n")
        os.replace(temp, plan.job_config_path)
    except OSError as exc:
        raise OutputError(f"cannot write {plan.job_config_path}: {exc.strerror or exc}", path=plan.job_config_path,
                          hint="make torchtitan.dump_folder writable, or point it elsewhere") from exc
    logger.info("wrote %s", plan.job_config_path)


def _preflight(plan: RunPlan, section: ExportSection) -> None:
    """Prove the job config exportable before training starts.

    Raises:
        ConfigError: it is not, and `export.preflight` is `error` (training is not launched).
    """
    from molgen_export.verify.preflight import run_preflight

    result = run_preflight(plan.job_config_path, section.export_options(plan.workdir))
    for line in result.lines():
        logger.info("preflight: %s", line)
    failure = result.first_failure()
    if failure is None:
        return
    if section.preflight == "warn":
        logger.warning("preflight: this run's checkpoints will not export (%s); launching anyway "
                       "(export.preflight: warn)", failure.detail)
        return
    raise ConfigError(f"preflight: the run's checkpoints cannot be exported, so training was not launched: "
                      f"{failure.name}: {failure.detail}",
                      path=plan.job_config_path, hint="or set export.preflight: warn (or off) to launch anyway")


def _exit_status(returncode: int) -> int:
    return returncode if returncode >= 0 else 128 - returncode


def run(config: RunnerConfig, *, on_outcome=None) -> int:
    """Write job_config.json, launch training, export its checkpoints while it runs; return training's code.

    Args:
        config: the merged runner config.
        on_outcome: called with each watcher StepOutcome (the CLI prints them).

    Raises:
        MolgenExportError: the config cannot be resolved or job_config.json cannot be written.
    """
    plan = plan_run(config)
    main_role = config.role == "main"
    if main_role:
        _write_job_config(plan)
        if config.export.enabled and checkpoint_enabled(plan.job_config) is False:
            logger.warning("export is on but the job config has checkpointing off: nothing will be exported "
                           "(add --checkpoint.enable to torchtitan.overrides)")
        if config.export.enabled and config.export.preflight != "off":
            _preflight(plan, config.export)
    writer = _CheckpointConfigWriter(plan)
    watcher = None
    if main_role and config.export.enabled:
        watcher = Watcher(plan.checkpoint_root, config.export.export_options(plan.workdir),
                          config.export.watch_options(), before_export=writer.maybe_write, on_outcome=on_outcome)
    env = {**os.environ, **config.torchtitan.env, RUNNER_ENV: "1",
           "MOLGEN_EXPORT_JOB_CONFIG": str(plan.job_config_path)}
    state: dict[str, Any] = {"child": None, "signal": None, "at": 0.0}

    def on_signal(signum, _frame):
        first = state["signal"] is None
        state["signal"], state["at"] = signum, time.monotonic()
        logger.warning("%s: stopping training and the watcher", signal.Signals(signum).name)
        if state["child"] is not None:
            _signal_group(state["child"], signum)
        if watcher is not None:
            watcher.stop(grace=config.export.grace if first else 0.0)

    in_main_thread = threading.current_thread() is threading.main_thread()
    previous = {s: signal.signal(s, on_signal) for s in (signal.SIGINT, signal.SIGTERM)} if in_main_thread else {}
    try:
        logger.info("launching training in %s: %s", plan.workdir, " ".join(plan.command))
        try:
            child = state["child"] = subprocess.Popen(plan.command, cwd=plan.workdir, env=env,
                                                      start_new_session=True)
        except OSError as exc:
            raise UsageError(f"cannot start training ({plan.command[0]}): {exc}",
                             hint="check torchtitan.launcher / torchtitan.command") from exc
        if state["signal"] is not None:  # interrupted while it was starting
            _signal_group(child, state["signal"])
        if watcher is not None:
            watcher.start()
        while True:
            try:
                returncode = child.wait(timeout=0.5)
                break
            except subprocess.TimeoutExpired:
                pass
            if main_role:
                _quietly(writer.maybe_write)
            if state["signal"] and time.monotonic() - state["at"] > config.torchtitan.stop_timeout:
                logger.warning("training did not stop within %.0f s; killing it", config.torchtitan.stop_timeout)
                _signal_group(child, signal.SIGKILL)
        if main_role:
            _quietly(writer.maybe_write)
        logger.info("training exited with %d", returncode)
        if watcher is not None:
            if state["signal"] is None:
                logger.info("exporting the checkpoints still queued")
                watcher.drain()
            watcher.join(None if state["signal"] is None else config.export.grace + 30)
    finally:
        for signum, handler in previous.items():
            signal.signal(signum, handler)
        child = state["child"]
        if child is not None and child.poll() is None:
            _signal_group(child, signal.SIGKILL)
            child.wait()
    return _exit_status(returncode)


def _signal_group(child: subprocess.Popen, signum: int) -> None:
    try:
        os.killpg(child.pid, signum)
    except (ProcessLookupError, PermissionError):
        pass


def _quietly(fn) -> None:
    try:
        fn()
    except (OSError, MolgenExportError) as exc:
        logger.warning("cannot write the checkpoint folder's config.json yet: %s", exc)


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="python -m molgen_export.runner.launch", formatter_class=argparse.RawDescriptionHelpFormatter,
        description="Train with TorchTitan and export every checkpoint to a verified HF folder while it runs.",
        epilog=RUNNER_EPILOG)
    parser.add_argument("--config", type=Path, required=True, help="the run's YAML (torchtitan: and export: sections)")
    parser.add_argument("--defaults", type=Path, help=f"export defaults (default: {DEFAULTS_FILE} beside --config)")
    parser.add_argument("--print-config", action="store_true",
                        help="print the merged config, job config path and training command; launch nothing")
    parser.add_argument("dotlist", nargs="*", help="overrides such as export.enabled=true torchtitan.nproc_per_node=8")
    flags.add_verbosity(parser)
    parser.set_defaults(verbose=1)
    return parser


RUNNER_EPILOG = """\
examples:
  python -m molgen_export.runner.launch --config configs/qwen3_0.6b_export.yaml
  python -m molgen_export.runner.launch --config configs/qwen3_0.6b_export.yaml torchtitan.nproc_per_node=8 export.poll=30
  python -m molgen_export.runner.launch --config configs/demo.yaml
  python -m molgen_export.runner.launch --config configs/demo.yaml --print-config export.enabled=false

The exit code is training's (128+N when a signal N ended it); 2 when the config is wrong."""


def main(argv: list[str] | None = None) -> int:
    """Entry point of `python -m molgen_export.runner.launch`; returns training's exit code (2 for a bad config)."""
    args = build_parser().parse_intermixed_args(argv)
    flags.setup_logging(args)
    if args.verbose < 2 and not args.quiet:  # the runner's and the watcher's lines, not one per export stage
        logging.getLogger("molgen_export").setLevel(logging.WARNING)
        for name in ("molgen_export.watch.watcher", "molgen_export.runner.launch"):
            logging.getLogger(name).setLevel(logging.INFO)
    try:
        config = load_config(args.config, args.dotlist, args.defaults)
        if args.print_config:
            plan = plan_run(config)
            print(json.dumps({"config": asdict(config), "job_config": str(plan.job_config_path),
                              "checkpoint_root": str(plan.checkpoint_root), "command": plan.command}, indent=2))
            return flags.EXIT_OK
        return run(config, on_outcome=lambda o: print(f"[export] {describe_outcome(o)}", flush=True))
    except MolgenExportError as exc:
        if os.environ.get("MOLGEN_EXPORT_DEBUG"):
            raise
        print(f"error: {exc}", file=sys.stderr)
        return exc.exit_code


if __name__ == "__main__":
    sys.exit(main())
