"""TorchTitan 0.3 integration: a CheckpointManager whose config carries the export flag.

In your config_registry function, use it in place of TorchTitan's own::

    from molgen_export.integrations.titan_checkpoint import ExportingCheckpointManager
    checkpoint=ExportingCheckpointManager.Config(enable=True, interval=500, export=True,
                                                 export_args=["--dtype", "bfloat16"])

Training ranks never export: rank 0 starts one `molgen-export watch <checkpoint folder> --until-pid <trainer>`
process (its own session, low priority; log in `<dump_folder>/molgen-watch.log`) and, after each save, hands
the step to it, restarting it if it died. The watcher exports each step once DCP renames `.metadata` into
place, and after training ends it finishes the queue and exits. Under `molgen_export.runner.launch` (which runs its
own watcher) nothing is started. Importing this module never fails: if TorchTitan's internals differ,
`ExportingCheckpointManager` is None and `IMPORT_ERROR` says why.
"""

from __future__ import annotations

import logging
import os
import subprocess
import sys
from dataclasses import dataclass, field
from pathlib import Path

logger = logging.getLogger(__name__)

RUNNER_ENV = "MOLGEN_EXPORT_RUNNER"
"""Set by molgen_export.runner.launch in training's environment: its watcher is already running."""

IMPORT_ERROR: Exception | None = None


def is_rank0() -> bool:
    """True on global rank 0 (torch.distributed when initialized, else the RANK variable)."""
    try:
        import torch.distributed as dist

        if dist.is_available() and dist.is_initialized():
            return dist.get_rank() == 0
    except Exception:  # noqa: BLE001 - never let a rank probe break a save
        pass
    return os.environ.get("RANK", "0") in ("", "0")


def watcher_command(checkpoint_folder: str, trainer_pid: int, export_args: list[str]) -> list[str]:
    """The `molgen-export watch` command rank 0 starts for `checkpoint_folder`."""
    return [sys.executable, "-m", "molgen_export", "watch", checkpoint_folder, "--until-pid", str(trainer_pid),
            "-v", *export_args]


class WatcherHandle:
    """The watcher process one training run started; restarted when it is found dead at a hand-off."""

    def __init__(self, checkpoint_folder: str, export_args: list[str], log_path: Path):
        self.checkpoint_folder = checkpoint_folder
        self.export_args = list(export_args)
        self.log_path = log_path
        self.process: subprocess.Popen | None = None

    def ensure_running(self) -> None:
        if self.process is not None and self.process.poll() is None:
            return
        if self.process is not None:
            logger.warning("molgen-export watcher exited with %s; starting it again", self.process.returncode)
        self.log_path.parent.mkdir(parents=True, exist_ok=True)
        with open(self.log_path, "ab") as log:
            self.process = subprocess.Popen(watcher_command(self.checkpoint_folder, os.getpid(), self.export_args),
                                            stdout=log, stderr=subprocess.STDOUT, stdin=subprocess.DEVNULL,
                                            start_new_session=True)
        logger.info("molgen-export watcher started (pid %d, log %s)", self.process.pid, self.log_path)

    def hand_off(self, step: int) -> None:
        """Make sure the watcher runs; it picks step-N up when its `.metadata` lands (sync or async save)."""
        self.ensure_running()
        logger.info("step-%d handed to the molgen-export watcher (pid %d)", step, self.process.pid)


try:
    from molgen_export.mapping import titan as _titan

    if _titan.installed().release < (0, 3, 0):
        from molgen_export.errors import DependencyError

        raise DependencyError(
            f"ExportingCheckpointManager subclasses torchtitan 0.3's CheckpointManager (its Config); torchtitan "
            f"{_titan.installed().version} is installed",
            hint="under torchtitan 0.2.1 export beside training with `molgen-export watch <checkpoint folder>` "
                 "(or the runner); the exporter itself supports 0.2.1")
    from torchtitan.components.checkpoint import CheckpointManager as _TitanCheckpointManager
except Exception as exc:  # noqa: BLE001 - any torchtitan import problem leaves the module importable
    _TitanCheckpointManager = None
    IMPORT_ERROR = exc

ExportingCheckpointManager = None

if _TitanCheckpointManager is not None:
    try:
        class ExportingCheckpointManager(_TitanCheckpointManager):  # type: ignore[no-redef]
            """TorchTitan's DCP CheckpointManager, plus the export flag (see the module docstring)."""

            @dataclass(kw_only=True, slots=True)
            class Config(_TitanCheckpointManager.Config):
                export: bool = False
                """Export every saved step to a verified HF folder with molgen_export's watcher."""
                export_args: list[str] = field(default_factory=list)
                """Extra `molgen-export watch` flags, e.g. ["--dtype", "bfloat16", "--poll", "30"]."""

            def __init__(self, config, **kwargs):
                super().__init__(config, **kwargs)
                self.export_watcher: WatcherHandle | None = None
                folder = getattr(self, "folder", "")
                if (config.export and getattr(self, "enable", False) and is_rank0()
                        and not os.environ.get(RUNNER_ENV) and "://" not in folder):
                    log = Path(kwargs.get("base_folder") or ".") / "molgen-watch.log"
                    self.export_watcher = WatcherHandle(folder, config.export_args, log)
                    self.export_watcher.ensure_running()

            def _save(self, curr_step: int, last_step: bool = False) -> bool:
                saved = super()._save(curr_step, last_step)
                if saved and self.export_watcher is not None:
                    try:
                        self.export_watcher.hand_off(curr_step)
                    except Exception:  # noqa: BLE001 - exporting must never break training
                        logger.exception("could not hand step-%d to the molgen-export watcher", curr_step)
                return saved
    except Exception as exc:  # noqa: BLE001 - e.g. TorchTitan's Config rules changed
        ExportingCheckpointManager = None
        IMPORT_ERROR = exc
