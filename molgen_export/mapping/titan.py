"""The installed TorchTitan, known at run time: its version (0.2.1 or 0.3.x; anything else refused) and what the
stages need from it, per version: the Qwen3 model config and model, the state-dict adapter, the model's own key
names, the flavor registry and the pieces the verifier runs (router, one block, the final norm).

Everything above this module speaks canonical TorchTitan 0.3 keys (`keymap.canonical_titan_key`); a `Titan` turns
them into the installed model's own names where it touches the installed model (`native_key`).
"""

from __future__ import annotations

import copy
import dataclasses
import functools
import importlib
import importlib.metadata
import logging
import re
from pathlib import Path

import torch

from molgen_export.errors import ConfigError, DependencyError
from molgen_export.mapping.run_config import ModelDims, _dims_from_titan03_model

logger = logging.getLogger(__name__)

SUPPORTED = "torchtitan 0.2.1 or 0.3.x"
MIN_VERSION = (0, 2, 1)
MAX_VERSION = (0, 4, 0)
"""The first torchtitan release not supported (its model API is not known yet)."""
INSTALL_HINT = ('install a supported torchtitan into the environment you export in: pip install "torchtitan>=0.3,<0.4" '
                '(recent torch), or pip install "torchtitan==0.2.1" (older torch images); the exporter reads '
                "checkpoints of both")


def parse_version(text: str) -> tuple[int, int, int] | None:
    """`(major, minor, patch)` of a version string such as `0.3.0`, `0.2.1+cu128` or `0.3.0.dev20260101`."""
    found = re.match(r"(\d+)\.(\d+)(?:\.(\d+))?", text or "")
    if found is None:
        return None
    return int(found.group(1)), int(found.group(2)), int(found.group(3) or 0)


def installed_version() -> str | None:
    """The installed torchtitan's version (its distribution metadata), None when it is not installed."""
    try:
        return importlib.metadata.version("torchtitan")
    except importlib.metadata.PackageNotFoundError:
        return None


_import_started = False
IMPORT_SWITCH_INTERVAL = 0.0002
"""`sys.setswitchinterval` while torchtitan imports in the background (Python's default is 0.005 s)."""


def import_in_background() -> None:
    """Start importing the installed torchtitan's model code (`installed`) on a daemon thread and return at once.

    Its ~2 s of imports (the model code pulls in dynamo and inductor) then overlap the work that does not need
    it: reading `.metadata`, planning, streaming the weights (whose reads and casts leave the interpreter lock
    free). The next `installed()` call waits for it; an error there is raised there, not here.
    """
    import sys
    import threading
    import time

    global _import_started
    if installed.cache_info().currsize or _import_started:  # imported, or importing, for an earlier export
        return
    _import_started = True
    interval = sys.getswitchinterval()

    def run() -> None:
        global _import_started
        began = time.perf_counter()
        try:
            installed()
            logger.info("torchtitan imported in the background in %.2f s", time.perf_counter() - began)
        except Exception:  # noqa: BLE001 - raised again, with its message, by the caller's own installed()
            installed.cache_clear()
        finally:
            _import_started = False
            sys.setswitchinterval(interval)

    # The import holds the interpreter lock almost always; the streaming thread needs it for a moment between
    # each read, cast and write it hands to C. A short switch interval gives it back within 0.2 ms, not 5 ms.
    sys.setswitchinterval(IMPORT_SWITCH_INTERVAL)
    threading.Thread(target=run, name="molgen-import-torchtitan", daemon=True).start()


@functools.lru_cache(maxsize=1)
def installed() -> Titan:
    """The installed torchtitan's API, chosen by its version.

    Raises:
        DependencyError: torchtitan missing, older than 0.2.1, 0.4 or newer, or not importable.
    """
    version = installed_version()
    if version is None:
        raise DependencyError(f"torchtitan is not installed; molgen_export needs {SUPPORTED}", hint=INSTALL_HINT)
    release = parse_version(version)
    if release is None or not MIN_VERSION <= release < MAX_VERSION:
        raise DependencyError(f"torchtitan {version} is installed; molgen_export supports {SUPPORTED} (their Qwen3 "
                              "model and state-dict adapter)", hint=INSTALL_HINT)
    titan = Titan021(version) if release < (0, 3, 0) else Titan03(version)
    try:
        titan.import_check()
    except ImportError as exc:
        raise DependencyError(f"torchtitan {version} is installed but its Qwen3 model does not import "
                              f"({type(exc).__name__}: {exc})", hint=INSTALL_HINT) from exc
    return titan


