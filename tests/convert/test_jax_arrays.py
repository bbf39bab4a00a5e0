"""HF Qwen3 -> per-layer JAX/NumPy arrays: layout, streaming files, the loader, and a NumPy forward of one decoder
layer from the arrays that matches the HF `Qwen3DecoderLayer` output."""

from __future__ import annotations

import json

import numpy as np
import pytest
import torch

from molgen_export.cli import main
from molgen_export.convert.jax_arrays import load_embeddings, load_layer, read_manifest


@pytest.fixture(scope="module")
def hf_untied(tmp_path_factory):
    from tests.convert.test_hf_titan import make_hf_folder

    return make_hf_folder(tmp_path_factory.mktemp("hf") / "untied", tie=False, dtype=torch.float32, seed=2)


def rms_norm(x: np.ndarray, weight: np.ndarray, eps: float) -> np.ndarray:
    return x / np.sqrt(np.mean(x * x, axis=-1, keepdims=True) + eps) * weight


def rotate_half(x: np.ndarray) -> np.ndarray:
    half = x.shape[-1] // 2
    return np.concatenate([-x[..., half:], x[..., :half]], axis=-1)


def numpy_decoder_layer(x: np.ndarray, layer: dict, dims: dict) -> np.ndarray:
    """One Qwen3 decoder layer in float64 NumPy from `[in, out]` kernels: RMSNorm, q/k RMSNorm per head, RoPE
    (rotate-half, the config's theta), grouped-query causal attention, SwiGLU."""
    eps, head_dim = dims["norm_eps"], dims["head_dim"]
    n_heads, n_kv_heads = dims["n_heads"], dims["n_kv_heads"]
    f64 = {k: (np.asarray(v, np.float64) if not isinstance(v, dict) else {kk: np.asarray(vv, np.float64)
                                                                          for kk, vv in v.items()})
           for k, v in layer.items()}
    attn, ffn = f64["attention"], f64["feed_forward"]
    batch, length, _ = x.shape
    h = rms_norm(x, f64["attention_norm"], eps)
    q = rms_norm((h @ attn["wq"]).reshape(batch, length, n_heads, head_dim), attn["q_norm"], eps)
    k = rms_norm((h @ attn["wk"]).reshape(batch, length, n_kv_heads, head_dim), attn["k_norm"], eps)
    v = (h @ attn["wv"]).reshape(batch, length, n_kv_heads, head_dim)
    inv_freq = 1.0 / dims["rope_theta"] ** (np.arange(0, head_dim, 2) / head_dim)
    angles = np.arange(length)[:, None] * inv_freq[None, :]
    cos = np.cos(np.concatenate([angles, angles], -1))[None, :, None, :]
    sin = np.sin(np.concatenate([angles, angles], -1))[None, :, None, :]
    q, k = q * cos + rotate_half(q) * sin, k * cos + rotate_half(k) * sin
    k = np.repeat(k, n_heads // n_kv_heads, axis=2)
    v = np.repeat(v, n_heads // n_kv_heads, axis=2)
    scores = np.einsum("bqhd,bkhd->bhqk", q, k) / np.sqrt(head_dim)
    scores = np.where(np.tril(np.ones((length, length), bool)), scores, -np.inf)
    weights = np.exp(scores - scores.max(-1, keepdims=True))
    weights /= weights.sum(-1, keepdims=True)
    out = np.einsum("bhqk,bkhd->bqhd", weights, v).reshape(batch, length, n_heads * head_dim)
    x = x + out @ attn["wo"]
    h = rms_norm(x, f64["ffn_norm"], eps)
    gate = h @ ffn["w1"]
    return x + ((gate / (1.0 + np.exp(-gate))) * (h @ ffn["w3"])) @ ffn["w2"]


def hf_layer_io(folder, tokens):
    """Inputs and outputs of every HF decoder layer on these tokens (float32)."""
    from transformers import AutoModelForCausalLM

    model = AutoModelForCausalLM.from_pretrained(folder, dtype=torch.float32).eval()
    seen = {}

    def hook(index):
        def capture(module, args, kwargs, output):
            hidden = args[0] if args else kwargs["hidden_states"]
            seen[index] = (hidden.detach().numpy(), (output[0] if isinstance(output, tuple) else output).detach().numpy())
        return capture

    for index, layer in enumerate(model.model.layers):
        layer.register_forward_hook(hook(index), with_kwargs=True)
    with torch.no_grad():
        model(input_ids=tokens)
    return seen


def test_numpy_forward_of_a_layer_from_the_arrays_matches_hf(hf_untied, tmp_path):
    out = tmp_path / "jax"
    assert main(["to-jax", str(hf_untied), str(out)]) == 0
    manifest = read_manifest(out)
    assert manifest["files"]["layers"] == ["layer_00000.safetensors", "layer_00001.safetensors"]
    assert sorted(p.name for p in out.iterdir()) == ["embeddings.safetensors", "layer_00000.safetensors",
                                                      "layer_00001.safetensors", "manifest.json"]
    tokens = torch.randint(0, 300, (2, 20), generator=torch.Generator().manual_seed(11))
    io = hf_layer_io(hf_untied, tokens)
    for index in range(2):
        layer = load_layer(out, index, backend="numpy")
        assert set(layer) == {"attention", "feed_forward", "attention_norm", "ffn_norm"}
        assert set(layer["attention"]) == {"wq", "wk", "wv", "wo", "q_norm", "k_norm"}
        assert layer["attention"]["wq"].shape == (64, 128) and layer["feed_forward"]["w2"].shape == (160, 64)
        assert all(a.flags["C_CONTIGUOUS"] for a in (*layer["attention"].values(), *layer["feed_forward"].values()))
        hidden_in, hidden_out = io[index]
        got = numpy_decoder_layer(hidden_in.astype(np.float64), layer, manifest["dims"])
        np.testing.assert_allclose(got, hidden_out, atol=2e-5, rtol=1e-4)
        print(f"to-jax layer {index}: NumPy forward from [in, out] arrays vs HF Qwen3DecoderLayer "
              f"max|Δ| {np.abs(got - hidden_out).max():.3g}")
    top = load_embeddings(out, backend="numpy")
    assert top["tok_embeddings"].shape == (320, 64) and top["lm_head"].shape == (64, 320)
    from molgen_export.convert.weights_folder import open_weights_folder

    head = open_weights_folder(hf_untied).read("lm_head.weight").numpy()
    np.testing.assert_array_equal(top["lm_head"], head.T)


def test_bfloat16_arrays_tied_model_and_no_pickle(tmp_path):
    from tests.convert.test_hf_titan import make_hf_folder

    from molgen_export.convert.jax_arrays import write_jax_arrays

    source = make_hf_folder(tmp_path / "hf", tie=True, dtype=torch.bfloat16, shard="60KB")
    report = write_jax_arrays(source, tmp_path / "jax", dtype="bfloat16")
    assert report.tied and report.n_layers == 2
    top = load_embeddings(tmp_path / "jax", backend="numpy")
    assert set(top) == {"tok_embeddings", "norm"}  # tied: the head is tok_embeddings.T
    layer = load_layer(tmp_path / "jax", 1, backend="numpy")
    import ml_dtypes

    assert layer["attention"]["wk"].dtype == ml_dtypes.bfloat16
    manifest = json.loads((tmp_path / "jax" / "manifest.json").read_text())
    assert manifest["tie_word_embeddings"] is True and manifest["layout"]["linear"].startswith("[in, out]")
    for path in (tmp_path / "jax").glob("*.safetensors"):
        header_length = int.from_bytes(path.read_bytes()[:8], "little")
        json.loads(path.read_bytes()[8:8 + header_length])  # a JSON header and raw bytes: nothing to execute
