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
    # TorchTitan before pytorch/torchtitan#3425/#3859: moe.experts.w1 [E, F, D] -> routed_experts.inner_experts.w1_EFD
    (re.compile(r"^(layers\.\d+\.moe)\.experts\.w([13])$"), r"\1.routed_experts.inner_experts.w\2_EFD", "moe.experts.w1/w3 (0.2)"),
    (re.compile(r"^(layers\.\d+\.moe)\.experts\.w2$"), r"\1.routed_experts.inner_experts.w2_EDF", "moe.experts.w2 (0.2)"),
    (re.compile(r"^(layers\.\d+\.moe)\.expert_bias$"), r"\1.expert_bias_E", "moe.expert_bias (0.2)"),
)

GROUPED_EXPERTS_RE = re.compile(r"^layers\.\d+\.moe\.routed_experts\.inner_experts\.w[123]_E(FD|DF)$")
"""A stack of per-expert weights `[E, out, in]`: exported as one HF tensor per expert."""

TRAINING_BUFFER_RE = re.compile(r"^layers\.\d+\.moe\.(expert_bias_E|tokens_per_expert(_E)?)$")
"""MoE buffers that exist only for training (load balancing); HF Qwen3-MoE has no place for them."""

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
    expert: int | None = None
    """For a grouped-experts tensor: which expert's slice this is (`titan_key` is then `<grouped key>#<e>`)."""

    @property
    def grouped_key(self) -> str:
        """The canonical TorchTitan key of the whole tensor this source is a slice of (or its own key)."""
        return self.titan_key.split("#", 1)[0]


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
        elif GROUPED_EXPERTS_RE.match(titan_key):
            # one source per expert, in numeric order (expert 10 after 9)
            for expert in range(shape[0]):
                _add(sources, TensorSource(f"{titan_key}#{expert}", checkpoint_key, tuple(shape[1:]), expert=expert))
        else:
            _add(sources, TensorSource(titan_key, checkpoint_key, tuple(shape)))
    return sources, rule_counts


def split_training_buffers(checkpoint_shapes: dict[str, tuple[int, ...]]
                           ) -> tuple[dict[str, tuple[int, ...]], dict[str, str]]:
    """Set aside MoE training-only buffers (expert bias, token counts) before mapping.

    Returns:
        The remaining checkpoint shapes, and canonical buffer key -> checkpoint key for the set-aside ones.
    """
    kept, buffers = {}, {}
    for checkpoint_key, shape in checkpoint_shapes.items():
        titan_key, _ = canonical_titan_key(checkpoint_key)
        if TRAINING_BUFFER_RE.match(titan_key):
            buffers[titan_key] = checkpoint_key
        else:
            kept[checkpoint_key] = shape
    return kept, buffers


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


def expected_hf_keys(n_layers: int, *, with_head: bool, moe_layers: tuple[int, ...] = (),
                     num_experts: int = 0) -> set[str]:
    """Every tensor an HF Qwen3ForCausalLM (or Qwen3MoeForCausalLM) checkpoint holds on disk.

    MoE layers hold `mlp.gate.weight` and per-expert `mlp.experts.{e}.{gate,up,down}_proj.weight`, the on-disk
    layout of HF's Qwen3-MoE checkpoints (transformers 5 fuses experts in memory only).
    """
    keys = {"model.embed_tokens.weight", "model.norm.weight"}
    attention = ("self_attn.q_proj.weight", "self_attn.k_proj.weight", "self_attn.v_proj.weight",
                 "self_attn.o_proj.weight", "self_attn.q_norm.weight", "self_attn.k_norm.weight",
                 "input_layernorm.weight", "post_attention_layernorm.weight")
    dense = ("mlp.gate_proj.weight", "mlp.up_proj.weight", "mlp.down_proj.weight")
    for layer in range(n_layers):
        keys.update(f"model.layers.{layer}.{name}" for name in attention)
        if layer in moe_layers:
            keys.add(f"model.layers.{layer}.mlp.gate.weight")
            keys.update(f"model.layers.{layer}.mlp.experts.{e}.{proj}.weight"
                        for e in range(num_experts) for proj in ("gate_proj", "up_proj", "down_proj"))
        else:
            keys.update(f"model.layers.{layer}.{name}" for name in dense)
    if with_head:
        keys.add("lm_head.weight")
    return keys


