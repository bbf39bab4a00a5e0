"""Exports load and compute the same logits under transformers 4.57 as under 5 (issue 15).

transformers 4 lives in a second environment (CI makes `.venv-tf4`: torch and transformers 4.57 only); the
test runs there in a subprocess and is skipped when no such interpreter exists.
"""

from __future__ import annotations

import os
import subprocess
import sys
import textwrap
from pathlib import Path

import pytest
import torch

from molgen_export.options import ExportOptions
from molgen_export.pipeline.export import export_step

REPO = Path(__file__).resolve().parents[2]
TF4_PYTHON = Path(os.environ.get("MOLGEN_TRANSFORMERS4_PYTHON", REPO / ".venv-tf4" / "bin" / "python"))

pytestmark = pytest.mark.skipif(not TF4_PYTHON.is_file(),
                                reason=f"no transformers 4 environment at {TF4_PYTHON} (.ci/run makes one)")


def _hf4_logits(hf_dir: Path, tokens: torch.Tensor, out: Path) -> tuple[torch.Tensor, str]:
    torch.save(tokens, out / "tokens.pt")
    script = textwrap.dedent(f"""
        import torch, transformers
        from transformers import AutoModelForCausalLM, AutoTokenizer
        assert transformers.__version__.startswith("4."), transformers.__version__
        model = AutoModelForCausalLM.from_pretrained({str(hf_dir)!r}, torch_dtype=torch.float32)
        tok = AutoTokenizer.from_pretrained({str(hf_dir)!r})
        generated = model.generate(**tok("CCO c1ccccc1", return_tensors="pt"), max_new_tokens=4, do_sample=False)
        ids = torch.load({str(out / 'tokens.pt')!r}, weights_only=True)
        with torch.no_grad():
            torch.save(model(input_ids=ids).logits, {str(out / 'logits.pt')!r})
        print(transformers.__version__, type(model).__name__, generated.shape[1])
    """)
    done = subprocess.run([str(TF4_PYTHON), "-c", script], capture_output=True, text=True, timeout=300,
                          env={**os.environ, "HF_HUB_OFFLINE": "1", "TRANSFORMERS_OFFLINE": "1"})
    assert done.returncode == 0, done.stderr[-3000:]
    return torch.load(out / "logits.pt", weights_only=True), done.stdout.strip()


def _titan_logits(model_config, step: Path, tokens: torch.Tensor, dtype: torch.dtype) -> torch.Tensor:
    import torch.distributed.checkpoint as dcp

    from molgen_export.verify.logit_gate import build_titan_model

    with torch.device("meta"):
        model = model_config.build()
    model.to_empty(device="cpu")
    state = {k: torch.empty_like(v) for k, v in model.state_dict().items()}
    dcp.load(state, checkpoint_id=str(step))
    rounded = {k: v.to(dtype).float() for k, v in state.items() if not k.endswith("expert_bias_E")}
    titan = build_titan_model(model_config, rounded, tie=model_config.enable_weight_tying)
    with torch.no_grad():
        return titan(tokens)


def test_dense_export_under_transformers_4(demo_run, tmp_path):
    report = export_step(demo_run.steps[-1], ExportOptions(output=tmp_path / "out"))
    tokens = torch.randint(0, demo_run.tokenizer_size, (2, 24), generator=torch.Generator().manual_seed(3))
    hf, said = _hf4_logits(Path(report.output_dir), tokens, tmp_path)
    assert said.startswith("4.57") and "Qwen3ForCausalLM" in said
    titan = _titan_logits(demo_run.arch.titan_model_config(fused_qkv=True), demo_run.steps[-1], tokens,
                          torch.bfloat16)
    torch.testing.assert_close(hf, titan, atol=1e-4, rtol=1e-4)


def test_moe_export_under_transformers_4(tmp_path):
    from molgen_export.demo import make_demo_run, tiny_moe_arch

    run = make_demo_run(tmp_path / "moe", steps=(5,), arch=tiny_moe_arch(moe_layers=(1,)))
    report = export_step(run.steps[0], ExportOptions(output=tmp_path / "out", dtype="float32"))
    tokens = torch.randint(0, run.tokenizer_size, (2, 24), generator=torch.Generator().manual_seed(4))
    hf, said = _hf4_logits(Path(report.output_dir), tokens, tmp_path)
    assert "Qwen3MoeForCausalLM" in said
    titan = _titan_logits(run.arch.titan_model_config(), run.steps[0], tokens, torch.float32)
    torch.testing.assert_close(hf, titan, atol=2e-3, rtol=1e-3)
