"""Resolve the trained Qwen3 architecture from the run config, the flavor registry and the base assets,
and check it against the checkpoint's tensor shapes, which are the truth of what was trained."""

from __future__ import annotations

import json
import logging
from dataclasses import dataclass
from pathlib import Path

from molgen_export.errors import ConfigError
from molgen_export.mapping.run_config import ModelDims, RunConfig

logger = logging.getLogger(__name__)

QWEN3_ROPE_THETA = 1_000_000.0


def require_torchtitan() -> None:
    """Make sure a supported torchtitan (0.2.1 or 0.3.x) is installed and its Qwen3 model imports.

    Raises:
        DependencyError: torchtitan missing, of an unsupported version, or not importable.
    """
    from molgen_export.mapping import titan

    titan.installed()


QWEN3_NORM_EPS = 1e-6


@dataclass(frozen=True)
class MoeArch:
    """The mixture-of-experts part of a Qwen3 MoE architecture."""

    num_experts: int
    top_k: int
    moe_hidden_dim: int
    norm_topk_prob: bool
    """TorchTitan `route_norm`: renormalize the top-k softmax scores (HF `norm_topk_prob`)."""
    moe_layers: tuple[int, ...]
    """Layers whose FFN is the MoE; the others are dense (HF `mlp_only_layers`)."""


@dataclass(frozen=True)
class Qwen3Arch:
    """A Qwen3 architecture (dense, or MoE when `moe` is set), every field settled."""

    vocab_size: int
    dim: int
    n_layers: int
    n_heads: int
    n_kv_heads: int
    head_dim: int
    hidden_dim: int
    norm_eps: float
    rope_theta: float
    max_seq_len: int
    tie_word_embeddings: bool
    """What the run config asked for; the export may still untie (see checks.check_tied_weights)."""
    moe: MoeArch | None = None
    rope_scaling: dict | None = None
    """HF `rope_scaling` (`rope_type` and its parameters) for a scaled RoPE; None for plain RoPE."""

    def titan_model_config(self, *, tie: bool | None = None, fused_qkv: bool = False):
        """The installed torchtitan's Qwen3 model config of this architecture (0.3 `Qwen3Model.Config`, 0.2.1
        `Qwen3ModelArgs`), with causal SDPA attention for one-process use.

        Raises:
            DependencyError: no supported torchtitan.
            ConfigError: the installed torchtitan cannot express this architecture (0.2.1: mixed dense/MoE layers).
        """
        from molgen_export.mapping import titan

        return titan.installed().model_config(self, tie=tie, fused_qkv=fused_qkv)


def dims_from_flavor(model_name: str | None, flavor: str | None, *, custom_import: str | None = None,
                     launch_dir: Path | None = None) -> ModelDims | None:
    """Dims of a flavor in the installed torchtitan's Qwen3 registry, or None when it is not there."""
    if not flavor or (model_name and model_name != "qwen3"):
        return None
    from molgen_export.mapping import titan

    try:
        api = titan.installed()
    except ImportError:
        return None
    config = api.flavor_config(model_name, flavor, custom_import=custom_import, launch_dir=launch_dir)
    return api.config_dims(config) if config is not None else None


def dims_from_hf_config(hf_config: dict) -> ModelDims:
    """Dims stated by an HF Qwen3 (or Qwen3-MoE) `config.json` dict."""
    rope = hf_config.get("rope_parameters") or {}
    moe = {}
    # transformers 5 saves Qwen3-MoE's `num_experts` under its attribute-map name `num_local_experts`
    num_experts = hf_config.get("num_experts") or hf_config.get("num_local_experts")
    if num_experts:
        layers = hf_config.get("num_hidden_layers") or 0
        step = hf_config.get("decoder_sparse_step") or 1
        dense = set(hf_config.get("mlp_only_layers") or [])
        moe = dict(moe=True, num_experts=num_experts, top_k=hf_config.get("num_experts_per_tok"),
                   moe_hidden_dim=hf_config.get("moe_intermediate_size"), route_norm=hf_config.get("norm_topk_prob"),
                   moe_layers=tuple(i for i in range(layers) if i not in dense and (i + 1) % step == 0))
    return ModelDims(**moe,
        vocab_size=hf_config.get("vocab_size"), dim=hf_config.get("hidden_size"),
        n_layers=hf_config.get("num_hidden_layers"), n_heads=hf_config.get("num_attention_heads"),
        n_kv_heads=hf_config.get("num_key_value_heads"), head_dim=hf_config.get("head_dim"),
        hidden_dim=hf_config.get("intermediate_size"), norm_eps=hf_config.get("rms_norm_eps"),
        rope_theta=rope.get("rope_theta", hf_config.get("rope_theta")),
        max_seq_len=hf_config.get("max_position_embeddings"),
        tie_word_embeddings=hf_config.get("tie_word_embeddings"))


