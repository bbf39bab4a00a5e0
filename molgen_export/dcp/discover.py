"""Turn what the user points at (step folder, checkpoint root, run root, one .distcp file) into step folders."""

from __future__ import annotations

import json
import logging
import re
from dataclasses import dataclass
from pathlib import Path

from molgen_export.errors import CheckpointFormatError, UsageError

logger = logging.getLogger(__name__)

STEP_DIR_RE = re.compile(r"^step-(\d+)$")
"""A TorchTitan step folder name. Anchored, unlike TorchTitan's own scan, so `step-10-hf` is never a step."""

METADATA_FILE = ".metadata"
"""DCP writes this last (`.metadata.tmp`, then a rename): a step folder is complete once it exists."""

CONVENTIONAL_CHECKPOINT_DIRS = ("checkpoint", "checkpoints", "outputs/checkpoint")


@dataclass(frozen=True)
class StepInfo:
    """One step folder as found on disk."""

    step: int
    step_dir: Path
    format: str
    """`dcp`, `dcp-in-progress`, `hf` (a `last_save_in_hf` step), `torch_checkpointing`, or `unknown`."""

    @property
    def complete(self) -> bool:
        return self.format == "dcp"

    @property
    def checkpoint_root(self) -> Path:
        return self.step_dir.parent


def step_number(path: Path) -> int | None:
    """The N of a `step-N` folder name, or None for any other name."""
    match = STEP_DIR_RE.match(path.name)
    return int(match.group(1)) if match else None


def detect_format(step_dir: Path) -> str:
    """Tell which writer produced a step folder, from its file names alone."""
    names = {p.name for p in step_dir.iterdir()}
    if METADATA_FILE in names:
        return "dcp"
    if any(n.endswith(".distcp") for n in names) or ".metadata.tmp" in names:
        return "dcp-in-progress"
    if "metadata.pkl" in names or any(re.fullmatch(r"model_\d+\.pt", n) for n in names):
        return "torch_checkpointing"
    if any(n.endswith(".safetensors") or n == "model.safetensors.index.json" for n in names):
        return "hf"
    return "dcp-in-progress" if not names else "unknown"


def describe_step(step_dir: Path) -> StepInfo:
    """Build the StepInfo of one `step-N` folder."""
    step = step_number(step_dir)
    if step is None:
        raise UsageError(f"{step_dir} is not a step folder (expected a name like step-100)")
    return StepInfo(step=step, step_dir=step_dir, format=detect_format(step_dir))


def list_steps(checkpoint_root: Path) -> list[StepInfo]:
    """Every `step-N` folder directly under `checkpoint_root`, ordered by N as a number."""
    steps = []
    for child in checkpoint_root.iterdir():
        if child.is_dir() and step_number(child) is not None:
            try:
                steps.append(describe_step(child))
            except FileNotFoundError:  # purged between listing and looking
                continue
    return sorted(steps, key=lambda s: s.step)


def _checkpoint_root_from_run_config(run_root: Path) -> Path | None:
    """The checkpoint folder a run root's job config names (`dump_folder`/`checkpoint.folder`)."""
    for name in ("job_config.json", "config.json"):
        for candidate in (run_root / name, *run_root.glob(f"*/{name}")):
            try:
                data = json.loads(candidate.read_text())
            except (OSError, ValueError):
                continue
            folder = (data.get("checkpoint") or {}).get("folder") if isinstance(data, dict) else None
            if isinstance(folder, str) and folder:
                target = run_root / folder
                if target.is_dir():
                    return target
    return None


def resolve_checkpoint_root(path: Path) -> tuple[Path, list[StepInfo]]:
    """Resolve `--dcp-path` into the checkpoint root and the step folders it names.

    Args:
        path: a `step-N` folder, a checkpoint root, a run root, or one `*.distcp` file.

    Returns:
        The checkpoint root and its steps (only the one step when `path` names a step).

    Raises:
        UsageError: the path does not exist or holds no checkpoint.
        CheckpointFormatError: a `.distcp` file outside a step folder.
    """
    path = Path(path)
    if not path.exists():
        raise UsageError(f"{path} does not exist", hint="pass a step-N folder, a checkpoint folder or a run folder")
    if path.is_file():
        if path.suffix != ".distcp":
            raise UsageError(f"{path} is a file but not a .distcp shard",
                             hint="pass the step-N folder that holds the checkpoint")
        if step_number(path.parent) is None:
            raise CheckpointFormatError(
                f"{path} is not inside a step-N folder; a .distcp shard cannot be read on its own",
                hint="keep the shard in its step-N folder beside its .metadata and pass that folder")
        return path.parent.parent, [describe_step(path.parent)]
    if step_number(path) is not None:
        return path.parent, [describe_step(path)]
    steps = list_steps(path)
    if steps:
        return path, steps
    candidates = [path / d for d in CONVENTIONAL_CHECKPOINT_DIRS]
    from_config = _checkpoint_root_from_run_config(path)
    if from_config is not None:
        candidates.insert(0, from_config)
    for candidate in candidates:
        if candidate.is_dir():
            steps = list_steps(candidate)
            if steps:
                return candidate, steps
    raise UsageError(f"no step-N checkpoint folder found in {path}",
                     hint="pass a step-N folder, the checkpoint folder holding step-N folders, or the run folder")


def require_dcp(info: StepInfo) -> None:
    """Refuse step folders that are not complete DCP checkpoints, saying what they are instead.

    Raises:
        CheckpointFormatError: an HF step, a torch_checkpointing step, or an unknown folder.
    """
    from molgen_export.errors import CheckpointNotReadyError

    if info.format == "dcp":
        return
    if info.format == "dcp-in-progress":
        raise CheckpointNotReadyError(
            f"{info.step_dir} has no {METADATA_FILE} yet: the checkpoint is still being written",
            hint="wait for the save to finish (DCP writes .metadata last), or use `molgen-export watch`",
            path=info.step_dir)
    if info.format == "hf":
        raise CheckpointFormatError(
            f"{info.step_dir} already holds HuggingFace safetensors (a `last_save_in_hf` save), not a DCP checkpoint",
            hint="load it with transformers directly, or convert it with `molgen-export export-titan`",
            path=info.step_dir)
    if info.format == "torch_checkpointing":
        raise CheckpointFormatError(
            f"{info.step_dir} was written by TorchTitan's torch_checkpointing backend (model_<rank>.pt + metadata.pkl), "
            "which molgen_export does not read",
            hint="save with the default DCP checkpointer (CheckpointManager), or convert this step to DCP first",
            path=info.step_dir)
    raise CheckpointFormatError(f"{info.step_dir} holds no DCP checkpoint (.metadata and *.distcp)",
                                hint="point --dcp-path at a step-N folder written by TorchTitan", path=info.step_dir)
