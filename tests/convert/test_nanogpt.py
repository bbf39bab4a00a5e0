"""nanoGPT `.pt` -> HF GPT-2: a tiny nanoGPT model written here, saved the way nanoGPT's train.py saves it,
converted with the CLI, and the HF `GPT2LMHeadModel` computes the same logits."""

from __future__ import annotations

import json
import math
from dataclasses import asdict, dataclass

import pytest
import torch
import torch.nn as nn
import torch.nn.functional as F

from molgen_export.cli import main
from molgen_export.errors import UnsafeCheckpointError


# --- a small nanoGPT (karpathy/nanoGPT model.py, reduced to what a checkpoint needs) -----------------------------


@dataclass
class GPTConfig:
    block_size: int = 64
    vocab_size: int = 96
    n_layer: int = 2
    n_head: int = 4
    n_embd: int = 64
    dropout: float = 0.0
    bias: bool = True


class LayerNorm(nn.Module):
    def __init__(self, ndim: int, bias: bool):
        super().__init__()
        self.weight = nn.Parameter(torch.ones(ndim))
        self.bias = nn.Parameter(torch.zeros(ndim)) if bias else None

    def forward(self, x):
        return F.layer_norm(x, self.weight.shape, self.weight, self.bias, 1e-5)


class CausalSelfAttention(nn.Module):
    def __init__(self, config: GPTConfig):
        super().__init__()
        self.c_attn = nn.Linear(config.n_embd, 3 * config.n_embd, bias=config.bias)
        self.c_proj = nn.Linear(config.n_embd, config.n_embd, bias=config.bias)
        self.n_head, self.n_embd = config.n_head, config.n_embd
        # the non-flash path's mask buffer: saved in the state dict, must be skipped by the converter
        self.register_buffer("bias", torch.tril(torch.ones(config.block_size, config.block_size))
                             .view(1, 1, config.block_size, config.block_size))

    def forward(self, x):
        B, T, C = x.size()
        q, k, v = self.c_attn(x).split(self.n_embd, dim=2)
        q, k, v = (t.view(B, T, self.n_head, C // self.n_head).transpose(1, 2) for t in (q, k, v))
        att = (q @ k.transpose(-2, -1)) * (1.0 / math.sqrt(k.size(-1)))
        att = att.masked_fill(self.bias[:, :, :T, :T] == 0, float("-inf")).softmax(dim=-1)
        return self.c_proj((att @ v).transpose(1, 2).contiguous().view(B, T, C))


class MLP(nn.Module):
    def __init__(self, config: GPTConfig):
        super().__init__()
        self.c_fc = nn.Linear(config.n_embd, 4 * config.n_embd, bias=config.bias)
        self.gelu = nn.GELU()
        self.c_proj = nn.Linear(4 * config.n_embd, config.n_embd, bias=config.bias)

    def forward(self, x):
        return self.c_proj(self.gelu(self.c_fc(x)))


class Block(nn.Module):
    def __init__(self, config: GPTConfig):
        super().__init__()
        self.ln_1 = LayerNorm(config.n_embd, bias=config.bias)
        self.attn = CausalSelfAttention(config)
        self.ln_2 = LayerNorm(config.n_embd, bias=config.bias)
        self.mlp = MLP(config)

    def forward(self, x):
        x = x + self.attn(self.ln_1(x))
        return x + self.mlp(self.ln_2(x))


class GPT(nn.Module):
    def __init__(self, config: GPTConfig):
        super().__init__()
        self.transformer = nn.ModuleDict(dict(
            wte=nn.Embedding(config.vocab_size, config.n_embd), wpe=nn.Embedding(config.block_size, config.n_embd),
            h=nn.ModuleList([Block(config) for _ in range(config.n_layer)]), ln_f=LayerNorm(config.n_embd, config.bias)))
        self.lm_head = nn.Linear(config.n_embd, config.vocab_size, bias=False)
        self.transformer.wte.weight = self.lm_head.weight  # weight tying, as nanoGPT does
        for name, p in self.named_parameters():  # non-trivial values everywhere (norms and biases too)
            with torch.no_grad():
                p.normal_(0.0, 0.3 if p.dim() == 1 else 0.05)

    def forward(self, idx):
        pos = torch.arange(idx.shape[1])
        x = self.transformer.wte(idx) + self.transformer.wpe(pos)
        for block in self.transformer.h:
            x = block(x)
        return self.lm_head(self.transformer.ln_f(x))


def save_nanogpt(path, *, bias: bool = True, compiled: bool = True, seed: int = 0, mutate=None, vocab_size: int = 96):
    torch.manual_seed(seed)
    config = GPTConfig(bias=bias, vocab_size=vocab_size)
    model = GPT(config).eval()
    if mutate is not None:
        mutate(model)
    state = model.state_dict()
    if compiled:  # what nanoGPT saves when compile=True
        state = {f"_orig_mod.{k}": v for k, v in state.items()}
    optimizer = torch.optim.AdamW(model.parameters(), lr=1e-3)
    model(torch.zeros(1, 4, dtype=torch.long)).sum().backward()
    optimizer.step()
    torch.save({"model": state, "optimizer": optimizer.state_dict(), "model_args": asdict(config), "iter_num": 250,
                "best_val_loss": torch.tensor(2.5), "config": {"dataset": "tiny", "compile": compiled}}, path)
    return model


def hf_logits(folder, tokens):
    from transformers import GPT2LMHeadModel

    hf = GPT2LMHeadModel.from_pretrained(folder, dtype=torch.float32).eval()
    with torch.no_grad():
        return hf(input_ids=tokens).logits


TOKENS = torch.randint(0, 96, (2, 40), generator=torch.Generator().manual_seed(7))


@pytest.mark.parametrize("bias", [True, False])
def test_nanogpt_converts_to_gpt2_with_the_same_logits(tmp_path, bias, capsys):
    model = save_nanogpt(tmp_path / "ckpt.pt", bias=bias)
    out = tmp_path / "hf"
    assert main(["from-nanogpt", str(tmp_path / "ckpt.pt"), "--output", str(out), "--json"]) == 0
    report = json.loads(capsys.readouterr().out)
    with torch.no_grad():
        want = model(TOKENS)
    got = hf_logits(out, TOKENS)
    torch.testing.assert_close(got, want, atol=2e-5, rtol=1e-5)
    print(f"nanoGPT bias={bias}: max|Δlogit| vs GPT2LMHeadModel {float((got - want).abs().max()):.3g}, "
          f"converter's own check {report['fidelity']['max_abs_diff']:.3g}")
    assert report["tied"] is True and report["zero_biases"] == (0 if bias else 2 * 6 + 1)
    config = json.loads((out / "config.json").read_text())
    assert config["activation_function"] == "gelu" and config["tie_word_embeddings"] is True
    assert config["n_positions"] == 64 and config["n_layer"] == 2 and config["vocab_size"] == 96
    from safetensors import safe_open

    with safe_open(str(out / "model.safetensors"), framework="pt") as f:
        keys = set(f.keys())
        assert "lm_head.weight" not in keys and not any(k.endswith(".attn.bias") for k in keys)
        c_attn = f.get_tensor("transformer.h.0.attn.c_attn.weight")
    assert c_attn.shape == (64, 192)
    torch.testing.assert_close(c_attn, model.transformer.h[0].attn.c_attn.weight.detach().t(), atol=0, rtol=0)
    assert {"README.md", "generation_config.json", "conversion_report.json"} <= {p.name for p in out.iterdir()}


def test_nanogpt_bf16_vocab_crop_and_tokenizer(tmp_path):
    from molgen_export.demo import make_tokenizer
    from molgen_export.convert.nanogpt import convert_nanogpt

    tokenizer_dir = tmp_path / "tok"
    size = make_tokenizer(tokenizer_dir, vocab_size=300)  # byte-level BPE: fewer tokens than the 320 rows
    save_nanogpt(tmp_path / "ckpt.pt", compiled=False, vocab_size=320)
    report = convert_nanogpt(tmp_path / "ckpt.pt", tmp_path / "hf", dtype="bfloat16", vocab_size=size,
                             tokenizer_dir=tokenizer_dir)
    assert report.vocab_rows == size < 320 and report.cropped_rows == 320 - size
    assert report.fidelity["max_abs_diff"] <= report.fidelity["tolerance"]
    print(f"nanoGPT bf16 (vocab cropped to {size}): converter's logit check max|Δ| {report.fidelity['max_abs_diff']:.3g}")
    assert (tmp_path / "hf" / "tokenizer.json").read_bytes() == (tokenizer_dir / "tokenizer.json").read_bytes()
    from transformers import AutoTokenizer, GPT2LMHeadModel

    hf = GPT2LMHeadModel.from_pretrained(tmp_path / "hf", dtype="auto")
    assert hf.dtype == torch.bfloat16 and hf.transformer.wte.weight.shape[0] == size
    assert len(AutoTokenizer.from_pretrained(tmp_path / "hf")) == size


def test_fp16_overflow_is_reported_with_the_tensor(tmp_path, caplog):
    from molgen_export.convert.nanogpt import convert_nanogpt

    def plant(model):  # a position the verification never uses: the export must warn, not silently write inf
        with torch.no_grad():
            model.transformer.wpe.weight[60, 3] = 1e5

    save_nanogpt(tmp_path / "ckpt.pt", mutate=plant)
    with caplog.at_level("WARNING"):
        report = convert_nanogpt(tmp_path / "ckpt.pt", tmp_path / "hf", dtype="float16")
    assert len(report.warnings) == 1 and "transformer.wpe.weight" in report.warnings[0]
    assert "overflow" in caplog.text and "--dtype bfloat16" in report.warnings[0]


def test_checkpoint_needing_unsafe_unpickling_is_refused(tmp_path):
    from molgen_export.convert.nanogpt import convert_nanogpt

    torch.save({"model": {}, "model_args": {}, "config": _Custom()}, tmp_path / "ckpt.pt")
    with pytest.raises(UnsafeCheckpointError) as info:
        convert_nanogpt(tmp_path / "ckpt.pt", tmp_path / "hf")
    assert "weights_only=True" in str(info.value) and "re-save" in str(info.value)
    assert not (tmp_path / "hf").exists()
    assert main(["from-nanogpt", str(tmp_path / "ckpt.pt"), "--output", str(tmp_path / "hf")]) == 2


class _Custom:
    """An arbitrary class: torch.load(weights_only=True) refuses to rebuild it."""
