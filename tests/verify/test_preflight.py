"""Preflight (issue 15): a job config proved exportable before training starts, and the runner that refuses to
launch one that is not."""

from __future__ import annotations

import json
from pathlib import Path

import pytest

from molgen_export.runner import launch
from molgen_export.cli import main
from molgen_export.options import ExportOptions
from molgen_export.verify.preflight import run_preflight
from tests.helpers.titan_version import requires_titan03
from tests.runner.test_runner import stand_in_run


def _unexportable(job: dict) -> dict:
    """A run whose attention output projection has a bias: TorchTitan trains it, HF Qwen3 has no place for it."""
    for layer in job["model_spec"]["model"]["layers"]:
        layer["attention"]["wo"]["bias"] = True
    return job


def test_preflight_of_the_demo_job_config_passes_every_check(demo_run, capsys):
    assert main(["preflight", str(demo_run.job_config)]) == 0
    out = capsys.readouterr().out
    assert out.startswith(f"preflight {demo_run.job_config}: exportable")
    for name in ("run_config", "base_assets", "run_settings", "key_mapping", "hf_config", "vocab_padding", "disk"):
        assert f"check {name}" in out
    assert "25 TorchTitan tensors -> 24 HF tensors" in out  # the tied head is not written
    result = run_preflight(demo_run.job_config)
    assert result.ok and result.export_bytes > 0


@requires_titan03("it plants refused settings in a 0.3 job config (model_spec.model)")
def test_preflight_refuses_by_name_what_the_export_would_refuse(demo_run, capsys):
    demo_run.job_config.write_text(json.dumps(_unexportable(json.loads(demo_run.job_config.read_text()))))
    assert main(["preflight", str(demo_run.job_config)]) == 2
    out = capsys.readouterr().out
    assert "NOT exportable" in out and "run_settings FAILED" in out
    assert "layers.*.attention.wo.bias = True" in out


def test_preflight_checks_the_disk_of_the_export_root(demo_run, tmp_path, monkeypatch):
    import shutil

    real = shutil.disk_usage
    monkeypatch.setattr(shutil, "disk_usage", lambda p: real(p)._replace(free=10))
    result = run_preflight(demo_run.job_config, ExportOptions(output=tmp_path / "exports"))
    assert not result.ok and result.first_failure().name == "disk"
    assert "one export needs" in result.first_failure().detail


@requires_titan03("the runner launches a 0.3 job config (model_spec) with a refused setting")
@pytest.mark.parametrize("mode, launches", [("error", False), ("warn", True)])
def test_runner_does_not_launch_an_unexportable_run(demo_run, tmp_path, caplog, capsys, mode, launches):
    path = stand_in_run(demo_run, tmp_path, steps=10)
    job_file = demo_run.workdir / "job.json"
    job_file.write_text(json.dumps(_unexportable(json.loads(job_file.read_text()))))
    code = launch.main(["--config", str(path), f"export.preflight={mode}", "export.retries=0"])
    checkpoints = demo_run.workdir / "run2" / "checkpoint"
    if launches:
        assert code == 0 and (checkpoints / "step-10" / ".metadata").is_file()
        assert "launching anyway" in caplog.text
        assert not (checkpoints.parent / "checkpoint-hf" / "step-10-hf").exists()  # its export was refused
    else:
        assert code == 2 and not checkpoints.exists()  # training never started
        err = capsys.readouterr().err
        assert "training was not launched" in err and "wo.bias = True" in err


@requires_titan03("the stand-in trainer runs a 0.3 job config (model_spec) through the runner")
def test_runner_launches_an_exportable_run_after_its_preflight(demo_run, tmp_path, caplog):
    import logging

    caplog.set_level(logging.INFO, logger="molgen_export.runner.launch")
    path = stand_in_run(demo_run, tmp_path, steps=10)
    assert launch.main(["--config", str(path)]) == 0
    assert "preflight: check key_mapping" in caplog.text
    report = Path(demo_run.workdir / "run2" / "checkpoint-hf" / "step-10-hf" / "export_report.json")
    assert json.loads(report.read_text())["status"] == "exported"
