"""The runner (config merge, job_config.json, config.json, training's exit code, Ctrl-C) and the hooks, with
hooks/demo_trainer.py standing in for torchtitan.train: it saves real DCP checkpoints as TorchTitan does."""

from __future__ import annotations

import json
import os
import re
import signal
import sys
import threading
import time
from dataclasses import fields
from pathlib import Path

import pytest

from molgen_export.pipeline import export
from molgen_export.mapping import run_config
from molgen_export.runner import launch
from molgen_export.errors import ConfigError
from molgen_export.watch.journal import read_journal
from tests.helpers.titan_version import requires_titan03

REPO = Path(__file__).resolve().parents[2]
CONFIGS = REPO / "configs"


def write_yaml(path: Path, text: str) -> Path:
    path.write_text(text)
    return path


def stand_in_run(demo_run, tmp_path, *, dump: str = "./run2", steps: int = 20, exit_code: int = 0,
                 extra: list[str] = (), command: list[str] | None = None) -> Path:
    """A runner YAML training the demo run's model with the stand-in trainer into a fresh dump folder."""
    job = json.loads(demo_run.job_config.read_text())
    job["dump_folder"] = dump
    job["training"]["steps"] = steps
    job["checkpoint"].update(enable=True, interval=10)
    job_file = demo_run.workdir / "job.json"
    job_file.write_text(json.dumps(job))
    command = command or ["{python}", "-m", "molgen_export.integrations.demo_trainer", "--job-config", "{job_config}",
                          "--commit-delay", "0.2", "--exit-code", str(exit_code), *extra]
    return write_yaml(tmp_path / "run.yaml", f"""
torchtitan:
  job_file: job.json
  workdir: {demo_run.workdir}
  command: {json.dumps(command)}
  stop_timeout: 20
export:
  enabled: true
  skip_logits: true
  threads: 1
  nice: 0
  poll: "off"
  grace: 0
""")


def test_config_merge_order_defaults_then_export_yaml_then_run_yaml_then_dotlist(tmp_path):
    write_yaml(tmp_path / "export.yaml", "export:\n  dtype: float16\n  threads: 3\n  poll: '30'\n")
    path = write_yaml(tmp_path / "run.yaml", "torchtitan:\n  module: qwen3\n  config: qwen3_0_6b\n"
                                             "export:\n  enabled: true\n  threads: 6\n")
    config = launch.load_config(path, ["export.poll=5", "torchtitan.nproc_per_node=8"])
    assert config.export.enabled and config.export.dtype == "float16"  # export.yaml over the built-in default
    assert config.export.threads == 6  # the run's YAML over export.yaml
    assert config.export.poll == "5" and config.torchtitan.nproc_per_node == 8  # the command line over both
    assert config.export.retries == 3 and config.export.logits_atol == 1e-3  # built-in defaults
    assert config.export.watch_options().poll == "5"
    assert config.export.export_options(tmp_path).threads == 6


def test_config_errors_name_the_key_and_suggest_the_fix(tmp_path):
    path = write_yaml(tmp_path / "run.yaml", "torchtitan:\n  module: qwen3\n  config: qwen3_0_6b\nexport:\n  enabeld: true\n")
    with pytest.raises(ConfigError, match=r"enabeld.*[Dd]id you mean.*enabled"):
        launch.load_config(path)
    good = write_yaml(tmp_path / "good.yaml", "torchtitan:\n  module: qwen3\n  config: qwen3_0_6b\n")
    with pytest.raises(ConfigError, match="unknown export dtype"):
        launch.load_config(good, ["export.dtype=fp8"])
    with pytest.raises(ConfigError, match="exactly one of module\\+config, job_file or job_config"):
        launch.plan_run(launch.load_config(good, ["torchtitan.job_file=x.toml"]))
    with pytest.raises(ConfigError, match="does not exist"):
        launch.load_config(tmp_path / "missing.yaml")
    with pytest.raises(ConfigError, match="the command line"):
        launch.load_config(good, ["torchtitan.overrides.3=x"])


