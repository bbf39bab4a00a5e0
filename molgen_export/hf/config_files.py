"""The HF side of the export: Qwen3 `config.json` / `generation_config.json` from the base assets and the
resolved architecture, and the tokenizer files to copy verbatim."""

from __future__ import annotations

import functools
import json
import logging
from pathlib import Path

from molgen_export.mapping.architecture import Qwen3Arch
from molgen_export.errors import ConfigError

logger = logging.getLogger(__name__)

TOKENIZER_FILES = ("tokenizer.json", "tokenizer_config.json", "special_tokens_map.json", "vocab.json",
                   "merges.txt", "added_tokens.json", "tokenizer.model", "chat_template.jinja", "chat_template.json")
"""Files copied byte for byte from the base assets (an allow-list: nothing else is ever copied)."""

# Fields of the base config.json that describe the architecture: always overwritten from the checkpoint.
_ARCH_FIELDS = ("vocab_size", "hidden_size", "intermediate_size", "num_hidden_layers", "num_attention_heads",
                "num_key_value_heads", "head_dim", "rms_norm_eps", "rope_theta", "rope_parameters",
                "max_position_embeddings", "tie_word_embeddings", "torch_dtype", "dtype", "architectures",
                "model_type", "layer_types", "max_window_layers", "use_sliding_window", "sliding_window",
                "num_experts", "num_experts_per_tok", "moe_intermediate_size", "norm_topk_prob",
                "decoder_sparse_step", "mlp_only_layers",
                "num_local_experts")  # transformers 5's on-disk name for num_experts: a base's would win on load


def build_hf_config(base: dict, arch: Qwen3Arch, *, tie: bool, dtype: str) -> dict:
    """The exported `config.json`: the base assets' config as template, architecture from the checkpoint.

    RoPE as HF's Qwen3 configs state it (`rope_theta`, `rope_scaling` null or the run's YaRN), which transformers
    4 and 5 and vLLM read alike; `head_dim`, `tie_word_embeddings` and both `dtype`/`torch_dtype` explicitly.
    The base config's own RoPE scaling is never carried over: the run's RoPE is the one that was trained.
    """
    config = {k: v for k, v in base.items() if k not in _ARCH_FIELDS and k != "rope_scaling" and not k.startswith("_")}
    config.pop("transformers_version", None)
    max_positions = max(arch.max_seq_len, int(base.get("max_position_embeddings") or 0))
    config.update({
        "architectures": ["Qwen3ForCausalLM"],
        "model_type": "qwen3",
        "vocab_size": arch.vocab_size,
        "hidden_size": arch.dim,
        "intermediate_size": arch.hidden_dim,
        "num_hidden_layers": arch.n_layers,
        "num_attention_heads": arch.n_heads,
        "num_key_value_heads": arch.n_kv_heads,
        "head_dim": arch.head_dim,
        "hidden_act": base.get("hidden_act", "silu"),
        "rms_norm_eps": arch.norm_eps,
        "rope_theta": arch.rope_theta,
        # as HF's own Qwen3 configs write it: `rope_scaling` null for plain RoPE (a "default" rope_type makes
        # llama.cpp's converter warn), the scaling dict for YaRN; transformers 5 reads both into rope_parameters
        "rope_scaling": dict(arch.rope_scaling) if arch.rope_scaling else None,
        "max_position_embeddings": max_positions,
        "tie_word_embeddings": tie,
        "attention_bias": False,
        "use_sliding_window": False,
        "max_window_layers": arch.n_layers,
        "layer_types": ["full_attention"] * arch.n_layers,
        "dtype": dtype,
        "torch_dtype": dtype,
    })
    if arch.moe is not None:
        config.update({
            "architectures": ["Qwen3MoeForCausalLM"],
            "model_type": "qwen3_moe",
            "num_experts": arch.moe.num_experts,
            "num_experts_per_tok": arch.moe.top_k,
            "moe_intermediate_size": arch.moe.moe_hidden_dim,
            "norm_topk_prob": arch.moe.norm_topk_prob,
            "decoder_sparse_step": 1,
            "mlp_only_layers": [i for i in range(arch.n_layers) if i not in arch.moe.moe_layers],
            "output_router_logits": False,
            "router_aux_loss_coef": base.get("router_aux_loss_coef", 0.001),
        })
    return dict(sorted(config.items()))


