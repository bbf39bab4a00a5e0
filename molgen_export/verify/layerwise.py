"""Layer-by-layer logit verification, for models too big to hold twice in float32.

One TorchTitan block and one HF `Qwen3DecoderLayer` are built once and reloaded with each layer's weights in
turn: the TorchTitan block from the checkpoint (read again, rounded to the export dtype), the HF layer from
the safetensors just written. Each side carries its own hidden states from its own embedding lookup; they
are compared after every layer and as logits at the end (the head applied in row blocks), so memory holds a
layer or two, never a model, and a mapping error is reported with the first layer where the two diverge.
While one layer runs, the next one's weights are read on a thread when two layers fit `PREFETCH_BYTES`.
"""

from __future__ import annotations

import json
import logging
import os
import threading
import time
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path
from typing import Protocol

import torch

from molgen_export.mapping.architecture import Qwen3Arch
from molgen_export.errors import VerificationError

logger = logging.getLogger(__name__)

BLOCK_BYTES = 16 << 20
"""Rows copied (or multiplied, for the head) per block: float32 bytes of one block of one side."""
PREFETCH_BYTES = 1 << 30
"""Largest float32 size of two layer pairs (TorchTitan + HF, current + next) for reading ahead."""


class WeightSource(Protocol):
    """Tensors by name, rounded to the export dtype: the TorchTitan side (canonical TorchTitan names)."""

    def fill(self, targets: dict[str, torch.Tensor]) -> None:
        """Copy each named tensor into its (float32) target."""

    def rows(self, key: str, start: int, stop: int) -> torch.Tensor:
        """Rows `start:stop` (dim 0) of a tensor."""


_SAFETENSORS_DTYPES = {"F64": torch.float64, "F32": torch.float32, "F16": torch.float16, "BF16": torch.bfloat16,
                       "I64": torch.int64, "I32": torch.int32, "I16": torch.int16, "I8": torch.int8,
                       "U8": torch.uint8, "BOOL": torch.bool}


def _architecture(hf_dir: Path) -> str:
    """The class `config.json` names (`Qwen3ForCausalLM`, `Qwen3_5MoeForCausalLM`, ...), else `the HF model`."""
    try:
        return json.loads((hf_dir / "config.json").read_text())["architectures"][0]
    except (OSError, ValueError, KeyError, IndexError, TypeError):
        return "the HF model"


