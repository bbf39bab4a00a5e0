"""Lay out a launch directory for a real TorchTitan 0.2.1 training run of a tiny Qwen3 with the export flag on.

Used on the GPU machine, where torch 2.11 imports torchtitan 0.2.1 (not 0.3): it writes the tokenizer and base
assets (trained here with `tokenizers`), a `c4_test` dataset of generated text, a custom flavor registered through
`--experimental.custom_import`, the TorchTitan TOML job file, and the runner YAML.

    python scripts/make_titan021_run.py LAUNCH_DIR [--steps 30] [--interval 10]
    cd LAUNCH_DIR && python -m molgen_export.runner.launch --config run.yaml
"""

from __future__ import annotations

import argparse
import json
from pathlib import Path

from molgen_export.demo import make_tokenizer, synthetic_corpus, tiny_arch, write_base_assets

FLAVOR_MODULE = '''"""Registers the `molgen_tiny` Qwen3 flavor in TorchTitan 0.2.1 (imported via --experimental.custom_import)."""
from torchtitan.models.qwen3 import qwen3_args
from torchtitan.models.qwen3.model.args import Qwen3ModelArgs

qwen3_args["molgen_tiny"] = Qwen3ModelArgs(
    vocab_size={vocab}, max_seq_len={max_seq_len}, head_dim={head_dim}, dim={dim}, n_layers={n_layers},
    n_heads={n_heads}, n_kv_heads={n_kv_heads}, qk_norm=True, hidden_dim={hidden_dim}, rope_theta={rope_theta},
    enable_weight_tying=True,
)
'''

JOB_TOML = '''[job]
dump_folder = "./outputs"
description = "molgen_export: tiny Qwen3 trained by TorchTitan 0.2.1"

[model]
name = "qwen3"
flavor = "molgen_tiny"
hf_assets_path = "./assets"

[optimizer]
name = "AdamW"
lr = 3e-3

[lr_scheduler]
warmup_steps = 2

[training]
local_batch_size = 8
seq_len = 128
steps = {steps}
dataset = "c4_test"

[parallelism]
data_parallel_shard_degree = -1

[checkpoint]
enable = true
folder = "checkpoint"
interval = {interval}
last_save_model_only = false
keep_latest_k = 0

[activation_checkpoint]
mode = "none"

[compile]
enable = false

[experimental]
custom_import = "molgen_flavors"
'''

RUN_YAML = '''# Runner config: TorchTitan 0.2.1 training with the export flag on.
torchtitan:
  job_file: job.toml
  nproc_per_node: 1
  dump_folder: ./outputs
export:
  enabled: true
  poll: 0
  retries: 1
  retry_backoff: 2.0
'''


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("launch_dir", type=Path)
    parser.add_argument("--steps", type=int, default=30)
    parser.add_argument("--interval", type=int, default=10)
    args = parser.parse_args()
    root = args.launch_dir
    size = make_tokenizer(root / "assets")
    arch = tiny_arch(vocab_size=-(-size // 64) * 64)
    from tokenizers import Tokenizer

    eos = Tokenizer.from_file(str(root / "assets" / "tokenizer.json")).token_to_id("<|endoftext|>")
    write_base_assets(root / "assets", arch, eos)
    data = root / "tests" / "assets" / "c4_test"
    data.mkdir(parents=True, exist_ok=True)
    with open(data / "data.json", "w") as f:
        for i in range(40):
            for line in synthetic_corpus(lines=50, seed=i):
                f.write(json.dumps({"text": line}) + "\n")
    (root / "molgen_flavors.py").write_text(FLAVOR_MODULE.format(
        vocab=arch.vocab_size, max_seq_len=arch.max_seq_len, head_dim=arch.head_dim, dim=arch.dim,
        n_layers=arch.n_layers, n_heads=arch.n_heads, n_kv_heads=arch.n_kv_heads, hidden_dim=arch.hidden_dim,
        rope_theta=int(arch.rope_theta)))
    (root / "job.toml").write_text(JOB_TOML.format(steps=args.steps, interval=args.interval))
    (root / "run.yaml").write_text(RUN_YAML)
    print(f"launch dir ready: {root} (vocab {arch.vocab_size} rows for {size} tokens)")


if __name__ == "__main__":
    main()
