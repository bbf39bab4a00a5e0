"""A Qwen3-235B-A22B-shaped TorchTitan step without its data: real DCP `.metadata`, sparse shard files.

The keys and shapes come from the installed torchtitan's own `235B-A22B` model, built on the meta device
(model FQNs from `model.state_dict()`, optimizer FQNs from `named_parameters()`, as
`molgen_export.demo.titan_checkpoint_state` lays a CheckpointManager save out). The metadata is made the way
DCP makes it, with DCP's own classes and functions and no tensor allocated:

- one `SavePlan` per rank, as `DefaultSavePlanner` plans an FSDP2 state dict: parameters and the AdamW
  moments are DTensors sharded along dim 0 (`WriteItemType.SHARD`, one chunk per rank); buffers
  (`expert_bias_E`), the AdamW `step` scalars and the non-tensor entries are on every rank and deduplicated
  by DCP's `dedup_save_plans`; `create_default_global_save_plan` then builds `state_dict_metadata`;
- `FileSystemWriter` with its defaults (one thread, one file per rank, `__{rank}_0.distcp`): byte items
  first, then tensors, in plan order, each as long as `torch.save` makes it (measured by `torch.save` itself
  under `torch.serialization.skip_data` on an mmapped sparse file, so no bytes are allocated or written);
- `.metadata` pickled as `FileSystemWriter.finish` pickles it (`storage_data`, `planner_data`,
  `storage_meta`, version), the shard files created with `os.truncate` to the sizes this layout gives them.

Shard contents are holes: the step plans, dry-runs and checks file sizes like the real one, but its tensor
data is zeros and not `torch.save` records, so only metadata-level work can run on it. For more layers
than the registry's 94 (the 2x / 4x scaling variants), layer 0's entries are repeated and the run config's
layer list is the registry's repeated.

Simplification, stated: the fused `wqkv` parameter's model-state-dict views `wq`/`wk`/`wv` are chunked
along dim 0 on their own, and expert parallelism is not modelled (experts are FSDP-sharded like the rest).
"""

from __future__ import annotations

import dataclasses
import functools
import io
import json
import math
import os
import re
import uuid
from collections import ChainMap
from dataclasses import dataclass, field
from pathlib import Path

import torch

FLAVOR = "235B-A22B"
REGISTRY_LAYERS = 94
QWEN3_235B_INTERMEDIATE_SIZE = 12288
"""HF `intermediate_size` of Qwen3-235B-A22B (no dense layer uses it; HF's config states it)."""
ADAMW_GROUP = {"lr": 3e-4, "betas": (0.9, 0.95), "eps": 1e-8, "weight_decay": 0.1, "amsgrad": False,
               "maximize": False, "foreach": None, "capturable": False, "differentiable": False, "fused": None,
               "decoupled_weight_decay": True}
"""One AdamW param group as `get_optimizer_state_dict(flatten_optimizer_state_dict=True)` flattens it per FQN."""
_LAYER = re.compile(r"^layers\.(\d+)\.(.*)$")


@dataclass
class SyntheticStep:
    """Paths and sizes of one synthetic step, laid out like `molgen_export.demo.DemoRun`."""

    workdir: Path
    run_dir: Path
    checkpoint_root: Path
    assets_dir: Path
    job_config: Path
    step_dir: Path
    n_layers: int
    ranks: int
    model_tensors: int
    """Model FQNs in the metadata (what the export maps; buffers included)."""
    metadata_entries: int
    """Entries of `state_dict_metadata` (model, optimizer, scheduler, dataloader, train state)."""
    storage_entries: int
    """Entries of `storage_data` (one per saved chunk or byte item)."""
    files: dict[str, int] = field(default_factory=dict)
    """Shard file name -> apparent size in bytes."""
    tokenizer_size: int = 0

    @property
    def apparent_bytes(self) -> int:
        return sum(self.files.values())


@functools.lru_cache(maxsize=1)
def registry_template() -> tuple[dict[str, tuple[tuple[int, ...], torch.dtype]], dict[str, tuple[int, ...]]]:
    """The registry 235B-A22B model's state-dict entries (FQN -> shape, dtype) and parameters (FQN -> shape)."""
    from torchtitan.models.qwen3 import qwen3_configs

    config = qwen3_configs[FLAVOR](attn_backend="flex")
    with torch.device("meta"):
        model = config.build()
    state = {k: (tuple(v.shape), v.dtype) for k, v in model.state_dict().items()}
    params = {k: tuple(v.shape) for k, v in model.named_parameters()}
    return state, params


