"""Logit verification: the TorchTitan Qwen3 model (weights from the checkpoint) against the HF model loaded from
the files just written, on the same tokens, in float32 from the same rounded weights.

Small models are compared whole (`verify_logits`: TorchTitan model vs `AutoModelForCausalLM.from_pretrained`);
bigger ones layer by layer (`verify/layerwise.py`), so verification never holds two whole models;
`verify/gate.py` picks the path.
"""

from __future__ import annotations

import logging
import math
from dataclasses import asdict, dataclass, field
from pathlib import Path

import torch

from molgen_export.mapping.architecture import Qwen3Arch
from molgen_export.errors import VerificationError

logger = logging.getLogger(__name__)

ROUTING_MIN_AGREEMENT = 0.9
"""Least share of tokens, per MoE layer, that both sides must route to the same experts. Not 1: a token whose
router scores nearly tie may go elsewhere after rounding; a permuted expert mapping gives about top_k / E."""

MOE_TOLERANCE_FACTOR = 2
"""MoE exports (Qwen3 and Qwen3.5) are compared with this many times `logits_atol`: expert outputs are summed in
another order (grouped GEMMs vs per-expert loops), and a token whose router scores nearly tie may pick another
expert."""

PROMPT = "The quick brown fox jumps over the lazy dog. CC(=O)Oc1ccccc1C(=O)O"
"""One real prompt tokenized by the exported tokenizer, beside random ids, so tokenizer mistakes surface."""


@dataclass(frozen=True)
class FidelityResult:
    """Figures of the logit comparison (float32, logits restricted to the tokenizer's ids)."""

    max_abs_diff: float
    mean_abs_diff: float
    top1_agreement: float
    logit_scale: float
    """max|logit| of the TorchTitan model: the tolerance is relative to it."""
    tolerance: float
    tokens: int
    sequences: int
    device: str
    passed: bool
    mode: str = "whole"
    """`whole` (both models built whole) or `layerwise` (one layer of each at a time)."""
    stages: list[dict] = field(default_factory=list)
    """Layer-wise only: per stage (`embedding`, `layer N`) max|Δ| of the hidden states, their scale, pass/fail."""
    first_divergence: str | None = None
    """Layer-wise only: the first stage (or `logits`) beyond tolerance, None when all agree."""
    routing: list[dict] = field(default_factory=list)
    """MoE only: per MoE layer, the share of tokens both sides send to the same set of experts."""
    routing_agreement: float | None = None
    """MoE only: the lowest per-layer routing agreement."""
    probe: dict | None = None
    """The random-weight mapping probe's figures (see `probe.run_probe`)."""

    def to_json(self) -> dict:
        return asdict(self)


def fixed_token_batch(vocab_limit: int, *, batch: int = 2, length: int = 32, seed: int = 1234) -> torch.Tensor:
    """A reproducible batch of random token ids below `vocab_limit`."""
    generator = torch.Generator().manual_seed(seed)
    return torch.randint(0, vocab_limit, (batch, length), generator=generator)


def titan_config(model: Qwen3Arch | object, *, tie: bool):
    """A torchtitan model config with the head tied or not: `model` is a torchtitan config (the verifier's
    reference, from the run's own model config) or, for conversions with no run config, a `Qwen3Arch`."""
    import dataclasses

    if isinstance(model, Qwen3Arch):
        return model.titan_model_config(tie=tie)
    return dataclasses.replace(model, enable_weight_tying=tie)


def build_titan_model(model: Qwen3Arch | object, titan_state: dict[str, torch.Tensor], *, tie: bool,
                      device: str = "cpu") -> torch.nn.Module:
    """The TorchTitan Qwen3 model with these weights, in float32.

    Args:
        model: the torchtitan model config (see `titan_config`), or a `Qwen3Arch`.

    `load_state_dict` is used (not copies into `state_dict()` tensors) so a fused QKV parameter would be updated.
    """
    from molgen_export.mapping import titan as titan_api

    api = titan_api.installed()
    config = titan_config(model, tie=tie)
    model = api.build_model(config, device)
    state = {k: v.to(device=device, dtype=torch.float32) for k, v in titan_state.items()}
    if tie:
        state.setdefault("lm_head.weight", state["tok_embeddings.weight"])
    state = {api.native_key(k): v for k, v in state.items()}  # the installed model's own names
    for key, buffer in model.state_dict().items():
        # the MoE load-balancing bias is not exported (HF routes without it): the reference routes without it
        # too; a non-zero bias was refused or recorded before we got here (checks.check_expert_bias)
        if key.endswith(("moe.expert_bias_E", "moe.expert_bias")) and key not in state:
            state[key] = torch.zeros_like(buffer)
    model.load_state_dict(state, strict=True)
    if api.is_moe(config):
        api.float32_experts(model)
    return model.eval()


