"""Time `--distributed` exports with 1, 2, ... ranks on one TorchTitan-layout checkpoint with real Qwen3 shapes.

Builds the checkpoint with `bench_export.build_checkpoint` (model only by default), then, alternating the rank
counts within each round, runs `torchrun --nproc-per-node N -m molgen_export --dcp-path STEP --distributed
--skip-logits` (N=1 runs the same code path on one rank), dropping the page cache before each run when
permitted. Prints a Markdown table (median wall, GB/s of model bytes, speed-up over 1 rank) and checks that
every run wrote byte-identical weights.

    python scripts/bench_distributed.py --flavor 0.6B --workdir /tmp/bench-dist --ranks 1,2
    python scripts/bench_distributed.py --flavor 8B --dtype bfloat16 --workdir /data/bench --ranks 1,4,8
"""

from __future__ import annotations

import argparse
import hashlib
import json
import os
import statistics
import subprocess
import sys
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))
from bench_export import build_checkpoint, drop_caches  # noqa: E402


def weights_digest(hf_dir: Path) -> str:
    digest = hashlib.sha256()
    for path in sorted(hf_dir.glob("*.safetensors")):
        with open(path, "rb") as f:
            while block := f.read(1 << 24):
                digest.update(block)
    return digest.hexdigest()


def run_ranks(step_dir: Path, out: Path, ranks: int, shard_size: str) -> float:
    env = {**os.environ, "OMP_NUM_THREADS": "1"}
    command = [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc-per-node", str(ranks),
               "-m", "molgen_export", "--dcp-path", str(step_dir), "--distributed", "--skip-logits", "--force",
               "--output", str(out), "--max-shard-size", shard_size]
    began = time.perf_counter()
    subprocess.run(command, check=True, env=env, stdout=subprocess.DEVNULL)
    return time.perf_counter() - began


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--flavor", default="0.6B")
    parser.add_argument("--workdir", type=Path, required=True)
    parser.add_argument("--dtype", default="bfloat16", help="checkpoint dtype of the model tensors")
    parser.add_argument("--ranks", default="1,2")
    parser.add_argument("--repeats", type=int, default=2)
    parser.add_argument("--max-shard-size", default="200MB", help="smaller shards spread better over ranks")
    args = parser.parse_args(argv)
    step_dir = build_checkpoint(args.workdir, args.flavor, model_only=True, dtype_name=args.dtype)
    model_bytes = sum(p.stat().st_size for p in step_dir.glob("*.distcp"))
    counts = [int(r) for r in args.ranks.split(",")]
    walls: dict[int, list[float]] = {n: [] for n in counts}
    digests = set()
    for _ in range(args.repeats):
        for n in counts:
            out = args.workdir / f"out-{n}"
            dropped = drop_caches()
            walls[n].append(run_ranks(step_dir, out, n, args.max_shard_size))
            digests.add(weights_digest(out / f"{step_dir.name}-hf"))
    base = statistics.median(walls[counts[0]])
    rows = ["| ranks | median wall (s) | GB/s of model bytes | speed-up |", "|---|---|---|---|"]
    for n in counts:
        wall = statistics.median(walls[n])
        rows.append(f"| {n} | {wall:.2f} | {model_bytes / wall / 1e9:.2f} | {base / wall:.2f}x |")
    print(f"{args.flavor}, model-only {args.dtype} checkpoint of {model_bytes / 1e9:.2f} GB, {os.cpu_count()} CPUs, "
          f"page cache {'dropped' if dropped else 'NOT dropped (not permitted)'}, {args.repeats} rounds, --skip-logits")
    print("\n".join(rows))
    print("weights byte-identical across all runs:", len(digests) == 1)
    (args.workdir / "results-distributed.json").write_text(json.dumps({"walls": walls, "bytes": model_bytes}))
    return 0 if len(digests) == 1 else 1


if __name__ == "__main__":
    sys.exit(main())
