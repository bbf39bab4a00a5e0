"""The command line: path forms, step selection, skip/force/stale, dry-run, --json and exit codes (issue 3)."""

from __future__ import annotations

import json
import os
import shutil
import subprocess
import sys
from pathlib import Path

import pytest

from molgen_export.cli import main
from molgen_export.cli.export import select_steps
from molgen_export.dcp.discover import StepInfo, list_steps, resolve_checkpoint_root


def run_cli(capsys, *argv: str) -> tuple[int, str, str]:
    code = main([str(a) for a in argv])
    out, err = capsys.readouterr()
    return code, out, err


# -- discovery and selection -------------------------------------------------------------------------------

def test_steps_ordered_numerically_and_hf_folders_ignored(tmp_path):
    for name in ("step-100", "step-20", "step-3", "step-20-hf", ".step-3-hf.tmp-1-abc", "notes"):
        (tmp_path / name).mkdir()
    (tmp_path / "step-20" / ".metadata").write_bytes(b"")
    steps = list_steps(tmp_path)
    assert [s.step for s in steps] == [3, 20, 100]
    assert [s.complete for s in steps] == [False, True, False]


def test_path_forms_resolve_to_the_same_steps(demo_run):
    root = demo_run.checkpoint_root
    forms = [demo_run.run_dir, root, root / "step-20", root / "step-20" / "__0_0.distcp"]
    resolved = [resolve_checkpoint_root(p) for p in forms]
    assert all(r[0] == root for r in resolved)
    assert [s.step for s in resolved[0][1]] == [10, 20] == [s.step for s in resolved[1][1]]
    assert [s.step for s in resolved[2][1]] == [20] == [s.step for s in resolved[3][1]]


def _infos(*numbers: int) -> list[StepInfo]:
    return [StepInfo(n, Path(f"step-{n}"), "dcp") for n in numbers]


@pytest.mark.parametrize("selector, expected", [
    ("all", [10, 20, 100, 500, 1000]), ("latest", [1000]), ("20,500", [20, 500]),
    ("100-500", [100, 500]), ("every:100", [100, 500, 1000]),
])
def test_step_selection(selector, expected):
    assert [s.step for s in select_steps(_infos(10, 20, 100, 500, 1000), selector)] == expected


@pytest.mark.parametrize("selector, message, fix", [
    ("every:0", "error: cannot read --steps 'every:0'", "fix: use all, latest, 10,20, 100-500 or every:K"),
    ("abc", "error: cannot read --steps 'abc'", "fix: use all, latest, 10,20, 100-500 or every:K"),
    ("7", "error: --steps names step(s) [7] that do not exist", "fix: available: 10, 20"),
    ("5-x", "error: cannot read --steps '5-x'", "fix: use all, latest, 10,20, 100-500 or every:K"),
])
def test_bad_step_selection(capsys, demo_run, selector, message, fix):
    code, out, err = run_cli(capsys, "--dcp-path", demo_run.run_dir, "--steps", selector, "--dry-run")
    assert code == 2
    assert out == ""
    assert err.splitlines() == [message, f"  {fix}"]


# -- exporting, skip, force, stale --------------------------------------------------------------------------

def test_export_run_root_then_skip_then_force_then_stale(capsys, demo_run):
    code, out, _ = run_cli(capsys, "--dcp-path", demo_run.run_dir, "--skip-logits")
    assert code == 0
    lines = out.strip().splitlines()
    assert lines[0].startswith("step-10  ok") and lines[1].startswith("step-20  ok") and "bf16" in lines[0]
    assert lines[-1] == "total: 2 exported"

    code, out, _ = run_cli(capsys, "--dcp-path", demo_run.run_dir, "--skip-logits")
    assert code == 0 and out.count("  skip  ") == 2 and "total: 2 skipped" in out

    code, out, _ = run_cli(capsys, "--dcp-path", demo_run.checkpoint_root / "step-10", "--skip-logits", "--force")
    assert code == 0 and out.startswith("step-10  ok")

    # the step is saved again (different bytes): its export is stale and redone
    shard = demo_run.checkpoint_root / "step-20" / "__0_0.distcp"
    with open(shard, "ab") as f:
        f.write(b"\0")
    code, out, _ = run_cli(capsys, "--dcp-path", demo_run.run_dir, "--skip-logits", "--steps", "latest")
    assert code == 0 and out.startswith("step-20  ok")


def test_in_progress_step_is_listed_and_skipped(capsys, demo_run):
    partial = demo_run.checkpoint_root / "step-30"
    partial.mkdir()
    shutil.copy(demo_run.checkpoint_root / "step-20" / "__0_0.distcp", partial)
    code, out, err = run_cli(capsys, "--dcp-path", demo_run.checkpoint_root, "--skip-logits")
    assert code == 0 and "step-30  in progress" in err
    assert not (demo_run.run_dir / "checkpoint-hf" / "step-30-hf").exists()
    code, _, err = run_cli(capsys, "--dcp-path", partial)
    assert code == 2 and "still being written" in err


