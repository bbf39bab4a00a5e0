"""The HF Qwen3 side shared by the conversions: `config.json` as transformers reads it, HF names -> TorchTitan
names through torchtitan's `Qwen3StateDictAdapter.from_hf`, TorchTitan's own state-dict keys, and whether the head
is tied (decided the way transformers decides it)."""

from __future__ import annotations

import dataclasses
import logging
import re
from pathlib import Path

import torch

from molgen_export.mapping import architecture
from molgen_export.verify import checks
from molgen_export.mapping import run_config
from molgen_export.errors import ConfigError, MappingError
from molgen_export.convert.weights_folder import WeightsFolder

logger = logging.getLogger(__name__)

HF_CONFIG_KIND = "hf-config"
"""`RunConfig.kind` of a run config made from an HF `config.json` (no TorchTitan job config involved)."""

SKIPPED_HF_KEYS: tuple[tuple[re.Pattern, str], ...] = (
    # Rotary inverse frequencies: a buffer recomputed from rope_theta that old transformers versions saved.
    (re.compile(r"(^|\.)rotary_emb\.inv_freq$"), "rotary inv_freq buffer"),
)


def read_hf_qwen3_config(folder: Path) -> dict:
    """The folder's `config.json` as transformers resolves it (defaults filled in), checked to be a dense Qwen3.

    Raises:
        ConfigError: missing, not Qwen3, MoE, or a RoPE variant TorchTitan's Qwen3 does not implement.
    """
    from transformers import Qwen3Config

    raw = architecture.read_base_hf_config(folder)
    path = folder / "config.json"
    model_type = raw.get("model_type")
    if model_type != "qwen3":
        raise ConfigError(f"{path} has model_type={model_type!r}; this conversion handles dense Qwen3 (`qwen3`) only",
                          path=path, hint="qwen3_moe and other families are not supported by import-hf yet")
    resolved = Qwen3Config.from_dict({k: v for k, v in raw.items() if k != "transformers_version"}).to_dict()
    rope = resolved.get("rope_parameters") or {}
    if rope.get("rope_type", "default") != "default":
        raise ConfigError(f"{path} uses rope_type={rope.get('rope_type')!r}; TorchTitan's Qwen3 implements plain "
                          "RoPE (CosSinRoPE) only, so the imported model would compute different logits",
                          path=path, hint="import a model with default RoPE")
    return resolved


def hf_run_config(folder: Path, hf_config: dict, dtype: str) -> run_config.RunConfig:
    """A `RunConfig` that says what an HF folder says: no dims of its own (the shapes and `config.json` decide),
    the folder as assets and tokenizer, `dtype` as the training dtype."""
    return run_config.RunConfig(
        source=folder / "config.json", kind=HF_CONFIG_KIND, model_name="qwen3", flavor=None,
        dims=run_config.ModelDims(), seq_len=None, training_dtype=dtype, mixed_precision_param=dtype,
        hf_assets_path=folder, tokenizer_path=folder, keep_latest_k=None, checkpoint_folder=None, launch_dir=None,
        job_config_path=None)


def dtype_name(dtype: torch.dtype) -> str:
    return str(dtype).removeprefix("torch.")


def dominant_dtype(source: WeightsFolder) -> str:
    counts: dict[str, int] = {}
    for entry in source.model.values():
        if entry.dtype.is_floating_point:
            counts[dtype_name(entry.dtype)] = counts.get(dtype_name(entry.dtype), 0) + entry.stored_bytes
    return max(counts, key=counts.get) if counts else "float32"


