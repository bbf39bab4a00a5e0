"""`--device cuda`: the demo export with its logit gate (and mapping probe) run on the GPU; skipped without CUDA."""

from __future__ import annotations

import json

import pytest
import torch

from molgen_export.cli import main
from molgen_export.pipeline import export

pytestmark = [pytest.mark.gpu, pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA device")]


def test_demo_export_with_the_logit_gate_on_cuda(capsys, demo_run, tmp_path):
    code = main(["--dcp-path", str(demo_run.checkpoint_root / "step-10"), "--output", str(tmp_path / "cuda"),
                 "--device", "cuda", "--json"])
    out, err = capsys.readouterr()
    assert code == 0, err
    (report,) = json.loads(out)
    assert report["status"] == "exported" and report["options"]["device"] == "cuda"
    fidelity = report["fidelity"]
    assert fidelity["device"] == "cuda" and fidelity["passed"]
    assert fidelity["max_abs_diff"] <= fidelity["tolerance"] and fidelity["top1_agreement"] >= 0.99
    assert fidelity["tokens"] > 0 and fidelity["probe"]["passed"]
    assert {f["name"]: f["ok"] for f in report["findings"]}["logits"]
    on_disk = json.loads((tmp_path / "cuda" / "step-10-hf" / export.REPORT_FILE).read_text())
    assert on_disk["fidelity"] == fidelity

    # the device moves only the check: the files are the CPU export's, byte for byte
    assert main(["--dcp-path", str(demo_run.checkpoint_root / "step-10"), "--output", str(tmp_path / "cpu"),
                 "--skip-logits", "-q"]) == 0
    for name in report["files"]:
        if name.endswith(".safetensors"):
            cuda_bytes = (tmp_path / "cuda" / "step-10-hf" / name).read_bytes()
            assert cuda_bytes == (tmp_path / "cpu" / "step-10-hf" / name).read_bytes(), name
