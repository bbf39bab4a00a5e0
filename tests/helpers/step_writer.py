"""Save step after step of a tiny TorchTitan Qwen3 into a checkpoint folder, the way training does, from its own process.

Run with `python tests/helpers/step_writer.py CHECKPOINT_ROOT --steps 1-55 --gap 0.2 --vocab-size 320`.
Each save writes the shards, waits `--commit-delay`, then renames `.metadata` into place (DCP's commit marker);
between saves the weights move a little, so every step is a different checkpoint. Prints one line per step saved.
"""

from __future__ import annotations

import argparse
import sys
import time
from pathlib import Path

import torch

from molgen_export.integrations.demo_trainer import save_checkpoint
from molgen_export.demo import build_model, tiny_arch, titan_checkpoint_state


def parse_steps(text: str) -> list[int]:
    """`1-55` or `30,40,50` into step numbers."""
    if "-" in text:
        first, last = (int(part) for part in text.split("-"))
        return list(range(first, last + 1))
    return [int(part) for part in text.split(",")]


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__)
    parser.add_argument("checkpoint_root", type=Path)
    parser.add_argument("--steps", default="1-55", help="steps to save, e.g. 1-55 or 30,40")
    parser.add_argument("--gap", type=float, default=0.2, help="seconds between saves (the 'training' time)")
    parser.add_argument("--commit-delay", type=float, default=0.05, help="seconds between the shards and .metadata")
    parser.add_argument("--vocab-size", type=int, default=320)
    parser.add_argument("--untied", action="store_true")
    args = parser.parse_args(argv)
    torch.set_num_threads(1)
    model = build_model(tiny_arch(args.vocab_size, tie=not args.untied), seed=1)
    optimizer = torch.optim.AdamW(model.parameters(), lr=1e-3)
    generator = torch.Generator().manual_seed(0)
    for step in parse_steps(args.steps):
        time.sleep(args.gap)
        with torch.no_grad():
            for param in model.parameters():
                param.add_(1e-3 * torch.randn(param.shape, generator=generator))
        started = time.perf_counter()
        save_checkpoint(titan_checkpoint_state(model, optimizer, step), args.checkpoint_root / f"step-{step}",
                        args.commit_delay)
        print(f"saved step-{step} in {time.perf_counter() - started:.3f} s", flush=True)
    return 0


if __name__ == "__main__":
    sys.exit(main())
