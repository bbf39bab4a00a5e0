""""Verified" means verified (issue 11): run configs as TorchTitan writes them, a reference built from the run's own
model config, refusal by name of what HF cannot express, a mapping probe on random weights, skips that cover the
options, and no deleting of folders we did not write."""

from __future__ import annotations

import dataclasses
import json
import shutil
from pathlib import Path

import pytest
import torch

from molgen_export.hf import config_files
from molgen_export.mapping import keymap
from molgen_export.cli import main
from molgen_export.options import ExportOptions
from molgen_export.demo import job_config_dict, make_demo_run, tiny_moe_arch
from molgen_export.errors import ConfigError, OutputError, VerificationError
from molgen_export.pipeline.export import REPORT_FILE, export_step, plan_step
from molgen_export.verify.logit_gate import build_titan_model, load_hf_model
from molgen_export.mapping.run_config import write_checkpoint_config


def _titan_layout(run, *, save_config_file: str = "logs/job_config.json", model=None) -> Path:
    """Lay the demo run out as TorchTitan 0.3 does with `debug.save_config_file`: the dump at
    `<launch>/run/<save_config_file>`, assets at `<launch>/hf_assets` named relatively, no runner config."""
    launch = run.workdir
    shutil.move(run.assets_dir, launch / "hf_assets")
    run.job_config.unlink()
    (run.checkpoint_root / "config.json").unlink()
    dump = job_config_dict(run.arch, flavor="molgen_tiny", hf_assets_path="./hf_assets", dump_folder="./run",
                           seq_len=run.arch.max_seq_len, save_config_file=save_config_file, model=model)
    path = launch / "run" / save_config_file
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(json.dumps(dump, indent=2))
    return path


def _exported_steps(root: Path) -> list[str]:
    return sorted(p.name for p in root.iterdir() if (p / REPORT_FILE).is_file()) if root.is_dir() else []


def test_torchtitan_save_config_file_layout_exports_from_another_cwd(demo_run, tmp_path, monkeypatch, capsys):
    dump = _titan_layout(demo_run)
    elsewhere = tmp_path / "elsewhere"
    elsewhere.mkdir()
    monkeypatch.chdir(elsewhere)
    export_root = demo_run.run_dir / "checkpoint-hf"

    assert main(["--dcp-path", str(demo_run.run_dir), "--dry-run"]) == 0
    out = capsys.readouterr().out
    assert "hf_assets" in out and str(dump) in out

    assert main(["watch", str(demo_run.checkpoint_root), "--once", "--retries", "0", "-q"]) == 0
    assert _exported_steps(export_root) == ["step-10-hf", "step-20-hf"]
    report = json.loads((export_root / "step-10-hf" / REPORT_FILE).read_text())
    assert report["hf_assets"] == str(demo_run.workdir / "hf_assets")
    assert report["reference"]["source"].startswith("job_config.json (model_spec.model)")

    # the copy a runner puts in the checkpoint folder (`<dump>/<checkpoint.folder>/config.json`) works as well
    shutil.copy(dump, demo_run.checkpoint_root / "config.json")
    dump.unlink()
    shutil.rmtree(export_root)
    assert main(["--dcp-path", str(demo_run.steps[0])]) == 0
    assert _exported_steps(export_root) == ["step-10-hf"]


def test_torchtitan_02_dict_with_job_dump_folder(demo_run, tmp_path, monkeypatch):
    shutil.move(demo_run.assets_dir, demo_run.workdir / "hf_assets")
    (demo_run.checkpoint_root / "config.json").write_text(json.dumps({
        "job": {"dump_folder": "./run"}, "checkpoint": {"folder": "checkpoint", "keep_latest_k": 0},
        "model": {"name": "qwen3", "flavor": "molgen_tiny", "hf_assets_path": "./hf_assets"},
        "training": {"seq_len": 256, "mixed_precision_param": "bfloat16"}}))
    monkeypatch.chdir(tmp_path)
    report = export_step(demo_run.steps[0])
    assert report.status == "exported" and report.hf_assets == str(demo_run.workdir / "hf_assets")
    assert "custom flavor" in report.reference["source"]  # no model config in a 0.2 dict: said, not hidden


