"""HF Qwen3 -> per-layer arrays for JAX/NumPy, and the loader for them.

One safetensors file per decoder layer plus `embeddings.safetensors` (embedding, final norm, head), written with
`safetensors.numpy`: raw arrays and a JSON header, so loading can never run code (no pickle anywhere). Linear
weights become `[in, out]` kernels (`W.T`, made contiguous); the embedding stays `[vocab, dim]`; norms are `[dim]`
(q/k norms `[head_dim]`). `manifest.json` records the layout, shapes, dtype and the model's dims.

The conversion streams: one layer's tensors are in memory at a time, each read alone from the source files.
NumPy has no bfloat16: `--dtype bfloat16` writes BF16 arrays that load as `ml_dtypes.bfloat16` (ml_dtypes ships
with JAX; plain-NumPy readers without it must use the float32 default). float16 is not offered: its range
(+-65504) can overflow, and JAX computes in bfloat16 or float32.
"""

from __future__ import annotations

import json
import logging
import time
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
import torch

from molgen_export.mapping import architecture
from molgen_export.verify import checks
from molgen_export.pipeline.timing import Timer
from molgen_export.mapping import keymap
from molgen_export.hf import publish
from molgen_export.hf.publish import staged_output
from molgen_export.errors import CheckpointFormatError, MappingError, UsageError
from molgen_export.convert.weights_folder import open_weights_folder
from molgen_export.convert.hf_qwen3 import SKIPPED_HF_KEYS, decide_tie, read_hf_qwen3_config

logger = logging.getLogger(__name__)

FORMAT = "molgen_export.jax_arrays/1"
MANIFEST = "manifest.json"
TOP_FILE = "embeddings.safetensors"
LAYER_FILE = "layer_{:05d}.safetensors"
DTYPES = ("float32", "bfloat16")

# (HF name under `model.layers.N.`, array path in the layer file, transposed to an [in, out] kernel)
LAYER_ARRAYS: tuple[tuple[str, str, bool], ...] = (
    ("self_attn.q_proj.weight", "attention/wq", True),  # [dim, n_heads * head_dim]
    ("self_attn.k_proj.weight", "attention/wk", True),  # [dim, n_kv_heads * head_dim]
    ("self_attn.v_proj.weight", "attention/wv", True),  # [dim, n_kv_heads * head_dim]
    ("self_attn.o_proj.weight", "attention/wo", True),  # [n_heads * head_dim, dim]
    ("self_attn.q_norm.weight", "attention/q_norm", False),  # [head_dim], per head, before RoPE
    ("self_attn.k_norm.weight", "attention/k_norm", False),  # [head_dim], per head, before RoPE
    ("mlp.gate_proj.weight", "feed_forward/w1", True),  # [dim, hidden]: silu(x @ w1)
    ("mlp.down_proj.weight", "feed_forward/w2", True),  # [hidden, dim]
    ("mlp.up_proj.weight", "feed_forward/w3", True),  # [dim, hidden]: (silu(x @ w1) * (x @ w3)) @ w2
    ("input_layernorm.weight", "attention_norm", False),  # [dim], RMSNorm before attention
    ("post_attention_layernorm.weight", "ffn_norm", False),  # [dim], RMSNorm before the MLP
)

# (HF name, array path in embeddings.safetensors, transposed)
TOP_ARRAYS: tuple[tuple[str, str, bool], ...] = (
    ("model.embed_tokens.weight", "tok_embeddings", False),  # [vocab, dim]: rows are looked up, not multiplied
    ("model.norm.weight", "norm", False),  # [dim], final RMSNorm
    ("lm_head.weight", "lm_head", True),  # [dim, vocab] kernel; absent when tied (use tok_embeddings.T)
)


@dataclass(frozen=True)
class JaxArraysReport:
    """What `write_jax_arrays` wrote."""

    source_dir: str
    output_dir: str
    dtype: str
    n_layers: int
    tied: bool
    arrays: int
    output_bytes: int
    files: tuple[str, ...]
    findings: tuple[dict, ...]
    timings: dict[str, float] = field(default_factory=dict)

    def to_json(self) -> dict:
        return asdict(self)


def _to_numpy(tensor: torch.Tensor, dtype: str, transpose: bool) -> np.ndarray:
    if dtype == "bfloat16":
        import ml_dtypes

        array = tensor.to(torch.bfloat16).contiguous().view(torch.int16).numpy().view(ml_dtypes.bfloat16)
    else:
        array = tensor.to(torch.float32).numpy()
    return np.ascontiguousarray(array.T if transpose else array)