def registry_config(n_layers: int = REGISTRY_LAYERS):
    """The torchtitan registry's 235B-A22B model config, its layer list repeated to `n_layers` layers."""
    from torchtitan.models.qwen3 import qwen3_configs

    config = qwen3_configs[FLAVOR](attn_backend="flex")
    if n_layers == len(config.layers):
        return config
    return dataclasses.replace(config, layers=[config.layers[i % len(config.layers)] for i in range(n_layers)])


def _repeat_layers(entries: dict, n_layers: int) -> dict:
    """Entries for `n_layers` layers: the registry's for the layers it has, layer 0's repeated past them."""
    head, layer0, tail = {}, {}, {}
    for key, value in entries.items():
        match = _LAYER.match(key)
        if match is None:
            (tail if layer0 else head)[key] = value
        elif match.group(1) == "0":
            layer0[match.group(2)] = value
    out = dict(head)
    for i in range(n_layers):
        for suffix, value in layer0.items():
            out[f"layers.{i}.{suffix}"] = value
    out.update(tail)
    return out


def model_entries(n_layers: int = REGISTRY_LAYERS):
    """(state-dict entries, parameters) of a 235B-A22B with `n_layers` layers, in the model's own order."""
    state, params = registry_template()
    if n_layers == REGISTRY_LAYERS:
        return dict(state), dict(params)
    return _repeat_layers(state, n_layers), _repeat_layers(params, n_layers)


class _SavedLength:
    """How many bytes `torch.save` writes for a tensor of a shape and dtype, or for a small object.

    Tensors are measured by saving, under `skip_data`, a tensor mmapped from a sparse file into another
    sparse file: torch's own zip writer lays the record out; no storage byte is allocated or written.
    """

    def __init__(self, scratch: Path, max_bytes: int):
        self.scratch = scratch
        self.backing = scratch / "backing.bin"
        self.probe = scratch / "probe.pt"
        with open(self.backing, "wb") as f:
            os.truncate(f.fileno(), max(max_bytes, 8))
        self._tensors: dict[tuple, int] = {}
        self._objects: dict[str, int] = {}

    def tensor(self, shape: tuple[int, ...], dtype: torch.dtype) -> int:
        key = (tuple(shape), dtype)
        if key not in self._tensors:
            numel = math.prod(shape)
            data = torch.from_file(str(self.backing), shared=False, size=max(numel, 1), dtype=dtype)
            data = data[:numel].view(shape)
            with torch.serialization.skip_data(), open(self.probe, "wb") as f:
                torch.save(data, f)
                self._tensors[key] = f.tell()
        return self._tensors[key]

    def obj(self, value) -> int:
        key = f"{type(value).__name__}:{value!r}"
        if key not in self._objects:
            buffer = io.BytesIO()
            torch.save(value, buffer)  # what DefaultSavePlanner.resolve_data does for a non-tensor
            self._objects[key] = buffer.tell()
        return self._objects[key]

    def close(self) -> None:
        for path in (self.backing, self.probe):
            path.unlink(missing_ok=True)