def build_generation_config(base_assets: Path, hf_config: dict) -> dict:
    """`generation_config.json`: the base assets' one when present, else the token ids from the config."""
    path = base_assets / "generation_config.json"
    if path.is_file():
        try:
            generation = json.loads(path.read_text())
        except ValueError as exc:
            raise ConfigError(f"{path} is not valid JSON: {exc}", path=path) from exc
    else:
        generation = {}
    for key in ("bos_token_id", "eos_token_id", "pad_token_id"):
        if key not in generation and hf_config.get(key) is not None:
            generation[key] = hf_config[key]
    generation.pop("transformers_version", None)
    return dict(sorted(generation.items()))


def tokenizer_files(base_assets: Path) -> list[Path]:
    """The allow-listed tokenizer files present in the base assets; refuses links leaving the folder.

    Raises:
        ConfigError: no tokenizer files, or a file that resolves outside the assets folder.
    """
    root = base_assets.resolve()
    found = []
    for name in TOKENIZER_FILES:
        path = base_assets / name
        if not path.exists():
            continue
        real = path.resolve()
        if not real.is_relative_to(root) or not real.is_file():
            raise ConfigError(f"tokenizer file {path} points outside the assets folder {root} (to {real})",
                              path=path, hint="copy the real file into the assets folder instead of linking it")
        found.append(path)
    if not any(p.name in ("tokenizer.json", "tokenizer.model", "vocab.json") for p in found):
        raise ConfigError(f"the base assets folder {base_assets} has no tokenizer (tokenizer.json, vocab.json or "
                          "tokenizer.model)", path=base_assets,
                          hint="point hf_assets_path (or --hf-assets) at the folder holding the run's tokenizer")
    return found


def _vocab(path: Path) -> dict[str, int]:
    """Token -> id of a `tokenizer.json`, added tokens included; parsed once per file version (Qwen3's 151k-entry
    vocabulary takes a few hundred ms, and an export asks twice: its size, then the special tokens' ids)."""
    stat = path.stat()
    return _vocab_of(str(path.resolve()), stat.st_mtime_ns, stat.st_size)


@functools.lru_cache(maxsize=4)
def _vocab_of(path: str, mtime_ns: int, size: int) -> dict[str, int]:
    from tokenizers import Tokenizer

    return Tokenizer.from_file(path).get_vocab(with_added_tokens=True)


def tokenizer_size(base_assets: Path) -> int | None:
    """Number of token ids the tokenizer can produce (vocabulary plus added tokens), or None if unknown."""
    path = base_assets / "tokenizer.json"
    if not path.is_file():
        return None
    ids = set(_vocab(path).values())
    return max(ids) + 1 if ids else 0


def special_token_ids(base_assets: Path) -> dict[str, int | None]:
    """bos/eos/pad ids as the tokenizer defines them (from tokenizer_config.json + tokenizer.json)."""
    config_path = base_assets / "tokenizer_config.json"
    vocab_path = base_assets / "tokenizer.json"
    if not config_path.is_file() or not vocab_path.is_file():
        return {}
    config = json.loads(config_path.read_text())
    vocab = _vocab(vocab_path)
    ids = {}
    for role in ("bos", "eos", "pad"):
        token = config.get(f"{role}_token")
        if isinstance(token, dict):
            token = token.get("content")
        ids[f"{role}_token_id"] = vocab.get(token) if token else None
    return ids


def reconcile_special_tokens(hf_config: dict, generation: dict, tokenizer_ids: dict[str, int | None]) -> list[str]:
    """Make bos/eos/pad agree across config.json, generation_config.json and the tokenizer (the tokenizer wins).

    Mutates both dicts; returns one warning per field that was changed.
    """
    warnings = []
    for key, token_id in tokenizer_ids.items():
        if token_id is None:
            continue
        for label, target in (("config.json", hf_config), ("generation_config.json", generation)):
            current = target.get(key)
            if current is None or current == token_id:
                target[key] = current if current is not None else token_id
                continue
            if isinstance(current, list) and token_id in current:
                continue
            warnings.append(f"{label} {key}={current} disagrees with the tokenizer's {token_id}; wrote {token_id}")
            target[key] = token_id
    return warnings