def test_export_yaml_documents_every_key_with_the_built_in_default():
    from omegaconf import OmegaConf

    text = (CONFIGS / "export.yaml").read_text()
    values = OmegaConf.to_container(OmegaConf.load(CONFIGS / "export.yaml"))["export"]
    names = [f.name for f in fields(launch.ExportSection)]
    assert list(values) == names
    defaults = launch.ExportSection()
    lines = text.splitlines()
    for name in names:
        assert values[name] == getattr(defaults, name), name
        index = next(i for i, line in enumerate(lines) if line.strip().startswith(f"{name}:"))
        assert lines[index - 1].strip().startswith("#"), f"export.yaml: `{name}` has no comment above it"


def test_shipped_configs_load(tmp_path):
    sample = launch.load_config(CONFIGS / "qwen3_0.6b_export.yaml")
    assert sample.export.enabled and sample.torchtitan.config == "qwen3_0_6b"
    assert "--checkpoint.enable" in sample.torchtitan.overrides
    assert launch.load_config(CONFIGS / "demo.yaml").torchtitan.command[:3] == ["{python}", "-m", "molgen_export.integrations.demo_trainer"]


def test_training_command_defaults_to_torchrun_and_titan_02_toml_is_understood(tmp_path):
    toml = tmp_path / "qwen3.toml"
    toml.write_text('[job]\ndump_folder = "./outputs"\n[model]\nname = "qwen3"\nflavor = "0.6B"\n'
                    'hf_assets_path = "./assets/hf/Qwen3-0.6B"\n[training]\nseq_len = 4096\nsteps = 100\n'
                    '[checkpoint]\nenable_checkpoint = true\nfolder = "ckpt"\n')
    path = write_yaml(tmp_path / "run.yaml", f"torchtitan:\n  job_file: {toml.name}\n  workdir: {tmp_path}\n"
                                             "  dump_folder: ./out\n  nproc_per_node: 4\n"
                                             "  overrides: ['--training.steps', '7', '--checkpoint.interval=5']\n")
    plan = launch.plan_run(launch.load_config(path))
    assert plan.command[:5] == [sys.executable, "-m", "torch.distributed.run", "--nproc-per-node", "4"]
    assert plan.command[5:] == ["-m", "torchtitan.train", "--job.config_file", toml.name, "--job.dump_folder", "./out",
                                "--training.steps", "7", "--checkpoint.interval=5"]
    assert plan.job_config["training"]["steps"] == 7 and plan.job_config["checkpoint"]["interval"] == 5
    assert plan.checkpoint_root == tmp_path / "out" / "ckpt"
    parsed = run_config.parse_run_config(plan.job_config, plan.job_config_path)
    assert parsed.kind == "titan-0.2" and parsed.flavor == "0.6B" and parsed.seq_len == 4096


@pytest.mark.slow
@requires_titan03("the stand-in trainer runs a 0.3 job config (model_spec) through the runner")
def test_runner_writes_configs_exports_while_training_and_exits_with_training_code(demo_run, tmp_path, capsys):
    path = stand_in_run(demo_run, tmp_path, exit_code=3)
    code = launch.main(["--config", str(path), "-q"])
    assert code == 3  # training's code (the stand-in exits 2 if job_config.json was not there before it started)
    dump = demo_run.workdir / "run2"
    job = json.loads((dump / "job_config.json").read_text())
    assert job["dump_folder"] == "./run2" and job["training"]["steps"] == 20
    checkpoint_config = json.loads((dump / "checkpoint" / "config.json").read_text())
    assert checkpoint_config["format"] == run_config.RUNNER_CONFIG_FORMAT
    assert checkpoint_config["job_config_path"] == str((dump / "job_config.json").resolve())
    export_root = dump / "checkpoint-hf"
    for step in (10, 20):
        report = json.loads((export_root / f"step-{step}-hf" / export.REPORT_FILE).read_text())
        assert report["status"] == "exported" and report["run_config"]["kind"] == "runner"
    statuses = [(e["step"], e["status"]) for e in read_journal(export_root) if e["event"] == "step"]
    assert statuses == [(10, "exported"), (20, "exported")]
    assert "[export] step-10  ok" in capsys.readouterr().out


