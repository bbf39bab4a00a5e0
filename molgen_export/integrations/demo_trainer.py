"""A CPU stand-in for `torchtitan.train`: trains the tiny demo Qwen3 and saves DCP checkpoints as TorchTitan does.

`python -m molgen_export.integrations.demo_trainer --job-config outputs/job_config.json` reads the job config the runner wrote,
builds the model it describes with torchtitan's own Qwen3, runs real AdamW steps on random tokens, and every
`checkpoint.interval` steps saves `<dump_folder>/<checkpoint.folder>/step-N` with torch.distributed.checkpoint
(shards first, `.metadata` renamed into place last, optionally after `--commit-delay` seconds), then purges to
`checkpoint.keep_latest_k` like TorchTitan. `demo_job_config` is its TorchTitan 0.3 config function, so
`configs/demo.yaml` goes through the same `--module/--config` path as a real run.
"""

from __future__ import annotations

import argparse
import json
import logging
import shutil
import sys
import time
import warnings
from pathlib import Path

logger = logging.getLogger(__name__)

DEMO_ASSETS = "./demo-run/assets"
DEMO_DUMP_FOLDER = "./demo-run/outputs"


def ensure_demo_assets(assets_dir: Path):
    """Make the demo's tokenizer and base Qwen3 config in `assets_dir` unless they exist; returns the arch."""
    from tokenizers import Tokenizer

    from molgen_export.demo import make_tokenizer, tiny_arch, write_base_assets

    arch = tiny_arch()
    if not (assets_dir / "tokenizer.json").is_file() or not (assets_dir / "config.json").is_file():
        make_tokenizer(assets_dir)
        eos_id = Tokenizer.from_file(str(assets_dir / "tokenizer.json")).token_to_id("<|endoftext|>")
        write_base_assets(assets_dir, arch, eos_id)
    return arch


def demo_job_config():
    """TorchTitan 0.3 config function of the demo run (a `Trainer.Config`): tiny Qwen3, checkpoints every 10.

    Called by the runner in the launch directory, where it also makes the demo's base assets.
    """
    from torchtitan.components.checkpoint import CheckpointManager
    from torchtitan.config import TrainingConfig
    from torchtitan.models.qwen3 import Qwen3StateDictAdapter, parallelize_qwen3
    from torchtitan.protocols.model_spec import ModelSpec
    from torchtitan.trainer import Trainer

    arch = ensure_demo_assets(Path(DEMO_ASSETS))
    spec = ModelSpec(name="qwen3", flavor="molgen_tiny", model=arch.titan_model_config(fused_qkv=True),
                     parallelize_fn=parallelize_qwen3, pipelining_fn=None, post_optimizer_build_fn=None,
                     state_dict_adapter=Qwen3StateDictAdapter)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        return Trainer.Config(
            model_spec=spec, hf_assets_path=DEMO_ASSETS, dump_folder=DEMO_DUMP_FOLDER,
            training=TrainingConfig(local_batch_size=4, seq_len=arch.max_seq_len, steps=30),
            checkpoint=CheckpointManager.Config(enable=True, interval=10, keep_latest_k=10,
                                                last_save_model_only=False, initial_load_model_only=False))


def save_checkpoint(state: dict, step_dir: Path, commit_delay: float = 0.0) -> None:
    """Save with torch.distributed.checkpoint: shards, then (after `commit_delay` s) `.metadata.tmp` -> `.metadata`."""
    import torch.distributed.checkpoint as dcp
    from torch.distributed.checkpoint import FileSystemWriter

    class SlowCommitWriter(FileSystemWriter):
        def finish(self, metadata, results):
            time.sleep(commit_delay)
            return super().finish(metadata, results)

    with warnings.catch_warnings():
        warnings.simplefilter("ignore", UserWarning)
        dcp.save(state, storage_writer=SlowCommitWriter(str(step_dir)))


def purge(checkpoint_root: Path, keep_latest_k: int) -> None:
    """Delete all but the newest `keep_latest_k` step folders, as TorchTitan's purge thread does."""
    from molgen_export.dcp.discover import step_number

    if keep_latest_k <= 0:
        return
    steps = sorted((p for p in checkpoint_root.iterdir() if step_number(p) is not None), key=step_number)
    for old in steps[:-keep_latest_k]:
        shutil.rmtree(old, ignore_errors=True)
        logger.info("purged %s", old)