def write_jax_arrays(hf_dir: Path, output_dir: Path, *, dtype: str = "float32", force: bool = False) -> JaxArraysReport:
    """Write an HF Qwen3 folder as per-layer `[in, out]` arrays (see the module docstring for the layout).

    Args:
        hf_dir: HF Qwen3 folder (safetensors or `.bin`).
        output_dir: the folder to create.
        dtype: `float32` (default) or `bfloat16`.
        force: replace an existing, non-empty `output_dir`.

    Raises:
        MolgenExportError: unknown tensors, missing tensors, NaN/Inf, or the output cannot be written.
    """
    if dtype not in DTYPES:
        raise UsageError(f"unknown dtype {dtype!r} for JAX arrays", hint=f"use one of {', '.join(DTYPES)}")
    from safetensors.numpy import save_file

    hf_dir, output_dir = Path(hf_dir), Path(output_dir)
    timings: dict[str, float] = {}
    timer = Timer(timings)
    started = time.perf_counter()
    with timer.stage("map"):
        source = open_weights_folder(hf_dir)
        hf_config = read_hf_qwen3_config(source.step_dir)
        dims = architecture.dims_from_hf_config(hf_config)
        tie, tie_finding = decide_tie(source, hf_config)
        wanted = {f"model.layers.{i}.{name}" for i in range(dims.n_layers) for name, _, _ in LAYER_ARRAYS}
        wanted |= {name for name, _, _ in TOP_ARRAYS if not (tie and name == "lm_head.weight")}
        present = {k for k in source.model if not any(p.search(k) for p, _ in SKIPPED_HF_KEYS)}
        unknown = sorted(present - wanted - ({"lm_head.weight"} if tie else set()))
        if unknown:
            raise MappingError(f"{len(unknown)} tensor(s) of {hf_dir} have no place in the JAX layout: {unknown[:8]}",
                               hint="this converter handles dense Qwen3 folders only")
        findings = [checks.check_key_coverage(present - ({"lm_head.weight"} if tie else set()),
                                              keymap.expected_hf_keys(dims.n_layers, with_head=not tie)), tie_finding]
        checks.raise_on_failures(findings, str(hf_dir))

    manifest: dict[str, Any] = {
        "format": FORMAT, "source": str(hf_dir), "dtype": dtype, "tie_word_embeddings": tie,
        "layout": {"linear": "[in, out] kernel = HF weight.T (y = x @ kernel)", "embedding": "[vocab, dim] (not "
                   "transposed)", "norms": "[dim]; q_norm/k_norm [head_dim], applied per head before RoPE",
                   "rope": "rotate-half (HF convention), theta from dims.rope_theta"},
        "dims": asdict(dims), "files": {"top": TOP_FILE, "layers": []}, "arrays": {},
    }
    nonfinite: list[tuple[str, str, int, int]] = []

    def collect(table: tuple[tuple[str, str, bool], ...], prefix: str, filename: str) -> dict[str, np.ndarray]:
        arrays: dict[str, np.ndarray] = {}
        entries: dict[str, dict] = {}
        for name, path, transpose in table:
            hf_key = prefix + name
            if hf_key not in source.model:
                continue  # only the tied head; coverage was checked above
            tensor = source.read(hf_key)
            nan, inf = checks.count_nonfinite(tensor)
            if nan or inf:
                nonfinite.append((hf_key, f"{filename}:{path}", nan, inf))
            arrays[path] = _to_numpy(tensor, dtype, transpose)
            entries[path] = {"hf_key": hf_key, "shape": list(arrays[path].shape), "transposed": transpose}
        manifest["arrays"][filename] = entries
        return arrays

    count = 0
    with staged_output(output_dir, force=force) as temp_dir:
        with timer.stage("write"):
            for index in range(dims.n_layers):
                filename = LAYER_FILE.format(index)
                arrays = collect(LAYER_ARRAYS, f"model.layers.{index}.", filename)
                save_file(arrays, str(temp_dir / filename), metadata={"format": FORMAT, "layer": str(index)})
                manifest["files"]["layers"].append(filename)
                count += len(arrays)
                del arrays  # memory stays bounded by one layer
            arrays = collect(tuple(a for a in TOP_ARRAYS if not (tie and a[0] == "lm_head.weight")), "", TOP_FILE)
            save_file(arrays, str(temp_dir / TOP_FILE), metadata={"format": FORMAT})
            count += len(arrays)
            del arrays
            findings.append(checks.nonfinite_finding(nonfinite, count))
            checks.raise_on_failures(findings, str(hf_dir))
        with timer.stage("verify"):
            findings.append(_check_written(temp_dir, manifest))
            checks.raise_on_failures(findings, str(hf_dir))
        publish.write_json(temp_dir / MANIFEST, manifest)
        files = (*manifest["files"]["layers"], TOP_FILE, MANIFEST)
        output_bytes = sum((temp_dir / name).stat().st_size for name in files)
    timings["total"] = round(time.perf_counter() - started, 4)
    logger.info("wrote %d arrays for %d layers to %s in %.2f s", count, dims.n_layers, output_dir, timings["total"])
    return JaxArraysReport(source_dir=str(hf_dir), output_dir=str(output_dir), dtype=dtype, n_layers=dims.n_layers,
                           tied=tie, arrays=count, output_bytes=output_bytes, files=files,
                           findings=tuple(f.to_json() for f in findings), timings=timings)