class HFWeights:
    """The written folder's tensors, read where their safetensors headers say, in row blocks into the caller's
    tensors.

    `pread` rather than `safe_open`: safetensors maps the files, and every page read through a mapping counts
    in the process's resident memory until it exits (a 16 GB export would show 16 GB). Names, dtypes and shapes
    were already checked through safetensors itself (`fidelity.check_written_tensors`).

    Raises (from its methods):
        VerificationError: a tensor is missing from the files or has another shape.
    """

    def __init__(self, hf_dir: Path, *, model_class: str | None = None):
        """`model_class` names the model in error messages; None: the folder's `config.json` `architectures`."""
        index = hf_dir / "model.safetensors.index.json"
        if index.is_file():
            files = json.loads(index.read_text())["weight_map"]
        else:
            files = {key: "model.safetensors" for key in self._header(hf_dir / "model.safetensors")[1]}
        self.hf_dir = hf_dir
        self.model_class = model_class or _architecture(hf_dir)
        self.files = files
        self._headers: dict[str, tuple[int, dict]] = {}
        self._local = threading.local()

    @staticmethod
    def _header(path: Path) -> tuple[int, dict]:
        with open(path, "rb") as f:
            length = int.from_bytes(f.read(8), "little")
            header = json.loads(f.read(length))
        header.pop("__metadata__", None)
        return 8 + length, header

    def _locate(self, key: str) -> tuple[Path, torch.dtype, tuple[int, ...], int]:
        name = self.files.get(key)
        if name is None:
            raise VerificationError(f"the exported files in {self.hf_dir} lack `{key}`, which {self.model_class} "
                                    "needs", hint=f"the export does not match {self.model_class}; this is a bug, "
                                                  "please report it")
        if name not in self._headers:
            self._headers[name] = self._header(self.hf_dir / name)
        data_start, header = self._headers[name]
        entry = header[key]
        return (self.hf_dir / name, _SAFETENSORS_DTYPES[entry["dtype"]], tuple(entry["shape"]),
                data_start + entry["data_offsets"][0])

    def _read(self, path: Path, offset: int, nbytes: int, buffer: bytearray | None = None) -> bytearray:
        buffer = buffer if buffer is not None else bytearray(nbytes)
        view = memoryview(buffer)[:nbytes]
        fd = os.open(path, os.O_RDONLY)
        try:
            done = 0
            while done < nbytes:
                n = os.preadv(fd, [view[done:]], offset + done)
                if n == 0:
                    raise VerificationError(f"{path} ends before its header says", path=path,
                                            hint="the export is damaged; export again")
                done += n
        finally:
            os.close(fd)
        return buffer

    def fill(self, targets: dict[str, torch.Tensor]) -> None:
        buffer = getattr(self._local, "buffer", None)
        if buffer is None:
            buffer = self._local.buffer = bytearray(BLOCK_BYTES)
        for key, target in targets.items():
            path, dtype, shape, begin = self._locate(key)
            if shape != tuple(target.shape):
                raise VerificationError(f"`{key}` in {self.hf_dir} is {list(shape)}, {self.model_class} needs "
                                        f"{list(target.shape)}",
                                        hint="the export does not match its config.json; this is a bug, please report it")
            rows = shape[0] if shape else 1
            row_bytes = max(1, target.numel() // max(1, rows)) * dtype.itemsize
            step = max(1, len(buffer) // row_bytes)
            flat = target if target.dim() else target.reshape(1)
            for start in range(0, rows, step):
                stop = min(rows, start + step)
                nbytes = (stop - start) * row_bytes
                data = self._read(path, begin + start * row_bytes, nbytes, buffer if nbytes <= len(buffer) else None)
                block = torch.frombuffer(data, dtype=torch.uint8, count=nbytes).view(dtype)
                flat[start:stop].copy_(block.view(flat[start:stop].shape))

    def rows(self, key: str, start: int, stop: int) -> torch.Tensor:
        path, dtype, shape, begin = self._locate(key)
        row_bytes = max(1, int(torch.Size(shape[1:]).numel())) * dtype.itemsize
        nbytes = (stop - start) * row_bytes
        data = self._read(path, begin + start * row_bytes, nbytes)
        return torch.frombuffer(data, dtype=torch.uint8, count=nbytes).view(dtype).view(stop - start, *shape[1:])


def _titan_block(config, device: str) -> torch.nn.Module:
    """One TorchTitan block of the model config (layer-wise mode is for dense models: every block alike)."""
    from molgen_export.mapping import titan

    return titan.installed().block(config, device)


def _hf_layer(hf_config, device: str) -> torch.nn.Module:
    from transformers.models.qwen3.modeling_qwen3 import Qwen3DecoderLayer

    with torch.device("meta"):
        layer = Qwen3DecoderLayer(hf_config, layer_idx=0)
    layer.to_empty(device=device)
    return layer.to(torch.float32).eval()


def _params(module: torch.nn.Module, prefix: str) -> dict[str, torch.Tensor]:
    params = dict(module.named_parameters())
    if set(params) != set(module.state_dict()):  # a fused or tied view would not be filled through its parameter
        raise AssertionError(f"parameters {sorted(params)} differ from state {sorted(module.state_dict())}")
    return {f"{prefix}{name}": param.data for name, param in params.items()}


def _fill_block(titan: WeightSource, block: torch.nn.Module, prefix: str) -> None:
    """Load a TorchTitan block's weights: straight into its parameters, or through `load_state_dict` when its
    state dict names other tensors than its parameters (a fused QKV projection saves wq/wk/wv)."""
    from molgen_export.mapping.keymap import canonical_titan_key

    def canonical(name: str) -> str:  # the installed block's own names (0.2.1: attention.wq) -> canonical
        return canonical_titan_key(f"{prefix}{name}")[0]

    params = dict(block.named_parameters())
    state = block.state_dict()
    if set(params) == set(state):
        titan.fill({canonical(name): param.data for name, param in params.items()})
        return
    targets = {name: torch.empty(tensor.shape, dtype=torch.float32, device=tensor.device)
               for name, tensor in state.items()}
    titan.fill({canonical(name): tensor for name, tensor in targets.items()})
    block.load_state_dict(targets, strict=True)


class _Diff:
    """Running comparison of one named stage (a layer's hidden states, or the logits)."""

    def __init__(self, name: str):
        self.name = name
        self.max_abs_diff = 0.0
        self.scale = 0.0

    def update(self, titan: torch.Tensor, hf: torch.Tensor) -> None:
        self.max_abs_diff = max(self.max_abs_diff, _finite_or_inf((titan - hf).abs().max().item()))
        self.scale = max(self.scale, _finite_or_inf(titan.abs().max().item()))

    def limit(self, tolerance: float) -> float:
        return tolerance * max(1.0, self.scale)

    def to_json(self, tolerance: float) -> dict:
        return {"name": self.name, "max_abs_diff": self.max_abs_diff, "scale": self.scale,
                "passed": self.max_abs_diff <= self.limit(tolerance)}


def embed_both(titan: WeightSource, hf: HFWeights, batches: list[torch.Tensor], device: str
               ) -> tuple[list[torch.Tensor], list[torch.Tensor], _Diff]:
    """Each side's hidden states after the embedding, from its own rows (each id's row read once, float32), and
    the `embedding` stage comparing them."""
    ids = sorted({int(i) for batch in batches for i in batch.reshape(-1).tolist()})
    titan_rows = {i: titan.rows("tok_embeddings.weight", i, i + 1)[0].to(device=device, dtype=torch.float32)
                  for i in ids}
    hf_rows = {i: hf.rows("model.embed_tokens.weight", i, i + 1)[0].to(device=device, dtype=torch.float32)
               for i in ids}
    titan_h = [torch.stack([titan_rows[int(i)] for i in b.reshape(-1)]).reshape(*b.shape, -1) for b in batches]
    hf_h = [torch.stack([hf_rows[int(i)] for i in b.reshape(-1)]).reshape(*b.shape, -1) for b in batches]
    stage = _Diff("embedding")
    for t, h in zip(titan_h, hf_h):
        stage.update(t, h)
    return titan_h, hf_h, stage


def stage_figures(stages: list[_Diff], logits: dict, tolerance: float) -> tuple[list[dict], str | None, float]:
    """The stages' report figures, the first stage beyond tolerance (`logits` when only they are), and the logit
    limit (`tolerance` scaled by the logits' size)."""
    layers = [s.to_json(tolerance) for s in stages]
    first = next((s["name"] for s in layers if not s["passed"]), None)
    limit = tolerance * max(1.0, logits["scale"])
    if first is None and logits["max_abs_diff"] > limit:
        first = "logits"
    return layers, first, limit


def verify_layerwise(arch: Qwen3Arch, titan: WeightSource, hf_dir: Path, batches: list[torch.Tensor], *, tie: bool,
                     vocab_limit: int, tolerance: float, device: str = "cpu", reference=None):
    """Compare the TorchTitan model (weights from `titan`) with the written folder, one layer at a time.

    Args:
        arch: the architecture (the TorchTitan side is built from it; the HF side from the folder's config.json).
        titan: the checkpoint's tensors under canonical TorchTitan names, rounded to the export dtype.
        hf_dir: the written folder.
        batches: token id batches `[B, L]`.
        tie: whether the export tied the head (the TorchTitan reference uses the embedding as head then).
        vocab_limit: logits compared on `[:vocab_limit]`.
        tolerance: relative tolerance: a stage passes when max|Δ| <= tolerance * max(1, max|TorchTitan value|).
        device: where the layers run.
        reference: the torchtitan model config of the TorchTitan side (from the run's own model config); None:
            built from `arch`.

    Returns:
        A `fidelity.FidelityResult` with `mode="layerwise"`, per-stage figures and the first diverging stage.

    Raises:
        VerificationError: the written files lack a tensor or have a wrong shape.
    """
    from transformers import AutoConfig
    from transformers.models.qwen3.modeling_qwen3 import Qwen3RMSNorm, Qwen3RotaryEmbedding

    from molgen_export.verify.logit_gate import FidelityResult, titan_config

    titan_model_config = titan_config(reference if reference is not None else arch, tie=tie)
    from molgen_export.mapping import titan as titan_api

    api = titan_api.installed()
    began = time.perf_counter()
    hf_config = AutoConfig.from_pretrained(hf_dir)
    hf_config._attn_implementation = "sdpa"
    hf = HFWeights(hf_dir)
    layer_bytes = layer_params(arch) * 4
    prefetch = 4 * layer_bytes <= PREFETCH_BYTES
    sets = [(_titan_block(titan_model_config, device), _hf_layer(hf_config, device))
            for _ in range(2 if prefetch else 1)]

    def load(layer: int, which: int) -> None:
        titan_block, hf_layer = sets[which]
        _fill_block(titan, titan_block, f"layers.{layer}.")
        hf.fill(_params(hf_layer, f"model.layers.{layer}."))

    stages: list[_Diff] = []
    with torch.no_grad(), ThreadPoolExecutor(max_workers=1, thread_name_prefix="molgen-verify") as pool:
        pending = pool.submit(load, 0, 0)
        titan_h, hf_h, stage = embed_both(titan, hf, batches, device)
        stages.append(stage)
        rotary = Qwen3RotaryEmbedding(hf_config).to(device)
        positions = [torch.arange(b.shape[1], device=device).unsqueeze(0).expand(b.shape[0], -1) for b in batches]
        rope = [rotary(h, p) for h, p in zip(hf_h, positions)]
        for layer in range(arch.n_layers):
            pending.result()
            which = layer % len(sets)
            if layer + 1 < arch.n_layers:
                if prefetch:
                    pending = pool.submit(load, layer + 1, (layer + 1) % len(sets))
            titan_block, hf_layer = sets[which]
            stage = _Diff(f"layer {layer}")
            for b in range(len(batches)):
                titan_h[b] = api.block_forward(titan_block, titan_h[b])
                out = hf_layer(hf_h[b], attention_mask=None, position_ids=positions[b], position_embeddings=rope[b])
                hf_h[b] = out[0] if isinstance(out, tuple) else out
                stage.update(titan_h[b], hf_h[b])
            stages.append(stage)
            if layer + 1 < arch.n_layers and not prefetch:
                pending = pool.submit(load, layer + 1, 0)
        sets.clear()
        titan_norm = api.final_norm(titan_model_config).to(device)
        hf_norm = Qwen3RMSNorm(hf_config.hidden_size, eps=hf_config.rms_norm_eps).to(device)
        titan.fill({"norm.weight": titan_norm.weight.data})
        hf.fill({"model.norm.weight": hf_norm.weight.data})
        titan_n = [titan_norm(h) for h in titan_h]
        hf_n = [hf_norm(h) for h in hf_h]
        logits = _compare_head(titan, hf, titan_n, hf_n, vocab_limit, device, arch,
                               titan_head="tok_embeddings.weight" if tie else "lm_head.weight",
                               hf_head="model.embed_tokens.weight" if hf_config.tie_word_embeddings else "lm_head.weight")
    layers, first, limit = stage_figures(stages, logits, tolerance)
    tokens = sum(b.numel() for b in batches)
    logger.info("layer-wise verification: %d layers in %.1f s%s", arch.n_layers, time.perf_counter() - began,
                f"; first divergence: {first}" if first else "")
    return FidelityResult(max_abs_diff=logits["max_abs_diff"], mean_abs_diff=logits["sum_abs_diff"] / max(1, logits["count"]),
                          top1_agreement=logits["agree"] / max(1, tokens), logit_scale=logits["scale"], tolerance=limit,
                          tokens=tokens, sequences=sum(b.shape[0] for b in batches), device=device,
                          passed=first is None, mode="layerwise", stages=layers, first_divergence=first)


def _finite_or_inf(value: float) -> float:
    """NaN as +inf, so that `max` keeps it (Python's max drops a NaN that comes second)."""
    return float("inf") if value != value else value


def layer_params(arch: Qwen3Arch) -> int:
    """Parameters of one dense TorchTitan Qwen3 block."""
    attention = arch.dim * arch.head_dim * (2 * arch.n_heads + 2 * arch.n_kv_heads) + 2 * arch.head_dim
    return attention + 3 * arch.dim * arch.hidden_dim + 2 * arch.dim


def _compare_head(titan: WeightSource, hf: HFWeights, titan_n: list[torch.Tensor], hf_n: list[torch.Tensor],
                  vocab_limit: int, device: str, arch: Qwen3Arch, *, titan_head: str, hf_head: str) -> dict:
    """Logits `[:vocab_limit]` in row blocks of the head: max/sum |Δ|, scale and top-1 agreement."""
    step = max(1, BLOCK_BYTES // (arch.dim * 4))
    best = [[(torch.full(h.shape[:-1], float("-inf"), device=device), torch.zeros(h.shape[:-1], dtype=torch.long,
                                                                                   device=device)) for h in side]
            for side in (titan_n, hf_n)]
    result = {"max_abs_diff": 0.0, "sum_abs_diff": 0.0, "count": 0, "scale": 0.0, "agree": 0}
    for start in range(0, vocab_limit, step):
        stop = min(vocab_limit, start + step)
        titan_w = titan.rows(titan_head, start, stop).to(device=device, dtype=torch.float32)
        hf_w = hf.rows(hf_head, start, stop).to(device=device, dtype=torch.float32)
        for b, (t, h) in enumerate(zip(titan_n, hf_n)):
            titan_logits = torch.nn.functional.linear(t, titan_w)
            hf_logits = torch.nn.functional.linear(h, hf_w)
            diff = (titan_logits - hf_logits).abs()
            result["max_abs_diff"] = max(result["max_abs_diff"], _finite_or_inf(diff.max().item()))
            result["sum_abs_diff"] += diff.sum().item()
            result["count"] += diff.numel()
            result["scale"] = max(result["scale"], _finite_or_inf(titan_logits.abs().max().item()))
            for side, logits in ((0, titan_logits), (1, hf_logits)):
                value, index = logits.max(dim=-1)
                old_value, old_index = best[side][b]
                better = value > old_value
                best[side][b] = (torch.where(better, value, old_value), torch.where(better, index + start, old_index))
    result["agree"] = sum(int((t[1] == h[1]).sum()) for t, h in zip(best[0], best[1]))
    return result
