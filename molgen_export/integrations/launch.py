"""Cluster launcher: run the runner (configs, training, watcher) on rank 0, only training elsewhere.

    srun --ntasks-per-node=1 python -m molgen_export.integrations.launch --config configs/qwen3_0.6b_export.yaml

The rank comes from RANK, SLURM_PROCID, OMPI_COMM_WORLD_RANK, PMI_RANK or NODE_RANK (the first one set,
else 0). Rank 0 runs `molgen_export.runner.launch` in the `main` role: it writes job_config.json and config.json and
watches the checkpoint folder. Every other rank runs the same training command in the `worker` role (no
configs written, no watcher), or exits at once with `--others exit` when training is launched another way.
"""

from __future__ import annotations

import os
import sys
from collections.abc import Mapping

RANK_VARIABLES = ("RANK", "SLURM_PROCID", "OMPI_COMM_WORLD_RANK", "PMI_RANK", "NODE_RANK")


def launch_rank(environ: Mapping[str, str] = os.environ) -> int:
    """This process's rank from the launcher's environment (0 when none is set).

    Raises:
        ValueError: the variable holds something other than an integer.
    """
    for name in RANK_VARIABLES:
        value = environ.get(name)
        if value not in (None, ""):
            try:
                return int(value)
            except ValueError:
                raise ValueError(f"{name}={value!r} is not a rank; unset it or fix the launcher") from None
    return 0


def runner_argv(argv: list[str], rank: int) -> list[str] | None:
    """The runner's arguments for this rank, or None when this rank has nothing to do (`--others exit`)."""
    args = list(argv)
    others = "worker"
    if "--others" in args:
        i = args.index("--others")
        others = args[i + 1] if i + 1 < len(args) else ""
        del args[i:i + 2]
        if others not in ("worker", "exit"):
            raise ValueError(f"--others must be worker or exit, got {others!r}")
    if rank == 0:
        return args
    return None if others == "exit" else [*args, "role=worker"]


def main(argv: list[str] | None = None) -> int:
    """Entry point: the runner's exit code on rank 0 (training's), the worker's elsewhere."""
    from molgen_export.runner import launch

    argv = list(sys.argv[1:] if argv is None else argv)
    try:
        rank = launch_rank()
        args = runner_argv(argv, rank)
    except ValueError as exc:
        print(f"error: {exc}", file=sys.stderr)
        return 2
    if args is None:
        print(f"rank {rank}: nothing to do here (--others exit)", file=sys.stderr)
        return 0
    return launch.main(args)


if __name__ == "__main__":
    sys.exit(main())