def _check_written(folder: Path, manifest: dict) -> checks.Finding:
    """Re-open each file's header: array names, shapes and dtype as the manifest records them."""
    from safetensors import safe_open

    code = {"float32": "F32", "bfloat16": "BF16"}[manifest["dtype"]]
    problems = []
    for filename, entries in manifest["arrays"].items():
        with safe_open(str(folder / filename), framework="numpy") as handle:
            seen = {k: (handle.get_slice(k).get_dtype(), list(handle.get_slice(k).get_shape())) for k in handle.keys()}
        for path, entry in entries.items():
            if seen.get(path) != (code, entry["shape"]):
                problems.append(f"{filename}:{path} is {seen.get(path)}, expected {(code, entry['shape'])}")
        problems += [f"{filename}:{extra} is not in the manifest" for extra in sorted(set(seen) - set(entries))]
    if problems:
        return checks.Finding("written_files", False, "; ".join(problems[:10]))
    return checks.Finding("written_files", True, f"{len(manifest['arrays'])} files re-read: array names, shapes and "
                                                 f"dtype {code} as the manifest says")


# ------------------------------------------------------------------------------------------------- loading


def read_manifest(folder: Path) -> dict:
    """The folder's `manifest.json`.

    Raises:
        CheckpointFormatError: missing, or not a manifest of this layout.
    """
    path = Path(folder) / MANIFEST
    try:
        manifest = json.loads(path.read_text())
    except (OSError, ValueError) as exc:
        raise CheckpointFormatError(f"{path} is missing or not JSON ({exc})", path=path,
                                    hint="point at a folder written by `molgen-export to-jax`") from exc
    if manifest.get("format") != FORMAT:
        raise CheckpointFormatError(f"{path} has format {manifest.get('format')!r}, expected {FORMAT!r}", path=path)
    return manifest


def _nest(flat: dict[str, Any]) -> dict[str, Any]:
    tree: dict[str, Any] = {}
    for path, value in flat.items():
        node = tree
        *parents, leaf = path.split("/")
        for part in parents:
            node = node.setdefault(part, {})
        node[leaf] = value
    return tree


def _load(path: Path, backend: str) -> dict[str, Any]:
    from safetensors.numpy import load_file

    try:
        import ml_dtypes  # noqa: F401  registers numpy's `bfloat16` dtype name, which BF16 files load as
    except ImportError:
        pass
    try:
        arrays = load_file(str(path))
    except TypeError as exc:
        raise UsageError(f"{path} holds bfloat16 arrays, which NumPy reads only with ml_dtypes installed ({exc})",
                         hint="pip install ml_dtypes (JAX depends on it), or write float32 arrays") from exc
    if backend == "auto":
        try:
            import jax.numpy  # noqa: F401
            backend = "jax"
        except ImportError:
            backend = "numpy"
    if backend == "jax":
        import jax.numpy as jnp

        arrays = {k: jnp.asarray(v) for k, v in arrays.items()}
    elif backend != "numpy":
        raise UsageError(f"unknown backend {backend!r}", hint="use auto, numpy or jax")
    return _nest(arrays)


def load_layer(folder: Path, index: int, *, backend: str = "auto") -> dict[str, Any]:
    """One decoder layer as a nested dict: `{"attention": {"wq", "wk", "wv", "wo", "q_norm", "k_norm"},
    "feed_forward": {"w1", "w2", "w3"}, "attention_norm", "ffn_norm"}`.

    Args:
        folder: a folder written by `write_jax_arrays`.
        index: the layer number.
        backend: `numpy`, `jax`, or `auto` (JAX arrays when jax is importable, else NumPy).

    Raises:
        UsageError: no such layer.
    """
    manifest = read_manifest(folder)
    layers = manifest["files"]["layers"]
    if not 0 <= index < len(layers):
        raise UsageError(f"layer {index} does not exist; {folder} holds layers 0..{len(layers) - 1}")
    return _load(Path(folder) / layers[index], backend)


def load_embeddings(folder: Path, *, backend: str = "auto") -> dict[str, Any]:
    """`{"tok_embeddings", "norm"}` plus `"lm_head"` (`[dim, vocab]`) when the model is untied."""
    manifest = read_manifest(folder)
    return _load(Path(folder) / manifest["files"]["top"], backend)