def map_hf_to_titan(hf_shapes: dict[str, tuple[int, ...]], titan_model_config) -> tuple[dict[str, str], list[str]]:
    """TorchTitan key of every HF key, through torchtitan's `Qwen3StateDictAdapter.from_hf`, one key at a time.

    Returns:
        hf_key -> titan_key, and the HF keys skipped on purpose (rotary `inv_freq` buffers).

    Raises:
        MappingError: HF keys the adapter does not know (a dense Qwen3 has no such tensor), naming each.
    """
    from torchtitan.models.qwen3 import Qwen3StateDictAdapter

    adapter = Qwen3StateDictAdapter(dataclasses.replace(titan_model_config, enable_weight_tying=False), None)
    mapping: dict[str, str] = {}
    skipped: list[str] = []
    unmapped: list[str] = []
    for hf_key, shape in hf_shapes.items():
        if any(pattern.search(hf_key) for pattern, _ in SKIPPED_HF_KEYS):
            skipped.append(hf_key)
            continue
        try:
            produced = adapter.from_hf({hf_key: torch.empty(shape, device="meta")})
        except (KeyError, AssertionError, StopIteration):
            produced = {}
        if len(produced) != 1:
            unmapped.append(hf_key)
            continue
        (titan_key,) = produced
        mapping[hf_key] = titan_key
    if unmapped:
        raise MappingError(f"{len(unmapped)} HF tensor(s) have no TorchTitan Qwen3 parameter: "
                           + ", ".join(sorted(unmapped)[:10]) + (" ..." if len(unmapped) > 10 else ""),
                           hint="the folder holds tensors a dense Qwen3 does not have (another family, MoE, "
                                "biases); nothing was written")
    return mapping, skipped


def check_titan_state(titan_shapes: dict[str, tuple[int, ...]], arch: architecture.Qwen3Arch, *,
                      tie: bool) -> checks.Finding:
    """The keys and shapes equal those of TorchTitan's own Qwen3 state dict (built on the meta device)."""
    config = arch.titan_model_config(tie=tie, fused_qkv=True)
    with torch.device("meta"):
        model = config.build()
    expected = {k: tuple(v.shape) for k, v in model.state_dict().items()}
    problems = [f"missing `{k}`" for k in sorted(set(expected) - set(titan_shapes))]
    problems += [f"unexpected `{k}`" for k in sorted(set(titan_shapes) - set(expected))]
    problems += [f"`{k}` is {list(titan_shapes[k])}, TorchTitan has {list(v)}"
                 for k, v in expected.items() if k in titan_shapes and tuple(titan_shapes[k]) != v]
    if problems:
        return checks.Finding("titan_state", False, "; ".join(problems[:10]))
    return checks.Finding("titan_state", True, f"{len(expected)} tensors = TorchTitan Qwen3's state dict "
                                               "(keys and shapes)")


def decide_tie(source: WeightsFolder, hf_config: dict) -> tuple[bool, checks.Finding]:
    """Whether an HF Qwen3 folder's head is its embedding, as transformers decides it (config first).

    Returns:
        Whether tied, and the finding saying how the head is handled.

    Raises:
        ConfigError: untied without a head, or tied while the file's head differs from the embedding.
    """
    path = source.step_dir / "config.json"
    has_head = "lm_head.weight" in source.model
    if not hf_config.get("tie_word_embeddings"):
        if not has_head:
            raise ConfigError(f"{path} says tie_word_embeddings=false but the weights hold no lm_head.weight, so "
                              "transformers would initialize the head randomly", path=path,
                              hint="set tie_word_embeddings to true if the head is the embedding")
        return False, checks.Finding("tied_weights", True, "untied: lm_head.weight imported as lm_head.weight")
    if not has_head:
        return True, checks.Finding("tied_weights", True, "tied: lm_head.weight := tok_embeddings.weight")
    # the export's tie check, bit for bit (the finding is the import's own; the difference is not measured)
    _, equal = checks.check_tied_weights(source.read("model.embed_tokens.weight"), source.read("lm_head.weight"),
                                         run_says_tied=False)
    if not equal:
        raise ConfigError(f"{path} ties the head to the embedding but the file's lm_head.weight differs from "
                          "model.embed_tokens.weight; transformers ignores the file's head in that case "
                          "(huggingface/transformers#41038), so which head is meant is ambiguous", path=path,
                          hint="set tie_word_embeddings=false if the separate head is the trained one, else drop it")
    return True, checks.Finding("tied_weights", True, "tied: the file's lm_head.weight equals the embedding bit for "
                                                      "bit; TorchTitan lm_head.weight := tok_embeddings.weight")