def load_hf_model(hf_dir: Path, device: str = "cpu") -> torch.nn.Module:
    """Load the exported folder the way users will, refusing any missing or unexpected key.

    Raises:
        VerificationError: transformers reports missing, unexpected or mismatched keys.
    """
    from transformers import AutoModelForCausalLM
    from transformers.utils import logging as hf_logging

    hf_logging.disable_progress_bar()
    model, info = AutoModelForCausalLM.from_pretrained(hf_dir, dtype=torch.float32, output_loading_info=True,
                                                       attn_implementation="sdpa")
    problems = {k: v for k, v in info.items() if v and k in ("missing_keys", "unexpected_keys", "mismatched_keys")}
    if problems:
        raise VerificationError(f"transformers loaded {hf_dir} with {problems}",
                                hint="the export does not match Qwen3ForCausalLM; this is a bug, please report it")
    return model.to(device).eval()


def compare_logits(titan_model: torch.nn.Module, hf_model: torch.nn.Module, token_batches: list[torch.Tensor],
                   vocab_limit: int, *, tolerance: float, device: str = "cpu") -> FidelityResult:
    """Run both models on each batch and compare logits on `[:vocab_limit]`."""
    max_diff = 0.0
    total_diff = 0.0
    count = 0
    agree = 0
    positions = 0
    scale = 0.0
    sequences = 0
    with torch.no_grad():
        for tokens in token_batches:
            tokens = tokens.to(device)
            titan_logits = titan_model(tokens).float()[..., :vocab_limit]
            hf_logits = hf_model(input_ids=tokens).logits.float()[..., :vocab_limit]
            diff = (titan_logits - hf_logits).abs()
            batch_max = diff.max().item()
            # Python's max() would drop a NaN (max(0.0, nan) == 0.0): NaN logits must fail, not pass
            max_diff = batch_max if math.isnan(batch_max) else max(max_diff, batch_max)
            total_diff += diff.sum().item()
            count += diff.numel()
            agree += (titan_logits.argmax(-1) == hf_logits.argmax(-1)).sum().item()
            positions += tokens.numel()
            scale = max(scale, titan_logits.abs().max().item())
            sequences += tokens.shape[0]
    limit = tolerance * max(1.0, scale)
    return FidelityResult(max_abs_diff=max_diff, mean_abs_diff=total_diff / max(count, 1),
                          top1_agreement=agree / max(positions, 1), logit_scale=scale, tolerance=limit,
                          tokens=positions, sequences=sequences, device=device, passed=max_diff <= limit)


class RoutingRecorder:
    """Records, per MoE layer, the experts each side routes every token to, and their agreement.

    TorchTitan's router returns `(scores, expert ids, all scores)`; HF's Qwen3-MoE gate returns
    `(logits, scores, expert ids)` (transformers 5) or the logits alone (transformers 4: top-k of their softmax).
    A mapping that permutes experts sends tokens elsewhere even when the logits happen to stay close.
    """

    def __init__(self, titan_model: torch.nn.Module, hf_model: torch.nn.Module):
        from molgen_export.mapping import titan

        router = titan.installed().router_class()
        self.titan_routers = [m for m in titan_model.modules() if isinstance(m, router)]
        self.hf_gates = [m.gate for m in hf_model.modules() if type(m).__name__.endswith("SparseMoeBlock")]
        self.picks: tuple[list[list[torch.Tensor]], list[list[torch.Tensor]]] = ([], [])
        self.layers: list[dict] = []
        self._handles = []

    def __enter__(self):
        if len(self.titan_routers) != len(self.hf_gates):
            raise VerificationError(f"the TorchTitan model has {len(self.titan_routers)} MoE layers, the exported HF "
                                    f"model {len(self.hf_gates)}", hint="the export's mlp_only_layers are wrong")
        for side, modules in ((0, self.titan_routers), (1, self.hf_gates)):
            for index, module in enumerate(modules):
                self.picks[side].append([])
                self._handles.append(module.register_forward_hook(self._hook(side, index)))
        return self

    def _hook(self, side: int, index: int):
        def record(module, args, output):
            if side == 0:
                ids = output[1]
            elif isinstance(output, tuple):
                ids = output[2]
            else:
                ids = torch.topk(torch.softmax(output.float(), dim=-1), module.top_k if hasattr(module, "top_k")
                                 else self._top_k(), dim=-1).indices
            self.picks[side][index].append(ids.reshape(-1, ids.shape[-1]).detach().cpu())
        return record

    def _top_k(self) -> int:
        return self.titan_routers[0].top_k

    def __exit__(self, *exc) -> None:
        for handle in self._handles:
            handle.remove()
        for index, (titan, hf) in enumerate(zip(*self.picks)):
            t = torch.cat(titan).sort(dim=-1).values
            h = torch.cat(hf).sort(dim=-1).values
            same = (t == h).all(dim=-1) if t.shape == h.shape else torch.zeros(1, dtype=torch.bool)
            self.layers.append({"moe_layer": index, "tokens": int(t.shape[0]),
                                "same_experts": round(float(same.float().mean()), 6)})

    def apply(self, result: FidelityResult, *, min_agreement: float = ROUTING_MIN_AGREEMENT) -> FidelityResult:
        """The result with routing figures attached; failed when a layer's agreement is below `min_agreement`."""
        worst = min(layer["same_experts"] for layer in self.layers)
        import dataclasses

        return dataclasses.replace(result, routing=self.layers, routing_agreement=worst,
                                   passed=result.passed and worst >= min_agreement)


