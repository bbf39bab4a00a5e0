"""How fast an export stops once asked: time from `CancelToken.request()` to `export_step` returning.

Makes the demo run (tiny Qwen3, one step) in a temporary folder, exports it once to warm up and once to time it,
then runs `--runs` exports with logits on, each cancelled from another thread at a random moment of that time.
Prints the median and max latency of the aborted ones and which check saw each request, and fails if any abort
left a temporary folder behind.

    python scripts/bench_abort.py --runs 20
"""

from __future__ import annotations

import argparse
import random
import statistics
import tempfile
import threading
import time
from pathlib import Path

import torch

from molgen_export.cancel import CancelToken
from molgen_export.demo import make_demo_run
from molgen_export.errors import ExportAborted
from molgen_export.options import ExportOptions
from molgen_export.pipeline import export


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--runs", type=int, default=20)
    parser.add_argument("--seed", type=int, default=0)
    args = parser.parse_args()
    torch.set_num_threads(2)
    workdir = Path(tempfile.mkdtemp(prefix="bench-abort-"))
    step_dir = make_demo_run(workdir, steps=(10,)).steps[0]
    options = ExportOptions(threads=1, output=workdir / "out", force=True)
    export.export_step(step_dir, options)  # warm-up: imports, caches
    began = time.perf_counter()
    export.export_step(step_dir, options)
    full = time.perf_counter() - began
    print(f"full export (logits on): {full:.2f} s")
    rng = random.Random(args.seed)
    aborted: list[tuple[float, str]] = []
    for _ in range(args.runs):
        token = CancelToken()
        result: dict = {}

        def run_export() -> None:
            try:
                export.export_step(step_dir, options, cancel=token)
                result["where"] = None
            except ExportAborted as exc:
                result["where"] = exc.where
            result["returned"] = time.monotonic()

        thread = threading.Thread(target=run_export)
        thread.start()
        time.sleep(rng.uniform(0.0, 0.95 * full))
        token.request("bench")
        thread.join()
        if result["where"] is not None:
            aborted.append((result["returned"] - token.requested_at, result["where"]))
        leftovers = sorted(p.name for p in (workdir / "out").glob(".step-*"))
        assert not leftovers, f"an abort left {leftovers}"
    if not aborted:
        print("every export finished before its request")
        return
    latencies = sorted(t for t, _ in aborted)
    print(f"{len(aborted)} of {args.runs} aborted: median {statistics.median(latencies) * 1000:.1f} ms, "
          f"max {latencies[-1] * 1000:.1f} ms")
    by_check: dict[str, list[float]] = {}
    for seconds, where in aborted:
        by_check.setdefault(where.split(" ")[0], []).append(seconds)
    for check, seconds in sorted(by_check.items()):
        print(f"  {check}: {len(seconds)}, max {max(seconds) * 1000:.1f} ms")


if __name__ == "__main__":
    main()