def _chunk(shape: tuple[int, ...], rank: int, ranks: int) -> tuple[tuple[int, ...], tuple[int, ...]]:
    """Offsets and sizes of `rank`'s Shard(0) piece (torch.chunk semantics; every piece non-empty here)."""
    if not shape:
        return (), ()
    rows = -(-shape[0] // ranks)
    start = rank * rows
    return (start,) + (0,) * (len(shape) - 1), (min(rows, shape[0] - start),) + tuple(shape[1:])


def rank_state(state: dict, params: dict, step: int, rank: int) -> list[tuple[tuple, str, object]]:
    """One rank's flattened CheckpointManager state dict, in `flatten_state_dict` order.

    Returns:
        (planner path, kind, value) per entry: kind `dtensor` (value: global shape, dtype), `tensor` (replicated
        plain tensor: shape, dtype) or `bytes` (the Python object DCP pickles).
    """
    entries: list[tuple[tuple, str, object]] = []
    for fqn, (shape, dtype) in state.items():
        entries.append(((fqn,), "dtensor" if fqn in params else "tensor", (shape, dtype)))
    for fqn, shape in params.items():
        entries.append((("optimizer", f"state.{fqn}.step"), "tensor", ((), torch.float32)))
        entries.append((("optimizer", f"state.{fqn}.exp_avg"), "dtensor", (shape, torch.float32)))
        entries.append((("optimizer", f"state.{fqn}.exp_avg_sq"), "dtensor", (shape, torch.float32)))
    for fqn in params:
        for name, value in ADAMW_GROUP.items():
            entries.append((("optimizer", f"param_groups.{fqn}.{name}"), "bytes", value))
    entries.append((("lr_scheduler", "lr_scheduler_0", "last_epoch"), "bytes", step))
    entries.append((("lr_scheduler", "lr_scheduler_0", "_step_count"), "bytes", step + 1))
    entries.append((("dataloader", f"dp_rank_{rank}", "sample_idx"), "bytes", step * 4))
    entries.append((("train_state", "step"), "bytes", step))
    entries.append((("train_state", "ntokens_seen"), "bytes", step * 128))
    return entries


def build_metadata(step_dir: Path, state: dict, params: dict, *, step: int, ranks: int, scratch: Path):
    """The DCP `Metadata` of an FSDP2 save over `ranks` ranks and the size of each rank's shard file."""
    from torch.distributed.checkpoint._dedup_save_plans import dedup_save_plans
    from torch.distributed.checkpoint.default_planner import create_default_global_save_plan
    from torch.distributed.checkpoint.filesystem import CURRENT_DCP_VERSION, DEFAULT_SUFFIX, _StorageInfo
    from torch.distributed.checkpoint.metadata import (ChunkStorageMetadata, Metadata, MetadataIndex, StorageMeta,
                                                       TensorProperties)
    from torch.distributed.checkpoint.planner import SavePlan, TensorWriteData, WriteItem, WriteItemType

    for shape, _ in state.values():
        if shape and shape[0] % ranks:
            raise ValueError(f"{ranks} ranks do not divide dim 0 of {shape}: pick a power of two up to 128")
    properties = {dtype: TensorProperties(dtype=dtype) for dtype in {torch.float32, *(d for _, d in state.values())}}
    max_bytes = max(math.prod(shape) * dtype.itemsize for shape, dtype in state.values())
    lengths = _SavedLength(scratch, max(max_bytes, max(math.prod(s) for s in params.values()) * 4))
    values: dict[str, object] = {}
    shared: dict[str, WriteItem] = {}
    """Items every rank plans alike (byte items, replicated tensors): one object, as equal as DCP's copies."""

    def replicated(fqn: str, kind: str, value) -> WriteItem:
        if fqn not in shared:
            if kind == "bytes":
                values[fqn] = value
                shared[fqn] = WriteItem(index=MetadataIndex(fqn), type=WriteItemType.BYTE_IO)
            else:
                shape, dtype = value
                shared[fqn] = tensor_item(fqn, WriteItemType.TENSOR, shape, dtype, (0,) * len(shape), shape)
        return shared[fqn]

    def tensor_item(fqn, item_type, shape, dtype, offsets, sizes) -> WriteItem:
        chunk = ChunkStorageMetadata(offsets=torch.Size(offsets), sizes=torch.Size(sizes))
        return WriteItem(index=MetadataIndex(fqn, offsets), type=item_type,
                         tensor_data=TensorWriteData(chunk=chunk, properties=properties[dtype], size=torch.Size(shape)))

    try:
        plans = []
        for rank in range(ranks):
            items, mappings = [], {}
            for path, kind, value in rank_state(state, params, step, rank):
                fqn = ".".join(path)
                mappings[fqn] = path
                if kind == "dtensor":
                    shape, dtype = value
                    items.append(tensor_item(fqn, WriteItemType.SHARD, shape, dtype, *_chunk(shape, rank, ranks)))
                else:
                    items.append(replicated(fqn, kind, value))
            plans.append(SavePlan(items, planner_data=mappings))
        plans = dedup_save_plans(plans)
        plans, metadata = create_default_global_save_plan(plans)
        metadata = dataclasses.replace(metadata, planner_data=dict(ChainMap(*[p.planner_data for p in plans])))

        storage_data = {}
        files = {}
        for rank, plan in enumerate(plans):
            name = f"__{rank}_0{DEFAULT_SUFFIX}"
            offset = 0
            ordered = ([i for i in plan.items if i.type == WriteItemType.BYTE_IO]
                       + [i for i in plan.items if i.type != WriteItemType.BYTE_IO])
            for item in ordered:
                if item.type == WriteItemType.BYTE_IO:
                    length = lengths.obj(values[item.index.fqn])
                else:
                    length = lengths.tensor(tuple(item.tensor_data.chunk.sizes), item.tensor_data.properties.dtype)
                storage_data[item.index] = _StorageInfo(name, offset, length)
                offset += length
            files[name] = offset
    finally:
        lengths.close()
    metadata.storage_data = storage_data
    metadata.storage_meta = StorageMeta(checkpoint_id=Path(step_dir), save_id=str(uuid.uuid4()))
    metadata.version = CURRENT_DCP_VERSION
    return metadata, files


def write_step(step_dir: Path, metadata, files: dict[str, int]) -> None:
    """Sparse shard files first, then `.metadata` through `.metadata.tmp` and a rename, as DCP commits a save."""
    import pickle

    step_dir.mkdir(parents=True, exist_ok=True)
    for name, size in files.items():
        with open(step_dir / name, "wb") as f:
            os.truncate(f.fileno(), size)
    tmp = step_dir / ".metadata.tmp"
    with open(tmp, "wb") as f:
        pickle.dump(metadata, f)
    os.replace(tmp, step_dir / ".metadata")


def arch_235b(n_layers: int = REGISTRY_LAYERS):
    """The `Qwen3Arch` of the registry config (with `n_layers` layers), for the base assets' config.json."""
    from molgen_export.mapping.architecture import MoeArch, Qwen3Arch
    from molgen_export.mapping.run_config import _dims_from_titan03_model

    dims = _dims_from_titan03_model(registry_config(n_layers).to_dict())
    return Qwen3Arch(vocab_size=dims.vocab_size, dim=dims.dim, n_layers=n_layers, n_heads=dims.n_heads,
                     n_kv_heads=dims.n_kv_heads, head_dim=dims.head_dim,
                     hidden_dim=dims.hidden_dim or QWEN3_235B_INTERMEDIATE_SIZE, norm_eps=dims.norm_eps,
                     rope_theta=dims.rope_theta, max_seq_len=dims.max_seq_len,
                     tie_word_embeddings=bool(dims.tie_word_embeddings),
                     moe=MoeArch(num_experts=dims.num_experts, top_k=dims.top_k, moe_hidden_dim=dims.moe_hidden_dim,
                                 norm_topk_prob=bool(dims.route_norm), moe_layers=tuple(dims.moe_layers)))


def make_synthetic_step(workdir: Path, n_layers: int = REGISTRY_LAYERS, *, ranks: int = 8, step: int = 1000,
                        tokenizer_vocab: int = 300) -> SyntheticStep:
    """Make a synthetic 235B-A22B-shaped run under `workdir`: assets, job config, one step of metadata.

    Args:
        n_layers: 94 is the registry's model; more repeat its layers (the run config says so too, under
            the flavor `235B-A22B-{n}L`, since the registry flavor has 94).
        ranks: FSDP ranks that saved it (one shard file each); must divide every tensor's dim 0.
        step: the step number (`step-N` folder and the train state).
    """
    from tokenizers import Tokenizer

    from molgen_export.demo import job_config_dict, make_tokenizer, write_base_assets
    from molgen_export.mapping.run_config import write_checkpoint_config

    workdir = Path(workdir)
    assets = workdir / "assets"
    tokenizer_size = make_tokenizer(assets, tokenizer_vocab)
    eos_id = Tokenizer.from_file(str(assets / "tokenizer.json")).token_to_id("<|endoftext|>")
    arch = arch_235b(n_layers)
    write_base_assets(assets, arch, eos_id)
    run_dir = workdir / "run"
    checkpoint_root = run_dir / "checkpoint"
    checkpoint_root.mkdir(parents=True, exist_ok=True)
    job_config = run_dir / "job_config.json"
    flavor = FLAVOR if n_layers == REGISTRY_LAYERS else f"{FLAVOR}-{n_layers}L"
    job = job_config_dict(arch, flavor=flavor, hf_assets_path="./assets", dump_folder="./run", seq_len=4096,
                          model=registry_config(n_layers))
    job_config.write_text(json.dumps(job, indent=2) + "\n")
    write_checkpoint_config(checkpoint_root, job_config, launch_dir=workdir)

    state, params = model_entries(n_layers)
    step_dir = checkpoint_root / f"step-{step}"
    metadata, files = build_metadata(step_dir, state, params, step=step, ranks=ranks, scratch=workdir)
    write_step(step_dir, metadata, files)
    return SyntheticStep(workdir=workdir, run_dir=run_dir, checkpoint_root=checkpoint_root, assets_dir=assets,
                         job_config=job_config, step_dir=step_dir, n_layers=n_layers, ranks=ranks,
                         model_tensors=len(state), metadata_entries=len(metadata.state_dict_metadata),
                         storage_entries=len(metadata.storage_data), files=files, tokenizer_size=tokenizer_size)