def read_base_hf_config(assets: Path) -> dict:
    """The base assets' `config.json` as a dict.

    Raises:
        ConfigError: missing or not JSON.
    """
    path = assets / "config.json"
    try:
        return json.loads(path.read_text())
    except FileNotFoundError as exc:
        raise ConfigError(f"the base assets folder {assets} has no config.json", path=assets,
                          hint="point hf_assets_path (or --hf-assets) at a Qwen3 HF folder with config.json and tokenizer") from exc
    except ValueError as exc:
        raise ConfigError(f"{path} is not valid JSON: {exc}", path=path) from exc


@dataclass(frozen=True)
class ShapeFacts:
    """What the checkpoint's tensor shapes say (canonical TorchTitan keys -> shapes)."""

    vocab_size: int
    dim: int
    n_layers: int
    n_heads: int
    n_kv_heads: int
    head_dim: int
    hidden_dim: int | None
    """Dense FFN size; None when every layer is MoE."""
    has_head: bool
    num_experts: int | None = None
    moe_hidden_dim: int | None = None
    moe_layers: tuple[int, ...] = ()


def facts_from_shapes(shapes: dict[str, tuple[int, ...]]) -> ShapeFacts:
    """Read the architecture off canonical TorchTitan key shapes.

    Raises:
        ConfigError: a tensor the architecture needs is absent.
    """
    def need(key: str) -> tuple[int, ...]:
        if key not in shapes:
            raise ConfigError(f"the checkpoint has no `{key}`, so it is not a Qwen3 TorchTitan checkpoint",
                              hint="check that --dcp-path points at a Qwen3 run")
        return shapes[key]

    vocab, dim = need("tok_embeddings.weight")
    layer_ids = {int(k.split(".")[1]) for k in shapes if k.startswith("layers.")}
    n_layers = max(layer_ids) + 1 if layer_ids else 0
    head_dim = need("layers.0.attention.q_norm.weight")[0]
    if "layers.0.attention.qkv_linear.wqkv.weight" in shapes:
        raise ConfigError("fused wqkv needs the run config's head counts", hint="internal: split before facts")
    q_rows = need("layers.0.attention.qkv_linear.wq.weight")[0]
    k_rows = need("layers.0.attention.qkv_linear.wk.weight")[0]
    moe_layers = tuple(i for i in range(n_layers) if f"layers.{i}.moe.routed_experts.inner_experts.w1_EFD" in shapes)
    dense_layers = [i for i in range(n_layers) if i not in moe_layers]
    hidden = need(f"layers.{dense_layers[0]}.feed_forward.w1.weight")[0] if dense_layers else None
    experts = shapes[f"layers.{moe_layers[0]}.moe.routed_experts.inner_experts.w1_EFD"] if moe_layers else None
    return ShapeFacts(vocab_size=vocab, dim=dim, n_layers=n_layers, n_heads=q_rows // head_dim,
                      n_kv_heads=k_rows // head_dim, head_dim=head_dim, hidden_dim=hidden,
                      has_head="lm_head.weight" in shapes, num_experts=experts[0] if experts else None,
                      moe_hidden_dim=experts[1] if experts else None, moe_layers=moe_layers)


