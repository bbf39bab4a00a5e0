"""Save a tiny TorchTitan Qwen3 checkpoint from 2 ranks (gloo, CPU) with the model sharded by FSDP2.

Run with `python -m torch.distributed.run --nproc-per-node 2 tests/helpers/sharded_save.py STEP_DIR SEED REF_PT [moe]`.
Rank 0 also saves the full (unsharded) model state to REF_PT for comparison.
"""

import sys
import warnings
from pathlib import Path

import torch
import torch.distributed as dist
import torch.distributed.checkpoint as dcp
from torch.distributed.fsdp import fully_shard

from molgen_export.demo import build_model, tiny_arch, tiny_moe_arch, titan_checkpoint_state
from molgen_export.mapping import titan

# layer 0 dense, layer 1 MoE; both MoE under torchtitan 0.2.1 (its Qwen3 is all MoE or none), as tests/helpers/titan_version.py
MOE_LAYERS = (0, 1) if titan.installed().release < (0, 3, 0) else (1,)


def main() -> None:
    step_dir, seed, reference = Path(sys.argv[1]), int(sys.argv[2]), Path(sys.argv[3])
    dist.init_process_group("gloo")
    torch.manual_seed(seed)
    arch = tiny_moe_arch(moe_layers=MOE_LAYERS) if len(sys.argv) > 4 and sys.argv[4] == "moe" else tiny_arch(vocab_size=320, tie=False)
    model = build_model(arch, seed)
    full = {k: v.detach().clone() for k, v in model.state_dict().items()}
    mesh = dist.device_mesh.init_device_mesh("cpu", (dist.get_world_size(),))
    for block in model.layers.values():
        fully_shard(block, mesh=mesh)
    fully_shard(model, mesh=mesh)
    optimizer = torch.optim.AdamW(model.parameters(), lr=1e-3)
    state = titan_checkpoint_state(model, optimizer, step=10)
    sharded = [k for k, v in state.items() if type(v).__name__ == "DTensor"]
    assert sharded, "expected DTensor shards"
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        dcp.save(state, checkpoint_id=str(step_dir))
    if dist.get_rank() == 0:
        torch.save(full, reference)
    dist.barrier()
    dist.destroy_process_group()


if __name__ == "__main__":
    main()