def train(job_config: Path, *, commit_delay: float = 0.0, step_time: float = 0.0, seed: int = 0) -> list[Path]:
    """Train the model the job config describes and save its checkpoints; returns the step folders saved."""
    import torch

    from molgen_export.mapping.architecture import Qwen3Arch
    from molgen_export.demo import build_model, titan_checkpoint_state
    from molgen_export.mapping.run_config import parse_run_config

    data = json.loads(job_config.read_text())
    run = parse_run_config(data, job_config)
    dims = run.dims
    arch = Qwen3Arch(vocab_size=dims.vocab_size, dim=dims.dim, n_layers=dims.n_layers, n_heads=dims.n_heads,
                     n_kv_heads=dims.n_kv_heads, head_dim=dims.head_dim, hidden_dim=dims.hidden_dim,
                     norm_eps=dims.norm_eps, rope_theta=dims.rope_theta, max_seq_len=dims.max_seq_len,
                     tie_word_embeddings=bool(dims.tie_word_embeddings))
    checkpoint = data.get("checkpoint") or {}
    steps = int((data.get("training") or {}).get("steps", 20))
    interval = int(checkpoint.get("interval", 10))
    dump_folder = Path(data.get("dump_folder") or (data.get("job") or {}).get("dump_folder") or "./outputs")
    checkpoint_root = dump_folder / (checkpoint.get("folder") or "checkpoint")
    torch.manual_seed(seed)
    model = build_model(arch, seed, fused_qkv=bool(dims.fused_qkv))
    optimizer = torch.optim.AdamW(model.parameters(), lr=3e-3)
    saved = []
    for step in range(1, steps + 1):
        window = torch.randint(0, arch.vocab_size, (2, 17))
        logits = model(window[:, :-1])
        loss = torch.nn.functional.cross_entropy(logits.reshape(-1, logits.shape[-1]).float(), window[:, 1:].reshape(-1))
        optimizer.zero_grad()
        loss.backward()
        optimizer.step()
        time.sleep(step_time)
        if step % interval == 0 or step == steps:
            step_dir = checkpoint_root / f"step-{step}"
            begin = time.perf_counter()
            save_checkpoint(titan_checkpoint_state(model, optimizer, step), step_dir, commit_delay)
            logger.info("step %d loss %.3f; saved %s in %.2f s", step, loss.item(), step_dir,
                        time.perf_counter() - begin)
            saved.append(step_dir)
            purge(checkpoint_root, int(checkpoint.get("keep_latest_k", 0) or 0))
    return saved


def main(argv: list[str] | None = None) -> int:
    """`python -m molgen_export.integrations.demo_trainer --job-config PATH`; exits with `--exit-code` after training."""
    parser = argparse.ArgumentParser(prog="python -m molgen_export.integrations.demo_trainer", description=__doc__.splitlines()[0])
    parser.add_argument("--job-config", type=Path, required=True, help="job_config.json written by the runner")
    parser.add_argument("--commit-delay", type=float, default=0.0,
                        help="seconds between writing the shards and renaming .metadata into place")
    parser.add_argument("--step-time", type=float, default=0.0, help="extra seconds per training step")
    parser.add_argument("--exit-code", type=int, default=0, help="exit with this code after training (tests)")
    args = parser.parse_args(argv)
    logging.basicConfig(level=logging.INFO, format="%(asctime)s trainer: %(message)s", stream=sys.stderr)
    warnings.filterwarnings("ignore", message="torch.distributed is disabled")
    if not args.job_config.is_file():
        print(f"error: {args.job_config} does not exist (the runner writes it before training starts)",
              file=sys.stderr)
        return 2
    try:
        train(args.job_config, commit_delay=args.commit_delay, step_time=args.step_time)
    except KeyboardInterrupt:
        # die of the signal, as training does: Python exits 1 instead when the interrupt lands in C++ code
        # (autograd's engine), which would hide from the runner that training was stopped by SIGINT
        import os
        import signal

        signal.signal(signal.SIGINT, signal.SIG_DFL)
        os.kill(os.getpid(), signal.SIGINT)
    return args.exit_code


if __name__ == "__main__":
    sys.exit(main())