def resolve_architecture(run: RunConfig, facts: ShapeFacts, base_hf_config: dict, *,
                         registry: bool = True) -> tuple[Qwen3Arch, list[str]]:
    """Settle every architecture field and check each against the checkpoint's shapes.

    Order of sources: run config dims, flavor registry, base assets config.json. A source contradicting
    the shapes is refused naming the field; disagreements the shapes cannot settle (rope theta, norm eps)
    go to the run config and come back as warnings. `registry=False` leaves the flavor registry out (it imports
    torchtitan's model code): the dry run of a run whose config states its own dims.

    Returns:
        The architecture and the warnings to record in the report.

    Raises:
        ConfigError: a source contradicts the checkpoint's shapes.
    """
    if run.model_name not in (None, "qwen3", "qwen3_moe"):
        raise ConfigError(f"the run config {run.source.name} trains `{run.model_name}`; molgen_export exports Qwen3 "
                          "and Qwen3-MoE runs", path=run.source,
                          hint="check that --dcp-path and --config belong to a Qwen3 run")
    base_type = base_hf_config.get("model_type")
    if base_type not in (None, "qwen3", "qwen3_moe"):
        raise ConfigError(f"the base assets config.json describes a `{base_type}` model, not Qwen3",
                          hint="point hf_assets_path (or --hf-assets) at a Qwen3 assets folder")
    sources: list[tuple[str, ModelDims]] = []
    if run.dims.dim is not None:
        sources.append((f"run config {run.source.name}", run.dims))
    flavor_dims = dims_from_flavor(run.model_name, run.flavor, custom_import=run.custom_import,
                                   launch_dir=run.launch_dir) if registry or run.dims.dim is None else None
    if flavor_dims is not None:
        sources.append((f"torchtitan flavor {run.flavor!r}", flavor_dims))
    base_dims = dims_from_hf_config(base_hf_config)
    sources.append(("base assets config.json", base_dims))

    shape_fields = {"vocab_size": facts.vocab_size, "dim": facts.dim, "n_layers": facts.n_layers,
                    "n_heads": facts.n_heads, "n_kv_heads": facts.n_kv_heads, "head_dim": facts.head_dim,
                    "hidden_dim": facts.hidden_dim, "num_experts": facts.num_experts,
                    "moe_hidden_dim": facts.moe_hidden_dim,
                    "moe_layers": facts.moe_layers if facts.moe_layers else None}
    warnings: list[str] = []
    # The base assets are a template (often the released model): when the run states its own dims, a
    # base config that differs is expected (custom dims) and only noted; alone, it must match.
    for label, dims in sources:
        for name, truth in shape_fields.items():
            stated = getattr(dims, name)
            if truth is None or stated is None or stated == truth or (name == "moe_layers" and tuple(stated) == truth):
                continue
            if label.startswith("base assets") and len(sources) > 1:
                warnings.append(f"{label} says {name}={stated}, the checkpoint has {truth}; the checkpoint wins")
                continue
            raise ConfigError(
                f"{label} says {name}={stated} but the checkpoint's tensors say {truth}",
                hint="the config does not belong to this checkpoint; pass the right one with --config")

    def pick(name: str, default):
        values = [(label, getattr(d, name)) for label, d in sources if getattr(d, name) is not None]
        if not values:
            return default
        chosen_label, chosen = values[0]
        for label, value in values[1:]:
            if value != chosen:
                warnings.append(f"{name}: {chosen_label} says {chosen}, {label} says {value}; using {chosen}")
        return chosen

    tie = pick("tie_word_embeddings", not facts.has_head)
    if not facts.has_head and not tie:
        raise ConfigError("the run config says the head is not tied, but the checkpoint has no lm_head/output weight",
                          hint="pass the run config this checkpoint was trained with (--config)")
    seq_candidates = [v for v in (run.seq_len, pick("max_seq_len", None), base_dims.max_seq_len) if v]
    moe = None
    if facts.moe_layers:
        top_k = pick("top_k", None)
        if top_k is None:
            raise ConfigError("the checkpoint is a Qwen3 MoE but no config states how many experts each token "
                              "uses (top_k / num_experts_per_tok)", hint="pass the run's job_config.json with --config")
        moe = MoeArch(num_experts=facts.num_experts, top_k=int(top_k), moe_hidden_dim=facts.moe_hidden_dim,
                      norm_topk_prob=bool(pick("route_norm", True)), moe_layers=facts.moe_layers)
    dense_fields = {k: v for k, v in shape_fields.items() if k not in ("num_experts", "moe_hidden_dim", "moe_layers")}
    if dense_fields["hidden_dim"] is None:  # every layer is MoE: HF still wants an intermediate_size
        dense_fields["hidden_dim"] = int(pick("hidden_dim", facts.moe_hidden_dim))
    arch = Qwen3Arch(
        **dense_fields, moe=moe, norm_eps=float(pick("norm_eps", QWEN3_NORM_EPS)),
        rope_theta=float(pick("rope_theta", QWEN3_ROPE_THETA)),
        max_seq_len=int(max(seq_candidates) if seq_candidates else 4096),
        tie_word_embeddings=bool(tie))
    return arch, warnings