def prompt_tokens(hf_dir: Path) -> torch.Tensor:
    """The fixed prompt tokenized by the exported tokenizer loaded through `AutoTokenizer`.

    Raises:
        VerificationError: the exported tokenizer does not load.
    """
    from transformers import AutoTokenizer

    try:
        tokenizer = AutoTokenizer.from_pretrained(hf_dir)
    except Exception as exc:
        raise VerificationError(f"AutoTokenizer cannot load the tokenizer in {hf_dir}: {exc}",
                                hint="check the tokenizer files in the base assets folder") from exc
    ids = tokenizer(PROMPT, return_tensors="pt")["input_ids"]
    return ids


def verify_logits(arch: Qwen3Arch, titan_state: dict[str, torch.Tensor], hf_dir: Path, *, tie: bool,
                  vocab_limit: int, tolerance: float, device: str = "cpu", reference=None) -> FidelityResult:
    """Build both models and compare them on 2 x 32 random ids plus one real tokenized prompt."""
    titan_model = build_titan_model(reference if reference is not None else arch, titan_state, tie=tie, device=device)
    hf_model = load_hf_model(hf_dir, device)
    batches = [fixed_token_batch(vocab_limit)]
    prompt = prompt_tokens(hf_dir)
    if prompt.numel() and int(prompt.max()) < arch.vocab_size:
        batches.append(prompt)
    with RoutingRecorder(titan_model, hf_model) as routing:
        result = compare_logits(titan_model, hf_model, batches, vocab_limit, tolerance=tolerance, device=device)
    if routing.layers:
        result = routing.apply(result)
    logger.info("logits: max|Δ| %.3g mean|Δ| %.3g top-1 %.4f over %d tokens", result.max_abs_diff,
                result.mean_abs_diff, result.top1_agreement, result.tokens)
    return result


def check_written_tensors(hf_dir: Path, planned: dict):
    """Re-open the written safetensors files and check names, dtypes, shapes and the `format: pt` header.

    Args:
        hf_dir: the folder just written.
        planned: hf_key -> object with `.dtype` and `.shape` (what was meant to be written).

    Returns:
        A `checks.Finding` named `written_files`.
    """
    import json as _json

    from safetensors import safe_open

    from molgen_export.verify.checks import Finding

    index = hf_dir / "model.safetensors.index.json"
    files = sorted({*(_json.loads(index.read_text())["weight_map"].values())}) if index.is_file() else ["model.safetensors"]
    seen: dict[str, tuple] = {}
    problems = []
    for name in files:
        with safe_open(hf_dir / name, framework="pt") as handle:
            if (handle.metadata() or {}).get("format") != "pt":
                problems.append(f"{name} header lacks format=pt")
            for key in handle.keys():
                sl = handle.get_slice(key)
                seen[key] = (sl.get_dtype(), tuple(sl.get_shape()))
    dtype_codes = {"torch.bfloat16": "BF16", "torch.float16": "F16", "torch.float32": "F32"}
    for key, want in planned.items():
        got = seen.get(key)
        if got is None:
            problems.append(f"`{key}` missing from the files")
        elif got != (dtype_codes.get(str(want.dtype), str(want.dtype)), tuple(want.shape)):
            problems.append(f"`{key}` written as {got[0]} {list(got[1])}, planned {want.dtype} {list(want.shape)}")
    extra = sorted(set(seen) - set(planned))
    if extra:
        problems.append(f"unplanned tensors in the files: {extra[:5]}")
    if problems:
        return Finding("written_files", False, "; ".join(problems[:10]))
    dtypes = sorted({v[0] for v in seen.values()})
    return Finding("written_files", True, f"{len(seen)} tensors in {len(files)} file(s) re-read: names, shapes and "
                                          f"dtype {','.join(dtypes)} as planned")