class Titan:
    """What the export uses of one torchtitan version. Configs are the version's own objects (0.3
    `Qwen3Model.Config`, 0.2.1 `Qwen3ModelArgs`); both are dataclasses with `enable_weight_tying`."""

    release: tuple[int, int, int]

    def __init__(self, version: str):
        self.version = version
        self.release = parse_version(version)

    def import_check(self) -> None:
        raise NotImplementedError

    def model_config(self, arch, *, tie: bool | None = None, fused_qkv: bool = False):
        """The Qwen3 model config of a `Qwen3Arch`, attention as causal SDPA (one process, unpacked sequences)."""
        raise NotImplementedError

    def flavor_config(self, model_name: str | None, flavor: str | None, *, custom_import: str | None = None,
                      launch_dir: Path | None = None):
        """The installed registry's config of a Qwen3 flavor (a fresh copy), None when it has no such flavor."""
        raise NotImplementedError

    def config_dims(self, config) -> ModelDims:
        """The dims a model config states."""
        raise NotImplementedError

    def native_key(self, titan_key: str) -> str:
        """The installed model's name for a canonical (0.3) TorchTitan key."""
        return titan_key

    def state_dict_adapter(self, config):
        """torchtitan's `Qwen3StateDictAdapter` for this config, asked with the head untied (it then maps
        the head too; whether the head is written is the tied-weights check's decision)."""
        raise NotImplementedError

    def build_model(self, config, device: str = "cpu") -> torch.nn.Module:
        """The model of a config on `device`, every parameter and buffer initialized the version's own way."""
        raise NotImplementedError

    def meta_model(self, config) -> torch.nn.Module:
        """The model of a config on the meta device (shapes and names only: what DCP will save)."""
        raise NotImplementedError

    def is_moe(self, config) -> bool:
        raise NotImplementedError

    def shrink_config(self, config, layers: list[int], vocab: int, experts: int | None):
        """A copy of the config cut to `layers`, `vocab` rows and `experts` experts per MoE layer (the probe)."""
        raise NotImplementedError

    def router_class(self) -> type:
        """The MoE router module (its forward returns `(scores, expert ids, ...)`)."""
        raise NotImplementedError

    def float32_experts(self, model: torch.nn.Module) -> None:
        """Make the model's grouped experts compute in float32 (TorchTitan's grouped GEMMs run in bf16)."""

    def model_wrapper_class(self) -> type:
        """The `ModelWrapper` the version's CheckpointManager saves the model through."""
        raise NotImplementedError

    def block(self, config, device: str) -> torch.nn.Module:
        """One transformer block of a dense config (the layer-wise verifier reloads it layer by layer)."""
        raise NotImplementedError

    def block_forward(self, block: torch.nn.Module, hidden: torch.Tensor) -> torch.Tensor:
        raise NotImplementedError

    def final_norm(self, config) -> torch.nn.Module:
        raise NotImplementedError