@pytest.mark.slow
@requires_titan03("the runner builds the demo config with 0.3's ConfigManager (--module/--config)")
def test_demo_config_goes_through_torchtitan_config_function_and_verifies_each_export(tmp_path, capsys, monkeypatch):
    monkeypatch.chdir(tmp_path)
    code = launch.main(["--config", str(CONFIGS / "demo.yaml"), "-q", "torchtitan.overrides=[--training.steps,10]",
                        "export.on_export=null", "export.threads=1", "export.nice=0"])
    assert code == 0
    dump = tmp_path / "demo-run" / "outputs"
    job = json.loads((dump / "job_config.json").read_text())
    assert job["model_spec"]["flavor"] == "molgen_tiny" and job["training"]["steps"] == 10  # TorchTitan 0.3 to_dict
    report = json.loads((dump / "checkpoint-hf" / "step-10-hf" / export.REPORT_FILE).read_text())
    assert report["fidelity"]["max_abs_diff"] <= 1e-3 and report["fidelity"]["top1_agreement"] == 1.0
    assert re.search(r"\[export\] step-10  ok .* latency [\d.]+ s \(inotify\)", capsys.readouterr().out)


@pytest.mark.slow
@requires_titan03("the stand-in trainer runs a 0.3 job config (model_spec) through the runner")
def test_ctrl_c_stops_training_and_the_watcher_cleanly(demo_run, tmp_path, caplog):
    path = stand_in_run(demo_run, tmp_path, steps=400, extra=["--step-time", "0.05"])
    export_root = demo_run.workdir / "run2" / "checkpoint-hf"

    def press_ctrl_c():  # once the first export is out, as a user at the terminal would
        deadline = time.monotonic() + 90
        while not (export_root / "step-10-hf").is_dir() and time.monotonic() < deadline:
            time.sleep(0.05)
        os.kill(os.getpid(), signal.SIGINT)

    threading.Thread(target=press_ctrl_c, daemon=True).start()
    started = time.monotonic()
    code = launch.main(["--config", str(path)])
    assert code == 128 + signal.SIGINT  # training died of the forwarded SIGINT
    assert time.monotonic() - started < 60
    assert "SIGINT: stopping training and the watcher" in caplog.text
    assert not any(".tmp-" in p.name for p in export_root.iterdir())
    assert all((p / export.REPORT_FILE).is_file() for p in export_root.iterdir() if p.name.endswith("-hf"))
    steps = sorted(int(p.name.split("-")[1]) for p in (demo_run.workdir / "run2" / "checkpoint").glob("step-*"))
    assert steps and steps[-1] < 400  # training was stopped, not run to the end


def test_launcher_runs_the_runner_on_rank_0_and_training_only_elsewhere():
    from molgen_export.integrations.launch import launch_rank, runner_argv

    assert launch_rank({}) == 0
    assert launch_rank({"SLURM_PROCID": "3"}) == 3
    assert launch_rank({"RANK": "0", "SLURM_PROCID": "5"}) == 0
    with pytest.raises(ValueError, match="RANK='x'"):
        launch_rank({"RANK": "x"})
    assert runner_argv(["--config", "a.yaml"], 0) == ["--config", "a.yaml"]
    assert runner_argv(["--config", "a.yaml"], 2) == ["--config", "a.yaml", "role=worker"]
    assert runner_argv(["--config", "a.yaml", "--others", "exit"], 2) is None


def test_worker_role_trains_without_writing_configs_or_watching(demo_run, tmp_path):
    trained = demo_run.workdir / "trained.txt"
    path = stand_in_run(demo_run, tmp_path, command=[
        "{python}", "-c", "import sys; open(sys.argv[1], 'w').write(sys.argv[2])", str(trained), "{job_config}"])
    assert launch.main(["--config", str(path), "-q", "role=worker"]) == 0
    dump = demo_run.workdir / "run2"
    assert trained.read_text() == str(dump / "job_config.json")  # the command ran, with its placeholders filled
    assert not (dump / "job_config.json").exists() and not (dump / "checkpoint-hf").exists()


def test_post_checkpoint_hook_exports_one_step_once(demo_run, capsys):
    from hooks import post_checkpoint

    step_dir = str(demo_run.steps[0])
    assert post_checkpoint.main([step_dir, "--skip-logits", "--nice", "0", "--threads", "1"]) == 0
    assert "step-10  ok" in capsys.readouterr().out
    assert post_checkpoint.main([step_dir, "--skip-logits", "--nice", "0"]) == 0
    assert "step-10  skipped" in capsys.readouterr().out
    assert not (demo_run.checkpoint_root.parent / "checkpoint-hf" / "step-20-hf").exists()  # only the step asked for
    (demo_run.steps[1] / ".metadata").unlink()
    assert post_checkpoint.main([str(demo_run.steps[1]), "--wait", "0.1"]) == 2
    assert "has no .metadata after 0.1 s" in capsys.readouterr().err