def test_launch_dir_that_cannot_be_told_is_refused_with_the_fix(demo_run, tmp_path):
    dump = _titan_layout(demo_run)
    data = json.loads(dump.read_text())
    data["dump_folder"] = str(demo_run.run_dir)  # absolute: the launch dir of `./hf_assets` is unknown
    dump.write_text(json.dumps(data))
    with pytest.raises(ConfigError, match="relative to a launch directory") as info:
        plan_step(demo_run.steps[0])
    assert "--hf-assets" in info.value.hint
    report = export_step(demo_run.steps[0], ExportOptions(hf_assets=demo_run.workdir / "hf_assets",
                                                          output=tmp_path / "out", skip_logits=True))
    assert report.status == "exported"


def _with_rope(model, **fields):
    for layer in model.layers:
        layer.attention.rope = dataclasses.replace(layer.attention.rope, **fields)
    return model


def _titan_logits(model_config, step: Path, tokens: torch.Tensor, dtype=torch.float32) -> torch.Tensor:
    """TorchTitan's model of this config with the checkpoint's weights (read by torch's own DCP loader)."""
    import torch.distributed.checkpoint as dcp

    with torch.device("meta"):
        model = model_config.build()
    model.to_empty(device="cpu")
    state = {k: torch.empty_like(v) for k, v in model.state_dict().items()}
    dcp.load(state, checkpoint_id=str(step))
    titan = build_titan_model(model_config, {k: v.to(dtype) for k, v in state.items()}, tie=True)
    with torch.no_grad():
        return titan(tokens)


def test_yarn_run_is_exported_with_yarn_and_the_gate_proves_it(demo_run, tmp_path, monkeypatch):
    yarn = _with_rope(demo_run.arch.titan_model_config(fused_qkv=True), scaling="yarn", rope_factor=4.0,
                      original_seq_len=64)
    _titan_layout(demo_run, model=yarn)
    step = demo_run.steps[0]
    report = export_step(step, ExportOptions(output=tmp_path / "ok", dtype="float32"))
    hf_dir = Path(report.output_dir)
    config = json.loads((hf_dir / "config.json").read_text())
    assert config["rope_scaling"]["rope_type"] == "yarn" and config["rope_scaling"]["factor"] == 4.0
    assert config["rope_scaling"]["original_max_position_embeddings"] == 64
    assert report.fidelity["passed"] and report.fidelity["max_abs_diff"] < 1e-4

    # independently of the exporter: TorchTitan (the run's config, torch's DCP loader) vs transformers
    tokens = torch.randint(0, 300, (2, 48), generator=torch.Generator().manual_seed(7))
    titan = _titan_logits(yarn, step, tokens)
    with torch.no_grad():
        hf = load_hf_model(hf_dir)(input_ids=tokens).logits
    torch.testing.assert_close(hf, titan, atol=1e-4, rtol=1e-4)

    # the gate measures RoPE: an HF config that drops the scaling (what the exporter used to write) is refused
    real = config_files.build_hf_config

    def drop_scaling(*args, **kwargs):
        return {**real(*args, **kwargs), "rope_scaling": None}

    monkeypatch.setattr(config_files, "build_hf_config", drop_scaling)
    with pytest.raises(VerificationError, match="logits") as info:
        export_step(step, ExportOptions(output=tmp_path / "dropped", dtype="float32"))
    detail = next(f.detail for f in info.value.findings if f.name == "logits")
    assert "top-1" in detail
    assert not (tmp_path / "dropped" / "step-10-hf").exists()