class Titan03(Titan):
    """torchtitan 0.3: configurable modules (`Qwen3Model.Config`, one config per layer)."""

    def import_check(self) -> None:
        import torchtitan.models.common  # noqa: F401
        import torchtitan.models.qwen3  # noqa: F401

    def model_config(self, arch, *, tie: bool | None = None, fused_qkv: bool = False):
        import torchtitan.models.qwen3 as qwen3
        from torchtitan.models.common import CosSinRoPE, Embedding, Linear
        from torchtitan.models.common.attention import ScaledDotProductAttention

        norm = qwen3.RMSNorm.Config(normalized_shape=arch.dim, eps=arch.norm_eps)
        rope = CosSinRoPE.Config(dim=arch.head_dim, max_seq_len=arch.max_seq_len, theta=arch.rope_theta)
        shared = dict(fuse_qkv=fused_qkv, n_layers=arch.n_layers, dim=arch.dim, n_heads=arch.n_heads,
                      n_kv_heads=arch.n_kv_heads, head_dim=arch.head_dim, attn_backend="flex", rope=rope)
        layers = qwen3._build_qwen3_layers(hidden_dim=arch.hidden_dim, **shared)
        if arch.moe is not None:
            moe_layers = qwen3._build_qwen3_moe_layers(
                moe_hidden_dim=arch.moe.moe_hidden_dim, num_experts=arch.moe.num_experts, top_k=arch.moe.top_k,
                moe_comm_backend="standard", **shared)
            for i in arch.moe.moe_layers:
                layers[i] = moe_layers[i]
                layers[i].moe.router = dataclasses.replace(layers[i].moe.router, route_norm=arch.moe.norm_topk_prob)
        for layer in layers:
            layer.attention_norm = dataclasses.replace(layer.attention_norm, eps=arch.norm_eps)
            layer.ffn_norm = dataclasses.replace(layer.ffn_norm, eps=arch.norm_eps)
            layer.attention.qk_norm = dataclasses.replace(layer.attention.qk_norm, eps=arch.norm_eps)
            # flex attention needs block masks built from document positions; a plain causal SDPA
            # computes the same thing for unpacked sequences and runs anywhere.
            layer.attention.inner_attention = ScaledDotProductAttention.Config()
        return qwen3.Qwen3Model.Config(
            vocab_size=arch.vocab_size, dim=arch.dim, norm=norm,
            enable_weight_tying=arch.tie_word_embeddings if tie is None else tie,
            tok_embeddings=Embedding.Config(num_embeddings=arch.vocab_size, embedding_dim=arch.dim),
            lm_head=Linear.Config(in_features=arch.dim, out_features=arch.vocab_size),
            layers=layers)

    def flavor_config(self, model_name, flavor, *, custom_import=None, launch_dir=None):
        if not flavor or model_name not in (None, "qwen3", "qwen3_moe"):
            return None
        from torchtitan.models.qwen3 import qwen3_configs

        factory = qwen3_configs.get(flavor)
        return factory(attn_backend="flex") if factory is not None else None

    def config_dims(self, config) -> ModelDims:
        return _dims_from_titan03_model(config.to_dict())

    def state_dict_adapter(self, config):
        from torchtitan.models.qwen3 import Qwen3StateDictAdapter

        return Qwen3StateDictAdapter(dataclasses.replace(config, enable_weight_tying=False), None)

    def build_model(self, config, device="cpu"):
        with torch.device("meta"):
            model = config.build()
        model.to_empty(device=device)
        with torch.no_grad():
            model.init_states(buffer_device=torch.device(device))
        return model

    def meta_model(self, config):
        with torch.device("meta"):
            return config.build()

    def is_moe(self, config) -> bool:
        return any(getattr(layer, "moe", None) is not None for layer in config.layers)

    def shrink_config(self, config, layers, vocab, experts):
        config = copy.deepcopy(config)
        config.layers = [config.layers[i] for i in layers]
        config.vocab_size = vocab
        config.tok_embeddings = dataclasses.replace(config.tok_embeddings, num_embeddings=vocab)
        config.lm_head = dataclasses.replace(config.lm_head, out_features=vocab)
        for layer in config.layers:
            moe = getattr(layer, "moe", None)
            if moe is None or experts is None:
                continue
            top_k = min(moe.router.top_k, experts)
            moe.num_experts = experts
            moe.routed_experts.inner_experts.num_experts = experts
            dispatcher = moe.routed_experts.token_dispatcher
            for name, value in (("num_experts", experts), ("top_k", top_k)):
                if hasattr(dispatcher, name):
                    setattr(dispatcher, name, value)
            moe.router.num_experts = experts
            moe.router.top_k = top_k
            moe.router.gate = dataclasses.replace(moe.router.gate, out_features=experts)
        return config

    def router_class(self):
        from torchtitan.models.common.moe import TokenChoiceTopKRouter

        return TokenChoiceTopKRouter

    def float32_experts(self, model):
        import types

        from torchtitan.models.common.moe import GroupedExperts

        for module in model.modules():
            if isinstance(module, GroupedExperts):
                module.forward = types.MethodType(_float32_grouped_experts, module)

    def model_wrapper_class(self):
        from torchtitan.components.checkpointer.base import ModelWrapper

        return ModelWrapper

    def block(self, config, device):
        from torchtitan.models.common.rope import RoPE

        with torch.device("meta"):
            block = config.layers[0].build()
        block.to_empty(device=device)
        for module in block.modules():
            if isinstance(module, RoPE):
                module.init_states(buffer_device=torch.device(device))
        return block.eval()

    def block_forward(self, block, hidden):
        return block(hidden, None, None)

    def final_norm(self, config):
        return config.norm.build()


def _float32_grouped_experts(self, x_RD: torch.Tensor, num_tokens_per_expert_E: torch.Tensor) -> torch.Tensor:
    """TorchTitan 0.3's `GroupedExperts.forward` math, in float32, one expert at a time.

    TorchTitan runs its grouped expert GEMMs in bfloat16 whatever the model dtype; the reference must compute in
    float32 like the rest of the comparison, or bf16 rounding (not a mapping error) dominates the difference.
    """
    outputs = []
    start = 0
    for expert, count in enumerate(num_tokens_per_expert_E.tolist()):
        x = x_RD[start:start + count].float()
        hidden = torch.nn.functional.silu(x @ self.w1_EFD[expert].float().T) * (x @ self.w3_EFD[expert].float().T)
        outputs.append(hidden @ self.w2_EDF[expert].float().T)
        start += count
    if start < x_RD.shape[0]:  # padding rows the dispatcher may add
        outputs.append(torch.zeros(x_RD.shape[0] - start, x_RD.shape[1], dtype=torch.float32, device=x_RD.device))
    return torch.cat(outputs).type_as(x_RD)


