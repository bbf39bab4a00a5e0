"""Checkpoint key names: canonical TorchTitan FQNs across versions and wrappers, then HF names via
torchtitan's `Qwen3StateDictAdapter`, with every key accounted for (the adapter drops unknown keys silently)."""

from __future__ import annotations

import re
from dataclasses import dataclass

import torch

from molgen_export.errors import MappingError

WRAPPER_SEGMENTS = ("_orig_mod", "_checkpoint_wrapped_module", "_fsdp_wrapped_module", "module")
"""Module-wrapper segments torch.compile, activation checkpointing, FSDP1 and DDP insert into FQNs."""

TITAN_ROOTS = ("tok_embeddings", "layers", "norm", "output", "lm_head")

# (pattern, replacement, rule name): TorchTitan renames applied after wrapper stripping, in order.
RENAME_RULES: tuple[tuple[re.Pattern, str, str], ...] = (
    # TorchTitan before pytorch/torchtitan#2878: attention.wq -> attention.qkv_linear.wq
    (re.compile(r"^(layers\.\d+\.attention)\.(wq|wk|wv)\.(weight|bias)$"), r"\1.qkv_linear.\2.\3", "attention.w{q,k,v} (0.2)"),
    # TorchTitan before pytorch/torchtitan#2937: output.weight -> lm_head.weight
    (re.compile(r"^output\.weight$"), "lm_head.weight", "output.weight (0.2)"),
)

FUSED_QKV_RE = re.compile(r"^layers\.(\d+)\.attention\.qkv_linear\.wqkv\.weight$")


def canonical_titan_key(checkpoint_key: str) -> tuple[str, tuple[str, ...]]:
    """Canonical TorchTitan 0.3 FQN for a checkpoint key, and the names of the rules that fired."""
    rules: list[str] = []
    parts = checkpoint_key.split(".")
    if len(parts) > 1 and parts[0] in ("MODEL", "model") and parts[1] in TITAN_ROOTS:
        parts = parts[1:]
        rules.append(f"{checkpoint_key.split('.')[0]}. prefix")
    kept = [p for p in parts if p not in WRAPPER_SEGMENTS]
    if len(kept) != len(parts):
        rules.append("wrapper segments " + ",".join(sorted({p for p in parts if p in WRAPPER_SEGMENTS})))
    key = ".".join(kept)
    for pattern, replacement, name in RENAME_RULES:
        new_key = pattern.sub(replacement, key)
        if new_key != key:
            rules.append(name)
            key = new_key
    return key, tuple(rules)


@dataclass(frozen=True)
class TensorSource:
    """Where the values of one canonical TorchTitan tensor come from."""

    titan_key: str
    checkpoint_key: str
    shape: tuple[int, ...]
    part: str | None = None
    """For a fused `wqkv` checkpoint tensor: which of `wq`/`wk`/`wv` this is; else None."""


def canonicalize_keys(checkpoint_shapes: dict[str, tuple[int, ...]], *, n_heads: int | None = None,
                      n_kv_heads: int | None = None, head_dim: int | None = None
                      ) -> tuple[dict[str, TensorSource], dict[str, int]]:
    """Map every checkpoint model key to canonical TorchTitan keys.

    A fused `qkv_linear.wqkv.weight` (GQA-interleaved `[n_kv, heads_per_kv + 2, head_dim, dim]`) becomes three
    sources `wq`/`wk`/`wv`; that needs the head counts.

    Returns:
        Canonical key -> source, and rule name -> how many keys it rewrote.

    Raises:
        MappingError: two checkpoint keys land on one canonical key, or a fused wqkv without head counts.
    """
    sources: dict[str, TensorSource] = {}
    rule_counts: dict[str, int] = {}
    for checkpoint_key, shape in checkpoint_shapes.items():
        titan_key, rules = canonical_titan_key(checkpoint_key)
        for rule in rules:
            rule_counts[rule] = rule_counts.get(rule, 0) + 1
        fused = FUSED_QKV_RE.match(titan_key)
        if fused:
            if not (n_heads and n_kv_heads and head_dim):
                raise MappingError(f"checkpoint key `{checkpoint_key}` is a fused wqkv; splitting it needs n_heads, "
                                   "n_kv_heads and head_dim from the run config or flavor",
                                   hint="pass the run's job_config.json with --config")
            rows = head_dim * (n_heads + 2 * n_kv_heads)
            if shape[0] != rows:
                raise MappingError(f"fused `{checkpoint_key}` has {shape[0]} rows, expected {rows} for "
                                   f"{n_heads} heads / {n_kv_heads} kv heads of {head_dim}",
                                   hint="the run config does not match this checkpoint")
            prefix = titan_key.rsplit(".", 2)[0]
            parts = {"wq": n_heads * head_dim, "wk": n_kv_heads * head_dim, "wv": n_kv_heads * head_dim}
            for part, out_rows in parts.items():
                _add(sources, TensorSource(f"{prefix}.{part}.weight", checkpoint_key, (out_rows, shape[1]), part))
            rule_counts["fused wqkv split"] = rule_counts.get("fused wqkv split", 0) + 1
        else:
            _add(sources, TensorSource(titan_key, checkpoint_key, tuple(shape)))
    return sources, rule_counts