@pytest.mark.slow
@requires_titan03("integrations/titan_checkpoint.py subclasses 0.3's CheckpointManager and its Config")
def test_titan_checkpoint_manager_hands_saves_to_a_watcher_process(demo_run):
    import torch

    from hooks import titan_checkpoint
    from molgen_export.demo import build_model

    assert titan_checkpoint.IMPORT_ERROR is None, titan_checkpoint.IMPORT_ERROR

    class Empty:
        def state_dict(self):
            return {}

        def load_state_dict(self, state):
            pass

    config = titan_checkpoint.ExportingCheckpointManager.Config(
        enable=True, folder="checkpoint", interval=10, keep_latest_k=0, export=True,
        export_args=["--once", "--skip-logits", "--threads", "1", "--nice", "0"])
    assert config.to_dict()["export"] is True
    manager = config.build(dataloader=Empty(), model_parts=[build_model(demo_run.arch, seed=3)], optimizers=Empty(),
                           lr_schedulers=Empty(), states={}, sd_adapter=None, base_folder=str(demo_run.run_dir))
    try:
        with torch.no_grad():
            assert manager.save(30)
        process = manager.export_watcher.process
        assert process.wait(timeout=90) == 0, (demo_run.run_dir / "molgen-watch.log").read_text()
    finally:
        manager.close()
    log = (demo_run.run_dir / "molgen-watch.log").read_text()
    assert "--until-pid" in " ".join(process.args) and "step-30  ok" in log
    assert (demo_run.run_dir / "checkpoint-hf" / "step-30-hf" / export.REPORT_FILE).is_file()


@requires_titan03("the stand-in trainer runs a 0.3 job config (model_spec) through the runner")
def test_every_export_option_can_be_set_through_the_yaml_and_reaches_the_export(demo_run, tmp_path):
    """One options source: each ExportOptions / WatchOptions field is an `export:` key (issue 13)."""
    from molgen_export.options import ExportOptions
    from molgen_export.watch.watcher import WatchOptions

    chosen = {"output": "exports", "layout": "sibling", "dtype": "float32", "hf_assets": "assets",
              "max_shard_size": "1MB", "skip_logits": False, "logits_atol": 0.002, "device": "cpu", "force": True,
              "allow_expert_bias_drop": True, "drop_vision_tower": True, "threads": 1, "reader_threads": 1, "poll": "off", "retries": 0, "retry_backoff": 1.0,
              "locked_recheck": 2.0, "rescan": 60.0, "nice": 0, "on_export": None, "on_export_timeout": 60.0,
              "grace": 0.0}
    section = {f.name for f in fields(launch.ExportSection)} - {"enabled", "preflight"}
    options = ({f.name for f in fields(ExportOptions)} | {f.name for f in fields(WatchOptions)}) - launch.SECTION_EXCLUDED
    assert section == options == set(chosen)  # nothing declared twice, nothing missing

    path = stand_in_run(demo_run, tmp_path, steps=10)
    dotlist = [f"export.{k}={'null' if v is None else str(v).lower() if isinstance(v, bool) else v}"
               for k, v in chosen.items()]
    config = launch.load_config(path, dotlist)
    watch = config.export.watch_options()
    for name in {f.name for f in fields(WatchOptions)} & set(chosen):
        assert getattr(watch, name) == chosen[name], name
    assert launch.main(["--config", str(path), "-q", *dotlist]) == 0
    report = json.loads((demo_run.workdir / "exports" / "step-10-hf" / export.REPORT_FILE).read_text())
    for name, value in chosen.items():
        if name in report["options"]:
            expected = str(demo_run.workdir / value) if name in ("output", "hf_assets") else value
            assert report["options"][name] == expected, name
    assert set(report["options"]) == {f.name for f in fields(ExportOptions)} - {"extra"}
    assert report["export_dtype"] == "float32" and report["fidelity"]["passed"]