@pytest.fixture(scope="module")
def moe_session(tmp_path_factory):
    return make_demo_run(tmp_path_factory.mktemp("moe-verified"), steps=(5,), arch=tiny_moe_arch(moe_layers=(1,)))


@pytest.fixture
def moe_run(moe_session, tmp_path):
    workdir = tmp_path / "moe"
    shutil.copytree(moe_session.workdir, workdir)
    run = dataclasses.replace(moe_session, workdir=workdir, run_dir=workdir / "run",
                              checkpoint_root=workdir / "run" / "checkpoint", assets_dir=workdir / "assets",
                              job_config=workdir / "run" / "job_config.json",
                              steps=[workdir / "run" / "checkpoint" / p.name for p in moe_session.steps])
    write_checkpoint_config(run.checkpoint_root, run.job_config, launch_dir=workdir)
    return run


def _moe_router(model, **fields):
    for layer in model.layers:
        if layer.moe is not None:
            for name, value in fields.items():
                setattr(layer.moe.router, name, value)
    return model


def test_moe_export_reports_routing_agreement_and_probe(moe_run, tmp_path):
    report = export_step(moe_run.steps[0], ExportOptions(output=tmp_path, dtype="float32"))
    assert report.fidelity["routing_agreement"] == 1.0 and report.fidelity["routing"][0]["tokens"] > 0
    probe = report.fidelity["probe"]
    assert probe["passed"] and probe["experts"] == 12 and probe["routing_agreement"] >= 0.9


@pytest.mark.parametrize("fields, named", [
    ({"score_func": "sigmoid"}, "score_func = 'sigmoid'"),
    ({"route_scale": 2.5}, "route_scale = 2.5"),
    ({"num_expert_groups": 3, "num_limited_groups": 1}, "num_expert_groups = 3"),
])
def test_moe_router_settings_hf_cannot_express_are_refused_by_name(moe_run, tmp_path, capsys, fields, named):
    model = _moe_router(moe_run.arch.titan_model_config(), **fields)
    job = job_config_dict(moe_run.arch, flavor="molgen_tiny", hf_assets_path="./assets", dump_folder="./run",
                          seq_len=256, model=model)
    moe_run.job_config.write_text(json.dumps(job))
    output = tmp_path / "out"
    for extra in (["--dry-run"], []):
        assert main(["--dcp-path", str(moe_run.steps[0]), "--output", str(output), *extra]) == 2
        err = capsys.readouterr().err
        assert named in err and "cannot express" in err
    assert not output.exists() or not any(output.iterdir())


def test_unknown_model_config_field_is_refused_not_dropped(demo_run):
    data = json.loads(demo_run.job_config.read_text())
    data["model_spec"]["model"]["layers"][1]["attention"]["rope"]["new_knob"] = 3
    demo_run.job_config.write_text(json.dumps(data))
    with pytest.raises(ConfigError, match=r"layers\.\*\.attention\.rope\.new_knob = 3"):
        plan_step(demo_run.steps[0])


def test_swapped_q_and_k_norm_is_caught_at_step_10_by_the_probe(demo_run, tmp_path, monkeypatch):
    real = keymap.map_to_hf

    def swapped(sources, config):
        mapping = real(sources, config)
        return {k: v.replace("q_norm", "@").replace("k_norm", "q_norm").replace("@", "k_norm")
                for k, v in mapping.items()}

    monkeypatch.setattr(keymap, "map_to_hf", swapped)
    with pytest.raises(VerificationError) as info:
        export_step(demo_run.steps[0], ExportOptions(output=tmp_path))
    failed = {f.name: f for f in info.value.findings}
    assert list(failed) == ["mapping_probe"]  # the checkpoint's own near-init norms hide the swap from the gate
    print("swapped q_norm/k_norm at step 10:", failed["mapping_probe"].detail)
    assert not (tmp_path / "step-10-hf").exists()


