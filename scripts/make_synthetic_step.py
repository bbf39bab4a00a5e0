"""Make a Qwen3-235B-A22B-shaped TorchTitan run with one step of real DCP metadata and sparse shards.

    python scripts/make_synthetic_step.py /tmp/q235 [--layers 94] [--ranks 8] [--step 1000]
    python -m molgen_export --dcp-path /tmp/q235/run/checkpoint/step-1000 --dry-run

Nothing but metadata is written: the shard files are holes of the sizes the metadata names (2.8 TB apparent at
94 layers, a few MB on disk). See tests/helpers/synthetic_235b.py for what is modelled and what is not.
"""

from __future__ import annotations

import argparse
import json
import sys
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from tests.helpers.synthetic_235b import REGISTRY_LAYERS, make_synthetic_step  # noqa: E402


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("workdir", type=Path, help="launch folder to create (assets/, run/job_config.json, "
                                                   "run/checkpoint/step-N)")
    parser.add_argument("--layers", type=int, default=REGISTRY_LAYERS,
                        help=f"layers ({REGISTRY_LAYERS} is the registry model; more repeat its layers)")
    parser.add_argument("--ranks", type=int, default=8, help="FSDP ranks that saved it (one shard file each)")
    parser.add_argument("--step", type=int, default=1000)
    args = parser.parse_args(argv)
    if args.workdir.exists() and any(args.workdir.iterdir()):
        parser.error(f"{args.workdir} exists and is not empty")
    started = time.perf_counter()
    made = make_synthetic_step(args.workdir, args.layers, ranks=args.ranks, step=args.step)
    print(json.dumps({
        "step_dir": str(made.step_dir), "layers": made.n_layers, "ranks": made.ranks,
        "model_tensors": made.model_tensors, "metadata_entries": made.metadata_entries,
        "storage_entries": made.storage_entries, "apparent_bytes": made.apparent_bytes,
        "metadata_bytes": (made.step_dir / ".metadata").stat().st_size,
        "seconds": round(time.perf_counter() - started, 2)}, indent=2))
    return 0


if __name__ == "__main__":
    sys.exit(main())