_LAYER = r"^layers\.(\d+)\."
HF_NAME_TABLE: tuple[tuple[re.Pattern, str], ...] = (
    (re.compile(r"^tok_embeddings\.weight$"), "model.embed_tokens.weight"),
    (re.compile(r"^norm\.weight$"), "model.norm.weight"),
    (re.compile(r"^lm_head\.weight$"), "lm_head.weight"),
    (re.compile(_LAYER + r"attention\.qkv_linear\.wq\.weight$"), "model.layers.{0}.self_attn.q_proj.weight"),
    (re.compile(_LAYER + r"attention\.qkv_linear\.wk\.weight$"), "model.layers.{0}.self_attn.k_proj.weight"),
    (re.compile(_LAYER + r"attention\.qkv_linear\.wv\.weight$"), "model.layers.{0}.self_attn.v_proj.weight"),
    (re.compile(_LAYER + r"attention\.wo\.weight$"), "model.layers.{0}.self_attn.o_proj.weight"),
    (re.compile(_LAYER + r"attention\.q_norm\.weight$"), "model.layers.{0}.self_attn.q_norm.weight"),
    (re.compile(_LAYER + r"attention\.k_norm\.weight$"), "model.layers.{0}.self_attn.k_norm.weight"),
    (re.compile(_LAYER + r"attention_norm\.weight$"), "model.layers.{0}.input_layernorm.weight"),
    (re.compile(_LAYER + r"ffn_norm\.weight$"), "model.layers.{0}.post_attention_layernorm.weight"),
    (re.compile(_LAYER + r"feed_forward\.w1\.weight$"), "model.layers.{0}.mlp.gate_proj.weight"),
    (re.compile(_LAYER + r"feed_forward\.w2\.weight$"), "model.layers.{0}.mlp.down_proj.weight"),
    (re.compile(_LAYER + r"feed_forward\.w3\.weight$"), "model.layers.{0}.mlp.up_proj.weight"),
    (re.compile(_LAYER + r"moe\.router\.gate\.weight$"), "model.layers.{0}.mlp.gate.weight"),
    (re.compile(_LAYER + r"moe\.routed_experts\.inner_experts\.w1_EFD#(\d+)$"),
     "model.layers.{0}.mlp.experts.{1}.gate_proj.weight"),
    (re.compile(_LAYER + r"moe\.routed_experts\.inner_experts\.w2_EDF#(\d+)$"),
     "model.layers.{0}.mlp.experts.{1}.down_proj.weight"),
    (re.compile(_LAYER + r"moe\.routed_experts\.inner_experts\.w3_EFD#(\d+)$"),
     "model.layers.{0}.mlp.experts.{1}.up_proj.weight"),
)
"""Canonical TorchTitan key -> HF Qwen3 / Qwen3-MoE name: the names torchtitan's `Qwen3StateDictAdapter` gives
(0.2.1 and 0.3; `tests/mapping/test_titan_version.py` holds the two equal under each). Only the dry run maps with
it, so that it need not import torchtitan's model code; the export asks the adapter itself (`map_to_hf`)."""


def map_by_table(sources: dict[str, TensorSource]) -> dict[str, str]:
    """HF key for every canonical TorchTitan key, from `HF_NAME_TABLE`, without importing torchtitan.

    Raises:
        MappingError: a key the table does not name, naming every such key (as `map_to_hf`).
    """
    mapping: dict[str, str] = {}
    unmapped: list[str] = []
    for titan_key, source in sources.items():
        for pattern, template in HF_NAME_TABLE:
            found = pattern.match(titan_key)
            if found:
                mapping[titan_key] = template.format(*found.groups())
                break
        else:
            unmapped.append(f"{source.checkpoint_key} (as {titan_key})")
    _refuse_unmapped(unmapped)
    return mapping


def _refuse_unmapped(unmapped: list[str]) -> None:
    if unmapped:
        raise MappingError(f"{len(unmapped)} checkpoint tensor(s) map to no HF Qwen3 parameter: "
                           + ", ".join(sorted(unmapped)[:10]) + (" ..." if len(unmapped) > 10 else ""),
                           hint="the checkpoint holds tensors a dense Qwen3 does not have (another model family, "
                                "or an unsupported TorchTitan layout); nothing was written")


def map_to_hf(sources: dict[str, TensorSource], titan_model_config) -> dict[str, str]:
    """HF key for every canonical TorchTitan key, through torchtitan's `Qwen3StateDictAdapter`.

    The adapter is asked with the head untied, so it maps `lm_head.weight` too; whether the head is written
    is the tied-weights check's decision.

    Raises:
        MappingError: a key the adapter does not map (it would drop it silently), naming every such key.
    """
    from molgen_export.mapping import titan

    api = titan.installed()  # the adapter speaks the installed model's own names (0.2.1: attention.wq, ...)
    adapter = api.state_dict_adapter(titan_model_config)
    mapping: dict[str, str] = {}
    unmapped: list[str] = []
    experts_by_key: dict[str, list[str]] = {}
    counts: dict[str, int] = {}  # sources per grouped key, counted once (not per key: that was quadratic)
    for source in sources.values():
        grouped = source.grouped_key
        counts[grouped] = counts.get(grouped, 0) + 1
    for titan_key, source in sources.items():
        if source.expert is not None:
            grouped = source.grouped_key
            if grouped not in experts_by_key:
                count = counts[grouped]
                produced = adapter.to_hf({api.native_key(grouped): torch.empty((count, *source.shape),
                                                                               device="meta")})
                experts_by_key[grouped] = list(produced)  # the adapter emits experts in numeric order
            hf_keys = experts_by_key[grouped]
            if len(hf_keys) <= source.expert:
                unmapped.append(f"{source.checkpoint_key} (expert {source.expert})")
                continue
            hf_key = hf_keys[source.expert]
            if f".experts.{source.expert}." not in hf_key:  # never mis-order experts (pytorch/torchtitan#1918)
                raise MappingError(f"expert {source.expert} of `{source.checkpoint_key}` mapped to `{hf_key}`",
                                   hint="this torchtitan version splits experts differently; please report it")
            mapping[titan_key] = hf_key
            continue
        placeholder = torch.empty(source.shape, device="meta")
        produced = adapter.to_hf({api.native_key(titan_key): placeholder})
        if len(produced) != 1:
            unmapped.append(f"{source.checkpoint_key} (as {titan_key})")
            continue
        (hf_key,) = produced
        mapping[titan_key] = hf_key
    _refuse_unmapped(unmapped)
    return mapping