def test_skip_only_when_options_and_assets_are_the_same(demo_run, tmp_path, capsys):
    step = str(demo_run.steps[0])
    out = ["--output", str(tmp_path), "--skip-logits"]
    hf_dir = tmp_path / "step-10-hf"
    assert main(["--dcp-path", step, *out]) == 0
    assert json.loads((hf_dir / "config.json").read_text())["dtype"] == "bfloat16"
    capsys.readouterr()
    assert main(["--dcp-path", step, *out, "--dtype", "float32"]) == 0
    assert capsys.readouterr().out.startswith("step-10  ok")
    report = json.loads((hf_dir / REPORT_FILE).read_text())
    assert report["replaced"] == ["export_dtype"]
    assert json.loads((hf_dir / "config.json").read_text())["dtype"] == "float32"

    generation = demo_run.assets_dir / "generation_config.json"
    generation.write_text(json.dumps({**json.loads(generation.read_text()), "temperature": 0.3}))
    assert main(["--dcp-path", step, *out, "--dtype", "float32"]) == 0
    assert json.loads((hf_dir / REPORT_FILE).read_text())["replaced"] == ["assets/generation_config.json"]
    assert json.loads((hf_dir / "generation_config.json").read_text())["temperature"] == 0.3
    capsys.readouterr()
    assert main(["--dcp-path", step, *out, "--dtype", "float32"]) == 0
    assert capsys.readouterr().out.startswith("step-10  skip")
    assert not [p.name for p in tmp_path.iterdir() if p.name.startswith(".")]  # no lock file left behind


def test_a_folder_we_did_not_write_is_never_replaced_without_force(demo_run, tmp_path, capsys):
    hf_dir = tmp_path / "step-10-hf"
    hf_dir.mkdir()
    (hf_dir / "notes.txt").write_text("mine")
    step = str(demo_run.steps[0])
    assert main(["--dcp-path", step, "--output", str(tmp_path), "--skip-logits"]) == 2
    err = capsys.readouterr().err
    assert "not a molgen_export export" in err and "--force" in err
    assert (hf_dir / "notes.txt").read_text() == "mine"
    with pytest.raises(OutputError):
        export_step(Path(step), ExportOptions(output=tmp_path, skip_logits=True))
    assert main(["--dcp-path", step, "--output", str(tmp_path), "--skip-logits", "--force"]) == 0
    assert (hf_dir / REPORT_FILE).is_file() and not (hf_dir / "notes.txt").exists()


def test_renumbered_experts_compute_the_same_logits_yet_fail_on_routing(moe_run, tmp_path):
    """A mapping that permutes experts (gate rows and expert weights together) gives an HF model with the same
    logits; only the routing comparison sees that HF's expert e is not TorchTitan's expert e."""
    import torch.distributed.checkpoint as dcp

    from molgen_export.verify import logit_gate

    report = export_step(moe_run.steps[0], ExportOptions(output=tmp_path, dtype="float32"))
    hf = load_hf_model(Path(report.output_dir))
    config = moe_run.arch.titan_model_config()
    with torch.device("meta"):
        skeleton = config.build()
    skeleton.to_empty(device="cpu")
    state = {k: torch.empty_like(v) for k, v in skeleton.state_dict().items()}
    dcp.load(state, checkpoint_id=str(moe_run.steps[0]))
    titan = build_titan_model(config, state, tie=False)
    tokens = logit_gate.fixed_token_batch(300)
    order = torch.tensor([3, 0, 1, 2, *range(4, 12)])
    with torch.no_grad():
        for name, param in hf.model.layers[1].mlp.named_parameters():  # gate rows and every expert tensor
            param.copy_(param[order])
    with logit_gate.RoutingRecorder(titan, hf) as routing:
        result = logit_gate.compare_logits(titan, hf, [tokens], 300, tolerance=1e-3)
    assert result.passed  # the logits alone cannot tell
    checked = routing.apply(result)
    assert not checked.passed and checked.routing_agreement < 0.9