# canonical (0.3) key -> torchtitan 0.2.1 model key: the inverse of keymap.RENAME_RULES
_TITAN021_NAMES: tuple[tuple[re.Pattern, str], ...] = (
    (re.compile(r"^(layers\.\d+\.attention)\.qkv_linear\.(wq|wk|wv)\.(weight|bias)$"), r"\1.\2.\3"),
    (re.compile(r"^lm_head\.weight$"), "output.weight"),
    (re.compile(r"^(layers\.\d+\.moe)\.routed_experts\.inner_experts\.w([123])_E(FD|DF)$"), r"\1.experts.w\2"),
    (re.compile(r"^(layers\.\d+\.moe)\.expert_bias_E$"), r"\1.expert_bias"),
    (re.compile(r"^(layers\.\d+\.moe)\.tokens_per_expert(_E)?$"), r"\1.tokens_per_expert"),
)


class Titan021(Titan):
    """torchtitan 0.2.1: `Qwen3ModelArgs` (one set of args for every layer: all MoE or none), `Qwen3Model(args)`,
    0.2 parameter names (`attention.wq`, `output`, `moe.experts.w1`)."""

    def import_check(self) -> None:
        from torchtitan.models.qwen3 import Qwen3Model, Qwen3ModelArgs, qwen3_args  # noqa: F401

    def model_config(self, arch, *, tie: bool | None = None, fused_qkv: bool = False):
        from torchtitan.models.moe import MoEArgs
        from torchtitan.models.qwen3 import Qwen3ModelArgs

        if arch.rope_scaling:
            raise ConfigError(f"the run uses RoPE scaling {arch.rope_scaling.get('rope_type')!r}; torchtitan "
                              f"{self.version}'s Qwen3 has plain RoPE only", hint=INSTALL_HINT)
        moe = arch.moe
        if moe is not None and tuple(moe.moe_layers) != tuple(range(arch.n_layers)):
            raise ConfigError(f"the run mixes dense and MoE layers (MoE layers {list(moe.moe_layers)} of "
                              f"{arch.n_layers}); torchtitan {self.version}'s Qwen3ModelArgs makes every layer MoE "
                              "or none, so it cannot build the verifier's reference",
                              hint='export this run with torchtitan 0.3 installed: pip install "torchtitan>=0.3,<0.4"')
        moe_args = MoEArgs() if moe is None else MoEArgs(
            num_experts=moe.num_experts, num_shared_experts=0, score_func="softmax", route_norm=moe.norm_topk_prob,
            route_scale=1.0, score_before_experts=False, top_k=moe.top_k,
            use_grouped_mm=False)  # 0.2.1's for-loop experts: its grouped-mm path pads with triton kernels (GPU)
        return Qwen3ModelArgs(
            dim=arch.dim, n_layers=arch.n_layers, n_heads=arch.n_heads, n_kv_heads=arch.n_kv_heads,
            vocab_size=arch.vocab_size, head_dim=arch.head_dim, hidden_dim=arch.hidden_dim, norm_eps=arch.norm_eps,
            rope_theta=arch.rope_theta, qk_norm=True, max_seq_len=arch.max_seq_len, attn_type="sdpa",
            enable_weight_tying=arch.tie_word_embeddings if tie is None else tie, moe_enabled=moe is not None,
            moe_inter_dim=moe.moe_hidden_dim if moe is not None else Qwen3ModelArgs.moe_inter_dim, moe_args=moe_args)

    def flavor_config(self, model_name, flavor, *, custom_import=None, launch_dir=None):
        """0.2.1 flavors live in `qwen3_args`. A custom one, registered by the run's `experimental.custom_import`
        module, stays unknown here: that module is the run's code, and the exporter never runs code that comes
        with a checkpoint (the architecture is then read off the shapes, and the report's `reference.source`
        says so)."""
        if not flavor or model_name not in (None, "qwen3", "qwen3_moe"):
            return None
        from torchtitan.models.qwen3 import qwen3_args

        args = qwen3_args.get(flavor)
        return copy.deepcopy(args) if args is not None else None

    def config_dims(self, config) -> ModelDims:
        moe = dict(moe=True, num_experts=config.moe_args.num_experts, top_k=config.moe_args.top_k,
                   moe_hidden_dim=config.moe_inter_dim, route_norm=config.moe_args.route_norm,
                   score_func=config.moe_args.score_func,
                   moe_layers=tuple(range(config.n_layers))) if config.moe_enabled else {}
        return ModelDims(vocab_size=config.vocab_size, dim=config.dim, n_layers=config.n_layers,
                         n_heads=config.n_heads, n_kv_heads=config.n_kv_heads or config.n_heads,
                         head_dim=config.head_dim, hidden_dim=None if config.moe_enabled else config.hidden_dim,
                         norm_eps=config.norm_eps, rope_theta=float(config.rope_theta),
                         max_seq_len=config.max_seq_len, tie_word_embeddings=config.enable_weight_tying,
                         fused_qkv=False, **moe)

    def native_key(self, titan_key: str) -> str:
        for pattern, replacement in _TITAN021_NAMES:
            if pattern.match(titan_key):
                return pattern.sub(replacement, titan_key)
        return titan_key

    def state_dict_adapter(self, config):
        from torchtitan.models.qwen3.model.state_dict_adapter import Qwen3StateDictAdapter

        return Qwen3StateDictAdapter(dataclasses.replace(config, enable_weight_tying=False), None)

    def build_model(self, config, device="cpu"):
        from torchtitan.models.qwen3 import Qwen3Model

        with torch.device("meta"):
            model = Qwen3Model(config)
        model.to_empty(device=device)
        if config.enable_weight_tying:  # 0.2.1 ties in parallelize_qwen3, before init_weights; the model never does
            model.output.weight = model.tok_embeddings.weight
        with torch.no_grad():
            model.init_weights(buffer_device=torch.device(device))
        if config.moe_enabled:
            from torchtitan.models.moe.moe import MoE

            for module in model.modules():
                if isinstance(module, MoE):
                    module.forward = functools.partial(_with_integer_histc, module.forward)
        return model

    def meta_model(self, config):
        from torchtitan.models.qwen3 import Qwen3Model

        with torch.device("meta"):
            return Qwen3Model(config)

    def is_moe(self, config) -> bool:
        return bool(config.moe_enabled)

    def shrink_config(self, config, layers, vocab, experts):
        # every layer alike in 0.2.1: keeping `layers` keeps their count
        moe_args = config.moe_args if experts is None else dataclasses.replace(
            config.moe_args, num_experts=experts, top_k=min(config.moe_args.top_k, experts))
        return dataclasses.replace(copy.deepcopy(config), n_layers=len(layers), vocab_size=vocab, moe_args=moe_args)

    def router_class(self):
        from torchtitan.models.moe.moe import TokenChoiceTopKRouter

        return TokenChoiceTopKRouter

    def float32_experts(self, model):
        from torchtitan.models.moe.moe import GroupedExperts

        for module in model.modules():
            if isinstance(module, GroupedExperts):
                module.use_grouped_mm = False  # 0.2.1's own for-loop path: the weights' dtype (float32)

    def model_wrapper_class(self):
        from torchtitan.components.checkpoint import ModelWrapper

        return ModelWrapper

    def block(self, config, device):
        from torchtitan.models.qwen3.model.model import TransformerBlock, precompute_rope_cache

        with torch.device("meta"):
            block = TransformerBlock(0, config)
        block.to_empty(device=device)
        block.rope_cache = precompute_rope_cache(config.head_dim, config.max_seq_len, config.rope_theta).to(device)
        return block.eval()

    def block_forward(self, block, hidden):
        return block(hidden, block.rope_cache, None, None)

    def final_norm(self, config):
        return torch.nn.RMSNorm(config.dim, eps=config.norm_eps)


def _with_integer_histc(forward, *args, **kwargs):
    """Run a 0.2.1 MoE forward where `torch.histc` also counts integer ids on CPU.

    0.2.1's router and reorderer count tokens per expert with `torch.histc` of the (int64) expert ids, which CPU
    torch does not implement ("histc_cpu not implemented for 'Long'"): on CPU the ids are counted as floats (exact
    for any expert count) and the counts returned in the ids' dtype, as CUDA returns them. Nothing else changes.
    """
    original = torch.histc

    def histc(values, *rest, **options):
        if values.device.type == "cpu" and not values.is_floating_point():
            return original(values.float(), *rest, **options).to(values.dtype)
        return original(values, *rest, **options)

    torch.histc = histc
    try:
        return forward(*args, **kwargs)
    finally:
        torch.histc = original