def test_json_output(capsys, demo_run, tmp_path):
    code, out, _ = run_cli(capsys, "--dcp-path", demo_run.checkpoint_root / "step-10", "--output", tmp_path, "--json")
    assert code == 0
    (report,) = json.loads(out)
    assert report["status"] == "exported" and report["output_dir"] == str(tmp_path / "step-10-hf")
    assert report["fidelity"]["passed"] and report["bytes_read"] <= 1.05 * report["model_bytes"]
    assert {"metadata", "stream", "verify_files", "verify_logits", "publish", "total"} <= set(report["timings"])


# -- dry run ------------------------------------------------------------------------------------------------

def test_dry_run_reads_no_shard_data(capsys, demo_run):
    """Shards replaced by garbage of the same size: the dry run still lists everything (it never decodes)."""
    for step in demo_run.steps:
        shard = step / "__0_0.distcp"
        shard.write_bytes(os.urandom(shard.stat().st_size))
    code, out, _ = run_cli(capsys, "--dcp-path", demo_run.run_dir, "--dry-run")
    assert code == 0, out
    assert "step-10: complete, not exported yet" in out and "step-20: complete" in out
    assert "model tensors   25" in out and "not read" in out and "float32 -> bfloat16" in out
    assert "check key_coverage" in out and "check tied_weights" in out and "check vocab_padding" in out
    assert not (demo_run.run_dir / "checkpoint-hf").exists()
    # the real export then reads the data and refuses it, naming the file
    code, _, err = run_cli(capsys, "--dcp-path", demo_run.steps[0])
    assert code == 2 and "__0_0.distcp" in err and "does not decode" in err


def test_dry_run_json_and_refusal_exit_code(capsys, demo_run):
    code, out, _ = run_cli(capsys, "--dcp-path", demo_run.steps[0], "--dry-run", "--json")
    (report,) = json.loads(out)
    assert code == 0 and report["status"] == "planned" and report["written"] is False
    config = json.loads(demo_run.job_config.read_text())
    config["model_spec"]["model"]["dim"] = 96
    demo_run.job_config.write_text(json.dumps(config))
    (demo_run.checkpoint_root / "config.json").unlink()
    code, _, err = run_cli(capsys, "--dcp-path", demo_run.steps[0], "--dry-run")
    assert code == 2 and "dim=96" in err


# -- errors and exit codes ----------------------------------------------------------------------------------

def test_path_that_does_not_exist(capsys, tmp_path):
    code, _, err = run_cli(capsys, "--dcp-path", tmp_path / "nope")
    assert code == 2 and "does not exist" in err


def test_folder_without_checkpoint(capsys, tmp_path):
    (tmp_path / "logs").mkdir()
    code, _, err = run_cli(capsys, "--dcp-path", tmp_path)
    assert code == 2 and "no step-N checkpoint folder" in err


def test_distcp_outside_step_folder(capsys, demo_run, tmp_path):
    stray = tmp_path / "__0_0.distcp"
    shutil.copy(demo_run.steps[0] / "__0_0.distcp", stray)
    code, _, err = run_cli(capsys, "--dcp-path", stray)
    assert code == 2 and "cannot be read on its own" in err


def test_corrupt_metadata(capsys, demo_run):
    (demo_run.steps[0] / ".metadata").write_bytes(b"\x80\x04garbage")
    code, _, err = run_cli(capsys, "--dcp-path", demo_run.steps[0])
    assert code == 2 and ".metadata" in err and "corrupt" in err


def test_missing_and_truncated_shard(capsys, demo_run):
    shard = demo_run.steps[0] / "__0_0.distcp"
    data = shard.read_bytes()
    shard.write_bytes(data[: len(data) // 2])
    code, _, err = run_cli(capsys, "--dcp-path", demo_run.steps[0])
    assert code == 2 and "truncated" in err and "__0_0.distcp" in err
    shard.unlink()
    code, _, err = run_cli(capsys, "--dcp-path", demo_run.steps[0])
    assert code == 2 and "missing" in err and "__0_0.distcp" in err


def test_output_not_writable(capsys, demo_run, tmp_path):
    blocker = tmp_path / "a-file"
    blocker.write_text("not a folder")
    code, _, err = run_cli(capsys, "--dcp-path", demo_run.steps[0], "--output", blocker / "sub", "--skip-logits")
    assert code == 2 and "export folder" in err


def test_disk_full_removes_temporary_output(capsys, demo_run, tmp_path):
    mount = tmp_path / "small"
    mount.mkdir()
    if subprocess.run(["mount", "-t", "tmpfs", "-o", "size=64k", "tmpfs", str(mount)]).returncode != 0:
        pytest.skip("cannot mount a small tmpfs here")
    try:
        code, _, err = run_cli(capsys, "--dcp-path", demo_run.steps[0], "--output", mount, "--skip-logits")
        assert code == 2 and ("space" in err) and "GB" in err
        assert [p.name for p in mount.iterdir() if not p.name.endswith(".lock")] == []
    finally:
        subprocess.run(["umount", str(mount)])


def test_help_shows_examples(capsys):
    code, out, _ = run_cli(capsys, "--help")
    assert code == 0 and "examples:" in out and "--dcp-path" in out and "exit codes" in out


def test_python_dash_m_entry_point(demo_run):
    proc = subprocess.run([sys.executable, "-m", "molgen_export", "--dcp-path", str(demo_run.steps[0]), "--dry-run"],
                          capture_output=True, text=True, timeout=120)
    assert proc.returncode == 0 and "step-10: complete" in proc.stdout