def _add(sources: dict[str, TensorSource], source: TensorSource) -> None:
    previous = sources.get(source.titan_key)
    if previous is not None:
        raise MappingError(f"checkpoint keys `{previous.checkpoint_key}` and `{source.checkpoint_key}` both name "
                           f"`{source.titan_key}`", hint="the checkpoint mixes two models; re-save it")
    sources[source.titan_key] = source


def split_fused_qkv(wqkv: torch.Tensor, part: str, *, n_heads: int, n_kv_heads: int, head_dim: int) -> torch.Tensor:
    """One of wq/wk/wv out of TorchTitan's GQA-interleaved fused `wqkv` weight (a contiguous copy)."""
    heads_per_kv = n_heads // n_kv_heads
    grouped = wqkv.reshape(n_kv_heads, heads_per_kv + 2, head_dim, wqkv.shape[-1])
    if part == "wq":
        picked = grouped[:, :heads_per_kv]
    elif part == "wk":
        picked = grouped[:, heads_per_kv]
    elif part == "wv":
        picked = grouped[:, heads_per_kv + 1]
    else:
        raise ValueError(part)
    return picked.reshape(-1, wqkv.shape[-1]).contiguous()


def expected_hf_keys(n_layers: int, *, with_head: bool) -> set[str]:
    """Every tensor an HF Qwen3ForCausalLM checkpoint holds on disk for this depth."""
    keys = {"model.embed_tokens.weight", "model.norm.weight"}
    per_layer = ("self_attn.q_proj.weight", "self_attn.k_proj.weight", "self_attn.v_proj.weight",
                 "self_attn.o_proj.weight", "self_attn.q_norm.weight", "self_attn.k_norm.weight",
                 "mlp.gate_proj.weight", "mlp.up_proj.weight", "mlp.down_proj.weight",
                 "input_layernorm.weight", "post_attention_layernorm.weight")
    for layer in range(n_layers):
        keys.update(f"model.layers.{layer}.{name}" for name in per_layer)
    if with_head:
        keys.add("lm_head.weight")
    return keys


def map_to_hf(sources: dict[str, TensorSource], titan_model_config) -> dict[str, str]:
    """HF key for every canonical TorchTitan key, through torchtitan's `Qwen3StateDictAdapter`.

    The adapter is asked with the head untied, so it maps `lm_head.weight` too; whether the head is written
    is the tied-weights check's decision.

    Raises:
        MappingError: a key the adapter does not map (it would drop it silently), naming every such key.
    """
    import dataclasses

    from torchtitan.models.qwen3 import Qwen3StateDictAdapter

    adapter = Qwen3StateDictAdapter(dataclasses.replace(titan_model_config, enable_weight_tying=False), None)
    mapping: dict[str, str] = {}
    unmapped: list[str] = []
    for titan_key, source in sources.items():
        placeholder = torch.empty(source.shape, device="meta")
        produced = adapter.to_hf({titan_key: placeholder})
        if len(produced) != 1:
            unmapped.append(f"{source.checkpoint_key} (as {titan_key})")
            continue
        (hf_key,) = produced
        mapping[titan_key] = hf_key
    if unmapped:
        raise MappingError(f"{len(unmapped)} checkpoint tensor(s) map to no HF Qwen3 parameter: "
                           + ", ".join(sorted(unmapped)[:10]) + (" ..." if len(unmapped) > 10 else ""),
                           hint="the checkpoint holds tensors a dense Qwen3 does not have (another model family, "
                                "or an unsupported TorchTitan layout); nothing was written")
    return mapping
